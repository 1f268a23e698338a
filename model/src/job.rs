//! The job a worker receives: one layer with every input pinned to content.
//!
//! It travels to remote workers as JSON inside `Assignment.job_json` (the layer's
//! definition is the language's own type, and its canonical form already has a digest
//! in the cache key); the protocol version in `Register` says both sides read it alike.

use std::path::PathBuf;
use std::sync::Arc;

use farm_stackerfile::Layer;
use serde::{Deserialize, Serialize};

use crate::image::BuiltImage;
use crate::platform::Platform;
use farm_image::{Compression, LayerFormat};

/// The base a worker starts a layer from. A built image is shared (`Arc`), not copied,
/// from the build's results into its dependents' jobs: a deep chain's result names
/// every layer below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobBase {
    Scratch,
    /// An image whose blobs are in the blob store (a built layer or an OCI layout image).
    Image(Arc<BuiltImage>),
    /// A tarball in the blob store; its contents and the `run` changes form one layer.
    Tar {
        digest: String,
    },
    /// A tarball inside another layer's result (`stacker://LAYER/PATH`).
    TarInLayer {
        producer: Arc<BuiltImage>,
        path: String,
    },
}

/// Where an import's content is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportSource {
    /// A file or directory on this machine.
    Local(PathBuf),
    /// A file or directory shipped as a tree in the blob store (a local input sent to a
    /// worker on another machine; see `farm_image::tree`).
    Tree { digest: String },
    /// A blob in the store (an http download).
    Blob { digest: String },
    /// A path inside another layer's result (`stacker://LAYER/PATH`).
    Layer {
        producer: Arc<BuiltImage>,
        path: String,
    },
}

/// One import, pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobImport {
    pub source: ImportSource,
    /// The source as written in the stackerfile (for messages).
    pub written: String,
    /// Name under `/stacker/imports` (the source's basename).
    pub name: String,
    /// The source was written with a trailing `/` ("its contents").
    pub contents_only: bool,
    pub dest: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// sha256 hex the content must have (checked by the worker for `stacker://`
    /// sources; already checked for local files and downloads).
    pub hash: Option<String>,
    /// The digest that enters the cache key.
    pub digest: String,
}

/// A directory whose contents become a layer at `dest` (`overlay_dirs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOverlayDir {
    pub source: PathBuf,
    /// The directory as a tree in the blob store, for a worker on another machine
    /// (it materialises the tree and sets `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<String>,
    pub dest: String,
    pub digest: String,
}

/// A layer to build (sent to remote workers as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub layer: Layer,
    pub cache_key: String,
    pub base: JobBase,
    pub imports: Vec<JobImport>,
    pub overlay_dirs: Vec<JobOverlayDir>,
    /// The complete environment of `run`.
    pub env: Vec<(String, String)>,
    pub source_date_epoch: Option<u64>,
    pub compression: Compression,
    /// The kind of layer to write (`--layer-type`): tar, or a squashfs/erofs image.
    #[serde(default, skip_serializing_if = "LayerFormat::is_tar")]
    pub layer_format: LayerFormat,
    /// The platform the layer must be built on.
    pub platform: Platform,
}

impl Job {
    /// The chain the layer starts from, when its base is an image.
    pub fn base_chain(&self) -> Option<&crate::ChainId> {
        match &self.base {
            JobBase::Image(image) => Some(&image.chain_id),
            JobBase::TarInLayer { producer, .. } => Some(&producer.chain_id),
            JobBase::Scratch | JobBase::Tar { .. } => None,
        }
    }

    /// Its result may be shared and cached (a layer with binds never is).
    pub fn cacheable(&self) -> bool {
        Self::may_cache(&self.layer)
    }

    /// Whether a job of `layer` may be shared and cached (see [`Job::cacheable`]).
    pub fn may_cache(layer: &farm_stackerfile::Layer) -> bool {
        layer.binds.is_empty()
    }
}

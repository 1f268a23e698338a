//! A built image as the farm keeps it between builds, and its layer blobs.

use serde::{Deserialize, Serialize};

use crate::chain::{ChainId, InvalidChainId, chain_id};

/// One layer blob of an image: the only type for a layer everywhere (exported by a
/// worker, pulled from a registry, copied from an OCI layout, kept in the cache).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerBlob {
    /// The OCI media type (Docker layer types are mapped to their OCI equivalents:
    /// same bytes, same digest).
    pub media_type: String,
    /// The blob's digest, `sha256:<hex>`.
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// sha256 of the uncompressed tar (the image config's `rootfs.diff_ids`); for a
    /// squashfs/erofs layer the blob's own digest, as stacker writes it.
    pub diff_id: String,
    /// The dm-verity root hash of a squashfs/erofs layer (its descriptor's
    /// `io.stackeroci.stacker.atomfs_verity_root_hash` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity_root_hash: Option<String>,
}

impl From<&farm_image::ExportedLayer> for LayerBlob {
    fn from(e: &farm_image::ExportedLayer) -> Self {
        LayerBlob {
            media_type: e.media_type.to_string(),
            digest: e.digest.to_string(),
            size: e.size,
            diff_id: e.diff_id.to_string(),
            verity_root_hash: None,
        }
    }
}

/// An image without its manifest (which is assembled per build because its
/// annotations name the build's stackerfile): what a layer's build produces, what the
/// action cache keeps, and what a base image is once its blobs are in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltImage {
    pub config_digest: String,
    pub config_size: u64,
    /// All layers of the image, base first.
    pub layers: Vec<LayerBlob>,
    /// ChainID of the image's root filesystem (a worker's pool keeps chains by it).
    pub chain_id: ChainId,
}

impl BuiltImage {
    /// An image of `layers`, its ChainID computed from their diff_ids.
    pub fn new(
        config_digest: String,
        config_size: u64,
        layers: Vec<LayerBlob>,
    ) -> Result<Self, InvalidChainId> {
        let chain_id = chain_id(layers.iter().map(|l| l.diff_id.as_str()))?;
        Ok(BuiltImage {
            config_digest,
            config_size,
            layers,
            chain_id,
        })
    }

    /// The config's digest, then every layer's.
    pub fn blob_digests(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.config_digest.as_str())
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

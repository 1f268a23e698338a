//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/...`) and
//! reproducible JSON for OCI documents.
//!
//! oci-spec 0.10 keeps labels and annotations in `HashMap`s, whose iteration (and so
//! serde serialisation) order is random per process. [`to_canonical_json`] therefore
//! serialises to a `serde_json::Value` and sorts every object's keys recursively
//! before writing compact JSON, so identical documents give identical bytes (and
//! digests). Everything this module writes (index.json, manifests, configs) goes
//! through it.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::store::BlobStore;

/// The annotation that names a tag in an OCI layout's index.json.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const LAYOUT_VERSION: &str = "1.0.0";
/// Largest JSON document (manifest, config, index) read into memory.
const MAX_JSON: u64 = 64 << 20;

/// Serialise `value` as compact JSON with all object keys sorted (recursively):
/// byte-identical output for identical input, whatever map types it uses.
pub fn to_canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let v = serde_json::to_value(value)?;
    Ok(serde_json::to_vec(&sorted(v))?)
}

fn sorted(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Pick the manifest for `os`/`arch` (and `variant`, when given) from a
/// multi-platform index.
pub fn select_platform<'a>(
    index: &'a ImageIndex,
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> Result<&'a Descriptor> {
    let matches = |d: &&Descriptor| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == os
                && p.architecture().to_string() == arch
                && variant.is_none_or(|v| p.variant().as_deref() == Some(v))
        })
    };
    index
        .manifests()
        .iter()
        .find(matches)
        .ok_or_else(|| Error::PlatformNotFound {
            os: os.to_string(),
            arch: arch.to_string(),
            available: index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn tag_of(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME_ANNOTATION))
        .map(String::as_str)
}

/// An OCI image layout directory. Its blobs are a [`BlobStore`] over the same
/// directory, so blobs are written create-only and named only when complete.
#[derive(Clone, Debug)]
pub struct OciLayout {
    root: PathBuf,
    blobs: BlobStore,
}

impl OciLayout {
    /// Open the layout at `dir`, creating it (directory, `oci-layout`, an empty
    /// `index.json`) if needed.
    pub async fn create(dir: &Path) -> Result<Self> {
        let root = dir.to_path_buf();
        let r = root.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            std::fs::create_dir_all(r.join("blobs").join(Digest::ALGORITHM))
                .ctx(|| format!("creating OCI layout {}", r.display()))?;
            let layout = r.join(LAYOUT_FILE);
            if !layout.exists() {
                let body = to_canonical_json(&serde_json::json!({
                    "imageLayoutVersion": LAYOUT_VERSION
                }))?;
                write_atomic(&r, LAYOUT_FILE, &body)?;
            }
            if !r.join(INDEX_FILE).exists() {
                let _lock = lock_dir(&r)?;
                if !r.join(INDEX_FILE).exists() {
                    write_index(&r, Vec::new())?;
                }
            }
            Ok(())
        })
        .await??;
        Self::open(dir).await
    }

    /// Open an existing layout, checking its `oci-layout` file.
    pub async fn open(dir: &Path) -> Result<Self> {
        let root = dir.to_path_buf();
        let body = tokio::fs::read(root.join(LAYOUT_FILE))
            .await
            .ctx(|| format!("reading {}/{LAYOUT_FILE}", root.display()))?;
        let v: Value = serde_json::from_slice(&body)?;
        match v.get("imageLayoutVersion").and_then(Value::as_str) {
            Some(ver) if ver.starts_with("1.") => {}
            other => {
                return Err(Error::Layout {
                    path: root,
                    reason: format!("unsupported imageLayoutVersion {other:?}"),
                });
            }
        }
        let blobs = BlobStore::local(&root)?;
        Ok(OciLayout { root, blobs })
    }

    /// The layout directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The layout's blobs.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Read `index.json`.
    pub async fn index(&self) -> Result<ImageIndex> {
        let body = tokio::fs::read(self.root.join(INDEX_FILE))
            .await
            .ctx(|| format!("reading {}/{INDEX_FILE}", self.root.display()))?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Store a JSON document (canonical form) as a blob; returns its descriptor.
    pub async fn put_json<T: Serialize>(
        &self,
        media_type: MediaType,
        value: &T,
    ) -> Result<Descriptor> {
        put_json(&self.blobs, media_type, value).await
    }

    /// Store an image manifest.
    pub async fn put_manifest(&self, manifest: &ImageManifest) -> Result<Descriptor> {
        self.put_json(MediaType::ImageManifest, manifest).await
    }

    /// Store an image index (multi-platform).
    pub async fn put_index(&self, index: &ImageIndex) -> Result<Descriptor> {
        self.put_json(MediaType::ImageIndex, index).await
    }

    /// Store an image config.
    pub async fn put_config(&self, config: &ImageConfiguration) -> Result<Descriptor> {
        self.put_json(MediaType::ImageConfig, config).await
    }

    /// Point `tag` at `manifest` (an image manifest or index already stored in the
    /// layout), replacing any previous holder of the tag. index.json is rewritten
    /// atomically (temporary file, fsync, rename) under a lock on the layout directory.
    /// Other entries keep their place; the tag's entry goes last (see `set_tags`).
    pub async fn set_tag(&self, tag: &str, manifest: &Descriptor) -> Result<()> {
        self.set_tags(&[(tag.to_string(), manifest.clone())]).await
    }

    /// Point several tags at once, in one atomic rewrite of index.json: either every
    /// tag moves or none does. Each manifest must already be stored in the layout.
    /// The entries of other tags keep their place and these follow in the order given
    /// (a build passes its images in plan order: stacker writes them in build order, and
    /// tools index `manifests[N]`).
    pub async fn set_tags(&self, tags: &[(String, Descriptor)]) -> Result<()> {
        let mut entries = Vec::with_capacity(tags.len());
        for (tag, manifest) in tags {
            if tag.is_empty() {
                return Err(Error::Layout {
                    path: self.root.clone(),
                    reason: "empty tag".into(),
                });
            }
            let digest = Digest::try_from(manifest.digest())?;
            match self.blobs.size(&digest).await? {
                Some(size) if size == manifest.size() => {}
                Some(size) => {
                    return Err(Error::Layout {
                        path: self.root.clone(),
                        reason: format!(
                            "descriptor for {digest} says {} bytes, blob has {size}",
                            manifest.size()
                        ),
                    });
                }
                None => return Err(Error::BlobNotFound(digest)),
            }
            let mut desc = manifest.clone();
            let mut ann = desc.annotations().clone().unwrap_or_default();
            ann.insert(REF_NAME_ANNOTATION.to_string(), tag.clone());
            desc.set_annotations(Some(ann));
            entries.push((tag.clone(), desc));
        }
        self.update_index(move |manifests| {
            for (tag, desc) in entries {
                manifests.retain(|d| tag_of(d) != Some(tag.as_str()));
                manifests.push(desc);
            }
        })
        .await
    }

    /// Remove `tag`; returns whether it existed. Blobs are left in place.
    pub async fn remove_tag(&self, tag: &str) -> Result<bool> {
        let tag = tag.to_string();
        let found = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = found.clone();
        self.update_index(move |manifests| {
            let before = manifests.len();
            manifests.retain(|d| tag_of(d) != Some(tag.as_str()));
            f.store(
                manifests.len() != before,
                std::sync::atomic::Ordering::Relaxed,
            );
        })
        .await?;
        Ok(found.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn update_index<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&mut Vec<Descriptor>) + Send + 'static,
    {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let _lock = lock_dir(&root)?;
            let body = std::fs::read(root.join(INDEX_FILE))
                .ctx(|| format!("reading {}/{INDEX_FILE}", root.display()))?;
            let index: ImageIndex = serde_json::from_slice(&body)?;
            let mut manifests = index.manifests().clone();
            f(&mut manifests);
            write_index(&root, manifests)
        })
        .await?
    }

    /// All tags, sorted.
    pub async fn tags(&self) -> Result<Vec<String>> {
        let index = self.index().await?;
        let mut tags: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(tag_of)
            .map(str::to_string)
            .collect();
        tags.sort();
        Ok(tags)
    }

    /// The index.json entry for `tag` (an image manifest or an index).
    pub async fn resolve(&self, tag: &str) -> Result<Descriptor> {
        self.index()
            .await?
            .manifests()
            .iter()
            .find(|d| tag_of(d) == Some(tag))
            .cloned()
            .ok_or_else(|| Error::TagNotFound {
                path: self.root.clone(),
                tag: tag.to_string(),
            })
    }

    /// Read and verify a JSON blob named by `desc` (digest and size are checked).
    pub async fn read_json<T: DeserializeOwned>(&self, desc: &Descriptor) -> Result<T> {
        read_json(&self.blobs, desc).await
    }

    /// The image manifest for `tag`. When the tag names a multi-platform index, the
    /// manifest for `platform` (`(os, arch)`) is chosen; without a platform the
    /// index must hold exactly one manifest.
    pub async fn manifest(
        &self,
        tag: &str,
        platform: Option<(&str, &str)>,
    ) -> Result<(Descriptor, ImageManifest)> {
        let desc = self.resolve(tag).await?;
        let is_index = matches!(desc.media_type(), MediaType::ImageIndex)
            || desc.media_type().to_string()
                == "application/vnd.docker.distribution.manifest.list.v2+json";
        if !is_index {
            let m: ImageManifest = self.read_json(&desc).await?;
            return Ok((desc, m));
        }
        let index: ImageIndex = self.read_json(&desc).await?;
        let chosen = match platform {
            Some((os, arch)) => select_platform(&index, os, arch, None)?.clone(),
            None if index.manifests().len() == 1 => index.manifests()[0].clone(),
            None => {
                return Err(Error::Layout {
                    path: self.root.clone(),
                    reason: format!("tag {tag:?} is a multi-platform index: choose a platform"),
                });
            }
        };
        let m: ImageManifest = self.read_json(&chosen).await?;
        Ok((chosen, m))
    }

    /// The image config a manifest points at.
    pub async fn config(&self, manifest: &ImageManifest) -> Result<ImageConfiguration> {
        self.read_json(manifest.config()).await
    }
}

/// Store a JSON document in canonical form in `store`; returns its descriptor.
pub(crate) async fn put_json<T: Serialize>(
    store: &BlobStore,
    media_type: MediaType,
    value: &T,
) -> Result<Descriptor> {
    let body = to_canonical_json(value)?;
    let info = store.put(Bytes::from(body)).await?;
    Ok(oci_spec::image::DescriptorBuilder::default()
        .media_type(media_type)
        .digest(info.digest.to_oci())
        .size(info.size)
        .build()?)
}

/// Read and verify a JSON blob named by `desc`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    store: &BlobStore,
    desc: &Descriptor,
) -> Result<T> {
    let digest = Digest::try_from(desc.digest())?;
    if desc.size() > MAX_JSON {
        return Err(Error::Layout {
            path: PathBuf::from(store.url()),
            reason: format!(
                "{digest}: {} bytes is too large for a JSON document",
                desc.size()
            ),
        });
    }
    let body = store.get_bytes(&digest).await?;
    if body.len() as u64 != desc.size() {
        return Err(Error::Layout {
            path: PathBuf::from(store.url()),
            reason: format!(
                "{digest}: descriptor says {} bytes, blob has {}",
                desc.size(),
                body.len()
            ),
        });
    }
    Ok(serde_json::from_slice(&body)?)
}

fn write_index(root: &Path, manifests: Vec<Descriptor>) -> Result<()> {
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()?;
    write_atomic(root, INDEX_FILE, &to_canonical_json(&index)?)
}

/// Write `root/name` atomically: temporary file, fsync, rename, fsync directory.
fn write_atomic(root: &Path, name: &str, body: &[u8]) -> Result<()> {
    let tmp = root.join(format!(".{name}.tmp"));
    let target = root.join(name);
    let mut f = std::fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(body)
        .ctx(|| format!("writing {}", tmp.display()))?;
    f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &target).ctx(|| format!("renaming to {}", target.display()))?;
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// An exclusive `flock` on the layout directory, released on drop.
fn lock_dir(root: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(root).ctx(|| format!("opening {}", root.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .ctx(|| format!("locking {}", root.display()))?;
    Ok(f)
}

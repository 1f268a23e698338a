//! Pinning a layer's inputs: its base, imports and overlay dirs become content the
//! workers can reach by digest, each with the digest that enters the layer's cache key.
//!
//! - [`local`]: files and directories on this machine, checked against the context;
//! - [`http`]: downloads, through the farm's [`Fetcher`];
//! - [`registry`]: `docker` bases, pulled into the blob store;
//! - [`oci`]: bases from local OCI layouts;
//! - `stacker://` paths inside built layers stand for their producer's result
//!   ([`layer_path_digest`]).

pub mod http;
pub mod local;
pub mod oci;
pub mod registry;

use std::path::Path;
use std::sync::Arc;

use farm_image::BlobStore;
use farm_model::{BuiltImage, ImportSource, JobBase, JobImport, JobOverlayDir, Platform};
use farm_stackerfile::{Base, Import, Layer, OverlayDir, Source};

use crate::cache::BaseKey;
use crate::fetch::{FetchError, Fetcher};
use local::{InputError, LocalKind, LocalScope};
use registry::RegistryBases;

/// Why an input could not be pinned; every one is the input's fault.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Local(#[from] InputError),
    #[error("overlay_dirs source '{written}' is not a directory")]
    NotADirectory { written: String },
    #[error("base tarball {written}: {source}")]
    Tarball {
        written: String,
        source: farm_image::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("base oci {url}: {source}")]
    Oci {
        url: String,
        source: farm_image::Error,
    },
    #[error("base {url}: {message}")]
    Registry { url: String, message: String },
}

/// Where inputs come from, for one build.
pub struct Sources<'a> {
    pub blobs: &'a BlobStore,
    /// Where local inputs may come from.
    pub context: &'a LocalScope,
    pub fetcher: &'a Fetcher,
    pub registry: &'a RegistryBases,
}

/// A dependency of the layer, built: its image and its cache key.
#[derive(Debug, Clone, Copy)]
pub struct Built<'a> {
    pub image: &'a Arc<BuiltImage>,
    pub key: &'a str,
}

/// A layer's inputs, pinned; each carries its part of the cache key.
#[derive(Debug, Clone)]
pub struct Pinned {
    pub base: JobBase,
    pub base_key: BaseKey,
    /// Each with its `digest`.
    pub imports: Vec<JobImport>,
    /// Each with its `digest`.
    pub overlay_dirs: Vec<JobOverlayDir>,
}

impl Sources<'_> {
    /// Pin `layer`'s inputs for `platform`. `built` gives the dependency of a tag
    /// (its built bases and `stacker://` producers, all built by now).
    pub async fn pin<'b>(
        &self,
        layer: &Layer,
        platform: &Platform,
        built: impl Fn(&str) -> Built<'b>,
    ) -> Result<Pinned, PinError> {
        let (base, base_key) = self.base(layer, platform, &built).await?;
        let mut imports = Vec::with_capacity(layer.imports.len());
        for import in &layer.imports {
            imports.push(self.import(import, &built).await?);
        }
        let overlay_dirs = layer
            .overlay_dirs
            .iter()
            .map(|od| self.overlay_dir(od))
            .collect::<Result<_, _>>()?;
        Ok(Pinned {
            base,
            base_key,
            imports,
            overlay_dirs,
        })
    }

    async fn base<'b>(
        &self,
        layer: &Layer,
        platform: &Platform,
        built: &impl Fn(&str) -> Built<'b>,
    ) -> Result<(JobBase, BaseKey), PinError> {
        Ok(match &layer.from {
            Base::Scratch => (JobBase::Scratch, BaseKey::Scratch),
            Base::Built { tag } => {
                let dep = built(tag);
                (
                    JobBase::Image(Arc::clone(dep.image)),
                    BaseKey::Built(dep.key.to_string()),
                )
            }
            Base::Tar { source } => {
                let (base, digest) = match source {
                    Source::Local { written, path } => {
                        let pinned = self.context.pin(LocalKind::TarBase, written, path, None)?;
                        let digest =
                            local::store_file(self.blobs, &pinned)
                                .await
                                .map_err(|source| PinError::Tarball {
                                    written: written.clone(),
                                    source,
                                })?;
                        (
                            JobBase::Tar {
                                digest: digest.clone(),
                            },
                            digest,
                        )
                    }
                    Source::Http { url } => {
                        let digest = http::fetch_tarball(self.fetcher, url).await?;
                        (
                            JobBase::Tar {
                                digest: digest.clone(),
                            },
                            digest,
                        )
                    }
                    Source::Layer { layer: tag, path } => {
                        let producer = built(tag);
                        (
                            JobBase::TarInLayer {
                                producer: Arc::clone(producer.image),
                                path: path.clone(),
                            },
                            layer_path_digest(producer, path),
                        )
                    }
                };
                (base, BaseKey::Tar(digest))
            }
            Base::Oci { url } => {
                let (layout, tag) =
                    farm_stackerfile::split_oci_url(&layer.dir, url).ok_or_else(|| {
                        PinError::Oci {
                            url: url.clone(),
                            source: farm_image::Error::Layout {
                                path: layer.dir.join(url),
                                reason: "not an OCI layout URL PATH:TAG".into(),
                            },
                        }
                    })?;
                let layout = self.context.resolve(LocalKind::OciBase, url, &layout)?;
                let (image, manifest) = oci::import(self.blobs, &layout, &tag, platform)
                    .await
                    .map_err(|source| PinError::Oci {
                        url: url.clone(),
                        source,
                    })?;
                (JobBase::Image(Arc::new(image)), BaseKey::Oci(manifest))
            }
            Base::Docker { url, insecure } => {
                let (image, manifest) = self
                    .registry
                    .pull(self.blobs, url, *insecure, platform)
                    .await
                    .map_err(|message| PinError::Registry {
                        url: url.clone(),
                        message,
                    })?;
                (JobBase::Image(Arc::new(image)), BaseKey::Docker(manifest))
            }
        })
    }

    async fn import<'b>(
        &self,
        import: &Import,
        built: &impl Fn(&str) -> Built<'b>,
    ) -> Result<JobImport, PinError> {
        let written = import.source.written();
        let (source, digest, name) = match &import.source {
            Source::Local { path, .. } => {
                let pinned =
                    self.context
                        .pin(LocalKind::Import, &written, path, import.hash.as_deref())?;
                (
                    ImportSource::Local(pinned.resolved),
                    pinned.digest,
                    file_name(written.trim_end_matches('/')),
                )
            }
            Source::Http { url } => {
                let digest = http::fetch_import(self.fetcher, url, import.hash.as_deref()).await?;
                (
                    ImportSource::Blob {
                        digest: digest.clone(),
                    },
                    digest,
                    file_name(http::download_name(url)),
                )
            }
            Source::Layer { layer: tag, path } => {
                let producer = built(tag);
                (
                    ImportSource::Layer {
                        producer: Arc::clone(producer.image),
                        path: path.clone(),
                    },
                    layer_path_digest(producer, path),
                    file_name(path.trim_end_matches('/')),
                )
            }
        };
        Ok(JobImport {
            source,
            contents_only: written.ends_with('/'),
            written,
            name,
            dest: import.dest.clone(),
            mode: import.mode,
            uid: import.uid,
            gid: import.gid,
            hash: import.hash.clone(),
            digest,
        })
    }

    fn overlay_dir(&self, od: &OverlayDir) -> Result<JobOverlayDir, PinError> {
        let pinned = self
            .context
            .pin(LocalKind::OverlayDir, &od.written, &od.source, None)?;
        if !pinned.is_dir {
            return Err(PinError::NotADirectory {
                written: od.written.clone(),
            });
        }
        Ok(JobOverlayDir {
            source: pinned.resolved,
            tree: None,
            dest: od.dest.clone(),
            digest: pinned.digest,
        })
    }
}

/// The name an import is copied under: the last component of `path`.
fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "import".to_string())
}

/// The digest standing for `path` inside a built layer's result: the result's layers
/// determine its filesystem exactly, so this changes whenever the content can.
pub fn layer_path_digest(producer: Built<'_>, path: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let layers: Vec<&str> = producer
        .image
        .layers
        .iter()
        .map(|l| l.digest.as_str())
        .collect();
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(
            format!("stacker:// {} {} {path}", producer.key, layers.join(",")).as_bytes()
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_model::{ChainId, LayerBlob};
    use farm_stackerfile::Plan;

    async fn pin_first(dir: &Path, yaml: &str) -> Result<Pinned, PinError> {
        let file = dir.join("stacker.yaml");
        std::fs::write(&file, yaml).unwrap();
        let plan = Plan::load(&file, &Default::default(), &farm_stackerfile::LocalFiles).unwrap();
        let blobs = BlobStore::local(&dir.join("blobs")).unwrap();
        let fetcher = Fetcher::new(blobs.clone(), &dir.join("state"), Default::default())
            .await
            .unwrap();
        let registry = RegistryBases::default();
        let scope = LocalScope::Within(dir.to_path_buf());
        let sources = Sources {
            blobs: &blobs,
            context: &scope,
            fetcher: &fetcher,
            registry: &registry,
        };
        let platform = "linux/amd64".parse().unwrap();
        sources
            .pin(&plan.layers[0].layer, &platform, |_| {
                unreachable!("no dependencies")
            })
            .await
    }

    const LAYER: &str = "l:\n  from:\n    type: tar\n    url: base.tar\n  import:\n    - a.txt\n  \
                         overlay_dirs:\n    - source: od\n      dest: /o\n";

    #[tokio::test]
    async fn local_inputs_are_pinned_by_content_and_a_tarball_goes_into_the_blob_store() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("base.tar"), "not really a tar").unwrap();
        std::fs::write(d.path().join("a.txt"), "one").unwrap();
        std::fs::create_dir(d.path().join("od")).unwrap();
        std::fs::write(d.path().join("od/f"), "x").unwrap();
        let pinned = pin_first(d.path(), LAYER).await.unwrap();
        let JobBase::Tar { digest } = &pinned.base else {
            panic!("{:?}", pinned.base)
        };
        assert!(matches!(&pinned.base_key, BaseKey::Tar(k) if k == digest));
        let blobs = BlobStore::local(&d.path().join("blobs")).unwrap();
        assert!(
            blobs
                .exists(&farm_image::Digest::parse(digest).unwrap())
                .await
                .unwrap()
        );
        let import = &pinned.imports[0];
        assert_eq!(import.name, "a.txt");
        assert!(matches!(&import.source, ImportSource::Local(p) if p.ends_with("a.txt")));
        assert_eq!(pinned.overlay_dirs[0].dest, "/o");

        std::fs::write(d.path().join("a.txt"), "two").unwrap();
        std::fs::write(d.path().join("od/f"), "y").unwrap();
        let again = pin_first(d.path(), LAYER).await.unwrap();
        assert_ne!(again.imports[0].digest, import.digest);
        assert_ne!(again.overlay_dirs[0].digest, pinned.overlay_dirs[0].digest);
    }

    #[tokio::test]
    async fn an_overlay_dir_that_is_a_file_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("base.tar"), "t").unwrap();
        std::fs::write(d.path().join("a.txt"), "one").unwrap();
        std::fs::write(d.path().join("od"), "a file").unwrap();
        let e = pin_first(d.path(), LAYER).await.unwrap_err();
        assert!(matches!(e, PinError::NotADirectory { .. }), "{e}");
        assert_eq!(e.to_string(), "overlay_dirs source 'od' is not a directory");
        std::fs::remove_file(d.path().join("base.tar")).unwrap();
        let e = pin_first(d.path(), LAYER).await.unwrap_err();
        assert!(
            matches!(e, PinError::Local(InputError::Missing { .. })),
            "{e}"
        );
    }

    #[test]
    fn a_stacker_path_digest_follows_the_producer_and_the_path() {
        let image = |layer: &str| BuiltImage {
            config_digest: format!("sha256:{}", "c".repeat(64)),
            config_size: 1,
            layers: vec![LayerBlob {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: format!("sha256:{}", layer.repeat(64)),
                size: 1,
                diff_id: format!("sha256:{}", layer.repeat(64)),
                verity_root_hash: None,
            }],
            chain_id: ChainId::parse(&format!("sha256:{}", layer.repeat(64))).unwrap(),
        };
        let (a, b) = (Arc::new(image("a")), Arc::new(image("b")));
        let digest = |image, key, path| layer_path_digest(Built { image, key }, path);
        let base = digest(&a, "k1", "/out/app");
        assert_eq!(base, digest(&a, "k1", "/out/app"));
        assert_ne!(base, digest(&b, "k1", "/out/app"), "another content");
        assert_ne!(base, digest(&a, "k2", "/out/app"), "another producer");
        assert_ne!(base, digest(&a, "k1", "/out/lib"), "another path");
    }
}

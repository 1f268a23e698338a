//! Pulling an image into a [`BlobStore`]: the tag is resolved to a manifest digest once,
//! a multi-platform index gives the manifest of the wanted platform, and every blob the
//! store lacks is streamed into it and verified against its digest (nothing whole in
//! memory but manifests and configs).

use bytes::Bytes;
use farm_image::{BlobStore, Digest};
use farm_model::{LayerBlob, Platform};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::auth::Credentials;
use crate::error::{Error, Result};
use crate::reference::ImageRef;
use crate::session::{ConnectOptions, Session};

/// OCI and Docker (v2 schema 2) manifest and index media types.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Largest manifest or config read into memory.
const MAX_JSON: u64 = 16 << 20;
/// Layers downloaded at the same time.
const PARALLEL_BLOBS: usize = 3;

/// A pulled image: everything is in the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The digest of the image manifest (of the chosen platform for an index).
    pub manifest_digest: Digest,
    /// The digest of the index the tag named, when it named one.
    pub index_digest: Option<Digest>,
    /// The config blob.
    pub config_digest: Digest,
    /// The config blob's size.
    pub config_size: u64,
    /// The layers, base first.
    /// The layers, base first (Docker layer media types mapped to their OCI
    /// equivalents: same bytes, same digest).
    pub layers: Vec<LayerBlob>,
    /// Blobs that were downloaded (the others were in the store already).
    pub downloaded_blobs: usize,
    /// Bytes downloaded.
    pub downloaded_bytes: u64,
}

/// A manifest or index document's media type: its `mediaType` field, else guessed from
/// its shape (`manifests` makes an index).
pub fn media_type_of(doc: &Value) -> String {
    match doc.get("mediaType").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None if doc.get("manifests").is_some() => OCI_INDEX.to_string(),
        None => OCI_MANIFEST.to_string(),
    }
}

/// Is this media type an index (OCI) or a manifest list (Docker)?
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// The OCI media type recorded for a layer of `media_type`, or None when it is not a
/// filesystem layer farm can use.
pub fn layer_media_type(media_type: &str) -> Option<&str> {
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Some("application/vnd.oci.image.layer.v1.tar+gzip")
        }
        "application/vnd.docker.image.rootfs.diff.tar" => {
            Some("application/vnd.oci.image.layer.v1.tar")
        }
        m if m.starts_with("application/vnd.oci.image.layer.") => Some(m),
        // stacker's squashfs/erofs layer types (`--layer-type`).
        m if farm_image::FsMediaType::parse(m).is_some() => Some(m),
        _ => None,
    }
}

fn parse_json(image: &ImageRef, what: &str, body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body).map_err(|e| Error::Unsupported {
        image: image.to_string(),
        reason: format!("its {what} is not JSON: {e}"),
    })
}

/// A descriptor's digest and size.
fn descriptor(image: &ImageRef, d: &Value, what: &str) -> Result<(Digest, u64)> {
    let bad = |reason: String| Error::Unsupported {
        image: image.to_string(),
        reason: format!("{what}: {reason}"),
    };
    let digest = d
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no digest".into()))?;
    let digest = Digest::parse(digest).map_err(|e| bad(e.to_string()))?;
    let size = d
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no size".into()))?;
    Ok((digest, size))
}

/// Choose the manifest for `platform` from an index.
fn choose(image: &ImageRef, index: &Value, platform: &Platform) -> Result<(Digest, u64)> {
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let field = |m: &Value, k: &str| {
        m.get("platform")
            .and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let candidates: Vec<&Value> = manifests
        .iter()
        .filter(|m| {
            field(m, "os").as_deref() == Some(platform.os.as_str())
                && field(m, "architecture").as_deref() == Some(platform.arch.as_str())
        })
        .collect();
    let chosen = match &platform.variant {
        Some(v) => candidates
            .iter()
            .find(|m| field(m, "variant").as_deref() == Some(v.as_str())),
        // Without a wanted variant: one without a variant, else the first.
        None => candidates
            .iter()
            .find(|m| field(m, "variant").is_none())
            .or(candidates.first()),
    };
    match chosen {
        Some(m) => descriptor(image, m, "index entry"),
        None => Err(Error::PlatformNotFound {
            image: image.to_string(),
            platform: platform.to_string(),
            available: manifests
                .iter()
                .filter_map(|m| {
                    let os = field(m, "os")?;
                    let arch = field(m, "architecture")?;
                    Some(match field(m, "variant") {
                        Some(v) => format!("{os}/{arch}/{v}"),
                        None => format!("{os}/{arch}"),
                    })
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Resolve `url` (`docker://...`) to what its tag names now: the same reference pinned
/// to the manifest (or index) digest. A reference with a digest is returned as it is.
#[tracing::instrument(
    target = "farm_trace",
    name = "registry resolve",
    skip(credentials, opts)
)]
pub async fn resolve(
    url: &str,
    credentials: &Credentials,
    opts: &ConnectOptions,
) -> Result<ImageRef> {
    let image = ImageRef::parse(url)?;
    if image.digest.is_some() {
        return Ok(image);
    }
    let session = Session::connect(&image, credentials, opts).await?;
    let digest = match session
        .client
        .fetch_manifest_digest(&image.to_oci(), &session.auth.to_oci())
        .await
    {
        Ok(d) => d,
        Err(e) => return Err(refine_not_found(&session, &image, session.error(&image, e)).await),
    };
    let digest = Digest::parse(&digest).map_err(|e| Error::Registry {
        registry: image.registry.clone(),
        detail: format!("{image}: the registry answered digest {digest:?}: {e}"),
    })?;
    Ok(ImageRef {
        digest: Some(digest.to_string()),
        ..image
    })
}

/// Pull `url` (`docker://...`) for `platform` into `blobs`.
pub async fn pull(
    blobs: &BlobStore,
    url: &str,
    platform: &Platform,
    credentials: &Credentials,
    opts: &ConnectOptions,
) -> Result<PulledImage> {
    pull_ref(blobs, &ImageRef::parse(url)?, platform, credentials, opts).await
}

/// [`pull`] of a parsed reference (e.g. one [`resolve`] pinned to a digest).
pub async fn pull_ref(
    blobs: &BlobStore,
    image: &ImageRef,
    platform: &Platform,
    credentials: &Credentials,
    opts: &ConnectOptions,
) -> Result<PulledImage> {
    // A span for traces (issue 16; not shown in logs), its error the text the user sees.
    let span = tracing::info_span!(
        target: "farm_trace",
        "registry pull",
        image = %image,
        platform = %platform,
        layers = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let pulled = tracing::Instrument::instrument(
        pull_untraced(blobs, image, platform, credentials, opts),
        span.clone(),
    )
    .await;
    match &pulled {
        Ok(p) => span.record("layers", p.layers.len()),
        Err(e) => span.record("otel.status_description", e.to_string()),
    };
    pulled
}

async fn pull_untraced(
    blobs: &BlobStore,
    image: &ImageRef,
    platform: &Platform,
    credentials: &Credentials,
    opts: &ConnectOptions,
) -> Result<PulledImage> {
    let image = image.clone();
    let session = Session::connect(&image, credentials, opts).await?;
    let reference = image.to_oci();
    let auth = session.auth.to_oci();

    // Resolve the tag once: everything after this is by digest.
    let (body, digest) = match session
        .client
        .pull_manifest_raw(&reference, &auth, ACCEPTED)
        .await
    {
        Ok(x) => x,
        Err(e) => return Err(refine_not_found(&session, &image, session.error(&image, e)).await),
    };
    let digest = verified_digest(&image, &body, &digest)?;
    let doc = parse_json(&image, "manifest", &body)?;
    let media_type = media_type_of(&doc);
    let (index_digest, manifest_digest, body, doc) = if is_index(&media_type) {
        let (chosen, _) = choose(&image, &doc, platform)?;
        let by_digest = image.with_digest(&chosen.to_string());
        let (mbody, mdigest) = session
            .client
            .pull_manifest_raw(&by_digest.to_oci(), &auth, ACCEPTED)
            .await
            .map_err(|e| session.error(&by_digest, e))?;
        let mdigest = verified_digest(&by_digest, &mbody, &mdigest)?;
        if mdigest != chosen {
            return Err(Error::Registry {
                registry: image.registry.clone(),
                detail: format!("asked for manifest {chosen}, got {mdigest}"),
            });
        }
        let mdoc = parse_json(&by_digest, "manifest", &mbody)?;
        (Some(digest), mdigest, mbody, mdoc)
    } else {
        (None, digest, body, doc)
    };
    let media_type = media_type_of(&doc);
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(Error::Unsupported {
            image: image.to_string(),
            reason: format!("manifest media type {media_type} is not an image manifest"),
        });
    }
    tracing::info!(%image, manifest = %manifest_digest, "resolved");
    let by_digest = image.with_digest(&manifest_digest.to_string());
    let oref = by_digest.to_oci();

    let config = doc.get("config").cloned().unwrap_or(Value::Null);
    let (config_digest, config_size) = descriptor(&image, &config, "config")?;
    if config_size > MAX_JSON {
        return Err(Error::Unsupported {
            image: image.to_string(),
            reason: format!("its config is {config_size} bytes"),
        });
    }
    let mut layers = Vec::new();
    for (n, l) in doc
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let (d, size) = descriptor(&image, l, &format!("layer {n}"))?;
        let mt = l.get("mediaType").and_then(Value::as_str).unwrap_or("");
        let Some(oci_mt) = layer_media_type(mt) else {
            return Err(Error::Unsupported {
                image: image.to_string(),
                reason: format!("layer {n} has media type {mt:?}, which is not a filesystem layer"),
            });
        };
        // A squashfs/erofs layer's verity root hash, checked before it is unpacked.
        let root_hash = l
            .get("annotations")
            .and_then(|a| a.get(farm_image::VERITY_ROOT_HASH_ANNOTATION))
            .and_then(Value::as_str)
            .map(str::to_string);
        layers.push((d, size, oci_mt.to_string(), root_hash));
    }

    // Store the manifest too (it is small and names everything else).
    blobs
        .put_verified(&manifest_digest, body)
        .await
        .map_err(|source| Error::Store {
            context: format!("storing the manifest of {image}"),
            source,
        })?;

    let mut all: Vec<(Digest, u64)> = vec![(config_digest.clone(), config_size)];
    all.extend(layers.iter().map(|(d, s, _, _)| (d.clone(), *s)));
    all.dedup();
    // Owned items: a closure over `&(Digest, u64)` makes the future `Send` only for
    // one lifetime, which spawned callers cannot use.
    let (session, by_digest, oref) = (&session, &by_digest, &oref);
    let fetched: Vec<Option<u64>> =
        futures::stream::iter(all.clone())
            .map(move |(d, size)| async move {
                fetch_blob(session, blobs, by_digest, oref, &d, size).await
            })
            .buffer_unordered(PARALLEL_BLOBS)
            .try_collect()
            .await?;
    let downloaded_blobs = fetched.iter().flatten().count();
    let downloaded_bytes = fetched.iter().flatten().sum();

    let config_body = blobs
        .get_bytes(&config_digest)
        .await
        .map_err(|source| Error::Store {
            context: format!("reading the config of {image}"),
            source,
        })?;
    let config_doc = parse_json(&image, "config", &config_body)?;
    let diff_ids: Vec<String> = config_doc
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(Error::Unsupported {
            image: image.to_string(),
            reason: format!(
                "its config lists {} diff_ids for {} layers",
                diff_ids.len(),
                layers.len()
            ),
        });
    }
    tracing::info!(%image, downloaded_blobs, downloaded_bytes, "pulled");
    Ok(PulledImage {
        manifest_digest,
        index_digest,
        config_digest,
        config_size,
        layers: layers
            .into_iter()
            .zip(diff_ids)
            .map(
                |((digest, size, media_type, root_hash), diff_id)| LayerBlob {
                    media_type,
                    digest: digest.to_string(),
                    size,
                    diff_id,
                    verity_root_hash: root_hash,
                },
            )
            .collect(),
        downloaded_blobs,
        downloaded_bytes,
    })
}

/// A missing manifest: say whether the repository or the tag is missing (and which
/// tags there are), from the tag list.
async fn refine_not_found(session: &Session, image: &ImageRef, err: Error) -> Error {
    let (Error::NotFound { .. }, Some(tag)) = (&err, &image.tag) else {
        return err;
    };
    if image.digest.is_some() {
        return err;
    }
    let listed = session
        .client
        .list_tags(&image.to_oci(), &session.auth.to_oci(), Some(50), None)
        .await;
    let repo = format!("{}/{}", image.registry, image.repository);
    match listed {
        Ok(list) if list.tags.is_empty() => Error::NotFound {
            image: repo,
            what: "repository (it has no tags)".into(),
            detail: String::new(),
        },
        Ok(list) => Error::NotFound {
            image: image.to_string(),
            what: format!("tag '{tag}'"),
            detail: format!("the repository has: {}", list.tags.join(", ")),
        },
        Err(e) => match session.error(image, e) {
            Error::NotFound { .. } => Error::NotFound {
                image: repo,
                what: "repository".into(),
                detail: String::new(),
            },
            _ => err,
        },
    }
}

fn verified_digest(image: &ImageRef, body: &Bytes, announced: &str) -> Result<Digest> {
    let actual = Digest::of(body);
    if announced != actual.to_string() {
        return Err(Error::Registry {
            registry: image.registry.clone(),
            detail: format!("{image}: manifest digest {announced} but its content is {actual}"),
        });
    }
    Ok(actual)
}

/// Stream one blob into the store unless it is there; returns the bytes downloaded
/// (`None`: it was there).
async fn fetch_blob(
    session: &Session,
    blobs: &BlobStore,
    image: &ImageRef,
    oref: &oci_client::Reference,
    digest: &Digest,
    size: u64,
) -> Result<Option<u64>> {
    let store_err = |context: String| {
        move |source| Error::Store {
            context: context.clone(),
            source,
        }
    };
    if blobs
        .exists(digest)
        .await
        .map_err(store_err(format!("checking for blob {digest}")))?
    {
        tracing::debug!(%digest, "blob already in the store");
        return Ok(None);
    }
    let mut stream = session
        .client
        .pull_blob_stream(oref, digest.to_string().as_str())
        .await
        .map_err(|e| session.error(image, e))?;
    let mut writer = blobs.writer();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if let Err(e) = writer.write(c).await {
                    writer.abort().await;
                    return Err(store_err(format!("storing blob {digest}"))(e));
                }
                if writer.len() > size {
                    writer.abort().await;
                    return Err(Error::Registry {
                        registry: session.registry.clone(),
                        detail: format!("blob {digest} is larger than its {size} bytes"),
                    });
                }
            }
            Err(e) => {
                writer.abort().await;
                return Err(Error::Registry {
                    registry: session.registry.clone(),
                    detail: format!("downloading blob {digest}: {e}"),
                });
            }
        }
    }
    if writer.len() != size {
        let got = writer.len();
        writer.abort().await;
        return Err(Error::Registry {
            registry: session.registry.clone(),
            detail: format!("blob {digest}: got {got} bytes, the manifest says {size}"),
        });
    }
    writer
        .finish_expecting(digest)
        .await
        .map_err(store_err(format!("blob {digest} from {image}")))?;
    tracing::debug!(%digest, size, "blob downloaded");
    Ok(Some(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_and_media_types() {
        assert_eq!(
            layer_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some("application/vnd.oci.image.layer.v1.tar+gzip")
        );
        assert_eq!(
            layer_media_type("application/vnd.stacker.image.layer.squashfs+zstd+verity"),
            Some("application/vnd.stacker.image.layer.squashfs+zstd+verity")
        );
        assert_eq!(
            layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some("application/vnd.oci.image.layer.v1.tar+zstd")
        );
        assert_eq!(
            layer_media_type("application/vnd.wasm.content.layer.v1+wasm"),
            None
        );
        assert!(is_index(&media_type_of(
            &serde_json::json!({"manifests": []})
        )));
        assert!(!is_index(&media_type_of(
            &serde_json::json!({"mediaType": DOCKER_MANIFEST, "layers": []})
        )));
    }

    #[test]
    fn index_selection() {
        let image = ImageRef::parse("docker://h.io/x").unwrap();
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = serde_json::json!({
            "mediaType": DOCKER_LIST,
            "manifests": [
                {"digest": d('a'), "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"digest": d('b'), "size": 2, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"digest": d('c'), "size": 3, "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        });
        let pick = |p: &str| {
            choose(&image, &index, &p.parse::<Platform>().unwrap()).map(|x| x.0.to_string())
        };
        assert_eq!(pick("linux/amd64").unwrap(), d('c'));
        assert_eq!(pick("linux/arm64").unwrap(), d('b'));
        assert_eq!(pick("linux/arm/v7").unwrap(), d('a'));
        let e = pick("linux/s390x").unwrap_err().to_string();
        assert!(
            e.contains("linux/amd64") && e.contains("linux/arm/v7"),
            "{e}"
        );
    }
}

//! Pushing images from a [`BlobStore`] to a registry, stacker's publish way:
//! `docker://host/ns` + image NAME + TAG gives `host/ns/NAME:TAG`.
//!
//! Order: every blob of every image (a HEAD first: blobs the registry has are skipped;
//! a blob pushed to another repository of the registry in this run is mounted instead of
//! uploaded; the rest are streamed from the store), then every manifest by digest, with
//! its exact local bytes (so the registry's digest is the local one), and only then the
//! tags. A failure before the tags leaves no tag moved.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use farm_image::{BlobStore, Digest};
use futures::{StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use serde_json::Value;

use crate::auth::Credentials;
use crate::error::{Error, Result};
use crate::pull::{OCI_MANIFEST, is_index, media_type_of};
use crate::reference::{ImageRef, PushTarget};
use crate::session::{ConnectOptions, Session};

/// Blobs uploaded at the same time.
const PARALLEL_BLOBS: usize = 3;
/// Largest manifest read into memory.
const MAX_MANIFEST: u64 = 16 << 20;

/// One image to push: its name (the repository under the target's namespace) and the
/// digest of its manifest (or index) in the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushImage {
    /// Image name, e.g. the stackerfile layer name.
    pub name: String,
    /// The manifest in the blob store.
    pub manifest_digest: Digest,
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `docker://host[:port]/namespace`.
    pub target: PushTarget,
    /// Tags to set on each image (`latest` when empty).
    pub tags: Vec<String>,
    /// TLS and plain http.
    pub connect: ConnectOptions,
}

/// One tag pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// `host/ns/name:tag`.
    pub reference: String,
    /// The manifest digest (the local one; the registry confirmed it).
    pub digest: Digest,
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Blobs the registry already had in the repository (HEAD).
    pub skipped: usize,
    /// Blobs mounted from another repository of the registry.
    pub mounted: usize,
    /// Manifests pushed (by digest).
    pub manifests: usize,
}

/// A manifest to push: its bytes and what it needs first.
struct Doc {
    digest: Digest,
    bytes: bytes::Bytes,
    media_type: String,
    /// (digest, size) of its config and layers.
    blobs: Vec<(Digest, u64)>,
    /// Child manifests of an index, pushed before it.
    children: Vec<Doc>,
}

fn store_err(context: String) -> impl Fn(farm_image::Error) -> Error {
    move |source| Error::Store {
        context: context.clone(),
        source,
    }
}

fn descriptor(d: &Value, what: &str) -> Result<(Digest, u64)> {
    let bad = |reason: &str| Error::Unsupported {
        image: what.to_string(),
        reason: reason.to_string(),
    };
    let digest = d
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("a descriptor without digest"))?;
    let digest = Digest::parse(digest).map_err(|e| bad(&e.to_string()))?;
    let size = d
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("a descriptor without size"))?;
    Ok((digest, size))
}

/// Read a manifest (or an index and its manifests) from the store.
async fn load(blobs: &BlobStore, digest: &Digest, name: &str, depth: usize) -> Result<Doc> {
    let size = blobs
        .size(digest)
        .await
        .map_err(store_err(format!("image '{name}': manifest {digest}")))?
        .ok_or_else(|| Error::Store {
            context: format!("image '{name}'"),
            source: farm_image::Error::BlobNotFound(digest.clone()),
        })?;
    if size > MAX_MANIFEST {
        return Err(Error::Unsupported {
            image: name.to_string(),
            reason: format!("manifest {digest} is {size} bytes"),
        });
    }
    let bytes = blobs
        .get_bytes(digest)
        .await
        .map_err(store_err(format!("image '{name}': manifest {digest}")))?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Unsupported {
        image: name.to_string(),
        reason: format!("manifest {digest} is not JSON: {e}"),
    })?;
    let media_type = media_type_of(&doc);
    let list = |k: &str| {
        doc.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut out = Doc {
        digest: digest.clone(),
        bytes,
        media_type: media_type.clone(),
        blobs: Vec::new(),
        children: Vec::new(),
    };
    if is_index(&media_type) {
        if depth > 0 {
            return Err(Error::Unsupported {
                image: name.to_string(),
                reason: "an index inside an index".into(),
            });
        }
        for m in list("manifests") {
            let (d, _) = descriptor(&m, name)?;
            out.children
                .push(Box::pin(load(blobs, &d, name, depth + 1)).await?);
        }
    } else {
        let config = doc.get("config").cloned().unwrap_or(Value::Null);
        out.blobs.push(descriptor(&config, name)?);
        for l in list("layers") {
            out.blobs.push(descriptor(&l, name)?);
        }
    }
    Ok(out)
}

/// Blob bookkeeping of one push run: which repositories have which blob.
#[derive(Default)]
struct Seen {
    repos: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Seen {
    fn has(&self, digest: &Digest, repo: &str) -> bool {
        self.repos
            .lock()
            .map(|m| m.get(&digest.to_string()).is_some_and(|s| s.contains(repo)))
            .unwrap_or(false)
    }
    fn other(&self, digest: &Digest, repo: &str) -> Option<String> {
        self.repos.lock().ok().and_then(|m| {
            m.get(&digest.to_string())
                .and_then(|s| s.iter().find(|r| *r != repo).cloned())
        })
    }
    fn add(&self, digest: &Digest, repo: &str) {
        if let Ok(mut m) = self.repos.lock() {
            m.entry(digest.to_string())
                .or_default()
                .insert(repo.to_string());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobOutcome {
    Skipped,
    Mounted,
    Uploaded(u64),
}

struct Pusher<'a> {
    session: Session,
    blobs: &'a BlobStore,
    seen: Seen,
}

impl Pusher<'_> {
    async fn ensure_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
    ) -> Result<BlobOutcome> {
        let repo = image.repository.as_str();
        if self.seen.has(digest, repo) {
            return Ok(BlobOutcome::Skipped);
        }
        let oref = image.to_oci();
        let d = digest.to_string();
        if self
            .session
            .client
            .blob_exists(&oref, &d)
            .await
            .map_err(|e| self.session.error(image, e))?
        {
            tracing::debug!(%image, %digest, "blob present");
            self.seen.add(digest, repo);
            return Ok(BlobOutcome::Skipped);
        }
        if let Some(from) = self.seen.other(digest, repo) {
            let source = ImageRef {
                repository: from.clone(),
                ..image.clone()
            };
            match self
                .session
                .client
                .mount_blob(&oref, &source.to_oci(), &d)
                .await
            {
                Ok(()) => {
                    tracing::debug!(%image, %digest, %from, "blob mounted");
                    self.seen.add(digest, repo);
                    return Ok(BlobOutcome::Mounted);
                }
                Err(e) => {
                    tracing::debug!(%image, %digest, %from, error = %e, "mount refused; uploading")
                }
            }
        }
        let stream = self
            .blobs
            .get(digest)
            .await
            .map_err(store_err(format!("{image}: blob {digest}")))?
            .map_err(|e| OciDistributionError::IoError(std::io::Error::from(e)));
        self.session
            .client
            .push_blob_stream(&oref, stream, &d, Some(size))
            .await
            .map_err(|e| self.session.error(image, e))?;
        tracing::debug!(%image, %digest, size, "blob uploaded");
        self.seen.add(digest, repo);
        Ok(BlobOutcome::Uploaded(size))
    }

    /// Blobs, then the manifest by digest (children of an index first).
    async fn push_doc(&self, image: &ImageRef, doc: &Doc, stats: &mut PushStats) -> Result<()> {
        for child in &doc.children {
            Box::pin(self.push_doc(image, child, stats)).await?;
        }
        let mut unique = doc.blobs.clone();
        unique.sort_by_key(|a| a.0.to_string());
        unique.dedup();
        let outcomes: Vec<BlobOutcome> = futures::stream::iter(unique.iter())
            .map(|(d, size)| self.ensure_blob(image, d, *size))
            .buffer_unordered(PARALLEL_BLOBS)
            .try_collect()
            .await?;
        for o in outcomes {
            match o {
                BlobOutcome::Skipped => stats.skipped += 1,
                BlobOutcome::Mounted => stats.mounted += 1,
                BlobOutcome::Uploaded(n) => {
                    stats.uploaded += 1;
                    stats.uploaded_bytes += n;
                }
            }
        }
        self.put_manifest(&image.with_digest(&doc.digest.to_string()), doc)
            .await?;
        stats.manifests += 1;
        Ok(())
    }

    async fn put_manifest(&self, at: &ImageRef, doc: &Doc) -> Result<()> {
        let content_type = http::HeaderValue::from_str(&doc.media_type)
            .unwrap_or_else(|_| http::HeaderValue::from_static(OCI_MANIFEST));
        let location = self
            .session
            .client
            .push_manifest_raw(&at.to_oci(), doc.bytes.clone(), content_type)
            .await
            .map_err(|e| self.session.error(at, e))?;
        // The registry names the stored manifest by its digest in Location.
        if let Some(i) = location.rfind("sha256:") {
            let theirs = &location[i..];
            if theirs != doc.digest.to_string() {
                return Err(Error::Registry {
                    registry: self.session.registry.clone(),
                    detail: format!(
                        "{at}: the registry stored the manifest as {theirs}, not {}",
                        doc.digest
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Push `images` from `blobs` to `opts.target`, each under every tag of `opts.tags`.
pub async fn push(
    blobs: &BlobStore,
    images: &[PushImage],
    opts: &PushOptions,
    credentials: &Credentials,
) -> Result<(Vec<Pushed>, PushStats)> {
    // A span for traces (issue 16; not shown in logs), its error the text the user sees.
    let span = tracing::info_span!(
        target: "farm_trace",
        "registry push",
        target = %opts.target,
        images = images.len(),
        tags = ?opts.tags,
        otel.status_description = tracing::field::Empty,
    );
    let pushed = tracing::Instrument::instrument(
        push_untraced(blobs, images, opts, credentials),
        span.clone(),
    )
    .await;
    if let Err(e) = &pushed {
        span.record("otel.status_description", e.to_string());
    }
    pushed
}

async fn push_untraced(
    blobs: &BlobStore,
    images: &[PushImage],
    opts: &PushOptions,
    credentials: &Credentials,
) -> Result<(Vec<Pushed>, PushStats)> {
    let tags: Vec<String> = if opts.tags.is_empty() {
        vec!["latest".to_string()]
    } else {
        opts.tags.clone()
    };
    // Every name is checked before anything is sent.
    let mut refs = Vec::new();
    for image in images {
        let first = opts.target.image(&image.name, &tags[0])?;
        for t in &tags[1..] {
            opts.target.image(&image.name, t)?;
        }
        refs.push(first);
    }
    let Some(first) = refs.first() else {
        return Ok((Vec::new(), PushStats::default()));
    };
    let session = Session::connect(first, credentials, &opts.connect).await?;
    let pusher = Pusher {
        session,
        blobs,
        seen: Seen::default(),
    };
    let mut stats = PushStats::default();
    let mut docs = Vec::new();
    for (image, r) in images.iter().zip(&refs) {
        let doc = load(blobs, &image.manifest_digest, &image.name, 0).await?;
        pusher.push_doc(r, &doc, &mut stats).await?;
        docs.push(doc);
    }
    // Everything is in place by digest: now the tags.
    let mut pushed = Vec::new();
    for (doc, r) in docs.iter().zip(&refs) {
        for t in &tags {
            let at = r.with_tag(t);
            pusher.put_manifest(&at, doc).await?;
            tracing::info!(image = %at, digest = %doc.digest, "pushed");
            pushed.push(Pushed {
                reference: at.to_string(),
                digest: doc.digest.clone(),
            });
        }
    }
    Ok((pushed, stats))
}

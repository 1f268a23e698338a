//! A content-addressed blob store over `object_store`.
//!
//! Blobs live at `<prefix>/blobs/sha256/<hex>`, so a `file://` store is laid out like the
//! `blobs/` directory of an OCI image layout. Writes are create-only and nothing is ever
//! named by a digest until its bytes are complete and hashed to that digest: small blobs
//! are buffered, hashed and put with [`PutMode::Create`]; large ones are uploaded (multipart)
//! under a staging name and renamed into place only after the digest is known. An
//! existing blob is success. Reads verify the digest as the bytes stream past.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher as _};
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use tracing::{debug, warn};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};

/// Part size of multipart uploads (also the threshold below which a blob is put in one
/// request). S3 allows at most 10,000 parts, so this bounds a blob at about 80 GiB.
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploaded concurrently by one writer; with [`PART_SIZE`] this bounds the memory a
/// writer holds at about 40 MiB.
pub const MAX_CONCURRENT_PARTS: usize = 4;

const STAGING_DIR: &str = ".farm-staging";

mod gc;
pub use gc::{ListedBlob, RecentUse, Sweep};

/// How many blobs [`BlobStore::missing`] asks about at once.
const EXISTS_AT_ONCE: usize = 16;

/// A content-addressed blob store. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    /// The directory of a `file://` store: its writes are made durable (fsync) before a
    /// blob counts as present.
    local: Option<Arc<std::path::Path>>,
    /// The URL as errors show it (no password).
    label: Arc<str>,
    /// The blobs this process used lately (shared by clones), so a garbage collector in
    /// the same process spares a blob a build is about to reference.
    recent: Arc<RecentUse>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("url", &self.label)
            .finish()
    }
}

/// A stored blob's digest and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// sha256 of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

impl BlobStore {
    /// A store over `store`, blobs under `prefix`, opened from `url`.
    pub(crate) fn from_parts(store: Arc<dyn ObjectStore>, prefix: String, url: String) -> Self {
        BlobStore {
            label: crate::backend::redact(&url).into(),
            store,
            prefix,
            url,
            local: None,
            recent: Arc::new(RecentUse::default()),
        }
    }

    /// A store in a local directory (created if missing).
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating blob store directory {}", dir.display()),
            source,
        })?;
        let url = format!("file://{}", dir.display());
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|source| Error::Store {
                url: url.clone(),
                action: "opening the store".into(),
                source: Box::new(source),
            })?
            .with_automatic_cleanup(true);
        let mut store = Self::from_parts(Arc::new(fs), String::new(), url);
        store.local = Some(Arc::from(dir));
        Ok(store)
    }

    /// A fresh, empty in-memory store.
    pub fn in_memory() -> Self {
        Self::from_parts(
            Arc::new(object_store::memory::InMemory::new()),
            String::new(),
            "memory://".into(),
        )
    }

    /// Wrap an existing object store; blobs go under `prefix` (may be empty).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self::from_parts(
            store,
            prefix.trim_matches('/').to_string(),
            format!("custom:{prefix}"),
        )
    }

    /// The URL (or description) this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store (for tests and tools; writing to it directly bypasses
    /// every guarantee of this type).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Wrap a failure of the object store with this store's URL and what was being done.
    pub(crate) fn fail(
        &self,
        action: impl std::fmt::Display,
    ) -> impl FnOnce(object_store::Error) -> Error {
        let url = self.label.to_string();
        move |source| Error::Store {
            url,
            action: action.to_string(),
            source: Box::new(source),
        }
    }

    fn path(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// The object path of a blob.
    pub fn blob_path(&self, digest: &Digest) -> Path {
        self.path(&digest.blob_path())
    }

    /// Whether the blob exists.
    pub async fn exists(&self, digest: &Digest) -> Result<bool> {
        Ok(self.size(digest).await?.is_some())
    }

    /// Which of `digests` the store lacks, each asked once, in the order given. They are
    /// asked [`EXISTS_AT_ONCE`] at a time: a remote store answers each in a round trip.
    pub async fn missing(&self, digests: impl IntoIterator<Item = Digest>) -> Result<Vec<Digest>> {
        let mut seen = std::collections::HashSet::new();
        // The futures are made first: a closure in the stream's type would make the
        // caller's future not `Send` for every lifetime (a limit of the compiler).
        let checks: Vec<_> = digests
            .into_iter()
            .filter(|d| seen.insert(d.clone()))
            .map(|d| async move { Ok::<_, Error>((!self.exists(&d).await?).then_some(d)) })
            .collect();
        let found: Vec<Option<Digest>> = futures::stream::iter(checks)
            .buffered(EXISTS_AT_ONCE)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        Ok(found.into_iter().flatten().collect())
    }

    /// The blob's size, or `None` when it does not exist.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.recent.used(digest);
        if let Some(file) = self.local_file(&self.blob_path(digest)) {
            // A stat in place: microseconds, where object_store's hand-off to a blocking
            // thread and back cost more than the stat (the coordinator checks a few
            // blobs for every layer it answers or verifies).
            return match std::fs::metadata(&file) {
                Ok(m) if m.is_file() => Ok(Some(m.len())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Io {
                    context: format!("checking for {digest} ({})", file.display()),
                    source,
                }),
            };
        }
        match self.store.head(&self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(format_args!("checking for {digest}"))(e)),
        }
    }

    /// Store `data` under its digest (create-only; an existing blob is success).
    pub async fn put(&self, data: Bytes) -> Result<BlobInfo> {
        let digest = Digest::of(&data);
        let size = data.len() as u64;
        self.put_named(&digest, data).await?;
        Ok(BlobInfo { digest, size })
    }

    /// Store many small blobs (manifests) at once, in order. On a `file://` store the
    /// new ones are written and synced by a few blocking tasks, then named, and each
    /// directory synced once: a blob costs its write and its `fsync`, not also two
    /// directory syncs and five thread hand-offs. (`syncfs` once per batch was tried: it
    /// flushes whatever else the file system holds dirty, and on a shared disk took
    /// three times as long.) Blobs already present are only looked at. Other stores
    /// put them several at a time.
    pub async fn put_many(&self, data: Vec<Bytes>) -> Result<Vec<BlobInfo>> {
        let infos: Vec<BlobInfo> = data
            .iter()
            .map(|d| BlobInfo {
                digest: Digest::of(d),
                size: d.len() as u64,
            })
            .collect();
        for info in &infos {
            self.recent.used(&info.digest);
        }
        let Some(dir) = self.local.clone() else {
            // The futures own their data (borrowing ones are not `Send` for the spawned
            // tasks that call this).
            let digests: Vec<Digest> = infos.iter().map(|i| i.digest.clone()).collect();
            futures::stream::iter(data.into_iter().zip(digests))
                .map(|(d, digest)| {
                    let store = self.clone();
                    async move { store.put_named(&digest, d).await }
                })
                .buffered(64)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<()>>>()?;
            return Ok(infos);
        };
        // Staged and synced in parallel groups (concurrent fsyncs share the file
        // system's journal commits), then named in one task, each directory synced once.
        // A blob the batch repeats is staged once (a build's images often share one).
        let mut seen = std::collections::HashSet::new();
        let mut blobs: Vec<Staged> = Vec::new();
        for (bytes, info) in data.into_iter().zip(&infos) {
            if seen.insert(info.digest.clone()) {
                blobs.push(Staged {
                    target: dir.join(self.blob_path(&info.digest).as_ref()),
                    stage: dir.join(self.staging_path().as_ref()),
                    bytes,
                });
            }
        }
        let mut groups = Vec::new();
        while !blobs.is_empty() {
            let group = blobs.split_off(blobs.len().saturating_sub(STAGED_PER_TASK));
            groups.push(tokio::task::spawn_blocking(move || stage_synced(group)));
        }
        // Every group is awaited, so a failed batch leaves no staging file behind.
        let mut staged = Vec::new();
        let mut failure = None;
        for group in groups {
            match group.await {
                Ok(Ok(group)) => staged.extend(group),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => failure = failure.or(Some(Error::from(e))),
            }
        }
        if let Some(e) = failure {
            unstage(&staged);
            return Err(e);
        }
        tokio::task::spawn_blocking(move || name_staged(staged)).await??;
        Ok(infos)
    }

    /// Store `data`, refusing it unless it hashes to `expected`.
    pub async fn put_verified(&self, expected: &Digest, data: Bytes) -> Result<BlobInfo> {
        let actual = Digest::of(&data);
        if &actual != expected {
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let size = data.len() as u64;
        self.put_named(expected, data).await?;
        Ok(BlobInfo {
            digest: actual,
            size,
        })
    }

    /// Put bytes already known to hash to `digest`.
    async fn put_named(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.recent.used(digest);
        if self.local.is_some() {
            // A local file is named only after its bytes are on disk: staged, synced,
            // then renamed into place (see `promote`).
            let size = data.len() as u64;
            let staging = self.staging_path();
            self.store
                .put(&staging, PutPayload::from_bytes(data))
                .await
                .map_err(self.fail(format_args!("writing {digest}")))?;
            return self.promote(&staging, digest, size).await;
        }
        let path = self.blob_path(digest);
        let payload = PutPayload::from_bytes(data);
        match self
            .store
            .put_opts(&path, payload.clone(), PutMode::Create.into())
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                debug!(%digest, "blob already present");
                Ok(())
            }
            Err(
                object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. },
            ) => {
                // The store cannot do conditional puts: check, then overwrite. Content is
                // addressed by digest, so a racing writer writes the same bytes.
                if !self.exists(digest).await? {
                    self.store
                        .put(&path, payload)
                        .await
                        .map_err(self.fail(format_args!("writing {digest}")))?;
                }
                Ok(())
            }
            Err(e) => Err(self.fail(format_args!("writing {digest}"))(e)),
        }
    }

    /// Start a streaming write of a blob whose digest is known only at the end.
    pub fn writer(&self) -> BlobWriter {
        BlobWriter {
            store: self.clone(),
            hasher: Hasher::new(),
            pending: Vec::new(),
            pending_len: 0,
            upload: None,
        }
    }

    /// Read a blob as a stream of chunks. The digest is checked as the bytes pass: the
    /// last item is an [`Error::DigestMismatch`] when the stored content is corrupt, so a
    /// consumer must treat everything it read as untrusted until the stream has ended
    /// without error.
    pub async fn get(&self, digest: &Digest) -> Result<BlobStream> {
        self.recent.used(digest);
        let res = match self.store.get(&self.blob_path(digest)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::BlobNotFound(digest.clone()));
            }
            Err(e) => return Err(self.fail(format_args!("reading {digest}"))(e)),
        };
        Ok(BlobStream {
            inner: res.into_stream(),
            hasher: Some(Hasher::new()),
            expected: digest.clone(),
            url: self.label.clone(),
            store: self.store.clone(),
            path: self.blob_path(digest),
            removing: None,
        })
    }

    /// Read the whole blob to check its digest; a corrupt one is removed (so that an
    /// upload of the right bytes can take its place). Whether it was sound; `false`
    /// also when it does not exist.
    pub async fn verify(&self, digest: &Digest) -> Result<bool> {
        let mut s = match self.get(digest).await {
            Ok(s) => s,
            Err(Error::BlobNotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        while let Some(chunk) = s.next().await {
            match chunk {
                Ok(_) => {}
                Err(Error::DigestMismatch { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Read a whole (small) blob into memory, verified.
    pub async fn get_bytes(&self, digest: &Digest) -> Result<Bytes> {
        if let Some(bytes) = self.read_small_local(digest) {
            return Ok(bytes);
        }
        let mut s = self.get(digest).await?;
        let mut parts = Vec::new();
        while let Some(chunk) = s.next().await {
            parts.push(chunk?);
        }
        if parts.len() == 1 {
            return Ok(parts.pop().unwrap_or_default());
        }
        Ok(Bytes::from(parts.concat()))
    }

    /// A blocking [`Read`] over a verified blob, for synchronous consumers such as
    /// [`crate::apply_layer`]. Must be called from within a tokio runtime; the returned
    /// reader must be used outside async context (e.g. in `spawn_blocking`). A digest
    /// mismatch surfaces as an `InvalidData` read error at the end.
    pub async fn reader(&self, digest: &Digest) -> Result<BlobReader> {
        let mut stream = self.get(digest).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let item = item.map_err(io::Error::from);
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(BlobReader {
            rx,
            current: Bytes::new(),
            done: false,
        })
    }

    fn staging_path(&self) -> Path {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        let a = h.finish();
        let b = RandomState::new().hash_one(a);
        self.path(&format!("{STAGING_DIR}/{a:016x}{b:016x}"))
    }

    /// A small blob of a `file://` store read in place when it is sound (an image config
    /// the coordinator checks for every result; see `size`); `None` sends the caller the
    /// usual way, which reports a missing or corrupt blob (and removes the latter).
    pub(crate) fn read_small_local(&self, digest: &Digest) -> Option<Bytes> {
        const SMALL: u64 = 256 << 10;
        let file = self.local_file(&self.blob_path(digest))?;
        let m = std::fs::metadata(&file).ok()?;
        if !m.is_file() || m.len() > SMALL {
            return None;
        }
        let bytes = std::fs::read(&file).ok()?;
        self.recent.used(digest);
        (Digest::of(&bytes) == *digest).then(|| Bytes::from(bytes))
    }

    /// The local file of an object of a `file://` store.
    fn local_file(&self, path: &Path) -> Option<std::path::PathBuf> {
        self.local.as_ref().map(|dir| dir.join(path.as_ref()))
    }

    /// Make a local file's bytes durable (`fsync`); nothing for other stores.
    async fn sync_file(&self, path: &Path) -> Result<()> {
        let Some(file) = self.local_file(path) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|source| Error::Io {
                    context: format!("syncing {}", file.display()),
                    source,
                })
        })
        .await
        .map_err(|e| Error::Io {
            context: "syncing a blob".into(),
            source: io::Error::other(e),
        })?
    }

    /// Make a local blob's name durable: `fsync` its directory and that one's parent
    /// (which holds it when it was just created); nothing for other stores.
    async fn sync_dirs(&self, path: &Path) -> Result<()> {
        let Some(file) = self.local_file(path) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            for dir in file.ancestors().skip(1).take(2) {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| Error::Io {
                        context: format!("syncing directory {}", dir.display()),
                        source,
                    })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Io {
            context: "syncing a blob's directory".into(),
            source: io::Error::other(e),
        })?
    }

    /// Give a completely uploaded, verified staging object of `size` bytes its digest
    /// name. A blob already there is kept, unless its size shows it is torn (a write cut
    /// short, by a crash before this store synced its writes): then it is replaced.
    async fn promote(&self, staging: &Path, digest: &Digest, size: u64) -> Result<()> {
        self.recent.used(digest);
        let target = self.blob_path(digest);
        if let Err(e) = self.sync_file(staging).await {
            self.delete_quietly(staging).await;
            return Err(e);
        }
        // Twice at most: a collector may remove the blob between our look and our name.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.store.rename_if_not_exists(staging, &target).await {
                Ok(()) => return self.sync_dirs(&target).await,
                Err(object_store::Error::AlreadyExists { .. }) => {
                    // Written again: young again (first: a collector looks at the age after
                    // it takes a blob away, and puts back one that is young), so a collector
                    // in another process, which spares blobs younger than its grace
                    // period, spares it too.
                    self.touch(&target).await;
                    match self.size(digest).await {
                        Ok(None) if attempts < 3 => {
                            debug!(%digest, "blob removed meanwhile: naming the upload");
                            continue;
                        }
                        Ok(Some(existing)) if existing != size => {
                            warn!(
                                store = %self.label,
                                %digest,
                                existing,
                                size,
                                "stored blob is torn (wrong size): replacing it"
                            );
                            let res =
                                self.store.rename(staging, &target).await.map_err(
                                    self.fail(format_args!("replacing torn blob {digest}")),
                                );
                            if res.is_err() {
                                self.delete_quietly(staging).await;
                            }
                            res?;
                            return self.sync_dirs(&target).await;
                        }
                        _ => {}
                    }
                    debug!(%digest, "blob already present");
                    self.delete_quietly(staging).await;
                    return Ok(());
                }
                Err(
                    object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. },
                ) => {
                    // No atomic create-only copy here (e.g. S3 without a copy-if-not-exists
                    // configuration): the content is addressed by its digest, so a copy that
                    // races another writer of the same blob writes identical bytes.
                    let res = if self.exists(digest).await? {
                        Ok(())
                    } else {
                        self.store
                            .copy(staging, &target)
                            .await
                            .map_err(self.fail(format_args!("naming the upload of {digest}")))
                    };
                    self.delete_quietly(staging).await;
                    return res;
                }
                Err(e) => {
                    self.delete_quietly(staging).await;
                    return Err(self.fail(format_args!("naming the upload of {digest}"))(e));
                }
            }
        }
    }

    async fn delete_quietly(&self, path: &Path) {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                warn!(store = %self.label, %path, error = %e, "could not delete staging object")
            }
        }
    }
}

/// A verified stream of a blob's bytes; see [`BlobStore::get`].
pub struct BlobStream {
    inner: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    hasher: Option<Hasher>,
    expected: Digest,
    url: Arc<str>,
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// A corrupt blob being removed, and the error to give once it is.
    removing: Option<(futures::future::BoxFuture<'static, ()>, Error)>,
}

impl Stream for BlobStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some((removal, _)) = this.removing.as_mut() {
            return match removal.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => Poll::Ready(this.removing.take().map(|(_, e)| Err(e))),
            };
        }
        if this.hasher.is_none() {
            return Poll::Ready(None);
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(h) = this.hasher.as_mut() {
                    h.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(source))) => {
                this.hasher = None;
                Poll::Ready(Some(Err(Error::Store {
                    url: this.url.to_string(),
                    action: format!("reading {}", this.expected),
                    source: Box::new(source),
                })))
            }
            Poll::Ready(None) => {
                let (actual, _) = this.hasher.take().unwrap_or_default().finish();
                if actual == this.expected {
                    Poll::Ready(None)
                } else {
                    warn!(
                        store = %this.url,
                        expected = %this.expected,
                        %actual,
                        "stored blob is corrupt: its content does not hash to its name; \
                         removing it so that an upload can replace it"
                    );
                    // Content is named by its digest, so these bytes are wrong whoever
                    // reads them: remove them (before the error is given), and the next
                    // upload of the blob heals the store.
                    let (store, path, url) =
                        (this.store.clone(), this.path.clone(), this.url.clone());
                    let removal = async move {
                        match store.delete(&path).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => warn!(store = %url, %path, error = %e,
                                "could not remove a corrupt blob"),
                        }
                    };
                    this.removing = Some((
                        Box::pin(removal),
                        Error::DigestMismatch {
                            expected: this.expected.clone(),
                            actual,
                        },
                    ));
                    self.poll_next(cx)
                }
            }
        }
    }
}

/// A blocking reader over a verified blob; see [`BlobStore::reader`].
pub struct BlobReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    done: bool,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                None => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// A streaming blob upload whose digest is computed from the bytes written.
///
/// Up to [`PART_SIZE`] bytes are buffered; a blob that stays below that is put in one
/// create-only request at [`BlobWriter::finish`]. A larger one becomes a multipart
/// upload to a staging name (memory bounded by [`MAX_CONCURRENT_PARTS`] parts in flight)
/// that is renamed to `blobs/sha256/<hex>` only once complete. Dropping the writer
/// without finishing leaves no blob (an incomplete multipart upload may remain on some
/// cloud stores until their lifecycle rules clean it up).
pub struct BlobWriter {
    store: BlobStore,
    hasher: Hasher,
    pending: Vec<Bytes>,
    pending_len: usize,
    upload: Option<(Path, WriteMultipart)>,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// Append bytes; waits when too many parts are in flight (back-pressure).
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.hasher.update(&data);
        if let Some((_, up)) = self.upload.as_mut() {
            up.wait_for_capacity(MAX_CONCURRENT_PARTS)
                .await
                .map_err(self.store.fail("uploading a part of a blob"))?;
            up.put(data);
            return Ok(());
        }
        self.pending_len += data.len();
        self.pending.push(data);
        if self.pending_len >= PART_SIZE {
            let staging = self.store.staging_path();
            let mp = self
                .store
                .store
                .put_multipart(&staging)
                .await
                .map_err(self.store.fail("starting a multipart upload"))?;
            let mut up = WriteMultipart::new_with_chunk_size(mp, PART_SIZE);
            for b in self.pending.drain(..) {
                up.put(b);
            }
            self.pending_len = 0;
            self.upload = Some((staging, up));
        }
        Ok(())
    }

    /// Complete the blob and name it by its digest.
    pub async fn finish(self) -> Result<BlobInfo> {
        self.finish_inner(None).await
    }

    /// Complete the blob, but only name it if it hashes to `expected`; otherwise nothing
    /// is stored and a [`Error::DigestMismatch`] is returned.
    pub async fn finish_expecting(self, expected: &Digest) -> Result<BlobInfo> {
        self.finish_inner(Some(expected)).await
    }

    async fn finish_inner(self, expected: Option<&Digest>) -> Result<BlobInfo> {
        let BlobWriter {
            store,
            hasher,
            pending,
            upload,
            ..
        } = self;
        let (digest, size) = hasher.finish();
        if let Some(expected) = expected
            && expected != &digest
        {
            if let Some((staging, up)) = upload {
                let _ = up.abort().await;
                store.delete_quietly(&staging).await;
            }
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        match upload {
            None => {
                let data = if pending.len() == 1 {
                    pending.into_iter().next().unwrap_or_default()
                } else {
                    Bytes::from(pending.concat())
                };
                store.put_named(&digest, data).await?;
            }
            Some((staging, up)) => {
                up.finish()
                    .await
                    .map_err(store.fail(format_args!("completing the upload of {digest}")))?;
                store.promote(&staging, &digest, size).await?;
            }
        }
        Ok(BlobInfo { digest, size })
    }

    /// Give up: nothing is stored.
    pub async fn abort(self) {
        if let Some((staging, up)) = self.upload {
            let _ = up.abort().await;
            self.store.delete_quietly(&staging).await;
        }
    }
}

/// How many blobs one blocking task of [`BlobStore::put_many`] stages.
const STAGED_PER_TASK: usize = 16;

/// A blob of [`BlobStore::put_many`] on its way into a `file://` store.
struct Staged {
    target: std::path::PathBuf,
    stage: std::path::PathBuf,
    bytes: Bytes,
}

/// Write and sync the staging files of the blobs not yet stored; returns them.
fn stage_synced(group: Vec<Staged>) -> Result<Vec<Staged>> {
    use crate::error::IoContext as _;
    use std::io::Write as _;
    let mut staged = Vec::new();
    for blob in group {
        let size = blob.bytes.len() as u64;
        if std::fs::metadata(&blob.target).is_ok_and(|m| m.is_file() && m.len() == size) {
            continue;
        }
        let written = blob
            .stage
            .parent()
            .map_or(Ok(()), |parent| {
                std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))
            })
            .and_then(|()| {
                std::fs::File::create_new(&blob.stage)
                    .and_then(|mut f| {
                        f.write_all(&blob.bytes)?;
                        f.sync_all()
                    })
                    .ctx(|| format!("writing {}", blob.stage.display()))
            });
        staged.push(blob);
        if let Err(e) = written {
            unstage(&staged);
            return Err(e);
        }
    }
    Ok(staged)
}

/// Remove the staging files of `staged` (a batch that failed); best effort.
fn unstage(staged: &[Staged]) {
    for blob in staged {
        let _ = std::fs::remove_file(&blob.stage);
    }
}

/// Name synced staging files (create-only: one already there is kept, unless its size
/// shows it torn, as `promote` does), then sync each directory they were named in.
fn name_staged(staged: Vec<Staged>) -> Result<()> {
    use crate::error::IoContext as _;
    let mut dirs = std::collections::BTreeSet::new();
    let name = |blob: &Staged, dirs: &mut std::collections::BTreeSet<_>| -> Result<()> {
        let Some(parent) = blob.target.parent() else {
            return Ok(());
        };
        if dirs.insert(parent.to_path_buf()) {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        match std::fs::hard_link(&blob.stage, &blob.target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let size = blob.bytes.len() as u64;
                if std::fs::metadata(&blob.target).is_ok_and(|m| m.len() != size) {
                    return std::fs::rename(&blob.stage, &blob.target)
                        .ctx(|| format!("replacing torn blob {}", blob.target.display()));
                }
            }
            Err(e) => return Err(e).ctx(|| format!("naming {}", blob.target.display())),
        }
        let _ = std::fs::remove_file(&blob.stage);
        Ok(())
    };
    for (i, blob) in staged.iter().enumerate() {
        if let Err(e) = name(blob, &mut dirs) {
            // This one and the rest were not named: leave none of them staged.
            unstage(&staged[i..]);
            return Err(e);
        }
    }
    for dir in &dirs {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing directory {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u8) -> Bytes {
        Bytes::from(
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect::<Vec<_>>(),
        )
    }

    async fn stores() -> Vec<(BlobStore, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        vec![
            (BlobStore::from_url(&url).unwrap(), Some(dir)),
            (BlobStore::from_url("memory://").unwrap(), None),
        ]
    }

    #[tokio::test]
    async fn put_get_exists_create_only() {
        for (store, _dir) in stores().await {
            let d = data(1000, 1);
            let info = store.put(d.clone()).await.unwrap();
            assert_eq!(info.digest, Digest::of(&d));
            assert!(store.exists(&info.digest).await.unwrap());
            assert_eq!(store.size(&info.digest).await.unwrap(), Some(1000));
            // Second put of the same content is success, not an error.
            assert_eq!(store.put(d.clone()).await.unwrap(), info);
            assert_eq!(store.get_bytes(&info.digest).await.unwrap(), d);
            // Missing blob.
            let missing = Digest::of(b"missing");
            assert!(!store.exists(&missing).await.unwrap());
            assert!(matches!(
                store.get(&missing).await,
                Err(Error::BlobNotFound(_))
            ));
            // put_verified refuses wrong content.
            assert!(matches!(
                store.put_verified(&missing, d.clone()).await,
                Err(Error::DigestMismatch { .. })
            ));
            assert!(!store.exists(&missing).await.unwrap());
        }
    }

    #[tokio::test]
    async fn create_only_never_overwrites_and_a_corrupt_blob_read_is_removed() {
        for (store, _dir) in stores().await {
            let d = data(100, 2);
            let digest = Digest::of(&d);
            // Plant different bytes of the right size under the digest name, then "put"
            // the real content: the existing object is kept (create-only)...
            let evil = Bytes::from(vec![b'e'; 100]);
            store
                .object_store()
                .put(&store.blob_path(&digest), evil.into())
                .await
                .unwrap();
            store.put(d.clone()).await.unwrap();
            // ...reading detects the corruption and removes the blob...
            let err = store.get_bytes(&digest).await.unwrap_err();
            assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
            assert!(!store.exists(&digest).await.unwrap());
            // ...so the next put heals it.
            store.put(d.clone()).await.unwrap();
            assert_eq!(store.get_bytes(&digest).await.unwrap(), d);
            assert!(store.verify(&digest).await.unwrap());
        }
    }

    /// Many blobs at once: in order, each readable and sound; one already there is kept,
    /// a torn one (wrong size) replaced, a repeat in the batch stored once; nothing is
    /// left staged. The same through a store that is not local.
    #[tokio::test]
    async fn many_blobs_are_put_together_durably_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let local = BlobStore::local(&root).unwrap();
        let blobs: Vec<Bytes> = (0..5u8).map(|n| data(100 + n as usize, n)).collect();
        local.put(blobs[0].clone()).await.unwrap();
        let torn = root.join(Digest::of(&blobs[1]).blob_path());
        std::fs::write(&torn, &blobs[1][..10]).unwrap();
        let mut batch = blobs.clone();
        batch.push(blobs[2].clone());
        for store in [local.clone(), BlobStore::in_memory()] {
            let infos = store.put_many(batch.clone()).await.unwrap();
            assert_eq!(infos.len(), batch.len());
            for (info, bytes) in infos.iter().zip(&batch) {
                assert_eq!(info.digest, Digest::of(bytes));
                assert_eq!(info.size, bytes.len() as u64);
                assert_eq!(&store.get_bytes(&info.digest).await.unwrap(), bytes);
            }
        }
        let staged = std::fs::read_dir(root.join(STAGING_DIR)).unwrap().count();
        assert_eq!(staged, 0, "nothing left staged");
        assert!(local.put_many(Vec::new()).await.unwrap().is_empty());
    }

    /// A batch that fails part way (here one blob's name is taken by a directory, so
    /// it cannot be named) is an error and leaves nothing staged; the others can be put
    /// again.
    #[tokio::test]
    async fn a_batch_that_fails_part_way_leaves_nothing_staged() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BlobStore::local(&root).unwrap();
        let blobs: Vec<Bytes> = (0..40u8).map(|n| data(50 + n as usize, n)).collect();
        let blocked = root.join(Digest::of(&blobs[20]).blob_path());
        std::fs::create_dir_all(blocked.join("in-the-way")).unwrap();
        assert!(store.put_many(blobs.clone()).await.is_err());
        let staged = std::fs::read_dir(root.join(STAGING_DIR)).unwrap().count();
        assert_eq!(staged, 0, "nothing left staged");
        let mut others = blobs.clone();
        others.remove(20);
        store.put_many(others.clone()).await.unwrap();
        for b in &others {
            assert_eq!(&store.get_bytes(&Digest::of(b)).await.unwrap(), b);
        }
    }

    #[tokio::test]
    async fn a_torn_local_blob_fails_its_read_is_removed_and_a_reupload_heals_it() {
        for size in [1000, 2 * PART_SIZE + 17] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("store");
            let store = BlobStore::from_url(&format!("file://{}", root.display())).unwrap();
            let d = data(size, 9);
            let digest = Digest::of(&d);
            let file = root.join(digest.blob_path());
            // A write cut short by a power loss: the name exists, the bytes do not.
            let torn = || {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &d[..size / 3]).unwrap();
            };
            torn();
            let err = store.get_bytes(&digest).await.unwrap_err();
            assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
            assert!(!file.exists(), "the torn blob is removed on read");
            // Torn again; an upload of the right bytes (one put, or a streamed
            // multipart write) replaces it: its size shows it is torn.
            torn();
            if size < PART_SIZE {
                store.put(d.clone()).await.unwrap();
            } else {
                let mut w = store.writer();
                w.write(d.clone()).await.unwrap();
                w.finish_expecting(&digest).await.unwrap();
            }
            assert_eq!(store.get_bytes(&digest).await.unwrap(), d);
            // verify() reads the whole blob, and removes a corrupt one.
            assert!(store.verify(&digest).await.unwrap());
            torn();
            assert!(!store.verify(&digest).await.unwrap());
            assert!(!file.exists());
            // No staging debris.
            let staging = root.join(STAGING_DIR);
            let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
            assert_eq!(left, 0);
        }
    }

    #[tokio::test]
    async fn verify_on_read_detects_corruption() {
        for (store, dir) in stores().await {
            let d = data(3 * PART_SIZE + 123, 3);
            let digest = Digest::of(&d);
            let mut w = store.writer();
            for chunk in d.chunks(1 << 20) {
                w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            let info = w.finish().await.unwrap();
            assert_eq!(info.digest, digest);
            assert_eq!(info.size, d.len() as u64);
            assert_eq!(store.get_bytes(&digest).await.unwrap(), d);
            // Corrupt one byte in place.
            let mut bad = d.to_vec();
            bad[PART_SIZE + 7] ^= 0xff;
            let corrupt = || async {
                match &dir {
                    Some(dir) => {
                        let p = dir.path().join("store").join(digest.blob_path());
                        // (Removing the blob may have removed its empty directory.)
                        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                        std::fs::write(&p, &bad).unwrap();
                    }
                    None => {
                        store
                            .object_store()
                            .put(&store.blob_path(&digest), Bytes::from(bad.clone()).into())
                            .await
                            .unwrap();
                    }
                }
            };
            corrupt().await;
            let err = store.get_bytes(&digest).await.unwrap_err();
            assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
            // The blocking reader reports it as InvalidData.
            corrupt().await;
            let mut r = store.reader(&digest).await.unwrap();
            let res = tokio::task::spawn_blocking(move || {
                let mut v = Vec::new();
                r.read_to_end(&mut v)
            })
            .await
            .unwrap();
            assert_eq!(res.unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
    }

    #[tokio::test]
    async fn streaming_writer_small_large_and_expected() {
        for (store, dir) in stores().await {
            // Empty blob.
            let info = store.writer().finish().await.unwrap();
            assert_eq!(info.digest, Digest::of(b""));
            assert_eq!(store.get_bytes(&info.digest).await.unwrap().len(), 0);
            // Large blob with a wrong expectation: nothing stored.
            let d = data(2 * PART_SIZE + 5, 4);
            let mut w = store.writer();
            w.write(d.clone()).await.unwrap();
            let wrong = Digest::of(b"nope");
            assert!(w.finish_expecting(&wrong).await.is_err());
            assert!(!store.exists(&Digest::of(&d)).await.unwrap());
            // Same blob twice: the second finish sees it exists and succeeds.
            for _ in 0..2 {
                let mut w = store.writer();
                w.write(d.clone()).await.unwrap();
                let info = w.finish_expecting(&Digest::of(&d)).await.unwrap();
                assert_eq!(info.size, d.len() as u64);
            }
            // No staging debris left behind.
            let listed: Vec<_> = store
                .object_store()
                .list(None)
                .map(|m| m.unwrap().location.to_string())
                .collect()
                .await;
            assert!(
                listed.iter().all(|p| p.starts_with("blobs/sha256/")),
                "{listed:?}"
            );
            if let Some(dir) = dir {
                let staging = dir.path().join("store").join(STAGING_DIR);
                let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
                assert_eq!(left, 0);
            }
        }
    }

    #[test]
    fn url_parsing() {
        assert!(BlobStore::from_url("ftp://x/y").is_err());
        assert!(BlobStore::from_url("not a url").is_err());
        assert!(BlobStore::from_url("file://host/x").is_err());
        let s = BlobStore::from_url("memory://").unwrap();
        assert_eq!(
            s.blob_path(&Digest::of(b"")).to_string(),
            Digest::of(b"").blob_path()
        );
        // Cloud stores build without contacting anything.
        let s3 = BlobStore::from_url("s3://bucket/some/prefix").unwrap();
        assert_eq!(
            s3.blob_path(&Digest::of(b"")).to_string(),
            format!("some/prefix/{}", Digest::of(b"").blob_path())
        );
    }
}

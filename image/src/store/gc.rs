//! What a garbage collector needs of a blob store: every blob with its age, deletion
//! that re-checks the age, stale staging objects, and the blobs this process used
//! lately ([`RecentUse`]).
//!
//! The store never decides what is garbage: a collector (the coordinator's) marks what
//! is referenced and asks to delete the rest. Two rules make that safe against builds
//! running meanwhile: only blobs older than a grace period go (a blob just written for
//! a build in flight is young), and a blob that this process read, checked or wrote
//! within the grace period is spared too (an old blob a build found present and is
//! about to reference). A `file://` store also makes an old blob young again when it is
//! written again, so a collector in another process spares it as well.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::{BlobStore, STAGING_DIR};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// A blob as [`BlobStore::list_blobs`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedBlob {
    /// Its digest (its name).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// What [`BlobStore::sweep_staging`] removed (or would remove).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Objects.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The blobs a process used lately (read, checked for, written), with the time of
/// their last use. Bounded: uses older than the horizon are forgotten as the record
/// grows (its size stays within about twice the distinct blobs used in one horizon).
#[derive(Debug)]
pub struct RecentUse {
    inner: Mutex<Recent>,
}

#[derive(Debug)]
struct Recent {
    /// Digest -> unix seconds of its last use.
    used: HashMap<Digest, u64>,
    /// Uses older than this (seconds) may be forgotten.
    horizon: u64,
    /// Prune when the record reaches this many entries.
    prune_at: usize,
}

/// The least [`RecentUse`] prunes at.
const PRUNE_FLOOR: usize = 4096;

impl Default for RecentUse {
    /// A horizon of three hours.
    fn default() -> Self {
        RecentUse {
            inner: Mutex::new(Recent {
                used: HashMap::new(),
                horizon: 3 * 3600,
                prune_at: PRUNE_FLOOR,
            }),
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl RecentUse {
    /// Record a use of `digest` now.
    pub fn used(&self, digest: &Digest) {
        self.used_at(digest, SystemTime::now());
    }

    /// Record a use of `digest` at `at` (tests).
    pub fn used_at(&self, digest: &Digest, at: SystemTime) {
        let at = unix_secs(at);
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = r.used.entry(digest.clone()).or_insert(at);
        *e = (*e).max(at);
        if r.used.len() >= r.prune_at {
            let oldest = unix_secs(SystemTime::now()).saturating_sub(r.horizon);
            r.used.retain(|_, t| *t >= oldest);
            r.prune_at = (r.used.len() * 2).max(PRUNE_FLOOR);
        }
    }

    /// Was `digest` used at or after `since` (to the second, rounding towards "used")?
    pub fn used_since(&self, digest: &Digest, since: SystemTime) -> bool {
        let since = unix_secs(since);
        let r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.used.get(digest).is_some_and(|t| *t >= since)
    }

    /// Remember uses for at least `horizon` (a collector's grace period and more).
    pub fn keep_for(&self, horizon: Duration) {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.horizon = r.horizon.max(horizon.as_secs());
    }

    /// How many blobs the record holds.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .used
            .len()
    }

    /// True when no use is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BlobStore {
    /// The blobs this process used lately through this store (or a clone of it).
    pub fn recent(&self) -> &RecentUse {
        &self.recent
    }

    /// Every blob of the store, in no particular order, as the store lists them (pages
    /// on remote stores: memory stays bounded). Objects whose name is not a digest are
    /// not blobs and are skipped.
    pub fn list_blobs(&self) -> BoxStream<'static, Result<ListedBlob>> {
        let prefix = self.path(&format!("blobs/{}", Digest::ALGORITHM));
        let label = self.label.clone();
        self.store
            .list(Some(&prefix))
            .filter_map(move |item| {
                let label = label.clone();
                async move {
                    match item {
                        Ok(meta) => {
                            let digest = Digest::from_hex(meta.location.filename()?).ok()?;
                            Some(Ok(ListedBlob {
                                digest,
                                size: meta.size,
                                modified: SystemTime::from(meta.last_modified),
                            }))
                        }
                        Err(e) => Some(Err(Error::Store {
                            url: label.to_string(),
                            action: "listing blobs".into(),
                            source: Box::new(e),
                        })),
                    }
                }
            })
            .boxed()
    }

    /// Delete blob `digest` if it was last written before `cutoff` and this process has
    /// not used it since; returns its size when it was deleted (`None`: absent, young or
    /// used). The age is looked up again here, so a blob written again since it was
    /// listed stays.
    pub async fn delete_if_older(
        &self,
        digest: &Digest,
        cutoff: SystemTime,
    ) -> Result<Option<u64>> {
        if self.recent.used_since(digest, cutoff) {
            return Ok(None);
        }
        let path = self.blob_path(digest);
        if let Some(file) = self.local_file(&path) {
            return self.delete_local_if_older(digest, file, cutoff).await;
        }
        let meta = match self.store.head(&path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(format_args!("checking {digest}"))(e)),
        };
        // A remote store cannot take a blob away and look at it atomically: a writer
        // that finds the blob present between this look and the delete loses it, which
        // is why a collector runs with a grace period and in the process its builds
        // use (whose uses it sees).
        if SystemTime::from(meta.last_modified) >= cutoff || self.recent.used_since(digest, cutoff)
        {
            return Ok(None);
        }
        match self.store.delete(&path).await {
            Ok(()) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(format_args!("deleting {digest}"))(e)),
        }
    }

    /// [`Self::delete_if_older`] for a `file://` store, without a race against a writer:
    /// the blob is first renamed away (atomic), then its age is read; a young one is put
    /// back (unless a writer named a new copy meanwhile). A writer that finds the blob
    /// present makes it young before it looks again, and names its own copy when the
    /// blob is gone (see `promote`).
    async fn delete_local_if_older(
        &self,
        digest: &Digest,
        file: std::path::PathBuf,
        cutoff: SystemTime,
    ) -> Result<Option<u64>> {
        // Beside the blob: same directory, so it never empties (an empty one may be
        // removed by a concurrent delete's clean-up), and not a digest, so never listed.
        let unique = self.staging_path();
        let trash = file.with_file_name(format!(".gc-{}", unique.filename().unwrap_or("trash")));
        let recent = self.recent.clone();
        let d = digest.clone();
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<Option<u64>> {
            match std::fs::rename(&file, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
            let meta = std::fs::metadata(&trash)?;
            if meta.modified()? >= cutoff || recent.used_since(&d, cutoff) {
                // Young after all: back under its name, unless a writer named a copy.
                match std::fs::hard_link(&trash, &file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        std::fs::rename(&trash, &file)?;
                        tracing::debug!(error = %e, "put a young blob back by renaming it");
                        return Ok(None);
                    }
                }
                std::fs::remove_file(&trash)?;
                return Ok(None);
            }
            std::fs::remove_file(&trash)?;
            Ok(Some(meta.len()))
        })
        .await
        .map_err(|e| Error::Io {
            context: format!("deleting {digest}"),
            source: std::io::Error::other(e),
        })?;
        res.map_err(|source| Error::Io {
            context: format!("deleting {digest}"),
            source,
        })
    }

    /// Remove staging objects (uploads a crash or a lost connection left unnamed) last
    /// written before `cutoff`; with `dry_run`, only count them.
    pub async fn sweep_staging(&self, cutoff: SystemTime, dry_run: bool) -> Result<Sweep> {
        let prefix = self.path(STAGING_DIR);
        let mut listing = self.store.list(Some(&prefix));
        let mut stale: Vec<(Path, u64)> = Vec::new();
        while let Some(item) = listing.next().await {
            let meta = item.map_err(self.fail("listing staging objects"))?;
            if SystemTime::from(meta.last_modified) < cutoff {
                stale.push((meta.location, meta.size));
            }
        }
        let mut sweep = Sweep::default();
        for (path, size) in stale {
            if !dry_run {
                match self.store.delete(&path).await {
                    Ok(()) => {}
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(self.fail(format_args!("deleting {path}"))(e)),
                }
            }
            sweep.objects += 1;
            sweep.bytes += size;
        }
        Ok(sweep)
    }

    /// Make an existing blob young again (a `file://` store only: elsewhere a rewrite
    /// would cost a copy). Best effort.
    pub(super) async fn touch(&self, path: &Path) {
        let Some(file) = self.local_file(path) else {
            return;
        };
        let res = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&file).and_then(|f| f.set_modified(SystemTime::now()))
        })
        .await;
        if let Ok(Err(e)) = res {
            tracing::debug!(%path, error = %e, "cannot make a rewritten blob young again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::TryStreamExt;

    async fn listed(store: &BlobStore) -> Vec<Digest> {
        let mut v: Vec<Digest> = store
            .list_blobs()
            .map_ok(|b| b.digest)
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    }

    fn age(store: &BlobStore, d: &Digest, secs: u64) {
        let file = store.local_file(&store.blob_path(d)).unwrap();
        let f = std::fs::File::open(file).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    #[tokio::test]
    async fn blobs_are_listed_and_only_old_unused_ones_deleted() {
        let dir = tempfile::tempdir().unwrap();
        for store in [
            BlobStore::local(dir.path()).unwrap(),
            BlobStore::in_memory(),
        ] {
            let a = store.put(Bytes::from_static(b"a")).await.unwrap();
            let b = store.put(Bytes::from_static(b"bb")).await.unwrap();
            let mut want = vec![a.digest.clone(), b.digest.clone()];
            want.sort();
            assert_eq!(listed(&store).await, want);
            // Young: kept, whatever the process did.
            let past = SystemTime::now() - Duration::from_secs(60);
            assert_eq!(store.delete_if_older(&a.digest, past).await.unwrap(), None);
            // Used since the cutoff: kept.
            let future = SystemTime::now() + Duration::from_secs(60);
            store
                .recent()
                .used_at(&a.digest, future + Duration::from_secs(1));
            assert_eq!(
                store.delete_if_older(&a.digest, future).await.unwrap(),
                None
            );
            // Written before the cutoff and not used since: gone.
            let other = BlobStore {
                recent: std::sync::Arc::new(RecentUse::default()),
                ..store.clone()
            };
            assert_eq!(
                other.delete_if_older(&b.digest, future).await.unwrap(),
                Some(2)
            );
            assert!(!store.exists(&b.digest).await.unwrap());
            assert_eq!(listed(&store).await, vec![a.digest.clone()]);
        }
    }

    #[tokio::test]
    async fn a_local_blob_written_again_is_young_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let a = store.put(Bytes::from_static(b"again")).await.unwrap();
        age(&store, &a.digest, 7200);
        let old = SystemTime::now() - Duration::from_secs(3600);
        let listed: Vec<ListedBlob> = store.list_blobs().try_collect().await.unwrap();
        assert!(listed[0].modified < old);
        store.put(Bytes::from_static(b"again")).await.unwrap();
        let listed: Vec<ListedBlob> = store.list_blobs().try_collect().await.unwrap();
        assert!(listed[0].modified > old, "{:?}", listed[0].modified);
        // Another process (no record of uses) spares it too.
        let other = BlobStore::local(dir.path()).unwrap();
        assert_eq!(other.delete_if_older(&a.digest, old).await.unwrap(), None);
    }

    #[tokio::test]
    async fn stale_staging_objects_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let staging = store.staging_path();
        store
            .store
            .put(&staging, Bytes::from_static(b"half").into())
            .await
            .unwrap();
        let past = SystemTime::now() - Duration::from_secs(60);
        assert_eq!(
            store.sweep_staging(past, false).await.unwrap(),
            Sweep::default()
        );
        let future = SystemTime::now() + Duration::from_secs(60);
        let want = Sweep {
            objects: 1,
            bytes: 4,
        };
        assert_eq!(store.sweep_staging(future, true).await.unwrap(), want);
        assert_eq!(store.sweep_staging(future, false).await.unwrap(), want);
        assert_eq!(
            store.sweep_staging(future, false).await.unwrap(),
            Sweep::default()
        );
    }

    #[test]
    fn recent_uses_are_bounded_by_the_horizon() {
        let r = RecentUse::default();
        let long_ago = SystemTime::now() - Duration::from_secs(10 * 3600);
        for i in 0..PRUNE_FLOOR as u32 * 3 {
            r.used_at(&Digest::of(&i.to_le_bytes()), long_ago);
        }
        assert!(r.len() < PRUNE_FLOOR, "{}", r.len());
        let d = Digest::of(b"now");
        r.used(&d);
        assert!(r.used_since(&d, SystemTime::now() - Duration::from_secs(1)));
        assert!(!r.used_since(&Digest::of(b"never"), long_ago));
    }
}

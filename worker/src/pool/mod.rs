//! The worker's pool of root filesystems: read-only **chains** keyed by ChainID, and
//! throwaway **workspaces**, in one directory owned by the worker's user, shared safely by
//! several builds (threads and processes) at once.
//!
//! # Use
//! ```no_run
//! # fn main() -> Result<(), farm_worker::pool::PoolError> {
//! use farm_worker::pool::{Begin, ChainId, Pool, PoolOptions, WorkspaceOptions};
//! let pool = Pool::open("/var/lib/farm/pool", PoolOptions::default())?;
//! let base: ChainId = "sha256:0000000000000000000000000000000000000000000000000000000000000000".parse()?;
//! let base = match pool.begin_chain(&base, None)? {
//!     Begin::Exists(handle) => handle,          // someone built it already (or meanwhile)
//!     Begin::Create(mut pending) => {
//!         // extract the layer into pending.rootfs() (e.g. in a child process in the
//!         // build's user namespace), then:
//!         pending.set_layer_size(12345);        // uncompressed layer size, if known
//!         pending.commit()?                    // sealed (read-only), published atomically
//!     }
//! };
//! let ws = pool.workspace(WorkspaceOptions { overlay_dirs: true, snapshot_of: None })?;
//! // mount overlay lowerdir=base.rootfs(), upperdir=ws.upper(), workdir=ws.work() ...
//! # Ok(()) }
//! ```
//! Every call blocks (filesystem work, flock): from async code use `spawn_blocking`.
//!
//! # On disk
//! ```text
//! DIR/.lock                     pool lock: shared for every operation, exclusive for gc
//! DIR/pool.json                 {"format":1,"backend":"btrfs"|"copy"}
//! DIR/chains/sha256-HEX/        a sealed chain: a volume (btrfs subvolume, read-only)
//! DIR/chains/sha256-HEX/rootfs  ... whose `rootfs` directory is the root filesystem
//! DIR/chains/.pending.NAME.UNIQ a chain being filled (never visible under its id)
//! DIR/chains/.trash.UNIQ        a chain being deleted
//! DIR/meta/sha256-HEX.json      its metadata (see `meta`), replaced atomically
//! DIR/locks/sha256-HEX.create   held exclusively while a build creates that chain
//! DIR/locks/sha256-HEX.use      held shared by every ChainHandle; gc try-locks it exclusively
//! DIR/locks/ws-UNIQ.lock        held exclusively by a live Workspace
//! DIR/work/ws-UNIQ/             a workspace volume: upper/, work/, snapshot/rootfs
//! ```
//! A chain's volume wraps its rootfs (`chains/ID/rootfs`, not `chains/ID`) so that the
//! volume's root is always owned by the pool's user whatever the image does to `/`: an
//! unprivileged user may only snapshot subvolumes it owns and only delete subvolumes
//! whose root it may write.
//!
//! # Locking
//! * `.lock`: every operation takes it shared for its short critical section (never while
//!   a caller fills a pending chain or uses a workspace); [`Pool::gc`] takes it
//!   exclusively, so gc never runs in the middle of a lookup, publish or snapshot.
//! * per chain `.create`: [`Pool::begin_chain`] takes it exclusively (blocking, without the
//!   pool lock) and keeps it in the [`PendingChain`]; a second build creating the same
//!   chain waits for it, then finds the chain published and gets [`Begin::Exists`] (or, if
//!   the first build dropped its pending chain, creates it itself).
//! * per chain `.use`: every [`ChainHandle`] holds it shared for its lifetime; gc and
//!   [`Pool::remove_chain`] only delete a chain whose `.use` they can lock exclusively
//!   without waiting, so a chain in use by any thread or process is never deleted.
//! * flocks belong to open file descriptions, so two handles in one process conflict
//!   exactly as two processes do. Lock files are unlinked only while held exclusively,
//!   and every lock is re-checked against the path after it is taken.
//! * A thread must not call `begin_chain` for an id while it holds a `PendingChain` for
//!   the same id: it would wait for itself.
//!
//! # Backends
//! [`BackendKind::Btrfs`] when the directory is on btrfs: chains are subvolumes, a child
//! chain or a workspace copy is a snapshot (O(1)), sealing sets the subvolume read-only.
//! Implemented with a handful of btrfs ioctls through `nix` (in [`crate::sys::btrfs`], with
//! the crate's other `unsafe`) rather than the `btrfsutil` crate: the errno survives (ENOSPC must become
//! [`PoolError::PoolFull`], EPERM must pick the fallback delete), there is no C library or
//! bindgen/libclang to build, and nothing can panic inside a C-glue layer of an archived
//! crate. [`BackendKind::Copy`] everywhere else: a snapshot is a recursive copy
//! ([`copy::copy_tree`], reflinks when the filesystem has them), and read-only is a
//! convention. [`Pool::open`] says once, as a warning, when it falls back to copying.
//!
//! # Deleting trees of other users
//! Trees built in a user namespace hold files of the container's uids. On btrfs (mounted
//! with `user_subvol_rm_allowed` when unprivileged) the pool deletes whole subvolumes
//! regardless of their contents. On the copy backend (or when btrfs refuses) it calls the
//! [`Deleter`] of [`PoolOptions`]; the default, [`StdDeleter`], is `remove_dir_all`, which
//! is enough as root. An unprivileged worker on the copy backend should supply a deleter
//! that removes the tree inside the build's user namespace (through the sandbox).
//!
//! # Sizes (for gc)
//! A chain's size is the apparent size of its tree (regular files and symlinks, hard
//! links once). At seal time: if the caller gave the layer's uncompressed size
//! ([`PendingChain::set_layer_size`]) it is parent's size + that hint (O(1), used on both
//! backends; slightly over-counts files the layer replaced or deleted); otherwise the
//! tree is walked once (O(rootfs); fine for a base layer or on the copy backend, which
//! copied the whole tree anyway). On btrfs snapshots share extents, so the sum of chain
//! sizes over-estimates the disk used: gc is conservative. A chain whose tree could not be
//! walked (unreadable directories) has an unknown size and counts as 0.

mod backend;
pub mod copy;
mod error;
mod fsinfo;
mod lock;
mod meta;
mod watermark;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub use backend::{Backend, BackendKind, BtrfsBackend, CopyBackend, Deleter, StdDeleter};
pub use error::{PoolError, Result, is_no_space};
pub use fsinfo::{Finding, FsKind, MountInfo, Report, Severity};
pub use meta::SizeSource;
pub use watermark::{Level, Watermarks};

use lock::{Lock, Mode};
use meta::ChainMeta;

pub use farm_model::ChainId;

/// The file name a chain has in the pool: `sha256-HEX`.
fn file_name(id: &ChainId) -> String {
    id.as_str().replacen(':', "-", 1)
}

fn from_file_name(name: &str) -> Option<ChainId> {
    let (algo, hex) = name.split_once('-')?;
    ChainId::parse(&format!("{algo}:{hex}")).ok()
}

/// Which backend [`Pool::open`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// btrfs if the directory is on btrfs, else copy (with a warning). A pool keeps the
    /// backend it was created with.
    #[default]
    Auto,
    /// btrfs, or an error.
    Btrfs,
    /// Copy, even on btrfs (no warning).
    Copy,
}

/// Options of [`Pool::open`].
#[derive(Clone)]
pub struct PoolOptions {
    pub backend: BackendChoice,
    /// Removes trees the pool cannot remove itself; see [`Deleter`].
    pub deleter: Arc<dyn Deleter>,
    /// Create the pool directory (and its parents) if missing. Default true.
    pub create: bool,
    /// The host ids of the user namespace's root, which must reach the pool's
    /// directories (`None`: this process's). When they are not this process's (a worker
    /// running as root maps a range of its own), the pool's own directories are given
    /// to them (0700) and the pool root is 0711 (traversed, never listed).
    pub private_to: Option<(u32, u32)>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            backend: BackendChoice::Auto,
            deleter: Arc::new(StdDeleter),
            create: true,
            private_to: None,
        }
    }
}

impl fmt::Debug for PoolOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolOptions")
            .field("backend", &self.backend)
            .field("create", &self.create)
            .finish_non_exhaustive()
    }
}

impl PoolOptions {
    pub fn with_backend(mut self, backend: BackendChoice) -> Self {
        self.backend = backend;
        self
    }
    pub fn with_deleter(mut self, deleter: Arc<dyn Deleter>) -> Self {
        self.deleter = deleter;
        self
    }

    /// See [`PoolOptions::private_to`].
    pub fn with_private_to(mut self, ids: (u32, u32)) -> Self {
        self.private_to = Some(ids);
        self
    }
}

/// What is known about a sealed chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    pub id: ChainId,
    pub parent: Option<ChainId>,
    /// Apparent size in bytes, if known (see the module docs).
    pub size_bytes: Option<u64>,
    pub size_source: SizeSource,
    pub created: SystemTime,
    pub last_used: SystemTime,
}

impl ChainInfo {
    fn from_meta(id: ChainId, m: &ChainMeta) -> ChainInfo {
        ChainInfo {
            id,
            parent: m.parent.as_deref().and_then(|p| ChainId::parse(p).ok()),
            size_bytes: m.size_bytes,
            size_source: m.size_source,
            created: m.created(),
            last_used: m.last_used(),
        }
    }
}

/// The result of [`Pool::begin_chain`].
#[derive(Debug)]
pub enum Begin {
    /// The chain exists (maybe built meanwhile by another build): use it.
    Exists(ChainHandle),
    /// Fill [`PendingChain::rootfs`], then [`PendingChain::commit`].
    Create(PendingChain),
}

/// What [`Pool::workspace`] makes.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkspaceOptions<'a> {
    /// Create empty `upper/` and `work/` directories for an overlay mount.
    pub overlay_dirs: bool,
    /// Make a writable copy of this chain at `rootfs()` (a snapshot on btrfs: O(1)).
    pub snapshot_of: Option<&'a ChainHandle>,
}

/// One chain removed by gc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedChain {
    pub id: ChainId,
    pub size_bytes: Option<u64>,
}

/// What [`Pool::gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Removed, least recently used first.
    pub removed: Vec<RemovedChain>,
    /// Candidates skipped because a handle (in any process) holds them.
    pub skipped_in_use: Vec<ChainId>,
    /// Sum of known chain sizes before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Chains whose size is unknown (counted as 0).
    pub unknown_size: usize,
    /// Leftovers of crashed builds removed (pending chains, workspaces, trash).
    pub stale_removed: usize,
}

struct Inner {
    dir: PathBuf,
    backend: Arc<dyn Backend>,
    deleter: Arc<dyn Deleter>,
}

/// A pool directory. Cheap to clone; share it between threads.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("dir", &self.inner.dir)
            .field("backend", &self.inner.backend.kind())
            .finish()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PoolFile {
    format: u32,
    backend: BackendKind,
}

const PENDING: &str = ".pending.";
const TRASH: &str = ".trash.";
const WS_PREFIX: &str = "ws-";

/// Create (or tighten, when it is ours) one of the pool's own directories: 0700, so no
/// other user reaches its root filesystems (which hold setuid files of their images).
/// The root filesystems themselves keep the modes their images give them.
///
/// `owner`: ids to give it to (see [`PoolOptions::private_to`]); `traverse`: 0711
/// instead (the pool root, when another owner must pass through it).
fn private_dir(path: &Path, owner: Option<(u32, u32)>, traverse: bool) -> io::Result<()> {
    let mode = if traverse { 0o711 } else { 0o700 };
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
        r => r?,
    }
    let m = fs::metadata(path)?;
    let me = nix::unistd::geteuid().as_raw();
    let ours = m.uid() == me || owner.is_some_and(|(uid, _)| uid == m.uid());
    if ours && m.mode() & 0o777 & !mode != 0 {
        tracing::info!(
            path = %path.display(),
            "the pool's directory was open to other users; making it {mode:o}"
        );
        fs::set_permissions(path, fs::Permissions::from_mode(m.mode() & 0o7000 | mode))?;
    }
    if let Some((uid, gid)) = owner.filter(|_| !traverse)
        && m.uid() == me
        && uid != me
    {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o755).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r,
    }
}

impl Pool {
    /// Opens (creating if needed and allowed) the pool at `dir`.
    ///
    /// Checks, in order: that `dir` (or the parent it would be created in) is a directory
    /// writable by us ([`PoolError::NotWritable`] names its owner); the filesystem
    /// (statfs): btrfs selects the btrfs backend, anything else the copy backend with one
    /// `tracing::warn!` line; on btrfs when not root, that it is mounted with
    /// `user_subvol_rm_allowed` ([`PoolError::UserSubvolRmNotAllowed`]). Then removes the
    /// leftovers of crashed builds if no other process is using the pool.
    pub fn open(dir: impl AsRef<Path>, options: PoolOptions) -> Result<Pool> {
        let dir = fsinfo::absolute(dir.as_ref());
        let euid = nix::unistd::geteuid().as_raw();
        // Another owner of the namespace's root passes through the pool root.
        let shared_root = options.private_to.is_some_and(|(uid, _)| uid != euid);
        match fs::metadata(&dir) {
            Ok(m) if !m.is_dir() => return Err(PoolError::NotADirectory(dir)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && options.create => {
                if let Some(anc) = fsinfo::existing_ancestor(&dir)
                    && !fsinfo::writable(&anc)
                {
                    return Err(not_writable(&anc, euid));
                }
                if let Some(parent) = dir.parent() {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .recursive(true)
                        .create(parent)
                        .map_err(|e| PoolError::io(&dir, "create the pool directory", parent, e))?;
                }
                private_dir(&dir, None, shared_root)
                    .map_err(|e| PoolError::io(&dir, "create the pool directory", &dir, e))?;
            }
            Err(e) => {
                return Err(PoolError::Io {
                    op: "open the pool directory",
                    path: dir,
                    source: e,
                });
            }
        }
        if !fsinfo::writable(&dir) {
            return Err(not_writable(&dir, euid));
        }
        let fs_kind = fsinfo::fs_kind(&dir).map_err(|e| PoolError::Io {
            op: "statfs",
            path: dir.clone(),
            source: e,
        })?;

        let pool_file = dir.join("pool.json");
        let recorded: Option<BackendKind> = match fs::read(&pool_file) {
            Ok(b) => Some(
                serde_json::from_slice::<PoolFile>(&b)
                    .map_err(|source| PoolError::Metadata {
                        path: pool_file.clone(),
                        source,
                    })?
                    .backend,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(PoolError::Io {
                    op: "read",
                    path: pool_file,
                    source: e,
                });
            }
        };
        let requested = match options.backend {
            BackendChoice::Auto => None,
            BackendChoice::Btrfs => Some(BackendKind::Btrfs),
            BackendChoice::Copy => Some(BackendKind::Copy),
        };
        if let (Some(rec), Some(req)) = (recorded, requested)
            && rec != req
        {
            return Err(PoolError::BackendMismatch {
                dir,
                recorded: rec,
                requested: req,
            });
        }
        let kind = requested.or(recorded).unwrap_or(if fs_kind.is_btrfs() {
            BackendKind::Btrfs
        } else {
            BackendKind::Copy
        });
        match kind {
            BackendKind::Btrfs if !fs_kind.is_btrfs() => {
                return Err(PoolError::NotBtrfs {
                    dir,
                    fs: fs_kind.name,
                });
            }
            BackendKind::Btrfs if euid != 0 => {
                let canon = fs::canonicalize(&dir).unwrap_or(dir.clone());
                if let Some(m) = fsinfo::mount_of(&canon)
                    && !m.has_option(fsinfo::USER_SUBVOL_RM_ALLOWED)
                {
                    return Err(PoolError::UserSubvolRmNotAllowed {
                        dir,
                        mount_point: m.mount_point,
                        uid: euid,
                    });
                }
            }
            BackendKind::Copy if !fs_kind.is_btrfs() && options.backend == BackendChoice::Auto => {
                tracing::warn!(
                    "pool {} is on {}, not btrfs: builds will copy each chain instead of \
                     snapshotting it (slower, more disk); to get btrfs, {}",
                    dir.display(),
                    fs_kind.name,
                    fsinfo::HOW_TO_GET_BTRFS
                );
            }
            BackendKind::Copy if fs_kind.is_btrfs() && recorded == Some(BackendKind::Copy) => {
                tracing::info!(
                    "pool {} was created with the copy backend; delete it to get btrfs snapshots",
                    dir.display()
                );
            }
            _ => {}
        }
        private_dir(&dir, None, shared_root)
            .map_err(|e| PoolError::io(&dir, "make private", &dir, e))?;
        for sub in ["chains", "meta", "locks", "work"] {
            let p = dir.join(sub);
            private_dir(&p, options.private_to, false)
                .map_err(|e| PoolError::io(&dir, "create", &p, e))?;
        }
        if recorded.is_none() {
            let bytes = serde_json::to_vec(&PoolFile {
                format: 1,
                backend: kind,
            })
            .expect("serialises");
            meta::write_atomic(&dir, &pool_file, &bytes)?;
        }
        let pool = Pool {
            inner: Arc::new(Inner {
                dir,
                backend: backend::make(kind),
                deleter: options.deleter,
            }),
        };
        // Recover from crashes, but do not wait for other users of the pool.
        if let Ok(Some(_x)) = Lock::try_acquire(&pool.inner.dir.join(".lock"), Mode::Exclusive) {
            let n = pool.cleanup_stale();
            if n > 0 {
                tracing::info!(pool = %pool.inner.dir.display(), removed = n, "removed leftovers of interrupted builds");
            }
        }
        tracing::debug!(pool = %pool.inner.dir.display(), backend = %kind, fs = %fs_kind.name, "pool open");
        Ok(pool)
    }

    /// Looks at `dir` for `farm check` and creates nothing: filesystem type, mount and
    /// options, free space, writability, and which backend [`Pool::open`] would use.
    pub fn check(dir: impl AsRef<Path>) -> Report {
        fsinfo::check(dir.as_ref())
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn backend(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    /// Turns an I/O error met while filling a pending chain or workspace into a pool
    /// error: ENOSPC/EDQUOT become [`PoolError::PoolFull`].
    pub fn error(&self, op: &'static str, path: &Path, e: io::Error) -> PoolError {
        PoolError::io(&self.inner.dir, op, path, e)
    }

    /// The lock file a [`ChainHandle`] holds shared; another process may hold it shared
    /// too (e.g. `flock -s FILE CMD`) to keep the chain from gc.
    pub fn use_lock_path(&self, id: &ChainId) -> PathBuf {
        self.lock_file(&format!("{}.use", file_name(id)))
    }

    fn chains_dir(&self) -> PathBuf {
        self.inner.dir.join("chains")
    }
    fn chain_volume(&self, id: &ChainId) -> PathBuf {
        self.chains_dir().join(file_name(id))
    }
    fn meta_path(&self, id: &ChainId) -> PathBuf {
        self.inner
            .dir
            .join("meta")
            .join(format!("{}.json", file_name(id)))
    }
    fn lock_file(&self, name: &str) -> PathBuf {
        self.inner.dir.join("locks").join(name)
    }
    fn create_lock_path(&self, id: &ChainId) -> PathBuf {
        self.lock_file(&format!("{}.create", file_name(id)))
    }

    fn lock_pool(&self, mode: Mode) -> Result<Lock> {
        let p = self.inner.dir.join(".lock");
        Lock::acquire(&p, mode).map_err(|e| self.error("lock", &p, e))
    }

    fn lock(&self, path: &Path, mode: Mode) -> Result<Lock> {
        Lock::acquire(path, mode).map_err(|e| self.error("lock", path, e))
    }

    fn try_lock(&self, path: &Path, mode: Mode) -> Result<Option<Lock>> {
        Lock::try_acquire(path, mode).map_err(|e| self.error("lock", path, e))
    }

    fn read_meta_or_default(&self, id: &ChainId) -> Result<ChainMeta> {
        match meta::read(&self.meta_path(id)) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e @ PoolError::Metadata { .. }) => {
                tracing::warn!(chain = %id, error = %e, "rebuilding a corrupt chain record");
            }
            Err(e) => return Err(e),
        }
        // A chain without a (valid) record, e.g. deleted by hand: rebuild one; its size
        // is unknown.
        let created = fs::symlink_metadata(self.chain_volume(id))
            .map(|m| m.mtime().max(0) as u64 * 1000)
            .unwrap_or_else(|_| meta::now_ms());
        Ok(ChainMeta {
            id: id.to_string(),
            parent: None,
            size_bytes: None,
            size_source: SizeSource::Unknown,
            created_unix_ms: created,
            last_used_unix_ms: created,
            backend: self.backend().to_string(),
        })
    }

    /// A handle on the sealed chain `id`, or `None` if the pool does not hold it. The
    /// handle keeps gc away from the chain until dropped, and this bumps its last use.
    pub fn chain(&self, id: &ChainId) -> Result<Option<ChainHandle>> {
        let _pool = self.lock_pool(Mode::Shared)?;
        let volume = self.chain_volume(id);
        if fs::symlink_metadata(&volume).is_err() {
            return Ok(None);
        }
        let lock = self.lock(&self.use_lock_path(id), Mode::Shared)?;
        let mut m = self.read_meta_or_default(id)?;
        m.last_used_unix_ms = meta::now_ms().max(m.last_used_unix_ms);
        // Best effort: a full pool must still hand out its chains (and let gc run).
        if let Err(e) = meta::write(&self.inner.dir, &self.meta_path(id), &m, false) {
            tracing::debug!(chain = %id, error = %e, "cannot record last use");
        }
        Ok(Some(ChainHandle {
            pool: self.clone(),
            info: ChainInfo::from_meta(id.clone(), &m),
            rootfs: volume.join("rootfs"),
            volume,
            _lock: lock,
        }))
    }

    /// True if the pool holds the sealed chain `id` (no handle, no last-use bump).
    pub fn contains(&self, id: &ChainId) -> bool {
        fs::symlink_metadata(self.chain_volume(id)).is_ok()
    }

    /// Starts creating chain `id`: empty, or a writable snapshot of `parent`.
    ///
    /// If the chain exists, or another build is creating it (this call then waits for
    /// that build) and publishes it, returns [`Begin::Exists`]. Otherwise returns a
    /// [`PendingChain`] whose rootfs the caller fills; nothing is visible under `id` until
    /// [`PendingChain::commit`], and dropping it without commit deletes it.
    pub fn begin_chain(&self, id: &ChainId, parent: Option<&ChainHandle>) -> Result<Begin> {
        if let Some(p) = parent
            && !Arc::ptr_eq(&p.pool.inner, &self.inner)
            && p.pool.inner.dir != self.inner.dir
        {
            return Err(PoolError::ForeignChain {
                id: p.info.id.to_string(),
                other: p.pool.inner.dir.clone(),
                this: self.inner.dir.clone(),
            });
        }
        if let Some(h) = self.chain(id)? {
            return Ok(Begin::Exists(h));
        }
        let create = self.lock(&self.create_lock_path(id), Mode::Exclusive)?;
        if let Some(h) = self.chain(id)? {
            return Ok(Begin::Exists(h));
        }
        let _pool = self.lock_pool(Mode::Shared)?;
        let volume = self.chains_dir().join(format!(
            "{PENDING}{}.{}",
            file_name(id),
            meta::unique_suffix()
        ));
        let rootfs = volume.join("rootfs");
        let made = match parent {
            Some(p) => self
                .inner
                .backend
                .snapshot(&p.volume, &volume, false)
                .map_err(|e| self.error("snapshot the parent chain into", &volume, e)),
            None => self
                .inner
                .backend
                .create(&volume)
                .and_then(|()| mkdir(&rootfs))
                .map_err(|e| self.error("create", &volume, e)),
        };
        if let Err(e) = made {
            if let Err(e2) = self.inner.backend.delete(&volume, &*self.inner.deleter) {
                tracing::warn!(path = %volume.display(), error = %e2, "cannot remove a half-made chain; gc will retry");
            }
            return Err(e);
        }
        Ok(Begin::Create(PendingChain {
            pool: self.clone(),
            id: id.clone(),
            parent: parent.map(|p| (p.info.id.clone(), p.info.size_bytes)),
            volume,
            rootfs,
            layer_size: None,
            create: Some(create),
            done: false,
        }))
    }

    /// The sealed chain `id`, created with `fill` if the pool lacks it (see
    /// [`Pool::begin_chain`]). `fill` gets the pending chain to fill (and may call
    /// [`PendingChain::set_layer_size`]); if it fails, the pending chain is removed.
    pub fn ensure_chain<E: From<PoolError>>(
        &self,
        id: &ChainId,
        parent: Option<&ChainHandle>,
        fill: impl FnOnce(&mut PendingChain) -> std::result::Result<(), E>,
    ) -> std::result::Result<ChainHandle, E> {
        match self.begin_chain(id, parent)? {
            Begin::Exists(h) => Ok(h),
            Begin::Create(mut p) => {
                fill(&mut p)?;
                Ok(p.commit()?)
            }
        }
    }

    /// A fresh workspace (deleted when dropped): overlay `upper/` + `work/` directories on
    /// the pool's filesystem, and/or a writable copy of a chain (O(1) on btrfs).
    pub fn workspace(&self, options: WorkspaceOptions<'_>) -> Result<Workspace> {
        let name = format!("{WS_PREFIX}{}", meta::unique_suffix());
        let lock = self.lock(&self.lock_file(&format!("{name}.lock")), Mode::Exclusive)?;
        let _pool = self.lock_pool(Mode::Shared)?;
        let volume = self.inner.dir.join("work").join(&name);
        let mut ws = Workspace {
            pool: self.clone(),
            volume: volume.clone(),
            upper: None,
            work: None,
            rootfs: None,
            lock: Some(lock),
            removed: false,
        };
        self.inner
            .backend
            .create(&volume)
            .map_err(|e| self.error("create workspace", &volume, e))?;
        if options.overlay_dirs {
            for (sub, slot) in [("upper", &mut ws.upper), ("work", &mut ws.work)] {
                let p = volume.join(sub);
                mkdir(&p).map_err(|e| self.error("create", &p, e))?;
                *slot = Some(p);
            }
        }
        if let Some(h) = options.snapshot_of {
            let snap = volume.join("snapshot");
            self.inner
                .backend
                .snapshot(&h.volume, &snap, false)
                .map_err(|e| self.error("snapshot a chain into", &snap, e))?;
            ws.rootfs = Some(snap.join("rootfs"));
        }
        Ok(ws)
    }

    /// The sealed chains of the pool.
    pub fn list(&self) -> Result<Vec<ChainInfo>> {
        let _pool = self.lock_pool(Mode::Shared)?;
        self.list_locked()
    }

    fn list_locked(&self) -> Result<Vec<ChainInfo>> {
        let dir = self.chains_dir();
        let rd = fs::read_dir(&dir).map_err(|e| self.error("list", &dir, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| self.error("list", &dir, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(from_file_name) else {
                continue;
            };
            let m = self.read_meta_or_default(&id)?;
            out.push(ChainInfo::from_meta(id, &m));
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Sum of the known sizes of the sealed chains.
    pub fn usage(&self) -> Result<u64> {
        Ok(self.list()?.iter().filter_map(|c| c.size_bytes).sum())
    }

    /// Deletes chain `id` now. `Ok(false)` if absent; [`PoolError::InUse`] if a handle
    /// holds it.
    pub fn remove_chain(&self, id: &ChainId) -> Result<bool> {
        let _pool = self.lock_pool(Mode::Exclusive)?;
        if !self.contains(id) {
            return Ok(false);
        }
        match self.try_unpublish(id)? {
            Some(trash) => {
                self.delete_volume(&trash)?;
                Ok(true)
            }
            None => Err(PoolError::InUse(id.to_string())),
        }
    }

    /// Removes least-recently-used sealed chains until the known sizes add up to at most
    /// `max_bytes`, skipping chains held by a handle in any process. Also removes the
    /// leftovers of crashed builds. Waits for in-flight pool operations (not for builds).
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport> {
        let _pool = self.lock_pool(Mode::Exclusive)?;
        let mut report = GcReport {
            stale_removed: self.cleanup_stale(),
            ..Default::default()
        };
        let mut chains = self.list_locked()?;
        report.unknown_size = chains.iter().filter(|c| c.size_bytes.is_none()).count();
        let mut total: u64 = chains.iter().filter_map(|c| c.size_bytes).sum();
        report.bytes_before = total;
        chains.sort_by(|a, b| {
            a.last_used
                .cmp(&b.last_used)
                .then(a.created.cmp(&b.created))
        });
        let mut trash = Vec::new();
        for c in chains {
            if total <= max_bytes {
                break;
            }
            match self.try_unpublish(&c.id)? {
                Some(t) => {
                    total -= c.size_bytes.unwrap_or(0);
                    trash.push(t);
                    report.removed.push(RemovedChain {
                        id: c.id,
                        size_bytes: c.size_bytes,
                    });
                }
                None => report.skipped_in_use.push(c.id),
            }
        }
        report.bytes_after = total;
        let mut first_err = None;
        for t in trash {
            if let Err(e) = self.delete_volume(&t) {
                tracing::warn!(path = %t.display(), error = %e, "cannot delete a removed chain yet; gc will retry");
                first_err.get_or_insert(e);
            }
        }
        if !report.removed.is_empty() || !report.skipped_in_use.is_empty() {
            tracing::info!(
                pool = %self.inner.dir.display(),
                removed = report.removed.len(),
                in_use = report.skipped_in_use.len(),
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                "pool gc"
            );
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// With the pool lock held exclusively: if nobody holds chain `id`, renames it out of
    /// sight (same directory: a read-only subvolume cannot change parent directory),
    /// drops its record and lock files, and returns the trash path.
    fn try_unpublish(&self, id: &ChainId) -> Result<Option<PathBuf>> {
        let Some(use_lock) = self.try_lock(&self.use_lock_path(id), Mode::Exclusive)? else {
            return Ok(None);
        };
        // Somebody in begin_chain between taking the create lock and looking: skip now.
        let Some(create_lock) = self.try_lock(&self.create_lock_path(id), Mode::Exclusive)? else {
            return Ok(None);
        };
        let volume = self.chain_volume(id);
        let trash = self.chains_dir().join(format!(
            "{TRASH}{}.{}",
            file_name(id),
            meta::unique_suffix()
        ));
        fs::rename(&volume, &trash).map_err(|e| self.error("rename", &volume, e))?;
        let mp = self.meta_path(id);
        if let Err(e) = fs::remove_file(&mp)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(self.error("remove", &mp, e));
        }
        let _ = use_lock.unlink();
        let _ = create_lock.unlink();
        Ok(Some(trash))
    }

    fn delete_volume(&self, path: &Path) -> Result<()> {
        self.inner
            .backend
            .delete(path, &*self.inner.deleter)
            .map_err(|e| self.error("delete", path, e))
    }

    fn delete_workspace_volume(&self, volume: &Path) -> Result<()> {
        // A nested snapshot first: btrfs will not destroy a subvolume containing another.
        let snap = volume.join("snapshot");
        if snap.symlink_metadata().is_ok() {
            self.delete_volume(&snap)?;
        }
        self.delete_volume(volume)
    }

    /// With the pool lock held exclusively: removes pending chains and workspaces whose
    /// owners are gone (their locks are free), trash, records without chains and stray
    /// temporary files. Best effort; returns how many entries it removed.
    fn cleanup_stale(&self) -> usize {
        let mut n = 0;
        let chains = self.chains_dir();
        for entry in fs::read_dir(&chains).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let stale = if let Some(rest) = name.strip_prefix(PENDING) {
                let idname = rest.split('.').next().unwrap_or("");
                match from_file_name(idname) {
                    Some(id) => matches!(
                        Lock::try_acquire(&self.create_lock_path(&id), Mode::Exclusive),
                        Ok(Some(_))
                    ),
                    None => true,
                }
            } else {
                name.starts_with(TRASH)
            };
            if stale {
                match self.delete_volume(&path) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover")
                    }
                }
            }
        }
        let work = self.inner.dir.join("work");
        for entry in fs::read_dir(&work).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(WS_PREFIX) {
                continue;
            }
            let lp = self.lock_file(&format!("{name}.lock"));
            if let Ok(Some(l)) = Lock::try_acquire(&lp, Mode::Exclusive) {
                match self.delete_workspace_volume(&entry.path()) {
                    Ok(()) => {
                        n += 1;
                        let _ = l.unlink();
                    }
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove leftover workspace")
                    }
                }
            }
        }
        let metas = self.inner.dir.join("meta");
        for entry in fs::read_dir(&metas).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = match name.strip_suffix(".json").and_then(from_file_name) {
                Some(id) if !name.starts_with('.') => !self.contains(&id),
                _ => name.starts_with('.') && name.contains(".tmp-"),
            };
            if orphan && fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        // Lock files of chains that no longer exist and that nobody holds.
        let locks = self.inner.dir.join("locks");
        for entry in fs::read_dir(&locks).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(base) = name
                .strip_suffix(".use")
                .or_else(|| name.strip_suffix(".create"))
            else {
                continue;
            };
            if let Some(id) = from_file_name(base)
                && !self.contains(&id)
                && !self.pending_exists(&id)
                && let Ok(Some(l)) = Lock::try_acquire(&entry.path(), Mode::Exclusive)
            {
                let _ = l.unlink();
            }
        }
        n
    }

    fn pending_exists(&self, id: &ChainId) -> bool {
        let prefix = format!("{PENDING}{}.", file_name(id));
        fs::read_dir(self.chains_dir())
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    }
}

fn not_writable(dir: &Path, euid: u32) -> PoolError {
    let (owner, mode) = match fs::metadata(dir) {
        Ok(m) => (
            fsinfo::describe_uid(m.uid()),
            m.permissions().mode() & 0o7777,
        ),
        Err(_) => ("an unknown owner".to_owned(), 0),
    };
    PoolError::NotWritable {
        dir: dir.to_path_buf(),
        uid: euid,
        owner,
        mode,
    }
}

/// A sealed, read-only chain in use. While it lives, gc (in any process) leaves the chain
/// alone. Read its tree at [`ChainHandle::rootfs`]; on the copy backend nothing enforces
/// read-only, so never write there (mount it as an overlay lower directory, or take a
/// [`Workspace`] snapshot).
pub struct ChainHandle {
    pool: Pool,
    info: ChainInfo,
    volume: PathBuf,
    rootfs: PathBuf,
    _lock: Lock,
}

impl fmt::Debug for ChainHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainHandle")
            .field("id", &self.info.id)
            .field("rootfs", &self.rootfs)
            .finish()
    }
}

impl ChainHandle {
    pub fn id(&self) -> &ChainId {
        &self.info.id
    }
    /// The chain's root filesystem (read-only).
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }
    /// The volume (subvolume or directory) that holds `rootfs`.
    pub fn volume(&self) -> &Path {
        &self.volume
    }
    /// Its metadata as of when the handle was taken.
    pub fn info(&self) -> &ChainInfo {
        &self.info
    }
    /// Whether the kernel enforces read-only (btrfs).
    pub fn is_readonly(&self) -> io::Result<bool> {
        self.pool.inner.backend.is_readonly(&self.volume)
    }
}

/// A chain being created: fill [`PendingChain::rootfs`], then [`PendingChain::commit`].
/// Dropped without commit, it is deleted (and the creation lock released).
pub struct PendingChain {
    pool: Pool,
    id: ChainId,
    parent: Option<(ChainId, Option<u64>)>,
    volume: PathBuf,
    rootfs: PathBuf,
    layer_size: Option<u64>,
    create: Option<Lock>,
    done: bool,
}

impl fmt::Debug for PendingChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingChain")
            .field("id", &self.id)
            .field("rootfs", &self.rootfs)
            .finish()
    }
}

impl PendingChain {
    pub fn id(&self) -> &ChainId {
        &self.id
    }
    /// The writable tree to fill (a snapshot of the parent's, or empty, mode 0755).
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }
    /// The volume (subvolume or directory) that holds `rootfs`.
    pub fn volume(&self) -> &Path {
        &self.volume
    }
    pub fn parent(&self) -> Option<&ChainId> {
        self.parent.as_ref().map(|p| &p.0)
    }
    /// The uncompressed size of the layer applied: the chain's size becomes parent's +
    /// this, without walking the tree at commit.
    pub fn set_layer_size(&mut self, bytes: u64) {
        self.layer_size = Some(bytes);
    }

    /// Seals the chain (read-only on btrfs), records it and publishes it atomically under
    /// its id (rename), returning a handle on it. On error the pending chain is deleted.
    pub fn commit(mut self) -> Result<ChainHandle> {
        let pool = self.pool.clone();
        let parent_size = self.parent.as_ref().map(|p| p.1);
        let (size, source) = match (self.layer_size, parent_size) {
            (Some(h), None) => (Some(h), SizeSource::Hint),
            (Some(h), Some(Some(p))) => (Some(p + h), SizeSource::Hint),
            _ => match copy::tree_size(&self.rootfs) {
                Ok(n) => (Some(n), SizeSource::Walk),
                Err(e) => {
                    tracing::debug!(chain = %self.id, error = %e, "cannot measure chain; size unknown");
                    (None, SizeSource::Unknown)
                }
            },
        };
        let now = meta::now_ms();
        let m = ChainMeta {
            id: self.id.to_string(),
            parent: self.parent.as_ref().map(|p| p.0.to_string()),
            size_bytes: size,
            size_source: source,
            created_unix_ms: now,
            last_used_unix_ms: now,
            backend: pool.backend().to_string(),
        };
        let _pool = pool.lock_pool(Mode::Shared)?;
        // Take the use lock before the chain is visible so gc cannot slip in between.
        let lock = pool.lock(&pool.use_lock_path(&self.id), Mode::Shared)?;
        let target = pool.chain_volume(&self.id);
        let meta_path = pool.meta_path(&self.id);
        pool.inner
            .backend
            .set_readonly(&self.volume, true)
            .map_err(|e| pool.error("make read-only", &self.volume, e))?;
        meta::write(&pool.inner.dir, &meta_path, &m, true)?;
        let published = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.volume,
            nix::fcntl::AT_FDCWD,
            &target,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match published {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) => {
                // Published by someone not using the create lock (should not happen):
                // keep theirs, whose record we just overwrote with equivalent data.
                tracing::warn!(chain = %self.id, "chain appeared while being created; keeping the existing one");
            }
            Err(e) => {
                let _ = fs::remove_file(&meta_path);
                return Err(pool.error("publish", &target, e.into()));
            }
        }
        if published.is_ok() {
            self.done = true;
        }
        let info = ChainInfo::from_meta(self.id.clone(), &m);
        Ok(ChainHandle {
            pool: pool.clone(),
            info,
            rootfs: target.join("rootfs"),
            volume: target,
            _lock: lock,
        })
        // `self` drops here: deletes our copy if it was not published, releases the
        // create lock.
    }

    /// Deletes the pending chain now, reporting errors (dropping does the same, logging).
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        self.pool.delete_volume(&self.volume)
    }
}

impl Drop for PendingChain {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.pool.delete_volume(&self.volume)
        {
            tracing::warn!(chain = %self.id, path = %self.volume.display(), error = %e, "cannot delete an unfinished chain; gc will retry");
        }
        drop(self.create.take());
    }
}

/// A throwaway working area in the pool, deleted when dropped (or by [`Workspace::remove`]).
///
/// `upper()` and `work()` are created empty, mode 0755, owned by the pool's user; overlay
/// shows the upper directory's owner and mode as the root of the merged tree, so set them
/// to the lower root's before mounting if they differ.
pub struct Workspace {
    pool: Pool,
    volume: PathBuf,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    rootfs: Option<PathBuf>,
    lock: Option<Lock>,
    removed: bool,
}

impl fmt::Debug for Workspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workspace")
            .field("path", &self.volume)
            .finish()
    }
}

impl Workspace {
    /// The workspace's own directory (volume).
    pub fn path(&self) -> &Path {
        &self.volume
    }
    /// The overlay upper directory, if asked for.
    pub fn upper(&self) -> Option<&Path> {
        self.upper.as_deref()
    }
    /// The overlay work directory, if asked for.
    pub fn work(&self) -> Option<&Path> {
        self.work.as_deref()
    }
    /// The writable copy of the chain, if asked for.
    pub fn rootfs(&self) -> Option<&Path> {
        self.rootfs.as_deref()
    }

    /// Deletes the workspace now, reporting errors.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        let r = self.pool.delete_workspace_volume(&self.volume);
        if r.is_ok()
            && let Some(l) = self.lock.take()
        {
            let _ = l.unlink();
        }
        r
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        match self.pool.delete_workspace_volume(&self.volume) {
            Ok(()) => {
                if let Some(l) = self.lock.take() {
                    let _ = l.unlink();
                }
            }
            Err(e) => {
                tracing::warn!(path = %self.volume.display(), error = %e, "cannot delete a workspace; gc will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_are_validated_and_named() {
        let hex = "a".repeat(64);
        let id = ChainId::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(file_name(&id), format!("sha256-{hex}"));
        assert_eq!(from_file_name(&file_name(&id)), Some(id.clone()));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}/", "a".repeat(63)),
            format!("md5:{hex}"),
            format!("sha256:../{}", "a".repeat(61)),
            hex.clone(),
        ] {
            assert!(ChainId::parse(&bad).is_err(), "{bad}");
        }
        assert!(from_file_name(".pending.x").is_none());
    }

    #[test]
    fn the_pools_directories_are_private_and_an_open_pool_is_tightened() {
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("new/pool");
        Pool::open(&dir, PoolOptions::default()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for sub in ["chains", "meta", "locks", "work"] {
            assert_eq!(mode(&dir.join(sub)), 0o700, "{sub}");
        }
        // A pool made before, open to everyone, is closed when it is opened.
        for p in [dir.clone(), dir.join("chains")] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Pool::open(&dir, PoolOptions::default()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("chains")), 0o700);

        // As root mapping another range, the namespace's root owns the directories and
        // passes through the pool root, which nobody else may list.
        if nix::unistd::geteuid().is_root() {
            let dir = d.path().join("root-pool");
            let ids = (231_072, 231_072);
            Pool::open(&dir, PoolOptions::default().with_private_to(ids)).unwrap();
            assert_eq!(mode(&dir), 0o711);
            assert_eq!(fs::metadata(&dir).unwrap().uid(), 0);
            for sub in ["chains", "work"] {
                let m = fs::metadata(dir.join(sub)).unwrap();
                assert_eq!(
                    (m.uid(), m.gid(), m.mode() & 0o7777),
                    (231_072, 231_072, 0o700)
                );
            }
        }
    }
}

//! Errors of the pool: typed, each with a message that says what to do.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in [`super::Pool`].
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The pool directory (or the directory it would be created in) is not writable.
    #[error(
        "pool directory {dir} is not writable by uid {uid}: it is owned by {owner} with mode \
         {mode:o}; run the worker as that user, `chown` the directory to uid {uid}, or choose \
         another pool directory"
    )]
    NotWritable {
        dir: PathBuf,
        uid: u32,
        /// "uid N (name)".
        owner: String,
        mode: u32,
    },

    /// The pool path exists but is not a directory.
    #[error("pool path {0} exists but is not a directory; choose another pool directory")]
    NotADirectory(PathBuf),

    /// btrfs mounted without `user_subvol_rm_allowed` while running unprivileged.
    #[error(
        "pool {dir} is on btrfs mounted at {mount_point} without the user_subvol_rm_allowed \
         option, so uid {uid} cannot delete the pool's subvolumes; remount it with `mount -o \
         remount,user_subvol_rm_allowed {mount_point}` (and add the option to /etc/fstab), or \
         run `farm setup --user NAME --pool DIR`"
    )]
    UserSubvolRmNotAllowed {
        dir: PathBuf,
        mount_point: PathBuf,
        uid: u32,
    },

    /// No space left (ENOSPC / EDQUOT) while creating or filling a chain or workspace.
    /// Whatever was being created has been (or will be, when its guard is dropped) removed.
    #[error(
        "pool {dir} is full ({free} bytes free) while trying to {op} {path}: remove unused \
         chains with a lower pool size limit (gc), or give the pool's filesystem more space"
    )]
    PoolFull {
        dir: PathBuf,
        op: &'static str,
        path: PathBuf,
        free: u64,
    },

    /// The btrfs backend was asked for on another filesystem.
    #[error(
        "pool {dir} is on {fs}, not btrfs, so the btrfs backend cannot be used; choose the \
         copy backend or a btrfs pool directory ({how})",
        how = super::fsinfo::HOW_TO_GET_BTRFS
    )]
    NotBtrfs { dir: PathBuf, fs: String },

    /// The pool was made with one backend and is being opened with another.
    #[error(
        "pool {dir} holds {recorded} chains but the {requested} backend was requested; open it \
         with the {recorded} backend, or delete the directory to start a new pool"
    )]
    BackendMismatch {
        dir: PathBuf,
        recorded: super::BackendKind,
        requested: super::BackendKind,
    },

    /// A handle or workspace from another pool was passed.
    #[error("chain {id} belongs to pool {other}, not to {this}")]
    ForeignChain {
        id: String,
        other: PathBuf,
        this: PathBuf,
    },

    /// A chain id that is not `sha256:<64 hex>` (or `sha512:<128 hex>`).
    #[error("invalid chain id {0:?}: expected \"sha256:\" followed by 64 lowercase hex digits")]
    InvalidChainId(String),

    /// The chain is held by a handle (in this or another process).
    #[error(
        "chain {0} is in use by a build (a handle holds its lock); try again when it is released"
    )]
    InUse(String),

    /// A metadata file that cannot be parsed.
    #[error(
        "pool metadata {path} is corrupt ({source}); delete the file and the pool will rebuild it"
    )]
    Metadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Any other I/O error, with the operation and path it happened on.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl PoolError {
    /// Wraps an I/O error; ENOSPC and EDQUOT become [`PoolError::PoolFull`] for `pool_dir`.
    pub fn io(pool_dir: &Path, op: &'static str, path: &Path, source: io::Error) -> Self {
        if is_no_space(&source) {
            PoolError::PoolFull {
                dir: pool_dir.to_path_buf(),
                op,
                path: path.to_path_buf(),
                free: super::fsinfo::free_bytes(pool_dir).unwrap_or(0),
            }
        } else {
            PoolError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }

    /// True for [`PoolError::PoolFull`].
    pub fn is_pool_full(&self) -> bool {
        matches!(self, PoolError::PoolFull { .. })
    }
}

/// True when `e` means the filesystem (or the user's quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
}

/// Result of the pool.
pub type Result<T, E = PoolError> = std::result::Result<T, E>;

impl From<farm_model::InvalidChainId> for PoolError {
    fn from(e: farm_model::InvalidChainId) -> Self {
        PoolError::InvalidChainId(e.0)
    }
}

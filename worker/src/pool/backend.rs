//! The storage backends behind the pool: btrfs subvolumes, or plain directories copied
//! with reflinks when possible. Both keep each volume (chain, pending chain, workspace) as
//! one directory owned by the pool's user; what is inside may belong to anybody.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use super::copy::{self, CopyStats, Reflink};
use crate::sys::btrfs as ioctl;

/// Which backend a pool uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// btrfs subvolumes and snapshots: O(1) snapshots, read-only chains enforced by the kernel.
    Btrfs,
    /// Plain directories: snapshots are recursive copies (reflinks where supported);
    /// "read-only" is a convention (nothing stops a writer).
    Copy,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Btrfs => "btrfs",
            BackendKind::Copy => "copy",
        })
    }
}

/// Removes a directory tree that the pool cannot remove with the default method.
///
/// The pool calls it with a directory owned by the pool's user (a chain, a pending chain
/// or a workspace that has already been renamed out of sight, or a fallback when a btrfs
/// subvolume cannot be destroyed directly); entries below may belong to other uids (the
/// container's), which an unprivileged process cannot unlink from outside the user
/// namespace. A worker running unprivileged on the `copy` backend should therefore pass
/// a deleter that enters the build's user namespace (through the sandbox) and removes
/// the tree there. On btrfs with `user_subvol_rm_allowed` the deleter is not needed:
/// subvolume deletion does not care who owns the files inside.
///
/// Must remove `path` itself too, and succeed if `path` does not exist.
pub trait Deleter: Send + Sync {
    fn remove_tree(&self, path: &Path) -> io::Result<()>;
}

/// The default [`Deleter`]: `std::fs::remove_dir_all`, retried once after making the
/// directories we own writable (overlay work dirs and `chmod 0555` directories otherwise
/// stop it). Enough when running as root, or when everything in the tree is ours.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdDeleter;

impl Deleter for StdDeleter {
    fn remove_tree(&self, path: &Path) -> io::Result<()> {
        match fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                make_dirs_writable(path);
                match fs::remove_dir_all(path) {
                    Err(e2) if e2.kind() == io::ErrorKind::NotFound => Ok(()),
                    r => r.map_err(|e2| {
                        io::Error::new(
                            e2.kind(),
                            format!(
                                "{e2} (the tree probably holds files of other users: give the \
                                 pool a Deleter that removes it inside the build's user namespace)"
                            ),
                        )
                    }),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// chmod u+rwx every directory below `root` that we own (best effort).
fn make_dirs_writable(root: &Path) {
    let me = nix::unistd::geteuid().as_raw();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&d) else {
            continue;
        };
        if !m.is_dir() {
            continue;
        }
        if m.uid() == me && m.mode() & 0o700 != 0o700 {
            let _ =
                fs::set_permissions(&d, fs::Permissions::from_mode((m.mode() | 0o700) & 0o7777));
        }
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// The operations the pool needs from its storage. All paths are inside the pool.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;
    /// Creates an empty, writable volume at `path` (which must not exist).
    fn create(&self, path: &Path) -> io::Result<()>;
    /// Creates `dst` (which must not exist) as a copy of the volume `src`: writable, or
    /// read-only if `readonly` (enforced on btrfs only).
    fn snapshot(&self, src: &Path, dst: &Path, readonly: bool) -> io::Result<()>;
    /// Makes the volume read-only or writable again.
    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()>;
    /// Whether the volume is read-only (always false on the copy backend).
    fn is_readonly(&self, path: &Path) -> io::Result<bool>;
    /// Deletes the volume and everything in it; succeeds if it does not exist. Uses
    /// `deleter` for trees it cannot remove itself.
    fn delete(&self, path: &Path, deleter: &dyn Deleter) -> io::Result<()>;
}

fn split(path: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => Ok((
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad volume path {}", path.display()),
        )),
    }
}

fn open_dir(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// btrfs through ioctls (see [`crate::sys::btrfs`]).
#[derive(Debug, Default)]
pub struct BtrfsBackend;

/// The inode number of every subvolume's root directory (`BTRFS_FIRST_FREE_OBJECTID`).
const SUBVOL_ROOT_INO: u64 = 256;

impl BtrfsBackend {
    /// True if `path` is the root of a subvolume (the caller knows it is on btrfs).
    pub fn is_subvolume(path: &Path) -> io::Result<bool> {
        let m = fs::symlink_metadata(path)?;
        Ok(m.is_dir() && m.ino() == SUBVOL_ROOT_INO)
    }
}

impl Backend for BtrfsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Btrfs
    }

    fn create(&self, path: &Path) -> io::Result<()> {
        let (parent, name) = split(path)?;
        let dir = open_dir(parent)?;
        ioctl::subvol_create(dir.as_fd(), name)
    }

    fn snapshot(&self, src: &Path, dst: &Path, readonly: bool) -> io::Result<()> {
        let (parent, name) = split(dst)?;
        let dir = open_dir(parent)?;
        let source = open_dir(src)?;
        ioctl::snap_create(dir.as_fd(), name, source.as_fd(), readonly)
    }

    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
        let f = open_dir(path)?;
        let flags = ioctl::subvol_getflags(f.as_fd())?;
        let want = if readonly {
            flags | ioctl::SUBVOL_RDONLY
        } else {
            flags & !ioctl::SUBVOL_RDONLY
        };
        if want != flags {
            ioctl::subvol_setflags(f.as_fd(), want)?;
        }
        Ok(())
    }

    fn is_readonly(&self, path: &Path) -> io::Result<bool> {
        let f = open_dir(path)?;
        Ok(ioctl::subvol_getflags(f.as_fd())? & ioctl::SUBVOL_RDONLY != 0)
    }

    fn delete(&self, path: &Path, deleter: &dyn Deleter) -> io::Result<()> {
        match Self::is_subvolume(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(false) => return deleter.remove_tree(path),
            Ok(true) => {}
        }
        // A read-only subvolume cannot be deleted by an unprivileged user (the kernel
        // asks for write permission on its root, which read-only refuses), and its
        // contents cannot be removed by the fallback either: clear the flag first.
        self.set_readonly(path, false)?;
        let (parent, name) = split(path)?;
        let dir = open_dir(parent)?;
        match ioctl::snap_destroy(dir.as_fd(), name) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            // EPERM: mounted without user_subvol_rm_allowed and we are not root.
            // ENOTEMPTY: it contains other subvolumes. EACCES: its root is not writable
            // by us. Remove the contents the ordinary way; rmdir of an empty subvolume
            // works unprivileged since Linux 4.18.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::ENOTEMPTY) | Some(libc::EACCES)
                ) =>
            {
                tracing::debug!(path = %path.display(), error = %e, "subvolume delete refused; removing its contents instead");
                deleter.remove_tree(path)
            }
            Err(e) => Err(e),
        }
    }
}

/// Plain directories; snapshots are copies ([`copy::copy_tree`]).
#[derive(Debug)]
pub struct CopyBackend {
    pub reflink: Reflink,
    /// Statistics of the last snapshot (for logs and tests).
    pub last: std::sync::Mutex<Option<CopyStats>>,
}

impl Default for CopyBackend {
    fn default() -> Self {
        CopyBackend {
            reflink: Reflink::Auto,
            last: std::sync::Mutex::new(None),
        }
    }
}

impl Backend for CopyBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Copy
    }

    fn create(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().mode(0o755).create(path)
    }

    fn snapshot(&self, src: &Path, dst: &Path, _readonly: bool) -> io::Result<()> {
        let stats = copy::copy_tree(src, dst, self.reflink)?;
        tracing::debug!(src = %src.display(), dst = %dst.display(), ?stats, "copied volume");
        if let Ok(mut l) = self.last.lock() {
            *l = Some(stats);
        }
        Ok(())
    }

    fn set_readonly(&self, _path: &Path, _readonly: bool) -> io::Result<()> {
        Ok(())
    }

    fn is_readonly(&self, _path: &Path) -> io::Result<bool> {
        Ok(false)
    }

    fn delete(&self, path: &Path, deleter: &dyn Deleter) -> io::Result<()> {
        deleter.remove_tree(path)
    }
}

/// The backend for a kind.
pub(super) fn make(kind: BackendKind) -> Arc<dyn Backend> {
    match kind {
        BackendKind::Btrfs => Arc::new(BtrfsBackend),
        BackendKind::Copy => Arc::new(CopyBackend::default()),
    }
}

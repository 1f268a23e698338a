//! flock(2)-based locks on files in the pool, safe against lock files being unlinked.
//!
//! Every lock is its own open file description, so two holders in the same process
//! conflict exactly like two processes do (flock locks belong to the open file
//! description, not to the process or thread).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Shared or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Shared,
    Exclusive,
}

/// A held flock; released on drop.
#[derive(Debug)]
pub(super) struct Lock {
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// Blocks until the lock is held.
    pub(super) fn acquire(path: &Path, mode: Mode) -> io::Result<Lock> {
        loop {
            let file = open(path)?;
            match mode {
                Mode::Shared => file.lock_shared()?,
                Mode::Exclusive => file.lock()?,
            }
            if still_linked(&file, path)? {
                return Ok(Lock {
                    _file: file,
                    path: path.to_path_buf(),
                });
            }
            // The file was unlinked (by gc) while we waited: lock the new one.
        }
    }

    /// Returns `Ok(None)` when someone else holds a conflicting lock.
    pub(super) fn try_acquire(path: &Path, mode: Mode) -> io::Result<Option<Lock>> {
        loop {
            let file = open(path)?;
            let r = match mode {
                Mode::Shared => file.try_lock_shared(),
                Mode::Exclusive => file.try_lock(),
            };
            match r {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(e),
            }
            if still_linked(&file, path)? {
                return Ok(Some(Lock {
                    _file: file,
                    path: path.to_path_buf(),
                }));
            }
        }
    }

    /// Unlinks the lock file while holding it exclusively. Anybody who opened the old
    /// file and then gets the lock notices the unlink and retries on a new file.
    pub(super) fn unlink(self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        // `self._file` is dropped (and the lock released) after the unlink.
    }
}

fn open(path: &Path) -> io::Result<File> {
    // Read-only is enough for flock and works on lock files another user created.
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path),
        r => r,
    }
}

fn still_linked(file: &File, path: &Path) -> io::Result<bool> {
    let held = file.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_conflict_within_one_process() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("l");
        let a = Lock::acquire(&p, Mode::Shared).unwrap();
        let b = Lock::try_acquire(&p, Mode::Shared).unwrap();
        assert!(b.is_some());
        assert!(Lock::try_acquire(&p, Mode::Exclusive).unwrap().is_none());
        drop(a);
        assert!(Lock::try_acquire(&p, Mode::Exclusive).unwrap().is_none());
        drop(b);
        let x = Lock::try_acquire(&p, Mode::Exclusive).unwrap().unwrap();
        x.unlink().unwrap();
        assert!(!p.exists());
        assert!(Lock::try_acquire(&p, Mode::Exclusive).unwrap().is_some());
    }
}

//! Applying an overlay upper dir (a run's change) onto a writable copy of its lower
//! tree: whiteouts remove, opaque directories replace, everything else is copied with
//! its metadata, file data shared by reflink where the filesystem can.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{ApplyUpperArgs, OpError, UpperApplied};

/// Apply an upper dir onto its target ([`ApplyUpperArgs`]) and print [`UpperApplied`].
pub(super) fn apply_upper(a: ApplyUpperArgs) -> Result<(), OpError> {
    let mut state = UpperApply {
        links: HashMap::new(),
        bytes: 0,
    };
    state.dir(&a.upper, &a.target, &a.exclude)?;
    super::print_json(&UpperApplied { bytes: state.bytes })
}

struct UpperApply {
    /// (dev, ino) of upper files already copied -> their target, for hard links.
    links: HashMap<(u64, u64), PathBuf>,
    bytes: u64,
}

impl UpperApply {
    /// Apply the entries of upper directory `src` into target directory `dst` (which is
    /// a real directory: the walk never follows a symlink in the target).
    fn dir(&mut self, src: &Path, dst: &Path, exclude: &[String]) -> io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            if exclude
                .iter()
                .any(|x| x.trim_matches('/') == name.to_string_lossy())
            {
                continue;
            }
            let from = src.join(&name);
            let to = dst.join(&name);
            let m = fs::symlink_metadata(&from)?;
            let ft = m.file_type();
            let existing = fs::symlink_metadata(&to).ok();
            if ft.is_char_device() && m.rdev() == 0 {
                // A whiteout: the lower entry is deleted.
                if let Some(e) = existing {
                    remove_any(&to, &e)?;
                }
                continue;
            }
            if ft.is_dir() {
                match &existing {
                    Some(e) if !e.is_dir() => {
                        remove_any(&to, e)?;
                        fs::create_dir(&to)?;
                    }
                    Some(_) if is_opaque(&from) => {
                        for child in fs::read_dir(&to)? {
                            let child = child?.path();
                            let cm = fs::symlink_metadata(&child)?;
                            remove_any(&child, &cm)?;
                        }
                    }
                    Some(_) => {}
                    None => fs::create_dir(&to)?,
                }
                self.dir(&from, &to, &[])?;
                copy_meta(&from, &to, &m)?;
                continue;
            }
            if let Some(e) = &existing {
                remove_any(&to, e)?;
            }
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
                copy_meta(&from, &to, &m)?;
            } else if ft.is_file() {
                let key = (m.dev(), m.ino());
                if m.nlink() > 1
                    && let Some(first) = self.links.get(&key)
                {
                    fs::hard_link(first, &to)?;
                    continue;
                }
                clone_or_copy(&from, &to)?;
                self.bytes += m.len();
                copy_meta(&from, &to, &m)?;
                if m.nlink() > 1 {
                    self.links.insert(key, to);
                }
            } else if ft.is_fifo() {
                nix::unistd::mkfifo(
                    &to,
                    nix::sys::stat::Mode::from_bits_truncate(m.mode() & 0o7777),
                )
                .map_err(io::Error::from)?;
                copy_meta(&from, &to, &m)?;
            }
            // Other device nodes cannot be created rootless; the layer tar keeps them.
        }
        Ok(())
    }
}

fn is_opaque(dir: &Path) -> bool {
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|k| matches!(xattr::get(dir, k), Ok(Some(v)) if v == b"y"))
}

fn remove_any(path: &Path, m: &fs::Metadata) -> io::Result<()> {
    if m.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Share the data of `from` with a new file `to` (FICLONE), or copy it.
fn clone_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::fd::AsFd;
    let src = fs::File::open(from)?;
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    if crate::sys::btrfs::ficlone(dst.as_fd(), src.as_fd()).is_ok() {
        return Ok(());
    }
    drop(dst);
    fs::remove_file(to)?;
    fs::copy(from, to).map(drop)
}

/// Owner, mode, user xattrs (never the overlay's own) and mtime of `from` onto `to`.
fn copy_meta(from: &Path, to: &Path, m: &fs::Metadata) -> io::Result<()> {
    std::os::unix::fs::lchown(to, Some(m.uid()), Some(m.gid()))?;
    if !m.file_type().is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        if let Ok(names) = xattr::list(from) {
            for name in names {
                let n = name.to_string_lossy();
                if n.starts_with("user.overlay.") || n.starts_with("trusted.overlay.") {
                    continue;
                }
                if let Ok(Some(v)) = xattr::get(from, &name) {
                    xattr::set(to, &name, &v)?;
                }
            }
        }
    }
    let times = [
        nix::sys::time::TimeSpec::new(m.atime(), m.atime_nsec()),
        nix::sys::time::TimeSpec::new(m.mtime(), m.mtime_nsec()),
    ];
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &times[0],
        &times[1],
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

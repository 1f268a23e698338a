//! Recursive tree copy for the `copy` backend (and for callers that apply an overlay
//! upper directory onto a chain): reflinks (FICLONE) when the filesystem supports them,
//! else an in-kernel copy (`copy_file_range` via `std::io::copy`).
//!
//! Preserves: file types (directories, regular files, symlinks, FIFOs, device nodes when
//! permitted), modes including setuid/setgid/sticky, ownership when permitted (root, or
//! ids equal to the caller's), hard links within the tree, extended attributes (those
//! the caller may set: `user.*` always, `trusted.*`/`security.*` as root), and access and
//! modification times (nanoseconds). Never follows a symlink in the source. Sockets are
//! skipped. What could not be preserved is counted in [`CopyStats`], not an error.
//!
//! Not O(1): it visits every inode of the source. The btrfs backend snapshots instead.

use std::collections::HashMap;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;

use crate::sys::btrfs as ioctl;

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub specials: u64,
    /// Bytes of regular file content (each inode once).
    pub bytes: u64,
    /// Regular files whose content was shared by reflink rather than copied.
    pub reflinked: u64,
    /// Entries whose owner could not be set (not permitted).
    pub ownership_skipped: u64,
    /// Extended attributes that could not be set (not permitted or not supported).
    pub xattrs_skipped: u64,
    /// Sockets, and device nodes that could not be created (not permitted).
    pub specials_skipped: u64,
}

/// Whether reflinks are tried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reflink {
    /// Try FICLONE, fall back to copying if the filesystem does not support it.
    #[default]
    Auto,
    /// Always copy bytes.
    Never,
}

/// Copies the tree at `src` (a directory, not followed if a symlink) to `dst`, which
/// must not exist. See the module docs for what is preserved.
pub fn copy_tree(src: &Path, dst: &Path, reflink: Reflink) -> io::Result<CopyStats> {
    let mut c = Copier {
        stats: CopyStats::default(),
        links: HashMap::new(),
        reflink: match reflink {
            Reflink::Auto => RL_UNKNOWN,
            Reflink::Never => RL_NO,
        },
        euid: nix::unistd::geteuid().as_raw(),
        egid: nix::unistd::getegid().as_raw(),
    };
    let top = fs::symlink_metadata(src)?;
    if !top.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", src.display()),
        ));
    }
    // Directories are created writable for us and given their real mode, owner, xattrs
    // and times after their contents (post-order), in reverse order of creation.
    let mut finish: Vec<(PathBuf, PathBuf, fs::Metadata)> = Vec::new();
    let mut stack: Vec<(PathBuf, PathBuf, fs::Metadata)> = vec![(src.into(), dst.into(), top)];
    while let Some((s, d, meta)) = stack.pop() {
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::DirBuilder::new().mode(0o700).create(&d)?;
            c.stats.dirs += 1;
            for entry in fs::read_dir(&s)? {
                let entry = entry?;
                let m = entry.metadata()?; // lstat: DirEntry::metadata does not follow
                stack.push((entry.path(), d.join(entry.file_name()), m));
            }
            finish.push((s, d, meta));
        } else if ft.is_file() {
            c.file(&s, &d, &meta)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&s)?;
            std::os::unix::fs::symlink(&target, &d)?;
            c.stats.symlinks += 1;
            c.attrs(&s, &d, &meta, false)?;
        } else if ft.is_fifo() {
            nix::unistd::mkfifo(&d, Mode::from_bits_truncate(0o600))?;
            c.stats.specials += 1;
            c.attrs(&s, &d, &meta, true)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            match nix::sys::stat::mknod(&d, kind, Mode::from_bits_truncate(0o600), meta.rdev()) {
                Ok(()) => {
                    c.stats.specials += 1;
                    c.attrs(&s, &d, &meta, true)?;
                }
                Err(nix::errno::Errno::EPERM) | Err(nix::errno::Errno::EACCES) => {
                    c.stats.specials_skipped += 1;
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            c.stats.specials_skipped += 1; // sockets
        }
    }
    for (s, d, meta) in finish.iter().rev() {
        c.attrs(s, d, meta, true)?;
    }
    Ok(c.stats)
}

const RL_UNKNOWN: u8 = 0;
const RL_YES: u8 = 1;
const RL_NO: u8 = 2;

/// State of one copy; reflink support is probed on the first regular file.
struct Copier {
    stats: CopyStats,
    links: HashMap<(u64, u64), PathBuf>,
    reflink: u8,
    euid: u32,
    egid: u32,
}

impl Copier {
    fn file(&mut self, s: &Path, d: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let key = (meta.dev(), meta.ino());
        if meta.nlink() > 1 {
            if let Some(first) = self.links.get(&key) {
                fs::hard_link(first, d)?;
                self.stats.hardlinks += 1;
                return Ok(());
            }
            self.links.insert(key, d.to_path_buf());
        }
        let src = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(s)?;
        let mut dstf = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(d)?;
        if self.clone_into(&dstf, &src)? {
            self.stats.reflinked += 1;
        } else {
            let mut srcr = &src;
            io::copy(&mut srcr, &mut dstf)?;
        }
        self.stats.files += 1;
        self.stats.bytes += meta.len();
        self.owner(d, meta, Some(&dstf))?;
        dstf.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        self.xattrs(s, d)?;
        dstf.set_times(
            FileTimes::new()
                .set_accessed(time(meta.atime(), meta.atime_nsec()))
                .set_modified(time(meta.mtime(), meta.mtime_nsec())),
        )?;
        Ok(())
    }

    /// Tries FICLONE; `Ok(false)` when the filesystem cannot (then stops trying).
    fn clone_into(&mut self, dst: &File, src: &File) -> io::Result<bool> {
        if self.reflink == RL_NO {
            return Ok(false);
        }
        match ioctl::ficlone(dst.as_fd(), src.as_fd()) {
            Ok(()) => {
                self.reflink = RL_YES;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP)
                        | Some(libc::ENOTTY)
                        | Some(libc::EXDEV)
                        | Some(libc::EINVAL)
                        | Some(libc::ENOSYS)
                        | Some(libc::EPERM)
                ) =>
            {
                // EINVAL also comes for special files (e.g. in /proc) and some
                // block-size constraints: copy this file; stop trying only if reflinks
                // never worked in this copy.
                if self.reflink == RL_UNKNOWN {
                    self.reflink = RL_NO;
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn owner(&mut self, d: &Path, meta: &fs::Metadata, file: Option<&File>) -> io::Result<()> {
        if meta.uid() == self.euid && meta.gid() == self.egid {
            return Ok(());
        }
        let r = match file {
            Some(f) => std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid())),
            None => std::os::unix::fs::lchown(d, Some(meta.uid()), Some(meta.gid())),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => {
                // EINVAL: the id is not mapped in our user namespace.
                self.stats.ownership_skipped += 1;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn xattrs(&mut self, s: &Path, d: &Path) -> io::Result<()> {
        let names = match xattr::list(s) {
            Ok(n) => n,
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        for name in names {
            let Some(value) = (match xattr::get(s, &name) {
                Ok(v) => v,
                Err(e) if unsupported(&e) || not_permitted(&e) => {
                    self.stats.xattrs_skipped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }) else {
                continue;
            };
            match xattr::set(d, &name, &value) {
                Ok(()) => {}
                Err(e) if unsupported(&e) || not_permitted(&e) => self.stats.xattrs_skipped += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Owner, mode (unless a symlink), xattrs and times of a non-regular entry.
    fn attrs(&mut self, s: &Path, d: &Path, meta: &fs::Metadata, chmod: bool) -> io::Result<()> {
        self.owner(d, meta, None)?;
        if chmod && !meta.file_type().is_symlink() {
            fs::set_permissions(d, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        self.xattrs(s, d)?;
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            d,
            &TimeSpec::new(meta.atime(), meta.atime_nsec()),
            &TimeSpec::new(meta.mtime(), meta.mtime_nsec()),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }
}

fn time(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENODATA)
    )
}

fn not_permitted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// The apparent size of a tree: the sizes of its regular files and symlinks, each inode
/// counted once (hard links), without following symlinks. Unreadable directories are an
/// error. Visits every inode: O(tree).
pub fn tree_size(root: &Path) -> io::Result<u64> {
    let mut seen: HashMap<(u64, u64), ()> = HashMap::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() || ft.is_symlink() {
                if m.nlink() > 1 && seen.insert((m.dev(), m.ino()), ()).is_some() {
                    continue;
                }
                total += m.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn copies_types_modes_links_times_and_xattrs() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        fs::create_dir_all(s.join("a/b")).unwrap();
        fs::write(s.join("a/file"), b"hello").unwrap();
        fs::set_permissions(s.join("a/file"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(s.join("a/file"), s.join("a/b/link")).unwrap();
        symlink("../file", s.join("a/b/sym")).unwrap();
        symlink("/etc/passwd", s.join("abs")).unwrap();
        nix::unistd::mkfifo(&s.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        fs::set_permissions(s.join("a/b"), fs::Permissions::from_mode(0o555)).unwrap();
        let xattr_ok = xattr::set(s.join("a/file"), "user.farm", b"v").is_ok();
        let old = SystemTime::UNIX_EPOCH + Duration::new(1_000_000, 123_456_789);
        File::open(s.join("a/file"))
            .unwrap()
            .set_times(FileTimes::new().set_modified(old))
            .unwrap();

        let d = t.path().join("dst");
        let st = copy_tree(&s, &d, Reflink::Auto).unwrap();
        assert_eq!(st.files, 1);
        assert_eq!(st.hardlinks, 1);
        assert_eq!(st.symlinks, 2);
        assert_eq!(st.specials, 1);
        assert_eq!(fs::read(d.join("a/file")).unwrap(), b"hello");
        let m = fs::symlink_metadata(d.join("a/file")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(m.modified().unwrap(), old);
        assert_eq!(m.nlink(), 2);
        assert_eq!(
            m.ino(),
            fs::symlink_metadata(d.join("a/b/link")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(d.join("a/b/sym")).unwrap(),
            PathBuf::from("../file")
        );
        assert_eq!(
            fs::read_link(d.join("abs")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
        assert!(
            fs::symlink_metadata(d.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert_eq!(
            fs::symlink_metadata(d.join("fifo")).unwrap().mode() & 0o777,
            0o640
        );
        assert_eq!(
            fs::symlink_metadata(d.join("a/b")).unwrap().mode() & 0o777,
            0o555
        );
        if xattr_ok {
            assert_eq!(
                xattr::get(d.join("a/file"), "user.farm").unwrap().unwrap(),
                b"v"
            );
        }
        assert_eq!(
            tree_size(&d).unwrap(),
            5 + "../file".len() as u64 + "/etc/passwd".len() as u64
        );
        // make it removable
        fs::set_permissions(s.join("a/b"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.join("a/b"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn refuses_existing_destination() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("s")).unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        let e = copy_tree(&t.path().join("s"), &t.path().join("d"), Reflink::Auto).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }
}

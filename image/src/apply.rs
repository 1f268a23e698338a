//! Applying (extracting) layer tars into a directory, safely, with OCI whiteouts.
//!
//! Why hand-written `*at` code rather than `cap-std`: cap-std refuses to follow any
//! symlink that leads out of its root, which is right for a sandboxed program but wrong
//! for a container root filesystem, whose absolute symlinks (`/var/run -> /run`) are
//! meant to be read relative to that root. Here every path is resolved one component
//! at a time from a directory file descriptor with `O_NOFOLLOW`; a symlink met on the
//! way is read and resolved as if the target directory were `/` (like
//! `openat2(RESOLVE_IN_ROOT)` or a chroot), and `..` never climbs above the root. Final
//! components are never followed: files are created with `O_CREAT|O_EXCL|O_NOFOLLOW`
//! after removing whatever was there, and metadata is set through the new file's own
//! descriptor or with `AT_SYMLINK_NOFOLLOW`. All system calls go through `rustix`'s
//! safe API; this crate has no `unsafe`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;
use tracing::{debug, warn};

use crate::compress::decompress;
use crate::digest::{Digest, HashingReader};
use crate::error::{Error, IoContext, Result};
use crate::tarwrite::{OPAQUE_MARKER, WHITEOUT_PREFIX, xattr_in_layer};

const MAX_SYMLINKS: u32 = 40;
const COPY_BUF: usize = 256 * 1024;

/// The default of [`ApplyOptions::max_bytes`]: 64 GiB.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;
/// The default of [`ApplyOptions::max_entries`]: one million.
pub const DEFAULT_MAX_LAYER_ENTRIES: u64 = 1_000_000;

/// How [`apply_layer`] treats a layer.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// The most bytes one layer may extract: the uncompressed tar stream, and separately
    /// the files' contents at their logical sizes (a sparse file counts its holes), so a
    /// small compressed layer cannot expand without bound. Default
    /// [`DEFAULT_MAX_LAYER_BYTES`].
    pub max_bytes: u64,
    /// The most entries (files, directories, links, whiteouts) one layer may hold.
    /// Default [`DEFAULT_MAX_LAYER_ENTRIES`].
    pub max_entries: u64,
    /// How a user raises the limits, for the error (the worker names its flags).
    pub limits_hint: &'static str,
    /// Interpret OCI whiteouts (`.wh.NAME` deletes NAME from lower content,
    /// `.wh..wh..opq` hides all lower content of its directory). Default true.
    pub whiteouts: bool,
    /// Create device nodes; when false (default) they are skipped with a warning.
    pub allow_devices: bool,
    /// Skip failed ownership changes (tests running as a normal user); when false
    /// (default) a failed chown is an error.
    pub ignore_chown_errors: bool,
    /// Skip xattrs that cannot be set (file system without xattr support); when false
    /// (default) it is an error.
    pub ignore_xattr_errors: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            whiteouts: true,
            allow_devices: false,
            ignore_chown_errors: false,
            ignore_xattr_errors: false,
            max_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_entries: DEFAULT_MAX_LAYER_ENTRIES,
            limits_hint: "raise ApplyOptions::max_bytes / max_entries",
        }
    }
}

/// Fails reads once more than `max` bytes have passed, remembering that it did.
struct LimitReader<R> {
    inner: R,
    read: u64,
    max: u64,
    exceeded: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            self.exceeded
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(io::Error::other("the layer tar is over its size limit"));
        }
        Ok(n)
    }
}

/// What [`apply_layer`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries written (files, directories, links, nodes).
    pub entries: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Opaque markers applied.
    pub opaque_dirs: u64,
    /// Entries skipped (devices when not allowed, unknown types).
    pub skipped: u64,
    /// sha256 of the uncompressed tar (the layer's diff_id).
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
}

/// Apply a layer (plain tar, gzip or zstd, detected from the first bytes) on top of the
/// directory `target`, which holds the layers below it (or is empty for a base).
///
/// Safety: nothing is written outside `target`. Entries containing `..` are refused;
/// absolute paths are taken relative to `target`; symlinks in the tree are resolved
/// as if `target` were `/`; hard links must point at something inside `target`.
/// Refused entries stop the extraction with [`Error::UnsafeEntry`]; what was already
/// written stays (extract into a scratch copy you can discard).
///
/// Ownership, modes (including setuid/setgid/sticky), mtimes and `user.*` /
/// `security.capability` xattrs are set from the tar; directory modes and mtimes are
/// set at the end so that read-only directories can be filled first. The returned
/// [`ApplyStats::diff_id`] lets the caller check the layer against the image config.
pub fn apply_layer<R: Read + Send>(
    input: R,
    target: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyStats> {
    let root = rustix::fs::open(
        target,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("opening target directory {}", target.display()))?;
    let exceeded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let over = |e: Error| -> Error {
        if exceeded.load(std::sync::atomic::Ordering::Relaxed) {
            Error::LimitExceeded {
                what: "uncompressed size",
                limit: opts.max_bytes,
                hint: opts.limits_hint,
            }
        } else {
            e
        }
    };
    let reader = HashingReader::new(LimitReader {
        inner: decompress(input)?,
        read: 0,
        // The tar's end-of-archive blocks and padding come on top of its content.
        max: opts.max_bytes.saturating_add(1 << 20),
        exceeded: exceeded.clone(),
    });
    let mut archive = tar::Archive::new(reader);
    let mut ap = Applier {
        root,
        opts,
        cache: None,
        created: HashSet::new(),
        dirs: Vec::new(),
        buf: vec![0u8; COPY_BUF],
        entries: 0,
        whiteouts: 0,
        opaque_dirs: 0,
        skipped: 0,
        seen: 0,
        content: 0,
    };
    {
        let entries = archive
            .entries()
            .ctx(|| "reading layer tar".into())
            .map_err(over)?;
        for entry in entries {
            let mut entry = entry.ctx(|| "reading layer tar".into()).map_err(over)?;
            ap.entry(&mut entry).map_err(over)?;
        }
    }
    ap.finish_dirs()?;
    let (_, diff_id, tar_size) = archive
        .into_inner()
        .drain_and_finish()
        .ctx(|| "reading the end of the layer".into())
        .map_err(over)?;
    Ok(ApplyStats {
        entries: ap.entries,
        whiteouts: ap.whiteouts,
        opaque_dirs: ap.opaque_dirs,
        skipped: ap.skipped,
        diff_id,
        tar_size,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Normalise an archive path: drop leading `/`, empty and `.` components; refuse `..`.
fn normalize(raw: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path contains '..'"),
            c => {
                if c.contains(&0) {
                    return Err("path contains a NUL byte");
                }
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        v.extend_from_slice(parent);
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

fn file_type_at(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// List a directory's entries (without `.` and `..`).
fn list_dir(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<Vec<u8>>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = rustix::fs::Dir::read_from(&fd)?;
    let mut names = Vec::new();
    while let Some(entry) = d.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Remove `name` in `dir` recursively, never following symlinks. Missing is fine.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let sub = match rustix::fs::openat(
        dir,
        os(name),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    for child in list_dir(sub.as_fd())? {
        remove_all(sub.as_fd(), &child)?;
    }
    match rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

struct Applier<'o> {
    root: OwnedFd,
    opts: &'o ApplyOptions,
    /// The last parent directory resolved, by its archive path. Operations only ever
    /// change children of the directory they resolved, so this stays valid until a
    /// different parent is needed.
    cache: Option<(Vec<u8>, OwnedFd)>,
    /// Paths written by this layer, and their ancestors: a whiteout or opaque marker
    /// only hides lower content, never what the same layer wrote.
    created: HashSet<Vec<u8>>,
    /// Directories whose mode and mtime are set at the end.
    dirs: Vec<(Vec<u8>, u32, u64)>,
    buf: Vec<u8>,
    entries: u64,
    whiteouts: u64,
    opaque_dirs: u64,
    skipped: u64,
    /// Entries met (of every kind), against [`ApplyOptions::max_entries`].
    seen: u64,
    /// File content at logical sizes, against [`ApplyOptions::max_bytes`].
    content: u64,
}

impl Applier<'_> {
    fn dup_root(&self) -> rustix::io::Result<OwnedFd> {
        rustix::fs::openat(
            &self.root,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// Re-open a directory by a path known to consist of real directories.
    fn reopen(&self, real: &[Vec<u8>]) -> rustix::io::Result<OwnedFd> {
        let mut cur = self.dup_root()?;
        for c in real {
            cur = rustix::fs::openat(
                &cur,
                os(c),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
        }
        Ok(cur)
    }

    /// Open the directory at archive path `rel` beneath the root, resolving symlinks as
    /// if the root were `/`; create missing directories when `create`.
    fn open_dir(&self, rel: &[u8], create: bool) -> rustix::io::Result<OwnedFd> {
        let mut pending: Vec<Vec<u8>> = rel
            .split(|&b| b == b'/')
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut real: Vec<Vec<u8>> = Vec::new();
        let mut cur = self.dup_root()?;
        let mut links = 0;
        while let Some(c) = pending.pop() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if real.pop().is_some() {
                    cur = self.reopen(&real)?;
                }
                continue;
            }
            match rustix::fs::openat(
                &cur,
                os(&c),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => {
                    cur = fd;
                    real.push(c);
                }
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&cur, os(&c), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    pending.push(c);
                }
                Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    if file_type_at(cur.as_fd(), &c)? != Some(FileType::Symlink) {
                        return Err(Errno::NOTDIR);
                    }
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno::LOOP);
                    }
                    let target = rustix::fs::readlinkat(&cur, os(&c), Vec::new())?;
                    let target = target.as_bytes();
                    if target.starts_with(b"/") {
                        real.clear();
                        cur = self.dup_root()?;
                    }
                    pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(cur)
    }

    /// The (cached) parent directory for an entry, created if missing.
    fn parent(&mut self, rel: &[u8], shown: &str) -> Result<OwnedFd> {
        if let Some((key, _)) = &self.cache
            && key.as_slice() == rel
            && let Some((_, fd)) = self.cache.take()
        {
            return Ok(fd);
        }
        self.cache = None;
        self.open_dir(rel, true)
            .ctx(|| format!("resolving parent directory of {shown}"))
    }

    fn keep_parent(&mut self, rel: &[u8], fd: OwnedFd) {
        self.cache = Some((rel.to_vec(), fd));
    }

    /// Remove whatever is at `name` (recursively for a directory) unless it is a
    /// directory and `keep_dir`. Returns whether a directory was kept.
    fn clear(
        &self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        keep_dir: bool,
    ) -> rustix::io::Result<bool> {
        match file_type_at(parent, name)? {
            None => Ok(false),
            Some(FileType::Directory) if keep_dir => Ok(true),
            Some(FileType::Directory) => {
                remove_all(parent, name)?;
                Ok(false)
            }
            Some(_) => {
                rustix::fs::unlinkat(parent, os(name), AtFlags::empty())?;
                Ok(false)
            }
        }
    }

    fn mark_created(&mut self, rel: &[u8]) {
        let mut p = rel;
        loop {
            if !self.created.insert(p.to_vec()) {
                break;
            }
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p = &p[..i],
                None => break,
            }
        }
    }

    /// Count an entry against the limits before anything of it is written: its logical
    /// size (for a sparse file, the size with its holes) is known from its header.
    fn admit<R: Read>(&mut self, e: &tar::Entry<'_, R>) -> Result<()> {
        self.seen += 1;
        if self.seen > self.opts.max_entries {
            return Err(Error::LimitExceeded {
                what: "number of entries",
                limit: self.opts.max_entries,
                hint: self.opts.limits_hint,
            });
        }
        self.content = self.content.saturating_add(e.size());
        if self.content > self.opts.max_bytes {
            return Err(Error::LimitExceeded {
                what: "size of its files' contents (sparse files at their full size)",
                limit: self.opts.max_bytes,
                hint: self.opts.limits_hint,
            });
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<()> {
        self.admit(e)?;
        let raw = e.path_bytes().into_owned();
        let shown = lossy(&raw);
        let rel = normalize(&raw).map_err(|reason| Error::UnsafeEntry {
            path: shown.clone(),
            reason: reason.into(),
        })?;
        let kind = e.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        if rel.is_empty() {
            debug!(path = %shown, "skipping the root directory entry");
            return Ok(());
        }
        let (parent_rel, name) = split_last(&rel);
        let (parent_rel, name) = (parent_rel.to_vec(), name.to_vec());
        if self.opts.whiteouts
            && let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX)
        {
            return self.whiteout(&parent_rel, &name, hidden, &shown);
        }

        let h = e.header();
        let old = h.as_old();
        let mode = numeric(h.mode().map(u64::from), &old.mode).ctx(|| format!("mode of {shown}"))?
            as u32
            & 0o7777;
        let uid = numeric(h.uid(), &old.uid).ctx(|| format!("uid of {shown}"))?;
        let gid = numeric(h.gid(), &old.gid).ctx(|| format!("gid of {shown}"))?;
        let mtime = numeric(h.mtime(), &old.mtime).ctx(|| format!("mtime of {shown}"))?;
        let major = h.device_major().ok().flatten().unwrap_or(0);
        let minor = h.device_minor().ok().flatten().unwrap_or(0);
        if uid >= u64::from(u32::MAX) || gid >= u64::from(u32::MAX) {
            return Err(Error::UnsafeEntry {
                path: shown,
                reason: format!("owner {uid}:{gid} out of range"),
            });
        }
        let xattrs = self.pax_xattrs(e, &shown)?;
        let is_dir = kind.is_dir() || (kind == EntryType::Regular && raw.ends_with(b"/"));

        match kind {
            _ if is_dir => {
                let parent = self.parent(&parent_rel, &shown)?;
                let kept = self
                    .clear(parent.as_fd(), &name, true)
                    .ctx(|| format!("replacing {shown}"))?;
                if !kept {
                    rustix::fs::mkdirat(&parent, os(&name), Mode::from_raw_mode(0o700))
                        .ctx(|| format!("creating directory {shown}"))?;
                }
                let fd = rustix::fs::openat(
                    &parent,
                    os(&name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ctx(|| format!("opening directory {shown}"))?;
                self.chown_fd(fd.as_fd(), uid, gid, &shown)?;
                self.set_xattrs(fd.as_fd(), &xattrs, &shown)?;
                self.dirs.push((rel.clone(), mode, mtime));
                self.keep_parent(&parent_rel, parent);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let parent = self.parent(&parent_rel, &shown)?;
                self.clear(parent.as_fd(), &name, false)
                    .ctx(|| format!("replacing {shown}"))?;
                let fd = rustix::fs::openat(
                    &parent,
                    os(&name),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .ctx(|| format!("creating {shown}"))?;
                let mut file = File::from(fd);
                let mut written: u64 = 0;
                loop {
                    let n = match e.read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => {
                            return Err(Error::Io {
                                context: format!("reading {shown} from the layer"),
                                source,
                            });
                        }
                    };
                    written += n as u64;
                    if self.buf[..n].iter().all(|&b| b == 0) {
                        // Zeros (a sparse file's holes, or a file of zeros) stay holes:
                        // a small layer cannot fill the disk with them.
                        file.seek(io::SeekFrom::Current(n as i64))
                            .ctx(|| format!("writing {shown}"))?;
                    } else {
                        file.write_all(&self.buf[..n])
                            .ctx(|| format!("writing {shown}"))?;
                    }
                }
                // A hole at the end has no write to give the file its length.
                file.set_len(written).ctx(|| format!("writing {shown}"))?;
                self.chown_fd(file.as_fd(), uid, gid, &shown)?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
                    .ctx(|| format!("chmod {shown}"))?;
                self.set_xattrs(file.as_fd(), &xattrs, &shown)?;
                rustix::fs::futimens(&file, &times(mtime))
                    .ctx(|| format!("setting mtime of {shown}"))?;
                self.keep_parent(&parent_rel, parent);
            }
            EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| Error::UnsafeEntry {
                        path: shown.clone(),
                        reason: "symlink without a target".into(),
                    })?
                    .into_owned();
                let parent = self.parent(&parent_rel, &shown)?;
                self.clear(parent.as_fd(), &name, false)
                    .ctx(|| format!("replacing {shown}"))?;
                rustix::fs::symlinkat(os(&target), &parent, os(&name))
                    .ctx(|| format!("creating symlink {shown}"))?;
                self.chown_at(parent.as_fd(), &name, uid, gid, &shown)?;
                rustix::fs::utimensat(&parent, os(&name), &times(mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .ctx(|| format!("setting mtime of {shown}"))?;
                self.keep_parent(&parent_rel, parent);
            }
            EntryType::Link => {
                let raw_target = e
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                let target = normalize(&raw_target).map_err(|reason| Error::UnsafeEntry {
                    path: shown.clone(),
                    reason: format!("hard link target: {reason}"),
                })?;
                if target.is_empty() {
                    return Err(Error::UnsafeEntry {
                        path: shown,
                        reason: "hard link without a target".into(),
                    });
                }
                if target == rel {
                    return Ok(());
                }
                let (tp, tn) = split_last(&target);
                let missing = || Error::UnsafeEntry {
                    path: shown.clone(),
                    reason: format!(
                        "hard link target {:?} is not in the layer or below",
                        lossy(&target)
                    ),
                };
                let tparent = self.open_dir(tp, false).map_err(|_| missing())?;
                match file_type_at(tparent.as_fd(), tn) {
                    Ok(Some(FileType::Directory)) => {
                        return Err(Error::UnsafeEntry {
                            path: shown,
                            reason: "hard link to a directory".into(),
                        });
                    }
                    Ok(Some(_)) => {}
                    _ => return Err(missing()),
                }
                let parent = self.parent(&parent_rel, &shown)?;
                self.clear(parent.as_fd(), &name, false)
                    .ctx(|| format!("replacing {shown}"))?;
                rustix::fs::linkat(&tparent, os(tn), &parent, os(&name), AtFlags::empty())
                    .ctx(|| format!("creating hard link {shown}"))?;
                self.keep_parent(&parent_rel, parent);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ft = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = if kind == EntryType::Fifo {
                    0
                } else {
                    if !self.opts.allow_devices {
                        warn!(path = %shown, "skipping device node (devices not allowed)");
                        self.skipped += 1;
                        return Ok(());
                    }
                    rustix::fs::makedev(major, minor)
                };
                let parent = self.parent(&parent_rel, &shown)?;
                self.clear(parent.as_fd(), &name, false)
                    .ctx(|| format!("replacing {shown}"))?;
                rustix::fs::mknodat(
                    &parent,
                    os(&name),
                    ft,
                    Mode::from_raw_mode(mode & 0o777),
                    dev,
                )
                .ctx(|| format!("creating node {shown}"))?;
                self.chown_at(parent.as_fd(), &name, uid, gid, &shown)?;
                rustix::fs::chmodat(
                    &parent,
                    os(&name),
                    Mode::from_raw_mode(mode),
                    AtFlags::empty(),
                )
                .ctx(|| format!("chmod {shown}"))?;
                rustix::fs::utimensat(&parent, os(&name), &times(mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .ctx(|| format!("setting mtime of {shown}"))?;
                self.keep_parent(&parent_rel, parent);
            }
            other => {
                warn!(path = %shown, kind = ?other, "skipping tar entry of unsupported type");
                self.skipped += 1;
                return Ok(());
            }
        }
        self.mark_created(&rel);
        self.entries += 1;
        Ok(())
    }

    fn whiteout(
        &mut self,
        parent_rel: &[u8],
        name: &[u8],
        hidden: &[u8],
        shown: &str,
    ) -> Result<()> {
        if name == OPAQUE_MARKER {
            let dir = self
                .open_dir(parent_rel, true)
                .ctx(|| format!("resolving opaque directory of {shown}"))?;
            self.remove_lower(dir.as_fd(), parent_rel)
                .ctx(|| format!("applying opaque marker {shown}"))?;
            self.mark_created(parent_rel);
            self.opaque_dirs += 1;
            return Ok(());
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            warn!(path = %shown, "skipping unknown whiteout meta-file");
            self.skipped += 1;
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Error::UnsafeEntry {
                path: shown.to_string(),
                reason: "whiteout of an invalid name".into(),
            });
        }
        let target = join(parent_rel, hidden);
        if self.created.contains(&target) {
            debug!(path = %shown, "whiteout of a path written by the same layer: ignored");
            return Ok(());
        }
        let parent = match self.open_dir(parent_rel, false) {
            Ok(fd) => fd,
            // Nothing below to hide.
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => {
                self.whiteouts += 1;
                return Ok(());
            }
            Err(source) => {
                return Err(Error::Io {
                    context: format!("resolving parent of whiteout {shown}"),
                    source: source.into(),
                });
            }
        };
        remove_all(parent.as_fd(), hidden).ctx(|| format!("applying whiteout {shown}"))?;
        self.whiteouts += 1;
        Ok(())
    }

    /// Remove everything in `dir` that this layer did not write.
    fn remove_lower(&self, dir: BorrowedFd<'_>, rel: &[u8]) -> rustix::io::Result<()> {
        for child in list_dir(dir)? {
            let child_rel = join(rel, &child);
            if !self.created.contains(&child_rel) {
                remove_all(dir, &child)?;
            } else if file_type_at(dir, &child)? == Some(FileType::Directory) {
                let sub = rustix::fs::openat(
                    dir,
                    os(&child),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                self.remove_lower(sub.as_fd(), &child_rel)?;
            }
        }
        Ok(())
    }

    fn pax_xattrs<R: Read>(
        &self,
        e: &mut tar::Entry<'_, R>,
        shown: &str,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let Some(exts) = e
            .pax_extensions()
            .ctx(|| format!("PAX records of {shown}"))?
        else {
            return Ok(out);
        };
        for ext in exts {
            let ext = ext.ctx(|| format!("PAX records of {shown}"))?;
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if xattr_in_layer(name) {
                out.push((name.to_vec(), ext.value_bytes().to_vec()));
            } else if name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.") {
                warn!(path = %shown, xattr = %lossy(name), "refusing overlay xattr from a layer");
            } else {
                debug!(path = %shown, xattr = %lossy(name), "skipping xattr");
            }
        }
        Ok(out)
    }

    fn set_xattrs(
        &self,
        fd: BorrowedFd<'_>,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        shown: &str,
    ) -> Result<()> {
        for (name, value) in xattrs {
            if let Err(e) = rustix::fs::fsetxattr(fd, os(name), value, XattrFlags::empty()) {
                if self.opts.ignore_xattr_errors {
                    warn!(path = %shown, xattr = %lossy(name), error = %e, "could not set xattr");
                } else {
                    return Err(Error::Io {
                        context: format!("setting xattr {} on {shown}", lossy(name)),
                        source: e.into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn chown_result(
        &self,
        r: rustix::io::Result<()>,
        uid: u64,
        gid: u64,
        shown: &str,
    ) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if self.opts.ignore_chown_errors => {
                debug!(path = %shown, uid, gid, error = %e, "chown failed (ignored)");
                Ok(())
            }
            Err(e) => Err(Error::Chown {
                path: shown.to_string(),
                uid,
                gid,
                source: e.into(),
            }),
        }
    }

    fn chown_fd(&self, fd: BorrowedFd<'_>, uid: u64, gid: u64, shown: &str) -> Result<()> {
        let r = rustix::fs::fchown(fd, Some(ids(uid, gid).0), Some(ids(uid, gid).1));
        self.chown_result(r, uid, gid, shown)
    }

    fn chown_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        uid: u64,
        gid: u64,
        shown: &str,
    ) -> Result<()> {
        let (u, g) = ids(uid, gid);
        let r = rustix::fs::chownat(dir, os(name), Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW);
        self.chown_result(r, uid, gid, shown)
    }

    /// Set deferred directory modes and mtimes (deepest last-written first).
    fn finish_dirs(&mut self) -> Result<()> {
        self.cache = None;
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, mode, mtime) in dirs.iter().rev() {
            let shown = lossy(rel);
            let (p, n) = split_last(rel);
            let parent = match self.open_dir(p, false) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => continue,
                Err(source) => {
                    return Err(Error::Io {
                        context: format!("resolving {shown}"),
                        source: source.into(),
                    });
                }
            };
            let fd = match rustix::fs::openat(
                &parent,
                os(n),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                // Replaced or removed by a later entry of the same layer.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => continue,
                Err(source) => {
                    return Err(Error::Io {
                        context: format!("opening {shown}"),
                        source: source.into(),
                    });
                }
            };
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(*mode)).ctx(|| format!("chmod {shown}"))?;
            rustix::fs::futimens(&fd, &times(*mtime))
                .ctx(|| format!("setting mtime of {shown}"))?;
        }
        Ok(())
    }
}

/// A numeric header field; an empty one (all NULs or spaces) reads as 0, as Go's
/// archive/tar does.
fn numeric(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(e),
    }
}

fn ids(uid: u64, gid: u64) -> (rustix::fs::Uid, rustix::fs::Gid) {
    // Range-checked by the caller (below u32::MAX, so never the -1 "no change" value).
    (
        rustix::fs::Uid::from_raw(uid as u32),
        rustix::fs::Gid::from_raw(gid as u32),
    )
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

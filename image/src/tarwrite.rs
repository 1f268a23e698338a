//! Writing OCI layer tars from a directory (an overlay upper directory, or a whole tree).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use tar::{EntryType, Header};
use tracing::{debug, warn};

use crate::error::{Error, IoContext, Result};

/// OCI whiteout prefix.
pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// OCI opaque-directory marker name.
pub(crate) const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

const COPY_BUF: usize = 256 * 1024;

/// How [`write_layer_tar`] reads a directory.
#[derive(Clone, Debug, Default)]
pub struct LayerTarOptions {
    /// Interpret overlayfs upper-directory conventions: a 0:0 character device is a
    /// whiteout (`.wh.NAME`), a directory with `user.overlay.opaque=y` (or
    /// `trusted.overlay.opaque=y`) is opaque (`DIR/.wh..wh..opq`). When false the
    /// directory is written as it is (a scratch or tar base).
    pub overlay: bool,
    /// Layer paths that never reach the tar (`/stacker` or `stacker`); excluding a
    /// directory excludes everything under it, and whiteouts of it.
    pub exclude: Vec<String>,
    /// `SOURCE_DATE_EPOCH`: entries with a newer mtime get this one.
    pub source_date_epoch: Option<u64>,
}

impl LayerTarOptions {
    /// Options for an overlay upper directory (the change made by a build step).
    pub fn overlay_upper() -> Self {
        LayerTarOptions {
            overlay: true,
            ..Default::default()
        }
    }

    /// Options for a whole directory written as a layer, without overlay conventions.
    pub fn whole_dir() -> Self {
        LayerTarOptions::default()
    }

    /// Add a path to exclude.
    pub fn exclude(mut self, path: impl Into<String>) -> Self {
        self.exclude.push(path.into());
        self
    }

    /// Clamp mtimes to `epoch`.
    pub fn source_date_epoch(mut self, epoch: Option<u64>) -> Self {
        self.source_date_epoch = epoch;
        self
    }
}

/// What [`write_layer_tar`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TarStats {
    /// Tar entries written (not counting PAX extension headers).
    pub entries: u64,
    /// Whiteouts (`.wh.NAME`) written.
    pub whiteouts: u64,
    /// Opaque markers written.
    pub opaque_dirs: u64,
    /// Hard-link entries written.
    pub hardlinks: u64,
    /// Files skipped (sockets).
    pub skipped: u64,
    /// Bytes of regular-file content.
    pub content_bytes: u64,
}

/// Write the tree under `root` as an OCI layer tar to `out` and return `out`.
///
/// Deterministic: entries in byte order of names, depth first; numeric uid/gid only;
/// no user/group names, atime or ctime; PAX records sorted. Regular files, directories
/// (also empty ones), symlinks, hard links (second and later paths of an inode become
/// tar hard links to the first), FIFOs and device nodes are written; sockets are skipped.
/// `user.*` xattrs (never `user.overlay.*`) and `security.capability` become
/// `SCHILY.xattr.*` PAX records. The root directory itself is not an entry.
///
/// Writes are streamed; memory does not grow with file sizes. Usable standalone, e.g.
/// writing to stdout from a process inside a user namespace.
pub fn write_layer_tar<W: Write>(
    root: &Path,
    opts: &LayerTarOptions,
    out: W,
) -> Result<(W, TarStats)> {
    let md = fs::symlink_metadata(root).ctx(|| format!("stat {}", root.display()))?;
    if !md.is_dir() {
        return Err(Error::Io {
            context: format!("layer source {}", root.display()),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut w = Walker {
        opts,
        exclude: opts
            .exclude
            .iter()
            .map(|p| p.trim_matches('/').as_bytes().to_vec())
            .filter(|p| !p.is_empty())
            .collect(),
        builder: tar::Builder::new(out),
        links: HashMap::new(),
        stats: TarStats::default(),
        buf: vec![0u8; COPY_BUF],
    };
    let mut stack = vec![Frame::open(root.to_path_buf(), Vec::new())?];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            stack.pop();
            continue;
        };
        let rel = join(&top.rel, name.as_bytes());
        if w.excluded(&rel) {
            debug!(path = %String::from_utf8_lossy(&rel), "excluded from layer");
            continue;
        }
        let abs = top.abs.join(&name);
        let md = fs::symlink_metadata(&abs).ctx(|| format!("stat {}", abs.display()))?;
        if w.emit(&abs, &rel, &md)? {
            stack.push(Frame::open(abs, rel)?);
        }
    }
    let mut builder = w.builder;
    builder.finish().ctx(|| "finishing tar".into())?;
    let out = builder.into_inner().ctx(|| "finishing tar".into())?;
    Ok((out, w.stats))
}

struct Frame {
    abs: PathBuf,
    rel: Vec<u8>,
    names: std::vec::IntoIter<OsString>,
}

impl Frame {
    fn open(abs: PathBuf, rel: Vec<u8>) -> Result<Frame> {
        let mut names = fs::read_dir(&abs)
            .and_then(|rd| {
                rd.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .ctx(|| format!("reading directory {}", abs.display()))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(Frame {
            abs,
            rel,
            names: names.into_iter(),
        })
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

fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

/// Which xattrs travel in layers (and are applied from them).
pub(crate) fn xattr_in_layer(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name == b"security.capability"
}

struct Walker<'a, W: Write> {
    opts: &'a LayerTarOptions,
    exclude: Vec<Vec<u8>>,
    builder: tar::Builder<W>,
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: TarStats,
    buf: Vec<u8>,
}

struct Xattrs {
    /// Xattrs that go into the layer, sorted by name.
    keep: Vec<(Vec<u8>, Vec<u8>)>,
    opaque: bool,
    whiteout: bool,
}

impl<W: Write> Walker<'_, W> {
    fn excluded(&self, rel: &[u8]) -> bool {
        self.exclude
            .iter()
            .any(|ex| rel == &ex[..] || (rel.starts_with(ex) && rel.get(ex.len()) == Some(&b'/')))
    }

    fn mtime(&self, md: &Metadata) -> u64 {
        let t = md.mtime().max(0) as u64;
        match self.opts.source_date_epoch {
            Some(epoch) if t > epoch => epoch,
            _ => t,
        }
    }

    fn header(&self, md: &Metadata, kind: EntryType, size: u64) -> Header {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(u64::from(md.uid()));
        h.set_gid(u64::from(md.gid()));
        h.set_mtime(self.mtime(md));
        h.set_size(size);
        // Explicit zeros rather than empty fields: some readers reject empty numbers.
        let _ = h.set_device_major(0);
        let _ = h.set_device_minor(0);
        h
    }

    fn read_xattrs(&self, abs: &Path, is_dir: bool, is_file: bool) -> Result<Xattrs> {
        let mut x = Xattrs {
            keep: Vec::new(),
            opaque: false,
            whiteout: false,
        };
        let names = list_xattrs(abs).ctx(|| format!("listing xattrs of {}", abs.display()))?;
        for name in names {
            let overlay_key = name
                .strip_prefix(b"user.overlay.")
                .or_else(|| name.strip_prefix(b"trusted.overlay."));
            if let Some(key) = overlay_key {
                if !self.opts.overlay {
                    continue;
                }
                match key {
                    b"opaque" if is_dir => {
                        x.opaque = get_xattr(abs, &name)
                            .ctx(|| format!("reading xattr of {}", abs.display()))?
                            .is_some_and(|v| v == b"y");
                    }
                    b"whiteout" if is_file => x.whiteout = true,
                    b"redirect" | b"metacopy" => {
                        return Err(Error::UnsupportedOverlay {
                            path: abs.to_path_buf(),
                            reason: format!(
                                "overlay {} xattr (mount the overlay with redirect_dir=off \
                                 and metacopy=off)",
                                String::from_utf8_lossy(key)
                            ),
                        });
                    }
                    _ => {}
                }
                continue;
            }
            if !xattr_in_layer(&name) {
                continue;
            }
            if let Some(v) =
                get_xattr(abs, &name).ctx(|| format!("reading xattr of {}", abs.display()))?
            {
                x.keep.push((name, v));
            }
        }
        x.keep.sort();
        Ok(x)
    }

    /// Write one filesystem object; returns whether to descend into it.
    fn emit(&mut self, abs: &Path, rel: &[u8], md: &Metadata) -> Result<bool> {
        let ft = md.file_type();
        if self.opts.overlay && ft.is_char_device() && md.rdev() == 0 {
            self.whiteout(rel, md)?;
            return Ok(false);
        }
        let xattrs = if ft.is_symlink() {
            Xattrs {
                keep: Vec::new(),
                opaque: false,
                whiteout: false,
            }
        } else {
            self.read_xattrs(abs, ft.is_dir(), ft.is_file())?
        };
        if xattrs.whiteout {
            self.whiteout(rel, md)?;
            return Ok(false);
        }
        if ft.is_dir() {
            let h = self.header(md, EntryType::Directory, 0);
            let mut path = rel.to_vec();
            path.push(b'/');
            self.append(h, &path, None, &xattrs.keep, None)?;
            if xattrs.opaque {
                let mut h = self.header(md, EntryType::Regular, 0);
                h.set_mode(0o600);
                h.set_uid(0);
                h.set_gid(0);
                let marker = join(rel, OPAQUE_MARKER);
                self.append(h, &marker, None, &[], None)?;
                self.stats.opaque_dirs += 1;
            }
            return Ok(true);
        }
        if ft.is_file() {
            if md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = self.links.get(&key) {
                    let first = first.clone();
                    let h = self.header(md, EntryType::Link, 0);
                    self.append(h, rel, Some(&first), &[], None)?;
                    self.stats.hardlinks += 1;
                    return Ok(false);
                }
                self.links.insert(key, rel.to_vec());
            }
            let fd = rustix::fs::open(
                abs,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ctx(|| format!("opening {}", abs.display()))?;
            let mut file = File::from(fd);
            let size = md.len();
            let h = self.header(md, EntryType::Regular, size);
            self.append(h, rel, None, &xattrs.keep, Some((&mut file, size, abs)))?;
            self.stats.content_bytes += size;
            return Ok(false);
        }
        if ft.is_symlink() {
            let target = fs::read_link(abs).ctx(|| format!("readlink {}", abs.display()))?;
            let h = self.header(md, EntryType::Symlink, 0);
            self.append(h, rel, Some(target.as_os_str().as_bytes()), &[], None)?;
            return Ok(false);
        }
        if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            let mut h = self.header(md, kind, 0);
            let dev = md.rdev();
            h.set_device_major(rustix::fs::major(dev))
                .and_then(|()| h.set_device_minor(rustix::fs::minor(dev)))
                .ctx(|| format!("device numbers of {}", abs.display()))?;
            self.append(h, rel, None, &xattrs.keep, None)?;
            return Ok(false);
        }
        if ft.is_fifo() {
            let h = self.header(md, EntryType::Fifo, 0);
            self.append(h, rel, None, &xattrs.keep, None)?;
            return Ok(false);
        }
        warn!(path = %abs.display(), "skipping socket: tar cannot represent it");
        self.stats.skipped += 1;
        Ok(false)
    }

    fn whiteout(&mut self, rel: &[u8], md: &Metadata) -> Result<()> {
        let (parent, name) = split_last(rel);
        let mut wh = WHITEOUT_PREFIX.to_vec();
        wh.extend_from_slice(name);
        let path = join(parent, &wh);
        let mut h = self.header(md, EntryType::Regular, 0);
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        self.append(h, &path, None, &[], None)?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn append(
        &mut self,
        mut h: Header,
        path: &[u8],
        link: Option<&[u8]>,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        data: Option<(&mut File, u64, &Path)>,
    ) -> Result<()> {
        let lossy = || String::from_utf8_lossy(path).into_owned();
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if h.set_path(Path::new(OsStr::from_bytes(path))).is_err() {
            // Too long for ustar name+prefix: the PAX `path` record carries it, the
            // header keeps a truncated copy.
            pax.push((b"path".to_vec(), path.to_vec()));
            let name = &mut h.as_old_mut().name;
            let n = path.len().min(name.len());
            name[..n].copy_from_slice(&path[..n]);
        }
        if let Some(link) = link {
            let field_len = h.as_old().linkname.len();
            if link.len() > field_len || link.contains(&0) {
                pax.push((b"linkpath".to_vec(), link.to_vec()));
                h.set_link_name_literal(&link[..link.len().min(field_len)])
                    .ctx(|| format!("link name of {}", lossy()))?;
            } else {
                h.set_link_name_literal(link)
                    .ctx(|| format!("link name of {}", lossy()))?;
            }
        }
        for (k, v) in xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax.push((key, v.clone()));
        }
        if let Some((_, size, _)) = &data
            && *size >= 0o77777777777
        {
            pax.push((b"size".to_vec(), size.to_string().into_bytes()));
        }
        if !pax.is_empty() {
            pax.sort();
            write_pax(&mut self.builder, &pax).ctx(|| format!("writing tar entry {}", lossy()))?;
        }
        h.set_cksum();
        let out = self.builder.get_mut();
        out.write_all(h.as_bytes())
            .ctx(|| format!("writing tar entry {}", lossy()))?;
        if let Some((file, size, abs)) = data {
            let mut remaining = size;
            while remaining > 0 {
                let want = remaining.min(self.buf.len() as u64) as usize;
                let n = match file.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(Error::Io {
                            context: format!("reading {}", abs.display()),
                            source: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "file shrank while it was being captured",
                            ),
                        });
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(Error::Io {
                            context: format!("reading {}", abs.display()),
                            source,
                        });
                    }
                };
                out.write_all(&self.buf[..n])
                    .ctx(|| format!("writing tar entry {}", lossy()))?;
                remaining -= n as u64;
            }
            let pad = (512 - size % 512) % 512;
            out.write_all(&[0u8; 512][..pad as usize])
                .ctx(|| format!("writing tar entry {}", lossy()))?;
        }
        self.stats.entries += 1;
        Ok(())
    }
}

/// Write one PAX extended header (`x`) with the given records (already sorted).
fn write_pax<W: Write>(b: &mut tar::Builder<W>, records: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        let rest = 3 + key.len() + value.len(); // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(key);
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_path("PaxHeader")?;
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_device_major(0)?;
    h.set_device_minor(0)?;
    h.set_cksum();
    b.append(&h, &data[..])
}

/// List xattr names of `path` without following a final symlink.
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(e) if e == rustix::io::Errno::RANGE => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Read one xattr of `path` (not following a final symlink); `None` when absent.
pub(crate) fn get_xattr(path: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let name = OsStr::from_bytes(name);
    loop {
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::OPNOTSUPP => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(Some(buf));
        }
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e == rustix::io::Errno::RANGE => continue,
            Err(e) if e == rustix::io::Errno::NODATA => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

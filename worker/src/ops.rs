//! Work that must run as container root inside the build's user namespace, because it
//! reads or sets ownership in the container's id space: applying a layer to a chain,
//! writing a layer tar of a directory, staging an import with its mode and owner, and
//! removing trees that hold files of other container users.
//!
//! Each op is a [`NsFn`] run by the hidden entry point (`farm __farm-userns`); tar data
//! flows through stdin/stdout pipes, so the parent never holds a layer in memory.

use std::fs;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use farm_image::{ApplyOptions, LayerTarOptions, apply_layer, write_layer_tar};
use serde::{Deserialize, Serialize};

use crate::userns::NsFn;

type OpResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const APPLY_LAYER: &str = "apply-layer";
pub const WRITE_TAR: &str = "write-tar";
pub const STAGE_IMPORT: &str = "stage-import";
pub const REMOVE_TREE: &str = "remove-tree";
pub const INSPECT_SOURCE: &str = "inspect-source";
pub const READ_FILE: &str = "read-file";
pub const APPLY_UPPER: &str = "apply-upper";

/// The ops of the worker, for the hidden entry point.
pub const OPS: &[(&str, NsFn)] = &[
    (APPLY_LAYER, apply_layer_op),
    (WRITE_TAR, write_tar_op),
    (STAGE_IMPORT, stage_import_op),
    (REMOVE_TREE, remove_tree_op),
    (INSPECT_SOURCE, inspect_source_op),
    (READ_FILE, read_file_op),
    (APPLY_UPPER, apply_upper_op),
];

/// Apply the layer on stdin (tar, gzip or zstd) to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyArgs {
    pub target: PathBuf,
    /// Read the layer from this file (as container root) instead of stdin.
    #[serde(default)]
    pub source_file: Option<PathBuf>,
}

/// What [`APPLY_LAYER`] prints (one JSON object on stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// sha256 of the uncompressed tar: the layer's diff_id.
    pub diff_id: String,
    pub tar_size: u64,
    /// Entries not applied (device nodes a rootless build cannot create).
    pub skipped: u64,
}

fn apply_layer_op(arg: serde_json::Value) -> OpResult {
    let args: ApplyArgs = serde_json::from_value(arg)?;
    let stats = match &args.source_file {
        Some(f) => {
            let file = BufReader::with_capacity(1 << 20, fs::File::open(f)?);
            apply_layer(file, &args.target, &ApplyOptions::default())?
        }
        None => {
            let stdin = BufReader::with_capacity(1 << 20, io::stdin());
            apply_layer(stdin, &args.target, &ApplyOptions::default())?
        }
    };
    let applied = Applied {
        diff_id: stats.diff_id.to_string(),
        tar_size: stats.tar_size,
        skipped: stats.skipped,
    };
    println!("{}", serde_json::to_string(&applied)?);
    Ok(())
}

/// Write a layer tar of `dir` to stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteTarArgs {
    pub dir: PathBuf,
    /// Interpret overlay upper-dir conventions (whiteouts, opaque dirs).
    pub overlay: bool,
    pub exclude: Vec<String>,
    pub source_date_epoch: Option<u64>,
}

fn write_tar_op(arg: serde_json::Value) -> OpResult {
    let args: WriteTarArgs = serde_json::from_value(arg)?;
    let mut opts = if args.overlay {
        LayerTarOptions::overlay_upper()
    } else {
        LayerTarOptions::whole_dir()
    };
    for e in args.exclude {
        opts = opts.exclude(e);
    }
    opts.source_date_epoch = args.source_date_epoch;
    let out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let (mut out, _) = write_layer_tar(&args.dir, &opts, out)?;
    out.flush()?;
    Ok(())
}

/// Copy an import into a staging tree at `dest` (an absolute image path) below `root`,
/// following stacker's trailing-slash rules, then apply `mode`/`uid`/`gid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageArgs {
    pub source: PathBuf,
    /// The source was written with a trailing `/`.
    pub contents_only: bool,
    /// Basename of the source.
    pub name: String,
    pub root: PathBuf,
    pub dest: String,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The rootfs the layer will land on: parent directories that exist there keep their
    /// mode and owner in the staged tree (so `/tmp` stays 1777).
    pub base_rootfs: Option<PathBuf>,
}

/// Where an import lands in the image, per stackerfile.md's trailing-slash table:
/// `dir`->`/d` and `dir/`->`/d` and `dir/`->`/d/` give `/d/<contents>`; `dir`->`/d/` gives
/// `/d/dir/<contents>`; `file`->`/files/` gives `/files/file`; `file`->`/x` gives `/x`.
pub fn import_target(name: &str, is_dir: bool, contents_only: bool, dest: &str) -> String {
    let dest_is_dir = dest.ends_with('/');
    let base = dest.trim_end_matches('/');
    let base = if base.is_empty() { "" } else { base };
    if is_dir {
        if dest_is_dir && !contents_only {
            format!("{base}/{name}")
        } else if base.is_empty() {
            "/".to_string()
        } else {
            base.to_string()
        }
    } else if dest_is_dir {
        format!("{base}/{name}")
    } else {
        base.to_string()
    }
}

fn stage_import_op(arg: serde_json::Value) -> OpResult {
    let a: StageArgs = serde_json::from_value(arg)?;
    let source_is_dir = fs::metadata(&a.source)?.is_dir();
    let target_in_image = import_target(&a.name, source_is_dir, a.contents_only, &a.dest);
    let mut rel = relative(&target_in_image)?;
    // A parent that is a symlink in the base (merged /usr: /lib -> usr/lib) is followed,
    // as the image will resolve it: the file lands where the link points, and the link
    // stays a link.
    if let (Some(base), Some(parent), Some(file)) = (&a.base_rootfs, rel.parent(), rel.file_name())
        && !parent.as_os_str().is_empty()
    {
        let real_parent = resolve_existing_in_root(base, parent)?;
        rel = real_parent.join(file);
    }
    // Parent directories: mirror the base's where they exist.
    let mut built = PathBuf::new();
    let parents: Vec<_> = rel
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        built.push(c);
        let staged = a.root.join(&built);
        if staged.exists() {
            continue;
        }
        fs::create_dir(&staged)?;
        let like = a
            .base_rootfs
            .as_ref()
            .map(|b| b.join(&built))
            .and_then(|p| fs::symlink_metadata(p).ok())
            .filter(|m| m.is_dir());
        match like {
            Some(m) => {
                fs::set_permissions(&staged, fs::Permissions::from_mode(m.mode() & 0o7777))?;
                std::os::unix::fs::lchown(&staged, Some(m.uid()), Some(m.gid()))?;
            }
            None => fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?,
        }
    }
    let target = a.root.join(&rel);
    if source_is_dir {
        if !target.exists() {
            fs::create_dir(&target)?;
            let m = fs::metadata(&a.source)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        copy_dir(&a.source, &target)?;
    } else {
        fs::copy(&a.source, &target)?;
    }
    // Ownership: root unless uid/gid say otherwise; mode when given.
    let uid = a.uid.unwrap_or(0);
    let gid = a.gid.unwrap_or(0);
    walk(&target, &mut |p, m| {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
        if let Some(mode) = a.mode
            && !m.file_type().is_symlink()
            && (!m.is_dir() || p == target)
        {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    })?;
    Ok(())
}

fn relative(image_path: &str) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(image_path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("'{image_path}' leaves the image root"),
                ));
            }
        }
    }
    Ok(out)
}

/// Copy a directory's contents, keeping symlinks as symlinks and modes.
fn copy_dir(src: &Path, dst: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(src)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let from = e.path();
        let to = dst.join(e.file_name());
        let m = fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if ft.is_dir() {
            fs::create_dir(&to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            copy_dir(&from, &to)?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

fn walk(path: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let m = fs::symlink_metadata(path)?;
    if m.is_dir() {
        for e in fs::read_dir(path)? {
            walk(&e?.path(), f)?;
        }
    }
    f(path, &m)
}

/// Remove a tree (files of any container user).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveArgs {
    pub path: PathBuf,
}

fn remove_tree_op(arg: serde_json::Value) -> OpResult {
    let a: RemoveArgs = serde_json::from_value(arg)?;
    // Overlay work dirs are mode 000: open them up first.
    let _ = walk(&a.path, &mut |p, m| {
        if m.is_dir() {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
        }
        Ok(())
    });
    match fs::remove_dir_all(&a.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Resolve `path` inside the root filesystem `root` the way a process chrooted there
/// would (absolute symlinks lead back into `root`, `..` stops at it), and describe it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectArgs {
    pub root: PathBuf,
    pub path: String,
    /// Compute the sha256 of a file's bytes.
    pub sha256: bool,
}

/// What [`INSPECT_SOURCE`] prints (one JSON object on stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspected {
    pub resolved: PathBuf,
    pub is_dir: bool,
    pub sha256: Option<String>,
}

/// `rel` resolved inside `root` as far as it exists there (following symlinks as if
/// `root` were `/`), with the part that does not exist appended unchanged; relative to
/// `root`.
pub fn resolve_existing_in_root(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let parts: Vec<_> = rel.components().collect();
    for cut in (0..=parts.len()).rev() {
        let head: PathBuf = parts[..cut].iter().collect();
        let Ok(resolved) = resolve_in_root(root, &head.to_string_lossy()) else {
            continue;
        };
        if cut > 0 && !resolved.is_dir() {
            continue;
        }
        let inside = resolved
            .strip_prefix(root)
            .unwrap_or(&resolved)
            .to_path_buf();
        let tail: PathBuf = parts[cut..].iter().collect();
        return Ok(inside.join(tail));
    }
    Ok(rel.to_path_buf())
}

/// `path` resolved inside `root`, following symlinks as if `root` were `/`.
pub fn resolve_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            parts.pop();
            continue;
        }
        let candidate: PathBuf = root.join(parts.iter().collect::<PathBuf>()).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::other(format!("too many symlinks in '{path}'")));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => parts.push(part),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("'{path}' does not exist in the layer ({e})"),
                ));
            }
        }
    }
    Ok(root.join(parts.iter().collect::<PathBuf>()))
}

fn inspect_source_op(arg: serde_json::Value) -> OpResult {
    let a: InspectArgs = serde_json::from_value(arg)?;
    let resolved = resolve_in_root(&a.root, &a.path)?;
    let m = fs::metadata(&resolved)?;
    let sha256 = if a.sha256 && m.is_file() {
        Some(farm_image::Digest::of_file(&resolved)?.0.hex().to_string())
    } else {
        None
    };
    let out = Inspected {
        resolved,
        is_dir: m.is_dir(),
        sha256,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// Apply an overlay upper directory (a run's change) onto a writable copy of its lower
/// tree: whiteouts remove, opaque directories replace, everything else is copied with
/// its metadata, file data shared by reflink where the filesystem can (btrfs), so a new
/// chain costs what the change's metadata costs, not its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyUpperArgs {
    pub upper: PathBuf,
    pub target: PathBuf,
    /// Top-level names never applied (`stacker`).
    pub exclude: Vec<String>,
}

fn apply_upper_op(arg: serde_json::Value) -> OpResult {
    let a: ApplyUpperArgs = serde_json::from_value(arg)?;
    let mut state = UpperApply {
        links: std::collections::HashMap::new(),
        bytes: 0,
    };
    state.dir(&a.upper, &a.target, &a.exclude)?;
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({ "bytes": state.bytes }))?
    );
    Ok(())
}

struct UpperApply {
    /// (dev, ino) of upper files already copied -> their target, for hard links.
    links: std::collections::HashMap<(u64, u64), PathBuf>,
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
            use std::os::unix::fs::FileTypeExt;
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

/// Copy the file at `path` inside `root` (resolved as in the image) to stdout.
fn read_file_op(arg: serde_json::Value) -> OpResult {
    let a: InspectArgs = serde_json::from_value(arg)?;
    let resolved = resolve_in_root(&a.root, &a.path)?;
    if fs::metadata(&resolved)?.is_dir() {
        return Err(format!("'{}' is a directory; name a file", a.path).into());
    }
    let mut out = io::stdout().lock();
    io::copy(&mut fs::File::open(&resolved)?, &mut out)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{import_target, resolve_in_root};

    #[test]
    fn existing_prefixes_resolve_through_links() {
        use super::resolve_existing_in_root;
        use std::path::{Path, PathBuf};
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        assert_eq!(
            resolve_existing_in_root(root, Path::new("lib")).unwrap(),
            PathBuf::from("usr/lib")
        );
        assert_eq!(
            resolve_existing_in_root(root, Path::new("lib/new/deeper")).unwrap(),
            PathBuf::from("usr/lib/new/deeper")
        );
        assert_eq!(
            resolve_existing_in_root(root, Path::new("opt/x")).unwrap(),
            PathBuf::from("opt/x")
        );
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/f"), "x").unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc", root.join("usr/up")).unwrap();
        std::os::unix::fs::symlink("/", root.join("slash")).unwrap();
        assert_eq!(
            resolve_in_root(&root, "lib/f").unwrap(),
            root.join("usr/lib/f")
        );
        assert_eq!(
            resolve_in_root(&root, "/slash/usr/lib/f").unwrap(),
            root.join("usr/lib/f")
        );
        // climbing out stops at the root: /etc inside the root, which does not exist
        assert!(resolve_in_root(&root, "usr/up/passwd").is_err());
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "inside").unwrap();
        assert_eq!(
            resolve_in_root(&root, "usr/up/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(&root, "../../usr/../usr/lib").unwrap(),
            root.join("usr/lib")
        );
    }

    #[test]
    fn trailing_slash_rules() {
        // (name, is_dir, contents_only (source had '/'), dest) -> where it lands
        let cases = [
            ("dir", true, false, "/d", "/d"),
            ("dir", true, true, "/d", "/d"),
            ("dir", true, false, "/d/", "/d/dir"),
            ("dir", true, true, "/d/", "/d"),
            ("file", false, false, "/files/", "/files/file"),
            ("file", false, false, "/x", "/x"),
            ("dir", true, true, "/", "/"),
        ];
        for (name, is_dir, contents, dest, want) in cases {
            assert_eq!(
                import_target(name, is_dir, contents, dest),
                want,
                "{name} {is_dir} {contents} {dest}"
            );
        }
    }
}

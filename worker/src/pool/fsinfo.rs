//! What filesystem a pool directory is on, how it is mounted, and the `farm check` report.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::sys::statfs::{self, FsType};
use nix::unistd::{AccessFlags, Uid, User};

/// The mount option btrfs needs for unprivileged subvolume deletion.
pub(super) const USER_SUBVOL_RM_ALLOWED: &str = "user_subvol_rm_allowed";

/// How to get a btrfs pool; used in the warning and the report.
pub(super) const HOW_TO_GET_BTRFS: &str = "run `farm setup --user NAME --pool DIR` as root to make a \
     loopback btrfs pool, or `mkfs.btrfs` a device and mount it with `-o user_subvol_rm_allowed`";

/// The filesystem a path is on, as far as the pool cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsKind {
    /// statfs(2) `f_type`.
    pub magic: i64,
    /// A readable name: the type from /proc/self/mountinfo when found, else from `magic`.
    pub name: String,
}

impl FsKind {
    pub fn is_btrfs(&self) -> bool {
        #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, narrower elsewhere
        let btrfs = statfs::BTRFS_SUPER_MAGIC.0 as i64;
        self.magic == btrfs
    }
}

fn magic_name(t: FsType) -> &'static str {
    // Only the ones a pool is likely to land on; the mountinfo name is preferred anyway.
    const ZFS: i64 = 0x2fc1_2fc1;
    const RAMFS: i64 = 0x8584_58f6;
    const V9FS: i64 = 0x0102_1997;
    const CIFS: i64 = 0xff53_4d42;
    const SMB2: i64 = 0xfe53_4d42;
    const BCACHEFS: i64 = 0xca45_1a4e;
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, narrower elsewhere
    let m = t.0 as i64;
    match t {
        statfs::BTRFS_SUPER_MAGIC => "btrfs",
        statfs::TMPFS_MAGIC => "tmpfs",
        statfs::OVERLAYFS_SUPER_MAGIC => "overlay",
        statfs::NFS_SUPER_MAGIC => "nfs",
        statfs::EXT4_SUPER_MAGIC => "ext4",
        statfs::XFS_SUPER_MAGIC => "xfs",
        statfs::FUSE_SUPER_MAGIC => "fuse",
        statfs::F2FS_SUPER_MAGIC => "f2fs",
        _ if m == ZFS => "zfs",
        _ if m == RAMFS => "ramfs",
        _ if m == V9FS => "9p",
        _ if m == CIFS || m == SMB2 => "cifs",
        _ if m == BCACHEFS => "bcachefs",
        _ => "unknown",
    }
}

/// One line of /proc/self/mountinfo, the fields the pool reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Per-mount options (field 6), e.g. `rw,relatime`.
    pub mount_options: Vec<String>,
    /// Superblock options (after the separator), e.g. `rw,user_subvol_rm_allowed`.
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// True if `opt` is among the mount or superblock options.
    pub fn has_option(&self, opt: &str) -> bool {
        self.mount_options
            .iter()
            .chain(&self.super_options)
            .any(|o| o == opt)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub(super) fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 {
            continue;
        }
        mounts.push(MountInfo {
            mount_point: PathBuf::from(unescape(l[4])),
            mount_options: l[5].split(',').map(str::to_owned).collect(),
            fs_type: r[0].to_owned(),
            source: unescape(r[1]),
            super_options: r[2].split(',').map(str::to_owned).collect(),
        });
    }
    mounts
}

/// The mount that contains `path` (which should be canonical): the longest mount point
/// that is a prefix of it, the last one listed when several are stacked.
pub(super) fn mount_of(path: &Path) -> Option<MountInfo> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<MountInfo> = None;
    for m in parse_mountinfo(&text) {
        if path.starts_with(&m.mount_point) {
            let better = match &best {
                None => true,
                Some(b) => m.mount_point.components().count() >= b.mount_point.components().count(),
            };
            if better {
                best = Some(m);
            }
        }
    }
    best
}

/// statfs(2) of `path`, named.
pub(super) fn fs_kind(path: &Path) -> std::io::Result<FsKind> {
    let st = statfs::statfs(path)?;
    let t = st.filesystem_type();
    let mut name = magic_name(t).to_owned();
    if let Ok(canon) = fs::canonicalize(path)
        && let Some(m) = mount_of(&canon)
    {
        name = m.fs_type;
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, narrower elsewhere
    let magic = t.0 as i64;
    Ok(FsKind { magic, name })
}

/// Bytes available to unprivileged users on the filesystem of `path`.
pub(super) fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn total_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks() as u64 * st.fragment_size() as u64)
}

/// "uid N (name)".
pub(super) fn describe_uid(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Whether the effective user may create entries in `dir`.
pub(super) fn writable(dir: &Path) -> bool {
    nix::unistd::faccessat(
        nix::fcntl::AT_FDCWD,
        dir,
        AccessFlags::W_OK | AccessFlags::X_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    )
    .is_ok()
}

/// The nearest existing ancestor of `path` (itself if it exists).
pub(super) fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    let mut p = absolute(path);
    loop {
        if p.symlink_metadata().is_ok() {
            return Some(p);
        }
        if !p.pop() {
            return None;
        }
    }
}

/// `path` made absolute against the current directory, `.` and `..` resolved lexically.
pub(super) fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One human-readable line of a [`Report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

/// What `farm check` says about a pool directory. Built by [`super::Pool::check`], which
/// creates nothing.
#[derive(Clone, Debug)]
pub struct Report {
    /// The directory asked about (absolute).
    pub dir: PathBuf,
    /// The directory examined: `dir`, or its nearest existing ancestor if `dir` is missing.
    pub examined: Option<PathBuf>,
    pub fs: Option<FsKind>,
    pub mount: Option<MountInfo>,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub writable: bool,
    pub owner_uid: Option<u32>,
    /// The backend [`super::Pool::open`] would choose.
    pub backend: Option<super::BackendKind>,
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst severity among the findings.
    pub fn worst(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok)
    }

    /// True when nothing is an error (warnings allowed).
    pub fn is_usable(&self) -> bool {
        self.worst() < Severity::Error
    }

    fn push(&mut self, severity: Severity, message: String) {
        self.findings.push(Finding { severity, message });
    }

    /// Why a worker on this pool is not ready, with the fix: an error, or a pool that is
    /// not btrfs mounted with `user_subvol_rm_allowed` (a worker in a pod needs both:
    /// snapshots instead of copies, and deleting its subvolumes unprivileged). `None`
    /// when it is.
    pub fn worker_problem(&self) -> Option<String> {
        let errors: Vec<&str> = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.message.as_str())
            .collect();
        if !errors.is_empty() {
            return Some(errors.join("; "));
        }
        let dir = self.dir.display();
        match (&self.fs, &self.mount) {
            (Some(fs), _) if !fs.is_btrfs() => Some(format!(
                "the pool {dir} is on {}, not btrfs: give the worker a btrfs volume mounted \
                 with -o {USER_SUBVOL_RM_ALLOWED} (a StorageClass with that mount option, or \
                 a node path); elsewhere {HOW_TO_GET_BTRFS}",
                fs.name
            )),
            (Some(_), Some(m)) if !m.has_option(USER_SUBVOL_RM_ALLOWED) => Some(format!(
                "the pool {dir} is btrfs mounted without {USER_SUBVOL_RM_ALLOWED} (at {}): \
                 add the mount option (the StorageClass's mountOptions, or `mount -o \
                 remount,{USER_SUBVOL_RM_ALLOWED} {}`)",
                m.mount_point.display(),
                m.mount_point.display()
            )),
            (None, _) => Some(format!("the filesystem of the pool {dir} is unknown")),
            _ => None,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pool {}:", self.dir.display())?;
        for x in &self.findings {
            writeln!(f, "  {}: {}", x.severity, x.message)?;
        }
        Ok(())
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Builds the report; see [`super::Pool::check`].
pub(super) fn check(dir: &Path) -> Report {
    let dir = absolute(dir);
    let mut r = Report {
        dir: dir.clone(),
        examined: None,
        fs: None,
        mount: None,
        free_bytes: None,
        total_bytes: None,
        writable: false,
        owner_uid: None,
        backend: None,
        findings: Vec::new(),
    };
    let euid = nix::unistd::geteuid().as_raw();
    let Some(examined) = existing_ancestor(&dir) else {
        r.push(
            Severity::Error,
            format!("neither {} nor any parent exists", dir.display()),
        );
        return r;
    };
    r.examined = Some(examined.clone());
    let meta = match fs::metadata(&examined) {
        Ok(m) => m,
        Err(e) => {
            r.push(
                Severity::Error,
                format!("cannot stat {}: {e}", examined.display()),
            );
            return r;
        }
    };
    if examined == dir {
        if !meta.is_dir() {
            r.push(
                Severity::Error,
                format!("{} exists but is not a directory", dir.display()),
            );
            return r;
        }
        r.push(Severity::Ok, format!("{} exists", dir.display()));
    } else {
        r.push(
            Severity::Ok,
            format!(
                "{} does not exist yet; it would be created in {}",
                dir.display(),
                examined.display()
            ),
        );
    }
    r.owner_uid = Some(meta.uid());
    r.writable = writable(&examined);
    if r.writable {
        r.push(
            Severity::Ok,
            format!(
                "{} is writable by {}",
                examined.display(),
                describe_uid(euid)
            ),
        );
    } else {
        r.push(
            Severity::Error,
            format!(
                "{} is not writable by {}: it is owned by {} with mode {:o}",
                examined.display(),
                describe_uid(euid),
                describe_uid(meta.uid()),
                meta.mode() & 0o7777
            ),
        );
    }
    match fs_kind(&examined) {
        Ok(k) => {
            let canon = fs::canonicalize(&examined).unwrap_or(examined.clone());
            r.mount = mount_of(&canon);
            let where_ = r
                .mount
                .as_ref()
                .map(|m| {
                    format!(
                        " mounted at {} from {} with options {},{}",
                        m.mount_point.display(),
                        m.source,
                        m.mount_options.join(","),
                        m.super_options.join(",")
                    )
                })
                .unwrap_or_default();
            if k.is_btrfs() {
                r.backend = Some(super::BackendKind::Btrfs);
                r.push(
                    Severity::Ok,
                    format!("filesystem is btrfs{where_}: chains are snapshots (O(1))"),
                );
                let has_opt = r
                    .mount
                    .as_ref()
                    .is_some_and(|m| m.has_option(USER_SUBVOL_RM_ALLOWED));
                if has_opt {
                    r.push(Severity::Ok, format!("{USER_SUBVOL_RM_ALLOWED} is set"));
                } else {
                    let mp = r
                        .mount
                        .as_ref()
                        .map(|m| m.mount_point.display().to_string())
                        .unwrap_or_else(|| "MOUNTPOINT".into());
                    let sev = if euid == 0 {
                        Severity::Warning
                    } else {
                        Severity::Error
                    };
                    r.push(
                        sev,
                        format!(
                            "btrfs is mounted without {USER_SUBVOL_RM_ALLOWED}: an unprivileged \
                             worker cannot delete subvolumes; remount with `mount -o \
                             remount,{USER_SUBVOL_RM_ALLOWED} {mp}`"
                        ),
                    );
                }
            } else {
                r.backend = Some(super::BackendKind::Copy);
                r.push(
                    Severity::Warning,
                    format!(
                        "filesystem is {}{where_}, not btrfs: builds will copy each chain \
                         instead of snapshotting it; to get btrfs, {HOW_TO_GET_BTRFS}",
                        k.name
                    ),
                );
            }
            r.fs = Some(k);
        }
        Err(e) => r.push(
            Severity::Error,
            format!("statfs {}: {e}", examined.display()),
        ),
    }
    if let (Ok(free), Ok(total)) = (free_bytes(&examined), total_bytes(&examined)) {
        r.free_bytes = Some(free);
        r.total_bytes = Some(total);
        let sev = if free < 1 << 30 {
            Severity::Warning
        } else {
            Severity::Ok
        };
        r.push(sev, format!("{} free of {}", human(free), human(total)));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - btrfs /dev/loop0 rw,user_subvol_rm_allowed,space_cache=v2\n\
                    22 27 0:21 / /proc rw,relatime - proc proc rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "btrfs");
        assert_eq!(m[0].source, "/dev/loop0");
        assert!(m[0].has_option(USER_SUBVOL_RM_ALLOWED));
        assert!(m[0].has_option("noatime"));
        assert!(!m[1].has_option(USER_SUBVOL_RM_ALLOWED));
    }

    #[test]
    fn a_worker_is_ready_only_on_btrfs_with_user_subvol_rm_allowed() {
        let mounts = parse_mountinfo(
            "36 35 98:0 / /pool rw - btrfs /dev/loop0 rw,user_subvol_rm_allowed\n\
             37 35 98:1 / /plain rw - btrfs /dev/loop1 rw,space_cache=v2\n",
        );
        let report = |magic: i64, name: &str, mount: Option<&MountInfo>| Report {
            dir: PathBuf::from("/pool/p"),
            examined: Some(PathBuf::from("/pool/p")),
            fs: Some(FsKind {
                magic,
                name: name.into(),
            }),
            mount: mount.cloned(),
            free_bytes: None,
            total_bytes: None,
            writable: true,
            owner_uid: Some(1000),
            backend: None,
            findings: Vec::new(),
        };
        #[allow(clippy::unnecessary_cast)]
        let btrfs = statfs::BTRFS_SUPER_MAGIC.0 as i64;
        assert_eq!(
            report(btrfs, "btrfs", Some(&mounts[0])).worker_problem(),
            None
        );
        let why = report(btrfs, "btrfs", Some(&mounts[1]))
            .worker_problem()
            .unwrap();
        assert!(
            why.contains("without user_subvol_rm_allowed")
                && why.contains("mount -o remount,user_subvol_rm_allowed /plain"),
            "{why}"
        );
        let why = report(0xEF53, "ext4", None).worker_problem().unwrap();
        assert!(
            why.contains("on ext4, not btrfs") && why.contains("StorageClass"),
            "{why}"
        );
        let mut r = report(btrfs, "btrfs", Some(&mounts[0]));
        r.push(
            Severity::Error,
            "/pool/p is not writable by uid 1000".into(),
        );
        assert_eq!(
            r.worker_problem().as_deref(),
            Some("/pool/p is not writable by uid 1000")
        );
    }

    #[test]
    fn absolute_resolves_dots() {
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
    }

    #[test]
    fn check_of_missing_dir_looks_at_parent_and_creates_nothing() {
        let t = tempfile::tempdir().unwrap();
        let want = t.path().join("x/y/pool");
        let r = check(&want);
        assert_eq!(r.examined.as_deref(), Some(t.path()));
        assert!(!t.path().join("x").exists());
        assert!(r.fs.is_some());
        assert!(!r.findings.is_empty(), "{r}");
    }
}

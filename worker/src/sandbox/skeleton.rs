//! The skeleton layer: mountpoints the rootfs lacks (typically /stacker, /proc in a
//! minimal base, a bind destination) come from a tiny layer on top of the lower layers,
//! in the staging tmpfs, with the base's own mode, owner and times, so nothing of the
//! sandbox reaches the overlay's upper dir.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::setup::{MountKind, err};
use crate::sys;

/// A mountpoint missing from the rootfs: `existing` is the deepest existing directory
/// of its path, resolved inside the rootfs; `create` the components to add below it.
pub(super) struct SkelItem {
    existing: PathBuf,
    create: Vec<std::ffi::OsString>,
    kind: MountKind,
}

/// Which mountpoints the mounted rootfs at `root` lacks.
pub(super) fn plan_skeleton(
    root: &Path,
    needs: &[(PathBuf, MountKind)],
) -> Result<Vec<SkelItem>, String> {
    use nix::fcntl::{OFlag, open};
    let root_fd = open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(err(format!("opening {}", root.display())))?;
    let mut items = Vec::new();
    for (path, kind) in needs {
        let comps: Vec<&OsStr> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s),
                _ => None,
            })
            .collect();
        let rel = |n: usize| -> PathBuf {
            if n == 0 {
                PathBuf::from(".")
            } else {
                comps[..n].iter().collect()
            }
        };
        match sys::open_in_root(root_fd.as_fd(), &rel(comps.len())) {
            Ok(fd) => {
                let is_dir = nix::sys::stat::fstat(&fd)
                    .map(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR)
                    .unwrap_or(false);
                if (*kind == MountKind::Dir) != is_dir {
                    let what = if is_dir {
                        "a directory"
                    } else {
                        "not a directory"
                    };
                    return Err(format!(
                        "mountpoint {} exists in the rootfs but is {what}",
                        path.display()
                    ));
                }
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(format!("looking up mountpoint {}: {e}", path.display())),
        }
        let mut n = comps.len() - 1;
        let prefix_fd = loop {
            match sys::open_in_root(root_fd.as_fd(), &rel(n)) {
                Ok(fd) => break fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && n > 0 => n -= 1,
                Err(e) => {
                    return Err(format!(
                        "looking up {} in the rootfs: {e}",
                        rel(n).display()
                    ));
                }
            }
        };
        let st = nix::sys::stat::fstat(&prefix_fd).map_err(err("fstat"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(format!(
                "cannot mount on {}: /{} is not a directory",
                path.display(),
                rel(n).display()
            ));
        }
        let resolved = fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&prefix_fd)
        ))
        .map_err(err("readlink"))?;
        let inside = resolved.strip_prefix(root).map_err(|_| {
            format!(
                "{} resolved outside the rootfs ({})",
                rel(n).display(),
                resolved.display()
            )
        })?;
        items.push(SkelItem {
            existing: Path::new("/").join(inside),
            create: comps[n..].iter().map(|s| s.to_os_string()).collect(),
            kind: *kind,
        });
    }
    Ok(items)
}

/// Builds the skeleton layer at `skel`, mirroring the attributes of the existing
/// directories (seen in the mounted rootfs at `root`) that it shadows.
pub(super) fn build_skeleton(root: &Path, skel: &Path, items: &[SkelItem]) -> Result<(), String> {
    let mut mirrored: BTreeMap<PathBuf, fs::Metadata> = BTreeMap::new();
    let inside = |p: &Path| -> PathBuf { p.strip_prefix("/").unwrap_or(p).to_path_buf() };
    for item in items {
        let mut chain = vec![item.existing.clone()];
        chain.extend(item.existing.ancestors().skip(1).map(Path::to_path_buf));
        for dir in chain.iter().rev() {
            if !mirrored.contains_key(dir) {
                let meta = fs::symlink_metadata(root.join(inside(dir)))
                    .map_err(err(format!("stat {}", dir.display())))?;
                fs::create_dir_all(skel.join(inside(dir))).map_err(err("creating skeleton"))?;
                mirrored.insert(dir.clone(), meta);
            }
        }
        let mut path = skel.join(inside(&item.existing));
        for (i, c) in item.create.iter().enumerate() {
            path.push(c);
            let last = i + 1 == item.create.len();
            if last && item.kind == MountKind::File {
                fs::File::create(&path).map_err(err(format!("creating {}", path.display())))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                    .map_err(err("chmod"))?;
            } else if !path.exists() {
                fs::create_dir(&path).map_err(err(format!("creating {}", path.display())))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                    .map_err(err("chmod"))?;
            }
        }
    }
    for (dir, meta) in &mirrored {
        let path = skel.join(inside(dir));
        fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(err("chmod"))?;
        let _ = std::os::unix::fs::lchown(&path, Some(meta.uid()), Some(meta.gid()));
        let ts = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
        let _ = nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &ts(meta.atime(), meta.atime_nsec()),
            &ts(meta.mtime(), meta.mtime_nsec()),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
    Ok(())
}

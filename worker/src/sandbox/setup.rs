//! What init does before the script starts, in the new namespaces while the host tree
//! is still visible: clone the host sources as detached mounts, mount the rootfs (with
//! the skeleton of missing mountpoints), pivot_root into it, then mount /proc, /dev,
//! /sys, /etc/resolv.conf, /stacker and the binds inside. /proc is a fresh procfs of
//! the sandbox's pid namespace, or with [`SandboxProc::Host`] the worker's own /proc,
//! bound recursively and read-only.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::skeleton::{build_skeleton, plan_skeleton};
use super::{Rootfs, SCRIPT_PATH, SandboxProc, SandboxSpec};
use crate::sys;

/// Device nodes bound from the host into the sandbox's /dev.
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// What a mountpoint must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MountKind {
    Dir,
    File,
}

pub(super) fn err<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Checks a container path: absolute, no `..`, not `/`, not under /proc or /sys.
fn check_dest(dest: &Path) -> Result<(), String> {
    if !dest.is_absolute() || dest.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "bind destination {} must be absolute without '..'",
            dest.display()
        ));
    }
    if dest == Path::new("/") || dest.starts_with("/proc") || dest.starts_with("/sys") {
        return Err(format!(
            "bind destination {} is not allowed",
            dest.display()
        ));
    }
    Ok(())
}

/// Destinations that live in one of the sandbox's own tmpfs mounts.
fn in_sandbox_tmpfs(dest: &Path) -> bool {
    dest.starts_with("/stacker") || dest.starts_with("/dev")
}

struct HostMounts {
    proc: OwnedFd,
    devs: Vec<(&'static str, OwnedFd)>,
    sys: Option<OwnedFd>,
    resolv: Option<OwnedFd>,
    binds: Vec<(PathBuf, MountKind, OwnedFd)>,
}

/// Clones the host sources as detached mounts while the host tree is reachable.
fn clone_host_mounts(spec: &SandboxSpec, warnings: &mut Vec<String>) -> Result<HostMounts, String> {
    let ro_all = sys::MOUNT_ATTR_RDONLY
        | sys::MOUNT_ATTR_NOSUID
        | sys::MOUNT_ATTR_NODEV
        | sys::MOUNT_ATTR_NOEXEC;
    let proc = match spec.proc {
        SandboxProc::Fresh => sys::fsmount_proc().map_err(err(
            "creating the /proc mount (where the container's /proc is masked, as in a pod \
             without a user namespace, run the worker with --sandbox-proc host)",
        ))?,
        SandboxProc::Host => {
            // Recursive: the container runtime's masks over /proc (locked beneath a user
            // namespace) come along, and a non-recursive bind of a masked /proc is refused.
            let fd = sys::open_tree_clone(Path::new("/proc"), true)
                .map_err(err("binding the worker's /proc"))?;
            if let Err(e) = sys::mount_setattr(Some(fd.as_fd()), Path::new(""), ro_all, true) {
                warnings.push(format!(
                    "the worker's /proc is bound read-write into the build (read-only \
                     failed: {e})"
                ));
            }
            fd
        }
    };
    let mut devs = Vec::new();
    for name in DEV_NODES {
        let path = Path::new("/dev").join(name);
        match sys::open_tree_clone(&path, false) {
            Ok(fd) => devs.push((name, fd)),
            Err(e) if name == "tty" => warnings.push(format!("no /dev/tty in the sandbox: {e}")),
            Err(e) => return Err(format!("cloning {}: {e}", path.display())),
        }
    }
    let sys_fd = sys::open_tree_clone(Path::new("/sys"), true).and_then(|fd| {
        sys::mount_setattr(Some(fd.as_fd()), Path::new(""), ro_all, true)?;
        Ok(fd)
    });
    let sys_fd = match sys_fd {
        Ok(fd) => Some(fd),
        Err(e) => {
            warnings.push(format!(
                "/sys is an empty read-only tmpfs (bind of the host's failed: {e})"
            ));
            None
        }
    };
    let resolv_path = Path::new("/etc/resolv.conf");
    let resolv = if resolv_path.exists() {
        match sys::open_tree_clone(resolv_path, false).and_then(|fd| {
            sys::mount_setattr(
                Some(fd.as_fd()),
                Path::new(""),
                sys::MOUNT_ATTR_RDONLY,
                false,
            )?;
            Ok(fd)
        }) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warnings.push(format!("no /etc/resolv.conf in the sandbox: {e}"));
                None
            }
        }
    } else {
        None
    };
    let mut binds = Vec::new();
    for b in &spec.binds {
        check_dest(&b.dest)?;
        let meta =
            fs::metadata(&b.source).map_err(err(format!("bind source {}", b.source.display())))?;
        let kind = if meta.is_dir() {
            MountKind::Dir
        } else {
            MountKind::File
        };
        let fd = sys::open_tree_clone(&b.source, true)
            .map_err(err(format!("cloning bind source {}", b.source.display())))?;
        if b.readonly {
            sys::mount_setattr(
                Some(fd.as_fd()),
                Path::new(""),
                sys::MOUNT_ATTR_RDONLY,
                true,
            )
            .map_err(err(format!("making bind {} read-only", b.source.display())))?;
        }
        binds.push((b.dest.clone(), kind, fd));
    }
    Ok(HostMounts {
        proc,
        devs,
        sys: sys_fd,
        resolv,
        binds,
    })
}

fn overlay_options(lower: &[PathBuf], upper: &Path, work: &Path) -> Result<String, String> {
    let check = |p: &Path| -> Result<String, String> {
        let s = p
            .to_str()
            .ok_or_else(|| format!("overlay path {} is not UTF-8", p.display()))?;
        if s.contains([',', ':', '\\', '\n']) {
            return Err(format!("overlay path {s} contains ',', ':' or '\\'"));
        }
        Ok(s.to_string())
    };
    if lower.is_empty() {
        return Err("overlay needs at least one lower dir".into());
    }
    let lowers = lower
        .iter()
        .map(|p| check(p))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    Ok(format!(
        "lowerdir={lowers},upperdir={},workdir={},userxattr",
        check(upper)?,
        check(work)?
    ))
}

fn mount_overlay(
    target: &Path,
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
) -> Result<(), String> {
    let opts = overlay_options(lower, upper, work)?;
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(err(format!("mounting overlay ({opts})")))
}

/// Mountpoint inside the new root (after pivot_root): must exist on an overlay (the
/// skeleton provides it), is created otherwise.
fn ensure_mountpoint(path: &Path, kind: MountKind, create: bool) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() == (kind == MountKind::Dir) => return Ok(()),
        Ok(_) => return Err(format!("mountpoint {} has the wrong type", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {}
        Err(e) => return Err(format!("mountpoint {}: {e}", path.display())),
    }
    match kind {
        MountKind::Dir => {
            fs::create_dir_all(path).map_err(err(format!("creating {}", path.display())))
        }
        MountKind::File => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .map_err(err(format!("creating {}", parent.display())))?;
            }
            fs::File::create(path)
                .map(drop)
                .map_err(err(format!("creating {}", path.display())))
        }
    }
}

fn mount_tmpfs(target: &Path, flags: MsFlags, opts: &str) -> Result<(), String> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(opts))
        .map_err(err(format!("mounting tmpfs on {}", target.display())))
}

/// Everything between "init started" and "exec the script"; returns the script command.
pub(super) fn setup(spec: &SandboxSpec, warnings: &mut Vec<String>) -> Result<Command, String> {
    nix::unistd::sethostname(&spec.hostname).map_err(err("sethostname"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("making / private"))?;
    let staging = fs::canonicalize(&spec.mount_dir)
        .map_err(err(format!("mount_dir {}", spec.mount_dir.display())))?;
    mount_tmpfs(
        &staging,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0700,size=16m",
    )?;
    let root = staging.join("root");
    fs::create_dir(&root).map_err(err("mkdir staging root"))?;

    let host = clone_host_mounts(spec, warnings)?;
    let overlay = match &spec.rootfs {
        Rootfs::Overlay { lower, upper, work } => {
            let lower = lower
                .iter()
                .map(fs::canonicalize)
                .collect::<Result<Vec<_>, _>>()
                .map_err(err("lower dir"))?;
            let upper =
                fs::canonicalize(upper).map_err(err(format!("upper dir {}", upper.display())))?;
            let work =
                fs::canonicalize(work).map_err(err(format!("work dir {}", work.display())))?;
            // `/` in the container has the upper dir's mode and owner: make them the base's.
            if let (Ok(base), Ok(up)) = (fs::metadata(&lower[0]), fs::metadata(&upper)) {
                if base.mode() & 0o7777 != up.mode() & 0o7777 {
                    let _ = fs::set_permissions(
                        &upper,
                        fs::Permissions::from_mode(base.mode() & 0o7777),
                    );
                }
                if (base.uid(), base.gid()) != (up.uid(), up.gid()) {
                    let _ = std::os::unix::fs::chown(&upper, Some(base.uid()), Some(base.gid()));
                }
            }
            mount_overlay(&root, &lower, &upper, &work)?;
            let mut needs = vec![
                (PathBuf::from("/proc"), MountKind::Dir),
                (PathBuf::from("/sys"), MountKind::Dir),
                (PathBuf::from("/dev"), MountKind::Dir),
                (PathBuf::from("/stacker"), MountKind::Dir),
            ];
            if host.resolv.is_some() && root.join("etc").is_dir() && !root.join("etc").is_symlink()
            {
                needs.push(("/etc/resolv.conf".into(), MountKind::File));
            }
            for (dest, kind, _) in &host.binds {
                if !in_sandbox_tmpfs(dest) {
                    needs.push((dest.clone(), *kind));
                }
            }
            let plan = plan_skeleton(&root, &needs)?;
            if !plan.is_empty() {
                let skel = staging.join("skel");
                fs::create_dir(&skel).map_err(err("mkdir skeleton"))?;
                build_skeleton(&root, &skel, &plan)?;
                umount2(&root, MntFlags::empty()).map_err(err("unmounting the first overlay"))?;
                let mut layers = vec![skel];
                layers.extend(lower);
                mount_overlay(&root, &layers, &upper, &work)?;
            }
            true
        }
        Rootfs::Bind(dir) => {
            mount(
                Some(dir.as_path()),
                &root,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err(format!("bind-mounting rootfs {}", dir.display())))?;
            false
        }
    };

    nix::unistd::chdir(&root).map_err(err("chdir rootfs"))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    let create = !overlay;

    ensure_mountpoint(Path::new("/proc"), MountKind::Dir, create)?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    sys::move_mount_to(host.proc.as_fd(), Path::new("/proc")).map_err(err("mounting /proc"))?;

    ensure_mountpoint(Path::new("/dev"), MountKind::Dir, create)?;
    mount_tmpfs(
        Path::new("/dev"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=65536k",
    )?;
    for (name, fd) in &host.devs {
        let p = Path::new("/dev").join(name);
        fs::File::create(&p).map_err(err(format!("creating {}", p.display())))?;
        sys::move_mount_to(fd.as_fd(), &p).map_err(err(format!("binding {}", p.display())))?;
    }
    fs::create_dir(Path::new("/dev/pts")).map_err(err("mkdir /dev/pts"))?;
    let pts_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    if mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        pts_flags,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .is_err()
    {
        mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            pts_flags,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .map_err(err("mounting /dev/pts"))?;
    }
    fs::create_dir(Path::new("/dev/shm")).map_err(err("mkdir /dev/shm"))?;
    mount_tmpfs(
        Path::new("/dev/shm"),
        nosuid_nodev_noexec,
        "mode=1777,size=65536k",
    )?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, Path::new("/dev").join(link))
            .map_err(err(format!("symlink /dev/{link}")))?;
    }

    ensure_mountpoint(Path::new("/sys"), MountKind::Dir, create)?;
    match &host.sys {
        Some(fd) => {
            sys::move_mount_to(fd.as_fd(), Path::new("/sys")).map_err(err("mounting /sys"))?
        }
        None => mount_tmpfs(
            Path::new("/sys"),
            nosuid_nodev_noexec | MsFlags::MS_RDONLY,
            "mode=0555,size=4k",
        )?,
    }

    if let Some(fd) = &host.resolv {
        let etc = Path::new("/etc");
        if etc.is_dir() && !etc.is_symlink() {
            let p = Path::new("/etc/resolv.conf");
            ensure_mountpoint(p, MountKind::File, create)?;
            sys::move_mount_to(fd.as_fd(), p).map_err(err("binding /etc/resolv.conf"))?;
        }
    }

    ensure_mountpoint(Path::new("/stacker"), MountKind::Dir, create)?;
    mount_tmpfs(
        Path::new("/stacker"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=65536k",
    )?;
    fs::write(SCRIPT_PATH, &spec.script).map_err(err("writing the script"))?;
    fs::set_permissions(SCRIPT_PATH, fs::Permissions::from_mode(0o755))
        .map_err(err("chmod script"))?;

    for (dest, kind, fd) in &host.binds {
        ensure_mountpoint(dest, *kind, create || in_sandbox_tmpfs(dest))?;
        sys::move_mount_to(fd.as_fd(), dest).map_err(err(format!("binding {}", dest.display())))?;
    }
    sys::mount_setattr(None, Path::new("/stacker"), sys::MOUNT_ATTR_RDONLY, false)
        .map_err(err("making /stacker read-only"))?;

    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let mut cmd = if spec.script.starts_with("#!") {
        Command::new(SCRIPT_PATH)
    } else {
        let mut c = Command::new("/bin/sh");
        c.args(["-xe", SCRIPT_PATH]);
        c
    };
    let out = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(err("dup stdout"))?;
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(if spec.interactive {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::inherit())
        .stderr(Stdio::from(out));
    let filter = super::harden::script_filter(spec, warnings)?;
    sys::install_script_pre_exec(&mut cmd, filter);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_reject_separators() {
        let ok = overlay_options(
            &["/a".into(), "/b".into()],
            Path::new("/u"),
            Path::new("/w"),
        )
        .unwrap();
        assert_eq!(ok, "lowerdir=/a:/b,upperdir=/u,workdir=/w,userxattr");
        assert!(overlay_options(&["/a,b".into()], Path::new("/u"), Path::new("/w")).is_err());
        assert!(overlay_options(&[], Path::new("/u"), Path::new("/w")).is_err());
    }

    #[test]
    fn bind_destinations_are_checked() {
        assert!(check_dest(Path::new("/stacker/imports")).is_ok());
        for bad in ["relative", "/", "/proc/x", "/sys", "/a/../b"] {
            assert!(check_dest(Path::new(bad)).is_err(), "{bad}");
        }
    }
}

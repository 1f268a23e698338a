//! The only module of farm-worker with `unsafe` code: the syscalls `nix` does not wrap
//! (open_tree, move_mount, mount_setattr, openat2, pidfd_*, close_range, raw set*id for
//! the fork/exec window), the `pre_exec` hooks, `fork`, signal handlers and xattrs.
//!
//! Every block says why it is sound. Everything here is small and does one syscall.
//! [`btrfs`] holds the pool's ioctls (subvolumes, snapshots, FICLONE).

// The workspace denies `unsafe_code`; this module is where it is allowed, and every block
// says why it is sound (clippy::undocumented_unsafe_blocks is denied too).
#![allow(unsafe_code)]

pub mod btrfs;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

// ---------------------------------------------------------------------------------
// The allocator (the `farm` binary's, for every role: here because this is the module
// that may call into libc unsafely).
// ---------------------------------------------------------------------------------

/// Have glibc's allocator keep at most `arenas` arenas (its default is eight per core).
/// Each thread that allocates gets an arena that keeps what it freed, and a coordinator
/// has many (the runtime, the blocking pool, the state writers, planning): at 20,000
/// layers the scale bench peaked at 430-510 MB of RSS over 163 MB of live heap, and at
/// 253 MB with two arenas on two cores, at the same speed. `false` where the C library
/// is not glibc, or it refused.
pub fn limit_malloc_arenas(arenas: usize) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let n = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt sets an allocator parameter and touches no memory of ours;
        // M_ARENA_MAX takes any positive count and may be set while threads run (it
        // bounds the arenas made after it).
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = arenas;
        false
    }
}

// ---------------------------------------------------------------------------------
// The fork/exec window of the user-namespace child (runs in the parent's forked copy).
// ---------------------------------------------------------------------------------

/// Everything the forked child needs between `fork` and `exec`, as plain integers so the
/// closure allocates nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UsernsPreExec {
    /// `CLONE_NEW*` flags for `unshare`.
    pub clone_flags: libc::c_int,
    /// Write end: the child sends its pid (i32, native endian) once it has unshared.
    pub report_w: RawFd,
    /// Read end: the parent writes one byte `1` once the id maps are written.
    pub go_r: RawFd,
    /// The parent's ends of those two pipes, closed first thing in the child.
    pub parent_ends: [RawFd; 2],
    /// Pid of the process that forks (for the PDEATHSIG race check).
    pub parent_pid: libc::pid_t,
    /// Optional descriptor to place at `pass_fd.1` (e.g. the op request at fd 3).
    pub pass_fd: Option<(RawFd, RawFd)>,
}

/// Installs the user-namespace dance as a `pre_exec` hook: unshare, report the pid, wait
/// until the parent has written the id maps, become root of the namespace, ask for
/// SIGKILL when the parent thread dies, put the passed descriptor in place, mark every
/// other inherited descriptor close-on-exec.
pub(crate) fn install_userns_pre_exec(cmd: &mut Command, p: UsernsPreExec) {
    // SAFETY: the hook runs in the child between fork and exec of a possibly
    // multi-threaded parent, so it may only use async-signal-safe functions. It calls
    // only raw syscalls (close, unshare, getpid, write, read, setgroups, setresgid,
    // setresuid, prctl, getppid, dup2, fcntl, close_range) through `libc`, touches only
    // the `Copy` struct captured by value, and builds errors with
    // `io::Error::from_raw_os_error`/`last_os_error`, which do not allocate.
    unsafe {
        cmd.pre_exec(move || userns_child_setup(&p));
    }
}

fn userns_child_setup(p: &UsernsPreExec) -> io::Result<()> {
    // SAFETY: (the whole function) raw syscalls on descriptors this child owns
    // (inherited copies) and on stack buffers that outlive each call; see
    // install_userns_pre_exec.
    unsafe {
        for fd in p.parent_ends {
            libc::close(fd);
        }
        if libc::unshare(p.clone_flags) != 0 {
            return Err(io::Error::last_os_error());
        }
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(p.report_w, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return Err(io::Error::last_os_error());
        }
        libc::close(p.report_w);
        let mut go = [0u8; 1];
        loop {
            let n = libc::read(p.go_r, go.as_mut_ptr().cast(), 1);
            if n == 1 && go[0] == b'1' {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // The parent could not write the maps (it says why); fail the spawn.
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        libc::close(p.go_r);
        // Drop the host's supplementary groups (they would show as "nogroup"). Best
        // effort: denied setgroups only leaves them in place.
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>());
        // Raw syscalls, not the libc wrappers: glibc's set*id broadcast to other threads
        // is pointless in the single-threaded child and not async-signal-safe.
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // After the id change: a credential change clears PDEATHSIG.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != p.parent_pid {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let mut first_free = 3;
        if let Some((src, dst)) = p.pass_fd {
            if src == dst {
                let flags = libc::fcntl(dst, libc::F_GETFD);
                libc::fcntl(dst, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(src, dst) < 0 {
                return Err(io::Error::last_os_error());
            }
            first_free = dst + 1;
        }
        // Nothing of the worker leaks into the namespace: everything else is closed at
        // exec (std's own exec-error pipe is already close-on-exec).
        libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    Ok(())
}

/// Installs the hook for the build script inside the sandbox: SIGKILL when init dies, a
/// session of its own, every inherited descriptor above 2 closed at exec, then, last
/// before exec, `PR_SET_NO_NEW_PRIVS` and the seccomp `filter` (classic BPF; see
/// `sandbox::seccomp`) when there is one.
pub(crate) fn install_script_pre_exec(cmd: &mut Command, filter: Option<Vec<libc::sock_filter>>) {
    // SAFETY: only async-signal-safe raw syscalls (prctl, setsid, close_range, seccomp);
    // the forking process (sandbox init) is single-threaded anyway. The filter vector
    // is owned by the closure and outlives the seccomp call, which copies it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::setsid();
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)?;
            if let Some(filter) = &filter {
                let prog = libc::sock_fprog {
                    len: filter.len() as libc::c_ushort,
                    filter: filter.as_ptr().cast_mut(),
                };
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0 as libc::c_uint,
                    &prog as *const libc::sock_fprog,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------
// Process helpers for the single-threaded helper inside the namespace.
// ---------------------------------------------------------------------------------

/// Number of threads of this process, from /proc/self/task.
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

pub(crate) enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// `fork` for a process that has exactly one thread (checked), so the child may use
/// the allocator and everything else freely.
pub(crate) fn fork_single_threaded() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork: the process has {threads} threads (the hidden entry point must \
             run before any thread is started)"
        )));
    }
    // SAFETY: with a single thread no lock can be held by another thread at fork time,
    // so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// Takes ownership of a descriptor inherited from the parent (e.g. the op request at
/// fd 3). Only the first call for the process succeeds.
pub(crate) fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other("inherited descriptor already taken"));
    }
    // SAFETY: F_GETFD on any integer is harmless; it tells whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked), was placed there by our parent for this
    // process alone, nothing else in this process refers to it, and the guard above
    // makes this the only OwnedFd ever created for it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

static INIT_PID: AtomicI32 = AtomicI32::new(0);
static TERMINATE_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE_REQUESTED.store(true, Ordering::SeqCst);
    let pid = INIT_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// In the sandbox helper: on SIGTERM (timeout or cancel from the worker), SIGKILL the
/// sandbox's pid 1, which makes the kernel kill every process of the pid namespace.
pub(crate) fn install_terminate_handler() -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_terminate),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only touches atomics and calls kill, both async-signal-safe.
    unsafe { sigaction(Signal::SIGTERM, &action) }.map_err(io::Error::from)?;
    Ok(())
}

/// Records sandbox init's pid for the SIGTERM handler; returns whether a SIGTERM
/// already arrived (the caller must then kill init itself).
pub(crate) fn set_init_pid(pid: libc::pid_t) -> bool {
    INIT_PID.store(pid, Ordering::SeqCst);
    TERMINATE_REQUESTED.load(Ordering::SeqCst)
}

/// Whether the helper got SIGTERM.
pub(crate) fn terminate_requested() -> bool {
    TERMINATE_REQUESTED.load(Ordering::SeqCst)
}

/// In sandbox init: back to the default SIGTERM disposition (the helper's handler is
/// inherited across fork).
pub(crate) fn reset_terminate_handler() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing SIG_DFL has no handler code to be unsound.
    unsafe { signal(Signal::SIGTERM, SigHandler::SigDfl) }.map_err(io::Error::from)?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// pidfd
// ---------------------------------------------------------------------------------

/// `pidfd_open(pid, 0)`: a descriptor that names exactly this process (no pid reuse
/// race) and becomes readable when it exits.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) })?;
    // SAFETY: the kernel just returned this new descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall; the siginfo pointer may be NULL.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// Registers a pidfd with the tokio reactor (readable once the process has exited).
pub(crate) fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open and returns the same number from
    // as_raw_fd for as long as the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

// ---------------------------------------------------------------------------------
// The new mount API (detached mounts), openat2
// ---------------------------------------------------------------------------------

const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC [| AT_RECURSIVE])`:
/// a detached copy of the mount at `path`, to attach later with [`move_mount_to`]
/// (after pivot_root, so the destination resolves inside the new root).
pub(crate) fn open_tree_clone(path: &Path, recursive: bool) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let mut flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) })?;
    // SAFETY: new descriptor from the kernel, solely ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A new, detached proc mount (`fsopen("proc")`, `fsconfig(CREATE)`, `fsmount`) with
/// nosuid/nodev/noexec, for the pid namespace of the caller. Made while the host's /proc
/// is still in the mount namespace: the kernel only lets a user namespace mount proc
/// when a fully visible proc is there ("mount too revealing"), and checks it at fsmount.
pub(crate) fn fsmount_proc() -> io::Result<OwnedFd> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    let fstype = c"proc";
    // SAFETY: valid string alive for the call.
    let fs = cvt(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: new descriptor from the kernel, solely ours.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    // SAFETY: FSCONFIG_CMD_CREATE takes NULL key/value and aux 0.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    let attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    // SAFETY: plain syscall on our fs context descriptor.
    let m = cvt(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            attrs as libc::c_uint,
        )
    })?;
    // SAFETY: new descriptor from the kernel, solely ours.
    Ok(unsafe { OwnedFd::from_raw_fd(m as RawFd) })
}

/// `mount_setattr` on a detached mount (fd) or a path: sets `set` flags (MOUNT_ATTR_*),
/// optionally on the whole subtree.
pub(crate) fn mount_setattr(
    fd: Option<BorrowedFd<'_>>,
    path: &Path,
    set: u64,
    recursive: bool,
) -> io::Result<()> {
    let c = cstring(path)?;
    let mut attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let (dirfd, mut flags) = match fd {
        Some(fd) => (fd.as_raw_fd(), libc::AT_EMPTY_PATH),
        None => (libc::AT_FDCWD, 0),
    };
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: valid string and a properly sized, initialised repr(C) struct, both alive
    // for the duration of the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            c.as_ptr(),
            flags as libc::c_uint,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// `move_mount(fd, "", AT_FDCWD, dest, F_EMPTY_PATH | T_SYMLINKS)`: attaches a detached
/// mount at `dest` (symlinks followed, as mount(2) does).
pub(crate) fn move_mount_to(fd: BorrowedFd<'_>, dest: &Path) -> io::Result<()> {
    let empty = c"";
    let c = cstring(dest)?;
    // SAFETY: valid strings alive for the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS,
        )
    })?;
    Ok(())
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(root, path, O_PATH | O_CLOEXEC, RESOLVE_IN_ROOT)`: resolves `path` as if
/// `root` were `/` (symlinks cannot escape it).
pub(crate) fn open_in_root(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT,
    };
    // SAFETY: valid string and struct alive for the call, correct size passed.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    // SAFETY: new descriptor from the kernel, solely ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

// ---------------------------------------------------------------------------------
// xattrs (for reading overlay markers: `user.overlay.opaque`, ...)
// ---------------------------------------------------------------------------------

/// `lgetxattr`: the value of `name` on `path` (not following a final symlink), or None.
pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let c = cstring(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid strings; `buf` is writable for `buf.len()` bytes.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// `llistxattr`: the names of the extended attributes of `path` (not following a final
/// symlink). Names this process may not see (e.g. `trusted.*` in a user namespace) are
/// omitted by the kernel.
pub fn llistxattr(path: &Path) -> io::Result<Vec<String>> {
    let c = cstring(path)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: valid string; `buf` is writable for `buf.len()` bytes.
        let r = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| OsStr::from_bytes(s).to_string_lossy().into_owned())
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------
// Network: the loopback interface of a new network namespace
// ---------------------------------------------------------------------------------

/// `struct ifreq` with the `ifr_flags` member of its union (the union is 24 bytes on
/// 64-bit Linux; the padding keeps the struct its full 40 bytes).
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;

/// Brings `lo` up in the caller's network namespace (SIOCGIFFLAGS, then SIOCSIFFLAGS
/// with IFF_UP): a new namespace's loopback starts down.
pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let fd = cvt(fd as libc::c_long)?;
    // SAFETY: new descriptor from the kernel, solely ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut req = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    let ptr = &mut req as *mut IfreqFlags;
    // SAFETY: `req` is a properly sized, initialised ifreq that outlives the call; the
    // kernel writes only ifr_flags.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, ptr) };
    cvt(r as libc::c_long)?;
    req.flags |= libc::IFF_UP as libc::c_short;
    let ptr = &mut req as *mut IfreqFlags;
    // SAFETY: as above; the kernel only reads the struct.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, ptr) };
    cvt(r as libc::c_long)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_env = "gnu")]
    fn glibc_takes_an_arena_limit() {
        assert!(super::limit_malloc_arenas(4));
        assert!(super::limit_malloc_arenas(0), "at least one arena");
        // Allocation goes on as before.
        let v: Vec<u64> = (0..1_000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }
}

//! Processes in a new user namespace, as root of that namespace, with the worker's
//! [`IdMapping`] — and the hidden entry point through which the `farm` binary runs code
//! of this crate there.
//!
//! A multi-threaded (tokio) process cannot `unshare(CLONE_NEWUSER)` itself, so every
//! namespaced step runs in a child:
//!
//! 1. [`UsernsCommand::spawn`] forks on one long-lived "spawner" thread (so that the
//!    child's PDEATHSIG, which fires when the *thread* that forked it exits, only fires
//!    when the worker process dies). The child's `pre_exec` hook unshares the user
//!    namespace (plus mount, and optionally pid/uts/ipc), sends its pid over a pipe and
//!    blocks on a second pipe.
//! 2. A short-lived mapper thread of the parent writes the id maps (newuidmap/newgidmap,
//!    or /proc/PID/*_map as real root) and releases the child.
//! 3. The child becomes uid/gid 0 of the namespace, drops supplementary groups, sets
//!    PDEATHSIG=SIGKILL, marks every inherited descriptor close-on-exec and execs.
//!
//! The program can be anything (`/bin/tar`, ...), or the `farm` binary itself through the
//! hidden entry point ([`HIDDEN_SUBCOMMAND`], [`run_hidden_entry_if_requested`]): the
//! parent then passes one op ([`crate::ops::Op`], as JSON) in a memfd at fd 3, and the
//! entry point runs it ([`NsOp::run`]) with the stdin/stdout/stderr the parent chose
//! (pipes for streaming tar in and out).

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::idmap::{IdMapError, IdMapping};
use crate::sys;

/// `argv[1]` that makes the `farm` binary run [`hidden_main`].
pub const HIDDEN_SUBCOMMAND: &str = "__farm-userns";

/// The descriptor on which the hidden entry point receives its op request.
const OP_FD: i32 = 3;

/// What the hidden entry point runs: a request type read from fd 3 as JSON. The worker's
/// is [`crate::ops::Op`]; another entry point (a test binary) may serve its own.
pub trait NsOp: Serialize + DeserializeOwned {
    /// Printed on stderr when [`run`](Self::run) fails (the process then exits 1).
    type Error: std::fmt::Display;

    /// Runs in the user namespace as container root, with the stdin/stdout/stderr the
    /// parent set on the [`UsernsCommand`]. Must run while the process has a single
    /// thread (the sandbox forks).
    fn run(self) -> Result<(), Self::Error>;
}

/// Errors of starting a process in a user namespace.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error(transparent)]
    IdMap(#[from] IdMapError),
    #[error("writing the id maps of pid {pid}: {source}")]
    Maps { pid: i32, source: io::Error },
    #[error("starting {program} in a user namespace: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// How to start the hidden entry point: an executable and the arguments that lead to
/// [`hidden_main`] (usually `[HIDDEN_SUBCOMMAND]`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Entry {
    /// `exe __farm-userns`.
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        Entry {
            exe: exe.into(),
            args: vec![HIDDEN_SUBCOMMAND.into()],
        }
    }

    /// The running executable (`/proc/self/exe` resolved) with the hidden subcommand.
    pub fn current_exe() -> io::Result<Self> {
        Ok(Self::new(std::env::current_exe()?))
    }
}

/// The handle a worker keeps: how to enter the namespace and with which id mapping.
#[derive(Clone, Debug)]
pub struct Userns {
    entry: Entry,
    mapping: IdMapping,
}

impl Userns {
    pub fn new(entry: Entry, mapping: IdMapping) -> Self {
        Userns { entry, mapping }
    }

    /// [`IdMapping::detect`] for the current user.
    pub fn detect(entry: Entry) -> Result<Self, UsernsError> {
        Ok(Self::new(entry, IdMapping::detect()?))
    }

    pub fn mapping(&self) -> &IdMapping {
        &self.mapping
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Any program, run as root of a new user + mount namespace (no rootfs change: it
    /// sees the host's filesystem with the container's ids).
    pub fn command(&self, program: impl AsRef<OsStr>) -> UsernsCommand {
        UsernsCommand::new(program, self.mapping.clone())
    }

    /// The hidden entry point running one of the worker's ops.
    pub fn op_command(&self, op: &crate::ops::Op) -> Result<UsernsCommand, UsernsError> {
        self.request_command(op)
    }

    /// The hidden entry point running `request`, for an entry point that serves a
    /// request type of its own ([`NsOp`]); the worker's ops go through
    /// [`op_command`](Self::op_command).
    pub fn request_command(&self, request: &impl Serialize) -> Result<UsernsCommand, UsernsError> {
        let mut cmd = self.command(&self.entry.exe);
        cmd.args(&self.entry.args);
        cmd.op_request(request)?;
        Ok(cmd)
    }
}

/// Like [`std::process::Command`], for a child that starts as root of a new user
/// namespace. Defaults: stdin, stdout and stderr null; the environment is inherited
/// unless [`env_clear`](Self::env_clear) is called; namespaces user + mount.
pub struct UsernsCommand {
    cmd: Command,
    program: String,
    mapping: IdMapping,
    clone_flags: libc::c_int,
    op_fd: Option<OwnedFd>,
}

impl UsernsCommand {
    pub fn new(program: impl AsRef<OsStr>, mapping: IdMapping) -> Self {
        let mut cmd = Command::new(program.as_ref());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        UsernsCommand {
            cmd,
            program: program.as_ref().to_string_lossy().into_owned(),
            mapping,
            clone_flags: libc::CLONE_NEWUSER | libc::CLONE_NEWNS,
            op_fd: None,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&mut self, args: I) -> &mut Self {
        self.cmd.args(args);
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> &mut Self {
        self.cmd.env(key, val);
        self
    }

    pub fn env_clear(&mut self) -> &mut Self {
        self.cmd.env_clear();
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.cmd.current_dir(dir);
        self
    }

    pub fn stdin(&mut self, cfg: impl Into<Stdio>) -> &mut Self {
        self.cmd.stdin(cfg);
        self
    }

    pub fn stdout(&mut self, cfg: impl Into<Stdio>) -> &mut Self {
        self.cmd.stdout(cfg);
        self
    }

    pub fn stderr(&mut self, cfg: impl Into<Stdio>) -> &mut Self {
        self.cmd.stderr(cfg);
        self
    }

    /// Also unshare pid, uts and ipc namespaces (the sandbox does). With a new pid
    /// namespace the child's first child is pid 1 there, and once that one exits the
    /// child can fork no more: leave it off for ops that run subprocesses.
    pub fn isolate_pid_uts_ipc(&mut self, on: bool) -> &mut Self {
        let extra = libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if on {
            self.clone_flags |= extra;
        } else {
            self.clone_flags &= !extra;
        }
        self
    }

    /// Leave the pid namespace out of [`isolate_pid_uts_ipc`](Self::isolate_pid_uts_ipc)
    /// (`false`) or put it back: the child stays in its parent's pid namespace.
    pub fn isolate_pid(&mut self, on: bool) -> &mut Self {
        if on {
            self.clone_flags |= libc::CLONE_NEWPID;
        } else {
            self.clone_flags &= !libc::CLONE_NEWPID;
        }
        self
    }

    /// Also unshare the network namespace: the child sees only its own loopback
    /// (down until someone brings it up).
    pub fn isolate_net(&mut self, on: bool) -> &mut Self {
        if on {
            self.clone_flags |= libc::CLONE_NEWNET;
        } else {
            self.clone_flags &= !libc::CLONE_NEWNET;
        }
        self
    }

    fn op_request(&mut self, req: &impl Serialize) -> io::Result<()> {
        let fd = nix::sys::memfd::memfd_create(
            c"farm-userns-op",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut file = std::fs::File::from(fd);
        serde_json::to_writer(&mut file, req).map_err(io::Error::other)?;
        file.rewind()?;
        self.op_fd = Some(file.into());
        Ok(())
    }

    /// Starts the child. Blocks for the few milliseconds of fork + id mapping + exec
    /// (from async code prefer [`spawn_async`](Self::spawn_async)).
    pub fn spawn(self) -> Result<UsernsChild, UsernsError> {
        let (tx, rx) = mpsc::channel();
        submit(Box::new(move || {
            let _ = tx.send(self.spawn_here());
        }));
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("spawner thread gone").into()))
    }

    /// [`spawn`](Self::spawn) without blocking the async executor.
    pub async fn spawn_async(self) -> Result<UsernsChild, UsernsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        submit(Box::new(move || {
            let _ = tx.send(self.spawn_here());
        }));
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("spawner thread gone").into()))
    }

    /// Runs on the spawner thread.
    fn spawn_here(mut self) -> Result<UsernsChild, UsernsError> {
        let (report_r, report_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let (go_r, go_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        sys::install_userns_pre_exec(
            &mut self.cmd,
            sys::UsernsPreExec {
                clone_flags: self.clone_flags,
                report_w: report_w.as_raw_fd(),
                go_r: go_r.as_raw_fd(),
                parent_ends: [report_r.as_raw_fd(), go_w.as_raw_fd()],
                parent_pid: std::process::id() as i32,
                pass_fd: self.op_fd.as_ref().map(|fd| (fd.as_raw_fd(), OP_FD)),
            },
        );
        let mapping = self.mapping.clone();
        let (spawned, mapped) = std::thread::scope(|s| {
            let mapper = s.spawn(move || map_child(report_r, go_w, &mapping));
            let spawned = self.cmd.spawn();
            // Our copies of the child's ends: once closed, the mapper sees EOF if the
            // child died before reporting its pid.
            drop(report_w);
            drop(go_r);
            (
                spawned,
                mapper
                    .join()
                    .unwrap_or_else(|_| Err((0, io::Error::other("mapper panicked")))),
            )
        });
        let mut child = match (spawned, mapped) {
            (Ok(child), Ok(_)) => child,
            (Ok(mut child), Err((pid, source))) => {
                // Cannot happen (the child waits for the go byte), but never leak it.
                let _ = child.kill();
                let _ = child.wait();
                return Err(UsernsError::Maps { pid, source });
            }
            (Err(_), Err((pid, source))) if pid != 0 => {
                return Err(UsernsError::Maps { pid, source });
            }
            (Err(source), _) => {
                return Err(UsernsError::Spawn {
                    program: self.program,
                    source,
                });
            }
        };
        let pidfd = match sys::pidfd_open(child.id() as i32) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        tracing::debug!(pid = child.id(), program = %self.program, "started in user namespace");
        Ok(UsernsChild {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            pidfd,
        })
    }
}

/// Mapper thread: wait for the child's pid, write its maps, release it.
fn map_child(
    report_r: OwnedFd,
    go_w: OwnedFd,
    mapping: &IdMapping,
) -> Result<i32, (i32, io::Error)> {
    let mut buf = [0u8; 4];
    let mut report = std::fs::File::from(report_r);
    if let Err(e) = report.read_exact(&mut buf) {
        return Err((
            0,
            io::Error::new(e.kind(), format!("child exited before unsharing: {e}")),
        ));
    }
    let pid = i32::from_ne_bytes(buf);
    let result = mapping.write_maps(pid);
    let mut go = std::fs::File::from(go_w);
    let byte = if result.is_ok() { b"1" } else { b"0" };
    let _ = go.write_all(byte);
    result.map(|_| pid).map_err(|e| (pid, e))
}

type Job = Box<dyn FnOnce() + Send>;

/// Queues a job on the spawner thread, which lives as long as the process.
fn submit(job: Job) {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("farm-userns-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("starting the userns spawner thread");
        tx
    });
    tx.send(job).expect("userns spawner thread is gone");
}

/// A running child in a user namespace. Dropping it does not kill it; call
/// [`kill`](Self::kill).
pub struct UsernsChild {
    child: Child,
    pidfd: OwnedFd,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl UsernsChild {
    /// Host pid of the child.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` through the pidfd (never hits a recycled pid).
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> io::Result<()> {
        match sys::pidfd_send_signal(self.pidfd.as_fd(), sig as libc::c_int) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// A second descriptor for this process (to signal it while another task waits).
    pub fn pidfd_clone(&self) -> io::Result<OwnedFd> {
        self.pidfd.try_clone()
    }

    /// SIGKILL.
    pub fn kill(&self) -> io::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGKILL)
    }

    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the child, blocking the thread.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Waits for the child without blocking the executor (the pidfd becomes readable
    /// when it exits).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let fd = sys::async_pidfd(self.pidfd.try_clone()?)?;
        loop {
            let mut guard = fd.readable().await?;
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            guard.clear_ready();
        }
    }
}

/// For the `farm` binary's `main`, before anything else (before starting threads, a
/// tokio runtime or logging): if `argv[1]` is [`HIDDEN_SUBCOMMAND`], runs the worker's op
/// ([`crate::ops::Op`]) passed by the parent and never returns; otherwise returns.
pub fn run_hidden_entry_if_requested() {
    run_hidden_entry_with::<crate::ops::Op>()
}

/// [`run_hidden_entry_if_requested`] for an entry point serving request type `O`.
pub fn run_hidden_entry_with<O: NsOp>() {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(HIDDEN_SUBCOMMAND)) {
        hidden_main::<O>()
    }
}

/// Why the hidden entry point has no request to run.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{HIDDEN_SUBCOMMAND} is internal to farm (no op request on fd {OP_FD}: {0})")]
    NoRequest(io::Error),
    #[error(transparent)]
    Read(io::Error),
    #[error(transparent)]
    Parse(serde_json::Error),
}

fn read_request<O: NsOp>() -> Result<O, RequestError> {
    let fd = sys::take_inherited_fd(OP_FD).map_err(RequestError::NoRequest)?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .read_to_string(&mut text)
        .map_err(RequestError::Read)?;
    serde_json::from_str(&text).map_err(RequestError::Parse)
}

/// The hidden entry point: reads the request from fd 3 and runs it. Must run while the
/// process has a single thread (the sandbox forks).
pub fn hidden_main<O: NsOp>() -> ! {
    let result = match read_request::<O>() {
        Ok(op) => op.run().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(io::stderr(), "farm userns op failed: {e}");
            std::process::exit(1)
        }
    }
}

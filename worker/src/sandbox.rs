//! The build sandbox: one script, run as root of a new user namespace, in a new
//! mount/pid/uts/ipc namespace, on an overlay (or a plain directory) as its root.
//!
//! Processes (host view):
//!
//! ```text
//! worker (tokio) --spawn--> helper: `farm __farm-userns`, op "sandbox"   (userns, mntns;
//!                            |                                           outside the new pidns)
//!                            +--fork--> init, pid 1 of the new pid namespace: mounts,
//!                                        pivot_root, then reaps
//!                                        +--fork/exec--> /bin/sh -xe /stacker/.farm-run (pid 2)
//! ```
//!
//! * Output: the script's stdout and stderr are one pipe (fd 1 and 2 are the same pipe),
//!   read by the worker and handed to the caller line by line as written.
//! * Status: init reports the script's exit (code or signal) to the helper over a pipe;
//!   the helper prints one result line on its stderr (`FARM-SANDBOX-RESULT {json}`).
//! * End: when the script exits, init exits, and the kernel kills whatever is left in
//!   the pid namespace. Timeout and cancel send SIGTERM to the helper, whose handler
//!   SIGKILLs init; the helper's `waitpid(init)` only returns once the kernel has reaped
//!   every process of the namespace, so when [`Userns::run_sandbox`] returns, nothing of
//!   the build is left. If the worker dies, PDEATHSIG (helper <- worker's spawner
//!   thread, init <- helper, script <- init) tears everything down too.
//!
//! Mounts, in init: hostname; `/` made rprivate; a private tmpfs on
//! [`SandboxSpec::mount_dir`] for staging; host sources cloned as detached mounts
//! (open_tree) while the host tree is visible: /dev nodes, /sys (recursive, then
//! read-only + nosuid/nodev/noexec recursively with mount_setattr), /etc/resolv.conf
//! (read-only), bind sources (read-only on request); the rootfs mounted; pivot_root into
//! it and the old root detached; then, inside: /proc (fresh), /dev (tmpfs with the
//! device binds, devpts, shm, symlinks), /sys, /etc/resolv.conf, /stacker (tmpfs with
//! the script, read-only once populated) and the binds. Destinations are resolved after
//! pivot_root, so a symlink in the rootfs cannot point a mount outside it.
//!
//! Nothing of the sandbox reaches the overlay's upper dir: mountpoints missing from
//! the base (typically /stacker, or /proc in a minimal base, or a bind destination) come
//! from a tiny "skeleton" layer on top of the lower layers (in the staging tmpfs, dirs
//! with the base's own mode/owner/times), never from the upper dir. Mounting on a
//! directory does not copy it up. A script that changes such a skeleton directory
//! itself (chmod /stacker) would copy it up like any lower directory. In
//! [`Rootfs::Bind`] mode missing mountpoints are created in the directory.
//!
//! The upper dir's own mode and owner become those of `/` in the container; init copies
//! them from the (first) lower root before mounting.
//!
//! /sys: sysfs cannot be mounted fresh in a user namespace that does not own the network
//! namespace (farm keeps the host network), so the host's /sys is bind-mounted
//! recursively and made read-only. If that fails, /sys is an empty read-only tmpfs and
//! the run reports a warning.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::sys;
use crate::userns::{Userns, UsernsError};

/// Where the script is put inside the sandbox (a tmpfs, never captured).
pub const SCRIPT_PATH: &str = "/stacker/.farm-run";

const RESULT_PREFIX: &str = "FARM-SANDBOX-RESULT ";
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const MAX_LINE: usize = 64 * 1024;

/// What to run and on what.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub rootfs: Rootfs,
    /// An empty directory on the host. Inside its own mount namespace the sandbox mounts
    /// a private staging tmpfs on it; nothing is written to it and nothing shows on the
    /// host.
    pub mount_dir: PathBuf,
    /// The script. Without a `#!` line it runs as `/bin/sh -xe SCRIPT`.
    pub script: String,
    /// The complete environment of the script (nothing of the host leaks).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Extra bind mounts, mounted in order (`/stacker/imports` read-only is one).
    #[serde(default)]
    pub binds: Vec<Bind>,
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Kill the whole build after this long.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Give the script this process's stdin/stdout (a shell for `farm chroot`) instead
    /// of no stdin and captured output.
    #[serde(default)]
    pub interactive: bool,
}

fn default_hostname() -> String {
    "stacker".into()
}

impl SandboxSpec {
    pub fn new(rootfs: Rootfs, mount_dir: impl Into<PathBuf>, script: impl Into<String>) -> Self {
        SandboxSpec {
            rootfs,
            mount_dir: mount_dir.into(),
            script: script.into(),
            env: Vec::new(),
            binds: Vec::new(),
            hostname: default_hostname(),
            timeout: None,
            interactive: false,
        }
    }
}

/// The root filesystem of the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Rootfs {
    /// Rootless overlay (`userxattr`): `lower` top-most first (read-only), `upper` and
    /// `work` empty directories on the same filesystem, owned by container root. After
    /// the run `upper` is exactly the change: new/changed files, whiteouts (char device
    /// 0:0) for deletions, `user.overlay.opaque=y` on directories that replaced a lower
    /// one. `work` keeps an internal `work/` directory (mode 000) to delete. Overlay also
    /// marks copied-up directories with `user.overlay.origin` (and may add
    /// `user.overlay.impure`): capture must not copy `user.overlay.*` xattrs into a layer.
    Overlay {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
    },
    /// A plain directory, bind-mounted; changes are made in place.
    Bind(PathBuf),
}

/// One bind mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bind {
    /// Host path (file or directory); mounted recursively.
    pub source: PathBuf,
    /// Absolute path in the sandbox.
    pub dest: PathBuf,
    pub readonly: bool,
}

impl Bind {
    /// `source` read-only at `/stacker/imports`.
    pub fn imports(source: impl Into<PathBuf>) -> Self {
        Bind {
            source: source.into(),
            dest: "/stacker/imports".into(),
            readonly: true,
        }
    }
}

/// How the script ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScriptStatus {
    Exited(i32),
    Signaled(i32),
}

impl ScriptStatus {
    pub fn success(&self) -> bool {
        *self == ScriptStatus::Exited(0)
    }
}

/// Why a run produced no [`ScriptStatus`].
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Userns(#[from] UsernsError),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("timed out after {0:?}; the build was killed")]
    TimedOut(Duration),
    #[error("cancelled; the build was killed")]
    Cancelled,
    #[error("sandbox helper failed ({status}): {stderr}")]
    Helper { status: String, stderr: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Cancels a run from anywhere (clone it freely).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
    /// Cancelling the parent cancels this token too (one job's token under the
    /// engine-wide one).
    parent: Option<CancelToken>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled by its own `cancel` or by this one's.
    pub fn child(&self) -> Self {
        CancelToken(Arc::new(CancelInner {
            parent: Some(self.clone()),
            ..Default::default()
        }))
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
            || self.0.parent.as_ref().is_some_and(|p| p.is_cancelled())
    }

    /// Resolves once [`cancel`](Self::cancel) has been called (here or on a parent).
    pub async fn cancelled(&self) {
        match &self.0.parent {
            Some(parent) => {
                tokio::select! {
                    _ = self.own_cancelled() => {}
                    _ = Box::pin(parent.cancelled()) => {}
                }
            }
            None => self.own_cancelled().await,
        }
    }

    async fn own_cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// What the helper prints as its last stderr line.
#[derive(Debug, Serialize, Deserialize)]
struct HelperReport {
    outcome: Outcome,
    warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Finished(ScriptStatus),
    SetupFailed(String),
    Killed,
    InitDied(String),
}

/// Messages from init to the helper, one JSON per line.
#[derive(Debug, Serialize, Deserialize)]
enum InitMsg {
    Warning(String),
    SetupFailed(String),
    Finished(ScriptStatus),
}

/// Kills the helper (SIGKILL) when dropped while armed: a dropped run future leaves
/// nothing behind (init and the script die by PDEATHSIG).
struct KillOnDrop {
    pidfd: OwnedFd,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        }
    }
}

impl Userns {
    /// Runs `spec` in the sandbox; `on_line` gets each line of the script's merged
    /// stdout/stderr as it is written (without the newline; invalid UTF-8 replaced; lines
    /// over 64 KiB split). Returns how the script ended, or why it has no status.
    pub async fn run_sandbox<F: FnMut(&str)>(
        &self,
        spec: &SandboxSpec,
        cancel: Option<&CancelToken>,
        mut on_line: F,
    ) -> Result<ScriptStatus, SandboxError> {
        let started = Instant::now();
        let mut cmd = self.op_command(&crate::ops::Op::Sandbox(spec.clone()))?;
        cmd.isolate_pid_uts_ipc(true)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if spec.interactive {
            cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
        }
        let mut child = cmd.spawn_async().await?;
        let mut killer = KillOnDrop {
            pidfd: child.pidfd_clone()?,
            armed: true,
        };
        let mut out = match child.stdout.take() {
            Some(o) => Some(tokio::process::ChildStdout::from_std(o)?),
            None => None,
        };
        let mut err = tokio::process::ChildStderr::from_std(child.stderr.take().expect("piped"))?;

        let deadline = spec
            .timeout
            .map(|t| tokio::time::Instant::from_std(started + t));
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut kill_reason: Option<SandboxError> = None;
        let mut escalate_at = far;
        let mut drain_until = far;
        let mut status = None;
        let (mut out_done, mut err_done) = (out.is_none(), false);
        let mut line = Vec::new();
        let mut control = Vec::new();
        let mut obuf = vec![0u8; 16 * 1024];
        let mut ebuf = vec![0u8; 4096];
        let wait = child.wait();
        tokio::pin!(wait);
        let cancelled = async {
            match cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(cancelled);

        while status.is_none() || !out_done || !err_done {
            tokio::select! {
                n = read_some(&mut out, &mut obuf), if !out_done => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        out_done = true;
                        if !line.is_empty() {
                            on_line(&String::from_utf8_lossy(&line));
                            line.clear();
                        }
                    } else {
                        split_lines(&mut line, &obuf[..n], &mut on_line);
                    }
                }
                n = err.read(&mut ebuf), if !err_done => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        err_done = true;
                    } else if control.len() < 1 << 20 {
                        control.extend_from_slice(&ebuf[..n]);
                    }
                }
                st = &mut wait, if status.is_none() => {
                    status = Some(st?);
                    killer.armed = false;
                    drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if kill_reason.is_none() && deadline.is_some() && status.is_none() => {
                    tracing::info!(timeout = ?spec.timeout, "sandbox timed out, killing the build");
                    kill_reason = Some(SandboxError::TimedOut(spec.timeout.unwrap_or_default()));
                    let _ = sys::pidfd_send_signal(killer.pidfd.as_fd(), libc::SIGTERM);
                    escalate_at = tokio::time::Instant::now() + Duration::from_secs(10);
                }
                _ = &mut cancelled, if kill_reason.is_none() && status.is_none() => {
                    tracing::info!("sandbox cancelled, killing the build");
                    kill_reason = Some(SandboxError::Cancelled);
                    let _ = sys::pidfd_send_signal(killer.pidfd.as_fd(), libc::SIGTERM);
                    escalate_at = tokio::time::Instant::now() + Duration::from_secs(10);
                }
                _ = tokio::time::sleep_until(escalate_at), if status.is_none() && kill_reason.is_some() => {
                    tracing::warn!("sandbox helper did not stop on SIGTERM, sending SIGKILL");
                    let _ = sys::pidfd_send_signal(killer.pidfd.as_fd(), libc::SIGKILL);
                    escalate_at = far;
                }
                _ = tokio::time::sleep_until(drain_until), if status.is_some() => {
                    tracing::warn!("sandbox output still open 5s after the build ended; giving up on it");
                    break;
                }
            }
        }
        let status = status.expect("loop ends after exit");
        let control = String::from_utf8_lossy(&control);
        let report = control
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(RESULT_PREFIX))
            .and_then(|j| serde_json::from_str::<HelperReport>(j).ok());
        let diagnostics: String = control
            .lines()
            .filter(|l| !l.starts_with(RESULT_PREFIX))
            .collect::<Vec<_>>()
            .join("\n");
        if !diagnostics.is_empty() {
            tracing::warn!(%diagnostics, "sandbox helper stderr");
        }
        let Some(report) = report else {
            return Err(kill_reason.unwrap_or(SandboxError::Helper {
                status: status.to_string(),
                stderr: diagnostics,
            }));
        };
        for w in &report.warnings {
            tracing::warn!(warning = %w, "sandbox");
        }
        tracing::debug!(elapsed = ?started.elapsed(), outcome = ?report.outcome, "sandbox finished");
        match report.outcome {
            Outcome::Finished(s) => Ok(s),
            Outcome::SetupFailed(m) => Err(SandboxError::Setup(m)),
            Outcome::Killed => Err(kill_reason.unwrap_or(SandboxError::Cancelled)),
            Outcome::InitDied(m) => Err(kill_reason.unwrap_or(SandboxError::Helper {
                status: m,
                stderr: diagnostics,
            })),
        }
    }
}

/// Read from an optional pipe (none: end of stream).
async fn read_some(
    pipe: &mut Option<tokio::process::ChildStdout>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => Ok(0),
    }
}

fn split_lines<F: FnMut(&str)>(line: &mut Vec<u8>, mut data: &[u8], on_line: &mut F) {
    while let Some(i) = data.iter().position(|b| *b == b'\n') {
        line.extend_from_slice(&data[..i]);
        on_line(&String::from_utf8_lossy(line));
        line.clear();
        data = &data[i + 1..];
    }
    line.extend_from_slice(data);
    while line.len() >= MAX_LINE {
        let rest = line.split_off(MAX_LINE);
        on_line(&String::from_utf8_lossy(line));
        *line = rest;
    }
}

// =====================================================================================
// Inside the namespace: the helper (outside the new pid namespace) and init (pid 1).
// =====================================================================================

/// The sandbox op of the hidden entry point ([`crate::ops::Op::Sandbox`]).
pub(crate) fn helper_main(spec: SandboxSpec) -> ! {
    let report = helper(spec);
    let line = serde_json::to_string(&report).unwrap_or_else(|_| "{}".into());
    let _ = writeln!(io::stderr(), "{RESULT_PREFIX}{line}");
    std::process::exit(0)
}

fn helper(spec: SandboxSpec) -> HelperReport {
    let mut warnings = Vec::new();
    let failed = |m: String, warnings: Vec<String>| HelperReport {
        outcome: Outcome::SetupFailed(m),
        warnings,
    };
    if let Err(e) = sys::install_terminate_handler() {
        return failed(format!("installing SIGTERM handler: {e}"), warnings);
    }
    let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .and_then(|a| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|b| (a, b)));
    let ((report_r, report_w), (life_r, life_w)) = match pipes {
        Ok(p) => p,
        Err(e) => return failed(format!("pipe: {e}"), warnings),
    };
    let pid = match sys::fork_single_threaded() {
        Err(e) => return failed(format!("fork: {e}"), warnings),
        Ok(sys::Forked::Child) => {
            drop(report_r);
            drop(life_w);
            init_main(&spec, report_w, life_r)
        }
        Ok(sys::Forked::Parent(pid)) => pid,
    };
    drop(report_w);
    drop(life_r);
    if sys::set_init_pid(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut finished = None;
    let mut setup_error = None;
    for line in io::BufReader::new(fs::File::from(report_r)).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<InitMsg>(&line) {
            Ok(InitMsg::Warning(w)) => warnings.push(w),
            Ok(InitMsg::SetupFailed(m)) => setup_error = Some(m),
            Ok(InitMsg::Finished(s)) => finished = Some(s),
            Err(_) => warnings.push(format!("init said: {line}")),
        }
    }
    // Returns only when every process of the pid namespace is gone.
    let wait = loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    drop(life_w);
    let outcome = match (finished, setup_error) {
        (Some(s), _) => Outcome::Finished(s),
        (None, Some(m)) => Outcome::SetupFailed(m),
        (None, None) if sys::terminate_requested() => Outcome::Killed,
        (None, None) => Outcome::InitDied(format!("{wait:?}")),
    };
    HelperReport { outcome, warnings }
}

fn send(report: &mut fs::File, msg: &InitMsg) {
    if let Ok(mut s) = serde_json::to_string(msg) {
        s.push('\n');
        let _ = report.write_all(s.as_bytes());
    }
}

/// pid 1 of the new pid namespace.
fn init_main(spec: &SandboxSpec, report_w: OwnedFd, life_r: OwnedFd) -> ! {
    let mut report = fs::File::from(report_w);
    let _ = sys::reset_terminate_handler();
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
        std::process::exit(125);
    }
    // The helper may have died before PDEATHSIG was armed: then the lifeline is at EOF.
    let _ = nix::fcntl::fcntl(
        &life_r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut b = [0u8; 1];
    if let Ok(0) = nix::unistd::read(&life_r, &mut b) {
        std::process::exit(125);
    }
    drop(life_r);
    let _ = nix::sys::prctl::set_name(c"init");

    let mut warnings = Vec::new();
    let setup_result = setup(spec, &mut warnings);
    for w in warnings {
        send(&mut report, &InitMsg::Warning(w));
    }
    let mut cmd = match setup_result {
        Ok(cmd) => cmd,
        Err(e) => {
            send(&mut report, &InitMsg::SetupFailed(e));
            std::process::exit(126);
        }
    };
    let script = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let prog = cmd.get_program().to_string_lossy().into_owned();
            send(
                &mut report,
                &InitMsg::SetupFailed(format!("cannot run {prog}: {e}")),
            );
            std::process::exit(126);
        }
    };
    let script_pid = nix::unistd::Pid::from_raw(script.id() as i32);
    use nix::sys::wait::{WaitStatus, waitpid};
    let status = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == script_pid => {
                break ScriptStatus::Exited(code);
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == script_pid => {
                break ScriptStatus::Signaled(sig as i32);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                send(
                    &mut report,
                    &InitMsg::SetupFailed(format!("waiting for the script: {e}")),
                );
                std::process::exit(126);
            }
        }
    };
    send(&mut report, &InitMsg::Finished(status));
    // Exiting kills everything left in the namespace.
    std::process::exit(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

fn err<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
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
    binds: Vec<(PathBuf, Kind, OwnedFd)>,
}

/// Clones the host sources as detached mounts while the host tree is reachable.
fn clone_host_mounts(spec: &SandboxSpec, warnings: &mut Vec<String>) -> Result<HostMounts, String> {
    let proc = sys::fsmount_proc().map_err(err("creating the /proc mount"))?;
    let mut devs = Vec::new();
    for name in DEV_NODES {
        let path = Path::new("/dev").join(name);
        match sys::open_tree_clone(&path, false) {
            Ok(fd) => devs.push((name, fd)),
            Err(e) if name == "tty" => warnings.push(format!("no /dev/tty in the sandbox: {e}")),
            Err(e) => return Err(format!("cloning {}: {e}", path.display())),
        }
    }
    let ro_all = sys::MOUNT_ATTR_RDONLY
        | sys::MOUNT_ATTR_NOSUID
        | sys::MOUNT_ATTR_NODEV
        | sys::MOUNT_ATTR_NOEXEC;
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
        let kind = if meta.is_dir() { Kind::Dir } else { Kind::File };
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

/// A mountpoint missing from the rootfs: `existing` is the deepest existing directory
/// of its path, resolved inside the rootfs; `create` the components to add below it.
struct SkelItem {
    existing: PathBuf,
    create: Vec<std::ffi::OsString>,
    kind: Kind,
}

/// Which mountpoints the mounted rootfs at `root` lacks.
fn plan_skeleton(root: &Path, needs: &[(PathBuf, Kind)]) -> Result<Vec<SkelItem>, String> {
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
                if (*kind == Kind::Dir) != is_dir {
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
fn build_skeleton(root: &Path, skel: &Path, items: &[SkelItem]) -> Result<(), String> {
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
            if last && item.kind == Kind::File {
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

/// Mountpoint inside the new root (after pivot_root): must exist on an overlay (the
/// skeleton provides it), is created otherwise.
fn ensure_mountpoint(path: &Path, kind: Kind, create: bool) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() == (kind == Kind::Dir) => return Ok(()),
        Ok(_) => return Err(format!("mountpoint {} has the wrong type", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {}
        Err(e) => return Err(format!("mountpoint {}: {e}", path.display())),
    }
    match kind {
        Kind::Dir => fs::create_dir_all(path).map_err(err(format!("creating {}", path.display()))),
        Kind::File => {
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
fn setup(spec: &SandboxSpec, warnings: &mut Vec<String>) -> Result<Command, String> {
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
                (PathBuf::from("/proc"), Kind::Dir),
                (PathBuf::from("/sys"), Kind::Dir),
                (PathBuf::from("/dev"), Kind::Dir),
                (PathBuf::from("/stacker"), Kind::Dir),
            ];
            if host.resolv.is_some() && root.join("etc").is_dir() && !root.join("etc").is_symlink()
            {
                needs.push(("/etc/resolv.conf".into(), Kind::File));
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

    ensure_mountpoint(Path::new("/proc"), Kind::Dir, create)?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    sys::move_mount_to(host.proc.as_fd(), Path::new("/proc")).map_err(err("mounting /proc"))?;

    ensure_mountpoint(Path::new("/dev"), Kind::Dir, create)?;
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

    ensure_mountpoint(Path::new("/sys"), Kind::Dir, create)?;
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
            ensure_mountpoint(p, Kind::File, create)?;
            sys::move_mount_to(fd.as_fd(), p).map_err(err("binding /etc/resolv.conf"))?;
        }
    }

    ensure_mountpoint(Path::new("/stacker"), Kind::Dir, create)?;
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
    sys::install_script_pre_exec(&mut cmd);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_capped() {
        let mut got = Vec::new();
        let mut line = Vec::new();
        let mut push = |l: &str| got.push(l.to_string());
        split_lines(&mut line, b"a\nb", &mut push);
        split_lines(&mut line, b"c\n\nd", &mut push);
        split_lines(&mut line, &vec![b'x'; MAX_LINE + 5], &mut push);
        assert_eq!(got.len(), 4);
        assert_eq!(&got[..3], ["a", "bc", ""]);
        assert_eq!(got[3].len(), MAX_LINE);
        assert_eq!(line.len(), 6);
    }

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let userns = Userns::new(
            crate::userns::Entry::new("/nonexistent"),
            crate::idmap::IdMapping::from_subid_files(0, 0, "root", "", "").unwrap(),
        );
        let spec = SandboxSpec::new(Rootfs::Bind("/x".into()), "/y", "true");
        let cancel = CancelToken::new();
        let fut = userns.run_sandbox(&spec, Some(&cancel), |_| {});
        assert_send(&fut);
    }

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

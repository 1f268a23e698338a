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
//!   every process of the namespace, so when [`Userns::run_sandbox`](crate::userns::Userns::run_sandbox) returns, nothing of
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
//!
//! Hardening (`harden`, `seccomp`): the script runs with `PR_SET_NO_NEW_PRIVS` and a
//! seccomp deny list (kernel modules, kexec, bpf, keyring, userfaultfd, perf, nested user
//! namespaces unless [`SandboxSpec::nested_userns`]), both installed in its own process
//! right before exec, after all of the setup. With [`SandboxSpec::network`] `None` the
//! helper also unshares a network namespace (owned by the build's user namespace) and
//! init brings its `lo` up: the build reaches nothing outside, not even the host's
//! 127.0.0.1.
//!
//! Where each part lives: `run` is the worker's side (spawning the helper, streaming
//! output, timeout, cancel, reading the result); `helper` the two processes inside
//! the namespaces (helper and init: fork, report, reap); `setup` what init does before
//! the script starts (mounts, /dev, /proc, pivot_root), with the skeleton of missing
//! mountpoints in `skeleton`.

mod harden;
mod helper;
mod run;
pub use run::{SANDBOX_STARTS, SandboxStarts};
mod seccomp;
mod setup;
mod skeleton;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use farm_stackerfile::Network;
use serde::{Deserialize, Serialize};

use crate::userns::UsernsError;

pub(crate) use helper::helper_main;

/// Where the script is put inside the sandbox (a tmpfs, never captured).
pub const SCRIPT_PATH: &str = "/stacker/.farm-run";

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
    /// `Host`: the worker's network (stacker's behaviour). `None`: a network namespace
    /// of its own with only `lo` (up).
    #[serde(default)]
    pub network: Network,
    /// Let the script create user namespaces (the seccomp filter denies it otherwise).
    #[serde(default)]
    pub nested_userns: bool,
    /// Cgroup directories (with their limits written: one v2, or a v1 pids and a v1
    /// memory one) that the helper joins before it forks the sandbox: everything of the
    /// build is charged to them.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The sandbox's processes and /proc: a pid namespace of its own with a fresh /proc
    /// (the default), or the worker's pid namespace and its /proc bound read-only
    /// ([`SandboxProc::Host`], for containers whose /proc is masked).
    #[serde(default)]
    pub proc: SandboxProc,
}

/// What a build sees as its processes and its /proc (`farm worker --sandbox-proc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxProc {
    /// A new pid namespace (the run's init is pid 1) with a fresh procfs: the build sees
    /// only its own processes, and when it ends the kernel kills all of them.
    #[default]
    Fresh,
    /// The worker's pid namespace, and the worker's /proc bound recursively and
    /// read-only: for containers where the kernel refuses a fresh procfs (a masked
    /// /proc, no pod user namespace). The build sees (and, running as the worker's uid,
    /// may signal) the container's processes, including other builds of this worker;
    /// the /proc files that ptrace checks guard (environ, mem, root, fd) stay closed,
    /// since a build's processes are in a user namespace of their own.
    /// Leftover processes are killed by the sandbox's helper (a child subreaper) when
    /// the run ends.
    Host,
}

impl SandboxProc {
    pub const VALUES: [&'static str; 2] = ["fresh", "host"];
}

impl std::fmt::Display for SandboxProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxProc::Fresh => "fresh",
            SandboxProc::Host => "host",
        })
    }
}

impl std::str::FromStr for SandboxProc {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fresh" => Ok(SandboxProc::Fresh),
            "host" => Ok(SandboxProc::Host),
            other => Err(format!(
                "'{other}' is not a sandbox /proc mode: fresh (a pid namespace and /proc of \
                 the build's own) or host (the worker's, for a masked /proc)"
            )),
        }
    }
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
            network: Network::Host,
            nested_userns: false,
            cgroups: Vec::new(),
            proc: SandboxProc::Fresh,
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
    #[error(
        "run timed out after {0:?} and was killed (a layer may set run_timeout, up to the \
         worker's --max-run-timeout; the worker's default is --run-timeout)"
    )]
    TimedOut(Duration),
    #[error("cancelled; the build was killed")]
    Cancelled,
    #[error("sandbox helper failed ({status}): {stderr}")]
    Helper { status: String, stderr: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

// The helper's report to the worker: its last stderr line is RESULT_PREFIX + JSON.

const RESULT_PREFIX: &str = "FARM-SANDBOX-RESULT ";

/// What the helper prints as its last stderr line (after [`RESULT_PREFIX`]).
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

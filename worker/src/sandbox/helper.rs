//! The two processes inside the namespaces: the helper (the hidden entry point's
//! sandbox op, outside the new pid namespace) forks init, pid 1 of the new pid
//! namespace, which sets the sandbox up, runs the script and reports how it ended; the
//! helper reaps init (and with it the whole namespace) and reports to the worker.

use std::fs;
use std::io::{self, BufRead, Write};
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use super::{HelperReport, Outcome, RESULT_PREFIX, SandboxProc, SandboxSpec, ScriptStatus};
use crate::sys;

/// Messages from init to the helper, one JSON per line.
#[derive(Debug, Serialize, Deserialize)]
enum InitMsg {
    Warning(String),
    SetupFailed(String),
    Finished(ScriptStatus),
}

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
    for cg in &spec.cgroups {
        // Before the fork: init, the script and all they start inherit the cgroup.
        if let Err(e) = fs::write(cg.join("cgroup.procs"), "0") {
            warnings.push(format!(
                "the build runs without its pids/memory limits: joining {}: {e}",
                cg.display()
            ));
        }
    }
    let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .and_then(|a| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|b| (a, b)));
    let ((report_r, report_w), (life_r, life_w)) = match pipes {
        Ok(p) => p,
        Err(e) => return failed(format!("pipe: {e}"), warnings),
    };
    let host_pids = spec.proc == SandboxProc::Host;
    // Without a pid namespace of its own nothing kills the build's leftovers when init
    // exits: orphans come to the helper (a child subreaper), which kills them. /proc is
    // opened now: once init has pivoted, the helper's root is the build's too.
    let proc_dir = if host_pids {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            return failed(format!("becoming a child subreaper: {e}"), warnings);
        }
        match fs::File::open("/proc") {
            Ok(f) => Some(OwnedFd::from(f)),
            Err(e) => return failed(format!("opening /proc: {e}"), warnings),
        }
    } else {
        None
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
    if host_pids {
        // The helper's directory is not the worker's: pivot_root (in init) moves a root
        // and working directory that are `/` to the build's root.
        let _ = nix::unistd::chdir("/");
    }
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
    if let Some(proc_dir) = &proc_dir
        && let Err(e) = kill_leftovers(proc_dir)
    {
        warnings.push(e);
    }
    drop(life_w);
    let outcome = match (finished, setup_error) {
        (Some(s), _) => Outcome::Finished(s),
        (None, Some(m)) => Outcome::SetupFailed(m),
        (None, None) if sys::terminate_requested() => Outcome::Killed,
        (None, None) => Outcome::InitDied(format!("{wait:?}")),
    };
    HelperReport { outcome, warnings }
}

/// How long [`kill_leftovers`] keeps at it (a build forking as fast as it is killed).
const LEFTOVER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// With the worker's pid namespace ([`SandboxProc::Host`]): SIGKILLs and reaps every
/// process left below the helper (the build's orphans, re-parented to it as a child
/// subreaper) until it has no child left. `proc_dir` is the worker's /proc.
fn kill_leftovers(proc_dir: &OwnedFd) -> Result<(), String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let me = std::process::id();
    let deadline = std::time::Instant::now() + LEFTOVER_DEADLINE;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => return Ok(()),
            Err(nix::errno::Errno::EINTR)
            | Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                continue;
            }
            Err(e) => return Err(format!("waiting for the build's leftover processes: {e}")),
            Ok(_) => {}
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "processes of the build outlived it: still killing them after {LEFTOVER_DEADLINE:?}"
            ));
        }
        for pid in children(proc_dir, me) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The pids of `pid`'s children: /proc/PID/task/PID/children, or (a kernel without
/// it) every /proc/N/stat whose parent is `pid` (through the build's /proc: the
/// worker's, bound there).
fn children(proc_dir: &OwnedFd, pid: u32) -> Vec<i32> {
    if let Some(text) = read_at(proc_dir, &format!("{pid}/task/{pid}/children")) {
        return text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            read_at(proc_dir, &format!("{p}/stat")).is_some_and(|stat| {
                // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// A file below `dir`, read whole.
fn read_at(dir: &OwnedFd, path: &str) -> Option<String> {
    let fd = nix::fcntl::openat(
        dir,
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    io::Read::read_to_string(&mut fs::File::from(fd), &mut text).ok()?;
    Some(text)
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
    let setup_result =
        super::harden::network(spec).and_then(|()| super::setup::setup(spec, &mut warnings));
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

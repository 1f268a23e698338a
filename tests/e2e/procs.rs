//! Long-running processes for the farm tests: `farm coordinator` and `farm worker` on
//! free loopback ports (each in a process group of its own, killed with it on drop), a
//! moto_server for the S3 blob store, bounded waits, and reading /proc to find a
//! process's descendants (the sandboxes a worker runs).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::farm_bin;

/// A local port nobody listens on (bound, then released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `f` every 100 ms until it returns `Some`, or panic after `limit` with `what`
/// and the last state `f` described through `Err`.
pub(crate) fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(last) => last,
        };
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process started in a process group of its own, its stdout and stderr in a log
/// file; the whole group is killed (SIGKILL) on drop.
pub(crate) struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What it wrote so far (without colour escapes).
    pub(crate) fn output(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// `None` while it runs, else how it ended.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// SIGTERM to the process itself (what a pod's stop sends).
    pub(crate) fn term(&self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Waits for it to end, at most `limit`; `None` if it still runs.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if started.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` of the process itself (not its group: what it started must die
    /// with it by itself), and reap it.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} ({}) ---\n{}",
                self.name,
                self.log.display(),
                tail(&self.output(), 80)
            );
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// How to start a coordinator.
pub(crate) struct CoordinatorSpec {
    pub state_dir: PathBuf,
    pub blobs: String,
    /// `--lease-timeout` in seconds (None: the default).
    pub lease: Option<f64>,
    /// Serve `--metrics` on a free port.
    pub metrics: bool,
    /// The port (None: a free one).
    pub port: Option<u16>,
    /// Further flags (what remote submissions may read, fetch and use).
    pub inputs: Vec<String>,
}

/// A `farm coordinator` process on a local port, killed on drop.
pub(crate) struct Coordinator {
    pub proc: Proc,
    pub addr: String,
    pub metrics_addr: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Coordinator {
    /// A coordinator with no workers, run as this process's user in a temporary
    /// directory of its own (blobs and state there).
    pub(crate) fn start() -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let spec = CoordinatorSpec {
            state_dir: dir.path().join("state"),
            blobs: format!("file://{}", dir.path().join("blobs").display()),
            lease: None,
            metrics: false,
            port: None,
            inputs: Vec::new(),
        };
        let mut cmd = Command::new(farm_bin());
        cmd.env_remove("RUST_LOG");
        let mut c = Coordinator::start_with(&spec, cmd, &dir.path().join("coordinator.log"));
        c._dir = Some(dir);
        c
    }

    /// `farm coordinator` per `spec`, through `cmd` (the farm binary, or a command that
    /// runs it as someone; the arguments are appended); ready when it accepts
    /// connections.
    pub(crate) fn start_with(spec: &CoordinatorSpec, mut cmd: Command, log: &Path) -> Coordinator {
        let addr = format!("127.0.0.1:{}", spec.port.unwrap_or_else(free_port));
        let metrics_addr = spec.metrics.then(|| format!("127.0.0.1:{}", free_port()));
        cmd.args(["coordinator", "--listen", &addr, "--blobs", &spec.blobs])
            .arg("--state-dir")
            .arg(&spec.state_dir);
        if let Some(l) = spec.lease {
            cmd.args(["--lease-timeout", &l.to_string()]);
        }
        if let Some(m) = &metrics_addr {
            cmd.args(["--metrics", m]);
        }
        cmd.args(&spec.inputs);
        let mut proc = Proc::spawn("coordinator", cmd, log);
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(status) = proc.exited() {
                panic!("the coordinator exited ({status}):\n{}", proc.output());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the coordinator did not listen on {addr} within 30 s:\n{}",
                proc.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Coordinator {
            proc,
            addr,
            metrics_addr,
            _dir: None,
        }
    }

    /// The metrics it serves: name (with labels) -> value.
    pub(crate) fn metrics(&self) -> BTreeMap<String, f64> {
        let addr = self.metrics_addr.as_ref().expect("started with metrics");
        let text = http_get(addr, "/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub(crate) fn metric(&self, name: &str) -> f64 {
        let m = self.metrics();
        *m.get(name)
            .unwrap_or_else(|| panic!("no metric {name} in {m:?}"))
    }
}

/// GET `path` from `addr` over plain HTTP/1.1; the body of a 200 answer.
pub(crate) fn http_get(addr: &str, path: &str) -> String {
    let (code, body) = http_status(addr, path);
    assert_eq!(code, 200, "GET http://{addr}{path}: {body}");
    body
}

/// GET `path` from `addr` over plain HTTP/1.1: the status code and the body.
pub(crate) fn http_status(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET http://{addr}{path}: no header end in {response:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET http://{addr}{path}: no status in {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------
// processes in /proc
// ---------------------------------------------------------------------------------------

/// A process as /proc shows it: pid, its parent, its name and when it started (to tell
/// it from a later process with the same pid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub start: u64,
    pub cmdline: String,
}

fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ... field 22 is starttime.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    Some(ProcInfo {
        pid,
        ppid,
        comm,
        start,
        cmdline,
    })
}

pub(crate) fn all_processes() -> Vec<ProcInfo> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// Every process below `pid` (children, their children, ...).
pub(crate) fn descendants(pid: u32) -> Vec<ProcInfo> {
    let all = all_processes();
    let mut children: HashMap<i32, Vec<&ProcInfo>> = HashMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut todo = vec![pid as i32];
    while let Some(p) = todo.pop() {
        for c in children.get(&p).into_iter().flatten() {
            out.push((*c).clone());
            todo.push(c.pid);
        }
    }
    out
}

/// Is this process (same pid and start time) still there (and not a zombie)?
pub(crate) fn still_running(p: &ProcInfo) -> bool {
    let Some(now) = proc_info(p.pid) else {
        return false;
    };
    let zombie = fs::read_to_string(format!("/proc/{}/stat", p.pid))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false);
    now.start == p.start && !zombie
}

// ---------------------------------------------------------------------------------------
// moto_server
// ---------------------------------------------------------------------------------------

const MOTO_CI_VENV: &str = "/opt/farm-ci/venv/bin/moto_server";

/// A moto_server (an S3-compatible server from PyPI's `moto[server]`, which `.ci/run`
/// installs into /opt/farm-ci/venv) on a free loopback port, killed on drop.
pub(crate) struct Moto {
    pub proc: Proc,
    pub port: u16,
}

impl Moto {
    /// Where moto_server is: `MOTO_SERVER`, `PATH`, then the CI venv.
    pub(crate) fn find() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("MOTO_SERVER") {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("moto_server"))
            .chain([PathBuf::from(MOTO_CI_VENV)])
            .find(|p| p.is_file())
    }

    pub(crate) fn start(bin: &Path, log: &Path) -> Moto {
        let mut last = String::new();
        // The port is free when picked; someone may take it first: try a few.
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            let mut proc = Proc::spawn("moto_server", cmd, log);
            let started = Instant::now();
            loop {
                if let Some(status) = proc.exited() {
                    last = format!("exited ({status}): {}", proc.output());
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto { proc, port };
                }
                if started.elapsed() > Duration::from_secs(30) {
                    last = format!("not listening after 30 s: {}", proc.output());
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("could not start {}: {last}", bin.display());
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (moto takes unsigned path-style requests).
    pub(crate) fn create_bucket(&self, bucket: &str) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response.lines().next().unwrap_or_default().to_string();
        assert!(
            status.split_whitespace().nth(1) == Some("200"),
            "creating bucket {bucket}: {status}\n{}",
            self.proc.output()
        );
    }
}

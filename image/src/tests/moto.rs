//! A moto_server (an S3-compatible server from PyPI's `moto[server]`) started for one
//! test on a free loopback port and killed on drop.
//!
//! moto_server is found through `MOTO_SERVER`, then `PATH`, then
//! `/opt/farm-ci/venv/bin/moto_server` (where `.ci/run` installs it). When it is
//! missing, [`Moto::start`] panics if `CI=true` and otherwise returns `None` after a
//! skip notice.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CI_VENV: &str = "/opt/farm-ci/venv/bin/moto_server";
const READY_WITHIN: Duration = Duration::from_secs(20);

pub(crate) struct Moto {
    child: Child,
    pub(crate) port: u16,
    log: tempfile::NamedTempFile,
}

fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("moto_server");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from(CI_VENV);
    p.is_file().then_some(p)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl Moto {
    /// Start a server, or `None` (skip) when moto_server is not installed outside CI.
    pub(crate) fn start(test: &str) -> Option<Moto> {
        let Some(bin) = find() else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "{test}: moto_server not found (MOTO_SERVER, PATH, {CI_VENV}); .ci/run \
                     installs it"
                );
            }
            eprintln!(
                "SKIPPED {test}: moto_server not found (set MOTO_SERVER or install \
                 'moto[server]' into /opt/farm-ci/venv)"
            );
            return None;
        };
        // The port is free when picked; another process may take it before moto binds
        // it, so try a few.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(&bin) {
                Ok(m) => return Some(m),
                Err(e) => last = e,
            }
        }
        panic!("{test}: could not start {}: {last}", bin.display());
    }

    fn try_start(bin: &PathBuf) -> Result<Moto, String> {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        let stderr = log.reopen().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawning: {e}"))?;
        let mut moto = Moto { child, port, log };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(format!("exited with {status}: {}", moto.log()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(moto);
            }
            if start.elapsed() > READY_WITHIN {
                return Err(format!(
                    "not listening on {addr} after {READY_WITHIN:?}: {}",
                    moto.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the server wrote to stderr.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (object_store cannot): moto takes unsigned path-style requests.
    pub(crate) fn create_bucket(&self, bucket: &str) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
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
        let status = response.lines().next().unwrap_or_default();
        assert!(
            status.split_whitespace().nth(1) == Some("200"),
            "creating bucket {bucket}: {status}\n{response}\n{}",
            self.log()
        );
    }

    /// Stop the server now (as a crash would).
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

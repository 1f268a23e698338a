//! The worker's side of a sandbox run: spawn the helper in the user namespace, stream
//! the script's output line by line, enforce the timeout and cancel (SIGTERM, then
//! SIGKILL), and turn the helper's report into a [`ScriptStatus`] or an error.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::{HelperReport, Outcome, RESULT_PREFIX, SandboxError, SandboxSpec, ScriptStatus};
use crate::cancel::CancelToken;
use crate::ops::Op;
use crate::sys;
use crate::userns::Userns;

/// Lines longer than this are split.
const MAX_LINE: usize = 64 * 1024;

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

/// Sandbox starts since the process started: how many, and their total time.
#[derive(Debug, Default)]
pub struct SandboxStarts {
    count: std::sync::atomic::AtomicU64,
    micros: std::sync::atomic::AtomicU64,
}

impl SandboxStarts {
    fn add(&self, d: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        self.micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// How many sandboxes started, and their start time in total (seconds).
    pub fn get(&self) -> (u64, f64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.count.load(Relaxed),
            self.micros.load(Relaxed) as f64 / 1e6,
        )
    }
}

/// Every sandbox of this process (a worker has one user namespace setup).
pub static SANDBOX_STARTS: SandboxStarts = SandboxStarts {
    count: std::sync::atomic::AtomicU64::new(0),
    micros: std::sync::atomic::AtomicU64::new(0),
};

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
        let mut cmd = self.op_command(&Op::Sandbox(spec.clone()))?;
        cmd.isolate_pid_uts_ipc(true)
            .isolate_pid(spec.proc == super::SandboxProc::Fresh)
            .isolate_net(spec.network == farm_stackerfile::Network::None)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if spec.interactive {
            cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
        }
        let mut child = cmd.spawn_async().await?;
        // The sandbox's start: the helper in its namespaces, its maps written (issue 16:
        // the worker's metrics and the "sandbox" span).
        let start = started.elapsed();
        SANDBOX_STARTS.add(start);
        tracing::Span::current().record("start_ms", start.as_millis() as u64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Rootfs;

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
}

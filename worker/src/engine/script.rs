//! A job's script in the sandbox: its spec (an overlay over the chain, imports and
//! binds mounted, the job's environment), and the run with its output streamed to the
//! build's events.

use std::collections::VecDeque;
use std::path::PathBuf;

use farm_stackerfile::Network;

use super::pipeline::Build;
use super::{EngineError, step};
use crate::pool::Workspace;
use crate::sandbox::{Bind, Rootfs, SandboxError, SandboxSpec, ScriptStatus};

/// Lines of script output kept for the error message of a failed run.
const TAIL_LINES: usize = 25;

impl Build<'_> {
    /// The sandbox spec of `script` on an overlay of `lower` (top first) in `ws`.
    pub(super) fn sandbox_spec(
        &self,
        ws: &Workspace,
        lower: Vec<PathBuf>,
        script: &str,
        sources: &[PathBuf],
    ) -> Result<SandboxSpec, EngineError> {
        let job = self.job;
        let mount_dir = ws.path().join("mnt");
        std::fs::create_dir_all(&mount_dir)
            .map_err(|e| step("creating the sandbox mount point")(e.to_string()))?;
        let mut spec = SandboxSpec::new(
            Rootfs::Overlay {
                lower,
                upper: ws.upper().expect("overlay workspace").to_path_buf(),
                work: ws.work().expect("overlay workspace").to_path_buf(),
            },
            &mount_dir,
            script.to_string(),
        );
        spec.env = job.env.clone();
        let options = &self.engine.options;
        spec.timeout = options.run_timeout(&job.layer.sandbox);
        spec.network = options.run_network(&job.layer.sandbox);
        spec.nested_userns = job.layer.sandbox.nested_userns;
        spec.proc = options.sandbox_proc;
        if job.layer.sandbox.network == Some(Network::Host) && spec.network == Network::None {
            self.events.log(
                self.name(),
                "farm: this worker runs builds with --network none; the layer's \
                 'network: host' is not granted",
            );
        }
        let imports_dir = if job.layer.legacy_import {
            "/stacker"
        } else {
            "/stacker/imports"
        };
        for (import, source) in job.imports.iter().zip(sources) {
            if import.dest.is_none() {
                spec.binds.push(Bind {
                    source: source.clone(),
                    dest: PathBuf::from(imports_dir).join(&import.name),
                    readonly: true,
                });
            }
        }
        for b in &job.layer.binds {
            spec.binds.push(self.engine.options.binds.mount(b)?);
        }
        Ok(spec)
    }

    /// Run a sandbox, streaming its output; a failure carries the end of the output.
    pub(super) async fn run_script(&self, spec: &SandboxSpec) -> Result<(), EngineError> {
        let (events, name, cancel) = (self.events, self.name(), self.cancel);
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        // Each run in a cgroup of its own with the worker's pids/memory limits, when the
        // worker has a delegated cgroup (removed when dropped, after the run).
        let cgroup = match &self.engine.options.cgroup {
            Some(d) => match d.build_cgroup() {
                Ok(cg) => Some(cg),
                Err(e) => {
                    tracing::warn!(error = %e, "creating the build's cgroup; running without limits");
                    None
                }
            },
            None => None,
        };
        let mut spec = spec.clone();
        spec.cgroups = cgroup.as_ref().map(|c| c.paths()).unwrap_or_default();
        // A running sandbox is progress, printing or not (`sleep 3600` is not stuck).
        let _busy = cancel.busy();
        let status = self
            .engine
            .userns
            .run_sandbox(&spec, Some(cancel), |line| {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
                events.log(name, line);
            })
            .await;
        let hit = || cgroup.as_ref().and_then(|c| c.limit_hit());
        let span = tracing::Span::current();
        match &status {
            Ok(ScriptStatus::Exited(c)) => span.record("exit", *c as i64),
            Ok(ScriptStatus::Signaled(s)) => span.record("exit", format!("signal {s}")),
            Err(e) => span.record("exit", e.to_string()),
        };
        let result = self.finish_script(status, hit, tail);
        if let Err(e) = &result {
            farm_telemetry::record_error(&span, &e.to_string());
        }
        result
    }

    /// How a script ended, as the build's result.
    fn finish_script(
        &self,
        status: Result<ScriptStatus, SandboxError>,
        hit: impl Fn() -> Option<String>,
        tail: VecDeque<String>,
    ) -> Result<(), EngineError> {
        let cancel = self.cancel;
        let status = match status {
            Ok(s) => s,
            Err(_) if cancel.is_cancelled() => return Err(EngineError::Cancelled),
            Err(e @ (SandboxError::TimedOut(_) | SandboxError::Cancelled)) => {
                return Err(e.into());
            }
            // An OOM kills the build's whole cgroup, the sandbox's helper and init with
            // it: that is the build's failure, not the worker's.
            Err(e) => match hit() {
                Some(hit) => {
                    return Err(EngineError::RunFailed {
                        status: hit,
                        tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
                    });
                }
                None => return Err(e.into()),
            },
        };
        if !status.success() {
            let mut status = match status {
                ScriptStatus::Exited(c) => format!("exit code {c}"),
                ScriptStatus::Signaled(s) => format!("killed by signal {s}"),
            };
            if let Some(hit) = hit() {
                status = format!("{status}; {hit}");
            }
            return Err(EngineError::RunFailed {
                status,
                tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
            });
        }
        Ok(())
    }
}

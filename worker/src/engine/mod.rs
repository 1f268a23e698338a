//! The build engine: one stacker layer, rootless, from its base to its image config.
//!
//! * `pipeline`: a build as a sequence of steps (base chain, imports, extra layers,
//!   run, generate_labels, capture, image config).
//! * `chains`: the pool chains a build stands on, extracted once per ChainID and
//!   extended by each new layer.
//! * `inputs`: where a job's imports are on this machine.
//! * `script`: a job's script in the sandbox, its output streamed.
//! * `op_calls`: running [`crate::ops::Op`]s in the user namespace.
//! * `workspaces`: scratch directories in the pool.
//! * `tools`: `farm grab` and `farm chroot` on a built layer.

mod binds;
mod chains;
mod fslayers;
mod inputs;
mod op_calls;
mod pipeline;
mod script;
mod tools;
mod workspaces;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use farm_image::BlobStore;
use farm_model::{BuiltImage, EventSender, FailureKind, Job, LayerFailure};

pub use binds::{BindPolicy, BindPrefix};

use crate::assemble;
use crate::cancel::CancelToken;
use crate::ops::{Op, RemoveArgs};
use crate::pool::{Deleter, Pool, PoolError};
use crate::sandbox::SandboxError;
use crate::userns::Userns;
use farm_stackerfile::Network;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Chain(#[from] farm_model::InvalidChainId),
    #[error(transparent)]
    Image(#[from] farm_image::Error),
    #[error(transparent)]
    Userns(#[from] crate::userns::UsernsError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Assemble(#[from] assemble::AssembleError),
    #[error("{what}: {message}")]
    Step { what: String, message: String },
    #[error("run failed ({status}); the last lines of its output:\n{tail}")]
    RunFailed { status: String, tail: String },
    /// An input is not what the stackerfile says (a hash, a file where a directory
    /// must be).
    #[error("{what}: {message}")]
    Input { what: String, message: String },
    #[error("cancelled")]
    Cancelled,
}

impl EngineError {
    /// The layer failure this error is: what the coordinator decides on.
    pub fn failure(&self) -> LayerFailure {
        let kind = match self {
            EngineError::Cancelled => FailureKind::Cancelled,
            EngineError::RunFailed { .. } | EngineError::Sandbox(SandboxError::TimedOut(_)) => {
                FailureKind::RunFailed
            }
            EngineError::Input { .. } => FailureKind::Input,
            EngineError::Pool(_)
            | EngineError::Chain(_)
            | EngineError::Image(_)
            | EngineError::Userns(_)
            | EngineError::Sandbox(_)
            | EngineError::Assemble(_)
            | EngineError::Step { .. } => FailureKind::Internal,
        };
        LayerFailure::new(kind, self.to_string())
    }
}

/// An [`EngineError::Step`] of `what` failing with a message.
fn step(what: impl Into<String>) -> impl FnOnce(String) -> EngineError {
    let what = what.into();
    move |message| EngineError::Step { what, message }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How long a layer's `run` may take when the layer does not say (`run_timeout`);
    /// `None`: no limit.
    pub timeout: Option<Duration>,
    /// The most a layer's own `run_timeout` may ask for; `None`: no ceiling.
    pub max_timeout: Option<Duration>,
    /// The network of `run` (a worker's `--network none` wins over a layer's
    /// `network: host`).
    pub network: Network,
    /// The worker's delegated cgroup: each run gets a child with pids.max/memory.max.
    pub cgroup: Option<crate::cgroup::Delegation>,
    pub compression_threads: usize,
    /// Which host paths jobs' `binds` may mount.
    pub binds: BindPolicy,
    /// How much one layer (a base's, a tarball base) may extract to.
    pub extract: crate::ops::ExtractLimits,
    /// The processes and /proc runs see (`--sandbox-proc`).
    pub sandbox_proc: crate::sandbox::SandboxProc,
}

impl EngineOptions {
    /// The timeout of a layer's run: its own `run_timeout` (capped by
    /// [`max_timeout`](Self::max_timeout)), else the worker's default.
    pub fn run_timeout(&self, layer: &farm_stackerfile::LayerSandbox) -> Option<Duration> {
        match layer.run_timeout.map(Duration::from_secs) {
            Some(t) => Some(self.max_timeout.map_or(t, |max| t.min(max))),
            None => self.timeout,
        }
    }

    /// The network of a layer's run.
    pub fn run_network(&self, layer: &farm_stackerfile::LayerSandbox) -> Network {
        match self.network {
            Network::None => Network::None,
            Network::Host => layer.network.unwrap_or_default(),
        }
    }
}

/// Builds layers on one pool.
pub struct Engine {
    pool: Pool,
    blobs: BlobStore,
    userns: Userns,
    options: EngineOptions,
    cancel: CancelToken,
    /// Base layers found in the pool / extracted into it (the worker's metrics).
    chain_hits: std::sync::atomic::AtomicU64,
    chain_misses: std::sync::atomic::AtomicU64,
    /// Layers exported: uncompressed tar bytes and time spent (the worker's metrics).
    exports: ExportStats,
}

/// Exports since the engine started: their count, uncompressed tar bytes, blob bytes
/// (compressed) and time, from the first tar byte to the blob in the store.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub count: std::sync::atomic::AtomicU64,
    pub tar_bytes: std::sync::atomic::AtomicU64,
    pub blob_bytes: std::sync::atomic::AtomicU64,
    pub micros: std::sync::atomic::AtomicU64,
}

/// Deletes trees inside the user namespace (files of other container users cannot be
/// removed from outside it).
pub struct UsernsDeleter(pub Userns);

impl Deleter for UsernsDeleter {
    fn remove_tree(&self, path: &Path) -> std::io::Result<()> {
        // What the worker owns it removes itself (always, as real root); the rest is
        // removed by container root.
        if crate::pool::StdDeleter.remove_tree(path).is_ok() || !path.exists() {
            return Ok(());
        }
        let mut cmd = self
            .0
            .op_command(&Op::RemoveTree(RemoveArgs { path: path.into() }))
            .map_err(std::io::Error::other)?;
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(std::io::Error::other)?;
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = child.wait_blocking()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "removing {} in the user namespace failed ({status}): {}",
                path.display(),
                err.trim()
            )))
        }
    }
}

impl Engine {
    pub fn new(pool: Pool, blobs: BlobStore, userns: Userns, options: EngineOptions) -> Self {
        Engine {
            pool,
            blobs,
            userns,
            options,
            cancel: CancelToken::new(),
            chain_hits: Default::default(),
            chain_misses: Default::default(),
            exports: Default::default(),
        }
    }

    /// How many base layers builds found already extracted in the pool (hits) and how
    /// many had to be extracted (misses), since the engine started.
    pub fn chain_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.chain_hits.load(Relaxed),
            self.chain_misses.load(Relaxed),
        )
    }

    /// The layers exported since the engine started (see [`ExportStats`]).
    pub fn export_stats(&self) -> &ExportStats {
        &self.exports
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Cancel every build of this engine (Ctrl-C): sandboxes are killed.
    pub fn cancel_all(&self) {
        self.cancel.cancel();
    }

    /// Build one layer.
    pub async fn build(&self, job: &Job, events: &EventSender) -> Result<BuiltImage, EngineError> {
        self.build_cancellable(job, events, &self.cancel.child())
            .await
    }

    /// A token that stops one build (and is stopped by [`cancel_all`](Self::cancel_all)).
    pub fn job_cancel_token(&self) -> CancelToken {
        self.cancel.child()
    }

    /// Build one layer; `cancel` (from [`job_cancel_token`](Self::job_cancel_token))
    /// kills its sandbox.
    pub async fn build_cancellable(
        &self,
        job: &Job,
        events: &EventSender,
        cancel: &CancelToken,
    ) -> Result<BuiltImage, EngineError> {
        pipeline::build(self, job, events, cancel).await
    }

    /// Pool work (which blocks on the filesystem and on locks) on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Pool) -> Result<T, PoolError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(pool))
            .await
            .map_err(|e| step("pool")(e.to_string()))?
            .map_err(Into::into)
    }
}

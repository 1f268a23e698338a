//! The farm: submissions become builds, builds run through [`run_build`] with the
//! scheduler (`sched`) as executor, and every change is kept in the state store so a
//! restarted coordinator picks up where it stopped.
//!
//! One code path for every mode: `farm coordinator` serves this over gRPC to remote
//! workers and clients; `farm build` and `farm submit` without a coordinator run it in
//! process, with one embedded worker speaking the same worker protocol over channels
//! ([`Farm::connect_worker`]).

mod collect;
mod events;
mod logs;
mod manifests;
mod plans;
mod sched;
#[cfg(test)]
mod tests;
mod traces;

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farm_image::{BlobStore, Digest, LayerFormat, Tree, TreeEntry};
use farm_stackerfile::{Plan, PlanOptions, Substitutions, common_dir, url_or_path};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::build::{BuildOptions, Outcome, run_build};
use crate::cache::ActionCache;
use crate::destinations::Destinations;
use crate::fetch::{FetchOptions, Fetcher};
use crate::output::{
    DEFAULT_ANNOTATION_NAMESPACE, GitVersions, manifest_annotations_with, manifest_bytes,
};
use crate::pin::local::{LocalKind, LocalScope};
use crate::pin::registry::{CredentialScope, RegistryBases};
use crate::state::{BuildId, BuildState, LayerResult, StateError, StateStore, unix_ms};
use farm_model::{BuiltImage, Compression, EventSender, Platform};
use futures::{StreamExt, TryStreamExt};

pub use crate::grpc::workers::WorkerLink;
pub use events::{EventKind, StoredEvent};
pub use logs::{DEFAULT_MAX_LAYER_LOG, LogChunk};
pub use sched::WorkerView;
pub(crate) use sched::{
    RegisterError, ToWorker, WorkerGone, WorkerInfo, WorkerOutbox, WorkerSession,
};

/// How the farm runs.
#[derive(Debug, Clone)]
pub struct FarmConfig {
    /// Holds `state.db`, `cache.db`, the fetch index and uploaded contexts.
    pub state_dir: PathBuf,
    pub blobs: BlobStore,
    /// A worker that sends no heartbeat for this long loses its layers.
    pub lease: Duration,
    /// The platform of layers that name none.
    pub platform: Platform,
    /// Built-in substitutions (stacker's STACKER_* names) for submissions.
    pub builtins: Vec<(String, String)>,
    /// Resume the state's unfinished builds (a coordinator); the embedded mode leaves
    /// them to whoever runs them.
    pub resume: bool,
    /// Credentials for registry bases (`from: docker`): the coordinator's own, never
    /// stored with a build.
    pub registry: farm_registry::Credentials,
    /// Finished builds kept in the state (their statuses, events and logs); older ones
    /// are forgotten when a build ends. The action cache and blobs are not affected.
    pub keep_builds: usize,
    /// What the operator allows remote submissions beyond their own inputs.
    pub remote: RemotePolicy,
    /// Limits on what one submission may ask of the coordinator.
    pub limits: Limits,
    /// The most output one layer (one attempt) keeps, in bytes (`--max-layer-log`);
    /// the rest is dropped with a marker line.
    pub max_layer_log: u64,
    /// A layer whose worker reports no progress (no output, no running sandbox) for this
    /// long goes to another worker, though the worker sends heartbeats
    /// (`--progress-timeout`).
    pub progress_timeout: Duration,
    /// Garbage collection of the blob store and the action cache (`crate::gc`).
    pub gc: crate::gc::GcConfig,
}

impl FarmConfig {
    /// The default of `--progress-timeout`: 30 minutes.
    pub const DEFAULT_PROGRESS_TIMEOUT: Duration = Duration::from_secs(30 * 60);
}

/// Remove the log files under `state_dir` of builds `state` no longer has (for `farm
/// gc`, which forgets builds without a running farm).
pub async fn remove_forgotten_logs(state_dir: &Path, state: &StateStore) -> Result<(), FarmError> {
    sweep_log_files(
        &logs::LogFiles::new(state_dir, DEFAULT_MAX_LAYER_LOG),
        state,
    )
    .await
}

async fn sweep_log_files(files: &logs::LogFiles, state: &StateStore) -> Result<(), FarmError> {
    let known: std::collections::HashSet<String> = state
        .list_builds()
        .await?
        .into_iter()
        .map(|b| b.id)
        .collect();
    files.sweep(&known).map_err(FarmError::Logs)
}

/// Who sent a submission; decides what its build may read, fetch and use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// This machine's user, in process (`farm build`, `farm submit` with no
    /// coordinator): stackerfile paths are this machine's, inputs are read from wherever
    /// the stackerfiles point (unless the submission keeps them in its tree), any address
    /// is fetched and the registry credentials serve every registry, as stacker does.
    Local,
    /// A client over the network: its build reads only the files it uploaded, fetches
    /// only public addresses and pulls anonymously, except where the coordinator's
    /// [`RemotePolicy`] allows more. What a client says about itself (its
    /// `allow_outside_context`) widens nothing the operator did not allow.
    #[default]
    Remote,
}

/// What a coordinator's operator allows remote submissions (`farm coordinator` flags).
/// The default allows nothing beyond the submission's own uploaded files, public
/// addresses, and anonymous registry pulls.
#[derive(Debug, Clone, Default)]
pub struct RemotePolicy {
    /// May a remote build read this machine's files outside its uploaded context when its
    /// client asks (`--allow-outside-context`)?
    pub outside_context: OutsideContext,
    /// Non-public addresses and hosts downloads may reach (`--allow-fetch`).
    pub fetch: crate::destinations::AllowList,
    /// Registries the coordinator's credentials are used for
    /// (`--registry-credentials-for`); others are pulled anonymously.
    pub registry_credentials_for: Vec<String>,
}

/// Whether a remote build may read the coordinator's disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutsideContext {
    /// Never: only the uploaded context.
    #[default]
    Refused,
    /// When the submission asks for it (`farm submit --allow-outside-context`).
    WhenAsked,
}

/// Limits on what one submission may ask of the coordinator (`farm coordinator` flags
/// of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest stackerfile read, in bytes (`--max-stackerfile-size`).
    pub max_stackerfile_size: u64,
    /// The most files (and directories and symlinks) an uploaded context may list
    /// (`--max-context-files`).
    pub max_context_files: usize,
    /// The most bytes an uploaded context may materialise to, every listed file counted
    /// at its size (one blob listed under many paths counts for each)
    /// (`--max-context-size`).
    pub max_context_size: u64,
    /// The most layers one submission's plan may have (`--max-layers`).
    pub max_layers: usize,
    /// The largest blob one `Blobs.Upload` may store (`--max-upload-size`).
    pub max_upload_size: u64,
}

impl Limits {
    /// The default of `--max-context-files`.
    pub const DEFAULT_MAX_CONTEXT_FILES: usize = 100_000;
    /// The default of `--max-context-size`: 4 GiB.
    pub const DEFAULT_MAX_CONTEXT_SIZE: u64 = 4 << 30;
    /// The default of `--max-layers`.
    pub const DEFAULT_MAX_LAYERS: usize = 1000;
    /// The default of `--max-upload-size`: 16 GiB.
    pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 16 << 30;

    /// No limits (the embedded mode, whose CLI read everything itself).
    pub fn none() -> Self {
        Limits {
            max_stackerfile_size: u64::MAX,
            max_context_files: usize::MAX,
            max_context_size: u64::MAX,
            max_layers: usize::MAX,
            max_upload_size: u64::MAX,
        }
    }
}

impl Default for Limits {
    /// 1 MiB stackerfiles; contexts of 100,000 files and 4 GiB; 1,000 layers; uploads of
    /// 16 GiB.
    fn default() -> Self {
        Limits {
            max_stackerfile_size: farm_stackerfile::DEFAULT_MAX_STACKERFILE_SIZE,
            max_context_files: Self::DEFAULT_MAX_CONTEXT_FILES,
            max_context_size: Self::DEFAULT_MAX_CONTEXT_SIZE,
            max_layers: Self::DEFAULT_MAX_LAYERS,
            max_upload_size: Self::DEFAULT_MAX_UPLOAD_SIZE,
        }
    }
}

impl FarmConfig {
    /// The defaults of `farm coordinator`: leases of 10 s, this machine's platform, no
    /// built-in substitutions, unfinished builds resumed, no registry credentials, the
    /// newest 1,000 finished builds kept, the default [`Limits`], garbage collected
    /// every hour ([`crate::gc::GcConfig::default`]).
    pub fn new(state_dir: impl Into<PathBuf>, blobs: BlobStore) -> Self {
        FarmConfig {
            state_dir: state_dir.into(),
            blobs,
            lease: Duration::from_secs(10),
            platform: Platform::host(),
            builtins: Vec::new(),
            resume: true,
            registry: Default::default(),
            keep_builds: 1000,
            remote: RemotePolicy::default(),
            limits: Limits::default(),
            max_layer_log: DEFAULT_MAX_LAYER_LOG,
            progress_timeout: Self::DEFAULT_PROGRESS_TIMEOUT,
            gc: crate::gc::GcConfig::default(),
        }
    }
}

/// A file of an uploaded build context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextFile {
    pub path: String,
    pub digest: String,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub symlink_target: String,
}

/// A build request, stored as the build's spec (so a restart can run it again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    /// The stackerfiles: paths on the coordinator's machine when `context` is empty (the
    /// embedded mode), else paths relative to the uploaded context's root.
    pub stackerfiles: Vec<String>,
    #[serde(default)]
    pub context: Vec<ContextFile>,
    /// `--substitute` then `--substitute-file` values (built-ins are the farm's).
    pub substitutions: Substitutions,
    /// The submitter's environment, for `build_env_passthrough`.
    pub environment: Vec<(String, String)>,
    pub no_cache: bool,
    pub compression: Compression,
    /// The kind of layers to write (`--layer-type`, `--no-verity`); tar by default.
    #[serde(default)]
    pub layer_format: LayerFormat,
    pub require_hash: bool,
    /// A local submission's wish to read inputs outside the stackerfiles' tree; a remote
    /// one's counts only where the coordinator's [`RemotePolicy`] allows it.
    pub allow_outside_context: bool,
    /// Who sent it (set by the farm's entry points, never taken from a client).
    #[serde(default)]
    pub origin: Origin,
    /// Texts of stackerfiles the submitter fetched itself (http(s) URLs), by path.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub inline: std::collections::BTreeMap<String, String>,
    /// The build's priority in the ready queue (`farm submit --priority`): builds of a
    /// higher priority get free slots first; equal ones share them fairly. Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl Submission {
    /// A local submission of `stackerfiles` (paths on this machine) with every option at
    /// its default: no uploaded context, no substitutions or environment, the cache used,
    /// gzip, no hash required, imports inside the stackerfiles' tree.
    pub fn new(stackerfiles: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Submission {
            stackerfiles: stackerfiles.into_iter().map(Into::into).collect(),
            context: Vec::new(),
            substitutions: Substitutions::default(),
            environment: Vec::new(),
            no_cache: false,
            compression: Compression::default(),
            layer_format: LayerFormat::TAR,
            require_hash: false,
            allow_outside_context: false,
            origin: Origin::Local,
            inline: Default::default(),
            priority: 0,
        }
    }
}

/// Reads submitted texts (by URL) first, then local files the scope allows.
struct SubmittedFiles {
    inline: std::collections::BTreeMap<String, String>,
    scope: LocalScope,
}

impl SubmittedFiles {
    /// Where a file that was not submitted inline is read on this machine, if the scope
    /// lets it be read at all.
    fn local(&self, key: &str, path: &Path) -> std::io::Result<PathBuf> {
        if key.contains("://") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{key} was not fetched by the submitter"),
            ));
        }
        if self.scope == LocalScope::Anywhere {
            return Ok(path.to_path_buf());
        }
        self.scope
            .resolve(LocalKind::Stackerfile, key, path)
            .map_err(|e| match e {
                crate::pin::local::InputError::Missing { .. } => {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "not in the uploaded context")
                }
                e => std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()),
            })
    }
}

impl farm_stackerfile::FileSource for SubmittedFiles {
    fn read_limited(&self, path: &Path, limit: u64) -> std::io::Result<String> {
        let key = url_or_path(path);
        match self.inline.get(&key) {
            Some(text) if text.len() as u64 > limit => {
                Err(farm_stackerfile::too_large(text.len() as u64, limit))
            }
            Some(text) => Ok(text.clone()),
            None => farm_stackerfile::LocalFiles.read_limited(&self.local(&key, path)?, limit),
        }
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        let key = url_or_path(path);
        match self.inline.get(&key) {
            Some(text) => Ok(text.clone()),
            None => farm_stackerfile::LocalFiles.read(&self.local(&key, path)?),
        }
    }
    fn identity(&self, path: &Path) -> PathBuf {
        let key = url_or_path(path);
        if key.contains("://") {
            PathBuf::from(key)
        } else {
            farm_stackerfile::LocalFiles.identity(path)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("the stackerfiles have errors:\n{0}")]
    Plan(String),
    #[error("invalid submission: {0}")]
    Invalid(String),
    #[error("no build {0}")]
    NotFound(String),
    #[error("blob store: {0}")]
    Blobs(#[from] farm_image::Error),
    #[error("{0}")]
    Fetch(#[from] crate::fetch::FetchError),
    #[error("garbage collection: {0}")]
    Gc(#[from] crate::gc::GcError),
    #[error("build logs: {0}")]
    Logs(#[source] std::io::Error),
}

/// A build running in this process.
struct Running {
    cancelled: Arc<AtomicBool>,
    events: broadcast::Sender<Arc<(u64, StoredEvent)>>,
}

pub(crate) struct Inner {
    config: FarmConfig,
    /// Materialised contexts (by listing digest) and how many live builds hold each; a
    /// context no build holds is removed.
    contexts: Mutex<HashMap<String, usize>>,
    state: StateStore,
    cache: ActionCache,
    /// Opened once: builds that start together must not race to create its index.
    fetcher: Fetcher,
    running: Mutex<HashMap<BuildId, Running>>,
    /// Builds' log output, in files beside the state.
    logs: logs::LogFiles,
    sched: sched::Scheduler,
    metrics: crate::metrics::Metrics,
    /// One garbage collection at a time.
    collecting: tokio::sync::Mutex<()>,
    /// Each build's trace (issue 16).
    traces: traces::BuildTraces,
    /// Manifests made lately, for a resubmission's end (see `manifests`).
    manifests: Arc<manifests::ManifestMemo>,
    /// Plans of remote submissions lately planned, for an unchanged resubmission (see
    /// `plans`).
    plans: plans::PlanMemo,
}

/// The coordinator's core; cheap to clone.
#[derive(Clone)]
pub struct Farm {
    inner: Arc<Inner>,
}

impl Farm {
    /// Open the state in `config.state_dir`, resume unfinished builds and start the
    /// scheduler.
    pub async fn start(config: FarmConfig) -> Result<Farm, FarmError> {
        crate::db::private_dir(&config.state_dir).map_err(|e| {
            FarmError::Invalid(format!(
                "creating the state dir {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let state = StateStore::open(&config.state_dir.join("state.db")).await?;
        let cache = ActionCache::open(&config.state_dir.join("cache.db")).await?;
        let fetcher = Fetcher::new(
            config.blobs.clone(),
            &config.state_dir,
            FetchOptions::default(),
        )
        .await?;
        // Workers get one lease period to reconnect after a restart.
        let prior_leases = config.resume && state.renew_all(unix_ms()).await? > 0;
        let inner = Arc::new(Inner {
            sched: sched::Scheduler::new(config.lease, prior_leases),
            logs: logs::LogFiles::new(&config.state_dir, config.max_layer_log),
            config,
            state,
            cache,
            fetcher,
            running: Mutex::new(HashMap::new()),
            contexts: Mutex::new(HashMap::new()),
            metrics: crate::metrics::Metrics::default(),
            collecting: tokio::sync::Mutex::new(()),
            traces: traces::BuildTraces::default(),
            manifests: Default::default(),
            plans: Default::default(),
        });
        sched::Scheduler::spawn_loops(&inner);
        collect::spawn_periodic(&inner);
        let farm = Farm { inner };
        let unfinished = if farm.inner.config.resume {
            farm.inner.state.unfinished_builds().await?
        } else {
            Vec::new()
        };
        for build in unfinished {
            match serde_json::from_str::<Submission>(&build.spec_json) {
                Ok(spec) => {
                    tracing::info!(build = %build.id, "resuming build");
                    let held = farm.inner.hold_context(&spec);
                    farm.spawn_driver(build.id, spec, None, held);
                }
                Err(e) => {
                    farm.inner
                        .state
                        .fail_build(&build.id, &format!("its stored request is unreadable: {e}"))
                        .await?;
                }
            }
        }
        farm.inner.sweep_contexts();
        Ok(farm)
    }

    /// The limits submissions are held to.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    pub(crate) fn state(&self) -> &StateStore {
        &self.inner.state
    }

    /// The status of build `id` (`None`: no such build).
    pub async fn status(&self, id: &str) -> Result<Option<crate::state::BuildStatus>, FarmError> {
        Ok(self.inner.state.status(id).await?)
    }

    /// The images of build `id`'s built (or cached) layers, by layer name, in plan order.
    pub async fn built_images(&self, id: &str) -> Result<Vec<(String, BuiltImage)>, FarmError> {
        let mut out = Vec::new();
        for layer in self.inner.state.layers(id).await? {
            let Some(json) = &layer.result_json else {
                continue;
            };
            let image = serde_json::from_str(json).map_err(|e| {
                FarmError::Invalid(format!(
                    "build {id}: the recorded result of layer '{}' is unreadable: {e}",
                    layer.name
                ))
            })?;
            out.push((layer.name, image));
        }
        Ok(out)
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.config.blobs
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// Plan a submission (its errors come back as [`FarmError::Plan`]), record it and
    /// start it. Returns the build id and the layer names in plan order.
    pub async fn submit(&self, spec: Submission) -> Result<(BuildId, Vec<String>), FarmError> {
        self.submit_as(spec, None).await
    }

    /// [`Farm::submit`] on behalf of `owner` (an authenticated client), recorded with the
    /// build.
    pub async fn submit_as(
        &self,
        spec: Submission,
        owner: Option<&str>,
    ) -> Result<(BuildId, Vec<String>), FarmError> {
        // The build holds its context from here; a refused submission lets go of it.
        let held = self.inner.hold_context(&spec);
        let created = async {
            let plan = self.inner.plan(&spec).await?;
            crate::build::check_source_date_epoch(&plan, &spec.environment)
                .map_err(FarmError::Invalid)?;
            let names: Vec<String> = plan.layers.iter().map(|l| l.layer.name.clone()).collect();
            let json =
                serde_json::to_string(&spec).map_err(|e| FarmError::Invalid(e.to_string()))?;
            let id = self
                .inner
                .state
                .create_build_owned(&json, &names, owner)
                .await?;
            Ok::<_, FarmError>((plan, names, id))
        }
        .await;
        let (plan, names, id) = match created {
            Ok(c) => c,
            Err(e) => {
                self.inner.release_context(held);
                return Err(e);
            }
        };
        tracing::info!(build = %id, layers = names.len(), owner, "build submitted");
        self.spawn_driver(id.clone(), spec, Some(plan), held);
        Ok((id, names))
    }

    /// Drive build `id`; `held` is the context it holds (let go when the build ends).
    fn spawn_driver(
        &self,
        id: BuildId,
        spec: Submission,
        plan: Option<Arc<Plan>>,
        held: Option<String>,
    ) {
        let cancelled = Arc::new(AtomicBool::new(false));
        let (events, _) = broadcast::channel(4096);
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                Running {
                    cancelled: cancelled.clone(),
                    events,
                },
            );
        let inner = self.inner.clone();
        let span = inner.traces.build_span(&id);
        let drive = async move {
            let result = inner.drive(&id, spec, plan, cancelled).await;
            if let Err(e) = result {
                tracing::error!(build = %id, "build failed: {e}");
                farm_telemetry::record_error(&tracing::Span::current(), &e.to_string());
                if let Err(e) = inner.state.fail_build(&id, &e.to_string()).await {
                    tracing::error!(
                        build = %id,
                        "recording the build's failure: {e}; it stays unfinished in the \
                         state, and a restarted coordinator runs it again"
                    );
                }
                inner
                    .publish(
                        &id,
                        vec![StoredEvent::finished(
                            BuildState::Failed,
                            Some(e.to_string()),
                        )],
                    )
                    .await;
            }
            inner.metrics.build_finished();
            match inner.state.prune_finished(inner.config.keep_builds).await {
                Ok(0) => {}
                // The log files of the builds forgotten go with them.
                Ok(_) => inner.sweep_logs().await,
                Err(e) => tracing::warn!("forgetting old builds: {e}"),
            }
            inner
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            inner.logs.close(&id);
            inner.release_context(held);
        };
        tokio::spawn(tracing::Instrument::instrument(drive, span));
    }

    /// Cancel a build: queued layers never start, running ones are stopped on their
    /// workers. Returns the build's state afterwards.
    pub async fn cancel(&self, id: &str) -> Result<BuildState, FarmError> {
        let Some(build) = self.inner.state.build(id).await? else {
            return Err(FarmError::NotFound(id.to_string()));
        };
        if build.state.is_finished() {
            return Ok(build.state);
        }
        if let Some(r) = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            r.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.state.cancel_build(id).await?;
        self.inner.sched.cancel_build(id);
        Ok(BuildState::Cancelled)
    }

    /// Events of build `id` after `after_seq`: those stored, then live ones until the
    /// build ends. `None` for an unknown build.
    pub async fn watch(
        &self,
        id: &str,
        after_seq: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<(u64, StoredEvent)>, FarmError> {
        events::watch(self.inner.clone(), id, after_seq).await
    }

    /// Build `id`'s stored events after `after_seq` (what [`Farm::watch`] replays
    /// first), a few at a time through the receiver, chunks of output with their text.
    pub async fn stored_events(
        &self,
        id: &str,
        after_seq: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<(u64, StoredEvent)>, FarmError> {
        if self.inner.state.build(id).await?.is_none() {
            return Err(FarmError::NotFound(id.to_string()));
        }
        Ok(events::stored(self.inner.clone(), id, after_seq))
    }

    /// Remove build `id`'s log file (`<state dir>/logs/<id>.log`), for garbage
    /// collection of a build that is forgotten. Its stored events then name output
    /// that is gone, which readers skip. A build without a file is fine.
    pub fn remove_logs(&self, id: &str) -> std::io::Result<()> {
        self.inner.logs.remove(id)
    }

    /// The cap on one layer's output told to workers with each assignment.
    pub(crate) fn max_layer_log(&self) -> u64 {
        self.inner.logs.max_layer_log()
    }

    /// Attach a worker through channels (the embedded worker; the gRPC service uses the
    /// same call for remote ones). `None` outside a Tokio runtime.
    pub fn connect_worker(&self) -> Option<WorkerLink> {
        crate::grpc::workers::link(self, None)
    }

    /// Register a worker that `outbox` reaches; see [`WorkerSession`].
    pub(crate) async fn register_worker(
        &self,
        info: WorkerInfo,
        outbox: Box<dyn WorkerOutbox>,
    ) -> Result<WorkerSession, RegisterError> {
        self.inner.sched.register(&self.inner, info, outbox).await
    }

    /// Workers that are or were connected.
    pub async fn workers(&self) -> Result<Vec<WorkerView>, FarmError> {
        self.inner.sched.workers(&self.inner).await
    }
}

/// The layers of `plan` in chunks for the build's end: at most [`MANIFESTS_AT_ONCE`]
/// manifests, and about [`MANIFEST_BYTES_AT_ONCE`] of them, each.
fn manifest_chunks(plan: &Plan, outcomes: &[Outcome]) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut count, mut bytes) = (0, 0, 0);
    for (i, (planned, outcome)) in plan.layers.iter().zip(outcomes).enumerate() {
        if matches!(outcome, Outcome::Built { .. }) && !planned.layer.build_only {
            count += 1;
            // The manifest's size is about its stackerfile's, plus its descriptors.
            bytes += plan.files[planned.file].substituted.len() + 1024;
        }
        if count >= MANIFESTS_AT_ONCE || bytes >= MANIFEST_BYTES_AT_ONCE {
            chunks.push(start..i + 1);
            (start, count, bytes) = (i + 1, 0, 0);
        }
    }
    if start < plan.layers.len() {
        chunks.push(start..plan.layers.len());
    }
    chunks
}

/// The manifest of an image layer at a build's end.
struct EndManifest {
    /// Where its layer is among the chunk's results.
    at: usize,
    /// Its layer in the plan.
    layer: usize,
    key: manifests::Key,
    made: Made,
}

enum Made {
    /// Made now.
    Now(Vec<u8>),
    /// Made before (the memo's), if the blob store still has it.
    Before(Digest),
}

/// The results of the built layers in `range` (a restart's earlier build time kept), and
/// the manifests of those that are images.
type ChunkResults = (Vec<LayerResult>, Vec<EndManifest>);

/// What the end of a build makes its manifests from, besides the plan and outcomes.
struct ManifestInputs {
    git: GitVersions,
    /// Each stackerfile's hash, for the memo's keys.
    file_hashes: Vec<manifests::Key>,
    /// The annotation that carries a layer's stackerfile (see
    /// `manifest_annotations_with`): in a key, its value counts by the file's hash.
    yaml_annotation: String,
    memo: Arc<manifests::ManifestMemo>,
}

impl ManifestInputs {
    /// The manifest of image layer `i`, built with `result`, recorded as `result_json`.
    fn manifest(
        &self,
        plan: &Plan,
        i: usize,
        result: &BuiltImage,
        result_json: &str,
    ) -> Result<(manifests::Key, Made), FarmError> {
        let annotations =
            manifest_annotations_with(plan, i, DEFAULT_ANNOTATION_NAMESPACE, &self.git);
        let key = manifests::key(
            result_json,
            &annotations,
            &self.yaml_annotation,
            &self.file_hashes[plan.layers[i].file],
        );
        let made = match self.memo.get(&key) {
            Some(digest) => Made::Before(digest),
            None => Made::Now(manifest_bytes(result, &annotations)?),
        };
        Ok((key, made))
    }

    /// The manifest of image layer `i` (built, in `outcomes`), made now.
    fn remake(&self, plan: &Plan, outcomes: &[Outcome], i: usize) -> Result<Vec<u8>, FarmError> {
        let Outcome::Built { result, .. } = &outcomes[i] else {
            return Err(FarmError::Invalid(format!(
                "internal error: layer {i} has a manifest but did not build"
            )));
        };
        let annotations =
            manifest_annotations_with(plan, i, DEFAULT_ANNOTATION_NAMESPACE, &self.git);
        Ok(manifest_bytes(result, &annotations)?)
    }
}

fn chunk_results(
    plan: &Plan,
    outcomes: &[Outcome],
    prior: &HashMap<u32, (String, bool, Option<u64>)>,
    inputs: &ManifestInputs,
    range: std::ops::Range<usize>,
) -> Result<ChunkResults, FarmError> {
    let mut results = Vec::new();
    let mut manifests = Vec::new();
    for i in range {
        let Outcome::Built {
            result,
            cached,
            duration,
        } = &outcomes[i]
        else {
            continue;
        };
        let result_json =
            serde_json::to_string(result).map_err(|e| FarmError::Invalid(e.to_string()))?;
        // A layer this build built before a coordinator restart is a cache hit now, but
        // it was built, by its worker, in the time recorded then.
        let (mut cached, mut duration_ms) = (*cached, duration.as_millis() as u64);
        if let Some((json, false, Some(ms))) = prior.get(&(i as u32))
            && cached
            && &result_json == json
        {
            (cached, duration_ms) = (false, *ms);
        }
        // Only images (not build_only layers) get a manifest: `tagged` in the status is
        // "has a manifest digest".
        if !plan.layers[i].layer.build_only {
            let (key, made) = inputs.manifest(plan, i, result, &result_json)?;
            manifests.push(EndManifest {
                at: results.len(),
                layer: i,
                key,
                made,
            });
        }
        results.push(LayerResult {
            idx: i as u32,
            result_json,
            cached,
            duration_ms,
            manifest_digest: None,
        });
    }
    Ok((results, manifests))
}

/// How many manifests the end of a build makes and stores together (a few in tests, so
/// their builds cross chunks), and about how many bytes of them: each carries its whole
/// stackerfile, so one file of thousands of layers makes big ones. 2 MiB kept the scale
/// bench's peak RSS where the one-chunk-at-a-time end had it (16 MiB chunks, two in
/// flight, added ~100 MB of allocator arenas); the time was the same.
const MANIFESTS_AT_ONCE: usize = if cfg!(test) { 3 } else { 1024 };
const MANIFEST_BYTES_AT_ONCE: usize = 2 << 20;
/// How many chunks are in hand at once: made on the blocking pool, stored, their rows
/// queued; the end is mostly waiting for the store's syncs, so more than there are
/// cores to make them.
const MANIFEST_CHUNKS_AT_ONCE: usize = 3;

impl Inner {
    /// Parse and plan a submission as the coordinator sees it.
    async fn plan(&self, spec: &Submission) -> Result<Arc<Plan>, FarmError> {
        if spec.stackerfiles.is_empty() {
            return Err(FarmError::Invalid("no stackerfile given".into()));
        }
        let root = self.context_root(spec).await?;
        if spec.origin == Origin::Remote
            && let Some(bad) = spec.stackerfiles.iter().find(|f| {
                !f.contains("://")
                    && !Path::new(f)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            })
        {
            return Err(FarmError::Invalid(format!(
                "stackerfile {bad:?}: a remote submission names its stackerfiles by paths \
                 relative to its uploaded context (no absolute path, no '..'); the \
                 coordinator reads nothing of its own disk for it"
            )));
        }
        let files: Vec<PathBuf> = spec
            .stackerfiles
            .iter()
            .map(|f| match &root {
                Some(root) if !f.contains("://") => root.join(f),
                _ => PathBuf::from(f),
            })
            .collect();
        let mut substitutions = spec.substitutions.clone();
        substitutions.builtins = self.config.builtins.clone();
        let options = PlanOptions {
            substitutions,
            max_file_size: self.config.limits.max_stackerfile_size,
        };
        let source = SubmittedFiles {
            inline: spec.inline.clone(),
            // Prerequisites and stackerfiles: a remote submission's come from what it
            // uploaded; a local one reads its own files.
            scope: match spec.origin {
                Origin::Local => LocalScope::Anywhere,
                Origin::Remote => self.remote_scope(spec, root.as_deref()),
            },
        };
        // Only what reads nothing but its uploaded context is remembered.
        let memo_key = match &source.scope {
            LocalScope::Uploaded(root) => Some(plans::key(root, spec)),
            _ => None,
        };
        if let Some(plan) = memo_key.as_ref().and_then(|k| self.plans.get(k)) {
            return Ok(plan);
        }
        let loaded =
            tokio::task::spawn_blocking(move || Plan::load_many(&files, &options, &source))
                .await
                .map_err(|e| FarmError::Invalid(e.to_string()))?;
        match loaded {
            Ok(plan) if plan.layers.len() > self.config.limits.max_layers => {
                Err(FarmError::Invalid(format!(
                    "the plan has {} layers, over the coordinator's limit of {} (raise it \
                     with `farm coordinator --max-layers N`)",
                    plan.layers.len(),
                    self.config.limits.max_layers
                )))
            }
            Ok(plan) => {
                let plan = Arc::new(plan);
                if let Some(key) = memo_key {
                    self.plans.insert(key, plan.clone());
                }
                Ok(plan)
            }
            // Paths in an uploaded context are shown as the submitter wrote them.
            Err(e) => Err(FarmError::Plan(match &root {
                Some(root) => e.to_string().replace(&format!("{}/", root.display()), ""),
                None => e.to_string(),
            })),
        }
    }

    /// Where a remote submission's local inputs may come from: its uploaded context
    /// (none uploaded: nowhere), or anywhere when the operator allows it and the
    /// submission asks.
    fn remote_scope(&self, spec: &Submission, root: Option<&Path>) -> LocalScope {
        match (
            self.config.remote.outside_context,
            spec.allow_outside_context,
            root,
        ) {
            (OutsideContext::WhenAsked, true, _) => LocalScope::Anywhere,
            (_, _, Some(root)) => LocalScope::Uploaded(root.to_path_buf()),
            (_, _, None) => LocalScope::Nowhere,
        }
    }

    /// Where an uploaded context lives on this machine (written once per distinct
    /// context: resubmissions reuse it); `None` for the embedded mode.
    async fn context_root(&self, spec: &Submission) -> Result<Option<PathBuf>, FarmError> {
        if spec.context.is_empty() {
            return Ok(None);
        }
        let limits = &self.config.limits;
        if spec.context.len() > limits.max_context_files {
            return Err(FarmError::Invalid(format!(
                "the uploaded context lists {} files, over the coordinator's limit of {} \
                 (submit a smaller context, or raise the limit with `farm coordinator \
                 --max-context-files N`)",
                spec.context.len(),
                limits.max_context_files
            )));
        }
        let id = context_id(&spec.context)?;
        let dir = self.config.state_dir.join("contexts").join(&id);
        // Resolved, so paths under it compare with what the stackerfile loader resolves.
        let canonical = |dir: PathBuf| std::fs::canonicalize(&dir).unwrap_or(dir);
        if dir.exists() {
            return Ok(Some(canonical(dir)));
        }
        let mut files = spec.context.clone();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let tree = context_tree(&files)?;
        self.check_context_size(&files).await?;
        let json = serde_json::to_vec(&tree).map_err(|e| FarmError::Invalid(e.to_string()))?;
        let tree_digest = self.config.blobs.put(json.into()).await?.digest;
        // Unique per call: identical submissions arriving together each write their own.
        static TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.config.state_dir.join("contexts").join(format!(
            ".tmp-{id}-{}-{}",
            unix_ms(),
            TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(tmp.parent().unwrap_or(Path::new("/")))
            .map_err(|e| FarmError::Invalid(format!("creating {}: {e}", tmp.display())))?;
        let written = self
            .config
            .blobs
            .materialize_tree(&tree_digest, &tmp)
            .await
            .map_err(|e| match e {
                farm_image::Error::BlobNotFound(d) => FarmError::Invalid(format!(
                    "context file with digest {d} was not uploaded (upload it through Blobs first)"
                )),
                e => FarmError::Blobs(e),
            });
        if let Err(e) = written {
            // Half a context is no use to anyone.
            remove_dir_quietly(tmp).await;
            return Err(e);
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            // Someone else wrote the same context first.
            remove_dir_quietly(tmp).await;
        }
        Ok(Some(canonical(dir)))
    }

    /// Refuse a context whose files add up to more than the limit, counting each listed
    /// file at its blob's size (a blob listed under many paths is written for each).
    async fn check_context_size(&self, files: &[ContextFile]) -> Result<(), FarmError> {
        let max = self.config.limits.max_context_size;
        let mut unique: Vec<String> = files
            .iter()
            .filter(|f| !f.digest.is_empty() && f.symlink_target.is_empty())
            .map(|f| f.digest.clone())
            .collect();
        unique.sort_unstable();
        unique.dedup();
        let sizes: HashMap<String, u64> = futures::stream::iter(unique)
            .map(|d| {
                let blobs = self.config.blobs.clone();
                async move {
                    let digest = Digest::parse(&d).map_err(|e| {
                        FarmError::Invalid(format!("context file digest {d:?}: {e}"))
                    })?;
                    match blobs.size(&digest).await? {
                        Some(size) => Ok((d, size)),
                        None => Err(FarmError::Invalid(format!(
                            "context file with digest {d} was not uploaded (upload it through \
                         Blobs first)"
                        ))),
                    }
                }
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let total = files
            .iter()
            .filter_map(|f| sizes.get(&f.digest))
            .fold(0u64, |a, b| a.saturating_add(*b));
        if total > max {
            return Err(FarmError::Invalid(format!(
                "the uploaded context's files add up to {total} bytes, over the \
                 coordinator's limit of {max} (submit a smaller context, or raise the limit \
                 with `farm coordinator --max-context-size SIZE`)"
            )));
        }
        Ok(())
    }

    /// A build needs its context from now on: the id of the context held (`None`: the
    /// submission uploaded none).
    fn hold_context(&self, spec: &Submission) -> Option<String> {
        if spec.context.is_empty() {
            return None;
        }
        let id = context_id(&spec.context).ok()?;
        *self
            .contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_insert(0) += 1;
        Some(id)
    }

    /// A build no longer needs its context; the last one out removes it. The directory
    /// is renamed away under the lock (a build arriving now writes it afresh) and
    /// removed after.
    fn release_context(&self, held: Option<String>) {
        let Some(id) = held else {
            return;
        };
        let contexts = self.config.state_dir.join("contexts");
        let doomed = {
            let mut held = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
            let Some(n) = held.get_mut(&id) else {
                return;
            };
            *n -= 1;
            if *n > 0 {
                return;
            }
            held.remove(&id);
            let doomed = contexts.join(format!(".tmp-gone-{id}-{}", unix_ms()));
            match std::fs::rename(contexts.join(&id), &doomed) {
                Ok(()) => doomed,
                Err(_) => return,
            }
        };
        tokio::spawn(remove_dir_quietly(doomed));
    }

    /// At start: remove what no build holds (contexts of finished builds, `.tmp-*`
    /// directories a crash left behind).
    fn sweep_contexts(&self) {
        let dir = self.config.state_dir.join("contexts");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let held = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !held.contains_key(&name) {
                tracing::debug!(context = %name, "removing a context no build holds");
                tokio::spawn(remove_dir_quietly(entry.path()));
            }
        }
    }

    /// Run one build to its end.
    async fn drive(
        self: &Arc<Self>,
        id: &str,
        spec: Submission,
        plan: Option<Arc<Plan>>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(), FarmError> {
        self.state.set_build_state(id, BuildState::Running).await?;
        // Planned again: the build is resumed after a coordinator restart.
        let resumed = plan.is_none();
        let plan = match plan {
            Some(p) => p,
            None => self.plan(&spec).await?,
        };
        tracing::Span::current().record("layers", plan.layers.len());
        let root = self.context_root(&spec).await?;
        let policy = &self.config.remote;
        let (context, destinations, scope) = match spec.origin {
            Origin::Local => (
                if spec.allow_outside_context {
                    LocalScope::Anywhere
                } else {
                    LocalScope::Within(root.clone().unwrap_or_else(|| common_dir(&plan)))
                },
                Destinations::Any,
                CredentialScope::Every,
            ),
            Origin::Remote => (
                self.remote_scope(&spec, root.as_deref()),
                Destinations::Public(Arc::new(policy.fetch.clone())),
                CredentialScope::Only(policy.registry_credentials_for.clone()),
            ),
        };
        let fetcher = self.fetcher.with_options(FetchOptions {
            require_hash: spec.require_hash,
            destinations: destinations.clone(),
            ..FetchOptions::default()
        })?;
        let options = BuildOptions {
            no_cache: spec.no_cache,
            compression: spec.compression,
            layer_format: spec.layer_format,
            caller_env: spec.environment.clone(),
            context,
            check_binds: spec.origin == Origin::Local,
            platform: self.config.platform.clone(),
            fetcher,
            cancelled: cancelled.clone(),
            registry: RegistryBases::scoped(self.config.registry.clone(), scope)
                .reaching(destinations),
        };
        let (events, rx) = EventSender::channel();
        let names: Vec<String> = plan.layers.iter().map(|l| l.layer.name.clone()).collect();
        let recorder = tokio::spawn(events::record(self.clone(), id.to_string(), names, rx));
        let executor = Arc::new(sched::FarmExecutor::new(
            self.clone(),
            id,
            &plan,
            spec.no_cache,
            spec.priority,
        ));
        let report = run_build(
            &plan,
            &self.config.blobs,
            &self.cache,
            executor.clone(),
            &options,
            events,
        )
        .await;
        executor.settled().await;
        let _ = recorder.await;
        let report = report.map_err(|e| FarmError::Invalid(e.to_string()))?;

        // The results this build recorded before a coordinator restart (see
        // `chunk_results`); only a resumed build has any: a fresh one is not read back.
        let prior: HashMap<u32, (String, bool, Option<u64>)> = if resumed {
            self.state
                .layers(id)
                .await?
                .into_iter()
                .filter_map(|l| Some((l.idx, (l.result_json?, l.cached, l.duration_ms))))
                .collect()
        } else {
            HashMap::new()
        };
        // Every layer's result and image manifest, a chunk at a time, a few chunks at
        // once: made on the blocking pool, the manifests stored (see
        // `BlobStore::put_many`), the rows queued. Chunks are bounded in bytes too: each
        // manifest carries its stackerfile's text (stacker's `stacker_yaml` annotation),
        // so all of a big build's at once would be hundreds of MB.
        let succeeded = report.succeeded();
        let mut git = GitVersions::default();
        git.warm(&plan);
        let inputs = Arc::new(ManifestInputs {
            git,
            file_hashes: manifests::file_hashes(&plan),
            yaml_annotation: format!("{DEFAULT_ANNOTATION_NAMESPACE}.stacker.stacker_yaml"),
            memo: self.manifests.clone(),
        });
        let chunks = manifest_chunks(&plan, &report.outcomes);
        let outcomes = Arc::new(report.outcomes);
        let prior = Arc::new(prior);
        let (plan, outcomes, prior) = (&plan, &outcomes, &prior);
        let inputs = &inputs;
        let mut recorded = futures::stream::iter(chunks)
            .map(|range| async move {
                let made = {
                    let (plan, outcomes) = (plan.clone(), outcomes.clone());
                    let (prior, inputs) = (prior.clone(), inputs.clone());
                    tokio::task::spawn_blocking(move || {
                        chunk_results(&plan, &outcomes, &prior, &inputs, range)
                    })
                    .await
                    .map_err(|e| FarmError::Invalid(format!("making the build's manifests: {e}")))?
                };
                let results = self.store_manifests(made?, plan, outcomes, inputs).await?;
                // Queued now, awaited below: the state's writer commits a chunk's rows
                // while the next chunks are made and stored.
                Ok::<_, FarmError>(self.state.layer_results(id, results))
            })
            .buffer_unordered(MANIFEST_CHUNKS_AT_ONCE);
        let mut written = Vec::new();
        while let Some(write) = recorded.next().await {
            written.push(write?);
        }
        drop(recorded);
        for write in written {
            write.await?;
        }
        let (state, error) = if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
            (BuildState::Cancelled, Some("cancelled".to_string()))
        } else if succeeded {
            (BuildState::Succeeded, None)
        } else {
            let first = plan
                .layers
                .iter()
                .zip(outcomes.iter())
                .find_map(|(l, o)| match o {
                    Outcome::Failed(e) => Some(format!("layer '{}': {e}", l.layer.name)),
                    _ => None,
                })
                .unwrap_or_else(|| "a layer did not build".to_string());
            (BuildState::Failed, Some(first))
        };
        match state {
            BuildState::Failed => {
                self.state
                    .fail_build(id, error.as_deref().unwrap_or_default())
                    .await?
            }
            BuildState::Cancelled => {}
            s => self.state.set_build_state(id, s).await?,
        }
        tracing::info!(build = %id, state = %state, "build finished");
        let span = tracing::Span::current();
        span.record("state", tracing::field::display(state));
        if let (BuildState::Failed, Some(e)) = (state, &error) {
            farm_telemetry::record_error(&span, e);
        }
        self.publish(id, vec![StoredEvent::finished(state, error)])
            .await;
        Ok(())
    }

    /// Store a chunk's manifests (a remembered one checked in the store, made again if
    /// it was collected since) and return its results, each with its manifest's digest.
    async fn store_manifests(
        &self,
        (mut results, manifests): ChunkResults,
        plan: &Plan,
        outcomes: &[Outcome],
        inputs: &ManifestInputs,
    ) -> Result<Vec<LayerResult>, FarmError> {
        let blobs = &self.config.blobs;
        let remembered = manifests.iter().filter_map(|m| match &m.made {
            Made::Before(digest) => Some(digest.clone()),
            Made::Now(_) => None,
        });
        let gone: HashSet<Digest> = blobs.missing(remembered).await?.into_iter().collect();
        let mut now = Vec::new();
        for m in manifests {
            match m.made {
                Made::Before(digest) if !gone.contains(&digest) => {
                    results[m.at].manifest_digest = Some(digest.to_string());
                }
                Made::Before(_) => {
                    now.push((m.at, m.key, inputs.remake(plan, outcomes, m.layer)?));
                }
                Made::Now(bytes) => now.push((m.at, m.key, bytes)),
            }
        }
        if !now.is_empty() {
            let (places, bytes): (Vec<_>, Vec<_>) = now
                .into_iter()
                .map(|(at, key, bytes)| ((at, key), bytes.into()))
                .unzip();
            let stored = blobs.put_many(bytes).await?;
            for ((at, key), info) in places.into_iter().zip(stored) {
                results[at].manifest_digest = Some(info.digest.to_string());
                self.manifests.insert(key, info.digest);
            }
        }
        Ok(results)
    }

    /// Store events and send them to live watchers.
    async fn publish(&self, id: &str, events: Vec<StoredEvent>) {
        if events.is_empty() {
            return;
        }
        let jsons: Vec<String> = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap_or_default())
            .collect();
        let last = match self.state.append_events(id, &jsons).await {
            Ok(last) => last,
            Err(e) => {
                tracing::error!(build = %id, "recording events: {e}");
                return;
            }
        };
        let first = last + 1 - events.len() as u64;
        let sender = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| r.events.clone());
        if let Some(sender) = sender {
            for (n, e) in events.into_iter().enumerate() {
                let _ = sender.send(Arc::new((first + n as u64, e)));
            }
        }
    }

    /// Remove the log files of builds the state no longer has (forgotten, or gone
    /// with a state reset); logged, never fatal.
    pub(super) async fn sweep_logs(&self) {
        if let Err(e) = sweep_log_files(&self.logs, &self.state).await {
            tracing::warn!("removing the log files of forgotten builds: {e}");
        }
    }

    /// Was build `id` cancelled (while it runs in this process)?
    fn is_cancelled(&self, id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|r| r.cancelled.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn subscribe(&self, id: &str) -> Option<broadcast::Receiver<Arc<(u64, StoredEvent)>>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| r.events.subscribe())
    }
}

/// The identity of an uploaded context (its directory's name under `contexts/`): the
/// digest of its listing, in path order.
fn context_id(context: &[ContextFile]) -> Result<String, FarmError> {
    let mut files: Vec<&ContextFile> = context.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let listing = serde_json::to_vec(&files).map_err(|e| FarmError::Invalid(e.to_string()))?;
    Ok(Digest::of(&listing).hex().to_string())
}

/// Remove a directory tree, logging (not failing) when that does not work.
async fn remove_dir_quietly(dir: PathBuf) {
    let shown = dir.display().to_string();
    let res = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => tracing::warn!(dir = %shown, "removing a context: {e}"),
        Err(e) => tracing::warn!(dir = %shown, "removing a context: {e}"),
    }
}

/// The tree of an uploaded context: directories (sent, or implied by a path under
/// them, mode 0755) first, then files and symlinks; every path checked.
fn context_tree(files: &[ContextFile]) -> Result<Tree, FarmError> {
    let mut dirs: std::collections::BTreeMap<String, u32> = Default::default();
    let mut rest = Vec::new();
    for f in files {
        let p = Path::new(&f.path);
        if f.path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(FarmError::Invalid(format!(
                "context path {:?} must be relative, without '.' or '..'",
                f.path
            )));
        }
        let mut parent = p.parent();
        while let Some(d) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.entry(d.to_string_lossy().into_owned())
                .or_insert(0o755);
            parent = d.parent();
        }
        // Permission bits only: no setuid, setgid or sticky bit from a client.
        let mode = f.mode & 0o777;
        if f.digest.is_empty() && f.symlink_target.is_empty() {
            dirs.insert(f.path.clone(), if mode == 0 { 0o755 } else { mode });
        } else if f.symlink_target.is_empty() {
            rest.push(TreeEntry::File {
                path: f.path.clone(),
                mode: if mode == 0 { 0o644 } else { mode },
                digest: f.digest.clone(),
                size: 0,
            });
        } else {
            rest.push(TreeEntry::Symlink {
                path: f.path.clone(),
                target: f.symlink_target.clone(),
            });
        }
    }
    let mut entries: Vec<TreeEntry> = dirs
        .into_iter()
        .map(|(path, mode)| TreeEntry::Dir { path, mode })
        .collect();
    entries.extend(rest);
    Ok(Tree { entries })
}

//! Running a plan: pin each layer's inputs, compute its cache key, answer hits from the
//! action cache, and hand the rest to the [`Executor`] (the farm's scheduler) as soon as
//! their dependencies are built. A failing layer fails its dependents; independent
//! layers finish.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_image::{BlobStore, Compression, Digest, LayerFormat};
use farm_model::{BuiltImage, Event, EventSender, Job, LayerFailure, LayerOutcome, Platform};
use farm_stackerfile::{Layer, Plan};
use futures::StreamExt as _;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::cache::{ActionCache, KeyInputs};
use crate::pin::registry::RegistryBases;
use crate::pin::{Built, PinError, Sources};

/// Builds layers: the farm's scheduler, which sends them to workers. A layer it returns
/// for a cacheable job is in the action cache already, under the job's key (the
/// scheduler writes it there before identical layers of other builds are told).
pub trait Executor: Send + Sync + 'static {
    fn execute(&self, job: Job, events: EventSender) -> impl Future<Output = LayerOutcome> + Send;
}

/// Options of one build.
#[derive(Clone)]
pub struct BuildOptions {
    pub no_cache: bool,
    pub compression: Compression,
    /// The kind of layers to write; enters every key.
    pub layer_format: LayerFormat,
    /// The caller's environment, for `build_env_passthrough`.
    pub caller_env: Vec<(String, String)>,
    /// Where local inputs (bases, imports, overlay dirs) may come from.
    pub context: crate::pin::local::LocalScope,
    /// Check here that `binds` sources exist (the embedded mode, whose worker is this
    /// machine); a remote submission's binds are the worker's to check and allow.
    pub check_binds: bool,
    /// The platform of layers that name none.
    pub platform: Platform,
    /// Downloads http(s) imports and tarballs into the blob store.
    pub fetcher: crate::fetch::Fetcher,
    /// Set to stop starting layers (Ctrl-C, cancel); running ones are the executor's.
    pub cancelled: Arc<std::sync::atomic::AtomicBool>,
    /// `docker` bases: credentials, and each reference resolved once per build.
    pub registry: RegistryBases,
}

/// How one layer ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Built {
        /// Shared with the jobs of the layers built on it (see `JobBase`).
        result: Arc<BuiltImage>,
        cached: bool,
        duration: Duration,
    },
    Failed(LayerFailure),
    /// Not built because a dependency was not (the reason says which).
    Skipped(String),
    /// Not started because the build was cancelled.
    Cancelled,
}

/// The result of a build: one outcome per layer of the plan, in plan order.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub outcomes: Vec<Outcome>,
}

impl BuildReport {
    pub fn succeeded(&self) -> bool {
        self.outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Built { .. }))
    }
}

/// Why a build could not go on: the farm's stores failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("blob store: {0}")]
    Blobs(#[from] farm_image::Error),
}

/// Why a layer's job could not be made; every one is the input's fault, and fails the
/// layer (its message does not repeat the layer's name: the build's error adds it).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(
        "it runs commands for {platform}, but this worker is {default}; farm does not \
         emulate other platforms (build it on a {platform} worker, or remove 'os'/'arch')"
    )]
    ForeignPlatform {
        platform: Platform,
        default: Platform,
    },
    #[error("bind source '{written}' ({}) does not exist on this worker", path.display())]
    MissingBind { written: String, path: PathBuf },
}

/// `SOURCE_DATE_EPOCH` as seconds since 1970: a non-negative integer.
pub fn parse_source_date_epoch(value: &str) -> Option<u64> {
    value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse().ok())
        .flatten()
}

/// Refuse a `SOURCE_DATE_EPOCH` that is not a non-negative integer, the caller's or a
/// layer's `build_env`, before anything is built (stacker refuses it too; an empty value
/// counts as unset).
pub fn check_source_date_epoch(plan: &Plan, caller_env: &[(String, String)]) -> Result<(), String> {
    let bad = |v: &str| !v.is_empty() && parse_source_date_epoch(v).is_none();
    let message = |v: &str, whose: String| {
        format!(
            "SOURCE_DATE_EPOCH '{v}' {whose}is not a non-negative integer (seconds since \
             1970-01-01 UTC)"
        )
    };
    if let Some((_, v)) = caller_env
        .iter()
        .find(|(k, v)| k == "SOURCE_DATE_EPOCH" && bad(v))
    {
        return Err(message(v, String::new()));
    }
    for p in &plan.layers {
        if let Some(v) = p
            .layer
            .build_env
            .get("SOURCE_DATE_EPOCH")
            .filter(|v| bad(v))
        {
            return Err(message(
                v,
                format!("in the build_env of layer '{}' ", p.layer.name),
            ));
        }
    }
    Ok(())
}

/// The environment of `run`: the caller's variables `layer` passes through (see
/// [`passthrough`]), then `build_env`, then `STACKER_LAYER_NAME`.
pub fn run_environment(
    layer: &Layer,
    passthrough: BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = passthrough;
    env.entry("PATH".into())
        .or_insert_with(|| farm_stackerfile::DEFAULT_PATH.to_string());
    for (k, v) in &layer.build_env {
        env.insert(k.clone(), v.clone());
    }
    env.insert("STACKER_LAYER_NAME".into(), layer.name.clone());
    env.into_iter().collect()
}

/// The caller's variables that `layer` passes through to `run` (stacker's default list
/// unless the layer gives its own regexes); they enter the layer's key.
pub fn passthrough(layer: &Layer, caller_env: &[(String, String)]) -> BTreeMap<String, String> {
    let rules = farm_stackerfile::Passthrough::of(layer);
    caller_env
        .iter()
        .filter(|(k, _)| rules.matches(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Run `plan` with `executor`, reporting progress to `events`.
pub async fn run_build<E: Executor>(
    plan: &Plan,
    blobs: &BlobStore,
    cache: &ActionCache,
    executor: Arc<E>,
    options: &BuildOptions,
    events: EventSender,
) -> Result<BuildReport, BuildError> {
    let n = plan.layers.len();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut keys: Vec<Option<String>> = vec![None; n];
    let mut started = vec![false; n];
    let mut running: JoinSet<(usize, Instant, LayerOutcome)> = JoinSet::new();
    // Who waits for whom: a layer is ready when its count of unfinished dependencies
    // reaches zero; ready layers start in plan order. (Finding them by scanning the
    // whole plan after every finished layer made a big plan quadratic.)
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting_on: Vec<usize> = vec![0; n];
    for (i, planned) in plan.layers.iter().enumerate() {
        let mut deps = planned.depends_on.clone();
        deps.sort_unstable();
        deps.dedup();
        waiting_on[i] = deps.len();
        for d in deps {
            dependents[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| waiting_on[i] == 0).collect();
    // Layer `i` has its outcome: its dependents may be ready.
    let finished =
        |i: usize, waiting_on: &mut Vec<usize>, ready: &mut std::collections::BTreeSet<usize>| {
            for &j in &dependents[i] {
                if waiting_on[j] > 0 {
                    waiting_on[j] -= 1;
                    if waiting_on[j] == 0 {
                        ready.insert(j);
                    }
                }
            }
        };

    loop {
        // Start every layer whose dependencies are done, in plan order: the ready ones
        // are checked, then their jobs made and looked up in the action cache several
        // at a time (they only read what is done), then started or answered in order.
        while !ready.is_empty() {
            let mut batch = Vec::new();
            while let Some(i) = ready.pop_first() {
                if started[i] {
                    continue;
                }
                started[i] = true;
                let name = &plan.layers[i].layer.name;
                if options.cancelled.load(std::sync::atomic::Ordering::SeqCst) {
                    events.send(Event::Cancelled {
                        layer: name.clone(),
                        reason: "the build was cancelled".into(),
                    });
                    outcomes[i] = Some(Outcome::Cancelled);
                    finished(i, &mut waiting_on, &mut ready);
                    continue;
                }
                if let Some(&d) = plan.layers[i]
                    .depends_on
                    .iter()
                    .find(|&&d| !matches!(outcomes[d], Some(Outcome::Built { .. })))
                {
                    let because = format!("'{}' did not build", plan.layers[d].layer.name);
                    events.send(Event::Skipped {
                        layer: name.clone(),
                        because: because.clone(),
                    });
                    outcomes[i] = Some(Outcome::Skipped(because));
                    finished(i, &mut waiting_on, &mut ready);
                    continue;
                }
                batch.push(i);
            }
            // Jobs made several at a time (pinning may download), then the cacheable
            // ones looked up in the action cache together.
            let prepared: Vec<(usize, Result<Prepared, PrepareError>, tracing::Span)> = {
                let (outcomes, keys) = (&outcomes, &keys);
                futures::stream::iter(batch)
                    .map(|i| async move {
                        // The layer's span (issue 16): pinning, the cache lookup, and on
                        // a miss the scheduler's and the worker's spans below it.
                        let span = layer_span(&plan.layers[i].layer.name);
                        let job = prepare(plan, i, outcomes, keys, blobs, options)
                            .instrument(span.clone())
                            .await;
                        (i, job, span)
                    })
                    .buffered(PREPARED_AT_ONCE)
                    .collect()
                    .await
            };
            let hits = if options.no_cache {
                Default::default()
            } else {
                let wanted: Vec<&str> = prepared
                    .iter()
                    .filter(|(i, _, _)| Job::may_cache(&plan.layers[*i].layer))
                    .filter_map(|(_, job, _)| job.as_ref().ok())
                    .map(|job| job.key.as_str())
                    .collect();
                cached_many(cache, blobs, &wanted).await?
            };
            let prepared = prepared.into_iter().map(|(i, job, span)| {
                let hit = job.as_ref().ok().and_then(|j| hits.get(&j.key).cloned());
                (i, job, hit, span)
            });
            for (i, job, hit, span) in prepared {
                let layer = &plan.layers[i].layer;
                let name = layer.name.clone();
                let job = match job {
                    Ok(job) => job,
                    Err(e) => {
                        let failure = LayerFailure::input(e.to_string());
                        record_outcome(&span, &Err(failure.clone()));
                        events.send(Event::ended(name, failure.clone()));
                        outcomes[i] = Some(Outcome::Failed(failure));
                        finished(i, &mut waiting_on, &mut ready);
                        continue;
                    }
                };
                keys[i] = Some(job.key.clone());
                span.record("cache_key", job.key.as_str());
                let cacheable = Job::may_cache(layer) && !options.no_cache;
                span.record(
                    "cache",
                    match (&hit, cacheable) {
                        (Some(_), _) => "hit",
                        (None, true) => "miss",
                        (None, false) => "off",
                    },
                );
                if let Some(hit) = hit {
                    span.record("outcome", "cached");
                    events.send(Event::Cached { layer: name });
                    outcomes[i] = Some(Outcome::Built {
                        result: Arc::new(hit),
                        cached: true,
                        duration: Duration::ZERO,
                    });
                    finished(i, &mut waiting_on, &mut ready);
                    continue;
                }
                events.send(Event::Started { layer: name });
                let job = job.into_job(layer, options);
                let executor = executor.clone();
                let ev = events.clone();
                running.spawn(
                    async move {
                        let t = Instant::now();
                        let r = executor.execute(job, ev).await;
                        record_outcome(&tracing::Span::current(), &r);
                        (i, t, r)
                    }
                    .instrument(span),
                );
            }
        }
        let Some(first) = running.join_next().await else {
            break;
        };
        // Every layer that finished meanwhile is taken too, so their dependents are
        // prepared and looked up in the action cache together (one at a time was a
        // cache query per finished layer on the driver's one task).
        let mut done = Some(first);
        while let Some(one) = done {
            let (i, result) = match one {
                Ok((i, t, r)) => (i, r.map(|r| (r, t.elapsed()))),
                Err(e) => {
                    // A panicking executor task: find which layer it was and fail it.
                    let i = (0..n)
                        .find(|&i| started[i] && outcomes[i].is_none())
                        .unwrap_or(0);
                    (
                        i,
                        Err(LayerFailure::internal(format!("internal error: {e}"))),
                    )
                }
            };
            let name = plan.layers[i].layer.name.clone();
            match result {
                Ok((result, duration)) => {
                    events.send(Event::Built {
                        layer: name,
                        duration,
                    });
                    outcomes[i] = Some(Outcome::Built {
                        result: Arc::new(result),
                        cached: false,
                        duration,
                    });
                }
                Err(failure) => {
                    events.send(Event::ended(name, failure.clone()));
                    outcomes[i] = Some(if failure.is_cancelled() {
                        Outcome::Cancelled
                    } else {
                        Outcome::Failed(failure)
                    });
                }
            }
            finished(i, &mut waiting_on, &mut ready);
            done = running.try_join_next();
        }
    }
    Ok(BuildReport {
        outcomes: outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Skipped("not reached".into())))
            .collect(),
    })
}

/// How many ready layers are prepared and looked up in the action cache at once.
const PREPARED_AT_ONCE: usize = 32;

/// The action cache's entries for `keys` whose blobs are all in the store.
async fn cached_many(
    cache: &ActionCache,
    blobs: &BlobStore,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, BuiltImage>, BuildError> {
    let mut hits = cache.get_many(keys).await?;
    // Hits of one round share most of their blobs (a chain's lower layers, a base):
    // each is asked about once. A hit naming a blob that is not a digest is gone.
    let digests: Vec<Digest> = hits
        .values()
        .flat_map(BuiltImage::blob_digests)
        .filter_map(|d| Digest::parse(d).ok())
        .collect();
    let absent: HashSet<Digest> = blobs.missing(digests).await?.into_iter().collect();
    hits.retain(|_, hit| {
        hit.blob_digests()
            .all(|d| Digest::parse(d).is_ok_and(|d| !absent.contains(&d)))
    });
    Ok(hits)
}

/// A layer's span; the scheduler records `worker`, `placement` and `queue_wait_ms`.
fn layer_span(name: &str) -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!(
        target: "farm_trace",
        "layer",
        layer = %name,
        cache_key = Empty,
        cache = Empty,
        worker = Empty,
        placement = Empty,
        queue_wait_ms = Empty,
        outcome = Empty,
        otel.status_description = Empty,
    )
}

/// How a layer ended, on its span; a failure with the text the user sees.
fn record_outcome(span: &tracing::Span, result: &LayerOutcome) {
    match result {
        Ok(_) => span.record("outcome", "built"),
        Err(f) if f.is_cancelled() => span.record("outcome", "cancelled"),
        Err(f) => {
            span.record("outcome", "failed");
            farm_telemetry::record_error(span, &f.to_string());
            span
        }
    };
}

/// Whether every blob `layer` names is in the store (one that is not a digest is not).
pub(crate) async fn blobs_present(
    blobs: &BlobStore,
    layer: &BuiltImage,
) -> Result<bool, BuildError> {
    let Ok(digests) = layer
        .blob_digests()
        .map(Digest::parse)
        .collect::<Result<Vec<_>, _>>()
    else {
        return Ok(false);
    };
    Ok(blobs.missing(digests).await?.is_empty())
}

/// The built result of layer `tag` (one of `deps`, the layer's dependencies, so it is
/// built) and its cache key. Looked up among the layer's few dependencies, not the
/// whole plan (a search of the plan for every dependency made a big plan quadratic).
fn dependency<'a>(
    plan: &Plan,
    deps: &[usize],
    tag: &str,
    outcomes: &'a [Option<Outcome>],
    keys: &'a [Option<String>],
) -> Built<'a> {
    let d = deps
        .iter()
        .copied()
        .find(|&d| plan.layers[d].layer.name == tag)
        .or_else(|| plan.index_of(tag))
        .expect("the plan resolved every dependency");
    let Some(Outcome::Built { result, .. }) = &outcomes[d] else {
        unreachable!("dependencies are built before their dependents")
    };
    Built {
        image: result,
        key: keys[d].as_deref().unwrap_or_default(),
    }
}

/// A layer's inputs pinned and its cache key: what its cache lookup needs. Its [`Job`]
/// (the layer and its environment copied in) is made only when it is built
/// ([`Prepared::into_job`]): making one for every cache hit just to drop it was a tenth
/// of the driver's time in an all-hits build.
struct Prepared {
    key: String,
    pinned: crate::pin::Pinned,
    /// The caller's variables passed through (in the key; the start of the environment).
    passthrough: BTreeMap<String, String>,
    source_date_epoch: Option<u64>,
    platform: Platform,
}

impl Prepared {
    /// The job of `layer`, which this prepared.
    fn into_job(self, layer: &Layer, options: &BuildOptions) -> Job {
        Job {
            layer: layer.clone(),
            cache_key: self.key,
            base: self.pinned.base,
            imports: self.pinned.imports,
            overlay_dirs: self.pinned.overlay_dirs,
            env: run_environment(layer, self.passthrough),
            source_date_epoch: self.source_date_epoch,
            compression: options.compression,
            layer_format: options.layer_format,
            platform: self.platform,
        }
    }
}

/// Layer `i` prepared: its inputs pinned, its cache key.
async fn prepare(
    plan: &Plan,
    i: usize,
    outcomes: &[Option<Outcome>],
    keys: &[Option<String>],
    blobs: &BlobStore,
    options: &BuildOptions,
) -> Result<Prepared, PrepareError> {
    let planned = &plan.layers[i];
    let layer = &planned.layer;
    let platform = options
        .platform
        .with(layer.os.as_deref(), layer.arch.as_deref());
    if platform != options.platform && layer.runs_commands() {
        return Err(PrepareError::ForeignPlatform {
            platform,
            default: options.platform.clone(),
        });
    }
    let sources = Sources {
        blobs,
        context: &options.context,
        fetcher: &options.fetcher,
        registry: &options.registry,
    };
    let pinned = sources
        .pin(layer, &platform, |tag| {
            dependency(plan, &planned.depends_on, tag, outcomes, keys)
        })
        .await?;
    if let Some(bind) = layer
        .binds
        .iter()
        .find(|b| options.check_binds && !b.source.exists())
    {
        return Err(PrepareError::MissingBind {
            written: bind.written.clone(),
            path: bind.source.clone(),
        });
    }
    let passthrough = passthrough(layer, &options.caller_env);
    let source_date_epoch = passthrough
        .get("SOURCE_DATE_EPOCH")
        .or_else(|| layer.build_env.get("SOURCE_DATE_EPOCH"))
        .cloned();
    let inputs = KeyInputs {
        definition_digest: planned.definition_digest.clone(),
        base: pinned.base_key.clone(),
        imports: pinned.imports.iter().map(|i| i.digest.clone()).collect(),
        overlay_dirs: pinned
            .overlay_dirs
            .iter()
            .map(|o| o.digest.clone())
            .collect(),
        source_date_epoch: source_date_epoch.clone(),
        platform: platform.to_string(),
        passthrough,
        compression: options.compression.to_string(),
        layer_format: (!options.layer_format.is_tar()).then(|| options.layer_format.to_string()),
    };
    Ok(Prepared {
        key: inputs.key(),
        passthrough: inputs.passthrough,
        pinned,
        source_date_epoch: source_date_epoch
            .as_deref()
            .and_then(parse_source_date_epoch),
        platform,
    })
}

/// A job of `layer` from scratch, nothing pinned, with a placeholder key: for tests of
/// what comes after the driver (placement, assignments, workers).
#[cfg(test)]
pub(crate) fn scratch_job(layer: &Layer, platform: &str) -> Job {
    Job {
        layer: layer.clone(),
        cache_key: format!("sha256:{}", "0".repeat(64)),
        base: farm_model::JobBase::Scratch,
        imports: Vec::new(),
        overlay_dirs: Vec::new(),
        env: Vec::new(),
        source_date_epoch: None,
        compression: Default::default(),
        layer_format: Default::default(),
        platform: platform.parse().expect("a platform"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_defaults_and_regexes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.yaml");
        std::fs::write(
            &f,
            "a:\n  from: {type: scratch}\n  build_env: {X: '1'}\n\
             b:\n  from: {type: scratch}\n  build_env_passthrough: ['CI_.*']\n",
        )
        .unwrap();
        let plan = Plan::load(&f, &Default::default(), &farm_stackerfile::LocalFiles).unwrap();
        let caller: Vec<(String, String)> = [
            ("http_proxy", "p"),
            ("TERM", "xterm"),
            ("HOME", "/root"),
            ("CI_JOB", "7"),
            ("XCI_JOB", "no"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let pass = passthrough(&plan.layers[0].layer, &caller);
        let env = run_environment(&plan.layers[0].layer, pass.clone());
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["http_proxy"], "p");
        assert_eq!(env["TERM"], "xterm");
        assert_eq!(env["X"], "1");
        assert_eq!(env["STACKER_LAYER_NAME"], "a");
        assert!(env.contains_key("PATH"));
        assert!(!env.contains_key("HOME") && !env.contains_key("CI_JOB"));
        assert_eq!(pass.len(), 2);
        let layer = &plan.layers[1].layer;
        let env = run_environment(layer, passthrough(layer, &caller));
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["CI_JOB"], "7");
        assert!(!env.contains_key("XCI_JOB"), "anchored");
        assert!(!env.contains_key("TERM"), "own list replaces the default");
    }

    #[test]
    fn source_date_epoch_must_be_a_non_negative_integer() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.yaml");
        std::fs::write(&f, "a:\n  from: {type: scratch}\n").unwrap();
        let plan = Plan::load(&f, &Default::default(), &farm_stackerfile::LocalFiles).unwrap();
        let env = |v: &str| vec![("SOURCE_DATE_EPOCH".to_string(), v.to_string())];
        for ok in ["0", "1700000000", ""] {
            assert_eq!(check_source_date_epoch(&plan, &env(ok)), Ok(()), "{ok}");
        }
        assert_eq!(check_source_date_epoch(&plan, &[]), Ok(()));
        for bad in ["-1", "abc", "1.5", " 5", "+5", "99999999999999999999999"] {
            let e = check_source_date_epoch(&plan, &env(bad)).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
        assert_eq!(parse_source_date_epoch("42"), Some(42));

        std::fs::write(
            &f,
            "a:\n  from: {type: scratch}\n  build_env: {SOURCE_DATE_EPOCH: yesterday}\n",
        )
        .unwrap();
        let plan = Plan::load(&f, &Default::default(), &farm_stackerfile::LocalFiles).unwrap();
        let e = check_source_date_epoch(&plan, &[]).unwrap_err();
        assert!(e.contains("'yesterday'") && e.contains("layer 'a'"), "{e}");
    }
}

//! Running a plan: pin inputs, compute cache keys in dependency order, answer hits from
//! the action cache, and hand the rest to an [`Executor`] as soon as their dependencies
//! are built, at most `jobs` at a time. A failing layer fails its dependents; independent
//! layers finish.
//!
//! `farm build` runs this with the in-process worker engine as the executor; the farm's
//! remote workers plug in behind the same trait.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_image::{BlobStore, Compression, Digest, OciLayout};
use farm_model::{
    BuiltImage, Event, EventSender, FailureKind, ImportSource, Job, JobBase, JobImport,
    JobOverlayDir, LayerBlob, LayerFailure, LayerOutcome, Platform,
};
use farm_stackerfile::{Base, Layer, Plan, Source};
use tokio::task::JoinSet;

use crate::cache::{ActionCache, BaseKey, KeyInputs};
use crate::inputs::{InputError, pin_local};

/// Builds layers: the farm's scheduler, which sends them to workers.
pub trait Executor: Send + Sync + 'static {
    fn execute(&self, job: Job, events: EventSender) -> impl Future<Output = LayerOutcome> + Send;
}

/// Options of one build.
#[derive(Clone)]
pub struct BuildOptions {
    pub jobs: usize,
    pub no_cache: bool,
    pub compression: Compression,
    /// The caller's environment, for `build_env_passthrough`.
    pub caller_env: Vec<(String, String)>,
    /// Imports must resolve inside this directory (None: anywhere).
    pub context: Option<PathBuf>,
    /// The platform of layers that name none.
    pub platform: Platform,
    /// Downloads http(s) imports and tarballs into the blob store.
    pub fetcher: crate::fetch::Fetcher,
    /// Set to stop starting layers (Ctrl-C, cancel); running ones are the executor's.
    pub cancelled: Arc<std::sync::atomic::AtomicBool>,
    /// `docker` bases: credentials, and each reference resolved once per build.
    pub registry: crate::registry::RegistryBases,
}

/// How one layer ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Built {
        result: BuiltImage,
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

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("layer '{layer}': {source}")]
    Input { layer: String, source: InputError },
    #[error("layer '{layer}': {message}")]
    Unsupported { layer: String, message: String },
    #[error("layer '{layer}': base {what}: {source}")]
    Base {
        layer: String,
        what: String,
        source: farm_image::Error,
    },
    #[error("layer '{layer}': {source}")]
    Fetch {
        layer: String,
        source: crate::fetch::FetchError,
    },
    #[error("layer '{layer}': base {url}: {message}")]
    Registry {
        layer: String,
        url: String,
        message: String,
    },
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("blob store: {0}")]
    Blobs(#[from] farm_image::Error),
}

impl BuildError {
    /// The failure of the layer this error stopped; its message does not repeat the
    /// layer's name (the build's error adds it once).
    pub fn failure(&self) -> LayerFailure {
        match self {
            BuildError::Input { source, .. } => LayerFailure::input(source.to_string()),
            BuildError::Unsupported { message, .. } => LayerFailure::input(message.clone()),
            BuildError::Base { what, source, .. } => {
                LayerFailure::input(format!("base {what}: {source}"))
            }
            BuildError::Fetch { source, .. } => LayerFailure::input(source.to_string()),
            BuildError::Registry { url, message, .. } => {
                LayerFailure::input(format!("base {url}: {message}"))
            }
            BuildError::Cache(_) | BuildError::Blobs(_) => {
                LayerFailure::new(FailureKind::Internal, self.to_string())
            }
        }
    }
}

/// The environment of `run`: passthrough variables of the caller (stacker's default
/// list unless the layer gives its own regexes), then `build_env`, then
/// `STACKER_LAYER_NAME`. Returns the variables and the passthrough part (for the key).
pub fn run_environment(
    layer: &Layer,
    caller_env: &[(String, String)],
) -> (Vec<(String, String)>, BTreeMap<String, String>) {
    let patterns: Vec<String> = layer.build_env_passthrough.clone().unwrap_or_else(|| {
        farm_stackerfile::DEFAULT_PASSTHROUGH
            .iter()
            .map(|s| regex::escape(s))
            .collect()
    });
    let regexes: Vec<regex::Regex> = patterns
        .iter()
        .filter_map(|p| regex::Regex::new(&format!("^(?:{p})$")).ok())
        .collect();
    let mut passthrough = BTreeMap::new();
    for (k, v) in caller_env {
        if regexes.iter().any(|r| r.is_match(k)) {
            passthrough.insert(k.clone(), v.clone());
        }
    }
    let mut env: BTreeMap<String, String> = passthrough.clone();
    env.entry("PATH".into())
        .or_insert_with(|| farm_stackerfile::DEFAULT_PATH.to_string());
    for (k, v) in &layer.build_env {
        env.insert(k.clone(), v.clone());
    }
    env.insert("STACKER_LAYER_NAME".into(), layer.name.clone());
    (env.into_iter().collect(), passthrough)
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
    let jobs = options.jobs.max(1);

    loop {
        // Start every layer whose dependencies are done, in plan order, up to `jobs`.
        let mut progressed = false;
        for i in 0..n {
            if started[i] || running.len() >= jobs {
                continue;
            }
            let deps = &plan.layers[i].depends_on;
            if deps.iter().any(|&d| outcomes[d].is_none()) {
                continue;
            }
            started[i] = true;
            progressed = true;
            let name = plan.layers[i].layer.name.clone();
            if options.cancelled.load(std::sync::atomic::Ordering::SeqCst) {
                events.send(Event::Cancelled {
                    layer: name,
                    reason: "the build was cancelled".into(),
                });
                outcomes[i] = Some(Outcome::Cancelled);
                continue;
            }
            if let Some(&d) = deps
                .iter()
                .find(|&&d| !matches!(outcomes[d], Some(Outcome::Built { .. })))
            {
                let because = format!("'{}' did not build", plan.layers[d].layer.name);
                events.send(Event::Skipped {
                    layer: name,
                    because: because.clone(),
                });
                outcomes[i] = Some(Outcome::Skipped(because));
                continue;
            }
            let job = match prepare(plan, i, &outcomes, &keys, blobs, options).await {
                Ok(job) => job,
                Err(e) => {
                    let failure = e.failure();
                    events.send(Event::ended(name, failure.clone()));
                    outcomes[i] = Some(Outcome::Failed(failure));
                    continue;
                }
            };
            keys[i] = Some(job.cache_key.clone());
            let cacheable = job.cacheable() && !options.no_cache;
            if cacheable
                && let Some(hit) = cache.get(&job.cache_key).await?
                && blobs_present(blobs, &hit).await?
            {
                events.send(Event::Cached { layer: name });
                outcomes[i] = Some(Outcome::Built {
                    result: hit,
                    cached: true,
                    duration: Duration::ZERO,
                });
                continue;
            }
            events.send(Event::Started { layer: name });
            let executor = executor.clone();
            let ev = events.clone();
            running.spawn(async move {
                let t = Instant::now();
                let r = executor.execute(job, ev).await;
                (i, t, r)
            });
        }
        if progressed {
            continue;
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (i, t, result) = match done {
            Ok(r) => r,
            Err(e) => {
                // A panicking executor task: find which layer it was and fail it.
                let i = (0..n)
                    .find(|&i| started[i] && outcomes[i].is_none())
                    .unwrap_or(0);
                (
                    i,
                    Instant::now(),
                    Err(LayerFailure::internal(format!("internal error: {e}"))),
                )
            }
        };
        let name = plan.layers[i].layer.name.clone();
        match result {
            Ok(result) => {
                let duration = t.elapsed();
                if plan.layers[i].layer.binds.is_empty()
                    && let Some(key) = &keys[i]
                {
                    cache.put(key, &result).await?;
                }
                events.send(Event::Built {
                    layer: name,
                    duration,
                });
                outcomes[i] = Some(Outcome::Built {
                    result,
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
    }
    Ok(BuildReport {
        outcomes: outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Skipped("not reached".into())))
            .collect(),
    })
}

async fn blobs_present(blobs: &BlobStore, layer: &BuiltImage) -> Result<bool, BuildError> {
    for d in layer.blob_digests() {
        let Ok(digest) = Digest::parse(d) else {
            return Ok(false);
        };
        if !blobs.exists(&digest).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The built result of layer `tag` (a dependency, so it is built) and its cache key.
fn dependency<'a>(
    plan: &Plan,
    tag: &str,
    outcomes: &'a [Option<Outcome>],
    keys: &[Option<String>],
) -> (&'a BuiltImage, String) {
    let d = plan
        .index_of(tag)
        .expect("the plan resolved every dependency");
    let Some(Outcome::Built { result, .. }) = &outcomes[d] else {
        unreachable!("dependencies are built before their dependents")
    };
    (result, keys[d].clone().unwrap_or_default())
}

/// The digest standing for `path` inside a built layer's result: the result's layers
/// determine its filesystem exactly, so this changes whenever the content can.
fn layer_path_digest(producer_key: &str, producer: &BuiltImage, path: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let layers: Vec<&str> = producer.layers.iter().map(|l| l.digest.as_str()).collect();
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(
            format!("stacker:// {producer_key} {} {path}", layers.join(",")).as_bytes()
        ))
    )
}

/// Pin a layer's inputs and compute its cache key.
async fn prepare(
    plan: &Plan,
    i: usize,
    outcomes: &[Option<Outcome>],
    keys: &[Option<String>],
    blobs: &BlobStore,
    options: &BuildOptions,
) -> Result<Job, BuildError> {
    let planned = &plan.layers[i];
    let layer = &planned.layer;
    let name = layer.name.clone();
    let input = |source: InputError| BuildError::Input {
        layer: name.clone(),
        source,
    };
    let platform = options
        .platform
        .with(layer.os.as_deref(), layer.arch.as_deref());
    if platform != options.platform && (layer.run.is_some() || layer.generate_labels.is_some()) {
        return Err(BuildError::Unsupported {
            layer: name,
            message: format!(
                "it runs commands for {platform}, but this worker is {}; farm does not \
                 emulate other platforms (build it on a {platform} worker, or remove \
                 'os'/'arch')",
                options.platform
            ),
        });
    }
    let (base, base_key) = match &layer.from {
        Base::Scratch => (JobBase::Scratch, BaseKey::Scratch),
        Base::Built { tag } => {
            let (result, key) = dependency(plan, tag, outcomes, keys);
            (JobBase::Image(result.clone()), BaseKey::Built(key))
        }
        Base::Tar { source } => match source {
            Source::Local { written, path } => {
                let pinned =
                    pin_local(written, path, options.context.as_deref(), None).map_err(input)?;
                let digest =
                    store_file(blobs, &pinned)
                        .await
                        .map_err(|source| BuildError::Base {
                            layer: name.clone(),
                            what: format!("tarball {written}"),
                            source,
                        })?;
                (
                    JobBase::Tar {
                        digest: digest.clone(),
                    },
                    BaseKey::Tar(digest),
                )
            }
            Source::Http { url } => {
                let fetched = options
                    .fetcher
                    .fetch_unpinnable(url)
                    .await
                    .map_err(|source| BuildError::Fetch {
                        layer: name.clone(),
                        source,
                    })?;
                let digest = fetched.digest.to_string();
                (
                    JobBase::Tar {
                        digest: digest.clone(),
                    },
                    BaseKey::Tar(digest),
                )
            }
            Source::Layer { layer: tag, path } => {
                let (producer, key) = dependency(plan, tag, outcomes, keys);
                let digest = layer_path_digest(&key, producer, path);
                (
                    JobBase::TarInLayer {
                        producer: producer.clone(),
                        path: path.clone(),
                    },
                    BaseKey::Tar(digest),
                )
            }
        },
        Base::Oci { url } => {
            let image = import_oci(blobs, &layer.dir, url, &platform)
                .await
                .map_err(|source| BuildError::Base {
                    layer: name.clone(),
                    what: format!("oci {url}"),
                    source,
                })?;
            let key = BaseKey::Oci(image.1);
            (JobBase::Image(image.0), key)
        }
        Base::Docker { url, insecure } => {
            let (image, digest) = options
                .registry
                .pull(blobs, url, *insecure, &platform)
                .await
                .map_err(|message| BuildError::Registry {
                    layer: name.clone(),
                    url: url.clone(),
                    message,
                })?;
            (JobBase::Image(image), BaseKey::Docker(digest))
        }
    };
    let mut imports = Vec::new();
    for import in &layer.imports {
        let written = import.source.written();
        let trimmed = written.trim_end_matches('/');
        let name_of = |p: &str| {
            Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "import".to_string())
        };
        let (source, digest, import_name) = match &import.source {
            Source::Local { path, .. } => {
                let pinned = pin_local(
                    &written,
                    path,
                    options.context.as_deref(),
                    import.hash.as_deref(),
                )
                .map_err(input)?;
                (
                    ImportSource::Local(pinned.resolved),
                    pinned.digest,
                    name_of(trimmed),
                )
            }
            Source::Http { url } => {
                let digest = fetch(options, &name, url, import.hash.as_deref()).await?;
                let file = url
                    .split(['?', '#'])
                    .next()
                    .unwrap_or(url)
                    .trim_end_matches('/');
                (
                    ImportSource::Blob {
                        digest: digest.clone(),
                    },
                    digest,
                    name_of(file.rsplit('/').next().unwrap_or("download")),
                )
            }
            Source::Layer { layer: tag, path } => {
                let (producer, key) = dependency(plan, tag, outcomes, keys);
                (
                    ImportSource::Layer {
                        producer: producer.clone(),
                        path: path.clone(),
                    },
                    layer_path_digest(&key, producer, path),
                    name_of(path.trim_end_matches('/')),
                )
            }
        };
        imports.push(JobImport {
            source,
            written: written.clone(),
            name: import_name,
            contents_only: written.ends_with('/'),
            dest: import.dest.clone(),
            mode: import.mode,
            uid: import.uid,
            gid: import.gid,
            hash: import.hash.clone(),
            digest,
        });
    }
    let mut overlay_dirs = Vec::new();
    for od in &layer.overlay_dirs {
        let pinned =
            pin_local(&od.written, &od.source, options.context.as_deref(), None).map_err(input)?;
        if !pinned.is_dir {
            return Err(BuildError::Unsupported {
                layer: name,
                message: format!("overlay_dirs source '{}' is not a directory", od.written),
            });
        }
        overlay_dirs.push(JobOverlayDir {
            source: pinned.resolved,
            tree: None,
            dest: od.dest.clone(),
            digest: pinned.digest,
        });
    }
    for bind in &layer.binds {
        if !bind.source.exists() {
            return Err(BuildError::Unsupported {
                layer: name,
                message: format!(
                    "bind source '{}' ({}) does not exist on this worker",
                    bind.written,
                    bind.source.display()
                ),
            });
        }
    }
    let (env, passthrough) = run_environment(layer, &options.caller_env);
    let source_date_epoch = passthrough
        .get("SOURCE_DATE_EPOCH")
        .or_else(|| layer.build_env.get("SOURCE_DATE_EPOCH"))
        .cloned();
    let key = KeyInputs {
        definition_digest: planned.definition_digest.clone(),
        base: base_key,
        imports: imports.iter().map(|i| i.digest.clone()).collect(),
        overlay_dirs: overlay_dirs.iter().map(|o| o.digest.clone()).collect(),
        source_date_epoch: source_date_epoch.clone(),
        platform: platform.to_string(),
        passthrough,
        compression: options.compression.to_string(),
    }
    .key();
    Ok(Job {
        layer: layer.clone(),
        cache_key: key,
        base,
        imports,
        overlay_dirs,
        env,
        source_date_epoch: source_date_epoch.and_then(|s| s.trim().parse().ok()),
        compression: options.compression,
        platform,
    })
}

/// Download `url` into the blob store (or reuse it), returning its digest.
async fn fetch(
    options: &BuildOptions,
    layer: &str,
    url: &str,
    hash: Option<&str>,
) -> Result<String, BuildError> {
    let fetched = options
        .fetcher
        .fetch(url, hash)
        .await
        .map_err(|source| BuildError::Fetch {
            layer: layer.to_string(),
            source,
        })?;
    Ok(fetched.digest.to_string())
}

/// Put a pinned local file into the blob store unless it is there already (it was
/// hashed when pinned), returning its digest.
async fn store_file(
    blobs: &BlobStore,
    pinned: &crate::inputs::PinnedPath,
) -> Result<String, farm_image::Error> {
    if let Some(hex) = &pinned.file_sha256 {
        let digest = Digest::from_hex(hex)?;
        if blobs.exists(&digest).await? {
            return Ok(digest.to_string());
        }
    }
    Ok(blobs.put_file(&pinned.resolved).await?.digest.to_string())
}

/// Copy an image of a local OCI layout (`path:tag`, the tag may contain `:`) into the
/// blob store. Returns it as a cached layer and its manifest digest.
async fn import_oci(
    blobs: &BlobStore,
    dir: &Path,
    url: &str,
    platform: &Platform,
) -> Result<(BuiltImage, String), farm_image::Error> {
    let (layout_path, tag) = farm_stackerfile::split_oci_url(dir, url);
    let layout = OciLayout::open(&layout_path).await?;
    let (manifest_desc, manifest) = layout
        .manifest(&tag, Some((&platform.os, &platform.arch)))
        .await?;
    let config = layout.config(&manifest).await?;
    let mut layers = Vec::new();
    let diff_ids = config.rootfs().diff_ids();
    for (n, l) in manifest.layers().iter().enumerate() {
        let digest = Digest::parse(l.digest().as_ref())?;
        layout.blobs().copy_to(&digest, blobs).await?;
        layers.push(LayerBlob {
            media_type: l.media_type().to_string(),
            digest: digest.to_string(),
            size: l.size(),
            diff_id: diff_ids.get(n).cloned().unwrap_or_default(),
        });
    }
    let config_digest = Digest::parse(manifest.config().digest().as_ref())?;
    layout.blobs().copy_to(&config_digest, blobs).await?;
    let image = BuiltImage::new(config_digest.to_string(), manifest.config().size(), layers)
        .map_err(|e| farm_image::Error::Layout {
            path: layout_path.clone(),
            reason: format!("the image's config has a bad diff_id: {e}"),
        })?;
    Ok((image, manifest_desc.digest().to_string()))
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
        let (env, pass) = run_environment(&plan.layers[0].layer, &caller);
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["http_proxy"], "p");
        assert_eq!(env["TERM"], "xterm");
        assert_eq!(env["X"], "1");
        assert_eq!(env["STACKER_LAYER_NAME"], "a");
        assert!(env.contains_key("PATH"));
        assert!(!env.contains_key("HOME") && !env.contains_key("CI_JOB"));
        assert_eq!(pass.len(), 2);
        let (env, _) = run_environment(&plan.layers[1].layer, &caller);
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["CI_JOB"], "7");
        assert!(!env.contains_key("XCI_JOB"), "anchored");
        assert!(!env.contains_key("TERM"), "own list replaces the default");
    }
}

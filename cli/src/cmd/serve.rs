//! `farm coordinator` and `farm worker`: the two long-running halves of a build farm.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use farm_coordinator::farm::{Farm, FarmConfig, Limits};
use farm_image::BlobStore;
use farm_model::Platform;
use farm_worker::agent::{self, AgentConfig, GrpcDialer};
use farm_worker::engine::{Engine, EngineOptions, UsernsDeleter};
use farm_worker::pool::{Pool, PoolOptions};
use farm_worker::{Entry, Userns};

use crate::common::Layout;
use crate::local::block_on;

/// Run the coordinator of a build farm.
///
/// It takes submissions (`farm submit --coordinator ...`), plans them, answers what it
/// can from the action cache and schedules the rest onto workers that dial in
/// (`farm worker`). Its state (builds, leases, events, logs) is in an SQLite database
/// in the state dir: stop it at any moment and start it again on the same state dir,
/// and queued and running builds continue. Blobs (layers, uploaded inputs, manifests)
/// are in the shared blob store, which workers must reach too.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm coordinator --listen 127.0.0.1:7600 --state-dir /var/lib/farm --blobs file:///srv/farm/blobs\n  \
farm coordinator --listen 0.0.0.0:7600 --state-dir /var/lib/farm --blobs s3://bucket/farm --metrics 0.0.0.0:9600\n\n\
Blob stores: file:///PATH, s3://BUCKET/PREFIX (AWS_* environment variables), gs://BUCKET/PREFIX,\n\
az://CONTAINER/PREFIX, memory:// (tests).")]
pub(crate) struct CoordinatorArgs {
    /// Address to serve gRPC on (clients and workers)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7600")]
    pub listen: String,

    /// Directory for the state database, the action cache and uploaded contexts
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,

    /// The shared blob store (workers must use the same one)
    #[arg(long, value_name = "URL")]
    pub blobs: String,

    /// A worker that sends no heartbeat for this long loses its layers to another worker
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub lease_timeout: f64,

    /// Serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Finished builds whose status, events and logs are kept (older ones are forgotten;
    /// cached layers stay)
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub keep_builds: usize,

    /// Credentials for registry bases (else the coordinator's auth files)
    #[command(flatten)]
    pub registry: super::publish::RegistryArgs,

    /// The largest stackerfile a submission may have (each file, e.g. 4M)
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = super::build::parse_size)]
    pub max_stackerfile_size: u64,

    /// The most files an uploaded context may list
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT_MAX_CONTEXT_FILES)]
    pub max_context_files: usize,

    /// The most an uploaded context may materialise to (each listed file at its size)
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = super::build::parse_size)]
    pub max_context_size: u64,

    /// The most layers one submission's plan may have
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT_MAX_LAYERS)]
    pub max_layers: usize,

    /// The largest blob one upload may store
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = super::build::parse_size)]
    pub max_upload_size: u64,
}

/// Run a worker of a build farm.
///
/// It dials the coordinator (and keeps dialling, with backoff, when it is away), states
/// its slots, platform and the chains its pool holds, and builds what it is assigned,
/// rootless, in its pool. It reads inputs from and writes layers to the shared blob
/// store directly. Builds keep running while the coordinator restarts; killing the
/// worker kills its builds.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  \
farm setup --pool /srv/farm/pool --size 20G   # once, as root: a btrfs pool for USER\n  \
farm worker --coordinator http://10.0.0.5:7600 --pool /srv/farm/pool --blobs file:///srv/farm/blobs --slots 4")]
pub(crate) struct WorkerArgs {
    /// The coordinator's address (host:port or http://host:port)
    #[arg(long, value_name = "URL", env = "FARM_COORDINATOR")]
    pub coordinator: String,

    /// The pool of root filesystems (btrfs recommended; see `farm setup`)
    #[arg(long, value_name = "DIR")]
    pub pool: PathBuf,

    /// The shared blob store (the coordinator's)
    #[arg(long, value_name = "URL")]
    pub blobs: String,

    /// Layers to build at the same time [default: number of cores]
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,

    /// The worker's name [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Kill a layer's run after this many seconds
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,

    /// The most one layer (or tarball base) may extract to: its uncompressed tar, and
    /// its files at their full size (sparse files count their holes)
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = super::build::parse_size)]
    pub max_layer_size: u64,

    /// The most entries (files, directories, links) one layer may hold
    #[arg(long, value_name = "N", default_value_t = farm_image::DEFAULT_MAX_LAYER_ENTRIES)]
    pub max_layer_entries: u64,
}

/// `host:port` or `http(s)://host:port` as a URL.
pub(crate) fn coordinator_url(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

pub(crate) fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let blobs = BlobStore::from_url(&args.blobs)
            .with_context(|| format!("opening the blob store {}", args.blobs))?;
        let layout = Layout::new(Some(args.state_dir.clone()), None, None);
        let lease = Duration::from_secs_f64(args.lease_timeout.max(0.1));
        let farm = Farm::start(FarmConfig {
            state_dir: args.state_dir.clone(),
            blobs,
            lease,
            platform: Platform::host(),
            builtins: layout.builtins(),
            resume: true,
            registry: args.registry.credentials()?,
            keep_builds: args.keep_builds,
            limits: farm_coordinator::farm::Limits {
                max_stackerfile_size: args.max_stackerfile_size,
                max_context_files: args.max_context_files,
                max_context_size: args.max_context_size,
                max_layers: args.max_layers,
                max_upload_size: args.max_upload_size,
            },
        })
        .await
        .with_context(|| format!("starting the coordinator on {}", args.state_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        if let Some(m) = &args.metrics {
            let ml = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("listening for metrics on {m}"))?;
            let farm = farm.clone();
            tokio::spawn(async move {
                if let Err(e) = farm_coordinator::server::serve_metrics(ml, farm).await {
                    tracing::error!("metrics server: {e}");
                }
            });
        }
        eprintln!(
            "farm coordinator: listening on {addr} (state {}, blobs {}, lease {:.1}s)",
            args.state_dir.display(),
            args.blobs,
            lease.as_secs_f64()
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("farm coordinator: stopping (builds continue when it starts again)");
        };
        farm_coordinator::server::serve(listener, farm, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })?
}

pub(crate) fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let blobs = BlobStore::from_url(&args.blobs)
            .with_context(|| format!("opening the blob store {}", args.blobs))?;
        let name = args.name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "worker".into())
        });
        let slots = args
            .slots
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
        let (engine, unavailable) = match open_engine(&args, blobs).await {
            Ok(e) => (Some(e), None),
            Err(e) => {
                let why = format!("{e:#}");
                eprintln!(
                    "farm worker: cannot build: {why}\n(registering without slots; fix it and restart the worker)"
                );
                (None, Some(why))
            }
        };
        let url = coordinator_url(&args.coordinator);
        eprintln!("farm worker {name}: {slots} slot(s), coordinator {url}");
        let run = agent::run(
            engine,
            AgentConfig {
                name,
                slots,
                platform: Platform::host(),
                unavailable,
                shares_files: false,
                give_up_after: None,
            },
            GrpcDialer { url },
        );
        tokio::select! {
            r = run => r.map_err(anyhow::Error::msg)?,
            _ = tokio::signal::ctrl_c() => eprintln!("farm worker: stopping"),
        }
        Ok(ExitCode::SUCCESS)
    })?
}

async fn open_engine(args: &WorkerArgs, blobs: BlobStore) -> anyhow::Result<Arc<Engine>> {
    let userns = Userns::detect(Entry::current_exe()?)?;
    let dir = args.pool.clone();
    let opts = PoolOptions::default().with_deleter(Arc::new(UsernsDeleter(userns.clone())));
    let pool = tokio::task::spawn_blocking(move || Pool::open(&dir, opts))
        .await?
        .with_context(|| format!("opening the pool {}", args.pool.display()))?;
    Ok(Arc::new(Engine::new(
        pool,
        blobs,
        userns,
        EngineOptions {
            timeout: args.timeout.map(Duration::from_secs),
            compression_threads: 0,
            extract: farm_worker::ops::ExtractLimits {
                max_bytes: args.max_layer_size,
                max_entries: args.max_layer_entries,
            },
        },
    )))
}

//! `farm build`: build a stackerfile's images on this machine, rootless.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use farm_coordinator::build::{BuildOptions, Outcome, run_build};
use farm_coordinator::cache::ActionCache;
use farm_coordinator::output::{
    DEFAULT_ANNOTATION_NAMESPACE, OutputImage, manifest_annotations, write_layout,
};
use farm_coordinator::{Plan, PlanOptions};
use farm_image::BlobStore;
use farm_worker::assemble::Platform;
use farm_worker::engine::{Engine, EngineOptions, UsernsDeleter};
use farm_worker::pool::{Pool, PoolOptions};
use farm_worker::{Entry, Userns};

use crate::common::{Layout, StackerfileArgs, load_plan, print_diagnostics};
use crate::progress::Progress;

/// Build the images of a stackerfile, rootless, on this machine.
///
/// Layers that do not depend on each other build at the same time (--jobs). Each
/// layer's result is cached by everything that affects it (its definition, its base,
/// the content of its imports, SOURCE_DATE_EPOCH, the platform), so a rebuild only
/// runs what changed. The images are written to an OCI layout (-o), tagged with the
/// names of the layers that are not build_only.
///
/// Needs a subordinate uid/gid range for your user (see `farm check`; `farm setup`
/// makes one) and works best with the pool on btrfs.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  farm build\n  farm build -f app/stacker.yaml -o out --substitute VERSION=1.2\n  farm build --no-cache --compression zstd --jobs 4"
)]
pub struct BuildArgs {
    #[command(flatten)]
    pub stackerfile: StackerfileArgs,

    /// OCI layout to write the images to
    #[arg(short, long, value_name = "DIR", default_value = "oci")]
    pub output: PathBuf,

    /// Where farm keeps its cache database and blobs [default: $XDG_DATA_HOME/farm]
    #[arg(long, value_name = "DIR", env = "FARM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// The pool of root filesystems (btrfs recommended) [default: STATE_DIR/pool]
    #[arg(long, value_name = "DIR", env = "FARM_POOL")]
    pub pool: Option<PathBuf>,

    /// Rebuild every layer, ignoring cached results
    #[arg(long)]
    pub no_cache: bool,

    /// Layer compression
    #[arg(long, value_name = "ALGO", default_value = "gzip", value_parser = ["gzip", "zstd"])]
    pub compression: String,

    /// Layers to build at the same time [default: number of cores]
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Kill a layer's run after this many seconds
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,

    /// After the build, remove least-recently-used chains until the pool is below SIZE
    /// (e.g. 20G, 500M)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub pool_max_size: Option<u64>,

    /// Allow imports from outside the directory tree of the stackerfiles
    #[arg(long)]
    pub allow_outside_context: bool,
}

/// `10G`, `500M`, `1024` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("'{s}' is not a size (like 500M or 20G)"))
}

pub fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(build(args))
}

async fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let layout = Layout::new(
        args.state_dir.clone(),
        args.pool.clone(),
        Some(args.output.clone()),
    );
    let options = PlanOptions {
        substitutions: args.stackerfile.substitutions(&layout)?,
    };
    let path = args.stackerfile.path();
    let plan = match load_plan(&path, &options)? {
        Ok(plan) => plan,
        Err(e) => {
            print_diagnostics(&e.warnings);
            print_diagnostics(&e.diagnostics);
            eprintln!(
                "farm build: {} error(s) in {}",
                e.diagnostics.len(),
                path.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    print_diagnostics(&plan.warnings);

    std::fs::create_dir_all(&layout.state_dir)
        .with_context(|| format!("creating the state dir {}", layout.state_dir.display()))?;
    let blobs = BlobStore::local(&layout.state_dir.join("blobs"))
        .with_context(|| format!("opening the blob store in {}", layout.state_dir.display()))?;
    let cache = ActionCache::open(&layout.state_dir.join("cache.db")).await?;
    let userns = Userns::detect(Entry::current_exe()?)?;
    let pool = {
        let dir = layout.pool.clone();
        let opts = PoolOptions::default().with_deleter(Arc::new(UsernsDeleter(userns.clone())));
        tokio::task::spawn_blocking(move || Pool::open(&dir, opts))
            .await?
            .with_context(|| format!("opening the pool {}", layout.pool.display()))?
    };
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let engine = Arc::new(Engine::new(
        pool.clone(),
        blobs.clone(),
        userns,
        EngineOptions {
            timeout: args.timeout.map(Duration::from_secs),
            compression_threads: 0,
        },
    ));
    let context = if args.allow_outside_context {
        None
    } else {
        Some(context_dir(&plan))
    };
    let build_options = BuildOptions {
        jobs,
        no_cache: args.no_cache,
        compression: args.compression.clone(),
        caller_env: std::env::vars().collect(),
        context,
        platform: Platform::host().key(),
    };

    let (events, rx) = farm_coordinator::build::EventSender::channel();
    let progress = Progress::start(&plan, rx);
    let canceller = {
        let engine = engine.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("farm: cancelling (Ctrl-C)");
                engine.cancel_all();
            }
        })
    };
    let report = run_build(
        &plan,
        &blobs,
        &cache,
        engine.clone(),
        &build_options,
        events,
    )
    .await;
    canceller.abort();
    let summary = progress.finish().await;
    let report = report?;

    let mut ok = report.succeeded();
    if ok {
        let images: Vec<OutputImage> = plan
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.layer.build_only)
            .filter_map(|(i, l)| match &report.outcomes[i] {
                Outcome::Built { result, .. } => Some(OutputImage {
                    tag: l.layer.name.clone(),
                    result: result.clone(),
                    annotations: manifest_annotations(&plan, i, DEFAULT_ANNOTATION_NAMESPACE),
                }),
                _ => None,
            })
            .collect();
        match write_layout(&blobs, &args.output, &images).await {
            Ok(tags) => {
                for (tag, digest) in &tags {
                    println!("{}:{tag}  {digest}", args.output.display());
                }
            }
            Err(e) => {
                eprintln!(
                    "farm build: writing the OCI layout {}: {e}",
                    args.output.display()
                );
                ok = false;
            }
        }
    }
    if let Some(max) = args.pool_max_size {
        let gc = tokio::task::spawn_blocking(move || pool.gc(max)).await?;
        match gc {
            Ok(r) => tracing::info!(removed = r.removed.len(), "pool gc"),
            Err(e) => eprintln!("farm build: pool gc: {e}"),
        }
    }
    eprintln!("{summary}");
    eprintln!(
        "farm build: {} in {:.1}s",
        if ok { "done" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The directory tree imports must stay in: the common ancestor of every loaded
/// stackerfile's directory.
fn context_dir(plan: &Plan) -> PathBuf {
    let dirs: Vec<PathBuf> = plan
        .files
        .iter()
        .map(|f| {
            let d = f.path.parent().map(PathBuf::from).unwrap_or_default();
            let d = if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            };
            std::fs::canonicalize(&d).unwrap_or(d)
        })
        .collect();
    let mut common = dirs.first().cloned().unwrap_or_else(|| PathBuf::from("."));
    for d in &dirs[1..] {
        while !d.starts_with(&common) {
            if !common.pop() {
                break;
            }
        }
    }
    common
}

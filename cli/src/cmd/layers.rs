//! stacker's everyday commands over built layers: `farm grab`, `farm chroot`,
//! `farm inspect`, `farm clean`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use farm_image::OciLayout;
use farm_model::EventSender;

use crate::common::Layout;
use crate::last_build::{recorded_layers, recorded_result};
use crate::local::{Local, block_on};

/// Where the state is.
#[derive(Debug, Clone, Args)]
pub(crate) struct StateArgs {
    /// Where farm keeps its cache database and blobs (stacker's --stacker-dir)
    /// [default: $XDG_DATA_HOME/farm, or WORK_DIR/.stacker with --work-dir]
    #[arg(
        long,
        visible_alias = "stacker-dir",
        value_name = "DIR",
        env = "FARM_STATE_DIR"
    )]
    pub state_dir: Option<PathBuf>,

    /// The pool of root filesystems (stacker's --roots-dir)
    /// [default: STATE_DIR/pool, or WORK_DIR/roots with --work-dir]
    #[arg(
        long,
        visible_alias = "roots-dir",
        value_name = "DIR",
        env = "FARM_POOL"
    )]
    pub pool: Option<PathBuf>,
}

impl StateArgs {
    pub(crate) fn layout(&self) -> Layout {
        Layout::new(self.state_dir.clone(), self.pool.clone(), None)
    }
}

fn built(local: &Local, layer: &str) -> anyhow::Result<farm_model::BuiltImage> {
    recorded_result(&local.layout.state_dir, layer).with_context(|| {
        let known = recorded_layers(&local.layout.state_dir);
        if known.is_empty() {
            format!("no layer '{layer}' has been built with this state dir (run farm build first)")
        } else {
            format!(
                "no layer '{layer}' has been built; built layers: {}",
                known.join(", ")
            )
        }
    })
}

/// Copy a file out of a built layer (`farm grab LAYER:PATH [DEST]`).
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  farm grab builder:/out/app ./app")]
pub(crate) struct GrabArgs {
    /// LAYER:PATH, a file in the result of a layer built by farm build
    pub source: String,
    /// Where to write it [default: the file's name, in the current directory]
    pub dest: Option<PathBuf>,
    #[command(flatten)]
    pub state: StateArgs,
}

pub(crate) fn grab(args: GrabArgs) -> anyhow::Result<ExitCode> {
    let Some((layer, path)) = args.source.split_once(':') else {
        bail!(
            "'{}': expected LAYER:PATH, for example builder:/out/app",
            args.source
        );
    };
    let dest = args.dest.clone().unwrap_or_else(|| {
        PathBuf::from(
            std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "grabbed".into()),
        )
    });
    block_on(async move {
        let local = Local::open(
            args.state.layout(),
            crate::run_limits::RunLimitArgs::default()
                .engine_options(farm_worker::engine::BindPolicy::Unrestricted),
        )
        .await?;
        let result = built(&local, layer)?;
        let (events, _rx) = EventSender::channel();
        let n = local.engine.grab(&result, path, &dest, &events).await?;
        println!("{} ({n} bytes)", dest.display());
        Ok(ExitCode::SUCCESS)
    })?
}

/// A shell in a throwaway copy of a built layer (`farm chroot [LAYER] [CMD...]`).
///
/// Runs in the same rootless sandbox as builds; nothing you change is kept. Without
/// LAYER, as stacker: the stackerfile's only layer, else its last one.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  farm chroot app\n  farm chroot app -- ls -l /usr/local/bin\n  farm chroot -f images/stacker.yaml --substitute VERSION=1.2"
)]
pub(crate) struct ChrootArgs {
    /// A layer built by farm build [default: the last layer of the stackerfile]
    pub layer: Option<String>,
    /// The stackerfile that names the layer when LAYER is not given
    #[arg(
        short = 'f',
        long = "stacker-file",
        value_name = "FILE",
        default_value = "stacker.yaml"
    )]
    pub stacker_file: PathBuf,
    #[command(flatten)]
    pub subs: crate::common::SubstitutionArgs,
    /// The command to run [default: /bin/sh]
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub state: StateArgs,
}

/// The layer `farm chroot` enters without a name: the stackerfile's last layer (its only
/// one when it has one), as stacker picks.
fn default_layer(args: &ChrootArgs) -> anyhow::Result<Option<String>> {
    let options =
        farm_stackerfile::PlanOptions::new(args.subs.substitutions(&args.state.layout())?);
    let Some(plan) = crate::common::plan_or_report("chroot", &args.stacker_file, &options)? else {
        return Ok(None);
    };
    let last = plan.files.len().saturating_sub(1);
    let layer = plan
        .layers
        .iter()
        .rev()
        .find(|l| l.file == last)
        .or(plan.layers.last())
        .with_context(|| format!("{} has no layers", args.stacker_file.display()))?;
    Ok(Some(layer.layer.name.clone()))
}

pub(crate) fn chroot(mut args: ChrootArgs) -> anyhow::Result<ExitCode> {
    let layer = match args.layer.take() {
        Some(layer) => layer,
        None => match default_layer(&args)? {
            Some(layer) => layer,
            None => return Ok(ExitCode::FAILURE),
        },
    };
    block_on(async move {
        let local = Local::open(
            args.state.layout(),
            crate::run_limits::RunLimitArgs::default()
                .engine_options(farm_worker::engine::BindPolicy::Unrestricted),
        )
        .await?;
        let result = built(&local, &layer)?;
        let (events, _rx) = EventSender::channel();
        let mut env = vec![
            (
                "PATH".to_string(),
                farm_stackerfile::DEFAULT_PATH.to_string(),
            ),
            ("HOME".to_string(), "/root".to_string()),
            ("STACKER_LAYER_NAME".to_string(), layer.clone()),
        ];
        if let Ok(term) = std::env::var("TERM") {
            env.push(("TERM".into(), term));
        }
        let status = local
            .engine
            .chroot(&result, &args.command, env, &events)
            .await?;
        Ok(match status {
            farm_worker::ScriptStatus::Exited(0) => ExitCode::SUCCESS,
            farm_worker::ScriptStatus::Exited(c) => ExitCode::from(c.clamp(1, 255) as u8),
            farm_worker::ScriptStatus::Signaled(s) => ExitCode::from((128 + s).clamp(1, 255) as u8),
        })
    })?
}

/// Show the images of an OCI layout: tags, layers and sizes, config, annotations.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Only this tag
    pub tag: Option<String>,
    /// The OCI layout
    #[arg(short, long, value_name = "DIR", default_value = "oci")]
    pub output: PathBuf,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let layout = OciLayout::open(&args.output)
            .await
            .with_context(|| format!("opening the OCI layout {}", args.output.display()))?;
        let tags = match &args.tag {
            Some(t) => vec![t.clone()],
            None => layout.tags().await?,
        };
        let mut all = Vec::new();
        for tag in tags {
            let (desc, manifest) = layout
                .manifest(&tag, None)
                .await
                .with_context(|| format!("tag '{tag}' in {}", args.output.display()))?;
            let config = layout.config(&manifest).await?;
            if args.json {
                all.push(serde_json::json!({
                    "tag": tag,
                    "manifest_digest": desc.digest().to_string(),
                    "manifest": manifest,
                    "config": config,
                }));
                continue;
            }
            println!("{tag}  {}", desc.digest());
            println!("  platform: {}/{}", config.os(), config.architecture());
            let total: u64 = manifest.layers().iter().map(|l| l.size()).sum();
            println!(
                "  layers: {} ({} bytes compressed)",
                manifest.layers().len(),
                total
            );
            for l in manifest.layers() {
                println!("    {}  {:>10}  {}", l.digest(), l.size(), l.media_type());
            }
            if let Some(c) = config.config() {
                if let Some(e) = c.entrypoint() {
                    println!("  entrypoint: {e:?}");
                }
                if let Some(c) = c.cmd() {
                    println!("  cmd: {c:?}");
                }
                for e in c.env().clone().unwrap_or_default() {
                    println!("  env: {e}");
                }
                let mut labels: Vec<_> =
                    c.labels().clone().unwrap_or_default().into_iter().collect();
                labels.sort();
                for (k, v) in labels {
                    println!("  label: {k}={v}");
                }
                if let Some(w) = c.working_dir() {
                    println!("  working_dir: {w}");
                }
                if let Some(u) = c.user() {
                    println!("  user: {u}");
                }
            }
            let mut ann: Vec<_> = manifest
                .annotations()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
            ann.sort();
            for (k, v) in ann {
                let first = v.lines().next().unwrap_or("");
                let more = if v.lines().count() > 1 { " ..." } else { "" };
                println!("  annotation: {k}={first}{more}");
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Remove farm's state: the pool's chains, the blob store and the cache.
#[derive(Debug, Args)]
pub(crate) struct CleanArgs {
    #[command(flatten)]
    pub state: StateArgs,
}

pub(crate) fn clean(args: CleanArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let local = Local::open(
            args.state.layout(),
            crate::run_limits::RunLimitArgs::default()
                .engine_options(farm_worker::engine::BindPolicy::Unrestricted),
        )
        .await?;
        let pool = local.pool.clone();
        // Every chain, whatever its size (gc stops at a size limit, and the empty
        // chain has size 0); a chain a running build holds is kept.
        let (removed, kept) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, usize)> {
                pool.gc(u64::MAX)?; // the leftovers of crashed builds
                let (mut removed, mut kept) = (0, 0);
                for chain in pool.list()? {
                    match pool.remove_chain(&chain.id) {
                        Ok(true) => removed += 1,
                        Ok(false) => {}
                        Err(farm_worker::pool::PoolError::InUse(_)) => kept += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok((removed, kept))
            })
            .await??;
        local.cache.clear().await?;
        drop(local.cache);
        let state = &local.layout.state_dir;
        for p in [
            "blobs",
            "layers.json",
            "cache.db",
            "cache.db-wal",
            "cache.db-shm",
        ] {
            let path = state.join(p);
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            } else if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        println!(
            "removed {removed} chain(s) from {} and the blobs and cache in {}",
            local.layout.pool.display(),
            state.display()
        );
        if kept > 0 {
            println!("{kept} chain(s) in use by a running build were kept");
        }
        Ok(ExitCode::SUCCESS)
    })?
}

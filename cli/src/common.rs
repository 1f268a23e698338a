//! Pieces every subcommand shares: logging, the stackerfile arguments, substitutions,
//! and printing diagnostics.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use farm_stackerfile::{Diagnostic, Substitutions};

pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FARM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Which stackerfile to read, and the substitutions to apply to it.
#[derive(Debug, Clone, Args)]
pub(crate) struct StackerfileArgs {
    /// The stackerfile, a path or an http(s) URL [default: stacker.yaml]
    #[arg(value_name = "FILE", conflicts_with = "stacker_file")]
    pub file: Option<PathBuf>,

    /// The stackerfile (stacker's spelling of FILE)
    #[arg(short = 'f', long = "stacker-file", value_name = "FILE")]
    pub stacker_file: Option<PathBuf>,

    #[command(flatten)]
    pub subs: SubstitutionArgs,
}

/// `--substitute` and `--substitute-file`.
#[derive(Debug, Clone, Args)]
pub(crate) struct SubstitutionArgs {
    /// Replace ${{NAME}} in the stackerfiles with VALUE (repeatable; VALUE may contain
    /// '=' and ','). Wins over --substitute-file.
    #[arg(long = "substitute", value_name = "NAME=VALUE")]
    pub substitute: Vec<String>,

    /// A YAML file of NAME: VALUE substitutions.
    #[arg(long = "substitute-file", value_name = "FILE")]
    pub substitute_file: Option<PathBuf>,
}

impl StackerfileArgs {
    pub(crate) fn path(&self) -> PathBuf {
        self.stacker_file
            .clone()
            .or_else(|| self.file.clone())
            .unwrap_or_else(|| PathBuf::from("stacker.yaml"))
    }

    pub(crate) fn substitutions(&self, layout: &Layout) -> anyhow::Result<Substitutions> {
        self.subs.substitutions(layout)
    }
}

impl SubstitutionArgs {
    /// The substitution set: --substitute, then --substitute-file, then built-ins.
    pub(crate) fn substitutions(&self, layout: &Layout) -> anyhow::Result<Substitutions> {
        let mut subs = Substitutions::default();
        for arg in &self.substitute {
            subs.cli.push(Substitutions::parse_cli(arg)?);
        }
        if let Some(file) = &self.substitute_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading --substitute-file {}", file.display()))?;
            subs.file = Substitutions::parse_file(&text)
                .with_context(|| format!("in --substitute-file {}", file.display()))?;
        }
        subs.builtins = layout.builtins();
        Ok(subs)
    }
}

/// Where farm keeps its state and output on this machine.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub state_dir: PathBuf,
    pub pool: PathBuf,
    pub output: PathBuf,
}

impl Layout {
    pub(crate) fn new(
        state_dir: Option<PathBuf>,
        pool: Option<PathBuf>,
        output: Option<PathBuf>,
    ) -> Self {
        let state_dir = state_dir.unwrap_or_else(default_state_dir);
        Layout {
            pool: pool.unwrap_or_else(|| state_dir.join("pool")),
            output: output.unwrap_or_else(|| PathBuf::from("oci")),
            state_dir,
        }
    }

    /// stacker's built-in substitutions, with farm's meanings: the pool holds the root
    /// filesystems, the state dir is farm's `.stacker`, the output is the OCI layout.
    pub(crate) fn builtins(&self) -> Vec<(String, String)> {
        let abs = |p: &Path| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        vec![
            ("STACKER_ROOTFS_DIR".into(), abs(&self.pool)),
            ("STACKER_STACKER_DIR".into(), abs(&self.state_dir)),
            ("STACKER_OCI_DIR".into(), abs(&self.output)),
            ("STACKER_WORK_DIR".into(), abs(&self.state_dir)),
        ]
    }
}

/// `$XDG_DATA_HOME/farm`, else `~/.local/share/farm`; for root `/var/lib/farm` (the
/// build's subordinate ids must be able to reach the pool, and `/root` is closed).
pub(crate) fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/farm");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("farm");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".local/share/farm");
    }
    PathBuf::from(".farm")
}

/// Print diagnostics to stderr, one block each.
pub(crate) fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
}

/// Load and plan a stackerfile given as a path or an http(s) URL.
pub(crate) fn load_plan(
    path: &Path,
    options: &farm_stackerfile::PlanOptions,
) -> anyhow::Result<Result<farm_stackerfile::Plan, farm_stackerfile::PlanError>> {
    if !farm_stackerfile::is_url(&path.to_string_lossy()) {
        return Ok(farm_stackerfile::Plan::load(
            path,
            options,
            &farm_stackerfile::LocalFiles,
        ));
    }
    // Fetching needs a runtime of its own, on a thread where blocking is allowed.
    std::thread::scope(|s| {
        s.spawn(|| {
            // A worker thread drives the I/O: `Handle::block_on` from the loader's
            // thread does not drive a current-thread runtime, so a fetch would hang.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the HTTP client")?;
            let files = crate::remote::Files::new(rt.handle().clone());
            Ok(farm_stackerfile::Plan::load(path, options, &files))
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("fetching the stackerfile failed")))
    })
}

/// Load and plan a stackerfile, printing warnings; on errors print them with a count
/// line for `command` and return `None`.
pub(crate) fn plan_or_report(
    command: &str,
    path: &Path,
    options: &farm_stackerfile::PlanOptions,
) -> anyhow::Result<Option<farm_stackerfile::Plan>> {
    report_plan(
        command,
        &path.display().to_string(),
        load_plan(path, options)?,
    )
}

/// Print a plan's warnings, or its errors with a count line; the plan when there is one.
pub(crate) fn report_plan(
    command: &str,
    what: &str,
    plan: Result<farm_stackerfile::Plan, farm_stackerfile::PlanError>,
) -> anyhow::Result<Option<farm_stackerfile::Plan>> {
    match plan {
        Ok(plan) => {
            print_diagnostics(&plan.warnings);
            Ok(Some(plan))
        }
        Err(e) => {
            print_diagnostics(&e.warnings);
            print_diagnostics(&e.diagnostics);
            let n = e.diagnostics.len();
            eprintln!(
                "farm {command}: {n} error{} in {what}",
                if n == 1 { "" } else { "s" }
            );
            Ok(None)
        }
    }
}

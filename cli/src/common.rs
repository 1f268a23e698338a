//! Pieces every subcommand shares: logging, the stackerfile arguments, substitutions,
//! and printing diagnostics.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::Args;
use farm_stackerfile::{Diagnostic, Substitutions};
use tracing_subscriber::Layer as _;

/// stacker's global flags, accepted before or after any subcommand.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct GlobalArgs {
    /// Debug logs on stderr (stacker's --debug; like FARM_LOG=debug)
    #[arg(long, global = true, conflicts_with = "quiet")]
    pub debug: bool,

    /// Only errors on stderr: no logs below error, no progress lines, no summary when all
    /// went well (stacker's --quiet)
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Also write the logs and the build's progress lines to FILE (stacker's --log-file)
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Show the live progress display (spinners) even when stderr is not a terminal
    #[arg(long, global = true, overrides_with = "no_progress")]
    pub progress: bool,

    /// No live progress display: plain progress lines even on a terminal
    #[arg(long, global = true, overrides_with = "progress")]
    pub no_progress: bool,

    /// stacker's work dir: the state dir defaults to DIR/.stacker (--stacker-dir) and the
    /// pool to DIR/roots (--roots-dir)
    #[arg(long, global = true, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Send traces to this OTLP/gRPC receiver (http://HOST:PORT, e.g. a collector or
    /// Jaeger on port 4317) [default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    /// OTEL_EXPORTER_OTLP_ENDPOINT; none: no traces]
    #[arg(long, global = true, value_name = "URL", env = "FARM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

static GLOBAL: OnceLock<GlobalArgs> = OnceLock::new();
/// The spans farm makes for traces only (see `farm_telemetry`), kept out of log lines.
const NOT_LOGGED: &str = "farm_trace=off";
static LOG_FILE: OnceLock<Arc<std::fs::File>> = OnceLock::new();

fn global() -> &'static GlobalArgs {
    GLOBAL.get_or_init(GlobalArgs::default)
}

/// `--quiet`: print only errors.
pub(crate) fn quiet() -> bool {
    global().quiet
}

/// `--progress` (`Some(true)`), `--no-progress` (`Some(false)`), else `None` (a live
/// display exactly when stderr is a terminal).
pub(crate) fn progress_forced() -> Option<bool> {
    let g = global();
    if g.progress {
        Some(true)
    } else if g.no_progress {
        Some(false)
    } else {
        None
    }
}

/// A progress line for `--log-file` (stderr has it already).
pub(crate) fn log_line(line: &str) {
    if let Some(f) = LOG_FILE.get() {
        let _ = writeln!(&**f, "{line}");
    }
}

/// Remember the global flags and set up logging: `--debug`, `--quiet`, else FARM_LOG,
/// else `default`, on stderr; with `--log-file`, also to the file (at least info there).
/// With an OTLP endpoint (`--otlp-endpoint`, or the OTEL_* environment), spans go to it
/// as `service` (see `farm_telemetry`); the returned handle flushes them at exit.
pub(crate) fn init(
    args: GlobalArgs,
    default: &str,
    service: &str,
) -> anyhow::Result<farm_telemetry::Telemetry> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    const DEBUG: &str = "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info,\
                         reqwest=info,rustls=info,sqlx=info";
    let from_env = || EnvFilter::try_from_env("FARM_LOG").ok();
    let stderr_filter = if args.debug {
        EnvFilter::new(DEBUG)
    } else if args.quiet {
        EnvFilter::new("error")
    } else {
        from_env().unwrap_or_else(|| EnvFilter::new(default))
    };
    // Spans made for traces (target `farm_trace`) go to the OTLP exporter only: log
    // lines look the same with tracing on or off.
    let stderr_filter = stderr_filter.add_directive(NOT_LOGGED.parse().expect("a directive"));
    let file_layer = match &args.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening --log-file {}", path.display()))?;
            let file = Arc::new(file);
            let _ = LOG_FILE.set(file.clone());
            let filter = if args.debug {
                EnvFilter::new(DEBUG)
            } else {
                from_env().unwrap_or_else(|| EnvFilter::new("info"))
            }
            .add_directive(NOT_LOGGED.parse().expect("a directive"));
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(file)
                    .with_filter(filter),
            )
        }
        None => None,
    };
    let telemetry = farm_telemetry::Telemetry::start(&farm_telemetry::TelemetryConfig {
        endpoint: args.otlp_endpoint.clone(),
        service: service.to_string(),
    })?;
    let _ = GLOBAL.set(args);
    tracing_subscriber::registry()
        .with(telemetry.layer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .with_filter(stderr_filter),
        )
        .with(file_layer)
        .init();
    Ok(telemetry)
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

    /// The largest stackerfile read (each file, e.g. 4M); larger ones are refused
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = crate::cmd::build::parse_size)]
    pub max_stackerfile_size: u64,
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

    /// The substitutions and limits a plan of these stackerfiles uses.
    pub(crate) fn plan_options(
        &self,
        layout: &Layout,
    ) -> anyhow::Result<farm_stackerfile::PlanOptions> {
        Ok(farm_stackerfile::PlanOptions {
            substitutions: self.substitutions(layout)?,
            max_file_size: self.max_stackerfile_size,
        })
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
        Self::with_work_dir(state_dir, pool, output, global().work_dir.as_deref())
    }

    /// [`Layout::new`] given stacker's `--work-dir`: what is not set goes under it.
    pub(crate) fn with_work_dir(
        state_dir: Option<PathBuf>,
        pool: Option<PathBuf>,
        output: Option<PathBuf>,
        work: Option<&Path>,
    ) -> Self {
        let state_dir = state_dir
            .or_else(|| work.map(|w| w.join(".stacker")))
            .unwrap_or_else(default_state_dir);
        Layout {
            pool: pool
                .or_else(|| work.map(|w| w.join("roots")))
                .unwrap_or_else(|| state_dir.join("pool")),
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
            (
                "STACKER_WORK_DIR".into(),
                abs(global().work_dir.as_deref().unwrap_or(&self.state_dir)),
            ),
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

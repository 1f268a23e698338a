//! `farm coordinator` and `farm worker`: the two long-running halves of a build farm.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use farm_client::ConnectOptions;
use farm_coordinator::auth::{Auth, Exposed, Protection, TokenFile, check_exposure};
use farm_coordinator::farm::{Farm, FarmConfig, Limits, OutsideContext, RemotePolicy};
use farm_coordinator::server::{ServeOptions, Tls};
use farm_image::BlobStore;
use farm_model::Platform;
use farm_worker::agent::{self, AgentConfig, AgentStatus, Control, GrpcDialer};
use farm_worker::engine::{BindPolicy, BindPrefix, Engine, UsernsDeleter};
use farm_worker::pool::{Pool, PoolOptions};
use farm_worker::{Entry, Userns};
use tonic::transport::ClientTlsConfig;

use crate::client::{read_for, token_from, warn_plaintext_token};
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
///
/// On a loopback address it needs no credentials. Anywhere else it refuses to start
/// without TLS (--tls-cert, --tls-key) and tokens for the roles it serves
/// (--client-tokens, --worker-tokens) unless given --insecure. Clients (the Farm API)
/// and workers (Workers.Connect) are different roles: a client's token is refused on
/// the workers' service and the other way round; both may use Blobs. When clients
/// authenticate, each sees and acts on its own builds only.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm coordinator --listen 127.0.0.1:7600 --state-dir /var/lib/farm --blobs file:///srv/farm/blobs\n  \
farm coordinator --listen 0.0.0.0:7600 --state-dir /var/lib/farm --blobs s3://bucket/farm --metrics 0.0.0.0:9600 \\\n    \
--tls-cert farm.crt --tls-key farm.key --client-tokens clients.tokens --worker-tokens workers.tokens\n\n\
Token files: `NAME sha256:HEX` lines (`farm token new NAME` prints a token and its line); they\n\
are read again when they change. Blob stores: file:///PATH, s3://BUCKET/PREFIX (AWS_* environment\n\
variables), gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, memory:// (tests).")]
pub(crate) struct CoordinatorArgs {
    /// Address to serve gRPC on (clients, and workers unless --worker-listen)
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7600",
        env = "FARM_LISTEN"
    )]
    pub listen: String,

    /// Serve workers (Workers.Connect and Blobs) on this address instead of --listen
    /// [default: the --listen address, one listener for both roles]
    #[arg(long, value_name = "ADDR", env = "FARM_WORKER_LISTEN")]
    pub worker_listen: Option<String>,

    /// The coordinator's TLS certificate chain (PEM); with --tls-key, every listener
    /// speaks TLS only (clients use https://)
    #[arg(long, value_name = "FILE", requires = "tls_key", env = "FARM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "FARM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM) on every listener (mutual
    /// TLS; needs --tls-cert)
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        env = "FARM_TLS_CLIENT_CA"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Require a certificate signed by this CA (PEM) from workers on --worker-listen
    /// only (mutual TLS for workers; needs --tls-cert and --worker-listen)
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "worker_listen"], env = "FARM_WORKER_TLS_CLIENT_CA")]
    pub worker_tls_client_ca: Option<PathBuf>,

    /// Clients' tokens: `NAME sha256:HEX` lines; without it anyone who reaches the
    /// coordinator is a client
    #[arg(long, value_name = "FILE", env = "FARM_CLIENT_TOKENS")]
    pub client_tokens: Option<PathBuf>,

    /// Workers' tokens: `NAME sha256:HEX` lines, NAME being the worker's --name;
    /// without it anyone who reaches the coordinator may connect as a worker
    #[arg(long, value_name = "FILE", env = "FARM_WORKER_TOKENS")]
    pub worker_tokens: Option<PathBuf>,

    /// Serve a non-loopback address without TLS or tokens anyway (anyone who reaches
    /// it can run builds and pose as a worker)
    #[arg(long, env = "FARM_INSECURE")]
    pub insecure: bool,

    /// Directory for the state database, the action cache and uploaded contexts
    #[arg(long, value_name = "DIR", env = "FARM_STATE_DIR")]
    pub state_dir: PathBuf,

    /// The shared blob store (workers must use the same one)
    #[arg(long, value_name = "URL", env = "FARM_BLOBS")]
    pub blobs: String,

    /// A worker that sends no heartbeat for this long loses its layers to another worker
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10.0,
        env = "FARM_LEASE_TIMEOUT"
    )]
    pub lease_timeout: f64,

    /// Serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR", env = "FARM_METRICS")]
    pub metrics: Option<String>,

    /// Finished builds whose status, events and logs are kept (older ones are forgotten;
    /// cached layers stay)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        env = "FARM_KEEP_BUILDS"
    )]
    pub keep_builds: usize,

    #[command(flatten)]
    pub gc: crate::gc_args::CoordinatorGcArgs,

    /// Credentials for registry bases (else the coordinator's auth files)
    #[command(flatten)]
    pub registry: super::publish::RegistryArgs,

    /// The largest stackerfile a submission may have (each file, e.g. 4M)
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = super::build::parse_size, env = "FARM_MAX_STACKERFILE_SIZE")]
    pub max_stackerfile_size: u64,

    /// The most files an uploaded context may list
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT_MAX_CONTEXT_FILES, env = "FARM_MAX_CONTEXT_FILES")]
    pub max_context_files: usize,

    /// The most an uploaded context may materialise to (each listed file at its size)
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = super::build::parse_size, env = "FARM_MAX_CONTEXT_SIZE")]
    pub max_context_size: u64,

    /// The most layers one submission's plan may have
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT_MAX_LAYERS, env = "FARM_MAX_LAYERS")]
    pub max_layers: usize,

    /// The largest blob one upload may store
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = super::build::parse_size, env = "FARM_MAX_UPLOAD_SIZE")]
    pub max_upload_size: u64,

    /// The most output one layer keeps (each attempt); the rest is dropped with one
    /// marker line, and workers are told to stop sending
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = super::build::parse_size, env = "FARM_MAX_LAYER_LOG")]
    pub max_layer_log: u64,

    /// A layer whose worker shows no progress (no output, no running sandbox) for this
    /// long is built elsewhere, heartbeats or not: seconds or 30m, 1h (0: never)
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = crate::run_limits::parse_duration, env = "FARM_PROGRESS_TIMEOUT")]
    pub progress_timeout: Duration,

    /// What remote submissions may read, fetch and use
    #[command(flatten)]
    pub inputs: RemoteInputArgs,

    /// Serve CI webhooks (POST /hooks/github, /hooks/gitlab, /hooks/gitea) at http://ADDR
    /// for the repositories of --repos
    #[arg(long, value_name = "ADDR", requires = "repos", env = "FARM_WEBHOOKS")]
    pub webhooks: Option<String>,

    /// The repositories webhooks build (TOML, or YAML when it ends in .yaml): see the
    /// README's "CI webhooks"
    #[arg(long, value_name = "FILE", requires = "webhooks", env = "FARM_REPOS")]
    pub repos: Option<PathBuf>,
}

/// What the operator allows remote submissions beyond the files they upload. By default
/// a remote build reads nothing of the coordinator's disk, fetches only public addresses
/// and pulls registry bases anonymously.
#[derive(Debug, Args)]
pub(crate) struct RemoteInputArgs {
    /// Let a remote submission that asks for it (`farm submit --allow-outside-context`)
    /// read files of this machine outside its uploaded context
    #[arg(long = "allow-outside-context", env = "FARM_ALLOW_OUTSIDE_CONTEXT")]
    pub allow_outside_context: bool,

    /// Let downloads of remote submissions (http imports, tar base URLs, registry
    /// bases) reach this non-public network, address or host name (loopback, link-local
    /// and private addresses are refused otherwise); repeatable
    #[arg(
        long = "allow-fetch",
        value_name = "CIDR|HOST",
        env = "FARM_ALLOW_FETCH",
        value_delimiter = ','
    )]
    pub allow_fetch: Vec<farm_coordinator::destinations::Allowed>,

    /// A registry (host[:port]) the coordinator's registry credentials may be used for
    /// on a remote submission's behalf; others are pulled anonymously; repeatable
    #[arg(long = "registry-credentials-for", value_name = "REGISTRY", value_parser = registry_host,
        env = "FARM_REGISTRY_CREDENTIALS_FOR",
        value_delimiter = ','
    )]
    pub registry_credentials_for: Vec<String>,
}

impl RemoteInputArgs {
    pub(crate) fn policy(&self) -> RemotePolicy {
        RemotePolicy {
            outside_context: if self.allow_outside_context {
                OutsideContext::WhenAsked
            } else {
                OutsideContext::Refused
            },
            fetch: farm_coordinator::destinations::AllowList(self.allow_fetch.clone()),
            registry_credentials_for: self.registry_credentials_for.clone(),
        }
    }
}

fn registry_host(s: &str) -> Result<String, String> {
    farm_coordinator::pin::registry::registry_host(s).ok_or_else(|| {
        format!("{s:?} is not a registry host (write it as in image references: ghcr.io, docker.io, localhost:5000)")
    })
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
farm worker --coordinator http://10.0.0.5:7600 --pool /srv/farm/pool --blobs file:///srv/farm/blobs --slots 4\n  \
farm worker --coordinator https://farm.example:7600 --ca-cert ca.crt --token-file w1.token --name w1 --pool /srv/farm/pool --blobs s3://bucket/farm")]
pub(crate) struct WorkerArgs {
    /// The coordinator's address (host:port, http://host:port or https://host:port)
    #[arg(long, value_name = "URL", env = "FARM_COORDINATOR")]
    pub coordinator: String,

    /// A file holding this worker's token (its line, under the worker's --name, is in
    /// the coordinator's --worker-tokens file) [env: FARM_WORKER_TOKEN holds the token
    /// itself]
    #[arg(long, value_name = "FILE", env = "FARM_WORKER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The CA (PEM) the coordinator's certificate is signed by, for https:// [default:
    /// the system's roots]
    #[arg(long, value_name = "FILE", env = "FARM_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// The worker's certificate (PEM), when the coordinator requires one (mutual TLS;
    /// with --tls-key)
    #[arg(long, value_name = "FILE", requires = "tls_key", env = "FARM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "FARM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// The pool of root filesystems (btrfs recommended; see `farm setup`)
    #[arg(long, value_name = "DIR", env = "FARM_POOL")]
    pub pool: PathBuf,

    #[command(flatten)]
    pub pool_gc: crate::gc_args::PoolGcArgs,

    /// The shared blob store (the coordinator's)
    #[arg(long, value_name = "URL", env = "FARM_BLOBS")]
    pub blobs: String,

    /// Layers to build at the same time [default: number of cores]
    #[arg(long, value_name = "N", env = "FARM_SLOTS")]
    pub slots: Option<u32>,

    /// The worker's name [default: the host name]
    #[arg(long, value_name = "NAME", env = "FARM_WORKER_NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub run: crate::run_limits::RunLimitArgs,
    /// The most one layer (or tarball base) may extract to: its uncompressed tar, and
    /// its files at their full size (sparse files count their holes)
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = super::build::parse_size, env = "FARM_MAX_LAYER_SIZE")]
    pub max_layer_size: u64,

    /// The most entries (files, directories, links) one layer may hold
    #[arg(long, value_name = "N", default_value_t = farm_image::DEFAULT_MAX_LAYER_ENTRIES, env = "FARM_MAX_LAYER_ENTRIES")]
    pub max_layer_entries: u64,

    /// The most output of one layer this worker sends (the coordinator's cap, when
    /// lower, wins); the rest is dropped with one marker line
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = super::build::parse_size, env = "FARM_MAX_LAYER_LOG")]
    pub max_layer_log: u64,

    // ---- running in a pod (issue 14): probes, metrics, draining ----
    /// Serve Prometheus metrics at http://ADDR/metrics, and the probes /healthz (the
    /// process answers) and /readyz (registered with the coordinator and the pool
    /// usable; the reason when not)
    #[arg(
        long,
        visible_alias = "metrics-listen",
        value_name = "ADDR",
        env = "FARM_METRICS"
    )]
    pub metrics: Option<String>,

    /// On SIGTERM, take no new work and let running layers finish for at most this
    /// long; then hand the rest back to the coordinator (built elsewhere, not counted as
    /// a failed attempt) and exit. Keep it below the pod's terminationGracePeriodSeconds
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 60,
        env = "FARM_DRAIN_TIMEOUT"
    )]
    pub drain_timeout: u64,

    /// Which host paths builds may bind-mount
    #[command(flatten)]
    pub binds: BindArgs,
}

/// Host paths a farm's builds may bind-mount (`binds:` in a stackerfile). By default a
/// worker mounts none: a build is anyone's who can submit.
#[derive(Debug, Args)]
pub(crate) struct BindArgs {
    /// Let `binds` mount host paths under PREFIX, read-only (`PREFIX:rw`: read-write
    /// for entries that ask for `rw: true`); repeatable
    #[arg(
        long = "allow-bind",
        value_name = "PREFIX[:rw]",
        env = "FARM_ALLOW_BIND",
        value_delimiter = ','
    )]
    pub allow_bind: Vec<BindPrefix>,
}

/// `host:port` or `http(s)://host:port` as a URL.
pub(crate) fn coordinator_url(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// The coordinator's token files, TLS settings and the CA of workers' certificates.
type Security = (Arc<Auth>, Option<Tls>, Option<Vec<u8>>);

/// The coordinator's token files and TLS settings, read and checked before it starts.
fn coordinator_security(args: &CoordinatorArgs) -> anyhow::Result<Security> {
    let open = |flag: &str, path: &Option<PathBuf>| -> anyhow::Result<Option<TokenFile>> {
        path.as_ref()
            .map(|p| TokenFile::open(p).with_context(|| format!("{flag} {}", p.display())))
            .transpose()
    };
    let auth = Auth {
        clients: open("--client-tokens", &args.client_tokens)?,
        workers: open("--worker-tokens", &args.worker_tokens)?,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls {
            cert_pem: read_for("--tls-cert", cert)?,
            key_pem: read_for("--tls-key", key)?,
            client_ca_pem: args
                .tls_client_ca
                .as_ref()
                .map(|p| read_for("--tls-client-ca", p))
                .transpose()?,
        }),
        _ => None,
    };
    let worker_ca = args
        .worker_tls_client_ca
        .as_ref()
        .map(|p| read_for("--worker-tls-client-ca", p))
        .transpose()?;
    Ok((Arc::new(auth), tls, worker_ca))
}

pub(crate) fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let (auth, tls, worker_client_ca_pem) = coordinator_security(&args)?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let worker_listener = match &args.worker_listen {
            Some(w) => Some(
                tokio::net::TcpListener::bind(w)
                    .await
                    .with_context(|| format!("listening for workers on {w}"))?,
            ),
            None => None,
        };
        let worker_addr = worker_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let mut exposed = vec![Exposed {
            addr,
            clients: true,
            workers: worker_addr.is_none(),
        }];
        if let Some(w) = worker_addr {
            exposed.push(Exposed {
                addr: w,
                clients: false,
                workers: true,
            });
        }
        let missing = check_exposure(
            &exposed,
            Protection {
                tls: tls.is_some(),
                client_tokens: auth.clients.is_some(),
                worker_tokens: auth.workers.is_some(),
            },
        );
        let insecure = !missing.is_empty();
        if insecure && !args.insecure {
            bail!(
                "refusing to serve {} : anyone who reaches it could run builds and pose as a \
                 worker. Give it TLS (--tls-cert, --tls-key) and tokens (--client-tokens, \
                 --worker-tokens; `farm token new NAME` makes them), listen on 127.0.0.1, or \
                 pass --insecure to serve it unprotected anyway",
                missing.join("; ")
            );
        }
        if insecure {
            let warning = format!(
                "INSECURE: serving {} (--insecure): anyone who reaches it can run builds on the \
                 workers, read every build's logs and blobs, and connect as a worker",
                missing.join("; ")
            );
            eprintln!("farm coordinator: WARNING: {warning}");
            tracing::warn!("{warning}");
        }
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
            remote: args.inputs.policy(),
            limits: farm_coordinator::farm::Limits {
                max_stackerfile_size: args.max_stackerfile_size,
                max_context_files: args.max_context_files,
                max_context_size: args.max_context_size,
                max_layers: args.max_layers,
                max_upload_size: args.max_upload_size,
            },
            max_layer_log: args.max_layer_log,
            progress_timeout: args.progress_timeout,
            gc: args.gc.config(),
        })
        .await
        .with_context(|| format!("starting the coordinator on {}", args.state_dir.display()))?;
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
        if let (Some(addr), Some(file)) = (&args.webhooks, &args.repos) {
            let repos = farm_coordinator::hooks::config::Repos::load(file)
                .with_context(|| format!("--repos {}", file.display()))?;
            let wl = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for webhooks on {addr} (--webhooks)"))?;
            eprintln!(
                "farm coordinator: webhooks on http://{} for {} repositories",
                wl.local_addr().map_or(addr.clone(), |a| a.to_string()),
                repos.repos.len()
            );
            let (farm, state_dir) = (farm.clone(), args.state_dir.clone());
            let mut options = farm_coordinator::hooks::WebhookOptions::new(repos);
            options.registry = args.registry.credentials()?;
            tokio::spawn(async move {
                if let Err(e) = farm_coordinator::hooks::serve(wl, farm, &state_dir, options).await
                {
                    tracing::error!("webhook server: {e}");
                }
            });
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let roles = |file: &Option<TokenFile>| if file.is_some() { "tokens" } else { "open" };
        eprintln!(
            "farm coordinator: listening on {scheme}://{addr}{} (clients {}, workers {}{}; state {}, blobs {}, lease {:.1}s)",
            worker_addr
                .map(|w| format!(", workers on {scheme}://{w}"))
                .unwrap_or_default(),
            roles(&auth.clients),
            roles(&auth.workers),
            match (&tls, &worker_client_ca_pem) {
                (Some(t), _) if t.client_ca_pem.is_some() => ", client certificates required",
                (_, Some(_)) => ", worker certificates required",
                _ => "",
            },
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
        farm_coordinator::server::serve_with(
            listener,
            farm,
            ServeOptions {
                auth,
                tls,
                worker_listener,
                worker_client_ca_pem,
                insecure,
            },
            shutdown,
        )
        .await?;
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
        let watermarks = args.pool_gc.watermarks()?;
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
        if let (Some(engine), Some(marks)) = (&engine, watermarks) {
            engine
                .pool()
                .spawn_collector(marks, crate::gc_args::POOL_CHECK_EVERY);
        }
        let url = coordinator_url(&args.coordinator);
        let token = token_from(
            args.token_file.as_deref(),
            "--token-file",
            "FARM_WORKER_TOKEN",
        )?;
        if token.is_some() {
            warn_plaintext_token(&url, "worker token");
        }
        let tls = worker_tls(&args, &url)?;
        eprintln!(
            "farm worker {name}: {slots} slot(s), coordinator {url}{}",
            if token.is_some() {
                " (with a token)"
            } else {
                ""
            }
        );
        // Probes, metrics and draining (issue 14).
        let pool_problem = unavailable.clone().or_else(|| {
            let problem = Pool::check(&args.pool).worker_problem();
            if let Some(p) = &problem {
                eprintln!("farm worker: not ready: {p}");
            }
            problem
        });
        let status = Arc::new(AgentStatus::default());
        if let Some(m) = &args.metrics {
            let listener = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("listening for metrics on {m} (--metrics)"))?;
            let probe = WorkerProbe {
                status: status.clone(),
                slots,
                pool_problem,
                engine: engine.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = serve_worker_metrics(listener, probe).await {
                    tracing::error!("metrics server: {e}");
                }
            });
        }
        let (drain, drain_rx) = tokio::sync::watch::channel(false);
        let drain_timeout = Duration::from_secs(args.drain_timeout);
        let run = agent::run_with(
            engine,
            AgentConfig {
                name,
                slots,
                platform: Platform::host(),
                unavailable,
                shares_files: false,
                give_up_after: None,
                max_layer_log: args.max_layer_log,
            },
            GrpcDialer { url, token, tls },
            Control {
                status,
                drain: Some((drain_rx, drain_timeout)),
            },
        );
        tokio::pin!(run);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        loop {
            tokio::select! {
                r = &mut run => {
                    r.map_err(anyhow::Error::msg)?;
                    eprintln!("farm worker: drained, stopping");
                    break;
                }
                _ = term.recv() => {
                    eprintln!(
                        "farm worker: SIGTERM: draining (no new work; running layers get {}s, \
                         then go back to the coordinator)",
                        drain_timeout.as_secs()
                    );
                    let _ = drain.send(true);
                }
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("farm worker: stopping");
                    break;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// What the worker's metrics listener reads.
struct WorkerProbe {
    status: Arc<AgentStatus>,
    slots: u32,
    /// Why the pool is not fit (see `Report::worker_problem`), found at start.
    pool_problem: Option<String>,
    engine: Option<Arc<Engine>>,
}

impl WorkerProbe {
    /// `None` when ready, else why not.
    fn not_ready(&self) -> Option<String> {
        if let Some(p) = &self.pool_problem {
            return Some(p.clone());
        }
        if self.status.draining() {
            return Some("draining: the worker is stopping".into());
        }
        if !self.status.registered() {
            return Some("not registered with the coordinator (yet)".into());
        }
        None
    }

    /// Prometheus text format.
    fn render(&self) -> String {
        let (chains, chain_bytes) = self
            .engine
            .as_ref()
            .and_then(|e| e.pool().list().ok())
            .map(|l| (l.len(), l.iter().filter_map(|c| c.size_bytes).sum::<u64>()))
            .unwrap_or_default();
        let (free, total) = self
            .engine
            .as_ref()
            .and_then(|e| nix::sys::statvfs::statvfs(e.pool().dir()).ok())
            .map(|v| {
                #[allow(clippy::unnecessary_cast)] // c_ulong is u64 on x86_64 only
                let f = v.fragment_size() as u64;
                (v.blocks_available() * f, v.blocks() * f)
            })
            .unwrap_or_default();
        let (hits, misses) = self
            .engine
            .as_ref()
            .map(|e| e.chain_stats())
            .unwrap_or_default();
        let b = |x: bool| u8::from(x);
        let mut out: String = [
            (
                "farm_worker_slots",
                "gauge",
                "Layers this worker builds at once",
                self.slots as u64,
            ),
            (
                "farm_worker_running",
                "gauge",
                "Layers being built",
                self.status.running() as u64,
            ),
            (
                "farm_worker_registered",
                "gauge",
                "1 while registered with the coordinator",
                b(self.status.registered()).into(),
            ),
            (
                "farm_worker_draining",
                "gauge",
                "1 once a stop began",
                b(self.status.draining()).into(),
            ),
            (
                "farm_worker_ready",
                "gauge",
                "1 when /readyz answers 200",
                b(self.not_ready().is_none()).into(),
            ),
            (
                "farm_worker_chain_hits_total",
                "counter",
                "Base layers found already extracted in the pool",
                hits,
            ),
            (
                "farm_worker_chain_misses_total",
                "counter",
                "Base layers extracted into the pool",
                misses,
            ),
            (
                "farm_worker_pool_chains",
                "gauge",
                "Chains (extracted layer stacks) in the pool",
                chains as u64,
            ),
            (
                "farm_worker_pool_chain_bytes",
                "gauge",
                "Known size of the pool's chains",
                chain_bytes,
            ),
            (
                "farm_worker_pool_free_bytes",
                "gauge",
                "Free space of the pool's filesystem",
                free,
            ),
            (
                "farm_worker_pool_size_bytes",
                "gauge",
                "Size of the pool's filesystem",
                total,
            ),
            (
                "farm_worker_pool_used_bytes",
                "gauge",
                "Used space of the pool's filesystem",
                total.saturating_sub(free),
            ),
        ]
        .iter()
        .map(|(name, kind, help, v)| {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
        })
        .collect();
        out.push_str(&self.render_timings());
        out
    }

    /// Sandbox start times and export throughput (issue 16), as counters of their sums:
    /// `rate(..._sum) / rate(..._count)` is the mean start time, `rate(bytes) /
    /// rate(seconds)` the export throughput.
    fn render_timings(&self) -> String {
        let (starts, start_seconds) = farm_worker::sandbox::SANDBOX_STARTS.get();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let (exports, tar_bytes, blob_bytes, export_seconds) = match &self.engine {
            Some(e) => {
                let x = e.export_stats();
                (
                    load(&x.count),
                    load(&x.tar_bytes),
                    load(&x.blob_bytes),
                    load(&x.micros) as f64 / 1e6,
                )
            }
            None => (0, 0, 0, 0.0),
        };
        let mut out = format!(
            "# HELP farm_worker_sandbox_start_seconds Time from spawning a sandbox to its \
             script's start (namespaces, id maps)\n\
             # TYPE farm_worker_sandbox_start_seconds summary\n\
             farm_worker_sandbox_start_seconds_sum {start_seconds}\n\
             farm_worker_sandbox_start_seconds_count {starts}\n"
        );
        for (name, help, v) in [
            (
                "farm_worker_exports_total",
                "Layers exported (tar, compressed, stored)",
                exports.to_string(),
            ),
            (
                "farm_worker_export_tar_bytes_total",
                "Uncompressed tar bytes of exported layers",
                tar_bytes.to_string(),
            ),
            (
                "farm_worker_export_blob_bytes_total",
                "Compressed blob bytes of exported layers written to the blob store",
                blob_bytes.to_string(),
            ),
            (
                "farm_worker_export_seconds_total",
                "Time spent exporting layers (export throughput: tar bytes per second of this)",
                export_seconds.to_string(),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        }
        out
    }
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (200, or 503 with the
/// reason) of a worker.
async fn serve_worker_metrics(
    listener: tokio::net::TcpListener,
    probe: WorkerProbe,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    let probe = Arc::new(probe);
    let (p1, p2) = (probe.clone(), probe);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let p = p1.clone();
                async move {
                    let text = tokio::task::spawn_blocking(move || p.render())
                        .await
                        .unwrap_or_default();
                    ([("content-type", "text/plain; version=0.0.4")], text)
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let p = p2.clone();
                async move {
                    match p.not_ready() {
                        None => (StatusCode::OK, "ready\n".to_string()),
                        Some(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

/// The worker's TLS settings for `url` (None for http://).
fn worker_tls(args: &WorkerArgs, url: &str) -> anyhow::Result<Option<ClientTlsConfig>> {
    let options = ConnectOptions {
        ca_cert_pem: args
            .ca_cert
            .as_ref()
            .map(|p| read_for("--ca-cert", p))
            .transpose()?,
        identity_pem: match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some((read_for("--tls-cert", c)?, read_for("--tls-key", k)?)),
            _ => None,
        },
        ..ConnectOptions::default()
    };
    Ok(options.tls_for(url)?)
}

async fn open_engine(args: &WorkerArgs, blobs: BlobStore) -> anyhow::Result<Arc<Engine>> {
    let userns = Userns::detect(Entry::current_exe()?)?;
    let dir = args.pool.clone();
    let opts = PoolOptions::default()
        .with_deleter(Arc::new(UsernsDeleter(userns.clone())))
        .with_private_to(userns.mapping().container_root());
    let pool = tokio::task::spawn_blocking(move || Pool::open(&dir, opts))
        .await?
        .with_context(|| format!("opening the pool {}", args.pool.display()))?;
    Ok(Arc::new(Engine::new(pool, blobs, userns, {
        let mut options = args
            .run
            .engine_options_with_cgroup(BindPolicy::AllowList(args.binds.allow_bind.clone()));
        options.extract = farm_worker::ops::ExtractLimits {
            max_bytes: args.max_layer_size,
            max_entries: args.max_layer_entries,
        };
        options
    })))
}

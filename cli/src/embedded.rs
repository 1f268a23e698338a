//! The embedded farm: a coordinator and one worker in this process, on the same code
//! paths as `farm coordinator` and `farm worker` (the worker is attached through
//! channels instead of gRPC and reads local files directly). `farm build` and `farm
//! submit` without a coordinator run builds through it.

use std::time::Duration;

use anyhow::Context;
use farm_coordinator::farm::{EventKind, Farm, FarmConfig, FarmError, Submission};
use farm_model::EventSender;
use farm_model::{BuildState, BuiltImage, Platform};
use farm_stackerfile::Plan;
use farm_worker::agent::{self, AgentConfig, Connection, Dialer};

use crate::common::Layout;
use crate::local::Local;
use crate::progress::Progress;

pub(crate) struct Embedded {
    pub farm: Farm,
    pub local: Local,
    worker: tokio::task::JoinHandle<Result<(), String>>,
}

/// How a build ended.
pub(crate) struct Outcome {
    pub state: BuildState,
    pub error: Option<String>,
    pub summary: String,
    /// Built (or cached) layers by name.
    pub results: Vec<(String, BuiltImage)>,
}

impl Outcome {
    pub(crate) fn succeeded(&self) -> bool {
        self.state == BuildState::Succeeded
    }
}

impl Embedded {
    /// Open this machine's state, pool and engine, start the farm and attach the worker
    /// with `slots` build slots.
    pub(crate) async fn start(
        layout: Layout,
        options: farm_worker::engine::EngineOptions,
        slots: usize,
        registry: farm_registry::Credentials,
    ) -> anyhow::Result<Self> {
        let local = Local::open(layout, options).await?;
        let platform = Platform::host();
        let farm = Farm::start(FarmConfig {
            state_dir: local.layout.state_dir.clone(),
            blobs: local.blobs.clone(),
            lease: Duration::from_secs(30),
            platform: platform.clone(),
            builtins: local.layout.builtins(),
            resume: false,
            registry,
            // This machine's own history: enough for `farm status`-style looking back.
            keep_builds: 100,
            // Only local submissions reach the embedded farm (`Origin::Local`): this
            // user's files, addresses and credentials, as stacker uses them.
            remote: Default::default(),
            // The CLI read the stackerfiles first, under its own --max-stackerfile-size,
            // and nothing is uploaded.
            limits: farm_coordinator::farm::Limits::none(),
            max_layer_log: farm_coordinator::farm::DEFAULT_MAX_LAYER_LOG,
            progress_timeout: FarmConfig::DEFAULT_PROGRESS_TIMEOUT,
            // A short-lived process: `farm gc` collects the embedded state.
            gc: farm_coordinator::gc::GcConfig::off(),
        })
        .await
        .with_context(|| {
            format!(
                "starting the embedded farm in {}",
                local.layout.state_dir.display()
            )
        })?;
        let worker = tokio::spawn(agent::run(
            Some(local.engine.clone()),
            AgentConfig {
                name: format!("embedded-{}", std::process::id()),
                slots: slots.max(1) as u32,
                platform,
                unavailable: None,
                shares_files: true,
                give_up_after: None,
                max_layer_log: farm_coordinator::farm::DEFAULT_MAX_LAYER_LOG,
            },
            LocalDialer(farm.clone()),
        ));
        Ok(Embedded {
            farm,
            local,
            worker,
        })
    }

    /// Submit `spec` and follow it to its end with the progress display; Ctrl-C
    /// cancels it.
    pub(crate) async fn run(
        &self,
        plan: &Plan,
        spec: Submission,
    ) -> anyhow::Result<(String, Outcome)> {
        let (id, _) = match self.farm.submit(spec).await {
            Ok(r) => r,
            Err(FarmError::Plan(m)) => anyhow::bail!("{m}"),
            Err(e) => return Err(e.into()),
        };
        let mut events = self.farm.watch(&id, 0).await?;
        let (tx, rx) = EventSender::channel();
        let progress = Progress::start(plan, rx);
        let canceller = {
            let farm = self.farm.clone();
            let engine = self.local.engine.clone();
            let id = id.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("farm: cancelling (Ctrl-C)");
                    let _ = farm.cancel(&id).await;
                    engine.cancel_all();
                }
            })
        };
        let mut end = (
            BuildState::Failed,
            Some("the build's event stream ended early".to_string()),
        );
        while let Some((_, e)) = events.recv().await {
            if let EventKind::Build(state) = e.kind {
                end = (state, e.error);
                break;
            }
            for ev in e.progress_events() {
                tx.send(ev);
            }
        }
        canceller.abort();
        drop(tx);
        let summary = progress.finish().await;
        let results = self.farm.built_images(&id).await?;
        if let (BuildState::Failed, Some(e)) = &end {
            tracing::debug!(build = %id, "failed: {e}");
        }
        Ok((
            id,
            Outcome {
                state: end.0,
                error: end.1,
                summary,
                results,
            },
        ))
    }
}

/// Attaches the embedded worker to the coordinator in this process through channels
/// (the only place where the worker's agent and the coordinator's farm meet).
pub(crate) struct LocalDialer(pub Farm);

impl Dialer for LocalDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Connection, agent::DialError>> + Send + '_>,
    > {
        Box::pin(async move {
            let link = self.0.connect_worker().ok_or_else(|| {
                agent::DialError::Unreachable("the embedded coordinator has stopped".into())
            })?;
            Ok(Connection {
                tx: link.tx,
                rx: Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(
                    link.rx,
                )),
            })
        })
    }

    fn describe(&self) -> String {
        "the embedded coordinator".into()
    }
}

impl Embedded {
    /// Stop the embedded worker while the runtime still runs (so it stops cleanly).
    pub(crate) async fn stop(mut self) {
        self.worker.abort();
        let _ = (&mut self.worker).await;
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

//! The `Farm` gRPC service (the client API) over a [`Farm`]. It translates; the farm
//! decides.
//!
//! When clients authenticate (`--client-tokens`), a build belongs to the client that
//! submitted it: `status`, `watch`, `logs` and `cancel` of another's build answer
//! NOT_FOUND, and `list` shows the caller's own builds. Without client tokens every
//! caller sees every build.

use std::collections::HashMap;
use std::pin::Pin;

use farm_proto::farm_server::{Farm as FarmApi, FarmServer};
use farm_proto::v1::{
    self as proto, BuildEvent, CancelRequest, CancelResponse, ListRequest, ListResponse, LogLine,
    LogsRequest, StatusRequest, SubmitRequest, SubmitResponse, WatchRequest, WorkerInfo,
    WorkersRequest, WorkersResponse, build_event,
};
use farm_stackerfile::Substitutions;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Principal, principal};
use crate::farm::{ContextFile, EventKind, Farm, FarmError, Origin, StoredEvent, Submission};
use farm_image::{LayerFormat, LayerType};
use farm_model::{Compression, UnknownCompression};

/// The client API over one farm.
#[derive(Clone)]
pub struct FarmService {
    farm: Farm,
    insecure: bool,
}

impl FarmService {
    pub fn new(farm: Farm) -> Self {
        FarmService {
            farm,
            insecure: false,
        }
    }

    /// Say in `Workers` answers that the coordinator serves a non-loopback address
    /// without TLS and tokens (`--insecure`).
    pub fn insecure(mut self, insecure: bool) -> Self {
        self.insecure = insecure;
        self
    }

    /// Whether `caller` may see build `id`: always without authentication, else only
    /// its own builds (another's is NOT_FOUND, as if it did not exist).
    async fn visible(&self, caller: &Option<Principal>, id: &str) -> Result<(), Status> {
        let Some(caller) = caller else {
            return Ok(());
        };
        let owner = self
            .farm
            .state()
            .build_owner(id)
            .await
            .map_err(|e| status_of(e.into()))?;
        if owner.as_deref() == Some(caller.name.as_str()) {
            Ok(())
        } else {
            Err(Status::not_found(format!("no build {id}")))
        }
    }

    pub fn farm_server(self) -> FarmServer<Self> {
        FarmServer::new(self)
    }
}

fn status_of(e: FarmError) -> Status {
    super::bounded(match e {
        FarmError::Plan(m) => Status::invalid_argument(m),
        FarmError::Invalid(m) => Status::invalid_argument(m),
        FarmError::NotFound(id) => Status::not_found(format!("no build {id}")),
        e => Status::internal(e.to_string()),
    })
}

/// The wire events of one stored event: one, or one per line of a chunk of output.
/// A chunk's lines but its last carry seq 0 (a watcher resumes after whole chunks: one
/// cut in the middle is sent again from its start).
fn events(seq: u64, e: StoredEvent) -> Vec<BuildEvent> {
    let StoredEvent { layer, kind, .. } = &e;
    let EventKind::Output(chunk) = kind else {
        return vec![event(seq, e)];
    };
    let n = chunk.text.len();
    chunk
        .text
        .iter()
        .enumerate()
        .map(|(i, line)| BuildEvent {
            seq: if i + 1 == n { seq } else { 0 },
            layer: layer.clone(),
            kind: Some(build_event::Kind::Log(line.clone())),
            ..Default::default()
        })
        .collect()
}

/// The log lines of one stored event (none for other events).
fn log_lines(e: StoredEvent) -> Vec<LogLine> {
    match e.kind {
        EventKind::Log(line) => vec![LogLine {
            layer: e.layer,
            line,
        }],
        EventKind::Output(chunk) => chunk
            .text
            .into_iter()
            .map(|line| LogLine {
                layer: e.layer.clone(),
                line,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn event(seq: u64, e: StoredEvent) -> BuildEvent {
    let kind = match e.kind {
        EventKind::Layer(s) => build_event::Kind::State(i32::from(s)),
        EventKind::Log(l) => build_event::Kind::Log(l),
        EventKind::Build(s) => build_event::Kind::Build(i32::from(s)),
        // Split by `events`.
        EventKind::Output(_) => build_event::Kind::Log(String::new()),
    };
    BuildEvent {
        seq,
        layer: e.layer,
        kind: Some(kind),
        worker: e.worker.unwrap_or_default(),
        error: e.error.unwrap_or_default(),
        duration_ms: e.duration_ms.unwrap_or_default(),
        failure: e.failure.as_ref().map(proto::LayerFailure::from),
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl FarmService {
    /// `Submit` after its span is set up.
    async fn submit_request(
        &self,
        r: SubmitRequest,
        caller: Option<Principal>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let mut substitutions = Substitutions::default();
        for s in &r.substitutions {
            substitutions.cli.push(
                Substitutions::parse_cli(s).map_err(|e| Status::invalid_argument(e.to_string()))?,
            );
        }
        let compression: Compression = if r.compression.is_empty() {
            Compression::default()
        } else {
            r.compression
                .parse()
                .map_err(|e: UnknownCompression| Status::invalid_argument(e.to_string()))?
        };
        let layer_type: LayerType = if r.layer_type.is_empty() {
            LayerType::Tar
        } else {
            r.layer_type
                .parse()
                .map_err(|e: farm_image::UnknownLayerType| {
                    Status::invalid_argument(e.to_string())
                })?
        };
        let layer_format = LayerFormat::new(layer_type, r.no_verity);
        let mut environment: Vec<(String, String)> = r.environment.into_iter().collect();
        environment.sort();
        let spec = Submission {
            stackerfiles: r.stackerfiles,
            context: r
                .context
                .into_iter()
                .map(|c| ContextFile {
                    path: c.path,
                    digest: c.digest,
                    mode: c.mode,
                    symlink_target: c.symlink_target,
                })
                .collect(),
            substitutions,
            environment,
            no_cache: r.no_cache,
            compression,
            layer_format,
            require_hash: r.require_hash,
            // The client's wish counts only where the coordinator's policy allows it
            // (`RemotePolicy::outside_context`): the submission is remote.
            allow_outside_context: r.allow_outside_context,
            origin: Origin::Remote,
            inline: r.stackerfile_texts.into_iter().collect(),
            priority: r.priority,
        };
        if spec.context.is_empty() && spec.inline.is_empty() {
            return Err(Status::invalid_argument(
                "a remote submission needs its build context (the stackerfiles at least)",
            ));
        }
        let owner = caller.as_ref().map(|p| p.name.as_str());
        let (id, layers) = self.farm.submit_as(spec, owner).await.map_err(status_of)?;
        let trace_id = self.farm.trace_id(&id).unwrap_or_default();
        Ok(Response::new(SubmitResponse {
            id,
            layers,
            trace_id,
        }))
    }
}

#[tonic::async_trait]
impl FarmApi for FarmService {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = principal(&request);
        // The build's span is a child of the client's (W3C `traceparent`).
        let span = tracing::info_span!(
            target: "farm_trace",
            "Submit",
            rpc.service = "farm.v1.Farm",
            otel.kind = "server",
            otel.status_description = tracing::field::Empty,
        );
        farm_telemetry::set_parent(&span, &farm_telemetry::extract_metadata(request.metadata()));
        let r = request.into_inner();
        let result =
            tracing::Instrument::instrument(self.submit_request(r, caller), span.clone()).await;
        if let Err(status) = &result {
            farm_telemetry::record_error(&span, status.message());
        }
        result.map_err(super::bounded)
    }

    type WatchStream = Boxed<BuildEvent>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = principal(&request);
        let r = request.into_inner();
        self.visible(&caller, &r.id).await?;
        let rx = self
            .farm
            .watch(&r.id, r.after_seq)
            .await
            .map_err(status_of)?;
        let stream = ReceiverStream::new(rx)
            .flat_map(|(seq, e)| futures::stream::iter(events(seq, e).into_iter().map(Ok)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<proto::BuildStatus>, Status> {
        let caller = principal(&request);
        let id = request.into_inner().id;
        self.visible(&caller, &id).await?;
        status(&self.farm, &id).await.map(Response::new)
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let state = self.farm.state();
        let caller = principal(&request);
        let owner = caller.as_ref().map(|p| p.name.as_str());
        let counts_only = request.get_ref().layer_counts_only;
        let rows = match owner {
            Some(owner) => state.list_builds_of(owner).await,
            None => state.list_builds().await,
        }
        .map_err(|e| status_of(e.into()))?;
        // Every build's layers (or their counts) and origin in two queries, not three
        // per build.
        let (mut layers, mut counts) = if counts_only {
            let counts = state.layer_counts_of_all(owner).await;
            (HashMap::new(), counts.map_err(|e| status_of(e.into()))?)
        } else {
            let layers = state.layer_statuses_of_all(owner).await;
            (layers.map_err(|e| status_of(e.into()))?, HashMap::new())
        };
        let mut origins = state
            .webhook_origins()
            .await
            .map_err(|e| status_of(e.into()))?;
        let builds = rows
            .into_iter()
            .map(|build| {
                let layers = layers.remove(&build.id).unwrap_or_default();
                let counts = counts.remove(&build.id).unwrap_or_default();
                let webhook = origins.remove(&build.id);
                let trace_id = self.farm.trace_id(&build.id).unwrap_or_default();
                let mut status = build_status(build, layers, webhook.as_ref(), trace_id);
                status.layer_counts = counts
                    .into_iter()
                    .map(|(state, count)| proto::LayerCount {
                        state: i32::from(state),
                        count,
                    })
                    .collect();
                status
            })
            .collect();
        Ok(Response::new(ListResponse { builds }))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let caller = principal(&request);
        let id = request.into_inner().id;
        self.visible(&caller, &id).await?;
        let state = self.farm.cancel(&id).await.map_err(status_of)?;
        Ok(Response::new(CancelResponse {
            state: i32::from(state),
        }))
    }

    type LogsStream = Boxed<LogLine>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let caller = principal(&request);
        let r = request.into_inner();
        self.visible(&caller, &r.id).await?;
        let layer = r.layer;
        let keep = move |e: &StoredEvent| layer.is_empty() || e.layer == layer;
        // Chunk by chunk from the build's log file, through a short queue: a reader
        // costs a few chunks of memory however long the log is.
        let rx = if r.follow {
            self.farm.watch(&r.id, 0).await
        } else {
            self.farm.stored_events(&r.id, 0).await
        }
        .map_err(status_of)?;
        let stream = ReceiverStream::new(rx)
            .filter(move |(_, e)| std::future::ready(keep(e)))
            .flat_map(|(_, e)| futures::stream::iter(log_lines(e).into_iter().map(Ok)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn workers(
        &self,
        _: Request<WorkersRequest>,
    ) -> Result<Response<WorkersResponse>, Status> {
        let workers = self.farm.workers().await.map_err(status_of)?;
        // Which delivery started each running layer's build (looked up once a build).
        let mut origins: HashMap<String, Option<proto::WebhookOrigin>> = HashMap::new();
        let mut out = Vec::with_capacity(workers.len());
        for w in workers {
            let mut running_layers = Vec::with_capacity(w.running.len());
            for r in &w.running {
                let (build, layer) = r.split_once('/').unwrap_or((r.as_str(), ""));
                let webhook = match origins.get(build) {
                    Some(o) => o.clone(),
                    None => {
                        let o = webhook_origin(&self.farm, build).await?;
                        origins.insert(build.to_string(), o.clone());
                        o
                    }
                };
                running_layers.push(proto::RunningLayer {
                    build: build.to_string(),
                    layer: layer.to_string(),
                    webhook,
                });
            }
            out.push(WorkerInfo {
                name: w.name,
                slots: w.slots,
                running: w.running,
                last_seen_unix_ms: w.last_seen_ms,
                platform: w.platform,
                unavailable: w.unavailable.unwrap_or_default(),
                connected: w.connected,
                running_layers,
            });
        }
        Ok(Response::new(WorkersResponse {
            workers: out,
            insecure: self.insecure,
        }))
    }
}

async fn status(farm: &Farm, id: &str) -> Result<proto::BuildStatus, Status> {
    let state = farm.state();
    let Some(build) = state.build(id).await.map_err(|e| status_of(e.into()))? else {
        return Err(Status::not_found(format!("no build {id}")));
    };
    let layers = state
        .layer_statuses(id)
        .await
        .map_err(|e| status_of(e.into()))?;
    let webhook = state
        .webhook_origin(id)
        .await
        .map_err(|e| status_of(e.into()))?;
    let trace_id = farm.trace_id(id).unwrap_or_default();
    Ok(build_status(build, layers, webhook.as_ref(), trace_id))
}

/// A build's status as the client API answers it.
fn build_status(
    build: crate::state::BuildRow,
    layers: Vec<crate::state::LayerRow>,
    webhook: Option<&crate::state::WebhookOrigin>,
    trace_id: String,
) -> proto::BuildStatus {
    proto::BuildStatus {
        webhook: webhook.map(origin),
        trace_id,
        id: build.id,
        state: i32::from(build.state),
        error: build.error.unwrap_or_default(),
        created_unix_ms: build.created_ms,
        layer_counts: Vec::new(),
        layers: layers
            .into_iter()
            .map(|l| proto::LayerStatus {
                tagged: l.manifest_digest.is_some(),
                name: l.name,
                state: i32::from(l.state),
                worker: l.worker.unwrap_or_default(),
                cached: l.cached,
                duration_ms: l.duration_ms.unwrap_or_default(),
                manifest_digest: l.manifest_digest.unwrap_or_default(),
                error: l.error.unwrap_or_default(),
            })
            .collect(),
    }
}

fn origin(o: &crate::state::WebhookOrigin) -> proto::WebhookOrigin {
    let (provider, repo) = o.provider_and_repo();
    proto::WebhookOrigin {
        provider: provider.to_string(),
        repo: repo.to_string(),
        git_ref: o.git_ref.clone(),
        sha: o.sha.clone(),
        delivery: o.delivery.clone(),
        build: o.build.clone(),
    }
}

/// The webhook delivery that started build `id`, if one did.
async fn webhook_origin(farm: &Farm, id: &str) -> Result<Option<proto::WebhookOrigin>, Status> {
    Ok(farm
        .state()
        .webhook_origin(id)
        .await
        .map_err(|e| status_of(e.into()))?
        .as_ref()
        .map(origin))
}

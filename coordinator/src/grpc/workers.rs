//! The `Workers` gRPC service: one stream per worker, translated to the scheduler's
//! typed calls (`Farm::register_worker` and the `WorkerSession` it opens). The embedded
//! worker ([`Farm::connect_worker`]) speaks the same messages over channels, served by
//! the same handler.

use std::collections::HashSet;
use std::pin::Pin;

use farm_model::{
    ChainId, InvalidPlatform, LayerFailure, LayerOutcome, PROTOCOL, Platform, ProtocolVersion,
};
use farm_proto::v1::{
    self as proto, Assignment, CoordinatorMessage, Refused, Registered, ResultAck, WorkerMessage,
    coordinator_message, worker_message,
};
use farm_proto::workers_server::{Workers, WorkersServer};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::farm::{
    Farm, RegisterError, ToWorker, WorkerGone, WorkerInfo, WorkerOutbox, WorkerSession,
};
use crate::state::AssignmentId;

/// The worker's end of a connection: send [`WorkerMessage`]s, receive
/// [`CoordinatorMessage`]s. Dropping `tx` disconnects.
pub struct WorkerLink {
    pub tx: mpsc::UnboundedSender<WorkerMessage>,
    pub rx: mpsc::UnboundedReceiver<CoordinatorMessage>,
}

/// Messages from one worker read ahead of the one being handled. A worker's stream is
/// read no faster than its messages are handled (its log lines stored): past this, the
/// worker's sends wait (HTTP/2 flow control), and the coordinator's memory stays put.
const INBOUND_BUFFER: usize = 4;

/// The largest message a worker may send (a registration with the most chains kept is
/// about 7 MiB; log batches are about 1 MiB): with [`INBOUND_BUFFER`], what one worker
/// can make the coordinator hold.
pub(crate) const MAX_WORKER_MESSAGE: usize = 16 << 20;

/// Messages to one worker waiting to be sent; a worker that lets more pile up (it does
/// not read its stream) is disconnected.
const OUTBOUND_BUFFER: usize = 1024;

/// How often a stream of log batches renews its worker's leases (see `serve`).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The most chains one registration or heartbeat may report; more are ignored (and
/// logged): a pool that large is better known from results.
pub(crate) const MAX_REPORTED_CHAINS: usize = 100_000;

/// A new connection to `farm`, served by a task on the current Tokio runtime (`None`
/// outside one). `credential`: the worker name its token proves, if workers
/// authenticate. (The in-process worker's sender is unbounded, as its builds are this
/// process's; a bounded queue sits between it and the handler all the same.)
pub(crate) fn link(farm: &Farm, credential: Option<String>) -> Option<WorkerLink> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (wtx, mut wrx) = mpsc::unbounded_channel::<WorkerMessage>();
    let (btx, brx) = mpsc::channel(INBOUND_BUFFER);
    let (ctx, mut crx) = mpsc::channel(OUTBOUND_BUFFER);
    let (utx, urx) = mpsc::unbounded_channel();
    runtime.spawn(async move {
        while let Some(msg) = wrx.recv().await {
            if btx.send(msg).await.is_err() {
                break;
            }
        }
    });
    runtime.spawn(async move {
        while let Some(msg) = crx.recv().await {
            if utx.send(msg).is_err() {
                break;
            }
        }
    });
    runtime.spawn(serve(farm.clone(), brx, ctx, credential));
    Some(WorkerLink { tx: wtx, rx: urx })
}

/// The `Workers` service over a farm.
#[derive(Clone)]
pub struct WorkerService {
    farm: Farm,
    /// Becomes true when the coordinator stops: every worker's stream then ends.
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

impl WorkerService {
    pub fn new(farm: Farm) -> Self {
        WorkerService {
            farm,
            stopping: None,
        }
    }

    /// End every worker's stream with `UNAVAILABLE` once `stopping` becomes true (the
    /// worker dials again; its builds go on meanwhile).
    pub fn until(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    pub fn into_server(self) -> WorkersServer<Self> {
        WorkersServer::new(self)
            .max_decoding_message_size(MAX_WORKER_MESSAGE)
            .max_encoding_message_size(farm_proto::MAX_MESSAGE_SIZE)
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Workers for WorkerService {
    type ConnectStream = Boxed<CoordinatorMessage>;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let credential = crate::auth::principal(&request).map(|p| p.name);
        let mut inbound = request.into_inner();
        // Bounded: a worker that sends faster than its messages are handled waits.
        let (tx, rx) = mpsc::channel(INBOUND_BUFFER);
        let (ctx, crx) = mpsc::channel(OUTBOUND_BUFFER);
        tokio::spawn(serve(self.farm.clone(), rx, ctx, credential));
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            // Dropping `tx` tells the farm the worker is gone.
        });
        let outbound = ReceiverStream::new(crx).map(Ok);
        let Some(mut stopping) = self.stopping.clone() else {
            return Ok(Response::new(Box::pin(outbound)));
        };
        let at_end = stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        // Only a stream cut by the stop says so (a refusal ends it by itself).
        let goodbye = futures::stream::once(async move { *at_end.borrow() }).filter_map(
            |stopped| async move {
                stopped.then(|| {
                    Err(Status::unavailable(
                        "the coordinator is stopping: dial again (running builds go on)",
                    ))
                })
            },
        );
        Ok(Response::new(Box::pin(
            outbound.take_until(stopped).chain(goodbye),
        )))
    }
}

/// The scheduler's messages to one worker's stream, [`OUTBOUND_BUFFER`] at most
/// waiting: a worker that does not read them (while it sends results to acknowledge)
/// is disconnected (`overflow`), and dials again.
struct Outbox {
    tx: mpsc::Sender<CoordinatorMessage>,
    /// Told with each assignment (`--max-layer-log`).
    max_layer_log: u64,
    /// Notified when a message found the queue full.
    overflow: std::sync::Arc<tokio::sync::Notify>,
}

impl WorkerOutbox for Outbox {
    fn send(&self, message: ToWorker) -> Result<(), WorkerGone> {
        let kind = match message {
            ToWorker::Registered { heartbeat } => {
                coordinator_message::Kind::Registered(Registered {
                    heartbeat_ms: heartbeat.as_millis() as u64,
                })
            }
            ToWorker::Assign {
                id,
                job_json,
                lease,
                trace,
            } => coordinator_message::Kind::Assign(Assignment {
                id: id.to_string(),
                job_json,
                lease_ms: lease.as_millis() as u64,
                max_layer_log: self.max_layer_log,
                trace_context: trace,
            }),
            ToWorker::Cancel(id) => coordinator_message::Kind::Cancel(id.to_string()),
        };
        match self.tx.try_send(CoordinatorMessage { kind: Some(kind) }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.notify_one();
                Err(WorkerGone)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(WorkerGone),
        }
    }
}

/// One worker's connection, from its registration until it goes away.
async fn serve(
    farm: Farm,
    mut rx: mpsc::Receiver<WorkerMessage>,
    tx: mpsc::Sender<CoordinatorMessage>,
    credential: Option<String>,
) {
    let registration = match rx.recv().await {
        Some(WorkerMessage {
            kind: Some(worker_message::Kind::Register(r)),
        }) => r,
        _ => {
            tracing::warn!("a worker connected without registering first");
            return;
        }
    };
    let name = registration.name.clone();
    let refuse = |reason: String, retry: bool| {
        tracing::warn!(worker = %name, "refused: {reason}");
        let _ = tx.try_send(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Refused(Refused {
                reason,
                retry,
            })),
        });
    };
    if let Some(credential) = &credential
        && *credential != name
    {
        farm.metrics()
            .auth_failed(crate::auth::AuthFailure::WorkerName);
        refuse(
            format!(
                "this worker registers as '{name}', but its token is worker '{credential}''s: \
                 start it with --name {credential}, or give it the token listed for '{name}' in \
                 the coordinator's --worker-tokens file"
            ),
            false,
        );
        return;
    }
    let mut info = match worker_info(registration) {
        Ok(info) => info,
        Err(refusal) => {
            refuse(refusal.to_string(), false);
            return;
        }
    };
    info.name_proven = credential.is_some();
    let overflow = std::sync::Arc::new(tokio::sync::Notify::new());
    let outbox = Outbox {
        tx: tx.clone(),
        max_layer_log: farm.max_layer_log(),
        overflow: overflow.clone(),
    };
    let session = match farm.register_worker(info, Box::new(outbox)).await {
        Ok(session) => session,
        Err(e @ RegisterError::NameInUse(_)) => {
            refuse(e.to_string(), true);
            return;
        }
        Err(e) => {
            tracing::error!(worker = %name, "{e}; dropping the connection (the worker dials again)");
            return;
        }
    };
    // When this worker's leases were last renewed by a message other than a heartbeat.
    let mut renewed = std::time::Instant::now();
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => msg,
                None => break,
            },
            () = overflow.notified() => {
                tracing::warn!(
                    worker = %name,
                    "the worker does not read its stream ({OUTBOUND_BUFFER} messages wait): \
                     dropping its connection (it dials again)"
                );
                break;
            }
        };
        match msg.kind {
            Some(worker_message::Kind::Heartbeat(hb)) => {
                let live: Vec<AssignmentId> = hb
                    .live
                    .iter()
                    .filter_map(|a| assignment_id(&name, a))
                    .collect();
                session.progress(&live);
                session.heartbeat(parse_chains(&name, &hb.chains));
            }
            Some(worker_message::Kind::Logs(batch)) => {
                if let Some(id) = assignment_id(&name, &batch.assignment) {
                    session.logs(id, batch.lines).await;
                }
                // A worker whose output is read no faster than it is stored has its
                // heartbeats queued behind that output: its messages are its heartbeat
                // meanwhile (at most once a second), or its leases would run out.
                if renewed.elapsed() >= RENEW_EVERY {
                    renewed = std::time::Instant::now();
                    session.heartbeat(HashSet::new());
                }
            }
            Some(worker_message::Kind::Result(result)) => {
                // Acknowledged even when it is dropped (an assignment this worker does
                // not hold) or refused: an honest worker resends an unacknowledged
                // result until it is, and resending it would not change the answer.
                let ack = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Ack(ResultAck {
                        assignment: result.assignment.clone(),
                    })),
                };
                if tx.try_send(ack).is_err() {
                    tracing::warn!(
                        worker = %name,
                        "the worker does not read its stream ({OUTBOUND_BUFFER} messages wait): \
                         dropping its connection (it dials again)"
                    );
                    break;
                }
                on_result(&session, &name, result).await;
            }
            Some(worker_message::Kind::Drain(drain)) => {
                let ids = drain
                    .hand_back
                    .iter()
                    .filter_map(|a| assignment_id(&name, a))
                    .collect();
                session.drain(ids).await;
            }
            Some(worker_message::Kind::Register(_)) | None => {}
        }
    }
    session.disconnect();
}

async fn on_result(session: &WorkerSession, worker: &str, result: proto::Result) {
    let Some(id) = assignment_id(worker, &result.assignment) else {
        return;
    };
    let outcome: LayerOutcome = match &result.failure {
        Some(failure) => Err(LayerFailure::from(failure)),
        None => serde_json::from_str(&result.layer_json).map_err(|e| {
            LayerFailure::internal(format!("worker {worker} sent an unreadable result: {e}"))
        }),
    };
    // `result.cache_key` is kept in the protocol for compatibility and ignored: the
    // coordinator caches a layer under the key it computed for the job, never under one
    // a worker names.
    session.result(id, outcome).await;
}

/// Why a worker is refused. It is told, and stops: it would be refused again whenever
/// it dials.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(
        "worker {worker} speaks farm worker protocol {theirs}, this coordinator speaks \
         {PROTOCOL}: run the same farm release on both"
    )]
    Protocol {
        worker: String,
        theirs: ProtocolVersion,
    },
    #[error("worker {worker}: {source}")]
    Platform {
        worker: String,
        source: InvalidPlatform,
    },
}

/// A registration as the scheduler takes it, if this coordinator can work with it.
fn worker_info(registration: proto::Register) -> Result<WorkerInfo, Refusal> {
    let name = registration.name;
    let theirs = ProtocolVersion {
        major: registration.protocol_major,
        minor: registration.protocol_minor,
    };
    if !PROTOCOL.compatible(&theirs) {
        return Err(Refusal::Protocol {
            worker: name,
            theirs,
        });
    }
    let platform: Platform = match registration.platform.parse() {
        Ok(p) => p,
        Err(source) => {
            return Err(Refusal::Platform {
                worker: name,
                source,
            });
        }
    };
    Ok(WorkerInfo {
        chains: parse_chains(&name, &registration.chains),
        running: registration
            .running
            .iter()
            .filter_map(|a| assignment_id(&name, a))
            .collect(),
        slots: registration.slots,
        platform,
        shares_files: registration.shares_files,
        unavailable: Some(registration.unavailable).filter(|u| !u.is_empty()),
        name,
        name_proven: false,
        reports_progress: theirs.reports_live(),
    })
}

/// An assignment id a worker sent; one that is not ignored (and logged).
fn assignment_id(worker: &str, id: &str) -> Option<AssignmentId> {
    match id.parse() {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(%worker, "ignoring a message about an unknown assignment: {e}");
            None
        }
    }
}

/// The chains a worker reports; ones that are not ChainIDs are ignored (and logged),
/// and so is every one past [`MAX_REPORTED_CHAINS`].
fn parse_chains(worker: &str, chains: &[String]) -> HashSet<ChainId> {
    if chains.len() > MAX_REPORTED_CHAINS {
        tracing::warn!(
            %worker,
            reported = chains.len(),
            kept = MAX_REPORTED_CHAINS,
            "the worker reports more chains than the coordinator keeps from one message; \
             the rest are ignored (the coordinator learns chains from results too)"
        );
    }
    chains
        .iter()
        .take(MAX_REPORTED_CHAINS)
        .filter_map(|c| match ChainId::parse(c) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(%worker, "ignoring a reported chain: {e}");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_of_more_chains_than_the_cap_keeps_the_cap() {
        let chains: Vec<String> = (0..MAX_REPORTED_CHAINS + 5)
            .map(|i| format!("sha256:{i:064x}"))
            .collect();
        assert_eq!(parse_chains("w", &chains).len(), MAX_REPORTED_CHAINS);
        assert_eq!(parse_chains("w", &chains[..3]).len(), 3);
    }
}

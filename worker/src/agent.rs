//! The worker's side of the farm: dial the coordinator, register (name, slots, platform,
//! the chains the pool holds), then build what is assigned with the engine, streaming
//! log lines and sending results, with heartbeats in between.
//!
//! The connection may drop at any time (a coordinator restart, the network): builds
//! keep running, their results are kept until the coordinator acknowledges them, and
//! the worker dials again with backoff, telling the new connection what it still runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farm_model::{Event, EventSender, Job, LayerFailure, PROTOCOL, Platform};
use farm_proto::v1::{
    self as pb, CoordinatorMessage, Heartbeat, LogBatch, Register, Result as ResultMsg,
    WorkerMessage, coordinator_message, worker_message,
};
use tokio::sync::mpsc;

use crate::cancel::CancelToken;
use crate::engine::Engine;

/// One connection: messages to the coordinator, messages from it.
pub struct Connection {
    pub tx: mpsc::UnboundedSender<WorkerMessage>,
    pub rx: Pin<Box<dyn futures::Stream<Item = CoordinatorMessage> + Send>>,
}

/// Why a dial failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    /// The coordinator could not be reached (dial again later).
    Unreachable(String),
    /// The coordinator refused this worker's credential (dialling again would not
    /// help: the worker stops).
    Refused(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Unreachable(m) | DialError::Refused(m) => f.write_str(m),
        }
    }
}

impl From<String> for DialError {
    fn from(m: String) -> Self {
        DialError::Unreachable(m)
    }
}

/// Opens connections to the coordinator (gRPC for remote workers, channels for the
/// embedded one).
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self) -> Pin<Box<dyn Future<Output = Result<Connection, DialError>> + Send + '_>>;
    /// Where it dials (for messages).
    fn describe(&self) -> String;
}

/// Who this worker is.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub slots: u32,
    pub platform: Platform,
    /// Why this worker cannot build (its pool is unusable): it registers without slots.
    pub unavailable: Option<String>,
    /// The worker reads the coordinator's files directly (embedded mode).
    pub shares_files: bool,
    /// Give up when the coordinator cannot be reached for this long (None: never).
    pub give_up_after: Option<Duration>,
    /// The most output of one layer sent to the coordinator, in bytes (lines with
    /// their newline; `--max-layer-log`); the coordinator's cap, when lower, wins. The
    /// rest is dropped, with one marker line saying how much.
    pub max_layer_log: u64,
}

struct Shared {
    /// The current connection's sender (None while disconnected).
    tx: Mutex<Option<mpsc::UnboundedSender<WorkerMessage>>>,
}

impl Shared {
    fn send(&self, msg: WorkerMessage) -> bool {
        match &*self.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(msg).is_ok(),
            None => false,
        }
    }
}

/// What a running agent shows its process (the worker's probes and metrics).
#[derive(Debug, Default)]
pub struct AgentStatus {
    registered: AtomicBool,
    draining: AtomicBool,
    running: AtomicUsize,
}

impl AgentStatus {
    /// The coordinator accepted the registration and the stream is up.
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }
    /// A stop began: no new work is taken.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
    /// Assignments being built.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
}

/// How a running agent is observed and stopped.
#[derive(Debug, Default)]
pub struct Control {
    pub status: Arc<AgentStatus>,
    /// When this becomes true the worker drains: it takes no new work, lets what runs
    /// finish for at most the duration, then hands the rest back and returns.
    pub drain: Option<(tokio::sync::watch::Receiver<bool>, Duration)>,
}

/// How long a drained worker waits for the coordinator to acknowledge its last
/// results and hand-backs before it returns.
const DRAIN_FLUSH: Duration = Duration::from_secs(2);

/// Run the worker until the dialer gives up (or forever).
pub async fn run(
    engine: Option<Arc<Engine>>,
    config: AgentConfig,
    dialer: impl Dialer,
) -> Result<(), String> {
    run_with(engine, config, dialer, Control::default()).await
}

/// Waits until `rx` holds true (forever without one).
async fn drain_requested(rx: &mut Option<(tokio::sync::watch::Receiver<bool>, Duration)>) {
    match rx {
        Some((rx, _)) => {
            if rx.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn drain_message(hand_back: Vec<String>) -> WorkerMessage {
    WorkerMessage {
        kind: Some(worker_message::Kind::Drain(pb::Drain { hand_back })),
    }
}

/// [`run`], observed through `control.status` and drained through `control.drain`
/// (then it returns `Ok` once nothing runs).
pub async fn run_with(
    engine: Option<Arc<Engine>>,
    config: AgentConfig,
    dialer: impl Dialer,
    control: Control,
) -> Result<(), String> {
    let Control { status, drain } = control;
    let mut drain = drain;
    let drain_timeout = drain.as_ref().map(|(_, t)| *t).unwrap_or_default();
    // Set when a drain began: running layers must end by then.
    let mut deadline: Option<tokio::time::Instant> = None;
    // Set once layers were handed back (or all finished): results are flushed until then.
    let mut flush_until: Option<tokio::time::Instant> = None;
    let mut handed_back: HashSet<String> = HashSet::new();
    let shared = Arc::new(Shared {
        tx: Mutex::new(None),
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<ResultMsg>();
    let mut running: HashMap<String, CancelToken> = HashMap::new();
    // Results not yet acknowledged, resent after a reconnect.
    let mut unacked: BTreeMap<String, ResultMsg> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = None;
    loop {
        // Give the runtime a turn on every round: a task that is being aborted (the
        // process is ending) is only stopped at a point where it waits, and while the
        // runtime shuts down its channels close and its timers fire at once.
        tokio::task::yield_now().await;
        status.running.store(running.len(), Ordering::Relaxed);
        if deadline.is_none()
            && let Some((rx, timeout)) = &drain
            && *rx.borrow()
        {
            // Asked to drain while away from the coordinator.
            status.draining.store(true, Ordering::Relaxed);
            deadline = Some(tokio::time::Instant::now() + *timeout);
        }
        if deadline.is_some() && running.is_empty() {
            // Drained (the coordinator is away: unacknowledged results are lost with the
            // worker, and their layers move when the leases run out).
            return Ok(());
        }
        if let Some(d) = deadline
            && tokio::time::Instant::now() >= d
        {
            for token in running.values() {
                token.cancel();
            }
            return Ok(());
        }
        let conn = match dialer.dial().await {
            Ok(c) => c,
            Err(DialError::Refused(why)) => {
                return Err(format!(
                    "the coordinator at {} refused this worker's credential: {why}",
                    dialer.describe()
                ));
            }
            Err(e) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if let Some(limit) = config.give_up_after
                    && since.elapsed() > limit
                {
                    return Err(format!(
                        "cannot reach the coordinator at {}: {e}",
                        dialer.describe()
                    ));
                }
                tracing::warn!(
                    "coordinator {} unreachable ({e}); retrying in {backoff:?}",
                    dialer.describe()
                );
                // Results of finished builds still arrive meanwhile.
                drain_done(&mut done_rx, &mut running, &mut unacked);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        down_since = None;
        let connected_at = Instant::now();
        let Connection { tx, mut rx } = conn;
        // The pool is listed once per connection; later chains the coordinator learns
        // from results (a listing per heartbeat read every chain's metadata).
        let chains = engine.as_ref().map(|e| chain_ids(e)).unwrap_or_default();
        let register = WorkerMessage {
            kind: Some(worker_message::Kind::Register(Register {
                name: config.name.clone(),
                slots: if config.unavailable.is_some() {
                    0
                } else {
                    config.slots
                },
                platform: config.platform.to_string(),
                chains,
                unavailable: config.unavailable.clone().unwrap_or_default(),
                running: running.keys().cloned().collect(),
                shares_files: config.shares_files,
                protocol_major: PROTOCOL.major,
                protocol_minor: PROTOCOL.minor,
            })),
        };
        if tx.send(register).is_err() {
            continue;
        }
        for r in unacked.values() {
            let _ = tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Result(r.clone())),
            });
        }
        *shared.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        if deadline.is_some() {
            // Still draining after a reconnect: say so again.
            let _ = tx.send(drain_message(Vec::new()));
        }
        tracing::info!(coordinator = %dialer.describe(), "connected");
        let mut heartbeat = tokio::time::interval(Duration::from_secs(3));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = futures_util_next(&mut rx) => {
                    let Some(msg) = msg else { break };
                    match msg.kind {
                        Some(coordinator_message::Kind::Registered(r)) => {
                            status.registered.store(true, Ordering::Relaxed);
                            let every = Duration::from_millis(r.heartbeat_ms.max(50));
                            heartbeat = tokio::time::interval(every);
                            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        Some(coordinator_message::Kind::Assign(a)) => {
                            let Some(engine) = engine.clone() else {
                                let why = config.unavailable.clone().unwrap_or_else(|| "this worker cannot build".into());
                                let _ = done_tx.send(failed(a.id, &LayerFailure::internal(why), 0));
                                continue;
                            };
                            if running.contains_key(&a.id) {
                                continue;
                            }
                            if deadline.is_some() {
                                // Sent before the coordinator saw the drain: given back.
                                let _ = tx.send(drain_message(vec![a.id]));
                                continue;
                            }
                            let token = engine.job_cancel_token();
                            running.insert(a.id.clone(), token.clone());
                            status.running.store(running.len(), Ordering::Relaxed);
                            let cap = LogCap::new(config.max_layer_log, a.max_layer_log);
                            let span = assignment_span(&a);
                            tokio::spawn(tracing::Instrument::instrument(
                                build(engine, a.id, a.job_json, token, cap, shared.clone(), done_tx.clone()),
                                span,
                            ));
                        }
                        Some(coordinator_message::Kind::Cancel(id)) => {
                            if let Some(token) = running.get(&id) {
                                tracing::info!(assignment = %id, "cancelled by the coordinator");
                                token.cancel();
                            }
                        }
                        Some(coordinator_message::Kind::Ack(ack)) => {
                            unacked.remove(&ack.assignment);
                            if deadline.is_some() && running.is_empty() && unacked.is_empty() {
                                tracing::info!("drained: every result is acknowledged");
                                return Ok(());
                            }
                        }
                        // A refusal that may pass (another live worker holds the name):
                        // dial again later.
                        Some(coordinator_message::Kind::Refused(r)) if r.retry => {
                            tracing::warn!(coordinator = %dialer.describe(), "refused for now: {}; dialling again", r.reason);
                            break;
                        }
                        // Dialling again would be refused again (another release of farm):
                        // stop, saying why.
                        Some(coordinator_message::Kind::Refused(r)) => {
                            *shared.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            return Err(format!("the coordinator at {} refused this worker: {}", dialer.describe(), r.reason));
                        }
                        None => {}
                    }
                }
                Some(result) = done_rx.recv() => {
                    running.remove(&result.assignment);
                    status.running.store(running.len(), Ordering::Relaxed);
                    if handed_back.contains(&result.assignment) {
                        continue;
                    }
                    unacked.insert(result.assignment.clone(), result.clone());
                    let _ = tx.send(WorkerMessage { kind: Some(worker_message::Kind::Result(result)) });
                    if deadline.is_some() && running.is_empty() {
                        flush_until.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_FLUSH);
                    }
                }
                () = drain_requested(&mut drain), if deadline.is_none() => {
                    tracing::info!(running = running.len(), timeout = ?drain_timeout, "draining: no new work; running layers get the drain timeout to finish");
                    status.draining.store(true, Ordering::Relaxed);
                    deadline = Some(tokio::time::Instant::now() + drain_timeout);
                    let _ = tx.send(drain_message(Vec::new()));
                    if running.is_empty() && unacked.is_empty() {
                        return Ok(());
                    }
                    if running.is_empty() {
                        flush_until = Some(tokio::time::Instant::now() + DRAIN_FLUSH);
                    }
                }
                () = sleep_until_opt(deadline), if flush_until.is_none() && !running.is_empty() => {
                    let ids: Vec<String> = running.keys().cloned().collect();
                    tracing::warn!(layers = ids.len(), "drain timeout: handing the running layers back to the coordinator");
                    for token in running.values() {
                        token.cancel();
                    }
                    handed_back.extend(ids.iter().cloned());
                    running.clear();
                    status.running.store(0, Ordering::Relaxed);
                    let _ = tx.send(drain_message(ids));
                    flush_until = Some(tokio::time::Instant::now() + DRAIN_FLUSH);
                }
                () = sleep_until_opt(flush_until) => {
                    if !unacked.is_empty() {
                        tracing::warn!(results = unacked.len(), "drained, but the coordinator did not acknowledge every result; their layers move when the leases run out");
                    }
                    return Ok(());
                }
                _ = heartbeat.tick() => {
                    let hb = WorkerMessage { kind: Some(worker_message::Kind::Heartbeat(Heartbeat {
                        running: running.keys().cloned().collect(),
                        chains: Vec::new(),
                        live: running.iter().filter(|(_, t)| t.is_busy()).map(|(id, _)| id.clone()).collect(),
                    }))};
                    if tx.send(hb).is_err() {
                        break;
                    }
                }
            }
        }
        *shared.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
        status.registered.store(false, Ordering::Relaxed);
        tracing::warn!(coordinator = %dialer.describe(), "disconnected; dialling again");
        down_since = Some(Instant::now());
        // A connection that ends at once (a coordinator that takes the call and drops
        // it) must not become a busy loop: back off unless it lasted a while.
        if connected_at.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        drain_done(&mut done_rx, &mut running, &mut unacked);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn drain_done(
    done_rx: &mut mpsc::UnboundedReceiver<ResultMsg>,
    running: &mut HashMap<String, CancelToken>,
    unacked: &mut BTreeMap<String, ResultMsg>,
) {
    while let Ok(result) = done_rx.try_recv() {
        running.remove(&result.assignment);
        unacked.insert(result.assignment.clone(), result);
    }
}

/// Sleeps until `at` (forever without one).
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn futures_util_next(
    rx: &mut Pin<Box<dyn futures::Stream<Item = CoordinatorMessage> + Send>>,
) -> Option<CoordinatorMessage> {
    use futures::StreamExt;
    rx.next().await
}

/// Dials the coordinator's gRPC `Workers.Connect`: `http://` or `https://` (with
/// `tls`), sending `token` as `authorization: Bearer`.
pub struct GrpcDialer {
    pub url: String,
    /// The worker's token (`--token-file` / `FARM_WORKER_TOKEN`).
    pub token: Option<String>,
    /// TLS settings for an `https://` URL (the CA, the worker's certificate).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Dialer for GrpcDialer {
    fn dial(&self) -> Pin<Box<dyn Future<Output = Result<Connection, DialError>> + Send + '_>> {
        Box::pin(async move {
            use futures::StreamExt;
            let mut endpoint = tonic::transport::Endpoint::from_shared(self.url.clone())
                .map_err(|e| {
                    DialError::Refused(format!("bad coordinator address {}: {e}", self.url))
                })?
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(10));
            if let Some(tls) = &self.tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| {
                    DialError::Refused(format!("TLS settings: {}", farm_model::error_chain(&e)))
                })?;
            }
            let authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
                match &self.token {
                    Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                        DialError::Refused(
                            "the worker token has characters a header cannot carry".into(),
                        )
                    })?),
                    None => None,
                };
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| farm_model::error_chain(&e))?;
            let mut client = farm_proto::workers_client::WorkersClient::with_interceptor(
                channel,
                move |mut request: tonic::Request<()>| {
                    if let Some(value) = &authorization {
                        request
                            .metadata_mut()
                            .insert("authorization", value.clone());
                    }
                    Ok(request)
                },
            )
            .max_decoding_message_size(farm_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(farm_proto::MAX_MESSAGE_SIZE);
            let (tx, rx) = mpsc::unbounded_channel();
            let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            let response = client.connect(outbound).await.map_err(|s| {
                let why = format!("{:?}: {}", s.code(), s.message());
                match s.code() {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        DialError::Refused(why)
                    }
                    _ => DialError::Unreachable(why),
                }
            })?;
            let inbound = response
                .into_inner()
                .take_while(|m| std::future::ready(m.is_ok()))
                .filter_map(|m| std::future::ready(m.ok()));
            Ok(Connection {
                tx,
                rx: Box::pin(inbound),
            })
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// The chains of the pool, oldest first (so the newly added ones are at the end).
fn chain_ids(engine: &Engine) -> Vec<String> {
    let mut list = engine.pool().list().unwrap_or_default();
    list.sort_by_key(|c| c.created);
    list.into_iter()
        .map(|c| c.id.as_str().to_string())
        .collect()
}

/// A batch of log lines is sent once it holds about this many bytes (or 500 lines).
const LOG_BATCH_BYTES: usize = 1 << 20;

/// What one layer's output may send: the worker's cap, or the coordinator's when lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogCap {
    bytes: u64,
    /// The coordinator's cap is the lower one (the marker names its flag).
    coordinator: bool,
}

impl LogCap {
    /// `told`: the coordinator's cap from the assignment (0: none told).
    fn new(own: u64, told: u64) -> Self {
        if told > 0 && told < own {
            LogCap {
                bytes: told,
                coordinator: true,
            }
        } else {
            LogCap {
                bytes: own,
                coordinator: false,
            }
        }
    }
}

/// Counts a layer's output against its cap: lines are sent until it is reached, then
/// counted and dropped; [`Capped::marker`] says what was dropped.
struct Capped {
    cap: LogCap,
    sent: u64,
    dropped_bytes: u64,
    dropped_lines: u64,
}

impl Capped {
    fn new(cap: LogCap) -> Self {
        Capped {
            cap,
            sent: 0,
            dropped_bytes: 0,
            dropped_lines: 0,
        }
    }

    /// Whether `line` goes to the coordinator.
    fn admit(&mut self, line: &str) -> bool {
        let size = line.len() as u64 + 1;
        if self.dropped_lines == 0 && self.sent + size <= self.cap.bytes {
            self.sent += size;
            true
        } else {
            self.dropped_bytes += size;
            self.dropped_lines += 1;
            false
        }
    }

    /// The one line that says what was dropped (none when nothing was).
    fn marker(&self) -> Option<String> {
        if self.dropped_lines == 0 {
            return None;
        }
        let flag = if self.cap.coordinator {
            "`farm coordinator --max-layer-log SIZE`"
        } else {
            "`farm worker --max-layer-log SIZE` (and the coordinator's, if lower)"
        };
        Some(format!(
            "farm: output truncated: {} bytes ({} lines) past the layer's log cap of {} bytes \
             were dropped; raise the cap with {flag}",
            self.dropped_bytes, self.dropped_lines, self.cap.bytes
        ))
    }
}

/// The span of one assignment (issue 16): a child of the layer's span on the
/// coordinator, whose trace context the assignment carries.
fn assignment_span(a: &pb::Assignment) -> tracing::Span {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        target: "farm_trace",
        "assignment",
        assignment = %a.id,
        layer = Empty,
        cache_key = Empty,
        outcome = Empty,
        otel.status_description = Empty,
    );
    farm_telemetry::set_parent(&span, &a.trace_context);
    span
}

/// Build one assignment, forwarding its log lines (up to `cap`), then report the
/// result.
async fn build(
    engine: Arc<Engine>,
    assignment: String,
    job_json: String,
    cancel: CancelToken,
    cap: LogCap,
    shared: Arc<Shared>,
    done: mpsc::UnboundedSender<ResultMsg>,
) {
    let started = Instant::now();
    let job: Job = match serde_json::from_str(&job_json) {
        Ok(j) => j,
        Err(e) => {
            let failure = LayerFailure::internal(format!(
                "the coordinator sent a job this worker (protocol {PROTOCOL}) cannot read: {e}"
            ));
            let _ = done.send(failed(assignment, &failure, 0));
            return;
        }
    };
    let (events, mut rx) = EventSender::channel();
    let forward = {
        let shared = shared.clone();
        let assignment = assignment.clone();
        tokio::spawn(async move {
            let mut capped = Capped::new(cap);
            let send = |lines: Vec<String>| {
                // Lines written while disconnected are lost; the result is not.
                shared.send(WorkerMessage {
                    kind: Some(worker_message::Kind::Logs(LogBatch {
                        assignment: assignment.clone(),
                        lines,
                    })),
                });
            };
            while let Some(first) = rx.recv().await {
                let mut lines = Vec::new();
                let mut bytes = 0;
                let mut next = Some(first);
                while let Some(e) = next.take() {
                    if let Event::Log { line, .. } = e
                        && capped.admit(&line)
                    {
                        bytes += line.len();
                        lines.push(line);
                    }
                    // Batches of at most 500 lines or about 1 MiB.
                    if lines.len() < 500 && bytes < LOG_BATCH_BYTES {
                        next = rx.try_recv().ok();
                    }
                }
                if !lines.is_empty() {
                    send(lines);
                }
            }
            if let Some(marker) = capped.marker() {
                send(vec![marker]);
            }
        })
    };
    let layer = job.layer.name.clone();
    let span = tracing::Span::current();
    span.record("layer", layer.as_str());
    span.record("cache_key", job.cache_key.as_str());
    tracing::info!(%assignment, %layer, "building");
    let result = engine.build_cancellable(&job, &events, &cancel).await;
    drop(events);
    let _ = forward.await;
    let duration_ms = started.elapsed().as_millis() as u64;
    let msg = match result.map(|built| serde_json::to_string(&built)) {
        Ok(Ok(layer_json)) => ResultMsg {
            assignment,
            layer_json,
            failure: None,
            cache_key: if job.cacheable() {
                job.cache_key.clone()
            } else {
                String::new()
            },
            duration_ms,
        },
        Ok(Err(e)) => failed(
            assignment,
            &LayerFailure::internal(format!("encoding the result: {e}")),
            duration_ms,
        ),
        Err(e) => failed(assignment, &e.failure(), duration_ms),
    };
    tracing::info!(%layer, ok = msg.failure.is_none(), duration_ms, "finished");
    match &msg.failure {
        None => span.record("outcome", "built"),
        Some(f) => {
            span.record("outcome", "failed");
            farm_telemetry::record_error(&span, &f.message);
            &span
        }
    };
    let _ = done.send(msg);
}

/// The result message of an assignment that did not build.
fn failed(assignment: String, failure: &LayerFailure, duration_ms: u64) -> ResultMsg {
    ResultMsg {
        assignment,
        failure: Some(pb::LayerFailure::from(failure)),
        duration_ms,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_dropped_and_one_marker_says_how_much() {
        let mut c = Capped::new(LogCap::new(64 << 20, 10));
        assert!(c.marker().is_none());
        assert!(c.admit("12345")); // 6 bytes
        assert!(!c.admit("1234")); // would make 11
        // Nothing after the first dropped line, even a line that would fit.
        assert!(!c.admit(""));
        let marker = c.marker().unwrap();
        assert!(
            marker.contains("6 bytes (2 lines)")
                && marker.contains("10 bytes")
                && marker.contains("farm coordinator --max-layer-log"),
            "{marker}"
        );
        // The worker's own cap when it is the lower one (or none was told).
        assert_eq!(
            LogCap::new(100, 0),
            LogCap {
                bytes: 100,
                coordinator: false
            }
        );
        let mut c = Capped::new(LogCap::new(100, 1000));
        assert!(!c.admit(&"x".repeat(100)));
        assert!(c.marker().unwrap().contains("farm worker --max-layer-log"));
    }
    use farm_proto::v1::{Refused, Registered};

    /// A coordinator that answers the registration with `answer`, once.
    struct OneAnswer {
        answer: coordinator_message::Kind,
        registered: Arc<Mutex<Option<Register>>>,
    }

    impl Dialer for OneAnswer {
        fn dial(&self) -> Pin<Box<dyn Future<Output = Result<Connection, DialError>> + Send + '_>> {
            Box::pin(async move {
                let (tx, mut from_worker) = mpsc::unbounded_channel::<WorkerMessage>();
                let (to_worker, rx) = mpsc::unbounded_channel();
                let registered = self.registered.clone();
                let answer = self.answer.clone();
                tokio::spawn(async move {
                    if let Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Register(r)),
                    }) = from_worker.recv().await
                    {
                        *registered.lock().unwrap() = Some(r);
                        let _ = to_worker.send(CoordinatorMessage { kind: Some(answer) });
                    }
                    // Keep the stream open until the worker goes.
                    while from_worker.recv().await.is_some() {}
                });
                Ok(Connection {
                    tx,
                    rx: Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
                })
            })
        }

        fn describe(&self) -> String {
            "a test coordinator".into()
        }
    }

    fn config() -> AgentConfig {
        AgentConfig {
            name: "w".into(),
            slots: 1,
            platform: Platform::host(),
            unavailable: None,
            shares_files: false,
            give_up_after: None,
            max_layer_log: 64 << 20,
        }
    }

    #[tokio::test]
    async fn a_refused_worker_stops_and_says_why_and_registers_its_protocol() {
        let registered = Arc::new(Mutex::new(None));
        let dialer = OneAnswer {
            answer: coordinator_message::Kind::Refused(Refused {
                reason: "worker w speaks farm worker protocol 2.0, this coordinator speaks 3.0"
                    .into(),
                retry: false,
            }),
            registered: registered.clone(),
        };
        let e = tokio::time::timeout(Duration::from_secs(10), run(None, config(), dialer))
            .await
            .expect("a refused worker stops")
            .unwrap_err();
        assert!(e.contains("refused") && e.contains("protocol 2.0"), "{e}");
        let r = registered.lock().unwrap().clone().unwrap();
        assert_eq!(
            (r.protocol_major, r.protocol_minor),
            (PROTOCOL.major, PROTOCOL.minor)
        );
        assert_eq!(r.platform, Platform::host().to_string());
    }

    #[tokio::test]
    async fn an_accepted_worker_keeps_running() {
        let dialer = OneAnswer {
            answer: coordinator_message::Kind::Registered(Registered { heartbeat_ms: 50 }),
            registered: Arc::new(Mutex::new(None)),
        };
        let still_running =
            tokio::time::timeout(Duration::from_millis(500), run(None, config(), dialer)).await;
        assert!(still_running.is_err(), "{still_running:?}");
    }

    #[tokio::test]
    async fn a_worker_refused_for_now_dials_again_instead_of_stopping() {
        // Another live worker holds the name: the refusal says retry.
        let registered = Arc::new(Mutex::new(None));
        let dialer = OneAnswer {
            answer: coordinator_message::Kind::Refused(Refused {
                reason: "a worker named 'w' is connected and alive".into(),
                retry: true,
            }),
            registered: registered.clone(),
        };
        let still_running =
            tokio::time::timeout(Duration::from_millis(500), run(None, config(), dialer)).await;
        assert!(still_running.is_err(), "{still_running:?}");
        assert!(registered.lock().unwrap().is_some());
    }

    /// A coordinator that accepts the registration and records what the worker sends.
    struct Recording {
        seen: Arc<Mutex<Vec<worker_message::Kind>>>,
    }

    impl Dialer for Recording {
        fn dial(&self) -> Pin<Box<dyn Future<Output = Result<Connection, DialError>> + Send + '_>> {
            Box::pin(async move {
                let (tx, mut from_worker) = mpsc::unbounded_channel::<WorkerMessage>();
                let (to_worker, rx) = mpsc::unbounded_channel();
                let seen = self.seen.clone();
                tokio::spawn(async move {
                    while let Some(m) = from_worker.recv().await {
                        if let Some(worker_message::Kind::Register(_)) = &m.kind {
                            let _ = to_worker.send(CoordinatorMessage {
                                kind: Some(coordinator_message::Kind::Registered(Registered {
                                    heartbeat_ms: 50,
                                })),
                            });
                        }
                        seen.lock().unwrap().extend(m.kind);
                    }
                });
                Ok(Connection {
                    tx,
                    rx: Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
                })
            })
        }

        fn describe(&self) -> String {
            "a test coordinator".into()
        }
    }

    #[tokio::test]
    async fn a_drained_worker_tells_the_coordinator_and_stops_when_nothing_runs() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AgentStatus::default());
        let (drain, rx) = tokio::sync::watch::channel(false);
        let agent = tokio::spawn(run_with(
            None,
            config(),
            Recording { seen: seen.clone() },
            Control {
                status: status.clone(),
                drain: Some((rx, Duration::from_secs(60))),
            },
        ));
        tokio::time::timeout(Duration::from_secs(10), async {
            while !status.registered() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the worker registers");
        assert!(!status.draining());
        drain.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), agent)
            .await
            .expect("a drained worker with nothing to finish stops at once")
            .unwrap()
            .unwrap();
        assert!(status.draining());
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter()
                .any(|k| matches!(k, worker_message::Kind::Drain(d) if d.hand_back.is_empty())),
            "{seen:?}"
        );
    }

    /// A dialer whose coordinator refuses the credential.
    struct RefusesCredential;

    impl Dialer for RefusesCredential {
        fn dial(&self) -> Pin<Box<dyn Future<Output = Result<Connection, DialError>> + Send + '_>> {
            Box::pin(async {
                Err(DialError::Refused(
                    "Unauthenticated: no credential: start the worker with --token-file".into(),
                ))
            })
        }

        fn describe(&self) -> String {
            "a test coordinator".into()
        }
    }

    #[tokio::test]
    async fn a_refused_credential_stops_the_worker_saying_why() {
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            run(None, config(), RefusesCredential),
        )
        .await
        .expect("the worker stops")
        .unwrap_err();
        assert!(
            e.contains("refused this worker's credential") && e.contains("--token-file"),
            "{e}"
        );
    }
}

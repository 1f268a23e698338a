//! The scheduler: ready layers wait in one queue until a worker has a free slot. A
//! worker that already holds the layer's base chain is preferred, then the least
//! loaded one. Every assignment is a lease in the state store, renewed by the worker's
//! heartbeats; a lease that runs out sends the layer to another worker, at most
//! [`MAX_ATTEMPTS`] times. Identical layers (same cache key) of concurrent builds are
//! built once.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use farm_proto::v1::{
    Assignment, CoordinatorMessage, Refused, Registered, ResultAck, WorkerMessage,
    coordinator_message, worker_message,
};
use farm_stackerfile::Plan;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{FarmError, Inner};
use farm_model::{
    ChainId, Event, EventSender, FailureKind, ImportSource, Job, LayerFailure, LayerOutcome,
    PROTOCOL, Platform, ProtocolVersion,
};

use crate::build::Executor;
use crate::state::{AssignmentId, BuildId, MAX_ATTEMPTS, may_retry, unix_ms};

type LayerResult = LayerOutcome;

/// The worker's end of a connection: send [`WorkerMessage`]s, receive
/// [`CoordinatorMessage`]s. Dropping `tx` disconnects.
pub struct WorkerLink {
    pub tx: mpsc::UnboundedSender<WorkerMessage>,
    pub rx: mpsc::UnboundedReceiver<CoordinatorMessage>,
}

/// A worker as `farm workers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub name: String,
    pub slots: u32,
    pub platform: String,
    /// `BUILD/LAYER` of each running assignment.
    pub running: Vec<String>,
    pub last_seen_ms: i64,
    pub connected: bool,
    pub unavailable: Option<String>,
}

struct Task {
    build: BuildId,
    idx: u32,
    job: Arc<Job>,
    events: EventSender,
    done: oneshot::Sender<LayerResult>,
}

impl Task {
    fn finish(self, result: LayerResult) {
        let _ = self.done.send(result);
    }
}

struct Active {
    task: Task,
    worker: String,
}

struct Worker {
    session: u64,
    slots: u32,
    platform: Platform,
    chains: HashSet<ChainId>,
    tx: mpsc::UnboundedSender<CoordinatorMessage>,
    running: HashSet<AssignmentId>,
    /// Picked, not yet sent (the lease is being written).
    reserved: u32,
    shares_files: bool,
    unavailable: Option<String>,
    last_seen_ms: i64,
    /// A lease of this worker ran out: no new work until it sends a heartbeat.
    stale: bool,
}

impl Worker {
    fn free(&self) -> u32 {
        if self.unavailable.is_some() || self.stale {
            return 0;
        }
        self.slots
            .saturating_sub(self.running.len() as u32 + self.reserved)
    }
}

#[derive(Default)]
struct Sched {
    queue: VecDeque<Task>,
    workers: BTreeMap<String, Worker>,
    active: HashMap<AssignmentId, Active>,
    /// Results that arrived with no build waiting for them (the coordinator restarted
    /// while the worker built), by (build, layer index).
    orphans: HashMap<(BuildId, u32), LayerResult>,
    /// Cache keys being built, with the build that builds them.
    inflight: HashMap<String, (BuildId, watch::Receiver<Option<LayerResult>>)>,
    inflight_tx: HashMap<String, watch::Sender<Option<LayerResult>>>,
}

pub(crate) struct Scheduler {
    inner: Weak<Inner>,
    lease: Duration,
    st: Mutex<Sched>,
    wake: Arc<Notify>,
    sessions: std::sync::atomic::AtomicU64,
    /// Leases survived from before a restart: a layer must first look for its own.
    pub(super) prior_leases: std::sync::atomic::AtomicBool,
}

struct Pick {
    task: Task,
    worker: String,
    session: u64,
    shares_files: bool,
}

impl Scheduler {
    pub(super) fn new(inner: Weak<Inner>, lease: Duration) -> Self {
        Scheduler {
            inner,
            lease,
            st: Mutex::new(Sched::default()),
            wake: Arc::new(Notify::new()),
            sessions: Default::default(),
            prior_leases: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// Start the dispatch and lease-expiry loops (they end when the farm is dropped).
    pub(super) fn spawn_loops(inner: &Arc<Inner>) {
        let weak = Arc::downgrade(inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let wake = inner.sched.wake.clone();
                let notified = wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                inner.sched.dispatch(&inner);
                drop(inner);
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            }
        });
        let weak = Arc::downgrade(inner);
        let tick = (inner.sched.lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.sched.expire(&inner).await;
            }
        });
    }

    /// Queue a layer (or wait for the worker that holds it since before a restart) and
    /// wait for its result.
    async fn run(
        &self,
        inner: &Arc<Inner>,
        build: &str,
        idx: u32,
        job: Job,
        events: EventSender,
    ) -> LayerResult {
        let (done, rx) = oneshot::channel();
        let task = Task {
            build: build.to_string(),
            idx,
            job: Arc::new(job),
            events,
            done,
        };
        let prior = if self.prior_leases.load(std::sync::atomic::Ordering::Relaxed) {
            inner.state.active_lease(build, idx).await
        } else {
            Ok(None)
        };
        let early: Option<LayerResult> = 'locked: {
            let mut st = self.lock();
            // A result that came in while nobody waited (see `handle_result`), checked under
            // the lock it is filed under.
            if let Some(r) = st.orphans.remove(&(build.to_string(), idx)) {
                break 'locked Some(r);
            }
            match prior {
                Ok(Some(lease)) => {
                    task.events.log(
                        &task.job.layer.name,
                        format!(
                            "farm: waiting for worker {}, which was building this layer when the \
                         coordinator restarted",
                            lease.worker
                        ),
                    );
                    if let Some(w) = st.workers.get_mut(&lease.worker) {
                        w.running.insert(lease.assignment);
                    }
                    st.active.insert(
                        lease.assignment,
                        Active {
                            task,
                            worker: lease.worker,
                        },
                    );
                    drop(st);
                }
                _ => {
                    // Checked under the lock `cancel_build` drains the queue under: a layer
                    // that arrives after a cancel must not be queued (and built) after it.
                    if inner.is_cancelled(build) {
                        break 'locked Some(Err(LayerFailure::cancelled()));
                    }
                    st.queue.push_back(task);
                    inner.metrics.set_queue(st.queue.len());
                    drop(st);
                    self.wake.notify_one();
                }
            }
            None
        };
        if let Some(r) = early {
            return r;
        }
        rx.await.unwrap_or_else(|_| {
            Err(LayerFailure::internal(
                "the coordinator stopped before the layer finished",
            ))
        })
    }

    /// Send every queued layer that has a worker to it.
    fn dispatch(&self, inner: &Arc<Inner>) {
        let picks = {
            let mut st = self.lock();
            let mut picks = Vec::new();
            let mut keep = VecDeque::new();
            while let Some(task) = st.queue.pop_front() {
                if st.workers.values().all(|w| w.free() == 0) {
                    keep.push_back(task);
                    keep.extend(st.queue.drain(..));
                    break;
                }
                match choose(&st.workers, &task.job) {
                    Some(name) => {
                        let w = st.workers.get_mut(&name).expect("chosen from the map");
                        w.reserved += 1;
                        picks.push(Pick {
                            task,
                            session: w.session,
                            shares_files: w.shares_files,
                            worker: name,
                        });
                    }
                    None => keep.push_back(task),
                }
            }
            st.queue = keep;
            inner.metrics.set_queue(st.queue.len());
            picks
        };
        for pick in picks {
            let inner = inner.clone();
            tokio::spawn(async move { inner.sched.send(&inner, pick).await });
        }
    }

    /// Lease a picked layer to its worker and send it.
    async fn send(&self, inner: &Arc<Inner>, pick: Pick) {
        let Pick {
            task,
            worker,
            session,
            shares_files,
        } = pick;
        let unreserve = |st: &mut Sched| {
            if let Some(w) = st.workers.get_mut(&worker) {
                w.reserved = w.reserved.saturating_sub(1);
            }
        };
        let id = match inner
            .state
            .assign(&task.build, task.idx, &worker, self.lease_ms(), unix_ms())
            .await
        {
            Ok(id) => id,
            Err(e) => {
                unreserve(&mut self.lock());
                task.finish(Err(LayerFailure::internal(format!(
                    "recording the assignment: {e}"
                ))));
                return;
            }
        };
        let job = if shares_files {
            Ok((*task.job).clone())
        } else {
            remote_job(&inner.config.blobs, &task.job).await
        };
        let json = job.and_then(|j| serde_json::to_string(&j).map_err(|e| e.to_string()));
        let json = match json {
            Ok(j) => j,
            Err(e) => {
                unreserve(&mut self.lock());
                self.release(inner, id).await;
                task.finish(Err(LayerFailure::internal(format!(
                    "sending the layer's inputs: {e}"
                ))));
                return;
            }
        };
        task.events.send(Event::Assigned {
            layer: task.job.layer.name.clone(),
            worker: worker.clone(),
        });
        let cancelled;
        let requeue = {
            let mut st = self.lock();
            unreserve(&mut st);
            // Cancelled while the lease was written (`cancel_build` did not see it).
            cancelled = inner.is_cancelled(&task.build);
            match st
                .workers
                .get_mut(&worker)
                .filter(|w| w.session == session && !cancelled)
            {
                Some(w) => {
                    let sent = w.tx.send(CoordinatorMessage {
                        kind: Some(coordinator_message::Kind::Assign(Assignment {
                            id: id.to_string(),
                            job_json: json,
                            lease_ms: self.lease_ms(),
                        })),
                    });
                    if sent.is_ok() {
                        w.running.insert(id);
                        st.active.insert(id, Active { task, worker });
                        inner.metrics.set_running(st.active.len());
                        None
                    } else {
                        Some(task)
                    }
                }
                None => Some(task),
            }
        };
        if let Some(task) = requeue {
            // The worker left between the pick and the send: not its fault, and not an
            // attempt that counts against the layer... but the lease was recorded, so
            // it does count; release it and queue again.
            self.release(inner, id).await;
            if cancelled {
                task.finish(Err(LayerFailure::cancelled()));
                return;
            }
            self.lock().queue.push_front(task);
            self.wake.notify_one();
        }
    }

    /// End lease `id` in the state store. A write that fails leaves the lease to run
    /// out, and the expiry loop then retries the layer: logged, never silent.
    async fn release(&self, inner: &Inner, id: AssignmentId) {
        if let Err(e) = inner.state.release(id).await {
            tracing::error!(assignment = %id, "releasing the lease: {e}; it will expire instead");
        }
    }

    /// Leases that ran out: their layers go back to the queue (or fail).
    async fn expire(&self, inner: &Arc<Inner>) {
        let expired = match inner.state.expired(unix_ms()).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("reading leases: {e}");
                return;
            }
        };
        for lease in expired {
            tracing::warn!(worker = %lease.worker, assignment = %lease.assignment, "lease expired");
            self.lost(
                inner,
                lease.assignment,
                lease.attempts,
                &lease.worker,
                "stopped sending heartbeats",
            )
            .await;
        }
    }

    /// Assignment `id` will not finish on `worker`: retry it elsewhere or fail it.
    async fn lost(
        &self,
        inner: &Arc<Inner>,
        id: AssignmentId,
        attempts: u32,
        worker: &str,
        why: &str,
    ) {
        self.release(inner, id).await;
        let active = {
            let mut st = self.lock();
            if let Some(w) = st.workers.get_mut(worker) {
                w.running.remove(&id);
                w.stale = true;
                let _ = w.tx.send(CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Cancel(id.to_string())),
                });
            }
            let a = st.active.remove(&id);
            inner.metrics.set_running(st.active.len());
            a
        };
        let Some(Active { task, .. }) = active else {
            return;
        };
        let layer = task.job.layer.name.clone();
        if may_retry(attempts) {
            task.events.log(
                &layer,
                format!(
                    "farm: worker {worker} {why}; building the layer again (attempt {} of {MAX_ATTEMPTS})",
                    attempts + 1
                ),
            );
            inner.metrics.retry();
            self.lock().queue.push_front(task);
            self.wake.notify_one();
        } else {
            task.finish(Err(LayerFailure::new(
                FailureKind::WorkerLost,
                format!(
                    "worker {worker} {why}; the layer was assigned {attempts} times, the limit"
                ),
            )));
        }
    }

    /// A new worker connection (see [`WorkerLink`]).
    pub(super) fn connect(&self) -> Option<WorkerLink> {
        let (wtx, wrx) = mpsc::unbounded_channel();
        let (ctx, crx) = mpsc::unbounded_channel();
        let inner = self.inner.upgrade()?;
        tokio::spawn(serve_worker(inner, wrx, ctx));
        Some(WorkerLink { tx: wtx, rx: crx })
    }

    /// Stop build `id`'s layers: queued ones never start, running ones are cancelled on
    /// their workers.
    pub(super) async fn cancel_build(&self, id: &str) {
        let (tasks, active) = {
            let mut st = self.lock();
            let (mine, rest): (VecDeque<Task>, VecDeque<Task>) =
                st.queue.drain(..).partition(|t| t.build == id);
            st.queue = rest;
            let ids: Vec<AssignmentId> = st
                .active
                .iter()
                .filter(|(_, a)| a.task.build == id)
                .map(|(i, _)| *i)
                .collect();
            let mut active = Vec::new();
            for i in ids {
                if let Some(a) = st.active.remove(&i) {
                    if let Some(w) = st.workers.get_mut(&a.worker) {
                        w.running.remove(&i);
                        let _ = w.tx.send(CoordinatorMessage {
                            kind: Some(coordinator_message::Kind::Cancel(i.to_string())),
                        });
                    }
                    active.push(a.task);
                }
            }
            (mine, active)
        };
        for t in tasks.into_iter().chain(active) {
            t.finish(Err(LayerFailure::cancelled()));
        }
        self.wake.notify_one();
    }

    pub(super) async fn workers(&self) -> Result<Vec<WorkerView>, FarmError> {
        let inner = self
            .inner
            .upgrade()
            .ok_or_else(|| FarmError::Invalid("stopped".into()))?;
        let rows = inner.state.workers().await?;
        let st = self.lock();
        let mut out = Vec::new();
        for row in rows {
            let live = st.workers.get(&row.name);
            let mut running: Vec<String> = st
                .active
                .iter()
                .filter(|(_, a)| a.worker == row.name)
                .map(|(_, a)| format!("{}/{}", a.task.build, a.task.job.layer.name))
                .collect();
            running.sort();
            out.push(WorkerView {
                slots: live.map_or(row.slots, |w| w.slots),
                platform: row.platform,
                running,
                last_seen_ms: live.map_or(row.last_seen_ms, |w| w.last_seen_ms),
                connected: live.is_some(),
                unavailable: live.and_then(|w| w.unavailable.clone()),
                name: row.name,
            });
        }
        Ok(out)
    }
}

/// The worker for `job`: right platform, a free slot; one holding the base chain
/// first, then the least loaded.
fn choose(workers: &BTreeMap<String, Worker>, job: &Job) -> Option<String> {
    let base = job.base_chain();
    // A layer that runs nothing (only adds files and config) builds on any platform.
    let runs = job.runs_commands();
    workers
        .iter()
        .filter(|(_, w)| (!runs || w.platform == job.platform) && w.free() > 0)
        .max_by_key(|(_, w)| {
            let has_base = base.is_some_and(|b| w.chains.contains(b));
            let busy =
                (w.running.len() as u64 + u64::from(w.reserved)) * 1000 / u64::from(w.slots.max(1));
            (has_base, std::cmp::Reverse(busy))
        })
        .map(|(n, _)| n.clone())
}

/// `job` for a worker on another machine: local inputs become trees in the blob store.
async fn remote_job(blobs: &farm_image::BlobStore, job: &Job) -> Result<Job, String> {
    let mut job = job.clone();
    for import in &mut job.imports {
        if let ImportSource::Local(path) = &import.source {
            let digest = blobs
                .put_tree(path)
                .await
                .map_err(|e| format!("import '{}': {e}", import.written))?;
            import.source = ImportSource::Tree {
                digest: digest.to_string(),
            };
        }
    }
    for od in &mut job.overlay_dirs {
        let digest = blobs
            .put_tree(&od.source)
            .await
            .map_err(|e| format!("overlay_dirs '{}': {e}", od.source.display()))?;
        od.tree = Some(digest.to_string());
    }
    Ok(job)
}

/// One worker's connection, from its registration until it goes away.
async fn serve_worker(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<WorkerMessage>,
    tx: mpsc::UnboundedSender<CoordinatorMessage>,
) {
    let sched = &inner.sched;
    let reg = match rx.recv().await {
        Some(WorkerMessage {
            kind: Some(worker_message::Kind::Register(r)),
        }) => r,
        _ => {
            tracing::warn!("a worker connected without registering first");
            return;
        }
    };
    let name = reg.name.clone();
    let refuse = |reason: String| {
        tracing::warn!(worker = %name, "refused: {reason}");
        let _ = tx.send(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Refused(Refused { reason })),
        });
    };
    let version = ProtocolVersion {
        major: reg.protocol_major,
        minor: reg.protocol_minor,
    };
    if !PROTOCOL.compatible(&version) {
        refuse(format!(
            "worker {name} speaks farm worker protocol {version}, this coordinator speaks \
             {PROTOCOL}: run the same farm release on both"
        ));
        return;
    }
    let platform: Platform = match reg.platform.parse() {
        Ok(p) => p,
        Err(e) => {
            refuse(format!("worker {name}: {e}"));
            return;
        }
    };
    let now = unix_ms();
    if let Err(e) = inner
        .state
        .upsert_worker(&name, reg.slots, &reg.platform, now)
        .await
    {
        tracing::error!(worker = %name, "recording the worker: {e}");
        return;
    }
    let session = sched
        .sessions
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let claims: HashSet<AssignmentId> = reg.running.iter().filter_map(|a| a.parse().ok()).collect();
    let unavailable = (!reg.unavailable.is_empty()).then(|| reg.unavailable.clone());
    match &unavailable {
        Some(why) => tracing::warn!(worker = %name, "worker connected without slots: {why}"),
        None => {
            tracing::info!(worker = %name, slots = reg.slots, platform = %reg.platform, "worker connected")
        }
    }
    let _ = tx.send(CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Registered(Registered {
            heartbeat_ms: (sched.lease_ms() / 3).max(50),
        })),
    });
    {
        let mut st = sched.lock();
        st.workers.insert(
            name.clone(),
            Worker {
                session,
                slots: reg.slots,
                platform,
                chains: parse_chains(&name, &reg.chains),
                tx: tx.clone(),
                running: HashSet::new(),
                reserved: 0,
                shares_files: reg.shares_files,
                unavailable,
                last_seen_ms: now,
                stale: false,
            },
        );
        inner.metrics.set_workers(st.workers.len());
    }
    // Reconcile with the leases this worker held before it (or we) reconnected.
    let leases = match inner.state.leases_of(&name).await {
        Ok(l) => l,
        Err(e) => {
            // Without its leases the worker cannot be reconciled: drop the connection
            // (it dials again) rather than cancel or keep work blindly.
            tracing::error!(worker = %name, "reading the worker's leases: {e}");
            sched.lock().workers.remove(&name);
            return;
        }
    };
    let held: HashSet<AssignmentId> = leases.iter().map(|l| l.assignment).collect();
    for lease in leases {
        if claims.contains(&lease.assignment) {
            if let Some(w) = sched.lock().workers.get_mut(&name) {
                w.running.insert(lease.assignment);
            }
        } else {
            sched
                .lost(
                    &inner,
                    lease.assignment,
                    lease.attempts,
                    &name,
                    "restarted and lost the layer",
                )
                .await;
        }
    }
    for claim in claims.difference(&held) {
        // Work we no longer want (released while the worker was away).
        let _ = tx.send(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Cancel(claim.to_string())),
        });
    }
    renew(&inner, &name, unix_ms()).await;
    sched.wake.notify_one();

    while let Some(msg) = rx.recv().await {
        match msg.kind {
            Some(worker_message::Kind::Heartbeat(hb)) => {
                let now = unix_ms();
                renew(&inner, &name, now).await;
                if let Err(e) = inner.state.worker_seen(&name, now).await {
                    tracing::warn!(worker = %name, "recording the heartbeat: {e}");
                }
                let mut st = sched.lock();
                if let Some(w) = st.workers.get_mut(&name).filter(|w| w.session == session) {
                    w.last_seen_ms = now;
                    w.stale = false;
                    w.chains.extend(parse_chains(&name, &hb.chains));
                }
            }
            Some(worker_message::Kind::Logs(batch)) => {
                let Ok(id) = batch.assignment.parse::<AssignmentId>() else {
                    continue;
                };
                let target = sched
                    .lock()
                    .active
                    .get(&id)
                    .map(|a| (a.task.events.clone(), a.task.job.layer.name.clone()));
                if let Some((events, layer)) = target {
                    for line in batch.lines {
                        events.log(&layer, line);
                    }
                }
            }
            Some(worker_message::Kind::Result(result)) => {
                let _ = tx.send(CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Ack(ResultAck {
                        assignment: result.assignment.clone(),
                    })),
                });
                handle_result(&inner, &name, result).await;
            }
            Some(worker_message::Kind::Register(_)) | None => {}
        }
    }
    let mut st = sched.lock();
    if let Some(w) = st.workers.get(&name).filter(|w| w.session == session) {
        if w.shares_files {
            tracing::debug!(worker = %name, "embedded worker stopped");
        } else {
            tracing::warn!(worker = %name, "worker disconnected");
        }
        st.workers.remove(&name);
    }
    inner.metrics.set_workers(st.workers.len());
}

async fn handle_result(inner: &Arc<Inner>, worker: &str, result: farm_proto::v1::Result) {
    let sched = &inner.sched;
    let Ok(id) = result.assignment.parse::<AssignmentId>() else {
        return;
    };
    let outcome: LayerResult = match &result.failure {
        Some(failure) => Err(LayerFailure::from(failure)),
        None => serde_json::from_str(&result.layer_json).map_err(|e| {
            LayerFailure::internal(format!("worker {worker} sent an unreadable result: {e}"))
        }),
    };
    // The lease is released last: until then a driver resuming after a restart still
    // finds it and attaches, so the result below reaches it either way.
    let active = {
        let mut st = sched.lock();
        if let Some(w) = st.workers.get_mut(worker) {
            w.running.remove(&id);
            if let Ok(layer) = &outcome {
                w.chains.insert(layer.chain_id.clone());
            }
        }
        let a = st.active.remove(&id);
        // The worker now holds the chain its base was materialised into, too.
        if let (Some(a), Some(w)) = (&a, st.workers.get_mut(worker))
            && let Some(chain) = a.task.job.base_chain()
        {
            w.chains.insert(chain.clone());
        }
        inner.metrics.set_running(st.active.len());
        a
    };
    match active {
        // The build's driver records it in the action cache.
        Some(a) => a.task.finish(outcome),
        None => {
            // Nobody waits (the coordinator restarted while the worker built): the
            // result is good work all the same, so it goes into the action cache.
            if let Ok(layer) = &outcome
                && !result.cache_key.is_empty()
                && let Err(e) = inner.cache.put(&result.cache_key, layer).await
            {
                tracing::error!("caching a result: {e}");
            }
            let lease = match inner.state.assignment(id).await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::error!(assignment = %id, "reading the assignment of a result: {e}");
                    None
                }
            };
            if let Some((lease, _)) = lease {
                let mut st = sched.lock();
                // A driver may have attached meanwhile (and counted it on the worker).
                if let Some(w) = st.workers.get_mut(worker) {
                    w.running.remove(&id);
                }
                match st.active.remove(&id) {
                    Some(a) => {
                        drop(st);
                        a.task.finish(outcome);
                    }
                    None => {
                        st.orphans.insert((lease.build_id, lease.idx), outcome);
                    }
                }
            }
        }
    }
    sched.release(inner, id).await;
    sched.wake.notify_one();
}

/// Renew `worker`'s leases. A failed write is retried by the next heartbeat; until one
/// succeeds the leases may run out and their layers move to another worker.
async fn renew(inner: &Inner, worker: &str, now: i64) {
    if let Err(e) = inner.state.renew(worker, now).await {
        tracing::warn!(%worker, "renewing leases: {e}");
    }
}

/// The chains a worker reports; ones that are not ChainIDs are ignored (and logged).
fn parse_chains(worker: &str, chains: &[String]) -> HashSet<ChainId> {
    chains
        .iter()
        .filter_map(|c| match ChainId::parse(c) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(%worker, "ignoring a reported chain: {e}");
                None
            }
        })
        .collect()
}

/// The executor of one build: its layers go through the scheduler.
pub(crate) struct FarmExecutor {
    inner: Arc<Inner>,
    build: BuildId,
    index: HashMap<String, u32>,
}

impl FarmExecutor {
    pub(super) fn new(inner: Arc<Inner>, build: &str, plan: &Plan) -> Self {
        FarmExecutor {
            inner,
            build: build.to_string(),
            index: plan
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| (l.layer.name.clone(), i as u32))
                .collect(),
        }
    }
}

impl Executor for FarmExecutor {
    async fn execute(&self, job: Job, events: EventSender) -> LayerResult {
        let Some(&idx) = self.index.get(&job.layer.name) else {
            return Err(LayerFailure::internal(format!(
                "internal error: no layer '{}' in the build",
                job.layer.name
            )));
        };
        let sched = &self.inner.sched;
        let key = job.cache_key.clone();
        let shareable = job.cacheable();
        if shareable {
            loop {
                let waiting = {
                    let mut st = sched.lock();
                    match st.inflight.get(&key) {
                        Some((owner, rx)) => Some((owner.clone(), rx.clone())),
                        None => {
                            let (tx, rx) = watch::channel(None);
                            st.inflight.insert(key.clone(), (self.build.clone(), rx));
                            st.inflight_tx.insert(key.clone(), tx);
                            None
                        }
                    }
                };
                let Some((owner, mut rx)) = waiting else {
                    break;
                };
                events.log(
                    &job.layer.name,
                    format!("farm: build {owner} is building the same layer; sharing its result"),
                );
                let result = match rx.wait_for(Option::is_some).await {
                    Ok(r) => r.clone().unwrap_or_else(|| Err(LayerFailure::cancelled())),
                    Err(_) => Err(LayerFailure::cancelled()),
                };
                match result {
                    Ok(layer) => return Ok(layer),
                    // The other build was cancelled: build it here.
                    Err(e) if e.is_cancelled() => continue,
                    Err(e) => return Err(e.note(format_args!("(in build {owner})"))),
                }
            }
        }
        let started = std::time::Instant::now();
        let result = sched.run(&self.inner, &self.build, idx, job, events).await;
        // Recorded at once, so a status during the build (or after a coordinator
        // restart) shows the layer built, where and how long it took.
        if let Ok(layer) = &result
            && let Ok(json) = serde_json::to_string(layer)
            && let Err(e) = self
                .inner
                .state
                .layer_result(
                    &self.build,
                    idx,
                    &json,
                    false,
                    started.elapsed().as_millis() as u64,
                    None,
                )
                .await
        {
            tracing::error!(build = %self.build, "recording a result: {e}");
        }
        // Into the action cache before the in-flight entry goes: a build that plans the
        // same layer just after must find one or the other.
        if shareable
            && let Ok(layer) = &result
            && let Err(e) = self.inner.cache.put(&key, layer).await
        {
            tracing::error!(build = %self.build, "caching a result: {e}");
        }
        if shareable {
            let mut st = sched.lock();
            st.inflight.remove(&key);
            if let Some(tx) = st.inflight_tx.remove(&key) {
                let _ = tx.send(Some(result.clone()));
            }
        }
        result
    }
}

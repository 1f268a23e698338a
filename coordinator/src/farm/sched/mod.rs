//! The scheduler: a build's ready layers wait in the [`queue`] until [`placement`] finds
//! a worker with a free slot; every assignment is a lease ([`leases`]) that the worker's
//! heartbeats renew; identical layers of concurrent builds are built once ([`dedupe`]).
//! Workers attach through [`sessions`]; their wire protocol lives in `grpc::workers`.

mod dedupe;
mod fair;
mod leases;
mod placement;
mod progress;
mod queue;
mod sessions;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farm_model::{BuiltImage, ChainId, EventSender, Job, LayerFailure, LayerOutcome, Platform};
use farm_stackerfile::Plan;
use tokio::sync::Notify;

use super::{FarmError, Inner};
use crate::build::Executor;
use crate::state::{AssignmentId, BuildId};
use placement::Candidate;
use queue::Task;

/// Let a queued state write commit behind the caller (its lease, release, renewal or
/// heartbeat: nothing waits for it); `failed` logs its error.
fn behind<T, E>(
    write: impl Future<Output = Result<T, E>> + Send + 'static,
    failed: impl FnOnce(E) + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = write.await {
            failed(e);
        }
    });
}

pub(crate) use sessions::{
    RegisterError, ToWorker, WorkerGone, WorkerInfo, WorkerOutbox, WorkerSession,
};

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

/// A layer sent to a worker, until its result comes back or its lease is lost.
struct Active {
    task: Task,
    worker: String,
}

/// A connected worker.
struct Worker {
    /// Tells this connection from an earlier one of the same worker.
    session: u64,
    slots: u32,
    platform: Platform,
    chains: HashSet<ChainId>,
    outbox: Box<dyn WorkerOutbox>,
    running: HashSet<AssignmentId>,
    /// Picked, not yet sent (the lease is being written).
    reserved: u32,
    shares_files: bool,
    /// See `WorkerInfo::reports_progress`.
    reports_progress: bool,
    unavailable: Option<String>,
    last_seen_ms: i64,
    /// A lease of this worker ran out: no new work until it sends a heartbeat.
    stale: bool,
    /// Its leases from before this session are being read and reconciled: no new work
    /// until that is done (a lease written meanwhile would look like one it lost).
    reconciling: bool,
}

impl Worker {
    fn candidate<'a>(&'a self, name: &'a str) -> Candidate<'a> {
        Candidate {
            name,
            platform: &self.platform,
            chains: &self.chains,
            slots: self.slots,
            busy: self.running.len() as u32 + self.reserved,
            accepting: self.unavailable.is_none() && !self.stale && !self.reconciling,
        }
    }

    /// Tell the worker to stop assignment `id`; a worker that is gone has nothing to stop.
    fn cancel(&self, id: AssignmentId) {
        let _ = self.outbox.send(ToWorker::Cancel(id));
    }
}

/// Everything the scheduler changes under its one lock.
#[derive(Default)]
struct Sched {
    queue: fair::ReadyQueue<Task>,
    workers: BTreeMap<String, Worker>,
    active: HashMap<AssignmentId, Active>,
    /// Results that arrived with no build waiting for them (the coordinator restarted
    /// while the worker built), by (build, layer index).
    orphans: HashMap<(BuildId, u32), LayerOutcome>,
    /// Which of `workers` hold each chain; changed only with them (`add_worker`,
    /// `remove_worker`, `add_chains`).
    holders: placement::Holders,
}

impl Sched {
    /// Put a worker on the list, in place of an earlier connection of the same name.
    fn add_worker(&mut self, name: String, worker: Worker) {
        self.remove_worker(&name);
        for chain in &worker.chains {
            self.holders.add(&name, chain);
        }
        self.workers.insert(name, worker);
    }

    fn remove_worker(&mut self, name: &str) -> Option<Worker> {
        let worker = self.workers.remove(name)?;
        self.holders.remove(name, &worker.chains);
        Some(worker)
    }

    /// Worker `name` (if on the list) holds `chains` now. At most [`MAX_CHAINS_HELD`]
    /// are kept per worker: its heartbeats each report up to
    /// `grpc::workers::MAX_REPORTED_CHAINS` and are added up, so a worker reporting new
    /// ones each time would grow the coordinator's memory without end. Ones over the
    /// cap are not known to placement (the layer may go to another worker); nothing
    /// else depends on them.
    fn add_chains(&mut self, name: &str, chains: impl IntoIterator<Item = ChainId>) {
        let Some(w) = self.workers.get_mut(name) else {
            return;
        };
        let mut ignored = 0usize;
        for chain in chains {
            if w.chains.contains(&chain) {
                continue;
            }
            if w.chains.len() >= MAX_CHAINS_HELD {
                ignored += 1;
                continue;
            }
            self.holders.add(name, &chain);
            w.chains.insert(chain);
        }
        if ignored > 0 {
            tracing::warn!(
                worker = %name,
                ignored,
                "the worker holds more chains than the coordinator keeps for one worker \
                 ({MAX_CHAINS_HELD}); placement does not know the rest"
            );
        }
    }
}

/// The most chains the scheduler keeps for one worker (see `Sched::add_chains`).
const MAX_CHAINS_HELD: usize = if cfg!(test) { 8 } else { 100_000 };

pub(crate) struct Scheduler {
    lease: Duration,
    st: Mutex<Sched>,
    inflight: Arc<dedupe::Inflight>,
    wake: Arc<Notify>,
    sessions: AtomicU64,
    /// Leases survived from before a restart: a layer must first look for its own.
    prior_leases: AtomicBool,
    /// When each active assignment last made progress (`progress`).
    progress: Mutex<HashMap<AssignmentId, i64>>,
}

impl Scheduler {
    pub(super) fn new(lease: Duration, prior_leases: bool) -> Self {
        Scheduler {
            lease,
            st: Mutex::new(Sched::default()),
            inflight: Default::default(),
            wake: Arc::new(Notify::new()),
            sessions: Default::default(),
            prior_leases: AtomicBool::new(prior_leases),
            progress: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
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
                inner.sched.stalled(&inner).await;
            }
        });
    }

    /// Stop build `id`'s layers: queued ones never start, running ones are cancelled on
    /// their workers.
    pub(super) fn cancel_build(&self, id: &str) {
        let (tasks, active) = {
            let mut st = self.lock();
            let mine = st.queue.remove_build(id);
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
                        w.cancel(i);
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

    /// Workers that are or were connected.
    pub(super) async fn workers(&self, inner: &Inner) -> Result<Vec<WorkerView>, FarmError> {
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

/// The executor of one build: its layers go through the scheduler, identical ones of
/// concurrent builds once.
pub(crate) struct FarmExecutor {
    inner: Arc<Inner>,
    build: BuildId,
    index: HashMap<String, u32>,
    /// The build ignores the action cache (`--no-cache`).
    no_cache: bool,
    /// Its priority in the ready queue (`farm submit --priority`).
    priority: i32,
    /// Built layers' record and cache writes still being awaited (see `execute`); the
    /// build ends only after them (`settled`).
    settling: Mutex<tokio::task::JoinSet<()>>,
}

impl FarmExecutor {
    pub(super) fn new(
        inner: Arc<Inner>,
        build: &str,
        plan: &Plan,
        no_cache: bool,
        priority: i32,
    ) -> Self {
        FarmExecutor {
            no_cache,
            priority,
            settling: Mutex::default(),
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

    /// Record a built layer at once, so a status during the build (or after a
    /// coordinator restart) shows it built, where and how long it took. The write is
    /// queued now; the future answers when it committed.
    fn record(
        &self,
        idx: u32,
        result: &LayerOutcome,
        started: std::time::Instant,
    ) -> Option<impl Future<Output = Result<(), crate::state::StateError>> + Send + 'static + use<>>
    {
        let layer = result.as_ref().ok()?;
        let json = match serde_json::to_string(layer) {
            Ok(json) => json,
            Err(e) => {
                tracing::error!(build = %self.build, "recording a result: {e}; its status shows it when the build ends");
                return None;
            }
        };
        let elapsed = started.elapsed().as_millis() as u64;
        Some(
            self.inner
                .state
                .layer_result(&self.build, idx, &json, false, elapsed, None),
        )
    }
}

impl FarmExecutor {
    /// Every built layer's record and cache entry committed (or failed, logged): a build
    /// ends after this, so a process that stops when its build ends (`farm build`, an
    /// embedded `farm submit`) has left its cache entries for the next.
    pub(super) async fn settled(&self) {
        let mut settling =
            std::mem::take(&mut *self.settling.lock().unwrap_or_else(|p| p.into_inner()));
        while settling.join_next().await.is_some() {}
    }

    /// What a claim of `key` that ended since this build's cache lookup built, when its
    /// blobs are all in the store (see `Inflight::recently_built`).
    async fn built_meanwhile(&self, key: &str) -> Option<BuiltImage> {
        let hit = self.inner.sched.inflight.recently_built(key)?;
        match crate::build::blobs_present(&self.inner.config.blobs, &hit).await {
            Ok(true) => Some(hit),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(build = %self.build, "checking cached blobs: {e}; building");
                None
            }
        }
    }
}

impl Executor for FarmExecutor {
    async fn execute(&self, job: Job, events: EventSender) -> LayerOutcome {
        let Some(&idx) = self.index.get(&job.layer.name) else {
            return Err(LayerFailure::internal(format!(
                "internal error: no layer '{}' in the build",
                job.layer.name
            )));
        };
        let sched = &self.inner.sched;
        let key = job.cache_key.clone();
        let claim = if job.cacheable() {
            let layer = job.layer.name.clone();
            let joined = sched
                .inflight
                .join(&key, &self.build, |owner| {
                    events.log(
                        &layer,
                        format!(
                            "farm: build {owner} is building the same layer; sharing its result"
                        ),
                    )
                })
                .await;
            match joined {
                dedupe::Joined::Claimed(claim) => {
                    // The driver looked in the action cache before this claim: a build
                    // that finished the same layer in between left it there.
                    if !self.no_cache
                        && let Some(hit) = self.built_meanwhile(&key).await
                    {
                        events.log(
                            &job.layer.name,
                            "farm: another build built the same layer meanwhile; using its result",
                        );
                        let result = Ok(hit);
                        claim.finish(&result);
                        return result;
                    }
                    Some(claim)
                }
                dedupe::Joined::Shared(result) => return result,
            }
        } else {
            None
        };
        let started = std::time::Instant::now();
        let result = sched
            .run(&self.inner, &self.build, self.priority, idx, job, events)
            .await;
        // The build's record and the action cache entry are queued now and the result
        // goes back to the build at once: its dependents need not wait for two group
        // commits. What the build does next with them (their leases, its events) is
        // queued on the same writer after the record, so it commits no earlier: a
        // watcher never sees a layer built that a restarted coordinator would not.
        let recorded = self.record(idx, &result, started);
        let cached = match (&claim, &result) {
            (Some(_), Ok(layer)) => Some(self.inner.cache.put(&key, layer)),
            _ => None,
        };
        let build = self.build.clone();
        let shared = claim.as_ref().map(|_| result.clone());
        let mut settling = self.settling.lock().unwrap_or_else(|p| p.into_inner());
        while settling.try_join_next().is_some() {}
        settling.spawn(async move {
            if let Some(recorded) = recorded
                && let Err(e) = recorded.await
            {
                tracing::error!(%build, "recording a result: {e}; its status shows it when the build ends");
            }
            if let Some(cached) = cached
                && let Err(e) = cached.await
            {
                tracing::error!(%build, "caching a result: {e}");
            }
            // The claim ends once the entry is in the action cache: a build that plans
            // the same layer just after finds one or the other.
            if let (Some(claim), Some(shared)) = (claim, shared) {
                claim.finish(&shared);
            }
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;

    impl WorkerOutbox for Nowhere {
        fn send(&self, _: ToWorker) -> Result<(), WorkerGone> {
            Ok(())
        }
    }

    fn chain(n: u32) -> ChainId {
        ChainId::parse(&format!("sha256:{n:064x}")).unwrap()
    }

    fn worker(chains: impl IntoIterator<Item = ChainId>) -> Worker {
        Worker {
            session: 0,
            slots: 1,
            platform: "linux/amd64".parse().unwrap(),
            chains: chains.into_iter().collect(),
            outbox: Box::new(Nowhere),
            running: HashSet::new(),
            reserved: 0,
            shares_files: false,
            reports_progress: false,
            unavailable: None,
            last_seen_ms: 0,
            stale: false,
            reconciling: false,
        }
    }

    /// Heartbeats that each report new chains add up to the cap and no further, and the
    /// holders index follows the worker list (a reconnection replaces, a disconnection
    /// removes).
    #[test]
    fn a_worker_reporting_new_chains_every_time_is_kept_to_the_cap() {
        let mut st = Sched::default();
        st.add_worker("w".into(), worker((0..5).map(chain)));
        for round in 1..10 {
            st.add_chains("w", (round * 5..round * 5 + 5).map(chain));
        }
        assert_eq!(st.workers["w"].chains.len(), MAX_CHAINS_HELD);
        let indexed = (0..50)
            .filter(|&n| st.holders.of(&chain(n)).count() == 1)
            .count();
        assert_eq!(
            indexed, MAX_CHAINS_HELD,
            "the index holds what the worker holds"
        );
        // Known ones are not counted again.
        st.add_chains("w", (0..5).map(chain));
        assert_eq!(st.workers["w"].chains.len(), MAX_CHAINS_HELD);

        st.add_worker("w".into(), worker([chain(100)]));
        assert_eq!(
            st.holders.of(&chain(0)).count(),
            0,
            "the old connection's chains"
        );
        assert_eq!(st.holders.of(&chain(100)).collect::<Vec<_>>(), ["w"]);
        st.remove_worker("w");
        assert_eq!(st.holders.of(&chain(100)).count(), 0);
    }
}

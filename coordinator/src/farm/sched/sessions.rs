//! Workers as the scheduler sees them: a registration opens a [`WorkerSession`]; its
//! heartbeats renew the worker's leases, its log lines and results go to the builds that
//! wait for them, and its end takes the worker off the list. The wire protocol (over
//! gRPC, or the embedded worker's channels) lives in `grpc::workers`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use farm_model::{ChainId, JobBase, LayerBlob, LayerFailure, LayerOutcome, Platform};

use super::{Scheduler, Worker};
use crate::farm::Inner;
use crate::state::{AssignmentId, StateError, unix_ms};

/// What the scheduler tells a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToWorker {
    /// The registration is accepted; send heartbeats this often.
    Registered { heartbeat: Duration },
    /// Build this (a [`farm_model::Job`] as JSON) under a lease of `lease`.
    Assign {
        id: AssignmentId,
        job_json: String,
        lease: Duration,
        /// The layer span's W3C trace context (empty when not traced).
        trace: farm_telemetry::TraceContext,
    },
    /// Stop this assignment (its build was cancelled, or its lease was lost).
    Cancel(AssignmentId),
}

/// The worker's connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the worker's connection is gone")]
pub(crate) struct WorkerGone;

/// Where the scheduler's messages to one worker go; the wire layer encodes them.
pub(crate) trait WorkerOutbox: Send + Sync + 'static {
    fn send(&self, message: ToWorker) -> Result<(), WorkerGone>;
}

/// A worker's registration.
#[derive(Debug, Clone)]
pub(crate) struct WorkerInfo {
    pub name: String,
    pub slots: u32,
    pub platform: Platform,
    /// Chains its pool holds.
    pub chains: HashSet<ChainId>,
    /// Assignments it still runs from before it (or the coordinator) reconnected.
    pub running: HashSet<AssignmentId>,
    /// It runs in this process and reads the coordinator's files (the embedded worker).
    pub shares_files: bool,
    /// Why it has no usable slots, if so.
    pub unavailable: Option<String>,
    /// Its name is proven by its token (`--worker-tokens`): it replaces a session
    /// under the same name at once (a reconnect). Without that, a live worker's name
    /// is not taken over.
    pub name_proven: bool,
    /// Its heartbeats name its live assignments (protocol 2.2): only then can it lose a
    /// layer for making no progress (`--progress-timeout`).
    pub reports_progress: bool,
}

/// Why a worker could not be registered: the state store failed, not the worker, so it
/// is not refused; its connection ends and it dials again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    #[error("recording the worker: {0}")]
    Record(StateError),
    #[error("reading the worker's leases: {0}")]
    Leases(StateError),
    /// Another live worker is registered under this name (and the name is not proven
    /// by a token): it is not taken over.
    #[error(
        "a worker named '{0}' is connected and alive: this one is not let in under its \
         name (give it another --name; it is let in once the other is gone)"
    )]
    NameInUse(String),
}

/// A registered worker's connection; [`WorkerSession::disconnect`] (or dropping it) ends
/// it.
pub(crate) struct WorkerSession {
    inner: Arc<Inner>,
    name: String,
    session: u64,
}

impl Scheduler {
    /// Register a worker: reconcile the leases it held with the assignments it still
    /// runs, then give it work through `outbox`.
    pub(in crate::farm) async fn register(
        &self,
        inner: &Arc<Inner>,
        info: WorkerInfo,
        outbox: Box<dyn WorkerOutbox>,
    ) -> Result<WorkerSession, RegisterError> {
        let name = info.name;
        let now = unix_ms();
        if !info.name_proven {
            let st = self.lock();
            let lease = self.lease_ms() as i64;
            if let Some(w) = st.workers.get(&name)
                && !w.stale
                && now - w.last_seen_ms <= lease
            {
                return Err(RegisterError::NameInUse(name));
            }
        }
        inner
            .state
            .upsert_worker(&name, info.slots, &info.platform.to_string(), now)
            .await
            .map_err(RegisterError::Record)?;
        let session = self.sessions.fetch_add(1, Ordering::SeqCst);
        match &info.unavailable {
            Some(why) => tracing::warn!(worker = %name, "worker connected without slots: {why}"),
            None => {
                tracing::info!(worker = %name, slots = info.slots, platform = %info.platform, "worker connected")
            }
        }
        // Before the worker is on the list: nothing may be assigned to it before this.
        let _ = outbox.send(ToWorker::Registered {
            heartbeat: Duration::from_millis((self.lease_ms() / 3).max(50)),
        });
        {
            let mut st = self.lock();
            st.add_worker(
                name.clone(),
                Worker {
                    session,
                    slots: info.slots,
                    platform: info.platform,
                    chains: info.chains,
                    outbox,
                    running: HashSet::new(),
                    reserved: 0,
                    shares_files: info.shares_files,
                    reports_progress: info.reports_progress,
                    unavailable: info.unavailable,
                    last_seen_ms: now,
                    stale: false,
                    reconciling: true,
                },
            );
            inner.metrics.set_workers(st.workers.len());
        }
        let session = WorkerSession {
            inner: inner.clone(),
            name,
            session,
        };
        // Reconcile with the leases this worker held before it (or we) reconnected.
        // Without them it cannot be: the session ends (the worker dials again) rather
        // than cancel or keep work blindly.
        let leases = inner
            .state
            .leases_of(&session.name)
            .await
            .map_err(RegisterError::Leases)?;
        let name = &session.name;
        let held: HashSet<AssignmentId> = leases.iter().map(|l| l.assignment).collect();
        for lease in leases {
            if info.running.contains(&lease.assignment) {
                if let Some(w) = self.lock().workers.get_mut(name) {
                    w.running.insert(lease.assignment);
                }
            } else {
                self.lost(
                    inner,
                    lease.assignment,
                    lease.attempts,
                    name,
                    "restarted and lost the layer",
                )
                .await;
            }
        }
        if let Some(w) = self
            .lock()
            .workers
            .get_mut(name)
            .filter(|w| w.session == session.session)
        {
            // Work we no longer want (released while the worker was away).
            for claim in info.running.difference(&held) {
                w.cancel(*claim);
            }
            w.reconciling = false;
        }
        self.renew(inner, name, unix_ms());
        self.wake.notify_one();
        Ok(session)
    }
}

impl WorkerSession {
    fn sched(&self) -> &Scheduler {
        &self.inner.sched
    }

    /// The worker is alive: renew its leases, note the chains it reports, and give it
    /// work again if a lease of it ran out.
    /// Its records are queued and committed behind: nothing here waits for a commit.
    pub(crate) fn heartbeat(&self, chains: HashSet<ChainId>) {
        let now = unix_ms();
        self.sched().renew(&self.inner, &self.name, now);
        let worker = self.name.clone();
        super::behind(self.inner.state.worker_seen(&worker, now), move |e| {
            tracing::warn!(%worker, "recording the heartbeat: {e}; `farm workers` shows it seen earlier");
        });
        let mut st = self.sched().lock();
        if let Some(w) = st
            .workers
            .get_mut(&self.name)
            .filter(|w| w.session == self.session)
        {
            w.last_seen_ms = now;
            w.stale = false;
            st.add_chains(&self.name, chains);
        }
    }

    /// Output lines of `assignment` (if this worker runs it), into its build's log
    /// file and to its watchers; they count as the assignment's progress. Returns once
    /// they are written: the worker's stream is read no faster than logs are stored.
    pub(crate) async fn logs(&self, assignment: AssignmentId, lines: Vec<String>) {
        let target = self
            .sched()
            .lock()
            .active
            .get(&assignment)
            .filter(|a| a.worker == self.name)
            .map(|a| (a.task.build.clone(), a.task.job.layer.name.clone()));
        let Some((build, layer)) = target else {
            return;
        };
        self.sched().progressed(&[assignment]);
        match self
            .inner
            .logs
            .append(&build, &layer, assignment.0 as u64, lines)
            .await
        {
            Ok(events) => self.inner.publish(&build, events).await,
            Err(e) => {
                tracing::error!(%build, %layer, "writing the build's log: {e}; these lines are lost")
            }
        }
    }

    /// The worker reports these assignments making progress (a sandbox running, a step
    /// under way), though they may print nothing.
    pub(crate) fn progress(&self, live: &[AssignmentId]) {
        let st = self.sched().lock();
        let mine: Vec<AssignmentId> = live
            .iter()
            .copied()
            .filter(|id| st.active.get(id).is_some_and(|a| a.worker == self.name))
            .collect();
        drop(st);
        self.sched().progressed(&mine);
    }

    /// The result of `assignment`, if this session holds it (see `holds`); it
    /// is verified against the blob store (`verify`) before it reaches a
    /// build. The action cache is written by the build's driver, under the key it
    /// computed, never under one the worker names.
    pub(crate) async fn result(&self, assignment: AssignmentId, outcome: LayerOutcome) {
        let (inner, sched, id) = (&self.inner, self.sched(), assignment);
        if !self.holds(id).await {
            tracing::warn!(
                worker = %self.name,
                assignment = %id,
                "dropping a result for an assignment this worker does not hold"
            );
            return;
        }
        let base: Vec<LayerBlob> = match sched.lock().active.get(&id).map(|a| &a.task.job.base) {
            Some(JobBase::Image(image)) => image.layers.clone(),
            _ => Vec::new(),
        };
        let outcome = match outcome {
            Ok(layer) => match super::verify::verify(&inner.config.blobs, &layer, &base).await {
                Ok(()) => Ok(layer),
                Err(e) => {
                    tracing::warn!(worker = %self.name, assignment = %id, "refusing a result: {e}");
                    Err(LayerFailure::internal(format!(
                        "worker {}'s result did not check out: it {e}",
                        self.name
                    )))
                }
            },
            Err(failure) => Err(failure),
        };
        // The lease is released last: until then a driver resuming after a restart still
        // finds it and attaches, so the result below reaches it either way.
        let active = {
            let mut st = sched.lock();
            if let Some(w) = st.workers.get_mut(&self.name) {
                w.running.remove(&id);
            }
            if let Ok(layer) = &outcome {
                st.add_chains(&self.name, [layer.chain_id.clone()]);
            }
            let a = st.active.remove(&id);
            // The worker now holds the chain its base was materialised into, too.
            if let Some(chain) = a.as_ref().and_then(|a| a.task.job.base_chain()) {
                st.add_chains(&self.name, [chain.clone()]);
            }
            inner.metrics.set_running(st.active.len());
            a
        };
        match active {
            // The build's driver records it in the action cache.
            Some(a) => a.task.finish(outcome),
            None => self.result_for_nobody(id, outcome).await,
        }
        sched.release(inner, id);
        sched.wake.notify_one();
    }

    /// Whether this session holds `id`: it is the worker's current session, and `id` is
    /// its active assignment (or one it still ran when it registered), or, after a
    /// coordinator restart before a driver attached, a live lease recorded for it.
    async fn holds(&self, id: AssignmentId) -> bool {
        {
            let st = self.sched().lock();
            let Some(w) = st
                .workers
                .get(&self.name)
                .filter(|w| w.session == self.session)
            else {
                return false;
            };
            if let Some(a) = st.active.get(&id) {
                return a.worker == self.name;
            }
            if w.running.contains(&id) {
                return true;
            }
        }
        match self.inner.state.assignment(id).await {
            Ok(Some((lease, live))) => live && lease.worker == self.name,
            Ok(None) => false,
            Err(e) => {
                tracing::error!(
                    assignment = %id,
                    "reading the assignment of a result: {e}; the result is dropped, and the \
                     layer is built again when its lease runs out"
                );
                false
            }
        }
    }

    /// A result nobody waits for (the coordinator restarted while the worker built): it
    /// is kept for the build's driver when that resumes, which records it in the action
    /// cache under the key it computes.
    async fn result_for_nobody(&self, id: AssignmentId, outcome: LayerOutcome) {
        let (inner, sched) = (&self.inner, self.sched());
        let lease = match inner.state.assignment(id).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::error!(
                    assignment = %id,
                    "reading the assignment of a result: {e}; the result is dropped, and a \
                     resumed build builds the layer again"
                );
                None
            }
        };
        let Some((lease, _)) = lease else { return };
        let mut st = sched.lock();
        // A driver may have attached meanwhile (and counted it on the worker).
        if let Some(w) = st.workers.get_mut(&self.name) {
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

    /// The worker is stopping: it gets no new work, and the assignments it hands back
    /// (ones it holds) go back to the queue, their attempt taken back: a drained
    /// worker is not a failed build.
    pub(crate) async fn drain(&self, hand_back: Vec<AssignmentId>) {
        let (inner, sched) = (&self.inner, self.sched());
        {
            let mut st = sched.lock();
            if let Some(w) = st
                .workers
                .get_mut(&self.name)
                .filter(|w| w.session == self.session)
                && w.unavailable.is_none()
            {
                tracing::info!(worker = %self.name, "worker is draining: no new work for it");
                w.unavailable = Some("draining (the worker is stopping)".into());
            }
        }
        for id in hand_back {
            if !self.holds(id).await {
                tracing::warn!(worker = %self.name, assignment = %id, "ignoring the hand-back of an assignment this worker does not hold");
                continue;
            }
            match inner.state.hand_back(id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(assignment = %id, "recording a hand-back: {e}; the layer moves when its lease runs out");
                    continue;
                }
            }
            let active = {
                let mut st = sched.lock();
                if let Some(w) = st.workers.get_mut(&self.name) {
                    w.running.remove(&id);
                }
                let a = st.active.remove(&id);
                inner.metrics.set_running(st.active.len());
                a
            };
            if let Some(super::Active { task, .. }) = active {
                task.events.log(
                    &task.job.layer.name,
                    format!(
                        "farm: worker {} is stopping and handed the layer back; building it \
                         elsewhere (not counted as a failed attempt)",
                        self.name
                    ),
                );
                sched.lock().queue.push_front(task.waits_again());
            }
        }
        sched.wake.notify_one();
    }

    /// The worker's connection ended.
    pub(crate) fn disconnect(self) {
        drop(self);
    }
}

impl Drop for WorkerSession {
    /// The worker is off the list (unless it reconnected meanwhile); its leases stay
    /// until it reconnects or they run out.
    fn drop(&mut self) {
        let sched = &self.inner.sched;
        let mut st = sched.lock();
        if let Some(w) = st
            .workers
            .get(&self.name)
            .filter(|w| w.session == self.session)
        {
            if w.shares_files {
                tracing::debug!(worker = %self.name, "embedded worker stopped");
            } else {
                tracing::warn!(worker = %self.name, "worker disconnected");
            }
            st.remove_worker(&self.name);
        }
        self.inner.metrics.set_workers(st.workers.len());
    }
}

//! Leases: every assignment of a layer to a worker is a lease in the state store, renewed
//! by the worker's heartbeats. A lease that runs out, or that a reconnecting worker no
//! longer holds, sends the layer to another worker, at most [`MAX_ATTEMPTS`] times.

use std::sync::Arc;

use farm_model::{FailureKind, LayerFailure};

use super::{Active, Scheduler};
use crate::farm::Inner;
use crate::state::{AssignmentId, StateError, unix_ms};

/// How many times a layer may be assigned before its build fails.
pub(crate) const MAX_ATTEMPTS: u32 = 3;

/// Whether a layer lost after `attempts` assignments goes to another worker.
pub(crate) fn may_retry(attempts: u32) -> bool {
    attempts < MAX_ATTEMPTS
}

impl Scheduler {
    pub(super) fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// Lease layer `idx` of `build` to `worker` (counts as one attempt): the new
    /// assignment's id, at once; its lease is committed behind it (see
    /// `StateStore::lease`), and a failure to is logged: the layer is built either way,
    /// but a coordinator restarted before it finishes builds it again.
    pub(super) async fn assign(
        &self,
        inner: &Inner,
        build: &str,
        idx: u32,
        worker: &str,
    ) -> Result<AssignmentId, StateError> {
        let id = inner.state.next_assignment_id().await?;
        let recorded = inner
            .state
            .lease(id, build, idx, worker, self.lease_ms(), unix_ms());
        let build = build.to_string();
        super::behind(recorded, move |e| {
            tracing::error!(%build, assignment = %id, "recording the lease: {e}; the layer is built, but again if the coordinator restarts before it finishes");
        });
        Ok(id)
    }

    /// Renew `worker`'s leases: queued now, committed behind (a worker's heartbeat does
    /// not hold up its next message). A failed write is retried by the next heartbeat;
    /// until one succeeds the leases may run out and their layers move to another
    /// worker.
    pub(super) fn renew(&self, inner: &Inner, worker: &str, now: i64) {
        let worker = worker.to_string();
        super::behind(inner.state.renew(&worker, now), move |e| {
            tracing::warn!(%worker, "renewing leases: {e}; they may run out before the next heartbeat renews them");
        });
    }

    /// End lease `id` in the state store: queued now, committed behind (nothing waits
    /// for it: a worker's next message is not held up by a commit). A write that fails
    /// leaves the lease to run out, and the expiry loop then retries the layer: logged,
    /// never silent.
    pub(super) fn release(&self, inner: &Inner, id: AssignmentId) {
        super::behind(inner.state.release(id), move |e| {
            tracing::error!(assignment = %id, "releasing the lease: {e}; it will expire instead");
        });
    }

    /// Leases that ran out: their layers go back to the queue (or fail).
    pub(super) async fn expire(&self, inner: &Arc<Inner>) {
        let expired = match inner.state.expired(unix_ms()).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("reading expired leases: {e}; trying again at the next tick");
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
    pub(super) async fn lost(
        &self,
        inner: &Arc<Inner>,
        id: AssignmentId,
        attempts: u32,
        worker: &str,
        why: &str,
    ) {
        self.release(inner, id);
        let active = {
            let mut st = self.lock();
            if let Some(w) = st.workers.get_mut(worker) {
                w.running.remove(&id);
                w.stale = true;
                w.cancel(id);
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
            self.lock().queue.push_front(task.waits_again());
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_retried_until_it_was_assigned_max_attempts_times() {
        assert_eq!(MAX_ATTEMPTS, 3);
        assert!(may_retry(0) && may_retry(1) && may_retry(2));
        assert!(!may_retry(3) && !may_retry(4));
    }
}

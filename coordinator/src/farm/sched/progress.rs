//! A lease that needs progress: heartbeats say a worker is alive, not that a layer
//! moves. Each assignment notes when it last made progress (output from its worker, or
//! the worker's heartbeat naming it live: a sandbox running, a layer being exported);
//! one that made none for `FarmConfig::progress_timeout` is taken from its worker and
//! built again elsewhere (a failed attempt, as a lost lease is).

use std::sync::Arc;

use super::Scheduler;
use crate::farm::Inner;
use crate::state::{AssignmentId, unix_ms};

impl Scheduler {
    /// `ids` made progress now.
    pub(super) fn progressed(&self, ids: &[AssignmentId]) {
        if ids.is_empty() {
            return;
        }
        let now = unix_ms();
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            progress.insert(*id, now);
        }
    }

    /// Assignments that made no progress for the progress timeout go to another
    /// worker (or fail after the last attempt). An assignment's clock starts when the
    /// check first sees it (at most one tick after it was sent).
    pub(super) async fn stalled(&self, inner: &Arc<Inner>) {
        let timeout = inner.config.progress_timeout;
        if timeout.is_zero() {
            return;
        }
        let timeout_ms = timeout.as_millis() as i64;
        let now = unix_ms();
        let stalled: Vec<(AssignmentId, String)> = {
            let st = self.lock();
            let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            progress.retain(|id, _| st.active.contains_key(id));
            st.active
                .iter()
                // A worker from before 2.2 never says a silent run is live.
                .filter(|(_, a)| {
                    st.workers
                        .get(&a.worker)
                        .is_some_and(|w| w.reports_progress)
                })
                .filter_map(|(id, a)| {
                    let last = *progress.entry(*id).or_insert(now);
                    (now - last > timeout_ms).then(|| (*id, a.worker.clone()))
                })
                .collect()
        };
        for (id, worker) in stalled {
            let attempts = match inner.state.assignment(id).await {
                Ok(Some((lease, _))) => lease.attempts,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(assignment = %id, "reading a stalled assignment: {e}; trying again at the next tick");
                    continue;
                }
            };
            tracing::warn!(%worker, assignment = %id, ?timeout, "no progress: taking the layer back");
            self.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            self.lost(
                inner,
                id,
                attempts,
                &worker,
                &format!(
                    "made no progress on the layer for {} (no output, no running sandbox; \
                     the limit is `farm coordinator --progress-timeout`)",
                    humantime(timeout)
                ),
            )
            .await;
        }
    }
}

/// `d` as people write it (`30m`, `90s`, `1h`).
fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

//! The farm's garbage collection: every `--gc-interval` in the background (its own
//! task: scheduling goes on, see `crate::gc` for how it stays bounded), or on demand.

use std::sync::Arc;

use super::{Farm, FarmError, Inner};
use crate::gc::{GcPolicy, GcReport, collect};

/// Start the periodic collection, if the configuration asks for one. The task ends
/// with the farm.
pub(super) fn spawn_periodic(inner: &Arc<Inner>) {
    let Some(interval) = inner.config.gc.interval.filter(|i| !i.is_zero()) else {
        return;
    };
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(inner) = weak.upgrade() else { return };
            let policy = inner.config.gc.policy.clone();
            if let Err(e) = inner.collect_garbage(&policy, false).await {
                tracing::warn!(
                    "garbage collection failed: {e}; the next one runs in {}",
                    humantime_secs(interval.as_secs())
                );
            }
        }
    });
}

fn humantime_secs(s: u64) -> String {
    match s {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl Inner {
    async fn collect_garbage(
        &self,
        policy: &GcPolicy,
        dry_run: bool,
    ) -> Result<GcReport, FarmError> {
        let _one = self.collecting.lock().await;
        let res = collect(
            &self.state,
            &self.cache,
            &self.config.blobs,
            policy,
            dry_run,
        )
        .await;
        match res {
            Ok(report) => {
                self.metrics.gc().collected(&report);
                if !report.dry_run && report.builds_forgotten > 0 {
                    // The log files of the builds forgotten go with them.
                    self.sweep_logs().await;
                }
                Ok(report)
            }
            Err(e) => {
                self.metrics.gc().failed();
                Err(e.into())
            }
        }
    }
}

impl Farm {
    /// Collect garbage now with `policy` (the configured one: `self.gc_policy()`);
    /// with `dry_run` nothing is removed. Waits for a collection already running.
    pub async fn collect_garbage(
        &self,
        policy: &GcPolicy,
        dry_run: bool,
    ) -> Result<GcReport, FarmError> {
        self.inner.collect_garbage(policy, dry_run).await
    }

    /// The garbage collection policy the farm was configured with.
    pub fn gc_policy(&self) -> &GcPolicy {
        &self.inner.config.gc.policy
    }
}

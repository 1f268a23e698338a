//! Cancelling a build from anywhere: Ctrl-C cancels every build of an engine, the
//! coordinator one job; a cancelled sandbox is killed. A job's token also says whether
//! the job is busy with something that prints nothing (its sandbox runs, its layer is
//! exported): the agent reports that to the coordinator as progress.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Cancels a run from anywhere (clone it freely).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
    /// Cancelling the parent cancels this token too (one job's token under the
    /// engine-wide one).
    parent: Option<CancelToken>,
    /// Steps under way that show progress without output ([`CancelToken::busy`]).
    busy: AtomicUsize,
}

/// A step under way (see [`CancelToken::busy`]); it ends when dropped.
#[derive(Debug)]
pub struct Busy(CancelToken);

impl Drop for Busy {
    fn drop(&mut self) {
        (self.0).0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled by its own `cancel` or by this one's.
    pub fn child(&self) -> Self {
        CancelToken(Arc::new(CancelInner {
            parent: Some(self.clone()),
            ..Default::default()
        }))
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// The job is busy until the guard is dropped (a sandbox runs, a layer is being
    /// exported): progress, though it may print nothing.
    pub fn busy(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Whether a [`CancelToken::busy`] guard of this token is alive.
    pub fn is_busy(&self) -> bool {
        self.0.busy.load(Ordering::SeqCst) > 0
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
            || self.0.parent.as_ref().is_some_and(|p| p.is_cancelled())
    }

    /// Resolves once [`cancel`](Self::cancel) has been called (here or on a parent).
    pub async fn cancelled(&self) {
        match &self.0.parent {
            Some(parent) => {
                tokio::select! {
                    _ = self.own_cancelled() => {}
                    _ = Box::pin(parent.cancelled()) => {}
                }
            }
            None => self.own_cancelled().await,
        }
    }

    async fn own_cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_busy_while_a_guard_lives() {
        let job = CancelToken::new().child();
        assert!(!job.is_busy());
        let sandbox = job.busy();
        let export = job.clone().busy();
        assert!(job.is_busy());
        drop(sandbox);
        assert!(job.is_busy());
        drop(export);
        assert!(!job.is_busy());
    }
}

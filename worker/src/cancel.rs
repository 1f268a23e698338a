//! Cancelling a build from anywhere: Ctrl-C cancels every build of an engine, the
//! coordinator one job; a cancelled sandbox is killed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

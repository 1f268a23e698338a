//! Scratch directories of a build in the pool: overlay upper/work dirs for a sandbox,
//! writable snapshots of a chain, staging trees; removed when the build ends.

use super::{Engine, EngineError};
use crate::pool::{ChainHandle, ChainId, Workspace, WorkspaceOptions};

impl Engine {
    /// A fresh workspace in the pool: overlay upper/work dirs, and/or a writable
    /// snapshot of a chain.
    pub(super) async fn workspace(
        &self,
        overlay_dirs: bool,
        snapshot_of: Option<ChainId>,
    ) -> Result<Workspace, EngineError> {
        self.blocking(move |pool| {
            // A handle of our own for the blocking thread (handles hold locks).
            let chain = match &snapshot_of {
                Some(id) => pool.chain(id)?,
                None => None,
            };
            pool.workspace(WorkspaceOptions {
                overlay_dirs,
                snapshot_of: chain.as_ref(),
            })
        })
        .await
    }

    /// Upper and work dirs for a sandbox's overlay, owned by container root.
    pub(super) async fn overlay_workspace(&self) -> Result<Workspace, EngineError> {
        let ws = self.workspace(true, None).await?;
        let m = self.userns.mapping();
        for d in [ws.upper(), ws.work()].into_iter().flatten() {
            let _ = m.make_owned_by_container_root(d);
        }
        Ok(ws)
    }

    /// A writable snapshot of `chain`.
    pub(super) async fn snapshot_workspace(
        &self,
        chain: &ChainHandle,
    ) -> Result<Workspace, EngineError> {
        self.workspace(false, Some(chain.id().clone())).await
    }

    /// Removes `ws` (on a blocking thread); a failure is only logged.
    pub(super) async fn remove_workspace(&self, ws: Workspace) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = ws.remove() {
                tracing::warn!("removing a build workspace: {e}");
            }
        })
        .await;
    }
}

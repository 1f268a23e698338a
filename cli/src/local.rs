//! The embedded engine of this machine: state dir, blob store, action cache, pool and
//! the worker engine, opened the same way for every command that builds or reads
//! built layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use farm_coordinator::cache::ActionCache;
use farm_image::BlobStore;
use farm_worker::engine::{Engine, EngineOptions, UsernsDeleter};
use farm_worker::pool::{Pool, PoolOptions};
use farm_worker::{Entry, Userns};

use crate::common::Layout;

pub(crate) struct Local {
    pub layout: Layout,
    pub blobs: BlobStore,
    pub cache: ActionCache,
    pub pool: Pool,
    pub engine: Arc<Engine>,
}

impl Local {
    pub(crate) async fn open(layout: Layout, timeout: Option<Duration>) -> anyhow::Result<Local> {
        refuse_another_users(&layout.state_dir, "state dir", "--state-dir")?;
        refuse_another_users(&layout.pool, "pool", "--pool")?;
        std::fs::create_dir_all(&layout.state_dir)
            .with_context(|| format!("creating the state dir {}", layout.state_dir.display()))?;
        let blobs = BlobStore::local(&layout.state_dir.join("blobs"))
            .with_context(|| format!("opening the blob store in {}", layout.state_dir.display()))?;
        let cache = ActionCache::open(&layout.state_dir.join("cache.db")).await?;
        let userns = Userns::detect(Entry::current_exe()?)?;
        let pool = {
            let dir: PathBuf = layout.pool.clone();
            let opts = PoolOptions::default().with_deleter(Arc::new(UsernsDeleter(userns.clone())));
            tokio::task::spawn_blocking(move || Pool::open(&dir, opts))
                .await?
                .with_context(|| format!("opening the pool {}", layout.pool.display()))?
        };
        let engine = Arc::new(Engine::new(
            pool.clone(),
            blobs.clone(),
            userns,
            EngineOptions {
                timeout,
                compression_threads: 0,
                extract: Default::default(),
            },
        ));
        Ok(Local {
            layout,
            blobs,
            cache,
            pool,
            engine,
        })
    }
}

/// One user's state and pool are that user's: chains root creates in a user's pool are
/// root's, and the user's next build cannot snapshot them. Refused before anything is
/// written, as stacker does.
fn refuse_another_users(dir: &Path, what: &str, flag: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(()); // created below, by and for this user
    };
    let me = nix::unistd::geteuid();
    if meta.uid() == me.as_raw() {
        return Ok(());
    }
    let name = |uid: u32| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or_else(
                || format!("uid {uid}"),
                |u| format!("{} (uid {uid})", u.name),
            )
    };
    anyhow::bail!(
        "the {what} {} belongs to {}, but this build runs as {}; one user's builds cannot \
         share a {what} with another's (the other's next build could not use what this one \
         writes). Build as {} again, or pass a {what} of your own with {flag}",
        dir.display(),
        name(meta.uid()),
        name(me.as_raw()),
        name(meta.uid()),
    )
}

/// Run an async command body on a fresh multi-threaded runtime.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(f))
}

//! The coordinator's durable state: builds, their layers, leases (assignments of layers to
//! workers), events, log lines and workers, in one SQLite database in the state dir.
//!
//! Every change is committed before the call returns, so a coordinator killed at any
//! moment and restarted on the same file loses no build: [`StateStore::unfinished_builds`]
//! lists what to resume, leases still held by workers stay in the `assignments` table
//! until they are renewed by the reconnecting worker or found by [`StateStore::expired`].
//!
//! Times are unix milliseconds passed in by the caller (tests control them), except the
//! creation time recorded by [`StateStore::create_build`].

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sqlx::sqlite::SqlitePool;

mod listing;
mod pages;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    build_id TEXT NOT NULL REFERENCES builds(id),
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    worker TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    cached INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER,
    manifest_digest TEXT,
    PRIMARY KEY (build_id, idx)
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    worker TEXT NOT NULL,
    lease_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS assignments_active ON assignments (released, expires_ms);
CREATE TABLE IF NOT EXISTS events (
    build_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
CREATE TABLE IF NOT EXISTS logs (
    build_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    layer TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
CREATE TABLE IF NOT EXISTS build_owners (
    build_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    slots INTEGER NOT NULL,
    platform TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    provider TEXT NOT NULL,
    delivery TEXT NOT NULL,
    repo TEXT NOT NULL,
    sha TEXT NOT NULL,
    builds TEXT NOT NULL DEFAULT '[]',
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (provider, delivery)
);
CREATE TABLE IF NOT EXISTS webhook_builds (
    repo TEXT NOT NULL,
    sha TEXT NOT NULL,
    build TEXT NOT NULL,
    build_id TEXT NOT NULL,
    git_ref TEXT NOT NULL DEFAULT '',
    delivery TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (repo, sha, build)
);
";

/// A build's id: `b-<unix_ms>-<random hex>` (sorts by creation time).
pub type BuildId = String;

/// An assignment (one lease of one layer to one worker); unique across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssignmentId(pub i64);

impl fmt::Display for AssignmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a-{}", self.0)
    }
}

impl FromStr for AssignmentId {
    type Err = UnknownWord;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("a-")
            .and_then(|n| n.parse().ok())
            .map(AssignmentId)
            .ok_or_else(|| UnknownWord {
                what: "assignment id",
                word: s.to_string(),
            })
    }
}

pub use farm_model::{BuildState, LayerState, UnknownWord};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Db { path: String, source: sqlx::Error },
    /// A group-committed write failed (see `group_commit`).
    #[error("state database {path}: {source}")]
    Write {
        path: String,
        source: rusqlite::Error,
    },
    #[error("state database {path} is corrupt: {source}")]
    Corrupt { path: String, source: UnknownWord },
    #[error("no build {0}")]
    NoBuild(String),
    #[error("build {build} has no layer {idx}")]
    NoLayer { build: String, idx: u32 },
    #[error("no assignment {0}")]
    NoAssignment(AssignmentId),
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRow {
    pub id: BuildId,
    /// The submission as JSON.
    pub spec_json: String,
    pub state: BuildState,
    /// Why the build failed.
    pub error: Option<String>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRow {
    pub build_id: BuildId,
    pub idx: u32,
    pub name: String,
    pub state: LayerState,
    pub worker: Option<String>,
    pub error: Option<String>,
    pub attempts: u32,
    /// The built layer (`farm_model::BuiltImage` as JSON) once built or cached.
    pub result_json: Option<String>,
    pub cached: bool,
    pub duration_ms: Option<u64>,
    pub manifest_digest: Option<String>,
}

/// One layer's result, for [`StateStore::layer_results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerResult {
    pub idx: u32,
    pub result_json: String,
    pub cached: bool,
    pub duration_ms: u64,
    pub manifest_digest: Option<String>,
}

/// An active lease of one layer to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub assignment: AssignmentId,
    pub build_id: BuildId,
    pub idx: u32,
    pub worker: String,
    /// The layer's attempts so far, this one included.
    pub attempts: u32,
    pub expires_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub name: String,
    pub slots: u32,
    pub platform: String,
    pub last_seen_ms: i64,
}

/// The status JSON: `{"id","state","layers":[{"name","state","worker","cached","duration_ms","manifest_digest"}]}`
/// (plus `error` where there is one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildStatus {
    pub id: BuildId,
    pub state: BuildState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub layers: Vec<LayerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerStatus {
    pub name: String,
    pub state: LayerState,
    pub worker: Option<String>,
    pub cached: bool,
    pub duration_ms: Option<u64>,
    pub manifest_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

type BuildTuple = (String, String, String, Option<String>, i64);
type LayerTuple = (
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    Option<String>,
    bool,
    Option<i64>,
    Option<String>,
);
type LeaseTuple = (i64, String, i64, String, i64, i64);

macro_rules! build_cols {
    () => {
        "id, spec, state, error, created_ms"
    };
}
macro_rules! layer_cols {
    () => {
        "build_id, idx, name, state, worker, error, attempts, result, cached, duration_ms, manifest_digest"
    };
}
macro_rules! lease_select {
    ($cond:literal) => {
        concat!(
            "SELECT a.id, a.build_id, a.idx, a.worker, a.expires_ms, l.attempts
             FROM assignments a JOIN layers l ON l.build_id = a.build_id AND l.idx = a.idx
             WHERE a.released = 0 AND ",
            $cond,
            " ORDER BY a.id"
        )
    };
}

/// How many assignment ids are reserved in the store at once (see
/// [`StateStore::next_assignment_id`]).
const ID_BLOCK: i64 = 4096;

/// Assignment ids reserved in the store and not handed out yet: `next..end`.
#[derive(Debug, Default)]
struct IdBlock {
    next: i64,
    end: i64,
}

/// The coordinator's state; cheap to clone (a shared connection pool).
#[derive(Debug, Clone)]
pub struct StateStore {
    pool: SqlitePool,
    path: String,
    /// Layer states and results, leases and events: written in group commits.
    writer: crate::group_commit::GroupCommit,
    ids: std::sync::Arc<tokio::sync::Mutex<IdBlock>>,
}

impl StateStore {
    /// Open (creating if missing) the state database at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let pool = crate::db::open(path, SCHEMA)
            .await
            .map_err(|source| StateError::Db {
                path: shown.clone(),
                source,
            })?;
        let writer =
            crate::group_commit::GroupCommit::start(path).map_err(|source| StateError::Write {
                path: shown.clone(),
                source,
            })?;
        let store = StateStore {
            pool,
            path: shown,
            writer,
            ids: Default::default(),
        };
        // A webhook delivery answered 202 whose builds never started (the coordinator
        // stopped between the answer and the submit) would answer every redelivery with
        // "nothing to do": forget it, so the forge's "Redeliver" starts it. One that
        // matched no build is forgotten too, harmlessly: its redelivery matches none again.
        sqlx::query("DELETE FROM webhook_deliveries WHERE builds = '[]'")
            .execute(&store.pool)
            .await
            .map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// The connection pool, for the garbage collector's paged reads (`crate::gc`).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub(crate) fn err(&self, source: sqlx::Error) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Run `f` in the writer's next group commit; returns once that committed (see
    /// `group_commit`). `f` maps its errors with the [`Db`](StateError::Db) maker it is
    /// given.
    /// Queue `f` on the writer now (see `GroupCommit::write`: writes commit in the
    /// order they were queued); the future answers once it committed.
    fn write<T: Send + 'static, F>(
        &self,
        f: F,
    ) -> impl Future<Output = Result<T>> + Send + 'static + use<T, F>
    where
        F: FnOnce(&rusqlite::Connection, DbErr) -> Result<T> + Send + 'static,
    {
        let err = DbErr(self.path.clone());
        let failed = err.clone();
        self.writer.write(
            move |e| failed.of(crate::group_commit::clone_error(e)),
            move |conn| f(conn, err),
        )
    }

    /// Hold the state writer (and the database's write lock) for `d`, as a slow disk or
    /// a long transaction would: what waits for a commit waits that long.
    #[cfg(test)]
    pub(crate) fn stall_writer(
        &self,
        d: std::time::Duration,
    ) -> impl Future<Output = Result<()>> + use<> {
        self.write(move |_, _| {
            std::thread::sleep(d);
            Ok(())
        })
    }

    fn word<T: FromStr<Err = UnknownWord>>(&self, s: &str) -> Result<T> {
        s.parse().map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }

    // ---- builds ----

    /// Record a new queued build with its layers (waiting, no attempts), atomically.
    pub async fn create_build(&self, spec_json: &str, layer_names: &[String]) -> Result<BuildId> {
        self.create_build_owned(spec_json, layer_names, None).await
    }

    /// [`StateStore::create_build`], recording the principal that submitted it (when
    /// clients authenticate).
    pub async fn create_build_owned(
        &self,
        spec_json: &str,
        layer_names: &[String],
        owner: Option<&str>,
    ) -> Result<BuildId> {
        let now = unix_ms();
        let id = format!("b-{now}-{:08x}", random_u32());
        // Through the writer: a plan of 20,000 layers is 20,000 inserts, each a round
        // trip to the pool connection's thread.
        let (build, spec, owner, names) = (
            id.clone(),
            spec_json.to_string(),
            owner.map(str::to_string),
            layer_names.to_vec(),
        );
        self.write(move |conn, err| {
            conn.prepare_cached(
                "INSERT INTO builds (id, spec, state, error, created_ms) VALUES (?1, ?2, ?3, NULL, ?4)",
            )
            .and_then(|mut q| {
                q.execute(rusqlite::params![build, spec, BuildState::Queued.as_str(), now])
            })
            .map_err(|e| err.of(e))?;
            if let Some(owner) = owner {
                conn.prepare_cached("INSERT INTO build_owners (build_id, owner) VALUES (?1, ?2)")
                    .and_then(|mut q| q.execute(rusqlite::params![build, owner]))
                    .map_err(|e| err.of(e))?;
            }
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO layers (build_id, idx, name, state, attempts) VALUES (?1, ?2, ?3, ?4, 0)",
                )
                .map_err(|e| err.of(e))?;
            for (idx, name) in names.iter().enumerate() {
                insert
                    .execute(rusqlite::params![build, idx as i64, name, LayerState::Waiting.as_str()])
                    .map_err(|e| err.of(e))?;
            }
            Ok(())
        })
        .await?;
        Ok(id)
    }

    fn build_row(&self, (id, spec_json, state, error, created_ms): BuildTuple) -> Result<BuildRow> {
        Ok(BuildRow {
            id,
            spec_json,
            state: self.word(&state)?,
            error,
            created_ms,
        })
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>> {
        let row: Option<BuildTuple> = sqlx::query_as(concat!(
            "SELECT ",
            build_cols!(),
            " FROM builds WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| self.build_row(r)).transpose()
    }

    /// The principal that submitted build `id`, if one was recorded.
    pub async fn build_owner(&self, id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT owner FROM build_owners WHERE build_id = ?1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(row.map(|(o,)| o))
    }

    /// The builds `owner` submitted, oldest first.
    pub async fn list_builds_of(&self, owner: &str) -> Result<Vec<BuildRow>> {
        let rows: Vec<BuildTuple> = sqlx::query_as(
            "SELECT b.id, b.spec, b.state, b.error, b.created_ms FROM builds b
             JOIN build_owners o ON o.build_id = b.id
             WHERE o.owner = ?1 ORDER BY b.created_ms, b.id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter().map(|r| self.build_row(r)).collect()
    }

    /// Every build, oldest first.
    pub async fn list_builds(&self) -> Result<Vec<BuildRow>> {
        let rows: Vec<BuildTuple> = sqlx::query_as(concat!(
            "SELECT ",
            build_cols!(),
            " FROM builds ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter().map(|r| self.build_row(r)).collect()
    }

    /// Forget finished builds beyond the newest `keep` (their layers, events, logs and
    /// leases too); queued and running builds are never touched. Returns how many went.
    pub async fn prune_finished(&self, keep: usize) -> Result<u64> {
        let finished = [
            BuildState::Succeeded.as_str(),
            BuildState::Failed.as_str(),
            BuildState::Cancelled.as_str(),
        ];
        // IMMEDIATE: the write lock is taken (and waited for) at BEGIN; a deferred
        // transaction that reads first can fail to upgrade when another writer commits.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))?;
        let doomed: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM builds WHERE state IN (?1, ?2, ?3)
             ORDER BY created_ms DESC, id DESC LIMIT -1 OFFSET ?4",
        )
        .bind(finished[0])
        .bind(finished[1])
        .bind(finished[2])
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        for (id,) in &doomed {
            for statement in [
                "DELETE FROM layers WHERE build_id = ?1",
                "DELETE FROM events WHERE build_id = ?1",
                "DELETE FROM logs WHERE build_id = ?1",
                "DELETE FROM assignments WHERE build_id = ?1",
                "DELETE FROM build_owners WHERE build_id = ?1",
                "DELETE FROM builds WHERE id = ?1",
            ] {
                sqlx::query(statement)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        let gone = doomed.len() as u64;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(gone)
    }

    /// Queued and running builds, oldest first: what a restarted coordinator resumes.
    pub async fn unfinished_builds(&self) -> Result<Vec<BuildRow>> {
        let rows: Vec<BuildTuple> = sqlx::query_as(concat!(
            "SELECT ",
            build_cols!(),
            " FROM builds WHERE state IN (?1, ?2) ORDER BY created_ms, id"
        ))
        .bind(BuildState::Queued.as_str())
        .bind(BuildState::Running.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter().map(|r| self.build_row(r)).collect()
    }

    pub async fn set_build_state(&self, id: &str, state: BuildState) -> Result<()> {
        let done = sqlx::query("UPDATE builds SET state = ?2 WHERE id = ?1")
            .bind(id)
            .bind(state.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        if done.rows_affected() == 0 {
            return Err(StateError::NoBuild(id.to_string()));
        }
        Ok(())
    }

    /// Mark the build failed, saying why.
    pub async fn fail_build(&self, id: &str, reason: &str) -> Result<()> {
        let done = sqlx::query("UPDATE builds SET state = ?2, error = ?3 WHERE id = ?1")
            .bind(id)
            .bind(BuildState::Failed.as_str())
            .bind(reason)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        if done.rows_affected() == 0 {
            return Err(StateError::NoBuild(id.to_string()));
        }
        Ok(())
    }

    /// Cancel an unfinished build: the build and its unfinished layers become cancelled
    /// and their active leases are released. Returns the leases that were active (their
    /// workers should be told to stop), or `None` if the build had already finished.
    pub async fn cancel_build(&self, id: &str) -> Result<Option<Vec<Lease>>> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let done = sqlx::query("UPDATE builds SET state = ?2 WHERE id = ?1 AND state IN (?3, ?4)")
            .bind(id)
            .bind(BuildState::Cancelled.as_str())
            .bind(BuildState::Queued.as_str())
            .bind(BuildState::Running.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        if done.rows_affected() == 0 {
            let exists: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM builds WHERE id = ?1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            return match exists {
                Some(_) => Ok(None),
                None => Err(StateError::NoBuild(id.to_string())),
            };
        }
        sqlx::query("UPDATE layers SET state = ?2 WHERE build_id = ?1 AND state IN (?3, ?4)")
            .bind(id)
            .bind(LayerState::Cancelled.as_str())
            .bind(LayerState::Waiting.as_str())
            .bind(LayerState::Running.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        let rows: Vec<LeaseTuple> = sqlx::query_as(lease_select!("a.build_id = ?1"))
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query("UPDATE assignments SET released = 1 WHERE build_id = ?1 AND released = 0")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some(rows.into_iter().map(lease_row).collect()))
    }

    /// The status JSON's contents.
    pub async fn status(&self, id: &str) -> Result<Option<BuildStatus>> {
        let Some(build) = self.build(id).await? else {
            return Ok(None);
        };
        let layers = self
            .layers(id)
            .await?
            .into_iter()
            .map(|l| LayerStatus {
                name: l.name,
                state: l.state,
                worker: l.worker,
                cached: l.cached,
                duration_ms: l.duration_ms,
                manifest_digest: l.manifest_digest,
                error: l.error,
            })
            .collect();
        Ok(Some(BuildStatus {
            id: build.id,
            state: build.state,
            error: build.error,
            layers,
        }))
    }

    // ---- layers ----

    /// Set a layer's state, worker and error (each replaced, `None` clears).
    pub async fn set_layer_state(
        &self,
        build: &str,
        idx: u32,
        state: LayerState,
        worker: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        let (build, worker, error) = (
            build.to_string(),
            worker.map(str::to_string),
            error.map(str::to_string),
        );
        self.write(move |conn, err| {
            let done = conn
                .prepare_cached(
                    "UPDATE layers SET state = ?3, worker = ?4, error = ?5 WHERE build_id = ?1 AND idx = ?2",
                )
                .and_then(|mut q| q.execute(rusqlite::params![build, idx, state.as_str(), worker, error]))
                .map_err(|e| err.of(e))?;
            layer_updated(done, &build, idx)
        })
        .await
    }

    /// A layer was answered from the action cache: `cached`, unless this build already
    /// recorded it built (before a coordinator restart), which it stays.
    pub async fn mark_cached(&self, build: &str, idx: u32) -> Result<()> {
        self.mark_cached_many(build, vec![idx]).await
    }

    /// [`Self::mark_cached`] for several layers of a build, in one write.
    pub async fn mark_cached_many(&self, build: &str, idxs: Vec<u32>) -> Result<()> {
        let build = build.to_string();
        self.write(move |conn, err| {
            let mut q = conn
                .prepare_cached(
                    "UPDATE layers SET state = ?3, error = NULL
                     WHERE build_id = ?1 AND idx = ?2 AND result IS NULL",
                )
                .map_err(|e| err.of(e))?;
            for idx in idxs {
                q.execute(rusqlite::params![build, idx, LayerState::Cached.as_str()])
                    .map_err(|e| err.of(e))?;
            }
            Ok(())
        })
        .await
    }

    /// Record a layer's result; its state becomes `cached` or `built`, its error clears.
    ///
    /// Queued when called: a write of this store queued after it (a dependent layer's
    /// lease, the build's events) commits no earlier, so the caller need not wait for
    /// the future before going on.
    pub fn layer_result(
        &self,
        build: &str,
        idx: u32,
        result_json: &str,
        cached: bool,
        duration_ms: u64,
        manifest_digest: Option<&str>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        self.layer_results(
            build,
            vec![LayerResult {
                idx,
                result_json: result_json.to_string(),
                cached,
                duration_ms,
                manifest_digest: manifest_digest.map(str::to_string),
            }],
        )
    }

    /// Record several layers' results in one transaction (see [`Self::layer_result`]).
    pub fn layer_results(
        &self,
        build: &str,
        results: Vec<LayerResult>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        let build = build.to_string();
        self.write(move |conn, err| layer_results_in(conn, &err, &build, &results))
    }

    /// A build's layers in plan order.
    pub async fn layers(&self, build: &str) -> Result<Vec<LayerRow>> {
        let rows: Vec<LayerTuple> = sqlx::query_as(concat!(
            "SELECT ",
            layer_cols!(),
            " FROM layers WHERE build_id = ?1 ORDER BY idx"
        ))
        .bind(build)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter().map(|r| self.layer_row(r)).collect()
    }

    // ---- leases ----

    /// Lease layer `idx` of `build` to `worker` until `now + lease_ms`: the layer becomes
    /// running on that worker and its attempts grow by one. Answers once the lease is
    /// committed (the scheduler does not wait: see [`Self::lease`]).
    pub async fn assign(
        &self,
        build: &str,
        idx: u32,
        worker: &str,
        lease_ms: u64,
        now: i64,
    ) -> Result<AssignmentId> {
        let id = self.next_assignment_id().await?;
        self.lease(id, build, idx, worker, lease_ms, now).await?;
        Ok(id)
    }

    /// A new assignment id, never handed out before, by this process or any before it
    /// on this store, whether or not its lease was ever written: ids come from blocks
    /// reserved in the store (`sqlite_sequence`, where AUTOINCREMENT keeps the largest
    /// id it gave) before any id of the block is used. An assignment may so be sent
    /// before its lease commits, and a worker naming it after a crash that lost the
    /// lease can never be taken for another one's.
    pub async fn next_assignment_id(&self) -> Result<AssignmentId> {
        let mut block = self.ids.lock().await;
        if block.next == block.end {
            let last = self
                .write(|conn, err| reserve_assignment_ids(conn, ID_BLOCK).map_err(|e| err.of(e)))
                .await?;
            *block = IdBlock {
                next: last - ID_BLOCK + 1,
                end: last + 1,
            };
        }
        let id = block.next;
        block.next += 1;
        Ok(AssignmentId(id))
    }

    /// Lease layer `idx` of `build` to `worker` as assignment `id` (from
    /// [`Self::next_assignment_id`]) until `now + lease_ms`, as [`Self::assign`].
    ///
    /// Queued when called: the scheduler sends the assignment without waiting for the
    /// commit, and writes it queues after (the lease's release, the layer's result)
    /// commit no earlier. A coordinator killed before the lease commits forgets the
    /// assignment: the layer is queued again when the build resumes, and the worker's
    /// result for the unknown id is dropped.
    pub fn lease(
        &self,
        id: AssignmentId,
        build: &str,
        idx: u32,
        worker: &str,
        lease_ms: u64,
        now: i64,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX / 2);
        let (build, worker) = (build.to_string(), worker.to_string());
        self.write(move |conn, err| {
            let done = conn
                .prepare_cached(
                    "UPDATE layers SET attempts = attempts + 1, state = ?3, worker = ?4, error = NULL
                     WHERE build_id = ?1 AND idx = ?2",
                )
                .and_then(|mut q| {
                    q.execute(rusqlite::params![build, idx, LayerState::Running.as_str(), worker])
                })
                .map_err(|e| err.of(e))?;
            layer_updated(done, &build, idx)?;
            conn.prepare_cached(
                "INSERT INTO assignments (id, build_id, idx, worker, lease_ms, expires_ms, released)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
            )
            .and_then(|mut q| {
                q.execute(rusqlite::params![
                    id.0,
                    build,
                    idx,
                    worker,
                    lease_ms,
                    now.saturating_add(lease_ms)
                ])
            })
            .map_err(|e| err.of(e))?;
            Ok(())
        })
    }

    /// A heartbeat from `worker`: every active lease it holds now expires at
    /// `now + its lease`. Returns how many leases were renewed.
    ///
    /// Queued when called (see [`Self::lease`]).
    pub fn renew(
        &self,
        worker: &str,
        now: i64,
    ) -> impl Future<Output = Result<u64>> + Send + 'static + use<> {
        let worker = worker.to_string();
        self.write(move |conn, err| {
            let done = conn
                .prepare_cached(
                    "UPDATE assignments SET expires_ms = ?2 + lease_ms WHERE worker = ?1 AND released = 0",
                )
                .and_then(|mut q| q.execute(rusqlite::params![worker, now]))
                .map_err(|e| err.of(e))?;
            Ok(done as u64)
        })
    }

    /// Every active lease now expires at `now + its lease` (a restarted coordinator gives
    /// workers one lease period to reconnect).
    pub async fn renew_all(&self, now: i64) -> Result<u64> {
        let done =
            sqlx::query("UPDATE assignments SET expires_ms = ?1 + lease_ms WHERE released = 0")
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }

    /// The active lease of layer `idx` of `build`, if a worker holds it.
    pub async fn active_lease(&self, build: &str, idx: u32) -> Result<Option<Lease>> {
        let row: Option<LeaseTuple> =
            sqlx::query_as(lease_select!("a.build_id = ?1 AND a.idx = ?2"))
                .bind(build)
                .bind(i64::from(idx))
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(row.map(lease_row))
    }

    /// Active leases whose expiry is at or before `now`, oldest assignment first.
    pub async fn expired(&self, now: i64) -> Result<Vec<Lease>> {
        let rows: Vec<LeaseTuple> = sqlx::query_as(lease_select!("a.expires_ms <= ?1"))
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(lease_row).collect())
    }

    /// Active leases held by `worker`, every lease queued before this call included
    /// (leases are queued, not waited for: a reconnecting worker is reconciled with
    /// every assignment sent to it, not only the committed ones).
    pub async fn leases_of(&self, worker: &str) -> Result<Vec<Lease>> {
        self.write(|_, _| Ok(())).await?;
        let rows: Vec<LeaseTuple> = sqlx::query_as(lease_select!("a.worker = ?1"))
            .bind(worker)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(lease_row).collect())
    }

    /// One assignment, active or released (`None` if unknown). The bool is `true` while
    /// the lease is active.
    pub async fn assignment(&self, id: AssignmentId) -> Result<Option<(Lease, bool)>> {
        let row: Option<(i64, String, i64, String, i64, i64, bool)> = sqlx::query_as(
            "SELECT a.id, a.build_id, a.idx, a.worker, a.expires_ms, l.attempts, a.released = 0
             FROM assignments a JOIN layers l ON l.build_id = a.build_id AND l.idx = a.idx
             WHERE a.id = ?1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.map(|(a, b, i, w, e, n, active)| (lease_row((a, b, i, w, e, n)), active)))
    }

    /// End a lease (result in, worker lost, cancelled). Returns `false` if it had already
    /// been released, so a late result or a second expiry is noticed.
    ///
    /// Queued when called (see [`Self::lease`]): a lease queued before commits first.
    pub fn release(
        &self,
        id: AssignmentId,
    ) -> impl Future<Output = Result<bool>> + Send + 'static + use<> {
        self.write(move |conn, err| {
            if released_in(conn, &err, id)? {
                return Ok(true);
            }
            let exists = conn
                .prepare_cached("SELECT 1 FROM assignments WHERE id = ?1")
                .and_then(|mut q| q.exists([id.0]))
                .map_err(|e| err.of(e))?;
            if exists {
                Ok(false)
            } else {
                Err(StateError::NoAssignment(id))
            }
        })
    }

    /// A worker gave lease `id` back before it finished (it is stopping): the lease
    /// ends and the layer's attempt is taken back (a drained worker is no failure).
    /// Returns `false` if the lease had already been released.
    pub async fn hand_back(&self, id: AssignmentId) -> Result<bool> {
        // Through the writer: a lease queued before (not yet committed) is handed back
        // too, not missed.
        self.write(move |conn, err| {
            let released = released_in(conn, &err, id)?;
            if released {
                conn.prepare_cached(
                    "UPDATE layers SET attempts = attempts - 1, state = ?2, worker = NULL
                     WHERE attempts > 0 AND (build_id, idx) =
                       (SELECT build_id, idx FROM assignments WHERE id = ?1)",
                )
                .and_then(|mut q| q.execute(rusqlite::params![id.0, LayerState::Waiting.as_str()]))
                .map_err(|e| err.of(e))?;
            }
            Ok(released)
        })
        .await
    }

    // ---- events and logs ----

    /// Append an event to a build's stream; returns its sequence number (1, 2, ... per
    /// build, never reused, distinct under concurrent appends).
    pub async fn append_event(&self, build: &str, json: &str) -> Result<u64> {
        self.append_events(build, &[json.to_string()]).await
    }

    /// Append several events in one transaction; returns the last one's sequence number
    /// (they are numbered consecutively).
    pub async fn append_events(&self, build: &str, jsons: &[String]) -> Result<u64> {
        let (build, jsons) = (build.to_string(), jsons.to_vec());
        self.write(move |conn, err| append_events_in(conn, &err, &build, &jsons))
            .await
    }

    /// A build's events with a sequence number above `after`, in order.
    pub async fn events_after(&self, build: &str, after: u64) -> Result<Vec<(u64, String)>> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, json FROM events WHERE build_id = ?1 AND seq > ?2 ORDER BY seq",
        )
        .bind(build)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(|(s, j)| (s as u64, j)).collect())
    }

    /// Append log lines of `layer` to a build, atomically; returns the last line's
    /// sequence number (0 if `lines` is empty). Sequence numbers are per build.
    pub async fn append_logs(&self, build: &str, layer: &str, lines: &[String]) -> Result<u64> {
        if lines.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let mut last = 0;
        for line in lines {
            let (seq,): (i64,) = sqlx::query_as(
                "INSERT INTO logs (build_id, seq, layer, line)
                 SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3 FROM logs WHERE build_id = ?1
                 RETURNING seq",
            )
            .bind(build)
            .bind(layer)
            .bind(line)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            last = seq as u64;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(last)
    }

    /// A build's log lines (of one layer, or all) with a sequence number above `after`:
    /// `(seq, layer, line)` in order.
    pub async fn logs(
        &self,
        build: &str,
        layer: Option<&str>,
        after: u64,
    ) -> Result<Vec<(u64, String, String)>> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, layer, line FROM logs
             WHERE build_id = ?1 AND seq > ?2 AND (?3 IS NULL OR layer = ?3) ORDER BY seq",
        )
        .bind(build)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(layer)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(s, l, line)| (s as u64, l, line))
            .collect())
    }

    // ---- workers ----

    /// A worker registered (or re-registered after a reconnect).
    pub async fn upsert_worker(
        &self,
        name: &str,
        slots: u32,
        platform: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers (name, slots, platform, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET slots = excluded.slots,
                platform = excluded.platform, last_seen_ms = excluded.last_seen_ms",
        )
        .bind(name)
        .bind(i64::from(slots))
        .bind(platform)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// A sign of life from `worker`; `false` if it never registered.
    ///
    /// Queued when called (see [`Self::lease`]).
    pub fn worker_seen(
        &self,
        name: &str,
        now: i64,
    ) -> impl Future<Output = Result<bool>> + Send + 'static + use<> {
        let name = name.to_string();
        self.write(move |conn, err| {
            let done = conn
                .prepare_cached("UPDATE workers SET last_seen_ms = ?2 WHERE name = ?1")
                .and_then(|mut q| q.execute(rusqlite::params![name, now]))
                .map_err(|e| err.of(e))?;
            Ok(done == 1)
        })
    }

    /// Every worker ever registered, by name.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>> {
        let rows: Vec<(String, i64, String, i64)> =
            sqlx::query_as("SELECT name, slots, platform, last_seen_ms FROM workers ORDER BY name")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(name, slots, platform, last_seen_ms)| WorkerRow {
                name,
                slots: slots as u32,
                platform,
                last_seen_ms,
            })
            .collect())
    }
}

/// Makes the store's [`StateError::Write`] inside a group-committed write.
#[derive(Clone)]
struct DbErr(String);

impl DbErr {
    fn of(&self, source: rusqlite::Error) -> StateError {
        StateError::Write {
            path: self.0.clone(),
            source,
        }
    }
}

/// End lease `id` on `conn`: `false` if it had already ended (or is unknown).
fn released_in(conn: &rusqlite::Connection, err: &DbErr, id: AssignmentId) -> Result<bool> {
    let done = conn
        .prepare_cached("UPDATE assignments SET released = 1 WHERE id = ?1 AND released = 0")
        .and_then(|mut q| q.execute([id.0]))
        .map_err(|e| err.of(e))?;
    Ok(done == 1)
}

/// [`StateStore::append_events`] on `conn`: numbered after the build's last event.
fn append_events_in(
    conn: &rusqlite::Connection,
    err: &DbErr,
    build: &str,
    jsons: &[String],
) -> Result<u64> {
    let last: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE build_id = ?1")
        .and_then(|mut q| q.query_row([build], |r| r.get(0)))
        .map_err(|e| err.of(e))?;
    let mut insert = conn
        .prepare_cached("INSERT INTO events (build_id, seq, json) VALUES (?1, ?2, ?3)")
        .map_err(|e| err.of(e))?;
    let mut seq = last;
    for json in jsons {
        seq += 1;
        insert
            .execute(rusqlite::params![build, seq, json])
            .map_err(|e| err.of(e))?;
    }
    Ok(seq as u64)
}

/// [`StateStore::layer_results`] on `conn`.
fn layer_results_in(
    conn: &rusqlite::Connection,
    err: &DbErr,
    build: &str,
    results: &[LayerResult],
) -> Result<()> {
    let mut update = conn
        .prepare_cached(
            "UPDATE layers SET state = ?3, result = ?4, cached = ?5, duration_ms = ?6,
                manifest_digest = ?7, error = NULL
             WHERE build_id = ?1 AND idx = ?2",
        )
        .map_err(|e| err.of(e))?;
    for r in results {
        let state = if r.cached {
            LayerState::Cached
        } else {
            LayerState::Built
        };
        let done = update
            .execute(rusqlite::params![
                build,
                r.idx,
                state.as_str(),
                r.result_json,
                r.cached,
                i64::try_from(r.duration_ms).unwrap_or(i64::MAX),
                r.manifest_digest,
            ])
            .map_err(|e| err.of(e))?;
        layer_updated(done, build, r.idx)?;
    }
    Ok(())
}

fn lease_row((id, build_id, idx, worker, expires_ms, attempts): LeaseTuple) -> Lease {
    Lease {
        assignment: AssignmentId(id),
        build_id,
        idx: idx as u32,
        worker,
        attempts: attempts as u32,
        expires_ms,
    }
}

/// Now, in unix milliseconds.
/// Reserve the next `n` assignment ids: returns the last of them. AUTOINCREMENT keeps the
/// largest id it ever gave in `sqlite_sequence` and never gives one at or under it; ids
/// inserted explicitly at or under it leave it alone. So a block reserved here is never
/// given again, by AUTOINCREMENT or by a later reservation, even if its ids were never
/// written.
fn reserve_assignment_ids(conn: &rusqlite::Connection, n: i64) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    let bumped: Option<i64> = conn
        .prepare_cached(
            "UPDATE sqlite_sequence SET seq = seq + ?1 WHERE name = 'assignments' RETURNING seq",
        )?
        .query_row([n], |r| r.get(0))
        .optional()?;
    if let Some(last) = bumped {
        return Ok(last);
    }
    // No assignment yet on this store (its row appears with the first).
    let last: i64 = conn.query_row(
        "SELECT COALESCE(MAX(id), 0) + ?1 FROM assignments",
        [n],
        |r| r.get(0),
    )?;
    conn.execute(
        "INSERT INTO sqlite_sequence (name, seq) VALUES ('assignments', ?1)",
        [last],
    )?;
    Ok(last)
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn random_u32() -> u32 {
    // std's RandomState is seeded randomly per process and advances per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

/// `NoLayer` when an update of layer (`build`, `idx`) touched no row.
fn layer_updated(rows: usize, build: &str, idx: u32) -> Result<()> {
    if rows == 0 {
        return Err(StateError::NoLayer {
            build: build.to_string(),
            idx,
        });
    }
    Ok(())
}

// ---- webhook deliveries (issue 15) ----

/// The webhook delivery that started a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookOrigin {
    /// `PROVIDER:OWNER/NAME`, as the webhook listener keys repositories.
    pub repo_key: String,
    pub sha: String,
    /// The build's name in the repository's `.farm.yaml`.
    pub build: String,
    pub git_ref: String,
    pub delivery: String,
}

impl WebhookOrigin {
    /// The provider and the repository of [`repo_key`](Self::repo_key).
    pub fn provider_and_repo(&self) -> (&str, &str) {
        self.repo_key
            .split_once(':')
            .unwrap_or(("", self.repo_key.as_str()))
    }
}

impl StateStore {
    /// Record webhook delivery `delivery` of `provider`. `None` when it is new; else the
    /// build ids recorded for it before (a redelivery, which starts nothing).
    pub async fn record_delivery(
        &self,
        provider: &str,
        delivery: &str,
        repo: &str,
        sha: &str,
    ) -> Result<Option<Vec<BuildId>>> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO webhook_deliveries (provider, delivery, repo, sha, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(provider)
        .bind(delivery)
        .bind(repo)
        .bind(sha)
        .bind(unix_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        if done.rows_affected() == 1 {
            return Ok(None);
        }
        let (json,): (String,) = sqlx::query_as(
            "SELECT builds FROM webhook_deliveries WHERE provider = ?1 AND delivery = ?2",
        )
        .bind(provider)
        .bind(delivery)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(Some(serde_json::from_str(&json).unwrap_or_default()))
    }

    /// Forget delivery `delivery` of `provider` (its work failed before any build
    /// started: a redelivery tries again).
    pub async fn forget_delivery(&self, provider: &str, delivery: &str) -> Result<()> {
        sqlx::query("DELETE FROM webhook_deliveries WHERE provider = ?1 AND delivery = ?2")
            .bind(provider)
            .bind(delivery)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The build ids started for delivery `delivery` of `provider`.
    pub async fn set_delivery_builds(
        &self,
        provider: &str,
        delivery: &str,
        builds: &[BuildId],
    ) -> Result<()> {
        let json = serde_json::to_string(builds).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "UPDATE webhook_deliveries SET builds = ?3 WHERE provider = ?1 AND delivery = ?2",
        )
        .bind(provider)
        .bind(delivery)
        .bind(json)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The webhook that started build `build_id`: (repo key, sha, build name, ref,
    /// delivery); `None` for builds no webhook started.
    pub async fn webhook_origin(&self, build_id: &str) -> Result<Option<WebhookOrigin>> {
        let row: Option<(String, String, String, String, String)> = sqlx::query_as(
            "SELECT repo, sha, build, git_ref, delivery FROM webhook_builds WHERE build_id = ?1",
        )
        .bind(build_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(
            row.map(|(repo_key, sha, build, git_ref, delivery)| WebhookOrigin {
                repo_key,
                sha,
                build,
                git_ref,
                delivery,
            }),
        )
    }

    /// The build already started for (`repo`, `sha`, `build`), if any.
    pub async fn webhook_build(
        &self,
        repo: &str,
        sha: &str,
        build: &str,
    ) -> Result<Option<BuildId>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT build_id FROM webhook_builds WHERE repo = ?1 AND sha = ?2 AND build = ?3",
        )
        .bind(repo)
        .bind(sha)
        .bind(build)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.0))
    }

    /// Remember that (`repo`, `sha`, `build`) is built by `build_id`, started by
    /// `delivery` for `git_ref`.
    pub async fn set_webhook_build(
        &self,
        repo: &str,
        sha: &str,
        build: &str,
        build_id: &str,
        git_ref: &str,
        delivery: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO webhook_builds (repo, sha, build, build_id, git_ref, delivery)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(repo)
        .bind(sha)
        .bind(build)
        .bind(build_id)
        .bind(git_ref)
        .bind(delivery)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, StateStore) {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::open(&d.path().join("state.db")).await.unwrap();
        (d, s)
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_delivery_that_started_no_build_is_forgotten_at_the_next_start() {
        let (d, s) = store().await;
        assert_eq!(
            s.record_delivery("github", "d1", "r", "a").await.unwrap(),
            None
        );
        assert_eq!(
            s.record_delivery("github", "d2", "r", "b").await.unwrap(),
            None
        );
        let started: Vec<BuildId> = vec!["b1".into()];
        s.set_delivery_builds("github", "d2", &started)
            .await
            .unwrap();
        // Until the coordinator stops, both are redeliveries.
        assert_eq!(
            s.record_delivery("github", "d1", "r", "a").await.unwrap(),
            Some(vec![])
        );
        drop(s);
        let s = StateStore::open(&d.path().join("state.db")).await.unwrap();
        // d1 had started nothing (stopped between its 202 and its submit): new again.
        assert_eq!(
            s.record_delivery("github", "d1", "r", "a").await.unwrap(),
            None
        );
        assert_eq!(
            s.record_delivery("github", "d2", "r", "b").await.unwrap(),
            Some(started)
        );
    }

    #[tokio::test]
    async fn owners_are_recorded_listed_and_forgotten_with_their_builds() {
        let (_d, s) = store().await;
        let a = s
            .create_build_owned("{}", &[], Some("alice"))
            .await
            .unwrap();
        let b = s.create_build_owned("{}", &[], Some("bob")).await.unwrap();
        let nobody = s.create_build("{}", &[]).await.unwrap();
        assert_eq!(s.build_owner(&a).await.unwrap().as_deref(), Some("alice"));
        assert_eq!(s.build_owner(&nobody).await.unwrap(), None);
        let ids = |rows: Vec<BuildRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_builds_of("alice").await.unwrap()),
            vec![a.clone()]
        );
        assert_eq!(ids(s.list_builds_of("bob").await.unwrap()), vec![b.clone()]);
        assert_eq!(s.list_builds().await.unwrap().len(), 3);
        for id in [&a, &b, &nobody] {
            s.set_build_state(id, BuildState::Succeeded).await.unwrap();
        }
        s.prune_finished(0).await.unwrap();
        assert_eq!(s.build_owner(&a).await.unwrap(), None);
        assert!(s.list_builds_of("alice").await.unwrap().is_empty());
    }

    #[test]
    fn state_words_round_trip() {
        for s in BuildState::ALL {
            assert_eq!(s.as_str().parse::<BuildState>().unwrap(), *s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for s in LayerState::ALL {
            assert_eq!(s.as_str().parse::<LayerState>().unwrap(), *s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert!("done".parse::<BuildState>().is_err());
        assert!("Waiting".parse::<LayerState>().is_err());
        assert_eq!(
            AssignmentId(42)
                .to_string()
                .parse::<AssignmentId>()
                .unwrap(),
            AssignmentId(42)
        );
        assert!("42".parse::<AssignmentId>().is_err());
    }

    #[tokio::test]
    async fn builds_round_trip() {
        let (_d, s) = store().await;
        let a = s
            .create_build(r#"{"file":"a"}"#, &names(&["base", "app"]))
            .await
            .unwrap();
        let b = s.create_build("{}", &[]).await.unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("b-"));
        let row = s.build(&a).await.unwrap().unwrap();
        assert_eq!(row.spec_json, r#"{"file":"a"}"#);
        assert_eq!(row.state, BuildState::Queued);
        assert_eq!(row.error, None);
        assert_eq!(s.build("b-nope").await.unwrap(), None);
        let list: Vec<String> = s
            .list_builds()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(list.len(), 2);
        assert!(list.contains(&a) && list.contains(&b));

        s.set_build_state(&a, BuildState::Running).await.unwrap();
        s.fail_build(&b, "layer app: 3 attempts, worker w1 lost")
            .await
            .unwrap();
        let bb = s.build(&b).await.unwrap().unwrap();
        assert_eq!(bb.state, BuildState::Failed);
        assert_eq!(
            bb.error.as_deref(),
            Some("layer app: 3 attempts, worker w1 lost")
        );
        let unfinished = s.unfinished_builds().await.unwrap();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].id, a);
        assert!(matches!(
            s.set_build_state("b-nope", BuildState::Running).await,
            Err(StateError::NoBuild(_))
        ));
    }

    /// Ids handed out whose leases never committed (a coordinator killed first) are not
    /// handed out again after a restart; nor are ids AUTOINCREMENT gave before ids were
    /// reserved in blocks.
    #[tokio::test]
    async fn assignment_ids_are_never_given_twice_even_when_their_leases_were_lost() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        let mut given = Vec::new();
        let build = {
            let s = StateStore::open(&path).await.unwrap();
            let build = s.create_build("{}", &names(&["a", "b"])).await.unwrap();
            given.push(s.assign(&build, 0, "w1", 10_000, 0).await.unwrap());
            // Sent to workers, and the process killed before their leases committed.
            for _ in 0..3 {
                given.push(s.next_assignment_id().await.unwrap());
            }
            build
        };
        for _ in 0..2 {
            let s = StateStore::open(&path).await.unwrap();
            let next = s.assign(&build, 1, "w2", 10_000, 0).await.unwrap();
            assert!(given.iter().all(|g| g.0 < next.0), "{next} after {given:?}");
            given.push(next);
            given.push(s.next_assignment_id().await.unwrap());
        }
        // A store whose assignments AUTOINCREMENT numbered.
        let s = StateStore::open(&d.path().join("old.db")).await.unwrap();
        let b = s.create_build("{}", &names(&["a"])).await.unwrap();
        for _ in 0..5 {
            sqlx::query(
                "INSERT INTO assignments (build_id, idx, worker, lease_ms, expires_ms, released)
                 VALUES (?1, 0, 'w', 1, 1, 1)",
            )
            .bind(&b)
            .execute(&s.pool)
            .await
            .unwrap();
        }
        let next = s.next_assignment_id().await.unwrap();
        assert!(next.0 > 5, "{next}");
    }

    /// A worker's leases, read while some are still queued behind a slow commit, include
    /// them: a reconnecting worker keeps every layer it was sent.
    #[tokio::test]
    async fn a_workers_leases_include_those_still_queued() {
        let (_d, s) = store().await;
        let build = s.create_build("{}", &names(&["a", "b"])).await.unwrap();
        let first = s.assign(&build, 0, "w1", 10_000, 0).await.unwrap();
        let stalled = s.stall_writer(std::time::Duration::from_millis(300));
        let second = s.next_assignment_id().await.unwrap();
        let queued = s.lease(second, &build, 1, "w1", 10_000, 0);
        let held: Vec<AssignmentId> = s
            .leases_of("w1")
            .await
            .unwrap()
            .iter()
            .map(|l| l.assignment)
            .collect();
        assert_eq!(held, [first, second]);
        stalled.await.unwrap();
        queued.await.unwrap();
    }

    #[tokio::test]
    async fn layers_round_trip_and_status() {
        let (_d, s) = store().await;
        let id = s
            .create_build("{}", &names(&["base", "app", "extra"]))
            .await
            .unwrap();
        let layers = s.layers(&id).await.unwrap();
        assert_eq!(layers.len(), 3);
        assert_eq!(layers[1].name, "app");
        assert_eq!(layers[1].idx, 1);
        assert!(
            layers
                .iter()
                .all(|l| l.state == LayerState::Waiting && l.attempts == 0 && l.worker.is_none())
        );

        s.set_layer_state(&id, 0, LayerState::Running, Some("w1"), None)
            .await
            .unwrap();
        s.layer_result(&id, 0, r#"{"x":1}"#, true, 12, Some("sha256:m0"))
            .await
            .unwrap();
        s.layer_result(&id, 1, r#"{"x":2}"#, false, 3400, None)
            .await
            .unwrap();
        s.set_layer_state(&id, 2, LayerState::Failed, Some("w2"), Some("exit 1"))
            .await
            .unwrap();
        assert!(matches!(
            s.set_layer_state(&id, 9, LayerState::Running, None, None)
                .await,
            Err(StateError::NoLayer { idx: 9, .. })
        ));
        let layers = s.layers(&id).await.unwrap();
        assert_eq!(layers[0].state, LayerState::Cached);
        assert!(layers[0].cached);
        assert_eq!(layers[0].worker.as_deref(), Some("w1"));
        assert_eq!(layers[0].result_json.as_deref(), Some(r#"{"x":1}"#));
        assert_eq!(layers[0].duration_ms, Some(12));
        assert_eq!(layers[0].manifest_digest.as_deref(), Some("sha256:m0"));
        assert_eq!(layers[1].state, LayerState::Built);
        assert!(!layers[1].cached);
        assert_eq!(layers[2].state, LayerState::Failed);
        assert_eq!(layers[2].error.as_deref(), Some("exit 1"));

        let status = serde_json::to_value(s.status(&id).await.unwrap().unwrap()).unwrap();
        assert_eq!(
            status,
            serde_json::json!({
                "id": id,
                "state": "queued",
                "layers": [
                    {"name": "base", "state": "cached", "worker": "w1", "cached": true,
                     "duration_ms": 12, "manifest_digest": "sha256:m0"},
                    {"name": "app", "state": "built", "worker": null, "cached": false,
                     "duration_ms": 3400, "manifest_digest": null},
                    {"name": "extra", "state": "failed", "worker": "w2", "cached": false,
                     "duration_ms": null, "manifest_digest": null, "error": "exit 1"},
                ]
            })
        );
        assert_eq!(s.status("b-nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn leases_expire_and_renew() {
        let (_d, s) = store().await;
        let id = s.create_build("{}", &names(&["a", "b"])).await.unwrap();
        let a0 = s.assign(&id, 0, "w1", 10_000, 1_000).await.unwrap();
        let a1 = s.assign(&id, 1, "w2", 10_000, 2_000).await.unwrap();
        assert_ne!(a0, a1);
        let l = &s.layers(&id).await.unwrap()[0];
        assert_eq!(
            (l.state, l.worker.as_deref(), l.attempts),
            (LayerState::Running, Some("w1"), 1)
        );

        assert!(s.expired(10_999).await.unwrap().is_empty());
        let e = s.expired(11_000).await.unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0],
            Lease {
                assignment: a0,
                build_id: id.clone(),
                idx: 0,
                worker: "w1".into(),
                attempts: 1,
                expires_ms: 11_000,
            }
        );
        // A heartbeat from w1 at 9s pushes its lease to 19s; w2's stays at 12s.
        assert_eq!(s.renew("w1", 9_000).await.unwrap(), 1);
        assert_eq!(s.renew("nobody", 9_000).await.unwrap(), 0);
        assert!(s.expired(11_000).await.unwrap().is_empty());
        let e = s.expired(12_000).await.unwrap();
        assert_eq!(e.iter().map(|l| l.assignment).collect::<Vec<_>>(), vec![a1]);
        assert_eq!(s.leases_of("w1").await.unwrap()[0].expires_ms, 19_000);
        let e = s.expired(20_000).await.unwrap();
        assert_eq!(e.len(), 2);

        assert!(s.release(a0).await.unwrap());
        assert!(!s.release(a0).await.unwrap());
        assert!(matches!(
            s.release(AssignmentId(999)).await,
            Err(StateError::NoAssignment(_))
        ));
        let e = s.expired(20_000).await.unwrap();
        assert_eq!(e.iter().map(|l| l.assignment).collect::<Vec<_>>(), vec![a1]);
        // Released leases are not renewed.
        s.renew("w1", 30_000).await.unwrap();
        let (lease, active) = s.assignment(a0).await.unwrap().unwrap();
        assert!(!active);
        assert_eq!(lease.expires_ms, 19_000);
        assert!(s.assignment(a1).await.unwrap().unwrap().1);
        assert_eq!(s.assignment(AssignmentId(999)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_lease_handed_back_takes_its_attempt_back() {
        let (_d, s) = store().await;
        let id = s.create_build("{}", &names(&["a"])).await.unwrap();
        let a = s.assign(&id, 0, "w1", 1000, 0).await.unwrap();
        assert_eq!(s.layers(&id).await.unwrap()[0].attempts, 1);
        assert!(s.hand_back(a).await.unwrap());
        let l = &s.layers(&id).await.unwrap()[0];
        assert_eq!((l.attempts, l.state), (0, LayerState::Waiting));
        assert!(s.active_lease(&id, 0).await.unwrap().is_none());
        // A second hand-back (or one after the result) changes nothing.
        assert!(!s.hand_back(a).await.unwrap());
        assert_eq!(s.layers(&id).await.unwrap()[0].attempts, 0);
        // A lease still queued (sent, not yet committed) is handed back too, however the
        // hand-back and the commit interleave.
        for _ in 0..20 {
            let b = s.next_assignment_id().await.unwrap();
            let queued = s.lease(b, &id, 0, "w1", 1000, 0);
            assert!(s.hand_back(b).await.unwrap(), "{b} was not handed back");
            queued.await.unwrap();
            assert!(s.active_lease(&id, 0).await.unwrap().is_none());
            assert_eq!(s.layers(&id).await.unwrap()[0].attempts, 0);
        }
    }

    #[tokio::test]
    async fn attempts_count_up_to_the_retry_limit() {
        let (_d, s) = store().await;
        let id = s.create_build("{}", &names(&["a"])).await.unwrap();
        let mut now = 0;
        let mut workers = Vec::new();
        loop {
            let w = format!("w{}", workers.len());
            s.assign(&id, 0, &w, 10_000, now).await.unwrap();
            workers.push(w);
            now += 10_000;
            let lost = s.expired(now).await.unwrap();
            assert_eq!(lost.len(), 1);
            let lease = &lost[0];
            assert_eq!(lease.attempts as usize, workers.len());
            assert!(s.release(lease.assignment).await.unwrap());
            // The scheduler's limit (see `farm::sched::leases`) is three attempts.
            if lease.attempts == 3 {
                s.set_layer_state(&id, 0, LayerState::Failed, None, Some("lost"))
                    .await
                    .unwrap();
                s.fail_build(&id, "layer a: worker lost 3 times")
                    .await
                    .unwrap();
                break;
            }
            s.set_layer_state(&id, 0, LayerState::Waiting, None, None)
                .await
                .unwrap();
        }
        assert_eq!(workers, ["w0", "w1", "w2"]);
        assert_eq!(s.layers(&id).await.unwrap()[0].attempts, 3);
        assert_eq!(
            s.build(&id).await.unwrap().unwrap().state,
            BuildState::Failed
        );
    }

    #[tokio::test]
    async fn cancel_releases_leases() {
        let (_d, s) = store().await;
        let id = s
            .create_build("{}", &names(&["a", "b", "c"]))
            .await
            .unwrap();
        s.set_build_state(&id, BuildState::Running).await.unwrap();
        s.layer_result(&id, 0, "{}", false, 1, None).await.unwrap();
        let a1 = s.assign(&id, 1, "w1", 10_000, 0).await.unwrap();
        let leases = s.cancel_build(&id).await.unwrap().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].assignment, a1);
        assert_eq!(leases[0].worker, "w1");
        let states: Vec<LayerState> = s
            .layers(&id)
            .await
            .unwrap()
            .iter()
            .map(|l| l.state)
            .collect();
        assert_eq!(
            states,
            [
                LayerState::Built,
                LayerState::Cancelled,
                LayerState::Cancelled
            ]
        );
        assert_eq!(
            s.build(&id).await.unwrap().unwrap().state,
            BuildState::Cancelled
        );
        assert!(s.expired(i64::MAX).await.unwrap().is_empty());
        assert_eq!(s.cancel_build(&id).await.unwrap(), None);
        assert!(matches!(
            s.cancel_build("b-nope").await,
            Err(StateError::NoBuild(_))
        ));
    }

    #[tokio::test]
    async fn events_are_sequenced_per_build() {
        let (_d, s) = store().await;
        let a = s.create_build("{}", &[]).await.unwrap();
        let b = s.create_build("{}", &[]).await.unwrap();
        assert_eq!(s.append_event(&a, r#"{"n":1}"#).await.unwrap(), 1);
        assert_eq!(s.append_event(&a, r#"{"n":2}"#).await.unwrap(), 2);
        assert_eq!(s.append_event(&b, r#"{"n":1}"#).await.unwrap(), 1);
        assert_eq!(s.append_event(&a, r#"{"n":3}"#).await.unwrap(), 3);
        assert_eq!(
            s.events_after(&a, 0).await.unwrap(),
            vec![
                (1, r#"{"n":1}"#.to_string()),
                (2, r#"{"n":2}"#.to_string()),
                (3, r#"{"n":3}"#.to_string())
            ]
        );
        assert_eq!(
            s.events_after(&a, 2).await.unwrap(),
            vec![(3, r#"{"n":3}"#.to_string())]
        );
        assert!(s.events_after(&a, 3).await.unwrap().is_empty());
        assert_eq!(s.events_after(&b, 0).await.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_get_distinct_seqs() {
        let (_d, s) = store().await;
        let id = s.create_build("{}", &[]).await.unwrap();
        let task = |s: StateStore, id: String, tag: &'static str| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..50 {
                    seqs.push(
                        s.append_event(&id, &format!(r#"{{"{tag}":{i}}}"#))
                            .await
                            .unwrap(),
                    );
                    s.append_logs(&id, tag, &[format!("{tag} {i}"), format!("{tag} {i}b")])
                        .await
                        .unwrap();
                }
                seqs
            })
        };
        let t1 = task(s.clone(), id.clone(), "x");
        let t2 = task(s.clone(), id.clone(), "y");
        let mut all = t1.await.unwrap();
        let mut second = t2.await.unwrap();
        for seqs in [&all, &second] {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "monotonic per task");
        }
        all.append(&mut second);
        all.sort();
        assert_eq!(all, (1..=100).collect::<Vec<u64>>());
        let logs = s.logs(&id, None, 0).await.unwrap();
        let seqs: Vec<u64> = logs.iter().map(|l| l.0).collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
        // A batch stays contiguous.
        for pair in logs.chunks(2) {
            assert_eq!(pair[0].1, pair[1].1);
            assert_eq!(format!("{}b", pair[0].2), pair[1].2);
        }
    }

    #[tokio::test]
    async fn logs_round_trip() {
        let (_d, s) = store().await;
        let id = s.create_build("{}", &names(&["a", "b"])).await.unwrap();
        assert_eq!(s.append_logs(&id, "a", &[]).await.unwrap(), 0);
        assert_eq!(
            s.append_logs(&id, "a", &names(&["a1", "a2"]))
                .await
                .unwrap(),
            2
        );
        assert_eq!(s.append_logs(&id, "b", &names(&["b1"])).await.unwrap(), 3);
        s.append_logs(&id, "a", &names(&["a3"])).await.unwrap();
        let t = |v: Vec<(u64, String, String)>| {
            v.into_iter()
                .map(|(s, l, x)| format!("{s}:{l}:{x}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            t(s.logs(&id, None, 0).await.unwrap()),
            ["1:a:a1", "2:a:a2", "3:b:b1", "4:a:a3"]
        );
        assert_eq!(
            t(s.logs(&id, Some("a"), 1).await.unwrap()),
            ["2:a:a2", "4:a:a3"]
        );
        assert_eq!(t(s.logs(&id, Some("b"), 0).await.unwrap()), ["3:b:b1"]);
        assert!(s.logs(&id, Some("c"), 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn workers_round_trip() {
        let (_d, s) = store().await;
        s.upsert_worker("w2", 4, "linux/arm64", 100).await.unwrap();
        s.upsert_worker("w1", 2, "linux/amd64", 200).await.unwrap();
        assert!(s.worker_seen("w2", 300).await.unwrap());
        assert!(!s.worker_seen("ghost", 300).await.unwrap());
        s.upsert_worker("w1", 8, "linux/amd64", 400).await.unwrap();
        assert_eq!(
            s.workers().await.unwrap(),
            vec![
                WorkerRow {
                    name: "w1".into(),
                    slots: 8,
                    platform: "linux/amd64".into(),
                    last_seen_ms: 400
                },
                WorkerRow {
                    name: "w2".into(),
                    slots: 4,
                    platform: "linux/arm64".into(),
                    last_seen_ms: 300
                },
            ]
        );
    }

    #[tokio::test]
    async fn everything_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        let (running, done, a0) = {
            let s = StateStore::open(&path).await.unwrap();
            let running = s
                .create_build(r#"{"r":1}"#, &names(&["a", "b"]))
                .await
                .unwrap();
            let done = s.create_build("{}", &names(&["c"])).await.unwrap();
            let queued = s.create_build("{}", &names(&["q"])).await.unwrap();
            s.set_build_state(&running, BuildState::Running)
                .await
                .unwrap();
            s.set_build_state(&done, BuildState::Succeeded)
                .await
                .unwrap();
            let _ = queued;
            s.layer_result(&running, 0, "{}", false, 5, Some("sha256:m"))
                .await
                .unwrap();
            let a0 = s.assign(&running, 1, "w1", 10_000, 1_000).await.unwrap();
            s.append_event(&running, r#"{"e":1}"#).await.unwrap();
            s.append_logs(&running, "b", &names(&["hello"]))
                .await
                .unwrap();
            s.upsert_worker("w1", 2, "linux/amd64", 1_000)
                .await
                .unwrap();
            (running, done, a0)
            // The store (and its pool) drops here, as when the process dies.
        };
        let s = StateStore::open(&path).await.unwrap();
        let unfinished: Vec<(String, BuildState)> = s
            .unfinished_builds()
            .await
            .unwrap()
            .into_iter()
            .map(|b| (b.id, b.state))
            .collect();
        assert_eq!(unfinished.len(), 2);
        assert!(unfinished.contains(&(running.clone(), BuildState::Running)));
        assert!(!unfinished.iter().any(|(id, _)| id == &done));
        assert_eq!(s.list_builds().await.unwrap().len(), 3);
        assert_eq!(
            s.build(&running).await.unwrap().unwrap().spec_json,
            r#"{"r":1}"#
        );
        let layers = s.layers(&running).await.unwrap();
        assert_eq!(layers[0].state, LayerState::Built);
        assert_eq!(layers[0].manifest_digest.as_deref(), Some("sha256:m"));
        assert_eq!(layers[1].state, LayerState::Running);
        assert_eq!(layers[1].worker.as_deref(), Some("w1"));
        assert_eq!(layers[1].attempts, 1);
        // The reconnecting worker renews its lease; ids keep growing after a restart.
        assert_eq!(s.renew("w1", 20_000).await.unwrap(), 1);
        assert!(s.expired(29_999).await.unwrap().is_empty());
        assert_eq!(s.expired(30_000).await.unwrap()[0].assignment, a0);
        let a1 = s.assign(&running, 0, "w1", 10_000, 0).await.unwrap();
        assert!(a1 > a0);
        assert_eq!(s.append_event(&running, "{}").await.unwrap(), 2);
        assert_eq!(s.logs(&running, None, 0).await.unwrap().len(), 1);
        assert_eq!(s.workers().await.unwrap()[0].name, "w1");
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_finished_builds_and_every_unfinished_one() {
        let (_d, s) = store().await;
        let names = vec!["a".to_string()];
        let mut ids = Vec::new();
        for _ in 0..4 {
            let id = s.create_build("{}", &names).await.unwrap();
            s.append_event(&id, "{}").await.unwrap();
            ids.push(id);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        for id in &ids[..3] {
            s.set_build_state(id, BuildState::Succeeded).await.unwrap();
        }
        // ids[3] is still queued.
        assert_eq!(s.prune_finished(1).await.unwrap(), 2);
        let left: Vec<String> = s
            .list_builds()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(left, [ids[2].clone(), ids[3].clone()]);
        assert!(s.events_after(&ids[0], 0).await.unwrap().is_empty());
        assert!(s.layers(&ids[1]).await.unwrap().is_empty());
        assert_eq!(s.events_after(&ids[2], 0).await.unwrap().len(), 1);
        assert_eq!(s.prune_finished(1).await.unwrap(), 0);
    }
}

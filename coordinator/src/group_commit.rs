//! Group commit: the writes of many concurrent callers to one SQLite database share a
//! transaction. One thread per database writes; a caller hands it a closure and waits
//! until the transaction that ran it has committed, so a write that returned `Ok` is
//! committed exactly as before (a killed coordinator keeps it). What changes is the
//! cost: while one transaction commits, the writes that arrive queue up and go
//! together in the next, instead of each taking the database's write lock in turn (and
//! sleeping in SQLite's busy handler while another connection holds it).
//!
//! The writer is a plain thread with its own `rusqlite` connection that runs a whole
//! batch synchronously: a write costs its statements, not a trip to another thread and
//! back per statement (sqlx's connections live on a thread of their own; a batch of a
//! thousand writes through one was thousands of thread wake-ups, the coordinator's
//! largest cost on a big build). Reads stay on the async pool.
//!
//! Each write runs inside a savepoint of the shared transaction: one that fails is
//! rolled back alone and its caller gets its error; the others commit.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 1024;

/// A write of a caller, type-erased for the writer's queue.
trait Op: Send {
    /// Run the write; `true` when it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// The transaction ended: answer the caller.
    fn finish(self: Box<Self>, committed: Result<(), &rusqlite::Error>);
}

type WriteFn<T, E> = Box<dyn FnOnce(&Connection) -> Result<T, E> + Send>;

struct Write<T, E> {
    f: Option<WriteFn<T, E>>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
    /// The caller's error for a transaction that did not commit.
    failed: Box<dyn FnOnce(&rusqlite::Error) -> E + Send>,
}

impl<T: Send, E: Send> Op for Write<T, E> {
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let r = f(conn);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), &rusqlite::Error>) {
        let Write {
            result,
            reply,
            failed,
            ..
        } = *self;
        let answer = match (committed, result) {
            // Its own error stands (it was rolled back either way).
            (_, Some(Err(e))) => Err(e),
            (Ok(()), Some(Ok(v))) => Ok(v),
            (Err(e), _) => Err(failed(e)),
            (Ok(()), None) => Err(failed(&stopped())),
        };
        let _ = reply.send(answer);
    }
}

/// A copy of a transaction's error for each of its writers (`rusqlite::Error` is not
/// `Clone`): its SQLite code and message, or its text.
pub(crate) fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// The error of a write the writer never ran (it is gone: the process is stopping).
fn stopped() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
        Some("the state writer stopped".into()),
    )
}

/// The writer of one database (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    tx: mpsc::UnboundedSender<Box<dyn Op>>,
}

impl GroupCommit {
    /// Open a connection to the database at `path` (made and set up by `db::open`) and
    /// start its writer thread; the thread ends when the last clone is dropped.
    pub(crate) fn start(path: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        // As the pool's connections (`db::open`): WAL is the file's; the rest is each
        // connection's own.
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(64);
        let (tx, rx) = mpsc::unbounded_channel();
        let name = format!(
            "farm-writer-{}",
            path.file_stem().unwrap_or_default().to_string_lossy()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || writer(conn, rx))
            .map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("starting the writer thread: {e}")),
                )
            })?;
        Ok(GroupCommit { tx })
    }

    /// Run `f` in the next transaction without waiting for it: for writes nobody is
    /// promised (a failure is logged).
    pub(crate) fn submit(
        &self,
        what: &'static str,
        f: impl FnOnce(&Connection) -> Result<(), rusqlite::Error> + Send + 'static,
    ) {
        let (reply, answer) = oneshot::channel::<Result<(), String>>();
        let op = Box::new(Write {
            f: Some(Box::new(move |conn: &Connection| {
                f(conn).map_err(|e| e.to_string())
            })),
            result: None,
            reply,
            failed: Box::new(|e: &rusqlite::Error| e.to_string()),
        });
        if self.tx.send(op).is_ok() {
            tokio::spawn(async move {
                if let Ok(Err(e)) = answer.await {
                    tracing::warn!("{what}: {e}");
                }
            });
        }
    }

    /// Run `f` in the next transaction; the future answers its result once that
    /// committed. `failed` makes the caller's error when the transaction itself fails.
    ///
    /// The write is queued when this is called, not when the future is first polled:
    /// writes commit in the order they were called (in the same transaction or a later
    /// one), so a caller may queue a write and go on without waiting, and any write it
    /// queues after is committed no earlier.
    pub(crate) fn write<T, E, Failed, F>(
        &self,
        failed: Failed,
        f: F,
    ) -> impl Future<Output = Result<T, E>> + Send + 'static + use<T, E, Failed, F>
    where
        T: Send + 'static,
        E: Send + 'static,
        Failed: Fn(&rusqlite::Error) -> E + Clone + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = Box::new(Write {
            f: Some(Box::new(f)),
            result: None,
            reply,
            failed: Box::new(failed.clone()),
        });
        if let Err(mpsc::error::SendError(op)) = self.tx.send(op) {
            // The writer is gone: nothing was written.
            op.finish(Err(&stopped()));
        }
        // An answer that never comes: the writer stopped with the write in hand (the
        // process is going down); it may or may not have committed, and is not
        // acknowledged.
        async move { answer.await.unwrap_or_else(|_| Err(failed(&stopped()))) }
    }
}

fn writer(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Box<dyn Op>>) {
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let committed = run_batch(&mut conn, &mut ops);
        if let Err(e) = &committed {
            tracing::error!("a group commit of {} writes failed: {e}", ops.len());
        }
        for op in ops {
            op.finish(committed.as_ref().map(|_| ()));
        }
    }
}

/// Run `ops` in one transaction (each in a savepoint when there are several).
fn run_batch(conn: &mut Connection, ops: &mut [Box<dyn Op>]) -> Result<(), rusqlite::Error> {
    // IMMEDIATE: the write lock is taken (and waited for) at BEGIN.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let [op] = ops {
        if op.run(&tx) {
            tx.commit()
        } else {
            tx.rollback()
        }
    } else {
        // Prepared once (parsing them per write was a tenth of a big build's time).
        let step = |sql: &str| tx.prepare_cached(sql).and_then(|mut q| q.execute([]));
        for op in ops.iter_mut() {
            step("SAVEPOINT op")?;
            if !op.run(&tx) {
                step("ROLLBACK TO op")?;
            }
            step("RELEASE op")?;
        }
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::state::{LayerState, StateError, StateStore};

    /// Writes that share transactions each commit or fail alone, and every write a
    /// caller was answered `Ok` for is in the database after the process that made it
    /// stopped without closing anything (its runtime dropped mid-flight), as a killed
    /// coordinator's would be.
    #[test]
    fn acknowledged_writes_survive_an_abrupt_stop_and_a_failing_one_fails_alone() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        let names: Vec<String> = (0..200).map(|i| format!("l{i}")).collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (build, acked, refused) = rt.block_on(async {
            let store = StateStore::open(&path).await.unwrap();
            let build = store.create_build("{}", &names).await.unwrap();
            // Many writers at once: leases (one for a layer that does not exist), states
            // and events, all through the group commit.
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..201u32 {
                let (store, build) = (store.clone(), build.clone());
                tasks.spawn(async move {
                    let lease = store.assign(&build, i, "w", 10_000, 1).await;
                    if lease.is_ok() {
                        store
                            .set_layer_state(&build, i, LayerState::Failed, Some("w"), Some("x"))
                            .await
                            .unwrap();
                        store
                            .append_events(&build, &[format!("{{\"n\":{i}}}")])
                            .await
                            .unwrap();
                    }
                    (i, lease)
                });
            }
            let mut acked = BTreeSet::new();
            let mut refused = Vec::new();
            while let Some(r) = tasks.join_next().await {
                match r.unwrap() {
                    (i, Ok(_)) => {
                        acked.insert(i);
                    }
                    (i, Err(StateError::NoLayer { idx, .. })) => refused.push((i, idx)),
                    (i, Err(e)) => panic!("layer {i}: {e}"),
                }
            }
            // More writes in flight when the runtime goes: neither answered nor waited for.
            for i in 0..50u32 {
                let (store, build) = (store.clone(), build.clone());
                tokio::spawn(async move {
                    let _ = store
                        .append_events(&build, &[format!("{{\"late\":{i}}}")])
                        .await;
                });
            }
            (build, acked, refused)
        });
        rt.shutdown_background();
        assert_eq!(acked.len(), 200, "every real layer's lease was written");
        assert_eq!(
            refused,
            [(200, 200)],
            "the missing layer's lease failed alone"
        );

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = StateStore::open(&path).await.unwrap();
            let layers = store.layers(&build).await.unwrap();
            for l in &layers {
                assert_eq!(l.attempts, 1, "{}: its lease was acknowledged", l.name);
                assert_eq!(l.state, LayerState::Failed, "{}", l.name);
            }
            let events = store.events_after(&build, 0).await.unwrap();
            let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
            let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, expected, "numbered without gaps");
            let numbered: BTreeSet<u32> = events
                .iter()
                .filter_map(|(_, j)| {
                    serde_json::from_str::<serde_json::Value>(j).ok()?["n"]
                        .as_u64()
                        .map(|n| n as u32)
                })
                .collect();
            assert_eq!(numbered, acked, "every acknowledged event is there");
            assert_eq!(store.expired(20_000).await.unwrap().len(), 200);
        });
    }

    /// A write is queued when it is called, not when its answer is first awaited: one
    /// queued without waiting commits no later than any queued after it, so a caller
    /// may go on before its record committed (the driver does, for built layers).
    #[tokio::test]
    async fn writes_commit_in_the_order_they_were_queued_even_when_not_awaited() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        crate::db::open(&path, "").await.unwrap();
        let writer = super::GroupCommit::start(&path).unwrap();
        let failed = |e: &rusqlite::Error| super::clone_error(e);
        let first = writer.write(failed, |conn| {
            conn.execute_batch("CREATE TABLE queued (n INTEGER)")?;
            conn.execute("INSERT INTO queued (n) VALUES (1)", [])
        });
        // Not awaited yet: the second write must still find the first's row.
        let second = writer.write(failed, |conn| {
            conn.query_row("SELECT n FROM queued", [], |r| r.get::<_, i64>(0))
        });
        assert_eq!(second.await.unwrap(), 1);
        assert_eq!(first.await.unwrap(), 1);
    }
}

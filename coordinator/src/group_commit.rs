//! Group commit: the writes of many concurrent callers to one SQLite database share a
//! transaction. One task per database writes; a caller hands it a closure and waits
//! until the transaction that ran it has committed, so a write that returned `Ok` is
//! committed exactly as before (a killed coordinator keeps it). What changes is the
//! cost: while one transaction commits, the writes that arrive queue up and go
//! together in the next, instead of each taking the database's write lock in turn (and
//! sleeping in SQLite's busy handler while another connection holds it).
//!
//! Each write runs inside a savepoint of the shared transaction: one that fails is
//! rolled back alone and its caller gets its error; the others commit.

use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 1024;

/// A write of a caller, type-erased for the writer's queue.
trait Op: Send {
    /// Run the write; `true` when it succeeded.
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// The transaction ended: answer the caller.
    fn finish(self: Box<Self>, committed: Result<(), &sqlx::Error>);
}

type WriteFn<T, E> =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>> + Send>;

struct Write<T, E> {
    f: Option<WriteFn<T, E>>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
    /// The caller's error for a transaction that did not commit.
    failed: Box<dyn FnOnce(&sqlx::Error) -> E + Send>,
}

impl<T: Send, E: Send> Op for Write<T, E> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let Some(f) = self.f.take() else {
                return false;
            };
            let r = f(conn).await;
            let ok = r.is_ok();
            self.result = Some(r);
            ok
        })
    }

    fn finish(self: Box<Self>, committed: Result<(), &sqlx::Error>) {
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
            (Ok(()), None) => Err(failed(&sqlx::Error::WorkerCrashed)),
        };
        let _ = reply.send(answer);
    }
}

/// The writer of one database (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    tx: mpsc::UnboundedSender<Box<dyn Op>>,
}

impl GroupCommit {
    /// Start the writer on the current Tokio runtime; it ends when the last clone is
    /// dropped.
    pub(crate) fn start(pool: SqlitePool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, rx));
        GroupCommit { tx }
    }

    /// Run `f` in the next transaction without waiting for it: for writes nobody is
    /// promised (a failure is logged).
    pub(crate) fn submit<E: std::fmt::Display + Send + 'static>(
        &self,
        what: &'static str,
        f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(), E>>
        + Send
        + 'static,
    ) {
        let (reply, answer) = oneshot::channel::<Result<(), String>>();
        let op = Box::new(Write {
            f: Some(Box::new(move |conn: &mut SqliteConnection| {
                Box::pin(async move { f(conn).await.map_err(|e| e.to_string()) })
                    as BoxFuture<'_, Result<(), String>>
            })),
            result: None,
            reply,
            failed: Box::new(|e: &sqlx::Error| e.to_string()),
        });
        if self.tx.send(op).is_ok() {
            tokio::spawn(async move {
                if let Ok(Err(e)) = answer.await {
                    tracing::warn!("{what}: {e}");
                }
            });
        }
    }

    /// Run `f` in the next transaction and return its result once that committed.
    /// `failed` makes the caller's error when the transaction itself fails.
    pub(crate) async fn write<T, E>(
        &self,
        failed: impl Fn(&sqlx::Error) -> E + Clone + Send + 'static,
        f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = Box::new(Write {
            f: Some(Box::new(f)),
            result: None,
            reply,
            failed: Box::new(failed.clone()),
        });
        if let Err(mpsc::error::SendError(op)) = self.tx.send(op) {
            // The runtime is stopping: nothing was written.
            op.finish(Err(&sqlx::Error::PoolClosed));
        }
        // An answer that never comes: the writer stopped with the write in hand (the
        // runtime is going down); it may or may not have committed, and is not
        // acknowledged.
        answer
            .await
            .unwrap_or_else(|_| Err(failed(&sqlx::Error::PoolClosed)))
    }
}

async fn writer(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<Box<dyn Op>>) {
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let committed = run_batch(&pool, &mut ops).await;
        for op in ops {
            op.finish(committed.as_ref().map(|_| ()));
        }
    }
}

/// Run `ops` in one transaction (each in a savepoint when there are several).
async fn run_batch(pool: &SqlitePool, ops: &mut [Box<dyn Op>]) -> Result<(), sqlx::Error> {
    // IMMEDIATE: the write lock is taken (and waited for) at BEGIN.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    if let [op] = ops {
        if op.run(&mut tx).await {
            tx.commit().await
        } else {
            tx.rollback().await
        }
    } else {
        for op in ops.iter_mut() {
            sqlx::raw_sql("SAVEPOINT op").execute(&mut *tx).await?;
            let ok = op.run(&mut tx).await;
            let end = if ok {
                "RELEASE op"
            } else {
                "ROLLBACK TO op; RELEASE op"
            };
            sqlx::raw_sql(end).execute(&mut *tx).await?;
        }
        tx.commit().await
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
}

//! The queue: layers wait here, in order, until a worker has a free slot; dispatch picks
//! a worker for each (see [`placement`](super::placement)), leases the layer to it and
//! sends it.

use std::sync::Arc;

use farm_model::{Event, EventSender, ImportSource, Job, LayerFailure, LayerOutcome};
use tokio::sync::oneshot;

use super::placement::{Need, choose_indexed};
use super::{Active, Sched, Scheduler, ToWorker};
use crate::farm::Inner;
use crate::state::BuildId;

/// A layer of a build, waiting for its result.
pub(super) struct Task {
    pub build: BuildId,
    /// The build's priority (`farm submit --priority`): higher goes first.
    pub priority: i32,
    pub idx: u32,
    pub job: Arc<Job>,
    pub events: EventSender,
    done: oneshot::Sender<LayerOutcome>,
    /// The layer's span (the driver's) and when the layer was queued (issue 16).
    trace: (tracing::Span, std::time::Instant),
}

impl super::fair::Laned for Task {
    fn lane(&self) -> &str {
        &self.build
    }
    fn priority(&self) -> i32 {
        self.priority
    }
}

impl Task {
    /// Hand the layer's result to its build (which may have stopped waiting).
    pub(super) fn finish(self, result: LayerOutcome) {
        let _ = self.done.send(result);
    }

    /// The layer goes back to the queue (its worker was lost or stopping): its wait
    /// for a worker starts again.
    pub(super) fn waits_again(mut self) -> Self {
        self.trace.1 = std::time::Instant::now();
        self
    }
}

/// A queued layer and the worker picked for it.
struct Pick {
    task: Task,
    worker: String,
    session: u64,
    shares_files: bool,
    /// Why placement chose it (for the layer's span).
    why: &'static str,
}

impl Scheduler {
    /// Queue a layer (or wait for the worker that holds it since before a restart) and
    /// wait for its result.
    pub(super) async fn run(
        &self,
        inner: &Arc<Inner>,
        build: &str,
        priority: i32,
        idx: u32,
        job: Job,
        events: EventSender,
    ) -> LayerOutcome {
        let (done, rx) = oneshot::channel();
        let task = Task {
            build: build.to_string(),
            priority,
            idx,
            job: Arc::new(job),
            events,
            done,
            trace: (tracing::Span::current(), std::time::Instant::now()),
        };
        let prior = if self.prior_leases.load(std::sync::atomic::Ordering::Relaxed) {
            match inner.state.active_lease(build, idx).await {
                Ok(lease) => lease,
                Err(e) => {
                    // A worker may still build it: then it is built twice, and the
                    // second result is dropped. Better than failing the build.
                    tracing::error!(
                        %build,
                        layer = %task.job.layer.name,
                        "reading the layer's lease from before the restart: {e}; queueing it again"
                    );
                    None
                }
            }
        } else {
            None
        };
        let early: Option<LayerOutcome> = 'locked: {
            let mut st = self.lock();
            // A result that came in while nobody waited (see `WorkerSession::result`),
            // checked under the lock it is filed under.
            if let Some(r) = st.orphans.remove(&(build.to_string(), idx)) {
                break 'locked Some(r);
            }
            match prior {
                Some(lease) => {
                    task.events.log(
                        &task.job.layer.name,
                        format!(
                            "farm: waiting for worker {}, which was building this layer when the \
                         coordinator restarted",
                            lease.worker
                        ),
                    );
                    if let Some(w) = st.workers.get_mut(&lease.worker) {
                        w.running.insert(lease.assignment);
                    }
                    st.active.insert(
                        lease.assignment,
                        Active {
                            task,
                            worker: lease.worker,
                        },
                    );
                    drop(st);
                }
                None => {
                    // Checked under the lock `cancel_build` drains the queue under: a layer
                    // that arrives after a cancel must not be queued (and built) after it.
                    if inner.is_cancelled(build) {
                        break 'locked Some(Err(LayerFailure::cancelled()));
                    }
                    st.queue.push_back(task);
                    inner.metrics.set_queue(st.queue.len());
                    drop(st);
                    self.wake.notify_one();
                }
            }
            None
        };
        if let Some(r) = early {
            return r;
        }
        rx.await.unwrap_or_else(|_| {
            Err(LayerFailure::internal(
                "the coordinator stopped before the layer finished",
            ))
        })
    }

    /// Send every queued layer that has a worker to it.
    pub(super) fn dispatch(&self, inner: &Arc<Inner>) {
        let picks = {
            let mut st = self.lock();
            let st = &mut *st;
            let (queue, workers, holders) = (&mut st.queue, &mut st.workers, &st.holders);
            let free: u32 = workers.iter().map(|(n, w)| w.candidate(n).free()).sum();
            let free = std::cell::Cell::new(free);
            let taken = queue.take_while(
                || free.get() > 0,
                |task| {
                    let need = Need::of(&task.job);
                    let all = workers.iter().map(|(n, w)| w.candidate(n));
                    let holding = need
                        .base_chain
                        .into_iter()
                        .flat_map(|c| holders.among(c, workers))
                        .map(|(n, w)| w.candidate(n));
                    let (name, has_base) = choose_indexed(all, holding, &need)?;
                    let name = name.to_string();
                    let w = workers.get_mut(&name).expect("chosen from the map");
                    w.reserved += 1;
                    free.set(free.get() - 1);
                    let why = if has_base {
                        "holds the base chain"
                    } else {
                        "least loaded with a free slot"
                    };
                    Some((name, w.session, w.shares_files, why))
                },
            );
            inner.metrics.set_queue(queue.len());
            taken
                .into_iter()
                .map(|(task, (worker, session, shares_files, why))| Pick {
                    task,
                    worker,
                    session,
                    shares_files,
                    why,
                })
                .collect::<Vec<_>>()
        };
        for pick in picks {
            let inner = inner.clone();
            tokio::spawn(async move { inner.sched.send(&inner, pick).await });
        }
    }

    /// Lease a picked layer to its worker and send it.
    async fn send(&self, inner: &Arc<Inner>, pick: Pick) {
        let Pick {
            task,
            worker,
            session,
            shares_files,
            why,
        } = pick;
        let (span, queued) = &task.trace;
        span.record("worker", worker.as_str());
        span.record("placement", why);
        span.record("queue_wait_ms", queued.elapsed().as_millis() as u64);
        let unreserve = |st: &mut Sched| {
            if let Some(w) = st.workers.get_mut(&worker) {
                w.reserved = w.reserved.saturating_sub(1);
            }
        };
        let id = match self.assign(inner, &task.build, task.idx, &worker).await {
            Ok(id) => id,
            Err(e) => {
                unreserve(&mut self.lock());
                task.finish(Err(LayerFailure::internal(format!(
                    "recording the assignment: {e}"
                ))));
                return;
            }
        };
        let json = match job_json(&inner.config.blobs, &task.job, shares_files).await {
            Ok(j) => j,
            Err(e) => {
                unreserve(&mut self.lock());
                self.release(inner, id);
                task.finish(Err(LayerFailure::internal(format!(
                    "sending the layer's inputs: {e}"
                ))));
                return;
            }
        };
        task.events.send(Event::Assigned {
            layer: task.job.layer.name.clone(),
            worker: worker.clone(),
        });
        // The worker's spans of this layer are children of the layer's span.
        let trace = farm_telemetry::inject(&task.trace.0);
        let cancelled;
        let requeue = {
            let mut st = self.lock();
            unreserve(&mut st);
            // Cancelled while the lease was written (`cancel_build` did not see it).
            cancelled = inner.is_cancelled(&task.build);
            match st
                .workers
                .get_mut(&worker)
                .filter(|w| w.session == session && !cancelled)
            {
                Some(w) => {
                    let sent = w.outbox.send(ToWorker::Assign {
                        id,
                        job_json: json,
                        lease: self.lease,
                        trace,
                    });
                    if sent.is_ok() {
                        inner.metrics.layer_dispatched(queued.elapsed());
                        w.running.insert(id);
                        st.active.insert(id, Active { task, worker });
                        inner.metrics.set_running(st.active.len());
                        None
                    } else {
                        Some(task)
                    }
                }
                None => Some(task),
            }
        };
        if let Some(task) = requeue {
            // The worker left between the pick and the send: not its fault, but the
            // lease was recorded (and counts as an attempt); release it and queue again.
            self.release(inner, id);
            if cancelled {
                task.finish(Err(LayerFailure::cancelled()));
                return;
            }
            self.lock().queue.push_front(task);
            self.wake.notify_one();
        }
    }
}

/// `job` as JSON for its worker. One on another machine (not `shares_files`) gets local
/// inputs as trees in the blob store; a job without any is sent as it is (copying
/// every job to look was a few percent of a 20,000-layer build).
async fn job_json(
    blobs: &farm_image::BlobStore,
    job: &Job,
    shares_files: bool,
) -> Result<String, String> {
    let local_inputs = !job.overlay_dirs.is_empty()
        || job
            .imports
            .iter()
            .any(|i| matches!(i.source, ImportSource::Local(_)));
    let json = if local_inputs && !shares_files {
        serde_json::to_string(&remote_job(blobs, job).await?)
    } else {
        serde_json::to_string(job)
    };
    json.map_err(|e| e.to_string())
}

/// `job` for a worker on another machine: local inputs become trees in the blob store.
async fn remote_job(blobs: &farm_image::BlobStore, job: &Job) -> Result<Job, String> {
    let mut job = job.clone();
    for import in &mut job.imports {
        if let ImportSource::Local(path) = &import.source {
            let digest = blobs
                .put_tree(path)
                .await
                .map_err(|e| format!("import '{}': {e}", import.written))?;
            import.source = ImportSource::Tree {
                digest: digest.to_string(),
            };
        }
    }
    for od in &mut job.overlay_dirs {
        let digest = blobs
            .put_tree(&od.source)
            .await
            .map_err(|e| format!("overlay_dirs '{}': {e}", od.source.display()))?;
        od.tree = Some(digest.to_string());
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use farm_model::{ImportSource, JobImport, JobOverlayDir};

    use super::*;

    /// A worker on another machine gets a job's local imports and overlay dirs as trees
    /// in the blob store; one that shares this machine's files, or a job with none, gets
    /// the job as it is.
    #[tokio::test]
    async fn only_a_remote_worker_gets_local_inputs_as_trees() {
        let d = tempfile::tempdir().unwrap();
        let blobs = farm_image::BlobStore::local(&d.path().join("blobs")).unwrap();
        let input = d.path().join("input");
        std::fs::create_dir(&input).unwrap();
        std::fs::write(input.join("f"), "data").unwrap();
        let file = d.path().join("s.yaml");
        std::fs::write(&file, "l:\n  from: {type: scratch}\n").unwrap();
        let plan =
            farm_stackerfile::Plan::load(&file, &Default::default(), &farm_stackerfile::LocalFiles)
                .unwrap();
        let plain = crate::build::scratch_job(&plan.layers[0].layer, "linux/amd64");
        let import = JobImport {
            source: ImportSource::Local(input.clone()),
            written: "input".into(),
            name: "input".into(),
            contents_only: false,
            dest: None,
            mode: None,
            uid: None,
            gid: None,
            hash: None,
            digest: "d".into(),
        };
        let overlay = JobOverlayDir {
            source: input.clone(),
            tree: None,
            dest: "/".into(),
            digest: "d".into(),
        };
        let as_sent = |job: &Job, shares_files: bool| {
            let (blobs, job) = (blobs.clone(), job.clone());
            async move { job_json(&blobs, &job, shares_files).await.unwrap() }
        };
        let json = |job: &Job| serde_json::to_string(job).unwrap();
        assert_eq!(as_sent(&plain, false).await, json(&plain));
        for job in [
            Job {
                imports: vec![import.clone()],
                ..plain.clone()
            },
            Job {
                overlay_dirs: vec![overlay.clone()],
                ..plain.clone()
            },
        ] {
            assert_eq!(
                as_sent(&job, true).await,
                json(&job),
                "shares this machine's files"
            );
            let sent = as_sent(&job, false).await;
            assert_ne!(sent, json(&job));
            let sent: Job = serde_json::from_str(&sent).unwrap();
            let trees = sent
                .imports
                .iter()
                .filter(|i| matches!(i.source, ImportSource::Tree { .. }))
                .count()
                + sent
                    .overlay_dirs
                    .iter()
                    .filter(|o| o.tree.is_some())
                    .count();
            assert_eq!(trees, 1, "{sent:?}");
        }
    }
}

//! The scheduler against scripted workers speaking the real worker protocol over the
//! farm's channels (the end-to-end tests in `tests/` run real workers).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use farm_proto::v1::{
    CoordinatorMessage, Heartbeat, Register, Result as ResultMsg, WorkerMessage,
    coordinator_message, worker_message,
};
use tokio::task::JoinHandle;

use super::*;
use crate::state::LayerState;
use farm_model::Job;
use farm_model::{BuiltImage, FailureKind, LayerBlob, LayerFailure, PROTOCOL};

/// How a scripted worker behaves.
#[derive(Clone, Copy)]
struct Script {
    /// Time a layer takes.
    delay: Duration,
    /// Send heartbeats.
    heartbeats: bool,
    /// Never answer assignments (a worker that hangs, until it is dropped).
    answer: bool,
    /// Answer only this many assignments, then hang.
    answer_limit: usize,
    /// Answer with this failure instead of a result.
    failure: Option<(FailureKind, &'static str)>,
    /// Answer with a made-up result.
    forge: Option<Forgery>,
}

const QUICK: Script = Script {
    delay: Duration::from_millis(0),
    heartbeats: true,
    answer: true,
    answer_limit: usize::MAX,
    failure: None,
    forge: None,
};

struct FakeWorker {
    name: String,
    /// (assignment id, layer name) of every assignment received.
    assigned: Arc<Mutex<Vec<(String, String)>>>,
    cancelled: Arc<Mutex<Vec<String>>>,
    /// The job of every assignment received, in order.
    jobs: Arc<Mutex<Vec<Job>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeWorker {
    fn layers(&self) -> Vec<String> {
        self.assigned
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// A made-up result a scripted worker sends.
#[derive(Clone, Copy)]
enum Forgery {
    /// The layer blob is not in the store.
    MissingLayer,
    /// The config's diff_ids are not the layers'.
    WrongDiffIds,
}

/// An honest result: the layer and a real OCI config naming its diff_id are in the
/// store (their content follows from `seed`).
async fn image_of(blobs: &BlobStore, seed: &str) -> BuiltImage {
    image_with(blobs, seed, None).await
}

/// `image_of`, its config naming `diff_ids` instead of the layer's when given.
async fn image_with(blobs: &BlobStore, seed: &str, diff_ids: Option<Vec<String>>) -> BuiltImage {
    let layer = blobs
        .put(format!("layer {seed}").into_bytes().into())
        .await
        .unwrap();
    let diff_id = Digest::of(format!("tar {seed}").as_bytes()).to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"layer": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.unwrap_or_else(|| vec![diff_id.clone()])},
    });
    let config = blobs
        .put(serde_json::to_vec(&config).unwrap().into())
        .await
        .unwrap();
    BuiltImage::new(
        config.digest.to_string(),
        config.size,
        vec![LayerBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: layer.digest.to_string(),
            size: layer.size,
            diff_id,
            verity_root_hash: None,
        }],
    )
    .unwrap()
}

async fn result_for(blobs: &BlobStore, job: &Job) -> BuiltImage {
    image_of(blobs, &job.cache_key).await
}

/// `result_for`, made up as `forgery` says.
async fn forged(blobs: &BlobStore, job: &Job, forgery: Forgery) -> BuiltImage {
    match forgery {
        Forgery::MissingLayer => {
            let mut image = result_for(blobs, job).await;
            image.layers[0].digest = Digest::of(b"never stored").to_string();
            image
        }
        Forgery::WrongDiffIds => {
            let other = Digest::of(b"another tar").to_string();
            image_with(blobs, &job.cache_key, Some(vec![other])).await
        }
    }
}

/// Connect a scripted worker; `running` are assignments it claims after a restart
/// (answered after `script.delay`).
fn fake_worker(
    farm: &Farm,
    name: &str,
    slots: u32,
    script: Script,
    running: Vec<(String, Job)>,
) -> FakeWorker {
    let link = farm.connect_worker().unwrap();
    let assigned = Arc::new(Mutex::new(Vec::new()));
    let cancelled = Arc::new(Mutex::new(Vec::new()));
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let blobs = farm.blobs().clone();
    let (a2, c2, j2, n2) = (
        assigned.clone(),
        cancelled.clone(),
        jobs.clone(),
        name.to_string(),
    );
    let task = tokio::spawn(async move {
        let tx = link.tx;
        let mut rx = link.rx;
        tx.send(WorkerMessage {
            kind: Some(worker_message::Kind::Register(Register {
                name: n2,
                slots,
                platform: "linux/amd64".into(),
                running: running.iter().map(|(id, _)| id.clone()).collect(),
                protocol_major: PROTOCOL.major,
                protocol_minor: PROTOCOL.minor,
                ..Default::default()
            })),
        })
        .unwrap();
        let answer = |id: String, job: Job| {
            let tx = tx.clone();
            let blobs = blobs.clone();
            tokio::spawn(async move {
                tokio::time::sleep(script.delay).await;
                let msg = match script.failure {
                    Some((kind, message)) => ResultMsg {
                        assignment: id,
                        failure: Some((&LayerFailure::new(kind, message)).into()),
                        ..Default::default()
                    },
                    None => ResultMsg {
                        assignment: id,
                        layer_json: serde_json::to_string(&match script.forge {
                            Some(forgery) => forged(&blobs, &job, forgery).await,
                            None => result_for(&blobs, &job).await,
                        })
                        .unwrap(),
                        cache_key: job.cache_key.clone(),
                        ..Default::default()
                    },
                };
                let _ = tx.send(WorkerMessage {
                    kind: Some(worker_message::Kind::Result(msg)),
                });
            });
        };
        for (id, job) in running {
            answer(id, job);
        }
        let mut beat = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(CoordinatorMessage { kind: Some(kind) }) = msg else { return };
                    match kind {
                        coordinator_message::Kind::Assign(a) => {
                            let job: Job = serde_json::from_str(&a.job_json).unwrap();
                            let n = {
                                let mut seen = a2.lock().unwrap();
                                seen.push((a.id.clone(), job.layer.name.clone()));
                                seen.len()
                            };
                            j2.lock().unwrap().push(job.clone());
                            if script.answer && n <= script.answer_limit {
                                answer(a.id, job);
                            }
                        }
                        coordinator_message::Kind::Cancel(id) => c2.lock().unwrap().push(id),
                        _ => {}
                    }
                }
                _ = beat.tick(), if script.heartbeats => {
                    let _ = tx.send(WorkerMessage { kind: Some(worker_message::Kind::Heartbeat(Heartbeat::default())) });
                }
            }
        }
    });
    FakeWorker {
        name: name.to_string(),
        assigned,
        cancelled,
        jobs,
        task,
    }
}

async fn start(dir: &Path, lease_ms: u64) -> Farm {
    Farm::start(FarmConfig {
        lease: Duration::from_millis(lease_ms),
        // The scripted workers say they are linux/amd64, whatever this machine is.
        platform: "linux/amd64".parse().unwrap(),
        ..FarmConfig::new(
            dir.join("state"),
            BlobStore::local(&dir.join("blobs")).unwrap(),
        )
    })
    .await
    .unwrap()
}

/// A stackerfile of `n` independent scratch layers (`run` makes them need a worker).
fn fan_out(dir: &Path, n: usize, salt: &str) -> Submission {
    let mut yaml = String::new();
    for i in 0..n {
        yaml.push_str(&format!(
            "l{i}:\n  from: {{type: scratch}}\n  run: echo {salt} {i}\n"
        ));
    }
    let file = dir.join(format!("fan-{salt}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    submission(&file)
}

/// Write `file`: two layers, `top` built on `base`, each named and running `echo` of
/// its text.
fn two_layers(file: &Path, base: (&str, &str), top: (&str, &str)) {
    let yaml = format!(
        "{}:\n  from: {{type: scratch}}\n  run: echo {}\n\
         {}:\n  from: {{type: built, tag: {}}}\n  run: echo {}\n",
        base.0, base.1, top.0, base.0, top.1
    );
    std::fs::write(file, yaml).unwrap();
}

fn submission(file: &Path) -> Submission {
    Submission {
        allow_outside_context: true,
        ..Submission::new([file.display().to_string()])
    }
}

async fn wait(farm: &Farm, id: &str) -> (BuildState, Option<String>) {
    let mut rx = farm.watch(id, 0).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the build ends within 30 s");
        let Some((_, e)) = next else {
            panic!("event stream ended without a final event")
        };
        if let EventKind::Build(s) = e.kind {
            return (s, e.error);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_layers_spread_over_workers_and_resubmission_dispatches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let a = fake_worker(
        &farm,
        "a",
        2,
        Script {
            delay: Duration::from_millis(200),
            ..QUICK
        },
        vec![],
    );
    let b = fake_worker(
        &farm,
        "b",
        2,
        Script {
            delay: Duration::from_millis(200),
            ..QUICK
        },
        vec![],
    );
    let spec = fan_out(d.path(), 8, "x");
    let (id, names) = farm.submit(spec.clone()).await.unwrap();
    assert_eq!(names.len(), 8);
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    let (na, nb) = (a.layers().len(), b.layers().len());
    assert_eq!(na + nb, 8, "each layer built once");
    assert!(na >= 2 && nb >= 2, "both workers used: {na} and {nb}");
    let status = farm.state().status(&id).await.unwrap().unwrap();
    assert!(
        status
            .layers
            .iter()
            .all(|l| l.state == LayerState::Built && l.manifest_digest.is_some())
    );
    assert!(
        status
            .layers
            .iter()
            .all(|l| l.worker.as_deref() == Some("a") || l.worker.as_deref() == Some("b"))
    );

    let (again, _) = farm.submit(spec).await.unwrap();
    assert_eq!(wait(&farm, &again).await.0, BuildState::Succeeded);
    assert_eq!(a.layers().len() + b.layers().len(), 8, "nothing dispatched");
    let status = farm.state().status(&again).await.unwrap().unwrap();
    assert!(
        status
            .layers
            .iter()
            .all(|l| l.state == LayerState::Cached && l.cached)
    );
}

/// Delete blob `digest` from the file store of the farm `start`ed in `dir`, as a
/// garbage collection would.
fn remove_blob(farm: &Farm, dir: &Path, digest: &Digest) {
    let path = farm.inner.config.blobs.blob_path(digest);
    std::fs::remove_file(dir.join("blobs").join(path.as_ref())).unwrap();
}

/// A cache entry is a hit only while every blob it names is in the store: one whose layer
/// blob is gone is built again, the others of the same round stay hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_layer_whose_blob_is_gone_is_built_again() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let w = fake_worker(&farm, "w", 4, QUICK, vec![]);
    let spec = fan_out(d.path(), 4, "gone");
    let (id, _) = farm.submit(spec.clone()).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(w.layers().len(), 4);
    let rows = farm.state().layers(&id).await.unwrap();
    let built: BuiltImage = serde_json::from_str(rows[1].result_json.as_deref().unwrap()).unwrap();
    remove_blob(
        &farm,
        d.path(),
        &Digest::parse(&built.layers[0].digest).unwrap(),
    );

    let (again, _) = farm.submit(spec).await.unwrap();
    assert_eq!(wait(&farm, &again).await.0, BuildState::Succeeded);
    assert_eq!(
        w.layers()[4..],
        ["l1".to_string()],
        "only the layer whose blob is gone"
    );
    let status = farm.state().status(&again).await.unwrap().unwrap();
    let cached: Vec<bool> = status.layers.iter().map(|l| l.cached).collect();
    assert_eq!(cached, [true, false, true, true]);
}

/// A resubmission's manifests are the ones made before (remembered, not made again),
/// while the store has them: one collected since is made and stored again; an edited
/// stackerfile makes new ones carrying its new text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_reuses_its_manifests_and_remakes_one_collected_since() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let _w = fake_worker(&farm, "w", 4, QUICK, vec![]);
    let spec = fan_out(d.path(), 4, "memo");
    let digests = |id: String| {
        let farm = farm.clone();
        async move {
            assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
            let status = farm.state().status(&id).await.unwrap().unwrap();
            status
                .layers
                .iter()
                .map(|l| Digest::parse(l.manifest_digest.as_deref().unwrap()).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let first = digests(farm.submit(spec.clone()).await.unwrap().0).await;
    assert_eq!(farm.inner.manifests.len(), 4, "remembered");
    remove_blob(&farm, d.path(), &first[2]);
    let blobs = &farm.inner.config.blobs;

    let second = digests(farm.submit(spec.clone()).await.unwrap().0).await;
    assert_eq!(second, first);
    for digest in &second {
        assert!(
            blobs.exists(digest).await.unwrap(),
            "{digest} is in the store"
        );
    }

    let file = d.path().join("fan-memo.yaml");
    let edited = std::fs::read_to_string(&file).unwrap() + "# edited\n";
    std::fs::write(&file, &edited).unwrap();
    let third = digests(farm.submit(spec).await.unwrap().0).await;
    for (digest, before) in third.iter().zip(&first) {
        assert_ne!(digest, before);
        let manifest: serde_json::Value =
            serde_json::from_slice(&blobs.get_bytes(digest).await.unwrap()).unwrap();
        let yaml = manifest["annotations"]["io.stackeroci.stacker.stacker_yaml"]
            .as_str()
            .unwrap();
        assert!(yaml.ends_with("# edited\n"), "{yaml}");
    }
}

/// A build ends only after its built layers' action cache entries are committed (they
/// are written while its later layers go on): a process that stops when its build ends
/// leaves them for the next build. Another connection holds the cache's write lock for
/// half a second, so the entries wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_ends_after_its_cache_entries_are_committed() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let _w = fake_worker(&farm, "w", 4, QUICK, vec![]);
    let lock = rusqlite::Connection::open(d.path().join("state").join("cache.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let held = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        lock.execute_batch("COMMIT").unwrap();
    });
    let (id, _) = farm.submit(fan_out(d.path(), 3, "settle")).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(farm.inner.cache.entries().await.unwrap(), 3);
    held.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_base_chain_is_there_is_preferred() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let file = d.path().join("s.yaml");
    two_layers(&file, ("base", "base"), ("app", "app"));
    let a = fake_worker(&farm, "a", 1, QUICK, vec![]);
    let (id, _) = farm.submit(submission(&file)).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(a.layers(), ["base", "app"]);
    // A second worker joins; a changed app layer (same base) goes to "a", which holds
    // the base chain, although both are idle.
    let b = fake_worker(&farm, "b", 1, QUICK, vec![]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    two_layers(&file, ("base", "base"), ("app", "app v2"));
    let (id, _) = farm.submit(submission(&file)).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(a.layers(), ["base", "app", "app"]);
    assert!(b.layers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_loses_its_layer_to_another() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 300).await;
    let silent = fake_worker(
        &farm,
        "silent",
        1,
        Script {
            heartbeats: false,
            answer: false,
            ..QUICK
        },
        vec![],
    );
    let (id, _) = farm.submit(fan_out(d.path(), 1, "lost")).await.unwrap();
    // Wait for the first assignment, then let a healthy worker join.
    for _ in 0..100 {
        if !silent.layers().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(silent.layers(), ["l0"]);
    let healthy = fake_worker(&farm, "healthy", 1, QUICK, vec![]);
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(healthy.layers(), ["l0"]);
    let status = farm.state().status(&id).await.unwrap().unwrap();
    assert_eq!(status.layers[0].worker.as_deref(), Some("healthy"));
    assert_eq!(silent.name, "silent");
    // Dispatched twice, each at once: the retry's wait starts when it is queued again,
    // not when the layer first was (the silent worker's lease was 300 ms).
    let metrics = farm.metrics().render();
    assert!(
        metrics.contains("farm_dispatch_seconds_count 2\n"),
        "{metrics}"
    );
    let slowest = farm.metrics().dispatch_quantile_bound(1.0).unwrap();
    assert!(slowest <= 0.25, "slowest dispatch up to {slowest} s");
}

/// A layer goes to its worker without waiting for its lease to commit, and a worker's
/// heartbeat does not hold up its result behind the renewal's commit: a state writer
/// stalled for seconds (a slow disk, a long transaction) delays the records, not the
/// build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_state_writer_delays_the_records_not_the_dispatch() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 60_000).await;
    // Its heartbeats (every 50 ms) are taken while the writer stalls, too.
    let slow = Script {
        delay: Duration::from_millis(300),
        ..QUICK
    };
    let w = fake_worker(&farm, "w", 1, slow, vec![]);
    let file = d.path().join("chain.yaml");
    two_layers(&file, ("l0", "0"), ("l1", "1"));
    let (id, _) = farm.submit(submission(&file)).await.unwrap();
    let until = |n: usize| {
        let w = &w;
        async move {
            let t = tokio::time::Instant::now();
            while w.layers().len() < n {
                assert!(t.elapsed() < Duration::from_secs(10), "{:?}", w.layers());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            t.elapsed()
        }
    };
    until(1).await;
    // While l0 builds, the writer stalls; l0's result, and l1's assignment, come.
    let stall = Duration::from_secs(3);
    let stalled = farm.state().stall_writer(stall);
    let took = until(2).await;
    assert!(
        took < Duration::from_secs(2),
        "l1 was assigned {took:?} after the writer stalled for {stall:?}"
    );
    assert_eq!(w.layers(), ["l0", "l1"]);
    stalled.await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_lost_attempts_fail_the_layer_saying_why() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 200).await;
    // Each worker goes silent with the layer (and gets no more work until it speaks).
    let silent = Script {
        heartbeats: false,
        answer: false,
        ..QUICK
    };
    let workers: Vec<FakeWorker> = ["s1", "s2", "s3", "s4"]
        .iter()
        .map(|n| fake_worker(&farm, n, 1, silent, vec![]))
        .collect();
    let (id, _) = farm.submit(fan_out(d.path(), 1, "doomed")).await.unwrap();
    let (state, error) = wait(&farm, &id).await;
    assert_eq!(state, BuildState::Failed);
    let error = error.unwrap();
    assert!(
        error.contains("stopped sending heartbeats") && error.contains("3 times"),
        "{error}"
    );
    let tried: usize = workers.iter().map(|w| w.layers().len()).sum();
    assert_eq!(tried, 3, "at most 3 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_submissions_build_each_layer_once() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let w = fake_worker(
        &farm,
        "w",
        4,
        Script {
            delay: Duration::from_millis(300),
            ..QUICK
        },
        vec![],
    );
    let spec = fan_out(d.path(), 4, "same");
    let (one, _) = farm.submit(spec.clone()).await.unwrap();
    let (two, _) = farm.submit(spec).await.unwrap();
    for id in [&one, &two] {
        let (state, error) = wait(&farm, id).await;
        assert_eq!(state, BuildState::Succeeded, "{error:?}");
    }
    let mut layers = w.layers();
    layers.sort();
    assert_eq!(layers, ["l0", "l1", "l2", "l3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_running_layers_on_their_worker() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let w = fake_worker(
        &farm,
        "w",
        1,
        Script {
            answer: false,
            ..QUICK
        },
        vec![],
    );
    let (id, _) = farm.submit(fan_out(d.path(), 3, "cancel")).await.unwrap();
    for _ in 0..100 {
        if !w.layers().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(farm.cancel(&id).await.unwrap(), BuildState::Cancelled);
    assert_eq!(wait(&farm, &id).await.0, BuildState::Cancelled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent: Vec<String> = w
        .assigned
        .lock()
        .unwrap()
        .iter()
        .map(|(a, _)| a.clone())
        .collect();
    assert_eq!(sent.len(), 1, "queued layers never started");
    assert_eq!(*w.cancelled.lock().unwrap(), sent);
    let status = farm.state().status(&id).await.unwrap().unwrap();
    assert_eq!(status.state, BuildState::Cancelled);
    // The running layer as well as the queued ones: cancelled, not failed.
    assert!(
        status
            .layers
            .iter()
            .all(|l| l.state == LayerState::Cancelled),
        "{status:?}"
    );
    assert!(matches!(
        farm.cancel("b-nope").await,
        Err(FarmError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_build_with_the_reconnecting_worker() {
    let d = tempfile::tempdir().unwrap();
    // The first coordinator runs on a runtime of its own, which "dies" as a killed
    // process would: every task of it stops at once. (Dropping its handle left its
    // build's driver running, whose lease expiry could take the layer back from the
    // worker after the second one started: the test failed when that took a second.)
    let first_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = d.path().to_path_buf();
    let (id, assignment, layer) = first_rt
        .spawn(async move {
            let first = start(&dir, 1000).await;
            let w = fake_worker(
                &first,
                "w",
                1,
                Script {
                    answer: false,
                    ..QUICK
                },
                vec![],
            );
            let (id, _) = first.submit(fan_out(&dir, 2, "restart")).await.unwrap();
            for _ in 0..100 {
                if !w.layers().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (assignment, layer) = w.assigned.lock().unwrap()[0].clone();
            (id, assignment, layer)
        })
        .await
        .unwrap();
    first_rt.shutdown_background();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let second = start(d.path(), 1000).await;
    // The worker comes back still building the first layer, and answers it.
    // The scripted result only needs the layer's name.
    let job = placeholder_job(&layer);
    let w = fake_worker(&second, "w", 1, QUICK, vec![(assignment, job)]);
    assert_eq!(wait(&second, &id).await.0, BuildState::Succeeded);
    // Only the other layer was dispatched again.
    assert_eq!(w.layers().len(), 1);
    assert_ne!(w.layers()[0], layer);
}

/// Workers that connect while layers wait are given work only once the leases they
/// held before are reconciled: a layer leased to one meanwhile looked like one it had
/// lost in a restart, and was cancelled on it and sent elsewhere (an attempt spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_given_work_only_after_its_old_leases_are_reconciled() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 5000).await;
    let n = 40;
    let (id, _) = farm
        .submit(fan_out(d.path(), n, "reconcile"))
        .await
        .unwrap();
    // Every one registers while the others' registrations wake the dispatcher.
    let workers: Vec<FakeWorker> = (0..n)
        .map(|i| fake_worker(&farm, &format!("w{i}"), 1, QUICK, vec![]))
        .collect();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    let cancelled: Vec<String> = workers
        .iter()
        .flat_map(|w| w.cancelled.lock().unwrap().clone())
        .collect();
    assert_eq!(
        cancelled,
        Vec::<String>::new(),
        "assignments cancelled on their workers"
    );
    let assigned: usize = workers.iter().map(|w| w.layers().len()).sum();
    assert_eq!(assigned, n, "each layer assigned once");
}

/// A watcher that keeps up with a running build reads the store once, when it starts,
/// not again for every live event (it did: a store read per event at 20,000 layers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_keeps_up_reads_the_store_once() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 5000).await;
    let script = Script {
        delay: Duration::from_millis(5),
        ..QUICK
    };
    let _w = fake_worker(&farm, "w", 2, script, vec![]);
    let (id, _) = farm.submit(fan_out(d.path(), 30, "watch")).await.unwrap();
    let before = farm.metrics().watch_catch_ups();
    let mut rx = farm.watch(&id, 0).await.unwrap();
    let mut events = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
        events += 1;
    }
    assert!(events > 60, "{events} events");
    assert_eq!(farm.metrics().watch_catch_ups() - before, 1);
}

fn placeholder_job(name: &str) -> Job {
    let file = std::env::temp_dir().join(format!("farm-placeholder-{}.yaml", std::process::id()));
    std::fs::write(&file, format!("{name}:\n  from: {{type: scratch}}\n")).unwrap();
    let plan = Plan::load(&file, &Default::default(), &farm_stackerfile::LocalFiles).unwrap();
    crate::build::scratch_job(&plan.layers[0].layer, "linux/amd64")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_builds_are_not_found_and_plan_errors_come_back() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 1000).await;
    assert!(matches!(
        farm.watch("b-0-0", 0).await,
        Err(FarmError::NotFound(_))
    ));
    let file = d.path().join("bad.yaml");
    std::fs::write(&file, "a:\n  from: {type: nonsense}\n").unwrap();
    match farm.submit(submission(&file)).await {
        Err(FarmError::Plan(m)) => assert!(m.contains("nonsense"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("planned a bad file"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_runs_nothing_builds_on_a_worker_of_another_platform() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let w = fake_worker(&farm, "amd64", 1, QUICK, vec![]);
    let file = d.path().join("arm.yaml");
    std::fs::write(
        &file,
        "arm:\n  from: {type: scratch}\n  os: linux\n  arch: arm64\n  cmd: /bin/true\n",
    )
    .unwrap();
    let (id, _) = farm.submit(submission(&file)).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(w.layers(), ["arm"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stackerfile_given_as_a_url_is_planned_from_the_submitted_text() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let w = fake_worker(&farm, "w", 1, QUICK, vec![]);
    // Nothing listens there: the text must come from the submission, not the network.
    let url = "http://127.0.0.1:9/images/stacker.yaml".to_string();
    let mut spec = submission(Path::new(&url));
    spec.stackerfiles = vec![url.clone()];
    spec.inline.insert(
        url.clone(),
        "remote:\n  from: {type: scratch}\n  run: echo remote\n".into(),
    );
    let (id, names) = farm.submit(spec.clone()).await.unwrap();
    assert_eq!(names, ["remote"]);
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(w.layers(), ["remote"]);
    // Without the text it is an error naming the URL, not a fetch.
    spec.inline.clear();
    match farm.submit(spec).await {
        Err(FarmError::Plan(m)) => assert!(m.contains("127.0.0.1:9"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("planned without the text"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_built_before_a_restart_stay_built_by_their_worker() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("chain.yaml");
    two_layers(&file, ("first", "1"), ("second", "2"));
    let farm = start(d.path(), 1000).await;
    let w = fake_worker(
        &farm,
        "w",
        1,
        Script {
            answer_limit: 1,
            ..QUICK
        },
        vec![],
    );
    let (id, _) = farm.submit(submission(&file)).await.unwrap();
    for _ in 0..200 {
        if w.layers().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(w.layers(), ["first", "second"]);
    // During the build, the finished layer is already built, on its worker.
    let status = farm.state().status(&id).await.unwrap().unwrap();
    assert_eq!(status.layers[0].state, LayerState::Built, "{status:?}");
    assert_eq!(status.layers[0].worker.as_deref(), Some("w"));
    assert_eq!(status.layers[1].state, LayerState::Running);
    let (assignment, _) = w.assigned.lock().unwrap()[1].clone();
    drop(w);
    drop(farm);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let again = start(d.path(), 1000).await;
    let _w = fake_worker(
        &again,
        "w",
        1,
        QUICK,
        vec![(assignment, placeholder_job("second"))],
    );
    assert_eq!(wait(&again, &id).await.0, BuildState::Succeeded);
    let status = again.state().status(&id).await.unwrap().unwrap();
    let first = &status.layers[0];
    assert_eq!(
        (first.state, first.cached, first.worker.as_deref()),
        (LayerState::Built, false, Some("w")),
        "built before the restart, not a cache hit: {status:?}"
    );
    assert!(first.duration_ms.is_some());
    assert_eq!(status.layers[1].state, LayerState::Built);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_decided_by_its_kind_not_its_words() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    // A run that prints "cancelled" and fails is a failed layer (the old string
    // sentinel made it a cancelled one, and a sharing build built it again).
    let _w = fake_worker(
        &farm,
        "w",
        1,
        Script {
            failure: Some((FailureKind::RunFailed, "cancelled")),
            ..QUICK
        },
        vec![],
    );
    let (id, _) = farm.submit(fan_out(d.path(), 1, "words")).await.unwrap();
    let (state, error) = wait(&farm, &id).await;
    assert_eq!(state, BuildState::Failed);
    assert_eq!(error.as_deref(), Some("layer 'l0': cancelled"));
    let status = farm.status(&id).await.unwrap().unwrap();
    assert_eq!(status.layers[0].state, LayerState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_another_protocol_version_is_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    for (major, minor, accepted) in [
        (0, 0, false),
        (PROTOCOL.major + 1, 0, false),
        (PROTOCOL.major, PROTOCOL.minor + 7, true),
    ] {
        let mut link = farm.connect_worker().unwrap();
        link.tx
            .send(WorkerMessage {
                kind: Some(worker_message::Kind::Register(Register {
                    name: format!("v{major}"),
                    slots: 1,
                    platform: "linux/amd64".into(),
                    protocol_major: major,
                    protocol_minor: minor,
                    ..Default::default()
                })),
            })
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), link.rx.recv())
            .await
            .unwrap()
            .and_then(|m| m.kind);
        match first {
            Some(coordinator_message::Kind::Refused(r)) => {
                assert!(!accepted, "{major}.{minor} refused: {}", r.reason);
                assert!(
                    r.reason.contains(&format!("{major}.{minor}"))
                        && r.reason.contains(&PROTOCOL.to_string()),
                    "{}",
                    r.reason
                );
            }
            Some(coordinator_message::Kind::Registered(_)) => {
                assert!(accepted, "{major}.{minor} was accepted")
            }
            other => panic!("unexpected first answer {other:?}"),
        }
    }
    let names: Vec<String> = farm
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, [format!("v{}", PROTOCOL.major)]);
}

/// A worker that takes no work (no slots) and sends what the test makes it send.
async fn rogue(farm: &Farm, name: &str) -> WorkerLink {
    let mut link = farm.connect_worker().unwrap();
    link.tx
        .send(WorkerMessage {
            kind: Some(worker_message::Kind::Register(Register {
                name: name.into(),
                slots: 0,
                platform: "linux/amd64".into(),
                protocol_major: PROTOCOL.major,
                protocol_minor: PROTOCOL.minor,
                ..Default::default()
            })),
        })
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), link.rx.recv())
        .await
        .unwrap()
        .and_then(|m| m.kind);
    assert!(matches!(
        first,
        Some(coordinator_message::Kind::Registered(_))
    ));
    link
}

/// Send a result of `image` for `assignment` naming `cache_key`, and wait for its ack
/// (by then the coordinator has taken it, or dropped it).
async fn send_result(link: &mut WorkerLink, assignment: &str, image: &BuiltImage, cache_key: &str) {
    link.tx
        .send(WorkerMessage {
            kind: Some(worker_message::Kind::Result(ResultMsg {
                assignment: assignment.into(),
                layer_json: serde_json::to_string(image).unwrap(),
                cache_key: cache_key.into(),
                ..Default::default()
            })),
        })
        .unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), link.rx.recv())
            .await
            .expect("acknowledged within 5 s")
            .and_then(|m| m.kind);
        match msg {
            Some(coordinator_message::Kind::Ack(ack)) => {
                assert_eq!(ack.assignment, assignment);
                break;
            }
            Some(_) => {}
            None => panic!("the rogue worker was disconnected"),
        }
    }
    // The ack goes out before the result is handled: give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// A worker's made-up result fails the layer (and the build) naming the worker, and
/// nothing is cached: a resubmission builds the layer again.
async fn a_forged_result_fails_the_layer_and_is_not_cached(forgery: Forgery, what: &str) {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let w = fake_worker(
        &farm,
        "liar",
        1,
        Script {
            forge: Some(forgery),
            ..QUICK
        },
        vec![],
    );
    let spec = fan_out(d.path(), 1, "forged");
    let (id, _) = farm.submit(spec.clone()).await.unwrap();
    let (state, error) = wait(&farm, &id).await;
    assert_eq!(state, BuildState::Failed);
    let error = error.unwrap();
    assert!(
        error.contains("worker liar") && error.contains(what),
        "{error}"
    );
    let status = farm.status(&id).await.unwrap().unwrap();
    assert_eq!(status.layers[0].state, LayerState::Failed);
    let key = w.jobs.lock().unwrap()[0].cache_key.clone();
    assert_eq!(farm.inner.cache.get(&key).await.unwrap(), None);

    let (again, _) = farm.submit(spec).await.unwrap();
    assert_eq!(wait(&farm, &again).await.0, BuildState::Failed);
    assert_eq!(w.layers(), ["l0", "l0"], "built again, not a cache hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_layer_blob_is_missing_is_refused() {
    a_forged_result_fails_the_layer_and_is_not_cached(
        Forgery::MissingLayer,
        "not in the blob store",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_config_names_other_diff_ids_is_refused() {
    a_forged_result_fails_the_layer_and_is_not_cached(Forgery::WrongDiffIds, "diff_ids").await;
}

/// Results whose blobs all check out, for assignments the rogue worker does not hold
/// (`a-999999` when `unknown`, else the honest worker's running one), naming a cached
/// entry's key: the entry stays, and the honest worker's result completes its build.
async fn a_result_for_an_assignment_the_worker_does_not_hold_is_dropped(unknown: bool) {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let honest = fake_worker(
        &farm,
        "honest",
        1,
        Script {
            delay: Duration::from_millis(800),
            ..QUICK
        },
        vec![],
    );
    let mut rogue = rogue(&farm, "rogue").await;
    // A layer built and cached honestly.
    let (first, _) = farm.submit(fan_out(d.path(), 1, "kept")).await.unwrap();
    assert_eq!(wait(&farm, &first).await.0, BuildState::Succeeded);
    let kept = honest.jobs.lock().unwrap()[0].clone();
    let entry = farm
        .inner
        .cache
        .get(&kept.cache_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry, result_for(farm.blobs(), &kept).await);

    let fake = image_of(farm.blobs(), "made up").await;
    let (second, _) = farm.submit(fan_out(d.path(), 1, "other")).await.unwrap();
    for _ in 0..100 {
        if honest.layers().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let theirs = if unknown {
        "a-999999".to_string()
    } else {
        honest.assigned.lock().unwrap()[1].0.clone()
    };
    send_result(&mut rogue, &theirs, &fake, &kept.cache_key).await;
    assert_eq!(
        farm.inner.cache.get(&kept.cache_key).await.unwrap(),
        Some(entry)
    );

    // The honest worker's result still completes the build, and is what is cached.
    let (state, error) = wait(&farm, &second).await;
    assert_eq!(state, BuildState::Succeeded, "{error:?}");
    let job = honest.jobs.lock().unwrap()[1].clone();
    assert_eq!(
        farm.inner.cache.get(&job.cache_key).await.unwrap(),
        Some(result_for(farm.blobs(), &job).await)
    );
    let status = farm.status(&second).await.unwrap().unwrap();
    assert_eq!(status.layers[0].worker.as_deref(), Some("honest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_an_unknown_assignment_is_dropped() {
    a_result_for_an_assignment_the_worker_does_not_hold_is_dropped(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_another_workers_assignment_is_dropped() {
    a_result_for_an_assignment_the_worker_does_not_hold_is_dropped(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_state_dir_and_its_databases_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    let _farm = start(d.path(), 1000).await;
    // The schemas are written: the write-ahead logs exist while the farm is open.
    let state = d.path().join("state");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&state), 0o700, "the state dir");
    for db in ["state.db", "cache.db"] {
        for suffix in ["", "-wal", "-shm"] {
            let p = state.join(format!("{db}{suffix}"));
            assert!(p.exists(), "{} exists", p.display());
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

#[tokio::test]
async fn an_existing_loose_state_dir_of_ours_is_tightened() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _farm = start(d.path(), 1000).await;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
}

#[tokio::test]
async fn uploaded_context_files_lose_setuid_setgid_and_sticky_bits() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 1000).await;
    let digest = farm
        .inner
        .config
        .blobs
        .put(bytes::Bytes::from_static(b"#!/bin/sh\n"))
        .await
        .unwrap()
        .digest
        .to_string();
    let file = |path: &str, mode: u32| ContextFile {
        path: path.into(),
        digest: digest.clone(),
        mode,
        symlink_target: String::new(),
    };
    let spec = Submission {
        context: vec![
            file("bin/suid", 0o4755),
            file("bin/sgid", 0o2750),
            file("bin/sticky", 0o1644),
            ContextFile {
                path: "shared".into(),
                digest: String::new(),
                mode: 0o3777,
                symlink_target: String::new(),
            },
        ],
        ..Submission::new(["stacker.yaml"])
    };
    let root = farm.inner.context_root(&spec).await.unwrap().unwrap();
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/suid"), 0o755);
    assert_eq!(mode("bin/sgid"), 0o750);
    assert_eq!(mode("bin/sticky"), 0o644);
    assert_eq!(mode("shared"), 0o777);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_with_a_bad_platform_is_refused_and_bad_chains_are_ignored() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let register = |name: &str, platform: &str, chains: Vec<String>| {
        let link = farm.connect_worker().unwrap();
        link.tx
            .send(WorkerMessage {
                kind: Some(worker_message::Kind::Register(Register {
                    name: name.into(),
                    slots: 1,
                    platform: platform.into(),
                    chains,
                    protocol_major: PROTOCOL.major,
                    protocol_minor: PROTOCOL.minor,
                    ..Default::default()
                })),
            })
            .unwrap();
        link
    };
    let first = |mut link: crate::farm::WorkerLink| async move {
        let kind = tokio::time::timeout(Duration::from_secs(5), link.rx.recv())
            .await
            .unwrap()
            .and_then(|m| m.kind);
        (kind, link)
    };
    let (kind, _bad) = first(register("bad", "amd64", vec![])).await;
    match kind {
        Some(coordinator_message::Kind::Refused(r)) => {
            assert!(
                r.reason.contains("'amd64' is not a platform"),
                "{}",
                r.reason
            )
        }
        other => panic!("not refused: {other:?}"),
    }
    // Chains that are not ChainIDs are dropped; the worker is still accepted.
    let junk = vec!["../../etc".to_string(), "x".repeat(10_000)];
    let (kind, _ok) = first(register("ok", "linux/amd64", junk)).await;
    assert!(
        matches!(kind, Some(coordinator_message::Kind::Registered(_))),
        "{kind:?}"
    );
    let names: Vec<String> = farm
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["ok"]);
}

// ---------------------------------------------------------------------------------------
// limits and the lifetime of materialised contexts
// ---------------------------------------------------------------------------------------

async fn start_limited(dir: &Path, limits: Limits) -> Farm {
    Farm::start(FarmConfig {
        lease: Duration::from_millis(2000),
        platform: "linux/amd64".parse().unwrap(),
        limits,
        ..FarmConfig::new(
            dir.join("state"),
            BlobStore::local(&dir.join("blobs")).unwrap(),
        )
    })
    .await
    .unwrap()
}

/// A submission whose context is `stacker.yaml` (of `yaml`) and `extra` files, each a copy
/// of `content`.
async fn context_submission(farm: &Farm, yaml: &str, extra: usize, content: &[u8]) -> Submission {
    let put = |b: Vec<u8>| async move {
        farm.blobs()
            .put(bytes::Bytes::from(b))
            .await
            .unwrap()
            .digest
            .to_string()
    };
    let mut context = vec![ContextFile {
        path: "stacker.yaml".into(),
        digest: put(yaml.as_bytes().to_vec()).await,
        mode: 0o644,
        symlink_target: String::new(),
    }];
    let digest = put(content.to_vec()).await;
    for i in 0..extra {
        context.push(ContextFile {
            path: format!("data/f{i}"),
            digest: digest.clone(),
            mode: 0o644,
            symlink_target: String::new(),
        });
    }
    Submission {
        context,
        ..Submission::new(["stacker.yaml"])
    }
}

/// The names under `contexts/` in the state dir, once removals spawned in the background
/// had a moment (bounded) to finish.
async fn contexts_left(dir: &Path, expect_empty: bool) -> Vec<String> {
    let contexts = dir.join("state").join("contexts");
    let list = || -> Vec<String> {
        std::fs::read_dir(&contexts)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for _ in 0..100 {
        let left = list();
        if !expect_empty || left.is_empty() {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    list()
}

const ONE_LAYER: &str = "l:\n  from: {type: scratch}\n  run: echo hi\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_context_over_its_limits_is_refused_saying_which() {
    let d = tempfile::tempdir().unwrap();
    let farm = start_limited(
        d.path(),
        Limits {
            max_context_files: 4,
            max_context_size: 1000,
            ..Limits::default()
        },
    )
    .await;
    // Five files: one too many.
    let spec = context_submission(&farm, ONE_LAYER, 4, b"x").await;
    match farm.submit(spec).await {
        Err(FarmError::Invalid(m)) => assert!(
            m.contains("lists 5 files") && m.contains("--max-context-files"),
            "{m}"
        ),
        other => panic!("{:?}", other.map(|(id, _)| id)),
    }
    // One 400-byte blob under three paths is 1,200 bytes to write: over 1,000.
    let spec = context_submission(&farm, ONE_LAYER, 3, &[7u8; 400]).await;
    match farm.submit(spec).await {
        Err(FarmError::Invalid(m)) => {
            assert!(m.contains("--max-context-size"), "{m}")
        }
        other => panic!("{:?}", other.map(|(id, _)| id)),
    }
    // Nothing was written for either.
    assert_eq!(contexts_left(d.path(), true).await, Vec::<String>::new());
    // Within both limits it is accepted.
    let _w = fake_worker(&farm, "w", 1, QUICK, vec![]);
    let spec = context_submission(&farm, ONE_LAYER, 2, &[7u8; 400]).await;
    let (id, _) = farm.submit(spec).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_over_the_layer_limit_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let farm = start_limited(
        d.path(),
        Limits {
            max_layers: 2,
            ..Limits::default()
        },
    )
    .await;
    match farm.submit(fan_out(d.path(), 3, "limit")).await {
        Err(FarmError::Invalid(m)) => {
            assert!(m.contains("3 layers") && m.contains("--max-layers"), "{m}")
        }
        other => panic!("{:?}", other.map(|(id, _)| id)),
    }
    let _w = fake_worker(&farm, "w", 2, QUICK, vec![]);
    let (id, _) = farm.submit(fan_out(d.path(), 2, "limit")).await.unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_lives_while_a_build_holds_it_and_temporary_dirs_never_stay() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    // A worker that holds its layers until told: both builds are live together.
    let slow = Script {
        delay: Duration::from_millis(700),
        ..QUICK
    };
    let _w = fake_worker(&farm, "w", 2, slow, vec![]);
    let a = context_submission(&farm, ONE_LAYER, 1, b"shared").await;
    let b = Submission {
        no_cache: true,
        ..a.clone()
    };
    let (first, _) = farm.submit(a).await.unwrap();
    let (second, _) = farm.submit(b).await.unwrap();
    let held = contexts_left(d.path(), false).await;
    assert_eq!(held.len(), 1, "one context for both: {held:?}");
    assert!(!held[0].starts_with(".tmp"), "{held:?}");
    assert_eq!(wait(&farm, &first).await.0, BuildState::Succeeded);
    assert_eq!(wait(&farm, &second).await.0, BuildState::Succeeded);
    // No live build needs it: it is gone.
    assert_eq!(contexts_left(d.path(), true).await, Vec::<String>::new());

    // A submission whose plan fails lets go of the context it materialised.
    let bad = context_submission(&farm, "l:\n  from: {type: nonsense}\n", 1, b"x").await;
    assert!(matches!(farm.submit(bad).await, Err(FarmError::Plan(_))));
    assert_eq!(contexts_left(d.path(), true).await, Vec::<String>::new());

    // A context whose file was never uploaded fails to materialise and leaves no
    // temporary directory behind.
    let mut broken = context_submission(&farm, ONE_LAYER, 0, b"").await;
    broken.context.push(ContextFile {
        path: "missing".into(),
        digest: Digest::of(b"never uploaded").to_string(),
        mode: 0o644,
        symlink_target: String::new(),
    });
    match farm.submit(broken).await {
        Err(FarmError::Invalid(m)) => assert!(m.contains("was not uploaded"), "{m}"),
        other => panic!("{:?}", other.map(|(id, _)| id)),
    }
    assert_eq!(contexts_left(d.path(), true).await, Vec::<String>::new());
    // Nor does one that fails half-way through being written (a path that is both a
    // file and a directory).
    let mut clash = context_submission(&farm, ONE_LAYER, 1, b"x").await;
    let mut under = clash.context[1].clone();
    under.path = "data/f0/under".into();
    clash.context.push(under);
    let err = farm.submit(clash).await.map(|(id, _)| id).unwrap_err();
    assert!(matches!(err, FarmError::Blobs(_)), "{err}");
    assert_eq!(contexts_left(d.path(), true).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_removes_contexts_no_build_holds() {
    let d = tempfile::tempdir().unwrap();
    let contexts = d.path().join("state").join("contexts");
    for name in [".tmp-abc-1-0", "0123abcd"] {
        std::fs::create_dir_all(contexts.join(name).join("sub")).unwrap();
        std::fs::write(contexts.join(name).join("sub/file"), b"x").unwrap();
    }
    let _farm = start(d.path(), 1000).await;
    assert_eq!(contexts_left(d.path(), true).await, Vec::<String>::new());
}

/// What a remote submission may read, fetch and use.
mod logs;
mod remote;

/// Fair share across builds, and priorities.
mod fair;

/// A worker may hand back only what it holds: a rogue's `Drain` naming another worker's
/// assignment moves nothing (the layer is not queued again, nor its attempt taken back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_handing_back_another_workers_assignment_moves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 2000).await;
    let honest = fake_worker(
        &farm,
        "honest",
        1,
        Script {
            delay: Duration::from_millis(800),
            ..QUICK
        },
        vec![],
    );
    let rogue = rogue(&farm, "rogue").await;
    let (id, _) = farm.submit(fan_out(d.path(), 1, "held")).await.unwrap();
    for _ in 0..100 {
        if !honest.assigned.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let theirs = honest.assigned.lock().unwrap()[0].0.clone();
    rogue
        .tx
        .send(WorkerMessage {
            kind: Some(worker_message::Kind::Drain(farm_proto::v1::Drain {
                hand_back: vec![theirs],
            })),
        })
        .unwrap();
    let (state, error) = wait(&farm, &id).await;
    assert_eq!(state, BuildState::Succeeded, "{error:?}");
    assert_eq!(honest.assigned.lock().unwrap().len(), 1, "assigned once");
    let status = farm.status(&id).await.unwrap().unwrap();
    assert_eq!(status.layers[0].worker.as_deref(), Some("honest"));
}

/// An unchanged remote resubmission gets the plan made before; one whose context
/// changed is planned again, and a local submission (which reads files that may change
/// on disk) is always planned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_remote_resubmission_reuses_its_plan_and_nothing_else_does() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 1000).await;
    let remote = |text: &'static str| {
        let farm = farm.clone();
        async move {
            let digest = farm
                .inner
                .config
                .blobs
                .put(bytes::Bytes::from_static(text.as_bytes()))
                .await
                .unwrap()
                .digest;
            Submission {
                context: vec![ContextFile {
                    path: "stacker.yaml".into(),
                    digest: digest.to_string(),
                    mode: 0o644,
                    symlink_target: String::new(),
                }],
                origin: Origin::Remote,
                ..Submission::new(["stacker.yaml"])
            }
        }
    };
    let names =
        |plan: &Plan| -> Vec<String> { plan.layers.iter().map(|l| l.layer.name.clone()).collect() };
    let first = remote("a:\n  from: {type: scratch}\n").await;
    let plan = farm.inner.plan(&first).await.unwrap();
    let again = farm.inner.plan(&first.clone()).await.unwrap();
    assert!(Arc::ptr_eq(&plan, &again), "planned again");
    let changed = remote("b:\n  from: {type: scratch}\n").await;
    assert_eq!(names(&farm.inner.plan(&changed).await.unwrap()), ["b"]);

    let file = d.path().join("local.yaml");
    std::fs::write(&file, "a:\n  from: {type: scratch}\n").unwrap();
    let local = submission(&file);
    assert_eq!(names(&farm.inner.plan(&local).await.unwrap()), ["a"]);
    std::fs::write(&file, "c:\n  from: {type: scratch}\n").unwrap();
    assert_eq!(names(&farm.inner.plan(&local).await.unwrap()), ["c"]);
}

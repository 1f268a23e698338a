//! The coordinator at scale (issue 17): a big DAG through the real gRPC services on
//! loopback (tonic server and clients, the real state store and action cache), with
//! in-process stand-in workers that speak the real worker protocol over their own
//! connections and answer every assignment at once.
//!
//! Run: `benches/scale.sh` (or `cargo bench -p farm-coordinator --bench scale`).
//! Settings (environment): LAYERS=20000 WAVE=500 FILES=LAYERS/50 (stackerfiles the
//! layers are spread over, in a chain of prerequisites) WORKERS=200 SLOTS=4 LISTED=1000
//! FAIR_HOLD_MS=200 (how long a stand-in holds each layer while fairness is measured),
//! FARM_BIN=path of a `farm` binary (times `farm submit` of the unchanged DAG; skipped
//! without it), STOP_AFTER=cold|hits (end after that phase, to profile one phase alone).
//!
//! The coordinator runs in this process, so its peak RSS is the process's (VmHWM),
//! stand-in workers and clients included (an upper bound of the coordinator's own).

/// The farm binary's allocator (see `cli/src/main.rs`): the bench measures what it runs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farm_client::Client;
use farm_coordinator::farm::{Farm, FarmConfig, Limits};
use farm_image::BlobStore;
use farm_model::{BuiltImage, Job, LayerBlob};
use farm_proto::v1::{
    ContextFile, Heartbeat, Register, Result as ResultMsg, SubmitRequest, WorkerMessage,
    coordinator_message, worker_message,
};
use farm_proto::workers_client::WorkersClient;

/// A phase the bench may end after (`STOP_AFTER`), to profile it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Cold,
    Hits,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// `layers` layers in waves of `wave`: layer j of wave k is built from layer j of wave
/// k-1 (`built`) and imports a file of layer j+1 of wave k-1 (`stacker://`). The layers
/// are spread over `files` stackerfiles (`s{f}.yaml`, in order); each names as
/// prerequisites the files its layers depend on, and the last one, the entry, names
/// every other (a chain of files each naming the one before would nest past the
/// loader's depth limit). Returns the files' texts (in order) and each layer's
/// dependencies.
fn big_stackerfiles(
    layers: usize,
    wave: usize,
    files: usize,
    salt: &str,
) -> (Vec<String>, HashMap<String, Vec<String>>) {
    let files = files.clamp(1, layers.max(1));
    let file_of = |i: usize| i * files / layers;
    let mut bodies = vec![String::new(); files];
    let mut prerequisites = vec![std::collections::BTreeSet::new(); files];
    let mut deps = HashMap::new();
    let name = |i: usize| format!("w{}_{}", i / wave, i % wave);
    for i in 0..layers {
        let me = name(i);
        let f = file_of(i);
        if i < wave {
            bodies[f].push_str(&format!(
                "{me}:\n  from: {{type: scratch}}\n  run: echo {salt} {i}\n"
            ));
            deps.insert(me, Vec::new());
        } else {
            let base = i - wave;
            let other = (i / wave - 1) * wave + (i % wave + 1) % wave;
            for d in [base, other] {
                if file_of(d) != f {
                    prerequisites[f].insert(file_of(d));
                }
            }
            bodies[f].push_str(&format!(
                "{me}:\n  from: {{type: built, tag: {}}}\n  imports:\n    - stacker://{}/out\n  run: echo {i}\n",
                name(base),
                name(other)
            ));
            deps.insert(me, vec![name(base), name(other)]);
        }
    }
    prerequisites[files - 1].extend(0..files - 1);
    let texts = bodies
        .into_iter()
        .zip(prerequisites)
        .map(|(body, pre)| {
            if pre.is_empty() {
                return body;
            }
            let mut text = String::from("config:\n  prerequisites:\n");
            for f in pre {
                text.push_str(&format!("    - s{f}.yaml\n"));
            }
            text + &body
        })
        .collect();
    (texts, deps)
}

/// What the stand-in workers saw, for dispatch latency.
#[derive(Default)]
struct Seen {
    /// Layer name -> when its result was sent.
    results: HashMap<String, Instant>,
    /// Layer name -> when its assignment arrived.
    assigned: HashMap<String, Instant>,
}

struct Workers {
    seen: Mutex<Seen>,
    /// Hold every layer this long before answering (0: at once).
    hold_ms: AtomicU64,
    /// Hold each layer a time drawn evenly from 0 to twice `hold_ms` instead.
    jitter: std::sync::atomic::AtomicBool,
}

/// One stand-in result, stored once (the scheduler checks it, as any worker's, against
/// the blob store: a real OCI config naming the layer's diff_id).
async fn stand_in_result(blobs: &BlobStore) -> BuiltImage {
    let layer = blobs.put(b"layer".to_vec().into()).await.unwrap();
    let diff_id = farm_image::Digest::of(b"tar").to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
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

async fn start_worker(addr: String, name: String, slots: u32, json: String, shared: Arc<Workers>) {
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let mut client = WorkersClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<WorkerMessage>();
    tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Register(Register {
            name,
            slots,
            platform: "linux/amd64".into(),
            protocol_major: farm_model::PROTOCOL.major,
            protocol_minor: farm_model::PROTOCOL.minor,
            ..Default::default()
        })),
    })
    .unwrap();
    tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Heartbeat(Heartbeat::default())),
    })
    .unwrap();
    let mut inbound = client
        .connect(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Heartbeats keep the leases alive while layers are held.
    let beat = tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let hb = WorkerMessage {
                kind: Some(worker_message::Kind::Heartbeat(Heartbeat::default())),
            };
            if beat.send(hb).is_err() {
                return;
            }
        }
    });
    while let Ok(Some(msg)) = inbound.message().await {
        let Some(coordinator_message::Kind::Assign(a)) = msg.kind else {
            continue;
        };
        let now = Instant::now();
        let job: Job = serde_json::from_str(&a.job_json).unwrap();
        let layer = job.layer.name.clone();
        shared
            .seen
            .lock()
            .unwrap()
            .assigned
            .insert(layer.clone(), now);
        let reply = ResultMsg {
            assignment: a.id,
            layer_json: json.clone(),
            cache_key: job.cache_key,
            ..Default::default()
        };
        let mut hold = shared.hold_ms.load(Ordering::Relaxed);
        if shared.jitter.load(Ordering::Relaxed) {
            use std::hash::BuildHasher;
            let draw = std::collections::hash_map::RandomState::new().hash_one(&layer);
            hold = draw % (2 * hold + 1);
        }
        let tx = tx.clone();
        let shared = shared.clone();
        let send = move || {
            shared
                .seen
                .lock()
                .unwrap()
                .results
                .insert(layer, Instant::now());
            let _ = tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Result(reply)),
            });
        };
        if hold == 0 {
            send();
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(hold)).await;
                send();
            });
        }
    }
}

/// Submit `file` (already in the blob store as `digest`) and wait for its last event.
/// Returns the build id, the time to the answer and the time to the last event.
async fn submit_and_wait(
    client: &mut Client,
    files: &[String],
    no_cache: bool,
) -> (String, Duration, Duration, String) {
    let t = Instant::now();
    let r = client
        .submit(SubmitRequest {
            stackerfiles: vec![format!("s{}.yaml", files.len() - 1)],
            context: files
                .iter()
                .enumerate()
                .map(|(f, digest)| ContextFile {
                    path: format!("s{f}.yaml"),
                    digest: digest.clone(),
                    mode: 0o644,
                    symlink_target: String::new(),
                })
                .collect(),
            no_cache,
            ..Default::default()
        })
        .await
        .unwrap();
    let answered = t.elapsed();
    // When the last layer's event came: the rest is the build's end (results and
    // manifests written).
    let mut layers_done = answered;
    let last = client
        .watch(&r.id, Duration::from_secs(30), |w| {
            if let farm_client::Watched::Event(ev) = w
                && farm_client::final_state(ev).is_none()
            {
                layers_done = t.elapsed();
            }
        })
        .await
        .unwrap();
    let state = farm_client::final_state(&last).unwrap_or(0);
    let state = format!(
        "last layer event at {:.2} s, state {state}",
        layers_done.as_secs_f64()
    );
    (r.id, answered, t.elapsed(), state)
}

async fn put_file(blobs: &BlobStore, text: String) -> String {
    blobs
        .put(text.into_bytes().into())
        .await
        .unwrap()
        .digest
        .to_string()
}

fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds used so far by this process's threads, summed by thread name (busiest
/// first): where the cores went (the runtime's workers, the databases' writers, ...).
fn cpu_by_thread() -> String {
    let mut by_name: HashMap<String, f64> = HashMap::new();
    let ticks = 100.0; // USER_HZ: the unit of /proc's times on Linux
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ...": the name may hold spaces; the times follow its ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let time = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        *by_name.entry(name).or_default() += (time(11) + time(12)) / ticks;
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, t)| *t >= 0.01).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter()
        .map(|(n, t)| format!("{n} {t:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Dispatch latencies (ms) of the layers the stand-ins saw, sorted: of the first wave,
/// of the others, of all. A layer is ready when the results of all its dependencies
/// were sent; until its assignment arrives. The first wave depends on nothing: it is
/// ready at `planned` (the submission's answer).
fn latencies(
    shared: &Workers,
    deps: &HashMap<String, Vec<String>>,
    planned: Instant,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut first, mut rest): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let seen = shared.seen.lock().unwrap();
    for (layer, ds) in deps {
        let Some(&assigned) = seen.assigned.get(layer) else {
            continue;
        };
        let ready = ds
            .iter()
            .map(|d| seen.results.get(d).copied())
            .try_fold(planned, |a, b| b.map(|b| a.max(b)));
        let Some(ready) = ready else { continue };
        let ms = assigned.saturating_duration_since(ready).as_secs_f64() * 1000.0;
        if ds.is_empty() { &mut first } else { &mut rest }.push(ms);
    }
    let mut all: Vec<f64> = first.iter().chain(&rest).copied().collect();
    for l in [&mut first, &mut rest, &mut all] {
        l.sort_by(f64::total_cmp);
    }
    (first, rest, all)
}

/// p50 / p99 / max of sorted latencies.
fn pct(l: &[f64]) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} ms",
        percentile(l, 0.5),
        percentile(l, 0.99),
        percentile(l, 1.0)
    )
}

/// The median of three timings of `f`, in milliseconds.
async fn timed<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut v = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(f64::total_cmp);
    v[1]
}

async fn run() {
    let layers = env("LAYERS", 20_000);
    let wave = env("WAVE", 500).min(layers).max(1);
    let n_workers = env("WORKERS", 200);
    let slots = env("SLOTS", 4) as u32;
    let listed = env("LISTED", 1000);
    let fair_hold = env("FAIR_HOLD_MS", 200) as u64;
    // Stackerfiles of 50 layers by default, as a monorepo's components would have:
    // every built layer's manifest carries its whole stackerfile as an annotation (as
    // stacker's do), so one file of 20,000 layers makes 20,000 manifests of 2 MB each.
    let files = env("FILES", layers.div_ceil(50));
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |what: &str, value: String, target: &str| {
        println!("  {what}: {value}");
        rows.push((what.to_string(), value, target.to_string()));
    };

    let d = tempfile::tempdir().unwrap();
    let blobs = BlobStore::local(&d.path().join("blobs")).unwrap();
    let json = serde_json::to_string(&stand_in_result(&blobs).await).unwrap();
    let farm = Farm::start(FarmConfig {
        platform: "linux/amd64".parse().unwrap(),
        keep_builds: listed + 100,
        limits: Limits {
            max_layers: layers.max(1000),
            ..Limits::default()
        },
        ..FarmConfig::new(d.path().join("state"), blobs.clone())
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(farm_coordinator::server::serve(
        listener,
        farm.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    let shared = Arc::new(Workers {
        seen: Mutex::new(Seen::default()),
        hold_ms: AtomicU64::new(0),
        jitter: Default::default(),
    });
    // The stand-ins run on a runtime of their own, on the same cores, so that the CPU
    // by thread tells the coordinator's from theirs.
    let stand_ins = Background(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stand-in")
            .enable_all()
            .build()
            .unwrap(),
    ));
    for w in 0..n_workers {
        stand_ins.handle().spawn(start_worker(
            addr.clone(),
            format!("instant-{w:03}"),
            slots,
            json.clone(),
            shared.clone(),
        ));
    }
    let mut client = Client::connect(&addr).await.unwrap();
    // Every worker registered.
    for _ in 0..600 {
        let n = client
            .workers()
            .await
            .unwrap()
            .iter()
            .filter(|w| w.connected)
            .count();
        if n == n_workers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "scale: {layers} layers in waves of {wave} in {files} stackerfiles, {n_workers} workers x {slots} slots, over gRPC at {addr}"
    );

    let (texts, deps) = big_stackerfiles(layers, wave, files, &format!("{}", std::process::id()));
    let mut big = Vec::new();
    for t in &texts {
        big.push(put_file(&blobs, t.clone()).await);
    }

    // (1) cold: every layer dispatched.
    let t0 = Instant::now();
    let (big_id, answered, total, state) = submit_and_wait(&mut client, &big, false).await;
    row(
        "submit -> last event (every layer dispatched)",
        format!(
            "{:.2} s (answer {:.2} s, {state})",
            total.as_secs_f64(),
            answered.as_secs_f64()
        ),
        "< 4 s",
    );
    // Dispatch latency: a layer is ready when the results of all its dependencies were
    // sent; until its assignment arrives. The first wave depends on nothing: it is ready
    // when the plan exists, taken as the submission's answer (planning 20,000 layers is
    // its own row above), and shown apart from the rest.
    let (first, rest, all) = latencies(&shared, &deps, t0 + answered);
    // Layers per second from the answer to the last event: what the coordinator (and
    // the stand-ins, on the same cores) can do.
    let cold_rate = layers as f64 / (total - answered).as_secs_f64();
    row(
        "dispatch latency p50 / p99 / max (ready -> assignment at the worker)",
        format!(
            "{} over {} layers (first wave alone: {}; the others: {})",
            pct(&all),
            all.len(),
            pct(&first),
            pct(&rest)
        ),
        "p99 < 20 ms",
    );
    // The coordinator's own share: queued (inputs ready, as its driver sees them) ->
    // assignment handed to the worker's connection; the row above adds the result's
    // trip in, its checks, the driver's turn and the assignment's trip out.
    let bound = |q| {
        farm.metrics()
            .dispatch_quantile_bound(q)
            .map_or("(past 600 s)".to_string(), |s| {
                format!("<= {:.0} ms", s * 1000.0)
            })
    };
    row(
        "scheduler's dispatch p50 / p99 (queued -> sent; `farm_dispatch_seconds` buckets)",
        format!("{} / {}", bound(0.5), bound(0.99)),
        "p99 < 20 ms",
    );

    println!(
        "  CPU seconds by thread since the start (live threads; the stand-ins' are `stand-in`): {}",
        cpu_by_thread()
    );
    let stop_after = match std::env::var("STOP_AFTER").as_deref() {
        Ok("cold") => Some(Phase::Cold),
        Ok("hits") => Some(Phase::Hits),
        Ok(other) => panic!("STOP_AFTER={other}: cold or hits"),
        Err(_) => None,
    };
    if stop_after == Some(Phase::Cold) {
        return;
    }
    // (2) warm: every layer a cache hit.
    let (_, answered, total, state) = submit_and_wait(&mut client, &big, false).await;
    row(
        "submit -> last event (every layer a cache hit)",
        format!(
            "{:.2} s (answer {:.2} s, {state})",
            total.as_secs_f64(),
            answered.as_secs_f64()
        ),
        "< 1 s",
    );

    if stop_after == Some(Phase::Hits) {
        return;
    }
    // (3) `farm submit` of the unchanged DAG, client included.
    match std::env::var("FARM_BIN") {
        Ok(bin) if !bin.is_empty() => {
            let dir = d.path().join("submit");
            std::fs::create_dir_all(&dir).unwrap();
            for (f, text) in texts.iter().enumerate() {
                std::fs::write(dir.join(format!("s{f}.yaml")), text).unwrap();
            }
            let entry = format!("s{}.yaml", texts.len() - 1);
            let submit = || {
                let t = Instant::now();
                let out = std::process::Command::new(&bin)
                    .args(["submit", "--coordinator", &addr, &entry])
                    .current_dir(&dir)
                    .env("FARM_LOG", "warn")
                    .output()
                    .unwrap();
                (out, t.elapsed())
            };
            // The first submission is not unchanged: the CLI sends its caller's
            // passthrough variables (TERM, proxies), which enter every cache key. Its
            // second is.
            let (_, first) = submit();
            let (out, took) = submit();
            println!(
                "  (`farm submit`'s first submission, its environment in every key: {:.2} s)",
                first.as_secs_f64()
            );
            row(
                "`farm submit` of the unchanged DAG (client included)",
                format!(
                    "{:.2} s ({})",
                    took.as_secs_f64(),
                    if out.status.success() {
                        "succeeded".to_string()
                    } else {
                        format!(
                            "failed: {}",
                            String::from_utf8_lossy(&out.stderr)
                                .lines()
                                .last()
                                .unwrap_or("")
                        )
                    }
                ),
                "< 1.5 s",
            );
        }
        _ => row(
            "`farm submit` of the unchanged DAG",
            "skipped (no FARM_BIN)".into(),
            "< 1.5 s",
        ),
    }

    // (4) status / list / workers.
    let status_ms = timed(|| {
        let mut c = client.clone();
        let id = big_id.clone();
        async move {
            let s = c.status(&id).await.unwrap();
            assert_eq!(s.layers.len(), layers);
        }
    })
    .await;
    row(
        &format!("status of the {layers}-layer build"),
        format!("{status_ms:.1} ms"),
        "< 200 ms",
    );
    let workers_ms = timed(|| {
        let mut c = client.clone();
        async move {
            let w = c.workers().await.unwrap();
            assert!(w.len() >= n_workers);
        }
    })
    .await;
    row(
        &format!("workers ({n_workers})"),
        format!("{workers_ms:.1} ms"),
        "< 200 ms",
    );
    // Enough small builds (all cache hits after the first) to list `listed`.
    let small = put_file(
        &blobs,
        "tiny:\n  from: {type: scratch}\n  run: echo tiny\n".into(),
    )
    .await;
    let have = client.list(true).await.unwrap().len();
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for _ in have..listed {
        let mut c = client.clone();
        let small = small.clone();
        pending.push(async move { submit_and_wait_small(&mut c, &[small]).await });
        if pending.len() >= 16 {
            pending.next().await;
        }
    }
    while pending.next().await.is_some() {}
    let big = client
        .list(true)
        .await
        .unwrap()
        .iter()
        .filter(|b| {
            b.layer_counts
                .iter()
                .map(|c| c.count as usize)
                .sum::<usize>()
                >= layers
        })
        .count();
    // What `farm status` asks for its table (layer counts), and what `--json` asks for.
    let list_ms = timed(|| {
        let mut c = client.clone();
        async move {
            let l = c.list(true).await.unwrap();
            assert!(l.len() >= listed);
        }
    })
    .await;
    let full_ms = timed(|| {
        let mut c = client.clone();
        async move {
            let l = c.list(false).await.unwrap();
            assert!(l.len() >= listed);
        }
    })
    .await;
    row(
        &format!("list ({listed} builds, {big} of {layers} layers)"),
        format!("{list_ms:.1} ms (with every layer, as `--json`: {full_ms:.1} ms)"),
        "< 200 ms",
    );

    // (5) fairness: a wide build holds every slot (each layer for FAIR_HOLD_MS) with
    // thousands of ready layers behind; a one-layer build then starts within?
    shared.hold_ms.store(fair_hold, Ordering::Relaxed);
    let total_slots = n_workers * slots as usize;
    let wide_n = total_slots * 4;
    let wide = put_file(
        &blobs,
        (0..wide_n)
            .map(|i| {
                format!(
                    "wide{i}:\n  from: {{type: scratch}}\n  run: echo wide {i} {}\n",
                    std::process::id()
                )
            })
            .collect(),
    )
    .await;
    let mut wc = client.clone();
    let wide_task = tokio::spawn(async move { submit_and_wait(&mut wc, &[wide], false).await });
    // Until every slot is busy (or as busy as dispatch gets them: a short hold on a
    // slow dispatch never fills every slot; the row says how many were busy).
    let mut busy_seen = 0;
    let filling = Instant::now();
    while busy_seen < total_slots && filling.elapsed() < Duration::from_secs(20) {
        let busy: usize = client
            .workers()
            .await
            .unwrap()
            .iter()
            .map(|w| w.running.len())
            .sum();
        busy_seen = busy_seen.max(busy);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let one = put_file(
        &blobs,
        format!(
            "one:\n  from: {{type: scratch}}\n  run: echo one {}\n",
            std::process::id()
        ),
    )
    .await;
    let t = Instant::now();
    let mut oc = client.clone();
    let one_task = tokio::spawn(async move {
        let r = oc
            .submit(SubmitRequest {
                stackerfiles: vec!["s0.yaml".into()],
                context: vec![ContextFile {
                    path: "s0.yaml".into(),
                    digest: one,
                    mode: 0o644,
                    symlink_target: String::new(),
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        oc.watch(&r.id, Duration::from_secs(30), |_| ())
            .await
            .unwrap();
    });
    let started = loop {
        if let Some(at) = shared.seen.lock().unwrap().assigned.get("one") {
            break at.saturating_duration_since(t);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    row(
        &format!(
            "fairness: a 1-layer build starts while {wide_n} layers hold/await {total_slots} slots ({busy_seen} seen busy)"
        ),
        format!(
            "{:.0} ms (one slot turnover: {fair_hold} ms)",
            started.as_secs_f64() * 1000.0
        ),
        "<= one turnover",
    );
    one_task.await.unwrap();
    let _ = wide_task.await.unwrap();
    shared.hold_ms.store(0, Ordering::Relaxed);

    // (6) dispatch latency below saturation. In the cold build the stand-ins answer at
    // once, so the coordinator is never idle: a wave's layers queue for its two cores
    // and their latency is the layers in flight over the layers it finishes per second
    // (Little's law), whatever the scheduler does. Here layers are held (as real ones
    // take time) so that waves are offered at half the cold build's rate: first each
    // for the same time, so a wave's results still come back together, then for times
    // drawn evenly around it, so they come back spread out.
    // A quarter of the cold build, and at least two waves (the first is not counted).
    let below = (layers / 4).max(2 * wave);
    let hold_ms = (2000.0 * wave as f64 / cold_rate).ceil() as u64;
    let slots_all = n_workers * slots as usize;
    for jitter in [false, true] {
        if wave > slots_all {
            // A wave would wait for slots, not for the coordinator.
            row(
                "dispatch latency at half the cold rate",
                format!("skipped: a wave of {wave} is more than the {slots_all} slots"),
                "p99 < 20 ms",
            );
            break;
        }
        let phase = Below {
            layers: below,
            wave,
            hold_ms,
            jitter,
        };
        below_saturation(&mut client, &blobs, &shared, &phase, &mut row).await;
    }

    row(
        "peak RSS of the bench process (coordinator, clients, stand-ins)",
        format!("{:.0} MB", vm_hwm_mb()),
        "< 300 MB",
    );

    println!("\n| measure | value | target |\n|---|---|---|");
    for (what, value, target) in &rows {
        println!("| {what} | {value} | {target} |");
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    drop(farm);
}

/// A runtime dropped inside another (which may not block): shut down in the background.
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("until dropped").handle()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A run of phase (6): a DAG of `layers` in waves of `wave`, each held `hold_ms` (or a
/// time drawn evenly from 0 to twice that, with `jitter`).
struct Below {
    layers: usize,
    wave: usize,
    hold_ms: u64,
    jitter: bool,
}

/// One run of phase (6); adds its dispatch latency row.
async fn below_saturation(
    client: &mut Client,
    blobs: &BlobStore,
    shared: &Workers,
    &Below {
        layers: below,
        wave,
        hold_ms,
        jitter,
    }: &Below,
    row: &mut impl FnMut(&str, String, &str),
) {
    shared.hold_ms.store(hold_ms, Ordering::Relaxed);
    shared.jitter.store(jitter, Ordering::Relaxed);
    {
        let mut seen = shared.seen.lock().unwrap();
        seen.assigned.clear();
        seen.results.clear();
    }
    let salt = format!("below {jitter} {}", std::process::id());
    let (texts, deps) = big_stackerfiles(below, wave, below.div_ceil(50), &salt);
    let mut files = Vec::new();
    for t in texts {
        files.push(put_file(blobs, t).await);
    }
    let t0 = Instant::now();
    let (_, answered, total, _) = submit_and_wait(client, &files, false).await;
    let (_, rest, _) = latencies(shared, &deps, t0 + answered);
    let held = if jitter {
        format!("each held 0-{} ms", 2 * hold_ms)
    } else {
        format!("each held {hold_ms} ms")
    };
    row(
        &format!("dispatch latency p50 / p99 / max at half the cold rate ({below} layers, {held})"),
        format!(
            "{} over {} layers after the first wave (build {:.2} s)",
            pct(&rest),
            rest.len(),
            total.as_secs_f64()
        ),
        "p99 < 20 ms",
    );
    shared.hold_ms.store(0, Ordering::Relaxed);
    shared.jitter.store(false, Ordering::Relaxed);
}

async fn submit_and_wait_small(client: &mut Client, files: &[String]) {
    let _ = submit_and_wait(client, files, false).await;
}

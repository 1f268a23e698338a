//! Coordinator overhead (issue 5, benchmark b): plan, schedule and complete a 2,000-layer
//! DAG of trivial layers with an in-process worker that answers every assignment at
//! once, through the real scheduler, state store and action cache.
//!
//! Run: `cargo bench -p farm-coordinator --bench overhead` (LAYERS=N to change the size).
//!
//! Traces (issue 16): the same DAG runs twice in one process on fresh farms, first with
//! tracing off (no subscriber), then with the OTLP exporter on, exporting every span to
//! an OTLP/gRPC receiver in this process (or to OTLP_ENDPOINT when set); TRACES=off
//! runs the first only.

/// The farm binary's allocator (see `cli/src/main.rs`): the bench measures what it runs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::time::Instant;

use farm_coordinator::farm::{EventKind, Farm, FarmConfig, Limits, Submission};
use farm_image::BlobStore;
use farm_model::Job;
use farm_model::{BuiltImage, LayerBlob};
use farm_proto::v1::{
    Heartbeat, Register, Result as ResultMsg, WorkerMessage, coordinator_message, worker_message,
};

fn main() {
    let n: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("tracing off:");
    rt.block_on(run(n));
    if std::env::var("TRACES").is_ok_and(|v| v == "off") {
        return;
    }
    let (endpoint, received) = match std::env::var("OTLP_ENDPOINT") {
        Ok(e) => (e, None),
        Err(_) => {
            let (e, r) = rt.block_on(receiver::start());
            (e, Some(r))
        }
    };
    let telemetry = farm_telemetry::Telemetry::start(&farm_telemetry::TelemetryConfig {
        endpoint: Some(endpoint.clone()),
        service: "farm-coordinator-bench".into(),
    })
    .unwrap();
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::registry().with(telemetry.layer());
        tracing::subscriber::set_global_default(subscriber).unwrap();
    }
    println!("tracing on (OTLP to {endpoint}):");
    rt.block_on(run(n));
    let t = Instant::now();
    let stats = telemetry.stats().unwrap();
    let ended = stats.ended.load(std::sync::atomic::Ordering::Relaxed);
    telemetry.shutdown();
    println!(
        "spans ended {ended}, received {}, flush at exit {:.3}s",
        received.map_or("?".to_string(), |r| r
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_string()),
        t.elapsed().as_secs_f64()
    );
}

/// An OTLP/gRPC receiver that counts the spans it is sent.
mod receiver {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl TraceService for Count {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    pub(super) async fn start() -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let count = Count::default();
        let received = count.0.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(count))
                .serve_with_incoming(incoming)
                .await;
        });
        (endpoint, received)
    }
}

/// `n` layers in waves of 100: each layer of a wave is built from one of the previous.
fn stackerfile(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        if i < 100 {
            y.push_str(&format!(
                "l{i}:\n  from: {{type: scratch}}\n  run: echo {i}\n"
            ));
        } else {
            y.push_str(&format!(
                "l{i}:\n  from: {{type: built, tag: l{}}}\n  run: echo {i}\n",
                i - 100
            ));
        }
    }
    y
}

async fn run(n: usize) {
    let d = tempfile::tempdir().unwrap();
    let blobs = BlobStore::local(&d.path().join("blobs")).unwrap();
    // One stand-in result, stored once: the scheduler does not look inside.
    // (Results are verified: the config must be an image config naming the layer.)
    let layer = blobs.put(b"layer".to_vec().into()).await.unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest.to_string()]},
    });
    let config = blobs
        .put(serde_json::to_vec(&config).unwrap().into())
        .await
        .unwrap();
    let result = BuiltImage::new(
        config.digest.to_string(),
        config.size,
        vec![LayerBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: layer.digest.to_string(),
            size: layer.size,
            diff_id: layer.digest.to_string(),
            verity_root_hash: None,
        }],
    )
    .unwrap();
    let mut config = FarmConfig {
        // The instant workers say they are linux/amd64.
        platform: "linux/amd64".parse().unwrap(),
        // More layers than a coordinator takes by default.
        limits: Limits::none(),
        ..FarmConfig::new(d.path().join("state"), blobs)
    };
    // The default limit (`--max-layers`) is below this benchmark's size.
    config.limits.max_layers = config.limits.max_layers.max(n);
    let farm = Farm::start(config).await.unwrap();
    for w in 0..2 {
        let link = farm.connect_worker().unwrap();
        let json = serde_json::to_string(&result).unwrap();
        tokio::spawn(async move {
            let tx = link.tx;
            let mut rx = link.rx;
            tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Register(Register {
                    name: format!("instant-{w}"),
                    slots: 64,
                    platform: "linux/amd64".into(),
                    protocol_major: farm_model::PROTOCOL.major,
                    protocol_minor: farm_model::PROTOCOL.minor,
                    ..Default::default()
                })),
            })
            .unwrap();
            let _ = tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Heartbeat(Heartbeat::default())),
            });
            while let Some(msg) = rx.recv().await {
                if let Some(coordinator_message::Kind::Assign(a)) = msg.kind {
                    let job: Job = serde_json::from_str(&a.job_json).unwrap();
                    let _ = tx.send(WorkerMessage {
                        kind: Some(worker_message::Kind::Result(ResultMsg {
                            assignment: a.id,
                            layer_json: json.clone(),
                            cache_key: job.cache_key,
                            ..Default::default()
                        })),
                    });
                }
            }
        });
    }
    let file = d.path().join("big.yaml");
    std::fs::write(&file, stackerfile(n)).unwrap();
    let spec = Submission {
        allow_outside_context: true,
        ..Submission::new([file.display().to_string()])
    };
    for round in [
        "cold (every layer dispatched)",
        "warm (every layer a cache hit)",
    ] {
        let t = Instant::now();
        let (id, layers) = farm.submit(spec.clone()).await.unwrap();
        let planned = t.elapsed();
        let mut events = farm.watch(&id, 0).await.unwrap();
        let mut state = None;
        while let Some((_, e)) = events.recv().await {
            if let EventKind::Build(s) = e.kind {
                state = Some(s);
                break;
            }
        }
        let total = t.elapsed();
        if let Some(error) = farm.status(&id).await.unwrap().and_then(|s| s.error) {
            println!("  the build failed: {error}");
        }
        println!(
            "{} layers, {round}: submit (plan) {:.3}s, to the end {:.3}s, {:?}",
            layers.len(),
            planned.as_secs_f64(),
            total.as_secs_f64(),
            state.unwrap()
        );
    }
}

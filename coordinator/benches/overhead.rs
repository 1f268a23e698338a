//! Coordinator overhead (issue 5, benchmark b): plan, schedule and complete a 2,000-layer
//! DAG of trivial layers with an in-process worker that answers every assignment at
//! once, through the real scheduler, state store and action cache.
//!
//! Run: `cargo bench -p farm-coordinator --bench overhead` (LAYERS=N to change the size).

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
    rt.block_on(run(n));
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
    // One stand-in result, stored once; the scheduler checks it as any worker's (its
    // blobs are in the store, its config names the layer's diff_id).
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
    let result = BuiltImage::new(
        config.digest.to_string(),
        config.size,
        vec![LayerBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: layer.digest.to_string(),
            size: layer.size,
            diff_id,
        }],
    )
    .unwrap();
    let farm = Farm::start(FarmConfig {
        // The instant workers say they are linux/amd64.
        platform: "linux/amd64".parse().unwrap(),
        // More layers than a coordinator takes by default.
        limits: Limits::none(),
        ..FarmConfig::new(d.path().join("state"), blobs)
    })
    .await
    .unwrap();
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
        println!(
            "{} layers, {round}: submit (plan) {:.3}s, to the end {:.3}s, {:?}",
            layers.len(),
            planned.as_secs_f64(),
            total.as_secs_f64(),
            state.unwrap()
        );
    }
}

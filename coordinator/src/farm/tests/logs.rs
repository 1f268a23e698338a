//! Log output in files, its cap, and the lease that needs progress, against workers
//! speaking the worker protocol over the farm's channels.

use super::*;

async fn start_with(dir: &Path, max_layer_log: u64, progress_timeout: Duration) -> Farm {
    Farm::start(FarmConfig {
        lease: Duration::from_secs(10),
        platform: "linux/amd64".parse().unwrap(),
        max_layer_log,
        progress_timeout,
        ..FarmConfig::new(
            dir.join("state"),
            BlobStore::local(&dir.join("blobs")).unwrap(),
        )
    })
    .await
    .unwrap()
}

/// A worker of one slot that sends what the test makes it send; returns its link and
/// the first assignment it gets.
async fn worker(farm: &Farm, name: &str) -> WorkerLink {
    worker_speaking(farm, name, PROTOCOL.minor).await
}

/// [`worker`], speaking minor version `minor` of the worker protocol.
async fn worker_speaking(farm: &Farm, name: &str, minor: u32) -> WorkerLink {
    let link = farm.connect_worker().unwrap();
    link.tx
        .send(WorkerMessage {
            kind: Some(worker_message::Kind::Register(Register {
                name: name.into(),
                slots: 1,
                platform: "linux/amd64".into(),
                protocol_major: PROTOCOL.major,
                protocol_minor: minor,
                ..Default::default()
            })),
        })
        .unwrap();
    link
}

/// The next assignment `link` gets (other messages are skipped).
async fn assignment(link: &mut WorkerLink) -> farm_proto::v1::Assignment {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), link.rx.recv())
            .await
            .expect("an assignment within 10 s")
            .and_then(|m| m.kind);
        match msg {
            Some(coordinator_message::Kind::Assign(a)) => return a,
            Some(_) => {}
            None => panic!("disconnected"),
        }
    }
}

fn logs(assignment: &str, lines: Vec<String>) -> WorkerMessage {
    WorkerMessage {
        kind: Some(worker_message::Kind::Logs(farm_proto::v1::LogBatch {
            assignment: assignment.into(),
            lines,
        })),
    }
}

fn heartbeat(live: Vec<String>) -> WorkerMessage {
    WorkerMessage {
        kind: Some(worker_message::Kind::Heartbeat(Heartbeat {
            live,
            ..Default::default()
        })),
    }
}

/// Every log line of build `id`, as `Logs` reads them (chunk by chunk from the file).
async fn read_logs(farm: &Farm, id: &str) -> Vec<(String, String)> {
    let mut rx = farm.stored_events(id, 0).await.unwrap();
    let mut out = Vec::new();
    while let Some((_, e)) = rx.recv().await {
        match e.kind {
            EventKind::Output(chunk) => {
                out.extend(chunk.text.into_iter().map(|l| (e.layer.clone(), l)))
            }
            EventKind::Log(l) => out.push((e.layer.clone(), l)),
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_goes_to_the_log_file_in_chunks_capped_with_one_marker_and_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let farm = start_with(d.path(), 1 << 20, FarmConfig::DEFAULT_PROGRESS_TIMEOUT).await;
    let mut w = worker(&farm, "chatty").await;
    let (id, _) = farm.submit(fan_out(d.path(), 1, "chatty")).await.unwrap();
    let a = assignment(&mut w).await;
    // The worker is told the cap.
    assert_eq!(a.max_layer_log, 1 << 20);
    // 2 MiB of output in batches of 1,000 lines of 100 bytes (with the newline).
    let line = |i: usize| format!("{i:099}");
    for batch in 0..21 {
        let lines = (batch * 1000..(batch + 1) * 1000).map(line).collect();
        w.tx.send(logs(&a.id, lines)).unwrap();
    }
    let job: Job = serde_json::from_str(&a.job_json).unwrap();
    let image = result_for(farm.blobs(), &job).await;
    w.tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Result(ResultMsg {
            assignment: a.id.clone(),
            layer_json: serde_json::to_string(&image).unwrap(),
            ..Default::default()
        })),
    })
    .unwrap();
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);

    let got = read_logs(&farm, &id).await;
    let output: Vec<&String> = got
        .iter()
        .filter(|(l, line)| l == "l0" && !line.starts_with("farm:"))
        .map(|(_, line)| line)
        .collect();
    // The first MiB, in order, then one marker naming the flag.
    let kept = (1 << 20) / 100;
    assert!(
        output.len() >= kept && output.len() <= kept + 50,
        "{}",
        output.len()
    );
    assert!(output.iter().enumerate().all(|(i, l)| **l == line(i)));
    let markers: Vec<&(String, String)> =
        got.iter().filter(|(_, l)| l.contains("log cap")).collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert!(markers[0].1.contains("--max-layer-log"), "{markers:?}");

    // The text is in the build's log file, not in the state database: its events are
    // a few dozen chunks of 64 KiB, not a row per line.
    let file = d.path().join(format!("state/logs/{id}.log"));
    let size = std::fs::metadata(&file).unwrap().len();
    assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&size), "{size}");
    let events = farm.state().events_page(&id, 0, 10_000).await.unwrap();
    assert!(events.len() < 60, "{} events", events.len());
    assert!(events.iter().all(|(_, json)| !json.contains(&line(7))));

    // A watcher sees the same lines; and removing the log (garbage collection) leaves
    // readers with what the state still has.
    let mut watched = Vec::new();
    let mut rx = farm.watch(&id, 0).await.unwrap();
    while let Some((_, e)) = rx.recv().await {
        watched.extend(e.progress_events());
    }
    let watched_lines = watched
        .iter()
        .filter(|e| matches!(e, farm_model::Event::Log { .. }))
        .count();
    assert_eq!(watched_lines, got.len());
    farm.remove_logs(&id).unwrap();
    assert!(!file.exists());
    let after = read_logs(&farm, &id).await;
    assert!(
        after.iter().all(|(_, l)| l.starts_with("farm:")),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_heartbeats_but_makes_no_progress_loses_its_layer() {
    let d = tempfile::tempdir().unwrap();
    let farm = start_with(d.path(), 1 << 20, Duration::from_millis(600)).await;
    let mut stuck = worker(&farm, "stuck").await;
    let (id, _) = farm.submit(fan_out(d.path(), 1, "stuck")).await.unwrap();
    let a = assignment(&mut stuck).await;
    // Heartbeats (the lease of 10 s never runs out), but no output and nothing live.
    let beating = {
        let tx = stuck.tx.clone();
        tokio::spawn(async move {
            loop {
                let _ = tx.send(heartbeat(Vec::new()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The stuck worker is told to stop the layer.
    let cancelled = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stuck.rx.recv())
            .await
            .expect("the stalled layer is taken back within 10 s")
            .and_then(|m| m.kind);
        match msg {
            Some(coordinator_message::Kind::Cancel(c)) => break c,
            Some(_) => {}
            None => panic!("disconnected"),
        }
    };
    assert_eq!(cancelled, a.id);
    beating.abort();
    // Another worker builds it.
    let healthy = fake_worker(&farm, "healthy", 1, QUICK, vec![]);
    assert_eq!(wait(&farm, &id).await.0, BuildState::Succeeded);
    assert_eq!(healthy.layers(), ["l0"]);
    let said = read_logs(&farm, &id).await;
    assert!(
        said.iter().any(|(_, l)| l.contains("made no progress")
            && l.contains("--progress-timeout")
            && l.contains("stuck")),
        "{said:?}"
    );
}

/// `worker`'s `link` sends heartbeats (naming assignment `a` live when `live`) for `ms` and is never
/// told to stop it; then it sends `a`'s result, and the build succeeds on that worker.
async fn heartbeat_then_finish(
    farm: &Farm,
    id: &str,
    (worker, link): (&str, &mut WorkerLink),
    a: &farm_proto::v1::Assignment,
    live: bool,
    ms: u64,
) {
    let until = tokio::time::Instant::now() + Duration::from_millis(ms);
    while tokio::time::Instant::now() < until {
        let names = if live { vec![a.id.clone()] } else { Vec::new() };
        link.tx.send(heartbeat(names)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(m) = link.rx.try_recv() {
            assert!(
                !matches!(m.kind, Some(coordinator_message::Kind::Cancel(_))),
                "a layer was taken back (live reported: {live}): {m:?}"
            );
        }
    }
    let job: Job = serde_json::from_str(&a.job_json).unwrap();
    let image = result_for(farm.blobs(), &job).await;
    link.tx
        .send(WorkerMessage {
            kind: Some(worker_message::Kind::Result(ResultMsg {
                assignment: a.id.clone(),
                layer_json: serde_json::to_string(&image).unwrap(),
                ..Default::default()
            })),
        })
        .unwrap();
    assert_eq!(wait(farm, id).await.0, BuildState::Succeeded);
    let status = farm.state().status(id).await.unwrap().unwrap();
    assert_eq!(status.layers[0].worker.as_deref(), Some(worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_from_before_live_reports_keeps_a_silent_layer() {
    // Protocol 2.1 workers send no `live` list: a silent run there looks stuck, so the
    // progress timeout must not apply to them (their lease still does).
    let d = tempfile::tempdir().unwrap();
    let farm = start_with(d.path(), 1 << 20, Duration::from_millis(600)).await;
    let mut old = worker_speaking(&farm, "old", 1).await;
    let (id, _) = farm.submit(fan_out(d.path(), 1, "old")).await.unwrap();
    let a = assignment(&mut old).await;
    heartbeat_then_finish(&farm, &id, ("old", &mut old), &a, false, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_whose_sandbox_runs_silently_keeps_its_worker() {
    let d = tempfile::tempdir().unwrap();
    let farm = start_with(d.path(), 1 << 20, Duration::from_millis(1500)).await;
    let mut busy = worker(&farm, "busy").await;
    let (id, _) = farm.submit(fan_out(d.path(), 1, "busy")).await.unwrap();
    let a = assignment(&mut busy).await;
    // Three progress timeouts of heartbeats that say the layer's sandbox runs.
    heartbeat_then_finish(&farm, &id, ("busy", &mut busy), &a, true, 4500).await;
}

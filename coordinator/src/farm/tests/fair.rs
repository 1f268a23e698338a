//! The ready queue is fair across builds, and a build's priority puts it first.

use super::*;

/// A stackerfile of `n` independent layers named `{prefix}{i}`.
fn named_fan_out(dir: &Path, prefix: &str, n: usize) -> Submission {
    let mut yaml = String::new();
    for i in 0..n {
        yaml.push_str(&format!(
            "{prefix}{i}:\n  from: {{type: scratch}}\n  run: echo {prefix} {i}\n"
        ));
    }
    let file = dir.join(format!("{prefix}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    submission(&file)
}

/// Until `worker` received `n` assignments (bounded).
async fn assigned_at_least(worker: &FakeWorker, n: usize) {
    for _ in 0..1000 {
        if worker.layers().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{} got {:?}, not {n} assignments",
        worker.name,
        worker.layers()
    );
}

/// Where `layer` came in the worker's assignments.
fn position(worker: &FakeWorker, layer: &str) -> usize {
    let layers = worker.layers();
    layers
        .iter()
        .position(|l| l == layer)
        .unwrap_or_else(|| panic!("{layer} never assigned: {layers:?}"))
}

/// A worker of one slot whose layers take `ms` each.
fn one_slot_worker(farm: &Farm, ms: u64) -> FakeWorker {
    fake_worker(
        farm,
        "one-slot",
        1,
        Script {
            delay: Duration::from_millis(ms),
            ..QUICK
        },
        vec![],
    )
}

/// A one-layer build submitted while a big build holds the only slot and has many
/// ready layers waiting starts at the next free slot (it was queued behind all of
/// them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_build_starts_before_a_big_builds_remaining_ready_layers() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 5000).await;
    let worker = one_slot_worker(&farm, 300);
    let (big, _) = farm
        .submit(named_fan_out(d.path(), "big", 12))
        .await
        .unwrap();
    assigned_at_least(&worker, 1).await;
    let (small, _) = farm
        .submit(named_fan_out(d.path(), "small", 1))
        .await
        .unwrap();
    assert_eq!(wait(&farm, &small).await.0, BuildState::Succeeded);
    // The slot's next layer or (if the small build was still being planned when the
    // slot came free) the one after: not the 12th.
    let at = position(&worker, "small0");
    assert!(
        at <= 2,
        "the small build waited for {at} layers: {:?}",
        worker.layers()
    );
    assert_eq!(wait(&farm, &big).await.0, BuildState::Succeeded);
}

/// A build of a higher priority gets the free slots before an earlier build's ready
/// layers; builds of equal priority take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_build_goes_first_and_equal_ones_take_turns() {
    let d = tempfile::tempdir().unwrap();
    let farm = start(d.path(), 5000).await;
    let worker = one_slot_worker(&farm, 200);
    let (low, _) = farm
        .submit(named_fan_out(d.path(), "low", 6))
        .await
        .unwrap();
    assigned_at_least(&worker, 1).await;
    let urgent = Submission {
        priority: 5,
        ..named_fan_out(d.path(), "urgent", 4)
    };
    let (urgent, _) = farm.submit(urgent).await.unwrap();
    assert_eq!(wait(&farm, &urgent).await.0, BuildState::Succeeded);
    let last_urgent = (0..4)
        .map(|i| position(&worker, &format!("urgent{i}")))
        .max()
        .unwrap();
    // low0 (and perhaps low1, while the urgent build was planned), then every urgent
    // layer.
    assert!(
        last_urgent <= 5,
        "urgent layers waited for low ones: {:?}",
        worker.layers()
    );
    assert_eq!(wait(&farm, &low).await.0, BuildState::Succeeded);

    // Equal priorities: two builds' layers alternate once both wait.
    let (a, _) = farm.submit(named_fan_out(d.path(), "a", 4)).await.unwrap();
    let (b, _) = farm.submit(named_fan_out(d.path(), "b", 4)).await.unwrap();
    assert_eq!(wait(&farm, &a).await.0, BuildState::Succeeded);
    assert_eq!(wait(&farm, &b).await.0, BuildState::Succeeded);
    // Layers of one build reach the queue in the order their jobs are ready, not
    // always in plan order: compare the builds, not layers.
    let first_b = (0..4).map(|i| position(&worker, &format!("b{i}"))).min();
    let last_a = (0..4).map(|i| position(&worker, &format!("a{i}"))).max();
    assert!(
        first_b < last_a,
        "b waited for all of a: {:?}",
        worker.layers()
    );
}

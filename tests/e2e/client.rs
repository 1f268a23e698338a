//! The client commands (`farm submit`, `status`, `logs`, `cancel`, `workers`, `pull`)
//! where no coordinator answers: errors that name the address and say what to do, fast;
//! stackerfile errors reported before anything is sent.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{Coordinator, free_port as dead_port};
use crate::util::{Run, farm, farm_bin};

fn dir_with(stackerfile: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("stacker.yaml"), stackerfile).unwrap();
    d
}

/// `farm ARGS` in `cwd` with FARM_COORDINATOR set to `coordinator`.
fn farm_env(cwd: &Path, coordinator: &str, args: &[&str]) -> Run {
    let out = Command::new(farm_bin())
        .args(args)
        .current_dir(cwd)
        .env("FARM_COORDINATOR", coordinator)
        .output()
        .unwrap();
    Run::from_output(args.iter().map(|s| s.to_string()).collect(), out)
}

#[test]
fn an_unreachable_coordinator_is_a_quick_clear_error() {
    let d = dir_with("app:\n  from:\n    type: scratch\n");
    let addr = format!("127.0.0.1:{}", dead_port());
    let runs: Vec<Vec<&str>> = vec![
        vec!["submit", "--coordinator", &addr],
        vec!["status", "--coordinator", &addr],
        vec!["status", "b1", "--wait", "--coordinator", &addr],
        vec!["logs", "b1", "--coordinator", &addr],
        vec!["cancel", "b1", "--coordinator", &addr],
        vec!["workers", "--coordinator", &addr],
        vec!["pull", "b1", "-o", "out", "--coordinator", &addr],
    ];
    for args in runs {
        let started = Instant::now();
        let run = farm(d.path(), &args);
        let took = started.elapsed();
        assert!(!run.status.success(), "{}", run.describe());
        assert!(
            took < Duration::from_secs(5),
            "took {took:?}\n{}",
            run.describe()
        );
        run.assert_stderr_contains(&format!("cannot reach the coordinator at http://{addr}"));
        run.assert_stderr_contains("farm coordinator --listen");
        run.assert_stderr_contains("FARM_COORDINATOR");
        assert!(run.stdout.is_empty(), "{}", run.describe());
    }
    // The same through the environment, spelled as a URL.
    let run = farm_env(d.path(), &format!("http://{addr}/"), &["submit"]);
    assert!(!run.status.success(), "{}", run.describe());
    run.assert_stderr_contains(&format!("cannot reach the coordinator at http://{addr}"));
}

#[test]
fn stackerfile_errors_are_reported_before_connecting() {
    let d = dir_with("app:\n  from:\n    type: built\n    tag: nope\n");
    let addr = format!("127.0.0.1:{}", dead_port());
    let run = farm(d.path(), &["submit", "--coordinator", &addr]);
    let e = run.error_where("about 'nope'", |d| d.message.contains("'nope'"));
    assert!(e.in_file("stacker.yaml"), "{}", run.describe());
    assert!(!run.stderr.contains("cannot reach"), "{}", run.describe());
}

#[test]
fn a_missing_import_is_reported_before_connecting() {
    let d = dir_with("app:\n  from:\n    type: scratch\n  imports:\n    - gone.txt\n");
    let addr = format!("127.0.0.1:{}", dead_port());
    let run = farm(d.path(), &["submit", "--coordinator", &addr]);
    assert!(!run.status.success(), "{}", run.describe());
    run.assert_stderr_contains("import 'gone.txt' of layer app");
    run.assert_stderr_contains("does not exist");
    assert!(!run.stderr.contains("cannot reach"), "{}", run.describe());
}

#[test]
fn commands_that_need_a_coordinator_say_how_to_give_one() {
    let d = tempfile::tempdir().unwrap();
    for args in [vec!["status"], vec!["workers"], vec!["logs", "b1"]] {
        let run = farm_env(d.path(), "", &args);
        assert!(!run.status.success(), "{}", run.describe());
        run.assert_stderr_contains("needs a coordinator");
        run.assert_stderr_contains("--coordinator");
    }
    let run = farm_env(d.path(), "localhost", &["status"]);
    assert!(!run.status.success(), "{}", run.describe());
    run.assert_stderr_contains("coordinator address 'localhost'");
}

#[test]
fn submit_status_cancel_against_a_coordinator_without_workers() {
    let c = Coordinator::start();
    let d = dir_with(
        "app:\n  from:\n    type: scratch\n  imports:\n    - path: f.txt\n      dest: /f.txt\n",
    );
    std::fs::write(d.path().join("f.txt"), "x").unwrap();
    let run = farm_env(d.path(), &c.addr, &["submit", "--detach", "--json"]);
    let id = run.json()["id"].as_str().expect("an id").to_string();

    // Nobody builds it: queued or running, its layer waiting.
    let status = farm_env(d.path(), &c.addr, &["status", &id, "--json"]).json();
    let keys: Vec<&String> = status.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["id", "state", "layers"], "{status}");
    assert_eq!(status["id"], id.as_str());
    assert!(
        status["state"] == "queued" || status["state"] == "running",
        "{status}"
    );
    let layer = &status["layers"][0];
    assert_eq!(layer["name"], "app", "{status}");
    assert_eq!(layer["state"], "waiting", "{status}");
    assert!(layer["worker"].is_null() && layer["manifest_digest"].is_null());
    assert!(layer["duration_ms"].is_null(), "{status}");
    let all = farm_env(d.path(), &c.addr, &["status", "--json"]).json();
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == id.as_str()),
        "{all}"
    );
    assert_eq!(
        farm_env(d.path(), &c.addr, &["workers", "--json"]).json(),
        serde_json::json!([])
    );

    let run = farm_env(d.path(), &c.addr, &["cancel", &id]);
    assert!(run.status.success(), "{}", run.describe());
    assert_eq!(run.stdout.trim(), "cancelled", "{}", run.describe());
    let run = farm_env(d.path(), &c.addr, &["status", &id, "--wait", "--json"]);
    assert!(!run.status.success(), "{}", run.describe());
    let status: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(status["state"], "cancelled", "{status}");

    let run = farm_env(d.path(), &c.addr, &["status", "nope"]);
    assert!(!run.status.success(), "{}", run.describe());
    run.assert_stderr_contains(&format!("no build nope on http://{}", c.addr));
}

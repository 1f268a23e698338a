//! CI webhooks end to end: a repository served by `git daemon` on 127.0.0.1, a real
//! `farm coordinator --webhooks` and `farm worker`, a signed GitHub push delivery; the
//! build runs the commit's stackerfile and a status API stand-in (GitHub cannot run
//! here: a small HTTP server on 127.0.0.1 that records calls) sees pending, then success
//! with the link to the build. A delivery with a bad signature starts nothing. A
//! delivery for a commit the branch has moved past builds that commit's files; a fork's
//! pull request builds and pushes nothing. The time from the 202 answer to the pending
//! status and to the worker starting the first layer is printed (not asserted).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};

use crate::procs::*;
use crate::util::*;

const SECRET: &str = "webhook-secret-for-the-test";

fn sign(body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The status API stand-in: every request's "path body" line, answered 201.
type Calls = Arc<Mutex<Vec<(Instant, String)>>>;

fn status_api() -> (String, Calls) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let (head, body) = read_request(&mut s);
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            c.lock()
                .unwrap()
                .push((Instant::now(), format!("{path} {body}")));
            let _ = s.write_all(
                b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            );
        }
    });
    (addr, calls)
}

/// An HTTP/1.1 request's head and body (by content-length).
fn read_request(s: &mut std::net::TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// POST `body` to `http://addr/path` with `headers`; the status code and body.
fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n").map_or("", |x| x.1).to_string(),
    )
}

/// The UTC time of day (seconds) of a log line that starts with an RFC 3339 timestamp
/// (`2026-01-02T03:04:05.678901Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_signed_github_push_builds_the_commit_and_reports_its_status() {
    let Some(e) = e2e() else {
        return;
    };
    if which("git").is_none() {
        return cannot_run("git is not installed").unwrap_or(());
    }
    let t = TestDir::new(e, "webhooks-push", Who::User);
    let Some(registry) = crate::registry::Registry::start(None) else {
        return;
    };
    let reg = registry.host();

    // The repository: a .farm.yaml, a stackerfile on the busybox fixture.
    let repo = t.join("srv/app");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "--quiet"]);
    std::fs::copy(t.join("busybox.tar"), repo.join("busybox.tar")).unwrap();
    std::fs::write(
        repo.join(".farm.yaml"),
        format!(
            "version: 1\nbuilds:\n  - name: app\n    stackerfile: stacker.yaml\n    branches: [main]\n    \
             push:\n      to: docker://{reg}/acme\n      tags: ['{{sha}}', '{{branch}}', 'pr-{{pr}}']\n"
        ),
    )
    .unwrap();
    std::fs::write(
        repo.join("stacker.yaml"),
        "app:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo built-at-${{FARM_GIT_SHA}}\n",
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "--quiet", "-m", "one"]);
    let sha = git(&repo, &["rev-parse", "HEAD"]);

    // Served by git daemon on loopback (as root; the repository is root's).
    let git_port = free_port();
    let mut daemon = Command::new("git");
    daemon
        .args([
            "-c",
            "safe.directory=*",
            "daemon",
            "--reuseaddr",
            "--export-all",
        ])
        .arg("--listen=127.0.0.1")
        .arg(format!("--port={git_port}"))
        .arg(format!("--base-path={}", t.join("srv").display()))
        .arg(t.join("srv"));
    let _daemon = Proc::spawn("git daemon", daemon, &t.join("git-daemon.log"));
    wait_until("git daemon listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", git_port))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });

    let (api_addr, calls) = status_api();
    t.write("hooks/secret", SECRET);
    t.write("hooks/token", "status-token");
    let hooks_addr = format!("127.0.0.1:{}", free_port());
    let repos = t.write(
        "hooks/repos.toml",
        format!(
            "log_url = \"http://farm.example/builds/{{build}}\"\n\n[[repo]]\nname = \"acme/app\"\n\
             provider = \"github\"\nclone_url = \"git://127.0.0.1:{git_port}/app\"\n\
             secret_file = \"secret\"\ntoken_file = \"token\"\nstatus_api = \"http://{api_addr}\"\n\
             branches = [\"main\"]\npull_requests = true\npush_to = [\"docker://{reg}/acme\"]\npush_insecure = true\n"
        ),
    );
    let blobs = format!("file://{}", t.join("blobs").display());
    let spec = CoordinatorSpec {
        state_dir: t.state.clone(),
        blobs: blobs.clone(),
        lease: Some(5.0),
        metrics: false,
        port: None,
        inputs: vec![
            "--webhooks".into(),
            hooks_addr.clone(),
            "--repos".into(),
            repos.display().to_string(),
        ],
    };
    let cmd = t.command(&[("NO_COLOR", "1")], farm_bin().to_str().unwrap());
    let coordinator = Coordinator::start_with(&spec, cmd, &t.join("coordinator.log"));
    let pool = private_pool(e, "webhooks-push");
    let mut wcmd = t.command(&[("NO_COLOR", "1")], farm_bin().to_str().unwrap());
    wcmd.args([
        "worker",
        "--coordinator",
        &format!("http://{}", coordinator.addr),
    ])
    .arg("--pool")
    .arg(&pool)
    .args(["--blobs", &blobs, "--slots", "1", "--name", "w"]);
    let _worker = Proc::spawn("worker w", wcmd, &t.join("worker.log"));
    let client = |args: &[&str]| {
        let out = t
            .command(&[("NO_COLOR", "1")], farm_bin().to_str().unwrap())
            .args(args)
            .args(["--coordinator", &coordinator.addr])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the webhook listener", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&hooks_addr)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });

    let body = format!(
        r#"{{"ref":"refs/heads/main","after":"{sha}","repository":{{"full_name":"acme/app"}}}}"#
    );
    // A bad signature: refused, nothing fetched or built.
    let bad = sign(&body.replace("main", "evil"));
    let (code, _) = post(
        &hooks_addr,
        "/hooks/github",
        &[
            ("x-github-event", "push"),
            ("x-github-delivery", "bad-1"),
            ("x-hub-signature-256", &bad),
        ],
        &body,
    );
    assert_eq!(code, 401);
    let count = || {
        let listed = client(&["status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&listed)
            .unwrap_or_else(|e| panic!("farm status --json: {e}: {listed}"))
            .as_array()
            .map_or(usize::MAX, Vec::len)
    };
    assert_eq!(count(), 0, "no build after a refused delivery");

    let good = sign(&body);
    let delivered = Instant::now();
    let (code, answer) = post(
        &hooks_addr,
        "/hooks/github",
        &[
            ("x-github-event", "push"),
            ("x-github-delivery", "good-1"),
            ("x-hub-signature-256", &good),
        ],
        &body,
    );
    let (accepted, accepted_wall) = (Instant::now(), std::time::SystemTime::now());
    assert_eq!(code, 202, "{answer}");
    let statuses = wait_until("the success status", Duration::from_secs(300), || {
        let c: Vec<String> = calls.lock().unwrap().iter().map(|c| c.1.clone()).collect();
        if c.iter().any(|l| l.contains("\"success\"")) {
            Ok(c)
        } else if c
            .iter()
            .any(|l| l.contains("\"failure\"") || l.contains("\"error\""))
        {
            panic!("the build failed: {c:?}\n{}", coordinator.proc.output())
        } else {
            Err(format!("{c:?}"))
        }
    });
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    {
        // Not asserted (no timing assertions): the note's numbers.
        let c = calls.lock().unwrap();
        eprintln!(
            "webhooks: delivery -> pending {:?}, delivery -> success {:?}",
            c[0].0 - delivered,
            c[1].0 - delivered
        );
        // From the 202 answer: to the pending status, and to the worker starting the
        // first layer (its log line "building", by its UTC timestamp).
        let worker_log = std::fs::read_to_string(t.join("worker.log")).unwrap_or_default();
        let first_layer = worker_log
            .lines()
            .find(|l| l.contains(": building"))
            .and_then(log_time);
        let accepted_at = accepted_wall
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            % 86_400.0;
        eprintln!(
            "webhooks: 202 -> pending status {:?}, 202 -> first layer building {}",
            c[0].0 - accepted,
            first_layer.map_or("(not in the worker's log)".to_string(), |at| format!(
                "{:.3}s",
                at - accepted_at
            )),
        );
    }
    assert!(statuses[0].contains("\"pending\""), "{statuses:?}");
    for s in &statuses {
        assert!(
            s.starts_with(&format!("/repos/acme/app/statuses/{sha} ")),
            "{s}"
        );
        assert!(s.contains("\"context\":\"farm/app\""), "{s}");
        assert!(s.contains("http://farm.example/builds/b-"), "{s}");
    }
    let id = statuses[1]
        .split("http://farm.example/builds/")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    assert!(statuses[1].contains("tags pushed"), "{statuses:?}");
    // Pushed under the tags of the template ('pr-{pr}' is empty for a push: skipped).
    let inspect = |reference: String| {
        let out = Command::new("skopeo")
            .args(["inspect", "--tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        out.status.success().then(|| {
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["Digest"].clone()
        })
    };
    let by_sha = inspect(format!("{reg}/acme/app:{sha}")).expect("tagged with the sha");
    let by_branch = inspect(format!("{reg}/acme/app:main")).expect("tagged with the branch");
    assert_eq!(by_sha, by_branch);
    assert!(inspect(format!("{reg}/acme/app:pr-")).is_none());
    // farm status says which delivery started it.
    let shown: serde_json::Value =
        serde_json::from_str(&client(&["status", &id, "--json"])).unwrap();
    assert_eq!(
        shown["webhook"],
        serde_json::json!({"provider": "github", "repo": "acme/app", "ref": "refs/heads/main",
            "sha": sha, "delivery": "good-1", "build": "app"}),
        "{shown}"
    );
    let logs = client(&["logs", &id, "app"]);
    assert!(logs.contains(&format!("built-at-{sha}")), "{logs}");

    // The same delivery again starts nothing.
    let (code, answer) = post(
        &hooks_addr,
        "/hooks/github",
        &[
            ("x-github-event", "push"),
            ("x-github-delivery", "good-1"),
            ("x-hub-signature-256", &good),
        ],
        &body,
    );
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(&id), "{answer}");
    assert_eq!(count(), 1, "one build in all");

    // A second commit whose `run` fails: pending, then failure; nothing pushed.
    std::fs::write(
        repo.join("stacker.yaml"),
        "app:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo second; exit 3\n",
    )
    .unwrap();
    git(&repo, &["commit", "--quiet", "-am", "two"]);
    let sha2 = git(&repo, &["rev-parse", "HEAD"]);
    let body2 = body.replace(&sha, &sha2);
    let sig2 = sign(&body2);
    let (code, answer) = post(
        &hooks_addr,
        "/hooks/github",
        &[
            ("x-github-event", "push"),
            ("x-github-delivery", "good-2"),
            ("x-hub-signature-256", &sig2),
        ],
        &body2,
    );
    assert_eq!(code, 202, "{answer}");
    let second = wait_until("the failure status", Duration::from_secs(300), || {
        let c: Vec<String> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.1.clone())
            .filter(|l| l.contains(&sha2))
            .collect();
        if c.iter().any(|l| l.contains("\"failure\"")) {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    });
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second[0].contains("\"pending\""), "{second:?}");
    assert!(inspect(format!("{reg}/acme/app:{sha2}")).is_none());
    // The branch tag still names the first commit's image.
    assert_eq!(inspect(format!("{reg}/acme/app:main")), Some(by_sha));

    // Deliver `body` (signed) as `event` with delivery id `id`; wait for the final status
    // of `sha`; its build id and the status line.
    let send = |event: &str, id: &str, body: &str| {
        let sig = sign(body);
        let (code, answer) = post(
            &hooks_addr,
            "/hooks/github",
            &[
                ("x-github-event", event),
                ("x-github-delivery", id),
                ("x-hub-signature-256", &sig),
            ],
            body,
        );
        assert_eq!(code, 202, "{answer}");
    };
    let finished = |id: &str, sha: &str| {
        let done = wait_until("the final status", Duration::from_secs(300), || {
            let c: Vec<String> = calls
                .lock()
                .unwrap()
                .iter()
                .map(|c| c.1.clone())
                .filter(|l| l.contains(sha))
                .collect();
            match c.iter().find(|l| !l.contains("\"pending\"")) {
                Some(l) if l.contains("\"success\"") => Ok(l.clone()),
                Some(l) => panic!("{id}: {l}\n{}", coordinator.proc.output()),
                None => Err(format!("{c:?}")),
            }
        });
        let build = done
            .split("http://farm.example/builds/")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_string();
        (build, done)
    };
    let deliver = |event: &str, id: &str, body: &str, sha: &str| {
        send(event, id, body);
        finished(id, sha)
    };
    let stackerfile = |word: &str| {
        format!(
            "app:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo {word} > /image-is; echo built-{word}\n"
        )
    };

    // A third commit, then a fourth that changes the image: a delivery for the third
    // (older than the branch's tip now) builds the third commit's files, not the tip's.
    std::fs::write(repo.join("stacker.yaml"), stackerfile("old")).unwrap();
    git(&repo, &["commit", "--quiet", "-am", "three"]);
    let sha3 = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("stacker.yaml"), stackerfile("new")).unwrap();
    git(&repo, &["commit", "--quiet", "-am", "four"]);
    let sha4 = git(&repo, &["rev-parse", "HEAD"]);
    let main_before = inspect(format!("{reg}/acme/app:main"));
    let (old_build, _) = deliver("push", "good-3", &body.replace(&sha, &sha3), &sha3);
    let logs = client(&["logs", &old_build, "app"]);
    assert!(logs.contains("built-old"), "{logs}");
    assert!(!logs.contains("built-new"), "{logs}");
    let old_image = inspect(format!("{reg}/acme/app:{sha3}")).expect("the old commit's image");
    // The branch has moved past the third commit: its late delivery pushes the commit's
    // own tag, not `main`.
    assert_eq!(inspect(format!("{reg}/acme/app:main")), main_before);
    let (new_build, _) = deliver("push", "good-4", &body.replace(&sha, &sha4), &sha4);
    assert_ne!(old_build, new_build);
    let logs = client(&["logs", &new_build, "app"]);
    assert!(logs.contains("built-new"), "{logs}");
    let new_image = inspect(format!("{reg}/acme/app:{sha4}")).expect("the new commit's image");
    assert_ne!(old_image, new_image, "two commits, two images");
    assert_eq!(inspect(format!("{reg}/acme/app:{sha3}")), Some(old_image));
    assert_eq!(inspect(format!("{reg}/acme/app:main")), Some(new_image));

    // A pull request from a fork (its head in another repository): built, nothing pushed.
    let tags = || {
        let out = Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{reg}/acme/app"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut tags: Vec<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        tags.sort();
        tags
    };
    let before = tags();
    git(&repo, &["checkout", "--quiet", "-b", "fork-work"]);
    std::fs::write(
        repo.join("stacker.yaml"),
        stackerfile("fork").replace("\n  run: ", "\n  run: sleep 5; "),
    )
    .unwrap();
    git(&repo, &["commit", "--quiet", "-am", "from a fork"]);
    let fork_sha = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["update-ref", "refs/pull/7/head", &fork_sha]);
    git(&repo, &["checkout", "--quiet", "main"]);
    let pr = format!(
        r#"{{"action":"opened","number":7,"pull_request":{{"number":7,"head":{{"sha":"{fork_sha}","repo":{{"full_name":"someone/app"}}}}}},"repository":{{"full_name":"acme/app"}}}}"#
    );
    send("pull_request", "pr-7", &pr);
    // While its layer runs (it sleeps), `farm workers` says which delivery started it.
    let running = wait_until(
        "the layer in farm workers",
        Duration::from_secs(120),
        || {
            let listed = client(&["workers", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&listed)
                .unwrap_or_else(|e| panic!("farm workers --json: {e}: {listed}"));
            v.as_array()
                .and_then(|w| w.iter().find(|w| w["name"] == "w"))
                .and_then(|w| w["webhooks"].as_array())
                .and_then(|h| h.first().cloned())
                .ok_or(listed)
        },
    );
    assert_eq!(running["layer"], "app", "{running}");
    assert_eq!(running["provider"], "github", "{running}");
    assert_eq!(running["repo"], "acme/app", "{running}");
    assert_eq!(running["ref"], "refs/pull/7/head", "{running}");
    assert_eq!(running["sha"], fork_sha.as_str(), "{running}");
    assert_eq!(running["delivery"], "pr-7", "{running}");
    let table = client(&["workers"]);
    assert!(
        table.contains(&format!(
            "from webhook github acme/app refs/pull/7/head at {fork_sha} (delivery pr-7)"
        )),
        "{table}"
    );
    let (fork_build, done) = finished("pr-7", &fork_sha);
    assert_eq!(running["build"], fork_build.as_str(), "{running}");
    assert!(!done.contains("tags pushed"), "{done}");
    let logs = client(&["logs", &fork_build, "app"]);
    assert!(logs.contains("built-fork"), "{logs}");
    assert_eq!(tags(), before, "a fork's pull request pushes no tag");
    assert!(inspect(format!("{reg}/acme/app:pr-7")).is_none());
    assert!(inspect(format!("{reg}/acme/app:{fork_sha}")).is_none());

    // A pull request of the repository itself at a commit a branch push already built:
    // it shares that build, and its own tag (pr-8) is pushed when the build is done.
    git(&repo, &["update-ref", "refs/pull/8/head", &sha4]);
    let pr8 = format!(
        r#"{{"action":"opened","number":8,"pull_request":{{"number":8,"head":{{"sha":"{sha4}","repo":{{"full_name":"acme/app"}}}}}},"repository":{{"full_name":"acme/app"}}}}"#
    );
    let builds_before = count();
    send("pull_request", "pr-8", &pr8);
    let pr8_image = wait_until("pr-8 pushed", Duration::from_secs(120), || {
        inspect(format!("{reg}/acme/app:pr-8")).ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(Some(pr8_image), inspect(format!("{reg}/acme/app:{sha4}")));
    assert_eq!(
        count(),
        builds_before,
        "the pull request shared the push's build"
    );
}

//! A shared farm as its operator sets it up: `farm coordinator` refuses a non-loopback
//! address without credentials (and serves it with `--insecure`, saying so), and with
//! TLS and tokens a `farm worker` and a `farm submit` over https build a layer, while a
//! client without a token, another client's token and a worker posing under another
//! name are refused. Certificates are made here with the openssl CLI; tokens with
//! `farm token new`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::*;
use crate::util::*;

const LIMIT: Duration = Duration::from_secs(120);

/// `cmd` (not waited for beyond `limit`): its output.
fn bounded(mut cmd: Command, limit: Duration) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{cmd:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

fn text(b: &[u8]) -> String {
    strip_ansi(&String::from_utf8_lossy(b))
}

/// Wait until something listens on `addr`, or panic with what `proc` said.
fn wait_listening(proc: &mut Proc, addr: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = proc.exited() {
            panic!("{} exited ({status}):\n{}", proc.name, proc.output());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} did not listen on {addr} within 30 s:\n{}",
            proc.name,
            proc.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_coordinator_refuses_a_public_address_without_credentials_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let args = |extra: &[&str]| {
        let mut c = Command::new(farm_bin());
        c.env_remove("RUST_LOG")
            .args(["coordinator", "--listen", &format!("0.0.0.0:{port}")])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--blobs")
            .arg(format!("file://{}", dir.path().join("blobs").display()))
            .args(extra);
        c
    };
    let out = bounded(args(&[]), LIMIT);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "it started:\n{err}");
    assert!(
        err.contains("refusing to serve")
            && err.contains("--tls-cert")
            && err.contains("--client-tokens")
            && err.contains("--insecure"),
        "{err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "it opened its state before refusing"
    );

    let mut proc = Proc::spawn(
        "insecure coordinator",
        args(&["--insecure"]),
        &dir.path().join("coordinator.log"),
    );
    let local = format!("127.0.0.1:{port}");
    wait_listening(&mut proc, &local);
    assert!(proc.output().contains("INSECURE"), "{}", proc.output());
    let out = bounded(
        {
            let mut c = Command::new(farm_bin());
            c.args(["workers", "--coordinator", &local]);
            c
        },
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is insecure"),
        "{}",
        text(&out.stderr)
    );
}

/// Certificates for the test: a CA and a server certificate for 127.0.0.1.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=farm e2e ca",
    ]);
    run(&ca);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=farm",
    ]);
    run(&req);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

/// `farm token new NAME --token-file NAME.token`: the token file's line.
fn new_token(dir: &Path, name: &str) -> String {
    let out = Command::new(farm_bin())
        .args(["token", "new", name, "--token-file"])
        .arg(dir.join(format!("{name}.token")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn a_farm_with_tls_and_tokens_builds_over_https() {
    let Some(e) = e2e() else {
        return;
    };
    let t = TestDir::new(e, "auth-tls", Who::User);
    make_certs(&t.path);
    std::fs::write(
        t.join("clients.tokens"),
        new_token(&t.path, "alice") + &new_token(&t.path, "bob"),
    )
    .unwrap();
    std::fs::write(t.join("workers.tokens"), new_token(&t.path, "w1")).unwrap();
    t.chown_all();

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let blobs = format!("file://{}", t.join("blobs").display());
    let mut coordinator = {
        let mut cmd = t.command(&[], farm_bin().to_str().unwrap());
        cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--blobs", &blobs, "--state-dir"])
            .arg(&t.state)
            .args([
                "--tls-cert",
                "server.crt",
                "--tls-key",
                "server.key",
                "--client-tokens",
                "clients.tokens",
                "--worker-tokens",
                "workers.tokens",
            ]);
        Proc::spawn("coordinator", cmd, &t.join("coordinator.log"))
    };
    wait_listening(&mut coordinator, &format!("127.0.0.1:{port}"));

    let worker = |name: &str, token: &str, log: &str| {
        let pool = private_pool(e, &format!("farm-auth-{name}"));
        let mut cmd = t.command(&[], farm_bin().to_str().unwrap());
        cmd.args(["worker", "--coordinator", &url, "--ca-cert", "ca.crt"])
            .args(["--token-file", token, "--name", name, "--slots", "1"])
            .args(["--blobs", &blobs, "--pool"])
            .arg(pool);
        Proc::spawn(&format!("worker {name}"), cmd, &t.join(log))
    };
    // w1's token under another name: refused, and the worker stops saying why.
    let mut impostor = worker("w2", "w1.token", "impostor.log");
    let started = Instant::now();
    while impostor.exited().is_none() {
        assert!(
            started.elapsed() < LIMIT,
            "the impostor keeps running:\n{}",
            impostor.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        impostor.output().contains("--name w1"),
        "{}",
        impostor.output()
    );
    let _w1 = worker("w1", "w1.token", "w1.log");

    let client = |args: &[&str], token: Option<&str>| {
        let mut cmd = t.command(&[], farm_bin().to_str().unwrap());
        cmd.args(args)
            .args(["--coordinator", &url, "--ca-cert", "ca.crt"]);
        if let Some(token) = token {
            cmd.args(["--token-file", token]);
        }
        bounded(cmd, LIMIT)
    };
    wait_until("w1 connects", Duration::from_secs(60), || {
        let out = client(&["workers", "--json"], Some("alice.token"));
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{e}: {}", text(&out.stderr)))?;
        let connected = listed.as_array().is_some_and(|a| {
            a.iter()
                .any(|w| w["name"] == "w1" && w["connected"] == true)
        });
        if connected {
            Ok(())
        } else {
            Err(listed.to_string())
        }
    });

    // Without a token: refused, saying which credential is wanted.
    let out = client(&["workers"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("FARM_TOKEN"),
        "{err}"
    );
    // A worker's token is not a client's.
    let out = client(&["workers"], Some("w1.token"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PermissionDenied")
            || text(&out.stderr).contains("only a client"),
        "{}",
        text(&out.stderr)
    );

    t.write(
        "stacker.yaml",
        "base:\n  from:\n    type: tar\n    url: busybox.tar\n\
         app:\n  from:\n    type: built\n    tag: base\n  run: echo over-tls > /hello\n",
    );
    let out = client(&["submit", "--json"], Some("alice.token"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let id = status["id"].as_str().unwrap();
    let app = status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "app")
        .unwrap();
    assert_eq!(app["worker"], "w1", "{status:#}");

    // alice sees her build; bob does not.
    let out = client(&["status", id, "--json"], Some("alice.token"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = client(&["status", id], Some("bob.token"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no build"),
        "{}",
        text(&out.stderr)
    );
}

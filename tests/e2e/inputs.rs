//! Inputs stay the submitter's, secrets stay home: a `farm submit` to a separately
//! started coordinator and worker (real processes, the unprivileged e2e user) leaves no
//! trace of the client's environment in the coordinator's state, which is private; an
//! uploaded setuid file loses the bit; a remote build's `binds` mount only what the
//! worker's operator allowed, read-only unless allowed read-write.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::*;
use crate::util::*;

/// The busybox base every layer here builds on.
const BASE: &str = "base:\n  from:\n    type: tar\n    url: busybox.tar\n";

/// A coordinator and one worker, as the e2e user, in a test dir of their own.
struct Remote {
    // Dropped in order: the processes before their directory.
    worker: Option<Proc>,
    coordinator: Coordinator,
    pool: PathBuf,
    blobs: String,
    t: TestDir,
}

impl Remote {
    fn start(test: &str) -> Option<Remote> {
        Remote::start_with(test, Vec::new())
    }

    /// With further coordinator flags.
    fn start_with(test: &str, inputs: Vec<String>) -> Option<Remote> {
        let e = e2e()?;
        let t = TestDir::new(e, &format!("inputs-{test}"), Who::User);
        let blobs = format!("file://{}", t.join("blobs").display());
        let spec = CoordinatorSpec {
            state_dir: t.state.clone(),
            blobs: blobs.clone(),
            lease: Some(5.0),
            metrics: false,
            port: None,
            inputs,
        };
        let cmd = t.command(&[("NO_COLOR", "1")], farm_bin().to_str().unwrap());
        let coordinator = Coordinator::start_with(&spec, cmd, &t.join("coordinator.log"));
        let pool = private_pool(e, &format!("inputs-{test}"));
        Some(Remote {
            worker: None,
            coordinator,
            pool,
            blobs,
            t,
        })
    }

    /// (Re)start the worker with `flags` (`--allow-bind ...`); waits until it is
    /// connected.
    fn worker(&mut self, flags: &[&str]) {
        self.worker = None;
        let mut cmd = self
            .t
            .command(&[("NO_COLOR", "1")], farm_bin().to_str().unwrap());
        cmd.args([
            "worker",
            "--coordinator",
            &format!("http://{}", self.coordinator.addr),
        ])
        .arg("--pool")
        .arg(&self.pool)
        .args(["--blobs", &self.blobs, "--slots", "1", "--name", "w"])
        .args(flags);
        self.worker = Some(Proc::spawn("worker w", cmd, &self.t.join("worker.log")));
        wait_until("the worker connects", Duration::from_secs(60), || {
            let run = self.client(&["workers", "--json"], &[]);
            let connected = run.json().as_array().is_some_and(|ws| {
                ws.iter()
                    .any(|w| w["name"] == "w" && w["connected"] == true && w["slots"] == 1)
            });
            if connected { Ok(()) } else { Err(run.stdout) }
        });
    }

    /// `farm ARGS --coordinator ADDR` as the e2e user in the test dir, with `env`.
    fn client(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd: Command = self.t.command(env, farm_bin().to_str().unwrap());
        cmd.args(args)
            .args(["--coordinator", &self.coordinator.addr]);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running farm {args:?}: {e}"));
        Run {
            args: args.iter().map(|s| s.to_string()).collect(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_submission_leaves_no_secret_and_no_setuid_bit_on_the_coordinator() {
    let Some(mut r) = Remote::start("secrets") else {
        return;
    };
    r.worker(&[]);
    let secret = "x-unique-value-5e1d9c";
    let suid = r.t.write("tool", "#!/bin/sh\necho tool\n");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    r.t.write(
        "stacker.yaml",
        format!(
            "{BASE}app:\n  from:\n    type: built\n    tag: base\n  imports:\n    - tool\n  \
             run: ls -ln /stacker/imports/tool; echo \"token=[${{SECRET_TOKEN:-}}]\"; sleep 3\n"
        ),
    );
    // The materialised context lives only while its build does: look at it meanwhile
    // (the run's sleep keeps the build alive).
    let contexts = r.t.state.join("contexts");
    let (run, materialised) = std::thread::scope(|s| {
        let submit = s.spawn(|| {
            r.client(
                &["submit", "--json", "-o", "oci"],
                &[("SECRET_TOKEN", secret), ("AWS_SECRET_ACCESS_KEY", secret)],
            )
        });
        let mut seen: Vec<(PathBuf, u32)> = Vec::new();
        while seen.is_empty() && !submit.is_finished() {
            seen = files_below(&contexts)
                .into_iter()
                .filter(|f| f.ends_with("tool"))
                .filter_map(|f| Some((f.clone(), std::fs::metadata(&f).ok()?.mode() & 0o7777)))
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (submit.join().unwrap(), seen)
    });
    run.assert_ok();
    assert!(
        !materialised.is_empty(),
        "the context was never seen materialised"
    );
    for (f, mode) in &materialised {
        assert_eq!(*mode, 0o755, "{} keeps no setuid bit", f.display());
    }
    let id = run.json()["id"].as_str().expect("an id").to_string();
    let logs = r.client(&["logs", &id, "app"], &[]);
    logs.assert_ok();
    assert!(
        logs.stdout.contains("-rwxr-xr-x") && logs.stdout.contains("token=[]"),
        "the import lost its setuid bit and the build saw no token:\n{}",
        logs.stdout
    );

    // Nothing of the state dir (databases, their -wal and -shm, uploaded contexts)
    // holds the value, and everything there is the coordinator's alone.
    let state = &r.t.state;
    let dir_mode = std::fs::metadata(state).unwrap().mode() & 0o7777;
    assert_eq!(dir_mode, 0o700, "the state dir");
    let files = files_below(state);
    assert!(
        files.iter().any(|f| f.to_string_lossy().ends_with("-wal")),
        "{files:?}"
    );
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the client's secret",
            f.display()
        );
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(".db") {
            let mode = std::fs::metadata(f).unwrap().mode() & 0o7777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
    }
    // The worker's pool is its own too.
    let pool_mode = std::fs::metadata(&r.pool).unwrap().mode() & 0o7777;
    assert_eq!(pool_mode, 0o700, "{}", r.pool.display());
}

#[test]
fn a_remote_build_binds_only_what_the_worker_allows_and_read_only() {
    let Some(mut r) = Remote::start("binds") else {
        return;
    };
    let shared = r.t.write("shared/data", "from the worker's host\n");
    let shared = shared.parent().unwrap().to_path_buf();
    let (uid, gid) = r.t.owner();
    chown_tree(&shared, uid, gid);
    let layer = |binds: &str, run: &str| {
        format!(
            "{BASE}app:\n  from:\n    type: built\n    tag: base\n  binds:\n{binds}  run: {run}\n"
        )
    };

    // No --allow-bind: a bind of the worker's root is refused, naming the flag.
    r.worker(&[]);
    r.t.write(
        "stacker.yaml",
        layer("    - / -> /host\n", "touch /host/tmp/owned"),
    );
    let run = r.client(&["submit"], &[]);
    run.assert_failed();
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(text.contains("--allow-bind"), "{text}");
    assert!(!Path::new("/tmp/owned").exists());

    // Allowed read-only: it mounts, a write fails.
    r.worker(&["--allow-bind", shared.to_str().unwrap()]);
    let binds = format!("    - {} -> /host\n", shared.display());
    r.t.write(
        "stacker.yaml",
        layer(
            &binds,
            "cat /host/data; if touch /host/new; then echo WROTE; exit 1; fi",
        ),
    );
    let run = r.client(&["submit"], &[]);
    run.assert_ok();
    assert!(!shared.join("new").exists(), "nothing written");
    // Outside the allowed prefix: refused.
    r.t.write("stacker.yaml", layer("    - / -> /host\n", "true"));
    let run = r.client(&["submit"], &[]);
    run.assert_failed();
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(text.contains("not under a prefix"), "{text}");
    // Asking to write a prefix allowed read-only: refused.
    let rw = format!(
        "    - {{source: {}, dest: /host, rw: true}}\n",
        shared.display()
    );
    r.t.write("stacker.yaml", layer(&rw, "touch /host/new"));
    let run = r.client(&["submit"], &[]);
    run.assert_failed();

    // Allowed read-write and asked for: written.
    r.worker(&["--allow-bind", &format!("{}:rw", shared.display())]);
    let run = r.client(&["submit"], &[]);
    run.assert_ok();
    assert!(shared.join("new").exists(), "written through the bind");
}

/// A remote submission's `docker` base: the coordinator's registry credentials serve
/// only the registries its operator names; elsewhere it pulls anonymously.
#[test]
fn registry_credentials_serve_only_the_registries_the_operator_names() {
    let Some(e) = e2e() else { return };
    let (user, pass) = ("farmer", "s3cret-Pw-77");
    let Some(registry) = crate::registry::Registry::start(Some((user, pass))) else {
        return;
    };
    registry.seed(e, "busybox", "latest", false);
    let stackerfile = format!(
        "app:\n  from:\n    type: docker\n    url: {}\n    insecure: true\n  run: echo ok > /ok\n",
        registry.url("busybox:latest")
    );
    let flags = |more: &[&str]| -> Vec<String> {
        [
            "--registry-username",
            user,
            "--registry-password",
            pass,
            // The registry is on loopback: a remote submission may reach it only so.
            "--allow-fetch",
            "127.0.0.1",
        ]
        .iter()
        .chain(more)
        .map(|s| s.to_string())
        .collect()
    };

    let Some(mut r) = Remote::start_with("registry-anon", flags(&[])) else {
        return;
    };
    r.worker(&[]);
    r.t.write("stacker.yaml", &stackerfile);
    let run = r.client(&["submit"], &[]);
    run.assert_failed();
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains(&format!("--registry-credentials-for {}", registry.host())),
        "{text}"
    );
    drop(r);

    let host = registry.host();
    let Some(mut r) = Remote::start_with(
        "registry-named",
        flags(&["--registry-credentials-for", &host]),
    ) else {
        return;
    };
    r.worker(&[]);
    r.t.write("stacker.yaml", &stackerfile);
    r.client(&["submit"], &[]).assert_ok();
}

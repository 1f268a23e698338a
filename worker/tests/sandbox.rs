//! The rootless sandbox, for real: every check runs twice, as real root (`NAME::as_root`)
//! and as an unprivileged user with a subordinate id range (`NAME::rootless`).
//!
//! * `as_root` needs euid 0.
//! * `rootless`: as root, the test creates the user `farmtest` if missing (`useradd -m`
//!   gives it /etc/subuid and /etc/subgid ranges) and re-runs this test binary as that
//!   user (`setpriv --reuid --regid --init-groups`, `--exact NAME::rootless`,
//!   `FARM_TEST_INNER=1`); as a non-root user with a subuid range it runs directly.
//! * A check that cannot run fails when `CI=true` and is skipped with a printed reason
//!   otherwise.
//!
//! The entry point is the `farm-userns-entry` binary of this crate (the real `farm`
//! binary wires the same function). The base rootfs is made from busybox-static, inside
//! the namespace, by the namespace's root.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farm_worker::{
    Bind, CancelToken, Entry, IdMapping, Rootfs, SandboxError, SandboxSpec, ScriptStatus, Userns,
};

const ENTRY: &str = env!("CARGO_BIN_EXE_farm-userns-entry");

/// The ops `farm-userns-entry` serves besides the worker's (its `EntryOp`), as sent.
#[derive(serde::Serialize)]
#[serde(tag = "op", content = "arg", rename_all = "kebab-case")]
enum TestOp<'a> {
    Echo,
    Inspect(&'a Path),
}
const TEST_USER: &str = "farmtest";
const INNER: &str = "FARM_TEST_INNER";

// ------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------

fn cannot_run(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot run under CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn as_root(body: fn(&Ctx)) {
    if std::env::var_os(INNER).is_some() {
        return; // inside a rootless re-run only the rootless test is selected
    }
    if !is_root() {
        return cannot_run("the as_root checks need euid 0");
    }
    body(&Ctx::new());
}

fn rootless(test_name: &str, body: fn(&Ctx)) {
    if std::env::var_os(INNER).is_some() || (!is_root() && IdMapping::detect().is_ok()) {
        assert!(!is_root(), "the rootless checks must not run as root");
        return body(&Ctx::new());
    }
    if !is_root() {
        let why = IdMapping::detect().unwrap_err();
        return cannot_run(&format!("not root and no subordinate ids: {why}"));
    }
    ensure_test_user();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={TEST_USER}"),
            &format!("--regid={TEST_USER}"),
            "--init-groups",
            "--",
        ])
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("running setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- {test_name} as {TEST_USER} ---\n{stdout}{stderr}--- end ---");
    assert!(
        out.status.success(),
        "rootless run of {test_name} failed: {}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the rootless run did not run {test_name}"
    );
}

/// Creates `farmtest` with subordinate ids (once per process; useradd locks are not
/// shared between concurrent callers).
fn ensure_test_user() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let exists = || {
        nix::unistd::User::from_name(TEST_USER)
            .ok()
            .flatten()
            .is_some()
    };
    for _ in 0..5 {
        if exists() {
            break;
        }
        let st = std::process::Command::new("useradd")
            .args(["-m", TEST_USER])
            .status()
            .expect("useradd");
        if !st.success() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(exists(), "could not create user {TEST_USER}");
    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with(&format!("{TEST_USER}:")))
        {
            continue;
        }
        let end = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some(f.get(1)?.parse::<u64>().ok()? + f.get(2)?.parse::<u64>().ok()?)
            })
            .max()
            .unwrap_or(100_000)
            .max(100_000);
        let range = format!("{end}-{}", end + 65535);
        let st = std::process::Command::new("usermod")
            .args([flag, &range, TEST_USER])
            .status()
            .expect("usermod");
        assert!(st.success(), "usermod {flag} {range} {TEST_USER} failed");
    }
    *done = true;
}

macro_rules! sandbox_test {
    ($name:ident) => {
        mod $name {
            #[test]
            fn as_root() {
                super::as_root(super::$name);
            }
            #[test]
            fn rootless() {
                super::rootless(concat!(stringify!($name), "::rootless"), super::$name);
            }
        }
    };
}

// ------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------

struct Ctx {
    userns: Userns,
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    base: PathBuf,
}

impl Ctx {
    fn new() -> Ctx {
        let userns = Userns::detect(Entry::new(ENTRY)).expect("id mapping");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        userns
            .mapping()
            .make_owned_by_container_root(dir.path())
            .unwrap();
        let ctx = Ctx {
            base: dir.path().join("base"),
            userns,
            rt,
            dir,
        };
        ctx.make_busybox_rootfs(&ctx.base);
        ctx
    }

    /// A busybox rootfs made by the namespace's root (so it is owned by container ids).
    /// No /proc, /sys, /dev or /stacker: the sandbox must not need them in the base.
    fn make_busybox_rootfs(&self, root: &Path) {
        let script = r#"
            set -e
            R="$1"
            mkdir -p "$R/bin" "$R/etc" "$R/tmp" "$R/data" "$R/opq/sub"
            cp /bin/busybox "$R/bin/busybox"
            for a in $(/bin/busybox --list); do
                [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
            done
            echo keep > "$R/data/keep"
            echo del > "$R/data/del"
            echo a > "$R/opq/a"
            echo b > "$R/opq/sub/b"
            echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
            echo 'root:x:0:' > "$R/etc/group"
            chmod 1777 "$R/tmp"
            id -u
        "#;
        let mut cmd = self.userns.command("/bin/busybox");
        cmd.args(["sh", "-c", script, "sh"])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning in the user namespace");
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = child.wait_blocking().unwrap();
        assert!(st.success(), "making the rootfs failed: {st}: {err}");
        assert_eq!(out.trim(), "0", "the rootfs was not made as container root");
        let (uid, _) = self.userns.mapping().container_root();
        assert_eq!(
            std::fs::metadata(root.join("bin/busybox")).unwrap().uid(),
            uid
        );
    }

    /// A directory owned by container root.
    fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        self.userns
            .mapping()
            .make_owned_by_container_root(&p)
            .unwrap();
        p
    }

    /// A spec on an overlay of the busybox base with fresh upper/work dirs.
    fn overlay_spec(&self, tag: &str, script: &str) -> SandboxSpec {
        let rootfs = Rootfs::Overlay {
            lower: vec![self.base.clone()],
            upper: self.mkdir(&format!("{tag}/upper")),
            work: self.mkdir(&format!("{tag}/work")),
        };
        let mut spec = SandboxSpec::new(rootfs, self.mkdir(&format!("{tag}/mnt")), script);
        spec.env = vec![("PATH".into(), "/bin".into())];
        spec
    }

    fn upper(spec: &SandboxSpec) -> PathBuf {
        match &spec.rootfs {
            Rootfs::Overlay { upper, .. } => upper.clone(),
            Rootfs::Bind(_) => panic!("not an overlay"),
        }
    }

    fn run(&self, spec: &SandboxSpec) -> (Result<ScriptStatus, SandboxError>, Vec<String>) {
        let mut lines = Vec::new();
        let r = self.rt.block_on(
            self.userns
                .run_sandbox(spec, None, |l| lines.push(l.to_string())),
        );
        (r, lines)
    }

    /// Runs and expects success; returns the output lines that are not `sh -x` traces.
    fn run_ok(&self, spec: &SandboxSpec) -> Vec<String> {
        let (r, lines) = self.run(spec);
        match r {
            Ok(ScriptStatus::Exited(0)) => {}
            other => panic!("script failed: {other:?}; output:\n{}", lines.join("\n")),
        }
        lines.into_iter().filter(|l| !l.starts_with("+ ")).collect()
    }

    /// Entries below `dir`, read by container root through the `inspect` op.
    fn inspect(&self, dir: &Path) -> Vec<serde_json::Value> {
        let mut cmd = self.userns.request_command(&TestOp::Inspect(dir)).unwrap();
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut out = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            child.wait_blocking().unwrap().success(),
            "inspect failed: {err}"
        );
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Host pids of the processes in the pid namespace `ns` (as `pid:[N]`).
fn procs_in_ns(ns: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .map(|l| l.to_string_lossy() == ns)
                .unwrap_or(false)
        })
        .collect()
}

// ------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------

sandbox_test!(identity_hostname_pid1);
fn identity_hostname_pid1(ctx: &Ctx) {
    let spec = ctx.overlay_spec(
        "t",
        // A #! script (no -x traces, which interleave with pipeline output).
        "#!/bin/sh\nid -u\nid -g\nid -G\nhostname\ncat /proc/1/comm\necho pid=$$\nls /proc | grep -c '^[0-9]'\nhead -1 /proc/self/uid_map\n",
    );
    let out = ctx.run_ok(&spec);
    assert_eq!(
        &out[..6],
        ["0", "0", "0", "stacker", "init", "pid=2"],
        "{out:?}"
    );
    let nprocs: u32 = out[6].parse().unwrap();
    assert!(
        (2..=6).contains(&nprocs),
        "a fresh /proc of a new pid namespace shows few pids: {out:?}"
    );
    let first: Vec<u32> = out[7]
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    let r = ctx.userns.mapping().uids[0];
    assert_eq!(first, [r.container, r.host, r.count]);
}

sandbox_test!(overlay_captures_only_the_change);
fn overlay_captures_only_the_change(ctx: &Ctx) {
    let spec = ctx.overlay_spec(
        "t",
        "echo hello > /newfile\nrm /data/del\nrm -rf /opq\nmkdir /opq\necho x > /opq/new\nls /data\n",
    );
    let out = ctx.run_ok(&spec);
    assert_eq!(out, ["keep"]);
    let upper = Ctx::upper(&spec);
    // Exactly the change: no /stacker, no script, no /proc, /dev, /sys mountpoints.
    assert_eq!(
        tree(&upper),
        set(&["data", "data/del", "newfile", "opq", "opq/new"])
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("newfile")).unwrap(),
        "hello\n"
    );
    assert!(
        !ctx.base.join("newfile").exists(),
        "the lower dir was written"
    );
    assert!(ctx.base.join("data/del").exists() && ctx.base.join("opq/sub/b").exists());
    let wh = std::fs::symlink_metadata(upper.join("data/del")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "deletion is a 0:0 whiteout"
    );
    assert_eq!(
        farm_worker::sys::lgetxattr(&upper.join("opq"), "user.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    // Host view: files of container root belong to the mapped host uid.
    let (uid, gid) = ctx.userns.mapping().container_root();
    let m = std::fs::metadata(upper.join("newfile")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    // Container view, read by container root inside the namespace.
    let entries = ctx.inspect(&upper);
    eprintln!("upper dir as container root sees it:");
    for e in &entries {
        eprintln!("  {e}");
        assert_eq!(
            (e["uid"].as_u64(), e["gid"].as_u64()),
            (Some(0), Some(0)),
            "{e}"
        );
    }
    let opq = entries.iter().find(|e| e["path"] == "opq").unwrap();
    assert_eq!(opq["xattrs"]["user.overlay.opaque"], "y");
    let del = entries.iter().find(|e| e["path"] == "data/del").unwrap();
    assert_eq!(
        (del["kind"].as_str(), del["rdev"].as_u64()),
        (Some("char"), Some(0))
    );
}

sandbox_test!(output_streams_in_order);
fn output_streams_in_order(ctx: &Ctx) {
    let script = "#!/bin/sh\ni=1\nwhile [ $i -le 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done\n\
                  echo before-sleep\nsleep 1\necho after-sleep\nprintf tail";
    let spec = ctx.overlay_spec("t", script);
    let stamps: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let s2 = stamps.clone();
    let r = ctx
        .rt
        .block_on(ctx.userns.run_sandbox(&spec, None, move |l| {
            s2.lock().unwrap().push((l.to_string(), Instant::now()))
        }));
    assert_eq!(r.unwrap(), ScriptStatus::Exited(0));
    let stamps = stamps.lock().unwrap();
    let lines: Vec<&str> = stamps.iter().map(|(l, _)| l.as_str()).collect();
    let mut want = Vec::new();
    for i in 1..=300 {
        want.push(format!("out{i}"));
        want.push(format!("err{i}"));
    }
    want.extend([
        "before-sleep".to_string(),
        "after-sleep".into(),
        "tail".into(),
    ]);
    assert_eq!(
        lines, want,
        "a shebang script runs without -x, output in order"
    );
    let at = |name: &str| stamps.iter().find(|(l, _)| l == name).unwrap().1;
    let gap = at("after-sleep") - at("before-sleep");
    assert!(
        gap >= Duration::from_millis(800),
        "lines must arrive as written, got a gap of {gap:?}"
    );
}

sandbox_test!(exit_status_is_reported);
fn exit_status_is_reported(ctx: &Ctx) {
    let (r, _) = ctx.run(&ctx.overlay_spec("a", "echo before\nexit 7\n"));
    assert_eq!(r.unwrap(), ScriptStatus::Exited(7));
    let (r, lines) = ctx.run(&ctx.overlay_spec("b", "false\necho not-reached\n"));
    assert_eq!(
        r.unwrap(),
        ScriptStatus::Exited(1),
        "sh -e stops at the first failure"
    );
    assert!(!lines.iter().any(|l| l == "not-reached"));
    let (r, _) = ctx.run(&ctx.overlay_spec("c", "kill -9 $$\n"));
    assert_eq!(r.unwrap(), ScriptStatus::Signaled(9));
}

sandbox_test!(timeout_kills_the_build);
fn timeout_kills_the_build(ctx: &Ctx) {
    let mut spec = ctx.overlay_spec(
        "t",
        "#!/bin/sh\nsleep 1000 &\necho ns=$(readlink /proc/self/ns/pid)\nsleep 1000\n",
    );
    spec.timeout = Some(Duration::from_secs(1));
    let started = Instant::now();
    let (r, lines) = ctx.run(&spec);
    let took = started.elapsed();
    assert!(matches!(r, Err(SandboxError::TimedOut(_))), "{r:?}");
    assert!(took < Duration::from_secs(8), "timeout took {took:?}");
    let ns = lines
        .iter()
        .find_map(|l| l.strip_prefix("ns="))
        .expect("ns line");
    assert_eq!(
        procs_in_ns(ns),
        Vec::<u32>::new(),
        "processes survived the timeout"
    );
}

sandbox_test!(cancel_kills_the_process_tree);
fn cancel_kills_the_process_tree(ctx: &Ctx) {
    let spec = ctx.overlay_spec(
        "t",
        "#!/bin/sh\nsleep 1000 &\n(sleep 1000; echo never) &\necho ns=$(readlink /proc/self/ns/pid)\nwait\n",
    );
    let cancel = CancelToken::new();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let watcher = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            let ns = rx.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut before = procs_in_ns(&ns);
            while before.len() < 4 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                before = procs_in_ns(&ns);
            }
            cancel.cancel();
            (ns, before)
        })
    };
    let r = ctx
        .rt
        .block_on(ctx.userns.run_sandbox(&spec, Some(&cancel), move |l| {
            if let Some(ns) = l.strip_prefix("ns=") {
                let _ = tx.send(ns.to_string());
            }
        }));
    let (ns, before) = watcher.join().unwrap();
    assert!(matches!(r, Err(SandboxError::Cancelled)), "{r:?}");
    assert!(
        before.len() >= 4,
        "init, sh, and the background sleeps were running: {before:?}"
    );
    assert_eq!(
        procs_in_ns(&ns),
        Vec::<u32>::new(),
        "processes survived the cancel"
    );
    for pid in before {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived"
        );
    }
}

sandbox_test!(env_is_exactly_the_given_one);
fn env_is_exactly_the_given_one(ctx: &Ctx) {
    let mut spec = ctx.overlay_spec("t", "tr '\\0' '\\n' < /proc/$$/environ\n");
    spec.env = vec![
        ("PATH".into(), "/bin".into()),
        ("FOO".into(), "bar baz".into()),
        ("EMPTY".into(), String::new()),
    ];
    let out: BTreeSet<String> = ctx.run_ok(&spec).into_iter().collect();
    // Exactly these (std's Command passes them sorted by name).
    assert_eq!(out, set(&["PATH=/bin", "FOO=bar baz", "EMPTY="]));
}

sandbox_test!(imports_read_only_and_binds);
fn imports_read_only_and_binds(ctx: &Ctx) {
    let imports = ctx.mkdir("imports");
    std::fs::write(imports.join("hello"), "imported\n").unwrap();
    let cache = ctx.mkdir("cache");
    let mut spec = ctx.overlay_spec(
        "t",
        "cat /stacker/imports/hello\n\
         if touch /stacker/imports/new 2>/dev/null; then echo imports-writable; else echo imports-readonly; fi\n\
         if touch /stacker/x 2>/dev/null; then echo stacker-writable; else echo stacker-readonly; fi\n\
         echo data > /var/cache/farm/out\n\
         for m in /stacker/imports /var/cache/farm; do awk -v m=$m '$5==m {print m, substr($6,1,2)}' /proc/self/mountinfo; done\n",
    );
    spec.binds = vec![
        Bind::imports(&imports),
        Bind {
            source: cache.clone(),
            dest: "/var/cache/farm".into(),
            readonly: false,
        },
    ];
    let out = ctx.run_ok(&spec);
    assert_eq!(
        out,
        [
            "imported",
            "imports-readonly",
            "stacker-readonly",
            "/stacker/imports ro",
            "/var/cache/farm rw"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(cache.join("out")).unwrap(),
        "data\n"
    );
    assert!(!imports.join("new").exists());
    assert_eq!(
        tree(&Ctx::upper(&spec)),
        BTreeSet::new(),
        "bind mountpoints must not reach the upper dir"
    );
}

sandbox_test!(dev_sys_resolv);
fn dev_sys_resolv(ctx: &Ctx) {
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").ok();
    let spec = ctx.overlay_spec(
        "t",
        "#!/bin/sh -e\necho x > /dev/null\nhead -c 8 /dev/urandom | wc -c\nhead -c 4 /dev/zero | wc -c\n\
         test -c /dev/pts/ptmx\ntest -L /dev/ptmx\ntest -L /dev/fd\ntouch /dev/shm/ok\n\
         if touch /sys/farm-test 2>/dev/null; then echo sys-writable; else echo sys-readonly; fi\n\
         test -d /sys/kernel && echo sys-populated\n\
         if [ -e /etc/resolv.conf ]; then md5sum < /etc/resolv.conf; else echo no-resolv; fi\n\
         if (echo x >> /etc/resolv.conf) 2>/dev/null; then echo resolv-writable; else echo resolv-readonly; fi\n\
         echo $(ls -a /stacker)\n\
         for m in /sys /etc/resolv.conf /stacker /proc; do awk -v m=$m '$5==m {print m, substr($6,1,2)}' /proc/self/mountinfo; done\n",
    );
    let out = ctx.run_ok(&spec);
    assert_eq!(
        &out[..4],
        ["8", "4", "sys-readonly", "sys-populated"],
        "{out:?}"
    );
    match host_resolv {
        Some(text) => {
            let digest = std::process::Command::new("md5sum")
                .stdin(std::fs::File::open("/etc/resolv.conf").unwrap())
                .output()
                .unwrap();
            assert!(!text.is_empty() || out[4].starts_with("d41d8"));
            assert_eq!(out[4], String::from_utf8_lossy(&digest.stdout).trim());
        }
        None => assert_eq!(out[4], "no-resolv"),
    }
    assert_eq!(out[5], "resolv-readonly");
    assert_eq!(
        out[6].split_whitespace().collect::<Vec<_>>(),
        [".", "..", ".farm-run"]
    );
    assert_eq!(
        &out[7..],
        ["/sys ro", "/etc/resolv.conf ro", "/stacker ro", "/proc rw"]
    );
    assert_eq!(
        tree(&Ctx::upper(&spec)),
        BTreeSet::new(),
        "nothing of /dev, /sys, /etc/resolv.conf, /stacker captured"
    );
}

sandbox_test!(bind_rootfs_changes_in_place);
fn bind_rootfs_changes_in_place(ctx: &Ctx) {
    let dir = ctx.mkdir("plain");
    ctx.make_busybox_rootfs(&dir);
    let mut spec = SandboxSpec::new(
        Rootfs::Bind(dir.clone()),
        ctx.mkdir("mnt"),
        "echo hi > /written\nid -u\n",
    );
    spec.env = vec![("PATH".into(), "/bin".into())];
    assert_eq!(ctx.run_ok(&spec), ["0"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("written")).unwrap(),
        "hi\n"
    );
}

sandbox_test!(host_proc_shares_the_workers_processes);
/// `--sandbox-proc host` (the rootless overlay's workers): the run stays in the
/// worker's pid namespace and sees its /proc, read-only; its leftovers still die with
/// it; the worker's own /proc files stay closed to it. The default mode, for contrast,
/// has the run's init as pid 1 in a pid namespace of its own.
fn host_proc_shares_the_workers_processes(ctx: &Ctx) {
    let my_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let my_ns = my_ns.to_string_lossy();
    let my_pid1 = std::fs::read_to_string("/proc/1/comm").unwrap();
    let script = format!(
        "#!/bin/sh\nreadlink /proc/self/ns/pid\ncat /proc/1/comm\ncat /proc/$PPID/comm\n\
         awk '$5 == \"/proc\" {{print substr($6,1,2)}}' /proc/self/mountinfo\n\
         if (echo renamed > /proc/self/comm) 2>/dev/null; then echo proc-writable; else echo proc-read-only; fi\n\
         if cat /proc/{}/environ >/dev/null 2>&1; then echo worker-environ-readable; else echo worker-environ-closed; fi\n\
         sleep 1000 &\necho bg=$!\n",
        std::process::id()
    );
    // Fresh (the default): pid 1 is the run's init, in a pid namespace of its own.
    let fresh = ctx.run_ok(&ctx.overlay_spec("fresh", &script));
    assert_ne!(fresh[0], my_ns, "{fresh:?}");
    assert_eq!(
        &fresh[1..5],
        ["init", "init", "rw", "proc-writable"],
        "{fresh:?}"
    );

    // As an ordinary user the build's root is the worker's own uid, yet the worker's
    // environment (its credentials) stays closed: the build is in a user namespace
    // the worker's is not inside of.
    let mut spec = ctx.overlay_spec("host", &script);
    spec.proc = farm_worker::SandboxProc::Host;
    let out = ctx.run_ok(&spec);
    assert_eq!(
        out[0], my_ns,
        "the run is in the worker's pid namespace: {out:?}"
    );
    assert_eq!(out[1], my_pid1.trim(), "its /proc is the worker's: {out:?}");
    assert_eq!(
        &out[2..6],
        ["init", "ro", "proc-read-only", "worker-environ-closed"],
        "{out:?}"
    );
    // No pid namespace kills what the run left behind: the helper did.
    let bg: u32 = out[6].strip_prefix("bg=").unwrap().parse().unwrap();
    let alive = std::fs::read_to_string(format!("/proc/{bg}/comm"))
        .is_ok_and(|comm| comm.trim() == "sleep");
    assert!(!alive, "the run's background sleep (pid {bg}) outlived it");

    // A timeout too kills the whole tree.
    let mut spec = ctx.overlay_spec(
        "timeout",
        "#!/bin/sh\nsleep 1000 &\necho bg=$!\nsleep 1000\n",
    );
    spec.proc = farm_worker::SandboxProc::Host;
    spec.timeout = Some(Duration::from_secs(2));
    let (r, lines) = ctx.run(&spec);
    assert!(matches!(r, Err(SandboxError::TimedOut(_))), "{r:?}");
    let bg: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("bg="))
        .expect("bg line")
        .parse()
        .unwrap();
    let alive = std::fs::read_to_string(format!("/proc/{bg}/comm"))
        .is_ok_and(|comm| comm.trim() == "sleep");
    assert!(!alive, "pid {bg} survived the timeout");
}

sandbox_test!(setup_errors_are_reported);
fn setup_errors_are_reported(ctx: &Ctx) {
    let mut spec = ctx.overlay_spec("a", "true\n");
    if let Rootfs::Overlay { lower, .. } = &mut spec.rootfs {
        *lower = vec![ctx.dir.path().join("does-not-exist")];
    }
    let (r, _) = ctx.run(&spec);
    match r {
        Err(SandboxError::Setup(m)) => assert!(m.contains("lower dir"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A rootfs without /bin/sh.
    let empty = ctx.mkdir("empty");
    let spec = SandboxSpec::new(
        Rootfs::Overlay {
            lower: vec![empty],
            upper: ctx.mkdir("b/upper"),
            work: ctx.mkdir("b/work"),
        },
        ctx.mkdir("b/mnt"),
        "true\n",
    );
    let (r, _) = ctx.run(&spec);
    match r {
        Err(SandboxError::Setup(m)) => assert!(m.contains("/bin/sh"), "{m}"),
        other => panic!("{other:?}"),
    }
}

sandbox_test!(ns_op_streams_stdin_stdout);
fn ns_op_streams_stdin_stdout(ctx: &Ctx) {
    let mut cmd = ctx.userns.request_command(&TestOp::Echo).unwrap();
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..10000 {
            writeln!(stdin, "line {i}").unwrap();
        }
    });
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    writer.join().unwrap();
    assert!(child.wait_blocking().unwrap().success());
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("uid=0 gid=0"));
    assert_eq!(lines.clone().count(), 10000);
    assert_eq!(lines.last(), Some("line 9999"));
}

sandbox_test!(start_latency);
fn start_latency(ctx: &Ctx) {
    let mut times = Vec::new();
    for i in 0..20 {
        let spec = ctx.overlay_spec(&format!("r{i}"), "true\n");
        let t = Instant::now();
        ctx.run_ok(&spec);
        times.push(t.elapsed());
    }
    times.sort();
    let median = (times[9] + times[10]) / 2;
    eprintln!(
        "sandbox start + `true` as uid {}: median {median:?} (min {:?}, max {:?}) over 20 runs",
        nix::unistd::geteuid(),
        times[0],
        times[19]
    );
    assert!(median < Duration::from_secs(2), "median {median:?}");
}

sandbox_test!(worker_death_kills_the_build);
fn worker_death_kills_the_build(_ctx: &Ctx) {
    // A separate "worker" process (this test binary, running `worker_role`) starts a
    // build and is SIGKILLed; PDEATHSIG must take the whole build down.
    use std::io::BufRead;
    let mut worker = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_role",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FARM_TEST_ROLE", "worker")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = worker.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            // libtest prints "test worker_role ... " without a newline first.
            if let Some((_, n)) = line.unwrap_or_default().split_once("ns=") {
                let _ = tx.send(n.to_string());
            }
        }
    });
    let ns = rx.recv_timeout(Duration::from_secs(30)).ok();
    if ns.is_none() {
        let _ = worker.kill();
    }
    let ns = ns.expect("the worker role reported its sandbox");
    let before = procs_in_ns(&ns);
    assert!(before.len() >= 3, "init, sh and sleep run: {before:?}");
    worker.kill().unwrap();
    worker.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !procs_in_ns(&ns).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        procs_in_ns(&ns),
        Vec::<u32>::new(),
        "the build outlived its worker"
    );
}

/// Helper process of `worker_death_kills_the_build` (runs only when asked to).
#[test]
#[ignore = "helper role, started by worker_death_kills_the_build"]
fn worker_role() {
    if std::env::var("FARM_TEST_ROLE").as_deref() != Ok("worker") {
        return;
    }
    let ctx = Ctx::new();
    let spec = ctx.overlay_spec(
        "t",
        "#!/bin/sh\nsleep 1000 &\necho ns=$(readlink /proc/self/ns/pid)\nsleep 1000\n",
    );
    let _ = ctx.rt.block_on(ctx.userns.run_sandbox(&spec, None, |l| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{l}");
        let _ = out.flush();
    }));
}

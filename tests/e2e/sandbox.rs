//! The build sandbox's hardening and run limits (issue 13), through the real `farm`
//! binary as the unprivileged test user: `no_new_privs` and the seccomp filter seen from
//! inside a `run`, `network: none` (and the worker's `--network none`) against a TCP
//! listener on the host's 127.0.0.1, and a layer's `run_timeout`.

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::util::*;

/// The text of `path` in the top layer of `tag`.
fn top_file(oci: &Oci, tag: &str, path: &str) -> String {
    entry(oci.layers(tag).last().unwrap(), path).text()
}

const BASE: &str = "  from:\n    type: tar\n    url: busybox.tar\n";

#[test]
fn run_has_no_new_privs_and_a_seccomp_filter() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "seccomp", Who::User);
    let probe = "  run: |\n    \
        grep NoNewPrivs: /proc/self/status > /nnp\n    \
        grep Seccomp: /proc/self/status > /seccomp\n    \
        if unshare -U true 2> /unshare.err; then echo allowed; else echo denied; fi > /userns\n    \
        if unshare -m true; then echo allowed; else echo denied; fi > /mountns\n";
    t.write(
        "stacker.yaml",
        format!("locked:\n{BASE}{probe}nested:\n{BASE}  nested_userns: true\n{probe}"),
    );
    t.chown_all();
    let r = t.build(&[]);
    r.assert_ok();
    let oci = t.oci();
    assert_eq!(top_file(&oci, "locked", "nnp"), "NoNewPrivs:\t1\n");
    assert_eq!(top_file(&oci, "locked", "seccomp"), "Seccomp:\t2\n");
    assert_eq!(
        top_file(&oci, "locked", "userns"),
        "denied\n",
        "a nested user namespace is refused"
    );
    let err = top_file(&oci, "locked", "unshare.err");
    assert!(err.contains("Operation not permitted"), "{err:?}");
    assert_eq!(
        top_file(&oci, "locked", "mountns"),
        "allowed\n",
        "other namespaces stay available (builds use them)"
    );
    // The layer that asks for nested user namespaces gets them, and is still filtered.
    assert_eq!(top_file(&oci, "nested", "userns"), "allowed\n");
    assert_eq!(top_file(&oci, "nested", "nnp"), "NoNewPrivs:\t1\n");
}

/// A TCP listener on the host's 127.0.0.1 that counts the connections it accepts.
fn host_listener() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h.fetch_add(1, Ordering::SeqCst);
            let mut s = s;
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        }
    });
    (port, hits)
}

#[test]
fn network_none_cannot_reach_the_host() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "netns", Who::User);
    let (port, hits) = host_listener();
    let reach = format!(
        "    if echo hi | nc -w 2 127.0.0.1 {port}; then echo reached; else echo unreachable; fi > /host\n"
    );
    // Loopback works inside: a listener in the sandbox answers a client in the sandbox.
    // The listener's stdin stays open (a FIFO held by fd 3) until the client is done:
    // busybox nc stops at EOF on its stdin, which raced with the client's data.
    let lo = "    ip link show lo > /lo\n    \
        mkfifo /hold\n    \
        nc -l -p 5555 < /hold > /got &\n    \
        exec 3> /hold\n    \
        for i in $(seq 1 100); do echo inside | nc 127.0.0.1 5555 && break; sleep 0.1; done\n    \
        exec 3>&-\n    \
        wait\n    \
        rm /hold\n";
    t.write(
        "stacker.yaml",
        format!(
            "isolated:\n{BASE}  network: none\n  run: |\n{reach}{lo}\
             hostnet:\n{BASE}  run: |\n{reach}"
        ),
    );
    t.chown_all();
    t.build(&[]).assert_ok();
    let oci = t.oci();
    assert_eq!(top_file(&oci, "isolated", "host"), "unreachable\n");
    let lo_state = top_file(&oci, "isolated", "lo");
    assert!(lo_state.contains("UP"), "loopback is up: {lo_state}");
    assert_eq!(top_file(&oci, "isolated", "got"), "inside\n");
    // Stacker's default: the host network (this is what makes the test able to fail).
    assert_eq!(top_file(&oci, "hostnet", "host"), "reached\n");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // The worker's --network none covers the layer that does not say (the worker's
    // default is not part of the cache key, hence --no-cache).
    t.build(&["--network", "none", "--no-cache"]).assert_ok();
    assert_eq!(top_file(&t.oci(), "hostnet", "host"), "unreachable\n");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "nothing reached the host");

    // A bad value is an error at its position.
    t.write(
        "bad.yaml",
        format!("bad:\n{BASE}  network: internet\n  run: true\n"),
    );
    t.chown_all();
    let r = t.build(&["bad.yaml"]);
    r.assert_failed();
    r.assert_stderr_contains("'network' must be host or none");
}

#[test]
fn a_layer_run_timeout_fails_only_that_layer() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "run-timeout", Who::User);
    t.write(
        "stacker.yaml",
        format!(
            "slow:\n{BASE}  run_timeout: 1s\n  run: sleep 60\n\
             fine:\n{BASE}  run: echo fine > /fine\n"
        ),
    );
    t.chown_all();
    let t0 = std::time::Instant::now();
    let r = t.build(&[]);
    r.assert_failed();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(45),
        "the run was not stopped: {:?}",
        t0.elapsed()
    );
    assert_states(&r, &[("slow", "FAILED"), ("fine", "built")]);
    let why = &summary(&r.stderr)["slow"];
    assert!(
        why.contains("timed out after 1s") && why.contains("run_timeout"),
        "{}",
        r.describe()
    );
    // The worker's --run-timeout is a default only: the layer's own run_timeout wins.
    t.write(
        "long.yaml",
        format!("long:\n{BASE}  run_timeout: 30\n  run: sleep 2\n"),
    );
    t.chown_all();
    t.build(&["--run-timeout", "1", "long.yaml"]).assert_ok();
}

/// A cgroup delegated to the test user (created as root, removed when dropped): v2 when
/// its root has the pids and memory controllers, else a v1 pids and a v1 memory cgroup
/// (a hybrid host); or why there can be none on this machine.
struct DelegatedCgroup {
    /// The v2 directory, or the v1 pids and memory ones.
    dirs: Vec<std::path::PathBuf>,
}

impl DelegatedCgroup {
    fn create(uid: u32, gid: u32) -> Result<DelegatedCgroup, String> {
        if !is_root() {
            return Err("creating a delegated cgroup needs root".into());
        }
        match Self::create_v2(uid, gid) {
            Ok(cg) => Ok(cg),
            Err(v2) => Self::create_v1(uid, gid).map_err(|v1| format!("v2: {v2}; v1: {v1}")),
        }
    }

    fn create_v2(uid: u32, gid: u32) -> Result<DelegatedCgroup, String> {
        use std::fs;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mount = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let f: Vec<&str> = left.split_whitespace().collect();
                (right.starts_with("cgroup2 ") && f.get(3) == Some(&"/"))
                    .then(|| std::path::PathBuf::from(f[4]))
            })
            .ok_or("no cgroup v2 mount")?;
        let controllers = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        for c in ["pids", "memory"] {
            if !controllers.split_whitespace().any(|x| x == c) {
                return Err(format!(
                    "the cgroup v2 root {} has no {c} controller (cgroup.controllers: '{}'; \
                     a hybrid cgroup v1/v2 machine)",
                    mount.display(),
                    controllers.trim()
                ));
            }
        }
        fs::write(mount.join("cgroup.subtree_control"), "+pids +memory")
            .map_err(|e| format!("enabling pids and memory in {}: {e}", mount.display()))?;
        let dir = mount.join(format!("farm-e2e-{}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cg = DelegatedCgroup { dirs: vec![dir] };
        cg.chown(
            uid,
            gid,
            &["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"],
        )?;
        Ok(cg)
    }

    /// `farm-e2e-PID` in the v1 pids and memory hierarchies (the worker's own v1
    /// cgroups once the wrapped shell joined them).
    fn create_v1(uid: u32, gid: u32) -> Result<DelegatedCgroup, String> {
        use std::fs;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut dirs = Vec::new();
        for c in ["pids", "memory"] {
            let mount = mountinfo
                .lines()
                .find_map(|l| {
                    let (left, right) = l.split_once(" - ")?;
                    let f: Vec<&str> = left.split_whitespace().collect();
                    let r: Vec<&str> = right.split_whitespace().collect();
                    (r.first() == Some(&"cgroup")
                        && f.get(3) == Some(&"/")
                        && r.get(2)?.split(',').any(|o| o == c))
                    .then(|| std::path::PathBuf::from(f[4]))
                })
                .ok_or(format!("no cgroup v1 {c} hierarchy"))?;
            dirs.push(mount.join(format!("farm-e2e-{}", std::process::id())));
        }
        let mut cg = DelegatedCgroup { dirs: Vec::new() };
        for dir in dirs {
            fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            cg.dirs.push(dir);
        }
        cg.chown(uid, gid, &["tasks", "cgroup.procs"])?;
        Ok(cg)
    }

    fn chown(&self, uid: u32, gid: u32, files: &[&str]) -> Result<(), String> {
        for dir in &self.dirs {
            for p in std::iter::once(dir.clone()).chain(files.iter().map(|f| dir.join(f))) {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }
        Ok(())
    }

    /// `cmd`, started in the delegated cgroup (a root shell moves itself there, then
    /// execs the command, which drops to the user itself).
    fn wrap(&self, cmd: &std::process::Command) -> std::process::Command {
        let join: Vec<String> = self
            .dirs
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs", d.display()))
            .collect();
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(format!("{} && exec \"$@\"", join.join(" && ")))
            .arg("sh")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }
}

impl Drop for DelegatedCgroup {
    /// Kill what is left in the cgroups and their children, remove the children, then
    /// the cgroups.
    fn drop(&mut self) {
        use std::fs;
        let kill_all = |dir: &std::path::Path| {
            for pid in fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
            {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .status();
            }
        };
        for dir in &self.dirs {
            let children: Vec<std::path::PathBuf> = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            for child in children {
                kill_all(&child);
                for _ in 0..50 {
                    if fs::remove_dir(&child).is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            kill_all(dir);
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn a_fork_bomb_and_a_memory_hog_fail_their_layers_in_a_delegated_cgroup() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "cgroup-limits", Who::User);
    let (uid, gid) = t.owner();
    let check_args: Vec<String> = [
        "check",
        "--state-dir",
        &t.state.display().to_string(),
        "--pool",
        &t.pool.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let cg = match DelegatedCgroup::create(uid, gid) {
        Ok(cg) => cg,
        Err(why) => {
            // farm check says that builds have no limits here, and how to get them.
            let r = t.farm_env(&check_args, &[]);
            assert!(
                r.stdout.contains("builds run without pids/memory limits")
                    && r.stdout.contains("Delegate=yes"),
                "{}",
                r.describe()
            );
            eprintln!("SKIPPED: no delegated cgroup can be made here: {why}");
            return;
        }
    };
    let mut check = t.command(&[], farm_bin().to_str().unwrap());
    check.args(&check_args);
    let out = cg.wrap(&check).output().unwrap();
    let r = Run::from_output(check_args.clone(), out);
    assert!(
        r.stdout.contains("ok: delegated cgroup"),
        "{}",
        r.describe()
    );
    // Bounded on purpose: without the limits both layers succeed (and the test fails)
    // instead of taking the machine.
    t.write(
        "stacker.yaml",
        format!(
            "bomb:\n{BASE}  run: |\n    for i in $(seq 1 300); do sleep 60 & done\n    echo all-forked\n\
             hog:\n{BASE}  run: |\n    x=$(head -c 400000000 /dev/zero | tr '\\0' a)\n    echo ${{#x}}\n\
             fine:\n{BASE}  run: echo fine > /fine\n"
        ),
    );
    t.chown_all();
    let args = t.build_args(&["--pids-max", "64", "--memory-max", "128M"]);
    let inner = {
        let mut c = t.command(&[], farm_bin().to_str().unwrap());
        c.args(&args);
        c
    };
    let out = cg.wrap(&inner).output().unwrap();
    let r = Run::from_output(args, out);
    r.assert_failed();
    assert_states(
        &r,
        &[("bomb", "FAILED"), ("hog", "FAILED"), ("fine", "built")],
    );
    let s = summary(&r.stderr);
    eprintln!("bomb: {}\nhog: {}", s["bomb"], s["hog"]);
    assert!(s["bomb"].contains("pids.max"), "{}", r.describe());
    assert!(s["hog"].contains("memory limit"), "{}", r.describe());
    // Healthy afterwards: the next build in the same cgroup works.
    t.write("ok.yaml", format!("ok:\n{BASE}  run: echo ok > /ok\n"));
    t.chown_all();
    let args = t.build_args(&["ok.yaml"]);
    let mut inner = t.command(&[], farm_bin().to_str().unwrap());
    inner.args(&args);
    let out = cg.wrap(&inner).output().unwrap();
    Run::from_output(args, out).assert_ok();
}

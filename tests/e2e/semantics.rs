//! The rest of the stackerfile language on real builds: `tar` bases from `stacker://`,
//! `stacker://` and http imports, `generate_labels`, `binds`, `overlay_dirs`, nested
//! prerequisites, the build environment, `recursive-build`, `grab`/`chroot`/`inspect`/
//! `clean`, and `os`/`arch`.
//!
//! Rootless as the e2e user on the shared btrfs pool (see `util.rs`), except the `clean`
//! test, which uses a private pool. Fixtures are under `tests/fixtures/semantics/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::util::*;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// A test dir (as the e2e user, on the shared pool) holding `tests/fixtures/semantics/NAME`
/// and `busybox.tar` (also copied into each of `tar_copies`, relative dirs).
fn setup(name: &str, tar_copies: &[&str]) -> Option<TestDir> {
    let e = e2e()?;
    let t = TestDir::new(e, name, Who::User);
    let src = fixtures("semantics").join(name);
    for en in fs::read_dir(&src).unwrap_or_else(|err| panic!("{}: {err}", src.display())) {
        let en = en.unwrap();
        copy_tree_exact(&en.path(), &t.path.join(en.file_name()));
    }
    for d in tar_copies {
        fs::copy(t.join("busybox.tar"), t.join(d).join("busybox.tar")).unwrap();
    }
    t.chown_all();
    Some(t)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn path_set(entries: &[TarEntry]) -> BTreeSet<String> {
    paths(entries).into_iter().collect()
}

/// The `[LAYER] FAILED: ...` line of a build's output.
fn failed_line(r: &Run, layer: &str) -> String {
    r.stderr
        .lines()
        .find(|l| l.starts_with(&format!("[{layer}] FAILED")))
        .unwrap_or_else(|| panic!("no FAILED line for {layer}:\n{}", r.describe()))
        .to_string()
}

fn assert_contains_all(hay: &str, needles: &[&str], what: &str) {
    for n in needles {
        assert!(hay.contains(n), "{what}: {hay:?} lacks {n:?}");
    }
}

/// Read a file of an unpacked rootfs.
fn read(root: &Path, rel: &str) -> String {
    let p = root.join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `farm ARGS` as the test's user with `--state-dir` and `--pool` of the test.
fn farm_state(t: &TestDir, cmd: &str, args: &[&str]) -> Run {
    let mut v: Vec<String> = vec![
        cmd.to_string(),
        "--state-dir".into(),
        t.state.display().to_string(),
        "--pool".into(),
        t.pool.display().to_string(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    t.farm_env(&v, &[])
}

/// The entries of a directory, sorted (empty when it does not exist).
fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// a small HTTP server on 127.0.0.1
// ---------------------------------------------------------------------------------------

/// Serves fixed files over HTTP/1.1 (GET and HEAD, `Connection: close`) on 127.0.0.1 until
/// stopped or dropped; records the paths requested.
struct HttpServer {
    port: u16,
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    fn start(files: BTreeMap<String, Vec<u8>>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(files);
        let thread = {
            let (stop, hits) = (stop.clone(), hits.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (files, hits) = (files.clone(), hits.clone());
                            std::thread::spawn(move || serve_one(s, &files, &hits));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                // The listener is dropped here: the port refuses connections from now on.
            })
        };
        HttpServer {
            port,
            stop,
            hits,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_one(mut s: TcpStream, files: &BTreeMap<String, Vec<u8>>, hits: &Mutex<Vec<String>>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&req).into_owned();
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    hits.lock().unwrap().push(path.clone());
    let (status, body): (&str, &[u8]) = match files.get(&path) {
        Some(b) => ("200 OK", b),
        None => ("404 Not Found", b"not found\n"),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body);
    }
    let _ = s.write_all(&out);
    let _ = s.flush();
}

// ---------------------------------------------------------------------------------------
// 1. tar bases from a stacker:// tarball
// ---------------------------------------------------------------------------------------

#[test]
fn tar_bases_from_a_tarball_made_in_a_build_only_chain() {
    let Some(t) = setup("tar_chain", &[]) else {
        return;
    };
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "built"),
            ("builder", "built"),
            ("first", "built"),
            ("second", "built"),
        ],
    );
    let oci = t.oci();
    assert_eq!(oci.tag_names(), set(&["first", "second"]));

    // The tarball as the builder made it (grab works on build-only layers).
    let grabbed = t.join("grabbed.tar");
    farm_state(
        &t,
        "grab",
        &["builder:/out/rootfs.tar", grabbed.to_str().unwrap()],
    )
    .assert_ok();
    let tarball = read_tar(&fs::read(&grabbed).unwrap());
    let tar_paths: BTreeSet<String> = path_set(&tarball)
        .into_iter()
        .filter(|p| p != "/" && !p.is_empty())
        .collect();
    assert!(
        tar_paths.contains("bin/busybox") && tar_paths.contains("data/two"),
        "the tarball: {tar_paths:?}"
    );

    for (tag, removed, added) in [
        ("first", &["data/two"][..], &["first"][..]),
        ("second", &[][..], &["data/second"][..]),
    ] {
        let layers = oci.layers(tag);
        assert_eq!(
            layers.len(),
            1,
            "{tag}: a tar base and its run are ONE layer: {:?}",
            oci.layer_digests(tag)
        );
        assert_eq!(
            oci.config(tag)["rootfs"]["diff_ids"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let mut want = tar_paths.clone();
        for p in removed {
            want.remove(*p);
        }
        want.extend(added.iter().map(|s| s.to_string()));
        assert_eq!(
            path_set(&layers[0]),
            want,
            "{tag}: the tarball's content plus the run's changes, nothing of the builder"
        );
        let l = &layers[0];
        assert_eq!(entry(l, "data/one").text(), "one\n");
        assert_eq!(
            entry(l, "bin/busybox").data,
            entry(&tarball, "bin/busybox").data,
            "{tag}: bin/busybox"
        );
    }
    assert_eq!(entry(&oci.layers("first")[0], "first").text(), "first\n");
    assert_eq!(
        entry(&oci.layers("second")[0], "data/second").text(),
        "second\n"
    );

    // Nothing changed: everything is cached, the images are the same.
    let before = oci.tags();
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("builder", "cached"),
            ("first", "cached"),
            ("second", "cached"),
        ],
    );
    assert_eq!(t.oci().tags(), before);
}

/// A tar base, a `dest` import, an `overlay_dirs` entry, and a run that deletes what the
/// import and the overlay dir added: the deleted files must not be in the image.
#[test]
fn tar_base_run_deleting_a_dest_import_leaves_it_out_of_the_image() {
    let Some(t) = setup("tar_dest", &[]) else {
        return;
    };
    t.build(&[]).assert_ok();
    let oci = t.oci();
    let layers = oci.layers("tardest");
    let with = |p: &str| {
        layers
            .iter()
            .filter(|l| l.iter().any(|e| e.path == p))
            .count()
    };
    let shape: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            paths(l)
                .into_iter()
                .filter(|p| {
                    !p.starts_with("bin/") && !p.starts_with("usr/") && !p.starts_with("sbin/")
                })
                .collect()
        })
        .collect();
    let rootfs = t.unpack(&oci.dir, "tardest", "tardest").join("rootfs");
    assert_eq!(read(&rootfs, "run.txt"), "run\n");
    assert!(
        rootfs.join("bin/busybox").is_file(),
        "the tarball's content is in the image"
    );
    assert!(
        !rootfs.join("imp.txt").exists() && !rootfs.join("ov/o.txt").exists(),
        "the run deleted /imp.txt and /ov/o.txt, yet the unpacked image has them \
         (layers without bin/, sbin/, usr/: {shape:?})"
    );
    assert!(
        with("imp.txt") <= 1 && with("ov/o.txt") <= 1,
        "the same file in several layers: {shape:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. stacker:// imports
// ---------------------------------------------------------------------------------------

#[test]
fn stacker_imports_of_files_and_dirs_with_and_without_dest() {
    let Some(t) = setup("stacker_imports", &[]) else {
        return;
    };
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "built"),
            ("builder", "built"),
            ("consumer", "built"),
        ],
    );
    let oci = t.oci();
    assert_eq!(oci.tag_names(), set(&["consumer"]));
    let layers = oci.layers("consumer");
    assert_eq!(
        layers.len(),
        8,
        "base + 6 dest imports + run: {:?}",
        layers.iter().map(|l| paths(l)).collect::<Vec<_>>()
    );
    let dir = |prefix: &str| {
        let mut s = set(&[]);
        for p in ["/", "/sub/", "/sub/x", "/link", "/dangling"] {
            s.insert(format!("{prefix}{p}"));
        }
        s
    };
    assert_eq!(path_set(&layers[1]), set(&["hashed-app"]), "file -> /x");
    assert_eq!(entry(&layers[1], "hashed-app").text(), "built\n");
    assert_eq!(path_set(&layers[2]), dir("d1"), "dir -> /d1");
    assert_eq!(path_set(&layers[3]), dir("d2"), "dir/ -> /d2/");
    let mut d3 = dir("d3/dir");
    d3.insert("d3/".into());
    assert_eq!(path_set(&layers[4]), d3, "dir -> /d3/");
    assert_eq!(path_set(&layers[5]), dir("d4"), "dir/ -> /d4");
    assert_eq!(
        path_set(&layers[6]),
        set(&["files/", "files/app"]),
        "file -> /files/"
    );
    for (l, prefix) in [(2, "d1"), (3, "d2"), (4, "d3/dir"), (5, "d4")] {
        let link = entry(&layers[l], &format!("{prefix}/link"));
        assert_eq!(link.kind, tar::EntryType::Symlink, "{prefix}/link");
        assert_eq!(link.link.as_deref(), Some("../app"), "{prefix}/link");
        let dangling = entry(&layers[l], &format!("{prefix}/dangling"));
        assert_eq!(dangling.kind, tar::EntryType::Symlink, "{prefix}/dangling");
        assert_eq!(dangling.link.as_deref(), Some("nowhere"));
        assert_eq!(
            entry(&layers[l], &format!("{prefix}/sub/x")).text(),
            "nested\n"
        );
    }
    // Without dest: read under /stacker/imports in run, never in the image.
    assert_eq!(
        path_set(&layers[7]),
        set(&["run-app", "run-x", "run-link"]),
        "the run layer"
    );
    assert_eq!(entry(&layers[7], "run-app").text(), "built\n");
    assert_eq!(entry(&layers[7], "run-x").text(), "nested\n");
    assert_eq!(entry(&layers[7], "run-link").text(), "../app\n");
    for (n, l) in layers.iter().enumerate() {
        assert!(
            !l.iter()
                .any(|e| e.path.starts_with("stacker") || e.path.starts_with("out/")),
            "layer {n}: {:?}",
            paths(l)
        );
    }

    // A wrong hash on a stacker:// file import: an error naming the path and both digests.
    let r = t.build(&["badhash.yaml"]);
    r.assert_failed();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("builder", "cached"),
            ("badhash", "FAILED"),
        ],
    );
    let line = failed_line(&r, "badhash");
    assert_contains_all(
        &line,
        &[
            "out/app",
            &"1".repeat(64),
            &sha256_hex(b"built\n"),
            "mismatch",
        ],
        "the hash mismatch",
    );
}

// ---------------------------------------------------------------------------------------
// 3. http imports and tar bases
// ---------------------------------------------------------------------------------------

#[test]
fn http_imports_hashes_modes_offline_rebuilds_and_tar_bases() {
    let Some(t) = setup("http", &[]) else {
        return;
    };
    let data = b"served data\n".to_vec();
    let tool = b"#!/bin/sh\necho tool-ran\n".to_vec();
    let rootfs_tar = fs::read(&t.e.rootfs_tar).unwrap();
    let (data_hash, tool_hash) = (sha256_hex(&data), sha256_hex(&tool));
    let mut server = HttpServer::start(BTreeMap::from([
        ("/data.txt".to_string(), data.clone()),
        ("/tool.sh".to_string(), tool.clone()),
        ("/rootfs.tar".to_string(), rootfs_tar),
    ]));
    let url = server.url();
    let subs = [
        format!("URL={url}"),
        format!("DATA_HASH={data_hash}"),
        format!("TOOL_HASH={tool_hash}"),
    ];
    let build = |extra: &[&str], file: &str| {
        let mut args: Vec<&str> = Vec::new();
        for s in &subs {
            args.extend(["--substitute", s.as_str()]);
        }
        args.extend(extra);
        args.push(file);
        t.build(&args)
    };

    // With hashes; one with dest and a mode.
    let r = build(&[], "ok.yaml");
    r.assert_ok();
    let hits = server.hits();
    assert!(
        hits.contains(&"/data.txt".to_string()) && hits.contains(&"/tool.sh".to_string()),
        "requests: {hits:?}"
    );
    let check_imp = |what: &str| {
        let oci = t.oci();
        let layers = oci.layers("imp");
        assert_eq!(layers.len(), 3, "{what}: base + dest import + run");
        let tool_entry = entry(&layers[1], "usr/local/bin/tool");
        assert_eq!(tool_entry.kind, tar::EntryType::Regular);
        assert_eq!(tool_entry.mode, 0o755, "{what}: mode: 0755");
        assert_eq!((tool_entry.uid, tool_entry.gid), (0, 0));
        assert_eq!(tool_entry.data, tool);
        assert_eq!(
            path_set(&layers[2]),
            set(&["got-data", "got-tool"]),
            "{what}: the run layer (the import without dest is not in it)"
        );
        assert_eq!(entry(&layers[2], "got-data").data, data);
        assert_eq!(entry(&layers[2], "got-tool").text(), "tool-ran\n");
        for l in &layers {
            assert!(!l.iter().any(|e| e.path.ends_with("data.txt")));
        }
        let rootfs = t
            .unpack(&oci.dir, "imp", &format!("imp-{what}"))
            .join("rootfs");
        let md = fs::metadata(rootfs.join("usr/local/bin/tool")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755, "{what}: unpacked mode");
    };
    check_imp("first");

    // A tar base over http: one layer, the tarball plus the run.
    let r = build(&[], "tarbase.yaml");
    r.assert_ok();
    let layers = t.oci().layers("httptar");
    assert_eq!(layers.len(), 1);
    let p = path_set(&layers[0]);
    assert!(
        p.contains("bin/busybox") && p.contains("etc/passwd") && p.contains("via-http"),
        "{p:?}"
    );
    assert_eq!(entry(&layers[0], "via-http").text(), "via-http\n");

    // A wrong hash: the URL, the expected and the actual digest.
    let r = build(&[], "badhash.yaml");
    r.assert_failed();
    let line = failed_line(&r, "badhash");
    assert_contains_all(
        &line,
        &[
            &format!("{url}/data.txt"),
            &"2".repeat(64),
            &data_hash,
            "mismatch",
        ],
        "http hash mismatch",
    );

    // --require-hash refuses an http import without a hash; without it, it builds.
    let r = build(&["--require-hash"], "nohash.yaml");
    r.assert_failed();
    let line = failed_line(&r, "nohash");
    assert_contains_all(
        &line,
        &[&format!("{url}/data.txt"), "hash"],
        "--require-hash",
    );
    build(&[], "nohash.yaml").assert_ok();

    // The server goes away: with a hash, a --no-cache rebuild uses the copy fetched
    // before; without one, it must not.
    server.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", server.port)).is_err(),
        "the server is stopped"
    );
    let r = build(&["--no-cache"], "ok.yaml");
    r.assert_ok();
    assert_states(&r, &[("base", "built"), ("imp", "built")]);
    check_imp("offline");
    let r = build(&["--no-cache"], "nohash.yaml");
    r.assert_failed();
    assert_contains_all(
        &failed_line(&r, "nohash"),
        &[&format!("{url}/data.txt")],
        "an unpinned import with the server down",
    );
}

// ---------------------------------------------------------------------------------------
// 4. generate_labels
// ---------------------------------------------------------------------------------------

#[test]
fn generate_labels_reads_the_run_result_and_keeps_only_labels() {
    let Some(t) = setup("labels", &[]) else {
        return;
    };
    let r = t.build(&[]);
    r.assert_ok();
    let oci = t.oci();
    let cfg = oci.config("lab");
    let labels = &cfg["config"]["Labels"];
    assert_eq!(labels["org.example.version"], "1.2.3", "{labels}");
    assert_eq!(labels["org.example.static"], "static", "{labels}");
    let top = labels["org.example.toplevel"].as_str().unwrap_or("");
    assert!(
        top.lines().any(|l| l == "version") && top.lines().any(|l| l == "etc"),
        "generate_labels sees the run's result: {top:?}"
    );
    let layers = oci.layers("lab");
    assert_eq!(layers.len(), 2, "base + run");
    assert_eq!(
        path_set(&layers[1]),
        set(&["version"]),
        "nothing generate_labels did is in the run layer"
    );
    assert_eq!(entry(&layers[1], "version").text(), "1.2.3");
    let rootfs = t.unpack(&oci.dir, "lab", "lab").join("rootfs");
    assert_eq!(read(&rootfs, "version"), "1.2.3");
    assert!(
        rootfs.join("etc/passwd").is_file(),
        "rm /etc/passwd not kept"
    );
    assert!(!rootfs.join("gen-junk").exists() && !rootfs.join("gen-dir").exists());
    assert!(!rootfs.join("stacker").exists());
}

// ---------------------------------------------------------------------------------------
// 5. binds
// ---------------------------------------------------------------------------------------

#[test]
fn binds_are_visible_in_run_absent_from_the_image_and_never_cached() {
    let Some(t) = setup("binds", &["sub"]) else {
        return;
    };
    let abs = t.join("absbind");
    t.write("absbind/abs.txt", "abs\n");
    let abs_sub = format!("ABS={}", abs.display());
    let args = ["--substitute", abs_sub.as_str(), "sub/stacker.yaml"];
    let r = t.build(&args);
    r.assert_ok();
    assert_states(&r, &[("base", "built"), ("bound", "built")]);
    let oci = t.oci();
    let layers = oci.layers("bound");
    assert_eq!(layers.len(), 2, "base + run");
    assert_eq!(
        path_set(&layers[1]),
        set(&["seen"]),
        "neither the bound content nor its mount points are in the image"
    );
    assert_eq!(
        entry(&layers[1], "seen").text(),
        "abs\nb\nc\n",
        "all three forms, relative sources against the stackerfile's dir (not the cwd's bsrc/)"
    );

    // Never from the cache: the bound content may have changed.
    t.write("sub/bsrc/b.txt", "b2\n");
    let r = t.build(&args);
    r.assert_ok();
    assert_states(&r, &[("base", "cached"), ("bound", "built")]);
    assert!(
        !r.stderr.contains("[bound] cached"),
        "bound cached:\n{}",
        r.describe()
    );
    assert_eq!(
        entry(&t.oci().layers("bound")[1], "seen").text(),
        "abs\nb2\nc\n"
    );

    // A missing source: an error naming it.
    let r = t.build(&["sub/missing.yaml"]);
    r.assert_failed();
    let line = failed_line(&r, "missing");
    assert_contains_all(&line, &["no-such-dir"], "a missing bind source");
}

// ---------------------------------------------------------------------------------------
// 6. overlay_dirs
// ---------------------------------------------------------------------------------------

#[test]
fn overlay_dirs_are_layers_below_the_run_owned_by_root() {
    let Some(t) = setup("overlay", &[]) else {
        return;
    };
    fs::set_permissions(t.join("over1/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    let owner = fs::metadata(t.join("over1/o1.txt")).unwrap();
    assert_eq!(owner.uid(), t.e.uid, "the sources belong to the test user");
    assert_ne!(owner.uid(), 0);
    t.build(&[]).assert_ok();
    let oci = t.oci();
    let layers = oci.layers("ov");
    assert_eq!(layers.len(), 4, "base + 2 overlay_dirs + run");
    assert_eq!(path_set(&layers[1]), set(&["o1.txt", "tool"]), "over1 -> /");
    assert_eq!(
        path_set(&layers[2]),
        set(&["opt/", "opt/o2/", "opt/o2/sub/", "opt/o2/sub/o2.txt"]),
        "over2 -> /opt/o2"
    );
    assert_eq!(path_set(&layers[3]), set(&["seen"]), "the run layer");
    assert_eq!(entry(&layers[3], "seen").text(), "o1\no2\n");
    assert_eq!(entry(&layers[1], "tool").mode, 0o755);
    assert_eq!(entry(&layers[1], "o1.txt").mode, 0o644);
    for (n, l) in layers[1..3].iter().enumerate() {
        for en in l {
            assert_eq!(
                (en.uid, en.gid),
                (0, 0),
                "overlay layer {}: {} is root's",
                n + 1,
                en.path
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 7. nested prerequisites
// ---------------------------------------------------------------------------------------

#[test]
fn nested_prerequisites_resolve_paths_against_their_own_file() {
    let Some(t) = setup("nested", &[]) else {
        return;
    };
    // From another directory (which has a data.txt of its own), by a relative path.
    let args = t.build_args(&["../a/stacker.yaml"]);
    let bin = farm_bin();
    let out = t
        .command(&[], bin.to_str().unwrap())
        .current_dir(t.join("elsewhere"))
        .args(&args)
        .output()
        .unwrap();
    let r = Run::from_output(args.clone(), out);
    r.assert_ok();
    assert_states(&r, &[("a", "built"), ("b", "built"), ("c", "built")]);
    let oci = t.oci();
    let layers = oci.layers("a");
    assert_eq!(
        layers.len(),
        5,
        "c (tar + run), b's import and run, a's import and run"
    );
    assert_eq!(path_set(&layers[1]), set(&["from-b.txt"]));
    assert_eq!(path_set(&layers[3]), set(&["from-a.txt"]));
    let rootfs = t.unpack(&oci.dir, "a", "a").join("rootfs");
    for (f, want) in [
        ("run-c.txt", "c\n"),
        ("from-b.txt", "b\n"),
        ("run-b.txt", "b\n"),
        ("from-a.txt", "a\n"),
        ("run-a.txt", "a\n"),
    ] {
        assert_eq!(read(&rootfs, f), want, "{f}");
    }
    assert_eq!(oci.layer_digests("b"), oci.layer_digests("a")[..3]);
    assert_eq!(oci.layer_digests("c"), oci.layer_digests("a")[..1]);
}

// ---------------------------------------------------------------------------------------
// 8. the build environment
// ---------------------------------------------------------------------------------------

#[test]
fn passthrough_environment_and_its_cache_key() {
    let Some(t) = setup("passthrough", &[]) else {
        return;
    };
    let env1 = [
        ("FARM_TEST_A", "one"),
        ("OTHER_VAR", "other"),
        ("http_proxy", "http://proxy.invalid:3128"),
    ];
    let r = t.build_env(&[], &env1);
    r.assert_ok();
    assert_states(&r, &[("pt", "built"), ("def", "built")]);
    let check = |a: &str| {
        let oci = t.oci();
        let pt = oci.layers("pt");
        assert_eq!(pt.len(), 1);
        assert_eq!(
            entry(&pt[0], "pt").text(),
            format!("A={a}\nOTHER=unset\nIMG=unset\n"),
            "FARM_TEST_A passes, OTHER_VAR does not, `environment` is not in run"
        );
        let def = oci.layers("def");
        let text = entry(&def[0], "def").text();
        assert!(
            text.starts_with("proxy=http://proxy.invalid:3128\n"),
            "http_proxy passes by default: {text:?}"
        );
        assert!(text.contains("other=unset\n"), "{text:?}");
        assert!(text.contains("img=unset\n"), "{text:?}");
        let home = t.e.home.display().to_string();
        assert!(
            !text.contains(&format!("home={home}\n")),
            "the caller's HOME reached run: {text:?}"
        );
        for tag in ["pt", "def"] {
            let env = strings(&oci.config(tag)["config"]["Env"]);
            assert!(
                env.contains(&"IMG_ONLY=image-value".to_string()),
                "{tag}: {env:?}"
            );
            assert!(
                !env.iter().any(|e| e.starts_with("FARM_TEST_A=")),
                "{env:?}"
            );
        }
    };
    check("one");

    // Another OTHER_VAR: nothing rebuilds.
    let env2 = [
        ("FARM_TEST_A", "one"),
        ("OTHER_VAR", "changed"),
        ("http_proxy", "http://proxy.invalid:3128"),
    ];
    let r = t.build_env(&[], &env2);
    r.assert_ok();
    assert_states(&r, &[("pt", "cached"), ("def", "cached")]);

    // Another FARM_TEST_A: pt rebuilds with it, def does not.
    let env3 = [
        ("FARM_TEST_A", "two"),
        ("OTHER_VAR", "changed"),
        ("http_proxy", "http://proxy.invalid:3128"),
    ];
    let r = t.build_env(&[], &env3);
    r.assert_ok();
    assert_states(&r, &[("pt", "built"), ("def", "cached")]);
    check("two");
}

// ---------------------------------------------------------------------------------------
// 9. recursive-build
// ---------------------------------------------------------------------------------------

#[test]
fn recursive_build_builds_every_stackerfile_as_one_dag() {
    let Some(t) = setup("recursive", &["tree"]) else {
        return;
    };
    let mut args = t.build_args(&[]);
    assert_eq!(args[0], "build");
    args[0] = "recursive-build".into();
    args.extend(["-d".to_string(), t.join("tree").display().to_string()]);
    let r = t.farm_env(&args, &[]);
    r.assert_ok();
    assert_states(
        &r,
        &[("rbase", "built"), ("one", "built"), ("two", "built")],
    );
    let oci = t.oci();
    assert_eq!(oci.tag_names(), set(&["rbase", "one", "two"]));
    let one = oci.layers("one");
    assert_eq!(one.len(), 2);
    assert_eq!(
        oci.layer_digests("one")[..1],
        oci.layer_digests("rbase")[..]
    );
    assert_eq!(path_set(&one[1]), set(&["one"]));
    let two = oci.layers("two");
    assert_eq!(two.len(), 1);
    assert_eq!(entry(&two[0], "two").text(), "two\n");
    assert!(!path_set(&two[0]).contains("rbase"));

    let r = t.farm_env(&args, &[]);
    r.assert_ok();
    assert_states(
        &r,
        &[("rbase", "cached"), ("one", "cached"), ("two", "cached")],
    );
}

// ---------------------------------------------------------------------------------------
// 10. grab, chroot, inspect, clean
// ---------------------------------------------------------------------------------------

#[test]
fn grab_chroot_inspect_and_clean() {
    let Some(mut t) = setup("tools", &[]) else {
        return;
    };
    // A pool of our own: clean empties it, and nothing else may use it meanwhile.
    t.pool = private_pool(t.e, "pool-semantics");
    let all_built = [("builder", "built"), ("app", "built")];
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(&r, &all_built);

    // grab: out of a build-only layer and out of a tagged one.
    let dest = t.join("grabbed-file");
    farm_state(&t, "grab", &["builder:/out/file", dest.to_str().unwrap()]).assert_ok();
    assert_eq!(fs::read_to_string(&dest).unwrap(), "data\n");
    let dest2 = t.join("grabbed-app");
    farm_state(&t, "grab", &["app:/app", dest2.to_str().unwrap()]).assert_ok();
    assert_eq!(fs::read_to_string(&dest2).unwrap(), "app\n");
    let r = farm_state(
        &t,
        "grab",
        &["builder:/no/such/file", dest.to_str().unwrap()],
    );
    r.assert_failed();

    // chroot: runs in the layer; what it changes is thrown away.
    let chains_before = dir_names(&t.pool.join("chains"));
    let r = farm_state(&t, "chroot", &["builder", "--", "cat", "/etc/motd"]);
    r.assert_ok();
    assert_eq!(r.stdout, "hello from motd\n", "{}", r.describe());
    let r = farm_state(
        &t,
        "chroot",
        &[
            "builder",
            "--",
            "/bin/sh",
            "-c",
            "rm /etc/motd && echo junk > /junk && test ! -e /etc/motd",
        ],
    );
    r.assert_ok();
    let r = farm_state(&t, "chroot", &["builder", "--", "cat", "/etc/motd"]);
    r.assert_ok();
    assert_eq!(r.stdout, "hello from motd\n", "the rm was not kept");
    let r = farm_state(&t, "chroot", &["builder", "--", "/bin/sh", "-c", "exit 3"]);
    assert_eq!(r.status.code(), Some(3), "{}", r.describe());
    assert_eq!(
        dir_names(&t.pool.join("work")),
        Vec::<String>::new(),
        "the pool's work dir after chroot"
    );
    assert_eq!(
        dir_names(&t.pool.join("chains")),
        chains_before,
        "chroot made or removed chains"
    );
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(&r, &[("builder", "cached"), ("app", "cached")]);

    // inspect: the layers and the labels.
    let oci = t.oci();
    let r = t.farm_env(
        &[
            "inspect".into(),
            "-o".into(),
            t.out.display().to_string(),
            "app".into(),
        ],
        &[],
    );
    r.assert_ok();
    let digests = oci.layer_digests("app");
    assert_eq!(digests.len(), 2);
    assert!(r.stdout.contains("layers: 2"), "{}", r.describe());
    for d in &digests {
        assert!(r.stdout.contains(d.as_str()), "{d}:\n{}", r.describe());
    }
    assert!(
        r.stdout.contains("org.example.team=infra"),
        "{}",
        r.describe()
    );
    assert!(r.stdout.contains(&oci.manifest_digest("app")));

    // clean: no chains, no blobs; the next build builds everything again.
    assert!(!dir_names(&t.pool.join("chains")).is_empty());
    let r = farm_state(&t, "clean", &[]);
    r.assert_ok();
    assert_eq!(
        dir_names(&t.pool.join("chains")),
        Vec::<String>::new(),
        "chains after clean:\n{}",
        r.describe()
    );
    let blobs = t.state.join("blobs");
    let remaining: Vec<String> = dir_names(&blobs.join("sha256"));
    assert!(remaining.is_empty(), "blobs after clean: {remaining:?}");
    assert_eq!(dir_names(&t.pool.join("work")), Vec::<String>::new());
    let r = farm_state(&t, "grab", &["builder:/out/file", dest.to_str().unwrap()]);
    r.assert_failed();
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(&r, &all_built);
    farm_state(&t, "grab", &["builder:/out/file", dest.to_str().unwrap()]).assert_ok();
    assert_eq!(fs::read_to_string(&dest).unwrap(), "data\n");
}

// ---------------------------------------------------------------------------------------
// 11. os / arch
// ---------------------------------------------------------------------------------------

#[test]
fn foreign_arch_refuses_run_and_builds_without_one() {
    let Some(t) = setup("platform", &[]) else {
        return;
    };
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("SKIPPED: this test assumes an amd64 machine");
        return;
    }
    let r = t.build(&["run.yaml"]);
    r.assert_failed();
    let line = failed_line(&r, "armrun");
    assert_contains_all(&line, &["arm64", "emulate"], "a run for arm64 on amd64");
    assert!(
        !r.stderr.contains("armrun  | +"),
        "the script ran:\n{}",
        r.describe()
    );

    let r = t.build(&["norun.yaml"]);
    r.assert_ok();
    let oci = t.oci();
    let cfg = oci.config("armnorun");
    assert_eq!(cfg["architecture"], "arm64");
    assert_eq!(cfg["os"], "linux");
    assert_eq!(strings(&cfg["config"]["Cmd"]), ["/bin/true"]);
    assert_eq!(oci.layers("armnorun").len(), 1);
    // The index entry carries the platform too, when it has one.
    let idx = oci.index();
    let m = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "armnorun")
        .unwrap();
    if let Some(p) = m.get("platform") {
        assert_eq!(p["architecture"], "arm64", "{m}");
    }
}

// ---------------------------------------------------------------------------------------
// 12. drop-in for stacker: behaviour stacker users rely on
// ---------------------------------------------------------------------------------------

/// The tags of index.json in the file's order.
fn index_order(oci: &Oci) -> Vec<String> {
    oci.index()["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// `url: oci:zbase` is the tag `zbase` of the layout `oci/` (stacker's `PATH:TAG`), so a
/// build can start from what an earlier build wrote to its own output layout;
/// `type: docker` takes the `oci:` transport for the same base; index.json lists the
/// images in build order (the layout's existing tags first), the same on a rebuild.
#[test]
fn oci_urls_like_stacker_and_index_in_build_order() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-oci", Who::User);
    t.write(
        "base.yaml",
        "zbase:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo base > /base\n",
    );
    t.write(
        "app.yaml",
        "zapp:\n  from:\n    type: oci\n    url: oci:zbase\n  run: cat /base > /app\n\
         viadocker:\n  from:\n    type: docker\n    url: oci:oci:zbase\n  run: cat /base > /via\n\
         aafter:\n  from:\n    type: built\n    tag: zapp\n  run: echo after > /after\n",
    );
    t.build(&["base.yaml"]).assert_ok();
    assert_eq!(
        t.out,
        t.join("oci"),
        "the output layout is oci/ next to the files"
    );
    let r = t.build(&["app.yaml"]);
    r.assert_ok();
    let oci = t.oci();
    let top = |tag: &str, path: &str| entry(oci.layers(tag).last().unwrap(), path).text();
    assert_eq!(top("zapp", "app"), "base\n");
    assert_eq!(top("viadocker", "via"), "base\n");
    let base_layers = oci.layer_digests("zbase");
    assert_eq!(
        oci.layer_digests("zapp")[..base_layers.len()],
        base_layers[..],
        "zapp starts from zbase"
    );
    let order = ["zbase", "zapp", "viadocker", "aafter"];
    assert_eq!(index_order(&oci), order);
    let r = t.build(&["app.yaml"]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("zapp", "cached"),
            ("viadocker", "cached"),
            ("aafter", "cached"),
        ],
    );
    assert_eq!(index_order(&t.oci()), order, "the same order on a rebuild");
}

/// `entrypoint` without `cmd` clears the base's Cmd; the config's author and history
/// read like stacker's; an invalid SOURCE_DATE_EPOCH fails before anything is built.
#[test]
fn image_config_like_stacker() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-config", Who::User);
    t.write(
        "stacker.yaml",
        "base:\n  from:\n    type: tar\n    url: busybox.tar\n  cmd: /bin/sh\n  \
         run: echo hello > /hello\n\
         cat:\n  from:\n    type: built\n    tag: base\n  entrypoint: /bin/cat /hello\n",
    );
    let r = t.build_env(&[], &[("SOURCE_DATE_EPOCH", "1700000000")]);
    r.assert_ok();
    let oci = t.oci();
    assert_eq!(strings(&oci.config("base")["config"]["Cmd"]), ["/bin/sh"]);
    let cfg = oci.config("cat");
    assert_eq!(
        strings(&cfg["config"]["Entrypoint"]),
        ["/bin/cat", "/hello"]
    );
    assert!(
        cfg["config"].get("Cmd").is_none_or(|c| c.is_null()),
        "the base's Cmd would run '/bin/cat /hello /bin/sh': {cfg}"
    );
    assert_eq!(cfg["author"], "stacker", "{cfg}");
    let history = cfg["history"].as_array().unwrap();
    let last = history.last().unwrap()["created_by"].as_str().unwrap();
    assert!(last.starts_with("stacker build of cat"), "{last}");
    assert!(
        history[history.len() - 2]["created_by"]
            .as_str()
            .unwrap()
            .starts_with("stacker build of base"),
        "{cfg}"
    );

    // Without SOURCE_DATE_EPOCH: user@host.
    let out2 = t.join("oci2");
    let r = t.farm_env(&t.build_args_at(&t.state, &out2, &[]), &[]);
    r.assert_ok();
    let author = Oci::new(&out2).config("cat")["author"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(author.starts_with(&format!("{}@", t.e.user)), "{author}");

    for bad in ["abc", "-5", "1.5"] {
        let out3 = t.join("oci3");
        let mut args = t.build_args_at(&t.state, &out3, &[]);
        args.push("--no-cache".into());
        let r = t.farm_env(&args, &[("SOURCE_DATE_EPOCH", bad)]);
        r.assert_failed();
        assert_eq!(r.status.code(), Some(1), "{}", r.describe());
        assert!(r.stderr.contains(&format!("'{bad}'")), "{}", r.describe());
        assert!(!r.stderr.contains("built"), "{}", r.describe());
        assert!(!out3.exists(), "nothing written for {bad}");
    }
}

/// `farm grab` keeps the file's mode.
#[test]
fn grab_keeps_the_mode() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-grab", Who::User);
    t.write(
        "stacker.yaml",
        "tool:\n  from:\n    type: tar\n    url: busybox.tar\n  run: |\n    \
         printf '#!/bin/sh\\necho hi\\n' > /tool\n    chmod 0755 /tool\n    \
         echo data > /data\n    chmod 0640 /data\n",
    );
    t.build(&[]).assert_ok();
    for (path, mode) in [("/tool", 0o755), ("/data", 0o640)] {
        let dest = t.join(&format!("grabbed{}", path.replace('/', "-")));
        farm_state(
            &t,
            "grab",
            &[&format!("tool:{path}"), dest.to_str().unwrap()],
        )
        .assert_ok();
        let got = fs::metadata(&dest).unwrap().permissions().mode() & 0o7777;
        assert_eq!(got, mode, "{path}: {got:o}");
    }
}

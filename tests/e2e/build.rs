//! `farm build`: real builds, rootless as an unprivileged user on a loopback btrfs pool
//! (and a few as root on a plain directory: the copy backend), checked with umoci,
//! skopeo, oci-image-tool and runc, and by reading the layer tars.
//!
//! Fixtures are under `tests/fixtures/build/`; every test copies its fixture and the
//! busybox rootfs tarball (`busybox.tar`) into a directory of its own (see `TestDir`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

fn set(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Entries of `tree` under `prefix` (keys as in `tree`).
fn subtree(tree: &BTreeMap<String, String>, prefixes: &[&str]) -> BTreeMap<String, String> {
    tree.iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn expect_tree(items: &[(&str, &str)]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Is `dir` on btrfs (statfs magic)?
fn on_btrfs(dir: &Path) -> bool {
    let st =
        nix::sys::statfs::statfs(dir).unwrap_or_else(|e| panic!("statfs {}: {e}", dir.display()));
    st.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC
}

/// The top-level names of the busybox rootfs.
const BUSYBOX_TOP: &[&str] = &["bin/", "etc/", "linuxrc", "root/", "sbin/", "tmp/", "usr/"];

// ---------------------------------------------------------------------------------------
// 1. whiteouts
// ---------------------------------------------------------------------------------------

fn whiteouts(who: Who) {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "whiteouts", who);
    t.fixture("whiteouts");
    let r = t.build(&[]);
    r.assert_ok();
    let backend: serde_json::Value =
        serde_json::from_slice(&fs::read(t.pool.join("pool.json")).unwrap()).unwrap();
    match who {
        Who::User => assert_eq!(backend["backend"], "btrfs"),
        // (a plain directory, unless /var/tmp itself is on btrfs)
        Who::Root if !on_btrfs(&t.path) => {
            assert_eq!(backend["backend"], "copy");
            r.assert_stderr_contains("not btrfs");
        }
        Who::Root => assert_eq!(backend["backend"], "btrfs"),
    }
    let oci = t.oci();
    assert_eq!(
        oci.tag_names(),
        ["base", "l1", "l2", "l3", "l4"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let layers = oci.layers("l4");
    assert_eq!(layers.len(), 5, "tar base + 4 run layers");
    // The lower layers of l4 are exactly the images of l1..l3.
    let l4 = oci.layer_digests("l4");
    assert_eq!(oci.layer_digests("l3"), l4[..4]);
    assert_eq!(oci.layer_digests("l2"), l4[..3]);
    assert_eq!(oci.layer_digests("l1"), l4[..2]);

    assert_eq!(
        paths(&layers[1]),
        set(&[
            "a/", "a/x", "b/", "b/y", "c/", "c/z", "d/", "d/w", "d/e/", "d/e/f"
        ]),
        "layer 1 (l1)"
    );
    assert_eq!(paths(&layers[2]), set(&[".wh.a"]), "layer 2: rm -rf /a");
    assert_eq!(
        paths(&layers[3]),
        set(&["b/", "b/.wh..wh..opq"]),
        "layer 3: rm -rf /b && mkdir /b"
    );
    assert_eq!(
        paths(&layers[4]),
        set(&["c/", "c/.wh..wh..opq", "c/new", "d/", "d/e/", "d/e/.wh.f"]),
        "layer 4: rm -rf /c && mkdir /c && echo n > /c/new; rm /d/e/f"
    );
    assert_eq!(entry(&layers[4], "c/new").text(), "n\n");
    for l in &layers[2..] {
        for en in l.iter().filter(|en| en.path.contains(".wh.")) {
            assert_eq!(
                en.kind,
                tar::EntryType::Regular,
                "{} is a regular file",
                en.path
            );
            assert!(en.data.is_empty(), "{} is empty", en.path);
        }
    }

    t.validate(&oci.dir, "l4");
    // The unpacked final image: the busybox rootfs plus exactly this.
    let rootfs = t.unpack(&oci.dir, "l4", "l4").join("rootfs");
    let tree = tree(&rootfs);
    let tops: Vec<String> = tree
        .keys()
        .filter(|k| k.trim_end_matches('/').split('/').count() == 1)
        .cloned()
        .collect();
    let mut want_tops = set(BUSYBOX_TOP);
    want_tops.extend(set(&["b/", "c/", "d/"]));
    want_tops.sort();
    assert_eq!(tops, want_tops, "top-level entries of l4");
    assert_eq!(
        subtree(&tree, &["a", "b/", "c/", "d/"]),
        expect_tree(&[
            ("b/", "d 755"),
            ("c/", "d 755"),
            ("c/new", "f 644 n\n"),
            ("d/", "d 755"),
            ("d/e/", "d 755"),
            ("d/w", "f 644 w\n"),
        ])
    );
}

#[test]
fn whiteouts_across_a_four_deep_built_chain() {
    whiteouts(Who::User);
}

#[test]
fn whiteouts_as_root_on_the_copy_backend() {
    whiteouts(Who::Root);
}

// ---------------------------------------------------------------------------------------
// 2. layer counts
// ---------------------------------------------------------------------------------------

#[test]
fn layer_counts() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "layer-counts", Who::User);
    t.fixture("layer_counts");
    let r = t.build(&[]);
    r.assert_ok();
    let oci = t.oci();
    // build_only layers are not tagged.
    assert_eq!(
        oci.tag_names(),
        ["dests", "noop", "tarrun", "top"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );

    // top carries its build_only ancestors' layers: tar base + its run as ONE layer,
    // then bo_mid's, then its own.
    let top = oci.layers("top");
    assert_eq!(top.len(), 3, "{:?}", oci.layer_digests("top"));
    let p0 = paths(&top[0]);
    assert!(p0.contains(&"bin/busybox".to_string()), "{p0:?}");
    assert!(p0.contains(&"bo-base".to_string()), "{p0:?}");
    assert_eq!(entry(&top[0], "bo-base").text(), "base\n");
    assert_eq!(paths(&top[1]), set(&["bo-mid"]));
    assert_eq!(paths(&top[2]), set(&["top"]));
    let cfg = oci.config("top");
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);

    // A run that changes nothing adds no layer.
    assert_eq!(oci.layer_digests("noop"), oci.layer_digests("top"));
    assert_ne!(oci.manifest_digest("noop"), oci.manifest_digest("top"));

    // A tar base and its run: one layer.
    let tarrun = oci.layers("tarrun");
    assert_eq!(tarrun.len(), 1);
    let p = paths(&tarrun[0]);
    assert!(p.contains(&"bin/busybox".to_string()) && p.contains(&"tarrun".to_string()));
    // What the run deleted from the tarball is simply not there: no whiteouts.
    for gone in ["bin/ls", "etc/group"] {
        assert!(!p.contains(&gone.to_string()), "{gone} in {p:?}");
    }
    assert!(!p.iter().any(|p| p.contains(".wh.")), "whiteouts in {p:?}");

    // Each dest import is its own layer, below the run layer; a plain import is none.
    let dests = oci.layers("dests");
    assert_eq!(dests.len(), 6, "3 of top + 2 imports + run");
    assert_eq!(
        oci.layer_digests("dests")[..3],
        oci.layer_digests("top")[..]
    );
    assert_eq!(paths(&dests[3]), set(&["one.txt"]));
    assert_eq!(entry(&dests[3], "one.txt").text(), "one\n");
    assert_eq!(paths(&dests[4]), set(&["opt/", "opt/two.txt"]));
    assert_eq!(paths(&dests[5]), set(&["both"]));
    assert_eq!(entry(&dests[5], "both").text(), "one\ntwo\nplain\n");
}

// ---------------------------------------------------------------------------------------
// 3. config inheritance, history, annotations
// ---------------------------------------------------------------------------------------

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// History entries with and without `empty_layer`, and their `created_by`.
fn history(cfg: &serde_json::Value) -> (usize, usize, Vec<String>) {
    let h = cfg["history"].as_array().expect("history");
    let empty = h.iter().filter(|e| e["empty_layer"] == true).count();
    let by = h
        .iter()
        .map(|e| e["created_by"].as_str().unwrap_or("").to_string())
        .collect();
    (h.len() - empty, empty, by)
}

#[test]
fn config_inheritance_history_and_annotations() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "config", Who::User);
    t.fixture("config");
    t.build(&[]).assert_ok();
    let oci = t.oci();
    let base = Oci::new(&e.busybox_oci).config("busybox");
    assert_eq!(
        strings(&base["config"]["Env"]),
        [BASE_PATH, "BASE_ENV=from-base"],
        "the umoci base"
    );

    let child = oci.config("child");
    let c = &child["config"];
    assert_eq!(
        strings(&c["Env"]),
        [BASE_PATH, "BASE_ENV=overridden", "CHILD_ENV=c"],
        "Env extended (no default PATH: the base has one)"
    );
    assert_eq!(
        c["Labels"],
        serde_json::json!({"base.label": "base", "shared.label": "child", "child.label": "child"})
    );
    assert_eq!(keys(&c["Volumes"]), ["/basevol", "/childvol"]);
    assert_eq!(
        strings(&c["Cmd"]),
        ["/bin/echo", "base-cmd"],
        "Cmd inherited"
    );
    assert!(c["Entrypoint"].is_null(), "{c}");
    assert_eq!(c["WorkingDir"], "/srv");
    assert_eq!(
        entry(oci.layers("child").last().unwrap(), "run-cwd").text(),
        "/\n",
        "working_dir does not change where run runs"
    );
    assert!(c["User"].is_null() || c["User"] == "", "{c}");
    assert_eq!(child["os"], "linux");
    assert_eq!(child["architecture"], host_arch());
    let n_layers = oci.layer_digests("child").len();
    assert_eq!(
        n_layers,
        Oci::new(&e.busybox_oci).layer_digests("busybox").len() + 1
    );
    assert_eq!(
        child["rootfs"]["diff_ids"].as_array().unwrap().len(),
        n_layers
    );
    let (with_layer, _, by) = history(&child);
    assert_eq!(
        with_layer, n_layers,
        "one non-empty history entry per layer"
    );
    assert!(by.last().unwrap().contains("child"), "{by:?}");

    let gc = oci.config("grandchild");
    let g = &gc["config"];
    assert_eq!(strings(&g["Entrypoint"]), ["/bin/echo", "ep"]);
    assert!(
        g["Cmd"].is_null(),
        "setting entrypoint clears the inherited Cmd (as Docker and stacker do): {g}"
    );
    assert_eq!(g["User"], "1000:1000");
    assert_eq!(g["WorkingDir"], "/srv", "inherited");
    assert_eq!(g["Env"], c["Env"]);
    assert_eq!(g["Labels"], c["Labels"]);
    assert_eq!(g["Volumes"], c["Volumes"]);
    assert_eq!(oci.layer_digests("grandchild"), oci.layer_digests("child"));
    let (gl, gempty, gby) = history(&gc);
    let (_, cempty, _) = history(&child);
    assert_eq!(gl, n_layers);
    assert_eq!(
        gempty,
        cempty + 1,
        "a layer without changes: one empty_layer entry"
    );
    assert!(gby.last().unwrap().contains("grandchild"), "{gby:?}");
    assert_eq!(
        gc["history"].as_array().unwrap().len(),
        oci.layer_digests("grandchild").len() + gempty
    );

    let runme = oci.config("runme");
    assert_eq!(
        strings(&runme["config"]["Entrypoint"]),
        ["/bin/sh", "-c", "echo \"full $CHILD_ENV $BASE_ENV\"; pwd"]
    );
    assert!(runme["config"]["Cmd"].is_null(), "full_command clears Cmd");

    let arm = oci.config("arm");
    assert_eq!(arm["architecture"], "arm64");
    assert_eq!(arm["os"], "linux");
    assert_eq!(strings(&arm["config"]["Cmd"]), ["/bin/true", "now"]);

    let nopath = oci.config("nopath");
    assert_eq!(
        strings(&nopath["config"]["Env"]),
        [
            "X=1",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ],
        "the default PATH when neither base nor layer sets one"
    );
    let (nl, _, _) = history(&nopath);
    assert_eq!(nl, 1);

    // Manifest annotations.
    let substituted = fs::read_to_string(t.join("stacker.yaml"))
        .unwrap()
        .replace("${{BUSYBOX_OCI}}", &e.busybox_oci.display().to_string());
    let version = String::from_utf8(
        std::process::Command::new(farm_bin())
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let version = version.split_whitespace().last().unwrap().to_string();
    for tag in ["child", "grandchild", "runme", "arm", "nopath"] {
        let a = &oci.manifest(tag)["annotations"];
        assert_eq!(
            a["io.stackeroci.stacker.stacker_yaml"].as_str(),
            Some(substituted.as_str()),
            "{tag}: stacker_yaml is the file after substitution"
        );
        let v = a["io.stackeroci.stacker.stacker_version"]
            .as_str()
            .unwrap_or_else(|| panic!("{tag}: no stacker_version in {a}"));
        assert!(v.contains(&version), "{tag}: {v} vs farm {version}");
        assert_eq!(
            a.get("org.example.k").is_some(),
            tag == "grandchild",
            "{tag}: {a}"
        );
    }
    assert_eq!(
        oci.manifest("grandchild")["annotations"]["org.example.k"],
        "v"
    );

    // What the real tools see.
    let inspect = t.skopeo_inspect(&oci.dir, "grandchild");
    assert_eq!(inspect["Architecture"], host_arch());
    assert_eq!(inspect["Labels"]["shared.label"], "child");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), n_layers);
    t.validate(&oci.dir, "runme");
    assert_eq!(t.runc_run(&oci.dir, "runme"), "full c overridden\n/srv\n");
}

// ---------------------------------------------------------------------------------------
// 4. imports
// ---------------------------------------------------------------------------------------

/// The `imports` fixture plus the symlinks git is not asked to keep.
fn imports_dir(e: &'static E2e, name: &str) -> TestDir {
    let t = TestDir::new(e, name, Who::User);
    t.fixture("imports");
    std::os::unix::fs::symlink("a.txt", t.join("dir/link")).unwrap();
    std::os::unix::fs::symlink("nowhere", t.join("dir/dangling")).unwrap();
    t.chown_all();
    t
}

#[test]
fn imports_without_dest_are_read_only_and_never_in_the_image() {
    let Some(e) = e2e() else { return };
    let t = imports_dir(e, "imports-nodest");
    let r = t.build(&["nodest.yaml"]);
    r.assert_ok();
    // `import:` is deprecated: a warning.
    assert!(
        r.stderr.to_lowercase().contains("deprecated"),
        "no deprecation warning for `import:`:\n{}",
        r.describe()
    );
    let oci = t.oci();
    let nodest = oci.layers("nodest");
    assert_eq!(
        nodest.len(),
        2,
        "base + run; imports without dest add no layer"
    );
    assert_eq!(
        paths(&nodest[1]),
        set(&["copied.txt"]),
        "nothing of /stacker"
    );
    assert_eq!(entry(&nodest[1], "copied.txt").text(), "file\n");
    let legacy = oci.layers("legacy");
    assert_eq!(legacy.len(), 2);
    assert_eq!(paths(&legacy[1]), set(&["legacy-copied.txt"]));
    assert_eq!(entry(&legacy[1], "legacy-copied.txt").text(), "file\n");
    for tag in ["nodest", "legacy"] {
        for (n, l) in oci.layers(tag).iter().enumerate() {
            assert!(
                !l.iter().any(|en| en.path.starts_with("stacker")),
                "{tag} layer {n} has /stacker: {:?}",
                paths(l)
            );
        }
    }
    let rootfs = t.unpack(&oci.dir, "nodest", "nodest").join("rootfs");
    assert!(!rootfs.join("stacker").exists());
    assert_eq!(
        fs::read_to_string(rootfs.join("copied.txt")).unwrap(),
        "file\n"
    );
}

#[test]
fn import_dest_trailing_slash_cases_and_symlinks() {
    let Some(e) = e2e() else { return };
    let t = imports_dir(e, "imports-dests");
    t.build(&["dests.yaml"]).assert_ok();
    let oci = t.oci();
    let layers = oci.layers("dests");
    assert_eq!(
        layers.len(),
        7,
        "base + one layer per dest import (the run changes nothing)"
    );
    let dir_entries = |prefix: &str| {
        set(&[
            &format!("{prefix}/"),
            &format!("{prefix}/a.txt"),
            &format!("{prefix}/dangling"),
            &format!("{prefix}/link"),
            &format!("{prefix}/sub/"),
            &format!("{prefix}/sub/b.txt"),
        ])
    };
    assert_eq!(paths(&layers[1]), dir_entries("d1"), "dir -> /d1");
    assert_eq!(paths(&layers[2]), dir_entries("d2"), "dir/ -> /d2");
    let mut d3 = dir_entries("d3/dir");
    d3.push("d3/".into());
    d3.sort();
    assert_eq!(paths(&layers[3]), d3, "dir -> /d3/");
    assert_eq!(paths(&layers[4]), dir_entries("d4"), "dir/ -> /d4/");
    assert_eq!(
        paths(&layers[5]),
        set(&["files/", "files/file.txt"]),
        "file -> /files/"
    );
    assert_eq!(paths(&layers[6]), set(&["x"]), "file -> /x");
    assert_eq!(entry(&layers[6], "x").text(), "file\n");
    assert_eq!(entry(&layers[6], "x").kind, tar::EntryType::Regular);
    for (l, prefix) in [(1, "d1"), (2, "d2"), (3, "d3/dir"), (4, "d4")] {
        let link = entry(&layers[l], &format!("{prefix}/link"));
        assert_eq!(link.kind, tar::EntryType::Symlink, "{prefix}/link");
        assert_eq!(link.link.as_deref(), Some("a.txt"));
        let dangling = entry(&layers[l], &format!("{prefix}/dangling"));
        assert_eq!(dangling.kind, tar::EntryType::Symlink, "{prefix}/dangling");
        assert_eq!(dangling.link.as_deref(), Some("nowhere"));
        assert_eq!(
            entry(&layers[l], &format!("{prefix}/sub/b.txt")).text(),
            "b\n"
        );
    }
    for l in &layers[1..] {
        for en in l {
            assert_eq!((en.uid, en.gid), (0, 0), "{} is root's", en.path);
        }
    }
    let rootfs = t.unpack(&oci.dir, "dests", "dests").join("rootfs");
    let tr = tree(&rootfs);
    assert_eq!(tr["d1/link"], "l -> a.txt");
    assert_eq!(tr["d3/dir/dangling"], "l -> nowhere");
    assert_eq!(tr["d4/a.txt"], "f 644 a\n");
    assert_eq!(tr["files/file.txt"], "f 644 file\n");
    assert_eq!(tr["x"], "f 644 file\n");
    assert!(!tr.contains_key("d1/dir/"), "dir -> /d1 is /d1/<contents>");
    assert!(!tr.contains_key("d2/dir/") && !tr.contains_key("d4/dir/"));
}

#[test]
fn import_mode_uid_gid_and_a_right_hash() {
    let Some(e) = e2e() else { return };
    let t = imports_dir(e, "imports-owned");
    assert_eq!(
        sha256_hex(&fs::read(t.join("file.txt")).unwrap()).to_uppercase(),
        "8B911A8716B94442F9CA3DFF20584048536E4C2F47B8B5BB9096CBD43C3432D5",
        "fixture"
    );
    t.build(&["owned.yaml"]).assert_ok();
    let layers = t.oci().layers("owned");
    assert_eq!(layers.len(), 3);
    assert_eq!(paths(&layers[1]), set(&["opt/", "opt/f"]));
    let f = entry(&layers[1], "opt/f");
    assert_eq!(
        (f.mode, f.uid, f.gid, f.text().as_str()),
        (0o640, 1000, 1001, "file\n")
    );
    let opt = entry(&layers[1], "opt/");
    assert_eq!((opt.mode, opt.uid, opt.gid), (0o755, 0, 0), "a made parent");
    for en in &layers[2] {
        if en.path == "opt/" {
            continue;
        }
        assert_eq!((en.uid, en.gid), (123, 456), "{}", en.path);
    }
    assert_eq!(entry(&layers[2], "opt/dir/a.txt").mode, 0o644);
    assert_eq!(
        entry(&layers[2], "opt/dir/link").kind,
        tar::EntryType::Symlink
    );
}

#[test]
fn import_with_a_wrong_hash_fails_naming_it() {
    let Some(e) = e2e() else { return };
    let t = imports_dir(e, "imports-badhash");
    let r = t.build(&["badhash.yaml"]);
    r.assert_failed();
    assert_states(
        &r,
        &[
            ("bad_dest", "FAILED"),
            ("bad_nodest", "FAILED"),
            ("fine", "built"),
        ],
    );
    let actual_file = sha256_hex(b"file\n");
    let actual_a = sha256_hex(b"a\n");
    for (layer, import, expected, actual) in [
        ("bad_dest", "file.txt", "1".repeat(64), &actual_file),
        ("bad_nodest", "dir/a.txt", "2".repeat(64), &actual_a),
    ] {
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("[{layer}] FAILED")))
            .unwrap_or_else(|| panic!("no FAILED line for {layer}:\n{}", r.describe()));
        for needle in [import, expected.as_str(), actual.as_str()] {
            assert!(line.contains(needle), "{line:?} lacks {needle:?}");
        }
    }
    assert!(
        !t.out.join("index.json").exists(),
        "no output after a failure"
    );
}

#[test]
fn a_local_build_reads_inputs_outside_the_stackerfiles_tree_as_stacker_does() {
    let Some(e) = e2e() else { return };
    let t = imports_dir(e, "imports-ctx");
    std::os::unix::fs::symlink("../file.txt", t.join("ctx/link-out")).unwrap();
    t.chown_all();
    // Nothing is uploaded by a local build, so there is no context to stay inside (the
    // rule guards remote submissions: see the CLI's context tests). The flag is still
    // accepted, so scripts that pass it keep working.
    let r = t.build(&["ctx/stacker.yaml"]);
    r.assert_ok();
    assert_states(
        &r,
        &[("up", "built"), ("via_link", "built"), ("inside", "built")],
    );
    let r = t.build(&["--allow-outside-context", "ctx/stacker.yaml"]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("up", "cached"),
            ("via_link", "cached"),
            ("inside", "cached"),
        ],
    );
    let oci = t.oci();
    let up = oci.layers("up");
    assert_eq!(paths(up.last().unwrap()), set(&["up.txt"]));
    assert_eq!(entry(up.last().unwrap(), "up.txt").text(), "file\n");
    let via = oci.layers("via_link");
    assert_eq!(entry(via.last().unwrap(), "via-link.txt").text(), "file\n");
}

// ---------------------------------------------------------------------------------------
// 5. ownership, modes, links, mtimes, xattrs in the layer tar
// ---------------------------------------------------------------------------------------

/// A tarball: every entry of the busybox rootfs tarball, then what `extra` appends.
fn busybox_plus(e: &E2e, out: &Path, extra: impl FnOnce(&mut tar::Builder<fs::File>)) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    let mut a = tar::Archive::new(fs::File::open(&e.rootfs_tar).unwrap());
    for en in a.entries().unwrap() {
        let mut en = en.unwrap();
        let h = en.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut en, &mut data).unwrap();
        b.append(&h, &data[..]).unwrap();
    }
    extra(&mut b);
    b.into_inner().unwrap().sync_all().unwrap();
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// 2001-02-03T04:05:06Z, what `touch -d "2001-02-03 04:05:06"` sets in UTC.
const OLD_MTIME: u64 = 981_173_106;

fn perms(who: Who) {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "perms", who);
    t.fixture("perms");
    busybox_plus(e, &t.join("xattr-base.tar"), |b| {
        b.append_pax_extensions([("SCHILY.xattr.user.farm", &b"hello"[..])])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("xattr-file").unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(2);
        h.set_mtime(ROOTFS_MTIME);
        h.set_cksum();
        b.append(&h, &b"x\n"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("tar-owned").unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o4750);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_size(2);
        h.set_mtime(ROOTFS_MTIME);
        h.set_cksum();
        b.append(&h, &b"o\n"[..]).unwrap();
    });
    t.chown_all();
    let started = now();
    let r = t.build(&[]);
    r.assert_ok();
    let oci = t.oci();
    let layers = oci.layers("perms");
    assert_eq!(layers.len(), 2);

    let x = entry(&layers[0], "xattr-file");
    assert_eq!(
        x.xattrs.get("user.farm").map(Vec::as_slice),
        Some(&b"hello"[..]),
        "the tar base's xattr is kept in its layer: {x:?}"
    );
    assert_eq!(x.mtime, ROOTFS_MTIME, "the tar base's mtimes are kept");
    let o = entry(&layers[0], "tar-owned");
    assert_eq!(
        (o.mode, o.uid, o.gid),
        (0o4750, 1234, 5678),
        "the tar base's owners and modes are kept"
    );

    let l = &layers[1];
    assert_eq!(
        paths(l),
        set(&[
            "p/",
            "p/empty/",
            "p/setuid",
            "p/setgid",
            "p/sticky/",
            "p/owned",
            "p/owned-dir/",
            "p/h1",
            "p/h2",
            "p/sym",
            "p/dangling",
            "p/old",
            "p/fifo",
            "xattr-file",
        ])
    );
    let m = |p: &str| {
        let en = entry(l, p);
        (en.kind, en.mode, en.uid, en.gid)
    };
    use tar::EntryType::{Directory, Fifo, Link, Regular, Symlink};
    assert_eq!(m("p/setuid"), (Regular, 0o4755, 0, 0));
    assert_eq!(m("p/setgid"), (Regular, 0o2711, 0, 0));
    assert_eq!(m("p/sticky/"), (Directory, 0o1777, 0, 0));
    assert_eq!(m("p/owned"), (Regular, 0o644, 1000, 1000));
    assert_eq!(m("p/owned-dir/"), (Directory, 0o755, 1001, 1002));
    assert_eq!(m("p/empty/"), (Directory, 0o755, 0, 0));
    assert_eq!(m("p/fifo").0, Fifo);
    assert_eq!(m("p/sym").0, Symlink);
    assert_eq!(entry(l, "p/sym").link.as_deref(), Some("h1"));
    assert_eq!(
        entry(l, "p/dangling").link.as_deref(),
        Some("/does/not/exist")
    );
    // A hard-linked pair: the first is the file, the second a hardlink entry to it.
    let (h1, h2) = (entry(l, "p/h1"), entry(l, "p/h2"));
    let (file, link) = match (h1.kind, h2.kind) {
        (Regular, Link) => (h1, h2),
        (Link, Regular) => (h2, h1),
        other => panic!("p/h1, p/h2 should be a file and a hardlink to it: {other:?}"),
    };
    assert_eq!(file.text(), "h\n");
    assert_eq!(
        link.link.as_deref().map(|s| s.trim_start_matches("./")),
        Some(file.path.as_str())
    );
    let pos = |p: &str| l.iter().position(|en| en.path == p).unwrap();
    assert!(
        pos(&file.path) < pos(&link.path),
        "the link comes after its target"
    );
    assert_eq!(entry(l, "p/old").mtime, OLD_MTIME, "mtimes are kept");
    for p in ["p/setuid", "p/h1", "p/empty/"] {
        let t = entry(l, p).mtime;
        assert!(
            t + 120 >= started && t <= now() + 5,
            "{p}: mtime {t} is not the build's time (~{started})"
        );
    }
    let x = entry(l, "xattr-file");
    assert_eq!(x.mode, 0o600);
    assert_eq!(
        x.xattrs.get("user.farm").map(Vec::as_slice),
        Some(&b"hello"[..]),
        "an xattr survives a copy-up into the run layer: {x:?}"
    );
    assert!(
        l.iter()
            .all(|en| !en.path.contains("empty/") || en.path == "p/empty/"),
        "the empty dir is empty"
    );

    t.validate(&oci.dir, "perms");
    // umoci unpacks it with the modes (rootless: without the owners) and the hard link.
    let rootfs = t.unpack(&oci.dir, "perms", "perms").join("rootfs");
    let md = |p: &str| fs::symlink_metadata(rootfs.join(p)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md("p/setuid").mode() & 0o7777, 0o4755);
    assert_eq!(md("p/sticky").mode() & 0o7777, 0o1777);
    assert_eq!(md("p/h1").ino(), md("p/h2").ino());
    assert_eq!(md("p/old").mtime() as u64, OLD_MTIME);
    if who == Who::Root {
        assert_eq!((md("p/owned").uid(), md("p/owned").gid()), (1000, 1000));
    }
}

#[test]
fn ownership_modes_links_and_xattrs_in_the_layer_tar() {
    perms(Who::User);
}

#[test]
fn ownership_modes_links_and_xattrs_as_root_on_the_copy_backend() {
    perms(Who::Root);
}

// ---------------------------------------------------------------------------------------
// 6. reproducible digests
// ---------------------------------------------------------------------------------------

const SDE: u64 = 1_700_000_000;

#[test]
fn source_date_epoch_gives_byte_identical_images() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "repro", Who::User);
    t.fixture("repro");
    let sde = SDE.to_string();
    let env = [("SOURCE_DATE_EPOCH", sde.as_str())];
    let mut tags: BTreeMap<&str, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for n in 1..=2 {
        if n == 2 {
            // Let the clock move and touch the import (same content) before the rebuilds.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            output_ok(t.command(&[], "touch").arg(t.join("data.txt")));
        }
        for compression in ["gzip", "zstd"] {
            let state = t.join(&format!("state-{compression}-{n}"));
            let out = t.join(&format!("oci-{compression}-{n}"));
            let args = t.build_args_at(&state, &out, &["--no-cache", "--compression", compression]);
            t.farm_env(&args, &env).assert_ok();
            let oci = Oci::new(&out);
            tags.entry(compression).or_default().push(oci.tags());
            // skopeo reads both (Debian's umoci and oci-image-tool predate zstd layers).
            let inspect = t.skopeo_inspect(&out, "app");
            assert_eq!(
                inspect["Digest"].as_str(),
                Some(oci.manifest_digest("app").as_str())
            );
            assert_eq!(inspect["Layers"].as_array().unwrap().len(), 3);
            // Everything new is stamped with SOURCE_DATE_EPOCH at the latest.
            for tag in ["base", "app", "sib"] {
                let cfg = oci.config(tag);
                assert_eq!(cfg["created"], "2023-11-14T22:13:20Z", "{tag}");
                for h in cfg["history"].as_array().unwrap() {
                    assert_eq!(h["created"], "2023-11-14T22:13:20Z", "{tag}: {h}");
                }
                for (mt, d) in oci.layer_descs(tag) {
                    assert!(
                        mt.ends_with(&format!("+{compression}")),
                        "{tag}: layer media type {mt}"
                    );
                    for en in read_layer(&oci.blob(&d), &mt) {
                        assert!(en.mtime <= SDE, "{tag}: {} has mtime {}", en.path, en.mtime);
                    }
                }
            }
        }
    }
    for (compression, tags) in &tags {
        assert_eq!(tags[0].len(), 3);
        assert_eq!(
            tags[0], tags[1],
            "{compression}: two --no-cache builds with SOURCE_DATE_EPOCH give the same manifests"
        );
    }
    assert_ne!(tags["gzip"][0], tags["zstd"][0]);
}

// ---------------------------------------------------------------------------------------
// 7. the cache
// ---------------------------------------------------------------------------------------

/// Replace a file's content keeping its size and mtime (`touch -r`).
fn rewrite_same_mtime(t: &TestDir, rel: &str, content: &str) {
    let p = t.join(rel);
    let before = fs::metadata(&p).unwrap();
    assert_eq!(before.len() as usize, content.len(), "same size");
    let reference = t.join(&format!("{rel}.mtime-ref"));
    output_ok(t.command(&[], "cp").arg("-p").arg(&p).arg(&reference));
    t.write(rel, content);
    output_ok(t.command(&[], "touch").arg("-r").arg(&reference).arg(&p));
    fs::remove_file(&reference).unwrap();
    let after = fs::metadata(&p).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (after.len(), after.mtime(), after.mtime_nsec()),
        (before.len(), before.mtime(), before.mtime_nsec())
    );
}

/// The text of `path` in the last layer of TAG.
fn top_file(oci: &Oci, tag: &str, path: &str) -> String {
    entry(oci.layers(tag).last().unwrap(), path).text()
}

#[test]
fn cache_hits_and_what_a_change_rebuilds() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "cache", Who::User);
    t.fixture("cache");
    let all = |s: &'static str| -> Vec<(&'static str, &'static str)> {
        ["base", "a", "b", "c", "d"]
            .iter()
            .map(|l| (*l, s))
            .collect()
    };

    let r = t.build(&[]);
    r.assert_ok();
    assert_states(&r, &all("built"));
    let first = t.oci().tags();

    // A second build: all cached, nothing runs, quickly.
    let t0 = std::time::Instant::now();
    let r = t.build(&[]);
    let took = t0.elapsed();
    r.assert_ok();
    assert_states(&r, &all("cached"));
    assert!(
        !r.stderr.lines().any(|l| l.contains("building")),
        "a cached build builds nothing:\n{}",
        r.describe()
    );
    r.assert_stderr_contains("0 built, 5 cached, 0 failed");
    assert!(
        took.as_secs_f64() < 5.0,
        "a fully cached build took {took:?}"
    );
    assert_eq!(t.oci().tags(), first, "the same images");

    // An imported file (dest) changes, same size and mtime: a and b rebuild, no one else.
    rewrite_same_mtime(&t, "data.txt", "data-2\n");
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("a", "built"),
            ("b", "built"),
            ("c", "cached"),
            ("d", "cached"),
        ],
    );
    let oci = t.oci();
    assert_eq!(top_file(&oci, "a", "a-copy"), "data-2\n");
    assert_eq!(top_file(&oci, "b", "b"), "data-2\n");
    assert_eq!(oci.tags()["c"], first["c"]);

    // An import without dest changes: c rebuilds.
    rewrite_same_mtime(&t, "other.txt", "other-2\n");
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("a", "cached"),
            ("b", "cached"),
            ("c", "built"),
            ("d", "cached"),
        ],
    );
    assert_eq!(top_file(&t.oci(), "c", "c"), "other-2\n");

    // --no-cache rebuilds everything.
    let r = t.build(&["--no-cache"]);
    r.assert_ok();
    assert_states(&r, &all("built"));

    // A changed run line rebuilds that layer.
    let yaml = fs::read_to_string(t.join("stacker.yaml")).unwrap();
    t.write(
        "stacker.yaml",
        yaml.replace("run: echo d > /d", "run: echo dd > /d"),
    );
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("a", "cached"),
            ("b", "cached"),
            ("c", "cached"),
            ("d", "built"),
        ],
    );
    assert_eq!(top_file(&t.oci(), "d", "d"), "dd\n");
}

// ---------------------------------------------------------------------------------------
// 8. a failing run
// ---------------------------------------------------------------------------------------

#[test]
fn a_failing_run_fails_the_build_and_its_dependents_only() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "run-failure", Who::User);
    t.fixture("run_failure");

    let check = |r: &Run| {
        r.assert_failed();
        assert_states(
            r,
            &[
                ("base", "built"),
                ("bad", "FAILED"),
                ("after_bad", "skipped"),
                ("independent", "built"),
            ],
        );
        let s = summary(&r.stderr);
        assert!(s["bad"].contains("exit code 3"), "{s:?}");
        assert!(s["after_bad"].contains("'bad'"), "{s:?}");
        let at = r
            .stderr
            .find("[bad] FAILED")
            .unwrap_or_else(|| panic!("no [bad] FAILED:\n{}", r.describe()));
        let failure = &r.stderr[at..];
        let failure = &failure[..failure.find("\nsummary:").unwrap_or(failure.len())];
        for needle in ["exit code 3", "output line 40", "last words on stderr"] {
            assert!(
                failure.contains(needle),
                "the failure report lacks {needle:?}:\n{failure}"
            );
        }
        assert!(r.stderr.contains("farm build: FAILED"), "{}", r.describe());
    };

    // Into a fresh output: nothing is written.
    let r = t.build(&[]);
    check(&r);
    assert!(
        !t.out.join("index.json").exists(),
        "no index.json after a failed build"
    );

    // Into an existing output: it is left alone.
    t.build(&["ok.yaml"]).assert_ok();
    let index = fs::read(t.out.join("index.json")).unwrap();
    let r = t.build(&[]);
    r.assert_failed();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("bad", "FAILED"),
            ("after_bad", "skipped"),
            ("independent", "cached"),
        ],
    );
    assert_eq!(
        fs::read(t.out.join("index.json")).unwrap(),
        index,
        "a failed build does not change the output's index.json"
    );
    assert_eq!(
        t.oci().tag_names(),
        ["good".to_string()].into_iter().collect()
    );
}

// ---------------------------------------------------------------------------------------
// 9. malicious tar bases
// ---------------------------------------------------------------------------------------

/// A header for an arbitrary (unsanitised) name and link name.
fn raw_header(name: &str, kind: tar::EntryType, link: Option<&str>, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    {
        let u = h.as_ustar_mut().unwrap();
        assert!(name.len() <= 100, "{name}");
        u.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            u.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Symlink {
        0o777
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(ROOTFS_MTIME);
    h.set_size(size);
    h.set_cksum();
    h
}

fn write_raw_tar(out: &Path, entries: &[(String, tar::EntryType, Option<String>, &[u8])]) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    b.append(
        &raw_header("ok.txt", tar::EntryType::Regular, None, 3),
        &b"ok\n"[..],
    )
    .unwrap();
    for (name, kind, link, data) in entries {
        let mut h = raw_header(name, *kind, link.as_deref(), data.len() as u64);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            h.set_cksum();
        }
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().sync_all().unwrap();
}

/// Every path under `dir` whose name contains `token` (not following symlinks).
fn find_named(dir: &Path, token: &str, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(token) {
            out.push(p.clone());
        }
        if e.file_type().is_ok_and(|ft| ft.is_dir()) {
            find_named(&p, token, out);
        }
    }
}

/// The attacks: (layer name, the entries of its tarball).
type Attack = (
    &'static str,
    Vec<(String, tar::EntryType, Option<String>, &'static [u8])>,
);

fn attacks(token: &str) -> Vec<Attack> {
    use tar::EntryType::{Block, Char, Link, Regular, Symlink};
    let deep = "../".repeat(16);
    vec![
        (
            "dotdot",
            vec![
                (format!("../escape-{token}"), Regular, None, &b"x\n"[..]),
                (
                    format!("{deep}tmp/escape-{token}"),
                    Regular,
                    None,
                    &b"x\n"[..],
                ),
                (
                    format!("a/../../escape2-{token}"),
                    Regular,
                    None,
                    &b"x\n"[..],
                ),
            ],
        ),
        (
            "absolute",
            vec![
                (format!("/etc/evil-{token}"), Regular, None, &b"x\n"[..]),
                (format!("/tmp/evil-{token}"), Regular, None, &b"x\n"[..]),
            ],
        ),
        (
            "symlink",
            vec![
                ("link".into(), Symlink, Some("/".into()), &b""[..]),
                (format!("link/tmp/evil-{token}"), Regular, None, &b"x\n"[..]),
                ("up".into(), Symlink, Some(deep.clone()), &b""[..]),
                (format!("up/tmp/evil2-{token}"), Regular, None, &b"x\n"[..]),
            ],
        ),
        (
            "hardlink",
            vec![
                (
                    format!("hl-{token}"),
                    Link,
                    Some("/etc/passwd".into()),
                    &b""[..],
                ),
                (
                    format!("hl2-{token}"),
                    Link,
                    Some(format!("{deep}etc/passwd")),
                    &b""[..],
                ),
            ],
        ),
        (
            "device",
            vec![
                (format!("null-{token}"), Char, None, &b""[..]),
                (format!("blk-{token}"), Block, None, &b""[..]),
            ],
        ),
    ]
}

fn malicious_tar_bases(who: Who) {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "malicious", who);
    let token = format!(
        "farm-e2e-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let passwd = fs::read("/etc/passwd").unwrap();
    let passwd_nlink = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata("/etc/passwd").unwrap().nlink()
    };
    let attacks = attacks(&token);
    let mut runs = Vec::new();
    for (name, entries) in &attacks {
        write_raw_tar(&t.join(&format!("{name}.tar")), entries);
        t.write(
            &format!("{name}.yaml"),
            format!("{name}:\n  from:\n    type: tar\n    url: {name}.tar\n"),
        );
        let out = t.join(&format!("oci-{name}"));
        let args = t.build_args_at(&t.state, &out, &[&format!("{name}.yaml")]);
        runs.push((name, entries, out, t.farm_env(&args, &[])));
    }

    // Nothing was written outside a root filesystem.
    let mut found = Vec::new();
    for dir in ["/tmp", "/etc", "/var/tmp", "/home", "/root", "/srv", "/opt"] {
        find_named(Path::new(dir), &token, &mut found);
    }
    if let Ok(rd) = fs::read_dir("/") {
        for en in rd.flatten() {
            if en.file_name().to_string_lossy().contains(&token) {
                found.push(en.path());
            }
        }
    }
    let outside: Vec<_> = found
        .iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "rootfs"))
        .collect();
    assert!(
        outside.is_empty(),
        "files written outside the rootfs: {outside:#?}\n{}",
        runs.iter()
            .map(|r| r.3.describe())
            .collect::<Vec<_>>()
            .join("\n")
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd);
    assert_eq!(
        fs::metadata("/etc/passwd").unwrap().nlink(),
        passwd_nlink,
        "a hard link to /etc/passwd was made"
    );

    // Each build either failed with an error that names the offending entry, or made an
    // image with only safe paths and nothing of the host in it.
    for (name, entries, out, r) in &runs {
        if !r.status.success() {
            assert_states(r, &[(name, "FAILED")]);
            let line = r
                .stderr
                .lines()
                .find(|l| l.starts_with(&format!("[{name}] FAILED")))
                .unwrap();
            assert!(
                entries.iter().any(|(n, _, _, _)| line.contains(n.as_str())),
                "{name}: the error does not name the offending entry: {line}"
            );
            assert!(!out.join("index.json").exists());
            continue;
        }
        assert_states(r, &[(name, "built")]);
        for l in Oci::new(out).layers(name) {
            for en in &l {
                assert!(
                    !en.raw_path.starts_with('/') && !en.raw_path.split('/').any(|c| c == ".."),
                    "{name}: unsafe path {:?} in the image",
                    en.raw_path
                );
                assert!(
                    en.data.is_empty() || en.data != passwd,
                    "{name}: the host's /etc/passwd is in the image ({})",
                    en.path
                );
            }
        }
    }
}

#[test]
fn malicious_tar_bases_write_nothing_outside_the_rootfs() {
    malicious_tar_bases(Who::User);
}

#[test]
fn malicious_tar_bases_as_root_on_the_copy_backend() {
    malicious_tar_bases(Who::Root);
}

// ---------------------------------------------------------------------------------------
// 10. nothing leaks
// ---------------------------------------------------------------------------------------

struct Proc {
    pid: u32,
    uid: u32,
    cmdline: String,
    environ: String,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for en in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = en.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = en.path();
        let Ok(status) = fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        let read = |f: &str| {
            fs::read(dir.join(f))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
        };
        out.push(Proc {
            pid,
            uid,
            cmdline: read("cmdline"),
            environ: read("environ"),
        });
    }
    out
}

/// What a build may have left behind; empty when nothing.
fn leftovers(e: &E2e, pool: &Path, mark: &str) -> Vec<String> {
    let mut found = Vec::new();
    let pool_s = pool.display().to_string();
    let me = std::process::id();
    let (sub_start, sub_count) = e.subuids;
    for p in processes() {
        if p.pid == me {
            continue;
        }
        let owned_by_subuid =
            u64::from(p.uid) >= sub_start && u64::from(p.uid) < sub_start + sub_count;
        // A sandboxed process runs as the user (container root) or one of its subuids,
        // with its root or cwd in the pool (other tests' pools are elsewhere).
        let in_pool = ["root", "cwd"].iter().any(|l| {
            fs::read_link(format!("/proc/{}/{l}", p.pid)).is_ok_and(|t| t.starts_with(pool))
        });
        if p.environ.contains(&format!("FARM_E2E_MARK={mark}"))
            || p.cmdline.trim() == "sleep 100"
            || p.cmdline.contains(&pool_s)
            || ((owned_by_subuid || p.uid == e.uid) && in_pool)
        {
            found.push(format!("process {} (uid {}): {}", p.pid, p.uid, p.cmdline));
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let mount_point = unescape_mountinfo(f[4]);
        let fstype = f
            .iter()
            .position(|x| *x == "-")
            .map(|i| f[i + 1])
            .unwrap_or("");
        // Anything mounted inside the pool, or an overlay over anything of ours.
        if mount_point.starts_with(&format!("{pool_s}/"))
            || (fstype == "overlay" && l.contains(E2E_DIR))
        {
            found.push(format!("mount: {l}"));
        }
    }
    for en in fs::read_dir(pool.join("work")).unwrap().flatten() {
        found.push(format!("workspace: {}", en.path().display()));
    }
    for en in fs::read_dir(pool.join("chains")).unwrap().flatten() {
        let n = en.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') {
            found.push(format!("unfinished chain: {}", en.path().display()));
        }
    }
    found
}

/// Leftovers, given a few seconds to go away.
fn assert_nothing_left(e: &E2e, pool: &Path, mark: &str, after: &str) {
    let t = std::time::Instant::now();
    loop {
        let left = leftovers(e, pool, mark);
        if left.is_empty() {
            return;
        }
        if t.elapsed() > std::time::Duration::from_secs(3) {
            panic!("left behind after {after}:\n{}", left.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn nothing_leaks_after_success_failure_and_sigint() {
    let Some(e) = e2e() else { return };
    let mut t = TestDir::new(e, "leaks", Who::User);
    t.pool = private_pool(e, "pool-leaks");
    t.fixture("leaks");
    let mark = format!("leaks-{}", std::process::id());
    let subst = format!("MARK={mark}");
    let mark_args = |file: &'static str| ["--substitute", subst.as_str(), file];

    t.build(&mark_args("ok.yaml")).assert_ok();
    assert_nothing_left(e, &t.pool, &mark, "a successful build");

    let r = t.build(&mark_args("bad.yaml"));
    r.assert_failed();
    assert_states(&r, &[("bad", "FAILED")]);
    assert_nothing_left(e, &t.pool, &mark, "a failed build");

    // SIGINT while the run sleeps.
    let args = t.build_args(&mark_args("slow.yaml"));
    let mut child = t
        .command(&[], farm_bin().to_str().unwrap())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let waited = std::time::Instant::now();
    loop {
        let sleeping = processes().into_iter().any(|p| {
            p.cmdline.trim() == "sleep 100" && p.environ.contains(&format!("FARM_E2E_MARK={mark}"))
        });
        if sleeping {
            break;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("farm exited ({s}) before its run started sleeping");
        }
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(60),
            "the run did not start `sleep 100` within 60s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = std::time::Instant::now();
    // SAFETY: sending a signal to our own child.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to farm");
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(20));
    let took = sent.elapsed();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("farm still runs 20s after SIGINT");
    };
    let out = child.wait_with_output().unwrap();
    let r = Run::from_output(args.clone(), out);
    let r = Run { status, ..r };
    r.assert_failed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "farm took {took:?} to exit after SIGINT:\n{}",
        r.describe()
    );
    assert!(
        r.stderr.to_lowercase().contains("cancel"),
        "no word of the cancellation:\n{}",
        r.describe()
    );
    // The layer the Ctrl-C stopped is reported as cancelled, not as a failure.
    assert_states(&r, &[("slow", "cancelled")]);
    assert_nothing_left(e, &t.pool, &mark, "SIGINT");

    // --timeout kills a run that takes too long.
    let t0 = std::time::Instant::now();
    let r = t.build(&[
        "--timeout",
        "1",
        "--substitute",
        subst.as_str(),
        "slow.yaml",
    ]);
    r.assert_failed();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(15),
        "--timeout 1 took {:?}",
        t0.elapsed()
    );
    assert_states(&r, &[("slow", "FAILED")]);
    assert!(
        summary(&r.stderr)["slow"].contains("timed out"),
        "{}",
        r.describe()
    );
    assert_nothing_left(e, &t.pool, &mark, "a timeout");
    assert_eq!(
        t.oci().tag_names(),
        ["base".to_string(), "child".to_string()]
            .into_iter()
            .collect(),
        "the interrupted build wrote nothing"
    );
}

// ---------------------------------------------------------------------------------------
// 11. farm check, and a user without subordinate ids
// ---------------------------------------------------------------------------------------

#[test]
fn farm_check_says_ready_for_the_set_up_user() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "check", Who::User);
    let pool = e.pool.display().to_string();
    let r = t.farm_env(&["check".into(), "--pool".into(), pool], &[]);
    r.assert_ok();
    assert!(
        r.stdout.contains("ready for rootless builds"),
        "{}",
        r.describe()
    );
    assert!(r.stdout.contains("btrfs"), "{}", r.describe());
    assert!(!r.stdout.contains("error:"), "{}", r.describe());
}

const NOSUB_USER: &str = "farm-nosub";

/// Take `user`'s ranges out of /etc/subuid and /etc/subgid, with usermod (which locks
/// the files against other writers, such as a concurrent `farm setup`).
fn drop_subids(user: &str) {
    for (file, flag) in [
        ("/etc/subuid", "--del-subuids"),
        ("/etc/subgid", "--del-subgids"),
    ] {
        while let Some((start, count)) = subid_range(file, user) {
            sh(Command::new("usermod")
                .arg(flag)
                .arg(format!("{start}-{}", start + count - 1))
                .arg(user));
        }
    }
}

#[test]
fn a_user_without_subordinate_ids_is_told_to_run_farm_setup() {
    let Some(_e) = e2e() else { return };
    let (uid, gid, home) = with_setup_lock(|| {
        let u = ensure_user(NOSUB_USER);
        drop_subids(NOSUB_USER);
        u
    });
    assert_eq!(subid_range("/etc/subuid", NOSUB_USER), None);
    assert_eq!(subid_range("/etc/subgid", NOSUB_USER), None);
    let dir = tempfile::Builder::new()
        .prefix("nosub.")
        .tempdir_in(Path::new(E2E_DIR).join("t"))
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        dir.path().join("stacker.yaml"),
        "a:\n  from:\n    type: scratch\n  run: echo hi\n",
    )
    .unwrap();
    chown_tree(dir.path(), uid, gid);
    let d = dir.path().display().to_string();
    let bin = farm_bin();
    let run = |args: Vec<String>| {
        let out = user_command(NOSUB_USER, &home, &[], bin.to_str().unwrap())
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        Run::from_output(args, out)
    };
    let r = run(vec![
        "build".into(),
        "--state-dir".into(),
        format!("{d}/state"),
        "--pool".into(),
        format!("{d}/pool"),
        "-o".into(),
        format!("{d}/oci"),
    ]);
    r.assert_failed();
    assert!(
        r.stderr.contains("farm setup"),
        "the error should say to run `farm setup`:\n{}",
        r.describe()
    );
    assert!(r.stderr.contains(NOSUB_USER), "{}", r.describe());
    assert!(!dir.path().join("oci/index.json").exists());

    let r = run(vec!["check".into(), "--pool".into(), format!("{d}/pool")]);
    r.assert_failed();
    assert!(
        r.stdout.contains("farm setup") || r.stderr.contains("farm setup"),
        "{}",
        r.describe()
    );
}

// ---------------------------------------------------------------------------------------
// 12. more of stackerfile.md: run's environment, timeouts, compressed tar bases, a shared
//     cache, dest imports under symlinks, binds, generate_labels, overlay_dirs
// ---------------------------------------------------------------------------------------

#[test]
fn run_environment_and_shell() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "run-env", Who::User);
    t.fixture("run_env");
    let env = [
        ("SOURCE_DATE_EPOCH", "1700000000"),
        ("TERM", "dumb"),
        ("FARM_E2E_OTHER", "o"),
    ];
    t.build_env(&[], &env).assert_ok();
    let oci = t.oci();
    assert_eq!(
        top_file(&oci, "envs", "envs"),
        "layer=envs build=b img=unset sde=1700000000 term=dumb other=unset\n",
        "build_env and the default passthrough reach run; environment does not"
    );
    assert_eq!(
        top_file(&oci, "envs", "second"),
        "second-item\n",
        "a list is one script"
    );
    assert_eq!(
        top_file(&oci, "shebang", "shebang"),
        "no -e\n",
        "a script with its own #! is not run with -e"
    );
    assert_eq!(
        top_file(&oci, "passthrough", "pass"),
        "other=o term=unset\n",
        "build_env_passthrough replaces the default list"
    );

    let r = t.build_env(&["errexit.yaml"], &env);
    r.assert_failed();
    assert_states(&r, &[("errexit", "FAILED")]);
    assert!(summary(&r.stderr)["errexit"].contains("exit code 1"));
    assert!(!r.stderr.contains("+ echo survived"), "{}", r.describe());
}

#[test]
fn compressed_tar_bases_give_the_same_layer() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "compressed-bases", Who::User);
    let plain = fs::read(&e.rootfs_tar).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    t.write("busybox.tar.gz", gz.finish().unwrap());
    t.write("busybox.tar.zst", zstd::encode_all(&plain[..], 3).unwrap());
    let mut yaml = String::new();
    for (name, file) in [
        ("plain", "busybox.tar"),
        ("gzip", "busybox.tar.gz"),
        ("zstd", "busybox.tar.zst"),
    ] {
        yaml.push_str(&format!(
            "{name}:\n  from:\n    type: tar\n    url: {file}\n  run: echo {name} > /which\n"
        ));
    }
    t.write("stacker.yaml", yaml);
    t.build_env(&[], &[("SOURCE_DATE_EPOCH", "1700000000")])
        .assert_ok();
    let oci = t.oci();
    let mut contents = Vec::new();
    for name in ["plain", "gzip", "zstd"] {
        let layers = oci.layers(name);
        assert_eq!(layers.len(), 1, "{name}");
        let p = paths(&layers[0]);
        assert!(p.contains(&"bin/busybox".to_string()), "{name}: {p:?}");
        assert_eq!(entry(&layers[0], "which").text(), format!("{name}\n"));
        let mut listing: Vec<String> = layers[0]
            .iter()
            .filter(|en| en.path != "which")
            .map(|en| {
                format!(
                    "{} {:?} {:o} {}:{} {:?} {}",
                    en.path,
                    en.kind,
                    en.mode,
                    en.uid,
                    en.gid,
                    en.link,
                    sha256_hex(&en.data)
                )
            })
            .collect();
        listing.sort();
        contents.push(listing);
    }
    assert_eq!(contents[0], contents[1], "gzip base = plain base");
    assert_eq!(contents[0], contents[2], "zstd base = plain base");
}

#[test]
fn two_builds_at_once_share_one_cache() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "shared-cache", Who::User);
    t.fixture("shared_cache");
    let env = [("SOURCE_DATE_EPOCH", "1700000000")];
    let spawn = |out: &str| {
        let args = t.build_args_at(&t.state, &t.join(out), &[]);
        let child = t
            .command(&env, farm_bin().to_str().unwrap())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (args, child)
    };
    let (a_args, a) = spawn("oci-a");
    let (b_args, b) = spawn("oci-b");
    let ra = Run::from_output(a_args, a.wait_with_output().unwrap());
    let rb = Run::from_output(b_args, b.wait_with_output().unwrap());
    ra.assert_ok();
    rb.assert_ok();
    let (ta, tb) = (
        Oci::new(&t.join("oci-a")).tags(),
        Oci::new(&t.join("oci-b")).tags(),
    );
    assert_eq!(ta.len(), 4);
    assert_eq!(ta, tb, "the same images from both builds");
    // Whatever either built is in the shared cache now.
    let r = t.build_env(&[], &env);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("base", "cached"),
            ("one", "cached"),
            ("two", "cached"),
            ("three", "cached"),
        ],
    );
    assert_eq!(t.oci().tags(), ta);
}

#[test]
fn a_dest_import_under_a_symlinked_directory_keeps_the_symlink() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "symlinked-dest", Who::User);
    t.fixture("symlinked_dest");
    t.build(&[]).assert_ok();
    let oci = t.oci();
    let top = oci.layers("app");
    let run_layer = top.last().unwrap();
    let rootfs = t.unpack(&oci.dir, "app", "app").join("rootfs");
    let tr = tree(&rootfs);
    let view = format!(
        "during run /lib was: {}, holding {:?}; the import layer: {:?}; in the image: /lib {:?}, /usr/lib/ {:?}",
        entry(run_layer, "lib-kind").text().trim(),
        entry(run_layer, "lib-list").text(),
        paths(&top[top.len() - 2]),
        tr.get("lib").or(tr.get("lib/")),
        subtree(&tr, &["usr/lib/"]),
    );
    assert_eq!(
        tr.get("lib").map(String::as_str),
        Some("l -> usr/lib"),
        "{view}"
    );
    assert_eq!(
        tr.get("usr/lib/libc.so").map(String::as_str),
        Some("f 644 libc\n"),
        "{view}"
    );
    assert_eq!(
        tr.get("usr/lib/tool.txt").map(String::as_str),
        Some("f 644 tool\n"),
        "{view}"
    );
    assert_eq!(entry(run_layer, "lib-kind").text(), "symlink\n", "{view}");
    assert_eq!(
        entry(run_layer, "lib-list").text(),
        "libc.so\ntool.txt\n",
        "{view}"
    );
}

#[test]
fn binds_are_mounted_during_run_and_never_cached() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "binds", Who::User);
    t.fixture("binds");
    t.write("bindsrc/file", "from the host\n");
    let bindsrc = format!("BINDSRC={}", t.join("bindsrc").display());
    let r = t.build(&["--substitute", &bindsrc]);
    r.assert_ok();
    assert_eq!(top_file(&t.oci(), "bound", "bound-copy"), "from the host\n");
    let r = t.build(&["--substitute", &bindsrc]);
    r.assert_ok();
    assert_states(&r, &[("bound", "built")]);
}

#[test]
fn generate_labels_become_labels_and_nothing_else() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "generate-labels", Who::User);
    t.fixture("generate_labels");
    t.build(&[]).assert_ok();
    let oci = t.oci();
    assert_eq!(
        oci.config("gl")["config"]["Labels"],
        serde_json::json!({"static": "s", "org.example.version": "1.2.3"})
    );
    let layers = oci.layers("gl");
    assert_eq!(layers.len(), 1);
    let p = paths(&layers[0]);
    assert!(p.contains(&"version".to_string()));
    assert!(
        !p.contains(&"not-kept".to_string()),
        "generate_labels changes are thrown away"
    );
}

#[test]
fn overlay_dirs_add_a_layer_of_root_owned_files() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "overlay-dirs", Who::User);
    t.fixture("overlay_dirs");
    t.build(&[]).assert_ok();
    let layers = t.oci().layers("ov");
    assert_eq!(layers.len(), 2, "the base + the overlay_dirs layer");
    assert_eq!(
        paths(&layers[1]),
        set(&["opt/", "opt/sub/", "opt/sub/o.txt"])
    );
    for en in &layers[1] {
        assert_eq!((en.uid, en.gid), (0, 0), "{} is root's", en.path);
    }
    assert_eq!(entry(&layers[1], "opt/sub/o.txt").text(), "o\n");
}

#[test]
fn stacker_url_imports_and_tar_bases() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-urls", Who::User);
    t.fixture("stacker_imports");
    let r = t.build(&[]);
    r.assert_ok();
    let oci = t.oci();
    assert_eq!(
        oci.tag_names(),
        ["consumer", "fromtar", "other"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let consumer = oci.layers("consumer");
    // A dest import sits between a tar base and its run, so the tarball is a layer of
    // its own: [tarball][import][run changes].
    assert_eq!(consumer.len(), 3, "the tar base, the dest import, the run");
    assert!(
        consumer[0].iter().any(|en| en.path == "bin/busybox"),
        "the tarball comes first"
    );
    assert!(
        !consumer[2].iter().any(|en| en.path == "bin/busybox"),
        "the run layer holds only the change, not the tarball again"
    );
    let import_layer = consumer
        .iter()
        .find(|l| l.iter().any(|en| en.path == "usr/bin/app"))
        .expect("a layer with usr/bin/app");
    assert_eq!(entry(import_layer, "usr/bin/app").text(), "v1\n");
    assert_eq!(top_file(&oci, "consumer", "d-copy"), "d\n");
    let fromtar = oci.layers("fromtar");
    assert_eq!(fromtar.len(), 1, "a tar base and its run are one layer");
    assert_eq!(entry(&fromtar[0], "marker-copy").text(), "from-builder\n");

    // The content of a stacker:// source is in the key: a new version rebuilds the
    // consumer with it.
    rewrite_same_mtime(&t, "version.txt", "v2\n");
    let r = t.build(&[]);
    r.assert_ok();
    assert_states(
        &r,
        &[
            ("builder", "built"),
            ("consumer", "built"),
            ("fromtar", "built"),
            ("other", "cached"),
        ],
    );
    let oci = t.oci();
    let consumer = oci.layers("consumer");
    let import_layer = consumer
        .iter()
        .find(|l| l.iter().any(|en| en.path == "usr/bin/app"))
        .expect("a layer with usr/bin/app");
    assert_eq!(entry(import_layer, "usr/bin/app").text(), "v2\n");
}

#[test]
fn stacker_url_imports_check_their_hash_and_name_the_import() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-url-hash", Who::User);
    t.fixture("stacker_imports");
    let r = t.build(&["hash.yaml"]);
    r.assert_failed();
    assert_states(
        &r,
        &[("builder", "built"), ("good", "built"), ("bad", "FAILED")],
    );
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("[bad] FAILED"))
        .unwrap();
    let actual = sha256_hex(b"v1\n");
    for needle in [
        "3".repeat(64).as_str(),
        actual.as_str(),
        "stacker://builder/out/app",
    ] {
        assert!(line.contains(needle), "{line:?} lacks {needle:?}");
    }
}

#[test]
fn http_imports_and_tar_bases() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "http", Who::User);
    t.fixture("http");
    let server = HttpServer::start();
    server.put("/busybox.tar", fs::read(&e.rootfs_tar).unwrap());
    server.put("/pinned.txt", "pinned\n");
    server.put("/unpinned.txt", "remote-1\n");
    let url = format!("URL={}", server.url(""));
    let pinned = format!("PINNED_SHA={}", sha256_hex(b"pinned\n"));
    let args = ["--substitute", &url, "--substitute", &pinned];

    let r = t.build(&args);
    r.assert_ok();
    let oci = t.oci();
    let layers = oci.layers("remote_base");
    assert_eq!(layers.len(), 3, "the tar base, the dest import, the run");
    assert!(layers.iter().any(|l| {
        l.iter()
            .any(|en| en.path == "pinned.txt" && en.text() == "pinned\n")
    }));
    assert_eq!(top_file(&oci, "remote_base", "unpinned-copy"), "remote-1\n");
    assert!(paths(&layers[0]).contains(&"bin/busybox".to_string()));
    assert!(!paths(layers.last().unwrap()).contains(&"bin/busybox".to_string()));

    // The server's content changes (same size): the layer is rebuilt with it.
    server.put("/unpinned.txt", "remote-2\n");
    let r = t.build(&args);
    r.assert_ok();
    assert_states(&r, &[("remote_base", "built"), ("other", "cached")]);
    assert_eq!(
        top_file(&t.oci(), "remote_base", "unpinned-copy"),
        "remote-2\n"
    );
    assert_eq!(
        server.count("GET /unpinned.txt"),
        2,
        "asked the server again"
    );
    // Nothing changed: all cached.
    let r = t.build(&args);
    r.assert_ok();
    assert_states(&r, &[("remote_base", "cached"), ("other", "cached")]);

    // A wrong hash: an error naming the URL and both digests.
    let r = t.build(&["--substitute", &url, "badhash.yaml"]);
    r.assert_failed();
    assert_states(&r, &[("bad", "FAILED")]);
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("[bad] FAILED"))
        .unwrap();
    for needle in [
        server.url("/pinned.txt"),
        "4".repeat(64),
        sha256_hex(b"pinned\n"),
    ] {
        assert!(line.contains(&needle), "{line:?} lacks {needle:?}");
    }
}

#[test]
fn root_is_refused_a_users_state_dir_and_pool_before_writing_anything() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "mixed-users", Who::User);
    fs::write(
        t.join("stacker.yaml"),
        "one:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo one > /one\n",
    )
    .unwrap();
    t.chown_all();
    t.build(&[]).assert_ok();
    let (uid, _) = t.owner();
    let owned_by_others = |dir: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = entry.path();
                let meta = fs::symlink_metadata(&p).unwrap();
                if meta.uid() != uid {
                    out.push(p.clone());
                }
                if meta.is_dir() {
                    stack.push(p);
                }
            }
        }
        out
    };
    assert!(owned_by_others(&t.state).is_empty());

    // The same state dir and pool, as root (stacker refuses this too): chains root wrote
    // there would be root's, and the user's next build could not snapshot them.
    let args = t.build_args(&[]);
    let out = Command::new(farm_bin())
        .args(&args)
        .current_dir(&t.path)
        .env("HOME", "/root")
        .output()
        .unwrap();
    let root = Run::from_output(args, out);
    assert!(!root.status.success(), "{}", root.describe());
    assert!(
        root.stderr.contains("belongs to")
            && root.stderr.contains(&format!("uid {uid}"))
            && root.stderr.contains("--state-dir"),
        "{}",
        root.describe()
    );
    assert!(
        owned_by_others(&t.state).is_empty(),
        "root wrote into the user's state dir"
    );

    // The user's builds go on.
    let again = t.build(&[]);
    again.assert_ok();
    assert_states(&again, &[("one", "cached")]);
}

/// The README's first command, as root on a copy of the example: it builds both images
/// with the embedded farm and runs `hello` with runc, whose output ends the script's.
#[test]
fn the_main_job_builds_the_example_and_runs_it() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "main-job", Who::Root);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/hello");
    let copy = t.join("repo/deploy/examples/hello");
    fs::create_dir_all(&copy).unwrap();
    for name in [
        "run.sh",
        "make-rootfs.sh",
        "stacker.yaml",
        "base.yaml",
        "motd.txt",
    ] {
        fs::copy(example.join(name), copy.join(name)).unwrap();
    }
    let out = Command::new(copy.join("run.sh"))
        .env("FARM", farm_bin())
        .env("FARM_STATE_DIR", t.join("state"))
        .env("FARM_POOL", t.join("pool"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.trim_end().ends_with("hello from farm"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(
            &fs::read_to_string(example.join("motd.txt"))
                .unwrap()
                .trim()
                .to_string()
        )
    );
    let oci = Oci::new(&t.join("repo/oci"));
    assert_eq!(
        oci.tag_names().into_iter().collect::<Vec<_>>(),
        ["busybox", "hello"]
    );
}

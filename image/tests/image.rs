//! End-to-end tests of farm-image through its public API: layer tars (writing and
//! applying, whiteouts, malicious input), export, and OCI layouts.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use farm_image::oci::{
    ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder,
    MediaType, PlatformBuilder, RootFsBuilder,
};
use farm_image::{
    ApplyOptions, BlobStore, Compression, Digest, Error, ExportOptions, LayerTarOptions, OciLayout,
    apply_layer, export_dir, export_tar_stream, to_canonical_json, write_layer_tar,
};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Tests that need root (mknod of whiteouts, chown) run as root here and in CI; outside
/// that they are skipped with a message instead of failing.
macro_rules! require_root {
    () => {
        if !is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("this test needs root (or a user namespace) and CI runs as root");
            }
            eprintln!("SKIPPED: needs root to create device nodes / chown");
            return;
        }
    };
}

fn write(p: &Path, content: &str) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, content).unwrap();
}

fn mknod_whiteout(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

fn set_mtime(p: &Path, t: i64) {
    let ts = rustix::fs::Timespec {
        tv_sec: t,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

#[derive(Debug)]
struct TarEntry {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
    dev: (u32, u32),
}

fn read_tar(bytes: &[u8]) -> Vec<(String, TarEntry)> {
    let mut ar = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let h = e.header().clone();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                if let Some(k) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), ext.value_bytes().to_vec());
                }
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((
            path,
            TarEntry {
                kind: h.entry_type(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                link,
                data,
                xattrs,
                dev: (
                    h.device_major().unwrap().unwrap_or(0),
                    h.device_minor().unwrap().unwrap_or(0),
                ),
            },
        ));
    }
    out
}

fn tar_of(dir: &Path, opts: &LayerTarOptions) -> Vec<u8> {
    write_layer_tar(dir, opts, Vec::new()).unwrap().0
}

fn names(entries: &[(String, TarEntry)]) -> Vec<&str> {
    entries.iter().map(|(p, _)| p.as_str()).collect()
}

fn get<'a>(entries: &'a [(String, TarEntry)], path: &str) -> &'a TarEntry {
    &entries
        .iter()
        .find(|(p, _)| p == path)
        .unwrap_or_else(|| panic!("{path} missing"))
        .1
}

/// A readable description of a tree: path -> "kind mode uid:gid content".
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = fs::symlink_metadata(&p).unwrap();
            let mode = md.mode() & 0o7777;
            let desc = if md.is_dir() {
                walk(root, &p, out);
                format!("dir {mode:o}")
            } else if md.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if md.is_file() {
                format!(
                    "file {mode:o} {}",
                    fs::read_to_string(&p).unwrap_or_default()
                )
            } else {
                format!("other {mode:o}")
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn expect_tree(root: &Path, expected: &[(&str, &str)]) {
    let got = tree(root);
    let want: BTreeMap<String, String> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want);
}

fn apply_opts() -> ApplyOptions {
    ApplyOptions {
        ignore_chown_errors: !is_root(),
        ..ApplyOptions::default()
    }
}

// ---------------------------------------------------------------------------------
// Writing layer tars

#[test]
fn tar_round_trip_types_modes_links_xattrs_mtimes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("root");
    fs::create_dir(&d).unwrap();
    write(&d.join("etc/hosts"), "127.0.0.1 localhost\n");
    fs::create_dir_all(d.join("empty/dir")).unwrap();
    write(&d.join("bin/su"), "suid binary");
    fs::set_permissions(d.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    write(&d.join("bin/wall"), "sgid binary");
    fs::set_permissions(d.join("bin/wall"), fs::Permissions::from_mode(0o2711)).unwrap();
    fs::create_dir(d.join("tmp")).unwrap();
    fs::set_permissions(d.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    symlink("../etc/hosts", d.join("bin/hosts-link")).unwrap();
    symlink("/does/not/exist", d.join("dangling")).unwrap();
    fs::hard_link(d.join("etc/hosts"), d.join("etc/hosts.hard")).unwrap();
    fs::hard_link(d.join("etc/hosts"), d.join("z-hard")).unwrap();
    write(&d.join("xattr-file"), "x");
    set_xattr(&d.join("xattr-file"), "user.farm.test", b"value\0binary");
    set_xattr(
        &d.join("xattr-file"),
        "user.overlay.origin",
        b"must not leak",
    );
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "f".repeat(150));
    write(&d.join(&long_name), "long");
    let long_target = "t/".repeat(80);
    symlink(&long_target, d.join("long-link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    write(&d.join("stacker/imports/x"), "never in the layer");
    write(&d.join("stackerx"), "not excluded");
    let old = 1_000_000_000;
    let epoch = 1_500_000_000;
    set_mtime(&d.join("etc/hosts"), old);
    if is_root() {
        rustix::fs::chownat(
            rustix::fs::CWD,
            d.join("etc/hosts"),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.join("null"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.join("loop0"),
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o660),
            rustix::fs::makedev(7, 0),
        )
        .unwrap();
    }

    let opts = LayerTarOptions::whole_dir()
        .exclude("/stacker")
        .source_date_epoch(Some(epoch));
    let bytes = tar_of(&d, &opts);
    let entries = read_tar(&bytes);
    let n = names(&entries);

    // Sorted, depth first, directories with a trailing slash, no root entry.
    let mut sorted = n.clone();
    sorted.sort_by_key(|p| {
        p.trim_end_matches('/')
            .split('/')
            .map(str::to_string)
            .collect::<Vec<_>>()
    });
    assert_eq!(n, sorted);
    assert!(
        !n.iter()
            .any(|p| p.starts_with("stacker/") || *p == "stacker/"),
        "{n:?}"
    );
    assert!(n.contains(&"stackerx"));
    assert!(n.contains(&"empty/") && n.contains(&"empty/dir/"));

    let hosts = get(&entries, "etc/hosts");
    assert_eq!(hosts.kind, tar::EntryType::Regular);
    assert_eq!(hosts.data, b"127.0.0.1 localhost\n");
    assert_eq!(hosts.mtime, old as u64, "older mtimes are kept");
    if is_root() {
        assert_eq!((hosts.uid, hosts.gid), (1234, 5678));
    }
    // Newer mtimes are clamped to SOURCE_DATE_EPOCH.
    assert_eq!(get(&entries, "bin/su").mtime, epoch);
    assert_eq!(get(&entries, "empty/").mtime, epoch);
    assert_eq!(get(&entries, "bin/su").mode, 0o4755);
    assert_eq!(get(&entries, "bin/wall").mode, 0o2711);
    assert_eq!(get(&entries, "tmp/").mode, 0o1777);
    assert_eq!(get(&entries, "tmp/").kind, tar::EntryType::Directory);

    let l = get(&entries, "bin/hosts-link");
    assert_eq!(l.kind, tar::EntryType::Symlink);
    assert_eq!(l.link.as_deref(), Some("../etc/hosts"));
    assert_eq!(
        get(&entries, "dangling").link.as_deref(),
        Some("/does/not/exist")
    );
    assert_eq!(
        get(&entries, "long-link").link.as_deref(),
        Some(long_target.as_str())
    );

    // Hard links: first path in walk order is the file, later ones link to it.
    let h1 = get(&entries, "etc/hosts.hard");
    assert_eq!(h1.kind, tar::EntryType::Link);
    assert_eq!(h1.link.as_deref(), Some("etc/hosts"));
    assert_eq!(get(&entries, "z-hard").link.as_deref(), Some("etc/hosts"));

    let x = get(&entries, "xattr-file");
    assert_eq!(
        x.xattrs.get("user.farm.test").map(Vec::as_slice),
        Some(&b"value\0binary"[..])
    );
    assert!(!x.xattrs.contains_key("user.overlay.origin"));

    assert_eq!(get(&entries, &long_name).data, b"long");
    assert_eq!(get(&entries, "fifo").kind, tar::EntryType::Fifo);
    if is_root() {
        let null = get(&entries, "null");
        assert_eq!(null.kind, tar::EntryType::Char);
        assert_eq!(null.dev, (1, 3));
        assert_eq!(
            null.mode,
            fs::symlink_metadata(d.join("null")).unwrap().mode() & 0o7777
        );
        let lp = get(&entries, "loop0");
        assert_eq!(lp.kind, tar::EntryType::Block);
        assert_eq!(lp.dev, (7, 0));
    }
    // No user or group names anywhere.
    let mut ar = tar::Archive::new(&bytes[..]);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().username_bytes().unwrap_or_default(), b"");
        assert_eq!(e.header().groupname_bytes().unwrap_or_default(), b"");
    }

    // Deterministic: same tree, same bytes. GNU tar reads it too.
    assert_eq!(tar_of(&d, &opts), bytes);
    let tarfile = tmp.path().join("l.tar");
    fs::write(&tarfile, &bytes).unwrap();
    let out = Command::new("tar")
        .arg("-tvf")
        .arg(&tarfile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&long_name));
}

#[test]
fn whiteout_shapes_from_overlay_upper() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let up = tmp.path().join("upper");
    fs::create_dir(&up).unwrap();
    // rm -rf /a
    mknod_whiteout(&up.join("a"));
    // rm -rf /b && mkdir /b
    fs::create_dir(up.join("b")).unwrap();
    set_xattr(&up.join("b"), "user.overlay.opaque", b"y");
    // rm -rf /c && mkdir /c && touch /c/new
    fs::create_dir(up.join("c")).unwrap();
    set_xattr(&up.join("c"), "trusted.overlay.opaque", b"y");
    write(&up.join("c/new"), "new");
    // deleting a file inside a kept directory
    fs::create_dir(up.join("d")).unwrap();
    mknod_whiteout(&up.join("d/gone"));
    // a directory that is not opaque ("x" means: has xattr whiteouts, not opaque)
    fs::create_dir(up.join("e")).unwrap();
    set_xattr(&up.join("e"), "user.overlay.opaque", b"x");
    // overlay's own bookkeeping xattrs never leak
    set_xattr(&up.join("d"), "user.overlay.impure", b"y");
    // rm -rf /stacker is excluded too
    mknod_whiteout(&up.join("stacker"));

    let bytes = tar_of(&up, &LayerTarOptions::overlay_upper().exclude("/stacker"));
    let entries = read_tar(&bytes);
    assert_eq!(
        names(&entries),
        vec![
            ".wh.a",
            "b/",
            "b/.wh..wh..opq",
            "c/",
            "c/.wh..wh..opq",
            "c/new",
            "d/",
            "d/.wh.gone",
            "e/"
        ]
    );
    for wh in [".wh.a", "b/.wh..wh..opq", "c/.wh..wh..opq", "d/.wh.gone"] {
        let e = get(&entries, wh);
        assert_eq!(e.kind, tar::EntryType::Regular, "{wh}");
        assert!(e.data.is_empty());
    }
    assert!(get(&entries, "d/").xattrs.is_empty());

    // Without overlay conventions the same tree is taken literally.
    let plain = read_tar(&tar_of(&up, &LayerTarOptions::whole_dir()));
    let a = get(&plain, "a");
    assert_eq!((a.kind, a.dev), (tar::EntryType::Char, (0, 0)));
    assert!(!names(&plain).iter().any(|n| n.contains(".wh.")));
}

#[test]
fn whiteout_shapes_from_a_real_overlay_mount() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, work, merged) = (
        tmp.path().join("lower"),
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("merged"),
    );
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    for dir in ["a", "b", "c", "keep"] {
        write(&lower.join(dir).join("old"), "old");
    }
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .arg(&merged)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount overlayfs here");
        return;
    }
    let m = |p: &str| merged.join(p);
    fs::remove_dir_all(m("a")).unwrap();
    fs::remove_dir_all(m("b")).unwrap();
    fs::create_dir(m("b")).unwrap();
    fs::remove_dir_all(m("c")).unwrap();
    fs::create_dir(m("c")).unwrap();
    write(&m("c/new"), "new");
    fs::remove_file(m("keep/old")).unwrap();
    let _ = Command::new("umount").arg(&merged).status();

    let entries = read_tar(&tar_of(&upper, &LayerTarOptions::overlay_upper()));
    assert_eq!(
        names(&entries),
        vec![
            ".wh.a",
            "b/",
            "b/.wh..wh..opq",
            "c/",
            "c/.wh..wh..opq",
            "c/new",
            "keep/",
            "keep/.wh.old"
        ]
    );

    // Applying lower + captured change gives what the merged view showed.
    let target = tmp.path().join("target");
    fs::create_dir(&target).unwrap();
    let base = tar_of(&lower, &LayerTarOptions::whole_dir());
    apply_layer(&base[..], &target, &apply_opts()).unwrap();
    let change = tar_of(&upper, &LayerTarOptions::overlay_upper());
    apply_layer(&change[..], &target, &apply_opts()).unwrap();
    let got: Vec<String> = tree(&target).into_keys().collect();
    assert_eq!(got, vec!["b", "c", "c/new", "keep"]);
}

// ---------------------------------------------------------------------------------
// Applying layers

#[test]
fn applying_four_layers_with_whiteouts() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let layer = |name: &str, build: &dyn Fn(&Path)| -> Vec<u8> {
        let d = tmp.path().join(name);
        fs::create_dir(&d).unwrap();
        build(&d);
        tar_of(&d, &LayerTarOptions::overlay_upper())
    };
    let l1 = layer("l1", &|d| {
        write(&d.join("etc/os-release"), "v1");
        write(&d.join("etc/passwd"), "root");
        write(&d.join("usr/lib/a.so"), "a");
        write(&d.join("usr/lib/b.so"), "b");
        write(&d.join("var/cache/x/1"), "1");
        write(&d.join("opt/app/data/old"), "old");
        symlink("usr/lib", d.join("lib")).unwrap();
        fs::set_permissions(d.join("usr/lib/a.so"), fs::Permissions::from_mode(0o755)).unwrap();
    });
    let l2 = layer("l2", &|d| {
        fs::create_dir_all(d.join("usr/lib")).unwrap();
        mknod_whiteout(&d.join("usr/lib/b.so")); // rm /usr/lib/b.so
        mknod_whiteout(&d.join("var")); // rm -rf /var
        write(&d.join("etc/os-release"), "v2"); // modify
        fs::create_dir_all(d.join("opt/app/data")).unwrap(); // rm -rf data && mkdir data
        set_xattr(&d.join("opt/app/data"), "user.overlay.opaque", b"y");
        write(&d.join("opt/app/data/new"), "new");
    });
    let l3 = layer("l3", &|d| {
        write(&d.join("var/cache/y"), "y"); // /var back, fresh
        fs::create_dir(d.join("etc")).unwrap();
        mknod_whiteout(&d.join("etc/passwd"));
        write(&d.join("etc/shadow"), "s");
        fs::create_dir(d.join("lib")).unwrap(); // rm /lib (the symlink) && mkdir /lib
        set_xattr(&d.join("lib"), "user.overlay.opaque", b"y");
    });
    let l4 = layer("l4", &|d| {
        fs::create_dir_all(d.join("opt")).unwrap();
        mknod_whiteout(&d.join("opt/app")); // rm -rf /opt/app
        write(&d.join("opt/app2/run"), "run");
        fs::create_dir_all(d.join("usr/lib")).unwrap();
        mknod_whiteout(&d.join("usr/lib/a.so"));
        write(&d.join("usr/lib/a.so.2"), "a2");
    });
    let target = tmp.path().join("rootfs");
    fs::create_dir(&target).unwrap();
    for l in [&l1, &l2, &l3, &l4] {
        let stats = apply_layer(&l[..], &target, &apply_opts()).unwrap();
        assert_eq!(stats.diff_id, Digest::of(l));
    }
    expect_tree(
        &target,
        &[
            ("etc", "dir 755"),
            ("etc/os-release", "file 644 v2"),
            ("etc/shadow", "file 644 s"),
            ("lib", "dir 755"),
            ("opt", "dir 755"),
            ("opt/app2", "dir 755"),
            ("opt/app2/run", "file 644 run"),
            ("usr", "dir 755"),
            ("usr/lib", "dir 755"),
            ("usr/lib/a.so.2", "file 644 a2"),
            ("var", "dir 755"),
            ("var/cache", "dir 755"),
            ("var/cache/y", "file 644 y"),
        ],
    );
}

#[test]
fn apply_restores_metadata() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("bin/su"), "su");
    fs::set_permissions(src.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(src.join("ro")).unwrap();
    write(&src.join("ro/inside"), "i");
    fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::create_dir(src.join("tmp")).unwrap();
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    write(&src.join("owned"), "o");
    rustix::fs::chownat(
        rustix::fs::CWD,
        src.join("owned"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(100)),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    set_xattr(&src.join("owned"), "user.note", b"hello");
    fs::hard_link(src.join("owned"), src.join("owned2")).unwrap();
    symlink("bin/su", src.join("su-link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    for p in [
        "bin/su",
        "ro/inside",
        "owned",
        "ro",
        "tmp",
        "bin",
        "su-link",
    ] {
        set_mtime(&src.join(p), 1_234_567_890);
    }
    let layer = tar_of(&src, &LayerTarOptions::whole_dir());

    // Devices skipped by default.
    let t1 = tmp.path().join("t1");
    fs::create_dir(&t1).unwrap();
    let stats = apply_layer(&layer[..], &t1, &ApplyOptions::default()).unwrap();
    assert_eq!(stats.skipped, 1);
    assert!(!t1.join("null").exists());
    // Allowed when asked.
    let t2 = tmp.path().join("t2");
    fs::create_dir(&t2).unwrap();
    let opts = ApplyOptions {
        allow_devices: true,
        ..ApplyOptions::default()
    };
    apply_layer(&layer[..], &t2, &opts).unwrap();
    let null = fs::symlink_metadata(t2.join("null")).unwrap();
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));

    for t in [&t1, &t2] {
        let md = |p: &str| fs::symlink_metadata(t.join(p)).unwrap();
        assert_eq!(md("bin/su").mode() & 0o7777, 0o4755);
        assert_eq!(md("ro").mode() & 0o7777, 0o555);
        assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
        assert_eq!((md("owned").uid(), md("owned").gid()), (1000, 100));
        assert_eq!(md("owned").ino(), md("owned2").ino());
        assert_eq!(md("bin/su").mtime(), 1_234_567_890);
        assert_eq!(md("ro").mtime(), 1_234_567_890);
        assert_eq!(md("su-link").mtime(), 1_234_567_890);
        assert_eq!(
            fs::read_link(t.join("su-link")).unwrap(),
            Path::new("bin/su")
        );
        let v = rustix::fs::lgetxattr(t.join("owned"), "user.note", &mut [0u8; 16][..]).unwrap();
        assert_eq!(v, 5);
    }
    // Round trip: writing the extracted tree gives the same layer.
    fs::remove_file(t2.join("null")).unwrap();
    fs::remove_file(src.join("null")).unwrap();
    assert_eq!(
        tar_of(&t2, &LayerTarOptions::whole_dir()),
        tar_of(&src, &LayerTarOptions::whole_dir())
    );
}

#[test]
fn opaque_marker_after_new_entries_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    fs::create_dir(&t).unwrap();
    let lower = raw_tar(&[
        Raw::Dir("d"),
        Raw::File("d/old", "old"),
        Raw::Dir("d/sub"),
        Raw::File("d/sub/x", "x"),
        Raw::File("keep", "k"),
    ]);
    apply_layer(&lower[..], &t, &apply_opts()).unwrap();
    // Marker after the layer's own entries (other tools' ordering), a same-layer
    // whiteout that must not remove what the layer wrote, and one for a lower file.
    let upper = raw_tar(&[
        Raw::Dir("d"),
        Raw::File("d/-new", "n"),
        Raw::File("d/sub/y", "y"),
        Raw::File("d/.wh..wh..opq", ""),
        Raw::File("d/.wh.-new", ""),
        Raw::File(".wh.keep", ""),
        Raw::File(".wh.never-existed", ""),
    ]);
    let stats = apply_layer(&upper[..], &t, &apply_opts()).unwrap();
    assert_eq!(stats.opaque_dirs, 1);
    let got: Vec<String> = tree(&t).into_keys().collect();
    assert_eq!(got, vec!["d", "d/-new", "d/sub", "d/sub/y"]);
}

#[test]
fn apply_reads_gzip_and_zstd() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("a/b"), "content");
    let plain = tar_of(&src, &LayerTarOptions::whole_dir());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    for (i, input) in [plain.clone(), gz, zst].into_iter().enumerate() {
        let t = tmp.path().join(format!("t{i}"));
        fs::create_dir(&t).unwrap();
        let stats = apply_layer(&input[..], &t, &apply_opts()).unwrap();
        assert_eq!(stats.diff_id, Digest::of(&plain));
        assert_eq!(fs::read_to_string(t.join("a/b")).unwrap(), "content");
    }
}

// ---------------------------------------------------------------------------------
// Malicious layers

/// Build a tar from raw entries, bypassing the tar crate's path checks.
enum Raw<'a> {
    File(&'a str, &'a str),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
}

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let (path, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            Raw::File(p, c) => (p, tar::EntryType::Regular, c.as_bytes(), None),
            Raw::Dir(p) => (p, tar::EntryType::Directory, b"", None),
            Raw::Symlink(p, t) => (p, tar::EntryType::Symlink, b"", Some(t)),
            Raw::Hardlink(p, t) => (p, tar::EntryType::Link, b"", Some(t)),
            Raw::Char(p, ma, mi) => {
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                (p, tar::EntryType::Char, b"", None)
            }
        };
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

struct Sandbox {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn sandbox() -> Sandbox {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    write(&outside.join("victim"), "original");
    Sandbox {
        _tmp: tmp,
        root,
        outside,
    }
}

impl Sandbox {
    fn apply(&self, tar: &[u8]) -> farm_image::Result<farm_image::ApplyStats> {
        apply_layer(tar, &self.root, &apply_opts())
    }

    /// Nothing outside the root was created or changed.
    fn outside_untouched(&self) {
        let entries: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            entries,
            vec![std::ffi::OsString::from("victim")],
            "outside dir changed"
        );
        assert_eq!(
            fs::read_to_string(self.outside.join("victim")).unwrap(),
            "original"
        );
        let parent_entries: Vec<_> = fs::read_dir(self.root.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut parent_entries = parent_entries;
        parent_entries.sort();
        assert_eq!(
            parent_entries,
            vec!["outside", "root"],
            "files appeared beside the root"
        );
    }
}

#[test]
fn malicious_dotdot_is_refused() {
    let s = sandbox();
    for p in [
        "../evil",
        "a/../../evil",
        "./../outside/victim",
        "a/b/../../../outside/victim",
    ] {
        let err = s.apply(&raw_tar(&[Raw::File(p, "pwned")])).unwrap_err();
        assert!(matches!(err, Error::UnsafeEntry { .. }), "{p}: {err}");
        s.outside_untouched();
    }
}

#[test]
fn malicious_absolute_paths_stay_inside() {
    let s = sandbox();
    let victim = s.outside.join("victim");
    let abs = victim.to_str().unwrap();
    s.apply(&raw_tar(&[
        Raw::File(abs, "pwned"),
        Raw::File("/etc/x", "x"),
    ]))
    .unwrap();
    s.outside_untouched();
    assert_eq!(
        fs::read_to_string(s.root.join(abs.trim_start_matches('/'))).unwrap(),
        "pwned"
    );
    assert_eq!(fs::read_to_string(s.root.join("etc/x")).unwrap(), "x");
}

#[test]
fn malicious_symlink_then_write_through_it() {
    let s = sandbox();
    let out = s.outside.to_str().unwrap().to_string();
    let rel_up = "../".repeat(12) + out.trim_start_matches('/');
    let tar = raw_tar(&[
        // Absolute symlink to the outside directory, then a file through it.
        Raw::Symlink("abs", &out),
        Raw::File("abs/victim", "pwned"),
        Raw::File("abs/new", "pwned"),
        // Relative symlink climbing out, then a file through it.
        Raw::Symlink("rel", &rel_up),
        Raw::File("rel/victim", "pwned"),
        // Symlink to a file outside, then the same name as a regular file.
        Raw::Symlink("f", &format!("{out}/victim")),
        Raw::File("f", "replaced"),
        // Parent symlink chain: d1 -> d2 -> /outside
        Raw::Symlink("d2", &out),
        Raw::Symlink("d1", "d2"),
        Raw::Dir("d1/sub"),
        Raw::File("d1/sub/z", "pwned"),
        // Symlink to "/" and dot-dot loops inside it.
        Raw::Symlink("slash", "/"),
        Raw::File("slash/../../top", "top"),
    ]);
    // "slash/../../top" has '..': refused, but everything before it was applied.
    let err = s.apply(&tar).unwrap_err();
    assert!(matches!(err, Error::UnsafeEntry { .. }), "{err}");
    s.outside_untouched();
    // Writes through symlinks landed inside the root, at the link's target read as if
    // the root were '/'.
    let inside = s.root.join(out.trim_start_matches('/'));
    assert_eq!(fs::read_to_string(inside.join("victim")).unwrap(), "pwned");
    assert_eq!(fs::read_to_string(inside.join("new")).unwrap(), "pwned");
    assert_eq!(fs::read_to_string(inside.join("sub/z")).unwrap(), "pwned");
    // The final component is never followed: "f" is now a regular file.
    assert!(fs::symlink_metadata(s.root.join("f")).unwrap().is_file());
    assert_eq!(fs::read_to_string(s.root.join("f")).unwrap(), "replaced");
}

#[test]
fn malicious_symlink_loops_fail_cleanly() {
    let s = sandbox();
    let tar = raw_tar(&[
        Raw::Symlink("a", "b"),
        Raw::Symlink("b", "a"),
        Raw::File("a/x", "x"),
    ]);
    assert!(s.apply(&tar).is_err());
    s.outside_untouched();
}

#[test]
fn malicious_hardlinks_are_refused() {
    let s = sandbox();
    let victim = s.outside.join("victim");
    let out = s.outside.to_str().unwrap();
    for tar in [
        raw_tar(&[Raw::Hardlink("h", "../outside/victim")]),
        raw_tar(&[Raw::Hardlink("h", "../../../../../../etc/passwd")]),
        // Absolute target: taken inside the root, where it does not exist.
        raw_tar(&[Raw::Hardlink("h", victim.to_str().unwrap())]),
        raw_tar(&[Raw::Hardlink("h", "/etc/passwd")]),
        // Through a symlink pointing outside: resolved inside, does not exist.
        raw_tar(&[Raw::Symlink("s", out), Raw::Hardlink("h", "s/victim")]),
        // To a directory.
        raw_tar(&[Raw::Dir("d"), Raw::Hardlink("h", "d")]),
    ] {
        let err = s.apply(&tar).unwrap_err();
        assert!(matches!(err, Error::UnsafeEntry { .. }), "{err}");
        s.outside_untouched();
        assert!(!s.root.join("h").exists());
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1);
    }
    // A hard link inside the root works.
    s.apply(&raw_tar(&[Raw::File("f", "data"), Raw::Hardlink("g", "f")]))
        .unwrap();
    assert_eq!(fs::read_to_string(s.root.join("g")).unwrap(), "data");
}

#[test]
fn malicious_device_nodes_and_whiteouts() {
    let s = sandbox();
    // Devices are skipped unless allowed.
    let stats = s
        .apply(&raw_tar(&[
            Raw::Char("dev/mem", 1, 1),
            Raw::Char("dev/sda", 8, 0),
        ]))
        .unwrap();
    assert_eq!(stats.skipped, 2);
    assert!(!s.root.join("dev/mem").exists());
    // Whiteouts cannot name '..' or climb out.
    for bad in [".wh..", ".wh...", "../.wh.victim"] {
        assert!(s.apply(&raw_tar(&[Raw::File(bad, "")])).is_err(), "{bad}");
    }
    // A whiteout of a path behind a symlink removes the path inside the root only.
    let out = s.outside.to_str().unwrap();
    s.apply(&raw_tar(&[Raw::Symlink("l", out)])).unwrap();
    s.apply(&raw_tar(&[Raw::File("l/.wh.victim", "")])).unwrap();
    s.outside_untouched();
    // Overlay xattrs in a layer are refused (they would change how a later overlay
    // mount reads the tree).
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.overlay.opaque", &b"y"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_path("odir/").unwrap();
    h.set_mode(0o755);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    s.apply(&b.into_inner().unwrap()).unwrap();
    let n = rustix::fs::lgetxattr(
        s.root.join("odir"),
        "user.overlay.opaque",
        &mut [0u8; 8][..],
    );
    assert!(n.is_err());
}

#[test]
fn garbage_input_is_an_error_not_a_panic() {
    let s = sandbox();
    for input in [
        &b"\x1f\x8bnot gzip at all"[..],
        b"\x28\xb5\x2f\xfdjunk",
        &[7u8; 1000][..],
        b"\xfd7zXZ\0",
    ] {
        assert!(s.apply(input).is_err());
    }
    // Truncated tar.
    let t = raw_tar(&[Raw::File("f", &"x".repeat(5000))]);
    assert!(s.apply(&t[..1000]).is_err());
    s.outside_untouched();
}

// ---------------------------------------------------------------------------------
// Export

fn sample_tree(root: &Path) {
    for i in 0..40 {
        write(
            &root.join(format!("dir{}/file{i}.txt", i % 5)),
            &format!("file {i} ").repeat(1000 + i * 357),
        );
    }
    let mut x: u64 = 42;
    let random: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(root.join("random.bin"), random).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    symlink("random.bin", root.join("link")).unwrap();
}

fn decompress_blob(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    farm_image::decompress(bytes)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_deterministic_and_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_tree(&src);
    let opts = LayerTarOptions::whole_dir().source_date_epoch(Some(1_700_000_000));
    let tar = tar_of(&src, &opts);
    for compression in [Compression::gzip(), Compression::zstd(), Compression::None] {
        let s1 = BlobStore::in_memory();
        let dir2 = tmp.path().join(format!("store-{compression:?}"));
        let s2 = BlobStore::from_url(&format!("file://{}", dir2.display())).unwrap();
        let e1 = export_dir(
            &s1,
            &src,
            &opts,
            &ExportOptions {
                compression,
                threads: 1,
            },
        )
        .await
        .unwrap();
        let e2 = export_dir(
            &s2,
            &src,
            &opts,
            &ExportOptions {
                compression,
                threads: 2,
            },
        )
        .await
        .unwrap();
        assert_eq!(e1, e2, "{compression:?}: same tree, same layer");
        assert_eq!(e1.media_type, compression.layer_media_type());
        assert_eq!(e1.diff_id, Digest::of(&tar));
        assert_eq!(e1.tar_size, tar.len() as u64);
        // The stored blob has the announced digest and size and decompresses to the tar.
        let blob = s2.get_bytes(&e1.digest).await.unwrap();
        assert_eq!(blob.len() as u64, e1.size);
        assert_eq!(Digest::of(&blob), e1.digest);
        let back = decompress_blob(&blob);
        assert_eq!(Digest::of(&back), e1.diff_id);
        // The file store is laid out like an OCI layout's blobs directory.
        assert!(dir2.join(e1.digest.blob_path()).is_file());
        // Exporting the same tar bytes from a pipe-like reader gives the same layer.
        let e3 = export_tar_stream(
            &s1,
            std::io::Cursor::new(tar.clone()),
            &ExportOptions::new(compression),
        )
        .await
        .unwrap();
        assert_eq!(e3, e1);
        // And re-exporting into a store that already has the blob is fine.
        let e4 = export_dir(&s2, &src, &opts, &ExportOptions::new(compression))
            .await
            .unwrap();
        assert_eq!(e4, e1);
    }
    // The CLI tools agree with our gzip and zstd streams.
    let s = BlobStore::in_memory();
    for (c, tool) in [(Compression::gzip(), "gzip"), (Compression::zstd(), "zstd")] {
        let e = export_dir(&s, &src, &opts, &ExportOptions::new(c))
            .await
            .unwrap();
        let blob = s.get_bytes(&e.digest).await.unwrap();
        let f = tmp.path().join(format!("blob.{tool}"));
        fs::write(&f, &blob).unwrap();
        if let Ok(out) = Command::new(tool).arg("-dc").arg(&f).output() {
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(Digest::of(&out.stdout), e.diff_id, "{tool}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_from_a_real_pipe_and_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_tree(&src);
    // A child process writes the tar to a pipe, as the capture process does.
    let mut child = Command::new("tar")
        .args(["-C"])
        .arg(&src)
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = child.stdout.take().unwrap();
    let store = BlobStore::in_memory();
    let e = export_tar_stream(&store, pipe, &ExportOptions::default())
        .await
        .unwrap();
    assert!(child.wait().unwrap().success());
    let blob = store.get_bytes(&e.digest).await.unwrap();
    assert_eq!(Digest::of(&decompress_blob(&blob)), e.diff_id);

    // A producer failure stores nothing.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("capture died"));
            }
            self.0 -= 1;
            buf.fill(7);
            Ok(buf.len())
        }
    }
    let store = BlobStore::in_memory();
    let err = export_tar_stream(&store, Failing(200), &ExportOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("capture died"), "{err}");
    let listed = futures::StreamExt::collect::<Vec<_>>(store.object_store().list(None)).await;
    assert!(listed.is_empty(), "{listed:?}");
    // A missing directory is an error.
    assert!(
        export_dir(
            &store,
            &tmp.path().join("nope"),
            &LayerTarOptions::default(),
            &ExportOptions::default()
        )
        .await
        .is_err()
    );
}

// ---------------------------------------------------------------------------------
// OCI layouts

async fn build_image(
    layout: &OciLayout,
    src: &Path,
    labels: &[(&str, &str)],
    arch: &str,
) -> Descriptor {
    let layer = export_dir(
        layout.blobs(),
        src,
        &LayerTarOptions::whole_dir().source_date_epoch(Some(1_700_000_000)),
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let config = ImageConfigurationBuilder::default()
        .architecture(arch)
        .os("linux")
        .created("2023-11-14T22:13:20Z")
        .config(
            ConfigBuilder::default()
                .env(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                ])
                .cmd(vec!["/bin/sh".to_string()])
                .labels(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .build()
                .unwrap(),
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer.diff_id.to_string()])
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let config_desc = layout.put_config(&config).await.unwrap();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer.descriptor().unwrap()])
        .annotations(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()
        .unwrap();
    layout.put_manifest(&manifest).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layout_tags_platforms_and_reproducibility() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("bin/hello"), "#!/bin/sh\necho hello\n");
    fs::set_permissions(src.join("bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&src.join("etc/motd"), "hi");

    let labels: Vec<(String, String)> = (0..30)
        .map(|i| (format!("label.{i}"), format!("v{i}")))
        .collect();
    let fwd: Vec<(&str, &str)> = labels
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let rev: Vec<(&str, &str)> = fwd.iter().rev().cloned().collect();

    let dir = tmp.path().join("layout");
    let layout = OciLayout::create(&dir).await.unwrap();
    let amd = build_image(&layout, &src, &fwd, "amd64").await;
    // Same inputs (labels inserted in another order, different HashMap seeds): same bytes.
    let dir_b = tmp.path().join("layout-b");
    let layout_b = OciLayout::create(&dir_b).await.unwrap();
    let amd_b = build_image(&layout_b, &src, &rev, "amd64").await;
    assert_eq!(amd.digest(), amd_b.digest());
    assert_eq!(amd.size(), amd_b.size());

    layout.set_tag("first", &amd).await.unwrap();
    layout.set_tag("zz:tag:with:colons", &amd).await.unwrap();
    let arm = build_image(&layout, &src, &fwd, "arm64").await;
    layout.set_tag("first", &arm).await.unwrap(); // replace
    layout.set_tag("arm", &arm).await.unwrap();
    assert_eq!(
        layout.tags().await.unwrap(),
        vec!["arm", "first", "zz:tag:with:colons"]
    );
    // index.json keeps the order tags were set in (a replaced tag goes last), as
    // stacker's layouts do.
    let order = |index: &farm_image::oci::ImageIndex| -> Vec<String> {
        index
            .manifests()
            .iter()
            .map(|d| d.annotations().as_ref().unwrap()[farm_image::REF_NAME_ANNOTATION].clone())
            .collect()
    };
    assert_eq!(
        order(&layout.index().await.unwrap()),
        vec!["zz:tag:with:colons", "first", "arm"]
    );
    layout
        .set_tags(&[("b".into(), amd.clone()), ("a".into(), arm.clone())])
        .await
        .unwrap();
    assert_eq!(
        order(&layout.index().await.unwrap()),
        vec!["zz:tag:with:colons", "first", "arm", "b", "a"]
    );
    layout.remove_tag("a").await.unwrap();
    layout.remove_tag("b").await.unwrap();
    let (d, m) = layout.manifest("first", None).await.unwrap();
    assert_eq!(d.digest(), arm.digest());
    assert_eq!(
        layout.config(&m).await.unwrap().architecture().to_string(),
        "arm64"
    );
    assert!(matches!(
        layout.manifest("nope", None).await,
        Err(Error::TagNotFound { .. })
    ));
    assert!(layout.remove_tag("arm").await.unwrap());
    assert!(!layout.remove_tag("arm").await.unwrap());

    // Multi-platform index.
    let with_platform = |d: &Descriptor, arch: &str| {
        let mut d = d.clone();
        d.set_platform(Some(
            PlatformBuilder::default()
                .os("linux")
                .architecture(arch)
                .build()
                .unwrap(),
        ));
        d
    };
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![
            with_platform(&amd, "amd64"),
            with_platform(&arm, "arm64"),
        ])
        .build()
        .unwrap();
    let idx = layout.put_index(&index).await.unwrap();
    layout.set_tag("multi", &idx).await.unwrap();
    let (d, _) = layout
        .manifest("multi", Some(("linux", "arm64")))
        .await
        .unwrap();
    assert_eq!(d.digest(), arm.digest());
    let (d, _) = layout
        .manifest("multi", Some(("linux", "amd64")))
        .await
        .unwrap();
    assert_eq!(d.digest(), amd.digest());
    let err = layout
        .manifest("multi", Some(("linux", "s390x")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PlatformNotFound { .. }), "{err}");
    assert!(layout.manifest("multi", None).await.is_err());

    // A tag must point at a stored blob.
    let mut bogus = amd.clone();
    bogus.set_digest(Digest::of(b"missing").to_oci());
    assert!(layout.set_tag("bogus", &bogus).await.is_err());

    // index.json is canonical.
    let raw = fs::read(dir.join("index.json")).unwrap();
    let index = layout.index().await.unwrap();
    assert_eq!(to_canonical_json(&index).unwrap(), raw);
    assert!(fs::read_dir(&dir).unwrap().all(|e| {
        let n = e.unwrap().file_name();
        ["blobs", "index.json", "oci-layout"].contains(&n.to_str().unwrap())
    }));

    // Re-opening works and rejects non-layouts.
    OciLayout::open(&dir).await.unwrap();
    assert!(OciLayout::open(tmp.path()).await.is_err());

    // External tools accept the layouts: skopeo and umoci the multi-tag one;
    // oci-image-tool (1.0.0-rc, whose `--ref` filter mishandles several tags) a layout
    // with one tag.
    external_tools_accept(&dir, "first", "arm64", false);
    layout_b.set_tag("latest", &amd_b).await.unwrap();
    external_tools_accept(&dir_b, "latest", "amd64", true);
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--help").output().is_ok()
}

fn external_tools_accept(dir: &Path, tag: &str, arch: &str, oci_image_tool: bool) {
    if !oci_image_tool {
    } else if have("oci-image-tool") {
        let out = Command::new("oci-image-tool")
            .args([
                "validate",
                "--type",
                "image",
                "--ref",
                &format!("name={tag}"),
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "oci-image-tool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("SKIPPED: oci-image-tool not installed");
    }
    if have("skopeo") {
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:{tag}", dir.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["Architecture"], arch);
    } else {
        eprintln!("SKIPPED: skopeo not installed");
    }
    if have("umoci") {
        let bundle = dir.parent().unwrap().join(format!("bundle-{arch}"));
        let mut cmd = Command::new("umoci");
        cmd.arg("unpack");
        if !is_root() {
            cmd.arg("--rootless");
        }
        let out = cmd
            .arg("--image")
            .arg(format!("{}:{tag}", dir.display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "umoci: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            fs::read_to_string(bundle.join("rootfs/etc/motd")).unwrap(),
            "hi"
        );
    } else {
        eprintln!("SKIPPED: umoci not installed");
    }
}

// ---------------------------------------------------------------------------------------
// extraction limits
// ---------------------------------------------------------------------------------------

fn gzip(raw: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(raw).unwrap();
    gz.finish().unwrap()
}

/// Write `n` as the NUL-terminated octal number of a 12-byte tar field.
fn octal12(field: &mut [u8; 12], n: u64) {
    let s = format!("{n:011o}\0");
    field.copy_from_slice(s.as_bytes());
}

/// A `.tar.gz` holding one GNU sparse file `big` of `logical` bytes that is all hole: its
/// header lists no data, only a zero-length block at the end.
fn sparse_bomb(logical: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path("big").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(0); // bytes stored in the archive
    {
        let gnu = h.as_gnu_mut().unwrap();
        octal12(&mut gnu.realsize, logical);
        octal12(&mut gnu.sparse[0].offset, logical);
        octal12(&mut gnu.sparse[0].numbytes, 0);
    }
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(&[0u8; 1024]); // end of archive
    gzip(&raw)
}

fn limited(max_bytes: u64, max_entries: u64) -> ApplyOptions {
    ApplyOptions {
        max_bytes,
        max_entries,
        ..apply_opts()
    }
}

#[test]
fn a_sparse_bomb_is_refused_at_its_logical_size_before_anything_is_written() {
    let bomb = sparse_bomb(1 << 30);
    assert!(bomb.len() < 200, "{} bytes", bomb.len());
    let dir = tempfile::tempdir().unwrap();
    let err = apply_layer(&bomb[..], dir.path(), &limited(512 << 20, 1000)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: 536870912,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("sparse files at their full size") && msg.contains("536870912"),
        "{msg}"
    );
    assert!(!dir.path().join("big").exists(), "nothing was written");
}

#[test]
fn a_sparse_file_within_the_limits_stays_a_hole() {
    // With the default limits (64 GiB) the 1 GiB file is extracted, but its zeros are
    // not written: the disk holds next to nothing.
    let bomb = sparse_bomb(1 << 30);
    let dir = tempfile::tempdir().unwrap();
    apply_layer(&bomb[..], dir.path(), &apply_opts()).unwrap();
    let meta = fs::metadata(dir.path().join("big")).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
}

#[test]
fn too_many_entries_are_refused() {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..1001 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("f{i}"), &[][..]).unwrap();
    }
    let layer = gzip(&b.into_inner().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let err = apply_layer(&layer[..], dir.path(), &limited(1 << 30, 1000)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                what: "number of entries",
                limit: 1000,
                ..
            }
        ),
        "{err}"
    );
    assert!(dir.path().join("f999").exists());
    assert!(!dir.path().join("f1000").exists());
    // At the limit it applies.
    let dir = tempfile::tempdir().unwrap();
    apply_layer(&layer[..], dir.path(), &limited(1 << 30, 1001)).unwrap();
}

#[test]
fn an_uncompressed_stream_over_the_limit_is_refused() {
    // A 4 MiB GNU long name: the tar reader buffers it before any entry is seen, so only
    // the stream's own limit stops it.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_path("././@LongLink").unwrap();
    let name = vec![b'a'; 4 << 20];
    h.set_size(name.len() as u64);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(&name);
    raw.extend_from_slice(&[0u8; 1024]);
    let layer = gzip(&raw);
    let dir = tempfile::tempdir().unwrap();
    let err = apply_layer(&layer[..], dir.path(), &limited(1 << 20, 1000)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                what: "uncompressed size",
                ..
            }
        ),
        "{err}"
    );
}

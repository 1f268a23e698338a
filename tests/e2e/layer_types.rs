//! stacker's squashfs and erofs layer types (`--layer-type`), rewritten from stacker's
//! squashfs, erofs, multiple-output-types and build-only tests with fixtures of our
//! own: built rootless by the unprivileged e2e user, checked with the real tools
//! (unsquashfs, fsck.erofs, veritysetup).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::util::{Oci, TestDir, Who, e2e, output_ok, which};

const STACKERFILE: &str = "\
base:
  from:
    type: oci
    url: ${{BUSYBOX_OCI}}:busybox
  build_env:
    SOURCE_DATE_EPOCH: \"1700000000\"
  run: |
    mkdir -p /etc/app
    echo hello > /etc/app/greeting
    chmod 0640 /etc/app/greeting
    chown 1:2 /etc/app/greeting
    ln -s greeting /etc/app/link
only-for-building:
  from:
    type: built
    tag: base
  build_only: true
  build_env:
    SOURCE_DATE_EPOCH: \"1700000000\"
  run: echo middle > /middle
top:
  from:
    type: built
    tag: only-for-building
  build_env:
    SOURCE_DATE_EPOCH: \"1700000000\"
  run: |
    cat /etc/app/greeting /middle > /top
";

fn tools() -> bool {
    [
        "unsquashfs",
        "fsck.erofs",
        "veritysetup",
        "mksquashfs",
        "mkfs.erofs",
    ]
    .iter()
    .all(|t| which(t).is_some())
}

/// The last layer of TAG: (media type, digest, root-hash annotation).
fn top_layer(oci: &Oci, tag: &str) -> (String, String, Option<String>) {
    let m = oci.manifest(tag);
    let l = m["layers"].as_array().unwrap().last().unwrap().clone();
    (
        l["mediaType"].as_str().unwrap().to_string(),
        l["digest"].as_str().unwrap().to_string(),
        l["annotations"]["io.stackeroci.stacker.atomfs_verity_root_hash"]
            .as_str()
            .map(str::to_string),
    )
}

/// Where the verity superblock ("verity\0\0") starts: the first 4 KiB block that has it.
fn verity_offset(bytes: &[u8]) -> u64 {
    (0..bytes.len())
        .step_by(4096)
        .find(|&o| bytes[o..].starts_with(b"verity\0\0"))
        .expect("verity superblock") as u64
}

/// `veritysetup verify` of the image file against `root` (true when it verifies).
fn verity_verifies(file: &Path, root: &str) -> bool {
    let offset = verity_offset(&fs::read(file).unwrap());
    Command::new(which("veritysetup").unwrap())
        .arg("verify")
        .arg(file)
        .arg(file)
        .arg(root)
        .arg(format!("--hash-offset={offset}"))
        .status()
        .unwrap()
        .success()
}

/// Unpack a squashfs/erofs image with the distribution's tools; returns the tree.
fn unpack_image(kind: &str, file: &Path, dest: &Path) -> PathBuf {
    match kind {
        "squashfs" => output_ok(
            Command::new("unsquashfs")
                .args(["-n", "-d"])
                .arg(dest)
                .arg(file),
        ),
        _ => output_ok(
            Command::new("fsck.erofs")
                .arg(format!("--extract={}", dest.display()))
                .arg(file),
        ),
    };
    dest.to_path_buf()
}

/// path -> (kind, mode, uid, gid, content or link target) of a tree.
fn tree(root: &Path) -> BTreeMap<String, (char, u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, u32, u32, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let (kind, data) = if m.file_type().is_symlink() {
                (
                    'l',
                    fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .as_bytes()
                        .to_vec(),
                )
            } else if m.is_dir() {
                walk(root, &p, out);
                ('d', Vec::new())
            } else {
                ('f', fs::read(&p).unwrap())
            };
            let mode = if kind == 'l' {
                0
            } else {
                m.permissions().mode() & 0o7777
            };
            out.insert(rel, (kind, mode, m.uid(), m.gid(), data));
        }
    }
    walk(root, root, &mut out);
    out
}

/// The same tree from the tar layer (the image farm has always written).
fn tar_tree(oci: &Oci, tag: &str) -> BTreeMap<String, (char, u32, u32, u32, Vec<u8>)> {
    let layers = oci.layers(tag);
    layers
        .last()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = match e.kind {
                tar::EntryType::Directory => 'd',
                tar::EntryType::Symlink => 'l',
                _ => 'f',
            };
            let data = match kind {
                'l' => e.link.clone().unwrap().into_bytes(),
                'f' => e.data.clone(),
                _ => Vec::new(),
            };
            let mode = if kind == 'l' { 0 } else { e.mode & 0o7777 };
            (
                e.path.trim_end_matches('/').to_string(),
                (kind, mode, e.uid as u32, e.gid as u32, data),
            )
        })
        .collect()
}

/// One build writes tar, squashfs and erofs images of every layer, tagged as stacker
/// tags them; each filesystem layer carries stacker's media type and the verity root
/// hash `veritysetup verify` accepts; its content unpacked equals the tar layer's; a
/// layer built on a squashfs/erofs base (through a build_only one) unpacked that base
/// on the worker; and a second build from scratch gives the same digests.
#[test]
fn squashfs_and_erofs_layers_as_stacker_writes_them() {
    let Some(e) = e2e() else { return };
    if !tools() {
        eprintln!("skipped: squashfs-tools, erofs-utils or cryptsetup-bin missing");
        return;
    }
    let t = TestDir::new(e, "layer-types", Who::User);
    t.write("stacker.yaml", STACKERFILE);
    let types = [
        "--layer-type",
        "tar",
        "--layer-type",
        "squashfs",
        "--layer-type",
        "erofs",
    ];
    t.build(&types).assert_ok();
    let oci = t.oci();
    let tags: Vec<String> = oci.tag_names().into_iter().collect();
    assert_eq!(
        tags,
        [
            "base",
            "base-erofs",
            "base-squashfs",
            "top",
            "top-erofs",
            "top-squashfs"
        ]
    );
    let scratch = t.join("check");
    fs::create_dir_all(&scratch).unwrap();
    for kind in ["squashfs", "erofs"] {
        for tag in ["base", "top"] {
            let typed = format!("{tag}-{kind}");
            let (media, digest, root) = top_layer(&oci, &typed);
            let prefix = format!("application/vnd.stacker.image.layer.{kind}+");
            assert!(media.starts_with(&prefix), "{media}");
            assert!(media.ends_with("+verity"), "{media}");
            // stacker names the blob itself in the config's diff_ids.
            let cfg = oci.config(&typed);
            let diff_ids = cfg["rootfs"]["diff_ids"].as_array().unwrap();
            assert_eq!(diff_ids.last().unwrap().as_str().unwrap(), digest);
            let file = scratch.join(format!("{typed}.img"));
            fs::write(&file, oci.blob(&digest)).unwrap();
            let root = root.expect("a verity root hash annotation");
            assert!(verity_verifies(&file, &root), "{typed}: {root}");
            let wrong = format!(
                "{}{}",
                if root.starts_with('0') { "1" } else { "0" },
                &root[1..]
            );
            assert!(!verity_verifies(&file, &wrong));
            let unpacked = unpack_image(kind, &file, &scratch.join(&typed));
            let mut got = tree(&unpacked);
            got.retain(|p, _| !p.starts_with("stacker"));
            let want = tar_tree(&oci, tag);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{typed}"
            );
            for (p, w) in &want {
                let g = &got[p];
                // Contents, kinds and owners; modes of files and links.
                assert_eq!((g.0, g.2, g.3, &g.4), (w.0, w.2, w.3, &w.4), "{typed} {p}");
                if w.0 == 'f' {
                    assert_eq!(g.1, w.1, "{typed} {p} mode");
                }
            }
        }
        // top stood on the filesystem layers of base and only-for-building.
        let unpacked = scratch.join(format!("top-{kind}"));
        assert_eq!(
            fs::read_to_string(unpacked.join("top")).unwrap(),
            "hello\nmiddle\n"
        );
        assert_eq!(oci.layer_digests(&format!("top-{kind}")).len(), 4);
    }
    let greeting = &tar_tree(&oci, "base")["etc/app/greeting"];
    assert_eq!((greeting.1, greeting.2, greeting.3), (0o640, 1, 2));

    // Reproducible: a second build with its own state and no cache gives the same
    // digests for every type.
    let state2 = t.join("state2");
    let out2 = t.join("oci2");
    let mut args: Vec<&str> = vec!["--no-cache"];
    args.extend(types);
    let again = t.farm_env(&t.build_args_at(&state2, &out2, &args), &[]);
    again.assert_ok();
    let oci2 = Oci::new(&out2);
    for tag in &tags {
        assert_eq!(
            oci.layer_digests(tag),
            oci2.layer_digests(tag),
            "{tag} differs between two builds"
        );
    }
}

/// A squashfs base whose blob was altered (and its digests rewritten to match, so only
/// the verity root hash can tell) is refused before it is unpacked; the untouched one
/// builds.
#[test]
fn a_tampered_squashfs_base_is_refused() {
    let Some(e) = e2e() else { return };
    if !tools() {
        eprintln!("skipped: squashfs-tools, erofs-utils or cryptsetup-bin missing");
        return;
    }
    let t = TestDir::new(e, "layer-types-tamper", Who::User);
    t.write(
        "stacker.yaml",
        "base:\n  from:\n    type: oci\n    url: ${{BUSYBOX_OCI}}:busybox\n  run: echo data > /data\n",
    );
    t.build(&["--layer-type", "squashfs"]).assert_ok();
    let oci = t.oci();
    assert_eq!(
        oci.tag_names().into_iter().collect::<Vec<_>>(),
        ["base-squashfs"]
    );
    let child =
        "child:\n  from:\n    type: oci\n    url: OUT:base-squashfs\n  run: cat /data > /copy\n"
            .replace("OUT", &t.out.display().to_string());
    fs::create_dir_all(t.join("child")).unwrap();
    t.write("child/stacker.yaml", &child);
    let child_args = |out: &str| {
        let mut a = t.build_args_at(
            &t.join("state-child"),
            &t.join(out),
            &["--layer-type", "squashfs"],
        );
        a.extend([
            "-f".to_string(),
            t.join("child/stacker.yaml").display().to_string(),
        ]);
        a
    };
    t.farm_env(&child_args("oci-child"), &[]).assert_ok();

    // publish --layer-type squashfs: NAME-squashfs of the layout as NAME_TAG-squashfs
    // (stacker's names in an oci: destination).
    let published = t.join("published");
    let publish = |types: &[&str]| {
        let mut a: Vec<String> = ["publish", "-f"].iter().map(|s| s.to_string()).collect();
        a.push(t.join("stacker.yaml").display().to_string());
        a.extend(["--oci-dir".to_string(), t.out.display().to_string()]);
        a.extend(["--url".to_string(), format!("oci:{}", published.display())]);
        a.extend(["--tag".to_string(), "t1".to_string()]);
        a.extend([
            "--substitute".to_string(),
            format!("BUSYBOX_OCI={}", e.busybox_oci.display()),
        ]);
        a.extend(types.iter().map(|s| s.to_string()));
        t.farm_env(&a, &[])
    };
    publish(&["--layer-type", "squashfs"]).assert_ok();
    assert_eq!(
        Oci::new(&published)
            .tag_names()
            .into_iter()
            .collect::<Vec<_>>(),
        ["base_t1-squashfs"]
    );
    assert_eq!(
        Oci::new(&published).manifest_digest("base_t1-squashfs"),
        oci.manifest_digest("base-squashfs")
    );
    // No tar image was built: publishing one says how to build it.
    let r = publish(&[]);
    assert!(!r.status.success(), "{}", r.describe());
    r.assert_stderr_contains("no image 'base'");

    // Alter one byte of the squashfs layer and make every digest agree again.
    let (_, digest, _) = top_layer(&oci, "base-squashfs");
    let mut blob = oci.blob(&digest);
    blob[2000] ^= 0xff;
    let new_digest = put_blob(&oci, &blob);
    let mut manifest = oci.manifest("base-squashfs");
    let mut config = oci.config("base-squashfs");
    for l in manifest["layers"].as_array_mut().unwrap() {
        if l["digest"] == digest.as_str() {
            l["digest"] = Value::String(new_digest.clone());
        }
    }
    for d in config["rootfs"]["diff_ids"].as_array_mut().unwrap() {
        if d == digest.as_str() {
            *d = Value::String(new_digest.clone());
        }
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = Value::String(put_blob(&oci, &config_bytes));
    manifest["config"]["size"] = Value::from(config_bytes.len());
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put_blob(&oci, &manifest_bytes);
    let index_path = t.out.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    for m in index["manifests"].as_array_mut().unwrap() {
        m["digest"] = Value::String(manifest_digest.clone());
        m["size"] = Value::from(manifest_bytes.len());
    }
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    t.chown_all();

    let r = t.farm_env(&child_args("oci-child2"), &[]);
    assert!(!r.status.success(), "{}", r.describe());
    r.assert_stderr_contains("does not match its dm-verity root hash");
}

/// Write `bytes` as a blob of the layout; returns its digest.
fn put_blob(oci: &Oci, bytes: &[u8]) -> String {
    let hex = hex::encode(Sha256::digest(bytes));
    fs::write(oci.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{hex}")
}

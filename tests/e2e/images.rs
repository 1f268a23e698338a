//! Issue 14: the farm image, built by farm from an mmdebstrap root filesystem
//! (deploy/images/build.sh). Needs mmdebstrap and Debian's package mirror, and takes a
//! minute or more, so it runs only with FARM_IMAGE_TEST=1 (.ci/run sets it and installs
//! mmdebstrap). It uses the farm binary under test (a debug build here, so the image
//! is larger than a release one); FARM_IMAGE_BINARY=PATH puts another in the image.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::util::{E2E_DIR, cannot_run, farm_bin, is_root, output_ok, which};

#[test]
fn the_farm_image_builds_validates_and_runs_as_farm_with_split_ranges() {
    if std::env::var("FARM_IMAGE_TEST").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: the image test runs with FARM_IMAGE_TEST=1 (it downloads Debian packages)"
        );
        return;
    }
    if !is_root() {
        let _: Option<()> = cannot_run("the image test runs as root (mmdebstrap, umoci unpack)");
        return;
    }
    for tool in ["mmdebstrap", "umoci", "skopeo", "oci-image-tool"] {
        if which(tool).is_none() {
            let _: Option<()> = cannot_run(&format!("{tool} is not installed"));
            return;
        }
    }
    let d = tempfile::tempdir().unwrap();
    with_farm_image(|layout| check_image(layout, d.path()));
}

/// The image's checks, on its layout (`tag farm`), with scratch space in `d`.
fn check_image(layout: &Path, d: &Path) {
    // A single-image copy validates as an OCI image.
    let single = d.join("single");
    output_ok(Command::new("skopeo").args([
        "copy".to_string(),
        "--quiet".into(),
        format!("oci:{}:farm", layout.display()),
        format!("oci:{}:farm", single.display()),
    ]));
    let valid = output_ok(
        Command::new("oci-image-tool")
            .args(["validate", "--type", "image", "--ref", "name=farm"])
            .arg(&single),
    );
    assert!(valid.contains("Validation succeeded"), "{valid}");
    // Sizes, for the record.
    let manifest: serde_json::Value =
        serde_json::from_str(&output_ok(Command::new("skopeo").args([
            "inspect".to_string(),
            "--raw".into(),
            format!("oci:{}:farm", layout.display()),
        ])))
        .unwrap();
    let sizes: Vec<u64> = manifest["layers"]
        .as_array()
        .map(|l| l.iter().filter_map(|x| x["size"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(
        sizes.len(),
        3,
        "rootfs, binary, the run's change: {manifest:#}"
    );
    eprintln!(
        "image farm: layers {sizes:?} bytes compressed, {} in all",
        sizes.iter().sum::<u64>()
    );
    // What the worker needs, in the unpacked image.
    let bundle = d.join("bundle");
    output_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:farm", layout.display()))
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    let read =
        |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert!(
        read("etc/passwd").contains("\nfarm:x:1000:1000:"),
        "{}",
        read("etc/passwd")
    );
    assert_eq!(read("etc/subuid"), "farm:1:999\nfarm:1001:64535\n");
    assert_eq!(read("etc/subgid"), "farm:1:999\nfarm:1001:64535\n");
    for tool in ["usr/bin/newuidmap", "usr/bin/newgidmap"] {
        let m = std::fs::metadata(rootfs.join(tool)).unwrap();
        assert!(
            m.uid() == 0 && m.mode() & 0o4000 != 0,
            "{tool} is not setuid root: {:o}",
            m.mode()
        );
    }
    // Nothing else setuid or setgid: the worker's pod lets setuid programs gain
    // DAC_OVERRIDE and SYS_ADMIN (for newuidmap/newgidmap).
    let mut set_id = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && m.mode() & 0o6000 != 0 {
                set_id.push(
                    e.path()
                        .strip_prefix(&rootfs)
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    set_id.sort();
    assert_eq!(set_id, ["usr/bin/newgidmap", "usr/bin/newuidmap"]);
    assert!(rootfs.join("usr/bin/btrfs").exists() && rootfs.join("etc/ssl/certs").is_dir());
    let farm = std::fs::metadata(rootfs.join("usr/local/bin/farm")).unwrap();
    assert!(farm.mode() & 0o111 != 0);
    let pool = std::fs::metadata(rootfs.join("var/lib/farm/pool")).unwrap();
    assert_eq!((pool.uid(), pool.gid()), (1000, 1000));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["process"]["user"]["uid"], 1000, "{config:#}");
    assert_eq!(config["process"]["user"]["gid"], 1000, "{config:#}");
    assert_eq!(
        config["process"]["args"][0], "/usr/local/bin/farm",
        "{config:#}"
    );
}

/// Where [`with_farm_image`] keeps the images it built (one per farm binary).
const IMAGE_CACHE: &str = "farm-image";

/// Runs `f` on the OCI layout (tag `farm`) of the farm image built by
/// deploy/images/build.sh from the binary under test (or FARM_IMAGE_BINARY), holding a
/// machine-wide lock: the image is built once per binary and kept under
/// /var/tmp/farm-e2e/farm-image/KEY (the previous ones removed), so the image test and
/// the podman test of one run build it once. The mmdebstrap root filesystem is kept
/// beside it and reused.
pub(crate) fn with_farm_image<T>(f: impl FnOnce(&Path) -> T) -> T {
    use sha2::Digest as _;
    let binary = std::env::var("FARM_IMAGE_BINARY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| farm_bin());
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images");
    let meta = std::fs::metadata(&binary)
        .unwrap_or_else(|e| panic!("the farm binary {}: {e}", binary.display()));
    let mut h = sha2::Sha256::new();
    h.update(binary.as_os_str().as_encoded_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(meta.mtime().to_le_bytes());
    h.update(meta.mtime_nsec().to_le_bytes());
    for f in ["build.sh", "stacker.yaml"] {
        h.update(std::fs::read(here.join(f)).unwrap());
    }
    let key = hex::encode(&h.finalize()[..8]);
    let cache = Path::new(E2E_DIR).join(IMAGE_CACHE);
    std::fs::create_dir_all(&cache).unwrap();
    // The build namespace's root (a subordinate id) must reach the pool inside.
    for d in [Path::new(E2E_DIR), &cache] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join("lock"))
        .unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking the image cache: {e}"));
    let out = cache.join(&key);
    let layout = out.join("oci");
    if !out.join("done").exists() {
        for e in std::fs::read_dir(&cache).unwrap().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        std::fs::create_dir_all(&out).unwrap();
        let rootfs_name = "rootfs-bookworm-1700000000.tar";
        let kept = cache.join(rootfs_name);
        if kept.exists() {
            std::fs::hard_link(&kept, out.join(rootfs_name)).unwrap();
        }
        let started = std::time::Instant::now();
        output_ok(
            Command::new(here.join("build.sh"))
                .env("OUT", &out)
                .env("FARM_BINARY", &binary)
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .env("NO_COLOR", "1"),
        );
        eprintln!("built the image in {:.0?}", started.elapsed());
        if !kept.exists() {
            let _ = std::fs::hard_link(out.join(rootfs_name), &kept);
        }
        // Only the layout is needed again: the build's pool and state go.
        for d in ["pool", "state"] {
            let _ = std::fs::remove_dir_all(out.join(d));
        }
        std::fs::write(out.join("done"), "").unwrap();
    }
    f(&layout)
}

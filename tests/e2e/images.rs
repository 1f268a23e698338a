//! Issue 14: the farm image, built by farm from an mmdebstrap root filesystem
//! (deploy/images/build.sh). Needs mmdebstrap and Debian's package mirror, and takes a
//! minute or more, so it runs only with FARM_IMAGE_TEST=1 (.ci/run sets it and installs
//! mmdebstrap). It uses the farm binary under test (a debug build here, so the image
//! is larger than a release one); FARM_IMAGE_BINARY=PATH puts another in the image.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::util::{cannot_run, farm_bin, is_root, output_ok, which};

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
    // The build namespace's root (a subordinate id) must reach the pool inside.
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = d.path().join("image");
    let binary = std::env::var("FARM_IMAGE_BINARY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| farm_bin());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build.sh");
    let started = std::time::Instant::now();
    output_ok(
        Command::new(&script)
            .env("OUT", &out)
            .env("FARM_BINARY", &binary)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env("NO_COLOR", "1"),
    );
    eprintln!("built the image in {:.0?}", started.elapsed());
    let layout = out.join("oci");
    // A single-image copy validates as an OCI image.
    let single = d.path().join("single");
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
    let bundle = d.path().join("bundle");
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

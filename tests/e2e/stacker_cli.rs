//! stacker's command line against `farm`: the flags stacker's scripts use, spelled as
//! stacker spells them, through a link named `stacker` where the name matters.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

/// Two layers: `base` (a tar base with a run) and `app` on it, the file's last layer.
const TWO_LAYERS: &str = "\
base:
  from:
    type: tar
    url: busybox.tar
  run: echo base > /base-file
app:
  from:
    type: built
    tag: base
  run: echo ${{GREETING:hi}} > /app-file
";

/// A link named `stacker` to the farm binary, in the test dir.
fn stacker_link(t: &TestDir) -> PathBuf {
    let link = t.join("bin/stacker");
    fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(farm_bin(), &link).unwrap();
    link
}

/// `stacker ARGS...` as the test's user, through the link.
fn stacker(t: &TestDir, link: &Path, args: &[&str]) -> Run {
    let out = t
        .command(&[], link.to_str().unwrap())
        .args(args)
        .output()
        .expect("running stacker");
    Run::from_output(args.iter().map(|s| s.to_string()).collect(), out)
}

#[test]
fn a_stacker_script_runs_unchanged_through_a_link_named_stacker() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-script", Who::User);
    t.write("stacker.yaml", TWO_LAYERS);
    let link = stacker_link(&t);
    let state = t.state.display().to_string();
    let pool = t.pool.display().to_string();
    let dirs = [
        "--stacker-dir",
        state.as_str(),
        "--roots-dir",
        pool.as_str(),
        "--oci-dir",
        "out",
    ];

    // --order-only: the order, one layer per line, and nothing built.
    let mut args = vec!["build", "-f", "stacker.yaml", "--order-only"];
    args.extend(dirs);
    let r = stacker(&t, &link, &args);
    r.assert_ok();
    assert_eq!(r.stdout, "base\napp\n", "{}", r.describe());
    assert!(
        !t.join("out").exists(),
        "--order-only built:\n{}",
        r.describe()
    );
    let r = stacker(&t, &link, &["recursive-build", "--order-only"]);
    r.assert_ok();
    assert_eq!(r.stdout, "base\napp\n", "{}", r.describe());

    // The build, with stacker's directories and annotation namespace.
    let mut args = vec![
        "build",
        "--annotations-namespace",
        "org.example.ns",
        "--substitute",
        "GREETING=hello",
    ];
    args.extend(dirs);
    let r = stacker(&t, &link, &args);
    r.assert_ok();
    let oci = Oci::new(&t.join("out"));
    assert_eq!(oci.tag_names(), ["app", "base"].map(String::from).into());
    let a = &oci.manifest("app")["annotations"];
    assert!(
        a["org.example.ns.stacker.stacker_yaml"]
            .as_str()
            .is_some_and(|y| y.contains("echo hello > /app-file")),
        "annotations under the namespace: {a}"
    );
    assert!(
        a.as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("io.stackeroci")),
        "no default namespace: {a}"
    );

    // chroot without a layer: the file's last layer, the substitution applied to find it.
    let chroot = |extra: &[&str]| {
        let mut args = vec!["chroot", "--stacker-dir", &state, "--roots-dir", &pool];
        args.extend(extra);
        stacker(&t, &link, &args)
    };
    let r = chroot(&["--", "cat", "/app-file", "/base-file"]);
    r.assert_ok();
    assert_eq!(r.stdout, "hello\nbase\n", "{}", r.describe());
    let r = chroot(&["base", "--", "ls", "/app-file"]);
    r.assert_failed();
    // The only layer of a one-layer file.
    t.write(
        "one.yaml",
        "only:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo only > /only\n",
    );
    let r = stacker(&t, &link, &{
        let mut a = vec!["build", "-f", "one.yaml"];
        a.extend(dirs);
        a
    });
    r.assert_ok();
    let r = chroot(&["-f", "one.yaml", "--", "cat", "/only"]);
    r.assert_ok();
    assert_eq!(r.stdout, "only\n", "{}", r.describe());

    // Messages name stacker.
    let r = stacker(&t, &link, &["build", "--no-such-flag"]);
    assert_eq!(r.status.code(), Some(2), "{}", r.describe());
    r.assert_stderr_contains("stacker build");
}

#[test]
fn the_work_dir_holds_the_state_and_the_roots() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-work-dir", Who::Root);
    t.write("stacker.yaml", TWO_LAYERS);
    let args: Vec<String> = ["--work-dir", "w", "build", "--oci-dir", "out"]
        .map(String::from)
        .into();
    let r = t.farm_env(&args, &[]);
    r.assert_ok();
    assert!(
        t.join("w/.stacker").is_dir(),
        "no w/.stacker:\n{}",
        r.describe()
    );
    assert!(t.join("w/roots").is_dir(), "no w/roots:\n{}", r.describe());
    assert!(!t.join("state").exists() && !t.join("oci").exists());
    assert_eq!(
        Oci::new(&t.join("out")).tag_names(),
        ["app", "base"].map(String::from).into()
    );
    // The same work dir: everything is cached.
    let r = t.farm_env(&args, &[]);
    r.assert_ok();
    assert_states(&r, &[("base", "cached"), ("app", "cached")]);
}

#[test]
fn debug_quiet_log_file_and_progress() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-globals", Who::User);
    t.write("stacker.yaml", TWO_LAYERS);
    let build = |pre: &[&str], post: &[&str]| {
        let mut args: Vec<String> = pre.iter().map(|s| s.to_string()).collect();
        args.extend(t.build_args(post));
        t.farm_env(&args, &[])
    };

    // --debug and --quiet exclude each other, before or after the subcommand.
    for (pre, post) in [
        (&["--debug", "--quiet"][..], &[][..]),
        (&["--debug"], &["--quiet"]),
    ] {
        let r = build(pre, post);
        assert_eq!(r.status.code(), Some(2), "{}", r.describe());
        r.assert_stderr_contains("--quiet");
        assert!(!t.out.exists(), "built anyway:\n{}", r.describe());
    }

    // --debug --log-file: debug logs on stderr, and logs plus progress lines in the file.
    let r = build(&["--debug", "--log-file", "build.log"], &["--no-progress"]);
    r.assert_ok();
    r.assert_stderr_contains("DEBUG");
    let log = fs::read_to_string(t.join("build.log")).unwrap();
    assert!(log.contains("DEBUG"), "no debug logs in the file:\n{log}");
    assert!(
        log.contains("[app] built"),
        "no progress in the file:\n{log}"
    );
    assert!(
        !r.stderr.contains("\x1b["),
        "--no-progress drew:\n{}",
        r.describe()
    );

    // --quiet: nothing on stderr when all goes well; the images still on stdout.
    let r = build(&["--quiet"], &["--no-cache"]);
    r.assert_ok();
    assert_eq!(r.stderr.trim(), "", "{}", r.describe());
    assert!(r.stdout.contains(":app  sha256:"), "{}", r.describe());
    // ... but a failure is told.
    t.write(
        "fail.yaml",
        "bad:\n  from:\n    type: tar\n    url: busybox.tar\n  run: exit 7\n",
    );
    let r = build(&["--quiet"], &["fail.yaml"]);
    r.assert_failed();
    r.assert_stderr_contains("[bad] FAILED");

    // --progress draws the live display on a pipe too.
    let r = build(&["--progress"], &["--no-cache"]);
    r.assert_ok();
    assert!(
        r.stderr.contains("\x1b["),
        "--progress drew nothing:\n{}",
        r.describe()
    );
}

/// stacker's publish.bats, against farm through the `stacker` link: by stackerfile
/// (-f, -d, --image/--layer), to `oci:DIR` as IMAGE_TAG, --show-only, build_only.
#[test]
fn publish_by_stackerfile_to_an_oci_layout() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "stacker-publish", Who::User);
    let base = "  from:\n    type: oci\n    url: ${{BUSYBOX_OCI}}:busybox\n";
    t.write(
        "ocibuilds/sub1/stacker.yaml",
        format!("layer1:\n{base}  run: echo 1 > /root/one\n"),
    );
    t.write(
        "ocibuilds/sub2/stacker.yaml",
        "config:\n  prerequisites:\n    - ../sub1/stacker.yaml\nlayer2:\n  from:\n    type: built\n    \
         tag: layer1\n  run: cp /root/one /root/two\n",
    );
    t.write(
        "ocibuilds/sub3/stacker.yaml",
        format!("layer3:\n{base}  build_only: true\n"),
    );
    let link = stacker_link(&t);
    let state = t.state.display().to_string();
    let pool = t.pool.display().to_string();
    let sub = format!("BUSYBOX_OCI={}", e.busybox_oci.display());
    let run = |args: &[&str]| {
        let mut all = vec!["--stacker-dir", &state, "--roots-dir", &pool];
        all.splice(0..0, args.iter().copied());
        all.extend(["--substitute", &sub]);
        stacker(&t, &link, &all)
    };
    run(&["recursive-build", "-d", "ocibuilds"]).assert_ok();
    let publish = |args: &[&str]| {
        let mut all = vec!["publish"];
        all.extend(args);
        all.extend(["--substitute", sub.as_str()]);
        stacker(&t, &link, &all)
    };

    // One file, two tags: its own layer only (not its prerequisite's).
    let r = publish(&[
        "-f",
        "ocibuilds/sub2/stacker.yaml",
        "--url",
        "oci:oci_publish",
        "--tag",
        "test1",
        "--tag",
        "test2",
    ]);
    r.assert_ok();
    let published = Oci::new(&t.join("oci_publish"));
    assert_eq!(
        published.tag_names(),
        ["layer2_test1", "layer2_test2"].map(String::from).into(),
        "{}",
        r.describe()
    );
    let built = Oci::new(&t.join("oci"));
    assert_eq!(
        published.manifest_digest("layer2_test1"),
        built.manifest_digest("layer2"),
        "the same image"
    );
    t.validate(&t.join("oci_publish"), "layer2_test1");

    // -d with a selection (--image and stacker's --layer); build_only is said, not published.
    let r = publish(&[
        "-d",
        "ocibuilds",
        "--url",
        "oci:oci_sel",
        "--tag",
        "t",
        "--image",
        "layer1",
        "--layer",
        "layer3",
    ]);
    r.assert_ok();
    assert_eq!(
        Oci::new(&t.join("oci_sel")).tag_names(),
        ["layer1_t".to_string()].into(),
        "{}",
        r.describe()
    );
    r.assert_stderr_contains("will not publish: ocibuilds/sub3/stacker.yaml build_only layer3");

    // --show-only with a docker URL and stacker's credential flags: nothing is sent.
    let r = publish(&[
        "-f",
        "ocibuilds/sub1/stacker.yaml",
        "--url",
        "docker://docker-reg.fake.com/",
        "--username",
        "user",
        "--password",
        "pass",
        "--tag",
        "test1",
        "--show-only",
    ]);
    r.assert_ok();
    assert_eq!(
        r.stdout.lines().last(),
        Some(
            "would publish: ocibuilds/sub1/stacker.yaml layer1 to \
             docker://docker-reg.fake.com/layer1:test1"
        ),
        "{}",
        r.describe()
    );

    // A layer that was never built is an error that says so.
    t.write(
        "ocibuilds/sub4/stacker.yaml",
        format!("layer4:\n{base}  run: true\n"),
    );
    let r = publish(&["-f", "ocibuilds/sub4/stacker.yaml", "--url", "oci:x"]);
    r.assert_failed();
    r.assert_stderr_contains("no image 'layer4'");
}

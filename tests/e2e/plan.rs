//! `farm plan`: the layer DAG of a stackerfile and its prerequisites, as JSON, or errors
//! as `FILE:LINE:COL: error: ...`.
//!
//! Scenarios are ported from stacker's bats suite (test/dependency-order.bats,
//! test/prerequisites.bats, test/build-only.bats, test/import.bats, test/basic.bats,
//! test/invalid.bats) and its substitution unit test (pkg/types/types_test.go); the
//! fixtures under `tests/fixtures/plan/` are our own files of the same shape.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{copy_tree, farm, fixtures, locate, locate_nth, resolve};

fn fx(rel: &str) -> PathBuf {
    fixtures("plan").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------
// reading a plan
// ---------------------------------------------------------------------------------------

fn layers(plan: &Value) -> &Vec<Value> {
    plan["layers"].as_array().expect("`layers` is an array")
}

fn names(plan: &Value) -> Vec<String> {
    layers(plan)
        .iter()
        .map(|l| l["name"].as_str().expect("name is a string").to_string())
        .collect()
}

fn layer<'a>(plan: &'a Value, name: &str) -> &'a Value {
    layers(plan)
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no layer {name:?} in {:?}", names(plan)))
}

/// `depends_on` of a layer, sorted (the contract does not fix its order).
fn deps(plan: &Value, name: &str) -> Vec<String> {
    let mut d: Vec<String> = layer(plan, name)["depends_on"]
        .as_array()
        .expect("depends_on is an array")
        .iter()
        .map(|v| v.as_str().expect("dependency is a string").to_string())
        .collect();
    d.sort();
    d
}

fn waves(plan: &Value) -> Vec<Vec<String>> {
    plan["waves"]
        .as_array()
        .expect("`waves` is an array")
        .iter()
        .map(|w| {
            w.as_array()
                .expect("a wave is an array")
                .iter()
                .map(|n| n.as_str().expect("wave entry is a string").to_string())
                .collect()
        })
        .collect()
}

fn digest(plan: &Value, name: &str) -> String {
    layer(plan, name)["definition_digest"]
        .as_str()
        .expect("definition_digest is a string")
        .to_string()
}

fn build_only(plan: &Value, name: &str) -> bool {
    layer(plan, name)["build_only"]
        .as_bool()
        .expect("build_only is a bool")
}

fn file_of(plan: &Value, name: &str) -> String {
    layer(plan, name)["file"]
        .as_str()
        .expect("file is a string")
        .to_string()
}

fn v(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn vv(waves: &[&[&str]]) -> Vec<Vec<String>> {
    waves.iter().map(|w| v(w)).collect()
}

/// Everything the contract says about any plan, whatever the input.
fn check_plan_shape(plan: &Value) {
    let obj = plan.as_object().expect("plan is an object");
    assert!(
        obj.contains_key("layers") && obj.contains_key("waves"),
        "{plan}"
    );
    let order = names(plan);
    let index: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    assert_eq!(index.len(), order.len(), "layer names repeat: {order:?}");

    for l in layers(plan) {
        let name = l["name"].as_str().unwrap();
        assert!(l["file"].as_str().is_some_and(|f| !f.is_empty()), "{l}");
        assert!(l["from"]["type"].as_str().is_some(), "from.type: {l}");
        let bo = l["build_only"].as_bool().expect("build_only bool");
        assert_eq!(
            l["tagged"].as_bool(),
            Some(!bo),
            "tagged = !build_only: {l}"
        );
        let dg = l["definition_digest"].as_str().expect("digest string");
        let hex = dg.strip_prefix("sha256:").unwrap_or("");
        assert!(
            hex.len() == 64 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
            "definition_digest {dg:?} is not sha256:<64 lowercase hex>"
        );
        let d = deps(plan, name);
        let uniq: HashSet<&String> = d.iter().collect();
        assert_eq!(uniq.len(), d.len(), "{name}: repeated dependency {d:?}");
        for dep in &d {
            assert!(
                index.contains_key(dep.as_str()),
                "{name} depends on unknown {dep}"
            );
            assert_ne!(dep, name, "{name} depends on itself");
        }
    }

    // waves: a partition of the layers into topological levels, each in load order
    let ws = waves(plan);
    let mut wave_of: HashMap<String, usize> = HashMap::new();
    for (i, w) in ws.iter().enumerate() {
        assert!(!w.is_empty(), "wave {i} is empty: {ws:?}");
        for n in w {
            assert!(index.contains_key(n.as_str()), "wave {i} names unknown {n}");
            assert!(wave_of.insert(n.clone(), i).is_none(), "{n} in two waves");
        }
        let pos: Vec<usize> = w.iter().map(|n| index[n.as_str()]).collect();
        assert!(
            pos.windows(2).all(|p| p[0] < p[1]),
            "wave {i} is not in load order: {w:?} (load order {order:?})"
        );
    }
    assert_eq!(
        wave_of.len(),
        order.len(),
        "waves {ws:?} miss layers of {order:?}"
    );
    for n in &order {
        let level = deps(plan, n)
            .iter()
            .map(|d| wave_of[d] + 1)
            .max()
            .unwrap_or(0);
        assert_eq!(wave_of[n], level, "{n} is in the wrong wave: {ws:?}");
    }
}

/// `farm plan --json ARGS` in `cwd`, asserting success and the general shape.
fn plan_in(cwd: &Path, args: &[&str]) -> Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let plan = farm(cwd, &all).json();
    check_plan_shape(&plan);
    plan
}

/// `farm plan --json FILE ARGS` from a scratch directory (never the fixture's own).
fn plan_file(file: &Path, args: &[&str]) -> Value {
    let cwd = tempfile::tempdir().unwrap();
    let mut all = vec![s(file)];
    all.extend_from_slice(args);
    plan_in(cwd.path(), &all)
}

/// `farm plan --json FILE ARGS` expected to fail; runs from the fixture's directory so
/// that FILE is just its name.
fn fail_file(file: &Path, args: &[&str]) -> crate::util::Run {
    let mut all = vec!["plan", "--json", s(file)];
    all.extend_from_slice(args);
    let cwd = tempfile::tempdir().unwrap();
    farm(cwd.path(), &all)
}

// ---------------------------------------------------------------------------------------
// DAG: out of order, fan-in through stacker://  (test/dependency-order.bats)
// ---------------------------------------------------------------------------------------

#[test]
fn out_of_order_file_with_stacker_fan_in() {
    let dir = fx("out_of_order");
    // FILE defaults to ./stacker.yaml
    let plan = plan_in(&dir, &[]);

    assert_eq!(
        names(&plan),
        v(&[
            "probe",
            "bundle",
            "assemble",
            "kernel-bits",
            "userland-bits",
            "sdk",
            "toolchain"
        ]),
        "layers are listed in file order"
    );
    assert_eq!(
        deps(&plan, "probe"),
        Vec::<String>::new(),
        "docker bases make no edge"
    );
    assert_eq!(
        deps(&plan, "bundle"),
        v(&["assemble"]),
        "tar from stacker://"
    );
    assert_eq!(
        deps(&plan, "assemble"),
        v(&["kernel-bits", "toolchain", "userland-bits"]),
        "built base + two stacker:// imports"
    );
    assert_eq!(deps(&plan, "kernel-bits"), v(&["toolchain"]));
    assert_eq!(deps(&plan, "userland-bits"), v(&["sdk"]));
    assert_eq!(deps(&plan, "sdk"), v(&["toolchain"]));
    assert_eq!(deps(&plan, "toolchain"), Vec::<String>::new());

    assert_eq!(
        waves(&plan),
        vv(&[
            &["probe", "toolchain"],
            &["kernel-bits", "sdk"],
            &["userland-bits"],
            &["assemble"],
            &["bundle"],
        ])
    );

    for bo in ["assemble", "kernel-bits", "userland-bits", "sdk"] {
        assert!(build_only(&plan, bo), "{bo} is build_only");
    }
    for tagged in ["probe", "bundle", "toolchain"] {
        assert!(!build_only(&plan, tagged), "{tagged} is tagged");
    }

    let from = &layer(&plan, "bundle")["from"];
    assert_eq!(from["type"], "tar");
    assert_eq!(from["url"], "stacker://assemble/out/bundle.tar");
    let from = &layer(&plan, "kernel-bits")["from"];
    assert_eq!(from["type"], "built");
    assert_eq!(from["tag"], "toolchain");
    let from = &layer(&plan, "toolchain")["from"];
    assert_eq!(from["type"], "docker");
    assert_eq!(
        from["url"],
        "docker://registry.example.com/library/debian:12"
    );

    let expected = dir.join("stacker.yaml").canonicalize().unwrap();
    for n in names(&plan) {
        assert_eq!(resolve(&dir, &file_of(&plan, &n)), expected, "file of {n}");
    }
}

#[test]
fn file_argument_forms_agree() {
    let dir = fx("out_of_order");
    let file = dir.join("stacker.yaml");
    let reference = plan_in(&dir, &[]);
    let elsewhere = tempfile::tempdir().unwrap();
    for args in [
        vec![s(&file)],
        vec!["-f", s(&file)],
        vec!["--stacker-file", s(&file)],
    ] {
        let plan = plan_in(elsewhere.path(), &args);
        assert_eq!(names(&plan), names(&reference), "{args:?}");
        assert_eq!(waves(&plan), waves(&reference), "{args:?}");
        for n in names(&reference) {
            assert_eq!(deps(&plan, &n), deps(&reference, &n), "{args:?} {n}");
            assert_eq!(digest(&plan, &n), digest(&reference, &n), "{args:?} {n}");
            assert_eq!(
                resolve(elsewhere.path(), &file_of(&plan, &n)),
                file.canonicalize().unwrap(),
                "{args:?} {n}"
            );
        }
    }
}

#[test]
fn default_file_missing_is_an_error() {
    let empty = tempfile::tempdir().unwrap();
    let run = farm(empty.path(), &["plan", "--json"]);
    assert!(
        !run.status.success(),
        "no stacker.yaml here: {}",
        run.stdout
    );
    run.assert_stderr_contains("stacker.yaml");
}

// ---------------------------------------------------------------------------------------
// prerequisites  (test/prerequisites.bats, test/build-only.bats)
// ---------------------------------------------------------------------------------------

#[test]
fn nested_prerequisites_resolve_relative_to_each_file() {
    // project/a -> ../b -> ../c (and a -> ../c too), run from another directory that
    // holds decoys where cwd-relative resolution would look.
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    copy_tree(&fx("nested_prereqs"), &project);
    let cwd = tmp.path().join("elsewhere/deep");
    std::fs::create_dir_all(&cwd).unwrap();
    for d in ["b", "c"] {
        let decoy = tmp.path().join("elsewhere").join(d);
        std::fs::create_dir_all(&decoy).unwrap();
        std::fs::write(
            decoy.join("stacker.yaml"),
            format!("decoy-{d}:\n  from:\n    type: scratch\n"),
        )
        .unwrap();
    }

    let plan = plan_in(&cwd, &["../../project/a/stacker.yaml"]);

    assert_eq!(
        names(&plan),
        v(&["c-base", "c-tools", "b-app", "a-final", "a-side"]),
        "prerequisites' layers first (each file once), then file order"
    );
    let file = |d: &str| project.join(d).join("stacker.yaml").canonicalize().unwrap();
    for (n, d) in [
        ("c-base", "c"),
        ("c-tools", "c"),
        ("b-app", "b"),
        ("a-final", "a"),
        ("a-side", "a"),
    ] {
        assert_eq!(resolve(&cwd, &file_of(&plan, n)), file(d), "file of {n}");
    }
    assert_eq!(deps(&plan, "c-base"), Vec::<String>::new());
    assert_eq!(deps(&plan, "c-tools"), v(&["c-base"]));
    assert_eq!(deps(&plan, "b-app"), v(&["c-base", "c-tools"]));
    assert_eq!(deps(&plan, "a-final"), v(&["b-app"]));
    assert_eq!(deps(&plan, "a-side"), v(&["c-tools"]));
    assert_eq!(
        waves(&plan),
        vv(&[
            &["c-base"],
            &["c-tools"],
            &["b-app", "a-side"],
            &["a-final"]
        ])
    );
    assert!(build_only(&plan, "c-tools"));
    assert!(!build_only(&plan, "a-side"), "build_only: false is tagged");
}

#[test]
fn absolute_prerequisite_through_substitution() {
    let root = fx("abs_prereq");
    let sub = format!("PREREQ_ROOT={}", s(&root));
    let plan = plan_file(&root.join("two/stacker.yaml"), &["--substitute", &sub]);
    assert_eq!(names(&plan), v(&["one", "two"]));
    assert_eq!(deps(&plan, "two"), v(&["one"]));
    assert_eq!(waves(&plan), vv(&[&["one"], &["two"]]));
    assert!(file_of(&plan, "one").ends_with("one/stacker.yaml"));
}

#[test]
fn build_only_chain_across_a_prerequisite() {
    let plan = plan_file(&fx("build_only/stacker.yaml"), &[]);
    assert_eq!(
        names(&plan),
        v(&["parent", "first", "second", "third", "fourth"])
    );
    let flags: Vec<bool> = names(&plan).iter().map(|n| build_only(&plan, n)).collect();
    assert_eq!(flags, [false, false, true, true, false]);
    assert_eq!(deps(&plan, "fourth"), v(&["third"]));
    assert_eq!(
        waves(&plan),
        vv(&[
            &["parent"],
            &["first"],
            &["second"],
            &["third"],
            &["fourth"]
        ])
    );
    assert!(file_of(&plan, "parent").ends_with("prereq.yaml"));
    assert!(file_of(&plan, "fourth").ends_with("stacker.yaml"));
}

// ---------------------------------------------------------------------------------------
// import forms  (test/import.bats)
// ---------------------------------------------------------------------------------------

#[test]
fn import_forms_and_their_edges() {
    let plan = plan_file(&fx("imports/stacker.yaml"), &[]);
    assert_eq!(
        names(&plan),
        v(&["first", "second", "third", "fourth", "fifth"])
    );
    assert_eq!(
        deps(&plan, "first"),
        Vec::<String>::new(),
        "local and https imports"
    );
    assert_eq!(
        deps(&plan, "second"),
        v(&["first"]),
        "built + map-form stacker://"
    );
    assert_eq!(deps(&plan, "third"), v(&["fifth"]), "`import:` string form");
    assert_eq!(deps(&plan, "fourth"), Vec::<String>::new(), "dest imports");
    assert_eq!(
        deps(&plan, "fifth"),
        v(&["fourth"]),
        "three stacker:// imports of one layer are one edge"
    );
    assert_eq!(
        waves(&plan),
        vv(&[&["first", "fourth"], &["second", "fifth"], &["third"]])
    );
}

// ---------------------------------------------------------------------------------------
// substitution  (pkg/types/types_test.go TestSubstitute, test/basic.bats subs from a file,
// test/config.bats built-ins)
// ---------------------------------------------------------------------------------------

#[test]
fn substitution_precedence_cli_over_file_over_default() {
    let file = fx("subst/stacker.yaml");
    let subs = fx("subst/subs.yaml");
    let plan = plan_file(
        &file,
        &[
            "--substitute",
            "REPO=from-cli",
            "--substitute-file",
            s(&subs),
            "--substitute",
            "OPTS=--flag=a,b=c",
        ],
    );
    assert_eq!(
        layer(&plan, "app")["from"]["url"],
        "docker://registry.example.com/from-cli:latest",
        "REGISTRY from the file, REPO from the CLI, SUFFIX empty default, TAG default"
    );
    // MODE from the file (not its default), OPTS verbatim with '=' and ','
    let literal = plan_file(&fx("subst/literal.yaml"), &[]);
    assert_eq!(digest(&plan, "app"), digest(&literal, "app"));
}

#[test]
fn substitution_file_value_when_no_cli_value() {
    let plan = plan_file(
        &fx("subst/stacker.yaml"),
        &[
            "--substitute-file",
            s(&fx("subst/subs.yaml")),
            "--substitute",
            "OPTS=x",
        ],
    );
    assert_eq!(
        layer(&plan, "app")["from"]["url"],
        "docker://registry.example.com/from-file:latest"
    );
}

#[test]
fn substitution_defaults_and_their_overrides() {
    let file = fx("subst/stacker.yaml");
    let base = [
        "--substitute",
        "REGISTRY=r.example",
        "--substitute",
        "REPO=x",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(&["--substitute", "OPTS=o"]);
        a.extend_from_slice(extra);
        plan_file(&file, &a)
    };
    let defaults = with(&[]);
    assert_eq!(
        layer(&defaults, "app")["from"]["url"],
        "docker://r.example/x:latest"
    );
    let overridden = with(&["--substitute", "TAG=v2", "--substitute", "SUFFIX=-dev"]);
    assert_eq!(
        layer(&overridden, "app")["from"]["url"],
        "docker://r.example/x-dev:v2"
    );
    // MODE's default `production` vs a given MODE: different definitions
    let mode = with(&["--substitute", "MODE=production"]);
    assert_eq!(digest(&mode, "app"), digest(&defaults, "app"));
    let other_mode = with(&["--substitute", "MODE=staging"]);
    assert_ne!(digest(&other_mode, "app"), digest(&defaults, "app"));
}

#[test]
fn substitution_value_keeps_equals_and_commas() {
    let file = fx("subst/stacker.yaml");
    let literal = plan_file(&fx("subst/literal.yaml"), &[]);
    let plan_with = |opts: &str| {
        plan_file(
            &file,
            &[
                "--substitute-file",
                s(&fx("subst/subs.yaml")),
                "--substitute",
                "REPO=from-cli",
                "--substitute",
                opts,
            ],
        )
    };
    assert_eq!(
        digest(&plan_with("OPTS=--flag=a,b=c"), "app"),
        digest(&literal, "app")
    );
    // a value cut at the comma (stacker's CLI splits on commas) is a different script
    assert_ne!(
        digest(&plan_with("OPTS=--flag=a"), "app"),
        digest(&literal, "app")
    );
}

#[test]
fn missing_substitution_is_an_error_with_position() {
    let file = fx("subst/missing.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("naming REGISTRY", |d| d.raw.contains("REGISTRY"));
    assert!(d.in_file("missing.yaml"), "{d:?}");
    assert_eq!(d.at(), locate(&file, "${{REGISTRY}}"), "{d:?}");
    assert!(
        !run.stderr.contains("PRESENT"),
        "a placeholder with a default is not missing:\n{}",
        run.stderr
    );
    // and given, it plans
    let plan = plan_file(&file, &["--substitute", "REGISTRY=r.example"]);
    assert_eq!(
        layer(&plan, "app")["from"]["url"],
        "docker://r.example/app:1"
    );
}

#[test]
fn missing_substitution_in_a_prerequisite_names_that_file() {
    let file = fx("subst/prereq_missing/main.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("naming BASE_TAG", |d| d.raw.contains("BASE_TAG"));
    assert!(d.in_file("base.yaml"), "{d:?}");
    assert_eq!(
        d.at(),
        locate(&fx("subst/prereq_missing/base.yaml"), "${{BASE_TAG}}")
    );
}

#[test]
fn builtin_substitutions_exist_and_yield_to_the_file() {
    let file = fx("subst/builtins.yaml");
    let literal = plan_file(&fx("subst/builtins_literal.yaml"), &[]);
    let builtins = plan_file(&file, &[]);
    assert_ne!(
        digest(&builtins, "app"),
        digest(&literal, "app"),
        "built-ins have farm's own values"
    );
    let from_file = plan_file(
        &file,
        &["--substitute-file", s(&fx("subst/builtins_subs.yaml"))],
    );
    assert_eq!(digest(&from_file, "app"), digest(&literal, "app"));
}

#[test]
fn substitution_injects_yaml_and_errors_keep_original_positions() {
    let subs = fx("subst/inject_subs.yaml");
    let plan = plan_file(
        &fx("subst/inject_ok.yaml"),
        &["--substitute-file", s(&subs)],
    );
    assert_eq!(names(&plan), v(&["helper", "web"]));
    assert_eq!(deps(&plan, "web"), v(&["helper"]));
    assert!(build_only(&plan, "helper"));

    // three lines are injected above `improts`; the error still points at line 6
    let file = fx("subst/inject.yaml");
    for args in [vec![], vec!["--substitute-file", s(&subs)]] {
        let run = fail_file(&file, &args);
        let d = run.error_where("about improts", |d| d.raw.contains("improts"));
        assert!(d.in_file("inject.yaml"), "{d:?}");
        assert_eq!(d.at(), locate(&file, "improts"), "{args:?}: {d:?}");
        assert_eq!(d.layer.as_deref(), Some("web"));
    }
}

#[test]
fn error_column_is_in_the_original_line() {
    // `tga` follows a placeholder on the same line: its column must not move with the
    // length of the substituted value
    let file = fx("subst/shifted.yaml");
    let expected = locate(&file, "tga");
    for args in [
        vec![],
        vec!["--substitute", "REGISTRY=r.io"],
        vec![
            "--substitute",
            "REGISTRY=a-much-longer-registry-name.example.com:5000",
        ],
    ] {
        let run = fail_file(&file, &args);
        let d = run.error_where("about tga", |d| d.raw.contains("tga"));
        assert_eq!(d.at(), expected, "{args:?}: {d:?}");
        assert_eq!(d.layer.as_deref(), Some("web"));
    }
}

#[test]
fn shell_style_placeholders_are_not_substituted() {
    // `$REPO` with REPO given: stacker fails; farm plans (and warns)
    let run = farm(
        &fx("subst"),
        &[
            "plan",
            "--json",
            "shell_vars_warn.yaml",
            "--substitute",
            "REPO=x",
        ],
    );
    let plan = run.json();
    check_plan_shape(&plan);
    run.assert_stderr_contains("REPO");

    // `$REPOSITORY` / `${REPOSITORY_URL}` do not match REPO: no warning about them
    let run = farm(
        &fx("subst"),
        &[
            "plan",
            "--json",
            "shell_vars.yaml",
            "--substitute",
            "REPO=x",
        ],
    );
    check_plan_shape(&run.json());
    assert!(
        !run.stderr.contains("REPOSITORY"),
        "warned about $REPOSITORY for REPO (substring match):\n{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------
// definition_digest
// ---------------------------------------------------------------------------------------

#[test]
fn definition_digest_ignores_formatting() {
    let canonical = digest(&plan_file(&fx("digest/canonical.yaml"), &[]), "web");
    for other in ["reformatted.yaml", "block_literal.yaml"] {
        let d = digest(&plan_file(&fx("digest").join(other), &[]), "web");
        assert_eq!(d, canonical, "{other} defines the same layer");
    }
}

#[test]
fn definition_digest_changes_with_the_definition() {
    let canonical = digest(&plan_file(&fx("digest/canonical.yaml"), &[]), "web");
    let mut seen = vec![canonical];
    for changed in [
        "changed_run.yaml",
        "changed_env.yaml",
        "changed_import.yaml",
    ] {
        let d = digest(&plan_file(&fx("digest").join(changed), &[]), "web");
        assert!(!seen.contains(&d), "{changed}: digest {d} not distinct");
        seen.push(d);
    }
}

// ---------------------------------------------------------------------------------------
// duplicates  (test/prerequisites.bats "tags are unique")
// ---------------------------------------------------------------------------------------

#[test]
fn duplicate_layer_across_files_names_both() {
    let b = fx("duplicates/b.yaml");
    let run = fail_file(&b, &[]);
    let d = run.error_where("about `same`", |d| d.raw.contains("same"));
    let in_b = d.in_file("b.yaml") && d.at() == locate_nth(&b, "same:", 0);
    let in_a = d.in_file("a.yaml") && d.at() == (1, 1);
    assert!(in_a || in_b, "position of a definition of `same`: {d:?}");
    run.assert_stderr_contains("a.yaml");
    run.assert_stderr_contains("b.yaml");
}

#[test]
fn duplicate_layer_in_one_file() {
    let file = fx("duplicates/same_file.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about `twice`", |d| d.raw.contains("twice"));
    assert!(d.in_file("same_file.yaml"), "{d:?}");
    assert!(
        [(1, 1), locate_nth(&file, "twice:", 1)].contains(&d.at()),
        "{d:?}"
    );
}

// ---------------------------------------------------------------------------------------
// errors  (test/invalid.bats, test/dependency-order.bats, test/basic.bats, ...)
// ---------------------------------------------------------------------------------------

fn err(name: &str) -> PathBuf {
    fx("errors").join(name)
}

#[test]
fn unknown_layer_key_suggests_the_known_one() {
    let file = err("unknown_key.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about improts", |d| d.message.contains("improts"));
    assert!(d.in_file("unknown_key.yaml"), "{d:?}");
    assert_eq!(d.at(), locate(&file, "improts"));
    assert_eq!(d.layer.as_deref(), Some("web"));
    let text = d.text().to_lowercase();
    assert!(
        text.contains("did you mean") && text.replace("improts", "").contains("imports"),
        "no suggestion of `imports`: {d:?}"
    );
}

#[test]
fn unknown_from_key_suggests_the_known_one() {
    let file = err("unknown_from_key.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about tga", |d| d.message.contains("tga"));
    assert_eq!(d.at(), locate(&file, "tga"));
    assert_eq!(d.layer.as_deref(), Some("web"));
    let text = d.text().to_lowercase();
    assert!(
        text.contains("did you mean") && text.replace("tga", "").contains("tag"),
        "no suggestion of `tag`: {d:?}"
    );
}

#[test]
fn missing_from_is_an_error() {
    let file = err("missing_from.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("for layer nofrom", |d| d.layer.as_deref() == Some("nofrom"));
    assert!(d.message.contains("from"), "{d:?}");
    assert_eq!(d.at(), locate(&file, "nofrom:"));
    assert!(d.in_file("missing_from.yaml"));
}

#[test]
fn dependency_cycle_names_its_members() {
    let file = err("cycle.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about a cycle", |d| d.raw.to_lowercase().contains("cycle"));
    assert!(d.in_file("cycle.yaml"), "{d:?}");
    for member in ["alpha", "beta", "gamma"] {
        assert!(
            d.raw.contains(member),
            "cycle member {member} not named: {d:?}"
        );
    }
    assert!(
        !d.raw.contains("outsider"),
        "outsider depends on the cycle but is not in it: {d:?}"
    );
    let first_member_line = locate(&file, "alpha:").0;
    assert!(
        d.line >= first_member_line,
        "points into the cycle, not at outsider: {d:?}"
    );
}

#[test]
fn missing_built_dependency_names_layer_and_name() {
    let file = err("missing_dep.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about notatag", |d| d.raw.contains("notatag"));
    assert_eq!(d.layer.as_deref(), Some("test"), "{d:?}");
    // the reference itself (`tag` key or value), or the `from:` that holds it
    let accepted = [
        locate_nth(&file, "from:", 1),
        locate(&file, "tag: notatag"),
        locate(&file, "notatag"),
    ];
    assert!(accepted.contains(&d.at()), "not at {accepted:?}: {d:?}");
}

#[test]
fn missing_stacker_url_dependencies() {
    let file = err("missing_stacker_dep.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about ghost", |d| d.raw.contains("ghost"));
    assert_eq!(d.layer.as_deref(), Some("test"), "{d:?}");
    let value = locate(&file, "stacker://ghost/bar");
    let item = (value.0, value.1 - 2);
    assert!(d.at() == value || d.at() == item, "{d:?}");
    assert!(
        !run.errors()
            .iter()
            .any(|d| d.raw.contains("stacker://real")),
        "the import of an existing layer is fine:\n{}",
        run.stderr
    );

    let file = err("missing_tar_dep.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about phantom", |d| d.raw.contains("phantom"));
    assert_eq!(d.layer.as_deref(), Some("unpacked"), "{d:?}");
    let accepted = [
        locate(&file, "from:"),
        locate(&file, "url: stacker://phantom"),
        locate(&file, "stacker://phantom"),
    ];
    assert!(accepted.contains(&d.at()), "not at {accepted:?}: {d:?}");
}

#[test]
fn colon_in_layer_name_is_an_error() {
    let file = err("colon_name.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about the name", |d| d.raw.contains("centos:with:colon"));
    assert_eq!(d.at(), locate(&file, "centos:with:colon"), "{d:?}");
    assert!(d.in_file("colon_name.yaml"));
}

#[test]
fn missing_prerequisite_file() {
    let file = err("missing_prereq.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("about the prerequisite", |d| {
        d.raw.contains("does-not-exist.yaml")
    });
    assert!(d.in_file("missing_prereq.yaml"), "{d:?}");
    let value = locate(&file, "../nowhere/does-not-exist.yaml");
    assert!(d.at() == value || d.at() == (value.0, value.1 - 2), "{d:?}");
}

#[test]
fn built_base_without_tag() {
    let file = err("built_without_tag.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("for layer2", |d| d.layer.as_deref() == Some("layer2"));
    assert!(d.text().contains("tag"), "{d:?}");
    let accepted = [
        locate_nth(&file, "from:", 1),
        locate(&file, "type: built"),
        locate(&file, "built"),
    ];
    assert!(accepted.contains(&d.at()), "not at {accepted:?}: {d:?}");
}

#[test]
fn nested_list_in_imports() {
    let file = err("nested_import_list.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("for centos", |d| d.layer.as_deref() == Some("centos"));
    assert_eq!(d.line, locate(&file, "- - one").0, "{d:?}");
}

#[test]
fn import_and_imports_together() {
    let file = err("import_and_imports.yaml");
    let run = fail_file(&file, &[]);
    let d = run.error_where("for both", |d| d.layer.as_deref() == Some("both"));
    let lines = [locate(&file, "import:").0, locate(&file, "imports:").0];
    assert!(lines.contains(&d.line), "{d:?}");
    assert!(d.text().contains("imports"), "{d:?}");
}

#[test]
fn prerequisite_files_in_a_cycle() {
    let run = fail_file(&err("file_cycle_x.yaml"), &[]);
    let d = run.error_where("about a cycle", |d| d.raw.to_lowercase().contains("cycle"));
    assert!(
        d.in_file("file_cycle_x.yaml") || d.in_file("file_cycle_y.yaml"),
        "{d:?}"
    );
    for f in ["file_cycle_x.yaml", "file_cycle_y.yaml"] {
        assert!(d.raw.contains(f), "cycle member {f} not named: {d:?}");
    }
}

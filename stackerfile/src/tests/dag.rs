//! The layer DAG and the canonical definitions.

use super::{plan, plan_files};
use crate::{Plan, Substitutions};

fn names(p: &Plan) -> Vec<Vec<&str>> {
    p.waves
        .iter()
        .map(|w| w.iter().map(|&i| p.layers[i].layer.name.as_str()).collect())
        .collect()
}

fn deps<'a>(p: &'a Plan, name: &str) -> Vec<&'a str> {
    p.layers[p.index_of(name).unwrap()]
        .depends_on
        .iter()
        .map(|&d| p.layers[d].layer.name.as_str())
        .collect()
}

#[test]
fn out_of_order_with_stacker_fan_in() {
    // The consumer comes first in the file; two build-only producers feed it.
    let p = plan(
        "final:\n  from: {type: built, tag: runtime}\n  imports:\n    - stacker://build-a/out/a\n    \
         - path: stacker://build-b/out/b\n      dest: /usr/bin/\n\
         build-a:\n  build_only: true\n  from: {type: scratch}\n\
         runtime:\n  from: {type: scratch}\n\
         build-b:\n  build_only: true\n  from:\n    type: tar\n    url: stacker://build-a/b.tar\n",
    );
    assert_eq!(deps(&p, "final"), vec!["runtime", "build-a", "build-b"]);
    assert_eq!(deps(&p, "build-b"), vec!["build-a"]);
    assert_eq!(
        names(&p),
        vec![vec!["build-a", "runtime"], vec!["build-b"], vec!["final"]]
    );
    let json = p.to_json();
    assert_eq!(json["layers"][0]["name"], "final");
    assert_eq!(json["layers"][0]["tagged"], true);
    assert_eq!(json["layers"][1]["build_only"], true);
    assert_eq!(json["waves"][0][1], "runtime");
}

#[test]
fn docker_and_oci_bases_never_create_edges() {
    let p = plan(
        "a:\n  from: {type: scratch}\nb:\n  from:\n    type: oci\n    url: oci:a\n\
         c:\n  from:\n    type: docker\n    url: docker://localhost/a:latest\n",
    );
    assert_eq!(names(&p), vec![vec!["a", "b", "c"]]);
}

#[test]
fn three_file_nested_prerequisites() {
    let p = plan_files(
        &[
            (
                "app/stacker.yaml",
                "config:\n  prerequisites:\n    - ../mid/stacker.yaml\n\
                 app:\n  from: {type: built, tag: mid}\n",
            ),
            (
                "mid/stacker.yaml",
                "config:\n  prerequisites: [../base/stacker.yaml]\n\
                 mid:\n  from: {type: built, tag: base}\n  imports: [stacker://base/etc/os-release]\n",
            ),
            (
                "base/stacker.yaml",
                "base:\n  from:\n    type: tar\n    url: rootfs.tar\n",
            ),
        ],
        Substitutions::default(),
    )
    .unwrap();
    let files: Vec<String> = p
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    assert_eq!(
        files,
        vec!["base/stacker.yaml", "mid/stacker.yaml", "app/stacker.yaml"]
    );
    assert_eq!(names(&p), vec![vec!["base"], vec!["mid"], vec!["app"]]);
    assert_eq!(p.files[2].prerequisites, vec![1]);
    assert_eq!(p.layers[p.index_of("app").unwrap()].file, 2);
}

#[test]
fn diamond_prerequisites_load_once() {
    let p = plan_files(
        &[
            (
                "top.yaml",
                "config: {prerequisites: [l.yaml, r.yaml]}\nt: {from: {type: built, tag: l}}\n",
            ),
            (
                "l.yaml",
                "config: {prerequisites: [base.yaml]}\nl: {from: {type: built, tag: b}}\n",
            ),
            (
                "r.yaml",
                "config: {prerequisites: [./base.yaml]}\nr: {from: {type: built, tag: b}}\n",
            ),
            ("base.yaml", "b: {from: {type: scratch}}\n"),
        ],
        Substitutions::default(),
    )
    .unwrap();
    assert_eq!(p.files.len(), 4);
    assert_eq!(names(&p), vec![vec!["b"], vec!["l", "r"], vec!["t"]]);
}

#[test]
fn waves_are_levels_not_just_an_order() {
    // d depends on a (wave 0) and c (wave 2) -> wave 3, while b sits in wave 1.
    let p = plan(
        "a: {from: {type: scratch}}\nb: {from: {type: built, tag: a}}\n\
         c: {from: {type: built, tag: b}}\nd: {from: {type: built, tag: c}, imports: [stacker://a/x]}\n\
         e: {from: {type: built, tag: a}}\n",
    );
    assert_eq!(
        names(&p),
        vec![vec!["a"], vec!["b", "e"], vec!["c"], vec!["d"]]
    );
}

fn digest(text: &str) -> String {
    plan(text).layers[0].definition_digest.clone()
}

#[test]
fn digest_ignores_formatting_order_comments_and_spelling() {
    let a = digest(
        "app:\n  from:\n    type: docker\n    url: docker://x/y:1\n  run:\n    - echo one\n    - echo two\n  \
         environment:\n    A: 1\n    B: 2\n  volumes: [/b, /a]\n  cmd: /bin/app --x\n",
    );
    let b = digest(
        "# a comment\napp:\n  cmd: [\"/bin/app\", \"--x\"]\n  volumes:\n    - /a\n    - /b\n    - /a\n  \
         environment: {B: '2', A: \"1\"}   # flow style\n  run: |-\n    echo one\n    echo two\n  \
         from: {url: 'docker://x/y:1', type: docker}\n",
    );
    assert_eq!(a, b);
    assert!(a.starts_with("sha256:") && a.len() == 71);
}

#[test]
fn digest_changes_with_anything_that_affects_the_result() {
    let base = "app:\n  from: {type: docker, url: 'docker://x/y:1'}\n  run: echo one\n  \
                environment: {A: '1'}\n  imports: [a.txt]\n";
    let d0 = digest(base);
    for changed in [
        base.replace("echo one", "echo two"),
        base.replace("A: '1'", "A: '2'"),
        base.replace("a.txt", "b.txt"),
        base.replace("y:1", "y:2"),
        base.replace("[a.txt]", "[{path: a.txt, dest: /x}]"),
        base.replace("[a.txt]", "[{path: a.txt, mode: 0600}]"),
        base.replace("app:", "other:"),
        format!("{base}  labels: {{k: v}}\n"),
        format!("{base}  arch: arm64\n"),
        format!("{base}  build_env: {{K: v}}\n"),
        format!("{base}  build_env_passthrough: [K]\n"),
        format!("{base}  working_dir: /srv\n"),
        format!("{base}  binds: [/src]\n"),
        base.replace("imports:", "import:"),
        format!("{base}  network: none\n"),
        format!("{base}  nested_userns: true\n"),
    ] {
        assert_ne!(digest(&changed), d0, "unchanged digest for:\n{changed}");
    }
    // build_only decides tagging only; run_timeout does not change a result.
    assert_eq!(digest(&format!("{base}  build_only: true\n")), d0);
    assert_eq!(digest(&format!("{base}  run_timeout: 5m\n")), d0);
}

#[test]
fn several_files_plan_as_one_dag() {
    use super::MemFiles;
    use std::path::PathBuf;
    let files = MemFiles::with(&[
        (
            "a/stacker.yaml",
            "config: {prerequisites: [../lib/stacker.yaml]}\na: {from: {type: built, tag: l}}\n",
        ),
        (
            "b/stacker.yaml",
            "config: {prerequisites: [../lib/stacker.yaml]}\nb: {from: {type: built, tag: l}}\n",
        ),
        ("lib/stacker.yaml", "l: {from: {type: scratch}}\n"),
    ]);
    let p = Plan::load_many(
        &[
            PathBuf::from("a/stacker.yaml"),
            PathBuf::from("b/stacker.yaml"),
        ],
        &crate::PlanOptions::default(),
        &files,
    )
    .unwrap();
    assert_eq!(p.files.len(), 3, "the shared prerequisite is loaded once");
    assert_eq!(names(&p), vec![vec!["l"], vec!["a", "b"]]);
}

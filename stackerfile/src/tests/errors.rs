//! One test per error: the message, the layer, the help, and the exact position.

use std::path::PathBuf;

use super::{errors, plan_files};
use crate::{Diagnostic, Substitutions};

/// The single error of `text`, checked for line, column, layer and a message fragment.
fn one(text: &str, line: usize, col: usize, layer: Option<&str>, fragment: &str) -> Diagnostic {
    let e = errors(text);
    assert_eq!(e.diagnostics.len(), 1, "expected one error, got:\n{e}");
    let d = e.diagnostics[0].clone();
    assert!(
        d.message.contains(fragment),
        "message {:?} lacks {fragment:?}",
        d.message
    );
    assert_eq!((d.pos.line, d.pos.col), (line, col), "position of: {d}");
    assert_eq!(d.layer.as_deref(), layer, "layer of: {d}");
    assert_eq!(d.file, PathBuf::from("stacker.yaml"));
    d
}

#[test]
fn yaml_syntax() {
    let d = one(
        "a:\n  from: {type: scratch\n  run: x\n",
        3,
        6,
        None,
        "YAML:",
    );
    assert!(d.to_string().starts_with("stacker.yaml:3:6: error: YAML:"));
}

#[test]
fn yaml_duplicate_key_points_at_both() {
    let d = one(
        "a:\n  from: {type: scratch}\n  run: x\n  run: y\n",
        4,
        3,
        None,
        "duplicate key 'run'",
    );
    assert_eq!(
        d.help.as_deref(),
        Some("the first one is at stacker.yaml:3:3")
    );
}

#[test]
fn duplicate_layer_in_one_file() {
    let d = one(
        "a:\n  from: {type: scratch}\na:\n  from: {type: scratch}\n",
        3,
        1,
        None,
        "duplicate key 'a'",
    );
    assert!(d.help.unwrap().contains("stacker.yaml:1:1"));
}

#[test]
fn unknown_key_with_suggestion() {
    let d = one(
        "app:\n  from: {type: scratch}\n  improts: [x]\n",
        3,
        3,
        Some("app"),
        "unknown key 'improts'",
    );
    assert_eq!(d.help.as_deref(), Some("did you mean 'imports'?"));
}

#[test]
fn unknown_key_without_close_match_lists_keys() {
    let d = one(
        "app:\n  from: {type: scratch}\n  zzzzzzzz: 1\n",
        3,
        3,
        Some("app"),
        "unknown key 'zzzzzzzz'",
    );
    assert!(d.help.unwrap().contains("known keys: from, imports"));
}

#[test]
fn unknown_key_under_from() {
    let d = one(
        "app:\n  from:\n    type: docker\n    ulr: docker://x/y\n",
        4,
        5,
        Some("app"),
        "unknown key 'ulr' under 'from'",
    );
    assert_eq!(d.help.as_deref(), Some("did you mean 'url'?"));
}

#[test]
fn wrong_type() {
    let d = one(
        "app:\n  from: {type: scratch}\n  environment: [A=1]\n",
        3,
        16,
        Some("app"),
        "'environment' must be a map, not a list",
    );
    assert!(d.help.unwrap().contains("NAME: value"));
    one(
        "app:\n  from: {type: scratch}\n  build_only: maybe\n",
        3,
        15,
        Some("app"),
        "'build_only' must be true or false, not 'maybe'",
    );
    one(
        "app:\n  from: {type: scratch}\n  run: {a: 1}\n",
        3,
        8,
        Some("app"),
        "'run' must be a string or a list of strings, not a map",
    );
    one(
        "app:\n  from: {type: scratch}\n  volumes: /data\n",
        3,
        12,
        Some("app"),
        "'volumes' must be a list of strings",
    );
    one(
        "app:\n  from: scratch\n",
        2,
        9,
        Some("app"),
        "'from' must be a map, not a scalar",
    );
    one(
        "app: [1, 2]\n",
        1,
        6,
        Some("app"),
        "a layer must be a map of keys, not a list",
    );
    one(
        "- a\n- b\n",
        1,
        1,
        None,
        "a stackerfile must be a map of layer names to layers",
    );
}

#[test]
fn missing_from() {
    let d = one(
        "base:\n  from: {type: scratch}\napp:\n  run: echo\n",
        3,
        1,
        Some("app"),
        "missing 'from'",
    );
    assert!(d.help.unwrap().contains("type: built"));
}

#[test]
fn from_without_type() {
    one(
        "app:\n  from:\n    url: docker://x/y\n",
        3,
        5,
        Some("app"),
        "'from' has no 'type'",
    );
}

#[test]
fn built_without_tag() {
    let d = one(
        "app:\n  from:\n    type: built\n",
        3,
        5,
        Some("app"),
        "'from' of type 'built' needs a 'tag'",
    );
    assert!(d.help.unwrap().contains("tag: base"));
}

#[test]
fn docker_without_url_and_bad_url() {
    one(
        "app:\n  from:\n    type: docker\n",
        3,
        5,
        Some("app"),
        "'from' of type 'docker' needs a 'url'",
    );
    one(
        "app:\n  from:\n    type: docker\n    url: alpine:3\n",
        4,
        10,
        Some("app"),
        "'alpine:3' is not a docker URL",
    );
    one(
        "app:\n  from:\n    type: docker\n    url: oci:layout\n",
        4,
        10,
        Some("app"),
        "'layout' is not an OCI layout URL PATH:TAG",
    );
}

#[test]
fn oci_url_without_a_tag() {
    let d = one(
        "app:\n  from:\n    type: oci\n    url: layout\n",
        4,
        10,
        Some("app"),
        "'layout' is not an OCI layout URL PATH:TAG",
    );
    assert!(d.help.unwrap().contains("url: oci:base"));
}

#[test]
fn unknown_from_type() {
    let d = one(
        "app:\n  from:\n    type: dokcer\n    url: docker://x/y\n",
        3,
        11,
        Some("app"),
        "unknown 'from' type 'dokcer'",
    );
    assert!(d.help.unwrap().starts_with("did you mean 'docker'?"));
}

#[test]
fn colon_in_layer_name() {
    let d = one(
        "app:v1:\n  from: {type: scratch}\n",
        1,
        1,
        Some("app:v1"),
        "must not contain ':'",
    );
    assert!(d.help.unwrap().contains("app-v1"));
}

#[test]
fn malformed_hash() {
    let d = one(
        "app:\n  from: {type: scratch}\n  imports:\n    - path: x\n      hash: 1234\n",
        5,
        13,
        Some("app"),
        "'1234' is not a sha256 hash",
    );
    assert!(d.help.unwrap().contains("sha256sum"));
}

#[test]
fn relative_dest() {
    let d = one(
        "app:\n  from: {type: scratch}\n  imports:\n    - path: x\n      dest: usr/bin\n",
        5,
        13,
        Some("app"),
        "'dest' must be an absolute path in the image, not 'usr/bin'",
    );
    assert_eq!(d.help.as_deref(), Some("write /usr/bin"));
}

#[test]
fn import_and_imports_together() {
    let e = errors("app:\n  from: {type: scratch}\n  import: [a]\n  imports: [b]\n");
    let d = e
        .diagnostics
        .iter()
        .find(|d| d.message.contains("cannot both"))
        .expect("an error for import+imports");
    assert_eq!((d.pos.line, d.pos.col), (3, 3));
}

#[test]
fn import_map_without_path_and_nested_list() {
    one(
        "app:\n  from: {type: scratch}\n  imports:\n    - dest: /x\n",
        4,
        7,
        Some("app"),
        "has no 'path'",
    );
    one(
        "app:\n  from: {type: scratch}\n  imports:\n    - [a, b]\n",
        4,
        7,
        Some("app"),
        "a nested list inside 'imports'",
    );
}

#[test]
fn bad_mode_and_uid() {
    one(
        "app:\n  from: {type: scratch}\n  imports:\n    - path: x\n      mode: 0999\n",
        5,
        13,
        Some("app"),
        "'mode' must be a number (octal",
    );
    one(
        "app:\n  from: {type: scratch}\n  imports:\n    - path: x\n      uid: root\n",
        5,
        12,
        Some("app"),
        "'uid' must be a number",
    );
}

#[test]
fn bad_stacker_url() {
    one(
        "app:\n  from: {type: scratch}\n  imports:\n    - stacker://onlyname\n",
        4,
        7,
        Some("app"),
        "not a valid stacker:// reference",
    );
}

#[test]
fn empty_os_and_arch() {
    one(
        "app:\n  from: {type: scratch}\n  os: ''\n",
        3,
        7,
        Some("app"),
        "'os' must not be empty",
    );
    one(
        "app:\n  from: {type: scratch}\n  arch:\n",
        3,
        3,
        Some("app"),
        "'arch' must not be empty",
    );
}

#[test]
fn bad_passthrough_regex() {
    one(
        "app:\n  from: {type: scratch}\n  build_env_passthrough: ['(']\n",
        3,
        27,
        Some("app"),
        "not a valid regular expression",
    );
}

#[test]
fn bind_forms_errors() {
    one(
        "app:\n  from: {type: scratch}\n  binds:\n    - dest: /x\n",
        4,
        7,
        Some("app"),
        "a bind needs a 'source'",
    );
    one(
        "app:\n  from: {type: scratch}\n  binds:\n    - source: /a\n      target: /b\n",
        5,
        7,
        Some("app"),
        "unknown key 'target' in a bind",
    );
}

#[test]
fn overlay_dirs_errors() {
    one(
        "app:\n  from: {type: scratch}\n  overlay_dirs:\n    - dest: /x\n",
        4,
        7,
        Some("app"),
        "needs a 'source'",
    );
    one(
        "app:\n  from: {type: scratch}\n  overlay_dirs:\n    - source: d\n      dest: opt\n",
        5,
        13,
        Some("app"),
        "'dest' must be an absolute path",
    );
}

#[test]
fn missing_dependency_names_it_and_suggests() {
    let d = one(
        "base:\n  from: {type: scratch}\napp:\n  from:\n    type: built\n    tag: bsae\n",
        6,
        10,
        Some("app"),
        "depends on 'bsae', which is not defined",
    );
    assert_eq!(d.help.as_deref(), Some("did you mean 'base'?"));
    one(
        "app:\n  from: {type: scratch}\n  imports:\n    - stacker://nothere/x\n",
        4,
        7,
        Some("app"),
        "depends on 'nothere'",
    );
}

#[test]
fn cycle_names_its_members() {
    let d = one(
        "a:\n  from: {type: built, tag: c}\nb:\n  from: {type: built, tag: a}\n\
         c:\n  from: {type: scratch}\n  imports: [stacker://b/x]\nfree:\n  from: {type: scratch}\n",
        2,
        28,
        Some("a"),
        "dependency cycle: a -> c -> b -> a",
    );
    assert!(d.help.is_some());
    one(
        "self:\n  from: {type: built, tag: self}\n",
        2,
        28,
        Some("self"),
        "dependency cycle: self -> self",
    );
}

#[test]
fn missing_substitution_names_it_at_its_original_position() {
    let e = errors("app:\n  from: {type: scratch}\n  run: echo ${{WHO}} ${{NOPE}}\n");
    assert_eq!(e.diagnostics.len(), 2);
    assert!(
        e.diagnostics[0]
            .message
            .contains("no value for substitution 'WHO'")
    );
    assert_eq!(
        (e.diagnostics[0].pos.line, e.diagnostics[0].pos.col),
        (3, 13)
    );
    assert!(e.diagnostics[1].message.contains("'NOPE'"));
    assert_eq!(e.diagnostics[1].pos.col, 22);
    assert!(
        e.diagnostics[0]
            .help
            .as_ref()
            .unwrap()
            .contains("--substitute WHO=VALUE")
    );
}

#[test]
fn positions_after_a_substitution_refer_to_the_original_text() {
    // The value is much longer than the placeholder; the error after it on the same
    // line must still point at the original column.
    let e = plan_files(
        &[(
            "stacker.yaml",
            "app:\n  from: {type: ${{T}}, tag: x, url: docker://a/b, zzz: 1}\n",
        )],
        super::subs(&[("T", "docker")]),
    )
    .unwrap_err();
    let d = &e.diagnostics[0];
    assert!(d.message.contains("unknown key 'zzz'"), "{d}");
    assert_eq!((d.pos.line, d.pos.col), (2, 51));
}

#[test]
fn missing_prerequisite_names_the_entry() {
    let e = plan_files(
        &[(
            "stacker.yaml",
            "config:\n  prerequisites:\n    - ../base/stacker.yaml\napp:\n  from: {type: scratch}\n",
        )],
        Substitutions::default(),
    )
    .unwrap_err();
    let d = &e.diagnostics[0];
    assert_eq!(d.file, PathBuf::from("stacker.yaml"));
    assert_eq!((d.pos.line, d.pos.col), (3, 7));
    assert!(
        d.message
            .contains("cannot read prerequisite stackerfile ../base/stacker.yaml"),
        "{d}"
    );
    assert!(d.help.as_ref().unwrap().contains("relative to the file"));
}

#[test]
fn prerequisite_cycle_names_the_files() {
    let e = plan_files(
        &[
            (
                "a.yaml",
                "config: {prerequisites: [b.yaml]}\na: {from: {type: scratch}}\n",
            ),
            (
                "b.yaml",
                "config: {prerequisites: [c.yaml]}\nb: {from: {type: scratch}}\n",
            ),
            (
                "c.yaml",
                "config: {prerequisites: [a.yaml]}\nc: {from: {type: scratch}}\n",
            ),
        ],
        Substitutions::default(),
    )
    .unwrap_err();
    let d = &e.diagnostics[0];
    assert!(
        d.message
            .contains("prerequisite cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml"),
        "{d}"
    );
    assert_eq!(d.file, PathBuf::from("c.yaml"));
}

#[test]
fn duplicate_layer_across_files_names_both() {
    let e = plan_files(
        &[
            (
                "top.yaml",
                "config: {prerequisites: [lib.yaml]}\nbase: {from: {type: scratch}}\n",
            ),
            (
                "lib.yaml",
                "x: {from: {type: scratch}}\nbase: {from: {type: scratch}}\n",
            ),
        ],
        Substitutions::default(),
    )
    .unwrap_err();
    let d = &e.diagnostics[0];
    assert_eq!(
        d.message,
        "layer 'base' is defined in both lib.yaml and top.yaml"
    );
    assert_eq!((d.file.clone(), d.pos.line), (PathBuf::from("top.yaml"), 2));
    assert!(d.help.as_ref().unwrap().contains("lib.yaml:2:1"));
}

#[test]
fn dependency_on_a_file_that_is_not_a_prerequisite() {
    // c.yaml is loaded (as a prerequisite of top) but lib.yaml does not name it.
    let e = plan_files(
        &[
            (
                "top.yaml",
                "config: {prerequisites: [lib.yaml, c.yaml]}\nt: {from: {type: scratch}}\n",
            ),
            ("lib.yaml", "l: {from: {type: built, tag: c}}\n"),
            ("c.yaml", "c: {from: {type: scratch}}\n"),
        ],
        Substitutions::default(),
    )
    .unwrap_err();
    let d = &e.diagnostics[0];
    assert!(
        d.message.contains("defined in c.yaml, not in this file"),
        "{d}"
    );
    assert_eq!(
        d.help.as_deref(),
        Some("add c.yaml to config.prerequisites of lib.yaml")
    );
}

#[test]
fn errors_are_collected_not_just_the_first() {
    let e = errors(
        "a:\n  from: {type: scratch}\n  improts: x\nb:\n  run: x\nc:\n  from: {type: nope}\n",
    );
    assert_eq!(e.diagnostics.len(), 3, "{e}");
}

#[test]
fn a_stackerfile_over_the_size_limit_is_refused_and_says_how_to_raise_it() {
    use crate::{Plan, PlanOptions};
    let big = format!(
        "a:\n  from: {{type: scratch}}\n  run: |\n{}",
        "    echo x\n".repeat(200)
    );
    let files = super::MemFiles::with(&[
        ("stacker.yaml", "config: {prerequisites: [big.yaml]}\n"),
        ("big.yaml", &big),
    ]);
    let options = PlanOptions {
        max_file_size: 1024,
        ..PlanOptions::default()
    };
    let e = Plan::load("stacker.yaml".as_ref(), &options, &files).unwrap_err();
    assert_eq!(e.diagnostics.len(), 1, "{e}");
    let d = &e.diagnostics[0];
    // Reported where the prerequisite is named, naming the file, its size and the limit.
    assert_eq!(d.file, PathBuf::from("stacker.yaml"));
    assert_eq!((d.pos.line, d.pos.col), (1, 26), "{d}");
    assert!(
        d.message.contains(
            "prerequisite stackerfile big.yaml: 2.2 KiB is over the stackerfile size limit of 1 KiB"
        ),
        "{d}"
    );
    assert!(
        d.help
            .as_deref()
            .unwrap()
            .contains("--max-stackerfile-size"),
        "{d}"
    );
    // Raised, it plans; the default (1 MiB) holds it too.
    let options = PlanOptions {
        max_file_size: 4096,
        ..PlanOptions::default()
    };
    assert!(Plan::load("stacker.yaml".as_ref(), &options, &files).is_ok());
    assert!(Plan::load("stacker.yaml".as_ref(), &PlanOptions::default(), &files).is_ok());
}

#[test]
fn the_local_files_source_refuses_a_large_file_without_reading_it() {
    use crate::{FileSource, LocalFiles};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yaml");
    std::fs::write(&path, "x".repeat(5000)).unwrap();
    let e = LocalFiles.read_limited(&path, 4999).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge);
    assert_eq!(LocalFiles.read_limited(&path, 5000).unwrap().len(), 5000);
}

/// A chain of prerequisites deeper than any real one is refused with an error naming
/// the limit, not followed until the planning thread's stack overflows (which aborts
/// the coordinator: a submission could list 100,000 files, each naming the next). Run
/// on a 2 MiB stack, as the coordinator's blocking threads have.
#[test]
fn a_prerequisite_chain_too_deep_is_an_error_not_a_stack_overflow() {
    let chain = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| {
                let text = if i + 1 < n {
                    format!("config:\n  prerequisites:\n    - f{}.yaml\nl{i}:\n  from: {{type: scratch}}\n", i + 1)
                } else {
                    format!("l{i}:\n  from: {{type: scratch}}\n")
                };
                (format!("f{i}.yaml"), text)
            })
            .collect()
    };
    let plan_on_small_stack = |files: Vec<(String, String)>| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let refs: Vec<(&str, &str)> = files
                    .iter()
                    .map(|(p, t)| (p.as_str(), t.as_str()))
                    .collect();
                plan_files(&refs, Substitutions::default()).map(|p| p.layers.len())
            })
            .unwrap()
            .join()
            .unwrap()
    };
    let deepest = crate::load::MAX_PREREQUISITE_DEPTH;
    assert_eq!(plan_on_small_stack(chain(deepest)).unwrap(), deepest);
    let e = plan_on_small_stack(chain(20_000)).unwrap_err().to_string();
    assert!(e.contains(&format!("more than {deepest} deep")), "{e}");
}

/// More stackerfiles than a plan may load together are refused once, naming the limit
/// (planning keeps a table of which file sees which: 100,000 files, as a context may
/// hold, would have needed 10 GB).
#[test]
fn too_many_stackerfiles_loaded_together_are_refused_once() {
    let n = crate::load::MAX_FILES + 10;
    let mut files: Vec<(String, String)> = vec![(
        "entry.yaml".into(),
        std::iter::once("config:\n  prerequisites:\n".to_string())
            .chain((0..n).map(|i| format!("    - f{i}.yaml\n")))
            .collect(),
    )];
    files.extend((0..n).map(|i| {
        (
            format!("f{i}.yaml"),
            format!("l{i}:\n  from: {{type: scratch}}\n"),
        )
    }));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let e = plan_files(&refs, Substitutions::default()).unwrap_err();
    let limit: Vec<_> = e
        .diagnostics
        .iter()
        .filter(|d| {
            d.message.contains(&format!(
                "more than {} stackerfiles",
                crate::load::MAX_FILES
            ))
        })
        .collect();
    assert_eq!(limit.len(), 1, "{e}");
    // Just under the limit plans.
    let m = crate::load::MAX_FILES - 1;
    let refs: Vec<(&str, &str)> = refs[..=m].iter().map(|&(p, t)| (p, t)).collect();
    let mut entry = String::from("config:\n  prerequisites:\n");
    for i in 0..m {
        entry.push_str(&format!("    - f{i}.yaml\n"));
    }
    let mut files = refs.clone();
    files[0] = ("entry.yaml", entry.as_str());
    assert_eq!(
        plan_files(&files, Substitutions::default())
            .unwrap()
            .layers
            .len(),
        m
    );
}

/// Only the first missing layer names get a "did you mean" (each suggestion compares
/// the name with every layer; thousands of them took seconds).
#[test]
fn only_the_first_missing_names_get_a_suggestion() {
    let mut text = String::new();
    for i in 0..30 {
        text.push_str(&format!("layer{i}:\n  from: {{type: scratch}}\n"));
        text.push_str(&format!("use{i}:\n  from: {{type: built, tag: layr{i}}}\n"));
    }
    let e = errors(&text);
    let suggested = e
        .diagnostics
        .iter()
        .filter(|d| {
            d.help
                .as_deref()
                .is_some_and(|h| h.starts_with("did you mean"))
        })
        .count();
    assert_eq!(e.diagnostics.len(), 30, "{e}");
    assert_eq!(suggested, 20, "{e}");
}

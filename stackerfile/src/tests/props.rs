//! Properties: arbitrary input never panics; canonical definitions round-trip.

use proptest::prelude::*;

use super::plan_files;
use crate::{CanonicalLayer, Substitutions};

const SEED: &str = "config:\n  prerequisites: [lib.yaml]\n\
app:\n  from:\n    type: built\n    tag: base\n  imports:\n    - conf/\n    - path: stacker://base/x\n      \
dest: /usr/bin/\n      mode: 0755\n  run: |\n    echo ${{MSG:hi}} $HOME\n  cmd: /bin/app -x\n  \
environment: {A: 1}\n  binds: [/a -> /b]\n  overlay_dirs: [{source: o}]\n  labels: {x: y}\n  \
build_env_passthrough: ['^X.*']\n";
const LIB: &str = "base:\n  from: {type: tar, url: r.tar}\n";

fn run(text: &str) {
    let _ = plan_files(
        &[("stacker.yaml", text), ("lib.yaml", LIB)],
        Substitutions::default(),
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        run(&text);
    }

    #[test]
    fn yaml_shaped_text_never_panics(text in "([a-z:{}\\[\\], '\"\\-#&*!|>~$]|\n  |\n    |\\$\\{\\{){0,120}") {
        run(&text);
    }

    #[test]
    fn mutated_stackerfiles_never_panic(
        cuts in proptest::collection::vec((0usize..SEED.len(), 0usize..8, "[ -~\n]{0,4}"), 1..6)
    ) {
        let mut text = SEED.as_bytes().to_vec();
        for (at, len, insert) in cuts {
            let at = at.min(text.len());
            let end = (at + len).min(text.len());
            text.splice(at..end, insert.bytes());
        }
        run(&String::from_utf8_lossy(&text));
    }

    #[test]
    fn canonical_definitions_round_trip(env in proptest::collection::btree_map("[A-Z]{1,5}", "[ -#%-~]{0,10}", 0..5),
                                        run_lines in proptest::collection::vec("[ -#%-~]{0,20}", 0..4),
                                        vols in proptest::collection::vec("/[a-z]{1,5}", 0..4)) {
        let mut text = String::from("app:\n  from: {type: scratch}\n  environment:\n");
        for (k, v) in &env {
            text.push_str(&format!("    {k}: {}\n", serde_json::to_string(v).unwrap()));
        }
        if !run_lines.is_empty() {
            text.push_str("  run:\n");
            for l in &run_lines {
                text.push_str(&format!("    - {}\n", serde_json::to_string(l).unwrap()));
            }
        }
        text.push_str(&format!("  volumes: {}\n", serde_json::to_string(&vols).unwrap()));
        let plan = plan_files(&[("stacker.yaml", &text)], Substitutions::default())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let layer = &plan.layers[0];
        prop_assert_eq!(&layer.layer.environment, &env);
        let json = layer.canonical.to_json();
        let back = CanonicalLayer::from_json(&json).unwrap();
        prop_assert_eq!(&back, &layer.canonical);
        prop_assert_eq!(back.digest(), layer.definition_digest.clone());
        prop_assert_eq!(back.to_json(), json);
    }
}

#[test]
fn the_seed_itself_plans() {
    let p = plan_files(
        &[("stacker.yaml", SEED), ("lib.yaml", LIB)],
        Substitutions::default(),
    )
    .unwrap();
    assert_eq!(p.layers.len(), 2);
}

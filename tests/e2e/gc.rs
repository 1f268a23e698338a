//! `farm gc` on the embedded state: a dry run says what a collection then removes, a
//! collection removes exactly that, and what is left still builds.

use std::fs;
use std::path::Path;

use crate::util::*;

/// The blobs of a state dir's store.
fn blob_files(state: &Path) -> Vec<String> {
    let dir = state.join("blobs/blobs/sha256");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64)
        .collect();
    v.sort();
    v
}

/// The number after `word` in `text`.
fn number_after(text: &str, word: &str) -> u64 {
    let at = text
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in:\n{text}"));
    text[at + word.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in:\n{text}"))
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

#[test]
fn farm_gc_dry_run_then_gc_after_two_builds_one_expired() {
    let Some(e) = e2e() else { return };
    let t = TestDir::new(e, "gc", Who::User);
    t.write(
        "a.yaml",
        "a:\n  from:\n    type: tar\n    url: busybox.tar\n  imports:\n    - a.txt\n  \
         run: cp /stacker/imports/a.txt /a\n",
    );
    t.write("a.txt", "aaa\n");
    t.write(
        "b.yaml",
        "b:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo b > /b\n",
    );
    t.build(&["-f", "a.yaml"]).assert_ok();
    let a_layers = t.oci().layer_digests("a");
    t.build(&["-f", "b.yaml"]).assert_ok();
    let b_layers = t.oci().layer_digests("b");
    let b_config = t.oci().manifest("b")["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // a's cache entry was last used 60 days ago: past the default --cache-max-age (30d).
    let db = t.state.join("cache.db");
    let a_top = a_layers.last().unwrap();
    // (python3's sqlite3: CI installs python3, not the sqlite3 shell.)
    let changed = output_ok(
        t.command(&[], "python3")
            .arg("-c")
            .arg(
                "import sqlite3, sys\n\
                 db = sqlite3.connect(sys.argv[1])\n\
                 n = db.execute(\"UPDATE action_cache SET last_used = last_used - 60 * 86400 \
                 WHERE value LIKE ?\", ('%' + sys.argv[2] + '%',)).rowcount\n\
                 db.commit()\n\
                 print(n)",
            )
            .arg(&db)
            .arg(a_top),
    );
    assert_eq!(changed.trim(), "1", "a's cache entry");

    // Old enough with no grace; the builds are forgotten, so only the cache keeps blobs.
    let gc = |extra: &[&str]| {
        let mut args: Vec<String> = ["gc", "--state-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(t.state.display().to_string());
        for a in ["--gc-grace", "0s", "--keep-builds", "0"]
            .iter()
            .chain(extra)
        {
            args.push(a.to_string());
        }
        let r = t.farm_env(&args, &[]);
        r.assert_ok();
        r
    };
    let log_files = || {
        std::fs::read_dir(t.state.join("logs"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(
        log_files(),
        2,
        "each build keeps its log in the state's logs/"
    );
    let before = blob_files(&t.state);
    let dry = gc(&["--dry-run"]);
    assert_eq!(
        number_after(&dry.stdout, "would forget"),
        2,
        "{}",
        dry.stdout
    );
    assert_eq!(
        number_after(&dry.stdout, "would evict"),
        1,
        "{}",
        dry.stdout
    );
    let would = number_after(&dry.stdout, "would remove");
    assert!(would > 0, "{}", dry.stdout);
    assert_eq!(blob_files(&t.state), before, "a dry run removed blobs");
    assert_eq!(log_files(), 2, "a dry run removed logs");

    let wet = gc(&[]);
    assert_eq!(number_after(&wet.stdout, "evicted"), 1, "{}", wet.stdout);
    assert_eq!(
        number_after(&wet.stdout, "removed"),
        would,
        "the dry run said {}\nthe collection said {}",
        dry.stdout,
        wet.stdout
    );
    let after = blob_files(&t.state);
    assert_eq!(after.len() as u64, before.len() as u64 - would);
    assert_eq!(log_files(), 0, "the forgotten builds' logs stayed");
    // a's layer went with its entry; b's image stays (its entry references it).
    assert!(!after.contains(&hex(a_top)), "{after:?}");
    for d in b_layers.iter().chain([&b_config]) {
        assert!(after.contains(&hex(d)), "{d} of b is gone: {after:?}");
    }
    // Nothing is left to collect.
    let again = gc(&[]);
    assert_eq!(
        number_after(&again.stdout, "removed"),
        0,
        "{}",
        again.stdout
    );

    // What is left still builds: b from the cache, a again.
    let r = t.build(&["-f", "b.yaml"]);
    r.assert_ok();
    assert_states(&r, &[("b", "cached")]);
    let r = t.build(&["-f", "a.yaml"]);
    r.assert_ok();
    assert_states(&r, &[("a", "built")]);
}

#[test]
fn farm_gc_on_a_machine_without_state_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("none");
    let r = farm(dir.path(), &["gc", "--state-dir", state.to_str().unwrap()]);
    assert!(r.status.success(), "{}", r.describe());
    assert!(r.stdout.contains("nothing to collect"), "{}", r.describe());
    assert!(!state.exists(), "farm gc made a state dir");
}

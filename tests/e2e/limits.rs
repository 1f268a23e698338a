//! Hostile inputs meet limits: each fails with its error in bounded memory.
//!
//! Peak memory is measured with `/usr/bin/time -f %M` (the `time` package, installed by
//! `.ci/run`) around the real `farm` binary, and asserted with generous headroom. No
//! timing is asserted.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::util::{Run, farm_bin, parse_diagnostics};

/// The most memory (KiB) a refused stackerfile may cost `farm plan`: the goal
/// is under 100 MB; a debug build gets twice that.
const PEAK_KIB: u64 = 200 * 1024;

/// Run `farm ARGS...` in `cwd` under `/usr/bin/time`; the run and its peak RSS in KiB.
fn farm_measured(cwd: &Path, args: &[&str]) -> (Run, u64) {
    let time = Path::new("/usr/bin/time");
    assert!(
        time.is_file(),
        "/usr/bin/time is missing (apt-get install time; .ci/run installs it)"
    );
    let report = cwd.join(".peak-rss");
    let out = Command::new(time)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&report)
        .arg(farm_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("running farm under /usr/bin/time");
    let text = std::fs::read_to_string(&report).expect("/usr/bin/time's report");
    // The last line is the number (a line before it may say the command failed).
    let kib = text
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no peak RSS in {text:?}"));
    let run = Run::from_output(args.iter().map(|s| s.to_string()).collect(), out);
    (run, kib)
}

/// A billion-laughs stackerfile: nine levels, each a list of nine aliases to the level
/// before (9^9 scalars if expanded), under 400 bytes.
fn alias_bomb() -> String {
    let names = "abcdefghi";
    let mut text = String::from("a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    for (prev, name) in names.chars().zip(names.chars().skip(1)) {
        let items = vec![format!("*{prev}"); 9].join(",");
        let _ = writeln!(text, "{name}: &{name} [{items}]");
    }
    text
}

#[test]
fn alias_bomb_is_refused_in_bounded_memory_naming_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let text = alias_bomb();
    assert!(text.len() < 400, "{} bytes", text.len());
    std::fs::write(dir.path().join("stacker.yaml"), &text).unwrap();
    let (run, kib) = farm_measured(dir.path(), &["plan", "stacker.yaml"]);
    let diags = run.errors();
    let d = diags
        .iter()
        .find(|d| d.message.contains("alias"))
        .unwrap_or_else(|| panic!("no alias error:\n{}", run.describe()));
    assert!(d.in_file("stacker.yaml"), "{}", d.raw);
    // The alias that crossed the budget: a `*x` on one of the lines, at its column.
    let line = text.lines().nth(d.line - 1).expect("the line exists");
    let at: String = line.chars().skip(d.col - 1).take(2).collect();
    assert!(
        at.starts_with('*'),
        "points at {at:?} in {line:?}: {}",
        d.raw
    );
    let name = &at[1..];
    assert!(
        d.message.contains(&format!("'*{name}'")) && d.message.contains(&format!("'&{name}'")),
        "names the alias and its anchor: {}",
        d.raw
    );
    assert!(
        d.help.as_deref().unwrap_or("").contains("the anchor is at"),
        "{}",
        d.raw
    );
    assert!(kib < PEAK_KIB, "farm plan peaked at {kib} KiB on the bomb");
}

#[test]
fn oversized_stackerfile_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stacker.yaml");
    // 64 MiB: a comment line repeated, written in pieces.
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(f, "l:\n  from:\n    type: scratch").unwrap();
        let line = format!("# {}\n", "x".repeat(1021));
        for _ in 0..64 * 1024 {
            f.write_all(line.as_bytes()).unwrap();
        }
    }
    let (run, kib) = farm_measured(dir.path(), &["plan", "stacker.yaml"]);
    assert!(!run.status.success(), "{}", run.describe());
    run.assert_stderr_contains("over the stackerfile size limit of 1 MiB");
    run.assert_stderr_contains("--max-stackerfile-size");
    assert!(kib < PEAK_KIB, "farm plan peaked at {kib} KiB");

    // Raised, the same file plans, and a 64 MiB file costs a bounded multiple of it.
    let (run, kib) = farm_measured(
        dir.path(),
        &["plan", "--max-stackerfile-size", "100M", "stacker.yaml"],
    );
    assert!(run.status.success(), "{}", run.describe());
    assert!(kib < 400 * 1024, "farm plan peaked at {kib} KiB on 64 MiB");
}

#[test]
fn many_duplicate_free_keys_plan_and_a_late_duplicate_is_found() {
    // 100,000 keys in one mapping: the duplicate check must not be quadratic (it was:
    // 5e9 comparisons here). No time is asserted; a quadratic check would not finish in
    // the test run's time.
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("l:\n  from:\n    type: scratch\n  environment:\n");
    for i in 0..100_000 {
        let _ = writeln!(text, "    K{i}: v");
    }
    let _ = writeln!(text, "    K7: again");
    std::fs::write(dir.path().join("stacker.yaml"), &text).unwrap();
    let (run, kib) = farm_measured(
        dir.path(),
        &["plan", "--max-stackerfile-size", "10M", "stacker.yaml"],
    );
    let diags = parse_diagnostics(&run.stderr);
    let d = diags
        .iter()
        .find(|d| d.message.contains("duplicate key 'K7'"))
        .unwrap_or_else(|| panic!("no duplicate key error:\n{}", run.describe()));
    assert_eq!(d.line, 100_000 + 5, "{}", d.raw);
    assert!(
        d.help.as_deref().unwrap_or("").contains(":12:"),
        "points at the first K7: {}",
        d.raw
    );
    assert!(kib < PEAK_KIB, "farm plan peaked at {kib} KiB");
}

/// `farm coordinator ... EXTRA` (the flags go after the ones `start_with` adds).
fn coordinator_with(dir: &Path, extra: &[&str]) -> crate::procs::Coordinator {
    std::fs::create_dir_all(dir).unwrap();
    let spec = crate::procs::CoordinatorSpec {
        state_dir: dir.join("state"),
        blobs: format!("file://{}", dir.join("blobs").display()),
        lease: None,
        metrics: false,
        port: None,
        inputs: Vec::new(),
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("exec \"$0\" \"$@\" {}", extra.join(" ")))
        .arg(farm_bin())
        .env_remove("RUST_LOG");
    crate::procs::Coordinator::start_with(&spec, cmd, &dir.join("coordinator.log"))
}

#[test]
fn a_coordinator_refuses_a_submission_over_its_limits_naming_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    // 2 KiB of stackerfile, importing three files: a context of four.
    let mut yaml = String::from("l:\n  from: {type: scratch}\n  imports: [a, b, c]\n");
    let _ = writeln!(yaml, "# {}", "x".repeat(2048));
    std::fs::write(ctx.join("stacker.yaml"), &yaml).unwrap();
    for f in ["a", "b", "c"] {
        std::fs::write(ctx.join(f), f).unwrap();
    }
    for (flag, value) in [
        ("--max-context-files", "2"),
        ("--max-stackerfile-size", "1K"),
    ] {
        let state = dir.path().join(flag.trim_start_matches('-'));
        let c = coordinator_with(&state, &[flag, value]);
        let run = crate::util::farm(
            &ctx,
            &[
                "submit",
                "--detach",
                "--coordinator",
                &c.addr,
                "stacker.yaml",
            ],
        );
        assert!(!run.status.success(), "{}", run.describe());
        run.assert_stderr_contains(&format!("farm coordinator {flag}"));
    }
}

//! Helpers shared by the e2e tests: finding and running the `farm` binary, reading its
//! diagnostics, locating text in fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The `farm` binary under test: `$FARM_BIN`, else `<target>/<profile>/farm` next to the
/// directory holding this test binary (`<target>/<profile>/deps/e2e-<hash>`).
pub fn farm_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FARM_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in <target>/<profile>/deps");
    profile_dir.join(format!("farm{}", std::env::consts::EXE_SUFFIX))
}

/// `tests/fixtures/<area>`.
pub fn fixtures(area: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(area)
}

/// The outcome of one run of `farm`.
pub struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `farm ARGS...` in `cwd`.
pub fn farm(cwd: &Path, args: &[&str]) -> Run {
    let bin = farm_bin();
    assert!(
        bin.is_file(),
        "farm binary not found at {} (build it, or set FARM_BIN)",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "farm {:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }

    /// Asserts success and parses stdout as exactly one JSON value.
    pub fn json(&self) -> serde_json::Value {
        assert!(
            self.status.success(),
            "expected success:\n{}",
            self.describe()
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}):\n{}", self.describe()))
    }

    /// Asserts failure and returns the `FILE:LINE:COL: error: ...` diagnostics on stderr
    /// (at least one).
    pub fn errors(&self) -> Vec<Diag> {
        assert!(
            !self.status.success(),
            "expected failure:\n{}",
            self.describe()
        );
        let diags = parse_diagnostics(&self.stderr);
        assert!(
            !diags.is_empty(),
            "no `FILE:LINE:COL: error: ...` line on stderr:\n{}",
            self.describe()
        );
        diags
    }

    /// The first diagnostic that satisfies `pred`, or a panic that shows all of stderr.
    pub fn error_where(&self, what: &str, pred: impl Fn(&Diag) -> bool) -> Diag {
        self.errors()
            .into_iter()
            .find(|d| pred(d))
            .unwrap_or_else(|| panic!("no error {what}:\n{}", self.describe()))
    }

    pub fn assert_stderr_contains(&self, needle: &str) {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.describe()
        );
    }
}

/// One `FILE:LINE:COL: error: [layer 'NAME': ]MESSAGE` line, with its `  help: ...` line.
#[derive(Debug, Clone)]
pub struct Diag {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub layer: Option<String>,
    pub message: String,
    pub help: Option<String>,
    /// The whole error line, plus its help line when there is one.
    pub raw: String,
}

impl Diag {
    /// The file is `name` (compares the last path components, not the whole path).
    pub fn in_file(&self, name: &str) -> bool {
        Path::new(&self.file).ends_with(name)
    }

    /// Message and help together, for "does it mention X" checks.
    pub fn text(&self) -> String {
        match &self.help {
            Some(h) => format!("{}\n{h}", self.message),
            None => self.message.clone(),
        }
    }

    pub fn at(&self) -> (usize, usize) {
        (self.line, self.col)
    }
}

pub fn parse_diagnostics(stderr: &str) -> Vec<Diag> {
    let lines: Vec<&str> = stderr.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(idx) = l.find(": error: ") else {
            continue;
        };
        let (loc, rest) = (&l[..idx], &l[idx + ": error: ".len()..]);
        let mut parts = loc.rsplitn(3, ':');
        let (Some(col), Some(line), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(line), Ok(col)) = (line.parse(), col.parse()) else {
            continue;
        };
        let (layer, message) = match rest
            .strip_prefix("layer '")
            .and_then(|r| r.find("': ").map(|end| (r, end)))
        {
            Some((r, end)) => (Some(r[..end].to_string()), r[end + 3..].to_string()),
            None => (None, rest.to_string()),
        };
        let help = lines
            .get(i + 1)
            .and_then(|n| n.strip_prefix("  help: "))
            .map(str::to_string);
        let raw = match &help {
            Some(h) => format!("{l}\n  help: {h}"),
            None => l.to_string(),
        };
        out.push(Diag {
            raw,
            file: file.to_string(),
            line,
            col,
            layer,
            message,
            help,
        });
    }
    out
}

/// 1-based (line, column) of the first occurrence of `needle` in `file` (ASCII fixtures).
pub fn locate(file: &Path, needle: &str) -> (usize, usize) {
    locate_nth(file, needle, 0)
}

/// 1-based (line, column) of occurrence number `nth` (0-based) of `needle` in `file`.
pub fn locate_nth(file: &Path, needle: &str, nth: usize) -> (usize, usize) {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let (offset, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} (#{nth}) not in {}", file.display()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Copy a directory tree (files and directories only).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// `path` made absolute against `cwd` and canonicalized.
pub fn resolve(cwd: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    abs.canonicalize()
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", abs.display()))
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn parses_diagnostics() {
        let d = parse_diagnostics(
            "warning: x\n/a/b.yaml:3:7: error: layer 'c:d': bad key `improts`\n  help: did you mean `imports`?\nsub/x.yaml:1:1: error: cycle\n",
        );
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].file, "/a/b.yaml");
        assert_eq!(d[0].at(), (3, 7));
        assert_eq!(d[0].layer.as_deref(), Some("c:d"));
        assert_eq!(d[0].message, "bad key `improts`");
        assert_eq!(d[0].help.as_deref(), Some("did you mean `imports`?"));
        assert!(d[0].in_file("b.yaml"));
        assert_eq!(d[1].layer, None);
        assert_eq!(d[1].help, None);
    }
}

//! Helpers shared by the e2e tests: finding and running the `farm` binary, reading its
//! diagnostics, locating text in fixtures; for the build tests, the shared rootless
//! environment (a user, a btrfs pool, busybox fixtures), per-test directories, and
//! readers of OCI layouts and layer tars.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `farm` binary under test: `$FARM_BIN`, else `<target>/<profile>/farm` next to the
/// directory holding this test binary (`<target>/<profile>/deps/e2e-<hash>`).
pub(crate) fn farm_bin() -> PathBuf {
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
pub(crate) fn fixtures(area: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(area)
}

/// The outcome of one run of `farm`.
pub(crate) struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `farm ARGS...` in `cwd`.
pub(crate) fn farm(cwd: &Path, args: &[&str]) -> Run {
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
    pub(crate) fn from_output(args: Vec<String>, out: std::process::Output) -> Run {
        Run {
            args,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "farm {:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }

    /// Asserts success and parses stdout as exactly one JSON value.
    pub(crate) fn json(&self) -> serde_json::Value {
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
    pub(crate) fn errors(&self) -> Vec<Diag> {
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
    pub(crate) fn error_where(&self, what: &str, pred: impl Fn(&Diag) -> bool) -> Diag {
        self.errors()
            .into_iter()
            .find(|d| pred(d))
            .unwrap_or_else(|| panic!("no error {what}:\n{}", self.describe()))
    }

    pub(crate) fn assert_stderr_contains(&self, needle: &str) {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.describe()
        );
    }
}

/// One `FILE:LINE:COL: error: [layer 'NAME': ]MESSAGE` line, with its `  help: ...` line.
#[derive(Debug, Clone)]
pub(crate) struct Diag {
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
    pub(crate) fn in_file(&self, name: &str) -> bool {
        Path::new(&self.file).ends_with(name)
    }

    /// Message and help together, for "does it mention X" checks.
    pub(crate) fn text(&self) -> String {
        match &self.help {
            Some(h) => format!("{}\n{h}", self.message),
            None => self.message.clone(),
        }
    }

    pub(crate) fn at(&self) -> (usize, usize) {
        (self.line, self.col)
    }
}

pub(crate) fn parse_diagnostics(stderr: &str) -> Vec<Diag> {
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
pub(crate) fn locate(file: &Path, needle: &str) -> (usize, usize) {
    locate_nth(file, needle, 0)
}

/// 1-based (line, column) of occurrence number `nth` (0-based) of `needle` in `file`.
pub(crate) fn locate_nth(file: &Path, needle: &str, nth: usize) -> (usize, usize) {
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
pub(crate) fn copy_tree(src: &Path, dst: &Path) {
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
pub(crate) fn resolve(cwd: &Path, path: &str) -> PathBuf {
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

// =======================================================================================
// The build tests' environment: run as root, they share (per machine) an unprivileged
// user with a subordinate id range, a loopback btrfs pool owned by it, and busybox
// fixtures; each test works in a directory of its own.
// =======================================================================================

/// The unprivileged user the rootless builds run as.
pub(crate) const E2E_USER: &str = "farm-e2e";
/// Everything the build tests make on the machine lives here.
pub(crate) const E2E_DIR: &str = "/var/tmp/farm-e2e";
/// Serialises the one-time set-up between test processes (nextest runs each test in a
/// process of its own, concurrently).
const SETUP_LOCK: &str = "/tmp/farm-e2e.lock";
/// PATH for every command the tests run.
pub(crate) const PATH_ENV: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Bumped when the fixtures below change shape, so stale ones are not reused.
const FIXTURES_VERSION: &str = "v1";
/// The mtime of every entry of the busybox rootfs tarball.
pub(crate) const ROOTFS_MTIME: u64 = 1_600_000_000;
/// The config the busybox OCI base image carries (see `make_busybox_oci`).
pub(crate) const BASE_PATH: &str = "PATH=/bin:/sbin:/usr/bin:/usr/sbin";

/// Tools the build tests run, with the Debian package that has them.
const TOOLS: &[(&str, &str)] = &[
    ("useradd", "passwd"),
    ("usermod", "passwd"),
    ("setpriv", "util-linux"),
    ("mount", "mount"),
    ("newuidmap", "uidmap"),
    ("newgidmap", "uidmap"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("runc", "runc"),
    ("oci-image-tool", "oci-image-tool"),
    ("tar", "tar"),
    ("getent", "libc-bin"),
];

/// What the build tests share on this machine.
#[derive(Debug)]
pub(crate) struct E2e {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// The user's btrfs pool, shared by every rootless test.
    pub pool: PathBuf,
    /// busybox root filesystem tarball (root-owned entries, mtimes ROOTFS_MTIME).
    pub rootfs_tar: PathBuf,
    /// OCI layout with the busybox rootfs tagged `busybox` (made with umoci, not farm).
    pub busybox_oci: PathBuf,
    /// The user's subordinate uid range (start, count).
    pub subuids: (u64, u64),
}

pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A test that cannot run here fails under `CI=true` and is skipped (saying why)
/// otherwise. Returns `None` for `let Some(..) = .. else { return }`.
pub(crate) fn cannot_run<T>(why: &str) -> Option<T> {
    if in_ci() {
        panic!("this test cannot run: {why} (CI=true: a test that cannot run is a failure)");
    }
    eprintln!("SKIPPED: {why}");
    None
}

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `prog` on PATH (or an absolute path that exists).
pub(crate) fn which(prog: &str) -> Option<PathBuf> {
    if prog.starts_with('/') {
        return Path::new(prog).exists().then(|| PathBuf::from(prog));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(PATH_ENV.split(':'))
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// The shared environment, set up once per process (and once per machine, under a file
/// lock); `None` (after saying why) when this machine cannot run the build tests.
pub(crate) fn e2e() -> Option<&'static E2e> {
    static ENV: OnceLock<Result<E2e, String>> = OnceLock::new();
    match ENV.get_or_init(|| {
        preconditions()?;
        Ok(with_setup_lock(set_up))
    }) {
        Ok(e) => Some(e),
        Err(why) => cannot_run(why),
    }
}

fn preconditions() -> Result<(), String> {
    if !is_root() {
        return Err(
            "the build tests must run as root (they create a user and mount a \
                    loopback btrfs pool)"
                .into(),
        );
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(t, _)| which(t).is_none())
        .map(|(t, p)| format!("{t} (package {p})"))
        .collect();
    if !missing.is_empty() {
        return Err(format!("missing tools: {}", missing.join(", ")));
    }
    match fs::read("/bin/busybox") {
        Err(e) => return Err(format!("/bin/busybox: {e} (install busybox-static)")),
        Ok(bytes) if elf_has_interpreter(&bytes) => {
            return Err("/bin/busybox is dynamically linked; install busybox-static".to_string());
        }
        Ok(_) => {}
    }
    let bin = farm_bin();
    if !bin.is_file() {
        return Err(format!(
            "farm binary not found at {} (build it, or set FARM_BIN)",
            bin.display()
        ));
    }
    Ok(())
}

/// Does this 64-bit little-endian ELF file have a PT_INTERP program header (dynamic)?
fn elf_has_interpreter(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == 3
    })
}

/// Run `f` holding an exclusive flock on SETUP_LOCK.
pub(crate) fn with_setup_lock<T>(f: impl FnOnce() -> T) -> T {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SETUP_LOCK)
        .unwrap_or_else(|e| panic!("opening {SETUP_LOCK}: {e}"));
    let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {SETUP_LOCK}: {e}"));
    let out = f();
    drop(file); // releases the lock
    out
}

/// Run a set-up command as root; panic with its output when it fails.
pub(crate) fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .env("PATH", PATH_ENV)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (uid, gid, home) of a user, or None.
pub(crate) fn lookup_user(name: &str) -> Option<(u32, u32, PathBuf)> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().ok()?, f[3].parse().ok()?, PathBuf::from(f[5])))
}

/// Make user `name` (with a home) unless it exists.
pub(crate) fn ensure_user(name: &str) -> (u32, u32, PathBuf) {
    if let Some(u) = lookup_user(name) {
        return u;
    }
    sh(Command::new("useradd").args(["-m", "-s", "/bin/sh", name]));
    lookup_user(name).unwrap_or_else(|| panic!("useradd -m {name} made no user"))
}

/// The first `NAME:START:COUNT` range of `name` in /etc/subuid (or /etc/subgid).
pub(crate) fn subid_range(file: &str, name: &str) -> Option<(u64, u64)> {
    fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.trim().split(':').collect();
        if f.len() != 3 || f[0] != name {
            return None;
        }
        Some((f[1].parse().ok()?, f[2].parse().ok()?))
    })
}

/// Is `dir` a mount point (per /proc/self/mountinfo), and with which fs type?
pub(crate) fn mount_fstype(dir: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(&unescape_mountinfo(f[4])) == dir).then(|| f[sep + 1].to_string())
    })
}

pub(crate) fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// A loopback btrfs pool for `user` at `pool`, made with `farm setup` unless mounted.
pub(crate) fn ensure_pool(user: &str, pool: &Path, size: &str) {
    if mount_fstype(pool).is_none() {
        let out = Command::new(farm_bin())
            .args(["setup", "--user", user, "--pool"])
            .arg(pool)
            .args(["--size", size])
            .env("PATH", PATH_ENV)
            .output()
            .expect("running farm setup");
        assert!(
            out.status.success(),
            "farm setup --user {user} --pool {} --size {size} failed ({}):\n{}\n{}",
            pool.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        mount_fstype(pool).as_deref(),
        Some("btrfs"),
        "{} should be a mounted btrfs after farm setup",
        pool.display()
    );
}

fn set_up() -> E2e {
    let root = Path::new(E2E_DIR);
    fs::create_dir_all(root.join("t")).expect("creating the e2e dir");
    for d in [root, &root.join("t")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (uid, gid, home) = ensure_user(E2E_USER);
    let pool = root.join("pool");
    ensure_pool(E2E_USER, &pool, "3G");
    let subuids = subid_range("/etc/subuid", E2E_USER)
        .unwrap_or_else(|| panic!("{E2E_USER} has no /etc/subuid range after farm setup"));

    let fixtures = root.join(format!("fixtures-{FIXTURES_VERSION}"));
    if !fixtures.join("ready").exists() {
        let tmp = root.join(format!("fixtures.tmp.{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap();
        make_rootfs_tar(&tmp.join("busybox-rootfs.tar"));
        make_busybox_oci(&tmp.join("busybox-rootfs.tar"), &tmp.join("busybox-oci"));
        fs::write(tmp.join("ready"), "").unwrap();
        sh(Command::new("chmod").arg("-R").arg("a+rX").arg(&tmp));
        let _ = fs::remove_dir_all(&fixtures);
        fs::rename(&tmp, &fixtures).unwrap();
    }
    E2e {
        user: E2E_USER.to_string(),
        uid,
        gid,
        home,
        pool,
        rootfs_tar: fixtures.join("busybox-rootfs.tar"),
        busybox_oci: fixtures.join("busybox-oci"),
        subuids,
    }
}

/// A tar header for `path` of `kind`, owned by root, with fixed mtime.
fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(ROOTFS_MTIME);
    h.set_size(size);
    h.set_cksum();
    h
}

/// The busybox root filesystem: /bin/busybox with its applet links, /etc/passwd, /etc/group
/// (like deploy/examples/hello/make-rootfs.sh, with fixed owners and mtimes).
pub(crate) fn make_rootfs_tar(out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    for (d, mode) in [
        ("bin/", 0o755),
        ("sbin/", 0o755),
        ("usr/", 0o755),
        ("usr/bin/", 0o755),
        ("usr/sbin/", 0o755),
        ("etc/", 0o755),
        ("root/", 0o700),
        ("tmp/", 0o1777),
    ] {
        b.append(&header(d, tar::EntryType::Directory, mode, 0), &[][..])
            .unwrap();
    }
    let bb = fs::read("/bin/busybox").unwrap();
    b.append(
        &header(
            "bin/busybox",
            tar::EntryType::Regular,
            0o755,
            bb.len() as u64,
        ),
        &bb[..],
    )
    .unwrap();
    let list = sh(Command::new("/bin/busybox").arg("--list-full"));
    let mut applets: Vec<&str> = list.lines().filter(|a| *a != "bin/busybox").collect();
    applets.sort();
    applets.dedup();
    for a in applets {
        let mut h = header(a, tar::EntryType::Symlink, 0o777, 0);
        h.set_link_name("/bin/busybox").unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    for (f, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ] {
        b.append(
            &header(f, tar::EntryType::Regular, 0o644, text.len() as u64),
            text.as_bytes(),
        )
        .unwrap();
    }
    b.into_inner().unwrap().sync_all().unwrap();
}

/// An OCI layout holding the busybox rootfs as `busybox`, made with umoci (as root), with
/// a config to inherit from: Env PATH and BASE_ENV, two labels, a volume, a Cmd.
fn make_busybox_oci(rootfs_tar: &Path, layout: &Path) {
    let image = format!("{}:busybox", layout.display());
    let bundle = layout.with_extension("bundle");
    sh(Command::new("umoci").args(["init", "--layout"]).arg(layout));
    sh(Command::new("umoci").args(["new", "--image", &image]));
    sh(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    sh(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(rootfs_tar)
        .arg("-C")
        .arg(bundle.join("rootfs")));
    sh(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    sh(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        BASE_PATH,
        "--config.env",
        "BASE_ENV=from-base",
        "--config.label",
        "base.label=base",
        "--config.label",
        "shared.label=base",
        "--config.volume",
        "/basevol",
        "--config.cmd",
        "/bin/echo",
        "--config.cmd",
        "base-cmd",
    ]));
    sh(Command::new("umoci").args(["gc", "--layout"]).arg(layout));
    fs::remove_dir_all(&bundle).unwrap();
}

/// A second pool for tests that need one nobody else uses at the same time (to check
/// that nothing is left in it).
pub(crate) fn private_pool(e: &E2e, name: &str) -> PathBuf {
    let pool = Path::new(E2E_DIR).join(name);
    with_setup_lock(|| ensure_pool(&e.user, &pool, "1G"));
    pool
}

// ---------------------------------------------------------------------------------------
// running things as the user
// ---------------------------------------------------------------------------------------

/// Who a test runs farm as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    /// The unprivileged e2e user, on the shared btrfs pool.
    User,
    /// root, with a pool on a plain directory of the test (the copy backend).
    Root,
}

/// `program` as the user `user` (uid = gid = name), with a clean environment plus `env`.
pub(crate) fn user_command(
    user: &str,
    home: &Path,
    env: &[(&str, &str)],
    program: &str,
) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        user,
        "--regid",
        user,
        "--init-groups",
        "env",
        "-i",
    ])
    .arg(format!("PATH={PATH_ENV}"))
    .arg(format!("HOME={}", home.display()));
    if program == "skopeo" {
        // skopeo looks for /run/containers/UID/auth.json when XDG_RUNTIME_DIR is unset, and
        // once root's podman has made /run/containers (0700) that is EACCES, not "none".
        c.arg(format!(
            "REGISTRY_AUTH_FILE={}",
            home.join(".config/containers/auth.json").display()
        ));
    }
    for (k, v) in env {
        c.arg(format!("{k}={v}"));
    }
    c.arg(program);
    c
}

/// The output of a finished command, checked for success.
pub(crate) fn output_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// chown -R (no symlink following).
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let m = fs::symlink_metadata(path).unwrap();
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if m.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

/// Copy a tree, keeping symlinks as symlinks and permission bits.
pub(crate) fn copy_tree_exact(src: &Path, dst: &Path) {
    let m = fs::symlink_metadata(src).unwrap();
    if m.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src).unwrap(), dst).unwrap();
    } else if m.is_dir() {
        fs::create_dir_all(dst).unwrap();
        for e in fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_tree_exact(&e.path(), &dst.join(e.file_name()));
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
    } else {
        fs::copy(src, dst).unwrap();
    }
}

/// One test's directory under /var/tmp/farm-e2e/t, owned by whoever runs farm in it,
/// holding `busybox.tar` (the rootfs tarball), the state dir `state/` and the output
/// layout `oci/`. Removed at the end unless the test failed (then its path is printed).
pub(crate) struct TestDir {
    pub e: &'static E2e,
    pub path: PathBuf,
    pub who: Who,
    pub pool: PathBuf,
    pub state: PathBuf,
    pub out: PathBuf,
}

impl TestDir {
    pub(crate) fn new(e: &'static E2e, name: &str, who: Who) -> TestDir {
        let path = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir_in(Path::new(E2E_DIR).join("t"))
            .expect("making the test dir")
            .keep();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let pool = match who {
            Who::User => e.pool.clone(),
            Who::Root => path.join("pool"),
        };
        let t = TestDir {
            e,
            state: path.join("state"),
            out: path.join("oci"),
            path,
            who,
            pool,
        };
        fs::copy(&e.rootfs_tar, t.path.join("busybox.tar")).unwrap();
        t.chown_all();
        t
    }

    pub(crate) fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    pub(crate) fn owner(&self) -> (u32, u32) {
        match self.who {
            Who::User => (self.e.uid, self.e.gid),
            Who::Root => (0, 0),
        }
    }

    pub(crate) fn chown_all(&self) {
        let (u, g) = self.owner();
        chown_tree(&self.path, u, g);
    }

    /// Write a file (making parents), owned by the test's user.
    pub(crate) fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, contents).unwrap();
        let (u, g) = self.owner();
        chown_tree(&p, u, g);
        p
    }

    /// Copy `tests/fixtures/build/NAME/*` into the test dir.
    pub(crate) fn fixture(&self, name: &str) {
        let src = fixtures("build").join(name);
        for e in fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
            let e = e.unwrap();
            copy_tree_exact(&e.path(), &self.path.join(e.file_name()));
        }
        self.chown_all();
    }

    /// A command run as the test's user (root: plain, with a clean environment).
    pub(crate) fn command(&self, env: &[(&str, &str)], program: &str) -> Command {
        let mut c = match self.who {
            Who::User => user_command(&self.e.user, &self.e.home, env, program),
            Who::Root => {
                let mut c = Command::new(program);
                c.env_clear()
                    .env("PATH", PATH_ENV)
                    .env("HOME", "/root")
                    .envs(env.iter().copied());
                c
            }
        };
        c.current_dir(&self.path);
        c
    }

    /// The `farm build` command line with this test's state dir, pool and output.
    pub(crate) fn build_args(&self, args: &[&str]) -> Vec<String> {
        self.build_args_at(&self.state, &self.out, args)
    }

    /// The `farm build` command line with state dir `state` and output `out`.
    pub(crate) fn build_args_at(&self, state: &Path, out: &Path, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec!["build".into()];
        for (flag, p) in [("--state-dir", state), ("--pool", &self.pool), ("-o", out)] {
            v.push(flag.into());
            v.push(p.display().to_string());
        }
        v.push("--substitute".into());
        v.push(format!("BUSYBOX_OCI={}", self.e.busybox_oci.display()));
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// `farm build ...` (see `build_args`) with `env` added to the clean environment.
    pub(crate) fn build_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        self.farm_env(&self.build_args(args), env)
    }

    pub(crate) fn build(&self, args: &[&str]) -> Run {
        self.build_env(args, &[])
    }

    /// Any farm command as the test's user.
    pub(crate) fn farm_env(&self, args: &[String], env: &[(&str, &str)]) -> Run {
        let bin = farm_bin();
        let out = self
            .command(env, bin.to_str().unwrap())
            .args(args)
            .output()
            .expect("running farm");
        Run::from_output(args.to_vec(), out)
    }

    /// The output layout.
    pub(crate) fn oci(&self) -> Oci {
        Oci::new(&self.out)
    }

    /// `umoci unpack` (rootless for the user) of TAG of `layout` into BUNDLE (a new dir in
    /// the test dir); returns the bundle path.
    pub(crate) fn unpack(&self, layout: &Path, tag: &str, bundle: &str) -> PathBuf {
        let b = self.join(bundle);
        let mut c = self.command(&[], "umoci");
        c.arg("unpack");
        if self.who == Who::User {
            c.arg("--rootless");
        }
        c.arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&b);
        output_ok(&mut c);
        b
    }

    /// Run TAG's entrypoint with runc (rootless for the user); returns its stdout.
    pub(crate) fn runc_run(&self, layout: &Path, tag: &str) -> String {
        let bundle = self.unpack(layout, tag, &format!("runc-bundle-{tag}"));
        let cfg_path = bundle.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
        cfg["process"]["terminal"] = Value::Bool(false);
        fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let id = format!(
            "farm-e2e-{}-{}",
            std::process::id(),
            self.path.file_name().unwrap().to_string_lossy()
        );
        let root = self.join("runc-root");
        let mut c = self.command(&[], "runc");
        c.arg("--root")
            .arg(&root)
            .args(["run", "-b"])
            .arg(&bundle)
            .arg(id);
        c.stdin(std::process::Stdio::null());
        output_ok(&mut c)
    }

    /// `oci-image-tool validate` of TAG (copied alone into a layout of its own first:
    /// Debian's oci-image-tool mishandles several tags in one index.json).
    pub(crate) fn validate(&self, layout: &Path, tag: &str) {
        let single = self.join(&format!("validate-{tag}"));
        output_ok(self.command(&[], "skopeo").args([
            "copy".to_string(),
            "--quiet".into(),
            format!("oci:{}:{tag}", layout.display()),
            format!("oci:{}:{tag}", single.display()),
        ]));
        let out = output_ok(
            self.command(&[], "oci-image-tool")
                .args(["validate", "--type", "image", "--ref"])
                .arg(format!("name={tag}"))
                .arg(&single),
        );
        assert!(out.contains("Validation succeeded"), "{out}");
    }

    /// `skopeo inspect oci:LAYOUT:TAG`.
    pub(crate) fn skopeo_inspect(&self, layout: &Path, tag: &str) -> Value {
        let out = output_ok(
            self.command(&[], "skopeo")
                .arg("inspect")
                .arg(format!("oci:{}:{tag}", layout.display())),
        );
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("FARM_E2E_KEEP").is_some() {
            eprintln!("test dir kept: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The summary farm prints at the end of a build: layer -> "built", "cached",
/// "FAILED <first line>", "skipped (...)", "not run".
pub(crate) fn summary(stderr: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(start) = stderr.rfind("\nsummary:\n") else {
        return out;
    };
    for l in stderr[start + "\nsummary:\n".len()..].lines() {
        let Some(l) = l.strip_prefix("  ") else { break };
        let l = l.trim_start();
        let (name, rest) = l.split_once(' ').unwrap_or((l, ""));
        let rest = rest.trim();
        let state = if rest.starts_with("built") {
            "built".to_string()
        } else {
            rest.to_string()
        };
        out.insert(name.to_string(), state);
    }
    out
}

/// The summary as `{layer: state}` with the states of `expected` layers only compared by
/// their first word (built/cached/FAILED/skipped).
pub(crate) fn assert_states(run: &Run, expected: &[(&str, &str)]) {
    let got = summary(&run.stderr);
    let first = |s: &str| s.split([' ', '(']).next().unwrap_or("").to_string();
    let got_short: BTreeMap<String, String> =
        got.iter().map(|(k, v)| (k.clone(), first(v))).collect();
    let want: BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got_short, want, "layer states:\n{}", run.describe());
}

impl Run {
    pub(crate) fn assert_ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "expected success:\n{}",
            self.describe()
        );
        self
    }

    pub(crate) fn assert_failed(&self) -> &Self {
        assert!(
            !self.status.success(),
            "expected failure:\n{}",
            self.describe()
        );
        self
    }
}

// ---------------------------------------------------------------------------------------
// reading OCI layouts and layer tars
// ---------------------------------------------------------------------------------------

/// An OCI image layout on disk.
pub(crate) struct Oci {
    pub dir: PathBuf,
}

impl Oci {
    pub(crate) fn new(dir: &Path) -> Oci {
        Oci {
            dir: dir.to_path_buf(),
        }
    }

    pub(crate) fn index(&self) -> Value {
        let p = self.dir.join("index.json");
        serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .unwrap()
    }

    /// tag -> manifest digest.
    pub(crate) fn tags(&self) -> BTreeMap<String, String> {
        self.index()["manifests"]
            .as_array()
            .expect("index.json manifests")
            .iter()
            .map(|m| {
                (
                    m["annotations"]["org.opencontainers.image.ref.name"]
                        .as_str()
                        .expect("ref.name")
                        .to_string(),
                    m["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub(crate) fn tag_names(&self) -> BTreeSet<String> {
        self.tags().into_keys().collect()
    }

    pub(crate) fn blob(&self, digest: &str) -> Vec<u8> {
        let (alg, hex) = digest.split_once(':').expect("algo:hex");
        let p = self.dir.join("blobs").join(alg).join(hex);
        fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    pub(crate) fn json(&self, digest: &str) -> Value {
        serde_json::from_slice(&self.blob(digest)).unwrap()
    }

    pub(crate) fn manifest_digest(&self, tag: &str) -> String {
        self.tags()
            .remove(tag)
            .unwrap_or_else(|| panic!("no tag {tag:?} in {}", self.dir.display()))
    }

    pub(crate) fn manifest(&self, tag: &str) -> Value {
        self.json(&self.manifest_digest(tag))
    }

    pub(crate) fn config(&self, tag: &str) -> Value {
        self.json(self.manifest(tag)["config"]["digest"].as_str().unwrap())
    }

    /// (media type, digest) of each layer, base first.
    pub(crate) fn layer_descs(&self, tag: &str) -> Vec<(String, String)> {
        self.manifest(tag)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["mediaType"].as_str().unwrap().to_string(),
                    l["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub(crate) fn layer_digests(&self, tag: &str) -> Vec<String> {
        self.layer_descs(tag).into_iter().map(|(_, d)| d).collect()
    }

    /// The entries of each layer, base first.
    pub(crate) fn layers(&self, tag: &str) -> Vec<Vec<TarEntry>> {
        self.layer_descs(tag)
            .iter()
            .map(|(mt, d)| read_layer(&self.blob(d), mt))
            .collect()
    }
}

/// One entry of a layer tar.
#[derive(Debug, Clone)]
pub(crate) struct TarEntry {
    /// As written in the archive, normalised: no leading `./`; directories end in `/`.
    pub path: String,
    /// The name exactly as stored.
    pub raw_path: String,
    pub kind: tar::EntryType,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Option<String>,
    pub data: Vec<u8>,
    /// From PAX `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl TarEntry {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// Decompress (by media type, or by sniffing) and list a layer tar.
pub(crate) fn read_layer(blob: &[u8], media_type: &str) -> Vec<TarEntry> {
    let raw: Vec<u8> = if media_type.ends_with("+gzip") || blob.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(blob)
            .read_to_end(&mut v)
            .expect("gunzip layer");
        v
    } else if media_type.ends_with("+zstd") || blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::decode_all(blob).expect("unzstd layer")
    } else {
        blob.to_vec()
    };
    read_tar(&raw)
}

pub(crate) fn read_tar(raw: &[u8]) -> Vec<TarEntry> {
    let mut a = tar::Archive::new(raw);
    let mut out = Vec::new();
    for e in a.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let raw_path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let kind = e.header().entry_type();
        let mut path = raw_path.trim_start_matches("./").to_string();
        if kind == tar::EntryType::Directory && !path.ends_with('/') {
            path.push('/');
        }
        let mut xattrs = BTreeMap::new();
        if let Ok(Some(exts)) = e.pax_extensions() {
            for x in exts.flatten() {
                if let Ok(k) = x.key()
                    && let Some(name) = k.strip_prefix("SCHILY.xattr.")
                {
                    xattrs.insert(name.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let h = e.header();
        let entry = TarEntry {
            path,
            raw_path,
            kind,
            mode: h.mode().unwrap() & 0o7777,
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            link: e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
            data: Vec::new(),
            xattrs,
        };
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(TarEntry { data, ..entry });
    }
    out
}

/// The sorted normalised paths of a layer's entries.
pub(crate) fn paths(entries: &[TarEntry]) -> Vec<String> {
    let mut v: Vec<String> = entries.iter().map(|e| e.path.clone()).collect();
    v.sort();
    v
}

/// The entry at `path` (normalised), or a panic listing what there is.
pub(crate) fn entry<'a>(entries: &'a [TarEntry], path: &str) -> &'a TarEntry {
    entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no entry {path:?} in layer: {:?}", paths(entries)))
}

/// Every file of a tree: relative path -> "d MODE", "f MODE CONTENT" (content as text
/// when short UTF-8, else its sha256), "l -> TARGET", or "other".
pub(crate) fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let full = root.join(&r);
            let m = fs::symlink_metadata(&full).unwrap();
            let key = r.to_string_lossy().into_owned();
            let mode = m.mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(
                    key,
                    format!("l -> {}", fs::read_link(&full).unwrap().display()),
                );
            } else if m.is_dir() {
                out.insert(format!("{key}/"), format!("d {mode:o}"));
                walk(root, &r, out);
            } else if m.is_file() {
                let data = fs::read(&full).unwrap();
                let shown = match String::from_utf8(data.clone()) {
                    Ok(s) if s.len() <= 64 => s,
                    _ => sha256_hex(&data),
                };
                out.insert(key, format!("f {mode:o} {shown}"));
            } else {
                out.insert(key, "other".into());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Wait for `child` up to `limit`; None if it is still running.
pub(crate) fn wait_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// a tiny HTTP server for http(s) imports and tar bases
// ---------------------------------------------------------------------------------------

/// Serves files from memory on 127.0.0.1 (HTTP/1.1, one request per connection), with an
/// `ETag` per content and 304 answers to a matching `If-None-Match`; logs the requests.
pub(crate) struct HttpServer {
    pub port: u16,
    files: std::sync::Arc<std::sync::Mutex<BTreeMap<String, Vec<u8>>>>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HttpServer {
    pub(crate) fn start() -> HttpServer {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, Vec<u8>>::new()));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, l) = (files.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                let mut if_none_match = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.trim().eq_ignore_ascii_case("if-none-match")
                    {
                        if_none_match = Some(v.trim().to_string());
                    }
                }
                let mut parts = request.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                );
                l.lock().unwrap().push(format!("{method} {path}"));
                let body = f.lock().unwrap().get(&path).cloned();
                let response = match body {
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                    Some(body) => {
                        let etag = format!("\"{}\"", &sha256_hex(&body)[..16]);
                        if if_none_match.as_deref() == Some(etag.as_str()) {
                            format!(
                                "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
                            )
                            .into_bytes()
                        } else {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {etag}\r\n\
                                 Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            if method != "HEAD" {
                                r.extend_from_slice(&body);
                            }
                            r
                        }
                    }
                };
                let _ = stream.write_all(&response);
                let _ = stream.flush();
            }
        });
        HttpServer { port, files, log }
    }

    pub(crate) fn put(&self, path: &str, body: impl Into<Vec<u8>>) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), body.into());
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// How many requests `METHOD PATH` the server has had.
    pub(crate) fn count(&self, request: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| *r == request)
            .count()
    }
}

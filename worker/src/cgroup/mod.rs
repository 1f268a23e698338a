//! cgroup v2 limits for each build, when the worker runs in a delegated cgroup.
//!
//! A cgroup is delegated to the worker when the worker's own cgroup (from
//! `/proc/self/cgroup`, on the cgroup2 mount) is writable by the worker's user and has
//! the `pids` and `memory` controllers available (`cgroup.controllers`); e.g.
//! `systemd-run --user --scope -p Delegate=yes farm worker ...`, or a directory that root
//! created under /sys/fs/cgroup and chowned to the user (with its `cgroup.procs`,
//! `cgroup.subtree_control` and `cgroup.threads`), with the worker started in it.
//!
//! Layout (cgroup v2 allows processes only in leaves once controllers are enabled):
//!
//! ```text
//! D/                  the delegated cgroup: subtree_control "+pids +memory"
//!   farm-worker/      the worker itself (moved there at start)
//!   build-<id>/       one per sandbox run: pids.max, memory.max, memory.swap.max 0,
//!                     memory.oom.group 1; the sandbox helper joins it before it forks
//! ```
//!
//! On a hybrid host (cgroup2 without pids and memory, which are v1 hierarchies) the
//! worker uses [`v1`] instead: its own v1 pids and memory cgroups, when its user can
//! write them, get a `build-<id>/` child each per run. [`detect`] picks v2, else v1.
//!
//! Without a delegated cgroup builds run without these limits and `farm check` says
//! how to get one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub mod v1;

pub use v1::V1Dirs;

/// Per-build limits; `None` leaves the kernel's default ("max").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
}

/// Why the worker has no delegated cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 mount (cgroup2 in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("this process's cgroup v2 path is unknown (/proc/self/cgroup has no 0:: line)")]
    NoPath,
    #[error("the cgroup {dir} lacks the {missing} controller(s) (cgroup.controllers: '{have}')")]
    Controllers {
        dir: PathBuf,
        missing: String,
        have: String,
    },
    #[error("the worker runs in the root cgroup; give it a cgroup of its own")]
    RootCgroup,
    #[error("other processes share the cgroup {dir} (pids {pids}); start the worker alone in it")]
    Shared { dir: PathBuf, pids: String },
    #[error("the cgroup {dir} is not writable by this user ({what})")]
    NotWritable { dir: PathBuf, what: String },
    #[error("no cgroup v1 hierarchy with the {controller} controller")]
    V1NoHierarchy { controller: String },
    #[error("the worker runs in the root cgroup v1 of {controller}; give it a cgroup of its own")]
    V1RootCgroup { controller: String },
    #[error("no delegated cgroup v2 ({v2}) nor v1 ({v1})")]
    Neither {
        v2: Box<CgroupError>,
        v1: Box<CgroupError>,
    },
    #[error("setting up the delegated cgroup {dir}: {what}: {source}")]
    Setup {
        dir: PathBuf,
        what: String,
        source: io::Error,
    },
}

/// How to get a delegated cgroup (for `farm check` and the worker's log).
pub const HOW_TO_DELEGATE: &str = "start the worker in a delegated cgroup v2: \
    `systemd-run --user --scope -p Delegate=yes farm worker ...`, or as root \
    `mkdir /sys/fs/cgroup/farm && chown USER /sys/fs/cgroup/farm \
    /sys/fs/cgroup/farm/cgroup.{procs,subtree_control,threads}` (pids and memory \
    enabled in /sys/fs/cgroup/cgroup.subtree_control) and start the worker from a shell \
    whose pid root wrote to /sys/fs/cgroup/farm/cgroup.procs; on a hybrid host (pids and \
    memory are cgroup v1 hierarchies) as root \
    `mkdir /sys/fs/cgroup/{pids,memory}/farm-USER && chown USER \
    /sys/fs/cgroup/{pids,memory}/farm-USER/{.,tasks,cgroup.procs}` and start the worker \
    from a shell whose pid root wrote to both `tasks` files";

const CONTROLLERS: [&str; 2] = ["pids", "memory"];

/// The cgroup2 mount point from mountinfo text (the mount whose root is `/`).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let fields: Vec<&str> = left.split_whitespace().collect();
        let mount = fields.get(4)?;
        (fstype == "cgroup2" && fields.get(3) == Some(&"/"))
            .then(|| PathBuf::from(mount.replace("\\040", " ")))
    })
}

/// The unified-hierarchy path from /proc/self/cgroup text (`0::/path`).
fn own_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

/// Which of the needed controllers `controllers` (a cgroup.controllers line) lacks.
fn missing_controllers(controllers: &str) -> Vec<&'static str> {
    let have: Vec<&str> = controllers.split_whitespace().collect();
    CONTROLLERS
        .into_iter()
        .filter(|c| !have.contains(c))
        .collect()
}

fn writable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Which delegated cgroup the worker's builds get their limits in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The worker's cgroup v2 directory.
    V2(PathBuf),
    /// The worker's cgroups in the v1 pids and memory hierarchies.
    V1(V1Dirs),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::V2(d) => write!(f, "cgroup v2 {}", d.display()),
            Backend::V1(d) => write!(
                f,
                "cgroup v1 {} and {}",
                d.pids.display(),
                d.memory.display()
            ),
        }
    }
}

/// The worker's delegated cgroup: v2 when its cgroup there is delegated with pids and
/// memory, else its v1 pids and memory cgroups when its user can write both.
pub fn detect() -> Result<Backend, CgroupError> {
    let v2 = match detect_v2() {
        Ok(dir) => return Ok(Backend::V2(dir)),
        Err(e) => e,
    };
    v1::detect()
        .map(Backend::V1)
        .map_err(|v1| CgroupError::Neither {
            v2: Box::new(v2),
            v1: Box::new(v1),
        })
}

/// The worker's own cgroup v2, if it is delegated (writable, pids and memory available).
fn detect_v2() -> Result<PathBuf, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2)?;
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = own_path(&own).ok_or(CgroupError::NoPath)?;
    if own.trim_matches('/').is_empty() {
        return Err(CgroupError::RootCgroup);
    }
    let mut dir = mount.join(own.trim_start_matches('/'));
    // A worker restarted in the same scope is already in D/farm-worker.
    if dir.file_name().is_some_and(|n| n == "farm-worker")
        && let Some(parent) = dir.parent()
        && writable(&parent.join("cgroup.subtree_control"))
    {
        dir = parent.to_path_buf();
    }
    let have = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let missing = missing_controllers(&have);
    if !missing.is_empty() {
        return Err(CgroupError::Controllers {
            dir,
            missing: missing.join(" and "),
            have: have.trim().to_string(),
        });
    }
    for f in ["", "cgroup.procs", "cgroup.subtree_control"] {
        let p = if f.is_empty() {
            dir.clone()
        } else {
            dir.join(f)
        };
        if !writable(&p) {
            return Err(CgroupError::NotWritable {
                what: if f.is_empty() {
                    "the directory".into()
                } else {
                    f.into()
                },
                dir,
            });
        }
    }
    Ok(dir)
}

/// A delegated cgroup the worker has moved into (see the module doc).
#[derive(Debug, Clone)]
pub struct Delegation {
    backend: Backend,
    limits: CgroupLimits,
}

impl Delegation {
    /// [`detect`], then (v2) move this process into `D/farm-worker` and enable the pids
    /// and memory controllers for D's children; v1 needs no setup.
    pub fn enter(limits: CgroupLimits) -> Result<Delegation, CgroupError> {
        match detect()? {
            Backend::V2(dir) => Self::enter_dir(dir, limits),
            backend @ Backend::V1(_) => Ok(Delegation { backend, limits }),
        }
    }

    /// [`enter`](Self::enter) with the delegated cgroup `dir` already found.
    fn enter_dir(dir: PathBuf, limits: CgroupLimits) -> Result<Delegation, CgroupError> {
        // Controllers can only be enabled for the children of a cgroup without
        // processes: refuse before moving anything when others share it.
        let me = std::process::id().to_string();
        let others: Vec<String> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter(|p| *p != me)
            .map(str::to_string)
            .collect();
        if !others.is_empty() {
            return Err(CgroupError::Shared {
                dir,
                pids: others.join(" "),
            });
        }
        let setup = |what: &str| {
            let (dir, what) = (dir.clone(), what.to_string());
            move |source| CgroupError::Setup { dir, what, source }
        };
        let leaf = dir.join("farm-worker");
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(setup("creating farm-worker")(e)),
        }
        fs::write(leaf.join("cgroup.procs"), &me)
            .map_err(setup("moving the worker into farm-worker"))?;
        fs::write(dir.join("cgroup.subtree_control"), "+pids +memory").map_err(setup(
            "enabling pids and memory (other processes in the cgroup? start the worker alone in it)",
        ))?;
        Ok(Delegation {
            backend: Backend::V2(dir),
            limits,
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn limits(&self) -> CgroupLimits {
        self.limits
    }

    /// A new cgroup for one sandbox run, with the limits written.
    pub fn build_cgroup(&self) -> io::Result<BuildCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("build-{}-{n}", std::process::id());
        let dir = match &self.backend {
            Backend::V2(dir) => dir,
            Backend::V1(dirs) => {
                let (pids, memory) = v1::create_build(dirs, &name, self.limits)?;
                return Ok(BuildCgroup {
                    pids,
                    memory: Some(memory),
                    limits: self.limits,
                });
            }
        };
        let path = dir.join(name);
        fs::create_dir(&path)?;
        let cg = BuildCgroup {
            pids: path,
            memory: None,
            limits: self.limits,
        };
        let write = |file: &str, value: String| {
            fs::write(cg.pids.join(file), value)
                .map_err(|e| io::Error::new(e.kind(), format!("writing {file}: {e}")))
        };
        if let Some(p) = self.limits.pids_max {
            write("pids.max", p.to_string())?;
        }
        if let Some(m) = self.limits.memory_max {
            write("memory.max", m.to_string())?;
            // Without swap the limit is a limit; absent without swap accounting.
            let _ = write("memory.swap.max", "0".into());
        }
        // On OOM the whole build goes, not one random process of it.
        let _ = write("memory.oom.group", "1".into());
        Ok(cg)
    }
}

/// One sandbox run's cgroup (v1: one in each hierarchy); removed when dropped.
#[derive(Debug)]
pub struct BuildCgroup {
    /// The v2 cgroup, or the v1 pids one.
    pids: PathBuf,
    /// The v1 memory cgroup (`None` with v2).
    memory: Option<PathBuf>,
    limits: CgroupLimits,
}

impl BuildCgroup {
    /// The directories the sandbox helper joins (writing itself to `cgroup.procs`).
    pub fn paths(&self) -> Vec<PathBuf> {
        std::iter::once(self.pids.clone())
            .chain(self.memory.clone())
            .collect()
    }

    /// Which limit the run hit, from `pids.events` (`max N`) and `memory.events`
    /// (`oom_kill N`; v1: `memory.oom_control`), as a sentence for the layer's error.
    pub fn limit_hit(&self) -> Option<String> {
        let count = |file: &str, key: &str| -> u64 {
            fs::read_to_string(self.pids.join(file))
                .ok()
                .and_then(|s| event_count(&s, key))
                .unwrap_or(0)
        };
        let mut hit = Vec::new();
        let oom = match &self.memory {
            Some(v1) => v1::oom_killed(v1),
            None => {
                count("memory.events", "oom_kill") > 0
                    || count("memory.events", "oom_group_kill") > 0
            }
        };
        if oom {
            let (file, killed) = match self.memory {
                Some(_) => ("memory.limit_in_bytes", "a process of the build"),
                None => ("memory.max", "the build"),
            };
            hit.push(format!(
                "its memory limit ({file} {} MiB: the kernel killed {killed}; raise it with \
                 the worker's --memory-max)",
                self.limits.memory_max.unwrap_or(0) >> 20
            ));
        }
        if count("pids.events", "max") > 0 {
            hit.push(format!(
                "pids.max ({} processes: forks failed; raise it with the worker's --pids-max)",
                self.limits.pids_max.unwrap_or(0)
            ));
        }
        (!hit.is_empty()).then(|| format!("the build hit {}", hit.join(" and ")))
    }
}

fn event_count(events: &str, key: &str) -> Option<u64> {
    events.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        for path in self.paths() {
            remove_cgroup(&path);
        }
    }
}

/// Kill what is left in the cgroup `path`, then remove it.
fn remove_cgroup(path: &Path) {
    // The helper's waitpid returned only after the whole pid namespace was reaped (a
    // process of a host-pid sandbox may be left), and the kernel may take a moment to
    // empty the cgroup.
    for _ in 0..50 {
        for pid in fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    tracing::warn!(cgroup = %path.display(), "could not remove a build's cgroup");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_own_path() {
        let mi = "25 30 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  35 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/x rw\n"), None);
        assert_eq!(
            own_path("4:memory:/x\n0::/user.slice/a.scope\n").as_deref(),
            Some("/user.slice/a.scope")
        );
        assert_eq!(own_path("4:memory:/x\n"), None);
        assert_eq!(
            missing_controllers("cpu memory pids io"),
            Vec::<&str>::new()
        );
        assert_eq!(missing_controllers("hugetlb"), vec!["pids", "memory"]);
        assert_eq!(
            event_count("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", "oom_kill"),
            Some(1)
        );
        assert_eq!(event_count("max 7\n", "max"), Some(7));
        assert_eq!(event_count("max 7\n", "oom_kill"), None);
    }

    /// The files written, on a plain directory standing in for cgroupfs.
    #[test]
    fn delegation_layout_limits_and_events() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let limits = CgroupLimits {
            pids_max: Some(64),
            memory_max: Some(128 << 20),
        };
        fs::write(dir.join("cgroup.procs"), "1 2\n").unwrap();
        assert!(matches!(
            Delegation::enter_dir(dir.clone(), limits),
            Err(CgroupError::Shared { .. })
        ));
        assert!(!dir.join("farm-worker").exists(), "nothing moved");
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        let del = Delegation::enter_dir(dir.clone(), limits).unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&dir.join("farm-worker/cgroup.procs")),
            std::process::id().to_string()
        );
        assert_eq!(read(&dir.join("cgroup.subtree_control")), "+pids +memory");
        let cg = del.build_cgroup().unwrap();
        assert_eq!(read(&cg.pids.join("pids.max")), "64");
        assert_eq!(
            read(&cg.pids.join("memory.max")),
            (128u64 << 20).to_string()
        );
        assert_eq!(read(&cg.pids.join("memory.swap.max")), "0");
        assert_eq!(read(&cg.pids.join("memory.oom.group")), "1");
        assert_eq!(cg.limit_hit(), None);
        fs::write(cg.pids.join("pids.events"), "max 3\n").unwrap();
        fs::write(cg.pids.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let hit = cg.limit_hit().unwrap();
        assert!(
            hit.contains("memory limit (memory.max 128 MiB") && hit.contains("pids.max (64"),
            "{hit}"
        );
        // cgroupfs removes its interface files with the directory; a plain one does not.
        let path = cg.pids.clone();
        for f in fs::read_dir(&path).unwrap() {
            fs::remove_file(f.unwrap().path()).unwrap();
        }
        drop(cg);
        assert!(!path.exists());
    }
}

//! The cgroup v1 backend, for hybrid hosts where cgroup2 lacks pids and memory (they
//! are v1 hierarchies, e.g. /sys/fs/cgroup/pids and /sys/fs/cgroup/memory).
//!
//! Delegated means: the worker's own cgroups in both hierarchies (`N:pids:/path` and
//! `N:memory:/path` in /proc/self/cgroup) are not the root and are directories its user
//! can write (root made them and chowned the directory, `tasks` and `cgroup.procs`).
//! v1 has no "no internal processes" rule, so the worker stays where it is; each run
//! gets `build-<id>/` in both, with `pids.max`, `memory.limit_in_bytes` and
//! `memory.memsw.limit_in_bytes` (no swap, where swap accounting exists). v1 has no
//! `memory.oom.group`: on OOM the kernel kills one process of the build, which fails the
//! run; `memory.oom_control`'s `oom_kill` count says it was the limit.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{CgroupError, CgroupLimits, writable};

/// The worker's delegated v1 cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Dirs {
    pub pids: PathBuf,
    pub memory: PathBuf,
}

/// Mount point and mount root of the v1 hierarchy that has `controller`.
fn hierarchy_mount(mountinfo: &str, controller: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let r: Vec<&str> = right.split_whitespace().collect();
        let fields: Vec<&str> = left.split_whitespace().collect();
        let has = r.get(2)?.split(',').any(|o| o == controller);
        if r.first() != Some(&"cgroup") || !has {
            return None;
        }
        let mount = PathBuf::from(fields.get(4)?.replace("\\040", " "));
        Some((mount, fields.get(3)?.to_string()))
    })
}

/// This process's path in the v1 hierarchy of `controller` (`N:a,b:/path`).
fn own_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

/// The directory of this process's cgroup for `controller`, from the two files' text.
fn own_dir(mountinfo: &str, proc_cgroup: &str, controller: &str) -> Result<PathBuf, CgroupError> {
    let missing = || CgroupError::V1NoHierarchy {
        controller: controller.to_string(),
    };
    let (mount, root) = hierarchy_mount(mountinfo, controller).ok_or_else(missing)?;
    let path = own_path(proc_cgroup, controller).ok_or_else(missing)?;
    // Inside a container the mount's root is the container's cgroup, not `/`.
    let rel = path
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(&path)
        .trim_matches('/');
    if rel.is_empty() {
        return Err(CgroupError::V1RootCgroup {
            controller: controller.to_string(),
        });
    }
    Ok(mount.join(rel))
}

/// The worker's v1 cgroups for pids and memory, if both are delegated to its user.
pub(super) fn detect() -> Result<V1Dirs, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let pids = own_dir(&mountinfo, &own, "pids")?;
    let memory = own_dir(&mountinfo, &own, "memory")?;
    for dir in [&pids, &memory] {
        if !writable(dir) {
            return Err(CgroupError::NotWritable {
                dir: dir.clone(),
                what: "the directory".into(),
            });
        }
    }
    Ok(V1Dirs { pids, memory })
}

/// Create `name` in both hierarchies with the limits written; returns (pids, memory).
pub(super) fn create_build(
    dirs: &V1Dirs,
    name: &str,
    limits: CgroupLimits,
) -> io::Result<(PathBuf, PathBuf)> {
    let pids = dirs.pids.join(name);
    let memory = dirs.memory.join(name);
    let write = |dir: &Path, file: &str, value: String| {
        fs::write(dir.join(file), value)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {file}: {e}")))
    };
    fs::create_dir(&pids)?;
    if let Err(e) = fs::create_dir(&memory) {
        let _ = fs::remove_dir(&pids);
        return Err(e);
    }
    let written = (|| {
        if let Some(p) = limits.pids_max {
            write(&pids, "pids.max", p.to_string())?;
        }
        if let Some(m) = limits.memory_max {
            write(&memory, "memory.limit_in_bytes", m.to_string())?;
            // Memory plus swap: the same, so the build cannot swap; absent without
            // swap accounting.
            if memory.join("memory.memsw.limit_in_bytes").exists() {
                write(&memory, "memory.memsw.limit_in_bytes", m.to_string())?;
            }
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir(&pids);
        let _ = fs::remove_dir(&memory);
        return Err(e);
    }
    Ok((pids, memory))
}

/// Whether the kernel killed a process of the memory cgroup `dir` for its limit
/// (`oom_kill N` in `memory.oom_control`).
pub(super) fn oom_killed(dir: &Path) -> bool {
    fs::read_to_string(dir.join("memory.oom_control"))
        .ok()
        .and_then(|s| super::event_count(&s, "oom_kill"))
        .is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 23 0:21 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
25 24 0:22 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
27 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n\
28 24 0:25 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
29 24 0:26 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids\n";

    #[test]
    fn hybrid_host_layout_is_parsed() {
        let own = "9:name=systemd:/\n8:pids:/farm-bob\n4:memory:/farm-bob\n\
                   1:cpu,cpuacct:/x\n0::/\n";
        assert_eq!(
            own_dir(MOUNTINFO, own, "pids").unwrap(),
            PathBuf::from("/sys/fs/cgroup/pids/farm-bob")
        );
        assert_eq!(
            own_dir(MOUNTINFO, own, "memory").unwrap(),
            PathBuf::from("/sys/fs/cgroup/memory/farm-bob")
        );
        assert_eq!(own_path(own, "cpuacct").as_deref(), Some("/x"));
        // The root cgroup is nobody's delegation; no hierarchy, no v1 backend.
        assert!(matches!(
            own_dir(MOUNTINFO, "8:pids:/\n", "pids"),
            Err(CgroupError::V1RootCgroup { .. })
        ));
        assert!(matches!(
            own_dir(MOUNTINFO, own, "blkio"),
            Err(CgroupError::V1NoHierarchy { .. })
        ));
        // In a container the mount's root is the container's own cgroup.
        let mi = "28 24 0:25 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            own_dir(mi, "4:memory:/docker/abc/farm\n", "memory").unwrap(),
            PathBuf::from("/sys/fs/cgroup/memory/farm")
        );
    }

    /// The files written, on plain directories standing in for the two hierarchies.
    #[test]
    fn build_cgroups_get_the_limits_and_report_an_oom_kill() {
        let d = tempfile::tempdir().unwrap();
        let dirs = V1Dirs {
            pids: d.path().join("pids"),
            memory: d.path().join("memory"),
        };
        fs::create_dir(&dirs.pids).unwrap();
        fs::create_dir(&dirs.memory).unwrap();
        let limits = CgroupLimits {
            pids_max: Some(64),
            memory_max: Some(64 << 20),
        };
        // Not yet there: no swap accounting, so no memsw limit.
        let (p, m) = create_build(&dirs, "build-1", limits).unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(read(&p.join("pids.max")), "64");
        assert_eq!(
            read(&m.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        assert!(!m.join("memory.memsw.limit_in_bytes").exists());
        assert!(!oom_killed(&m));
        fs::write(
            m.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert!(oom_killed(&m));
        // A name taken fails and leaves nothing behind in the other hierarchy.
        fs::create_dir(dirs.memory.join("build-2")).unwrap();
        assert!(create_build(&dirs, "build-2", limits).is_err());
        assert!(!dirs.pids.join("build-2").exists());
    }
}

//! Which host ids the container's ids 0..65535 map to, and how the maps get written.
//!
//! * As an ordinary user: container 0 is the worker's own uid/gid, container
//!   1..=65535 are the first 65535 ids of its /etc/subuid (/etc/subgid) ranges, in the
//!   order the file lists them (several ranges are fine: `farm:1:999` and
//!   `farm:1001:64535` fit a 65,536-id pod user namespace; at least 65534 ids are
//!   needed, so that `nobody` is mapped); written by the setuid helpers
//!   `newuidmap`/`newgidmap` (package uidmap), one argument triple per range.
//! * As real root: container 0..=65535 map to 65536 ids of /etc/subuid's entry for root
//!   if there is one, else to the first block of 65536 at or above 100000 that no
//!   /etc/subuid (/etc/subgid) entry uses; written directly to /proc/PID/{u,g}id_map.
//!
//! Why container root is the worker's own uid in rootless mode (and not the first
//! subordinate id): the pool's directories (overlay upper/work dirs, bind sources,
//! imports) are created by the worker and owned by its uid. A uid that is not mapped in
//! the namespace gets no capability there, so container root could not write an upper
//! dir owned by the worker, and the worker could not remove or read the root-owned files
//! of a captured layer without entering the namespace. As real root the worker instead
//! chowns the directories it prepares ([`IdMapping::make_owned_by_container_root`]), so
//! container root never is host root.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Number of container ids mapped (container ids 0..=65535).
pub const CONTAINER_IDS: u32 = 65536;

/// The fewest subordinate ids an ordinary user needs (all its ranges together):
/// container 1..=65534, so that `nobody`/`nogroup` (65534) is mapped. 65534 is what fits
/// beside the user's own id inside a 65,536-id user namespace (a Kubernetes pod with
/// `hostUsers: false`), e.g. `farm:1:999` and `farm:1001:64535` for uid 1000; with
/// 65535 or more, container 65535 is mapped too.
pub const MIN_SUBORDINATE_IDS: u32 = CONTAINER_IDS - 2;

/// One line of a uid_map/gid_map: `count` ids starting at `container` map to `host`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub container: u32,
    pub host: u32,
    pub count: u32,
}

/// How the maps are written for a new namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapWriter {
    /// Run `newuidmap`/`newgidmap` (ordinary user).
    NewIdMap,
    /// Write /proc/PID/uid_map and gid_map directly (real root).
    Direct,
}

/// The uid and gid maps of every namespace this worker creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
    pub writer: MapWriter,
}

/// Why no mapping could be made.
#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error(
        "user {user} has no subordinate {kind} ranges of at least {needed} ids (together) in {file}: run \
         'farm setup --user {user} --pool DIR' as root (or add {user} to /etc/subuid and \
         /etc/subgid)"
    )]
    NoSubordinateIds {
        user: String,
        kind: &'static str,
        file: PathBuf,
        needed: u32,
    },
    #[error(
        "{tool} not found: install the 'uidmap' package (it maps the subordinate ids of an \
         unprivileged user)"
    )]
    MissingTool { tool: &'static str },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// One parsed line of /etc/subuid or /etc/subgid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubEntry {
    pub owner: String,
    pub start: u32,
    pub count: u32,
}

/// The entries of /etc/subuid or /etc/subgid (`owner:start:count` lines).
pub fn parse_subid(text: &str) -> Vec<SubEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut parts = line.split(':');
            let owner = parts.next()?.to_string();
            let start = parts.next()?.trim().parse().ok()?;
            let count = parts.next()?.trim().parse().ok()?;
            Some(SubEntry {
                owner,
                start,
                count,
            })
        })
        .collect()
}

fn read_optional(path: &Path) -> Result<String, IdMapError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(IdMapError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn find_tool(name: &'static str) -> Result<PathBuf, IdMapError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(IdMapError::MissingTool { tool: name })
}

impl IdMapping {
    /// The mapping for the current process (see the module docs), from /etc/subuid and
    /// /etc/subgid.
    pub fn detect() -> Result<Self, IdMapError> {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        let subuid = read_optional(Path::new("/etc/subuid"))?;
        let subgid = read_optional(Path::new("/etc/subgid"))?;
        let mapping = Self::from_subid_files(uid, gid, &name, &subuid, &subgid)?;
        if mapping.writer == MapWriter::NewIdMap {
            find_tool("newuidmap")?;
            find_tool("newgidmap")?;
        }
        Ok(mapping)
    }

    /// The mapping for a process with effective `uid`/`gid` (user `name`), given the
    /// contents of /etc/subuid and /etc/subgid.
    pub fn from_subid_files(
        uid: u32,
        gid: u32,
        name: &str,
        subuid: &str,
        subgid: &str,
    ) -> Result<Self, IdMapError> {
        let subuid = parse_subid(subuid);
        let subgid = parse_subid(subgid);
        let owned = |entries: &[SubEntry], id: u32, needed: u32| {
            entries
                .iter()
                .find(|e| (e.owner == name || e.owner == id.to_string()) && e.count >= needed)
                .map(|e| e.start)
        };
        if uid == 0 {
            let pick = |entries: &[SubEntry]| {
                owned(entries, 0, CONTAINER_IDS).unwrap_or_else(|| free_block(&subuid, &subgid))
            };
            let (u, g) = (pick(&subuid), pick(&subgid));
            return Ok(IdMapping {
                uids: vec![IdRange {
                    container: 0,
                    host: u,
                    count: CONTAINER_IDS,
                }],
                gids: vec![IdRange {
                    container: 0,
                    host: g,
                    count: CONTAINER_IDS,
                }],
                writer: MapWriter::Direct,
            });
        }
        let missing = |kind, file: &str| IdMapError::NoSubordinateIds {
            user: name.to_string(),
            kind,
            file: file.into(),
            needed: MIN_SUBORDINATE_IDS,
        };
        let uids = subordinate_ranges(&subuid, name, uid, uid)
            .ok_or_else(|| missing("uid", "/etc/subuid"))?;
        let gids = subordinate_ranges(&subgid, name, uid, gid)
            .ok_or_else(|| missing("gid", "/etc/subgid"))?;
        Ok(IdMapping {
            uids,
            gids,
            writer: MapWriter::NewIdMap,
        })
    }

    /// The host uid of container uid `id`, if mapped.
    pub fn host_uid(&self, id: u32) -> Option<u32> {
        lookup(&self.uids, id)
    }

    /// The host gid of container gid `id`, if mapped.
    pub fn host_gid(&self, id: u32) -> Option<u32> {
        lookup(&self.gids, id)
    }

    /// Host (uid, gid) of container root.
    pub fn container_root(&self) -> (u32, u32) {
        (self.host_uid(0).unwrap_or(0), self.host_gid(0).unwrap_or(0))
    }

    /// Makes `path` owned by container root, so that root in the namespace may write it
    /// (overlay upper/work dirs, bind sources). A no-op in rootless mode, where container
    /// root already is the worker's uid; as real root, a `lchown`.
    pub fn make_owned_by_container_root(&self, path: &Path) -> io::Result<()> {
        let (uid, gid) = self.container_root();
        let meta = std::fs::symlink_metadata(path)?;
        use std::os::unix::fs::MetadataExt;
        if meta.uid() == uid && meta.gid() == gid {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    /// The text written to /proc/PID/uid_map (or gid_map).
    pub(crate) fn map_text(ranges: &[IdRange]) -> String {
        ranges
            .iter()
            .map(|r| format!("{} {} {}\n", r.container, r.host, r.count))
            .collect()
    }

    /// Arguments of newuidmap/newgidmap after the pid.
    pub(crate) fn map_args(ranges: &[IdRange]) -> Vec<String> {
        ranges
            .iter()
            .flat_map(|r| {
                [
                    r.container.to_string(),
                    r.host.to_string(),
                    r.count.to_string(),
                ]
            })
            .collect()
    }

    /// Writes the maps of process `pid`, which has just unshared its user namespace.
    pub(crate) fn write_maps(&self, pid: i32) -> io::Result<()> {
        match self.writer {
            MapWriter::Direct => {
                std::fs::write(format!("/proc/{pid}/uid_map"), Self::map_text(&self.uids))
                    .map_err(|e| io::Error::new(e.kind(), format!("writing uid_map: {e}")))?;
                std::fs::write(format!("/proc/{pid}/gid_map"), Self::map_text(&self.gids))
                    .map_err(|e| io::Error::new(e.kind(), format!("writing gid_map: {e}")))?;
            }
            MapWriter::NewIdMap => {
                for (tool, ranges) in [("newuidmap", &self.uids), ("newgidmap", &self.gids)] {
                    let exe = find_tool(tool).map_err(io::Error::other)?;
                    let out = std::process::Command::new(&exe)
                        .arg(pid.to_string())
                        .args(Self::map_args(ranges))
                        .stdin(std::process::Stdio::null())
                        .output()?;
                    if !out.status.success() {
                        return Err(io::Error::other(format!(
                            "{tool} {pid} {} failed ({}): {}",
                            Self::map_args(ranges).join(" "),
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for IdMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |rs: &[IdRange]| {
            rs.iter()
                .map(|r| format!("{}->{}+{}", r.container, r.host, r.count))
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "uid {} gid {} ({:?})",
            show(&self.uids),
            show(&self.gids),
            self.writer
        )
    }
}

/// Container root is the user's own id (`own`); container 1.. are the user's
/// subordinate ranges in the order the file lists them, up to 65535 ids (split ranges
/// are fine). `None` when they hold fewer than [`MIN_SUBORDINATE_IDS`]. A range that
/// contains `own` is split around it (a user's id never maps twice).
fn subordinate_ranges(
    entries: &[SubEntry],
    name: &str,
    uid: u32,
    own: u32,
) -> Option<Vec<IdRange>> {
    let mine = entries
        .iter()
        .filter(|e| e.owner == name || e.owner == uid.to_string());
    let mut pieces: Vec<(u32, u32)> = Vec::new();
    for e in mine {
        let (start, end) = (u64::from(e.start), u64::from(e.start) + u64::from(e.count));
        let mut push = |s: u64, e: u64| {
            if e > s {
                pieces.push((s as u32, (e - s).min(u64::from(u32::MAX)) as u32));
            }
        };
        let own = u64::from(own);
        if own >= start && own < end {
            push(start, own);
            push(own + 1, end);
        } else {
            push(start, end);
        }
    }
    let mut ranges = vec![IdRange {
        container: 0,
        host: own,
        count: 1,
    }];
    let mut next = 1u32;
    for (host, count) in pieces {
        let room = CONTAINER_IDS - next;
        if room == 0 {
            break;
        }
        let count = count.min(room);
        ranges.push(IdRange {
            container: next,
            host,
            count,
        });
        next += count;
    }
    // `next - 1` subordinate ids are mapped.
    (next > MIN_SUBORDINATE_IDS).then_some(ranges)
}

fn lookup(ranges: &[IdRange], id: u32) -> Option<u32> {
    ranges
        .iter()
        .find(|r| id >= r.container && id - r.container < r.count)
        .map(|r| r.host + (id - r.container))
}

/// The first 65536-id block at or above 100000 that overlaps no entry of either file.
fn free_block(a: &[SubEntry], b: &[SubEntry]) -> u32 {
    let mut start: u64 = 100_000;
    loop {
        let end = start + u64::from(CONTAINER_IDS);
        let clash = a.iter().chain(b).find(|e| {
            let (s, n) = (u64::from(e.start), u64::from(e.count));
            s < end && start < s + n
        });
        match clash {
            None => return start as u32,
            Some(e) => {
                let next = u64::from(e.start) + u64::from(e.count);
                start = next.div_ceil(u64::from(CONTAINER_IDS)) * u64::from(CONTAINER_IDS);
                if start + u64::from(CONTAINER_IDS) > u64::from(u32::MAX) {
                    return 100_000;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_maps_own_uid_to_root() {
        let m = IdMapping::from_subid_files(
            1000,
            1001,
            "alice",
            "bob:100000:65536\nalice:165536:65536\n",
            "1000:300000:70000\n",
        )
        .unwrap();
        assert_eq!(m.writer, MapWriter::NewIdMap);
        assert_eq!(m.host_uid(0), Some(1000));
        assert_eq!(m.host_uid(1), Some(165536));
        assert_eq!(m.host_uid(65535), Some(165536 + 65534));
        assert_eq!(m.host_uid(65536), None);
        assert_eq!(m.host_gid(0), Some(1001));
        assert_eq!(m.host_gid(2), Some(300001));
        assert_eq!(
            IdMapping::map_args(&m.uids),
            ["0", "1000", "1", "1", "165536", "65535"]
        );
    }

    #[test]
    fn missing_range_names_the_fix() {
        let err = IdMapping::from_subid_files(1000, 1000, "alice", "bob:100000:65536\n", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run 'farm setup --user alice --pool DIR' as root")
                && err.contains("add alice to /etc/subuid and /etc/subgid"),
            "{err}"
        );
        // A range that is too small does not count.
        let err = IdMapping::from_subid_files(1000, 1000, "alice", "alice:100000:1000\n", "")
            .unwrap_err();
        assert!(matches!(
            err,
            IdMapError::NoSubordinateIds { kind: "uid", .. }
        ));
        let err = IdMapping::from_subid_files(1000, 1000, "alice", "alice:100000:65536\n", "")
            .unwrap_err();
        assert!(matches!(
            err,
            IdMapError::NoSubordinateIds { kind: "gid", .. }
        ));
    }

    #[test]
    fn split_ranges_fill_the_namespace_in_file_order() {
        // The farm image: uid 1000 inside a pod's 65,536-id user namespace.
        let m = IdMapping::from_subid_files(
            1000,
            1000,
            "farm",
            "farm:1:999\nfarm:1001:64535\n",
            "farm:1:999\nfarm:1001:64535\n",
        )
        .unwrap();
        assert_eq!(
            IdMapping::map_args(&m.uids),
            ["0", "1000", "1", "1", "1", "999", "1000", "1001", "64535"]
        );
        assert_eq!(m.host_uid(0), Some(1000));
        assert_eq!(m.host_uid(999), Some(999));
        assert_eq!(m.host_uid(1000), Some(1001));
        assert_eq!(m.host_gid(65534), Some(65535), "nobody is mapped");
        assert_eq!(m.host_uid(65535), None);
        // More than enough, over several lines: the first 65535 ids, in file order.
        let m = IdMapping::from_subid_files(
            1000,
            1000,
            "alice",
            "alice:200000:100\nbob:1:5\nalice:300000:100000\n",
            "alice:100000:65536\n",
        )
        .unwrap();
        assert_eq!(
            IdMapping::map_args(&m.uids),
            [
                "0", "1000", "1", "1", "200000", "100", "101", "300000", "65435"
            ]
        );
        // A range holding the user's own id is split around it.
        let m = IdMapping::from_subid_files(1000, 1000, "farm", "farm:1:65535\n", "farm:1:65535\n")
            .unwrap();
        assert_eq!(
            IdMapping::map_args(&m.uids),
            ["0", "1000", "1", "1", "1", "999", "1000", "1001", "64535"]
        );
        // Together too few (65533): refused, naming the fix.
        let err = IdMapping::from_subid_files(
            1000,
            1000,
            "farm",
            "farm:1:999\nfarm:1001:64534\n",
            "farm:1:65535\n",
        )
        .unwrap_err();
        assert!(matches!(
            err,
            IdMapError::NoSubordinateIds { kind: "uid", .. }
        ));
    }

    #[test]
    fn root_uses_its_entry_or_a_free_block() {
        let m = IdMapping::from_subid_files(0, 0, "root", "root:500000:65536\n", "").unwrap();
        assert_eq!(m.writer, MapWriter::Direct);
        assert_eq!(m.host_uid(0), Some(500000));
        // No entry for root in subgid: a block clear of every entry.
        let m = IdMapping::from_subid_files(
            0,
            0,
            "root",
            "root:500000:65536\nfarmtest:100000:65536\n",
            "farmtest:100000:65536\n",
        )
        .unwrap();
        let g = m.host_gid(0).unwrap();
        assert!(g >= 165536 && g.is_multiple_of(65536), "{g}");
        let m = IdMapping::from_subid_files(0, 0, "root", "", "").unwrap();
        assert_eq!(m.container_root(), (100000, 100000));
        assert_eq!(IdMapping::map_text(&m.uids), "0 100000 65536\n");
    }
}

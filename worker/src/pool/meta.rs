//! Per-chain metadata: one small JSON file per chain, `meta/<name>.json`, replaced
//! atomically (write a temporary file in the same directory, fsync, rename).
//!
//! Why JSON files and not one SQLite file: every write is a single-file atomic rename,
//! so a crash never leaves a half-written record and there is no database lock to share
//! between processes (the flocks already serialise what needs serialising); records are
//! tiny and read rarely (lookups, gc); and a person can read or delete them. SQLite would
//! add a C library (and a libsqlite3-sys version the coordinator's sqlx must agree with)
//! for no gain at this size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{PoolError, Result};

/// How a chain's size was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// Parent's size plus the caller's hint (the layer's uncompressed size).
    Hint,
    /// Walked the tree at seal time.
    Walk,
    /// Not known (counted as 0 by gc).
    Unknown,
}

/// The stored record of one sealed chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ChainMeta {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Apparent size in bytes of the chain's tree (see [`SizeSource`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    pub size_source: SizeSource,
    pub created_unix_ms: u64,
    pub last_used_unix_ms: u64,
    /// "btrfs" or "copy".
    pub backend: String,
}

impl ChainMeta {
    pub(super) fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_unix_ms)
    }
    pub(super) fn last_used(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.last_used_unix_ms)
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads a record; `Ok(None)` if there is none.
pub(super) fn read(path: &Path) -> Result<Option<ChainMeta>> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| PoolError::Metadata {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PoolError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique among all threads and processes of this host at this moment.
pub(super) fn unique_suffix() -> String {
    format!(
        "{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        now_ms()
    )
}

/// Writes `bytes` to `path` atomically (and durably: fsync before the rename). Errors
/// carry `pool_dir` for PoolFull.
pub(super) fn write_atomic(pool_dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(pool_dir, path, bytes, true)
}

fn write_atomic_with(pool_dir: &Path, path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", unique_suffix()));
    let res = (|| -> io::Result<()> {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_data()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(PoolError::io(pool_dir, "write metadata", path, e));
    }
    Ok(())
}

/// Writes a record atomically. `durable`: fsync it first (for new records; a lost
/// last-use update does not matter, and a torn one is rebuilt on read).
pub(super) fn write(pool_dir: &Path, path: &Path, meta: &ChainMeta, durable: bool) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(meta).expect("ChainMeta serialises");
    bytes.push(b'\n');
    write_atomic_with(pool_dir, path, &bytes, durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.json");
        assert_eq!(read(&p).unwrap(), None);
        let mut m = ChainMeta {
            id: "sha256:00".into(),
            parent: None,
            size_bytes: Some(3),
            size_source: SizeSource::Walk,
            created_unix_ms: 1,
            last_used_unix_ms: 2,
            backend: "copy".into(),
        };
        write(t.path(), &p, &m, true).unwrap();
        m.last_used_unix_ms = 5;
        write(t.path(), &p, &m, true).unwrap();
        assert_eq!(read(&p).unwrap(), Some(m));
        // no temporary files left behind
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(read(&p), Err(PoolError::Metadata { .. })));
    }
}

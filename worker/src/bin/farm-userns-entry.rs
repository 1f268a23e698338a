//! A stand-alone hidden entry point: what the `farm` binary does for
//! `farm __farm-userns`, plus two ops the tests use. The integration tests
//! (`worker/tests/sandbox.rs`) start it as `Entry::new(env!("CARGO_BIN_EXE_farm-userns-entry"))`.
//! It also serves for trying the sandbox by hand without the CLI.
//!
//! It serves the worker's ops ([`farm_worker::ops::Op`]) and two of its own
//! ([`EntryOp`]):
//! * `echo`: prints `uid=U gid=G` (ids as seen in the namespace), then copies stdin to
//!   stdout (proves the streaming pipes).
//! * `inspect`: arg = a directory; prints one JSON object per entry below it (path, type,
//!   mode, container uid/gid, rdev, xattrs), read as container root.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use farm_worker::NsOp;
use farm_worker::ops::Op;
use serde::{Deserialize, Serialize};

type OpResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// What this entry point serves: its own ops, else the worker's.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", content = "arg", rename_all = "kebab-case")]
enum EntryOp {
    Echo,
    Inspect(PathBuf),
    #[serde(untagged)]
    Worker(Box<Op>),
}

impl NsOp for EntryOp {
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn run(self) -> OpResult {
        match self {
            EntryOp::Echo => echo(),
            EntryOp::Inspect(dir) => walk(&dir, &dir, &mut io::stdout().lock()),
            EntryOp::Worker(op) => Ok(op.run()?),
        }
    }
}

fn echo() -> OpResult {
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "uid={} gid={}",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    )?;
    let mut buf = Vec::new();
    io::stdin().read_to_end(&mut buf)?;
    out.write_all(&buf)?;
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut impl Write) -> OpResult {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        let mut xattrs = serde_json::Map::new();
        for name in farm_worker::sys::llistxattr(&path)? {
            let value = farm_worker::sys::lgetxattr(&path, &name)?.unwrap_or_default();
            xattrs.insert(name, String::from_utf8_lossy(&value).into_owned().into());
        }
        let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
        let obj = serde_json::json!({
            "path": rel, "kind": kind, "mode": meta.mode() & 0o7777,
            "uid": meta.uid(), "gid": meta.gid(), "rdev": meta.rdev(), "xattrs": xattrs,
        });
        writeln!(out, "{obj}")?;
        if ft.is_dir() {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

fn main() {
    farm_worker::userns::run_hidden_entry_with::<EntryOp>();
    let _ = writeln!(
        io::stderr(),
        "farm-userns-entry: internal entry point; run as '{} {}' by farm-worker",
        std::env::args().next().unwrap_or_default(),
        farm_worker::HIDDEN_SUBCOMMAND
    );
    std::process::exit(2);
}

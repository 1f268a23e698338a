//! Work that must run as container root inside the build's user namespace, because it
//! reads or sets ownership in the container's id space: applying a layer to a chain,
//! writing a layer tar of a directory, staging an import with its mode and owner,
//! removing trees that hold files of other container users, and the build sandbox.
//!
//! The parent sends one [`Op`] to the hidden entry point (`farm __farm-userns`, see
//! [`crate::userns`]), which runs it with [`NsOp::run`]. Tar data flows through
//! stdin/stdout pipes, so the parent never holds a layer in memory; an op with a result
//! prints it as one JSON object on stdout.

mod resolve;
mod stage;
mod upper;

use std::fs;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use farm_image::{ApplyOptions, LayerTarOptions, apply_layer, write_layer_tar};
use serde::{Deserialize, Serialize};

use crate::sandbox::SandboxSpec;
use crate::userns::NsOp;

pub use resolve::{resolve_existing_in_root, resolve_in_root};
pub use stage::import_target;

/// One op for the hidden entry point. On the wire (the request the child reads) it is
/// `{"op": "<kebab-case name>", "arg": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", content = "arg", rename_all = "kebab-case")]
pub enum Op {
    /// Run a script in the build sandbox ([`crate::sandbox`]).
    Sandbox(SandboxSpec),
    /// Prints [`Applied`].
    ApplyLayer(ApplyArgs),
    /// Writes the tar to stdout.
    WriteTar(WriteTarArgs),
    StageImport(StageArgs),
    RemoveTree(RemoveArgs),
    /// Prints [`Inspected`].
    InspectSource(InspectArgs),
    /// Copies the file to stdout.
    ReadFile(ReadFileArgs),
    /// Prints [`UpperApplied`].
    ApplyUpper(ApplyUpperArgs),
    /// Makes a squashfs/erofs image of a directory; prints [`farm_image::MadeImage`].
    MakeFsImage(MakeFsArgs),
    /// Unpacks a squashfs/erofs image into a directory.
    ExtractFsImage(ExtractFsArgs),
}

/// Why an op failed (the hidden entry point prints it on stderr and exits 1).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Image(#[from] farm_image::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    FsImage(#[from] farm_image::FsImageError),
    #[error("'{0}' is a directory; name a file")]
    IsDirectory(String),
}

impl NsOp for Op {
    type Error = OpError;

    fn run(self) -> Result<(), OpError> {
        match self {
            Op::Sandbox(spec) => crate::sandbox::helper_main(spec),
            Op::ApplyLayer(args) => apply(args),
            Op::WriteTar(args) => write_tar(args),
            Op::StageImport(args) => stage::stage_import(args),
            Op::RemoveTree(args) => remove_tree(args),
            Op::InspectSource(args) => inspect_source(args),
            Op::ReadFile(args) => read_file(args),
            Op::ApplyUpper(args) => upper::apply_upper(args),
            Op::MakeFsImage(args) => print_json(&farm_image::make_fs_image(
                args.kind,
                &args.dir,
                &args.out,
                &args.options,
            )?),
            Op::ExtractFsImage(args) => Ok(farm_image::extract_fs_image(
                args.kind,
                &args.image,
                &args.dest,
                args.limits.max_entries,
                "raise it with `farm worker --max-layer-entries N`",
            )?),
        }
    }
}

/// Apply the layer on stdin (tar, gzip or zstd) to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyArgs {
    pub target: PathBuf,
    /// Read the layer from this file (as container root) instead of stdin.
    #[serde(default)]
    pub source_file: Option<PathBuf>,
    /// The most bytes (tar stream, and file contents at logical size) and entries the
    /// layer may extract to.
    #[serde(default)]
    pub limits: ExtractLimits,
}

/// How much one layer may extract to (`farm worker --max-layer-size`,
/// `--max-layer-entries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractLimits {
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for ExtractLimits {
    /// farm-image's defaults: 64 GiB, one million entries.
    fn default() -> Self {
        ExtractLimits {
            max_bytes: farm_image::DEFAULT_MAX_LAYER_BYTES,
            max_entries: farm_image::DEFAULT_MAX_LAYER_ENTRIES,
        }
    }
}

impl ExtractLimits {
    fn apply_options(&self) -> ApplyOptions {
        ApplyOptions {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
            limits_hint: "raise it with `farm worker --max-layer-size SIZE` or \
                          `--max-layer-entries N`",
            ..ApplyOptions::default()
        }
    }
}

/// What [`Op::ApplyLayer`] prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// sha256 of the uncompressed tar: the layer's diff_id.
    pub diff_id: String,
    pub tar_size: u64,
    /// Entries not applied (device nodes a rootless build cannot create).
    pub skipped: u64,
}

/// Write a layer tar of `dir` to stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteTarArgs {
    pub dir: PathBuf,
    /// Interpret overlay upper-dir conventions (whiteouts, opaque dirs).
    pub overlay: bool,
    pub exclude: Vec<String>,
    pub source_date_epoch: Option<u64>,
}

/// Copy an import into a staging tree at `dest` (an absolute image path) below `root`,
/// following stacker's trailing-slash rules, then apply `mode`/`uid`/`gid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageArgs {
    pub source: PathBuf,
    /// The source was written with a trailing `/`.
    pub contents_only: bool,
    /// Basename of the source.
    pub name: String,
    pub root: PathBuf,
    pub dest: String,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The rootfs the layer will land on: parent directories that exist there keep their
    /// mode and owner in the staged tree (so `/tmp` stays 1777).
    pub base_rootfs: Option<PathBuf>,
}

/// Remove a tree (files of any container user).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveArgs {
    pub path: PathBuf,
}

/// Resolve `path` inside the root filesystem `root` the way a process chrooted there
/// would (absolute symlinks lead back into `root`, `..` stops at it), and describe it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectArgs {
    pub root: PathBuf,
    pub path: String,
    /// Compute the sha256 of a file's bytes.
    pub sha256: bool,
}

/// What [`Op::InspectSource`] prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspected {
    pub resolved: PathBuf,
    pub is_dir: bool,
    pub sha256: Option<String>,
    /// Permission bits (with setuid, setgid, sticky).
    #[serde(default)]
    pub mode: u32,
}

/// Copy the file at `path` inside `root` (resolved as in the image) to stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadFileArgs {
    pub root: PathBuf,
    pub path: String,
}

/// Apply an overlay upper directory (a run's change) onto a writable copy of its lower
/// tree: whiteouts remove, opaque directories replace, everything else is copied with
/// its metadata, file data shared by reflink where the filesystem can (btrfs), so a new
/// chain costs what the change's metadata costs, not its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyUpperArgs {
    pub upper: PathBuf,
    pub target: PathBuf,
    /// Top-level names never applied (`stacker`).
    pub exclude: Vec<String>,
}

/// What [`Op::ApplyUpper`] prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpperApplied {
    /// Bytes of file data applied (the new chain's size).
    pub bytes: u64,
}

/// Make a `kind` image of `dir` at `out` as container root (so the image records the
/// container's owners), as stacker's squashfs/erofs layer types.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MakeFsArgs {
    pub kind: farm_image::FsKind,
    pub dir: PathBuf,
    pub out: PathBuf,
    pub options: FsMakeOptions,
}

/// [`farm_image::MakeOptions`] on the wire.
pub type FsMakeOptions = farm_image::MakeOptions;

/// Unpack the `kind` image at `image` into `dest` as container root (owners restored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtractFsArgs {
    pub kind: farm_image::FsKind,
    pub image: PathBuf,
    pub dest: PathBuf,
    #[serde(default)]
    pub limits: ExtractLimits,
}

/// An op's result: one JSON object on stdout.
fn print_json(value: &impl Serialize) -> Result<(), OpError> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn apply(args: ApplyArgs) -> Result<(), OpError> {
    let stats = match &args.source_file {
        Some(f) => {
            let file = BufReader::with_capacity(1 << 20, fs::File::open(f)?);
            apply_layer(file, &args.target, &args.limits.apply_options())?
        }
        None => {
            let stdin = BufReader::with_capacity(1 << 20, io::stdin());
            apply_layer(stdin, &args.target, &args.limits.apply_options())?
        }
    };
    print_json(&Applied {
        diff_id: stats.diff_id.to_string(),
        tar_size: stats.tar_size,
        skipped: stats.skipped,
    })
}

fn write_tar(args: WriteTarArgs) -> Result<(), OpError> {
    let mut opts = if args.overlay {
        LayerTarOptions::overlay_upper()
    } else {
        LayerTarOptions::whole_dir()
    };
    for e in args.exclude {
        opts = opts.exclude(e);
    }
    opts.source_date_epoch = args.source_date_epoch;
    let out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let (mut out, _) = write_layer_tar(&args.dir, &opts, out)?;
    out.flush()?;
    Ok(())
}

fn remove_tree(a: RemoveArgs) -> Result<(), OpError> {
    // Overlay work dirs are mode 000: open them up first.
    let _ = walk(&a.path, &mut |p, m| {
        if m.is_dir() {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
        }
        Ok(())
    });
    match fs::remove_dir_all(&a.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

fn inspect_source(a: InspectArgs) -> Result<(), OpError> {
    let resolved = resolve_in_root(&a.root, &a.path)?;
    let m = fs::metadata(&resolved)?;
    let sha256 = if a.sha256 && m.is_file() {
        Some(farm_image::Digest::of_file(&resolved)?.0.hex().to_string())
    } else {
        None
    };
    print_json(&Inspected {
        resolved,
        is_dir: m.is_dir(),
        sha256,
        mode: m.permissions().mode() & 0o7777,
    })
}

fn read_file(a: ReadFileArgs) -> Result<(), OpError> {
    let resolved = resolve_in_root(&a.root, &a.path)?;
    if fs::metadata(&resolved)?.is_dir() {
        return Err(OpError::IsDirectory(a.path));
    }
    let mut out = io::stdout().lock();
    io::copy(&mut fs::File::open(&resolved)?, &mut out)?;
    out.flush()?;
    Ok(())
}

/// Calls `f` on every entry below `path`, children before their directory.
fn walk(path: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let m = fs::symlink_metadata(path)?;
    if m.is_dir() {
        for e in fs::read_dir(path)? {
            walk(&e?.path(), f)?;
        }
    }
    f(path, &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request the child reads: the op's name as a tag, its arguments beside it.
    #[test]
    fn ops_travel_as_tag_and_arg() {
        let op = Op::RemoveTree(RemoveArgs { path: "/x".into() });
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "remove-tree", "arg": {"path": "/x"}})
        );
        let back: Op = serde_json::from_value(json).unwrap();
        assert!(matches!(back, Op::RemoveTree(a) if a.path == Path::new("/x")));
        let spec = SandboxSpec::new(crate::sandbox::Rootfs::Bind("/r".into()), "/m", "true");
        let json = serde_json::to_value(Op::Sandbox(spec)).unwrap();
        assert_eq!(json["op"], "sandbox");
        assert!(
            serde_json::from_value::<Op>(serde_json::json!({"op": "nope", "arg": {}})).is_err()
        );
    }

    /// The worker's extraction limits reach the op; a request without them gets the
    /// defaults, which name the worker's flags when they are hit.
    #[test]
    fn apply_layer_carries_its_limits() {
        let json = serde_json::json!({"op": "apply-layer", "arg": {"target": "/t"}});
        let Op::ApplyLayer(args) = serde_json::from_value(json).unwrap() else {
            panic!("not apply-layer")
        };
        assert_eq!(args.limits, ExtractLimits::default());
        let limits = ExtractLimits {
            max_bytes: 10,
            max_entries: 2,
        };
        let op = Op::ApplyLayer(ApplyArgs {
            target: "/t".into(),
            source_file: None,
            limits,
        });
        let Op::ApplyLayer(back) =
            serde_json::from_value(serde_json::to_value(&op).unwrap()).unwrap()
        else {
            panic!("not apply-layer")
        };
        let opts = back.limits.apply_options();
        assert_eq!((opts.max_bytes, opts.max_entries), (10, 2));
        assert!(opts.limits_hint.contains("farm worker --max-layer-size"));
    }
}

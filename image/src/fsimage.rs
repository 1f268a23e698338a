//! stacker's other layer types: squashfs and erofs filesystem images, each optionally
//! followed by dm-verity data, as stacker (through atomfs) writes them.
//!
//! - Media types: `application/vnd.stacker.image.layer.squashfs+<comp>[+verity]` and
//!   `application/vnd.stacker.image.layer.erofs+<comp>[+verity]` (`<comp>` is `zstd`
//!   where the tool has it, else `gzip` for squashfs and `lz4hc` for erofs).
//! - The blob is the filesystem image, padded to 4 KiB, then (with verity) the output
//!   of `veritysetup format` on the same file with `--hash-offset` = the image's size
//!   (sha256, 4 KiB data and hash blocks, format 1, a verity superblock). The root hash
//!   goes into the layer descriptor's annotation [`VERITY_ROOT_HASH_ANNOTATION`]; the
//!   config's `rootfs.diff_ids` names the blob's own digest (the layer is not a tar).
//! - Images are made and unpacked by the external tools (`mksquashfs`/`unsquashfs`
//!   from squashfs-tools, `mkfs.erofs`/`fsck.erofs` from erofs-utils, `veritysetup`
//!   from cryptsetup-bin). The caller runs [`make_fs_image`] and [`extract_fs_image`]
//!   as root inside the build's user namespace, so owners are the container's.
//!
//! Unlike stacker, the verity salt and UUID are derived from the image's bytes (stacker
//! lets libcryptsetup pick random ones) and an erofs image's UUID from a caller's seed,
//! so the same tree gives the same blob: digests are reproducible under
//! `SOURCE_DATE_EPOCH`.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The layer descriptor annotation holding a layer's dm-verity root hash (atomfs's
/// `verity.VerityRootHashAnnotation`).
pub const VERITY_ROOT_HASH_ANNOTATION: &str = "io.stackeroci.stacker.atomfs_verity_root_hash";

/// Media type prefix of squashfs layers.
pub const SQUASHFS_MEDIA_TYPE: &str = "application/vnd.stacker.image.layer.squashfs";
/// Media type prefix of erofs layers.
pub const EROFS_MEDIA_TYPE: &str = "application/vnd.stacker.image.layer.erofs";

/// Block size of the verity data and of the images' padding.
const BLOCK: u64 = 4096;

/// The kind of layer a build writes (`--layer-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerType {
    /// OCI tar layers (compressed as `--compression` says).
    Tar,
    /// squashfs images.
    Squashfs,
    /// erofs images.
    Erofs,
}

impl LayerType {
    /// The filesystem image kind, for the non-tar types.
    pub fn fs_kind(self) -> Option<FsKind> {
        match self {
            LayerType::Tar => None,
            LayerType::Squashfs => Some(FsKind::Squashfs),
            LayerType::Erofs => Some(FsKind::Erofs),
        }
    }

    /// The tag of a layer's image of this type, as stacker tags them: `NAME` for tar,
    /// `NAME-squashfs`, `NAME-erofs`.
    pub fn tag(self, name: &str) -> String {
        match self {
            LayerType::Tar => name.to_string(),
            other => format!("{name}-{other}"),
        }
    }
}

impl fmt::Display for LayerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerType::Tar => "tar",
            LayerType::Squashfs => "squashfs",
            LayerType::Erofs => "erofs",
        })
    }
}

/// A layer type that is not `tar`, `squashfs` or `erofs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown layer type '{0}' (use tar, squashfs or erofs)")]
pub struct UnknownLayerType(pub String);

impl FromStr for LayerType {
    type Err = UnknownLayerType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tar" => Ok(LayerType::Tar),
            "squashfs" => Ok(LayerType::Squashfs),
            "erofs" => Ok(LayerType::Erofs),
            other => Err(UnknownLayerType(other.to_string())),
        }
    }
}

/// What a build's layers are: the type and, for squashfs/erofs, whether dm-verity data
/// is appended (on unless `--no-verity`, as in stacker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerFormat {
    /// The layer type.
    pub layer_type: LayerType,
    /// Append verity data (never for tar).
    pub verity: bool,
}

impl Default for LayerFormat {
    fn default() -> Self {
        LayerFormat::TAR
    }
}

impl LayerFormat {
    /// Tar layers.
    pub const TAR: LayerFormat = LayerFormat {
        layer_type: LayerType::Tar,
        verity: false,
    };

    /// `layer_type`, with verity unless `no_verity` (tar never has it).
    pub fn new(layer_type: LayerType, no_verity: bool) -> Self {
        LayerFormat {
            layer_type,
            verity: layer_type != LayerType::Tar && !no_verity,
        }
    }

    /// Tar layers?
    pub fn is_tar(&self) -> bool {
        self.layer_type == LayerType::Tar
    }
}

/// `tar`, `squashfs`, `squashfs+verity`, `erofs`, `erofs+verity` (how the format travels
/// in a submission and enters a cache key).
impl fmt::Display for LayerFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.verity {
            write!(f, "{}+verity", self.layer_type)
        } else {
            write!(f, "{}", self.layer_type)
        }
    }
}

impl FromStr for LayerFormat {
    type Err = UnknownLayerType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (t, verity) = match s.strip_suffix("+verity") {
            Some(t) => (t, true),
            None => (s, false),
        };
        let layer_type: LayerType = t.parse().map_err(|_| UnknownLayerType(s.to_string()))?;
        if verity && layer_type == LayerType::Tar {
            return Err(UnknownLayerType(s.to_string()));
        }
        Ok(LayerFormat { layer_type, verity })
    }
}

/// A filesystem image kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// squashfs (squashfs-tools).
    Squashfs,
    /// erofs (erofs-utils).
    Erofs,
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsKind::Squashfs => "squashfs",
            FsKind::Erofs => "erofs",
        })
    }
}

/// What a squashfs/erofs layer's media type says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMediaType {
    /// The filesystem.
    pub kind: FsKind,
    /// The compression named in it (empty for stacker's oldest, suffix-less types).
    pub compression: String,
    /// Verity data follows the image.
    pub verity: bool,
}

impl FsMediaType {
    /// Parse a layer media type; `None` when it is not a squashfs/erofs one.
    pub fn parse(media_type: &str) -> Option<FsMediaType> {
        let (kind, rest) = if let Some(r) = media_type.strip_prefix(SQUASHFS_MEDIA_TYPE) {
            (FsKind::Squashfs, r)
        } else if let Some(r) = media_type.strip_prefix(EROFS_MEDIA_TYPE) {
            (FsKind::Erofs, r)
        } else {
            return None;
        };
        if !rest.is_empty() && !rest.starts_with('+') {
            return None;
        }
        let mut parts = rest.split('+').filter(|p| !p.is_empty());
        let mut compression = String::new();
        let mut verity = false;
        for p in parts.by_ref() {
            if p == "verity" {
                verity = true;
            } else {
                compression = p.to_string();
            }
        }
        Some(FsMediaType {
            kind,
            compression,
            verity,
        })
    }
}

impl fmt::Display for FsMediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = match self.kind {
            FsKind::Squashfs => SQUASHFS_MEDIA_TYPE,
            FsKind::Erofs => EROFS_MEDIA_TYPE,
        };
        f.write_str(base)?;
        if !self.compression.is_empty() {
            write!(f, "+{}", self.compression)?;
        }
        if self.verity {
            f.write_str("+verity")?;
        }
        Ok(())
    }
}

/// Why making, checking or unpacking a filesystem image failed.
#[derive(Debug, thiserror::Error)]
pub enum FsImageError {
    /// A tool could not be started (most likely not installed).
    #[error(
        "cannot run {tool}: {source} (install the Debian package {package}; `farm check` \
         lists the layer-type tools)"
    )]
    Missing {
        /// The program.
        tool: &'static str,
        /// Its Debian package.
        package: &'static str,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{tool} failed ({status}): {output}")]
    Failed {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// The image does not verify against its root hash.
    #[error(
        "the {kind} layer does not match its dm-verity root hash {root_hash} (the blob was \
         altered after it was built; rebuild or re-pull the base image): {detail}"
    )]
    VerityMismatch {
        /// The filesystem.
        kind: FsKind,
        /// The root hash the descriptor's annotation names.
        root_hash: String,
        /// What veritysetup said.
        detail: String,
    },
    /// The layer's media type says verity but its descriptor has no root hash, or the
    /// root hash is malformed.
    #[error("the {kind} layer {problem}")]
    BadVerityMetadata {
        /// The filesystem.
        kind: FsKind,
        /// What is wrong.
        problem: String,
    },
    /// The image's superblock is not one of its kind.
    #[error("not a {kind} image: {reason}")]
    BadImage {
        /// The expected filesystem.
        kind: FsKind,
        /// What is wrong.
        reason: String,
    },
    /// The image has more entries than a layer may extract to.
    #[error("the {kind} layer has {entries} inodes, over the limit of {limit} ({hint})")]
    TooManyEntries {
        /// The filesystem.
        kind: FsKind,
        /// Inodes in the image.
        entries: u64,
        /// The limit.
        limit: u64,
        /// How to raise it.
        hint: &'static str,
    },
    /// Reading or writing the image failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FsImageError {
    let context = context.into();
    move |source| FsImageError::Io { context, source }
}

/// The tools of the squashfs/erofs layer types: program and Debian package.
pub const FS_TOOLS: &[(&str, &str)] = &[
    ("mksquashfs", "squashfs-tools"),
    ("unsquashfs", "squashfs-tools"),
    ("mkfs.erofs", "erofs-utils"),
    ("fsck.erofs", "erofs-utils"),
    ("veritysetup", "cryptsetup-bin"),
];

fn package_of(tool: &'static str) -> &'static str {
    FS_TOOLS
        .iter()
        .find(|(t, _)| *t == tool)
        .map_or("?", |(_, p)| p)
}

/// Where `tool` is on `PATH` (or in /sbin, /usr/sbin, where Debian puts veritysetup).
pub fn find_tool(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A command for `tool`, found on `PATH` or in the sbin directories.
fn tool_command(tool: &'static str) -> Command {
    Command::new(find_tool(tool).unwrap_or_else(|| tool.into()))
}

/// Run a tool; its output is kept for the error.
fn run(tool: &'static str, cmd: &mut Command) -> Result<String, FsImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FsImageError::Missing {
            tool,
            package: package_of(tool),
            source,
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let tail: String = {
            let t = text.trim();
            let start = t.len().saturating_sub(2000);
            let start = (start..t.len())
                .find(|i| t.is_char_boundary(*i))
                .unwrap_or(0);
            t[start..].to_string()
        };
        return Err(FsImageError::Failed {
            tool,
            status: out.status.to_string(),
            output: tail,
        });
    }
    Ok(text)
}

/// Does `tool --help` (or `-help`) mention `word`?
fn help_mentions(tool: &'static str, flag: &str, word: &str) -> bool {
    let Some(p) = find_tool(tool) else {
        return false;
    };
    Command::new(p)
        .arg(flag)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).contains(word)
                || String::from_utf8_lossy(&o.stderr).contains(word)
        })
}

/// A UUID (version 4 layout) from the sha256 of `seed`.
fn uuid_from(seed: &[u8]) -> String {
    let h = Sha256::digest(seed);
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// How to make an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MakeOptions {
    /// Top-level names (`/stacker` or `stacker`) left out.
    pub exclude: Vec<String>,
    /// Clamp timestamps (and the image's creation time) to this.
    pub source_date_epoch: Option<u64>,
    /// Seed of the erofs filesystem UUID (the same seed gives the same UUID).
    pub uuid_seed: String,
    /// Append dm-verity data.
    pub verity: bool,
    /// zstd level where the tool compresses with zstd ([`DEFAULT_FS_ZSTD_LEVEL`] when
    /// `None`; stacker leaves mksquashfs at its default, 15, which is ~40x slower on a
    /// 700 MB layer for ~13% less).
    #[serde(default)]
    pub zstd_level: Option<i32>,
}

/// The zstd level of squashfs/erofs layers unless `--compression zstd:LEVEL` says
/// otherwise (the level of farm's zstd tar layers).
pub const DEFAULT_FS_ZSTD_LEVEL: i32 = 3;

/// A made image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeImage {
    /// The layer's media type.
    pub media_type: String,
    /// The verity root hash (hex), with verity.
    pub root_hash: Option<String>,
}

/// Make a `kind` image of `dir` at `out` (which must not exist), with verity data when
/// asked. Run it as root inside the build's user namespace: the tools record owners as
/// they see them.
pub fn make_fs_image(
    kind: FsKind,
    dir: &Path,
    out: &Path,
    opts: &MakeOptions,
) -> Result<MadeImage, FsImageError> {
    let excludes: Vec<String> = opts
        .exclude
        .iter()
        .map(|e| e.trim_start_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .collect();
    strip_overlay_xattrs(dir)?;
    let compression = match kind {
        FsKind::Squashfs => {
            let comp = if help_mentions("mksquashfs", "-help", "zstd") {
                "zstd"
            } else {
                "gzip"
            };
            let mut cmd = tool_command("mksquashfs");
            cmd.arg(dir)
                .arg(out)
                .args(["-comp", comp, "-noappend", "-no-progress", "-quiet"]);
            if comp == "zstd" {
                let level = opts.zstd_level.unwrap_or(DEFAULT_FS_ZSTD_LEVEL);
                cmd.arg("-Xcompression-level").arg(level.to_string());
            }
            for e in &excludes {
                cmd.arg("-e").arg(e);
            }
            match opts.source_date_epoch {
                // squashfs-tools clamps file times and sets the creation time to it.
                Some(t) => cmd.env("SOURCE_DATE_EPOCH", t.to_string()),
                None => cmd.env_remove("SOURCE_DATE_EPOCH"),
            };
            run("mksquashfs", &mut cmd)?;
            comp
        }
        FsKind::Erofs => {
            let comp = if help_mentions("mkfs.erofs", "--help", "zstd") {
                "zstd"
            } else {
                "lz4hc"
            };
            let mut cmd = tool_command("mkfs.erofs");
            let level = match comp {
                "zstd" => format!(",{}", opts.zstd_level.unwrap_or(DEFAULT_FS_ZSTD_LEVEL)),
                _ => String::new(),
            };
            cmd.arg(format!("-z{comp}{level}"))
                .arg(format!(
                    "-U{}",
                    uuid_from(format!("farm erofs {}", opts.uuid_seed).as_bytes())
                ))
                .arg("--preserve-mtime")
                .arg("--quiet");
            for e in &excludes {
                cmd.arg(format!("--exclude-path={e}"));
            }
            match opts.source_date_epoch {
                // erofs-utils clamps file times and the build time to it.
                Some(t) => cmd.env("SOURCE_DATE_EPOCH", t.to_string()),
                None => cmd.env_remove("SOURCE_DATE_EPOCH"),
            };
            cmd.arg(out).arg(dir);
            run("mkfs.erofs", &mut cmd)?;
            comp
        }
    };
    pad_to_block(out)?;
    let root_hash = if opts.verity {
        Some(append_verity(out)?)
    } else {
        None
    };
    Ok(MadeImage {
        media_type: FsMediaType {
            kind,
            compression: compression.to_string(),
            verity: opts.verity,
        }
        .to_string(),
        root_hash,
    })
}

/// Remove overlayfs's bookkeeping xattrs (`*.overlay.origin`, `impure`, ...: file
/// handles that differ from pool to pool) below `dir`, keeping what overlayfs reads
/// back from a layer (`opaque`, `whiteout`), as stacker strips them before it makes an
/// image.
pub fn strip_overlay_xattrs(dir: &Path) -> Result<(), FsImageError> {
    let m = std::fs::symlink_metadata(dir).map_err(io_err(format!("reading {}", dir.display())))?;
    if m.file_type().is_symlink() {
        return Ok(());
    }
    let names = crate::tarwrite::list_xattrs(dir)
        .map_err(io_err(format!("listing xattrs of {}", dir.display())))?;
    for name in names {
        let keep = name.ends_with(b".overlay.opaque")
            || name.ends_with(b".overlay.whiteout")
            || name.ends_with(b".overlay.whiteouts");
        if !keep && name.windows(9).any(|w| w == b".overlay.") {
            let os = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&name);
            rustix::fs::lremovexattr(dir, os)
                .map_err(|e| io_err(format!("removing an xattr of {}", dir.display()))(e.into()))?;
        }
    }
    if m.is_dir() {
        for e in std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let e = e.map_err(io_err(format!("reading {}", dir.display())))?;
            strip_overlay_xattrs(&e.path())?;
        }
    }
    Ok(())
}

/// Pad the file to a whole number of 4 KiB blocks (both tools already do; verity needs it).
fn pad_to_block(path: &Path) -> Result<u64, FsImageError> {
    let len = std::fs::metadata(path)
        .map_err(io_err(format!("reading {}", path.display())))?
        .len();
    let padded = len.div_ceil(BLOCK) * BLOCK;
    if padded != len {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(padded))
            .map_err(io_err(format!("padding {}", path.display())))?;
    }
    Ok(padded)
}

/// `veritysetup format` on the image file itself, the hash area right after the image;
/// returns the root hash. The salt and the verity UUID come from the image's bytes.
pub fn append_verity(path: &Path) -> Result<String, FsImageError> {
    let size = pad_to_block(path)?;
    let (image_hash, _) = crate::digest::Digest::of_file(path).map_err(|e| FsImageError::Io {
        context: format!("hashing {}", path.display()),
        source: e,
    })?;
    let salt = image_hash.hex().to_string();
    let uuid = uuid_from(format!("farm verity {salt}").as_bytes());
    let mut cmd = tool_command("veritysetup");
    cmd.arg("format")
        .arg(path)
        .arg(path)
        .arg(format!("--hash-offset={size}"))
        .arg(format!("--data-blocks={}", size / BLOCK))
        .args([
            "--hash=sha256",
            "--data-block-size=4096",
            "--hash-block-size=4096",
            "--format=1",
        ])
        .arg(format!("--salt={salt}"))
        .arg(format!("--uuid={uuid}"));
    let out = run("veritysetup", &mut cmd)?;
    out.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .filter(|h| is_root_hash(h))
        .ok_or_else(|| FsImageError::Failed {
            tool: "veritysetup",
            status: "no root hash in its output".into(),
            output: out.clone(),
        })
}

fn is_root_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the filesystem ends (and verity data starts): the size the superblock
/// records, rounded up to 4 KiB.
pub fn fs_data_size(kind: FsKind, file: &Path) -> Result<u64, FsImageError> {
    let mut f = std::fs::File::open(file).map_err(io_err(format!("opening {}", file.display())))?;
    let mut head = vec![0u8; 2048];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(io_err(format!("reading {}", file.display()))(e)),
        }
    }
    head.truncate(n);
    let _ = f.seek(SeekFrom::Start(0));
    superblock(kind, &head).map(|s| s.data_size)
}

/// What farm reads from a superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The filesystem's size, rounded up to 4 KiB.
    pub data_size: u64,
    /// Inodes it holds.
    pub inodes: u64,
}

/// Parse the superblock at the start of an image (`head`: its first 2 KiB).
pub fn superblock(kind: FsKind, head: &[u8]) -> Result<Superblock, FsImageError> {
    let bad = |reason: &str| FsImageError::BadImage {
        kind,
        reason: reason.to_string(),
    };
    let u32_at = |o: usize| -> Option<u64> {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64)
    };
    let u64_at = |o: usize| -> Option<u64> {
        head.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    match kind {
        FsKind::Squashfs => {
            // struct squashfs_super_block: s_magic "hsqs" at 0, inodes at 4,
            // bytes_used at 40.
            if head.get(0..4) != Some(b"hsqs") {
                return Err(bad("no squashfs magic"));
            }
            let inodes = u32_at(4).ok_or_else(|| bad("short superblock"))?;
            let used = u64_at(40).ok_or_else(|| bad("short superblock"))?;
            Ok(Superblock {
                data_size: used.div_ceil(BLOCK) * BLOCK,
                inodes,
            })
        }
        FsKind::Erofs => {
            // struct erofs_super_block at 1024: magic 0xE0F5E1E2, blkszbits at +12,
            // inos at +16, blocks at +36.
            if u32_at(1024) != Some(0xE0F5_E1E2) {
                return Err(bad("no erofs magic"));
            }
            let bits = *head.get(1024 + 12).ok_or_else(|| bad("short superblock"))?;
            if !(9..=16).contains(&bits) {
                return Err(bad("implausible block size"));
            }
            let inodes = u64_at(1024 + 16).ok_or_else(|| bad("short superblock"))?;
            let blocks = u32_at(1024 + 36).ok_or_else(|| bad("short superblock"))?;
            Ok(Superblock {
                data_size: (blocks << bits).div_ceil(BLOCK) * BLOCK,
                inodes,
            })
        }
    }
}

/// Check the image against its verity root hash (`veritysetup verify` on the file).
/// A media type with `+verity` must come with a root hash.
pub fn verify_fs_image(
    media: &FsMediaType,
    file: &Path,
    root_hash: Option<&str>,
) -> Result<(), FsImageError> {
    let kind = media.kind;
    let Some(root_hash) = root_hash else {
        if media.verity {
            return Err(FsImageError::BadVerityMetadata {
                kind,
                problem: format!(
                    "says it has verity data ({media}) but its descriptor has no \
                     {VERITY_ROOT_HASH_ANNOTATION} annotation"
                ),
            });
        }
        return Ok(());
    };
    if !is_root_hash(root_hash) {
        return Err(FsImageError::BadVerityMetadata {
            kind,
            problem: format!("has a malformed verity root hash {root_hash:?}"),
        });
    }
    let offset = fs_data_size(kind, file)?;
    let mut cmd = tool_command("veritysetup");
    cmd.arg("verify")
        .arg(file)
        .arg(file)
        .arg(root_hash)
        .arg(format!("--hash-offset={offset}"));
    match run("veritysetup", &mut cmd) {
        Ok(_) => Ok(()),
        Err(FsImageError::Failed { output, .. }) => Err(FsImageError::VerityMismatch {
            kind,
            root_hash: root_hash.to_string(),
            detail: output,
        }),
        Err(e) => Err(e),
    }
}

/// Unpack the image `file` into the directory `dest` (which exists, empty). Run it as
/// root inside the build's user namespace, so owners and modes are restored. Refuses an
/// image with more than `max_entries` inodes before unpacking anything.
pub fn extract_fs_image(
    kind: FsKind,
    file: &Path,
    dest: &Path,
    max_entries: u64,
    hint: &'static str,
) -> Result<(), FsImageError> {
    let mut head = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(2048).read_to_end(&mut head))
        .map_err(io_err(format!("reading {}", file.display())))?;
    let sb = superblock(kind, &head)?;
    if sb.inodes > max_entries {
        return Err(FsImageError::TooManyEntries {
            kind,
            entries: sb.inodes,
            limit: max_entries,
            hint,
        });
    }
    match kind {
        FsKind::Squashfs => {
            let mut cmd = tool_command("unsquashfs");
            cmd.args(["-f", "-n", "-no-progress", "-d"])
                .arg(dest)
                .arg(file);
            run("unsquashfs", &mut cmd)?;
        }
        FsKind::Erofs => {
            let mut cmd = tool_command("fsck.erofs");
            cmd.arg(format!("--extract={}", dest.display()))
                .args(["--overwrite", "--preserve", "--force"])
                .arg(file);
            run("fsck.erofs", &mut cmd)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types_parse_print_and_tag_as_stacker() {
        for s in [
            "tar",
            "squashfs",
            "erofs",
            "squashfs+verity",
            "erofs+verity",
        ] {
            assert_eq!(s.parse::<LayerFormat>().unwrap().to_string(), s);
        }
        assert!("tar+verity".parse::<LayerFormat>().is_err());
        assert!("zip".parse::<LayerType>().is_err());
        assert_eq!(
            LayerFormat::new(LayerType::Squashfs, false).to_string(),
            "squashfs+verity"
        );
        assert_eq!(LayerFormat::new(LayerType::Tar, false), LayerFormat::TAR);
        assert_eq!(LayerType::Tar.tag("app"), "app");
        assert_eq!(LayerType::Squashfs.tag("app"), "app-squashfs");
        assert_eq!(LayerType::Erofs.tag("app"), "app-erofs");
    }

    #[test]
    fn media_types_are_stackers() {
        let m =
            FsMediaType::parse("application/vnd.stacker.image.layer.squashfs+zstd+verity").unwrap();
        assert_eq!(
            m,
            FsMediaType {
                kind: FsKind::Squashfs,
                compression: "zstd".into(),
                verity: true
            }
        );
        assert_eq!(
            m.to_string(),
            "application/vnd.stacker.image.layer.squashfs+zstd+verity"
        );
        // stacker's oldest images have no compression suffix.
        let old = FsMediaType::parse(SQUASHFS_MEDIA_TYPE).unwrap();
        assert!(!old.verity && old.compression.is_empty());
        let e = FsMediaType::parse("application/vnd.stacker.image.layer.erofs+lz4hc").unwrap();
        assert_eq!((e.kind, e.verity), (FsKind::Erofs, false));
        assert!(FsMediaType::parse("application/vnd.oci.image.layer.v1.tar+gzip").is_none());
        assert!(FsMediaType::parse("application/vnd.stacker.image.layer.squashfsX").is_none());
    }

    #[test]
    fn superblocks_give_the_data_size() {
        let mut sq = vec![0u8; 2048];
        sq[0..4].copy_from_slice(b"hsqs");
        sq[4..8].copy_from_slice(&5u32.to_le_bytes());
        sq[40..48].copy_from_slice(&312u64.to_le_bytes());
        assert_eq!(
            superblock(FsKind::Squashfs, &sq).unwrap(),
            Superblock {
                data_size: 4096,
                inodes: 5
            }
        );
        let mut er = vec![0u8; 2048];
        er[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        er[1036] = 12;
        er[1040..1048].copy_from_slice(&7u64.to_le_bytes());
        er[1060..1064].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            superblock(FsKind::Erofs, &er).unwrap(),
            Superblock {
                data_size: 3 * 4096,
                inodes: 7
            }
        );
        assert!(superblock(FsKind::Erofs, &sq).is_err());
        assert!(superblock(FsKind::Squashfs, &er).is_err());
        assert!(superblock(FsKind::Squashfs, b"hsq").is_err());
    }

    fn tools_here() -> bool {
        FS_TOOLS.iter().all(|(t, _)| find_tool(t).is_some())
    }

    /// The real tools: an image of a small tree, verity appended, verified, unpacked;
    /// the same tree under SOURCE_DATE_EPOCH gives the same bytes; a flipped byte in
    /// the image is refused by the root hash.
    #[test]
    fn images_verify_reproduce_and_refuse_tampering() {
        if !tools_here() {
            eprintln!("skipped: squashfs-tools, erofs-utils or cryptsetup-bin missing");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::create_dir_all(src.join("stacker")).unwrap();
        std::fs::write(src.join("etc/hello"), "hello\n").unwrap();
        // overlayfs bookkeeping (differs from pool to pool) goes; opaque stays.
        let etc = src.join("etc");
        let xattrs = rustix::fs::lsetxattr(
            &etc,
            "user.overlay.origin",
            b"handle",
            rustix::fs::XattrFlags::empty(),
        )
        .and_then(|()| {
            rustix::fs::lsetxattr(
                &etc,
                "user.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
        })
        .is_ok();
        for kind in [FsKind::Squashfs, FsKind::Erofs] {
            let opts = MakeOptions {
                exclude: vec!["/stacker".into()],
                source_date_epoch: Some(1_700_000_000),
                uuid_seed: "seed".into(),
                verity: true,
                zstd_level: None,
            };
            let a = tmp.path().join(format!("{kind}.a"));
            let b = tmp.path().join(format!("{kind}.b"));
            let made = make_fs_image(kind, &src, &a, &opts).unwrap();
            if xattrs {
                let names = crate::tarwrite::list_xattrs(&etc).unwrap();
                assert_eq!(names, vec![b"user.overlay.opaque".to_vec()]);
            }
            let again = make_fs_image(kind, &src, &b, &opts).unwrap();
            assert_eq!(made, again);
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            let media = FsMediaType::parse(&made.media_type).unwrap();
            assert!(media.verity && media.kind == kind);
            let root = made.root_hash.clone().unwrap();
            verify_fs_image(&media, &a, Some(&root)).unwrap();
            // Verity data follows the image.
            let data = fs_data_size(kind, &a).unwrap();
            assert!(std::fs::metadata(&a).unwrap().len() > data);
            let dest = tmp.path().join(format!("{kind}.out"));
            std::fs::create_dir(&dest).unwrap();
            extract_fs_image(kind, &a, &dest, 100, "hint").unwrap();
            assert_eq!(
                std::fs::read_to_string(dest.join("etc/hello")).unwrap(),
                "hello\n"
            );
            assert!(!dest.join("stacker").exists(), "excluded");
            let too_many = extract_fs_image(kind, &a, &dest, 1, "hint").unwrap_err();
            assert!(matches!(too_many, FsImageError::TooManyEntries { .. }));
            // No root hash for an image that says it has one.
            assert!(matches!(
                verify_fs_image(&media, &a, None),
                Err(FsImageError::BadVerityMetadata { .. })
            ));
            // Tampered: one byte of the filesystem changed.
            let mut bytes = std::fs::read(&b).unwrap();
            let at = (data - 1) as usize;
            bytes[at] ^= 0xff;
            std::fs::write(&b, bytes).unwrap();
            let err = verify_fs_image(&media, &b, Some(&root)).unwrap_err();
            assert!(matches!(err, FsImageError::VerityMismatch { .. }), "{err}");
            assert!(err.to_string().contains("dm-verity root hash"), "{err}");
        }
    }
}

//! The build context of a submission: every local file a plan reads, relative to one
//! root, hashed, so that `farm submit` can upload what the coordinator lacks and name
//! the rest by digest.
//!
//! What goes in: every loaded stackerfile; local imports (files, and directories
//! recursively, symlinks inside them kept as links); local `tar` bases; the directory of
//! each local `oci` base; `overlay_dirs` sources. Not `binds`: those are paths on the
//! worker. The root is the common ancestor of the stackerfiles' directories; an input
//! outside it is an error (the same rule as `farm build`) unless
//! `--allow-outside-context`, which widens the root to include it.
//!
//! Entries of the request: a file has a digest; a symlink has a `symlink_target`; a
//! directory has neither (so empty ones travel too). `mode` holds the permission bits
//! (`& 0o7777`).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use farm_coordinator::Plan;
use farm_image::Digest;
use farm_proto::v1::ContextFile;
use farm_stackerfile::{InputKind, common_ancestor, is_url, local_inputs};

/// One entry of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A regular file (read through symlinks when it was named directly).
    File {
        source: PathBuf,
        digest: Digest,
        size: u64,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

/// The files of a submission, by root-relative path.
#[derive(Debug, Clone)]
pub(crate) struct BuildContext {
    /// The directory every path is relative to (absolute, not resolved through symlinks).
    pub root: PathBuf,
    pub entries: BTreeMap<String, Entry>,
    /// What to send as `SubmitRequest.stackerfiles`.
    pub stackerfiles: Vec<String>,
}

impl BuildContext {
    /// The entries as the protocol's `ContextFile`s, sorted by path.
    pub(crate) fn to_proto(&self) -> Vec<ContextFile> {
        self.entries
            .iter()
            .map(|(path, e)| {
                let (digest, mode, symlink_target) = match e {
                    Entry::File { digest, mode, .. } => (digest.to_string(), *mode, String::new()),
                    Entry::Dir { mode } => (String::new(), *mode, String::new()),
                    Entry::Symlink { target } => (String::new(), 0o777, target.clone()),
                };
                ContextFile {
                    path: path.clone(),
                    digest,
                    mode,
                    symlink_target,
                }
            })
            .collect()
    }

    /// Every file: (local path, digest, size), one per distinct digest.
    pub(crate) fn blobs(&self) -> Vec<(&Path, &Digest, u64)> {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::File {
                    source,
                    digest,
                    size,
                    ..
                } if seen.insert(digest) => Some((source.as_path(), digest, *size)),
                _ => None,
            })
            .collect()
    }
}

/// A local input the plan names, before it is read.
struct Input {
    /// For errors: what it is and where it is used.
    what: String,
    /// Absolute, lexically normalised.
    path: PathBuf,
    /// Whether it must be followed into (a directory of a layout or of an import).
    is_dir: bool,
}

/// Collect the context of `plan`, whose command-line stackerfiles are `entries`.
pub(crate) fn collect(
    plan: &Plan,
    entries: &[PathBuf],
    allow_outside: bool,
) -> anyhow::Result<BuildContext> {
    let mut inputs = Vec::new();
    let mut stackerfile_dirs = Vec::new();
    for input in local_inputs(plan) {
        let path = absolute(&input.path)?;
        if input.kind == InputKind::Stackerfile {
            stackerfile_dirs.push(path.parent().map(Path::to_path_buf).unwrap_or_default());
        }
        inputs.push(Input {
            what: input.to_string(),
            path,
            is_dir: input.kind.must_be_dir(),
        });
    }
    let mut root = match common_ancestor(stackerfile_dirs.iter().map(PathBuf::as_path)) {
        Some(common) => common,
        None => std::env::current_dir().context("finding the current directory")?,
    };

    // Check every input, widening the root for those outside it when allowed.
    let canonical_root = fs::canonicalize(&root)
        .with_context(|| format!("reading the build context {}", root.display()))?;
    for input in &inputs {
        let meta = match fs::metadata(&input.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                bail!("{}: {} does not exist", input.what, input.path.display())
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{}: reading {}", input.what, input.path.display()));
            }
        };
        if input.is_dir && !meta.is_dir() {
            bail!(
                "{}: {} is not a directory (an OCI layout)",
                input.what,
                input.path.display()
            );
        }
        let resolved = fs::canonicalize(&input.path)
            .with_context(|| format!("{}: reading {}", input.what, input.path.display()))?;
        let inside = input.path.starts_with(&root) && resolved.starts_with(&canonical_root);
        if !inside {
            if !allow_outside {
                bail!(
                    "{} resolves to {}, outside the build context {}; inputs must stay inside \
                     the directory tree of the stackerfiles (pass --allow-outside-context to \
                     send it anyway)",
                    input.what,
                    resolved.display(),
                    root.display()
                );
            }
            if !input.path.starts_with(&root) {
                root = common_ancestor([root.as_path(), input.path.as_path()]).unwrap_or(root);
            }
        }
    }

    let mut ctx = BuildContext {
        root,
        entries: BTreeMap::new(),
        stackerfiles: Vec::new(),
    };
    for input in &inputs {
        let rel = relative(&ctx.root, &input.path)?;
        add_followed(&mut ctx.entries, &input.path, rel)
            .with_context(|| format!("{}: reading {}", input.what, input.path.display()))?;
    }
    for entry in entries {
        let shown = entry.to_string_lossy();
        if is_url(&shown) {
            ctx.stackerfiles.push(shown.into_owned());
        } else {
            let rel = relative(&ctx.root, &absolute(entry)?)?;
            ctx.stackerfiles.push(rel);
        }
    }
    Ok(ctx)
}

/// Add `path` (followed if it is a symlink) at `rel`; a directory with its whole tree.
fn add_followed(
    entries: &mut BTreeMap<String, Entry>,
    path: &Path,
    rel: String,
) -> anyhow::Result<()> {
    let meta = fs::metadata(path)?;
    if meta.is_dir() {
        if !rel.is_empty() {
            entries.entry(rel.clone()).or_insert(Entry::Dir {
                mode: meta.permissions().mode() & 0o7777,
            });
        }
        walk(entries, path, &rel)
    } else if meta.is_file() {
        add_file(entries, path, rel, meta.permissions().mode())
    } else {
        bail!("{} is not a regular file or a directory", path.display())
    }
}

fn add_file(
    entries: &mut BTreeMap<String, Entry>,
    path: &Path,
    rel: String,
    mode: u32,
) -> anyhow::Result<()> {
    if entries.contains_key(&rel) {
        return Ok(());
    }
    let (digest, size) =
        Digest::of_file(path).with_context(|| format!("hashing {}", path.display()))?;
    entries.insert(
        rel,
        Entry::File {
            source: path.to_path_buf(),
            digest,
            size,
            mode: mode & 0o7777,
        },
    );
    Ok(())
}

/// Add the tree under `dir` (at `rel`), symlinks as links.
fn walk(entries: &mut BTreeMap<String, Entry>, dir: &Path, rel: &str) -> anyhow::Result<()> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let path = child.path();
        let name = child
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("{}: the name {n:?} is not UTF-8", dir.display()))?;
        let child_rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path)
                .with_context(|| format!("reading the link {}", path.display()))?;
            let target = target.into_os_string().into_string().map_err(|t| {
                anyhow::anyhow!("{}: the link target {t:?} is not UTF-8", path.display())
            })?;
            entries
                .entry(child_rel)
                .or_insert(Entry::Symlink { target });
        } else if ft.is_dir() {
            entries.entry(child_rel.clone()).or_insert(Entry::Dir {
                mode: meta.permissions().mode() & 0o7777,
            });
            walk(entries, &path, &child_rel)?;
        } else if ft.is_file() {
            add_file(entries, &path, child_rel, meta.permissions().mode())?;
        } else {
            bail!(
                "{} is a device, socket or pipe, which cannot be sent to the coordinator",
                path.display()
            );
        }
    }
    Ok(())
}

/// `path` made absolute against the current directory and normalised lexically (`..`
/// removes the previous component; symlinks are not resolved).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let abs =
        std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))?;
    Ok(farm_stackerfile::load::normalize(&abs))
}

/// `path` relative to `root` (which contains it) with `/` separators; `""` for the root.
fn relative(root: &Path, path: &Path) -> anyhow::Result<String> {
    let rel = path.strip_prefix(root).map_err(|_| {
        anyhow::anyhow!(
            "{} is outside the build context {}",
            path.display(),
            root.display()
        )
    })?;
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| anyhow::anyhow!("{}: the path is not UTF-8", path.display()))?,
            ),
            other => bail!("{}: unexpected {other:?} in the path", path.display()),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn plan(path: &Path) -> Plan {
        farm_stackerfile::Plan::load(path, &Default::default(), &farm_stackerfile::LocalFiles)
            .unwrap_or_else(|e| panic!("{:?}", e.diagnostics))
    }

    /// ctx/stacker.yaml with a tar base, a file import, a directory import (with a
    /// symlink and an empty directory), an overlay dir and a bind; ctx/../outside.txt.
    fn fixture(extra_import: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let ctx = d.path().join("ctx");
        fs::create_dir_all(ctx.join("tree/sub")).unwrap();
        fs::create_dir_all(ctx.join("tree/empty")).unwrap();
        fs::create_dir_all(ctx.join("over")).unwrap();
        fs::create_dir_all(ctx.join("bound")).unwrap();
        fs::write(ctx.join("bound/secret"), "not sent").unwrap();
        fs::write(ctx.join("base.tar"), "tar bytes").unwrap();
        fs::write(ctx.join("file.txt"), "hello").unwrap();
        fs::set_permissions(ctx.join("file.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(ctx.join("tree/sub/a"), "a").unwrap();
        fs::write(ctx.join("over/o.txt"), "o").unwrap();
        symlink("sub/a", ctx.join("tree/link")).unwrap();
        symlink("/nowhere/at/all", ctx.join("tree/dangling")).unwrap();
        fs::write(d.path().join("outside.txt"), "out").unwrap();
        let yaml = format!(
            "base:\n  from:\n    type: tar\n    url: base.tar\n  imports:\n    - file.txt\n    \
             - path: tree\n      dest: /tree\n{extra_import}  overlay_dirs:\n    - source: over\n  \
             binds:\n    - bound -> /mnt\n"
        );
        fs::write(ctx.join("stacker.yaml"), yaml).unwrap();
        (d, ctx)
    }

    #[test]
    fn collects_stackerfile_imports_tar_base_and_overlay_dirs_but_not_binds() {
        let (_d, ctx) = fixture("");
        let file = ctx.join("stacker.yaml");
        let c = collect(&plan(&file), std::slice::from_ref(&file), false).unwrap();
        assert_eq!(c.root, absolute(&ctx).unwrap());
        assert_eq!(c.stackerfiles, ["stacker.yaml"]);
        let paths: Vec<&str> = c.entries.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "base.tar",
                "file.txt",
                "over",
                "over/o.txt",
                "stacker.yaml",
                "tree",
                "tree/dangling",
                "tree/empty",
                "tree/link",
                "tree/sub",
                "tree/sub/a",
            ]
        );
        assert_eq!(
            c.entries["tree/link"],
            Entry::Symlink {
                target: "sub/a".into()
            }
        );
        assert_eq!(
            c.entries["tree/dangling"],
            Entry::Symlink {
                target: "/nowhere/at/all".into()
            }
        );
        assert!(matches!(c.entries["tree/empty"], Entry::Dir { .. }));
        match &c.entries["file.txt"] {
            Entry::File {
                digest, size, mode, ..
            } => {
                assert_eq!(*digest, Digest::of(b"hello"));
                assert_eq!((*size, *mode), (5, 0o640));
            }
            other => panic!("{other:?}"),
        }
        let proto = c.to_proto();
        let link = proto.iter().find(|f| f.path == "tree/link").unwrap();
        assert_eq!(
            (link.digest.as_str(), link.symlink_target.as_str()),
            ("", "sub/a")
        );
        // Directories are sent too (neither digest nor target), so empty ones travel.
        let empty = proto.iter().find(|f| f.path == "tree/empty").unwrap();
        assert_eq!(
            (empty.digest.as_str(), empty.symlink_target.as_str()),
            ("", "")
        );
        let files_and_links = proto
            .iter()
            .filter(|f| !f.digest.is_empty() || !f.symlink_target.is_empty())
            .count();
        assert_eq!(files_and_links, 7);
        // Five files, five distinct blobs.
        assert_eq!(c.blobs().len(), 5);
    }

    #[test]
    fn an_input_outside_the_context_is_an_error_unless_allowed() {
        let (d, ctx) = fixture("    - ../outside.txt\n");
        let file = ctx.join("stacker.yaml");
        let p = plan(&file);
        let e = collect(&p, std::slice::from_ref(&file), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("import '../outside.txt' of layer base")
                && e.contains("outside the build context")
                && e.contains("--allow-outside-context"),
            "{e}"
        );
        let c = collect(&p, std::slice::from_ref(&file), true).unwrap();
        assert_eq!(c.root, absolute(d.path()).unwrap());
        assert_eq!(c.stackerfiles, ["ctx/stacker.yaml"]);
        assert!(c.entries.contains_key("outside.txt"));
        assert!(c.entries.contains_key("ctx/file.txt"));
        assert!(c.entries.contains_key("ctx/tree/link"));
    }

    #[test]
    fn a_symlink_out_of_the_context_is_outside_too() {
        let (_d, ctx) = fixture("    - link-out\n");
        symlink("../outside.txt", ctx.join("link-out")).unwrap();
        let file = ctx.join("stacker.yaml");
        let p = plan(&file);
        let e = collect(&p, std::slice::from_ref(&file), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("import 'link-out'"), "{e}");
        // Allowed: the content is sent where the stackerfile names it.
        let c = collect(&p, &[file], true).unwrap();
        match &c.entries["link-out"] {
            Entry::File { digest, .. } => assert_eq!(*digest, Digest::of(b"out")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_import_is_an_error() {
        let (_d, ctx) = fixture("    - nope.txt\n");
        let file = ctx.join("stacker.yaml");
        let e = collect(&plan(&file), std::slice::from_ref(&file), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("import 'nope.txt' of layer base") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn prerequisites_and_oci_layouts() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("base/layout/blobs/sha256")).unwrap();
        fs::write(root.join("base/layout/index.json"), "{}").unwrap();
        fs::write(root.join("base/layout/oci-layout"), "{}").unwrap();
        fs::write(
            root.join("base/stacker.yaml"),
            "base:\n  from:\n    type: oci\n    url: layout:busybox\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("app")).unwrap();
        fs::write(
            root.join("app/stacker.yaml"),
            "config:\n  prerequisites: [../base/stacker.yaml]\napp:\n  from:\n    type: built\n    \
             tag: base\n",
        )
        .unwrap();
        let file = root.join("app/stacker.yaml");
        let c = collect(&plan(&file), std::slice::from_ref(&file), false).unwrap();
        assert_eq!(c.root, absolute(root).unwrap());
        assert_eq!(c.stackerfiles, ["app/stacker.yaml"]);
        let paths: Vec<&str> = c.entries.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "app/stacker.yaml",
                "base/layout",
                "base/layout/blobs",
                "base/layout/blobs/sha256",
                "base/layout/index.json",
                "base/layout/oci-layout",
                "base/stacker.yaml",
            ]
        );
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(Path::new("/a"), Path::new("/a/b/c")).unwrap(),
            "b/c"
        );
        assert_eq!(relative(Path::new("/a"), Path::new("/a")).unwrap(), "");
        assert!(relative(Path::new("/a"), Path::new("/b")).is_err());
    }
}

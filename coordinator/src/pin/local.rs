//! Local inputs (import files and directories, tarballs, `overlay_dirs`), pinned to
//! content digests. These digests enter cache keys, so a changed import always rebuilds
//! (stacker issues 70 and 55) and an unchanged one never does, whatever its mtime.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// What a local input is to its layer (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalKind {
    Import,
    /// The tarball of a `tar` base.
    TarBase,
    OverlayDir,
    /// The layout of an `oci` base.
    OciBase,
    /// A stackerfile (a prerequisite, or one submitted).
    Stackerfile,
}

impl std::fmt::Display for LocalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LocalKind::Import => "import",
            LocalKind::TarBase => "base",
            LocalKind::OverlayDir => "overlay_dirs source",
            LocalKind::OciBase => "oci base",
            LocalKind::Stackerfile => "stackerfile",
        })
    }
}

/// Errors pinning an input.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{kind} '{written}': {path} does not exist")]
    Missing {
        kind: LocalKind,
        written: String,
        path: PathBuf,
    },
    #[error("{kind} '{written}': cannot read {path}: {source}")]
    Io {
        kind: LocalKind,
        written: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{kind} '{written}' resolves to {resolved}, outside the build context {context}; \
         inputs must stay inside the directory tree you build from (pass \
         --allow-outside-context to allow it)"
    )]
    OutsideContext {
        kind: LocalKind,
        written: String,
        resolved: PathBuf,
        context: PathBuf,
    },
    #[error(
        "{kind} '{written}': this remote submission uploaded no files, so its build reads \
         none (submit the stackerfiles from a directory with `farm submit`, which uploads \
         what the plan reads)"
    )]
    NoContext { kind: LocalKind, written: String },
    #[error(
        "{kind} '{written}' is outside the uploaded build context: a coordinator reads \
         nothing of its own disk for a submitted build (upload the file with the \
         stackerfiles, `farm submit --allow-outside-context` if it lies outside their \
         tree; or the coordinator's operator may allow reading its disk with `farm \
         coordinator --allow-outside-context`)"
    )]
    OutsideUpload { kind: LocalKind, written: String },
    #[error("import '{written}': hash mismatch: expected sha256:{expected}, got sha256:{actual}")]
    HashMismatch {
        written: String,
        expected: String,
        actual: String,
    },
    #[error("import '{written}': 'hash' applies to files, but {path} is a directory")]
    HashOnDirectory { written: String, path: PathBuf },
}

/// What a local path is, with its content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedPath {
    /// The path after resolving symlinks (what will be copied).
    pub resolved: PathBuf,
    pub is_dir: bool,
    /// `sha256:<hex>`: of the bytes for a file; of a canonical listing for a directory.
    pub digest: String,
    /// For a file, the sha256 hex of its bytes (what `hash:` is compared against).
    pub file_sha256: Option<String>,
    pub bytes: u64,
}

/// Where a build's local inputs may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalScope {
    /// Anywhere this process can read (a local build, as stacker does; or a coordinator
    /// whose operator allowed it).
    Anywhere,
    /// Inside this directory (after resolving symlinks): the stackerfiles' tree.
    Within(PathBuf),
    /// Inside a remote submission's uploaded context, materialised in this directory.
    Uploaded(PathBuf),
    /// Nowhere: a remote submission that uploaded no files reads none of this machine's.
    Nowhere,
}

impl LocalScope {
    /// The directory inputs must stay in (`None`: anywhere); an input is refused
    /// outright when no local input is allowed.
    pub fn bound(&self, kind: LocalKind, written: &str) -> Result<Option<&Path>, InputError> {
        match self {
            LocalScope::Anywhere => Ok(None),
            LocalScope::Within(dir) | LocalScope::Uploaded(dir) => Ok(Some(dir)),
            LocalScope::Nowhere => Err(InputError::NoContext {
                kind,
                written: written.to_string(),
            }),
        }
    }

    /// An error in the words of this scope: an uploaded context names no path of this
    /// machine (the submitter knows none of them).
    pub fn explain(&self, e: InputError) -> InputError {
        match (self, e) {
            (LocalScope::Uploaded(_), InputError::OutsideContext { kind, written, .. }) => {
                InputError::OutsideUpload { kind, written }
            }
            (
                LocalScope::Uploaded(root),
                InputError::Missing {
                    kind,
                    written,
                    path,
                },
            ) => InputError::Missing {
                kind,
                written,
                path: path.strip_prefix(root).unwrap_or(&path).to_path_buf(),
            },
            (_, e) => e,
        }
    }

    /// In an uploaded context, `path` with its symlinks resolved without ever looking
    /// outside the context: a `..` above its root or an absolute link target is refused
    /// before anything of this machine is looked at (whether a file of this machine
    /// exists is none of the submitter's business). Elsewhere, `path` as it is.
    fn within_upload(
        &self,
        kind: LocalKind,
        written: &str,
        path: &Path,
    ) -> Result<PathBuf, InputError> {
        use std::collections::VecDeque;
        use std::path::Component;
        let LocalScope::Uploaded(root) = self else {
            return Ok(path.to_path_buf());
        };
        let outside = || InputError::OutsideUpload {
            kind,
            written: written.to_string(),
        };
        let rel = path.strip_prefix(root).map_err(|_| outside())?;
        let mut queue: VecDeque<PathBuf> = rel
            .components()
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect();
        let mut cur = root.clone();
        let mut hops = 0;
        while let Some(part) = queue.pop_front() {
            match part.components().next() {
                None | Some(Component::CurDir) => {}
                Some(Component::ParentDir) => {
                    if cur == *root {
                        return Err(outside());
                    }
                    cur.pop();
                }
                Some(Component::Normal(name)) => {
                    let next = cur.join(name);
                    let meta = match fs::symlink_metadata(&next) {
                        Ok(m) => m,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            return Err(InputError::Missing {
                                kind,
                                written: written.to_string(),
                                path: next.strip_prefix(root).unwrap_or(&next).to_path_buf(),
                            });
                        }
                        Err(source) => {
                            return Err(InputError::Io {
                                kind,
                                written: written.to_string(),
                                path: next.strip_prefix(root).unwrap_or(&next).to_path_buf(),
                                source,
                            });
                        }
                    };
                    if !meta.file_type().is_symlink() {
                        cur = next;
                        continue;
                    }
                    hops += 1;
                    let target = fs::read_link(&next).map_err(|source| InputError::Io {
                        kind,
                        written: written.to_string(),
                        path: next.strip_prefix(root).unwrap_or(&next).to_path_buf(),
                        source,
                    })?;
                    if hops > 40 || target.is_absolute() {
                        return Err(outside());
                    }
                    for c in target.components().rev() {
                        queue.push_front(PathBuf::from(c.as_os_str()));
                    }
                }
                // A prefix or a root inside a relative path: not from an upload.
                Some(_) => return Err(outside()),
            }
        }
        Ok(cur)
    }

    /// Check `path` against this scope; returns it resolved (read that).
    pub fn resolve(
        &self,
        kind: LocalKind,
        written: &str,
        path: &Path,
    ) -> Result<PathBuf, InputError> {
        let bound = self.bound(kind, written)?;
        let path = self.within_upload(kind, written, path)?;
        resolve_inside(kind, written, &path, bound).map_err(|e| self.explain(e))
    }

    /// [`pin_local`] within this scope.
    pub fn pin(
        &self,
        kind: LocalKind,
        written: &str,
        path: &Path,
        expected_hash: Option<&str>,
    ) -> Result<PinnedPath, InputError> {
        let bound = self.bound(kind, written)?;
        let path = self.within_upload(kind, written, path)?;
        pin_local(kind, written, &path, bound, expected_hash).map_err(|e| self.explain(e))
    }
}

/// Resolve `path` (symlinks followed) and check it stays inside `context` (when
/// given). Returns the resolved path: read that, not `path`.
pub fn resolve_inside(
    kind: LocalKind,
    written: &str,
    path: &Path,
    context: Option<&Path>,
) -> Result<PathBuf, InputError> {
    let io_err = |source: io::Error| InputError::Io {
        kind,
        written: written.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let resolved = match fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(InputError::Missing {
                kind,
                written: written.to_string(),
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    if let Some(context) = context {
        let context = fs::canonicalize(context).map_err(io_err)?;
        if !resolved.starts_with(&context) {
            return Err(InputError::OutsideContext {
                kind,
                written: written.to_string(),
                resolved,
                context,
            });
        }
    }
    Ok(resolved)
}

/// Pin a local input: check it exists and stays inside `context` (when given), check
/// `hash` (files), and compute its content digest.
pub fn pin_local(
    kind: LocalKind,
    written: &str,
    path: &Path,
    context: Option<&Path>,
    expected_hash: Option<&str>,
) -> Result<PinnedPath, InputError> {
    let io_err = |source: io::Error| InputError::Io {
        kind,
        written: written.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let resolved = resolve_inside(kind, written, path, context)?;
    let meta = fs::metadata(&resolved).map_err(io_err)?;
    if meta.is_dir() {
        if expected_hash.is_some() {
            return Err(InputError::HashOnDirectory {
                written: written.to_string(),
                path: resolved,
            });
        }
        let (digest, bytes) = tree_digest(&resolved).map_err(io_err)?;
        return Ok(PinnedPath {
            resolved,
            is_dir: true,
            digest,
            file_sha256: None,
            bytes,
        });
    }
    let (hex, bytes) = file_sha256(&resolved).map_err(io_err)?;
    if let Some(expected) = expected_hash
        && !expected.eq_ignore_ascii_case(&hex)
    {
        return Err(InputError::HashMismatch {
            written: written.to_string(),
            expected: expected.to_ascii_lowercase(),
            actual: hex,
        });
    }
    Ok(PinnedPath {
        resolved,
        is_dir: false,
        // The mode matters too: an import is copied with it.
        digest: format!(
            "sha256:{}",
            hex::encode(Sha256::digest(
                format!("file {:o} {hex}", meta.permissions().mode() & 0o7777).as_bytes()
            ))
        ),
        file_sha256: Some(hex),
        bytes,
    })
}

/// Put a pinned local file into the blob store unless it is there already (it was
/// hashed when pinned), returning its digest.
pub async fn store_file(
    blobs: &farm_image::BlobStore,
    pinned: &PinnedPath,
) -> Result<String, farm_image::Error> {
    if let Some(hex) = &pinned.file_sha256 {
        let digest = farm_image::Digest::from_hex(hex)?;
        if blobs.exists(&digest).await? {
            return Ok(digest.to_string());
        }
    }
    Ok(blobs.put_file(&pinned.resolved).await?.digest.to_string())
}

/// sha256 hex of a file's bytes, and its size.
pub fn file_sha256(path: &Path) -> io::Result<(String, u64)> {
    let (digest, size) = farm_image::Digest::of_file(path)?;
    Ok((digest.hex().to_string(), size))
}

/// Digest of a directory tree: every entry's relative path, type, permission bits, and
/// content (file bytes, symlink target), in sorted order. Ownership and mtimes are not
/// part of it: imports are copied as root unless uid/gid say otherwise, and a fresh
/// checkout must hit the cache.
pub fn tree_digest(root: &Path) -> io::Result<(String, u64)> {
    let mut listing = Sha256::new();
    let mut bytes = 0u64;
    walk(root, Path::new(""), &mut listing, &mut bytes)?;
    Ok((format!("sha256:{}", hex::encode(listing.finalize())), bytes))
}

fn walk(root: &Path, rel: &Path, out: &mut Sha256, bytes: &mut u64) -> io::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let rel_path = rel.join(&name);
        let full = root.join(&rel_path);
        let meta = fs::symlink_metadata(&full)?;
        let mode = meta.mode() & 0o7777;
        let ft = meta.file_type();
        let shown = rel_path.to_string_lossy();
        if ft.is_symlink() {
            let target = fs::read_link(&full)?;
            out.update(format!("l {mode:o} {shown}\0{}\n", target.display()).as_bytes());
        } else if ft.is_dir() {
            out.update(format!("d {mode:o} {shown}\n").as_bytes());
            walk(root, &rel_path, out, bytes)?;
        } else if ft.is_file() {
            let (hex, n) = file_sha256(&full)?;
            *bytes += n;
            out.update(format!("f {mode:o} {shown}\0{hex}\n").as_bytes());
        } else {
            out.update(format!("o {mode:o} {shown}\0{}\n", meta.rdev()).as_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn file_digest_and_hash_check() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.txt");
        fs::write(&f, "test").unwrap();
        let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let p = pin_local(
            LocalKind::Import,
            "a.txt",
            &f,
            Some(d.path()),
            Some(&sha.to_uppercase()),
        )
        .unwrap();
        assert_eq!(p.file_sha256.as_deref(), Some(sha));
        assert!(!p.is_dir);
        let e = pin_local(LocalKind::Import, "a.txt", &f, None, Some(&"0".repeat(64))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("got sha256:{sha}")), "{msg}");
        assert!(msg.contains("expected sha256:0000"), "{msg}");
    }

    #[test]
    fn tree_digest_follows_content_not_mtime() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        fs::create_dir_all(t.join("sub")).unwrap();
        fs::write(t.join("sub/x"), "1").unwrap();
        symlink("../nowhere", t.join("dangling")).unwrap();
        let (a, _) = tree_digest(&t).unwrap();
        // rewrite identical content: same digest
        fs::write(t.join("sub/x"), "1").unwrap();
        assert_eq!(tree_digest(&t).unwrap().0, a);
        fs::write(t.join("sub/x"), "2").unwrap();
        let (b, _) = tree_digest(&t).unwrap();
        assert_ne!(a, b);
        fs::set_permissions(t.join("sub/x"), fs::Permissions::from_mode(0o700)).unwrap();
        assert_ne!(tree_digest(&t).unwrap().0, b);
        fs::remove_file(t.join("dangling")).unwrap();
        symlink("../elsewhere", t.join("dangling")).unwrap();
        assert_ne!(tree_digest(&t).unwrap().0, b);
    }

    #[test]
    fn outside_context_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let ctx = d.path().join("ctx");
        fs::create_dir(&ctx).unwrap();
        fs::write(d.path().join("secret"), "x").unwrap();
        symlink("../secret", ctx.join("link")).unwrap();
        let e = pin_local(
            LocalKind::Import,
            "link",
            &ctx.join("link"),
            Some(&ctx),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, InputError::OutsideContext { .. }), "{e}");
        let e = pin_local(
            LocalKind::Import,
            "../secret",
            &ctx.join("../secret"),
            Some(&ctx),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, InputError::OutsideContext { .. }), "{e}");
        assert!(
            pin_local(
                LocalKind::Import,
                "../secret",
                &ctx.join("../secret"),
                None,
                None
            )
            .is_ok()
        );
        let e = pin_local(
            LocalKind::Import,
            "nope",
            &ctx.join("nope"),
            Some(&ctx),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"));
        // The message names what the input is to its layer.
        let e = pin_local(
            LocalKind::TarBase,
            "../secret",
            &ctx.join("../secret"),
            Some(&ctx),
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("base '../secret' resolves to"),
            "{e}"
        );
        let e =
            pin_local(LocalKind::OverlayDir, "nope", &ctx.join("nope"), None, None).unwrap_err();
        assert!(
            e.to_string().starts_with("overlay_dirs source 'nope':"),
            "{e}"
        );
    }

    #[test]
    fn an_upload_resolves_its_links_inside_and_never_looks_outside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ctx");
        fs::create_dir_all(root.join("dir/sub")).unwrap();
        fs::write(root.join("dir/sub/file"), "in").unwrap();
        fs::write(d.path().join("secret"), "out").unwrap();
        symlink("dir/sub", root.join("rel")).unwrap();
        symlink("../secret", root.join("up")).unwrap();
        symlink("../nonexistent", root.join("up-missing")).unwrap();
        symlink(d.path().join("secret"), root.join("abs")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let scope = LocalScope::Uploaded(root.clone());
        let pin = |rel: &str| scope.pin(LocalKind::Import, rel, &root.join(rel), None);
        let p = pin("rel/file").unwrap();
        assert_eq!(
            p.resolved,
            fs::canonicalize(root.join("dir/sub/file")).unwrap()
        );
        assert!(pin("dir/sub/../sub/file").is_ok());
        // Out of the upload: the same answer whether the target exists or not.
        for rel in [
            "up",
            "up-missing",
            "abs",
            "../secret",
            "dir/../../secret",
            "loop",
        ] {
            let e = pin(rel).unwrap_err();
            assert!(matches!(e, InputError::OutsideUpload { .. }), "{rel}: {e}");
        }
        let e = pin("dir/nope").unwrap_err();
        assert!(
            matches!(&e, InputError::Missing { path, .. } if path == Path::new("dir/nope")),
            "{e}"
        );
        let e = scope
            .pin(LocalKind::Import, "/secret", &d.path().join("secret"), None)
            .unwrap_err();
        assert!(matches!(e, InputError::OutsideUpload { .. }), "{e}");
    }

    #[test]
    fn hash_on_a_directory_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let e = pin_local(
            LocalKind::Import,
            "d",
            d.path(),
            None,
            Some(&"a".repeat(64)),
        )
        .unwrap_err();
        assert!(matches!(e, InputError::HashOnDirectory { .. }));
    }
}

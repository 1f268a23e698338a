//! A file or directory shipped through the blob store: a small JSON listing (itself a
//! blob) whose files are blobs by digest. The coordinator stores a local input (an
//! uploaded build context's import, an `overlay_dirs` source) as a tree; a worker on
//! another machine materialises it. Files shared between trees and builds are stored once.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::store::BlobStore;

/// One entry of a tree; `path` is relative to the tree's root, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TreeEntry {
    /// A directory.
    Dir {
        /// Path inside the tree.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file whose content is a blob.
    File {
        /// Path inside the tree.
        path: String,
        /// Permission bits.
        mode: u32,
        /// The content's digest.
        digest: String,
        /// The content's size.
        size: u64,
    },
    /// A symbolic link, kept as a link.
    Symlink {
        /// Path inside the tree.
        path: String,
        /// The link's target, as written.
        target: String,
    },
}

/// A file or directory tree. A tree of a single file has one `File` entry with an
/// empty path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Entries, parents before children.
    pub entries: Vec<TreeEntry>,
}

impl BlobStore {
    /// Store the file or directory at `path` as a tree (its files as blobs, skipping
    /// those already present); returns the digest of the tree listing.
    pub async fn put_tree(&self, path: &Path) -> Result<Digest> {
        let mut entries = Vec::new();
        let meta = tokio::fs::symlink_metadata(path)
            .await
            .ctx(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            let mut stack = vec![(path.to_path_buf(), String::new())];
            while let Some((dir, rel)) = stack.pop() {
                let mut names = Vec::new();
                let mut rd = tokio::fs::read_dir(&dir)
                    .await
                    .ctx(|| format!("reading {}", dir.display()))?;
                while let Some(e) = rd
                    .next_entry()
                    .await
                    .ctx(|| format!("reading {}", dir.display()))?
                {
                    names.push(e.file_name());
                }
                names.sort();
                for name in names {
                    let full = dir.join(&name);
                    let name = name.to_string_lossy();
                    let child = if rel.is_empty() {
                        name.to_string()
                    } else {
                        format!("{rel}/{name}")
                    };
                    let m = tokio::fs::symlink_metadata(&full)
                        .await
                        .ctx(|| format!("reading {}", full.display()))?;
                    if m.is_dir() {
                        entries.push(TreeEntry::Dir {
                            path: child.clone(),
                            mode: m.mode() & 0o7777,
                        });
                        stack.push((full, child));
                    } else {
                        entries.push(self.tree_file(&full, child, &m).await?);
                    }
                }
            }
        } else {
            entries.push(self.tree_file(path, String::new(), &meta).await?);
        }
        let json = serde_json::to_vec(&Tree { entries }).map_err(|e| Error::Io {
            context: format!("encoding the tree of {}", path.display()),
            source: std::io::Error::other(e),
        })?;
        Ok(self.put(Bytes::from(json)).await?.digest)
    }

    async fn tree_file(
        &self,
        full: &Path,
        path: String,
        m: &std::fs::Metadata,
    ) -> Result<TreeEntry> {
        if m.file_type().is_symlink() {
            let target = tokio::fs::read_link(full)
                .await
                .ctx(|| format!("reading the link {}", full.display()))?;
            return Ok(TreeEntry::Symlink {
                path,
                target: target.to_string_lossy().into_owned(),
            });
        }
        if !m.is_file() {
            return Err(Error::UnsafeEntry {
                path: full.display().to_string(),
                reason: "only files, directories and symlinks can be sent to a worker".into(),
            });
        }
        let owned = full.to_path_buf();
        let (digest, size) = tokio::task::spawn_blocking(move || Digest::of_file(&owned))
            .await
            .map_err(|e| Error::Io {
                context: format!("hashing {}", full.display()),
                source: std::io::Error::other(e),
            })?
            .ctx(|| format!("hashing {}", full.display()))?;
        if !self.exists(&digest).await? {
            let info = self.put_file(full).await?;
            if info.digest != digest {
                return Err(Error::DigestMismatch {
                    expected: digest,
                    actual: info.digest,
                });
            }
        }
        Ok(TreeEntry::File {
            path,
            mode: m.mode() & 0o7777,
            digest: digest.to_string(),
            size,
        })
    }

    /// Write tree `digest` at `dest` (which must not exist): a file for a single-file
    /// tree, else a directory. Paths that leave `dest` or pass through a symlink of the
    /// tree are refused; every file is verified against its digest.
    pub async fn materialize_tree(&self, digest: &Digest, dest: &Path) -> Result<()> {
        let bytes = self.get_bytes(digest).await?;
        let tree: Tree = serde_json::from_slice(&bytes).map_err(|e| Error::UnsafeEntry {
            path: digest.to_string(),
            reason: format!("not a tree listing: {e}"),
        })?;
        let single_file =
            matches!(tree.entries.as_slice(), [TreeEntry::File { path, .. }] if path.is_empty());
        if !single_file {
            tokio::fs::create_dir(dest)
                .await
                .ctx(|| format!("creating {}", dest.display()))?;
        }
        let mut links: BTreeSet<String> = BTreeSet::new();
        let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
        let mut files: Vec<(&String, PathBuf, Digest, u32)> = Vec::new();
        for entry in &tree.entries {
            let rel = match entry {
                TreeEntry::Dir { path, .. }
                | TreeEntry::File { path, .. }
                | TreeEntry::Symlink { path, .. } => path,
            };
            let target = if single_file {
                dest.to_path_buf()
            } else {
                check_relative(rel, &links)?;
                dest.join(rel)
            };
            match entry {
                TreeEntry::Dir { mode, .. } => {
                    tokio::fs::create_dir(&target)
                        .await
                        .ctx(|| format!("creating {}", target.display()))?;
                    // Modes are set last: a read-only directory must still be filled.
                    dirs.push((target, *mode));
                }
                TreeEntry::Symlink { target: to, .. } => {
                    tokio::fs::symlink(to, &target)
                        .await
                        .ctx(|| format!("creating the link {}", target.display()))?;
                    links.insert(rel.clone());
                }
                TreeEntry::File { mode, digest, .. } => {
                    files.push((rel, target, Digest::parse(digest)?, *mode));
                }
            }
        }
        // Files once every directory is there, several at a time (one after the other,
        // each was a handful of hops to the blocking pool: a 400-file context took
        // 0.14 s, on every submission that uploads one). Each is checked again against
        // every link of the tree: one listed after a file could lead it elsewhere now.
        if !single_file {
            for (rel, ..) in &files {
                check_relative(rel, &links)?;
            }
        }
        // The futures are made first: a closure in the stream's type would make the
        // caller's future not `Send` for every lifetime (a limit of the compiler).
        let writes: Vec<_> = files
            .into_iter()
            .map(|(_, target, digest, mode)| self.write_tree_file(digest, target, mode))
            .collect();
        let written: Vec<Result<()>> = futures::stream::iter(writes)
            .buffer_unordered(FILES_AT_ONCE)
            .collect()
            .await;
        written.into_iter().collect::<Result<()>>()?;
        for (dir, mode) in dirs.into_iter().rev() {
            tokio::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .await
                .ctx(|| format!("setting the mode of {}", dir.display()))?;
        }
        Ok(())
    }
}

/// How many files of a tree are written at once.
const FILES_AT_ONCE: usize = 16;

impl BlobStore {
    /// Write blob `digest` as the new file `target` with `mode`: a small blob of a local
    /// store in one trip to the blocking pool, others streamed (verified either way).
    async fn write_tree_file(&self, digest: Digest, target: PathBuf, mode: u32) -> Result<()> {
        if let Some(bytes) = self.read_small_local(&digest) {
            return tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .and_then(|mut f| f.write_all(&bytes))
                    .ctx(|| format!("writing {}", target.display()))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .ctx(|| format!("setting the mode of {}", target.display()))
            })
            .await?;
        }
        let mut stream = self.get(&digest).await?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .await
            .ctx(|| format!("creating {}", target.display()))?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?)
                .await
                .ctx(|| format!("writing {}", target.display()))?;
        }
        file.flush()
            .await
            .ctx(|| format!("writing {}", target.display()))?;
        tokio::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .await
            .ctx(|| format!("setting the mode of {}", target.display()))
    }
}

/// A tree path must be relative, plain (no `..`, no `.`), and not under a symlink
/// entry of the same tree.
fn check_relative(rel: &str, links: &BTreeSet<String>) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::UnsafeEntry {
            path: rel.to_string(),
            reason: reason.to_string(),
        })
    };
    if rel.is_empty() {
        return bad("an empty path in a directory tree");
    }
    let p = Path::new(rel);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return bad("paths in a tree must be relative, without '.' or '..'");
    }
    let mut prefix = String::new();
    for c in rel.split('/') {
        if !prefix.is_empty() {
            if links.contains(&prefix) {
                return bad("the path passes through a symlink of the tree");
            }
            prefix.push('/');
        }
        prefix.push_str(c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_round_trips_with_modes_and_links() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub/deep")).unwrap();
        std::fs::write(src.join("a.txt"), "alpha").unwrap();
        std::fs::write(src.join("sub/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.join("sub/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(src.join("sub/deep/same.txt"), "alpha").unwrap();
        std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
        let store = BlobStore::in_memory();
        let tree = store.put_tree(&src).await.unwrap();
        // Same content, one blob.
        assert!(store.exists(&Digest::of(b"alpha")).await.unwrap());
        let out = d.path().join("out");
        store.materialize_tree(&tree, &out).await.unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "alpha");
        assert_eq!(
            std::fs::read_to_string(out.join("sub/deep/same.txt")).unwrap(),
            "alpha"
        );
        let m = std::fs::metadata(out.join("sub/run.sh")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(out.join("sub/link")).unwrap(),
            Path::new("../a.txt")
        );
        // Storing again gives the same digest.
        assert_eq!(store.put_tree(&src).await.unwrap(), tree);
    }

    #[tokio::test]
    async fn a_single_file_materialises_as_a_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "one").unwrap();
        let store = BlobStore::in_memory();
        let tree = store.put_tree(&d.path().join("f")).await.unwrap();
        store
            .materialize_tree(&tree, &d.path().join("g"))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("g")).unwrap(), "one");
    }

    /// Materialising a tree of `entries` is refused as unsafe.
    async fn refused(store: &BlobStore, entries: Vec<TreeEntry>) {
        let json = serde_json::to_vec(&Tree { entries }).unwrap();
        let digest = store.put(Bytes::from(json)).await.unwrap().digest;
        let d = tempfile::tempdir().unwrap();
        let err = store
            .materialize_tree(&digest, &d.path().join("out"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::UnsafeEntry { .. }), "{err}");
    }

    /// A link listed after a file under it: files are written after every link is made,
    /// so the file is checked against every link of the tree, not those before it.
    #[tokio::test]
    async fn a_file_under_a_link_listed_after_it_is_refused_and_not_written() {
        let blobs = tempfile::tempdir().unwrap();
        for store in [
            BlobStore::in_memory(),
            BlobStore::local(blobs.path()).unwrap(),
        ] {
            let content = store.put(Bytes::from_static(b"x")).await.unwrap().digest;
            let outside = tempfile::tempdir().unwrap();
            let entries = vec![
                TreeEntry::File {
                    path: "l/owned".into(),
                    mode: 0o644,
                    digest: content.to_string(),
                    size: 1,
                },
                TreeEntry::Symlink {
                    path: "l".into(),
                    target: outside.path().display().to_string(),
                },
            ];
            refused(&store, entries).await;
            assert!(
                !outside.path().join("owned").exists(),
                "written through the link"
            );
        }
    }

    #[tokio::test]
    async fn hostile_trees_are_refused() {
        let store = BlobStore::in_memory();
        let content = store.put(Bytes::from_static(b"x")).await.unwrap().digest;
        let file = |path: &str| TreeEntry::File {
            path: path.into(),
            mode: 0o644,
            digest: content.to_string(),
            size: 1,
        };
        for entries in [
            vec![file("../escape")],
            vec![file("/abs")],
            vec![
                TreeEntry::Symlink {
                    path: "l".into(),
                    target: "/etc".into(),
                },
                file("l/passwd"),
            ],
        ] {
            refused(&store, entries).await;
        }
    }
}

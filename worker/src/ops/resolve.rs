//! Paths inside a root filesystem resolved the way a process chrooted there would see
//! them: absolute symlinks lead back into the root, `..` stops at it.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// `rel` resolved inside `root` as far as it exists there (following symlinks as if
/// `root` were `/`), with the part that does not exist appended unchanged; relative to
/// `root`.
pub fn resolve_existing_in_root(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let parts: Vec<_> = rel.components().collect();
    for cut in (0..=parts.len()).rev() {
        let head: PathBuf = parts[..cut].iter().collect();
        let Ok(resolved) = resolve_in_root(root, &head.to_string_lossy()) else {
            continue;
        };
        if cut > 0 && !resolved.is_dir() {
            continue;
        }
        let inside = resolved
            .strip_prefix(root)
            .unwrap_or(&resolved)
            .to_path_buf();
        let tail: PathBuf = parts[cut..].iter().collect();
        return Ok(inside.join(tail));
    }
    Ok(rel.to_path_buf())
}

/// `path` resolved inside `root`, following symlinks as if `root` were `/`.
pub fn resolve_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            parts.pop();
            continue;
        }
        let candidate: PathBuf = root.join(parts.iter().collect::<PathBuf>()).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::other(format!("too many symlinks in '{path}'")));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => parts.push(part),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("'{path}' does not exist in the layer ({e})"),
                ));
            }
        }
    }
    Ok(root.join(parts.iter().collect::<PathBuf>()))
}

#[cfg(test)]
mod tests {
    use super::resolve_in_root;

    #[test]
    fn existing_prefixes_resolve_through_links() {
        use super::resolve_existing_in_root;
        use std::path::{Path, PathBuf};
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        assert_eq!(
            resolve_existing_in_root(root, Path::new("lib")).unwrap(),
            PathBuf::from("usr/lib")
        );
        assert_eq!(
            resolve_existing_in_root(root, Path::new("lib/new/deeper")).unwrap(),
            PathBuf::from("usr/lib/new/deeper")
        );
        assert_eq!(
            resolve_existing_in_root(root, Path::new("opt/x")).unwrap(),
            PathBuf::from("opt/x")
        );
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/f"), "x").unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc", root.join("usr/up")).unwrap();
        std::os::unix::fs::symlink("/", root.join("slash")).unwrap();
        assert_eq!(
            resolve_in_root(&root, "lib/f").unwrap(),
            root.join("usr/lib/f")
        );
        assert_eq!(
            resolve_in_root(&root, "/slash/usr/lib/f").unwrap(),
            root.join("usr/lib/f")
        );
        // climbing out stops at the root: /etc inside the root, which does not exist
        assert!(resolve_in_root(&root, "usr/up/passwd").is_err());
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "inside").unwrap();
        assert_eq!(
            resolve_in_root(&root, "usr/up/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(&root, "../../usr/../usr/lib").unwrap(),
            root.join("usr/lib")
        );
    }
}

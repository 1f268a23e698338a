//! Staging an import (or an overlay dir) as its own layer: where it lands in the image
//! (stacker's trailing-slash rules), with the base's parent directories mirrored so
//! their mode and owner survive, and the import's own mode and owner applied.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{OpError, StageArgs, resolve::resolve_existing_in_root, walk};

/// Where an import lands in the image, per stackerfile.md's trailing-slash table:
/// `dir`->`/d` and `dir/`->`/d` and `dir/`->`/d/` give `/d/<contents>`; `dir`->`/d/` gives
/// `/d/dir/<contents>`; `file`->`/files/` gives `/files/file`; `file`->`/x` gives `/x`.
pub fn import_target(name: &str, is_dir: bool, contents_only: bool, dest: &str) -> String {
    let dest_is_dir = dest.ends_with('/');
    let base = dest.trim_end_matches('/');
    let base = if base.is_empty() { "" } else { base };
    if is_dir {
        if dest_is_dir && !contents_only {
            format!("{base}/{name}")
        } else if base.is_empty() {
            "/".to_string()
        } else {
            base.to_string()
        }
    } else if dest_is_dir {
        format!("{base}/{name}")
    } else {
        base.to_string()
    }
}

/// Copy an import into its staging tree ([`StageArgs`]), as container root.
pub(super) fn stage_import(a: StageArgs) -> Result<(), OpError> {
    let source_is_dir = fs::metadata(&a.source)?.is_dir();
    let target_in_image = import_target(&a.name, source_is_dir, a.contents_only, &a.dest);
    let mut rel = relative(&target_in_image)?;
    // A parent that is a symlink in the base (merged /usr: /lib -> usr/lib) is followed,
    // as the image will resolve it: the file lands where the link points, and the link
    // stays a link.
    if let (Some(base), Some(parent), Some(file)) = (&a.base_rootfs, rel.parent(), rel.file_name())
        && !parent.as_os_str().is_empty()
    {
        let real_parent = resolve_existing_in_root(base, parent)?;
        rel = real_parent.join(file);
    }
    // Parent directories: mirror the base's where they exist.
    let mut built = PathBuf::new();
    let parents: Vec<_> = rel
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        built.push(c);
        let staged = a.root.join(&built);
        if staged.exists() {
            continue;
        }
        fs::create_dir(&staged)?;
        let like = a
            .base_rootfs
            .as_ref()
            .map(|b| b.join(&built))
            .and_then(|p| fs::symlink_metadata(p).ok())
            .filter(|m| m.is_dir());
        match like {
            Some(m) => {
                fs::set_permissions(&staged, fs::Permissions::from_mode(m.mode() & 0o7777))?;
                std::os::unix::fs::lchown(&staged, Some(m.uid()), Some(m.gid()))?;
            }
            None => fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?,
        }
    }
    let target = a.root.join(&rel);
    if source_is_dir {
        if !target.exists() {
            fs::create_dir(&target)?;
            let m = fs::metadata(&a.source)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        copy_dir(&a.source, &target)?;
    } else {
        fs::copy(&a.source, &target)?;
    }
    // Ownership: root unless uid/gid say otherwise; mode when given.
    let uid = a.uid.unwrap_or(0);
    let gid = a.gid.unwrap_or(0);
    walk(&target, &mut |p, m| {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
        if let Some(mode) = a.mode
            && !m.file_type().is_symlink()
            && (!m.is_dir() || p == target)
        {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    })?;
    Ok(())
}

fn relative(image_path: &str) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(image_path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("'{image_path}' leaves the image root"),
                ));
            }
        }
    }
    Ok(out)
}

/// Copy a directory's contents, keeping symlinks as symlinks and modes.
fn copy_dir(src: &Path, dst: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(src)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let from = e.path();
        let to = dst.join(e.file_name());
        let m = fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if ft.is_dir() {
            fs::create_dir(&to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            copy_dir(&from, &to)?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::import_target;

    #[test]
    fn trailing_slash_rules() {
        // (name, is_dir, contents_only (source had '/'), dest) -> where it lands
        let cases = [
            ("dir", true, false, "/d", "/d"),
            ("dir", true, true, "/d", "/d"),
            ("dir", true, false, "/d/", "/d/dir"),
            ("dir", true, true, "/d/", "/d"),
            ("file", false, false, "/files/", "/files/file"),
            ("file", false, false, "/x", "/x"),
            ("dir", true, true, "/", "/"),
        ];
        for (name, is_dir, contents, dest, want) in cases {
            assert_eq!(
                import_target(name, is_dir, contents, dest),
                want,
                "{name} {is_dir} {contents} {dest}"
            );
        }
    }
}

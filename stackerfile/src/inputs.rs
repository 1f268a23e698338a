//! What a plan reads besides its own text, in one place for the CLI and the coordinator:
//! which paths stand for http(s) URLs, the directory a plan's stackerfiles share, and
//! the local files and directories it needs (what a submission must carry). Nothing
//! here goes to the network.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::model::{Base, Source};
use crate::oci::split_oci_url;
use crate::plan::Plan;

/// Whether `s` is an `http://` or `https://` URL.
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The URL a path stands for, if it is one. Path normalisation folds `//` into `/`,
/// so `https:/host/x` is read back as `https://host/x`.
pub fn url_of(path: &Path) -> Option<String> {
    let s = path.to_string_lossy();
    for scheme in ["http:", "https:"] {
        if let Some(rest) = s.strip_prefix(scheme) {
            return Some(format!("{scheme}//{}", rest.trim_start_matches('/')));
        }
    }
    None
}

/// The URL a path stands for (see [`url_of`]), else the path itself, as text: the key a
/// stackerfile's text is known by.
pub fn url_or_path(path: &Path) -> String {
    url_of(path).unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// The deepest path every one of `paths` starts with (compared component by component,
/// as given: nothing is resolved); `None` when there are none.
pub fn common_ancestor<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    let mut paths = paths.into_iter();
    let mut common = paths.next()?.to_path_buf();
    for path in paths {
        while !path.starts_with(&common) {
            if !common.pop() {
                break;
            }
        }
    }
    Some(common)
}

/// The directory tree a build's imports must stay in: the common ancestor of every
/// loaded stackerfile's directory, each resolved through symlinks when it exists.
pub fn common_dir(plan: &Plan) -> PathBuf {
    let dirs: Vec<PathBuf> = plan
        .files
        .iter()
        .map(|f| {
            let d = f.path.parent().map(PathBuf::from).unwrap_or_default();
            let d = if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            };
            std::fs::canonicalize(&d).unwrap_or(d)
        })
        .collect();
    common_ancestor(dirs.iter().map(PathBuf::as_path)).unwrap_or_else(|| PathBuf::from("."))
}

/// What a local input is to the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A loaded stackerfile (the entry or a prerequisite).
    Stackerfile,
    /// A local import: a file, or a directory with its tree.
    Import,
    /// The source directory of an `overlay_dirs` entry.
    OverlayDir,
    /// A local tarball base (`from: {type: tar}`).
    TarBase,
    /// The OCI layout directory of an `oci` base.
    OciLayout,
}

impl InputKind {
    /// Whether the input must be a directory (an OCI layout); the others may be files or
    /// directories as the stackerfile says.
    pub fn must_be_dir(self) -> bool {
        self == InputKind::OciLayout
    }

    fn word(self) -> &'static str {
        match self {
            InputKind::Stackerfile => "stackerfile",
            InputKind::Import => "import",
            InputKind::OverlayDir => "overlay_dirs source",
            InputKind::TarBase => "tar base",
            InputKind::OciLayout => "oci base",
        }
    }
}

/// A local file or directory a plan reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalInput {
    /// What it is.
    pub kind: InputKind,
    /// Where the plan reads it (relative paths are relative to the current directory,
    /// as the plan's own paths are).
    pub path: PathBuf,
    /// As the stackerfile writes it (empty for a stackerfile).
    pub written: String,
    /// The layer that uses it (empty for a stackerfile).
    pub layer: String,
}

/// For messages: `stackerfile PATH` or `import 'WRITTEN' of layer NAME`.
impl fmt::Display for LocalInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            InputKind::Stackerfile => write!(f, "stackerfile {}", self.path.display()),
            kind => write!(
                f,
                "{} '{}' of layer {}",
                kind.word(),
                self.written,
                self.layer
            ),
        }
    }
}

/// Every local input of `plan`, in order: the stackerfiles that are not URLs, then per
/// layer its local imports, `overlay_dirs` sources, and a local tar base or the layout
/// of an `oci` base. Not `binds`: those are paths on the worker. Inputs of a stackerfile
/// read from a URL resolve to URLs and are left out.
pub fn local_inputs(plan: &Plan) -> Vec<LocalInput> {
    let mut inputs = Vec::new();
    for f in &plan.files {
        if url_of(&f.path).is_none() {
            inputs.push(LocalInput {
                kind: InputKind::Stackerfile,
                path: f.path.clone(),
                written: String::new(),
                layer: String::new(),
            });
        }
    }
    for planned in &plan.layers {
        let layer = &planned.layer;
        let mut push = |kind: InputKind, written: &str, path: &Path| {
            if url_of(path).is_none() {
                inputs.push(LocalInput {
                    kind,
                    path: path.to_path_buf(),
                    written: written.to_string(),
                    layer: layer.name.clone(),
                });
            }
        };
        for import in &layer.imports {
            if let Source::Local { written, path } = &import.source {
                push(InputKind::Import, written, path);
            }
        }
        for o in &layer.overlay_dirs {
            push(InputKind::OverlayDir, &o.written, &o.source);
        }
        match &layer.from {
            Base::Tar {
                source: Source::Local { written, path },
            } => push(InputKind::TarBase, written, path),
            Base::Oci { url } if url_of(&layer.dir).is_none() => {
                if let Some((dir, _tag)) = split_oci_url(&layer.dir, url) {
                    push(InputKind::OciLayout, url, &dir);
                }
            }
            _ => {}
        }
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalFiles, normalize};

    #[test]
    fn urls_survive_path_normalisation() {
        let p = normalize(Path::new("https://h/a/../b/s.yaml"));
        assert_eq!(url_of(&p).as_deref(), Some("https://h/b/s.yaml"));
        assert_eq!(url_of(Path::new("local/x.yaml")), None);
        assert_eq!(url_or_path(&p), "https://h/b/s.yaml");
        assert_eq!(url_or_path(Path::new("local/x.yaml")), "local/x.yaml");
        assert!(is_url("http://h/x") && is_url("https://h/x"));
        assert!(!is_url("h/x") && !is_url("oci:x"));
    }

    #[test]
    fn common_ancestors() {
        assert_eq!(
            common_ancestor([Path::new("/a/b/c"), Path::new("/a/d")]),
            Some(PathBuf::from("/a"))
        );
        assert_eq!(
            common_ancestor([Path::new("/a/b"), Path::new("/a/b/c")]),
            Some(PathBuf::from("/a/b"))
        );
        assert_eq!(common_ancestor([]), None);
    }

    #[test]
    fn local_inputs_in_order_without_binds_or_urls() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("base/layout")).unwrap();
        std::fs::write(root.join("base/layout/index.json"), "{}").unwrap();
        std::fs::write(
            root.join("base/stacker.yaml"),
            "base:\n  from:\n    type: oci\n    url: layout:busybox\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(
            root.join("app/stacker.yaml"),
            "config:\n  prerequisites: [../base/stacker.yaml]\napp:\n  from:\n    type: tar\n    \
             url: app.tar\n  imports:\n    - f.txt\n    - https://example.com/x\n  \
             overlay_dirs:\n    - source: over\n  binds:\n    - bound -> /mnt\n",
        )
        .unwrap();
        let plan = Plan::load(
            &root.join("app/stacker.yaml"),
            &Default::default(),
            &LocalFiles,
        )
        .unwrap_or_else(|e| panic!("{:?}", e.diagnostics));
        let inputs = local_inputs(&plan);
        let shown: Vec<String> = inputs.iter().map(ToString::to_string).collect();
        let base = root.join("base/stacker.yaml");
        let app = root.join("app/stacker.yaml");
        assert_eq!(
            shown,
            [
                format!("stackerfile {}", base.display()),
                format!("stackerfile {}", app.display()),
                "oci base 'layout:busybox' of layer base".to_string(),
                "import 'f.txt' of layer app".to_string(),
                "overlay_dirs source 'over' of layer app".to_string(),
                "tar base 'app.tar' of layer app".to_string(),
            ]
        );
        assert_eq!(inputs[2].path, root.join("base/layout"));
        assert!(inputs[2].kind.must_be_dir());
        assert_eq!(inputs[3].path, root.join("app/f.txt"));
        assert!(!inputs[3].kind.must_be_dir());

        // The stackerfiles' directories share `root` (resolved: the temp dir may be
        // behind a symlink).
        assert_eq!(common_dir(&plan), std::fs::canonicalize(root).unwrap());
    }
}

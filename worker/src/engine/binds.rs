//! Which host paths a job's `binds` may mount. A worker owns its host: the embedded
//! worker mounts the local user's binds as stacker does; a worker serving a farm mounts
//! only sources under the prefixes its operator allowed (`farm worker --allow-bind
//! PREFIX[:rw]`), read-only unless the entry asks for `rw: true` and the prefix permits
//! writing.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use farm_stackerfile::BindAccess;

use super::EngineError;
use crate::sandbox::Bind;

/// What a worker lets `binds` mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindPolicy {
    /// Any path this user can reach, read-write unless the entry says `rw: false`
    /// (the embedded worker: the user's own build, as stacker does).
    Unrestricted,
    /// Only sources under these prefixes; none: no binds at all (a farm worker's
    /// default).
    AllowList(Vec<BindPrefix>),
}

impl Default for BindPolicy {
    fn default() -> Self {
        BindPolicy::AllowList(Vec::new())
    }
}

/// One `--allow-bind` entry: `PREFIX` (read-only) or `PREFIX:rw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindPrefix {
    /// Absolute, symlinks resolved when it is checked.
    pub path: PathBuf,
    pub writable: bool,
}

impl FromStr for BindPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, writable) = match s.rsplit_once(':') {
            Some((p, "rw")) => (p, true),
            Some((p, "ro")) => (p, false),
            _ => (s, false),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "--allow-bind {s:?}: the prefix must be an absolute host path (PREFIX, \
                 PREFIX:ro or PREFIX:rw)"
            ));
        }
        Ok(BindPrefix {
            path: PathBuf::from(path),
            writable,
        })
    }
}

fn refused(written: &str, message: String) -> EngineError {
    EngineError::Input {
        what: format!("bind '{written}'"),
        message,
    }
}

impl BindPolicy {
    /// The mount for `bind`, or why this worker refuses it.
    pub fn mount(&self, bind: &farm_stackerfile::Bind) -> Result<Bind, EngineError> {
        let dest = PathBuf::from(&bind.dest);
        let prefixes = match self {
            BindPolicy::Unrestricted => {
                return Ok(Bind {
                    source: bind.source.clone(),
                    dest,
                    readonly: bind.access == BindAccess::ReadOnly,
                });
            }
            BindPolicy::AllowList(prefixes) => prefixes,
        };
        if prefixes.is_empty() {
            return Err(refused(
                &bind.written,
                "this worker mounts no host paths for a farm's builds (its operator may \
                 allow some with `farm worker --allow-bind PREFIX`, or `PREFIX:rw` for \
                 read-write)"
                    .into(),
            ));
        }
        // Resolved, so a symlink cannot lead out of an allowed prefix; the resolved path
        // is what is mounted.
        let source = std::fs::canonicalize(&bind.source).map_err(|e| {
            refused(
                &bind.written,
                format!("{} on this worker: {e}", bind.source.display()),
            )
        })?;
        let allowed = prefixes.iter().find(|p| {
            let prefix = std::fs::canonicalize(&p.path).unwrap_or_else(|_| p.path.clone());
            source.starts_with(&prefix)
        });
        let Some(prefix) = allowed else {
            return Err(refused(
                &bind.written,
                format!(
                    "{} is not under a prefix this worker allows ({}); its operator may \
                     allow it with `farm worker --allow-bind PREFIX`",
                    source.display(),
                    shown(prefixes)
                ),
            ));
        };
        let readonly = match (bind.access, prefix.writable) {
            (BindAccess::ReadWrite, true) => false,
            (BindAccess::ReadWrite, false) => {
                return Err(refused(
                    &bind.written,
                    format!(
                        "asks to be written, but this worker allows {} read-only (its \
                         operator may allow writing with `farm worker --allow-bind {}:rw`)",
                        prefix.path.display(),
                        prefix.path.display()
                    ),
                ));
            }
            _ => true,
        };
        Ok(Bind {
            source,
            dest,
            readonly,
        })
    }
}

fn shown(prefixes: &[BindPrefix]) -> String {
    prefixes
        .iter()
        .map(|p| {
            let path: &Path = &p.path;
            if p.writable {
                format!("{}:rw", path.display())
            } else {
                path.display().to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(source: &Path, access: BindAccess) -> farm_stackerfile::Bind {
        farm_stackerfile::Bind {
            written: source.display().to_string(),
            source: source.to_path_buf(),
            dest: "/host".into(),
            access,
        }
    }

    #[test]
    fn a_farm_worker_mounts_only_allowed_prefixes_read_only_unless_rw_is_allowed() {
        let d = tempfile::tempdir().unwrap();
        let (ro, rw) = (d.path().join("ro"), d.path().join("rw"));
        std::fs::create_dir_all(ro.join("sub")).unwrap();
        std::fs::create_dir_all(&rw).unwrap();
        std::os::unix::fs::symlink("/", ro.join("escape")).unwrap();

        let none = BindPolicy::default();
        let e = none
            .mount(&bind(Path::new("/"), BindAccess::Unspecified))
            .unwrap_err();
        assert!(e.to_string().contains("--allow-bind"), "{e}");
        assert_eq!(e.failure().kind, farm_model::FailureKind::Input);

        let policy = BindPolicy::AllowList(vec![
            ro.display().to_string().parse().unwrap(),
            format!("{}:rw", rw.display()).parse().unwrap(),
        ]);
        let m = policy
            .mount(&bind(&ro.join("sub"), BindAccess::Unspecified))
            .unwrap();
        assert!(m.readonly);
        let e = policy
            .mount(&bind(&ro.join("sub"), BindAccess::ReadWrite))
            .unwrap_err();
        assert!(e.to_string().contains(":rw`"), "{e}");
        assert!(
            policy
                .mount(&bind(&rw, BindAccess::Unspecified))
                .unwrap()
                .readonly,
            "read-only unless the entry asks"
        );
        assert!(
            !policy
                .mount(&bind(&rw, BindAccess::ReadWrite))
                .unwrap()
                .readonly
        );
        for outside in [
            Path::new("/"),
            &ro.join("escape"),
            &ro.join("sub/../../rw/.."),
        ] {
            let e = policy
                .mount(&bind(outside, BindAccess::Unspecified))
                .unwrap_err();
            assert!(e.to_string().contains("not under a prefix"), "{e}");
        }

        let local = BindPolicy::Unrestricted;
        assert!(
            !local
                .mount(&bind(Path::new("/"), BindAccess::Unspecified))
                .unwrap()
                .readonly
        );
        assert!(
            local
                .mount(&bind(Path::new("/"), BindAccess::ReadOnly))
                .unwrap()
                .readonly
        );
    }

    #[test]
    fn prefixes_are_absolute_paths_with_an_optional_access() {
        let p: BindPrefix = "/srv/cache:rw".parse().unwrap();
        assert_eq!(
            (p.path.as_path(), p.writable),
            (Path::new("/srv/cache"), true)
        );
        let p: BindPrefix = "/srv/data".parse().unwrap();
        assert!(!p.writable);
        assert!("relative".parse::<BindPrefix>().is_err());
    }
}

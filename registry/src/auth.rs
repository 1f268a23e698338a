//! Registry credentials: command-line flags first, then the usual container auth files.
//!
//! Files are searched in this order; the first one with an entry for the registry wins:
//! 1. `$REGISTRY_AUTH_FILE` (containers-auth.json(5): it overrides the default path)
//! 2. `$XDG_RUNTIME_DIR/containers/auth.json` (podman, skopeo, buildah)
//! 3. `~/.config/containers/auth.json`
//! 4. `~/.docker/config.json` (docker)
//!
//! An entry is `{"auth": base64("user:password")}` or `{"username": .., "password": ..}`,
//! under `auths`, keyed by `host[:port]`, optionally with a scheme and a path
//! (`https://index.docker.io/v1/`), or by `host/repository` for a repository-scoped
//! entry (the longest matching key wins). Secrets are never shown: [`CredentialSource`]
//! says where credentials came from, not what they are.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::Error;
use crate::reference::{DOCKER_HUB, ImageRef};

/// Where the credentials for a registry came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `--registry-username` / `--registry-password`.
    Flags,
    /// An entry of an auth file.
    AuthFile {
        /// The file.
        path: PathBuf,
        /// The key of the entry used.
        key: String,
    },
    /// No credentials: these files were searched.
    None {
        /// The files that were looked at (existing or not).
        searched: Vec<PathBuf>,
    },
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Flags => f.write_str("--registry-username/--registry-password"),
            CredentialSource::AuthFile { path, key } => {
                write!(f, "entry \"{key}\" of the auth file {}", path.display())
            }
            CredentialSource::None { searched } => {
                f.write_str("no credentials (none given with --registry-username")?;
                if !searched.is_empty() {
                    let files: Vec<String> =
                        searched.iter().map(|p| p.display().to_string()).collect();
                    write!(f, "; no entry for the registry in {}", files.join(", "))?;
                }
                f.write_str(")")
            }
        }
    }
}

/// A username and password. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Basic {
    /// The user name.
    pub username: String,
    /// The password (or token).
    pub password: String,
}

impl fmt::Debug for Basic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Basic")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Credentials resolved for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedAuth {
    /// `None` for anonymous access.
    pub basic: Option<Basic>,
    /// Where they came from.
    pub source: CredentialSource,
}

impl ResolvedAuth {
    pub(crate) fn to_oci(&self) -> oci_client::secrets::RegistryAuth {
        match &self.basic {
            Some(b) => {
                oci_client::secrets::RegistryAuth::Basic(b.username.clone(), b.password.clone())
            }
            None => oci_client::secrets::RegistryAuth::Anonymous,
        }
    }
}

/// How to find credentials: explicit flags, then auth files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    flags: Option<Basic>,
    files: Vec<PathBuf>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("flags", &self.flags)
            .field("files", &self.files)
            .finish()
    }
}

impl Credentials {
    /// Flags (both or neither) plus the auth files of this process's environment.
    pub fn from_env(
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Credentials, Error> {
        Self::with_files(username, password, default_auth_files())
    }

    /// Flags plus an explicit list of auth files (searched in order).
    pub fn with_files(
        username: Option<String>,
        password: Option<String>,
        files: Vec<PathBuf>,
    ) -> Result<Credentials, Error> {
        let flags = match (username, password) {
            (Some(username), Some(password)) => Some(Basic { username, password }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::Credentials(
                    "--registry-username needs --registry-password too".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(Error::Credentials(
                    "--registry-password needs --registry-username too".into(),
                ));
            }
        };
        Ok(Credentials { flags, files })
    }

    /// No flags, no files: anonymous access everywhere.
    pub fn anonymous() -> Credentials {
        Credentials::default()
    }

    /// The auth files searched, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The credentials for `image`'s registry (and repository, for scoped entries).
    pub fn resolve(&self, image: &ImageRef) -> Result<ResolvedAuth, Error> {
        if let Some(b) = &self.flags {
            return Ok(ResolvedAuth {
                basic: Some(b.clone()),
                source: CredentialSource::Flags,
            });
        }
        for path in &self.files {
            let body = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::AuthFile {
                        path: path.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            if let Some((key, basic)) = lookup(path, &body, image)? {
                tracing::debug!(registry = %image.registry, file = %path.display(), %key, "registry credentials");
                return Ok(ResolvedAuth {
                    basic: Some(basic),
                    source: CredentialSource::AuthFile {
                        path: path.clone(),
                        key,
                    },
                });
            }
        }
        Ok(ResolvedAuth {
            basic: None,
            source: CredentialSource::None {
                searched: self.files.clone(),
            },
        })
    }
}

/// The auth files of this environment, in search order.
pub fn default_auth_files() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut files = Vec::new();
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        files.push(f);
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    let config = var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config")));
    if let Some(c) = config {
        files.push(c.join("containers/auth.json"));
    }
    if let Some(d) = var("DOCKER_CONFIG") {
        files.push(d.join("config.json"));
    } else if let Some(h) = var("HOME") {
        files.push(h.join(".docker/config.json"));
    }
    files.dedup();
    files
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// `https://host:port/v1/` -> `host:port`; `host/repo` stays; Docker Hub's aliases
/// become `docker.io`.
fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    let (host, rest) = match k.split_once('/') {
        Some((h, r)) => (h, Some(r)),
        None => (k, None),
    };
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        h => h,
    };
    match rest {
        Some(r) => format!("{host}/{r}"),
        None => host.to_string(),
    }
}

/// The best entry of an auth file for `image`: the longest key that is the registry or
/// a `registry/repository` prefix of the image at a component boundary.
fn lookup(path: &Path, body: &[u8], image: &ImageRef) -> Result<Option<(String, Basic)>, Error> {
    let bad = |reason: String| Error::AuthFile {
        path: path.to_path_buf(),
        reason,
    };
    let file: AuthFile =
        serde_json::from_slice(body).map_err(|e| bad(format!("not an auth file: {e}")))?;
    let full = format!("{}/{}", image.registry, image.repository);
    let mut best: Option<(usize, &String, &AuthEntry)> = None;
    for (key, entry) in &file.auths {
        let k = normalize_key(key);
        let matches = k == image.registry
            || (full.starts_with(&k) && full.as_bytes().get(k.len()) == Some(&b'/'))
            || k == full;
        if matches && best.is_none_or(|(len, _, _)| k.len() > len) {
            best = Some((k.len(), key, entry));
        }
    }
    let Some((_, key, entry)) = best else {
        return Ok(None);
    };
    let basic = if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad(format!("entry \"{key}\": \"auth\" is not base64")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| bad(format!("entry \"{key}\": \"auth\" is not UTF-8")))?;
        let Some((u, p)) = text.split_once(':') else {
            return Err(bad(format!(
                "entry \"{key}\": \"auth\" must encode USERNAME:PASSWORD"
            )));
        };
        Basic {
            username: u.to_string(),
            password: p.to_string(),
        }
    } else if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        Basic {
            username: u.clone(),
            password: p.clone(),
        }
    } else {
        // e.g. an entry docker keeps for a credential helper: nothing usable here.
        tracing::debug!(file = %path.display(), %key, "auth entry without credentials");
        return Ok(None);
    };
    Ok(Some((key.clone(), basic)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn img(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn flags_win_and_must_come_in_pairs() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("auth.json");
        std::fs::write(
            &f,
            format!(r#"{{"auths":{{"h.io":{{"auth":"{}"}}}}}}"#, b64("file:pw")),
        )
        .unwrap();
        let c =
            Credentials::with_files(Some("u".into()), Some("p".into()), vec![f.clone()]).unwrap();
        let r = c.resolve(&img("docker://h.io/x")).unwrap();
        assert_eq!(r.source, CredentialSource::Flags);
        assert_eq!(r.basic.unwrap().username, "u");
        assert!(Credentials::with_files(Some("u".into()), None, vec![]).is_err());
        assert!(Credentials::with_files(None, Some("p".into()), vec![]).is_err());
    }

    #[test]
    fn auth_files_in_order_base64_and_plain() {
        let d = tempfile::tempdir().unwrap();
        let first = d.path().join("first.json");
        let second = d.path().join("second.json");
        let missing = d.path().join("missing.json");
        std::fs::write(
            &first,
            format!(
                r#"{{"auths":{{"other.io":{{"auth":"{}"}}, "https://127.0.0.1:5000/v2/":{{"auth":"{}"}}}}}}"#,
                b64("o:o"),
                b64("alice:s3:cret")
            ),
        )
        .unwrap();
        std::fs::write(
            &second,
            r#"{"auths":{"https://index.docker.io/v1/":{"username":"bob","password":"pw"},
                "h.io/team":{"username":"team","password":"t"},
                "h.io":{"username":"all","password":"a"}},
               "credsStore":"desktop"}"#,
        )
        .unwrap();
        let c = Credentials::with_files(None, None, vec![missing, first.clone(), second.clone()])
            .unwrap();

        let r = c.resolve(&img("docker://127.0.0.1:5000/busybox")).unwrap();
        let b = r.basic.clone().unwrap();
        assert_eq!(
            (b.username.as_str(), b.password.as_str()),
            ("alice", "s3:cret")
        );
        assert_eq!(
            r.source,
            CredentialSource::AuthFile {
                path: first.clone(),
                key: "https://127.0.0.1:5000/v2/".into()
            }
        );
        assert!(!format!("{r:?}").contains("s3:cret"), "Debug hides secrets");
        assert!(!r.source.to_string().contains("s3:cret"));

        let r = c.resolve(&img("docker://busybox")).unwrap();
        assert_eq!(r.basic.unwrap().username, "bob", "docker hub's legacy key");

        // Repository-scoped entries: the longest match wins, at component boundaries.
        let user = |s: &str| c.resolve(&img(s)).unwrap().basic.unwrap().username;
        assert_eq!(user("docker://h.io/team/app"), "team");
        assert_eq!(user("docker://h.io/teamx/app"), "all");
        assert_eq!(user("docker://h.io/other"), "all");

        let r = c.resolve(&img("docker://nowhere.io/x")).unwrap();
        assert_eq!(r.basic, None);
        let shown = r.source.to_string();
        assert!(
            shown.contains("first.json") && shown.contains("second.json"),
            "{shown}"
        );
    }

    #[test]
    fn broken_files_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("auth.json");
        for body in [
            "not json".to_string(),
            r#"{"auths":{"h.io":{"auth":"%%%"}}}"#.to_string(),
            format!(r#"{{"auths":{{"h.io":{{"auth":"{}"}}}}}}"#, b64("nocolon")),
        ] {
            std::fs::write(&f, &body).unwrap();
            let c = Credentials::with_files(None, None, vec![f.clone()]).unwrap();
            let e = c.resolve(&img("docker://h.io/x")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("auth.json"), "{msg}");
            assert!(matches!(e, Error::AuthFile { .. }));
        }
        // An entry without credentials (a credential helper's) is skipped.
        std::fs::write(&f, r#"{"auths":{"h.io":{}}}"#).unwrap();
        let c = Credentials::with_files(None, None, vec![f.clone()]).unwrap();
        assert_eq!(c.resolve(&img("docker://h.io/x")).unwrap().basic, None);
    }

    #[test]
    fn key_normalisation() {
        assert_eq!(normalize_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_key("http://h:5000"), "h:5000");
        assert_eq!(normalize_key("h:5000/ns/repo/"), "h:5000/ns/repo");
        assert_eq!(normalize_key("registry-1.docker.io"), "docker.io");
    }
}

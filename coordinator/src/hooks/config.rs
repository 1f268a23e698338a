//! The repositories a coordinator builds on webhooks (`farm coordinator --repos FILE`).
//! Everything that decides what is fetched, with which credentials, and where statuses go
//! comes from this file, never from a delivery's payload.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A forge that sends webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Github,
    Gitlab,
    /// Gitea and Forgejo (the same webhooks and API).
    #[serde(alias = "forgejo")]
    Gitea,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Gitea => "gitea",
        }
    }

    /// The status API when the repository names none.
    fn default_status_api(self) -> Option<&'static str> {
        match self {
            Provider::Github => Some("https://api.github.com"),
            Provider::Gitlab => Some("https://gitlab.com"),
            Provider::Gitea => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    /// A link to a build's logs, `{build}` replaced by its id (status target URLs).
    #[serde(default)]
    log_url: Option<String>,
    #[serde(default, rename = "repo")]
    repos: Vec<RepoFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoFormat {
    name: String,
    provider: Provider,
    clone_url: String,
    secret_file: PathBuf,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    status_api: Option<String>,
    #[serde(default)]
    clone_username: Option<String>,
    #[serde(default = "every_branch")]
    branches: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    pull_requests: bool,
    #[serde(default)]
    push_to: Vec<String>,
    #[serde(default)]
    push_insecure: bool,
}

fn every_branch() -> Vec<String> {
    vec!["*".into()]
}

/// One configured repository, its secrets read.
#[derive(Clone)]
pub struct Repo {
    /// As the provider names it: GitHub's and Gitea's `full_name`, GitLab's
    /// `path_with_namespace`.
    pub name: String,
    pub provider: Provider,
    pub clone_url: String,
    pub(crate) secret: Vec<u8>,
    pub(crate) token: Option<String>,
    /// Where statuses go; `None`: statuses are not reported.
    pub status_api: Option<String>,
    pub clone_username: String,
    /// Branch patterns that build on push (`*` matches any run of characters; default
    /// every branch).
    pub branches: Vec<String>,
    /// Tag patterns that build on push (default none).
    pub tags: Vec<String>,
    /// Whether pull/merge requests build (default not).
    pub pull_requests: bool,
    /// Registry prefixes (`docker://HOST[:PORT]/NAMESPACE`) images of this repository
    /// may be pushed to; empty: none.
    pub push_to: Vec<String>,
    /// Push over plain http or TLS without certificate checks.
    pub push_insecure: bool,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("clone_url", &self.clone_url)
            .field("status_api", &self.status_api)
            .finish_non_exhaustive()
    }
}

/// The repositories file.
#[derive(Debug, Clone, Default)]
pub struct Repos {
    pub log_url: Option<String>,
    pub repos: Vec<Repo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the repositories file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the repositories file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("repository {repo} in {path}: reading {what} {file}: {source}")]
    Secret {
        path: String,
        repo: String,
        what: &'static str,
        file: String,
        source: std::io::Error,
    },
    #[error("repository {repo} in {path}: {message}")]
    Invalid {
        path: String,
        repo: String,
        message: String,
    },
}

impl Repos {
    /// Read `path` (TOML, or YAML when it ends in `.yaml`/`.yml`) and the secret and token
    /// files it names (relative paths are relative to the file).
    pub fn load(path: &Path) -> Result<Repos, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let parsed: FileFormat = if yaml {
            serde_yaml::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        }
        .map_err(|message| ConfigError::Parse {
            path: shown.clone(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut repos = Vec::new();
        for r in parsed.repos {
            let invalid = |message: String| ConfigError::Invalid {
                path: shown.clone(),
                repo: r.name.clone(),
                message,
            };
            if r.name.is_empty()
                || repos
                    .iter()
                    .any(|o: &Repo| o.name == r.name && o.provider == r.provider)
            {
                return Err(invalid(
                    "names must be given and unique per provider".into(),
                ));
            }
            if r.clone_url.contains('@') && r.clone_url.contains("://") {
                return Err(invalid(
                    "clone_url must not carry credentials; put the token in token_file".into(),
                ));
            }
            let read = |what: &'static str, file: &Path| {
                let file = base.join(file);
                std::fs::read_to_string(&file)
                    .map(|s| s.trim().to_string())
                    .map_err(|source| ConfigError::Secret {
                        path: shown.clone(),
                        repo: r.name.clone(),
                        what,
                        file: file.display().to_string(),
                        source,
                    })
            };
            let secret = read("secret_file", &r.secret_file)?;
            if secret.is_empty() {
                return Err(invalid("its secret_file is empty".into()));
            }
            let token = r
                .token_file
                .as_deref()
                .map(|f| read("token_file", f))
                .transpose()?;
            let status_api = r
                .status_api
                .clone()
                .or_else(|| r.provider.default_status_api().map(str::to_string))
                .map(|s| s.trim_end_matches('/').to_string());
            repos.push(Repo {
                clone_username: r.clone_username.clone().unwrap_or_else(|| {
                    match r.provider {
                        Provider::Gitlab => "oauth2",
                        _ => "x-access-token",
                    }
                    .into()
                }),
                name: r.name,
                provider: r.provider,
                clone_url: r.clone_url,
                secret: secret.into_bytes(),
                token,
                status_api,
                branches: r.branches,
                tags: r.tags,
                pull_requests: r.pull_requests,
                push_to: r.push_to,
                push_insecure: r.push_insecure,
            });
        }
        Ok(Repos {
            log_url: parsed.log_url,
            repos,
        })
    }
}

/// `pattern` with `*` matching any run of characters.
pub(crate) fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|i| tail.is_char_boundary(*i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("main", "main"));
        assert!(!glob("main", "mainline"));
        assert!(glob("release/*", "release/1.2"));
        assert!(!glob("release/*", "feature/x"));
        assert!(glob("v*", "v1.0"));
        assert!(glob("*", "anything"));
    }

    #[test]
    fn a_repos_file_with_secrets_and_credentials_in_urls() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("s"), "sekrit\n").unwrap();
        let f = d.path().join("repos.toml");
        std::fs::write(
            &f,
            "[[repo]]\nname = \"a/b\"\nprovider = \"github\"\nclone_url = \"https://x/a/b.git\"\nsecret_file = \"s\"\nbranches = [\"main\"]\n",
        )
        .unwrap();
        let r = Repos::load(&f).unwrap();
        assert_eq!(r.repos[0].secret, b"sekrit");
        assert_eq!(
            r.repos[0].status_api.as_deref(),
            Some("https://api.github.com")
        );
        std::fs::write(
            &f,
            "[[repo]]\nname = \"a/b\"\nprovider = \"github\"\nclone_url = \"https://u:p@x/a/b.git\"\nsecret_file = \"s\"\n",
        )
        .unwrap();
        assert!(matches!(Repos::load(&f), Err(ConfigError::Invalid { .. })));
        std::fs::write(&f, "[[repo]]\nname = \"a/b\"\nprovider = \"bitbucket\"\n").unwrap();
        assert!(matches!(Repos::load(&f), Err(ConfigError::Parse { .. })));
        let y = d.path().join("repos.yaml");
        std::fs::write(
            &y,
            "repo:\n  - name: g/p\n    provider: forgejo\n    clone_url: file:///x\n    secret_file: s\n    status_api: http://127.0.0.1:1/\n",
        )
        .unwrap();
        let r = Repos::load(&y).unwrap();
        assert_eq!(r.repos[0].provider, Provider::Gitea);
        assert_eq!(r.repos[0].status_api.as_deref(), Some("http://127.0.0.1:1"));
    }
}

/// Is `target` (`docker://HOST/NS`) at or under one of `allowed`?
pub(crate) fn push_allowed(allowed: &[String], target: &str) -> bool {
    let norm = |s: &str| {
        s.trim_start_matches("docker://")
            .trim_end_matches('/')
            .to_string()
    };
    let t = norm(target);
    allowed.iter().map(|a| norm(a)).any(|a| {
        !a.is_empty() && (t == a || t.strip_prefix(&a).is_some_and(|r| r.starts_with('/')))
    })
}

#[cfg(test)]
mod push_tests {
    #[test]
    fn push_prefixes_match_whole_path_components() {
        let allowed = vec!["docker://reg.example/acme".to_string()];
        assert!(super::push_allowed(&allowed, "docker://reg.example/acme"));
        assert!(super::push_allowed(
            &allowed,
            "docker://reg.example/acme/sub"
        ));
        assert!(!super::push_allowed(
            &allowed,
            "docker://reg.example/acme-evil"
        ));
        assert!(!super::push_allowed(
            &allowed,
            "docker://other.example/acme"
        ));
        assert!(!super::push_allowed(&[], "docker://reg.example/acme"));
    }
}

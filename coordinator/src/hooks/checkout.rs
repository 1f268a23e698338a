//! The pushed commit, fetched on the coordinator into a bare cache per repository, and its
//! files put into the blob store as a submission's context.
//!
//! This uses the `git` command: a shallow fetch of exactly one ref (`--depth 1`,
//! including `refs/pull/N/head`) from any transport with the user's git configuration is
//! what it does best, and no well-kept Rust crate does it as robustly (gix's shallow
//! fetch is young; git2 needs libgit2 and does not do shallow fetches of one ref well).
//! Credentials go through git's environment (`GIT_CONFIG_*` with `http.extraHeader`),
//! never in a URL, an argument or a log; workers never see them.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine;
use farm_image::BlobStore;
use tokio::process::Command;

use super::config::Repo;
use crate::farm::ContextFile;

/// Largest file of a checked-out commit put into the context.
pub const MAX_FILE: u64 = 512 * 1024 * 1024;
/// Most files of a checked-out commit.
pub const MAX_FILES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("git {what}: {message}")]
    Git { what: String, message: String },
    #[error(
        "the fetched {git_ref} is {got}, not the commit {want} the delivery names, and the server does not serve that commit by its id (a git server needs protocol v2 or uploadpack.allowReachableSHA1InWant)"
    )]
    WrongCommit {
        git_ref: String,
        got: String,
        want: String,
    },
    #[error("{0}")]
    Limit(String),
    #[error("blob store: {0}")]
    Blobs(#[from] farm_image::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A repository's bare cache.
pub struct Cache {
    dir: PathBuf,
}

/// Where the delivery's ref stood when its commit was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefTip {
    /// The ref still names the delivery's commit.
    AtCommit,
    /// The ref has moved past it (a later push, a redelivery of an old one): its moving
    /// names (the branch, the pull request) belong to a newer commit.
    MovedOn,
}

impl Cache {
    /// The cache of `repo` under `root` (created when missing).
    pub async fn open(root: &Path, repo: &Repo) -> Result<Cache, CheckoutError> {
        let safe: String = format!("{}-{}", repo.provider.as_str(), repo.name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = root.join(format!("{safe}.git"));
        if !dir.join("HEAD").exists() {
            tokio::fs::create_dir_all(&dir).await?;
            git(&dir, &["init", "--bare", "--quiet"], &[], "init").await?;
        }
        Ok(Cache { dir })
    }

    /// Fetch exactly `git_ref` at depth 1 and check that it is `sha`. When the ref has
    /// moved on since the delivery (a later push, a redelivery of an old one), the commit
    /// `sha` itself is fetched at depth 1 (git's protocol v2 serves any reachable commit),
    /// so a delivery always builds the files of the commit it names, never the ref's tip.
    pub async fn fetch(
        &self,
        repo: &Repo,
        git_ref: &str,
        sha: &str,
    ) -> Result<RefTip, CheckoutError> {
        let mut env: Vec<(String, String)> = Vec::new();
        if let Some(token) = &repo.token
            && (repo.clone_url.starts_with("https://") || repo.clone_url.starts_with("http://"))
        {
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{token}", repo.clone_username));
            env.push(("GIT_CONFIG_COUNT".into(), "1".into()));
            env.push(("GIT_CONFIG_KEY_0".into(), "http.extraHeader".into()));
            env.push((
                "GIT_CONFIG_VALUE_0".into(),
                format!("Authorization: Basic {basic}"),
            ));
        }
        let got = self.fetch_one(repo, git_ref, &env).await?;
        if got == sha {
            return Ok(RefTip::AtCommit);
        }
        tracing::info!(repo = %repo.name, git_ref, tip = %got, sha, "the ref has moved on: fetching the delivery's commit itself");
        match self.fetch_one(repo, sha, &env).await {
            Ok(fetched) if fetched == sha => Ok(RefTip::MovedOn),
            Ok(_) | Err(CheckoutError::Git { .. }) => Err(CheckoutError::WrongCommit {
                git_ref: git_ref.into(),
                got,
                want: sha.into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Fetch `what` (a ref or a commit) at depth 1 into `refs/farm/fetched`; the commit.
    async fn fetch_one(
        &self,
        repo: &Repo,
        what: &str,
        env: &[(String, String)],
    ) -> Result<String, CheckoutError> {
        let target = format!("+{what}:refs/farm/fetched");
        git(
            &self.dir,
            &[
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--depth=1",
                "--",
                &repo.clone_url,
                &target,
            ],
            env,
            &format!("fetch of {what} from {}", repo.clone_url),
        )
        .await?;
        let got = git(
            &self.dir,
            &["rev-parse", "--verify", "refs/farm/fetched^{commit}"],
            &[],
            "rev-parse",
        )
        .await?;
        Ok(String::from_utf8_lossy(&got).trim().to_string())
    }

    /// The content of `path` at `sha`, refused when over `max` bytes (sized before it is
    /// read: the repository's content is not the coordinator's to trust); `None` when it
    /// has no such file.
    pub async fn read(
        &self,
        sha: &str,
        path: &str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, CheckoutError> {
        let object = format!("{sha}:{path}");
        let size = match git(&self.dir, &["cat-file", "-s", &object], &[], "cat-file").await {
            Ok(b) => String::from_utf8_lossy(&b)
                .trim()
                .parse::<u64>()
                .unwrap_or(u64::MAX),
            Err(CheckoutError::Git { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if size > max as u64 {
            return Err(CheckoutError::Limit(format!(
                "{path} at {sha} is {size} bytes, over the limit of {max}"
            )));
        }
        git(&self.dir, &["cat-file", "blob", &object], &[], "cat-file")
            .await
            .map(Some)
    }

    /// Every file of commit `sha`, put into `blobs`, as a submission's context.
    pub async fn context(
        &self,
        sha: &str,
        blobs: &BlobStore,
    ) -> Result<Vec<ContextFile>, CheckoutError> {
        let listing = git(
            &self.dir,
            &["ls-tree", "-r", "-z", "--long", "--full-tree", sha],
            &[],
            "ls-tree",
        )
        .await?;
        let mut files = Vec::new();
        for entry in listing.split(|b| *b == 0).filter(|e| !e.is_empty()) {
            let entry = String::from_utf8_lossy(entry);
            // "<mode> <type> <object> <size>\t<path>"
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let mut meta = meta.split_whitespace();
            let (Some(mode), Some(kind), Some(object), Some(size)) =
                (meta.next(), meta.next(), meta.next(), meta.next())
            else {
                continue;
            };
            if kind != "blob" {
                // Submodules are not part of the commit's files.
                continue;
            }
            if files.len() >= MAX_FILES {
                return Err(CheckoutError::Limit(format!(
                    "the commit has more than {MAX_FILES} files"
                )));
            }
            if size.parse::<u64>().unwrap_or(u64::MAX) > MAX_FILE {
                return Err(CheckoutError::Limit(format!(
                    "{path} is larger than {MAX_FILE} bytes"
                )));
            }
            let content = git(&self.dir, &["cat-file", "blob", object], &[], "cat-file").await?;
            if mode == "120000" {
                files.push(ContextFile {
                    path: path.to_string(),
                    digest: String::new(),
                    mode: 0o777,
                    symlink_target: String::from_utf8_lossy(&content).into_owned(),
                });
                continue;
            }
            let digest = blobs.put(content.into()).await?.digest;
            files.push(ContextFile {
                path: path.to_string(),
                digest: digest.to_string(),
                mode: if mode == "100755" { 0o755 } else { 0o644 },
                symlink_target: String::new(),
            });
        }
        Ok(files)
    }
}

/// Run git in `dir` with only the environment it needs (no terminal prompts, no system
/// or user askpass).
async fn git(
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
    what: &str,
) -> Result<Vec<u8>, CheckoutError> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| CheckoutError::Git {
            what: what.into(),
            message: format!("running git: {e} (is git installed?)"),
        })?;
    if !out.status.success() {
        return Err(CheckoutError::Git {
            what: what.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

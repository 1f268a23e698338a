//! What a verified delivery asks for, read from its headers and JSON payload. Only the
//! repository's name, the ref, the commit and the kind of event are taken from it: what
//! is fetched and from where comes from the repositories file.

use axum::http::HeaderMap;
use serde_json::Value;

use super::config::Provider;

/// What kind of change a delivery reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A branch was pushed.
    Branch(String),
    /// A tag was pushed.
    Tag(String),
    /// A pull (merge) request was opened or updated; `fork` when its head is in another
    /// repository.
    PullRequest { number: u64, fork: bool },
}

impl Change {
    /// The kind, as `.farm.yaml`'s `events` names it.
    pub fn event(&self) -> EventKind {
        match self {
            Change::Branch(_) => EventKind::Push,
            Change::Tag(_) => EventKind::Tag,
            Change::PullRequest { .. } => EventKind::PullRequest,
        }
    }
}

/// An event kind a build may trigger on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Push,
    Tag,
    #[serde(alias = "merge_request")]
    PullRequest,
}

/// A delivery that asks for a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The repository as the provider names it.
    pub repo: String,
    /// The ref to fetch (`refs/heads/..`, `refs/tags/..`, `refs/pull/N/head`,
    /// `refs/merge-requests/N/head`).
    pub git_ref: String,
    /// The commit the payload says the ref points at (40 hex digits).
    pub sha: String,
    pub change: Change,
    /// The files the pushed commits added, modified or removed, as the (signed) payload
    /// lists them; `None` when it does not (pull requests, a truncated list): then
    /// `.farm.yaml`'s path filters let every build run.
    pub changed: Option<Vec<String>>,
}

/// What a verified delivery is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Ping {
        repo: Option<String>,
    },
    Build(Push),
    /// Understood but nothing to build (a deleted branch, a closed pull request, an event
    /// the farm does not build on), with the reason.
    Ignored {
        repo: Option<String>,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("the payload is not JSON: {0}")]
    NotJson(String),
    #[error("the payload lacks {0}")]
    Missing(&'static str),
    #[error("the commit {0:?} is not a 40-digit hex sha")]
    BadSha(String),
}

/// The delivery id (for idempotency).
pub fn delivery_id(provider: Provider, headers: &HeaderMap) -> Option<String> {
    let names: &[&str] = match provider {
        Provider::Github => &["x-github-delivery"],
        Provider::Gitea => &["x-gitea-delivery", "x-github-delivery"],
        Provider::Gitlab => &["idempotency-key", "x-gitlab-event-uuid"],
    };
    names
        .iter()
        .find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_string)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn string<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn sha(s: &str) -> Result<String, EventError> {
    if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(EventError::BadSha(s.chars().take(64).collect()))
    }
}

/// Providers list at most this many commits in a push payload (GitHub: 2048, GitLab:
/// 20); a list this long may be truncated, so it says nothing about the files.
const COMMITS_SHOWN: usize = 20;

/// The union of the payload's `commits[].added/modified/removed`, or `None` when the
/// payload has no such list or may have cut it short.
fn changed_files(v: &Value) -> Option<Vec<String>> {
    let commits = v.get("commits")?.as_array()?;
    let total = v
        .get("total_commits_count")
        .and_then(Value::as_u64)
        .unwrap_or(commits.len() as u64);
    if commits.is_empty() || commits.len() >= COMMITS_SHOWN || total as usize != commits.len() {
        return None;
    }
    let mut out = std::collections::BTreeSet::new();
    for c in commits {
        for k in ["added", "modified", "removed"] {
            for f in c.get(k)?.as_array()? {
                out.insert(f.as_str()?.to_string());
            }
        }
    }
    Some(out.into_iter().collect())
}

/// Read a verified delivery.
pub fn parse(provider: Provider, headers: &HeaderMap, body: &[u8]) -> Result<Delivery, EventError> {
    let kind = match provider {
        Provider::Github => header(headers, "x-github-event"),
        Provider::Gitea => match header(headers, "x-gitea-event") {
            "" => header(headers, "x-github-event"),
            k => k,
        },
        Provider::Gitlab => header(headers, "x-gitlab-event"),
    }
    .to_string();
    let v: Value = serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
    let repo_path: &[&str] = match provider {
        Provider::Gitlab => &["project", "path_with_namespace"],
        _ => &["repository", "full_name"],
    };
    let repo = string(&v, repo_path).map(str::to_string);
    let ignored = |reason: String| Delivery::Ignored {
        repo: repo.clone(),
        reason,
    };
    match (provider, kind.as_str()) {
        (_, "ping") => Ok(Delivery::Ping { repo }),
        (Provider::Github | Provider::Gitea, "push" | "create")
        | (Provider::Gitlab, "Push Hook" | "Tag Push Hook") => {
            if kind == "create" {
                return Ok(ignored("create events build through their push".into()));
            }
            let git_ref = string(&v, &["ref"]).ok_or(EventError::Missing("ref"))?;
            let after = string(&v, &["after"]).ok_or(EventError::Missing("after"))?;
            if after.bytes().all(|b| b == b'0') || v.get("deleted") == Some(&Value::Bool(true)) {
                return Ok(ignored(format!("{git_ref} was deleted")));
            }
            let change = if let Some(b) = git_ref.strip_prefix("refs/heads/") {
                Change::Branch(b.to_string())
            } else if let Some(t) = git_ref.strip_prefix("refs/tags/") {
                Change::Tag(t.to_string())
            } else {
                return Ok(ignored(format!("{git_ref} is neither a branch nor a tag")));
            };
            Ok(Delivery::Build(Push {
                repo: repo.ok_or(EventError::Missing("the repository's name"))?,
                git_ref: git_ref.to_string(),
                sha: sha(after)?,
                change,
                changed: changed_files(&v),
            }))
        }
        (Provider::Github | Provider::Gitea, "pull_request") => {
            let action = string(&v, &["action"]).unwrap_or("");
            if !matches!(
                action,
                "opened" | "synchronize" | "synchronized" | "reopened"
            ) {
                return Ok(ignored(format!(
                    "pull request action {action:?} builds nothing"
                )));
            }
            let number = v
                .get("number")
                .or_else(|| v.get("pull_request").and_then(|p| p.get("number")))
                .and_then(Value::as_u64)
                .ok_or(EventError::Missing("number"))?;
            let head = string(&v, &["pull_request", "head", "sha"])
                .ok_or(EventError::Missing("pull_request.head.sha"))?;
            let head_repo = string(&v, &["pull_request", "head", "repo", "full_name"]);
            let fork = head_repo.is_none() || head_repo != repo.as_deref();
            Ok(Delivery::Build(Push {
                repo: repo.ok_or(EventError::Missing("the repository's name"))?,
                git_ref: format!("refs/pull/{number}/head"),
                sha: sha(head)?,
                change: Change::PullRequest { number, fork },
                changed: None,
            }))
        }
        (Provider::Gitlab, "Merge Request Hook") => {
            let attrs = v
                .get("object_attributes")
                .ok_or(EventError::Missing("object_attributes"))?;
            let action = string(attrs, &["action"]).unwrap_or("");
            if !matches!(action, "open" | "update" | "reopen") {
                return Ok(ignored(format!(
                    "merge request action {action:?} builds nothing"
                )));
            }
            let number = attrs
                .get("iid")
                .and_then(Value::as_u64)
                .ok_or(EventError::Missing("object_attributes.iid"))?;
            let head = string(attrs, &["last_commit", "id"])
                .ok_or(EventError::Missing("object_attributes.last_commit.id"))?;
            let source = attrs.get("source_project_id").and_then(Value::as_u64);
            let target = attrs.get("target_project_id").and_then(Value::as_u64);
            Ok(Delivery::Build(Push {
                repo: repo.ok_or(EventError::Missing("the repository's name"))?,
                git_ref: format!("refs/merge-requests/{number}/head"),
                sha: sha(head)?,
                change: Change::PullRequest {
                    number,
                    fork: source.is_none() || source != target,
                },
                changed: None,
            }))
        }
        (_, k) => Ok(ignored(format!("event {k:?} builds nothing"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn github_push_tag_and_fork_pull_request() {
        let h = headers(&[("x-github-event", "push")]);
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{SHA}","repository":{{"full_name":"a/b"}}}}"#
        );
        assert_eq!(
            parse(Provider::Github, &h, body.as_bytes()).unwrap(),
            Delivery::Build(Push {
                repo: "a/b".into(),
                git_ref: "refs/heads/main".into(),
                sha: SHA.into(),
                change: Change::Branch("main".into()),
                changed: None,
            })
        );
        let body = body.replace("refs/heads/main", "refs/tags/v1");
        let Delivery::Build(p) = parse(Provider::Github, &h, body.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(p.change, Change::Tag("v1".into()));
        let deleted = format!(
            r#"{{"ref":"refs/heads/x","after":"{}","repository":{{"full_name":"a/b"}}}}"#,
            "0".repeat(40)
        );
        assert!(matches!(
            parse(Provider::Github, &h, deleted.as_bytes()).unwrap(),
            Delivery::Ignored { .. }
        ));
        let h = headers(&[("x-github-event", "pull_request")]);
        let pr = format!(
            r#"{{"action":"opened","number":7,"repository":{{"full_name":"a/b"}},"pull_request":{{"head":{{"sha":"{SHA}","repo":{{"full_name":"evil/b"}}}}}}}}"#
        );
        let Delivery::Build(p) = parse(Provider::Github, &h, pr.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(p.git_ref, "refs/pull/7/head");
        assert_eq!(
            p.change,
            Change::PullRequest {
                number: 7,
                fork: true
            }
        );
    }

    #[test]
    fn changed_files_from_the_commits_listed() {
        let h = headers(&[("x-github-event", "push")]);
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{SHA}","repository":{{"full_name":"a/b"}},
            "commits":[{{"added":["a/x"],"modified":["b"],"removed":[]}},{{"added":[],"modified":["b"],"removed":["c"]}}]}}"#
        );
        let Delivery::Build(p) = parse(Provider::Github, &h, body.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(p.changed, Some(vec!["a/x".into(), "b".into(), "c".into()]));
        // GitLab says how many commits there were; a cut list says nothing.
        let h = headers(&[("x-gitlab-event", "Push Hook")]);
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{SHA}","project":{{"path_with_namespace":"g/p"}},
            "total_commits_count":50,"commits":[{{"added":["a"],"modified":[],"removed":[]}}]}}"#
        );
        let Delivery::Build(p) = parse(Provider::Gitlab, &h, body.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(p.changed, None);
    }

    #[test]
    fn gitlab_merge_request_and_bad_sha() {
        let h = headers(&[("x-gitlab-event", "Merge Request Hook")]);
        let mr = format!(
            r#"{{"project":{{"path_with_namespace":"g/p"}},"object_attributes":{{"action":"open","iid":3,"source_project_id":1,"target_project_id":1,"last_commit":{{"id":"{SHA}"}}}}}}"#
        );
        let Delivery::Build(p) = parse(Provider::Gitlab, &h, mr.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(p.git_ref, "refs/merge-requests/3/head");
        assert_eq!(
            p.change,
            Change::PullRequest {
                number: 3,
                fork: false
            }
        );
        let h = headers(&[("x-gitlab-event", "Push Hook")]);
        let bad = r#"{"project":{"path_with_namespace":"g/p"},"ref":"refs/heads/main","after":"--upload-pack=x"}"#;
        assert!(matches!(
            parse(Provider::Gitlab, &h, bad.as_bytes()),
            Err(EventError::BadSha(_))
        ));
    }
}

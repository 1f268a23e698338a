//! Commit statuses back to the forge: pending when a build starts, then success, failure
//! or error. A failed call is retried with backoff and never fails the build.

use std::time::Duration;

use super::config::{Provider, Repo};

/// A commit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Success,
    Failure,
    /// The farm could not build (no `.farm.yaml`, a fetch failed, ...).
    Error,
}

impl State {
    fn word(self, provider: Provider) -> &'static str {
        match (self, provider) {
            (State::Pending, _) => "pending",
            (State::Success, _) => "success",
            (State::Failure, Provider::Gitlab) => "failed",
            (State::Failure, _) => "failure",
            (State::Error, Provider::Gitlab) => "failed",
            (State::Error, _) => "error",
        }
    }
}

/// How many times a status call is tried, and the first pause between tries (doubled
/// each time).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first_pause: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            first_pause: Duration::from_millis(500),
        }
    }
}

/// Reports statuses.
#[derive(Clone)]
pub struct Reporter {
    http: reqwest::Client,
    retry: Retry,
}

impl Reporter {
    pub fn new(retry: Retry) -> Reporter {
        Reporter {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .user_agent("farm-webhooks")
                .build()
                .unwrap_or_default(),
            retry,
        }
    }

    /// Post `state` for commit `sha` of `repo`, context `farm/<build>`. Logs and gives up
    /// after the configured tries; returns whether it got through.
    pub async fn report(
        &self,
        repo: &Repo,
        sha: &str,
        build: &str,
        state: State,
        description: &str,
        target_url: Option<&str>,
    ) -> bool {
        let Some(base) = &repo.status_api else {
            return false;
        };
        let context = format!("farm/{build}");
        let description: String = description.chars().take(140).collect();
        let (url, body) = match repo.provider {
            Provider::Github => (
                format!("{base}/repos/{}/statuses/{sha}", repo.name),
                serde_json::json!({"state": state.word(repo.provider), "context": context,
                    "description": description, "target_url": target_url}),
            ),
            Provider::Gitea => (
                format!("{base}/api/v1/repos/{}/statuses/{sha}", repo.name),
                serde_json::json!({"state": state.word(repo.provider), "context": context,
                    "description": description, "target_url": target_url}),
            ),
            Provider::Gitlab => (
                format!(
                    "{base}/api/v4/projects/{}/statuses/{sha}",
                    repo.name.replace('/', "%2F")
                ),
                serde_json::json!({"state": state.word(repo.provider), "name": context,
                    "description": description, "target_url": target_url}),
            ),
        };
        // No link: the field is left out rather than sent as null.
        let mut body = body;
        if target_url.is_none()
            && let Some(o) = body.as_object_mut()
        {
            o.remove("target_url");
        }
        let mut pause = self.retry.first_pause;
        for attempt in 1..=self.retry.attempts.max(1) {
            let mut req = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(token) = &repo.token {
                req = match repo.provider {
                    Provider::Github => req
                        .bearer_auth(token)
                        .header("accept", "application/vnd.github+json"),
                    Provider::Gitea => req.header("authorization", format!("token {token}")),
                    Provider::Gitlab => req.header("private-token", token),
                };
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => tracing::warn!(
                    repo = %repo.name, sha, context, attempt,
                    "status API answered {}", r.status()
                ),
                Err(e) => tracing::warn!(
                    repo = %repo.name, sha, context, attempt,
                    "status API: {e}"
                ),
            }
            if attempt < self.retry.attempts {
                tokio::time::sleep(pause).await;
                pause = pause.saturating_mul(2);
            }
        }
        tracing::error!(repo = %repo.name, sha, context, "gave up reporting the status {:?}", state);
        false
    }
}

//! CI webhooks (`farm coordinator --webhooks ADDR --repos FILE`): a push or a pull/merge
//! request of a configured repository builds the stackerfiles its `.farm.yaml` declares,
//! and the commit shows pending, then success or failure.
//!
//! A delivery is read raw (bounded by [`WebhookOptions::max_body`]) and its signature
//! checked against the configured repositories' secrets **before** its JSON is parsed
//! ([`verify`]). Only the repository's name, the ref, the commit and the kind of event
//! are taken from the payload; the clone URL, credentials and status API come from the
//! repositories file ([`config`]). The commit is fetched on the coordinator ([`checkout`])
//! and submitted as a remote submission ([`Origin::Remote`]): its build reads only the
//! commit's files, as any remote client's would.
//!
//! Answers: 401 for a missing or wrong signature, 404 for a repository not configured,
//! 400 for an unreadable payload, 413 for one too large, 200 for `ping`, for an event that
//! builds nothing (with the reason) and for a redelivery (with the builds it started),
//! 202 once accepted: fetching and building happen after the answer.

pub mod checkout;
pub mod config;
pub mod event;
pub mod farmfile;
pub mod status;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use farm_stackerfile::Substitutions;
use tokio::net::TcpListener;

use crate::farm::{Farm, Origin, Submission};
use crate::state::BuildState;
use checkout::Cache;
use config::{Provider, Repo, Repos, glob};
use event::{Change, Delivery, Push};
use farmfile::{FARM_YAML, FarmFile};
use status::{Reporter, Retry, State};

/// How the webhook listener runs.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub repos: Repos,
    /// The largest delivery accepted (GitHub sends at most 25 MB).
    pub max_body: usize,
    pub retry: Retry,
    /// Credentials for pushing images (`.farm.yaml`'s `push`), the coordinator's own.
    pub registry: farm_registry::Credentials,
}

impl WebhookOptions {
    /// 25 MiB bodies, statuses tried 5 times from 0.5 s apart.
    pub fn new(repos: Repos) -> Self {
        WebhookOptions {
            repos,
            max_body: 25 * 1024 * 1024,
            retry: Retry::default(),
            registry: farm_registry::Credentials::anonymous(),
        }
    }
}

struct Hooks {
    farm: Farm,
    repos: Repos,
    cache_dir: PathBuf,
    reporter: Reporter,
    registry: farm_registry::Credentials,
    /// One delivery fetched and submitted at a time: the bare caches are not shared by
    /// concurrent fetches, and a second delivery of a commit finds the first one's builds.
    work: tokio::sync::Mutex<()>,
}

/// The webhook routes (`POST /hooks/github`, `/hooks/gitlab`, `/hooks/gitea`).
pub fn router(farm: Farm, state_dir: &std::path::Path, options: WebhookOptions) -> axum::Router {
    let hooks = Arc::new(Hooks {
        farm,
        repos: options.repos,
        cache_dir: state_dir.join("webhooks").join("repos"),
        reporter: Reporter::new(options.retry),
        registry: options.registry,
        work: tokio::sync::Mutex::new(()),
    });
    let route = |provider: Provider| {
        let hooks = hooks.clone();
        post(move |headers: HeaderMap, body: Bytes| {
            let hooks = hooks.clone();
            async move { hooks.receive(provider, headers, body).await }
        })
    };
    axum::Router::new()
        .route("/hooks/github", route(Provider::Github))
        .route("/hooks/gitlab", route(Provider::Gitlab))
        .route("/hooks/gitea", route(Provider::Gitea))
        .layer(DefaultBodyLimit::max(options.max_body))
}

/// Serve the webhook routes on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    farm: Farm,
    state_dir: &std::path::Path,
    options: WebhookOptions,
) -> std::io::Result<()> {
    axum::serve(listener, router(farm, state_dir, options)).await
}

fn answer(outcome: Outcome, code: StatusCode, body: serde_json::Value) -> (Outcome, Response) {
    let response = (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    (outcome, response)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Hooks {
    async fn receive(
        self: Arc<Self>,
        provider: Provider,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let (outcome, response) = self.clone().decide(provider, headers, body).await;
        self.farm
            .metrics()
            .webhook_delivery(provider.as_str(), outcome.as_str());
        response
    }

    async fn decide(
        self: Arc<Self>,
        provider: Provider,
        headers: HeaderMap,
        body: Bytes,
    ) -> (Outcome, Response) {
        let p = provider.as_str();
        let candidates: Vec<&Repo> = self
            .repos
            .repos
            .iter()
            .filter(|r| r.provider == provider)
            .collect();
        if candidates.is_empty() {
            return answer(
                Outcome::NotConfigured,
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": format!("no repository is configured for {p}")}),
            );
        }
        // Verified before anything reads the body.
        let signature = match provider {
            Provider::Github => header(&headers, "x-hub-signature-256"),
            Provider::Gitea => header(&headers, "x-gitea-signature")
                .or_else(|| header(&headers, "x-hub-signature-256")),
            Provider::Gitlab => header(&headers, "x-gitlab-token"),
        };
        let Some(signature) = signature else {
            tracing::warn!(provider = p, "webhook delivery without a signature refused");
            return answer(
                Outcome::Unauthorized,
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "the delivery is not signed"}),
            );
        };
        // Every candidate is checked (no early exit); the secret that signs it says which
        // repositories the delivery may be for.
        let signed_by: Vec<&Repo> = candidates
            .into_iter()
            .filter(|r| match provider {
                Provider::Gitlab => verify::token_matches(&r.secret, signature),
                _ => verify::hmac_sha256_matches(&r.secret, &body, signature),
            })
            .collect();
        if signed_by.is_empty() {
            tracing::warn!(
                provider = p,
                "webhook delivery with a wrong signature refused"
            );
            return answer(
                Outcome::Unauthorized,
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "the signature does not match any configured repository's secret"}),
            );
        }
        let parsed = match event::parse(provider, &headers, &body) {
            Ok(d) => d,
            Err(e) => {
                return answer(
                    Outcome::Invalid,
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": e.to_string()}),
                );
            }
        };
        let find = |name: &Option<String>| {
            name.as_ref()
                .and_then(|n| signed_by.iter().find(|r| &r.name == n).copied())
        };
        let not_configured = |name: &str| {
            answer(
                Outcome::NotConfigured,
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": format!("repository {name:?} is not configured for {p} on this coordinator")}),
            )
        };
        let push = match parsed {
            Delivery::Ping { repo } => {
                if repo.is_some() && find(&repo).is_none() {
                    return not_configured(repo.as_deref().unwrap_or(""));
                }
                return answer(
                    Outcome::Ping,
                    StatusCode::OK,
                    serde_json::json!({"ping": "ok"}),
                );
            }
            Delivery::Ignored { repo, reason } => {
                if find(&repo).is_none() {
                    return not_configured(repo.as_deref().unwrap_or(""));
                }
                return answer(
                    Outcome::Ignored,
                    StatusCode::OK,
                    serde_json::json!({"ignored": reason}),
                );
            }
            Delivery::Build(push) => push,
        };
        let Some(repo) = find(&Some(push.repo.clone())) else {
            return not_configured(&push.repo);
        };
        if let Some(reason) = refused_by_repo(repo, &push.change) {
            return answer(
                Outcome::Ignored,
                StatusCode::OK,
                serde_json::json!({"ignored": reason}),
            );
        }
        let delivery = event::delivery_id(provider, &headers)
            .unwrap_or_else(|| farm_image::Digest::of(&body).hex().to_string());
        let key = repo_key(repo);
        match self
            .farm
            .state()
            .record_delivery(p, &delivery, &key, &push.sha)
            .await
        {
            Ok(Some(builds)) => {
                tracing::info!(provider = p, delivery, "redelivery: nothing started");
                answer(
                    Outcome::Redelivery,
                    StatusCode::OK,
                    serde_json::json!({"redelivery": true, "delivery": delivery, "builds": builds}),
                )
            }
            Ok(None) => {
                tracing::info!(
                    provider = p, delivery, repo = %repo.name, git_ref = %push.git_ref,
                    sha = %push.sha, "webhook delivery accepted"
                );
                let repo = repo.clone();
                let hooks = self.clone();
                let d = delivery.clone();
                // A delivery is a trace of its own, linked to the builds it starts
                // (issue 16).
                let span = tracing::info_span!(
                    target: "farm_trace",
                    parent: None,
                    "webhook delivery",
                    provider = %repo.provider.as_str(),
                    repo = %repo.name,
                    sha = %push.sha,
                    delivery = %d,
                );
                tokio::spawn(tracing::Instrument::instrument(
                    async move { hooks.work(repo, push, d).await },
                    span,
                ));
                answer(
                    Outcome::Accepted,
                    StatusCode::ACCEPTED,
                    serde_json::json!({"accepted": true, "delivery": delivery}),
                )
            }
            Err(e) => answer(
                Outcome::Error,
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": e.to_string()}),
            ),
        }
    }

    /// Fetch, submit, report; after the answer.
    async fn work(self: Arc<Self>, repo: Repo, push: Push, delivery: String) {
        let started = {
            let _one = self.work.lock().await;
            self.start(&repo, &push, &delivery).await
        };
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                // Nothing started: the provider's "redeliver" tries again.
                if let Err(e) = self
                    .farm
                    .state()
                    .forget_delivery(repo.provider.as_str(), &delivery)
                    .await
                {
                    tracing::warn!("forgetting delivery {delivery}: {e}");
                }
                tracing::error!(repo = %repo.name, sha = %push.sha, delivery, "webhook build not started: {e}");
                self.reporter
                    .report(&repo, &push.sha, "webhook", State::Error, &e, None)
                    .await;
                return;
            }
        };
        for (name, result) in started {
            let hooks = self.clone();
            let repo = repo.clone();
            let sha = push.sha.clone();
            tokio::spawn(async move {
                match result {
                    Started::New(id, push) => hooks.follow(&repo, &sha, &name, &id, push).await,
                    Started::Shared(id, push) => {
                        tracing::info!(build = %id, sha, "an earlier delivery of this commit started it");
                        hooks.follow(&repo, &sha, &name, &id, push).await
                    }
                    Started::Refused(why) => {
                        hooks
                            .reporter
                            .report(&repo, &sha, &name, State::Error, &why, None)
                            .await;
                    }
                }
            });
        }
    }

    /// Fetch the commit, read its `.farm.yaml` and submit the builds that run for it.
    async fn start(
        &self,
        repo: &Repo,
        push: &Push,
        delivery: &str,
    ) -> Result<Vec<(String, Started)>, String> {
        let cache = Cache::open(&self.cache_dir, repo)
            .await
            .map_err(|e| e.to_string())?;
        let tip = cache
            .fetch(repo, &push.git_ref, &push.sha)
            .await
            .map_err(|e| e.to_string())?;
        let Some(text) = cache
            .read(&push.sha, FARM_YAML, farmfile::MAX_FARM_YAML)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err(format!("the commit has no {FARM_YAML}"));
        };
        let file = FarmFile::parse(&text).map_err(|e| e.to_string())?;
        let builds: Vec<_> = file
            .builds
            .iter()
            .filter(|b| b.runs_for(&push.change) && b.paths_match(push.changed.as_deref()))
            .collect();
        if builds.is_empty() {
            tracing::info!(repo = %repo.name, sha = %push.sha, "no build of {FARM_YAML} runs for {}", push.git_ref);
            return Ok(Vec::new());
        }
        let key = repo_key(repo);
        let context = cache
            .context(&push.sha, self.farm.blobs())
            .await
            .map_err(|e| e.to_string())?;
        let (branch, tag) = match &push.change {
            Change::Branch(b) => (b.clone(), String::new()),
            Change::Tag(t) => (String::new(), t.clone()),
            Change::PullRequest { .. } => (String::new(), String::new()),
        };
        let mut values = farmfile::TagValues {
            sha: push.sha.clone(),
            branch: branch.clone(),
            tag: tag.clone(),
            pr: match push.change {
                Change::PullRequest { number, .. } => number.to_string(),
                _ => String::new(),
            },
        };
        if tip == checkout::RefTip::MovedOn {
            // A late delivery must not move the branch's (or pull request's) tag back to
            // an older image: only the commit's own tags ({sha}, {short_sha}, {tag}).
            tracing::info!(repo = %repo.name, sha = %push.sha, git_ref = %push.git_ref, "the ref has moved past this commit: its branch and pull-request tags are not pushed");
            values.branch.clear();
            values.pr.clear();
        }
        let fork = matches!(push.change, Change::PullRequest { fork: true, .. });
        let state = self.farm.state();
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for b in builds {
            let target = match push_plan(repo, b, &values, fork) {
                Ok(t) => t,
                Err(why) => {
                    out.push((b.name.clone(), Started::Refused(why)));
                    continue;
                }
            };
            if let Ok(Some(id)) = state.webhook_build(&key, &push.sha, &b.name).await {
                // The commit is built once; this delivery's own tags (a tag or a pull
                // request at a commit a branch push already built) follow that build.
                farm_telemetry::add_link(&tracing::Span::current(), &self.farm.trace_context(&id));
                ids.push(id.clone());
                out.push((b.name.clone(), Started::Shared(id, target)));
                continue;
            }
            let mut cli: Vec<(String, String)> = b
                .substitutions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            cli.extend([
                ("FARM_GIT_SHA".to_string(), push.sha.clone()),
                ("FARM_GIT_REF".to_string(), push.git_ref.clone()),
                ("FARM_GIT_BRANCH".to_string(), branch.clone()),
                ("FARM_GIT_TAG".to_string(), tag.clone()),
            ]);
            let spec = Submission {
                stackerfiles: vec![b.stackerfile.clone()],
                context: context.clone(),
                substitutions: Substitutions {
                    cli,
                    ..Default::default()
                },
                environment: Vec::new(),
                no_cache: false,
                compression: Default::default(),
                layer_format: Default::default(),
                require_hash: false,
                allow_outside_context: false,
                // The same policy as any remote client's submission.
                origin: Origin::Remote,
                inline: Default::default(),
                priority: 0,
            };
            // The build is the root of its own trace; the delivery links to it.
            let submitted =
                tracing::Instrument::instrument(self.farm.submit(spec), tracing::Span::none())
                    .await;
            match submitted {
                Ok((id, _)) => {
                    farm_telemetry::add_link(
                        &tracing::Span::current(),
                        &self.farm.trace_context(&id),
                    );
                    tracing::info!(build = %id, repo = %repo.name, sha = %push.sha, delivery, name = %b.name, "webhook build started");
                    if let Err(e) = state
                        .set_webhook_build(&key, &push.sha, &b.name, &id, &push.git_ref, delivery)
                        .await
                    {
                        tracing::warn!("recording webhook build {id}: {e}");
                    }
                    ids.push(id.clone());
                    out.push((b.name.clone(), Started::New(id, target)));
                }
                Err(e) => out.push((b.name.clone(), Started::Refused(e.to_string()))),
            }
        }
        if let Err(e) = state
            .set_delivery_builds(repo.provider.as_str(), delivery, &ids)
            .await
        {
            tracing::warn!("recording the builds of delivery {delivery}: {e}");
        }
        Ok(out)
    }

    /// Report pending, wait for the build's end, report its outcome.
    async fn follow(&self, repo: &Repo, sha: &str, name: &str, id: &str, push: Option<PushPlan>) {
        let link = self
            .repos
            .log_url
            .as_ref()
            .map(|u| u.replace("{build}", id));
        self.reporter
            .report(
                repo,
                sha,
                name,
                State::Pending,
                &format!("build {id}"),
                link.as_deref(),
            )
            .await;
        if let Ok(mut events) = self.farm.watch(id, 0).await {
            while events.recv().await.is_some() {}
        }
        let (state, why) = match self.farm.status(id).await {
            Ok(Some(s)) if s.state == BuildState::Succeeded => match push {
                None => (State::Success, format!("build {id} succeeded")),
                Some(plan) => match self.push(&s, &plan, repo.push_insecure).await {
                    Ok(n) => (
                        State::Success,
                        format!("build {id} succeeded; {n} tags pushed to {}", plan.target),
                    ),
                    Err(e) => (
                        State::Failure,
                        format!(
                            "build {id} succeeded but pushing to {} failed: {e}",
                            plan.target
                        ),
                    ),
                },
            },
            Ok(Some(s)) if s.state.is_finished() => (
                State::Failure,
                format!(
                    "build {id} {}: {}",
                    s.state.as_str(),
                    s.error.unwrap_or_default()
                ),
            ),
            Ok(_) => (
                State::Error,
                format!("build {id} was not followed to its end"),
            ),
            Err(e) => (State::Error, format!("build {id}: {e}")),
        };
        self.reporter
            .report(repo, sha, name, state, &why, link.as_deref())
            .await;
    }
}

impl Hooks {
    /// Push the images (layers with a manifest) of a finished build; the tags pushed.
    async fn push(
        &self,
        status: &crate::state::BuildStatus,
        plan: &PushPlan,
        insecure: bool,
    ) -> Result<usize, String> {
        let mut images = Vec::new();
        for l in &status.layers {
            if let Some(d) = &l.manifest_digest {
                images.push(farm_registry::PushImage {
                    name: l.name.clone(),
                    manifest_digest: farm_image::Digest::parse(d).map_err(|e| e.to_string())?,
                });
            }
        }
        let opts = farm_registry::PushOptions {
            target: plan.target.clone(),
            tags: plan.tags.clone(),
            connect: farm_registry::ConnectOptions {
                insecure,
                tls_hint: "set push_insecure = true for the repository in the repositories file"
                    .into(),
            },
        };
        // The push's future is not `Send` (its stream of uploads borrows across awaits in
        // a way the compiler cannot prove general), so it runs on a blocking thread of
        // this runtime.
        let (blobs, credentials) = (self.farm.blobs().clone(), self.registry.clone());
        let handle = tokio::runtime::Handle::current();
        let (pushed, _) = tokio::task::spawn_blocking(move || {
            handle.block_on(farm_registry::push(&blobs, &images, &opts, &credentials))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        for p in &pushed {
            tracing::info!(build = %status.id, reference = %p.reference, "pushed");
        }
        Ok(pushed.len())
    }
}

/// Where a build's images go, checked before it starts.
#[derive(Debug, Clone)]
struct PushPlan {
    target: farm_registry::PushTarget,
    tags: Vec<String>,
}

/// The push of build `b` for this event: `None` when it pushes nothing (none declared, or
/// a fork's pull request); an error when the target is not allowed or a tag is invalid.
fn push_plan(
    repo: &Repo,
    b: &farmfile::BuildSpec,
    values: &farmfile::TagValues,
    fork: bool,
) -> Result<Option<PushPlan>, String> {
    let Some(spec) = &b.push else {
        return Ok(None);
    };
    if fork {
        tracing::info!(repo = %repo.name, build = %b.name, "a fork's pull request: built, not pushed");
        return Ok(None);
    }
    if !config::push_allowed(&repo.push_to, &spec.to) {
        return Err(format!(
            "push target {} is not under the repository's push_to {:?} (repositories file)",
            spec.to, repo.push_to
        ));
    }
    let target = farm_registry::PushTarget::parse(&spec.to).map_err(|e| e.to_string())?;
    let tags = spec.tags(values);
    if tags.is_empty() {
        return Ok(None);
    }
    for t in &tags {
        farm_registry::check_tag(t).map_err(|e| format!("tag {t:?}: {e}"))?;
    }
    Ok(Some(PushPlan { target, tags }))
}

/// How a delivery was answered (`farm_webhook_deliveries_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Redelivery,
    Ping,
    Ignored,
    Unauthorized,
    NotConfigured,
    Invalid,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Redelivery => "redelivery",
            Outcome::Ping => "ping",
            Outcome::Ignored => "ignored",
            Outcome::Unauthorized => "unauthorized",
            Outcome::NotConfigured => "not_configured",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

/// What a delivery did for one build of `.farm.yaml`.
enum Started {
    New(String, Option<PushPlan>),
    /// An earlier delivery of the same commit started it; this delivery's push follows it.
    Shared(String, Option<PushPlan>),
    /// The farm refused the submission (why).
    Refused(String),
}

fn repo_key(repo: &Repo) -> String {
    // Read back by `state::WebhookOrigin::provider_and_repo`.
    format!("{}:{}", repo.provider.as_str(), repo.name)
}

/// Why the repositories file does not build `change` (`None`: it does).
fn refused_by_repo(repo: &Repo, change: &Change) -> Option<String> {
    match change {
        Change::Branch(b) if !repo.branches.iter().any(|p| glob(p, b)) => Some(format!(
            "branch {b:?} does not build (the repositories file's branches: {:?})",
            repo.branches
        )),
        Change::Tag(t) if !repo.tags.iter().any(|p| glob(p, t)) => Some(format!(
            "tag {t:?} does not build (the repositories file's tags: {:?})",
            repo.tags
        )),
        Change::PullRequest { .. } if !repo.pull_requests => {
            Some("pull requests do not build (pull_requests = false)".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;

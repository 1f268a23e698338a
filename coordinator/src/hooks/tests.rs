//! The webhook listener over real HTTP, with a real farm (no worker: builds are accepted
//! and stay queued), a real git repository served over `file://`, and an axum server on
//! 127.0.0.1 standing in for the forge's status API (which cannot run here).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farm_image::BlobStore;
use tokio::net::TcpListener;

use super::*;
use crate::farm::FarmConfig;

const SECRET: &str = "It's a Secret to Everybody";

/// The status API stand-in: records (path, authorization, body) of each call, and
/// answers 500 to the first `fail_first` calls.
#[derive(Clone, Default)]
pub(crate) struct StatusApi {
    pub(crate) calls: Arc<Mutex<Vec<(String, String, serde_json::Value)>>>,
    fail_first: Arc<Mutex<u32>>,
}

impl StatusApi {
    pub(crate) async fn start(fail_first: u32) -> (StatusApi, String) {
        let api = StatusApi {
            fail_first: Arc::new(Mutex::new(fail_first)),
            ..Default::default()
        };
        let a = api.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let a = a.clone();
                async move {
                    let auth = header(&headers, "authorization")
                        .or_else(|| header(&headers, "private-token"))
                        .unwrap_or("")
                        .to_string();
                    let json = serde_json::from_slice(&body).unwrap_or_default();
                    a.calls
                        .lock()
                        .unwrap()
                        .push((uri.path().to_string(), auth, json));
                    let mut fail = a.fail_first.lock().unwrap();
                    if *fail > 0 {
                        *fail -= 1;
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::CREATED
                    }
                }
            },
        );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (api, url)
    }

    pub(crate) fn states(&self) -> Vec<(String, String)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, b)| {
                (
                    b["context"]
                        .as_str()
                        .or(b["name"].as_str())
                        .unwrap_or("")
                        .to_string(),
                    b["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository with a `.farm.yaml` naming one build; returns its head.
fn make_repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "--quiet"]);
    std::fs::write(
        dir.join(".farm.yaml"),
        "version: 1\nbuilds:\n  - name: app\n    stackerfile: stacker.yaml\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("stacker.yaml"),
        "app:\n  from:\n    type: tar\n    url: base.tar\n  run: echo ${{FARM_GIT_SHA}}\n",
    )
    .unwrap();
    std::fs::write(dir.join("base.tar"), vec![0u8; 1024]).unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "--quiet", "-m", "one"]);
    git(dir, &["rev-parse", "HEAD"])
}

struct Env {
    _d: tempfile::TempDir,
    farm: Farm,
    url: String,
    api: StatusApi,
    sha: String,
}

async fn env(fail_first: u32) -> Env {
    let d = tempfile::tempdir().unwrap();
    let sha = make_repo(&d.path().join("repo"));
    let (api, api_url) = StatusApi::start(fail_first).await;
    std::fs::write(d.path().join("secret"), SECRET).unwrap();
    std::fs::write(d.path().join("token"), "tok").unwrap();
    let repos = d.path().join("repos.toml");
    std::fs::write(
        &repos,
        format!(
            "log_url = \"http://farm.example/builds/{{build}}\"\n\
             [[repo]]\nname = \"acme/app\"\nprovider = \"github\"\nclone_url = \"file://{}\"\n\
             secret_file = \"secret\"\ntoken_file = \"token\"\nstatus_api = \"{api_url}\"\nbranches = [\"main\"]\n\
             [[repo]]\nname = \"grp/app\"\nprovider = \"gitlab\"\nclone_url = \"file://{}\"\n\
             secret_file = \"secret\"\nstatus_api = \"{api_url}\"\n",
            d.path().join("repo").display(),
            d.path().join("repo").display()
        ),
    )
    .unwrap();
    let farm = Farm::start(FarmConfig::new(
        d.path().join("state"),
        BlobStore::local(&d.path().join("blobs")).unwrap(),
    ))
    .await
    .unwrap();
    let mut options = WebhookOptions::new(Repos::load(&repos).unwrap());
    options.retry = Retry {
        attempts: 3,
        first_pause: Duration::from_millis(10),
    };
    options.max_body = 64 * 1024;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (f, dir) = (farm.clone(), d.path().join("state"));
    tokio::spawn(async move { serve(l, f, &dir, options).await });
    Env {
        _d: d,
        farm,
        url,
        api,
        sha,
    }
}

fn push_body(repo: &str, git_ref: &str, sha: &str) -> String {
    format!(r#"{{"ref":"{git_ref}","after":"{sha}","repository":{{"full_name":"{repo}"}}}}"#)
}

async fn deliver(
    e: &Env,
    route: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/hooks/{route}", e.url))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    (
        code,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default(),
    )
}

fn github(event: &str, delivery: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-github-event", event.to_string()),
        ("x-github-delivery", delivery.to_string()),
        (
            "x-hub-signature-256",
            format!(
                "sha256={}",
                verify::sign(SECRET.as_bytes(), body.as_bytes())
            ),
        ),
    ]
}

async fn builds(farm: &Farm) -> usize {
    farm.state().list_builds().await.unwrap().len()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn refused_deliveries_start_nothing() {
    let e = env(0).await;
    let body = push_body("acme/app", "refs/heads/main", &e.sha);
    // No signature.
    let (code, _) = deliver(&e, "github", &[("x-github-event", "push".into())], &body).await;
    assert_eq!(code, 401);
    // A signature made with another secret.
    let other = format!("sha256={}", verify::sign(b"guess", body.as_bytes()));
    let (code, _) = deliver(
        &e,
        "github",
        &[
            ("x-github-event", "push".into()),
            ("x-hub-signature-256", other),
        ],
        &body,
    )
    .await;
    assert_eq!(code, 401);
    // A tampered body under a good signature.
    let mut h = github("push", "d-1", &body);
    h[2].1 = format!("sha256={}", verify::sign(SECRET.as_bytes(), b"{}"));
    let (code, _) = deliver(&e, "github", &h, &body).await;
    assert_eq!(code, 401);
    // A wrong GitLab token.
    let (code, _) = deliver(
        &e,
        "gitlab",
        &[
            ("x-gitlab-event", "Push Hook".into()),
            ("x-gitlab-token", "nope".into()),
        ],
        &body,
    )
    .await;
    assert_eq!(code, 401);
    // A correctly signed delivery for a repository not configured.
    let unknown = push_body("someone/else", "refs/heads/main", &e.sha);
    let (code, _) = deliver(&e, "github", &github("push", "d-2", &unknown), &unknown).await;
    assert_eq!(code, 404);
    // No repository configured for that provider at all.
    let (code, _) = deliver(&e, "gitea", &github("push", "d-3", &body), &body).await;
    assert_eq!(code, 404);
    // Too large.
    let big = " ".repeat(65 * 1024) + &body;
    let (code, _) = deliver(&e, "github", &github("push", "d-4", &big), &big).await;
    assert_eq!(code, 413);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(builds(&e.farm).await, 0);
    assert!(e.api.states().is_empty());
    let metrics = e.farm.metrics().render();
    for line in [
        "farm_webhook_deliveries_total{provider=\"github\",outcome=\"unauthorized\"} 3\n",
        "farm_webhook_deliveries_total{provider=\"gitlab\",outcome=\"unauthorized\"} 1\n",
        "farm_webhook_deliveries_total{provider=\"github\",outcome=\"not_configured\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // Nothing was fetched: no bare cache exists.
    assert!(!e._d.path().join("state/webhooks/repos").exists());
}

#[tokio::test]
async fn ping_and_a_branch_not_configured_answer_200() {
    let e = env(0).await;
    let ping = r#"{"zen":"hi","repository":{"full_name":"acme/app"}}"#;
    let (code, body) = deliver(&e, "github", &github("ping", "p-1", ping), ping).await;
    assert_eq!((code, body["ping"].as_str()), (200, Some("ok")));
    let dev = push_body("acme/app", "refs/heads/dev", &e.sha);
    let (code, body) = deliver(&e, "github", &github("push", "d-dev", &dev), &dev).await;
    assert_eq!(code, 200);
    assert!(body["ignored"].as_str().unwrap().contains("dev"), "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(builds(&e.farm).await, 0);
}

#[tokio::test]
async fn a_signed_push_builds_once_and_a_redelivery_starts_nothing() {
    let e = env(2).await;
    let body = push_body("acme/app", "refs/heads/main", &e.sha);
    let (code, answer) = deliver(&e, "github", &github("push", "d-1", &body), &body).await;
    assert_eq!(code, 202, "{answer}");
    // Pending arrives after two 500s from the status API (retried).
    let api = e.api.clone();
    wait_for("the pending status, tried three times", || {
        api.states().len() >= 3
    })
    .await;
    assert!(
        api.states()
            .iter()
            .all(|s| *s == ("farm/app".to_string(), "pending".to_string())),
        "{:?}",
        api.states()
    );
    assert_eq!(
        api.states().len(),
        3,
        "two refused calls then the accepted one"
    );
    let (path, auth, status) = api.calls.lock().unwrap()[2].clone();
    assert_eq!(path, format!("/repos/acme/app/statuses/{}", e.sha));
    assert_eq!(auth, "Bearer tok");
    let ids = e.farm.state().list_builds().await.unwrap();
    assert_eq!(ids.len(), 1);
    let id = ids[0].id.clone();
    assert_eq!(
        status["target_url"].as_str(),
        Some(format!("http://farm.example/builds/{id}").as_str())
    );
    // The build reads the commit's files, as a remote submission.
    let spec: Submission = serde_json::from_str(&ids[0].spec_json).unwrap();
    assert_eq!(spec.origin, Origin::Remote);
    assert!(spec.context.iter().any(|f| f.path == "stacker.yaml"));
    assert!(
        spec.substitutions
            .cli
            .contains(&("FARM_GIT_SHA".into(), e.sha.clone()))
    );
    // The same delivery again: 200 with the build, nothing new.
    let (code, answer) = deliver(&e, "github", &github("push", "d-1", &body), &body).await;
    assert_eq!(code, 200);
    assert_eq!(answer["builds"], serde_json::json!([id]));
    // Another delivery of the same commit shares the build.
    let (code, _) = deliver(&e, "github", &github("push", "d-2", &body), &body).await;
    assert_eq!(code, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(builds(&e.farm).await, 1);
}

#[tokio::test]
async fn a_payload_naming_another_commit_is_not_built() {
    let e = env(0).await;
    let wrong = "1".repeat(40);
    let body = push_body("acme/app", "refs/heads/main", &wrong);
    let (code, _) = deliver(&e, "github", &github("push", "d-w", &body), &body).await;
    assert_eq!(code, 202);
    let api = e.api.clone();
    wait_for("the error status", || {
        api.states()
            .contains(&("farm/webhook".into(), "error".into()))
    })
    .await;
    let (_, _, status) = api.calls.lock().unwrap()[0].clone();
    assert!(
        status.get("target_url").is_none(),
        "no link, no null: {status}"
    );
    assert!(
        status["description"]
            .as_str()
            .unwrap()
            .contains("not the commit"),
        "{status}"
    );
    assert_eq!(builds(&e.farm).await, 0);
    // Nothing started, so its redelivery is tried again (not answered from the record).
    let (code, _) = deliver(&e, "github", &github("push", "d-w", &body), &body).await;
    assert_eq!(code, 202);
}

#[tokio::test]
async fn a_gitlab_push_with_the_right_token_reports_to_the_gitlab_api() {
    let e = env(0).await;
    let body = format!(
        r#"{{"project":{{"path_with_namespace":"grp/app"}},"ref":"refs/heads/main","after":"{}"}}"#,
        e.sha
    );
    let h = vec![
        ("x-gitlab-event", "Push Hook".to_string()),
        ("x-gitlab-event-uuid", "u-1".to_string()),
        ("x-gitlab-token", SECRET.to_string()),
    ];
    let (code, answer) = deliver(&e, "gitlab", &h, &body).await;
    assert_eq!(code, 202, "{answer}");
    let api = e.api.clone();
    wait_for("the pending status", || !api.states().is_empty()).await;
    let (path, _, status) = api.calls.lock().unwrap()[0].clone();
    assert_eq!(
        path,
        format!("/api/v4/projects/grp%2Fapp/statuses/{}", e.sha)
    );
    assert_eq!(status["name"], "farm/app");
    assert_eq!(
        status["target_url"]
            .as_str()
            .map(|u| u.starts_with("http://farm.example/builds/b-")),
        Some(true)
    );
    assert_eq!(status["state"], "pending");
    // The same delivery again.
    let (code, _) = deliver(&e, "gitlab", &h, &body).await;
    assert_eq!(code, 200, "a redelivery");
}

#[test]
fn forks_never_push_and_targets_stay_under_push_to() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("s"), "x").unwrap();
    let f = d.path().join("r.toml");
    std::fs::write(
        &f,
        "[[repo]]\nname = \"a/b\"\nprovider = \"github\"\nclone_url = \"file:///x\"\nsecret_file = \"s\"\npush_to = [\"docker://reg.example/acme\"]\n",
    )
    .unwrap();
    let repo = Repos::load(&f).unwrap().repos.remove(0);
    let file = |to: &str| {
        FarmFile::parse(
            format!("version: 1\nbuilds:\n  - name: app\n    stackerfile: s.yaml\n    push:\n      to: {to}\n      tags: ['{{branch}}']\n")
                .as_bytes(),
        )
        .unwrap()
        .builds
        .remove(0)
    };
    let values = farmfile::TagValues {
        sha: "0".repeat(40),
        branch: "main".into(),
        ..Default::default()
    };
    let ok = file("docker://reg.example/acme");
    let plan = push_plan(&repo, &ok, &values, false).unwrap().unwrap();
    assert_eq!(plan.tags, ["main"]);
    assert!(
        push_plan(&repo, &ok, &values, true).unwrap().is_none(),
        "a fork"
    );
    let elsewhere = file("docker://evil.example/acme");
    assert!(push_plan(&repo, &elsewhere, &values, false).is_err());
    // No tag for this event: nothing pushed.
    let pr = farmfile::TagValues {
        sha: "0".repeat(40),
        ..Default::default()
    };
    assert!(push_plan(&repo, &ok, &pr, false).unwrap().is_none());
}

#[tokio::test]
async fn an_oversized_farm_yaml_is_refused_before_it_is_read() {
    let e = env(0).await;
    let repo = e._d.path().join("repo");
    let mut big = std::fs::read_to_string(repo.join(".farm.yaml")).unwrap();
    big.push_str(&format!("# {}\n", "x".repeat(farmfile::MAX_FARM_YAML)));
    std::fs::write(repo.join(".farm.yaml"), big).unwrap();
    git(&repo, &["commit", "--quiet", "-am", "big"]);
    let sha = git(&repo, &["rev-parse", "HEAD"]);
    let body = push_body("acme/app", "refs/heads/main", &sha);
    let (code, _) = deliver(&e, "github", &github("push", "d-big", &body), &body).await;
    assert_eq!(code, 202);
    let api = e.api.clone();
    wait_for("the error status", || {
        api.states()
            .contains(&("farm/webhook".into(), "error".into()))
    })
    .await;
    let (_, _, status) = api.calls.lock().unwrap()[0].clone();
    assert!(
        status["description"]
            .as_str()
            .unwrap()
            .contains("over the limit"),
        "{status}"
    );
    assert_eq!(builds(&e.farm).await, 0);
}

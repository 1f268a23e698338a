//! A remote submission reads only what it uploaded: nothing of the coordinator's disk
//! (imports, bases, `oci` layouts, stackerfiles, prerequisites), no private address,
//! unless the operator's [`RemotePolicy`] allows it.

use super::*;

/// What only the coordinator's disk holds; no blob, event or log may carry it.
const SECRET: &str = "coordinator-secret-6b1f0e";

struct Setup {
    dir: tempfile::TempDir,
    farm: Farm,
    _worker: FakeWorker,
}

impl Setup {
    async fn new(remote: RemotePolicy) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(
            dir.path().join("secret.yaml"),
            format!("stolen:\n  from:\n    type: scratch\n  run: echo {SECRET}\n"),
        )
        .unwrap();
        let farm = Farm::start(FarmConfig {
            lease: Duration::from_millis(2000),
            platform: "linux/amd64".parse().unwrap(),
            remote,
            ..FarmConfig::new(
                dir.path().join("state"),
                BlobStore::local(&dir.path().join("blobs")).unwrap(),
            )
        })
        .await
        .unwrap();
        let worker = fake_worker(&farm, "w", 2, QUICK, vec![]);
        Setup {
            dir,
            farm,
            _worker: worker,
        }
    }

    fn secret_path(&self) -> String {
        self.dir.path().join("secret").display().to_string()
    }

    /// A remote submission whose context is `stacker.yaml` with `yaml`, asking to read
    /// outside its context.
    async fn submission(&self, yaml: &str) -> Submission {
        let digest = self
            .farm
            .blobs()
            .put(yaml.as_bytes().to_vec().into())
            .await
            .unwrap()
            .digest
            .to_string();
        Submission {
            context: vec![ContextFile {
                path: "stacker.yaml".into(),
                digest,
                mode: 0o644,
                symlink_target: String::new(),
            }],
            allow_outside_context: true,
            origin: Origin::Remote,
            ..Submission::new(["stacker.yaml"])
        }
    }

    /// Submit and wait: the error of the submission or of the build.
    async fn error_of(&self, spec: Submission) -> String {
        match self.farm.submit(spec).await {
            Err(e) => e.to_string(),
            Ok((id, _)) => {
                let (state, error) = wait(&self.farm, &id).await;
                assert_eq!(state, BuildState::Failed, "{error:?}");
                error.unwrap_or_default()
            }
        }
    }

    /// No file of the blob store or the state dir holds the secret.
    fn assert_secret_stayed_home(&self) {
        for root in ["blobs", "state"] {
            for entry in walkdir(&self.dir.path().join(root)) {
                let bytes = std::fs::read(&entry).unwrap_or_default();
                assert!(
                    !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                    "{} carries the coordinator's secret",
                    entry.display()
                );
            }
        }
    }
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_submission_reads_nothing_of_the_coordinators_disk() {
    let s = Setup::new(RemotePolicy::default()).await;
    let secret = s.secret_path();
    let outside = "is outside the uploaded build context";
    let layout = s.dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    let cases = [
        (
            format!("l:\n  from:\n    type: scratch\n  import:\n    - {secret}\n"),
            outside,
        ),
        (
            "l:\n  from:\n    type: scratch\n  import:\n    - ../../../secret\n".to_string(),
            outside,
        ),
        (
            format!("l:\n  from:\n    type: tar\n    url: {secret}\n"),
            outside,
        ),
        (
            format!(
                "l:\n  from:\n    type: oci\n    url: {}:latest\n",
                layout.display()
            ),
            outside,
        ),
        (
            format!(
                "l:\n  from:\n    type: scratch\n  overlay_dirs:\n    - source: {}\n      dest: /o\n",
                s.dir.path().display()
            ),
            outside,
        ),
        (
            format!(
                "config:\n  prerequisites:\n    - {}/secret.yaml\nl:\n  from:\n    type: built\n    tag: stolen\n",
                s.dir.path().display()
            ),
            outside,
        ),
    ];
    for (yaml, expected) in &cases {
        let error = s.error_of(s.submission(yaml).await).await;
        assert!(error.contains(expected), "{yaml}\n=> {error}");
        assert!(
            !error.contains("state/contexts"),
            "the message shows no path of the coordinator's: {error}"
        );
    }
    // A stackerfile named by an absolute path or out of the context.
    for name in [
        format!("{}/secret.yaml", s.dir.path().display()),
        "../secret.yaml".into(),
    ] {
        let spec = Submission {
            stackerfiles: vec![name.clone()],
            ..s.submission("l:\n  from:\n    type: scratch\n").await
        };
        let error = s.error_of(spec).await;
        assert!(
            error.contains("relative to its uploaded context"),
            "{name}: {error}"
        );
    }
    // A submission with no uploaded context reads no local file at all.
    let spec = Submission {
        context: Vec::new(),
        stackerfiles: vec!["https://example.com/stacker.yaml".into()],
        inline: [(
            "https://example.com/stacker.yaml".to_string(),
            format!("l:\n  from:\n    type: scratch\n  import:\n    - {secret}\n"),
        )]
        .into(),
        ..s.submission("").await
    };
    let error = s.error_of(spec).await;
    assert!(error.contains("uploaded no files"), "{error}");
    s.assert_secret_stayed_home();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_may_let_remote_submissions_read_its_disk() {
    let s = Setup::new(RemotePolicy {
        outside_context: OutsideContext::WhenAsked,
        ..Default::default()
    })
    .await;
    let yaml = format!(
        "l:\n  from:\n    type: scratch\n  import:\n    - {}\n  run: true\n",
        s.secret_path()
    );
    let (id, _) = s.farm.submit(s.submission(&yaml).await).await.unwrap();
    assert_eq!(wait(&s.farm, &id).await, (BuildState::Succeeded, None));
    // ... but only when the submission asks for it.
    let spec = Submission {
        allow_outside_context: false,
        ..s.submission(&yaml).await
    };
    assert!(
        s.error_of(spec)
            .await
            .contains("outside the uploaded build context")
    );
}

/// A one-request-at-a-time HTTP server on `addr` answering every request with `body`;
/// counts the connections it accepts.
async fn http_server(body: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/file", listener.local_addr().unwrap());
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_http_import_of_loopback_is_refused_unless_allow_listed() {
    let (url, hits) = http_server(SECRET).await;
    let yaml = format!("l:\n  from:\n    type: scratch\n  import:\n    - {url}\n  run: true\n");
    let s = Setup::new(RemotePolicy::default()).await;
    let error = s.error_of(s.submission(&yaml).await).await;
    assert!(
        error.contains("loopback") && error.contains("--allow-fetch 127.0.0.1"),
        "{error}"
    );
    let tar = format!("l:\n  from:\n    type: tar\n    url: {url}\n");
    let error = s.error_of(s.submission(&tar).await).await;
    assert!(error.contains("loopback"), "{error}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    s.assert_secret_stayed_home();

    let allowed = Setup::new(RemotePolicy {
        fetch: crate::destinations::AllowList(vec!["127.0.0.0/8".parse().unwrap()]),
        ..Default::default()
    })
    .await;
    let (id, _) = allowed
        .farm
        .submit(allowed.submission(&yaml).await)
        .await
        .unwrap();
    assert_eq!(
        wait(&allowed.farm, &id).await,
        (BuildState::Succeeded, None)
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A local submission (the embedded mode) fetches it as before.
    let local = Setup::new(RemotePolicy::default()).await;
    let file = local.dir.path().join("stacker.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let (id, _) = local.farm.submit(submission(&file)).await.unwrap();
    assert_eq!(wait(&local.farm, &id).await, (BuildState::Succeeded, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_bind_source_is_not_checked_on_the_coordinators_disk() {
    // Whether a path exists on the coordinator is none of the submitter's business: the
    // worker owns its host and decides (`farm worker --allow-bind`).
    let s = Setup::new(RemotePolicy::default()).await;
    let yaml = "l:\n  from:\n    type: scratch\n  binds:\n    - /nonexistent-on-the-coordinator -> /x\n  run: true\n";
    let (id, _) = s.farm.submit(s.submission(yaml).await).await.unwrap();
    assert_eq!(wait(&s.farm, &id).await, (BuildState::Succeeded, None));
    let local = Setup::new(RemotePolicy::default()).await;
    let file = local.dir.path().join("stacker.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (id, _) = local.farm.submit(submission(&file)).await.unwrap();
    let (state, error) = wait(&local.farm, &id).await;
    assert_eq!(state, BuildState::Failed);
    assert!(error.unwrap_or_default().contains("nonexistent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_allow_outside_context_does_not_open_the_coordinators_disk() {
    use crate::grpc::farm::FarmService;
    use farm_proto::farm_server::Farm as _;
    let s = Setup::new(RemotePolicy::default()).await;
    let spec = s
        .submission(&format!(
            "l:\n  from:\n    type: scratch\n  import:\n    - {}\n  run: true\n",
            s.secret_path()
        ))
        .await;
    let request = farm_proto::v1::SubmitRequest {
        stackerfiles: spec.stackerfiles.clone(),
        context: spec
            .context
            .iter()
            .map(|c| farm_proto::v1::ContextFile {
                path: c.path.clone(),
                digest: c.digest.clone(),
                mode: c.mode,
                symlink_target: String::new(),
            })
            .collect(),
        allow_outside_context: true,
        ..Default::default()
    };
    let id = FarmService::new(s.farm.clone())
        .submit(tonic::Request::new(request))
        .await
        .unwrap()
        .into_inner()
        .id;
    let (state, error) = wait(&s.farm, &id).await;
    assert_eq!(state, BuildState::Failed);
    let error = error.unwrap_or_default();
    assert!(
        error.contains("outside the uploaded build context"),
        "{error}"
    );
    s.assert_secret_stayed_home();
}

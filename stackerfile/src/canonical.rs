//! The canonical definition of a layer: everything in the stackerfile that affects the
//! layer's result, in one fixed form that does not depend on YAML formatting, key order,
//! comments or the list-or-string spelling of a key. Its digest is the stackerfile part of
//! the cache key (the base's key and the inputs' content digests join it at build time).
//!
//! Left out on purpose: `build_only` (it decides tagging, not content), `run_timeout`
//! (a run that finishes gives the same result however long it was allowed), `bom` (ignored),
//! the file's location (moving a checkout must not invalidate the cache). Local paths
//! appear as written, relative to their stackerfile; their content enters the cache key
//! through content digests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Base, DEFAULT_PASSTHROUGH, Layer, Network, Source};

/// Bumped whenever the canonical form changes meaning, so old cache keys stop matching.
pub const CANONICAL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalLayer {
    pub version: u32,
    pub name: String,
    pub from: CanonicalBase,
    pub imports: Vec<CanonicalImport>,
    /// Where imports without `dest` are visible during `run`.
    pub imports_dir: String,
    pub run: Option<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub full_command: Option<Vec<String>>,
    pub environment: BTreeMap<String, String>,
    pub build_env: BTreeMap<String, String>,
    pub build_env_passthrough: Vec<String>,
    /// Sorted and de-duplicated: the image config holds volumes as a set.
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub generate_labels: Option<String>,
    pub working_dir: Option<String>,
    pub runtime_user: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub binds: Vec<(String, String)>,
    pub overlay_dirs: Vec<(String, String)>,
    pub os: Option<String>,
    pub arch: Option<String>,
    /// farm's `network` key when given (absent keeps the keys of layers without it
    /// unchanged). The worker's `--network` default is not part of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// farm's `nested_userns: true` (absent when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nested_userns: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum CanonicalBase {
    Docker { url: String, insecure: bool },
    Oci { url: String },
    Tar { url: String },
    Built { tag: String },
    Scratch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalImport {
    pub source: String,
    pub hash: Option<String>,
    pub dest: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl CanonicalLayer {
    pub fn of(layer: &Layer) -> Self {
        let from = match &layer.from {
            Base::Docker { url, insecure } => CanonicalBase::Docker {
                url: url.clone(),
                insecure: *insecure,
            },
            Base::Oci { url } => CanonicalBase::Oci { url: url.clone() },
            Base::Tar { source } => CanonicalBase::Tar {
                url: source.written(),
            },
            Base::Built { tag } => CanonicalBase::Built { tag: tag.clone() },
            Base::Scratch => CanonicalBase::Scratch,
        };
        let mut volumes = layer.volumes.clone();
        volumes.sort();
        volumes.dedup();
        CanonicalLayer {
            version: CANONICAL_VERSION,
            name: layer.name.clone(),
            from,
            imports: layer
                .imports
                .iter()
                .map(|i| CanonicalImport {
                    source: match &i.source {
                        Source::Local { written, .. } => written.clone(),
                        other => other.written(),
                    },
                    hash: i.hash.clone(),
                    dest: i.dest.clone(),
                    mode: i.mode,
                    uid: i.uid,
                    gid: i.gid,
                })
                .collect(),
            imports_dir: if layer.legacy_import {
                "/stacker".into()
            } else {
                "/stacker/imports".into()
            },
            run: layer.run.clone(),
            cmd: layer.cmd.clone(),
            entrypoint: layer.entrypoint.clone(),
            full_command: layer.full_command.clone(),
            environment: layer.environment.clone(),
            build_env: layer.build_env.clone(),
            build_env_passthrough: layer
                .build_env_passthrough
                .clone()
                .unwrap_or_else(|| DEFAULT_PASSTHROUGH.iter().map(|s| s.to_string()).collect()),
            volumes,
            labels: layer.labels.clone(),
            generate_labels: layer.generate_labels.clone(),
            working_dir: layer.working_dir.clone(),
            runtime_user: layer.runtime_user.clone(),
            annotations: layer.annotations.clone(),
            binds: layer
                .binds
                .iter()
                .map(|b| (b.written.clone(), b.dest.clone()))
                .collect(),
            overlay_dirs: layer
                .overlay_dirs
                .iter()
                .map(|o| (o.written.clone(), o.dest.clone()))
                .collect(),
            os: layer.os.clone(),
            arch: layer.arch.clone(),
            network: layer.sandbox.network,
            nested_userns: layer.sandbox.nested_userns,
        }
    }

    /// The canonical bytes: compact JSON, struct fields in declaration order, maps sorted.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings and maps always serialises")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `sha256:<hex>` of the canonical bytes.
    pub fn digest(&self) -> String {
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(self.to_json().as_bytes()))
        )
    }
}

//! What the last `farm build` of each layer produced, kept in the state dir: `farm grab`,
//! `farm chroot` and `farm inspect` read it to find a layer's image without building.

use std::collections::BTreeMap;
use std::path::Path;

use farm_model::BuiltImage;

/// The file in the state dir that remembers what the last build of each layer
/// produced.
const RESULTS_FILE: &str = "layers.json";

/// Remember the results of a build, by layer name (merged with earlier builds).
pub(crate) fn record_results(
    state_dir: &Path,
    results: &[(String, BuiltImage)],
) -> std::io::Result<()> {
    let path = state_dir.join(RESULTS_FILE);
    let mut all: BTreeMap<String, BuiltImage> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (name, r) in results {
        all.insert(name.clone(), r.clone());
    }
    let tmp = state_dir.join(format!(".{RESULTS_FILE}.{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// What the last build of layer `name` produced, if any.
pub(crate) fn recorded_result(state_dir: &Path, name: &str) -> Option<BuiltImage> {
    let all: BTreeMap<String, BuiltImage> =
        serde_json::from_slice(&std::fs::read(state_dir.join(RESULTS_FILE)).ok()?).ok()?;
    all.get(name).cloned()
}

/// Names of every recorded layer.
pub(crate) fn recorded_layers(state_dir: &Path) -> Vec<String> {
    std::fs::read(state_dir.join(RESULTS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, BuiltImage>>(&b).ok())
        .map(|m| m.into_keys().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use farm_model::LayerBlob;

    use super::*;

    fn result(n: u8) -> BuiltImage {
        BuiltImage {
            config_digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            config_size: 2,
            layers: vec![LayerBlob {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                size: 3,
                diff_id: format!("sha256:{}", "cd".repeat(32)),
                verity_root_hash: None,
            }],
            chain_id: farm_model::ChainId::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap(),
        }
    }

    #[test]
    fn results_are_remembered_and_merged() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(recorded_result(d.path(), "a"), None);
        record_results(
            d.path(),
            &[("a".into(), result(1)), ("b".into(), result(2))],
        )
        .unwrap();
        record_results(d.path(), &[("a".into(), result(3))]).unwrap();
        assert_eq!(recorded_result(d.path(), "a"), Some(result(3)));
        assert_eq!(recorded_result(d.path(), "b"), Some(result(2)));
        assert_eq!(recorded_layers(d.path()), vec!["a", "b"]);
    }
}

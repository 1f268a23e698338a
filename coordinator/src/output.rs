//! The output of a build: one manifest per tagged layer (with stacker's annotations),
//! written with its blobs into an OCI image layout. Manifests are assembled per build
//! because their annotations carry the build's stackerfile; the cached part (config and
//! layers) is shared.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use farm_image::oci::{
    Descriptor, DescriptorBuilder, ImageManifest, ImageManifestBuilder, MediaType,
};
use farm_image::{BlobStore, Digest, OciLayout, to_canonical_json};
use farm_stackerfile::Plan;

use farm_model::BuiltImage;

/// Annotation namespace stacker uses by default.
pub const DEFAULT_ANNOTATION_NAMESPACE: &str = "io.stackeroci";

fn descriptor(media_type: MediaType, digest: &str, size: u64) -> farm_image::Result<Descriptor> {
    let digest = Digest::parse(digest)?;
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest.to_oci())
        .size(size)
        .build()?)
}

/// The manifest of a built layer's image as it is stored: canonical JSON (identical
/// input, identical bytes and digest).
pub fn manifest_bytes(
    result: &BuiltImage,
    annotations: &BTreeMap<String, String>,
) -> farm_image::Result<Vec<u8>> {
    to_canonical_json(&manifest_for(result, annotations)?)
}

/// The manifest of a built layer's image.
pub fn manifest_for(
    result: &BuiltImage,
    annotations: &BTreeMap<String, String>,
) -> farm_image::Result<ImageManifest> {
    let config = descriptor(
        MediaType::ImageConfig,
        &result.config_digest,
        result.config_size,
    )?;
    let layers = result
        .layers
        .iter()
        .map(|l| {
            let mut d = descriptor(MediaType::from(l.media_type.as_str()), &l.digest, l.size)?;
            // A squashfs/erofs layer's verity root hash, where stacker puts it.
            if let Some(h) = &l.verity_root_hash {
                d.set_annotations(Some(
                    [(
                        farm_image::VERITY_ROOT_HASH_ANNOTATION.to_string(),
                        h.clone(),
                    )]
                    .into(),
                ));
            }
            Ok(d)
        })
        .collect::<farm_image::Result<Vec<_>>>()?;
    let mut m = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(layers);
    if !annotations.is_empty() {
        m = m.annotations(
            annotations
                .clone()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
    }
    Ok(m.build()?)
}

/// The manifest annotations of layer `i`: its own `annotations` plus stacker's
/// `<ns>.stacker.stacker_yaml` (the file after substitution), `<ns>.stacker.git_version`
/// (git describe of the file's directory, when it is in a repository) and
/// `<ns>.stacker.stacker_version`.
pub fn manifest_annotations(plan: &Plan, i: usize, namespace: &str) -> BTreeMap<String, String> {
    manifest_annotations_with(plan, i, namespace, &GitVersions::default())
}

/// `git describe` per directory, asked once per build (a process per layer made a
/// 2,000-layer build spend seconds here).
#[derive(Debug, Default)]
pub struct GitVersions(std::collections::HashMap<std::path::PathBuf, Option<String>>);

impl GitVersions {
    /// Ask git now for every directory of `plan`'s layers.
    pub fn warm(&mut self, plan: &Plan) {
        for planned in &plan.layers {
            let dir = &planned.layer.dir;
            if !self.0.contains_key(dir) {
                self.0.insert(dir.clone(), git_describe(dir));
            }
        }
    }
}

/// [`manifest_annotations`] with git's answers from `git` (asked for every directory
/// beforehand, [`GitVersions::warm`]; a directory it lacks is asked now).
pub fn manifest_annotations_with(
    plan: &Plan,
    i: usize,
    namespace: &str,
    git: &GitVersions,
) -> BTreeMap<String, String> {
    let planned = &plan.layers[i];
    let file = &plan.files[planned.file];
    let mut a = planned.layer.annotations.clone();
    a.insert(
        format!("{namespace}.stacker.stacker_yaml"),
        file.substituted.clone(),
    );
    a.insert(
        format!("{namespace}.stacker.stacker_version"),
        format!("farm {}", env!("CARGO_PKG_VERSION")),
    );
    let version = match git.0.get(&planned.layer.dir) {
        Some(known) => known.clone(),
        None => git_describe(&planned.layer.dir),
    };
    if let Some(g) = version {
        a.insert(format!("{namespace}.stacker.git_version"), g);
    }
    a
}

fn git_describe(dir: &Path) -> Option<String> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["describe", "--always", "--dirty"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// One image to tag in the output.
#[derive(Debug, Clone)]
pub struct OutputImage {
    pub tag: String,
    pub result: BuiltImage,
    pub annotations: BTreeMap<String, String>,
}

/// Store each image's manifest in `blobs`, copy its blobs into the OCI layout at `dir`
/// (created if missing) and point its tag at it. Returns (tag, manifest digest).
/// All blobs are in place before any tag moves, and index.json is replaced atomically.
pub async fn write_layout(
    blobs: &BlobStore,
    dir: &Path,
    images: &[OutputImage],
) -> farm_image::Result<Vec<(String, String)>> {
    let layout = if dir.join("index.json").exists() {
        OciLayout::open(dir).await?
    } else {
        OciLayout::create(dir).await?
    };
    let mut tagged = Vec::new();
    for image in images {
        let bytes = manifest_bytes(&image.result, &image.annotations)?;
        let size = bytes.len() as u64;
        let info = blobs.put(bytes.into()).await?;
        let digest = info.digest.to_string();
        for d in std::iter::once(&image.result.config_digest)
            .chain(image.result.layers.iter().map(|l| &l.digest))
            .chain(std::iter::once(&digest))
        {
            blobs.copy_to(&Digest::parse(d)?, layout.blobs()).await?;
        }
        tagged.push((
            image.tag.clone(),
            descriptor(MediaType::ImageManifest, &digest, size)?,
        ));
    }
    layout.set_tags(&tagged).await?;
    Ok(tagged
        .into_iter()
        .map(|(tag, desc)| (tag, desc.digest().to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_model::LayerBlob;

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
    fn manifests_are_canonical_and_carry_annotations() {
        let mut a = BTreeMap::new();
        a.insert("z".to_string(), "1".to_string());
        a.insert("a".to_string(), "2".to_string());
        let m = manifest_for(&result(1), &a).unwrap();
        let json = String::from_utf8(to_canonical_json(&m).unwrap()).unwrap();
        assert!(json.contains("\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\""));
        assert!(json.find("\"a\":\"2\"").unwrap() < json.find("\"z\":\"1\"").unwrap());
        assert_eq!(m.layers().len(), 1);
    }
}

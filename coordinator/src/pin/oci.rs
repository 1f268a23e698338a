//! `from: {type: oci}` bases: an image of a local OCI layout, copied into the blob store;
//! its manifest digest pins it.

use std::path::Path;

use farm_image::{BlobStore, Digest, OciLayout};
use farm_model::{BuiltImage, LayerBlob, Platform};

/// Copy the image `tag` of the layout at `layout_path` (resolved and checked against
/// the build's context by the caller) for `platform` into `blobs`. Returns it as a
/// built layer, and its manifest digest.
pub async fn import(
    blobs: &BlobStore,
    layout_path: &Path,
    tag: &str,
    platform: &Platform,
) -> Result<(BuiltImage, String), farm_image::Error> {
    let layout = OciLayout::open(layout_path).await?;
    let (manifest_desc, manifest) = layout
        .manifest(tag, Some((&platform.os, &platform.arch)))
        .await?;
    let config = layout.config(&manifest).await?;
    let mut layers = Vec::new();
    let diff_ids = config.rootfs().diff_ids();
    for (n, l) in manifest.layers().iter().enumerate() {
        let digest = Digest::parse(l.digest().as_ref())?;
        layout.blobs().copy_to(&digest, blobs).await?;
        layers.push(LayerBlob {
            media_type: l.media_type().to_string(),
            digest: digest.to_string(),
            size: l.size(),
            diff_id: diff_ids.get(n).cloned().unwrap_or_default(),
            verity_root_hash: l
                .annotations()
                .as_ref()
                .and_then(|a| a.get(farm_image::VERITY_ROOT_HASH_ANNOTATION).cloned()),
        });
    }
    let config_digest = Digest::parse(manifest.config().digest().as_ref())?;
    layout.blobs().copy_to(&config_digest, blobs).await?;
    let image = BuiltImage::new(config_digest.to_string(), manifest.config().size(), layers)
        .map_err(|e| farm_image::Error::Layout {
            path: layout_path.to_path_buf(),
            reason: format!("the image's config has a bad diff_id: {e}"),
        })?;
    Ok((image, manifest_desc.digest().to_string()))
}

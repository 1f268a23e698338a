//! A worker's result checked against the blob store before it is cached or handed to a
//! build: a worker is trusted to build, not to say what it built. Every blob it names
//! must be in the store with the size it states, the config must be an OCI image config
//! whose `rootfs.diff_ids` are the layers' diff_ids in order, and the chain id must
//! follow from them.

use farm_image::{BlobStore, Digest, oci::ImageConfiguration};
use farm_model::{BuiltImage, ChainId, InvalidChainId, LayerBlob, chain_id};

/// The largest image config read to check it (real ones are a few KiB).
pub(super) const MAX_CONFIG_SIZE: u64 = 4 << 20;

/// What did not check out in a worker's result.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unverified {
    #[error("names a blob {digest:?} that is not a digest: {source}")]
    BadDigest {
        digest: String,
        source: farm_image::Error,
    },
    #[error("names blob {0}, which is not in the blob store")]
    Missing(Digest),
    #[error("states {stated} bytes for blob {digest}, which has {actual}")]
    Size {
        digest: Digest,
        stated: u64,
        actual: u64,
    },
    #[error("checking the blob store: {0}")]
    Store(#[source] farm_image::Error),
    #[error("states a config of {0} bytes, more than the {MAX_CONFIG_SIZE} read to check it")]
    ConfigTooLarge(u64),
    #[error("config {digest} is not an OCI image config: {source}")]
    Config {
        digest: Digest,
        source: serde_json::Error,
    },
    #[error("config's rootfs.diff_ids {config:?} are not the layers' {layers:?}")]
    DiffIds {
        config: Vec<String>,
        layers: Vec<String>,
    },
    #[error("a layer's diff_id is not a digest: {0}")]
    DiffId(#[source] InvalidChainId),
    #[error("states chain id {stated}, its layers give {computed}")]
    ChainId { stated: ChainId, computed: ChainId },
}

/// Check `image` against the blob store (see the module's doc). `base` is the image the
/// coordinator gave the job to start from: its layers, where the result repeats them
/// first, are the coordinator's own record and are not looked up again (a deep chain
/// would otherwise look up every lower layer for every result above it). The other
/// blobs are looked up at the same time (a remote store answers each in a round trip).
pub(crate) async fn verify(
    blobs: &BlobStore,
    image: &BuiltImage,
    base: &[LayerBlob],
) -> Result<(), Unverified> {
    let inherited = image
        .layers
        .iter()
        .zip(base)
        .take_while(|(l, b)| l == b)
        .count();
    let (config, _) = futures::future::try_join(
        present(blobs, &image.config_digest, image.config_size),
        futures::future::try_join_all(
            image.layers[inherited..]
                .iter()
                .map(|l| present(blobs, &l.digest, l.size)),
        ),
    )
    .await?;
    if image.config_size > MAX_CONFIG_SIZE {
        return Err(Unverified::ConfigTooLarge(image.config_size));
    }
    let bytes = blobs.get_bytes(&config).await.map_err(Unverified::Store)?;
    let parsed: ImageConfiguration =
        serde_json::from_slice(&bytes).map_err(|source| Unverified::Config {
            digest: config.clone(),
            source,
        })?;
    let layers: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    if parsed.rootfs().diff_ids() != &layers {
        return Err(Unverified::DiffIds {
            config: parsed.rootfs().diff_ids().clone(),
            layers,
        });
    }
    let computed = chain_id(layers.iter().map(String::as_str)).map_err(Unverified::DiffId)?;
    if computed != image.chain_id {
        return Err(Unverified::ChainId {
            stated: image.chain_id.clone(),
            computed,
        });
    }
    Ok(())
}

/// Blob `digest` is in the store with `size` bytes.
async fn present(blobs: &BlobStore, digest: &str, size: u64) -> Result<Digest, Unverified> {
    let digest = Digest::parse(digest).map_err(|source| Unverified::BadDigest {
        digest: digest.to_string(),
        source,
    })?;
    match blobs.size(&digest).await.map_err(Unverified::Store)? {
        None => Err(Unverified::Missing(digest)),
        Some(actual) if actual != size => Err(Unverified::Size {
            digest,
            stated: size,
            actual,
        }),
        Some(_) => Ok(digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An honest image of `n` layers in `blobs`, its config naming `diff_ids` (the
    /// layers' own when `None`).
    async fn image(blobs: &BlobStore, n: usize, diff_ids: Option<Vec<String>>) -> BuiltImage {
        let mut layers = Vec::new();
        for i in 0..n {
            let blob = blobs
                .put(format!("layer {i}").into_bytes().into())
                .await
                .unwrap();
            layers.push(LayerBlob {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: blob.digest.to_string(),
                size: blob.size,
                diff_id: Digest::of(format!("tar {i}").as_bytes()).to_string(),
                verity_root_hash: None,
            });
        }
        let diff_ids =
            diff_ids.unwrap_or_else(|| layers.iter().map(|l| l.diff_id.clone()).collect());
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = blobs
            .put(serde_json::to_vec(&config).unwrap().into())
            .await
            .unwrap();
        BuiltImage::new(config.digest.to_string(), config.size, layers).unwrap()
    }

    #[tokio::test]
    async fn an_honest_image_checks_out() {
        let blobs = BlobStore::in_memory();
        for n in [0, 1, 3] {
            verify(&blobs, &image(&blobs, n, None).await, &[])
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_layer_not_in_the_store_is_refused() {
        let blobs = BlobStore::in_memory();
        let mut img = image(&blobs, 2, None).await;
        img.layers[1].digest = Digest::of(b"made up").to_string();
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::Missing(d)) if d.to_string() == img.layers[1].digest
        ));
    }

    #[tokio::test]
    async fn a_config_not_in_the_store_is_refused() {
        let blobs = BlobStore::in_memory();
        let mut img = image(&blobs, 1, None).await;
        img.config_digest = Digest::of(b"no config").to_string();
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::Missing(_))
        ));
    }

    #[tokio::test]
    async fn a_wrong_size_is_refused() {
        let blobs = BlobStore::in_memory();
        let mut img = image(&blobs, 1, None).await;
        img.layers[0].size += 1;
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::Size { stated, actual, .. }) if stated == actual + 1
        ));
        let mut img = image(&blobs, 1, None).await;
        img.config_size -= 1;
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::Size { .. })
        ));
    }

    #[tokio::test]
    async fn a_digest_that_is_not_one_is_refused() {
        let blobs = BlobStore::in_memory();
        let mut img = image(&blobs, 1, None).await;
        img.layers[0].digest = "../../etc/passwd".into();
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::BadDigest { .. })
        ));
    }

    #[tokio::test]
    async fn a_config_that_is_not_an_image_config_is_refused() {
        let blobs = BlobStore::in_memory();
        let mut img = image(&blobs, 1, None).await;
        let junk = blobs
            .put(b"{\"layer\":\"x\"}".to_vec().into())
            .await
            .unwrap();
        img.config_digest = junk.digest.to_string();
        img.config_size = junk.size;
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::Config { .. })
        ));
    }

    #[tokio::test]
    async fn diff_ids_other_than_the_layers_are_refused() {
        let blobs = BlobStore::in_memory();
        let honest = image(&blobs, 2, None).await;
        let ids: Vec<String> = honest.layers.iter().map(|l| l.diff_id.clone()).collect();
        for wrong in [
            vec![ids[1].clone(), ids[0].clone()],
            vec![ids[0].clone()],
            vec![ids[0].clone(), ids[1].clone(), ids[1].clone()],
        ] {
            // Same layers (same blobs), a config naming other diff_ids.
            let img = image(&blobs, 2, Some(wrong)).await;
            assert_eq!(img.layers, honest.layers);
            assert!(matches!(
                verify(&blobs, &img, &[]).await,
                Err(Unverified::DiffIds { .. })
            ));
        }
    }

    #[tokio::test]
    async fn a_chain_id_that_does_not_follow_is_refused() {
        let blobs = BlobStore::in_memory();
        let mut img = image(&blobs, 2, None).await;
        img.chain_id = ChainId::parse(&img.layers[0].diff_id).unwrap();
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::ChainId { .. })
        ));
    }

    #[tokio::test]
    async fn an_oversized_config_is_not_read() {
        let blobs = BlobStore::in_memory();
        let big = blobs
            .put(vec![b' '; MAX_CONFIG_SIZE as usize + 1].into())
            .await
            .unwrap();
        let mut img = image(&blobs, 1, None).await;
        img.config_digest = big.digest.to_string();
        img.config_size = big.size;
        assert!(matches!(
            verify(&blobs, &img, &[]).await,
            Err(Unverified::ConfigTooLarge(_))
        ));
    }

    #[tokio::test]
    async fn only_layers_beyond_the_job_s_base_are_taken_on_trust() {
        let d = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(d.path()).unwrap();
        let img = image(&blobs, 3, None).await;
        let base = img.layers[..2].to_vec();
        // The base's blobs are the coordinator's own record: not looked up again.
        for l in &base {
            let digest = Digest::parse(&l.digest).unwrap();
            std::fs::remove_file(d.path().join(blobs.blob_path(&digest).as_ref())).unwrap();
        }
        verify(&blobs, &img, &base).await.unwrap();
        // A layer the worker claims is the base's but is not: looked up, and missing.
        let mut swapped = base.clone();
        swapped[1].size += 1;
        assert!(matches!(
            verify(&blobs, &img, &swapped).await,
            Err(Unverified::Missing(_))
        ));
    }
}

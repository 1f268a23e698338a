//! `from: {type: docker}` bases: pulled through farm-registry into the blob store. Each
//! reference is resolved at most once per build (every layer on the same base shares
//! the pull), and the manifest digest it resolved to is what enters cache keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use farm_image::BlobStore;
use farm_registry::{ConnectOptions, Credentials, Platform};
use tokio::sync::OnceCell;

use crate::build::chain_id;
use crate::cache::{CachedBlob, CachedLayer};

type Pulled = Result<(CachedLayer, String), String>;
/// (url, insecure, platform) -> the one pull of it in this build.
type Resolved = HashMap<(String, bool, String), Arc<OnceCell<Pulled>>>;

/// Registry access for one build: credentials, and the bases resolved so far.
#[derive(Clone, Default)]
pub struct RegistryBases {
    pub credentials: Credentials,
    resolved: Arc<Mutex<Resolved>>,
}

impl std::fmt::Debug for RegistryBases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryBases")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl RegistryBases {
    pub fn new(credentials: Credentials) -> Self {
        RegistryBases {
            credentials,
            resolved: Default::default(),
        }
    }

    /// The image `url` for `platform`, in `blobs`, as a cached layer and its manifest
    /// digest. The first caller for a (url, insecure, platform) pulls; the others wait
    /// for it and share its result (or its error).
    pub async fn pull(
        &self,
        blobs: &BlobStore,
        url: &str,
        insecure: bool,
        platform: &str,
    ) -> Result<(CachedLayer, String), String> {
        let cell = {
            let mut map = self
                .resolved
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            map.entry((url.to_string(), insecure, platform.to_string()))
                .or_default()
                .clone()
        };
        cell.get_or_init(|| async {
            let opts = ConnectOptions {
                insecure,
                tls_hint: if insecure {
                    "the registry's TLS fails even without certificate checks".into()
                } else {
                    "for a registry with a self-signed certificate or plain http, add \
                     `insecure: true` to this layer's `from`"
                        .into()
                },
            };
            let image = farm_registry::pull(
                blobs,
                url,
                &Platform::parse(platform),
                &self.credentials,
                &opts,
            )
            .await
            .map_err(|e| e.to_string())?;
            let layers: Vec<CachedBlob> = image
                .layers
                .iter()
                .map(|l| CachedBlob {
                    media_type: l.media_type.clone(),
                    digest: l.digest.to_string(),
                    size: l.size,
                    diff_id: l.diff_id.clone(),
                })
                .collect();
            let chain_id = chain_id(layers.iter().map(|l| l.diff_id.as_str()));
            Ok((
                CachedLayer {
                    config_digest: image.config_digest.to_string(),
                    config_size: image.config_size,
                    layers,
                    chain_id,
                },
                image.manifest_digest.to_string(),
            ))
        })
        .await
        .clone()
    }
}

//! `from: {type: docker}` bases: pulled through farm-registry into the blob store. Each
//! tag is resolved to a digest at most once per build (every layer on the same base,
//! whatever its platform, sees the same image), each (digest, platform) is pulled once,
//! and the image manifest digest is what enters cache keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use farm_image::BlobStore;
use farm_registry::{ConnectOptions, Credentials, ImageRef};
use tokio::sync::OnceCell;

use farm_model::{BuiltImage, Platform};

type Pulled = Result<(BuiltImage, String), String>;
type Once<T> = Arc<OnceCell<T>>;

#[derive(Default)]
struct Resolved {
    /// (url, insecure) -> the reference pinned to a digest.
    tags: HashMap<(String, bool), Once<Result<ImageRef, String>>>,
    /// (pinned reference, insecure, platform) -> the pulled image.
    images: HashMap<(String, bool, String), Once<Pulled>>,
}

/// A pending [`RegistryBases::pull`].
pub type PullFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(BuiltImage, String), String>> + Send + 'a>,
>;

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

fn connect_options(insecure: bool) -> ConnectOptions {
    ConnectOptions {
        insecure,
        tls_hint: if insecure {
            "the registry's TLS fails even without certificate checks".into()
        } else {
            "for a registry with a self-signed certificate or plain http, add \
             `insecure: true` to this layer's `from`"
                .into()
        },
    }
}

impl RegistryBases {
    pub fn new(credentials: Credentials) -> Self {
        RegistryBases {
            credentials,
            resolved: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Resolved> {
        self.resolved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The image `url` for `platform`, in `blobs`, as a cached layer and its manifest
    /// digest. The first caller for a tag resolves it and the first caller for a
    /// (digest, platform) pulls; the others wait and share the result (or the error).
    ///
    /// Boxed as `Send` here: the caller's future runs on spawned tasks, and the
    /// compiler cannot prove the once-cells' async closures `Send` for every lifetime
    /// from the call site.
    pub fn pull<'a>(
        &'a self,
        blobs: &'a BlobStore,
        url: &'a str,
        insecure: bool,
        platform: &'a Platform,
    ) -> PullFuture<'a> {
        Box::pin(self.pull_inner(blobs, url, insecure, platform))
    }

    async fn pull_inner(
        &self,
        blobs: &BlobStore,
        url: &str,
        insecure: bool,
        platform: &Platform,
    ) -> Result<(BuiltImage, String), String> {
        let opts = connect_options(insecure);
        let tag_cell = self
            .lock()
            .tags
            .entry((url.to_string(), insecure))
            .or_default()
            .clone();
        let pinned = tag_cell
            .get_or_init(|| async {
                farm_registry::resolve(url, &self.credentials, &opts)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .clone()?;
        let cell = self
            .lock()
            .images
            .entry((pinned.to_string(), insecure, platform.to_string()))
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let image = farm_registry::pull_ref(blobs, &pinned, platform, &self.credentials, &opts)
                .await
                .map_err(|e| e.to_string())?;
            let built = BuiltImage::new(
                image.config_digest.to_string(),
                image.config_size,
                image.layers,
            )
            .map_err(|e| format!("the image's config has a bad diff_id: {e}"))?;
            Ok((built, image.manifest_digest.to_string()))
        })
        .await
        .clone()
    }
}

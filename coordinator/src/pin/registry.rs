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

use crate::destinations::Destinations;

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

/// Which registries a build may use the coordinator's credentials for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CredentialScope {
    /// Every registry (the embedded mode: they are the user's own credentials).
    #[default]
    Every,
    /// Only these registries (`host[:port]`, as [`registry_host`] writes them); other
    /// registries are pulled anonymously (`farm coordinator --registry-credentials-for`).
    Only(Vec<String>),
}

impl CredentialScope {
    /// Are the credentials used for `registry` (as [`ImageRef::registry`] names it)?
    pub fn covers(&self, registry: &str) -> bool {
        match self {
            CredentialScope::Every => true,
            CredentialScope::Only(list) => list.iter().any(|r| r == registry),
        }
    }
}

/// A registry as `--registry-credentials-for` takes it (`ghcr.io`, `docker.io`,
/// `localhost:5000`), in the form references name it: lower case, Docker Hub's aliases
/// as `docker.io`. `None` for something that is no registry host.
pub fn registry_host(written: &str) -> Option<String> {
    let host = written
        .trim()
        .trim_start_matches("docker://")
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_ascii_lowercase();
    if host.is_empty() || host.contains('/') {
        return None;
    }
    if matches!(
        host.as_str(),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        return Some(farm_registry::DOCKER_HUB.to_string());
    }
    // Parsed as a reference's registry, so both sides agree on the spelling.
    ImageRef::parse(&format!("{host}/x/y"))
        .ok()
        .map(|r| r.registry)
        .filter(|r| *r == host)
}

/// Registry access for one build: credentials, and the bases resolved so far.
#[derive(Clone, Default)]
pub struct RegistryBases {
    pub credentials: Credentials,
    /// The registries the credentials are used for; others are pulled anonymously.
    pub scope: CredentialScope,
    /// The registries' addresses that may be reached (a remote submission's: public
    /// ones and the operator's `--allow-fetch`).
    pub destinations: Destinations,
    resolved: Arc<Mutex<Resolved>>,
}

impl std::fmt::Debug for RegistryBases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryBases")
            .field("credentials", &self.credentials)
            .field("scope", &self.scope)
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
    /// Credentials used for every registry (the embedded mode).
    pub fn new(credentials: Credentials) -> Self {
        Self::scoped(credentials, CredentialScope::Every)
    }

    /// Credentials used only for the registries of `scope`.
    pub fn scoped(credentials: Credentials, scope: CredentialScope) -> Self {
        RegistryBases {
            credentials,
            scope,
            destinations: Destinations::Any,
            resolved: Default::default(),
        }
    }

    /// The same, reaching only `destinations`.
    pub fn reaching(self, destinations: Destinations) -> Self {
        RegistryBases {
            destinations,
            ..self
        }
    }

    /// Refuse a registry whose address is not allowed. Checked before the pull on the
    /// addresses its name resolves to now (every one must be allowed); the registry
    /// client resolves again when it connects, and follows token realms and redirects
    /// itself, so this is a first line, not the fetcher's connect-time guard.
    async fn check_destination(&self, url: &str) -> Result<(), String> {
        let Destinations::Public(allow) = &self.destinations else {
            return Ok(());
        };
        let Ok(image) = ImageRef::parse(url) else {
            return Ok(()); // the pull reports the bad reference
        };
        let registry = if image.registry == farm_registry::DOCKER_HUB {
            "registry-1.docker.io".to_string()
        } else {
            image.registry.clone()
        };
        let host = match registry.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
            _ => registry.clone(),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let addrs: Vec<std::net::IpAddr> = match host.parse() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), 443))
                .await
                .map_err(|e| format!("cannot resolve the registry {registry}: {e}"))?
                .map(|a| a.ip())
                .collect(),
        };
        for ip in addrs {
            allow.check(&host, ip).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The credentials for `url`'s registry: the coordinator's where its scope covers
    /// the registry, else none (an anonymous pull). Also says which registry was left
    /// anonymous, for messages.
    fn credentials_for(&self, url: &str) -> (Credentials, Option<String>) {
        let registry = ImageRef::parse(url).map(|r| r.registry).unwrap_or_default();
        if self.scope.covers(&registry) {
            (self.credentials.clone(), None)
        } else {
            (Credentials::default(), Some(registry))
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
        self.check_destination(url).await?;
        let opts = connect_options(insecure);
        let (credentials, anonymous) = self.credentials_for(url);
        let explain = |e: farm_registry::Error| match &anonymous {
            Some(registry) if credentials != self.credentials => format!(
                "{e} (pulled anonymously: the coordinator's registry credentials are not used \
                 for {registry}; its operator may allow it with `farm coordinator \
                 --registry-credentials-for {registry}`)"
            ),
            _ => e.to_string(),
        };
        let tag_cell = self
            .lock()
            .tags
            .entry((url.to_string(), insecure))
            .or_default()
            .clone();
        let pinned = tag_cell
            .get_or_init(|| async {
                farm_registry::resolve(url, &credentials, &opts)
                    .await
                    .map_err(explain)
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
            let image = farm_registry::pull_ref(blobs, &pinned, platform, &credentials, &opts)
                .await
                .map_err(explain)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_named_as_references_name_them() {
        assert_eq!(registry_host("GHCR.io").as_deref(), Some("ghcr.io"));
        assert_eq!(
            registry_host("index.docker.io").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            registry_host("https://localhost:5000/").as_deref(),
            Some("localhost:5000")
        );
        assert_eq!(registry_host("ghcr.io/org"), None);
        assert_eq!(registry_host("notahost"), None);
        let scope = CredentialScope::Only(vec!["ghcr.io".into()]);
        assert!(scope.covers("ghcr.io"));
        assert!(!scope.covers("docker.io"));
        assert!(CredentialScope::Every.covers("anything"));
    }

    #[test]
    fn credentials_serve_only_the_registries_of_the_scope() {
        let creds =
            Credentials::with_files(Some("u".into()), Some("p".into()), Vec::new()).unwrap();
        let bases =
            RegistryBases::scoped(creds.clone(), CredentialScope::Only(vec!["ghcr.io".into()]));
        assert_eq!(bases.credentials_for("docker://ghcr.io/org/app:1").0, creds);
        let (anon, named) = bases.credentials_for("docker://127.0.0.1:5000/app:1");
        assert_eq!(anon, Credentials::default());
        assert_eq!(named.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(
            bases.credentials_for("docker://alpine").0,
            Credentials::default()
        );
        let every = RegistryBases::new(creds.clone());
        assert_eq!(every.credentials_for("docker://alpine").0, creds);
    }

    #[tokio::test]
    async fn a_registry_on_a_private_address_is_refused_before_the_pull() {
        use crate::destinations::AllowList;
        let blobs = BlobStore::in_memory();
        let platform: Platform = "linux/amd64".parse().unwrap();
        let guarded =
            RegistryBases::default().reaching(Destinations::Public(Arc::new(AllowList::default())));
        for url in [
            "docker://127.0.0.1:1/app:1",
            "docker://localhost:1/app:1",
            "docker://169.254.169.254/latest:1",
        ] {
            let e = guarded
                .pull(&blobs, url, true, &platform)
                .await
                .unwrap_err();
            assert!(e.contains("--allow-fetch"), "{url}: {e}");
        }
        // Allowed: the pull is tried (and fails to connect: nothing listens on port 1).
        let allowed =
            RegistryBases::default().reaching(Destinations::Public(Arc::new(AllowList(vec![
                "127.0.0.1".parse().unwrap(),
            ]))));
        let e = allowed
            .pull(&blobs, "docker://127.0.0.1:1/app:1", true, &platform)
            .await
            .unwrap_err();
        assert!(!e.contains("--allow-fetch"), "{e}");
    }
}

//! A connection to one registry: the oci-client client with the protocol decided
//! (https, https without verification, or plain http), the credentials registered, and
//! the context that turns its errors into clear messages.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use crate::auth::{Credentials, ResolvedAuth};
use crate::error::{Ctx, Error, Result, is_tls_failure};
use crate::reference::ImageRef;

/// How to talk to a registry.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Allow plain http and TLS without certificate verification.
    pub insecure: bool,
    /// What to tell the user when TLS fails (e.g. "set `insecure: true` in `from`").
    pub tls_hint: String,
}

pub(crate) struct Session {
    pub client: Client,
    pub registry: String,
    pub scheme: &'static str,
    pub auth: ResolvedAuth,
    pub tls_hint: String,
}

fn config(protocol: ClientProtocol, insecure: bool) -> ClientConfig {
    ClientConfig {
        protocol,
        accept_invalid_certificates: insecure,
        use_monolithic_push: true,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(300)),
        max_concurrent_download: 4,
        max_concurrent_upload: 4,
        platform_resolver: None,
        ..ClientConfig::default()
    }
}

fn client(protocol: ClientProtocol, insecure: bool) -> Result<Client> {
    Client::try_from(config(protocol, insecure)).map_err(|e| Error::Registry {
        registry: String::new(),
        detail: format!("cannot set up the registry client: {e}"),
    })
}

impl Session {
    /// Connect to `image`'s registry. With `insecure`, https without verification is
    /// tried first and plain http when the TLS handshake fails (as containers tools do).
    pub(crate) async fn connect(
        image: &ImageRef,
        credentials: &Credentials,
        opts: &ConnectOptions,
    ) -> Result<Session> {
        let auth = credentials.resolve(image)?;
        let reference = image.to_oci();
        let mut scheme = "https";
        let protocol = if opts.insecure {
            // A throwaway client: the probe's anonymous auth must not stick.
            let probe = client(ClientProtocol::Https, true)?;
            match probe
                .auth(
                    &reference,
                    &RegistryAuth::Anonymous,
                    RegistryOperation::Pull,
                )
                .await
            {
                Err(e) if is_tls_failure(&e) => {
                    tracing::debug!(registry = %image.registry, error = %e, "TLS failed; using plain http");
                    scheme = "http";
                    ClientProtocol::Http
                }
                Err(OciDistributionError::RequestError(e)) if e.is_connect() || e.is_timeout() => {
                    // Unreachable over https: plain http may still answer (a registry
                    // on port 80); try it, and report the http address if it fails.
                    scheme = "http";
                    ClientProtocol::Http
                }
                _ => ClientProtocol::Https,
            }
        } else {
            ClientProtocol::Https
        };
        let client = client(protocol, opts.insecure)?;
        client
            .store_auth_if_needed(reference.resolve_registry(), &auth.to_oci())
            .await;
        Ok(Session {
            client,
            registry: image.registry.clone(),
            scheme,
            auth,
            tls_hint: opts.tls_hint.clone(),
        })
    }

    pub(crate) fn ctx(&self, image: &ImageRef) -> Ctx<'_> {
        Ctx {
            registry: &self.registry,
            address: format!("{}://{}", self.scheme, image.api_host()),
            image: image.to_string(),
            source: &self.auth.source,
            tls_hint: &self.tls_hint,
        }
    }

    pub(crate) fn error(&self, image: &ImageRef, e: OciDistributionError) -> Error {
        self.ctx(image).error(e)
    }
}

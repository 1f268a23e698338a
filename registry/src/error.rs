//! The error type of farm-registry, and the translation of oci-client's errors into
//! messages that say what went wrong and what to do.

use std::path::PathBuf;

use oci_client::errors::OciDistributionError;

use crate::auth::CredentialSource;

/// Everything that can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `docker://` reference or push URL could not be understood.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// The input.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The credential flags are inconsistent.
    #[error("{0}")]
    Credentials(String),
    /// An auth file could not be read or parsed.
    #[error("auth file {}: {reason}", path.display())]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The repository, tag or digest does not exist.
    #[error("{image}: {what} not found in the registry{}", detail_suffix(detail))]
    NotFound {
        /// The reference.
        image: String,
        /// "manifest unknown", "repository unknown", ...
        what: String,
        /// The registry's message.
        detail: String,
    },
    /// The registry refused the credentials (or wanted some).
    #[error(
        "authentication to registry {registry} failed using {source_desc}{}",
        detail_suffix(detail)
    )]
    Auth {
        /// `host[:port]`.
        registry: String,
        /// Which credentials were used (never the secret itself).
        source_desc: CredentialSource,
        /// What the registry said.
        detail: String,
    },
    /// The TLS handshake failed (self-signed certificate, or a plain-http registry).
    #[error("TLS to registry {registry} failed: {detail}\n  help: {hint}")]
    Tls {
        /// `host[:port]`.
        registry: String,
        /// The TLS error.
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// Nothing answers at the registry's address.
    #[error("registry {address} is unreachable: {detail}")]
    Unreachable {
        /// `scheme://host:port`.
        address: String,
        /// The connection error.
        detail: String,
    },
    /// The image uses something farm cannot use (a media type, a schema).
    #[error("{image}: {reason}")]
    Unsupported {
        /// The reference.
        image: String,
        /// What is unsupported.
        reason: String,
    },
    /// A multi-platform image has no manifest for the wanted platform.
    #[error("{image}: no manifest for platform {platform} (available: {available})")]
    PlatformNotFound {
        /// The reference.
        image: String,
        /// Wanted `os/arch`.
        platform: String,
        /// What the index offers.
        available: String,
    },
    /// The registry did something else wrong.
    #[error("registry {registry}: {detail}")]
    Registry {
        /// `host[:port]`.
        registry: String,
        /// What happened.
        detail: String,
    },
    /// The local blob store failed (or a download did not match its digest).
    #[error("{context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: farm_image::Error,
    },
}

fn detail_suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(" ({d})")
    }
}

/// Result with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the caller was doing, to phrase errors.
pub(crate) struct Ctx<'a> {
    pub registry: &'a str,
    pub address: String,
    pub image: String,
    pub source: &'a CredentialSource,
    pub tls_hint: &'a str,
}

fn looks_tls(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "invalidcontenttype",
        "corrupt message",
        "unknownissuer",
        "ssl",
    ]
    .iter()
    .any(|k| t.contains(k))
}

/// Is this a failure to connect at all (refused, DNS, timeout), as opposed to TLS?
pub(crate) fn is_tls_failure(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => looks_tls(&farm_model::error_chain(r)),
        _ => false,
    }
}

fn registry_codes(e: &OciDistributionError) -> Vec<String> {
    match e {
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .map(|x| format!("{:?}", x.code))
            .collect(),
        _ => Vec::new(),
    }
}

impl Ctx<'_> {
    /// Translate an oci-client error.
    pub(crate) fn error(&self, e: OciDistributionError) -> Error {
        use OciDistributionError as E;
        let codes = registry_codes(&e);
        let auth = |detail: String| Error::Auth {
            registry: self.registry.to_string(),
            source_desc: self.source.clone(),
            detail,
        };
        let not_found = |what: &str, detail: String| Error::NotFound {
            image: self.image.clone(),
            what: what.to_string(),
            detail,
        };
        match e {
            E::RequestError(r) => {
                let text = farm_model::error_chain(&r);
                if let Some(status) = r.status() {
                    // An HTTP status turned into an error (e.g. by a HEAD).
                    return match status.as_u16() {
                        401 => auth("the registry answered 401 Unauthorized".into()),
                        403 => auth("the registry answered 403 Forbidden".into()),
                        404 => not_found("repository, tag or blob", String::new()),
                        _ => Error::Registry {
                            registry: self.registry.to_string(),
                            detail: text,
                        },
                    };
                }
                if looks_tls(&text) {
                    Error::Tls {
                        registry: self.registry.to_string(),
                        detail: text,
                        hint: self.tls_hint.to_string(),
                    }
                } else if r.is_connect() || r.is_timeout() || r.is_request() {
                    Error::Unreachable {
                        address: self.address.clone(),
                        detail: text,
                    }
                } else {
                    Error::Registry {
                        registry: self.registry.to_string(),
                        detail: text,
                    }
                }
            }
            E::UnauthorizedError { .. } => auth("the registry answered 401 Unauthorized".into()),
            E::AuthenticationFailure(m) => auth(m),
            E::RegistryError { envelope, .. } => {
                let msg = envelope
                    .errors
                    .iter()
                    .map(|x| {
                        if x.message.is_empty() {
                            format!("{:?}", x.code)
                        } else {
                            x.message.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let has = |c: &str| codes.iter().any(|x| x.eq_ignore_ascii_case(c));
                if has("Unauthorized") || has("Denied") {
                    auth(msg)
                } else if has("NameUnknown") {
                    not_found("repository", msg)
                } else if has("ManifestUnknown") {
                    not_found("tag or manifest", msg)
                } else if has("BlobUnknown") {
                    not_found("blob", msg)
                } else {
                    Error::Registry {
                        registry: self.registry.to_string(),
                        detail: msg,
                    }
                }
            }
            E::ServerError { code, message, url } => match code {
                401 => auth(format!("the registry answered 401 Unauthorized at {url}")),
                403 => auth(format!("the registry answered 403 Forbidden at {url}")),
                404 => not_found("repository, tag or blob", message.trim().to_string()),
                _ => Error::Registry {
                    registry: self.registry.to_string(),
                    detail: format!("HTTP {code} at {url}: {}", message.trim()),
                },
            },
            E::ImageManifestNotFoundError(m) => not_found("manifest", m),
            E::DigestError(d) => Error::Registry {
                registry: self.registry.to_string(),
                detail: format!("content does not match its digest: {d}"),
            },
            E::IoError(io) => {
                // A blob stream's error: our store, or the download breaking off.
                Error::Registry {
                    registry: self.registry.to_string(),
                    detail: farm_model::error_chain(&io),
                }
            }
            other => Error::Registry {
                registry: self.registry.to_string(),
                detail: farm_model::error_chain(&other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_registry_and_source_but_never_secrets() {
        let source = CredentialSource::AuthFile {
            path: "/home/u/auth.json".into(),
            key: "127.0.0.1:5000".into(),
        };
        let ctx = Ctx {
            registry: "127.0.0.1:5000",
            address: "http://127.0.0.1:5000".into(),
            image: "127.0.0.1:5000/busybox:latest".into(),
            source: &source,
            tls_hint: "set insecure: true",
        };
        let e = ctx.error(OciDistributionError::UnauthorizedError {
            url: "http://127.0.0.1:5000/v2/busybox/manifests/latest".into(),
        });
        let m = e.to_string();
        assert!(m.contains("127.0.0.1:5000"), "{m}");
        assert!(m.contains("/home/u/auth.json"), "{m}");
        let e = ctx.error(OciDistributionError::ServerError {
            code: 404,
            url: "u".into(),
            message: "x".into(),
        });
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        assert!(looks_tls("invalid peer certificate: UnknownIssuer"));
        assert!(looks_tls(
            "received corrupt message of type InvalidContentType"
        ));
        assert!(!looks_tls("Connection refused (os error 111)"));
    }
}

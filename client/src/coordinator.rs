//! A connection to a coordinator: its address, a connect that fails fast, the `Farm`
//! calls, and watching a build through coordinator restarts.

use std::time::{Duration, Instant};

use farm_proto::v1::blobs_client::BlobsClient;
use farm_proto::v1::build_event::Kind;
use farm_proto::v1::farm_client::FarmClient;
use farm_proto::v1::{
    BuildEvent, BuildStatus, CancelRequest, CancelResponse, ListRequest, LogLine, LogsRequest,
    StatusRequest, SubmitRequest, SubmitResponse, WatchRequest, WorkerInfo, WorkersRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status, Streaming};
use tracing::debug;

/// How long connecting may take before the coordinator counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a watcher keeps trying to get back to a coordinator that went away, unless
/// told otherwise.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Why a coordinator address was refused by [`parse_address`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// A scheme other than `http` and `https`.
    #[error("unknown scheme '{0}'; expected HOST:PORT, http://HOST:PORT or https://HOST:PORT")]
    UnknownScheme(String),
    /// Empty, or with a path or user info.
    #[error("expected HOST:PORT or http://HOST:PORT")]
    NotHostPort,
    /// No `:PORT`.
    #[error("no port; expected HOST:PORT (for example 127.0.0.1:7070)")]
    NoPort,
    /// An empty host, or an IPv6 one without brackets.
    #[error("expected HOST:PORT (an IPv6 host goes in brackets: [::1]:7070)")]
    BadHost,
    /// A port that is not a number in 1..=65535.
    #[error("'{0}' is not a port number")]
    BadPort(String),
}

/// `host:port`, `http://host:port` or `https://host:port` (a trailing `/` is fine) as
/// `http://host:port` (plaintext) or `https://host:port` (TLS).
pub fn parse_address(s: &str) -> Result<String, AddressError> {
    let s = s.trim();
    let (scheme, rest) = if let Some(rest) = s.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = s.strip_prefix("https://") {
        ("https", rest)
    } else if let Some((scheme, _)) = s.split_once("://") {
        return Err(AddressError::UnknownScheme(scheme.to_string()));
    } else {
        ("http", s)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(AddressError::NotHostPort);
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(AddressError::NoPort);
    };
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.is_empty() || (host.contains(':') && !bracketed) {
        return Err(AddressError::BadHost);
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(AddressError::BadPort(port.to_string())),
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Adds `authorization: Bearer TOKEN` to every call (nothing without a token), and the
/// caller's trace context (W3C `traceparent`) when tracing is on.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

/// A token that cannot be sent in a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the token has characters a header cannot carry (it should be one line of printable ASCII)"
)]
pub struct InvalidToken;

impl Bearer {
    /// No token.
    pub fn none() -> Bearer {
        Bearer(None)
    }

    /// `token` (surrounding whitespace removed).
    pub fn new(token: &str) -> Result<Bearer, InvalidToken> {
        let value = format!("Bearer {}", token.trim());
        let mut value: MetadataValue<Ascii> = value.parse().map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        farm_telemetry::inject_metadata(request.metadata_mut());
        Ok(request)
    }
}

/// What every client call goes over: a channel that adds the caller's token.
pub type Transport = InterceptedService<Channel, Bearer>;

/// `channel` with `bearer`'s token on every call.
pub fn transport(channel: Channel, bearer: Bearer) -> Transport {
    InterceptedService::new(channel, bearer)
}

/// How to reach a coordinator beyond its address: a token, the CA its certificate
/// must be signed by (else the system's roots), and a client certificate.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Sent as `authorization: Bearer` on every call.
    pub bearer: Bearer,
    /// PEM of the CA the coordinator's certificate must be signed by (https only).
    pub ca_cert_pem: Option<Vec<u8>>,
    /// PEM certificate and key to present (mutual TLS; https only).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl ConnectOptions {
    /// The TLS settings for an `https://` address (None for `http://`); TLS settings
    /// with an `http://` address are refused.
    pub fn tls_for(&self, addr: &str) -> Result<Option<ClientTlsConfig>, TlsWithoutHttps> {
        if !addr.starts_with("https://") {
            if self.ca_cert_pem.is_some() || self.identity_pem.is_some() {
                return Err(TlsWithoutHttps(addr.to_string()));
            }
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_cert_pem {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(Some(tls))
    }
}

/// A CA or client certificate was given for a plaintext address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a CA or client certificate is given, but the coordinator address {0} is not https://: \
     use https://HOST:PORT"
)]
pub struct TlsWithoutHttps(pub String);

/// Why [`Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TLS settings for a plaintext address.
    #[error(transparent)]
    TlsWithoutHttps(#[from] TlsWithoutHttps),
    /// The TLS settings were refused (an unreadable certificate...).
    #[error("TLS settings for {addr}: {reason}")]
    Tls {
        /// The address given.
        addr: String,
        /// What tonic said.
        reason: String,
    },
    /// The address is not a valid endpoint URI.
    #[error("coordinator address {addr}: {source}")]
    InvalidAddress {
        /// The address given.
        addr: String,
        /// What tonic said about it.
        #[source]
        source: tonic::transport::Error,
    },
    /// Nobody answered there in time.
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Unreachable {
        /// The address given.
        addr: String,
        /// The transport error and its sources, `: `-joined, or `timed out`.
        reason: String,
    },
}

/// Why [`Client::watch`] ended without the build's final event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The coordinator answered an error that watching again would not cure (the build
    /// is unknown, the request is invalid...).
    #[error("Watch of build {id}: {:?}: {}", status.code(), status.message())]
    Rpc {
        /// The build watched.
        id: String,
        /// The coordinator's answer.
        #[source]
        status: Status,
    },
    /// The coordinator stayed away longer than the watcher was willing to wait.
    #[error("gave up waiting for the coordinator at {addr} after {}s ({reason})", after.as_secs())]
    GaveUp {
        /// The coordinator's address.
        addr: String,
        /// How long the watcher tried.
        after: Duration,
        /// The last reason the stream broke.
        reason: String,
    },
}

/// What a watcher is told (see [`Client::watch`]).
#[derive(Debug, Clone, Copy)]
pub enum Watched<'a> {
    /// The build's next event (each once, in order).
    Event(&'a BuildEvent),
    /// The stream broke and reconnecting starts; told once per outage.
    Lost {
        /// Why the stream broke.
        reason: &'a str,
    },
}

/// A connection to a coordinator: its `Farm` and `Blobs` services on one channel.
#[derive(Debug, Clone)]
pub struct Client {
    /// `http://host:port` or `https://host:port`, for messages and reconnecting.
    pub addr: String,
    /// The `Farm` service (builds), with the protocol's message limits.
    pub farm: FarmClient<Transport>,
    /// The `Blobs` service, for [`crate::blobs`].
    pub blobs: BlobsClient<Transport>,
    /// How it connected (for reconnecting).
    options: ConnectOptions,
}

impl Client {
    /// Connect to `addr` (from [`parse_address`]) without a token or TLS settings; fails
    /// within a few seconds when nobody answers there.
    pub async fn connect(addr: &str) -> Result<Client, ConnectError> {
        Client::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connect to `addr` (from [`parse_address`]; `https://` for TLS) with `options`;
    /// fails within a few seconds when nobody answers there.
    pub async fn connect_with(
        addr: &str,
        options: &ConnectOptions,
    ) -> Result<Client, ConnectError> {
        let mut endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|source| ConnectError::InvalidAddress {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = options.tls_for(addr)? {
            endpoint = endpoint.tls_config(tls).map_err(|e| ConnectError::Tls {
                addr: addr.to_string(),
                reason: farm_model::error_chain(&e),
            })?;
        }
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect())
                .await;
        let unreachable = |reason: String| ConnectError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let channel = match connected {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(unreachable(farm_model::error_chain(&e))),
            Err(_) => return Err(unreachable("timed out".to_string())),
        };
        let transport = transport(channel, options.bearer.clone());
        Ok(Client {
            addr: addr.to_string(),
            farm: FarmClient::new(transport.clone())
                .max_decoding_message_size(farm_proto::MAX_MESSAGE_SIZE),
            blobs: crate::blobs::client_on(transport),
            options: options.clone(),
        })
    }

    /// Submit a build; the coordinator's answer (its id and layers). `InvalidArgument`
    /// carries the rendered diagnostics of a stackerfile with errors.
    pub async fn submit(&mut self, request: SubmitRequest) -> Result<SubmitResponse, Status> {
        Ok(self.farm.submit(request).await?.into_inner())
    }

    /// The status of build `id`.
    pub async fn status(&mut self, id: &str) -> Result<BuildStatus, Status> {
        let request = StatusRequest { id: id.to_string() };
        Ok(self.farm.status(request).await?.into_inner())
    }

    /// The status of every build the coordinator keeps. With `layer_counts_only` each
    /// build has its layer counts by state instead of its layers (a coordinator that
    /// does not know that request sends the layers).
    pub async fn list(&mut self, layer_counts_only: bool) -> Result<Vec<BuildStatus>, Status> {
        let request = ListRequest { layer_counts_only };
        Ok(self.farm.list(request).await?.into_inner().builds)
    }

    /// Cancel build `id`; the coordinator's answer (the build's state).
    pub async fn cancel(&mut self, id: &str) -> Result<CancelResponse, Status> {
        let request = CancelRequest { id: id.to_string() };
        Ok(self.farm.cancel(request).await?.into_inner())
    }

    /// The workers the coordinator knows.
    pub async fn workers(&mut self) -> Result<Vec<WorkerInfo>, Status> {
        Ok(self
            .farm
            .workers(WorkersRequest {})
            .await?
            .into_inner()
            .workers)
    }

    /// The workers the coordinator knows, and whether it says it is insecure (serves a
    /// non-loopback address without TLS and tokens).
    pub async fn workers_report(&mut self) -> Result<(Vec<WorkerInfo>, bool), Status> {
        let r = self.farm.workers(WorkersRequest {}).await?.into_inner();
        Ok((r.workers, r.insecure))
    }

    /// The stored log lines of build `id` (of one layer when `layer` is not empty).
    pub async fn logs(&mut self, id: &str, layer: &str) -> Result<Streaming<LogLine>, Status> {
        let request = LogsRequest {
            id: id.to_string(),
            layer: layer.to_string(),
            follow: false,
        };
        Ok(self.farm.logs(request).await?.into_inner())
    }

    /// Watch build `id` from its first event to its last, telling `on_update` each event
    /// (once each, in order), and return the final event (its `build` holds the final
    /// state). When the stream breaks, `on_update` hears why, and the client connects
    /// again with backoff and goes on after the last event seen; it gives up after
    /// `give_up_after` without the coordinator.
    pub async fn watch(
        &mut self,
        id: &str,
        give_up_after: Duration,
        mut on_update: impl FnMut(Watched<'_>),
    ) -> Result<BuildEvent, WatchError> {
        let mut last_seq = 0u64;
        let mut lost_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let request = WatchRequest {
                id: id.to_string(),
                after_seq: last_seq,
            };
            let not_retryable = |status: Status| WatchError::Rpc {
                id: id.to_string(),
                status,
            };
            let why = match self.farm.watch(request).await {
                Err(status) if !retryable(status.code()) => return Err(not_retryable(status)),
                Err(status) => status.message().to_string(),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(ev)) => {
                                lost_since = None;
                                backoff = Duration::from_millis(200);
                                if ev.seq != 0 && ev.seq <= last_seq {
                                    continue;
                                }
                                last_seq = last_seq.max(ev.seq);
                                on_update(Watched::Event(&ev));
                                if final_state(&ev).is_some() {
                                    return Ok(ev);
                                }
                            }
                            Ok(None) => {
                                break "the coordinator ended the stream early".to_string();
                            }
                            Err(status) if !retryable(status.code()) => {
                                return Err(not_retryable(status));
                            }
                            Err(status) => break status.message().to_string(),
                        }
                    }
                }
            };
            let since = *lost_since.get_or_insert_with(|| {
                on_update(Watched::Lost { reason: &why });
                Instant::now()
            });
            if since.elapsed() >= give_up_after {
                return Err(WatchError::GaveUp {
                    addr: self.addr.clone(),
                    after: give_up_after,
                    reason: why,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match Client::connect_with(&self.addr, &self.options).await {
                Ok(fresh) => *self = fresh,
                Err(e) => debug!(error = %e, "reconnecting"),
            }
        }
    }
}

/// The final state of a build (a `farm_proto::v1::BuildState`), when `ev` is the event
/// that ends it.
pub fn final_state(ev: &BuildEvent) -> Option<i32> {
    match ev.kind {
        Some(Kind::Build(state)) => Some(state),
        _ => None,
    }
}

/// Errors after which watching again may work (the coordinator restarting, a broken
/// connection).
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("127.0.0.1:7070"),
            Ok("http://127.0.0.1:7070".into())
        );
        assert_eq!(
            parse_address("http://farm.example:80/"),
            Ok("http://farm.example:80".into())
        );
        assert_eq!(parse_address(" [::1]:9 "), Ok("http://[::1]:9".into()));
        assert_eq!(parse_address("http://[::1]:9"), Ok("http://[::1]:9".into()));
        for bad in [
            "",
            "localhost",
            "http://localhost",
            "host:port",
            "host:0",
            "host:70000",
            "::1:9",
            "grpc://h:1",
            "h:1/path",
            ":7070",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_address("https://h:1/"), Ok("https://h:1".into()));
        assert!(
            parse_address("grpc://h:1")
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
        assert!(
            parse_address("localhost")
                .unwrap_err()
                .to_string()
                .contains("port")
        );
    }

    #[test]
    fn the_build_event_is_the_final_one() {
        let ev = |kind: Kind| BuildEvent {
            seq: 1,
            kind: Some(kind),
            ..BuildEvent::default()
        };
        let done = ev(Kind::Build(farm_proto::v1::BuildState::Succeeded as i32));
        assert_eq!(
            final_state(&done),
            Some(farm_proto::v1::BuildState::Succeeded as i32)
        );
        assert_eq!(final_state(&ev(Kind::Log("x".into()))), None);
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_fails_fast() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let e = Client::connect(&addr).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(&e, ConnectError::Unreachable { addr: a, .. } if *a == addr),
            "{e}"
        );
    }
}

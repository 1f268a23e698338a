//! The coordinator's gRPC server: the client API (`Farm`), the workers' stream
//! (`Workers`), the blob API (`Blobs`), plus the standard gRPC health service (always
//! open) and reflection (only without token files), on one listener or two (clients and
//! workers apart); and the Prometheus metrics over HTTP on another.
//!
//! Each service sits behind an [`auth::Gate`] that checks the caller's token against
//! the role the service is for (see [`crate::auth`]); TLS, optionally with client
//! certificates, is rustls through tonic.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::auth::{self, Auth, Gate};
use crate::farm::Farm;
use crate::grpc::blobs::BlobService;
use crate::grpc::farm::FarmService;
use crate::grpc::workers::WorkerService;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The server's certificate and key (PEM), and the CA (PEM) client certificates must
/// be signed by, if clients must present one (mutual TLS).
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl Tls {
    fn config(&self, client_ca: Option<&[u8]>) -> ServerTlsConfig {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// How to serve: who may call (token files), TLS, and an optional listener of its own
/// for workers.
#[derive(Debug, Default)]
pub struct ServeOptions {
    pub auth: Arc<Auth>,
    /// TLS on every listener (None: plaintext).
    pub tls: Option<Tls>,
    /// Serve `Workers` (and `Blobs`) here instead of on the clients' listener, which
    /// then serves `Farm` and `Blobs` only.
    pub worker_listener: Option<TcpListener>,
    /// Client certificates required on the workers' listener, signed by this CA (PEM)
    /// (`Tls::client_ca_pem` applies to both listeners).
    pub worker_client_ca_pem: Option<Vec<u8>>,
    /// A non-loopback address is served without TLS and tokens (`--insecure`): said
    /// in `Workers` answers.
    pub insecure: bool,
}

/// Serve on `listener` until `shutdown` completes, with no authentication and no TLS
/// (tests, and a coordinator on loopback).
pub async fn serve(
    listener: TcpListener,
    farm: Farm,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    serve_with(listener, farm, ServeOptions::default(), shutdown).await
}

/// Serve clients on `listener` (and workers too, unless `options` has a listener for
/// them) until `shutdown` completes.
pub async fn serve_with(
    listener: TcpListener,
    farm: Farm,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<farm_proto::blobs_server::BlobsServer<BlobService>>()
        .await;
    health
        .set_serving::<farm_proto::farm_server::FarmServer<FarmService>>()
        .await;
    health
        .set_serving::<farm_proto::workers_server::WorkersServer<WorkerService>>()
        .await;
    let gate = |service| Gate::new(options.auth.clone(), farm.clone(), service);
    let blobs = InterceptedService::new(
        BlobService::new(farm.blobs().clone())
            .with_max_upload(farm.limits().max_upload_size)
            .into_server(),
        gate(auth::Service::Blobs),
    );
    let farm_api = InterceptedService::new(
        FarmService::new(farm.clone())
            .insecure(options.insecure)
            .farm_server(),
        gate(auth::Service::Farm),
    );
    // Both servers stop on the one shutdown; workers' streams end at once then (with
    // UNAVAILABLE: the worker dials again, finding the next coordinator), and whatever
    // else is still open (watchers, log followers) gets SHUTDOWN_GRACE.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = InterceptedService::new(
        WorkerService::new(farm.clone())
            .until(stopped.clone())
            .into_server(),
        gate(auth::Service::Workers),
    );
    let reflection = if options.auth.enabled() {
        None
    } else {
        Some(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(farm_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()?,
        )
    };
    if options.tls.is_some() {
        auth::install_crypto_provider();
    }
    let builder = |client_ca: Option<&[u8]>| -> Result<tonic::transport::Server, ServerError> {
        // HTTP/2 pings find connections that died without a word (a worker's host
        // gone), so a worker's session ends and its name is free again. (No Nagle
        // delay: see `accepted`; the builder's `tcp_nodelay` is ignored for a listener
        // of our own.)
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        Ok(match &options.tls {
            Some(tls) => server.tls_config(tls.config(client_ca))?,
            None => server,
        })
    };
    let client_ca = options
        .tls
        .as_ref()
        .and_then(|t| t.client_ca_pem.as_deref());
    let clients = builder(client_ca)?
        .add_service(health_service.clone())
        .add_optional_service(reflection)
        .add_service(blobs.clone())
        .add_service(farm_api);
    let stopping = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let clients_done = stopping(stopped.clone());
    let signal = async move {
        shutdown.await;
        let _ = stop.send(true);
        Ok::<(), ServerError>(())
    };
    // Graceful shutdown waits for every open call; a stream that does not end by
    // itself (a `farm submit` watching) is cut SHUTDOWN_GRACE after the signal, so a
    // stop (SIGTERM in a pod) takes bounded time. Clients reconnect.
    let mut hard_stop = stopped.clone();
    let bounded = async move {
        let _ = hard_stop.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::info!("calls still open {SHUTDOWN_GRACE:?} after the stop: closing them");
    };
    let serve = async move {
        match options.worker_listener {
            None => {
                let serving = async {
                    clients
                        .add_service(workers)
                        .serve_with_incoming_shutdown(accepted(listener), clients_done)
                        .await
                        .map_err(ServerError::from)
                };
                tokio::try_join!(serving, signal)?;
            }
            Some(worker_listener) => {
                let worker_ca = options.worker_client_ca_pem.as_deref().or(client_ca);
                let for_workers = builder(worker_ca)?
                    .add_service(health_service)
                    .add_service(blobs)
                    .add_service(workers);
                let for_workers = async {
                    for_workers
                        .serve_with_incoming_shutdown(accepted(worker_listener), stopping(stopped))
                        .await
                        .map_err(ServerError::from)
                };
                let for_clients = async {
                    clients
                        .serve_with_incoming_shutdown(accepted(listener), clients_done)
                        .await
                        .map_err(ServerError::from)
                };
                tokio::try_join!(for_clients, for_workers, signal)?;
            }
        }
        Ok::<(), ServerError>(())
    };
    tokio::select! {
        r = serve => r,
        () = bounded => Ok(()),
    }
}

/// The connections `listener` accepts, without Nagle's delay: a small message (an
/// assignment on a worker's stream, a result, a status answer) otherwise waits for the
/// peer's delayed ACK, about 40 ms on Linux, on every hop of a layer's way. (tonic's
/// `Server::tcp_nodelay` applies only to listeners it binds itself.)
fn accepted(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// How long calls still open at a shutdown may take to end before they are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serve `GET /metrics` (Prometheus text format) on `listener`.
pub async fn serve_metrics(listener: TcpListener, farm: Farm) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let farm = farm.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        farm.metrics().render(),
                    )
                }
            }),
        )
        // The probes of a pod: the process answers; it serves (the metrics listener
        // starts once the state store is open).
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(|| async { "ready\n" }));
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every accepted connection has Nagle's algorithm off (with it on, each small
    /// message waited for a delayed ACK: 44 ms per wave of a 20-layer-wide build).
    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        use tokio_stream::StreamExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = accepted(listener);
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = incoming.next().await.unwrap().unwrap();
        assert!(
            server_side.nodelay().unwrap(),
            "TCP_NODELAY on the accepted socket"
        );
        drop(client);
    }

    #[tokio::test]
    async fn health_reflection_and_blobs_on_one_listener() {
        let d = tempfile::tempdir().unwrap();
        let store = farm_image::BlobStore::local(&d.path().join("blobs")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let farm = crate::farm::Farm::start(crate::farm::FarmConfig::new(
            d.path().join("state"),
            store.clone(),
        ))
        .await
        .unwrap();
        let server = tokio::spawn(serve(listener, farm, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();

        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "farm.v1.Blobs".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let unknown = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "farm.v1.Nope".into(),
            })
            .await;
        assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

        // The blob API answers on the same listener.
        let mut blobs = farm_client::blobs::client(channel.clone());
        let file = d.path().join("input");
        std::fs::write(&file, b"served").unwrap();
        let digest = farm_client::blobs::upload_file(&mut blobs, &file)
            .await
            .unwrap();
        assert!(store.exists(&digest).await.unwrap());

        // A client's compression is parsed at the edge: an unknown one is refused by name
        // before anything is planned (it used to become gzip silently).
        let mut farm_api = farm_proto::farm_client::FarmClient::new(channel.clone());
        for bad in ["xz", "zstd:99", "gzip:"] {
            let e = farm_api
                .submit(farm_proto::v1::SubmitRequest {
                    stackerfiles: vec!["s.yaml".into()],
                    compression: bad.into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e}");
            assert!(e.message().contains(&format!("'{bad}'")), "{e}");
        }

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops on shutdown")
            .unwrap()
            .unwrap();
    }

    // ---- authentication and TLS ----

    use farm_client::{Bearer, ConnectOptions};
    use farm_proto::v1::{
        CancelRequest, FindMissingRequest, ListRequest, LogsRequest, ReadRequest, Register,
        StatusRequest, SubmitRequest, WatchRequest, WorkerMessage, WorkersRequest,
        coordinator_message, worker_message,
    };
    use std::path::{Path, PathBuf};
    use tonic::Code;

    /// Certificates made with the openssl CLI: a CA, a server certificate for
    /// 127.0.0.1 and localhost, and a client certificate signed by it; and another CA.
    struct Certs {
        ca: PathBuf,
        other_ca: PathBuf,
        server: (PathBuf, PathBuf),
        client: (PathBuf, PathBuf),
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl CLI runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn certs(dir: &Path) -> Certs {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=farm {ca}"),
            );
            args.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
            openssl(dir, &args);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            let mut args = vec!["req"];
            args.extend(ec);
            let (key, csr, crt, ext, subj) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.crt"),
                format!("{who}.ext"),
                format!("/CN={who}"),
            );
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(dir, &args);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Certs {
            ca: dir.join("ca.crt"),
            other_ca: dir.join("other-ca.crt"),
            server: (dir.join("server.crt"), dir.join("server.key")),
            client: (dir.join("client.crt"), dir.join("client.key")),
        }
    }

    struct Running {
        addr: std::net::SocketAddr,
        farm: Farm,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<Result<(), ServerError>>,
        _dir: tempfile::TempDir,
    }

    impl Running {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(Duration::from_secs(10), &mut self.server)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
        }
    }

    async fn start(options: ServeOptions) -> Running {
        let d = tempfile::tempdir().unwrap();
        let store = farm_image::BlobStore::local(&d.path().join("blobs")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let farm = Farm::start(crate::farm::FarmConfig::new(d.path().join("state"), store))
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(listener, farm.clone(), options, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            farm,
            stop: Some(stop),
            server,
            _dir: d,
        }
    }

    fn tls_options(c: &Certs, client_ca: bool) -> ServeOptions {
        ServeOptions {
            tls: Some(Tls {
                cert_pem: std::fs::read(&c.server.0).unwrap(),
                key_pem: std::fs::read(&c.server.1).unwrap(),
                client_ca_pem: client_ca.then(|| std::fs::read(&c.ca).unwrap()),
            }),
            ..ServeOptions::default()
        }
    }

    /// Connect over https and ask for the workers: the first call's result.
    async fn call_over_tls(
        addr: std::net::SocketAddr,
        options: ConnectOptions,
    ) -> Result<(), String> {
        let mut c = farm_client::Client::connect_with(
            &format!("https://127.0.0.1:{}", addr.port()),
            &options,
        )
        .await
        .map_err(|e| e.to_string())?;
        c.workers()
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    #[tokio::test]
    async fn tls_with_the_right_ca_works_and_with_a_wrong_one_fails() {
        let d = tempfile::tempdir().unwrap();
        let c = certs(d.path());
        let running = start(tls_options(&c, false)).await;
        let with = |ca: &PathBuf| ConnectOptions {
            ca_cert_pem: Some(std::fs::read(ca).unwrap()),
            ..ConnectOptions::default()
        };
        call_over_tls(running.addr, with(&c.ca)).await.unwrap();
        let e = call_over_tls(running.addr, with(&c.other_ca))
            .await
            .unwrap_err();
        assert!(
            e.contains("certificate") || e.contains("Certificate"),
            "{e}"
        );
        // Plaintext to a TLS listener does not get through either.
        let mut plain = farm_client::Client::connect(&format!("http://{}", running.addr))
            .await
            .unwrap();
        assert!(plain.workers().await.is_err());
        running.stop().await;
    }

    #[tokio::test]
    async fn mutual_tls_refuses_a_client_without_a_certificate() {
        let d = tempfile::tempdir().unwrap();
        let c = certs(d.path());
        let running = start(tls_options(&c, true)).await;
        let ca = Some(std::fs::read(&c.ca).unwrap());
        let without = ConnectOptions {
            ca_cert_pem: ca.clone(),
            ..ConnectOptions::default()
        };
        assert!(call_over_tls(running.addr, without).await.is_err());
        let with = ConnectOptions {
            ca_cert_pem: ca,
            identity_pem: Some((
                std::fs::read(&c.client.0).unwrap(),
                std::fs::read(&c.client.1).unwrap(),
            )),
            ..ConnectOptions::default()
        };
        call_over_tls(running.addr, with).await.unwrap();
        running.stop().await;
    }

    /// `Workers.Connect` over https to `addr` with `identity` (cert, key): the first
    /// answer or why not.
    async fn connect_worker_tls(
        addr: std::net::SocketAddr,
        ca: &Path,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> Result<coordinator_message::Kind, String> {
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(ca).unwrap()),
        );
        if let Some((cert, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ));
        }
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
        let mut w = farm_proto::workers_client::WorkersClient::new(channel);
        let register = WorkerMessage {
            kind: Some(worker_message::Kind::Register(Register {
                name: "w".into(),
                slots: 1,
                platform: farm_model::Platform::host().to_string(),
                protocol_major: farm_model::PROTOCOL.major,
                protocol_minor: farm_model::PROTOCOL.minor,
                ..Default::default()
            })),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(register).unwrap();
        let mut inbound = w
            .connect(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        first.and_then(|m| m.kind).ok_or_else(|| "no answer".into())
    }

    #[tokio::test]
    async fn workers_on_a_listener_of_their_own_with_certificates_required() {
        let d = tempfile::tempdir().unwrap();
        let c = certs(d.path());
        let worker_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let workers_at = worker_listener.local_addr().unwrap();
        let running = start(ServeOptions {
            worker_listener: Some(worker_listener),
            worker_client_ca_pem: Some(std::fs::read(&c.ca).unwrap()),
            ..tls_options(&c, false)
        })
        .await;
        // Clients need no certificate on theirs; workers do on theirs.
        let ca = ConnectOptions {
            ca_cert_pem: Some(std::fs::read(&c.ca).unwrap()),
            ..ConnectOptions::default()
        };
        call_over_tls(running.addr, ca.clone()).await.unwrap();
        assert!(connect_worker_tls(workers_at, &c.ca, None).await.is_err());
        assert!(matches!(
            connect_worker_tls(workers_at, &c.ca, Some(&c.client)).await,
            Ok(coordinator_message::Kind::Registered(_))
        ));
        // Each listener serves its role only.
        let e = call_over_tls(
            workers_at,
            ConnectOptions {
                identity_pem: Some((
                    std::fs::read(&c.client.0).unwrap(),
                    std::fs::read(&c.client.1).unwrap(),
                )),
                ..ca
            },
        )
        .await
        .unwrap_err();
        assert!(e.starts_with("Unimplemented"), "{e}");
        let e = connect_worker_tls(running.addr, &c.ca, None)
            .await
            .unwrap_err();
        assert!(e.starts_with("Unimplemented"), "{e}");
        running.stop().await;
    }

    fn token_files(dir: &Path) -> (Arc<Auth>, PathBuf) {
        let clients = dir.join("clients.tokens");
        let workers = dir.join("workers.tokens");
        std::fs::write(
            &clients,
            auth::token_line("alice", "alice-token") + "\n" + &auth::token_line("bob", "bob-token"),
        )
        .unwrap();
        std::fs::write(&workers, auth::token_line("w1", "w1-token")).unwrap();
        let a = Auth {
            clients: Some(auth::TokenFile::open(&clients).unwrap()),
            workers: Some(auth::TokenFile::open(&workers).unwrap()),
        };
        (Arc::new(a), clients)
    }

    /// A plan with thousands of errors is refused with its first diagnostics and a note
    /// of how many more there were: the whole text in the status (half a MB) made the
    /// client's HTTP/2 stack hang up (`too_many_continuations`) and the caller saw a
    /// protocol error instead of the diagnostics.
    #[tokio::test]
    async fn a_plan_with_thousands_of_errors_is_refused_with_the_first_of_them() {
        let running = start(ServeOptions::default()).await;
        let mut farm_api = farm_proto::farm_client::FarmClient::new(channel(running.addr).await);
        let url = "https://example.com/broken/stacker.yaml".to_string();
        let text: String = (0..3000)
            .map(|i| format!("l{i}:\n  from: {{type: built, tag: missing{i}}}\n"))
            .collect();
        let e = farm_api
            .submit(farm_proto::v1::SubmitRequest {
                stackerfiles: vec![url.clone()],
                stackerfile_texts: [(url, text)].into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("missing0"), "{}", e.message());
        assert!(
            e.message().len() <= crate::grpc::STATUS_MESSAGE_MAX + 200,
            "{}",
            e.message().len()
        );
        assert!(
            e.message().contains("more bytes of it cut"),
            "{}",
            e.message()
        );
        running.stop().await;
    }

    /// Input echoed back in an error is bounded too, whatever refuses it: a substitution
    /// of a MB without '=' came back whole in the status and the client's HTTP/2 hung up.
    #[tokio::test]
    async fn an_oversized_bad_field_is_refused_with_a_bounded_message() {
        let running = start(ServeOptions::default()).await;
        let mut farm_api = farm_proto::farm_client::FarmClient::new(channel(running.addr).await);
        let e = farm_api
            .submit(farm_proto::v1::SubmitRequest {
                stackerfiles: vec!["s.yaml".into()],
                substitutions: vec!["X".repeat(1 << 20)],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(
            e.message().starts_with("--substitute 'XXX"),
            "{}",
            e.message()
        );
        assert!(
            e.message().len() <= crate::grpc::STATUS_MESSAGE_MAX + 200,
            "{}",
            e.message().len()
        );
        running.stop().await;
    }

    async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Every `Farm` and `Blobs` call with `token` (None: no header): each one's code.
    async fn every_client_call(
        addr: std::net::SocketAddr,
        token: Option<&str>,
    ) -> Vec<(&'static str, Code)> {
        let bearer = token.map(|t| Bearer::new(t).unwrap()).unwrap_or_default();
        let t = farm_client::transport(channel(addr).await, bearer);
        let mut f = farm_proto::farm_client::FarmClient::new(t.clone());
        let mut b = farm_client::blobs::client_on(t);
        let code = |r: Result<Code, tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
        let id = || "b-1".to_string();
        vec![
            (
                "Submit",
                code(f.submit(SubmitRequest::default()).await.map(|_| Code::Ok)),
            ),
            (
                "Watch",
                code(
                    f.watch(WatchRequest {
                        id: id(),
                        after_seq: 0,
                    })
                    .await
                    .map(|_| Code::Ok),
                ),
            ),
            (
                "Status",
                code(f.status(StatusRequest { id: id() }).await.map(|_| Code::Ok)),
            ),
            (
                "List",
                code(f.list(ListRequest::default()).await.map(|_| Code::Ok)),
            ),
            (
                "Logs",
                code(
                    f.logs(LogsRequest {
                        id: id(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| Code::Ok),
                ),
            ),
            (
                "Cancel",
                code(f.cancel(CancelRequest { id: id() }).await.map(|_| Code::Ok)),
            ),
            (
                "Workers",
                code(f.workers(WorkersRequest {}).await.map(|_| Code::Ok)),
            ),
            (
                "FindMissing",
                code(
                    b.find_missing(FindMissingRequest { digests: vec![] })
                        .await
                        .map(|_| Code::Ok),
                ),
            ),
            (
                "Read",
                code(
                    b.read(ReadRequest {
                        digest: format!("sha256:{}", "0".repeat(64)),
                    })
                    .await
                    .map(|_| Code::Ok),
                ),
            ),
        ]
    }

    /// An open worker stream (closed on drop).
    type Open = Option<(
        tokio::sync::mpsc::UnboundedSender<WorkerMessage>,
        tonic::Streaming<farm_proto::v1::CoordinatorMessage>,
    )>;

    /// `Workers.Connect` with `token`, registering as `name`: the call's code, or the
    /// coordinator's first answer; and the stream, kept open until dropped.
    async fn connect_worker_open(
        addr: std::net::SocketAddr,
        token: Option<&str>,
        name: &str,
    ) -> (Result<coordinator_message::Kind, Code>, Open) {
        let bearer = token.map(|t| Bearer::new(t).unwrap()).unwrap_or_default();
        let mut w = farm_proto::workers_client::WorkersClient::new(farm_client::transport(
            channel(addr).await,
            bearer,
        ));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(WorkerMessage {
            kind: Some(worker_message::Kind::Register(Register {
                name: name.into(),
                slots: 1,
                platform: farm_model::Platform::host().to_string(),
                protocol_major: farm_model::PROTOCOL.major,
                protocol_minor: farm_model::PROTOCOL.minor,
                ..Default::default()
            })),
        })
        .unwrap();
        let mut inbound = match w
            .connect(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return (Err(s.code()), None),
        };
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an answer within 10 s");
        let first = match first {
            Ok(Some(m)) => m.kind.ok_or(Code::Ok),
            Ok(None) => Err(Code::Ok),
            Err(s) => Err(s.code()),
        };
        (first, Some((tx, inbound)))
    }

    async fn connect_worker(
        addr: std::net::SocketAddr,
        token: Option<&str>,
        name: &str,
    ) -> Result<coordinator_message::Kind, Code> {
        connect_worker_open(addr, token, name).await.0
    }

    #[tokio::test]
    async fn a_worker_message_over_the_size_limit_ends_that_workers_stream_only() {
        let running = start(ServeOptions::default()).await;
        let (first, open) = connect_worker_open(running.addr, None, "big").await;
        assert!(matches!(
            first,
            Ok(coordinator_message::Kind::Registered(_))
        ));
        let (tx, mut inbound) = open.unwrap();
        // One line past the limit on what a worker may send in one message.
        let line = "x".repeat(crate::grpc::workers::MAX_WORKER_MESSAGE + 1024);
        tx.send(WorkerMessage {
            kind: Some(worker_message::Kind::Logs(farm_proto::v1::LogBatch {
                assignment: "a-1".into(),
                lines: vec![line],
            })),
        })
        .unwrap();
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), inbound.message())
                .await
                .expect("the stream ends within 10 s")
            {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(s) => break Some(s.code()),
            }
        };
        assert_ne!(end, Some(Code::Ok), "{end:?}");
        // Others still connect.
        let other = connect_worker(running.addr, None, "small").await;
        assert!(matches!(
            other,
            Ok(coordinator_message::Kind::Registered(_))
        ));
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_does_not_read_its_stream_is_disconnected() {
        let running = start(ServeOptions::default()).await;
        let (first, open) = connect_worker_open(running.addr, None, "deaf").await;
        assert!(matches!(
            first,
            Ok(coordinator_message::Kind::Registered(_))
        ));
        let (tx, mut inbound) = open.unwrap();
        // Results to acknowledge, sent without reading the acks: more than the stream's
        // buffers (a few MiB) and the coordinator's queue hold. Each ack echoes its
        // result's assignment id, 1 KiB here.
        let sent = 10_000;
        for i in 0..sent {
            tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Result(farm_proto::v1::Result {
                    assignment: format!("a-{i:01024}"),
                    ..Default::default()
                })),
            })
            .unwrap();
        }
        // Give the coordinator time to handle them, then read: the stream ends (without
        // the bound it would stay open, its acks piling up in the coordinator).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut acks = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(20), inbound.message())
            .await
            .expect("the stream ends")
        {
            acks += 1;
        }
        assert!(acks < sent, "{acks} acks");
        drop(tx);
        running.stop().await;
    }

    /// A reflection `ListServices`: Ok, or why not.
    async fn reflection(addr: std::net::SocketAddr) -> Code {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let mut c = ServerReflectionClient::new(channel(addr).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        match c
            .server_reflection_info(futures::stream::iter([request]))
            .await
        {
            Err(s) => s.code(),
            Ok(r) => match r.into_inner().message().await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            },
        }
    }

    #[tokio::test]
    async fn reflection_is_served_only_without_token_files() {
        let open = start(ServeOptions::default()).await;
        assert_eq!(reflection(open.addr).await, Code::Ok);
        open.stop().await;
        let d = tempfile::tempdir().unwrap();
        let (auth, _) = token_files(d.path());
        let guarded = start(ServeOptions {
            auth,
            ..ServeOptions::default()
        })
        .await;
        assert_eq!(reflection(guarded.addr).await, Code::Unimplemented);
        guarded.stop().await;
    }

    fn failures(farm: &Farm, reason: &str) -> u64 {
        let text = farm.metrics().render();
        let key = format!("farm_auth_failures_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn missing_wrong_and_swapped_tokens_are_refused_on_every_call() {
        let d = tempfile::tempdir().unwrap();
        let (auth, _) = token_files(d.path());
        let running = start(ServeOptions {
            auth,
            ..ServeOptions::default()
        })
        .await;
        let addr = running.addr;
        for (token, want) in [
            (None, Code::Unauthenticated),
            (Some("nope"), Code::Unauthenticated),
            (Some("w1-token"), Code::PermissionDenied),
        ] {
            for (call, code) in every_client_call(addr, token).await {
                // Blobs take a worker's token too.
                let want = if token == Some("w1-token") && matches!(call, "FindMissing" | "Read") {
                    code
                } else {
                    want
                };
                assert_eq!(code, want, "{call} with {token:?}");
            }
        }
        for (call, code) in every_client_call(addr, Some("alice-token")).await {
            assert!(
                !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "{call} with alice's token: {code:?}"
            );
        }
        assert_eq!(
            connect_worker(addr, None, "w1").await.unwrap_err(),
            Code::Unauthenticated
        );
        assert_eq!(
            connect_worker(addr, Some("nope"), "w1").await.unwrap_err(),
            Code::Unauthenticated
        );
        assert_eq!(
            connect_worker(addr, Some("alice-token"), "w1")
                .await
                .unwrap_err(),
            Code::PermissionDenied
        );
        let (first, open) = connect_worker_open(addr, Some("w1-token"), "w1").await;
        assert!(
            matches!(first, Ok(coordinator_message::Kind::Registered(_))),
            "{first:?}"
        );
        drop(open);
        assert!(
            failures(&running.farm, "missing") >= 10,
            "{}",
            running.farm.metrics().render()
        );
        assert!(failures(&running.farm, "wrong_role") >= 8);

        // Health stays open without a token.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        running.stop().await;
    }

    #[tokio::test]
    async fn a_rotated_token_file_takes_effect_without_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let (auth, clients) = token_files(d.path());
        let running = start(ServeOptions {
            auth,
            ..ServeOptions::default()
        })
        .await;
        let list = |token: &'static str| async move {
            let t =
                farm_client::transport(channel(running.addr).await, Bearer::new(token).unwrap());
            let mut f = farm_proto::farm_client::FarmClient::new(t);
            f.list(ListRequest::default())
                .await
                .err()
                .map_or(Code::Ok, |s| s.code())
        };
        assert_eq!(list("alice-token").await, Code::Ok);
        assert_eq!(list("alice-2").await, Code::Unauthenticated);
        let next = d.path().join("next");
        std::fs::write(&next, auth::token_line("alice", "alice-2")).unwrap();
        std::fs::rename(&next, &clients).unwrap();
        assert_eq!(list("alice-2").await, Code::Ok);
        assert_eq!(list("alice-token").await, Code::Unauthenticated);
        assert_eq!(list("bob-token").await, Code::Unauthenticated);
        running.stop().await;
    }

    #[tokio::test]
    async fn a_worker_cannot_register_under_another_workers_name() {
        let d = tempfile::tempdir().unwrap();
        let (auth, _) = token_files(d.path());
        let running = start(ServeOptions {
            auth,
            ..ServeOptions::default()
        })
        .await;
        // w1's token, another name: refused for good, and counted.
        match connect_worker(running.addr, Some("w1-token"), "w2").await {
            Ok(coordinator_message::Kind::Refused(r)) => {
                assert!(!r.retry && r.reason.contains("--name w1"), "{}", r.reason)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(failures(&running.farm, "worker_name"), 1);
        // Its own name: in; again while the first is open (a reconnect, proven by
        // the token): in.
        let mut open = Vec::new();
        for _ in 0..2 {
            let (first, keep) = connect_worker_open(running.addr, Some("w1-token"), "w1").await;
            assert!(
                matches!(first, Ok(coordinator_message::Kind::Registered(_))),
                "{first:?}"
            );
            open.push(keep);
        }
        let names: Vec<String> = running
            .farm
            .workers()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.name)
            .collect();
        assert_eq!(names, ["w1"]);
        drop(open);
        running.stop().await;
    }

    #[tokio::test]
    async fn without_tokens_a_live_workers_name_is_not_taken_over() {
        let running = start(ServeOptions::default()).await;
        let (first, live) = connect_worker_open(running.addr, None, "w").await;
        assert!(
            matches!(first, Ok(coordinator_message::Kind::Registered(_))),
            "{first:?}"
        );
        match connect_worker(running.addr, None, "w").await {
            Ok(coordinator_message::Kind::Refused(r)) => {
                assert!(
                    r.retry && r.reason.contains("another --name"),
                    "{}",
                    r.reason
                )
            }
            other => panic!("{other:?}"),
        }
        let workers = running.farm.workers().await.unwrap();
        assert_eq!(workers.len(), 1);
        assert!(workers[0].connected);
        drop(live);
        running.stop().await;
    }

    #[tokio::test]
    async fn clients_see_and_act_on_their_own_builds_only() {
        let d = tempfile::tempdir().unwrap();
        let (auth, _) = token_files(d.path());
        let running = start(ServeOptions {
            auth,
            ..ServeOptions::default()
        })
        .await;
        let id = running
            .farm
            .state()
            .create_build_owned("{}", &["base".into(), "app".into()], Some("alice"))
            .await
            .unwrap();
        let client = |token: &'static str| async move {
            let t =
                farm_client::transport(channel(running.addr).await, Bearer::new(token).unwrap());
            farm_proto::farm_client::FarmClient::new(t)
        };
        let mut alice = client("alice-token").await;
        let mut bob = client("bob-token").await;
        alice
            .status(StatusRequest { id: id.clone() })
            .await
            .unwrap();
        let listed = |r: farm_proto::v1::ListResponse| {
            r.builds.into_iter().map(|b| b.id).collect::<Vec<_>>()
        };
        assert_eq!(
            listed(
                alice
                    .list(ListRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
            ),
            vec![id.clone()]
        );
        assert!(listed(bob.list(ListRequest::default()).await.unwrap().into_inner()).is_empty());
        // The same scope when only the layer counts are asked for.
        let counts_only = ListRequest {
            layer_counts_only: true,
        };
        let mine = alice.list(counts_only).await.unwrap().into_inner().builds;
        assert_eq!(mine.len(), 1);
        assert!(mine[0].layers.is_empty(), "{:?}", mine[0].layers);
        assert_eq!(
            mine[0].layer_counts,
            [farm_proto::v1::LayerCount {
                state: farm_proto::v1::LayerState::LayerWaiting as i32,
                count: 2
            }]
        );
        assert!(listed(bob.list(counts_only).await.unwrap().into_inner()).is_empty());
        assert_eq!(
            bob.status(StatusRequest { id: id.clone() })
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        assert_eq!(
            bob.cancel(CancelRequest { id: id.clone() })
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        assert_eq!(
            bob.watch(WatchRequest {
                id: id.clone(),
                after_seq: 0
            })
            .await
            .unwrap_err()
            .code(),
            Code::NotFound
        );
        assert_eq!(
            bob.logs(LogsRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
            Code::NotFound
        );
        running.stop().await;
    }
}

//! The coordinator's gRPC server: the client API (`Farm`), the workers' stream
//! (`Workers`), the blob API (`Blobs`), plus the standard gRPC health and reflection
//! services, on one listener; and the Prometheus metrics over HTTP on another.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

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

/// Serve on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    farm: Farm,
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(farm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            BlobService::new(farm.blobs().clone())
                .with_max_upload(farm.limits().max_upload_size)
                .into_server(),
        )
        .add_service(FarmService::new(farm.clone()).farm_server())
        .add_service(WorkerService::new(farm.clone()).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Serve `GET /metrics` (Prometheus text format) on `listener`.
pub async fn serve_metrics(listener: TcpListener, farm: Farm) -> std::io::Result<()> {
    let app = axum::Router::new().route(
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
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}

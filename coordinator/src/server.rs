//! The coordinator's gRPC server: the services it offers today (the blob API), plus the
//! standard gRPC health and reflection services, on one listener.
//!
//! The client API (`Farm`) and the workers' stream (`Workers`) join here as they are
//! built; `farm.proto` already defines them.

use std::future::Future;

use farm_image::BlobStore;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::grpc::blobs::BlobService;

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
    blobs: BlobStore,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<farm_proto::blobs_server::BlobsServer<BlobService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(farm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(BlobService::new(blobs).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn health_reflection_and_blobs_on_one_listener() {
        let d = tempfile::tempdir().unwrap();
        let store = BlobStore::local(&d.path().join("blobs")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, store.clone(), async {
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
        let mut blobs = crate::grpc::blobs::client(channel.clone());
        let file = d.path().join("input");
        std::fs::write(&file, b"served").unwrap();
        let digest = crate::grpc::blobs::upload_file(&mut blobs, &file)
            .await
            .unwrap();
        assert!(store.exists(&digest).await.unwrap());

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

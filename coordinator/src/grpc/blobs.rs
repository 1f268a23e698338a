//! The `Blobs` service: content-addressed blobs over gRPC, the server side.
//!
//! [`BlobService`] fronts the coordinator's [`BlobStore`]. Uploads stream into
//! [`BlobStore::writer`] and are named only once their bytes hash to the announced
//! digest (and add up to the announced size); memory stays bounded by the writer's part
//! buffers whatever the blob's size. Reads stream from [`BlobStore::get`], which verifies
//! the digest as the bytes pass: corruption ends the stream with `DATA_LOSS`, never with
//! a clean end after wrong or truncated data.
//!
//! The client side (what the CLI uses) is `farm_client::blobs`; message limits and chunk
//! sizes on both sides are the protocol's (`farm_proto`).

use std::pin::Pin;

use farm_image::{BlobStore, Digest, rechunk};
use farm_proto::v1::blobs_server::{Blobs, BlobsServer};
use farm_proto::v1::{
    FindMissingRequest, FindMissingResponse, ReadChunk, ReadRequest, UploadChunk, UploadResponse,
};
use farm_proto::{BLOB_CHUNK_SIZE, MAX_BLOB_MESSAGE_SIZE};
use futures::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// The `Blobs` gRPC service over a blob store.
#[derive(Clone, Debug)]
pub struct BlobService {
    store: BlobStore,
    /// The largest blob one upload may store.
    max_upload: u64,
}

impl BlobService {
    /// Serve `store`, with uploads of at most
    /// [`crate::farm::Limits::DEFAULT_MAX_UPLOAD_SIZE`].
    pub fn new(store: BlobStore) -> Self {
        BlobService {
            store,
            max_upload: crate::farm::Limits::DEFAULT_MAX_UPLOAD_SIZE,
        }
    }

    /// Refuse uploads of blobs larger than `bytes` (`farm coordinator --max-upload-size`).
    pub fn with_max_upload(mut self, bytes: u64) -> Self {
        self.max_upload = bytes;
        self
    }

    /// The store served.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The service ready for `tonic::transport::Server::add_service`, with message limits
    /// of [`MAX_BLOB_MESSAGE_SIZE`]; it accepts gzip and zstd compressed requests but answers
    /// uncompressed (blobs are mostly compressed layers already).
    pub fn into_server(self) -> BlobsServer<Self> {
        BlobsServer::new(self)
            .max_decoding_message_size(MAX_BLOB_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_BLOB_MESSAGE_SIZE)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
    }
}

fn parse_digest(s: &str) -> Result<Digest, Status> {
    Digest::parse(s).map_err(|e| super::bounded(Status::invalid_argument(e.to_string())))
}

/// A store failure that is not the client's fault.
fn internal(context: impl std::fmt::Display, e: farm_image::Error) -> Status {
    warn!(error = %e, "blob store: {context}");
    Status::internal(format!("blob store: {context}: {e}"))
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Blobs for BlobService {
    async fn find_missing(
        &self,
        request: Request<FindMissingRequest>,
    ) -> Result<Response<FindMissingResponse>, Status> {
        let digests = request
            .get_ref()
            .digests
            .iter()
            .map(|s| parse_digest(s))
            .collect::<Result<Vec<_>, Status>>()?;
        let asked = digests.len();
        let missing: Vec<String> = self
            .store
            .missing(digests)
            .await
            .map_err(|e| internal(format_args!("checking {asked} blobs"), e))?
            .iter()
            .map(Digest::to_string)
            .collect();
        debug!(asked, missing = missing.len(), "find_missing");
        Ok(Response::new(FindMissingResponse { missing }))
    }

    async fn upload(
        &self,
        request: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty upload: the first message must name digest and size")
        })?;
        let digest = parse_digest(&first.digest)?;
        let size = first.size;
        if size > self.max_upload {
            return Err(Status::resource_exhausted(format!(
                "upload of {digest}: {size} bytes is over the coordinator's upload limit of \
                 {} bytes (raise it with `farm coordinator --max-upload-size SIZE`)",
                self.max_upload
            )));
        }
        let mut existing = self
            .store
            .size(&digest)
            .await
            .map_err(|e| internal(format_args!("checking {digest}"), e))?;
        if existing.is_some_and(|e| e != size) {
            // Either the announced size is wrong or the stored blob is torn (a write cut
            // short by a crash): reading it tells, and removes a torn one, which this
            // upload then replaces.
            let sound = self
                .store
                .verify(&digest)
                .await
                .map_err(|e| internal(format_args!("checking {digest}"), e))?;
            if !sound {
                warn!(%digest, "upload: the stored blob was corrupt and is replaced");
                existing = None;
            }
        }
        if let Some(existing) = existing {
            if existing != size {
                return Err(Status::invalid_argument(format!(
                    "upload of {digest}: size mismatch: expected {existing} (the stored blob), \
                     got {size} (announced)"
                )));
            }
            // Answer without reading the rest: dropping `chunks` makes the server end
            // the HTTP/2 stream after the response (RST_STREAM NO_ERROR), which tells
            // the client to stop sending; the client still gets this response.
            debug!(%digest, size, "upload: already present");
            return Ok(Response::new(UploadResponse {
                digest: digest.to_string(),
                size,
                already_present: true,
            }));
        }

        let mut writer = self.store.writer();
        let received: Result<(), Status> = async {
            let mut next = Some(first.data);
            loop {
                let data = match next.take() {
                    Some(data) => data,
                    None => match chunks.message().await? {
                        None => break,
                        Some(chunk) => {
                            if !chunk.digest.is_empty() && chunk.digest != first.digest {
                                return Err(Status::invalid_argument(format!(
                                    "upload of {digest}: a later message names another \
                                     digest {:?}",
                                    chunk.digest
                                )));
                            }
                            chunk.data
                        }
                    },
                };
                if writer.len() + data.len() as u64 > size {
                    return Err(Status::invalid_argument(format!(
                        "upload of {digest}: size mismatch: expected {size} bytes, got at \
                         least {}; nothing was stored",
                        writer.len() + data.len() as u64
                    )));
                }
                writer
                    .write(data)
                    .await
                    .map_err(|e| internal(format_args!("writing {digest}"), e))?;
            }
            if writer.len() != size {
                return Err(Status::invalid_argument(format!(
                    "upload of {digest}: size mismatch: expected {size} bytes, got {}; \
                     nothing was stored",
                    writer.len()
                )));
            }
            Ok(())
        }
        .await;
        if let Err(status) = received {
            debug!(%digest, %status, "upload refused");
            writer.abort().await;
            return Err(status);
        }
        match writer.finish_expecting(&digest).await {
            Ok(info) => {
                info!(%digest, size = info.size, "blob uploaded");
                Ok(Response::new(UploadResponse {
                    digest: info.digest.to_string(),
                    size: info.size,
                    already_present: false,
                }))
            }
            Err(farm_image::Error::DigestMismatch { expected, actual }) => {
                debug!(%expected, %actual, "upload refused: digest mismatch");
                Err(Status::invalid_argument(format!(
                    "upload of {expected}: digest mismatch: expected {expected}, got \
                     {actual}; nothing was stored"
                )))
            }
            Err(e) => Err(internal(format_args!("storing {digest}"), e)),
        }
    }

    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let digest = parse_digest(&request.get_ref().digest)?;
        let blob = match self.store.get(&digest).await {
            Ok(blob) => blob,
            Err(farm_image::Error::BlobNotFound(_)) => {
                return Err(Status::not_found(format!("blob {digest} not found")));
            }
            Err(e) => return Err(internal(format_args!("reading {digest}"), e)),
        };
        let chunks = rechunk(blob, BLOB_CHUNK_SIZE).map(move |item| match item {
            Ok(data) => Ok(ReadChunk { data }),
            Err(farm_image::Error::DigestMismatch { expected, actual }) => {
                warn!(%expected, %actual, "stored blob is corrupt");
                Err(Status::data_loss(format!(
                    "blob {expected} is corrupt in the coordinator's store (its content \
                     hashes to {actual}); discard what was read"
                )))
            }
            Err(e) => Err(internal(
                format_args!("reading {digest} (discard what was read)"),
                e,
            )),
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

#[cfg(test)]
mod tests {
    //! The server against raw RPCs, and against the client helpers of `farm_client`.

    use std::future::Future;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use bytes::Bytes;
    use farm_client::blobs::{
        BlobError, client, download, find_missing, upload_file, upload_missing,
    };
    use tonic::transport::Server;
    use tonic::transport::server::TcpIncoming;

    use super::*;

    /// Every test runs under this bound.
    async fn bounded<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(120), f)
            .await
            .expect("test took longer than 120 s")
    }

    struct Served {
        addr: SocketAddr,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            self.task.abort();
        }
    }

    async fn serve(store: BlobStore) -> Served {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(BlobService::new(store).into_server())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Served {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    async fn connect(s: &Served) -> farm_client::blobs::Api {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        client(channel)
    }

    fn data(n: usize, seed: u8) -> Bytes {
        let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
        Bytes::from(
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect::<Vec<_>>(),
        )
    }

    /// A raw Upload of `chunks`, announcing `digest` and `size`.
    async fn raw_upload(
        c: &mut farm_client::blobs::Api,
        digest: &Digest,
        size: u64,
        payload: Bytes,
    ) -> Result<UploadResponse, Status> {
        let mut messages = vec![UploadChunk {
            digest: digest.to_string(),
            size,
            data: Bytes::new(),
        }];
        let mut rest = payload;
        while !rest.is_empty() {
            let n = rest.len().min(BLOB_CHUNK_SIZE);
            messages.push(UploadChunk {
                data: rest.split_to(n),
                ..UploadChunk::default()
            });
        }
        c.upload(futures::stream::iter(messages))
            .await
            .map(Response::into_inner)
    }

    /// Read a blob with the raw RPC: the chunks received, then the final status.
    async fn raw_read(
        c: &mut farm_client::blobs::Api,
        digest: &str,
    ) -> (Vec<Bytes>, Option<Status>) {
        let mut got = Vec::new();
        let mut stream = match c
            .read(ReadRequest {
                digest: digest.into(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return (got, Some(status)),
        };
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => got.push(chunk.data),
                Ok(None) => return (got, None),
                Err(status) => return (got, Some(status)),
            }
        }
    }

    fn blob_files(dir: &Path) -> Vec<String> {
        match std::fs::read_dir(dir.join("blobs/sha256")) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    #[tokio::test]
    async fn find_missing_reports_absent_and_rejects_invalid() {
        bounded(async {
            let store = BlobStore::in_memory();
            let have = store.put(data(100, 1)).await.unwrap().digest;
            let lack = Digest::of(b"not there");
            let s = serve(store).await;
            let mut c = connect(&s).await;

            let answer = c
                .find_missing(FindMissingRequest {
                    digests: vec![have.to_string(), lack.to_string(), lack.to_string()],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(answer.missing, vec![lack.to_string()]);

            let err = c
                .find_missing(FindMissingRequest {
                    digests: vec![have.to_string(), "sha256:nope".into()],
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("sha256:nope"), "{}", err.message());

            // The helper: each digest once, in order.
            let got = find_missing(&mut c, &[lack.clone(), have.clone(), lack.clone()])
                .await
                .unwrap();
            assert_eq!(got, vec![lack]);
        })
        .await;
    }

    #[tokio::test]
    async fn upload_then_read_back_small_and_large() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let store = BlobStore::local(&dir.path().join("remote")).unwrap();
            let s = serve(store.clone()).await;
            let mut c = connect(&s).await;

            for (n, seed) in [(0usize, 1u8), (11, 2), (20_000_000, 3)] {
                let payload = data(n, seed);
                let digest = Digest::of(&payload);
                let answer = raw_upload(&mut c, &digest, n as u64, payload.clone())
                    .await
                    .unwrap();
                assert_eq!(answer.digest, digest.to_string());
                assert_eq!(answer.size, n as u64);
                assert!(!answer.already_present);
                assert_eq!(store.size(&digest).await.unwrap(), Some(n as u64));

                let (chunks, status) = raw_read(&mut c, &digest.to_string()).await;
                assert!(status.is_none(), "{status:?}");
                assert!(chunks.iter().all(|c| c.len() <= BLOB_CHUNK_SIZE));
                assert_eq!(chunks.len(), n.div_ceil(BLOB_CHUNK_SIZE));
                assert_eq!(Bytes::from(chunks.concat()), payload);

                // The helper, into another store.
                let local = BlobStore::in_memory();
                let info = download(&mut c, &digest, &local).await.unwrap();
                assert_eq!(info.size, n as u64);
                assert_eq!(local.get_bytes(&digest).await.unwrap(), payload);
            }
        })
        .await;
    }

    #[tokio::test]
    async fn wrong_digest_or_size_is_refused_and_stores_nothing() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let store = BlobStore::local(dir.path()).unwrap();
            let s = serve(store.clone()).await;
            let mut c = connect(&s).await;

            // Small (one put) and large (multipart to a staging name) blobs.
            for n in [1000usize, 12 << 20] {
                let payload = data(n, 4);
                let claimed = Digest::of(b"something else");
                let err = raw_upload(&mut c, &claimed, n as u64, payload.clone())
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::InvalidArgument);
                let actual = Digest::of(&payload);
                assert!(
                    err.message().contains(&format!("expected {claimed}"))
                        && err.message().contains(&format!("got {actual}")),
                    "{}",
                    err.message()
                );
                assert!(!store.exists(&claimed).await.unwrap());
                assert!(!store.exists(&actual).await.unwrap());
                assert_eq!(blob_files(dir.path()), Vec::<String>::new());

                // Right digest, wrong announced size: too small, then too large.
                for announced in [n as u64 - 1, n as u64 + 1] {
                    let err = raw_upload(&mut c, &actual, announced, payload.clone())
                        .await
                        .unwrap_err();
                    assert_eq!(err.code(), tonic::Code::InvalidArgument);
                    assert!(
                        err.message().contains("size mismatch")
                            && err.message().contains(&format!("expected {announced}")),
                        "{}",
                        err.message()
                    );
                    assert!(!store.exists(&actual).await.unwrap());
                }
            }
            // Nothing left behind but (possibly empty) staging directories.
            assert_eq!(blob_files(dir.path()), Vec::<String>::new());
            let staging = dir.path().join(".farm-staging");
            if staging.exists() {
                assert_eq!(std::fs::read_dir(staging).unwrap().count(), 0);
            }

            // An empty stream and an invalid digest.
            let err = c
                .upload(futures::stream::iter(Vec::<UploadChunk>::new()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let err = raw_upload_named(&mut c, "sha256:XYZ").await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("sha256:XYZ"), "{}", err.message());
        })
        .await;
    }

    async fn raw_upload_named(
        c: &mut farm_client::blobs::Api,
        digest: &str,
    ) -> Result<UploadResponse, Status> {
        let msg = UploadChunk {
            digest: digest.into(),
            size: 1,
            data: Bytes::from_static(b"x"),
        };
        c.upload(futures::stream::iter(vec![msg]))
            .await
            .map(Response::into_inner)
    }

    #[tokio::test]
    async fn a_torn_blob_is_replaced_by_an_upload_of_the_right_bytes() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let store = BlobStore::local(dir.path()).unwrap();
            let s = serve(store.clone()).await;
            let mut c = connect(&s).await;
            for payload in [data(10_000, 7), data(9 << 20, 8)] {
                let digest = Digest::of(&payload);
                let n = payload.len() as u64;
                // A blob torn by a crash: its name, a third of its bytes.
                let file = dir.path().join(digest.blob_path());
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &payload[..payload.len() / 3]).unwrap();
                let answer = raw_upload(&mut c, &digest, n, payload.clone())
                    .await
                    .unwrap();
                assert!(!answer.already_present);
                assert_eq!(store.get_bytes(&digest).await.unwrap(), payload);
                // A torn blob read through the service ends in DATA_LOSS and is removed,
                // so that the client's next upload heals the store.
                std::fs::write(&file, &payload[..payload.len() / 3]).unwrap();
                let (_, status) = raw_read(&mut c, &digest.to_string()).await;
                assert_eq!(status.unwrap().code(), tonic::Code::DataLoss);
                assert!(!file.exists());
                assert_eq!(
                    find_missing(&mut c, std::slice::from_ref(&digest))
                        .await
                        .unwrap(),
                    vec![digest.clone()]
                );
                raw_upload(&mut c, &digest, n, payload.clone())
                    .await
                    .unwrap();
                assert_eq!(store.get_bytes(&digest).await.unwrap(), payload);
            }
        })
        .await;
    }

    #[tokio::test]
    async fn an_upload_over_the_limit_is_refused_before_its_bytes_are_read() {
        bounded(async {
            let store = BlobStore::in_memory();
            let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = incoming.local_addr().unwrap();
            let service = BlobService::new(store.clone()).with_max_upload(1000);
            let task = tokio::spawn(async move {
                let _ = Server::builder()
                    .add_service(service.into_server())
                    .serve_with_incoming(incoming)
                    .await;
            });
            let s = Served {
                addr,
                shutdown: None,
                task,
            };
            let mut c = connect(&s).await;
            let big = data(1001, 3);
            let err = raw_upload(&mut c, &Digest::of(&big), 1001, big.clone())
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted);
            assert!(
                err.message().contains("--max-upload-size") && err.message().contains("1000"),
                "{}",
                err.message()
            );
            assert!(!store.exists(&Digest::of(&big)).await.unwrap());
            // At the limit it is stored.
            let ok = data(1000, 3);
            raw_upload(&mut c, &Digest::of(&ok), 1000, ok.clone())
                .await
                .unwrap();
            assert!(store.exists(&Digest::of(&ok)).await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn uploading_an_existing_blob_reports_already_present() {
        bounded(async {
            let store = BlobStore::in_memory();
            let small = data(10, 5);
            let large = data(9 << 20, 6);
            let s = serve(store.clone()).await;
            let mut c = connect(&s).await;
            for payload in [small, large] {
                let digest = store.put(payload.clone()).await.unwrap().digest;
                let n = payload.len() as u64;
                // The server answers after the first message; the rest is not read.
                let answer = raw_upload(&mut c, &digest, n, payload.clone())
                    .await
                    .unwrap();
                assert!(answer.already_present);
                assert_eq!((answer.digest, answer.size), (digest.to_string(), n));
                // A size that contradicts the stored blob is refused.
                let err = raw_upload(&mut c, &digest, n + 1, payload.clone())
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::InvalidArgument);
            }
            // The connection is still fine afterwards.
            assert!(
                find_missing(&mut c, &[Digest::of(b"x")])
                    .await
                    .unwrap()
                    .len()
                    == 1
            );
        })
        .await;
    }

    #[tokio::test]
    async fn reading_a_missing_blob_is_not_found() {
        bounded(async {
            let s = serve(BlobStore::in_memory()).await;
            let mut c = connect(&s).await;
            let digest = Digest::of(b"absent");
            let (chunks, status) = raw_read(&mut c, &digest.to_string()).await;
            assert!(chunks.is_empty());
            let status = status.expect("an error");
            assert_eq!(status.code(), tonic::Code::NotFound);
            assert!(status.message().contains(&digest.to_string()));

            let local = BlobStore::in_memory();
            let err = download(&mut c, &digest, &local).await.unwrap_err();
            assert_eq!(err.code(), Some(tonic::Code::NotFound));

            let (_, status) = raw_read(&mut c, "md5:abc").await;
            assert_eq!(status.unwrap().code(), tonic::Code::InvalidArgument);
        })
        .await;
    }

    #[tokio::test]
    async fn a_corrupt_stored_blob_reaches_the_reader_as_an_error() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let store = BlobStore::from_url(&format!("file://{}", dir.path().display())).unwrap();
            let s = serve(store.clone()).await;
            let mut c = connect(&s).await;
            for n in [100usize, 3 * BLOB_CHUNK_SIZE + 5] {
                let payload = data(n, 7);
                let digest = store.put(payload.clone()).await.unwrap().digest;
                // Same length, one byte flipped, in place.
                let file = dir.path().join("blobs/sha256").join(digest.hex());
                let mut bad = payload.to_vec();
                bad[n / 2] ^= 0x55;
                std::fs::write(&file, &bad).unwrap();

                let (chunks, status) = raw_read(&mut c, &digest.to_string()).await;
                let status = status.expect("the reader must see an error");
                assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
                assert!(status.message().contains(&digest.to_string()));
                let got: usize = chunks.iter().map(Bytes::len).sum();
                assert!(got < n, "all {n} bytes were sent before the error");
                // The corrupt blob is gone: an upload can heal it.
                assert!(!file.exists());

                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &bad).unwrap();
                let local = BlobStore::in_memory();
                let err = download(&mut c, &digest, &local).await.unwrap_err();
                assert_eq!(err.code(), Some(tonic::Code::DataLoss));
                assert!(!local.exists(&digest).await.unwrap());

                // Truncation is corruption too.
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &payload[..n - 1]).unwrap();
                let (_, status) = raw_read(&mut c, &digest.to_string()).await;
                assert_eq!(status.unwrap().code(), tonic::Code::DataLoss);
                assert!(!file.exists());
            }
        })
        .await;
    }

    #[tokio::test]
    async fn upload_missing_uploads_only_what_is_missing() {
        bounded(async {
            let remote = BlobStore::in_memory();
            let local = BlobStore::in_memory();
            let s = serve(remote.clone()).await;
            let mut c = connect(&s).await;

            let mut digests = Vec::new();
            for (i, n) in [10usize, 5000, 3 << 20, 0].into_iter().enumerate() {
                let payload = data(n, 10 + i as u8);
                digests.push(local.put(payload).await.unwrap().digest);
            }
            // The remote has one of them already.
            remote.put(data(5000, 11)).await.unwrap();

            let uploaded = upload_missing(&mut c, &local, &digests).await.unwrap();
            assert_eq!(uploaded, 3);
            for d in &digests {
                assert_eq!(
                    remote.get_bytes(d).await.unwrap(),
                    local.get_bytes(d).await.unwrap()
                );
            }
            assert_eq!(upload_missing(&mut c, &local, &digests).await.unwrap(), 0);

            // A digest the local store lacks.
            let absent = Digest::of(b"nowhere");
            let err = upload_missing(&mut c, &local, std::slice::from_ref(&absent))
                .await
                .unwrap_err();
            assert!(
                matches!(err, BlobError::NotLocal(ref d) if *d == absent),
                "{err}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_corrupt_local_blob_is_not_uploaded() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let local = BlobStore::local(dir.path()).unwrap();
            let remote = BlobStore::in_memory();
            let s = serve(remote.clone()).await;
            let mut c = connect(&s).await;
            let payload = data(2 * BLOB_CHUNK_SIZE + 1, 20);
            let digest = local.put(payload.clone()).await.unwrap().digest;
            let mut bad = payload.to_vec();
            bad[7] ^= 1;
            std::fs::write(dir.path().join("blobs/sha256").join(digest.hex()), bad).unwrap();
            let err = upload_missing(&mut c, &local, std::slice::from_ref(&digest))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    BlobError::Store(farm_image::Error::DigestMismatch { .. })
                ),
                "{err}"
            );
            assert!(!remote.exists(&digest).await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn upload_file_hashes_then_uploads_if_missing() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let remote = BlobStore::in_memory();
            let s = serve(remote.clone()).await;
            let mut c = connect(&s).await;
            for (name, n) in [
                ("empty", 0usize),
                ("small", 123),
                ("big", 5 * BLOB_CHUNK_SIZE + 3),
            ] {
                let payload = data(n, 30);
                let path = dir.path().join(name);
                std::fs::write(&path, &payload).unwrap();
                let digest = upload_file(&mut c, &path).await.unwrap();
                assert_eq!(digest, Digest::of(&payload));
                assert_eq!(remote.get_bytes(&digest).await.unwrap(), payload);
                // Again: found present, nothing sent.
                assert_eq!(upload_file(&mut c, &path).await.unwrap(), digest);
            }
            let err = upload_file(&mut c, &dir.path().join("nope"))
                .await
                .unwrap_err();
            assert!(matches!(err, BlobError::Io { .. }), "{err}");
        })
        .await;
    }
}

//! The client side of the coordinator's `Blobs` service: content-addressed blobs up and
//! down, streaming and verified.
//!
//! Build the gRPC client with [`client`] so that its message limits match the server's;
//! then [`find_missing`], [`upload_missing`], [`upload_blob`], [`upload_file`] and
//! [`download`] move blobs between a local [`BlobStore`] (or file) and the coordinator.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use farm_image::{BlobInfo, BlobStore, Digest, rechunk};
use farm_proto::v1::blobs_client::BlobsClient;
use farm_proto::v1::{FindMissingRequest, ReadRequest, UploadChunk, UploadResponse};
use farm_proto::{BLOB_CHUNK_SIZE, MAX_BLOB_MESSAGE_SIZE};
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;
use tonic::Status;
use tonic::transport::Channel;

use crate::{Bearer, Transport};
use tracing::debug;

/// Digests per `FindMissing` request sent by [`find_missing`]. A request of the largest
/// size ([`MAX_BLOB_MESSAGE_SIZE`]) would hold about 55,000.
pub const FIND_MISSING_BATCH: usize = 10_000;
/// Blobs [`upload_missing`] uploads concurrently.
const UPLOAD_CONCURRENCY: usize = 4;

/// What can go wrong moving blobs to or from the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The coordinator refused or failed a call.
    #[error("{call}: {code:?}: {}", status.message())]
    Rpc {
        /// The gRPC method.
        call: &'static str,
        /// Its status code (also in `status`).
        code: tonic::Code,
        /// The full status.
        #[source]
        status: Status,
    },
    /// The local blob store failed, or a blob did not match its digest.
    #[error(transparent)]
    Store(#[from] farm_image::Error),
    /// A blob to upload is not in the local store.
    #[error("blob {0} is not in the local store")]
    NotLocal(Digest),
    /// The coordinator answered something it should not have.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Reading a local file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl BlobError {
    /// The gRPC status code, when the coordinator answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            BlobError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn rpc(call: &'static str) -> impl FnOnce(Status) -> BlobError {
    move |status| BlobError::Rpc {
        call,
        code: status.code(),
        status,
    }
}

/// A `Blobs` client: on a [`Transport`] (which adds the caller's token, if any).
pub type Api = BlobsClient<Transport>;

/// A `Blobs` client on `channel`, without a token, with the same message limits as the
/// server.
pub fn client(channel: Channel) -> Api {
    client_on(crate::transport(channel, Bearer::none()))
}

/// A `Blobs` client on `transport` with the same message limits as the server.
pub fn client_on(transport: Transport) -> Api {
    BlobsClient::new(transport)
        .max_decoding_message_size(MAX_BLOB_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_BLOB_MESSAGE_SIZE)
}

/// Which of `digests` the coordinator lacks (each once, in the order given).
pub async fn find_missing(client: &mut Api, digests: &[Digest]) -> Result<Vec<Digest>, BlobError> {
    let mut seen = HashSet::new();
    let unique: Vec<&Digest> = digests.iter().filter(|d| seen.insert(*d)).collect();
    let mut missing = Vec::new();
    for batch in unique.chunks(FIND_MISSING_BATCH) {
        let asked: HashSet<&Digest> = batch.iter().copied().collect();
        let request = FindMissingRequest {
            digests: batch.iter().map(|d| d.to_string()).collect(),
        };
        let answer = client
            .find_missing(request)
            .await
            .map_err(rpc("FindMissing"))?
            .into_inner();
        for s in answer.missing {
            let d = Digest::parse(&s).map_err(|e| {
                BlobError::Protocol(format!("FindMissing answered an invalid digest: {e}"))
            })?;
            if !asked.contains(&d) {
                return Err(BlobError::Protocol(format!(
                    "FindMissing answered {d}, which was not asked for"
                )));
            }
            missing.push(d);
        }
    }
    Ok(missing)
}

/// Asks the coordinator which of `digests` it lacks and uploads those (a few at a time)
/// from `local`, streaming. Returns how many blobs were uploaded.
pub async fn upload_missing(
    client: &mut Api,
    local: &BlobStore,
    digests: &[Digest],
) -> Result<usize, BlobError> {
    let missing = find_missing(client, digests).await?;
    let count = missing.len();
    futures::stream::iter(missing)
        .map(|digest| {
            let mut client = client.clone();
            async move { upload_blob(&mut client, local, &digest).await }
        })
        .buffer_unordered(UPLOAD_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(count)
}

/// Upload one blob from `local`, streaming (without asking first whether the coordinator
/// has it; it answers `already_present` then).
pub async fn upload_blob(
    client: &mut Api,
    local: &BlobStore,
    digest: &Digest,
) -> Result<UploadResponse, BlobError> {
    let size = local
        .size(digest)
        .await?
        .ok_or_else(|| BlobError::NotLocal(digest.clone()))?;
    let blob = local.get(digest).await?;
    let data = rechunk(blob, BLOB_CHUNK_SIZE).map_err(BlobError::from);
    send(client, digest, size, data).await
}

/// Hash the file at `path`, then upload it unless the coordinator has it already.
/// Returns its digest. A file that changes while it is uploaded is refused by the
/// coordinator (digest or size mismatch) and nothing is stored.
pub async fn upload_file(client: &mut Api, path: &Path) -> Result<Digest, BlobError> {
    let (digest, size) = hash_file(path).await?;
    if find_missing(client, std::slice::from_ref(&digest))
        .await?
        .is_empty()
    {
        debug!(%digest, path = %path.display(), "upload_file: already present");
        return Ok(digest);
    }
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| BlobError::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
    let shown = path.display().to_string();
    let data = futures::stream::try_unfold(file, move |mut file| {
        let shown = shown.clone();
        async move {
            let mut buf = BytesMut::zeroed(BLOB_CHUNK_SIZE);
            let mut filled = 0;
            while filled < BLOB_CHUNK_SIZE {
                let n = file
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|source| BlobError::Io {
                        context: format!("reading {shown}"),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(None);
            }
            buf.truncate(filled);
            Ok(Some((buf.freeze(), file)))
        }
    });
    send(client, &digest, size, data).await?;
    Ok(digest)
}

async fn hash_file(path: &Path) -> Result<(Digest, u64), BlobError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || Digest::of_file(&owned))
        .await
        .map_err(|e| BlobError::Io {
            context: format!("hashing {}", path.display()),
            source: std::io::Error::other(e),
        })?;
    hashed.map_err(|source| BlobError::Io {
        context: format!("hashing {}", path.display()),
        source,
    })
}

/// Send one blob: a first message naming digest and size, then the data. A local error
/// ends the request stream early (so the coordinator refuses the short or wrong upload
/// and stores nothing) and is what this returns.
async fn send<S>(
    client: &mut Api,
    digest: &Digest,
    size: u64,
    data: S,
) -> Result<UploadResponse, BlobError>
where
    S: Stream<Item = Result<Bytes, BlobError>> + Send + 'static,
{
    let failure: Arc<Mutex<Option<BlobError>>> = Arc::default();
    let slot = Arc::clone(&failure);
    let header = UploadChunk {
        digest: digest.to_string(),
        size,
        data: Bytes::new(),
    };
    let body =
        futures::stream::once(async move { header }).chain(data.scan((), move |(), item| {
            let next = match item {
                Ok(data) => Some(UploadChunk {
                    data,
                    ..UploadChunk::default()
                }),
                Err(e) => {
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    None
                }
            };
            futures::future::ready(next)
        }));
    let answer = client.upload(body).await;
    if let Some(e) = failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(e);
    }
    let answer = answer.map_err(rpc("Upload"))?.into_inner();
    if answer.digest != digest.to_string() || answer.size != size {
        return Err(BlobError::Protocol(format!(
            "Upload of {digest} ({size} bytes) answered {} ({} bytes)",
            answer.digest, answer.size
        )));
    }
    debug!(%digest, size, already_present = answer.already_present, "uploaded");
    Ok(answer)
}

/// Download blob `digest` into `into`, streaming and verified (nothing is stored unless
/// the bytes hash to `digest`). A blob `into` already has is not downloaded again.
pub async fn download(
    client: &mut Api,
    digest: &Digest,
    into: &BlobStore,
) -> Result<BlobInfo, BlobError> {
    if let Some(size) = into.size(digest).await? {
        return Ok(BlobInfo {
            digest: digest.clone(),
            size,
        });
    }
    let mut chunks = client
        .read(ReadRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(rpc("Read"))?
        .into_inner();
    let mut writer = into.writer();
    loop {
        let data = match chunks.message().await {
            Ok(Some(chunk)) => chunk.data,
            Ok(None) => break,
            Err(status) => {
                writer.abort().await;
                return Err(rpc("Read")(status));
            }
        };
        if let Err(e) = writer.write(data).await {
            writer.abort().await;
            return Err(e.into());
        }
    }
    Ok(writer.finish_expecting(digest).await?)
}

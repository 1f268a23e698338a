//! The one-pass export pipeline: tar -> sha256 (diff_id) -> compression -> streaming
//! upload into the blob store (which hashes the compressed bytes and names the blob
//! by that digest once it is complete).

use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use oci_spec::image::{Descriptor, DescriptorBuilder, MediaType};
use tokio::sync::mpsc;
use tracing::debug;

use crate::compress::{Compression, Compressor};
use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, IoContext, Result};
use crate::store::BlobStore;
use crate::tarwrite::{LayerTarOptions, write_layer_tar};

/// Size of the chunks handed from the compressor to the uploader.
const CHUNK: usize = 1 << 20;
/// Chunks queued between compressor and uploader.
const CHANNEL_DEPTH: usize = 4;
/// Buffer in front of the hasher/compressor (coalesces tar's 512-byte headers).
const TAR_BUF: usize = 128 * 1024;

/// How to export a layer.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Compression of the blob (gzip by default).
    pub compression: Compression,
    /// Compression threads; 0 means all available cores. The output does not depend
    /// on this.
    pub threads: usize,
}

impl ExportOptions {
    /// Options with the given compression and all cores.
    pub fn new(compression: Compression) -> Self {
        ExportOptions {
            compression,
            threads: 0,
        }
    }

    fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// A layer exported into a blob store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedLayer {
    /// sha256 of the uncompressed tar (goes into the image config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// sha256 of the blob (compressed) bytes.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Size of the uncompressed tar in bytes.
    pub tar_size: u64,
    /// The layer media type.
    pub media_type: MediaType,
}

impl ExportedLayer {
    /// The OCI descriptor of the layer blob, for a manifest's `layers`.
    pub fn descriptor(&self) -> Result<Descriptor> {
        Ok(DescriptorBuilder::default()
            .media_type(self.media_type.clone())
            .digest(self.digest.to_oci())
            .size(self.size)
            .build()?)
    }
}

/// Synchronous core of the pipeline: `produce` writes tar bytes, which are hashed
/// (diff_id) and compressed into `out`. Returns `out`, the diff_id and the tar size.
/// Compression runs on `opts.threads` threads; memory is bounded (a few MiB per
/// thread) whatever the size of the layer.
pub fn encode_layer<W, F>(produce: F, out: W, opts: &ExportOptions) -> Result<(W, Digest, u64)>
where
    W: Write + Send + 'static,
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let comp = Compressor::new(out, opts.compression, opts.thread_count())?;
    let mut tar = HashingWriter::new(comp);
    let res = {
        let mut buf = BufWriter::with_capacity(TAR_BUF, &mut tar);
        produce(&mut buf).and_then(|()| {
            buf.into_inner().map(|_| ()).map_err(|e| Error::Io {
                context: "writing layer".into(),
                source: e.into_error(),
            })
        })
    };
    let (comp, diff_id, tar_size) = tar.finish();
    if let Err(e) = res {
        comp.abandon();
        return Err(e);
    }
    let out = comp.finish().ctx(|| "finishing compression".into())?;
    Ok((out, diff_id, tar_size))
}

/// Export the directory `dir` as a layer (see [`write_layer_tar`] for what is
/// written) into `store` in one streaming pass.
pub async fn export_dir(
    store: &BlobStore,
    dir: &Path,
    tar_opts: &LayerTarOptions,
    opts: &ExportOptions,
) -> Result<ExportedLayer> {
    let dir = dir.to_path_buf();
    let tar_opts = tar_opts.clone();
    export_with(store, opts, move |w| {
        write_layer_tar(&dir, &tar_opts, w).map(|(_, stats)| {
            debug!(?stats, dir = %dir.display(), "layer tar written");
        })
    })
    .await
}

/// Export a layer whose tar bytes come from `reader` (e.g. a pipe from a capture
/// process running in a user namespace) into `store` in one streaming pass. The bytes
/// are taken as they are: the diff_id is their sha256.
pub async fn export_tar_stream<R: Read + Send + 'static>(
    store: &BlobStore,
    reader: R,
    opts: &ExportOptions,
) -> Result<ExportedLayer> {
    export_with(store, opts, move |w| {
        let mut reader = reader;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        context: "reading layer tar stream".into(),
                        source,
                    });
                }
            };
            w.write_all(&buf[..n]).ctx(|| "compressing layer".into())?;
        }
    })
    .await
}

async fn export_with<F>(
    store: &BlobStore,
    opts: &ExportOptions,
    produce: F,
) -> Result<ExportedLayer>
where
    F: FnOnce(&mut dyn Write) -> Result<()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let task_opts = opts.clone();
    let task = tokio::task::spawn_blocking(move || {
        let sink = ChannelSink {
            tx,
            buf: BytesMut::new(),
        };
        let (sink, diff_id, tar_size) = encode_layer(produce, sink, &task_opts)?;
        sink.close()
            .ctx(|| "handing the layer to the uploader".into())?;
        Ok::<_, Error>((diff_id, tar_size))
    });

    let mut writer = store.writer();
    let mut upload_err = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = writer.write(chunk).await {
            upload_err = Some(e);
            break;
        }
    }
    // If the upload failed, this makes the producer's next send fail, which stops it.
    drop(rx);
    let produced = task.await;
    if let Some(e) = upload_err {
        writer.abort().await;
        return Err(e);
    }
    let (diff_id, tar_size) = match produced {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            writer.abort().await;
            return Err(e);
        }
        Err(join) => {
            writer.abort().await;
            return Err(join.into());
        }
    };
    let info = writer.finish().await?;
    Ok(ExportedLayer {
        diff_id,
        digest: info.digest,
        size: info.size,
        tar_size,
        media_type: opts.compression.layer_media_type(),
    })
}

/// Hands compressed bytes to the async uploader in [`CHUNK`]-sized pieces.
struct ChannelSink {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
}

impl ChannelSink {
    fn send(&mut self) -> io::Result<()> {
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    fn close(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for ChannelSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(CHUNK);
        }
        let n = data.len().min(CHUNK - self.buf.len().min(CHUNK));
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

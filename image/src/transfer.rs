//! Moving whole blobs: a local file into the store, and a blob from one store to another
//! (an OCI layout's blobs into the shared store), streaming and verified.

use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::digest::Digest;
use crate::error::{IoContext, Result};
use crate::store::{BlobInfo, BlobStore};

const CHUNK: usize = 1 << 20;

impl BlobStore {
    /// Store a local file as a blob, streaming; returns its digest and size.
    pub async fn put_file(&self, path: &Path) -> Result<BlobInfo> {
        let mut file = tokio::fs::File::open(path)
            .await
            .ctx(|| format!("opening {}", path.display()))?;
        let mut writer = self.writer();
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file
                .read(&mut buf)
                .await
                .ctx(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            writer.write(Bytes::from(buf)).await?;
        }
        writer.finish().await
    }

    /// Copy blob `digest` into `to` unless it is there already; the bytes are verified
    /// against the digest on the way.
    pub async fn copy_to(&self, digest: &Digest, to: &BlobStore) -> Result<()> {
        if to.exists(digest).await? {
            return Ok(());
        }
        let mut stream = self.get(digest).await?;
        let mut writer = to.writer();
        while let Some(chunk) = stream.next().await {
            writer.write(chunk?).await?;
        }
        writer.finish_expecting(digest).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_file_and_copy_between_stores() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"hello blobs").unwrap();
        let a = BlobStore::local(&d.path().join("a")).unwrap();
        let b = BlobStore::in_memory();
        let info = a.put_file(&f).await.unwrap();
        assert_eq!(info.digest, Digest::of(b"hello blobs"));
        assert!(!b.exists(&info.digest).await.unwrap());
        a.copy_to(&info.digest, &b).await.unwrap();
        assert_eq!(
            &b.get_bytes(&info.digest).await.unwrap()[..],
            b"hello blobs"
        );
        // idempotent
        a.copy_to(&info.digest, &b).await.unwrap();
    }
}

//! The error type of farm-image.

use std::path::PathBuf;

use crate::digest::Digest;

/// Everything that can go wrong in farm-image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid `sha256:<64 lowercase hex>` digest.
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest {
        /// The rejected input.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Content did not hash to the digest it was stored or announced under.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the content should have had.
        expected: Digest,
        /// The digest the content had.
        actual: Digest,
    },
    /// A blob is not in the store.
    #[error("blob {0} not found")]
    BlobNotFound(Digest),
    /// A blob store URL could not be understood.
    #[error("invalid blob store url {url:?}: {reason}")]
    InvalidStoreUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A blob store operation failed (after the store's retries, for remote stores).
    #[error("blob store {url}: {action}: {source}")]
    Store {
        /// The store's URL (without any password).
        url: String,
        /// What was being done, naming the blob when there is one.
        action: String,
        /// The object store's error (boxed: it is large).
        #[source]
        source: Box<object_store::Error>,
    },
    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A file system or stream operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A layer is larger than a limit allows (entries, bytes); nothing more of it is
    /// extracted.
    #[error("the layer's {what} is over the limit of {limit} ({hint})")]
    LimitExceeded {
        /// Which measure.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// How to raise it.
        hint: &'static str,
    },
    /// A tar entry tried to do something unsafe (leave the target, link outside it).
    #[error("unsafe tar entry {path:?}: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the archive.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// Changing the owner of an extracted file failed.
    #[error(
        "cannot chown {path:?} to {uid}:{gid}: {source} (layers must be applied as root \
         inside the build's user namespace; set ApplyOptions::ignore_chown_errors to skip)"
    )]
    Chown {
        /// The entry's path in the layer.
        path: String,
        /// Wanted uid.
        uid: u64,
        /// Wanted gid.
        gid: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An overlay upper directory uses a feature that cannot be expressed as an OCI layer.
    #[error("cannot capture {path}: {reason}")]
    UnsupportedOverlay {
        /// The file in the upper directory.
        path: PathBuf,
        /// What it uses.
        reason: String,
    },
    /// The input is compressed with a format farm does not read.
    #[error("unsupported compression: {0}")]
    UnsupportedCompression(&'static str),
    /// An OCI type could not be built or parsed.
    #[error("OCI: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// An OCI image layout is malformed or an operation on it is invalid.
    #[error("OCI layout {path}: {reason}")]
    Layout {
        /// The layout directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No manifest in the layout carries that tag.
    #[error("tag {tag:?} not found in {path}")]
    TagNotFound {
        /// The layout directory.
        path: PathBuf,
        /// The tag.
        tag: String,
    },
    /// An image index has no manifest for the wanted platform.
    #[error("no manifest for platform {os}/{arch} (available: {available})")]
    PlatformNotFound {
        /// Wanted os.
        os: String,
        /// Wanted architecture.
        arch: String,
        /// The platforms the index offers.
        available: String,
    },
    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

/// Result with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach context to `std::io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: f(),
            source,
        })
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::Io {
            context: f(),
            source: e.into(),
        })
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::BlobNotFound(_) | Error::TagNotFound { .. } => std::io::ErrorKind::NotFound,
            Error::DigestMismatch { .. } | Error::InvalidDigest { .. } => {
                std::io::ErrorKind::InvalidData
            }
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_stays_small() {
        // Callers keep it in their own error enums; clippy's result_large_err starts at
        // 128 bytes (it is 80 here).
        let size = std::mem::size_of::<super::Error>();
        assert!(size <= 96, "{size}");
    }
}

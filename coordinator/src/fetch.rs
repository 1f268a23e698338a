//! Remote inputs (`imports` and `from: {type: tar, url: ...}` over http(s)), pinned to
//! content digests.
//!
//! Bytes stream straight from the response into the blob store (bounded memory whatever
//! the size); the digest is computed from the bytes received. A small SQLite index in the
//! state directory remembers, per URL, the digest, size, `ETag`, `Last-Modified` and when
//! it was fetched, so a later fetch can be a conditional GET (304: reuse).
//!
//! Order of decisions in [`Fetcher::fetch`]:
//! 1. only `http://` / `https://`; a hash, when given, must be a sha256 (any case,
//!    optional `sha256:` prefix); `require_hash` without one is [`FetchError::HashRequired`];
//! 2. hash given and that blob already in the store: no request at all
//!    ([`FetchSource::CachedByHash`]; content addressing makes that safe, and it works
//!    offline);
//! 3. the index knows the URL, its blob is in the store and no other hash is demanded:
//!    conditional GET (`If-None-Match` / `If-Modified-Since`); 304 reuses it
//!    ([`FetchSource::NotModified`]), 200 downloads again;
//! 4. otherwise a plain GET. Connect errors, timeouts, broken bodies, HTTP 5xx and 429 are
//!    retried with exponential backoff; other 4xx are not;
//! 5. server unreachable after the retries, a hash given, the index has that digest for
//!    the URL and the blob is in the store: reuse with a warning
//!    ([`FetchSource::CachedOffline`]). Without a hash that is an error: an unpinned input
//!    must not silently become whatever was fetched last time.
//!
//! A body that does not hash to the given hash is [`FetchError::HashMismatch`]: the blob
//! is not stored and the index is not touched.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::destinations::{Destinations, GuardedResolver, Refused, check_url, redirect_policy};
use farm_image::{BlobInfo, BlobStore, Digest};
use reqwest::header::{
    CONTENT_LENGTH, ETAG, HeaderMap, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER,
};
use reqwest::{StatusCode, Url};
use sqlx::sqlite::SqlitePool;
use tracing::{debug, info, warn};

/// The index file inside the state directory.
pub const INDEX_FILE: &str = "fetch.db";

/// The longest wait a server's `Retry-After` can impose on one retry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How the fetcher talks to servers.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Per request: the longest wait for a connection, and the longest a response (its
    /// headers, then each read of its body) may stall. Not a cap on the whole transfer, so
    /// a large file on a slow but live link still arrives. Default 60 s.
    pub timeout: Duration,
    /// Retries after the first attempt for transient failures. Default 3.
    pub retries: u32,
    /// Refuse URLs without a hash.
    pub require_hash: bool,
    /// Wait before the first retry; doubled for each further one (0.5 s, 1 s, 2 s, ...).
    /// Default 500 ms.
    pub backoff: Duration,
    /// What may be reached: every address (default), or public ones and an allow-list
    /// (remote submissions; see [`crate::destinations`]).
    pub destinations: Destinations,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            timeout: Duration::from_secs(60),
            retries: 3,
            require_hash: false,
            backoff: Duration::from_millis(500),
            destinations: Destinations::Any,
        }
    }
}

/// Where the content of a [`Fetched`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchSource {
    /// Downloaded now.
    Downloaded,
    /// The server answered 304 to a conditional request; the stored blob is current.
    NotModified,
    /// A hash was given and that blob was already in the store: no request was made.
    CachedByHash,
    /// The server was unreachable; the hash given matches what this URL gave before.
    CachedOffline,
}

/// A fetched input: its content is the blob `digest` in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// sha256 of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// How it was obtained.
    pub source: FetchSource,
}

/// What the index remembers about a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub digest: Digest,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Unix seconds of the last download.
    pub fetched_at: i64,
    /// Unix seconds of the last time the server confirmed the content (download or 304).
    pub checked_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: only http:// and https:// URLs can be fetched")]
    UnsupportedScheme { url: String },
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "{url}: invalid hash {hash:?}: expected the 64 hex digits of a sha256 \
         (optionally prefixed with \"sha256:\")"
    )]
    InvalidHash { url: String, hash: String },
    #[error(
        "{url}: a hash is required for remote inputs: add `hash: <sha256 hex>` next to the URL \
         (get it with `curl -fsSL '{url}' | sha256sum`, and check it against what the \
         publisher states)"
    )]
    HashRequired { url: String },
    #[error("{url}: hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{url}: not found (HTTP 404)")]
    NotFound { url: String },
    #[error("{url}: HTTP {status}{}", attempts_note(*attempts))]
    Status {
        url: String,
        status: StatusCode,
        attempts: u32,
    },
    #[error("cannot reach {url}{}: {cause}", attempts_note(*attempts))]
    Unreachable {
        url: String,
        attempts: u32,
        cause: String,
    },
    #[error("{url}: download failed{}: {cause}", attempts_note(*attempts))]
    Transfer {
        url: String,
        attempts: u32,
        cause: String,
    },
    #[error("{url}: blob store: {source}")]
    Store {
        url: String,
        source: farm_image::Error,
    },
    #[error("fetch index {path}: {source}")]
    Index { path: String, source: sqlx::Error },
    #[error("fetch index {path}: bad entry for {url}: {reason}")]
    CorruptIndex {
        path: String,
        url: String,
        reason: String,
    },
    #[error("creating {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{url}: {refused}")]
    Refused { url: String, refused: Refused },
    #[error("creating the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    }
}

/// Downloads remote inputs into the blob store. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    blobs: BlobStore,
    pool: SqlitePool,
    index_path: String,
    options: FetchOptions,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("blobs", &self.inner.blobs)
            .field("index", &self.inner.index_path)
            .field("options", &self.inner.options)
            .finish()
    }
}

/// How one attempt ended, when it did not produce an outcome.
enum Failure {
    /// Worth retrying.
    Transient {
        kind: TransientKind,
        retry_after: Option<Duration>,
    },
    /// Final.
    Fatal(FetchError),
}

enum TransientKind {
    /// Connect error or timeout: the server may be gone (offline fallback applies).
    Unreachable(String),
    /// 5xx or 429.
    Status(StatusCode),
    /// The connection broke or the body was malformed after the server answered.
    Transfer(String),
}

enum Outcome {
    NotModified(Validators),
    Downloaded(BlobInfo, Validators),
}

#[derive(Default)]
struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validators {
    fn from_headers(headers: &HeaderMap) -> Self {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        Validators {
            etag: get(ETAG),
            last_modified: get(LAST_MODIFIED),
        }
    }
}

impl Fetcher {
    /// A fetcher storing content in `blobs` and its index in `state_dir/fetch.db`
    /// (created if missing).
    pub async fn new(
        blobs: BlobStore,
        state_dir: &Path,
        options: FetchOptions,
    ) -> Result<Self, FetchError> {
        std::fs::create_dir_all(state_dir).map_err(|source| FetchError::Io {
            path: state_dir.display().to_string(),
            source,
        })?;
        let path: PathBuf = state_dir.join(INDEX_FILE);
        let shown = path.display().to_string();
        let db = |source| FetchError::Index {
            path: shown.clone(),
            source,
        };
        let pool = crate::db::open(
            &path,
            "CREATE TABLE IF NOT EXISTS fetch_index (
                url TEXT PRIMARY KEY,
                digest TEXT NOT NULL,
                size INTEGER NOT NULL,
                etag TEXT,
                last_modified TEXT,
                fetched_at INTEGER NOT NULL,
                checked_at INTEGER NOT NULL
            )",
        )
        .await
        .map_err(db)?;
        let client = client_for(&options)?;
        Ok(Fetcher {
            inner: Arc::new(Inner {
                client,
                blobs,
                pool,
                index_path: shown,
                options,
            }),
        })
    }

    /// The same fetcher (index, store) with other options: one per build, sharing the
    /// index opened once. A build limited to some destinations gets a client of its own
    /// that enforces them.
    pub fn with_options(&self, options: FetchOptions) -> Result<Fetcher, FetchError> {
        let client = match (&options.destinations, &self.inner.options.destinations) {
            (Destinations::Any, Destinations::Any) => self.inner.client.clone(),
            _ => client_for(&options)?,
        };
        Ok(Fetcher {
            inner: Arc::new(Inner {
                client,
                blobs: self.inner.blobs.clone(),
                pool: self.inner.pool.clone(),
                index_path: self.inner.index_path.clone(),
                options,
            }),
        })
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// Fetch `url` (or reuse what is known about it) into the blob store.
    /// `expected_sha256`: the 64 hex digits (any case, `sha256:` prefix allowed).
    pub async fn fetch(
        &self,
        url: &str,
        expected_sha256: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        self.fetch_with(url, expected_sha256, self.inner.options.require_hash)
            .await
    }

    /// Fetch an input the language gives no `hash:` for (a `tar` base URL):
    /// `require_hash` does not apply.
    pub async fn fetch_unpinnable(&self, url: &str) -> Result<Fetched, FetchError> {
        self.fetch_with(url, None, false).await
    }

    /// [`Fetcher::fetch_untraced`] in an "http fetch" span (issue 16).
    async fn fetch_with(
        &self,
        url: &str,
        expected_sha256: Option<&str>,
        require_hash: bool,
    ) -> Result<Fetched, FetchError> {
        use tracing::field::{Empty, debug};
        let span = tracing::info_span!(
            target: "farm_trace",
            "http fetch",
            url = %parse_url(url).map(|(_, shown)| shown).unwrap_or_default(),
            bytes = Empty,
            source = Empty,
            otel.status_description = Empty,
        );
        let fetched = tracing::Instrument::instrument(
            self.fetch_untraced(url, expected_sha256, require_hash),
            span.clone(),
        )
        .await;
        match &fetched {
            Ok(f) => {
                span.record("bytes", f.size);
                span.record("source", debug(f.source));
            }
            Err(e) => farm_telemetry::record_error(&span, &e.to_string()),
        }
        fetched
    }

    async fn fetch_untraced(
        &self,
        url: &str,
        expected_sha256: Option<&str>,
        require_hash: bool,
    ) -> Result<Fetched, FetchError> {
        let (parsed, shown) = parse_url(url)?;
        let key = shown.as_str();
        let expected = match expected_sha256 {
            Some(h) => Some(parse_hash(h).ok_or_else(|| FetchError::InvalidHash {
                url: shown.clone(),
                hash: h.to_string(),
            })?),
            None if require_hash => {
                return Err(FetchError::HashRequired { url: shown });
            }
            None => None,
        };

        if let Some(expected) = &expected
            && let Some(size) = self.blob_size(key, expected).await?
        {
            debug!(url = key, digest = %expected, "already in the blob store");
            return Ok(Fetched {
                digest: expected.clone(),
                size,
                source: FetchSource::CachedByHash,
            });
        }

        let known = self.recorded(key).await?;
        // Revalidate only what we can reuse: the blob must be present, and a 304 would be
        // useless if the caller demands a different digest.
        let conditional = match &known {
            Some(entry)
                if expected.as_ref().is_none_or(|e| e == &entry.digest)
                    && (entry.etag.is_some() || entry.last_modified.is_some())
                    && self.blob_size(key, &entry.digest).await?.is_some() =>
            {
                Some(entry)
            }
            _ => None,
        };

        match self
            .download(&parsed, key, expected.as_ref(), conditional)
            .await
        {
            Ok(Outcome::NotModified(validators)) => {
                let entry = conditional.expect("304 is only accepted for conditional requests");
                self.touch(key, &validators).await?;
                debug!(url = key, digest = %entry.digest, "not modified");
                Ok(Fetched {
                    digest: entry.digest.clone(),
                    size: entry.size,
                    source: FetchSource::NotModified,
                })
            }
            Ok(Outcome::Downloaded(blob, validators)) => {
                self.record(key, &blob, &validators).await?;
                info!(url = key, digest = %blob.digest, size = blob.size, "downloaded");
                Ok(Fetched {
                    digest: blob.digest,
                    size: blob.size,
                    source: FetchSource::Downloaded,
                })
            }
            Err(err @ FetchError::Unreachable { .. }) => {
                if let (Some(expected), Some(entry)) = (&expected, &known)
                    && &entry.digest == expected
                    && let Some(size) = self.blob_size(key, expected).await?
                {
                    warn!(
                        url = key,
                        digest = %expected,
                        error = %err,
                        "server unreachable; using the copy fetched before, which matches the given hash"
                    );
                    return Ok(Fetched {
                        digest: expected.clone(),
                        size,
                        source: FetchSource::CachedOffline,
                    });
                }
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    /// What the index remembers about `url`.
    pub async fn recorded(&self, url: &str) -> Result<Option<IndexEntry>, FetchError> {
        type Row = (String, i64, Option<String>, Option<String>, i64, i64);
        let key = match parse_url(url) {
            Ok((_, shown)) => shown,
            Err(_) => url.to_string(),
        };
        let row: Option<Row> = sqlx::query_as(
            "SELECT digest, size, etag, last_modified, fetched_at, checked_at
             FROM fetch_index WHERE url = ?1",
        )
        .bind(&key)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        let Some((digest, size, etag, last_modified, fetched_at, checked_at)) = row else {
            return Ok(None);
        };
        let digest = Digest::parse(&digest).map_err(|e| FetchError::CorruptIndex {
            path: self.inner.index_path.clone(),
            url: key.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(IndexEntry {
            digest,
            size: u64::try_from(size).unwrap_or(0),
            etag,
            last_modified,
            fetched_at,
            checked_at,
        }))
    }

    async fn blob_size(&self, url: &str, digest: &Digest) -> Result<Option<u64>, FetchError> {
        self.inner
            .blobs
            .size(digest)
            .await
            .map_err(|source| FetchError::Store {
                url: url.to_string(),
                source,
            })
    }

    fn db_err(&self, source: sqlx::Error) -> FetchError {
        FetchError::Index {
            path: self.inner.index_path.clone(),
            source,
        }
    }

    async fn record(
        &self,
        url: &str,
        blob: &BlobInfo,
        validators: &Validators,
    ) -> Result<(), FetchError> {
        let now = now();
        sqlx::query(
            "INSERT INTO fetch_index (url, digest, size, etag, last_modified, fetched_at, checked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT(url) DO UPDATE SET digest = excluded.digest, size = excluded.size,
                etag = excluded.etag, last_modified = excluded.last_modified,
                fetched_at = excluded.fetched_at, checked_at = excluded.checked_at",
        )
        .bind(url)
        .bind(blob.digest.to_string())
        .bind(i64::try_from(blob.size).unwrap_or(i64::MAX))
        .bind(validators.etag.as_deref())
        .bind(validators.last_modified.as_deref())
        .bind(now)
        .execute(&self.inner.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// After a 304: the content is confirmed; a server may send updated validators.
    async fn touch(&self, url: &str, validators: &Validators) -> Result<(), FetchError> {
        sqlx::query(
            "UPDATE fetch_index SET checked_at = ?2,
                etag = COALESCE(?3, etag), last_modified = COALESCE(?4, last_modified)
             WHERE url = ?1",
        )
        .bind(url)
        .bind(now())
        .bind(validators.etag.as_deref())
        .bind(validators.last_modified.as_deref())
        .execute(&self.inner.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Run attempts with retries and backoff.
    async fn download(
        &self,
        url: &Url,
        shown: &str,
        expected: Option<&Digest>,
        conditional: Option<&IndexEntry>,
    ) -> Result<Outcome, FetchError> {
        let options = &self.inner.options;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let (kind, retry_after) = match self.attempt(url, shown, expected, conditional).await {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient { kind, retry_after }) => (kind, retry_after),
            };
            if attempt > options.retries {
                let url = shown.to_string();
                return Err(match kind {
                    TransientKind::Unreachable(cause) => FetchError::Unreachable {
                        url,
                        attempts: attempt,
                        cause,
                    },
                    TransientKind::Status(status) => FetchError::Status {
                        url,
                        status,
                        attempts: attempt,
                    },
                    TransientKind::Transfer(cause) => FetchError::Transfer {
                        url,
                        attempts: attempt,
                        cause,
                    },
                });
            }
            let backoff = options
                .backoff
                .saturating_mul(1u32 << (attempt - 1).min(16));
            let wait = retry_after.map_or(backoff, |r| r.min(MAX_RETRY_AFTER).max(backoff));
            let what = match &kind {
                TransientKind::Unreachable(c) | TransientKind::Transfer(c) => c.clone(),
                TransientKind::Status(s) => format!("HTTP {s}"),
            };
            warn!(
                url = shown,
                attempt,
                error = %what,
                retry_in_ms = wait.as_millis() as u64,
                "fetch failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One request.
    async fn attempt(
        &self,
        url: &Url,
        shown: &str,
        expected: Option<&Digest>,
        conditional: Option<&IndexEntry>,
    ) -> Result<Outcome, Failure> {
        let fatal = |e| Err(Failure::Fatal(e));
        let transient = |kind| {
            Err(Failure::Transient {
                kind,
                retry_after: None,
            })
        };
        if let Destinations::Public(allow) = &self.inner.options.destinations
            && let Err(refused) = check_url(allow, url)
        {
            return fatal(FetchError::Refused {
                url: shown.to_string(),
                refused,
            });
        }
        let mut request = self.inner.client.get(url.clone());
        if let Some(entry) = conditional {
            if let Some(etag) = &entry.etag {
                request = request.header(IF_NONE_MATCH, etag);
            }
            if let Some(lm) = &entry.last_modified {
                request = request.header(IF_MODIFIED_SINCE, lm);
            }
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => return classify(shown, &e),
        };
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED && conditional.is_some() {
            return Ok(Outcome::NotModified(Validators::from_headers(
                response.headers(),
            )));
        }
        if status == StatusCode::NOT_FOUND {
            return fatal(FetchError::NotFound {
                url: shown.to_string(),
            });
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Failure::Transient {
                kind: TransientKind::Status(status),
                retry_after: retry_after(response.headers()),
            });
        }
        // We never ask for ranges, so a 206 is not the whole content.
        if !status.is_success() || status == StatusCode::PARTIAL_CONTENT {
            return fatal(FetchError::Status {
                url: shown.to_string(),
                status,
                attempts: 1,
            });
        }
        let validators = Validators::from_headers(response.headers());
        let declared: Option<u64> = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let store_err = |source| {
            Failure::Fatal(FetchError::Store {
                url: shown.to_string(),
                source,
            })
        };

        let mut writer = self.inner.blobs.writer();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if let Some(declared) = declared
                        && writer.len() + chunk.len() as u64 > declared
                    {
                        writer.abort().await;
                        return transient(TransientKind::Transfer(format!(
                            "the body is longer than its Content-Length ({declared} bytes)"
                        )));
                    }
                    if let Err(e) = writer.write(chunk).await {
                        writer.abort().await;
                        return Err(store_err(e));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let received = writer.len();
                    writer.abort().await;
                    let of = declared.map_or(String::new(), |d| format!(" of {d}"));
                    return transient(TransientKind::Transfer(format!(
                        "body broke off after {received}{of} bytes: {}",
                        cause(&e)
                    )));
                }
            }
        }
        if let Some(declared) = declared
            && writer.len() != declared
        {
            let received = writer.len();
            writer.abort().await;
            return transient(TransientKind::Transfer(format!(
                "truncated body: received {received} of {declared} bytes (Content-Length)"
            )));
        }
        let finished = match expected {
            Some(expected) => writer.finish_expecting(expected).await,
            None => writer.finish().await,
        };
        match finished {
            Ok(blob) => Ok(Outcome::Downloaded(blob, validators)),
            Err(farm_image::Error::DigestMismatch { expected, actual }) => {
                fatal(FetchError::HashMismatch {
                    url: shown.to_string(),
                    expected,
                    actual,
                })
            }
            Err(e) => Err(store_err(e)),
        }
    }
}

/// The HTTP client for `options`: one limited to some destinations resolves names
/// through a [`GuardedResolver`], checks every redirect, and connects directly (a proxy
/// would resolve names the guard never sees).
fn client_for(options: &FetchOptions) -> Result<reqwest::Client, FetchError> {
    let builder = reqwest::Client::builder()
        .user_agent(concat!("farm/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(options.timeout)
        .read_timeout(options.timeout);
    let builder = match &options.destinations {
        Destinations::Any => builder,
        Destinations::Public(allow) => builder
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(allow.clone())))
            .redirect(redirect_policy(allow.clone())),
    };
    builder.build().map_err(FetchError::Client)
}

/// Sort a request error into retryable or not.
fn classify<T>(shown: &str, e: &reqwest::Error) -> Result<T, Failure> {
    if let Some(refused) = crate::destinations::refused_in(e) {
        return Err(Failure::Fatal(FetchError::Refused {
            url: shown.to_string(),
            refused: refused.clone(),
        }));
    }
    let cause = cause(e);
    let kind = if e.is_builder() || e.is_redirect() {
        return Err(Failure::Fatal(FetchError::Transfer {
            url: shown.to_string(),
            attempts: 1,
            cause,
        }));
    } else if e.is_connect() || e.is_timeout() {
        TransientKind::Unreachable(cause)
    } else {
        TransientKind::Transfer(cause)
    };
    Err(Failure::Transient {
        kind,
        retry_after: None,
    })
}

/// A readable cause: the error's sources (reqwest's own message repeats the URL).
fn cause(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".into());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p == &text) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Parse and check an input URL; also return the form used in messages and as the index
/// key (a password, if any, replaced by `***`).
fn parse_url(url: &str) -> Result<(Url, String), FetchError> {
    let parsed = Url::parse(url).map_err(|e| FetchError::InvalidUrl {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    let mut shown = parsed.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    let shown = shown.to_string();
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FetchError::UnsupportedScheme { url: shown });
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(FetchError::InvalidUrl {
            url: shown,
            reason: "no host".into(),
        });
    }
    Ok((parsed, shown))
}

/// `sha256:<hex>` or `<hex>`, any case.
fn parse_hash(hash: &str) -> Option<Digest> {
    let hash = hash.trim();
    let hex = match hash.split_once(':') {
        Some((alg, hex)) if alg.eq_ignore_ascii_case("sha256") => hex,
        Some(_) => return None,
        None => hash,
    };
    Digest::from_str(&format!("sha256:{}", hex.to_ascii_lowercase())).ok()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::{JoinHandle, JoinSet};

    // ---- a small HTTP/1.1 server on 127.0.0.1 -------------------------------------

    #[derive(Debug, Clone)]
    struct Req {
        headers: Vec<(String, String)>,
    }

    impl Req {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    enum Reply {
        /// A complete response (no body for 304).
        Full {
            status: u16,
            headers: Vec<(&'static str, String)>,
            body: Arc<Vec<u8>>,
        },
        /// Declare `declared` bytes, send `body`, then close.
        Short { declared: usize, body: Vec<u8> },
        /// Declare `declared` bytes but send all of `body` (longer).
        Long { declared: usize, body: Vec<u8> },
        /// Accept, read the request, never answer.
        Hang,
    }

    type Handler = dyn Fn(usize, &Req) -> Reply + Send + Sync;

    struct Server {
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        body_bytes: Arc<AtomicU64>,
        seen: Arc<Mutex<Vec<Req>>>,
        task: Option<JoinHandle<()>>,
    }

    impl Server {
        async fn start(handler: impl Fn(usize, &Req) -> Reply + Send + Sync + 'static) -> Self {
            Self::start_on("127.0.0.1:0", handler).await
        }

        async fn start_on(
            bind: &str,
            handler: impl Fn(usize, &Req) -> Reply + Send + Sync + 'static,
        ) -> Self {
            let listener = TcpListener::bind(bind).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let requests = Arc::new(AtomicUsize::new(0));
            let body_bytes = Arc::new(AtomicU64::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let handler: Arc<Handler> = Arc::new(handler);
            let (r, b, s) = (requests.clone(), body_bytes.clone(), seen.clone());
            let task = tokio::spawn(async move {
                // Connections live in this set: stopping the server ends them all.
                let mut conns = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (h, r, b, s) = (handler.clone(), r.clone(), b.clone(), s.clone());
                    conns.spawn(async move {
                        let _ = serve(stream, h, r, b, s).await;
                    });
                    while conns.try_join_next().is_some() {}
                }
            });
            Server {
                addr,
                requests,
                body_bytes,
                seen,
                task: Some(task),
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn body_bytes(&self) -> u64 {
            self.body_bytes.load(Ordering::SeqCst)
        }

        fn last_request(&self) -> Req {
            self.seen.lock().unwrap().last().cloned().unwrap()
        }

        /// Close the listener and every connection; later connects are refused.
        async fn stop(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    async fn serve(
        mut stream: TcpStream,
        handler: Arc<Handler>,
        requests: Arc<AtomicUsize>,
        body_bytes: Arc<AtomicU64>,
        seen: Arc<Mutex<Vec<Req>>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut tmp).await?;
            if n == 0 || buf.len() > 64 << 10 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let headers = head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let req = Req { headers };
        let n = requests.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(req.clone());
        let reply = handler(n, &req);
        let (status, headers, declared, body) = match &reply {
            Reply::Full {
                status: 304,
                headers,
                ..
            } => (304, headers.clone(), None, &[][..]),
            Reply::Full {
                status,
                headers,
                body,
            } => (*status, headers.clone(), Some(body.len()), &body[..]),
            Reply::Short { declared, body } | Reply::Long { declared, body } => {
                (200, Vec::new(), Some(*declared), &body[..])
            }
            Reply::Hang => {
                std::future::pending::<()>().await;
                return Ok(());
            }
        };
        let mut out = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
        if let Some(d) = declared {
            out.push_str(&format!("Content-Length: {d}\r\n"));
        }
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes()).await?;
        for chunk in body.chunks(64 << 10) {
            stream.write_all(chunk).await?;
            body_bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        stream.flush().await?;
        stream.shutdown().await?;
        Ok(())
    }

    const ETAG_VALUE: &str = "\"v1\"";
    const LAST_MOD: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

    /// A static file with validators; 304 when If-None-Match matches.
    fn static_file(body: Vec<u8>) -> impl Fn(usize, &Req) -> Reply + Send + Sync + 'static {
        let body = Arc::new(body);
        move |_, req| {
            let headers = vec![
                ("ETag", ETAG_VALUE.to_string()),
                ("Last-Modified", LAST_MOD.into()),
            ];
            let status = if req.header("if-none-match") == Some(ETAG_VALUE) {
                304
            } else {
                200
            };
            Reply::Full {
                status,
                headers,
                body: body.clone(),
            }
        }
    }

    fn ok(body: &[u8]) -> Reply {
        Reply::Full {
            status: 200,
            headers: Vec::new(),
            body: Arc::new(body.to_vec()),
        }
    }

    fn status(code: u16) -> Reply {
        Reply::Full {
            status: code,
            headers: Vec::new(),
            body: Arc::new(b"error".to_vec()),
        }
    }

    // ---- fixtures ------------------------------------------------------------------

    fn options() -> FetchOptions {
        FetchOptions {
            timeout: Duration::from_secs(5),
            retries: 3,
            require_hash: false,
            backoff: Duration::from_millis(10),
            destinations: Destinations::Any,
        }
    }

    async fn fetcher(options: FetchOptions) -> (Fetcher, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(&dir.path().join("blobs")).unwrap();
        let f = Fetcher::new(blobs, &dir.path().join("state"), options)
            .await
            .unwrap();
        (f, dir)
    }

    async fn content(f: &Fetcher, d: &Digest) -> Vec<u8> {
        f.blobs().get_bytes(d).await.unwrap().to_vec()
    }

    // ---- tests -----------------------------------------------------------------------

    fn public_only(allow: &[&str]) -> FetchOptions {
        let list =
            crate::destinations::AllowList(allow.iter().map(|a| a.parse().unwrap()).collect());
        FetchOptions {
            destinations: Destinations::Public(Arc::new(list)),
            ..options()
        }
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allow_listed_and_nothing_is_requested() {
        let server = Server::start(static_file(b"the coordinator's secret".to_vec())).await;
        let (open, _d0) = fetcher(options()).await;
        let guarded = open.with_options(public_only(&[])).unwrap();
        for url in [
            server.url("/f"),
            format!("http://localhost:{}/f", server.addr.port()),
            format!("http://[::ffff:127.0.0.1]:{}/f", server.addr.port()),
        ] {
            let e = guarded.fetch(&url, None).await.unwrap_err();
            assert!(matches!(e, FetchError::Refused { .. }), "{url}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("loopback") && msg.contains("--allow-fetch"),
                "{msg}"
            );
        }
        assert_eq!(server.requests(), 0, "nothing reached the server");
        // A hostname resolving to loopback is refused too (the resolver's check).
        let allowed = open.with_options(public_only(&["127.0.0.1"])).unwrap();
        let got = allowed.fetch(&server.url("/f"), None).await.unwrap();
        assert_eq!(
            content(&allowed, &got.digest).await,
            b"the coordinator's secret"
        );
        let by_name = open.with_options(public_only(&["localhost"])).unwrap();
        by_name
            .fetch(&format!("http://localhost:{}/f", server.addr.port()), None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_redirect_from_an_allowed_host_to_loopback_is_refused() {
        let target = Server::start(static_file(b"secret".to_vec())).await;
        let to_literal = target.url("/f");
        let to_name = format!("http://localhost:{}/f", target.addr.port());
        let redirect = move |n: usize, _: &Req| {
            // The first request goes to the address, the second to a name for it.
            let to = if n == 1 {
                to_name.clone()
            } else {
                to_literal.clone()
            };
            Reply::Full {
                status: 302,
                headers: vec![("Location", to)],
                body: Arc::new(Vec::new()),
            }
        };
        // 127.0.0.2 stands for an allowed host; 127.0.0.1 is the forbidden one.
        let front = Server::start_on("127.0.0.2:0", redirect).await;
        let (open, _d) = fetcher(public_only(&["127.0.0.2"])).await;
        let e = open.fetch(&front.url("/start"), None).await.unwrap_err();
        assert!(matches!(e, FetchError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
        let e = open.fetch(&front.url("/again"), None).await.unwrap_err();
        assert!(matches!(e, FetchError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("localhost"), "{e}");
        assert_eq!(front.requests(), 2, "the allowed host was asked");
        assert_eq!(target.requests(), 0, "the redirect was not followed");
        // Without the guard the same redirect is followed (the test can fail).
        let unguarded = open.with_options(options()).unwrap();
        unguarded.fetch(&front.url("/start"), None).await.unwrap();
        assert_eq!(target.requests(), 1);
    }

    #[tokio::test]
    async fn download_then_conditional_not_modified() {
        let body = b"hello farm\n".to_vec();
        let server = Server::start(static_file(body.clone())).await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/tool.tar.gz");

        let got = f.fetch(&url, None).await.unwrap();
        assert_eq!(got.source, FetchSource::Downloaded);
        assert_eq!(got.digest, Digest::of(&body));
        assert_eq!(got.size, body.len() as u64);
        assert_eq!(content(&f, &got.digest).await, body);
        let entry = f.recorded(&url).await.unwrap().unwrap();
        assert_eq!(entry.digest, got.digest);
        assert_eq!(entry.etag.as_deref(), Some(ETAG_VALUE));
        assert_eq!(entry.last_modified.as_deref(), Some(LAST_MOD));
        assert!(entry.fetched_at > 0);
        let sent = server.body_bytes();
        assert_eq!(sent, body.len() as u64);

        let again = f.fetch(&url, None).await.unwrap();
        assert_eq!(again.source, FetchSource::NotModified);
        assert_eq!(again.digest, got.digest);
        assert_eq!(again.size, got.size);
        assert_eq!(server.requests(), 2);
        assert_eq!(server.body_bytes(), sent, "a 304 transfers no body");
        let req = server.last_request();
        assert_eq!(req.header("if-none-match"), Some(ETAG_VALUE));
        assert_eq!(req.header("if-modified-since"), Some(LAST_MOD));
    }

    #[tokio::test]
    async fn changed_content_downloads_again() {
        let version = Arc::new(AtomicUsize::new(1));
        let v = version.clone();
        let server = Server::start(move |_, req| {
            let n = v.load(Ordering::SeqCst);
            let etag = format!("\"v{n}\"");
            let status = if req.header("if-none-match") == Some(etag.as_str()) {
                304
            } else {
                200
            };
            Reply::Full {
                status,
                headers: vec![("ETag", etag)],
                body: Arc::new(format!("content {n}").into_bytes()),
            }
        })
        .await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/f");
        let first = f.fetch(&url, None).await.unwrap();
        version.store(2, Ordering::SeqCst);
        let second = f.fetch(&url, None).await.unwrap();
        assert_eq!(second.source, FetchSource::Downloaded);
        assert_eq!(second.digest, Digest::of(b"content 2"));
        assert_ne!(first.digest, second.digest);
        let entry = f.recorded(&url).await.unwrap().unwrap();
        assert_eq!(entry.digest, second.digest);
        assert_eq!(entry.etag.as_deref(), Some("\"v2\""));
    }

    #[tokio::test]
    async fn hash_given_and_cached_makes_no_request() {
        let body = b"pinned".to_vec();
        let mut server = Server::start(static_file(body.clone())).await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/pinned");
        let hex = Digest::of(&body).hex().to_ascii_uppercase(); // any case
        let got = f.fetch(&url, Some(&hex)).await.unwrap();
        assert_eq!(got.source, FetchSource::Downloaded);
        assert_eq!(server.requests(), 1);

        let again = f.fetch(&url, Some(&hex)).await.unwrap();
        assert_eq!(again.source, FetchSource::CachedByHash);
        assert_eq!(again.digest, Digest::of(&body));
        assert_eq!(again.size, body.len() as u64);
        assert_eq!(server.requests(), 1, "no request for a cached hash");

        // Works offline, and for any URL with that content.
        server.stop().await;
        let prefixed = format!("sha256:{}", Digest::of(&body).hex());
        let offline = f.fetch(&url, Some(&prefixed)).await.unwrap();
        assert_eq!(offline.source, FetchSource::CachedByHash);
        assert_eq!(server.requests(), 1);
    }

    #[tokio::test]
    async fn server_stopped_without_hash_is_an_error() {
        let body = b"unpinned".to_vec();
        let mut server = Server::start(static_file(body)).await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/unpinned");
        f.fetch(&url, None).await.unwrap();
        server.stop().await;
        let err = f.fetch(&url, None).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Unreachable { attempts: 4, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    #[tokio::test]
    async fn server_unreachable_with_hash_uses_offline_copy() {
        // CachedByHash answers first whenever the blob is in the store, so the offline
        // fallback matters when the blob shows up while the server is failing (another
        // fetch of the same content finished meanwhile). Here: the URL was fetched before
        // (index knows its digest), the blob is then removed, the server stops answering,
        // and the blob is put back during the attempt.
        let body = b"offline content".to_vec();
        let digest = Digest::of(&body);
        let hang = Arc::new(AtomicBool::new(false));
        let h = hang.clone();
        let file = static_file(body.clone());
        let server = Server::start(move |n, req| {
            if h.load(Ordering::SeqCst) {
                Reply::Hang
            } else {
                file(n, req)
            }
        })
        .await;
        let (f, dir) = fetcher(FetchOptions {
            timeout: Duration::from_millis(300),
            retries: 1,
            ..options()
        })
        .await;
        let url = server.url("/offline");
        f.fetch(&url, None).await.unwrap();
        hang.store(true, Ordering::SeqCst);

        let blob_file = dir.path().join("blobs").join(digest.blob_path());
        let remove = || async { std::fs::remove_file(&blob_file).unwrap() };
        // Blob gone and server silent: an error naming the URL (timeouts).
        remove().await;
        let err = f.fetch(&url, Some(digest.hex())).await.unwrap_err();
        assert!(matches!(err, FetchError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains(&url), "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");

        // Blob reappears during the attempt: offline reuse.
        let requests_before = server.requests();
        let (res, ()) = tokio::join!(f.fetch(&url, Some(digest.hex())), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.blobs().put(body.clone().into()).await.unwrap();
        });
        let got = res.unwrap();
        assert_eq!(got.source, FetchSource::CachedOffline);
        assert_eq!(got.digest, digest);
        assert_eq!(got.size, body.len() as u64);
        assert_eq!(server.requests(), requests_before + 2, "1 try + 1 retry");

        // A different hash is never served from the offline copy.
        remove().await;
        let other = Digest::of(b"other");
        let err = f.fetch(&url, Some(other.hex())).await.unwrap_err();
        assert!(matches!(err, FetchError::Unreachable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn wrong_hash_is_a_mismatch_and_records_nothing() {
        let body = b"actual content".to_vec();
        let server = Server::start(static_file(body.clone())).await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/mismatch");
        let expected = Digest::of(b"what the user expected");
        let err = f.fetch(&url, Some(expected.hex())).await.unwrap_err();
        let actual = Digest::of(&body);
        match &err {
            FetchError::HashMismatch {
                url: u,
                expected: e,
                actual: a,
            } => {
                assert_eq!(u, &url);
                assert_eq!(e, &expected);
                assert_eq!(a, &actual);
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains(expected.hex()), "{msg}");
        assert!(msg.contains(actual.hex()), "{msg}");
        assert_eq!(server.requests(), 1, "a mismatch is not retried");
        assert!(f.recorded(&url).await.unwrap().is_none());
        assert!(!f.blobs().exists(&actual).await.unwrap());
        assert!(!f.blobs().exists(&expected).await.unwrap());
    }

    #[tokio::test]
    async fn require_hash() {
        let server = Server::start(static_file(b"x".to_vec())).await;
        let (f, _dir) = fetcher(FetchOptions {
            require_hash: true,
            ..options()
        })
        .await;
        let url = server.url("/needs-hash");
        let err = f.fetch(&url, None).await.unwrap_err();
        assert!(matches!(err, FetchError::HashRequired { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains("hash:"), "{msg}");
        assert!(msg.contains("sha256sum"), "{msg}");
        assert_eq!(server.requests(), 0);
        let got = f.fetch(&url, Some(Digest::of(b"x").hex())).await.unwrap();
        assert_eq!(got.source, FetchSource::Downloaded);
    }

    #[tokio::test]
    async fn retries_5xx_then_succeeds() {
        let server = Server::start(|n, _| {
            if n < 2 {
                status(500)
            } else {
                ok(b"third time")
            }
        })
        .await;
        let (f, _dir) = fetcher(options()).await;
        let got = f.fetch(&server.url("/flaky"), None).await.unwrap();
        assert_eq!(got.source, FetchSource::Downloaded);
        assert_eq!(got.digest, Digest::of(b"third time"));
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn retries_429_and_gives_up_on_persistent_5xx() {
        let server = Server::start(|n, _| if n == 0 { status(429) } else { ok(b"ok") }).await;
        let (f, _dir) = fetcher(options()).await;
        f.fetch(&server.url("/limited"), None).await.unwrap();
        assert_eq!(server.requests(), 2);

        let server = Server::start(|_, _| status(503)).await;
        let url = server.url("/down");
        let err = f.fetch(&url, None).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Status { attempts: 4, status, .. } if status.as_u16() == 503),
            "{err:?}"
        );
        assert!(err.to_string().contains(&url), "{err}");
        assert_eq!(server.requests(), 4);
        assert!(f.recorded(&url).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn not_found_is_not_retried() {
        let server = Server::start(|_, _| status(404)).await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/missing.tar");
        let err = f.fetch(&url, None).await.unwrap_err();
        assert!(matches!(err, FetchError::NotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
        assert_eq!(server.requests(), 1);

        let server = Server::start(|_, _| status(403)).await;
        let err = f.fetch(&server.url("/forbidden"), None).await.unwrap_err();
        assert!(matches!(err, FetchError::Status { .. }), "{err:?}");
        assert_eq!(server.requests(), 1);
    }

    #[tokio::test]
    async fn truncated_body_is_an_error_and_records_nothing() {
        let full: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let partial = full[..500].to_vec();
        let server = Server::start(move |_, _| Reply::Short {
            declared: 1000,
            body: partial.clone(),
        })
        .await;
        let (f, dir) = fetcher(options()).await;
        let url = server.url("/short");
        let err = f.fetch(&url, None).await.unwrap_err();
        assert!(matches!(err, FetchError::Transfer { .. }), "{err:?}");
        assert!(err.to_string().contains(&url), "{err}");
        assert_eq!(server.requests(), 4, "a broken body is retried");
        assert!(f.recorded(&url).await.unwrap().is_none());
        assert!(!f.blobs().exists(&Digest::of(&full[..500])).await.unwrap());
        assert!(!f.blobs().exists(&Digest::of(&full)).await.unwrap());
        // Nothing at all in the store.
        let blobs = dir.path().join("blobs/blobs/sha256");
        let n = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn body_longer_than_content_length_is_cut_at_the_declared_length() {
        // HTTP/1.1 framing: the body ends after Content-Length bytes; hyper never hands us
        // the extra bytes, so the content is the declared prefix (and a pinned hash of the
        // full bytes would not match).
        let long = b"0123456789EXTRA".to_vec();
        let server = Server::start(move |_, _| Reply::Long {
            declared: 10,
            body: long.clone(),
        })
        .await;
        let (f, _dir) = fetcher(options()).await;
        let url = server.url("/long");
        let got = f.fetch(&url, None).await.unwrap();
        assert_eq!(got.digest, Digest::of(b"0123456789"));
        assert_eq!(got.size, 10);
        let err = f
            .fetch(&url, Some(Digest::of(b"0123456789EXTRA").hex()))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn five_megabytes_stream() {
        let body: Vec<u8> = (0..5 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let digest = Digest::of(&body);
        let server = Server::start(static_file(body.clone())).await;
        let (f, _dir) = fetcher(options()).await;
        let got = f
            .fetch(&server.url("/big.bin"), Some(digest.hex()))
            .await
            .unwrap();
        assert_eq!(got.digest, digest);
        assert_eq!(got.size, body.len() as u64);
        assert_eq!(content(&f, &digest).await, body);
    }

    #[tokio::test]
    async fn rejects_other_schemes_and_bad_hashes() {
        let (f, _dir) = fetcher(options()).await;
        for url in ["ftp://example.com/x", "file:///etc/passwd", "stacker://a/b"] {
            let err = f.fetch(url, None).await.unwrap_err();
            assert!(
                matches!(err, FetchError::UnsupportedScheme { .. }),
                "{err:?}"
            );
        }
        let err = f.fetch("not a url", None).await.unwrap_err();
        assert!(matches!(err, FetchError::InvalidUrl { .. }), "{err:?}");
        for bad in ["abc", "md5:0123", &"g".repeat(64)] {
            let err = f
                .fetch("http://127.0.0.1:9/x", Some(bad))
                .await
                .unwrap_err();
            assert!(matches!(err, FetchError::InvalidHash { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn hang_times_out_per_request() {
        let server = Server::start(|_, _| Reply::Hang).await;
        let (f, _dir) = fetcher(FetchOptions {
            timeout: Duration::from_millis(200),
            retries: 0,
            ..options()
        })
        .await;
        let start = std::time::Instant::now();
        let err = f.fetch(&server.url("/slow"), None).await.unwrap_err();
        assert!(matches!(err, FetchError::Unreachable { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn hash_parsing() {
        let d = Digest::of(b"x");
        assert_eq!(parse_hash(d.hex()), Some(d.clone()));
        assert_eq!(parse_hash(&d.hex().to_uppercase()), Some(d.clone()));
        assert_eq!(parse_hash(&format!("SHA256:{}", d.hex())), Some(d.clone()));
        assert_eq!(parse_hash(&format!(" {} ", d.hex())), Some(d));
        assert_eq!(parse_hash("sha512:00"), None);
    }

    #[test]
    fn passwords_are_not_shown() {
        let (_, shown) = parse_url("https://user:secret@example.com/x").unwrap();
        assert!(!shown.contains("secret"), "{shown}");
    }
}

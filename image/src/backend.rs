//! Opening a [`BlobStore`] from a URL: which `object_store` backend, configured from
//! where (environment, URL query, caller-supplied options), and how it retries.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use tracing::debug;

use crate::error::{Error, Result};
use crate::store::BlobStore;

/// How a blob store is opened by [`BlobStore::from_url_with`]: retries of the cloud
/// backends and configuration beyond the URL and the environment.
///
/// Every request to an `s3://`, `gs://`, `az://` or `http(s)://` store is retried with
/// exponential backoff (with jitter) from `init_backoff` up to `max_backoff`, at most
/// `max_retries` times and not after `retry_timeout` has passed since the request
/// started; then the operation fails with the store's message. Connect and request
/// timeouts are object_store's (5 s and 30 s; `AWS_CONNECT_TIMEOUT`, `AWS_TIMEOUT` and
/// the like change them).
#[derive(Clone)]
pub struct StoreOptions {
    /// Retries of one request after its first attempt.
    pub max_retries: usize,
    /// No retry starts later than this after a request's first attempt.
    pub retry_timeout: Duration,
    /// The first backoff; each following one doubles, up to `max_backoff`.
    pub init_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Read the usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`). On by
    /// default; tests turn it off to be independent of the machine.
    pub use_env: bool,
    /// object_store configuration keys and values (for example `aws_endpoint`,
    /// `aws_region`, `aws_access_key_id`, `google_service_account`,
    /// `azure_storage_account_name`), as a command line's flags would give them. They
    /// take precedence over the environment and the URL's query.
    pub config: Vec<(String, String)>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_retries: 10,
            retry_timeout: Duration::from_secs(60),
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            use_env: true,
            config: Vec::new(),
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be secrets: show the keys only.
        let keys: Vec<&str> = self.config.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("StoreOptions")
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("init_backoff", &self.init_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("use_env", &self.use_env)
            .field("config_keys", &keys)
            .finish()
    }
}

impl StoreOptions {
    /// Add one configuration key and value (see [`StoreOptions::config`]).
    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push((key.into(), value.into()));
        self
    }

    /// Set the retry bounds: at most `max_retries` retries, none after `retry_timeout`.
    pub fn with_retries(mut self, max_retries: usize, retry_timeout: Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_timeout = retry_timeout;
        self
    }

    fn retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.init_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        }
    }
}

/// Options a URL's query may carry, per scheme.
const RETRY_QUERY_KEYS: &[&str] = &["max_retries", "retry_timeout"];
const S3_QUERY_KEYS: &[(&str, &str)] = &[
    ("endpoint", "aws_endpoint"),
    ("region", "aws_region"),
    ("allow_http", "aws_allow_http"),
];

impl BlobStore {
    /// Open a store from a URL:
    /// - `file:///abs/path`: a local directory (created if missing); blobs at
    ///   `/abs/path/blobs/sha256/<hex>`
    /// - `memory://`: a fresh in-memory store (each call gives a new, empty one)
    /// - `s3://bucket/prefix`: S3 or an S3-compatible server, configured from the usual
    ///   `AWS_*` variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    ///   `AWS_SESSION_TOKEN`, `AWS_REGION` (over `AWS_DEFAULT_REGION`; default
    ///   `us-east-1`), the endpoint from `AWS_ENDPOINT_URL_S3` over `AWS_ENDPOINT_URL`
    ///   over `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, and every other key object_store knows
    ///   (`AWS_PROFILE` is not read). An `http://` endpoint allows plain HTTP unless
    ///   `AWS_ALLOW_HTTP=false` says otherwise. The query may set `endpoint`, `region`
    ///   and `allow_http`, e.g. `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`
    ///   (credentials only from the environment or [`StoreOptions::config`], never the URL)
    /// - `gs://bucket/prefix`, `az://container/prefix`: Google Cloud Storage and Azure
    ///   Blob Storage configured from `GOOGLE_*` / `SERVICE_ACCOUNT` and `AZURE_*`
    /// - `http(s)://host/prefix`: a WebDAV-style HTTP store
    ///
    /// Every remote store's query may also set `max_retries` (a count) and
    /// `retry_timeout` (`30s`, `500ms`, `2m` or plain seconds); other query keys are
    /// refused. Defaults are [`StoreOptions::default`]'s: 10 retries, none after 60 s,
    /// backoff from 100 ms doubling to 10 s.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_url_with(url, &StoreOptions::default())
    }

    /// [`BlobStore::from_url`] with explicit retries and configuration (for example from
    /// command-line flags). Configuration keys take precedence over the URL's query and
    /// the environment; the query's `max_retries` and `retry_timeout` take precedence
    /// over the options' (they are about this one store).
    pub fn from_url_with(url: &str, options: &StoreOptions) -> Result<Self> {
        let bad = |reason: String| Error::InvalidStoreUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let scheme = parsed.scheme().to_string();
        match scheme.as_str() {
            "file" => {
                if parsed
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad("file:// URLs must not name a host".into()));
                }
                if parsed.query().is_some() {
                    return Err(bad("file:// URLs take no query".into()));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| bad("not an absolute local path".into()))?;
                return Self::local(&dir);
            }
            "memory" => return Ok(Self::in_memory()),
            _ => {}
        }

        // The query: retry bounds for every remote store, a few settings for S3.
        let mut options = options.clone();
        let mut query_config = Vec::new();
        let (mut max_retries, mut retry_timeout) = (None, None);
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "max_retries" => {
                    max_retries = Some(
                        v.parse::<usize>()
                            .map_err(|e| bad(format!("max_retries={v}: {e}")))?,
                    )
                }
                "retry_timeout" => retry_timeout = Some(parse_duration(&v).map_err(bad)?),
                key => match S3_QUERY_KEYS.iter().find(|(q, _)| *q == key) {
                    Some((_, config_key)) if matches!(scheme.as_str(), "s3" | "s3a") => {
                        query_config.push((config_key.to_string(), v.into_owned()));
                    }
                    _ => {
                        let mut allowed: Vec<&str> = RETRY_QUERY_KEYS.to_vec();
                        if matches!(scheme.as_str(), "s3" | "s3a") {
                            allowed.extend(S3_QUERY_KEYS.iter().map(|(q, _)| *q));
                        }
                        return Err(bad(format!(
                            "unknown query option {key:?} (allowed: {})",
                            allowed.join(", ")
                        )));
                    }
                },
            }
        }
        // The URL's retry bounds are about this one store: they win over the options'.
        if let Some(n) = max_retries {
            options.max_retries = n;
        }
        if let Some(t) = retry_timeout {
            options.retry_timeout = t;
        }
        query_config.append(&mut options.config);
        options.config = query_config;

        let mut base = parsed.clone();
        base.set_query(None);
        base.set_fragment(None);
        let prefix = Path::from_url_path(parsed.path())
            .map_err(|e| bad(e.to_string()))?
            .to_string();
        let configure = |e: object_store::Error| Error::Store {
            url: redact(url),
            action: "configuring the store".into(),
            source: Box::new(e),
        };
        let retry = options.retry_config();
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            "s3" | "s3a" => {
                let env: Vec<(String, String)> = if options.use_env {
                    std::env::vars_os()
                        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                        .collect()
                } else {
                    Vec::new()
                };
                let builder = s3_builder(&env, &options.config).map_err(bad)?;
                Arc::new(
                    builder
                        .with_url(base.as_str())
                        .with_retry(retry)
                        .build()
                        .map_err(configure)?,
                )
            }
            "gs" => {
                let mut b = if options.use_env {
                    GoogleCloudStorageBuilder::from_env()
                } else {
                    GoogleCloudStorageBuilder::new()
                };
                for (k, v) in &options.config {
                    let key: GoogleConfigKey = k
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|e: object_store::Error| bad(e.to_string()))?;
                    b = b.with_config(key, v);
                }
                Arc::new(
                    b.with_url(base.as_str())
                        .with_retry(retry)
                        .build()
                        .map_err(configure)?,
                )
            }
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                let mut b = if options.use_env {
                    MicrosoftAzureBuilder::from_env()
                } else {
                    MicrosoftAzureBuilder::new()
                };
                for (k, v) in &options.config {
                    let key: AzureConfigKey = k
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|e: object_store::Error| bad(e.to_string()))?;
                    b = b.with_config(key, v);
                }
                Arc::new(
                    b.with_url(base.as_str())
                        .with_retry(retry)
                        .build()
                        .map_err(configure)?,
                )
            }
            "http" | "https" => {
                let mut b = object_store::http::HttpBuilder::new()
                    .with_url(&base[..url::Position::BeforePath]);
                for (k, v) in &options.config {
                    let key: ClientConfigKey = k
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|e: object_store::Error| bad(e.to_string()))?;
                    b = b.with_config(key, v);
                }
                Arc::new(b.with_retry(retry).build().map_err(configure)?)
            }
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        debug!(url = %redact(url), ?options, "opened blob store");
        Ok(BlobStore::from_parts(store, prefix, url.to_string()))
    }
}

/// An S3 builder from environment variables (only `AWS_*` ones are read) and explicit
/// configuration (which wins). Keys are applied in a fixed order so that, of the
/// synonyms for one setting, the modern name wins: `AWS_ENDPOINT_URL` over
/// `AWS_ENDPOINT`, `AWS_REGION` over `AWS_DEFAULT_REGION` (and object_store itself
/// prefers `AWS_ENDPOINT_URL_S3`). An `http://` endpoint turns on plain HTTP unless
/// `allow_http` was set either way.
pub(crate) fn s3_builder(
    env: &[(String, String)],
    config: &[(String, String)],
) -> std::result::Result<AmazonS3Builder, String> {
    let mut from_env: Vec<(String, &str)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    from_env.sort();
    let mut builder = AmazonS3Builder::new();
    let mut allow_http_set = false;
    let allow_http = AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp);
    for (k, v) in &from_env {
        // Like AmazonS3Builder::from_env: variables object_store does not know are
        // someone else's (AWS_PROFILE, AWS_CONFIG_FILE, ...).
        if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
            allow_http_set |= key == allow_http;
            builder = builder.with_config(key, *v);
        }
    }
    for (k, v) in config {
        let key: AmazonS3ConfigKey = k
            .to_ascii_lowercase()
            .parse()
            .map_err(|e: object_store::Error| e.to_string())?;
        allow_http_set |= key == allow_http;
        builder = builder.with_config(key, v);
    }
    let endpoint = builder
        .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
        .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
    if !allow_http_set
        && endpoint
            .as_deref()
            .is_some_and(|e| e.to_ascii_lowercase().starts_with("http://"))
    {
        builder = builder.with_allow_http(true);
    }
    Ok(builder)
}

/// A URL fit for messages: any password is replaced.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// `30s`, `500ms`, `2m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("retry_timeout={s}: expected e.g. 30s, 500ms, 2m or seconds");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    Ok(match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn value(b: &AmazonS3Builder, key: AmazonS3ConfigKey) -> Option<String> {
        b.get_config_value(&key)
    }

    #[test]
    fn s3_env_precedence_and_http() {
        // The modern endpoint name wins whatever the order of the environment.
        for env in [
            vars(&[
                ("AWS_ENDPOINT", "https://old.example"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ]),
            vars(&[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
                ("AWS_ENDPOINT", "https://old.example"),
            ]),
        ] {
            let b = s3_builder(&env, &[]).unwrap();
            assert_eq!(
                value(&b, AmazonS3ConfigKey::Endpoint).as_deref(),
                Some("http://127.0.0.1:9000")
            );
            // An http:// endpoint allows plain HTTP.
            assert_eq!(
                value(&b, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(),
                Some("true")
            );
        }
        // ... unless the environment said otherwise.
        let b = s3_builder(
            &vars(&[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
                ("AWS_ALLOW_HTTP", "false"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(),
            Some("false")
        );
        // https endpoints leave it off.
        let b = s3_builder(&vars(&[("AWS_ENDPOINT_URL", "https://s3.example")]), &[]).unwrap();
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(),
            Some("false")
        );
        // AWS_REGION over AWS_DEFAULT_REGION; credentials; unknown AWS_ variables and
        // other variables are ignored.
        let b = s3_builder(
            &vars(&[
                ("AWS_REGION", "eu-west-1"),
                ("AWS_DEFAULT_REGION", "us-west-2"),
                ("AWS_ACCESS_KEY_ID", "AKID"),
                ("AWS_SECRET_ACCESS_KEY", "SECRET"),
                ("AWS_PROFILE", "someone"),
                ("HOME", "/root"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::AccessKeyId).as_deref(),
            Some("AKID")
        );
        // Explicit configuration wins over the environment; unknown keys there are errors.
        let b = s3_builder(
            &vars(&[("AWS_REGION", "eu-west-1")]),
            &vars(&[("aws_region", "ap-south-1"), ("endpoint", "http://h:1")]),
        )
        .unwrap();
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Region).as_deref(),
            Some("ap-south-1")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(),
            Some("true")
        );
        assert!(s3_builder(&[], &vars(&[("no_such_key", "x")])).is_err());
    }

    #[test]
    fn query_options() {
        let o = StoreOptions {
            use_env: false,
            ..StoreOptions::default()
        };
        let s = BlobStore::from_url_with(
            "s3://bucket/p?endpoint=http://127.0.0.1:9&region=us-east-1&retry_timeout=3s&max_retries=2",
            &o,
        )
        .unwrap();
        assert_eq!(
            s.blob_path(&crate::Digest::of(b"")).to_string(),
            format!("p/{}", crate::Digest::of(b"").blob_path())
        );
        for bad in [
            "s3://bucket/p?secret_access_key=x",
            "s3://bucket/p?retry_timeout=soon",
            "s3://bucket/p?max_retries=-1",
            "gs://bucket/p?endpoint=http://x",
            "file:///tmp/x?region=y",
        ] {
            let err = BlobStore::from_url_with(bad, &o).unwrap_err();
            assert!(matches!(err, Error::InvalidStoreUrl { .. }), "{bad}: {err}");
        }
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(
            redact("https://user:pw@host/x"),
            "https://user:***@host/x".to_string()
        );
        let dbg = format!("{:?}", o.with_config("aws_secret_access_key", "hunter2"));
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}

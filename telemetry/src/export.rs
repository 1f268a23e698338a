//! The OTLP exporter: configured from flags and the standard environment, batched on its
//! own thread with a bounded queue, flushed at exit within a short bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{RetryPolicy, WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The most finished spans waiting for export; more are dropped (and counted) rather
/// than held in memory or waited for.
pub const QUEUE: usize = 8192;
/// Spans sent in one export call.
const BATCH: usize = 512;
/// How often waiting spans are sent.
const EVERY: Duration = Duration::from_millis(500);
/// One export call's bound (connect included): a collector that does not answer costs
/// the export thread this long, never a build.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long exit waits for the last spans to go out.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(3);

/// Where traces go and what this process is called.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC endpoint (`--otlp-endpoint`, `FARM_OTLP_ENDPOINT`); `None`: the
    /// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// none of them: no export.
    pub endpoint: Option<String>,
    /// `service.name` unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) names it: `farm-coordinator`, `farm-worker`,
    /// `farm-cli`.
    pub service: String,
}

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "OTLP endpoint '{endpoint}' ({from}): {reason}; give an http://HOST:PORT address \
         of an OTLP/gRPC receiver (port 4317 by convention)"
    )]
    Endpoint {
        endpoint: String,
        from: &'static str,
        reason: String,
    },
    #[error("starting the trace exporter's thread: {0}")]
    Runtime(std::io::Error),
}

/// Counts of this process's spans, for the line said at exit.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans that ended (and were offered to the exporter's queue).
    pub ended: AtomicU64,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans of export calls that failed (collector unreachable, refused, timed out).
    pub failed: AtomicU64,
}

/// OTLP export while it lives; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    inner: Option<Exporting>,
}

struct Exporting {
    provider: SdkTracerProvider,
    endpoint: String,
    stats: Arc<ExportStats>,
    /// Drives the gRPC channel (the export thread only waits on it).
    runtime: tokio::runtime::Runtime,
}

impl Telemetry {
    /// No export.
    pub fn off() -> Telemetry {
        Telemetry { inner: None }
    }

    /// Start exporting when `config` or the environment names an endpoint; otherwise
    /// [`Telemetry::off`].
    pub fn start(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        if env_is("OTEL_SDK_DISABLED", "true") || env_is("OTEL_TRACES_EXPORTER", "none") {
            return Ok(Telemetry::off());
        }
        let (endpoint, from) = match endpoint(config) {
            Some(e) => e,
            None => return Ok(Telemetry::off()),
        };
        let bad = |reason: String| TelemetryError::Endpoint {
            endpoint: endpoint.clone(),
            from,
            reason,
        };
        let url = if endpoint.contains("://") {
            endpoint.clone()
        } else {
            format!("http://{endpoint}")
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad("not an http:// or https:// address".into()));
        }
        if url.starts_with("https://") {
            return Err(bad(
                "farm exports over plaintext gRPC only (run a local collector or agent \
                 that forwards with TLS)"
                    .into(),
            ));
        }
        tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| bad(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("farm-otlp")
            .enable_all()
            .build()
            .map_err(TelemetryError::Runtime)?;
        // The channel's connection task runs on `runtime`.
        let exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .with_timeout(EXPORT_TIMEOUT)
                // A collector that is down stays down for a while: try a batch twice more,
                // briefly, then count it lost (the next batch tries again).
                .with_retry_policy(
                    RetryPolicy::recommended()
                        .with_max_retries(2)
                        .with_max_delay(Duration::from_millis(400)),
                )
                .build()
                .map_err(|e| bad(e.to_string()))?
        };
        let stats = Arc::new(ExportStats::default());
        let batch = BatchSpanProcessor::builder(Counting {
            inner: exporter,
            stats: stats.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .with_max_export_batch_size(BATCH)
                .with_scheduled_delay(EVERY)
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Ended {
                inner: batch,
                stats: stats.clone(),
            })
            .with_resource(resource(&config.service))
            .build();
        tracing::debug!(endpoint = %url, "exporting traces");
        Ok(Telemetry {
            inner: Some(Exporting {
                provider,
                endpoint: url,
                stats,
                runtime,
            }),
        })
    }

    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The counts so far (`None` when off).
    pub fn stats(&self) -> Option<&ExportStats> {
        self.inner.as_ref().map(|e| &*e.stats)
    }

    /// The `tracing` layer that makes farm's spans (info and above, farm's crates only)
    /// OpenTelemetry spans; `None` when off.
    pub fn layer<S>(&self) -> Option<impl Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let e = self.inner.as_ref()?;
        let tracer = e.provider.tracer("farm");
        let filter =
            tracing_subscriber::filter::Targets::new().with_target("farm", tracing::Level::INFO);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_filter(filter),
        )
    }

    /// Send what is queued (waiting at most a few seconds) and stop exporting; says how
    /// many spans did not reach the collector, if any.
    pub fn shutdown(mut self) {
        let Some(e) = self.inner.take() else { return };
        let flushed = e.provider.shutdown_with_timeout(FLUSH_AT_EXIT);
        let ended = e.stats.ended.load(Ordering::Relaxed);
        let exported = e.stats.exported.load(Ordering::Relaxed);
        let failed = e.stats.failed.load(Ordering::Relaxed);
        let lost = ended.saturating_sub(exported);
        if lost > 0 {
            tracing::warn!(
                "traces: {lost} of {ended} spans did not reach {} ({failed} in failed exports, \
                 {} dropped or unsent{})",
                e.endpoint,
                lost.saturating_sub(failed),
                if flushed.is_err() {
                    "; the last flush timed out"
                } else {
                    ""
                }
            );
        }
        e.runtime.shutdown_background();
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(e) = self.inner.take() {
            let _ = e.provider.shutdown_with_timeout(FLUSH_AT_EXIT);
            e.runtime.shutdown_background();
        }
    }
}

fn env_is(var: &str, value: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// The configured endpoint and where it came from.
fn endpoint(config: &TelemetryConfig) -> Option<(String, &'static str)> {
    let set = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if let Some(e) = set(config.endpoint.clone()) {
        return Some((e, "--otlp-endpoint or FARM_OTLP_ENDPOINT"));
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Some(e) = set(std::env::var(var).ok()) {
            return Some((e, var));
        }
    }
    None
}

/// The resource: `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` (read by the SDK),
/// else `service` as the name.
fn resource(service: &str) -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(service.to_string()).build()
    }
}

/// Counts spans the collector accepted and those whose export failed.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    stats: Arc<ExportStats>,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        let counter = if r.is_ok() {
            &self.stats.exported
        } else {
            &self.stats.failed
        };
        counter.fetch_add(n, Ordering::Relaxed);
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts spans that ended, then queues them (the batch processor drops what its queue
/// cannot take).
#[derive(Debug)]
struct Ended<P> {
    inner: P,
    stats: Arc<ExportStats>,
}

impl<P: SpanProcessor> SpanProcessor for Ended<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.stats.ended.fetch_add(1, Ordering::Relaxed);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

//! farm's traces: one trace per build, from `farm submit` through the coordinator to the
//! worker's sandbox (issue 16).
//!
//! - [`Telemetry::start`] turns OTLP export on when an endpoint is configured (the
//!   `--otlp-endpoint` flag, `FARM_OTLP_ENDPOINT`, or the standard
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`) and gives a
//!   `tracing` layer that turns farm's spans into OpenTelemetry spans. Without an
//!   endpoint nothing is exported and the layer is absent: spans cost what `tracing`
//!   spans cost.
//! - Export is batched on its own thread with a bounded queue ([`QUEUE`] spans): a slow
//!   or unreachable collector never slows or fails a build; spans that do not fit are
//!   dropped and counted, and the counts are said at exit ([`Telemetry::shutdown`]).
//! - [`inject`] / [`set_parent`] carry a span's context as W3C `traceparent` /
//!   `tracestate` pairs: in gRPC metadata on client calls ([`inject_metadata`],
//!   [`extract_metadata`]) and in the worker's assignments (whose stream's metadata is
//!   fixed when it opens).

mod export;

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub use export::{ExportStats, QUEUE, Telemetry, TelemetryConfig, TelemetryError};

/// A span's trace context as W3C headers (`traceparent`, and `tracestate` when set);
/// empty when tracing is off.
pub type TraceContext = HashMap<String, String>;

/// The W3C trace context of `span`; empty when the span is not traced (no exporter).
pub fn inject(span: &tracing::Span) -> TraceContext {
    let cx = span.context();
    let mut carrier = TraceContext::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    carrier
}

/// Make `span` a child of the remote span in `carrier` (W3C `traceparent`). Call it
/// before the span is entered; a carrier without a valid context changes nothing.
pub fn set_parent(span: &tracing::Span, carrier: &TraceContext) {
    if carrier.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Link `span` to the span in `carrier` (another trace, e.g. a webhook delivery's link to
/// the build it started).
pub fn add_link(span: &tracing::Span, carrier: &TraceContext) {
    let cx = TraceContextPropagator::new().extract(carrier);
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The trace id of `span` as 32 hex digits, `None` when it is not traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The current span's trace context into gRPC metadata (a client call's).
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// The W3C trace context a client sent in gRPC metadata (empty when it sent none).
pub fn extract_metadata(metadata: &tonic::metadata::MetadataMap) -> TraceContext {
    let mut out = TraceContext::new();
    for key in ["traceparent", "tracestate"] {
        if let Some(v) = MetadataExtractor(metadata).get(key) {
            out.insert(key.to_string(), v.to_string());
        }
    }
    out
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Mark `span` as failed with `message` (the text the user sees): OpenTelemetry's span
/// status ERROR with that description. The span must declare the
/// `otel.status_description` field (as [`tracing::field::Empty`]).
pub fn record_error(span: &tracing::Span, message: &str) {
    span.record("otel.status_description", message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Export to a port nobody listens on: spans get ids, a context carried to another
    /// span makes it a child in the same trace, and the loss is counted.
    #[test]
    fn a_carried_context_continues_the_trace_and_losses_are_counted() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let telemetry = Telemetry::start(&TelemetryConfig {
            endpoint: Some(format!("http://{closed}")),
            service: "test".into(),
        })
        .unwrap();
        assert!(telemetry.is_on());
        let subscriber = tracing_subscriber::registry().with(telemetry.layer());
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("root");
            let carried = inject(&root);
            assert!(carried["traceparent"].starts_with("00-"), "{carried:?}");
            let trace = trace_id(&root).expect("a traced span has a trace id");
            // A span elsewhere (no contextual parent), made a child through the carrier.
            let remote = tracing::info_span!(parent: None, "remote");
            set_parent(&remote, &carried);
            assert_eq!(trace_id(&remote).as_deref(), Some(trace.as_str()));
            let unrelated = tracing::info_span!(parent: None, "unrelated");
            assert_ne!(trace_id(&unrelated).as_deref(), Some(trace.as_str()));
        });
        let stats = telemetry.stats().unwrap();
        assert_eq!(stats.ended.load(std::sync::atomic::Ordering::Relaxed), 3);
        telemetry.shutdown();
    }

    #[test]
    fn endpoints_are_checked_and_off_without_one() {
        let off = Telemetry::start(&TelemetryConfig::default()).unwrap();
        // (Unless this test's environment names one.)
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert!(!off.is_on());
        }
        for bad in [
            "https://collector:4317",
            "ftp://x:1",
            "http://exa mple:4317",
        ] {
            let e = Telemetry::start(&TelemetryConfig {
                endpoint: Some(bad.into()),
                service: "test".into(),
            })
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains("--otlp-endpoint"), "{e}");
        }
    }

    #[test]
    fn untraced_spans_carry_nothing() {
        // No OpenTelemetry layer: nothing to inject, no trace id, and a parent is
        // ignored without error.
        let span = tracing::info_span!("x");
        assert!(inject(&span).is_empty());
        assert_eq!(trace_id(&span), None);
        let mut carrier = TraceContext::new();
        carrier.insert(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        set_parent(&span, &carrier);
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("traceparent", carrier["traceparent"].parse().unwrap());
        assert_eq!(extract_metadata(&md), carrier);
    }
}

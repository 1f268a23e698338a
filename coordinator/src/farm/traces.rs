//! Each build's trace (issue 16): the span that is the root of a build on the
//! coordinator, and its trace context, kept so `status` can name the trace and a webhook
//! delivery can link to it.
//!
//! Kept in memory only (the most recent [`KEPT`] builds): after a coordinator restart
//! the status of an earlier build has no trace id, and a resumed build starts a new trace.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use farm_telemetry::TraceContext;

use super::Farm;
use crate::state::BuildId;

/// Builds whose trace context is remembered.
const KEPT: usize = 10_000;

#[derive(Default)]
pub(crate) struct BuildTraces {
    inner: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    by_build: HashMap<BuildId, TraceContext>,
    order: VecDeque<BuildId>,
}

impl BuildTraces {
    /// The span that drives build `id`: a child of the current span (the client's, through
    /// the Submit call's `traceparent`), the root of a resumed build's trace.
    pub(super) fn build_span(&self, id: &str) -> tracing::Span {
        let span = tracing::info_span!(
            target: "farm_trace",
            "build",
            build.id = %id,
            layers = tracing::field::Empty,
            state = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let cx = farm_telemetry::inject(&span);
        if !cx.is_empty() {
            let mut kept = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if kept.order.len() >= KEPT
                && let Some(old) = kept.order.pop_front()
            {
                kept.by_build.remove(&old);
            }
            kept.order.push_back(id.to_string());
            kept.by_build.insert(id.to_string(), cx);
        }
        span
    }

    fn get(&self, id: &str) -> Option<TraceContext> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_build
            .get(id)
            .cloned()
    }
}

impl Farm {
    /// The trace id of build `id` (32 hex digits), when this coordinator exports traces
    /// and started the build.
    pub fn trace_id(&self, id: &str) -> Option<String> {
        let cx = self.inner.traces.get(id)?;
        let parent = cx.get("traceparent")?;
        // version-traceid-spanid-flags
        parent.split('-').nth(1).map(str::to_string)
    }

    /// The W3C trace context of build `id`'s span (empty when it is not traced).
    pub fn trace_context(&self, id: &str) -> TraceContext {
        self.inner.traces.get(id).unwrap_or_default()
    }
}

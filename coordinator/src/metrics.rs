//! The coordinator's Prometheus metrics: queue depth, running layers, workers, cache
//! hits and misses, retries, builds and layer durations.
//!
//! Written out by hand in the text exposition format: it is a handful of gauges and
//! counters and one histogram, and the format is small and stable, so a metrics registry
//! crate would add more than it saves.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::auth::AuthFailure;

/// Upper bounds (seconds) of the layer duration histogram.
const BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0];

#[derive(Debug, Default)]
pub struct Metrics {
    queue: AtomicU64,
    running: AtomicU64,
    workers: AtomicU64,
    started: AtomicU64,
    cache_hits: AtomicU64,
    retries: AtomicU64,
    builds_finished: AtomicU64,
    watch_catch_ups: AtomicU64,
    /// Refused calls, by [`AuthFailure`] (in the order of `AuthFailure::ALL`).
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    durations: Mutex<Histogram>,
    /// CI webhook deliveries by (provider, outcome).
    webhook_deliveries: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// Garbage collections and what they removed.
    gc: crate::gc::GcCounters,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn set_queue(&self, n: usize) {
        self.queue.store(n as u64, Ordering::Relaxed);
    }
    pub fn set_running(&self, n: usize) {
        self.running.store(n as u64, Ordering::Relaxed);
    }
    pub fn set_workers(&self, n: usize) {
        self.workers.store(n as u64, Ordering::Relaxed);
    }
    /// A layer missed the cache and goes to a worker.
    pub fn layer_queued(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }
    pub fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    /// A watcher read a build's events back from the store (it started, or fell behind).
    pub fn watch_catch_up(&self) {
        self.watch_catch_ups.fetch_add(1, Ordering::Relaxed);
    }
    pub fn watch_catch_ups(&self) -> u64 {
        self.watch_catch_ups.load(Ordering::Relaxed)
    }
    pub fn build_finished(&self) {
        self.builds_finished.fetch_add(1, Ordering::Relaxed);
    }
    /// A call was refused by the authentication gate (or a worker's name by its token).
    pub fn auth_failed(&self, reason: AuthFailure) {
        if let Some(i) = AuthFailure::ALL.iter().position(|r| *r == reason) {
            self.auth_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    /// A CI webhook delivery of `provider` was answered with `outcome`.
    pub fn webhook_delivery(&self, provider: &'static str, outcome: &'static str) {
        *self
            .webhook_deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((provider, outcome))
            .or_default() += 1;
    }
    pub fn layer_built(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        one(
            "farm_queue_depth",
            "gauge",
            "Layers waiting for a worker slot.",
            g(&self.queue),
        );
        one(
            "farm_running_layers",
            "gauge",
            "Layers being built on workers.",
            g(&self.running),
        );
        one(
            "farm_workers",
            "gauge",
            "Connected workers.",
            g(&self.workers),
        );
        one(
            "farm_cache_hits_total",
            "counter",
            "Layers answered from the action cache.",
            g(&self.cache_hits),
        );
        one(
            "farm_cache_misses_total",
            "counter",
            "Layers that had to be built.",
            g(&self.started),
        );
        one(
            "farm_layer_retries_total",
            "counter",
            "Layers sent to another worker after a lost lease.",
            g(&self.retries),
        );
        one(
            "farm_builds_finished_total",
            "counter",
            "Builds that ended.",
            g(&self.builds_finished),
        );
        one(
            "farm_watch_catch_ups_total",
            "counter",
            "Reads of a build's events back from the store: one when a watcher or a log \
             reader starts, more when a watcher falls behind the live stream.",
            g(&self.watch_catch_ups),
        );
        let _ = writeln!(
            out,
            "# HELP farm_auth_failures_total Calls refused for their credentials, by reason.\n# TYPE farm_auth_failures_total counter"
        );
        for (i, reason) in AuthFailure::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "farm_auth_failures_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.auth_failures[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP farm_webhook_deliveries_total CI webhook deliveries, by provider and outcome.\n# TYPE farm_webhook_deliveries_total counter"
        );
        for ((provider, outcome), n) in self
            .webhook_deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "farm_webhook_deliveries_total{{provider=\"{provider}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            out,
            "# HELP farm_layer_duration_seconds Time to build a layer on a worker.\n# TYPE farm_layer_duration_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "farm_layer_duration_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "farm_layer_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "farm_layer_duration_seconds_sum {}", h.sum);
        let _ = writeln!(out, "farm_layer_duration_seconds_count {}", h.count);
        self.gc.render(&mut out);
        out
    }

    /// Garbage collection counters.
    pub fn gc(&self) -> &crate::gc::GcCounters {
        &self.gc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.set_queue(3);
        m.cache_hit();
        m.cache_hit();
        m.layer_built(Duration::from_millis(300));
        m.layer_built(Duration::from_secs(10));
        m.auth_failed(AuthFailure::WrongRole);
        let text = m.render();
        assert!(
            text.contains("farm_auth_failures_total{reason=\"wrong_role\"} 1\n")
                && text.contains("farm_auth_failures_total{reason=\"missing\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("farm_queue_depth 3\n"), "{text}");
        assert!(text.contains("farm_cache_hits_total 2\n"), "{text}");
        assert!(
            text.contains("farm_layer_duration_seconds_bucket{le=\"0.5\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("farm_layer_duration_seconds_bucket{le=\"15\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("farm_layer_duration_seconds_count 2\n"),
            "{text}"
        );
    }
}

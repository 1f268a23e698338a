//! The coordinator's Prometheus metrics: queue depth, running layers, workers, cache
//! hits and misses, retries, builds, layer durations and dispatch waits.
//!
//! Written out by hand in the text exposition format: it is a handful of gauges and
//! counters and two histograms, and the format is small and stable, so a metrics registry
//! crate would add more than it saves.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::auth::AuthFailure;

/// Upper bounds (seconds) of the layer duration histogram.
const BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0];

/// Upper bounds (seconds) of the dispatch histogram: milliseconds when slots are free
/// (the scheduler's own cost), up to minutes when layers wait for one.
const DISPATCH_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
];

#[derive(Debug)]
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
    /// Layer queued (its inputs ready) -> assignment sent to a worker.
    dispatch: Mutex<Histogram>,
    /// CI webhook deliveries by (provider, outcome).
    webhook_deliveries: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// Garbage collections and what they removed.
    gc: crate::gc::GcCounters,
}

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations at or under each bound (cumulative, as the format has them).
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (n, b) in self.counts.iter_mut().zip(self.bounds) {
            if s <= *b {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    /// The bound of the first bucket holding at least `q` of the observations (`None`
    /// when there are none, or when they lie past the last bound).
    fn quantile_bound(&self, q: f64) -> Option<f64> {
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        (self.count > 0)
            .then(|| {
                self.bounds
                    .iter()
                    .zip(&self.counts)
                    .find(|(_, n)| **n >= want)
            })
            .flatten()
            .map(|(b, _)| *b)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, n) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queue: AtomicU64::default(),
            running: AtomicU64::default(),
            workers: AtomicU64::default(),
            started: AtomicU64::default(),
            cache_hits: AtomicU64::default(),
            retries: AtomicU64::default(),
            builds_finished: AtomicU64::default(),
            watch_catch_ups: AtomicU64::default(),
            auth_failures: Default::default(),
            durations: Mutex::new(Histogram::new(BUCKETS)),
            dispatch: Mutex::new(Histogram::new(DISPATCH_BUCKETS)),
            webhook_deliveries: Mutex::default(),
            gc: Default::default(),
        }
    }
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
        lock(&self.durations).observe(d);
    }
    /// A queued layer's assignment went to a worker `d` after it was queued.
    pub fn layer_dispatched(&self, d: Duration) {
        lock(&self.dispatch).observe(d);
    }
    /// The bound (seconds) of the dispatch bucket that holds the `q`-quantile: the
    /// `q`-quantile of dispatch waits is at most this.
    pub fn dispatch_quantile_bound(&self, q: f64) -> Option<f64> {
        lock(&self.dispatch).quantile_bound(q)
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
        lock(&self.durations).render(
            &mut out,
            "farm_layer_duration_seconds",
            "Time to build a layer on a worker.",
        );
        lock(&self.dispatch).render(
            &mut out,
            "farm_dispatch_seconds",
            "Time from a layer being queued (its inputs ready) to its assignment being sent \
             to a worker: the wait for a free slot, placement and the lease's record.",
        );
        self.gc.render(&mut out);
        out
    }

    /// Garbage collection counters.
    pub fn gc(&self) -> &crate::gc::GcCounters {
        &self.gc
    }
}

fn lock(h: &Mutex<Histogram>) -> std::sync::MutexGuard<'_, Histogram> {
    h.lock().unwrap_or_else(|p| p.into_inner())
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

    #[test]
    fn dispatch_waits_are_a_histogram_whose_quantiles_are_bucket_bounds() {
        let m = Metrics::default();
        assert_eq!(m.dispatch_quantile_bound(0.5), None, "nothing observed");
        for _ in 0..98 {
            m.layer_dispatched(Duration::from_micros(1500));
        }
        m.layer_dispatched(Duration::from_millis(30));
        m.layer_dispatched(Duration::from_millis(30));
        assert_eq!(m.dispatch_quantile_bound(0.5), Some(0.002));
        assert_eq!(m.dispatch_quantile_bound(0.98), Some(0.002));
        assert_eq!(m.dispatch_quantile_bound(0.99), Some(0.05));
        m.layer_dispatched(Duration::from_secs(3600));
        assert_eq!(m.dispatch_quantile_bound(1.0), None, "past the last bound");
        let text = m.render();
        for line in [
            "farm_dispatch_seconds_bucket{le=\"0.001\"} 0\n",
            "farm_dispatch_seconds_bucket{le=\"0.002\"} 98\n",
            "farm_dispatch_seconds_bucket{le=\"0.05\"} 100\n",
            "farm_dispatch_seconds_bucket{le=\"+Inf\"} 101\n",
            "farm_dispatch_seconds_count 101\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}

//! Incremental pool collection with high and low watermarks (`farm worker
//! --pool-max-size`, `--pool-high-watermark`, `--pool-low-watermark`).
//!
//! When the known sizes of the pool's chains add up to more than the high watermark,
//! least recently used chains are removed until they are under the low one; between
//! the two nothing happens, so a busy pool is not collected after every build. Unlike
//! [`Pool::gc`], which holds the pool lock for the whole collection (deletions
//! included), each chain is taken out of sight under the pool lock alone (a rename)
//! and deleted after the lock is let go: builds wait for at most one rename, never
//! for a deletion. A chain in use (a [`super::ChainHandle`] in any process: a build's
//! base, a snapshot being made, a chain being created) is never removed.

use std::time::Duration;

use super::lock::Mode;
use super::{GcReport, Pool, RemovedChain, Result};

/// A watermark: a fraction of the maximum size, or a size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Level {
    /// Of `--pool-max-size` (0 < f <= 1).
    Fraction(f64),
    Bytes(u64),
}

impl Level {
    fn of(self, max: u64) -> u64 {
        match self {
            Level::Fraction(f) => (max as f64 * f) as u64,
            Level::Bytes(b) => b,
        }
    }
}

/// When collection starts (`high`) and where it stops (`low`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    pub high: u64,
    pub low: u64,
}

impl Watermarks {
    /// The default high watermark: 90% of the maximum size.
    pub const DEFAULT_HIGH: Level = Level::Fraction(0.9);
    /// The default low watermark: 75% of the maximum size.
    pub const DEFAULT_LOW: Level = Level::Fraction(0.75);

    /// Watermarks for a pool of at most `max` bytes; an error (for the user) when low
    /// is above high or either is above the maximum.
    pub fn new(max: u64, high: Level, low: Level) -> std::result::Result<Self, String> {
        let (h, l) = (high.of(max), low.of(max));
        if h > max {
            return Err(format!(
                "the pool's high watermark ({h} bytes) is above --pool-max-size ({max} bytes)"
            ));
        }
        if l > h {
            return Err(format!(
                "the pool's low watermark ({l} bytes) is above its high watermark ({h} bytes): \
                 collection stops at the low one"
            ));
        }
        Ok(Watermarks { high: h, low: l })
    }
}

impl Pool {
    /// If the chains' known sizes exceed `marks.high`, remove least recently used
    /// chains not in use until they are at most `marks.low` (or none is left to
    /// remove), one at a time (see the module docs). Also removes the leftovers of
    /// crashed builds first.
    pub fn collect_to(&self, marks: &Watermarks) -> Result<GcReport> {
        let mut chains = self.list()?;
        let mut total: u64 = chains.iter().filter_map(|c| c.size_bytes).sum();
        let mut report = GcReport {
            bytes_before: total,
            bytes_after: total,
            unknown_size: chains.iter().filter(|c| c.size_bytes.is_none()).count(),
            ..Default::default()
        };
        if total <= marks.high {
            return Ok(report);
        }
        {
            let _pool = self.lock_pool(Mode::Exclusive)?;
            report.stale_removed = self.cleanup_stale();
        }
        chains.sort_by(|a, b| {
            a.last_used
                .cmp(&b.last_used)
                .then(a.created.cmp(&b.created))
        });
        let mut first_err = None;
        for c in chains {
            if total <= marks.low {
                break;
            }
            // Only the rename under the lock; a chain used since the listing is held
            // (skipped) or was let go again (it goes: the order is approximately LRU).
            let trash = {
                let _pool = self.lock_pool(Mode::Exclusive)?;
                if !self.contains(&c.id) {
                    continue;
                }
                self.try_unpublish(&c.id)?
            };
            let Some(trash) = trash else {
                report.skipped_in_use.push(c.id);
                continue;
            };
            total = total.saturating_sub(c.size_bytes.unwrap_or(0));
            report.removed.push(RemovedChain {
                id: c.id,
                size_bytes: c.size_bytes,
            });
            if let Err(e) = self.delete_volume(&trash) {
                tracing::warn!(path = %trash.display(), error = %e, "cannot delete a removed chain yet; gc will retry");
                first_err.get_or_insert(e);
            }
        }
        report.bytes_after = total;
        tracing::info!(
            pool = %self.dir().display(),
            removed = report.removed.len(),
            in_use = report.skipped_in_use.len(),
            bytes_before = report.bytes_before,
            bytes_after = report.bytes_after,
            high = marks.high,
            low = marks.low,
            "pool collected down to its low watermark"
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Check the pool every `every` in the background and collect it when it is over
    /// its high watermark (see [`Pool::collect_to`]); on a blocking thread, so a
    /// collection never holds up the worker's other tasks. Runs until the returned
    /// handle is aborted or the runtime stops.
    pub fn spawn_collector(
        &self,
        marks: Watermarks,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let p = pool.clone();
                match tokio::task::spawn_blocking(move || p.collect_to(&marks)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "pool collection"),
                    Err(e) => tracing::warn!(error = %e, "pool collection stopped"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Begin, ChainId, PoolOptions, WorkspaceOptions};

    fn id(n: u64) -> ChainId {
        format!("sha256:{n:064x}").parse().unwrap()
    }

    fn chain(pool: &Pool, n: u64, size: u64) {
        let Begin::Create(mut p) = pool.begin_chain(&id(n), None).unwrap() else {
            panic!("chain {n} exists")
        };
        std::fs::write(p.rootfs().join("f"), n.to_string()).unwrap();
        p.set_layer_size(size);
        drop(p.commit().unwrap());
        // Distinct last-use times.
        std::thread::sleep(Duration::from_millis(5));
    }

    fn ids(pool: &Pool) -> Vec<ChainId> {
        pool.list().unwrap().into_iter().map(|c| c.id).collect()
    }

    #[test]
    fn watermarks_are_fractions_or_sizes_and_checked() {
        let w = Watermarks::new(1000, Watermarks::DEFAULT_HIGH, Watermarks::DEFAULT_LOW).unwrap();
        assert_eq!((w.high, w.low), (900, 750));
        let w = Watermarks::new(1000, Level::Bytes(800), Level::Fraction(0.5)).unwrap();
        assert_eq!((w.high, w.low), (800, 500));
        assert!(Watermarks::new(1000, Level::Bytes(1001), Level::Bytes(10)).is_err());
        assert!(Watermarks::new(1000, Level::Fraction(0.5), Level::Fraction(0.6)).is_err());
    }

    /// Above the high watermark, least recently used chains go until the pool is under
    /// the low one; chains in use (a build's handle, a workspace snapshot being used,
    /// a chain being created) never go; between the watermarks nothing happens.
    #[test]
    fn collection_goes_down_to_the_low_watermark_and_never_removes_a_chain_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path().join("pool"), PoolOptions::default()).unwrap();
        for n in 1..=6 {
            chain(&pool, n, 100);
        }
        // In use: chain 1 by a build (its base), chain 2 by a workspace made from it
        // (the handle lives as long as the snapshot is used).
        let base = pool.chain(&id(1)).unwrap().unwrap();
        let snapped = pool.chain(&id(2)).unwrap().unwrap();
        let ws = pool
            .workspace(WorkspaceOptions {
                overlay_dirs: false,
                snapshot_of: Some(&snapped),
            })
            .unwrap();
        // Chain 7 is being created (a pending chain holds its create lock).
        let Begin::Create(pending) = pool.begin_chain(&id(7), None).unwrap() else {
            panic!("chain 7 exists")
        };
        // Everything must go (low 50): all but what is in use does.
        let r = pool.collect_to(&Watermarks { high: 450, low: 50 }).unwrap();
        let removed: Vec<ChainId> = r.removed.iter().map(|c| c.id.clone()).collect();
        assert_eq!(removed, vec![id(3), id(4), id(5), id(6)], "{r:?}");
        assert_eq!(r.skipped_in_use, vec![id(1), id(2)]);
        assert_eq!((r.bytes_before, r.bytes_after), (600, 200));
        assert_eq!(ids(&pool), vec![id(1), id(2)]);
        assert!(base.rootfs().join("f").exists());
        assert!(ws.rootfs().unwrap().join("f").exists());
        // The chain being created was left alone and is published.
        drop(pending.commit().unwrap());
        assert_eq!(ids(&pool), vec![id(1), id(2), id(7)]);

        // Between the watermarks (400 of 450): nothing, even with chains no one uses.
        let marks = Watermarks {
            high: 450,
            low: 250,
        };
        drop((base, ws, snapped));
        chain(&pool, 8, 100);
        chain(&pool, 9, 100);
        let r = pool.collect_to(&marks).unwrap();
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(ids(&pool).len(), 5);

        // Over again (500), with everything in use: nothing can go, nothing breaks.
        chain(&pool, 10, 100);
        let held: Vec<_> = ids(&pool)
            .iter()
            .map(|i| pool.chain(i).unwrap().unwrap())
            .collect();
        let r = pool.collect_to(&marks).unwrap();
        assert!(r.removed.is_empty());
        assert_eq!(r.skipped_in_use.len(), 6);
        drop(held);
        // Let go: the least recently used go first (the handles just taken bumped the
        // chains' uses in id order) until at most 250 remain.
        let r = pool.collect_to(&marks).unwrap();
        let removed: Vec<ChainId> = r.removed.iter().map(|c| c.id.clone()).collect();
        assert_eq!(removed, vec![id(1), id(2), id(7), id(8)], "{r:?}");
        assert_eq!(r.bytes_after, 200);
    }

    #[tokio::test]
    async fn the_background_collector_collects() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path().join("pool"), PoolOptions::default()).unwrap();
        for n in 1..=3 {
            chain(&pool, n, 100);
        }
        let task = pool.spawn_collector(
            Watermarks {
                high: 150,
                low: 100,
            },
            Duration::from_millis(20),
        );
        for _ in 0..500 {
            if ids(&pool).len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert_eq!(ids(&pool), vec![id(3)]);
    }
}

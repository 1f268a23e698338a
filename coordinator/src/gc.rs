//! Garbage collection: the action cache's age and size policy, then a mark-and-sweep of
//! the blob store, then the databases' free pages given back.
//!
//! **Mark.** A blob is referenced when one of these names it:
//! - an action cache entry that the policy keeps (its config and layers);
//! - a build the state keeps, finished or not (each layer's recorded result: config and
//!   layers; its manifest, which is what a tag or an output names);
//! - an unfinished build's uploaded context (its files; a restarted coordinator
//!   materialises the context from them).
//!
//! **Sweep.** Every other blob goes, unless it is young: last written within the grace
//! period (`--gc-grace`), or used by this process (read, checked for, written) within
//! it. That is what keeps a build in flight safe without stopping it: the blobs it
//! uploads are young; an old blob it found present (a client's `FindMissing`, a
//! worker's result checked before it is cached, an http import reused) was used just
//! now; and a `file://` blob written again is made young again. The age is looked up
//! again just before each delete. A collector in another process than the builds
//! (`farm gc` beside a running `farm submit`) relies on the ages alone: an old blob
//! that the other process only *reads* for a build that started before the collection
//! can go; give such a build a grace period longer than it runs.
//!
//! **Bounded.** The cache and the state are read a page at a time (each page one short
//! read, never a long lock), entries are evicted and blobs deleted in batches, and the
//! listing is streamed, so a collection holds the set of referenced digests and one
//! batch in memory, and scheduling goes on meanwhile.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use farm_image::{BlobStore, Digest, ListedBlob};
use farm_model::BuiltImage;
use futures::StreamExt;
use serde::Serialize;

use crate::cache::{ActionCache, CacheError};
use crate::state::{BuildState, StateError, StateStore};

/// What a collection keeps and removes (`farm coordinator` and `farm gc` flags of the
/// same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcPolicy {
    /// Blobs written or used more recently than this are never removed (`--gc-grace`).
    pub grace: Duration,
    /// Action cache entries not hit for this long are evicted (`--cache-max-age`).
    pub cache_max_age: Option<Duration>,
    /// When the blobs the action cache references add up to more than this, the least
    /// recently used entries are evicted until they fit (`--cache-max-size`).
    pub cache_max_size: Option<u64>,
    /// Forget finished builds beyond the newest N first (their statuses, events and
    /// logs, as `--keep-builds` does after each build), so that what only they
    /// reference is collected too; `None` keeps every build the state holds.
    pub keep_builds: Option<usize>,
    /// Entries evicted, layers read and blobs deleted per batch.
    pub batch: usize,
}

impl GcPolicy {
    /// The default of `--gc-grace`: one hour.
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
    /// The default of `--cache-max-age`: 30 days.
    pub const DEFAULT_CACHE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Free database pages given back after a collection.
    const VACUUM_PAGES: u32 = 10_000;
}

impl Default for GcPolicy {
    /// A grace period of an hour, entries evicted after 30 days without a hit, no size
    /// limit, batches of 500.
    fn default() -> Self {
        GcPolicy {
            grace: Self::DEFAULT_GRACE,
            cache_max_age: Some(Self::DEFAULT_CACHE_MAX_AGE),
            cache_max_size: None,
            keep_builds: None,
            batch: 500,
        }
    }
}

/// When the coordinator collects (`--gc-interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcConfig {
    /// Time between collections; `None` never collects on its own.
    pub interval: Option<Duration>,
    pub policy: GcPolicy,
}

impl GcConfig {
    /// The default of `--gc-interval`: one hour.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);

    /// No periodic collection (the embedded mode: `farm gc` collects).
    pub fn off() -> Self {
        GcConfig {
            interval: None,
            policy: GcPolicy::default(),
        }
    }
}

impl Default for GcConfig {
    /// Every hour, with the default [`GcPolicy`].
    fn default() -> Self {
        GcConfig {
            interval: Some(Self::DEFAULT_INTERVAL),
            policy: GcPolicy::default(),
        }
    }
}

/// What a collection removed (or, dry, would remove) and kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Finished builds forgotten ([`GcPolicy::keep_builds`]).
    pub builds_forgotten: u64,
    /// Action cache entries evicted (too old, over the size, or unreadable).
    pub cache_evicted: u64,
    /// Entries kept.
    pub cache_kept: u64,
    /// Bytes of the blobs the kept entries reference.
    pub cache_bytes: u64,
    /// Blobs in the store, and their bytes, before the collection.
    pub blobs_listed: u64,
    pub bytes_listed: u64,
    /// Blobs kept because something references them.
    pub blobs_referenced: u64,
    /// Blobs kept because they are younger than the grace period (or used lately).
    pub blobs_young: u64,
    /// Blobs removed and their bytes.
    pub blobs_removed: u64,
    pub bytes_removed: u64,
    /// Staging objects (unnamed uploads left behind) removed and their bytes.
    pub staging_removed: u64,
    pub staging_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("blob store: {0}")]
    Blobs(#[from] farm_image::Error),
}

/// One collection over `state`, `cache` and `blobs`; with `dry_run` nothing is
/// removed and the report says what would be.
pub async fn collect(
    state: &StateStore,
    cache: &ActionCache,
    blobs: &BlobStore,
    policy: &GcPolicy,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let start = SystemTime::now();
    let cutoff = start
        .checked_sub(policy.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // Uses are remembered beyond the grace period and one long collection.
    blobs
        .recent()
        .keep_for(policy.grace * 2 + Duration::from_secs(3600));
    let batch = policy.batch.max(1);
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let mut referenced: HashSet<Digest> = HashSet::new();

    evict_and_mark_cache(cache, policy, start, dry_run, &mut referenced, &mut report).await?;
    let forgotten = match policy.keep_builds {
        None => HashSet::new(),
        Some(keep) => forget_builds(state, keep, dry_run).await?,
    };
    report.builds_forgotten = forgotten.len() as u64;
    mark_builds(state, batch, &forgotten, &mut referenced).await?;

    let mut listing = blobs.list_blobs();
    let mut doomed: Vec<ListedBlob> = Vec::with_capacity(batch);
    while let Some(blob) = listing.next().await {
        let blob = blob?;
        report.blobs_listed += 1;
        report.bytes_listed += blob.size;
        if referenced.contains(&blob.digest) {
            report.blobs_referenced += 1;
        } else if blob.modified >= cutoff || blobs.recent().used_since(&blob.digest, cutoff) {
            report.blobs_young += 1;
        } else {
            doomed.push(blob);
            if doomed.len() >= batch {
                sweep(blobs, &mut doomed, cutoff, dry_run, &mut report).await?;
            }
        }
    }
    sweep(blobs, &mut doomed, cutoff, dry_run, &mut report).await?;

    let staging = blobs.sweep_staging(cutoff, dry_run).await?;
    report.staging_removed = staging.objects;
    report.staging_bytes = staging.bytes;

    if !dry_run {
        cache.vacuum(GcPolicy::VACUUM_PAGES).await?;
        crate::db::incremental_vacuum(state.pool(), GcPolicy::VACUUM_PAGES)
            .await
            .map_err(|e| state.err(e))?;
    }
    tracing::info!(
        dry_run,
        cache_evicted = report.cache_evicted,
        blobs_removed = report.blobs_removed,
        bytes_removed = report.bytes_removed,
        blobs_referenced = report.blobs_referenced,
        blobs_young = report.blobs_young,
        elapsed_ms = start.elapsed().map_or(0, |d| d.as_millis() as u64),
        "garbage collection"
    );
    Ok(report)
}

/// The blobs an image names.
fn image_blobs(image: &BuiltImage) -> impl Iterator<Item = (Digest, u64)> + '_ {
    std::iter::once((image.config_digest.as_str(), image.config_size))
        .chain(image.layers.iter().map(|l| (l.digest.as_str(), l.size)))
        .filter_map(|(d, size)| Some((Digest::parse(d).ok()?, size)))
}

/// Walk the cache from the most recently used entry down: an entry older than the
/// maximum age, one that does not fit under the maximum size once the more recently
/// used ones are counted (and every older one after it), or an unreadable one is
/// evicted; the blobs of the others are marked.
async fn evict_and_mark_cache(
    cache: &ActionCache,
    policy: &GcPolicy,
    now: SystemTime,
    dry_run: bool,
    referenced: &mut HashSet<Digest>,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let oldest = policy
        .cache_max_age
        .map(|age| now.saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX)));
    let mut after: Option<(i64, String)> = None;
    let mut over_size = false;
    let mut evict: Vec<String> = Vec::new();
    loop {
        let page = cache
            .page_by_use(after.as_ref(), policy.batch.max(1))
            .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.last_used, last.key.clone()));
        for entry in page {
            let keep = match &entry.image {
                None => false,
                Some(_) if oldest.is_some_and(|o| entry.last_used < o) => false,
                Some(_) if over_size => false,
                Some(image) => {
                    let new: Vec<(Digest, u64)> = image_blobs(image)
                        .filter(|(d, _)| !referenced.contains(d))
                        .collect();
                    let mut unique: Vec<&(Digest, u64)> = new.iter().collect();
                    unique.sort_by(|a, b| a.0.cmp(&b.0));
                    unique.dedup_by(|a, b| a.0 == b.0);
                    let bytes: u64 = unique.iter().map(|(_, s)| *s).sum();
                    if policy
                        .cache_max_size
                        .is_some_and(|max| report.cache_bytes.saturating_add(bytes) > max)
                    {
                        over_size = true;
                        false
                    } else {
                        report.cache_bytes += bytes;
                        referenced.extend(new.into_iter().map(|(d, _)| d));
                        true
                    }
                }
            };
            if keep {
                report.cache_kept += 1;
            } else {
                report.cache_evicted += 1;
                evict.push(entry.key);
            }
        }
        // Evicting behind the cursor: the pages ahead are unaffected.
        if !dry_run && evict.len() >= policy.batch.max(1) {
            cache.remove_many(&std::mem::take(&mut evict)).await?;
        }
    }
    if !dry_run && !evict.is_empty() {
        cache.remove_many(&evict).await?;
    }
    // An entry hit while the walk ran moved ahead of the cursor: mark it too. (A hit in
    // this process also marks its blobs used, which spares them anyway.)
    let mut after: Option<(i64, String)> = None;
    'hits: loop {
        let page = cache
            .page_by_use(after.as_ref(), policy.batch.max(1))
            .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.last_used, last.key.clone()));
        for entry in page {
            if entry.last_used < now {
                break 'hits;
            }
            if let Some(image) = &entry.image {
                referenced.extend(image_blobs(image).map(|(d, _)| d));
            }
        }
    }
    Ok(())
}

/// Forget finished builds beyond the newest `keep` (dry: only say which); the ids.
async fn forget_builds(
    state: &StateStore,
    keep: usize,
    dry_run: bool,
) -> Result<HashSet<String>, GcError> {
    // The same choice as `StateStore::prune_finished`, which does the forgetting (and
    // whatever else forgetting a build involves).
    let doomed: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM builds WHERE state IN (?1, ?2, ?3)
         ORDER BY created_ms DESC, id DESC LIMIT -1 OFFSET ?4",
    )
    .bind(BuildState::Succeeded.as_str())
    .bind(BuildState::Failed.as_str())
    .bind(BuildState::Cancelled.as_str())
    .bind(i64::try_from(keep).unwrap_or(i64::MAX))
    .fetch_all(state.pool())
    .await
    .map_err(|e| state.err(e))?;
    if !dry_run {
        state.prune_finished(keep).await?;
    }
    Ok(doomed.into_iter().map(|(id,)| id).collect())
}

/// Mark what the builds in the state reference (but those `forgotten`): every
/// recorded layer result and manifest, and the uploaded context files of unfinished
/// builds.
async fn mark_builds(
    state: &StateStore,
    batch: usize,
    forgotten: &HashSet<String>,
    referenced: &mut HashSet<Digest>,
) -> Result<(), GcError> {
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    let mut after = 0i64;
    loop {
        let rows: Vec<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT rowid, build_id, result, manifest_digest FROM layers
             WHERE rowid > ?1 AND (result IS NOT NULL OR manifest_digest IS NOT NULL)
             ORDER BY rowid LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(state.pool())
        .await
        .map_err(|e| state.err(e))?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (_, build, result, manifest) in rows {
            if forgotten.contains(&build) {
                continue;
            }
            if let Some(image) = result.and_then(|r| serde_json::from_str::<BuiltImage>(&r).ok()) {
                referenced.extend(image_blobs(&image).map(|(d, _)| d));
            }
            if let Some(d) = manifest.and_then(|m| Digest::parse(&m).ok()) {
                referenced.insert(d);
            }
        }
    }
    // Specs can be large (a context lists many files): a few at a time.
    let mut after = 0i64;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT rowid, spec FROM builds WHERE rowid > ?1 AND state IN (?2, ?3)
             ORDER BY rowid LIMIT 16",
        )
        .bind(after)
        .bind(BuildState::Queued.as_str())
        .bind(BuildState::Running.as_str())
        .fetch_all(state.pool())
        .await
        .map_err(|e| state.err(e))?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (_, spec) in rows {
            if let Ok(spec) = serde_json::from_str::<crate::farm::Submission>(&spec) {
                referenced.extend(
                    spec.context
                        .iter()
                        .filter_map(|f| Digest::parse(&f.digest).ok()),
                );
            }
        }
    }
    Ok(())
}

/// Delete (or, dry, count) a batch of unreferenced old blobs, several at a time.
async fn sweep(
    blobs: &BlobStore,
    doomed: &mut Vec<ListedBlob>,
    cutoff: SystemTime,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let batch = std::mem::take(doomed);
    if dry_run {
        report.blobs_removed += batch.len() as u64;
        report.bytes_removed += batch.iter().map(|b| b.size).sum::<u64>();
        return Ok(());
    }
    let mut deletions = futures::stream::iter(batch)
        .map(|b| {
            let blobs = blobs.clone();
            async move { blobs.delete_if_older(&b.digest, cutoff).await }
        })
        .buffer_unordered(16);
    while let Some(done) = deletions.next().await {
        match done? {
            Some(size) => {
                report.blobs_removed += 1;
                report.bytes_removed += size;
            }
            // Written or used again since it was listed.
            None => report.blobs_young += 1,
        }
    }
    // Between batches: let the scheduler's tasks run.
    tokio::task::yield_now().await;
    Ok(())
}

/// Garbage collection metrics (rendered with the coordinator's others).
#[derive(Debug, Default)]
pub struct GcCounters {
    runs: AtomicU64,
    failures: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
    cache_evicted: AtomicU64,
}

impl GcCounters {
    /// A collection ended with `report` (dry runs count nothing).
    pub fn collected(&self, report: &GcReport) {
        if report.dry_run {
            return;
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.blobs.fetch_add(
            report.blobs_removed + report.staging_removed,
            Ordering::Relaxed,
        );
        self.bytes.fetch_add(
            report.bytes_removed + report.staging_bytes,
            Ordering::Relaxed,
        );
        self.cache_evicted
            .fetch_add(report.cache_evicted, Ordering::Relaxed);
    }

    /// A collection failed.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, v) in [
            (
                "farm_gc_runs_total",
                "Garbage collections that completed.",
                &self.runs,
            ),
            (
                "farm_gc_failures_total",
                "Garbage collections that failed.",
                &self.failures,
            ),
            (
                "farm_gc_blobs_removed_total",
                "Blobs (and stale uploads) garbage collection removed.",
                &self.blobs,
            ),
            (
                "farm_gc_bytes_removed_total",
                "Bytes of the blobs garbage collection removed.",
                &self.bytes,
            ),
            (
                "farm_gc_cache_evicted_total",
                "Action cache entries evicted by age or size.",
                &self.cache_evicted,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests;

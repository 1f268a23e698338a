//! `farm gc`: garbage collection of this machine's state (the one `farm build` and
//! `farm submit` without a coordinator use): the action cache's age and size policy,
//! blobs nothing references, the databases' free pages, and optionally the pool.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use farm_coordinator::cache::ActionCache;
use farm_coordinator::gc::{GcReport, collect};
use farm_coordinator::state::StateStore;
use farm_image::BlobStore;

use super::layers::StateArgs;
use crate::local::block_on;

/// Remove what this machine's builds no longer need: action cache entries past their
/// age or beyond the size limit, then every blob that no kept cache entry and no kept
/// build references and that is older than --gc-grace.
///
/// A coordinator collects its shared store on its own (`farm coordinator
/// --gc-interval`). Run `farm gc --dry-run` first to see what would go.
#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    #[command(flatten)]
    pub state: StateArgs,

    /// Say what would be removed; remove nothing
    #[arg(long, short = 'n')]
    pub dry_run: bool,

    #[command(flatten)]
    pub policy: crate::gc_args::GcPolicyArgs,

    /// Forget finished builds beyond the newest N first (their statuses, events and
    /// logs), so that blobs only they reference go too [default: keep every build the
    /// state holds: `farm build` keeps the newest 100]
    #[arg(long, value_name = "N")]
    pub keep_builds: Option<usize>,

    /// Also remove the pool's least recently used chains until it is below SIZE (e.g.
    /// 20G); a chain a running build uses is kept
    #[arg(long, value_name = "SIZE", value_parser = super::build::parse_size)]
    pub pool_max_size: Option<u64>,

    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: GcArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let layout = args.state.layout();
        let dir = &layout.state_dir;
        if !dir.join("blobs").is_dir() && !dir.join("cache.db").exists() {
            println!("farm gc: nothing to collect: no state in {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        let blobs = BlobStore::local(&dir.join("blobs"))
            .with_context(|| format!("opening the blob store in {}", dir.display()))?;
        let cache = ActionCache::open(&dir.join("cache.db")).await?;
        let state = StateStore::open(&dir.join("state.db")).await?;
        let policy = farm_coordinator::gc::GcPolicy {
            keep_builds: args.keep_builds,
            ..args.policy.policy()
        };
        let report = collect(&state, &cache, &blobs, &policy, args.dry_run)
            .await
            .with_context(|| format!("collecting garbage in {}", dir.display()))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", summary(&report, &args.policy));
        }
        if let Some(max) = args.pool_max_size {
            collect_pool(&layout, max, args.dry_run).await?;
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// The pool's least recently used chains until it is below `max` (a dry run lists
/// what the pool holds).
async fn collect_pool(
    layout: &crate::common::Layout,
    max: u64,
    dry_run: bool,
) -> anyhow::Result<()> {
    if !layout.pool.is_dir() {
        return Ok(());
    }
    if dry_run {
        let pool_dir = layout.pool.clone();
        let usage = tokio::task::spawn_blocking(move || {
            farm_worker::pool::Pool::open(&pool_dir, Default::default())?.usage()
        })
        .await??;
        println!(
            "pool: {} in chains; would remove the least recently used down to {}",
            bytes(usage),
            bytes(max)
        );
        return Ok(());
    }
    let local = crate::local::Local::open(
        layout.clone(),
        crate::run_limits::RunLimitArgs::default()
            .engine_options(farm_worker::engine::BindPolicy::Unrestricted),
    )
    .await?;
    let pool = local.pool.clone();
    let r = tokio::task::spawn_blocking(move || pool.gc(max)).await??;
    println!(
        "pool: removed {} chains ({} -> {}); {} in use kept",
        r.removed.len(),
        bytes(r.bytes_before),
        bytes(r.bytes_after),
        r.skipped_in_use.len()
    );
    Ok(())
}

/// The report as people read it.
fn summary(r: &GcReport, policy: &crate::gc_args::GcPolicyArgs) -> String {
    let (evict, remove) = if r.dry_run {
        ("would evict", "would remove")
    } else {
        ("evicted", "removed")
    };
    let mut out = String::new();
    if r.builds_forgotten > 0 {
        out += &format!(
            "builds: {} {}\n",
            if r.dry_run { "would forget" } else { "forgot" },
            r.builds_forgotten
        );
    }
    out += &format!(
        "action cache: {} entries kept ({} of blobs), {evict} {}\n",
        r.cache_kept,
        bytes(r.cache_bytes),
        r.cache_evicted
    );
    out += &format!(
        "blobs: {} ({}): {} referenced, {} younger than {} or in use, {remove} {} ({})\n",
        r.blobs_listed,
        bytes(r.bytes_listed),
        r.blobs_referenced,
        r.blobs_young,
        humantime::format_duration(policy.gc_grace),
        r.blobs_removed,
        bytes(r.bytes_removed)
    );
    if r.staging_removed > 0 {
        out += &format!(
            "unfinished uploads: {remove} {} ({})\n",
            r.staging_removed,
            bytes(r.staging_bytes)
        );
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_read_as_sentences() {
        let policy = crate::gc_args::GcPolicyArgs {
            gc_grace: std::time::Duration::from_secs(3600),
            cache_max_age: std::time::Duration::from_secs(86400),
            cache_max_size: None,
        };
        let r = GcReport {
            dry_run: true,
            cache_kept: 2,
            cache_evicted: 1,
            cache_bytes: 2048,
            blobs_listed: 10,
            bytes_listed: 5 << 20,
            blobs_referenced: 6,
            blobs_young: 1,
            blobs_removed: 3,
            bytes_removed: 3 << 20,
            ..GcReport::default()
        };
        assert_eq!(
            summary(&r, &policy),
            "action cache: 2 entries kept (2.0 KiB of blobs), would evict 1\n\
             blobs: 10 (5.0 MiB): 6 referenced, 1 younger than 1h or in use, would remove 3 (3.0 MiB)\n"
        );
    }
}

//! Garbage collection flags: the policy shared by `farm coordinator` and `farm gc`, and
//! the coordinator's interval. What each does: `farm_coordinator::gc`.

use std::time::Duration;

use clap::Args;
use farm_coordinator::gc::{GcConfig, GcPolicy};
use farm_worker::pool::{Level, Watermarks};

use crate::cmd::build::parse_size;
use crate::run_limits::parse_duration;

#[derive(Debug, Clone, Args)]
pub(crate) struct GcPolicyArgs {
    /// Never remove a blob written or used more recently than this: what protects the
    /// blobs of builds in flight (seconds, or a duration such as 30m, 1h)
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        value_parser = parse_duration,
        env = "FARM_GC_GRACE"
    )]
    pub gc_grace: Duration,

    /// Evict action cache entries not hit for this long (e.g. 30d, 12h; 0: never); a
    /// layer whose entry went is built again next time
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30d",
        value_parser = parse_duration,
        env = "FARM_CACHE_MAX_AGE"
    )]
    pub cache_max_age: Duration,

    /// Evict the least recently used action cache entries while the blobs the entries
    /// reference add up to more than SIZE (e.g. 200G) [default: no limit]
    #[arg(long, value_name = "SIZE", value_parser = parse_size, env = "FARM_CACHE_MAX_SIZE")]
    pub cache_max_size: Option<u64>,
}

impl GcPolicyArgs {
    pub(crate) fn policy(&self) -> GcPolicy {
        GcPolicy {
            grace: self.gc_grace,
            cache_max_age: Some(self.cache_max_age).filter(|a| !a.is_zero()),
            cache_max_size: self.cache_max_size,
            ..GcPolicy::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct CoordinatorGcArgs {
    /// Collect garbage this often, in the background: evict action cache entries by
    /// --cache-max-age/--cache-max-size, remove blobs nothing references that are older
    /// than --gc-grace, give the databases' free pages back (0: never)
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        value_parser = parse_duration,
        env = "FARM_GC_INTERVAL"
    )]
    pub gc_interval: Duration,

    #[command(flatten)]
    pub policy: GcPolicyArgs,
}

impl CoordinatorGcArgs {
    pub(crate) fn config(&self) -> GcConfig {
        GcConfig {
            interval: Some(self.gc_interval).filter(|i| !i.is_zero()),
            policy: self.policy.policy(),
        }
    }
}

/// `farm worker`'s pool collection (`farm_worker::pool::Watermarks`).
#[derive(Debug, Clone, Args)]
pub(crate) struct PoolGcArgs {
    /// Keep the pool's chains (extracted layer stacks) under SIZE (e.g. 200G): above
    /// --pool-high-watermark the least recently used chains not in use are removed, in
    /// the background, down to --pool-low-watermark [default: no limit]
    #[arg(long, value_name = "SIZE", value_parser = parse_size, env = "FARM_POOL_MAX_SIZE")]
    pub pool_max_size: Option<u64>,

    /// Where pool collection starts: a fraction of --pool-max-size (0.9, 90%) or a size
    #[arg(
        long,
        value_name = "LEVEL",
        default_value = "0.9",
        value_parser = parse_level,
        env = "FARM_POOL_HIGH_WATERMARK"
    )]
    pub pool_high_watermark: Level,

    /// Where pool collection stops: a fraction of --pool-max-size (0.75, 75%) or a size
    #[arg(
        long,
        value_name = "LEVEL",
        default_value = "0.75",
        value_parser = parse_level,
        env = "FARM_POOL_LOW_WATERMARK"
    )]
    pub pool_low_watermark: Level,
}

/// How often a worker looks at its pool's size.
pub(crate) const POOL_CHECK_EVERY: Duration = Duration::from_secs(30);

impl PoolGcArgs {
    /// The watermarks, when the pool has a maximum size.
    pub(crate) fn watermarks(&self) -> anyhow::Result<Option<Watermarks>> {
        let Some(max) = self.pool_max_size else {
            return Ok(None);
        };
        Watermarks::new(max, self.pool_high_watermark, self.pool_low_watermark)
            .map(Some)
            .map_err(|e| {
                anyhow::anyhow!("{e} (see --pool-high-watermark and --pool-low-watermark)")
            })
    }
}

/// `0.9`, `90%` (of the maximum) or a size (`18G`).
fn parse_level(s: &str) -> Result<Level, String> {
    let s = s.trim();
    let fraction = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().map(|p| p / 100.0),
        None if s.contains('.') => s.parse::<f64>().ok(),
        None => None,
    };
    match fraction {
        Some(f) if f > 0.0 && f <= 1.0 => Ok(Level::Fraction(f)),
        Some(_) => Err(format!(
            "'{s}' is not a fraction of the maximum size between 0 and 1 (like 0.9 or 90%)"
        )),
        None => parse_size(s)
            .map(Level::Bytes)
            .map_err(|_| format!("'{s}' is neither a fraction (0.9, 90%) nor a size (18G)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_fractions_or_sizes() {
        assert_eq!(parse_level("0.9"), Ok(Level::Fraction(0.9)));
        assert_eq!(parse_level("75%"), Ok(Level::Fraction(0.75)));
        assert_eq!(parse_level("18G"), Ok(Level::Bytes(18 << 30)));
        assert!(parse_level("1.5").is_err());
        assert!(parse_level("lots").is_err());
    }
}

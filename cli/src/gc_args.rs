//! Garbage collection flags: the policy shared by `farm coordinator` and `farm gc`, and
//! the coordinator's interval. What each does: `farm_coordinator::gc`.

use std::time::Duration;

use clap::Args;
use farm_coordinator::gc::{GcConfig, GcPolicy};

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

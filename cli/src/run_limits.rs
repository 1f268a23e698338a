//! The worker's limits on a layer's `run` (`farm worker`, and the embedded worker of
//! `farm build`/`farm submit`): the default and largest timeout, and the network.

use std::time::Duration;

use clap::Args;
use clap::builder::TypedValueParser;
use farm_stackerfile::Network;
use farm_worker::SandboxProc;
use farm_worker::cgroup::{CgroupLimits, Delegation};
use farm_worker::engine::{BindPolicy, EngineOptions};

/// Default `--run-timeout`: long enough for big compiles, short enough that a hung
/// build gives its slot back the same day.
pub(crate) const DEFAULT_RUN_TIMEOUT: &str = "2h";
/// Default `--max-run-timeout`: the most a layer's `run_timeout` may ask for.
pub(crate) const DEFAULT_MAX_RUN_TIMEOUT: &str = "24h";

#[derive(Debug, Clone, Args)]
pub(crate) struct RunLimitArgs {
    /// Kill a layer's run after this long when the layer sets no run_timeout: seconds,
    /// or a duration such as 90s, 10m, 2h; 0 means no limit
    #[arg(
        long = "run-timeout",
        visible_alias = "timeout",
        value_name = "DURATION",
        default_value = DEFAULT_RUN_TIMEOUT,
        value_parser = parse_duration,
        env = "FARM_RUN_TIMEOUT"
    )]
    pub run_timeout: Duration,

    /// The longest run a layer may ask for with its run_timeout (0: no ceiling)
    #[arg(
        long,
        value_name = "DURATION",
        default_value = DEFAULT_MAX_RUN_TIMEOUT,
        value_parser = parse_duration,
        env = "FARM_MAX_RUN_TIMEOUT"
    )]
    pub max_run_timeout: Duration,

    /// The network of run: host (the worker's, as stacker does) or none (a network
    /// namespace with only loopback; wins over a layer's network: host)
    #[arg(
        long,
        value_name = "MODE",
        default_value = "host",
        env = "FARM_NETWORK"
    )]
    pub network: Network,

    /// pids.max of each build, when the worker runs in a delegated cgroup v2 (see
    /// `farm check`); 0: no limit
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PIDS_MAX, env = "FARM_PIDS_MAX")]
    pub pids_max: u64,

    /// memory.max of each build (e.g. 8G), when the worker runs in a delegated cgroup
    /// v2; 0: no limit [default: 3/4 of the machine's memory]
    #[arg(long, value_name = "SIZE", value_parser = crate::cmd::build::parse_size, env = "FARM_MEMORY_MAX")]
    pub memory_max: Option<u64>,

    /// The processes and /proc of run: fresh (a pid namespace of its own, with a fresh
    /// procfs) or host (the worker's pid namespace and its /proc bound read-only; for
    /// containers with a masked /proc, such as pods without a user namespace, where the
    /// kernel refuses a fresh procfs; builds then see the container's processes, see
    /// README.md "The build sandbox")
    #[arg(
        long,
        value_name = "MODE",
        default_value = "fresh",
        value_parser = clap::builder::PossibleValuesParser::new(SandboxProc::VALUES)
            .map(|s| s.parse::<SandboxProc>().expect("a listed value")),
        env = "FARM_SANDBOX_PROC"
    )]
    pub sandbox_proc: SandboxProc,
}

/// Default `--pids-max`: plenty for parallel compiles, far from a machine's limit.
pub(crate) const DEFAULT_PIDS_MAX: u64 = 4096;

impl Default for RunLimitArgs {
    fn default() -> Self {
        RunLimitArgs {
            run_timeout: parse_duration(DEFAULT_RUN_TIMEOUT).expect("valid default"),
            max_run_timeout: parse_duration(DEFAULT_MAX_RUN_TIMEOUT).expect("valid default"),
            network: Network::Host,
            pids_max: DEFAULT_PIDS_MAX,
            memory_max: None,
            sandbox_proc: SandboxProc::Fresh,
        }
    }
}

impl RunLimitArgs {
    /// The engine's options from these flags; `binds` says which host paths jobs may mount.
    pub(crate) fn engine_options(&self, binds: BindPolicy) -> EngineOptions {
        let limit = |d: Duration| (!d.is_zero()).then_some(d);
        EngineOptions {
            timeout: limit(self.run_timeout),
            max_timeout: limit(self.max_run_timeout),
            network: self.network,
            cgroup: None,
            compression_threads: 0,
            binds,
            extract: Default::default(),
            sandbox_proc: self.sandbox_proc,
        }
    }

    /// The per-build cgroup limits these flags ask for.
    pub(crate) fn cgroup_limits(&self) -> CgroupLimits {
        let memory = match self.memory_max {
            Some(0) => None,
            Some(m) => Some(m),
            None => mem_total().map(|t| t / 4 * 3),
        };
        CgroupLimits {
            pids_max: (self.pids_max > 0).then_some(self.pids_max),
            memory_max: memory,
        }
    }

    /// [`engine_options`](Self::engine_options) for a process that builds (`farm worker`,
    /// `farm build`): when it runs in a delegated cgroup v2 it moves into a leaf of it
    /// and each run gets the limits; otherwise it says so in the log.
    pub(crate) fn engine_options_with_cgroup(&self, binds: BindPolicy) -> EngineOptions {
        let mut options = self.engine_options(binds);
        let limits = self.cgroup_limits();
        if limits == CgroupLimits::default() {
            return options;
        }
        match Delegation::enter(limits) {
            Ok(d) => {
                tracing::info!(cgroup = %d.backend(), ?limits, "builds get cgroup limits");
                options.cgroup = Some(d);
            }
            Err(e) => tracing::info!(
                reason = %e,
                "builds run without pids/memory limits (no delegated cgroup; see farm check)"
            ),
        }
        options
    }
}

/// MemTotal of /proc/meminfo in bytes.
pub(crate) fn mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Whole seconds, or a humantime duration (`90s`, `10m`, `1h 30m`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration ({e}); for example 600, 90s, 10m or 2h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_defaults() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("soon").is_err());
        let o = RunLimitArgs::default().engine_options(BindPolicy::Unrestricted);
        assert_eq!(o.timeout, Some(Duration::from_secs(7200)));
        assert_eq!(o.max_timeout, Some(Duration::from_secs(86400)));
        let none = RunLimitArgs {
            run_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(none.engine_options(BindPolicy::Unrestricted).timeout, None);
        assert_eq!(o.sandbox_proc, SandboxProc::Fresh);
        assert_eq!("host".parse(), Ok(SandboxProc::Host));
        assert!("shared".parse::<SandboxProc>().is_err());
    }
}

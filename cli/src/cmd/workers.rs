//! `farm workers`: the workers a coordinator knows.

use std::process::ExitCode;

use crate::client::{CoordinatorArg, StatusInWords, connect};
use crate::local::block_on;
use crate::states::{worker_json, workers_table};
use clap::Args;

/// List the workers that dialled in to the coordinator: their slots, the layers they are
/// building, when they were last heard from, and why one takes no work (an unusable
/// pool, for instance).
///
/// JSON (--json): [{"name", "slots", "running": [...], "last_seen", "platform",
/// "connected", "unavailable"}], where last_seen is RFC 3339 UTC text (null if never
/// seen) and "platform" and "unavailable" appear when set.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  farm workers\n  farm workers --json | jq '.[] | {name, running}'"
)]
pub(crate) struct WorkersArgs {
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

pub(crate) fn run(args: WorkersArgs) -> anyhow::Result<ExitCode> {
    let addr = args.coordinator.required("workers")?;
    block_on(async move {
        let mut client = connect(&addr).await?;
        let (workers, insecure) = client
            .workers_report()
            .await
            .map_err(|s| client.error("Workers", "", s))?;
        if insecure {
            eprintln!(
                "warning: the coordinator at {addr} is insecure: it serves a non-loopback \
                 address without TLS and tokens (--insecure); anyone who reaches it can \
                 submit builds and connect as a worker"
            );
        }
        if args.json {
            let all: Vec<_> = workers.iter().map(worker_json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else if workers.is_empty() {
            eprintln!("no workers have connected to {addr}");
        } else {
            print!("{}", workers_table(&workers));
        }
        Ok(ExitCode::SUCCESS)
    })?
}

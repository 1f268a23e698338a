//! `farm status`: the state of one build (optionally waiting for it to end), or of all.

use std::process::ExitCode;

use clap::Args;
use farm_proto::v1::{BuildState, BuildStatus};

use crate::client::{CoordinatorArg, StatusInWords, connect, watch};
use crate::local::block_on;
use crate::states::{list_table, status_json, status_table};

/// Show the state of a build and its layers, or of every build.
///
/// With an ID: the build's state (queued, running, succeeded, failed, cancelled) and each
/// layer's (waiting, running, built, cached, failed, skipped, cancelled), worker,
/// duration and manifest digest. Without: one line per build the coordinator knows.
/// --wait waits for the build to end (through coordinator restarts) and exits non-zero
/// unless it succeeded.
///
/// JSON (--json): {"id", "state", "layers": [{"name", "state", "worker", "cached",
/// "duration_ms", "manifest_digest"}]} plus "error" when there is one; without an ID, an
/// array of those.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm status\n  \
farm status 4f1c2a\n  \
farm status 4f1c2a --wait --json | jq -r .state")]
pub(crate) struct StatusArgs {
    /// The build id [default: every build]
    #[arg(value_name = "ID")]
    pub id: Option<String>,

    /// Wait until the build ends; exit 0 only if it succeeded
    #[arg(long, requires = "id")]
    pub wait: bool,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

pub(crate) fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let addr = args.coordinator.required("status")?;
    block_on(async move {
        let mut client = connect(&addr).await?;
        let Some(id) = args.id else {
            // The table shows counts of each build's layers: ask for only those.
            let builds = client
                .list(!args.json)
                .await
                .map_err(|s| client.error("List", "", s))?;
            if args.json {
                let all: Vec<_> = builds.iter().map(status_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", list_table(&builds));
            }
            return Ok(ExitCode::SUCCESS);
        };
        if args.wait {
            watch(&mut client, &id, |_| {}).await?;
        }
        let status = client
            .status(&id)
            .await
            .map_err(|s| client.error("Status", &id, s))?;
        print_status(&status, args.json)?;
        Ok(
            if !args.wait || status.state == BuildState::Succeeded as i32 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            },
        )
    })?
}

fn print_status(status: &BuildStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(status))?);
    } else {
        print!("{}", status_table(status));
    }
    Ok(())
}

//! `farm cancel`: stop a build.

use std::process::ExitCode;

use crate::client::{CoordinatorArg, StatusInWords, connect};
use crate::local::block_on;
use crate::states::build_word;
use clap::Args;

/// Cancel a build: its waiting layers will not run and its running layers are stopped on
/// their workers. Layers already built stay in the cache. Prints the build's state
/// afterwards (a build that had already ended keeps its state).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  farm cancel 4f1c2a\n  farm status --json | jq -r '.[] | select(.state == \"running\") | .id' | xargs -n1 farm cancel"
)]
pub(crate) struct CancelArgs {
    /// The build id
    #[arg(value_name = "ID")]
    pub id: String,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

pub(crate) fn run(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let addr = args.coordinator.required("cancel")?;
    block_on(async move {
        let mut client = connect(&addr).await?;
        let answer = client
            .cancel(&args.id)
            .await
            .map_err(|s| client.error("Cancel", &args.id, s))?;
        println!("{}", build_word(answer.state));
        Ok(ExitCode::SUCCESS)
    })?
}

//! `farm logs`: the log lines of a build.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Args;

use crate::client::{CoordinatorArg, StatusInWords, connect};
use crate::local::block_on;

/// Print the log lines of a build (every layer's, or one layer's).
///
/// Lines are kept by the coordinator, so this works during and after the build. Without
/// LAYER each line starts with `[layer] `. --follow keeps printing new lines until the
/// build ends.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm logs 4f1c2a\n  \
farm logs 4f1c2a app --follow\n  \
farm logs 4f1c2a | grep -i error")]
pub(crate) struct LogsArgs {
    /// The build id
    #[arg(value_name = "ID")]
    pub id: String,

    /// Only this layer's lines (printed without a prefix)
    #[arg(value_name = "LAYER")]
    pub layer: Option<String>,

    /// Keep printing new lines until the build ends
    #[arg(short, long)]
    pub follow: bool,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

pub(crate) fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let addr = args.coordinator.required("logs")?;
    block_on(async move {
        let mut client = connect(&addr).await?;
        if args.follow {
            // The build's event stream, which survives a coordinator restart (it resumes
            // after the last event seen): its log lines are the build's logs.
            let mut out = std::io::stdout().lock();
            let mut closed = false;
            crate::client::watch(&mut client, &args.id, |e| {
                let Some(farm_proto::v1::build_event::Kind::Log(line)) = &e.kind else {
                    return;
                };
                if closed || args.layer.as_ref().is_some_and(|l| *l != e.layer) {
                    return;
                }
                let written = if args.layer.is_some() {
                    writeln!(out, "{line}")
                } else {
                    writeln!(out, "[{}] {line}", e.layer)
                };
                closed = written.is_err();
            })
            .await?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut lines = client
            .logs(&args.id, args.layer.as_deref().unwrap_or_default())
            .await
            .map_err(|s| client.error("Logs", &args.id, s))?;
        let mut out = std::io::stdout().lock();
        loop {
            let line = match lines.message().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(s) => return Err(client.error("Logs", &args.id, s)),
            };
            let written = if args.layer.is_some() {
                writeln!(out, "{}", line.line)
            } else {
                writeln!(out, "[{}] {}", line.layer, line.line)
            };
            if written.is_err() {
                // stdout closed (e.g. `| head`): nothing more to do.
                break;
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

//! `farm token new NAME`: a fresh token for a client or a worker, and its line for the
//! coordinator's token file.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use farm_coordinator::auth::{new_token, token_line, valid_name};

/// Make tokens for the coordinator's --client-tokens and --worker-tokens files.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    New(NewTokenArgs),
}

/// Print a fresh random token for NAME and the line that lists it (`NAME sha256:HEX`).
///
/// The line goes in the coordinator's --client-tokens file (for a client) or
/// --worker-tokens file (for a worker, NAME being its --name); the token goes to the
/// client (--token-file or FARM_TOKEN) or worker (--token-file or FARM_WORKER_TOKEN). The
/// coordinator keeps only the hash. A name may have several lines: add the new token,
/// hand it out, then delete the old line (the coordinator reads the file again when it
/// changes).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm token new alice                                   # prints the token, then its line\n  \
farm token new w1 --token-file w1.token >> workers.tokens   # token to a file, line appended")]
pub(crate) struct NewTokenArgs {
    /// The principal: a client's name, or a worker's --name (A-Z a-z 0-9 . _ @ -)
    pub name: String,

    /// Write the token to this new file (mode 0600) and print only its line
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

pub(crate) fn run(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let TokenCommand::New(args) = args.command;
    if !valid_name(&args.name) {
        bail!(
            "'{}' is not a name: use 1 to 128 of A-Z a-z 0-9 . _ @ -",
            args.name
        );
    }
    let token = new_token().context("reading random bytes for the token")?;
    let line = token_line(&args.name, &token);
    match &args.token_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!(
                        "--token-file {}: cannot create it (it must not exist yet)",
                        path.display()
                    )
                })?;
            writeln!(f, "{token}").with_context(|| format!("writing {}", path.display()))?;
            println!("{line}");
        }
        None => {
            println!("{token}");
            println!("{line}");
            eprintln!(
                "farm token: the first line is the token (give it to {}; it is not stored \
                 anywhere), the second its line for the coordinator's --client-tokens or \
                 --worker-tokens file",
                args.name
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

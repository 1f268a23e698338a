//! `farm`: build OCI images from stackerfiles, rootless, on one machine or on a farm.
//!
//! This binary is the user's door: it parses arguments, runs the embedded coordinator and
//! worker when no coordinator is configured, and shows progress. The language lives in
//! `farm-stackerfile`, planning and scheduling in `farm-coordinator`, building in
//! `farm-worker`, talking to a remote coordinator in `farm-client`; nothing here
//! duplicates them.

mod client;
mod cmd;
mod common;
mod context;
mod embedded;
mod last_build;
mod local;
mod progress;
mod remote;
mod states;
#[cfg(test)]
mod test_coordinator;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build OCI images from stackerfiles, rootless, on one machine or on a build farm.
///
/// farm reads the stackerfiles you already use with stacker (layers with `from`,
/// `imports`, `run`, ...) and turns them into a DAG of image builds.
#[derive(Debug, Parser)]
#[command(name = "farm", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Start with `farm plan stacker.yaml` to see what would be built.\n\
Set FARM_LOG=debug for detailed logs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Plan(cmd::plan::PlanArgs),
    Build(cmd::build::BuildArgs),
    RecursiveBuild(cmd::build::RecursiveBuildArgs),
    Grab(cmd::layers::GrabArgs),
    Chroot(cmd::layers::ChrootArgs),
    Inspect(cmd::layers::InspectArgs),
    Clean(cmd::layers::CleanArgs),
    Check(cmd::check::CheckArgs),
    Setup(cmd::setup::SetupArgs),
    Submit(cmd::submit::SubmitArgs),
    Status(cmd::status::StatusArgs),
    Logs(cmd::logs::LogsArgs),
    Cancel(cmd::cancel::CancelArgs),
    Workers(cmd::workers::WorkersArgs),
    Pull(cmd::pull::PullArgs),
    Coordinator(cmd::serve::CoordinatorArgs),
    Worker(cmd::serve::WorkerArgs),
    Publish(cmd::publish::PublishArgs),
}

fn main() -> ExitCode {
    // Before anything starts a thread: `farm __farm-userns` is the process that runs
    // inside a build's user namespace.
    farm_worker::userns::run_hidden_entry_if_requested();
    let cli = Cli::parse();
    // The daemons say what they do; commands only warn.
    common::init_logging(match cli.command {
        Command::Coordinator(_) | Command::Worker(_) => "info",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Plan(args) => cmd::plan::run(args),
        Command::Build(args) => cmd::build::run(args),
        Command::RecursiveBuild(args) => cmd::build::run_recursive(args),
        Command::Grab(args) => cmd::layers::grab(args),
        Command::Chroot(args) => cmd::layers::chroot(args),
        Command::Inspect(args) => cmd::layers::inspect(args),
        Command::Clean(args) => cmd::layers::clean(args),
        Command::Check(args) => cmd::check::run(args),
        Command::Setup(args) => cmd::setup::run(args),
        Command::Submit(args) => cmd::submit::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Logs(args) => cmd::logs::run(args),
        Command::Cancel(args) => cmd::cancel::run(args),
        Command::Workers(args) => cmd::workers::run(args),
        Command::Pull(args) => cmd::pull::run(args),
        Command::Coordinator(args) => cmd::serve::coordinator(args),
        Command::Worker(args) => cmd::serve::worker(args),
        Command::Publish(args) => cmd::publish::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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
mod gc_args;
mod last_build;
mod local;
mod progress;
mod remote;
mod run_limits;
mod states;
#[cfg(test)]
mod test_coordinator;

use std::process::ExitCode;

/// jemalloc, not glibc's malloc: the coordinator allocates and frees small objects on
/// every thread for every layer (jobs, results, events, gRPC frames), and glibc's
/// malloc was a tenth of a big build's CPU. A 20,000-layer build through the scale
/// bench: 3.05 / 3.24 s against 3.78 / 4.31 s, peak RSS 230 MB against 190 MB
/// (`benches/scale.sh`, alternating; mimalloc was as fast but took 320 MB). It is
/// fork-safe (its `pthread_atfork` handlers), which the worker's sandbox needs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::{Parser, Subcommand};

/// Build OCI images from stackerfiles, rootless, on one machine or on a build farm.
///
/// farm reads the stackerfiles you already use with stacker (layers with `from`,
/// `imports`, `run`, ...) and turns them into a DAG of image builds.
#[derive(Debug, Parser)]
#[command(name = "farm", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Start with `farm plan stacker.yaml` to see what would be built.\n\
--debug (or FARM_LOG=debug) for detailed logs; installed or linked as `stacker`, farm takes\nstacker's flags (--oci-dir, --roots-dir, --stacker-dir, --work-dir, ...)."
)]
struct Cli {
    #[command(flatten)]
    global: common::GlobalArgs,

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
    Gc(cmd::gc::GcArgs),
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
    Token(cmd::token::TokenArgs),
    Publish(cmd::publish::PublishArgs),
}

/// The command line; as `stacker` (a link named so), messages say `stacker`: the flags
/// are the same, so stacker's scripts run unchanged.
fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let mut command = Cli::command();
    if invoked_as_stacker(std::env::args_os().next()) {
        command = command.bin_name("stacker");
    }
    let matches = command.get_matches_mut();
    Cli::from_arg_matches(&matches)
        .and_then(|cli| checked(cli, &mut command))
        .unwrap_or_else(|e| e.exit())
}

/// What clap cannot see: a global flag before the subcommand against one after it.
fn checked(cli: Cli, command: &mut clap::Command) -> Result<Cli, clap::Error> {
    if cli.global.debug && cli.global.quiet {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            "--debug and --quiet cannot be used together",
        ));
    }
    Ok(cli)
}

fn invoked_as_stacker(argv0: Option<std::ffi::OsString>) -> bool {
    argv0.is_some_and(|a| std::path::Path::new(&a).file_name() == Some("stacker".as_ref()))
}

fn main() -> ExitCode {
    // Before anything starts a thread: `farm __farm-userns` is the process that runs
    // inside a build's user namespace.
    farm_worker::userns::run_hidden_entry_if_requested();
    // As many glibc malloc arenas as cores (its default is eight per core, and each
    // keeps what its threads freed: a coordinator's RSS was twice its live heap),
    // unless the caller chose with MALLOC_ARENA_MAX. Rust's allocations go to jemalloc
    // (above); C libraries' (SQLite's pages and statements) still go to glibc's.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        farm_worker::sys::limit_malloc_arenas(cores);
    }
    // TLS (https:// coordinators, `farm coordinator --tls-cert`) uses rustls with
    // aws-lc-rs, installed once for the process.
    farm_coordinator::auth::install_crypto_provider();
    let cli = parse();
    // The daemons say what they do; commands only warn.
    let default_log = match cli.command {
        Command::Coordinator(_) | Command::Worker(_) => "info",
        _ => "warn",
    };
    let service = match cli.command {
        Command::Coordinator(_) => "farm-coordinator",
        Command::Worker(_) => "farm-worker",
        _ => "farm-cli",
    };
    let telemetry = match common::init(cli.global, default_log, service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Plan(args) => cmd::plan::run(args),
        Command::Build(args) => cmd::build::run(args),
        Command::RecursiveBuild(args) => cmd::build::run_recursive(args),
        Command::Grab(args) => cmd::layers::grab(args),
        Command::Chroot(args) => cmd::layers::chroot(args),
        Command::Inspect(args) => cmd::layers::inspect(args),
        Command::Clean(args) => cmd::layers::clean(args),
        Command::Gc(args) => cmd::gc::run(args),
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
        Command::Token(args) => cmd::token::run(args),
        Command::Publish(args) => cmd::publish::run(args),
    };
    // The last spans go to the collector (within a few seconds) before the process ends.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command, invoked_as_stacker};
    use crate::common::Layout;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("farm").chain(args.iter().copied()))?;
        super::checked(cli, &mut Cli::command())
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn stackers_directory_flags_are_farms_options() {
        let cli = parse(&[
            "build",
            "--oci-dir",
            "out",
            "--stacker-dir",
            "st",
            "--roots-dir",
            "roots",
            "--order-only",
            "--annotations-namespace",
            "org.example",
        ])
        .unwrap();
        let Command::Build(b) = cli.command else {
            panic!("not build")
        };
        assert_eq!(b.flags.output, PathBuf::from("out"));
        assert_eq!(b.flags.state_dir, Some(PathBuf::from("st")));
        assert_eq!(b.flags.pool, Some(PathBuf::from("roots")));
        assert!(b.flags.order_only);
        assert_eq!(b.flags.annotations_namespace, "org.example");

        let cli = parse(&["recursive-build", "--oci-dir", "o", "--order-only"]).unwrap();
        let Command::RecursiveBuild(r) = cli.command else {
            panic!("not recursive-build")
        };
        assert_eq!(r.flags.output, PathBuf::from("o"));
        assert!(r.flags.order_only);
        assert_eq!(r.flags.annotations_namespace, "io.stackeroci");

        for sub in ["grab", "chroot", "clean"] {
            let mut args = vec![sub, "--stacker-dir", "st", "--roots-dir", "r"];
            if sub == "grab" {
                args.push("l:/f");
            }
            parse(&args).unwrap_or_else(|e| panic!("{sub}: {e}"));
        }
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let cli = parse(&["--debug", "--work-dir", "w", "plan"]).unwrap();
        assert!(cli.global.debug);
        assert_eq!(cli.global.work_dir, Some(PathBuf::from("w")));
        let cli = parse(&["plan", "-q", "--log-file", "l", "--no-progress"]).unwrap();
        assert!(cli.global.quiet && cli.global.no_progress && !cli.global.progress);
        assert_eq!(cli.global.log_file, Some(PathBuf::from("l")));
        let cli = parse(&["build", "--no-progress", "--progress"]).unwrap();
        assert!(
            cli.global.progress && !cli.global.no_progress,
            "the last one wins"
        );
    }

    #[test]
    fn debug_and_quiet_exclude_each_other() {
        for args in [
            &["--debug", "--quiet", "plan"][..],
            &["plan", "--debug", "-q"],
            &["--debug", "build", "--quiet"],
        ] {
            let e = parse(args).expect_err("an error");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{args:?}"
            );
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn chroot_takes_no_layer_and_substitutions() {
        let cli = parse(&["chroot", "-f", "x.yaml", "--substitute", "A=b"]).unwrap();
        let Command::Chroot(c) = cli.command else {
            panic!("not chroot")
        };
        assert_eq!(c.layer, None);
        assert_eq!(c.stacker_file, PathBuf::from("x.yaml"));
        assert_eq!(c.subs.substitute, ["A=b"]);
        let cli = parse(&["chroot", "app", "--", "ls", "-l"]).unwrap();
        let Command::Chroot(c) = cli.command else {
            panic!("not chroot")
        };
        assert_eq!(c.layer.as_deref(), Some("app"));
        assert_eq!(c.command, ["ls", "-l"]);
    }

    #[test]
    fn the_work_dir_holds_the_state_and_the_roots() {
        let l = Layout::with_work_dir(None, None, None, Some(Path::new("/w")));
        assert_eq!(l.state_dir, Path::new("/w/.stacker"));
        assert_eq!(l.pool, Path::new("/w/roots"));
        assert_eq!(l.output, Path::new("oci"));
        let l = Layout::with_work_dir(
            Some("/s".into()),
            Some("/p".into()),
            Some("o".into()),
            Some(Path::new("/w")),
        );
        assert_eq!(
            (l.state_dir, l.pool, l.output),
            ("/s".into(), "/p".into(), "o".into()),
            "explicit directories win"
        );
        let l = Layout::with_work_dir(Some("/s".into()), None, None, None);
        assert_eq!(l.pool, Path::new("/s/pool"), "without --work-dir as before");
    }

    #[test]
    fn stacker_is_recognised_by_its_name() {
        assert!(invoked_as_stacker(Some("/usr/local/bin/stacker".into())));
        assert!(invoked_as_stacker(Some("stacker".into())));
        assert!(!invoked_as_stacker(Some("/usr/bin/farm".into())));
        assert!(!invoked_as_stacker(Some("stacker-wrapper".into())));
        assert!(!invoked_as_stacker(None));
    }
}

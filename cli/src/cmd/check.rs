//! `farm check`: what rootless builds need on this machine, and how to fix what is
//! missing.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use farm_worker::pool::Pool;
use farm_worker::{IdMapping, Userns};

use crate::common::Layout;

/// Check that this user can build rootless: a subordinate uid/gid range, newuidmap,
/// user namespaces, and a usable pool (btrfs preferred). Says how to fix each problem.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Where farm keeps its cache database and blobs [default: $XDG_DATA_HOME/farm]
    #[arg(long, value_name = "DIR", env = "FARM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// The pool to check [default: STATE_DIR/pool]
    #[arg(long, value_name = "DIR", env = "FARM_POOL")]
    pub pool: Option<PathBuf>,
}

pub(crate) fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(args.state_dir, args.pool, None);
    let mut problems = 0;
    let uid = nix::unistd::geteuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    println!("user {user} (uid {uid})");

    match IdMapping::detect() {
        Ok(m) => {
            let ranges: Vec<String> = m
                .uids
                .iter()
                .map(|r| {
                    format!(
                        "{}..{} -> {}",
                        r.container,
                        r.container + r.count - 1,
                        r.host
                    )
                })
                .collect();
            println!("  ok: container uids {}", ranges.join(", "));
            match Userns::new(farm_worker::Entry::current_exe()?, m)
                .command("/bin/true")
                .spawn()
                .and_then(|mut c| Ok(c.wait_blocking()?))
            {
                Ok(s) if s.success() => println!("  ok: a user namespace starts"),
                Ok(s) => {
                    problems += 1;
                    println!("  error: a process in a user namespace failed ({s})");
                }
                Err(e) => {
                    problems += 1;
                    println!("  error: cannot start a user namespace: {e}");
                    println!(
                        "         check /proc/sys/user/max_user_namespaces and \
                         kernel.apparmor_restrict_unprivileged_userns"
                    );
                }
            }
        }
        Err(e) => {
            problems += 1;
            println!("  error: {e}");
        }
    }

    // Optional: per-build pids/memory limits need a delegated cgroup (v2, else v1).
    match farm_worker::cgroup::detect() {
        Ok(backend) => println!(
            "  ok: delegated {backend}: each build gets pids and memory limits \
             (--pids-max, --memory-max)"
        ),
        Err(e) => {
            println!("  note: builds run without pids/memory limits: {e}");
            println!(
                "        to get them, {}",
                farm_worker::cgroup::HOW_TO_DELEGATE
            );
        }
    }

    // Optional: the squashfs/erofs layer types (`--layer-type`) run external tools.
    for (tool, package) in farm_image::FS_TOOLS {
        match farm_image::find_tool(tool) {
            Some(p) => println!(
                "  ok: {tool} ({}) for --layer-type squashfs/erofs",
                p.display()
            ),
            None => println!(
                "  note: {tool} is not installed: --layer-type squashfs/erofs need it \
                 (apt-get install {package})"
            ),
        }
    }

    let report = Pool::check(&layout.pool);
    print!("{report}");
    if !report.is_usable() {
        problems += 1;
    }
    if problems == 0 {
        println!("farm check: ready for rootless builds");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("farm check: {problems} problem(s); fix them and run farm check again");
        Ok(ExitCode::FAILURE)
    }
}

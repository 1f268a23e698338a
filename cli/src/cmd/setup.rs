//! `farm setup`: the one-time, root-only set-up for a user's rootless builds, like
//! stacker's `unpriv-setup`: a subordinate uid/gid range and a btrfs pool.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Args;
use farm_worker::idmap::parse_subid;
use farm_worker::pool::Pool;

use crate::cmd::build::parse_size;

/// Prepare a user for rootless builds (run once, as root).
///
/// Gives USER a range of 65536 subordinate uids and gids (/etc/subuid, /etc/subgid)
/// unless it has one, and makes DIR a btrfs pool owned by USER: when DIR is not on
/// btrfs, a loopback file (--image, default DIR.btrfs) of --size is formatted and
/// mounted on DIR with user_subvol_rm_allowed.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  sudo farm setup --user alice --pool /var/lib/farm/alice --size 50G"
)]
pub(crate) struct SetupArgs {
    /// The user who will run builds
    #[arg(long)]
    pub user: String,

    /// The pool directory
    #[arg(long, value_name = "DIR")]
    pub pool: PathBuf,

    /// Size of the loopback btrfs file when DIR is not on btrfs
    #[arg(long, value_name = "SIZE", default_value = "20G", value_parser = parse_size)]
    pub size: u64,

    /// The loopback file [default: DIR.btrfs]
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
}

const RANGE: u64 = 65536;

pub(crate) fn run(args: SetupArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "farm setup must run as root (it edits /etc/subuid and mounts the pool); try: sudo farm setup --user {} --pool {}",
            args.user,
            args.pool.display()
        );
    }
    let user = nix::unistd::User::from_name(&args.user)
        .context("looking the user up")?
        .with_context(|| {
            format!(
                "no user named '{}' (create it first: useradd -m {})",
                args.user, args.user
            )
        })?;

    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if has_range(&text, &args.user, user.uid.as_raw()) {
            println!("{file}: {} already has a range", args.user);
            continue;
        }
        let start = free_start(&text);
        let status = Command::new("usermod")
            .arg(flag)
            .arg(format!("{start}-{}", start + RANGE - 1))
            .arg(&args.user)
            .status()
            .context("running usermod (package passwd)")?;
        if !status.success() {
            bail!("usermod {flag} failed ({status})");
        }
        println!(
            "{file}: gave {} ids {start}..{}",
            args.user,
            start + RANGE - 1
        );
    }

    std::fs::create_dir_all(&args.pool)
        .with_context(|| format!("creating {}", args.pool.display()))?;
    let report = Pool::check(&args.pool);
    let on_btrfs = report.fs.as_ref().is_some_and(|f| f.is_btrfs());
    if on_btrfs {
        println!("{} is on btrfs already", args.pool.display());
    } else {
        let image = args.image.clone().unwrap_or_else(|| {
            let mut p = args.pool.clone().into_os_string();
            p.push(".btrfs");
            PathBuf::from(p)
        });
        make_loop_pool(&image, &args.pool, args.size)?;
        println!(
            "mounted a {} btrfs file {} on {}; to mount it at boot add to /etc/fstab:\n  {} {} btrfs loop,user_subvol_rm_allowed 0 0",
            human(args.size),
            image.display(),
            args.pool.display(),
            image.display(),
            args.pool.display()
        );
    }
    std::os::unix::fs::chown(&args.pool, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("chown {} to {}", args.pool.display(), args.user))?;
    println!(
        "farm setup: done; as {} run: farm check --pool {}",
        args.user,
        args.pool.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn has_range(text: &str, name: &str, uid: u32) -> bool {
    parse_subid(text)
        .iter()
        .any(|e| (e.owner == name || e.owner == uid.to_string()) && u64::from(e.count) >= RANGE)
}

/// The first id after every existing range, at least 100000.
fn free_start(text: &str) -> u64 {
    parse_subid(text)
        .iter()
        .map(|e| u64::from(e.start) + u64::from(e.count))
        .fold(100_000, u64::max)
}

fn make_loop_pool(image: &Path, dir: &Path, size: u64) -> anyhow::Result<()> {
    if !image.exists() {
        let f = std::fs::File::create(image)
            .with_context(|| format!("creating {}", image.display()))?;
        f.set_len(size)
            .with_context(|| format!("sizing {}", image.display()))?;
        run_tool(
            Command::new("mkfs.btrfs").arg("-q").arg(image),
            "mkfs.btrfs (package btrfs-progs)",
        )?;
    }
    run_tool(
        Command::new("mount")
            .args(["-o", "loop,user_subvol_rm_allowed"])
            .arg(image)
            .arg(dir),
        "mount",
    )
}

fn run_tool(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn human(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{} GiB", n >> 30)
    } else {
        format!("{} MiB", n >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subid_ranges() {
        let text = "alice:100000:65536\nbob:165536:65536\n";
        assert!(has_range(text, "alice", 1000));
        assert!(!has_range(text, "carol", 1002));
        assert!(has_range("1002:300000:70000\n", "carol", 1002));
        assert_eq!(free_start(text), 231072);
        assert_eq!(free_start(""), 100000);
    }
}

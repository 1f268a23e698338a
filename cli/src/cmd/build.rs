//! `farm build`: build a stackerfile's images on this machine, rootless.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use farm_coordinator::farm::Submission;
use farm_coordinator::output::{
    DEFAULT_ANNOTATION_NAMESPACE, GitVersions, OutputImage, manifest_annotations_with, write_layout,
};
use farm_coordinator::{Plan, PlanOptions};
use farm_model::Compression;

use crate::common::{Layout, StackerfileArgs, SubstitutionArgs, plan_or_report, report_plan};
use crate::embedded::Embedded;
use crate::last_build::record_results;
use crate::local::block_on;

/// Build the images of a stackerfile, rootless, on this machine.
///
/// Layers that do not depend on each other build at the same time (--jobs). Each
/// layer's result is cached by everything that affects it (its definition, its base,
/// the content of its imports, SOURCE_DATE_EPOCH, the platform), so a rebuild only
/// runs what changed. The images are written to an OCI layout (-o), tagged with the
/// names of the layers that are not build_only.
///
/// Needs a subordinate uid/gid range for your user (see `farm check`; `farm setup`
/// makes one) and works best with the pool on btrfs.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  farm build\n  farm build -f app/stacker.yaml -o out --substitute VERSION=1.2\n  farm build --no-cache --compression zstd --jobs 4\n  farm build --push docker://registry.example.com/team --push-tag 1.2 --push-tag latest"
)]
pub(crate) struct BuildArgs {
    #[command(flatten)]
    pub stackerfile: StackerfileArgs,

    #[command(flatten)]
    pub flags: BuildFlags,
}

/// Build every stackerfile under a directory as one DAG (stacker's recursive-build).
///
/// Finds the files named PATTERN under DIR (recursively), loads them with their
/// prerequisites, and builds all their layers together: independent layers of
/// different files build at the same time.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  farm recursive-build -d images -p 'stacker*.yaml'")]
pub(crate) struct RecursiveBuildArgs {
    /// The directory to search
    #[arg(
        short = 'd',
        long = "search-dir",
        value_name = "DIR",
        default_value = "."
    )]
    pub dir: PathBuf,

    /// File name pattern (`*` and `?` wildcards)
    #[arg(
        short = 'p',
        long = "stacker-file-pattern",
        value_name = "PATTERN",
        default_value = "stacker.yaml"
    )]
    pub pattern: String,

    #[command(flatten)]
    pub subs: SubstitutionArgs,

    #[command(flatten)]
    pub flags: BuildFlags,
}

/// Options of `farm build` and `farm recursive-build`.
#[derive(Debug, Args)]
pub(crate) struct BuildFlags {
    /// OCI layout to write the images to (stacker's --oci-dir)
    #[arg(
        short,
        long,
        visible_alias = "oci-dir",
        value_name = "DIR",
        default_value = "oci"
    )]
    pub output: PathBuf,

    /// Where farm keeps its cache database and blobs (stacker's --stacker-dir)
    /// [default: $XDG_DATA_HOME/farm, or WORK_DIR/.stacker with --work-dir]
    #[arg(
        long,
        visible_alias = "stacker-dir",
        value_name = "DIR",
        env = "FARM_STATE_DIR"
    )]
    pub state_dir: Option<PathBuf>,

    /// The pool of root filesystems, btrfs recommended (stacker's --roots-dir)
    /// [default: STATE_DIR/pool, or WORK_DIR/roots with --work-dir]
    #[arg(
        long,
        visible_alias = "roots-dir",
        value_name = "DIR",
        env = "FARM_POOL"
    )]
    pub pool: Option<PathBuf>,

    /// Print the layers in build order, one per line (the order of `farm plan`), and
    /// exit without building
    #[arg(long)]
    pub order_only: bool,

    /// Write the manifest annotations under NS (NS.stacker.stacker_yaml, ...), as
    /// stacker's --annotations-namespace
    #[arg(long, value_name = "NS", default_value = DEFAULT_ANNOTATION_NAMESPACE)]
    pub annotations_namespace: String,

    /// Rebuild every layer, ignoring cached results
    #[arg(long)]
    pub no_cache: bool,

    /// Layer compression: gzip, zstd or none, optionally with a level (zstd:19)
    #[arg(long, value_name = "ALGO", default_value = "gzip")]
    pub compression: Compression,

    /// Layer type: tar, squashfs or erofs; repeat it for several (one image each,
    /// tagged NAME, NAME-squashfs, NAME-erofs, as stacker tags them)
    #[arg(long = "layer-type", value_name = "TYPE", default_value = "tar")]
    pub layer_types: Vec<farm_image::LayerType>,

    /// squashfs/erofs layers without dm-verity data (stacker's --no-verity)
    #[arg(long)]
    pub no_verity: bool,

    /// Layers to build at the same time [default: number of cores]
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,

    #[command(flatten)]
    pub run: crate::run_limits::RunLimitArgs,

    /// After the build, remove least-recently-used chains until the pool is below SIZE
    /// (e.g. 20G, 500M)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub pool_max_size: Option<u64>,

    /// Accepted for scripts; a local build reads inputs from anywhere, as stacker does
    /// (the rule applies to `farm submit` to a coordinator, which uploads them)
    #[arg(long)]
    pub allow_outside_context: bool,

    /// Refuse http(s) imports and tarballs without a `hash:`
    #[arg(long)]
    pub require_hash: bool,

    #[command(flatten)]
    pub push: super::publish::PushArgs,

    #[command(flatten)]
    pub registry: super::publish::RegistryArgs,

    /// Print the final status object as JSON on stdout (`farm submit --json`).
    #[arg(skip)]
    pub json: bool,

    /// The command, for messages ("submit" when `farm submit` runs embedded).
    #[arg(skip = "build")]
    pub command: &'static str,
}

/// `10G`, `500M`, `1024` (bytes).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("'{s}' is not a size (like 500M or 20G)"))
}

/// `farm submit` without a coordinator: the options it shares with `farm build`.
pub(crate) struct EmbeddedSubmit {
    pub stackerfile: StackerfileArgs,
    pub output: Option<PathBuf>,
    pub no_cache: bool,
    pub compression: Compression,
    pub layer_types: Vec<farm_image::LayerType>,
    pub no_verity: bool,
    pub require_hash: bool,
    pub allow_outside_context: bool,
    pub json: bool,
    pub push: super::publish::PushArgs,
    pub registry: super::publish::RegistryArgs,
}

/// Run `farm submit`'s build in this process, exactly as `farm build` does.
pub(crate) fn run_embedded_submit(s: EmbeddedSubmit) -> anyhow::Result<ExitCode> {
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    run(BuildArgs {
        stackerfile: s.stackerfile,
        flags: BuildFlags {
            output: s.output.unwrap_or_else(|| PathBuf::from("oci")),
            state_dir: env_path("FARM_STATE_DIR"),
            pool: env_path("FARM_POOL"),
            order_only: false,
            annotations_namespace: DEFAULT_ANNOTATION_NAMESPACE.to_string(),
            no_cache: s.no_cache,
            compression: s.compression,
            layer_types: s.layer_types,
            no_verity: s.no_verity,
            jobs: None,
            run: Default::default(),
            pool_max_size: None,
            allow_outside_context: s.allow_outside_context,
            require_hash: s.require_hash,
            push: s.push,
            registry: s.registry,
            json: s.json,
            command: "submit",
        },
    })
}

pub(crate) fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(
        args.flags.state_dir.clone(),
        args.flags.pool.clone(),
        Some(args.flags.output.clone()),
    );
    let options = args.stackerfile.plan_options(&layout)?;
    let path = args.stackerfile.path();
    let Some(plan) = plan_or_report("build", &path, &options)? else {
        return Ok(ExitCode::FAILURE);
    };
    if args.flags.order_only {
        print!("{}", build_order(&plan));
        return Ok(ExitCode::SUCCESS);
    }
    let entries = vec![path.display().to_string()];
    block_on(build(
        plan,
        layout,
        args.flags,
        entries,
        options.substitutions,
    ))?
}

pub(crate) fn run_recursive(args: RecursiveBuildArgs) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(
        args.flags.state_dir.clone(),
        args.flags.pool.clone(),
        Some(args.flags.output.clone()),
    );
    let options = PlanOptions::new(args.subs.substitutions(&layout)?);
    let mut files = Vec::new();
    find_files(&args.dir, &args.pattern, &mut files)
        .with_context(|| format!("searching {}", args.dir.display()))?;
    files.sort();
    if files.is_empty() {
        anyhow::bail!(
            "no file named '{}' under {}",
            args.pattern,
            args.dir.display()
        );
    }
    if !crate::common::quiet() {
        eprintln!("farm recursive-build: {} stackerfile(s)", files.len());
    }
    let loaded = Plan::load_many(&files, &options, &farm_stackerfile::LocalFiles);
    let what = format!("{} stackerfiles", files.len());
    let Some(plan) = report_plan("recursive-build", &what, loaded)? else {
        return Ok(ExitCode::FAILURE);
    };
    if args.flags.order_only {
        print!("{}", build_order(&plan));
        return Ok(ExitCode::SUCCESS);
    }
    let entries = files.iter().map(|f| f.display().to_string()).collect();
    block_on(build(
        plan,
        layout,
        args.flags,
        entries,
        options.substitutions,
    ))?
}

/// `--order-only`: the layers in the order `farm plan` shows them, one per line.
fn build_order(plan: &Plan) -> String {
    plan.waves
        .iter()
        .flatten()
        .map(|&i| format!("{}\n", plan.layers[i].layer.name))
        .collect()
}

pub(crate) fn find_files(dir: &Path, pattern: &str, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let path = entry.path();
        if ft.is_dir() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            find_files(&path, pattern, out)?;
        } else if ft.is_file() && wildcard(pattern, &entry.file_name().to_string_lossy()) {
            out.push(path);
        }
    }
    Ok(())
}

/// `*` and `?` matching of a whole file name.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

async fn build(
    plan: Plan,
    layout: Layout,
    flags: BuildFlags,
    entries: Vec<String>,
    substitutions: farm_stackerfile::Substitutions,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let credentials = flags.registry.credentials()?;
    if let Some(url) = &flags.push.push {
        super::publish::PublishOptions {
            url: url.clone(),
            tags: flags.push.push_tags.clone(),
            insecure: flags.push.push_insecure,
            insecure_flag: "--push-insecure",
            credentials: credentials.clone(),
            refs_to_stderr: flags.json,
        }
        .check()?;
    }
    let jobs = flags
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let embedded = Embedded::start(
        layout,
        // The local user's own builds: their binds as stacker mounts them.
        flags
            .run
            .engine_options_with_cgroup(farm_worker::engine::BindPolicy::Unrestricted),
        jobs,
        credentials.clone(),
    )
    .await?;
    let mut layer_types: Vec<farm_image::LayerType> = Vec::new();
    for t in &flags.layer_types {
        if !layer_types.contains(t) {
            layer_types.push(*t);
        }
    }
    if layer_types.is_empty() {
        layer_types.push(farm_image::LayerType::Tar);
    }
    // One build per layer type (each type's layers have their own cache keys, chains
    // and images); their images go into one layout, tagged as stacker tags them.
    let mut images: Vec<OutputImage> = Vec::new();
    let mut last = None;
    for layer_type in layer_types {
        let layer_format = farm_image::LayerFormat::new(layer_type, flags.no_verity);
        let spec = Submission {
            stackerfiles: entries.clone(),
            context: Vec::new(),
            substitutions: farm_stackerfile::Substitutions {
                builtins: Vec::new(),
                ..substitutions.clone()
            },
            environment: std::env::vars().collect(),
            no_cache: flags.no_cache,
            compression: flags.compression,
            layer_format,
            require_hash: flags.require_hash,
            // Nothing is uploaded: like stacker, a local build may read a base or an
            // import from anywhere this user can. The context rule guards what a remote
            // submission sends to a coordinator (see `farm submit`).
            allow_outside_context: true,
            origin: farm_coordinator::farm::Origin::Local,
            inline: crate::remote::inline_texts(&plan),
            priority: 0,
        };
        let (id, outcome) = embedded.run(&plan, spec).await?;
        let built = outcome.results.clone();
        if let Err(e) = record_results(&embedded.local.layout.state_dir, &built) {
            tracing::warn!("remembering the built layers: {e}");
        }
        let succeeded = outcome.succeeded();
        if succeeded {
            let mut git = GitVersions::default();
            git.warm(&plan);
            // In the order `farm plan` shows (wave by wave, load order within a wave),
            // as stacker writes its images in build order and its users index
            // `manifests[N]`.
            images.extend(
                plan.waves
                    .iter()
                    .flatten()
                    .map(|&i| (i, &plan.layers[i]))
                    .filter(|(_, l)| !l.layer.build_only)
                    .filter_map(|(i, l)| {
                        built
                            .iter()
                            .find(|(n, _)| n == &l.layer.name)
                            .map(|(_, result)| OutputImage {
                                tag: layer_type.tag(&l.layer.name),
                                result: result.clone(),
                                annotations: manifest_annotations_with(
                                    &plan,
                                    i,
                                    &flags.annotations_namespace,
                                    &git,
                                ),
                            })
                    }),
            );
        }
        last = Some((id, outcome));
        if !succeeded {
            break;
        }
    }
    let (id, outcome) = last.expect("at least one layer type");
    let local = &embedded.local;
    let mut ok = outcome.succeeded();
    if ok {
        match write_layout(&local.blobs, &flags.output, &images).await {
            Ok(tags) => {
                for (tag, digest) in &tags {
                    if flags.json {
                        eprintln!("{}:{tag}  {digest}", flags.output.display());
                    } else {
                        println!("{}:{tag}  {digest}", flags.output.display());
                    }
                }
                ok &= super::publish::push_after_build(
                    &local.blobs,
                    &tags,
                    &flags.push,
                    &credentials,
                    flags.json,
                )
                .await;
            }
            Err(e) => {
                eprintln!(
                    "farm build: writing the OCI layout {}: {e}",
                    flags.output.display()
                );
                ok = false;
            }
        }
    }
    if let Some(max) = flags.pool_max_size {
        let pool = local.pool.clone();
        match tokio::task::spawn_blocking(move || pool.gc(max)).await? {
            Ok(r) => tracing::info!(removed = r.removed.len(), "pool gc"),
            Err(e) => eprintln!("farm build: pool gc: {e}"),
        }
    }
    let quiet = ok && crate::common::quiet();
    if !quiet {
        eprintln!("{}", outcome.summary);
    }
    if flags.json
        && let Some(status) = embedded.farm.status(&id).await?
    {
        println!("{}", serde_json::to_string_pretty(&status)?);
    }
    if let (false, Some(e)) = (outcome.succeeded(), &outcome.error) {
        eprintln!("farm {}: {e}", flags.command);
    }
    embedded.stop().await;
    if !quiet {
        eprintln!(
            "farm {}: {} in {:.1}s (build {id})",
            flags.command,
            if ok { "done" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_size, wildcard};

    #[test]
    fn wildcards() {
        assert!(wildcard("stacker.yaml", "stacker.yaml"));
        assert!(!wildcard("stacker.yaml", "stacker.yml"));
        assert!(wildcard("stacker*.yaml", "stacker-app.yaml"));
        assert!(wildcard("*.yaml", "x.yaml"));
        assert!(wildcard("s?.yaml", "s1.yaml"));
        assert!(!wildcard("s?.yaml", "s12.yaml"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("lots").is_err());
    }
}

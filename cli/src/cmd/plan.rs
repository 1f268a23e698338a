//! `farm plan`: show the DAG of layer builds a stackerfile turns into, without building.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;
use farm_coordinator::Plan;
use farm_stackerfile::Base;

use crate::common::{Layout, StackerfileArgs, plan_or_report};

/// Show what a stackerfile would build: layers, their bases and dependencies, in waves
/// of layers that can build at the same time.
///
/// Reads FILE and its config.prerequisites, applies substitutions, checks every key, and
/// prints the plan. Nothing is built and nothing is fetched. Errors name
/// FILE:LINE:COLUMN, the layer, and what would be right.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  farm plan\n  farm plan -f images/stacker.yaml --substitute VERSION=1.2\n  farm plan --json | jq '.waves'"
)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    pub stackerfile: StackerfileArgs,

    /// Print the plan as one JSON object: {"layers": [...], "waves": [[...], ...]}
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(None, None, None);
    let options = args.stackerfile.plan_options(&layout)?;
    let path = args.stackerfile.path();
    let Some(plan) = plan_or_report("plan", &path, &options)? else {
        return Ok(ExitCode::FAILURE);
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        print!("{}", render(&plan));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human form of a plan.
pub(crate) fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let tagged = plan.layers.iter().filter(|l| !l.layer.build_only).count();
    let files = plan.files.len();
    let _ = writeln!(
        out,
        "{}: {} layer{} ({} tagged, {} build-only) in {} wave{}{}",
        plan.files
            .last()
            .map_or("-".into(), |f| f.path.display().to_string()),
        plan.layers.len(),
        plural(plan.layers.len()),
        tagged,
        plan.layers.len() - tagged,
        plan.waves.len(),
        plural(plan.waves.len()),
        if files > 1 {
            format!(", from {files} files")
        } else {
            String::new()
        }
    );
    let width = plan
        .layers
        .iter()
        .map(|l| l.layer.name.len())
        .max()
        .unwrap_or(0);
    for (w, wave) in plan.waves.iter().enumerate() {
        let _ = writeln!(
            out,
            "\nwave {} ({} layer{}{})",
            w + 1,
            wave.len(),
            plural(wave.len()),
            if wave.len() > 1 { ", in parallel" } else { "" }
        );
        for &i in wave {
            let p = &plan.layers[i];
            let l = &p.layer;
            let base = match &l.from {
                Base::Docker { url, insecure } => {
                    format!("docker {url}{}", if *insecure { " (insecure)" } else { "" })
                }
                Base::Oci { url } => format!("oci {url}"),
                Base::Tar { source } => format!("tar {}", source.written()),
                Base::Built { tag } => format!("built {tag}"),
                Base::Scratch => "scratch".into(),
            };
            let _ = writeln!(
                out,
                "  {:width$}  {:10}  from {base}",
                l.name,
                if l.build_only { "build-only" } else { "tagged" },
            );
            let pad = " ".repeat(width + 16);
            if !p.depends_on.is_empty() {
                let names: Vec<&str> = p
                    .depends_on
                    .iter()
                    .map(|&d| plan.layers[d].layer.name.as_str())
                    .collect();
                let _ = writeln!(out, "{pad}after: {}", names.join(", "));
            }
            for import in &l.imports {
                let dest = import
                    .dest
                    .as_deref()
                    .map_or(String::new(), |d| format!(" -> {d}"));
                let _ = writeln!(out, "{pad}import: {}{dest}", import.source.written());
            }
            if files > 1 {
                let _ = writeln!(out, "{pad}file: {}", plan.files[p.file].path.display());
            }
        }
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

//! `farm submit`: send a stackerfile's build to a coordinator (or, without one, build it
//! in this process), show its progress, and optionally write the images.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use farm_coordinator::PlanOptions;
use farm_image::Digest;
use farm_model::Compression;
use farm_model::Event;
use farm_proto::v1::{BuildState, SubmitRequest};
use futures::{StreamExt, TryStreamExt};

use crate::client::{Client, CoordinatorArg, StatusInWords, connect, watch};
use crate::common::{Layout, StackerfileArgs, plan_or_report};
use crate::context::{BuildContext, collect};
use crate::local::block_on;
use crate::progress::Progress;
use crate::states::{build_word, progress_event, status_json};

/// Files uploaded at the same time.
const UPLOADS: usize = 4;

/// Build a stackerfile on a build farm (or in this process when no coordinator is set).
///
/// farm plans the stackerfile here first (errors are reported before anything is sent),
/// then uploads the files the build reads (the stackerfiles, local imports, tar and OCI
/// bases, overlay_dirs; only those the coordinator does not have yet) and submits the
/// build. It shows each layer's progress and logs until the build ends and exits 0 only
/// when it succeeded. Leaving (Ctrl-C, --detach, a lost connection) does not cancel the
/// build: `farm status ID --wait` picks it up again, `farm cancel ID` stops it.
///
/// Without --coordinator or FARM_COORDINATOR, the build runs in this process with an
/// embedded coordinator and worker, like `farm build`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm submit --coordinator 10.0.0.5:7070\n  \
FARM_COORDINATOR=farm:7070 farm submit app/stacker.yaml -o out\n  \
farm submit --detach --json --substitute VERSION=1.2   # prints {\"id\": ...}\n  \
farm status ID --wait && farm pull ID -o out")]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    pub stackerfile: StackerfileArgs,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,

    /// After a successful build, write the images to this OCI layout (tagged with the
    /// layer names)
    #[arg(short, long, value_name = "DIR", conflicts_with = "detach")]
    pub output: Option<PathBuf>,

    /// Show progress and logs until the build ends (the default)
    #[arg(long, conflicts_with = "detach")]
    pub follow: bool,

    /// Print the build id and return without waiting
    #[arg(long)]
    pub detach: bool,

    /// Print the final status (with --detach: the id) as JSON on stdout
    #[arg(long)]
    pub json: bool,

    /// Rebuild every layer, ignoring cached results
    #[arg(long)]
    pub no_cache: bool,

    /// Layer compression: gzip, zstd or none, optionally with a level (zstd:19)
    #[arg(long, value_name = "ALGO", default_value = "gzip")]
    pub compression: Compression,

    /// Layer type: tar, squashfs or erofs; repeat it for several (one image each,
    /// tagged NAME, NAME-squashfs, NAME-erofs, as stacker tags them; a coordinator
    /// takes one per submission)
    #[arg(long = "layer-type", value_name = "TYPE", default_value = "tar")]
    pub layer_types: Vec<farm_image::LayerType>,

    /// squashfs/erofs layers without dm-verity data (stacker's --no-verity)
    #[arg(long)]
    pub no_verity: bool,

    /// Refuse http(s) imports and tarballs without a `hash:`
    #[arg(long)]
    pub require_hash: bool,

    /// The build's priority in the coordinator's queue: a higher one gets free worker
    /// slots first; builds of equal priority share them fairly (default 0; may be
    /// negative)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub priority: i32,

    /// Allow imports from outside the directory tree of the stackerfiles (the context
    /// sent then includes them)
    #[arg(long)]
    pub allow_outside_context: bool,

    #[command(flatten)]
    pub push: super::publish::PushArgs,

    #[command(flatten)]
    pub registry: super::publish::RegistryArgs,
}

pub(crate) fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let Some(addr) = args.coordinator.address()? else {
        return run_embedded_submit(args);
    };
    if args.layer_types.len() > 1 {
        anyhow::bail!(
            "a coordinator builds one layer type per submission: run `farm submit \
             --layer-type TYPE` once per type (or `farm build` for several at once)"
        );
    }
    // The root of the build's trace (issue 16): the coordinator's and the workers'
    // spans are its children.
    let span = tracing::info_span!(
        target: "farm_trace",
        "submit",
        coordinator = %addr,
        build.id = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let result = span.in_scope(|| run_remote(addr, args));
    match &result {
        Ok(code) if *code == ExitCode::SUCCESS => {}
        Ok(_) => farm_telemetry::record_error(&span, "the build did not succeed"),
        Err(e) => farm_telemetry::record_error(&span, &format!("{e:#}")),
    }
    result
}

fn run_remote(addr: crate::client::Target, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let layout = Layout::new(None, None, args.output.clone());
    let subs = args.stackerfile.substitutions(&layout)?;
    // Sent in precedence order for a last-wins reader: the file's, then --substitute.
    let substitutions: Vec<String> = subs
        .file
        .iter()
        .chain(&subs.cli)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let path = args.stackerfile.path();
    let options = PlanOptions {
        substitutions: subs,
        max_file_size: args.stackerfile.max_stackerfile_size,
    };
    let Some(plan) = tracing::info_span!(target: "farm_trace", "plan", file = %path.display())
        .in_scope(|| plan_or_report("submit", &path, &options))?
    else {
        return Ok(ExitCode::FAILURE);
    };
    let context = tracing::info_span!(target: "farm_trace", "collect context").in_scope(|| {
        collect(
            &plan,
            std::slice::from_ref(&path),
            args.allow_outside_context,
        )
    })?;
    let environment = passthrough_environment(
        &plan,
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
    );
    let request = SubmitRequest {
        stackerfiles: context.stackerfiles.clone(),
        context: context.to_proto(),
        substitutions,
        environment,
        no_cache: args.no_cache,
        compression: args.compression.to_string(),
        layer_type: args
            .layer_types
            .first()
            .map_or_else(String::new, ToString::to_string),
        no_verity: args.no_verity,
        require_hash: args.require_hash,
        allow_outside_context: args.allow_outside_context,
        stackerfile_texts: crate::remote::inline_texts(&plan).into_iter().collect(),
        priority: args.priority,
    };
    let span = tracing::Span::current();
    block_on(tracing::Instrument::instrument(
        submit(addr, plan, context, request, args, started),
        span,
    ))?
}

/// The part of the caller's environment a coordinator may use: the variables some
/// layer of `plan` passes through (its `build_env_passthrough`, stacker's default list
/// when it gives none, anchored as the coordinator applies them). Nothing else leaves
/// this machine.
fn passthrough_environment(
    plan: &farm_coordinator::Plan,
    environment: impl IntoIterator<Item = (String, String)>,
) -> std::collections::HashMap<String, String> {
    let rules: Vec<farm_stackerfile::Passthrough> = plan
        .layers
        .iter()
        .map(|p| farm_stackerfile::Passthrough::of(&p.layer))
        .collect();
    environment
        .into_iter()
        .filter(|(k, _)| rules.iter().any(|r| r.matches(k)))
        .collect()
}

/// The embedded mode (no coordinator configured): the same farm in this process, as
/// `farm build` runs it.
fn run_embedded_submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    if args.detach {
        anyhow::bail!(
            "--detach needs a coordinator that outlives this command: pass --coordinator \
             URL or set FARM_COORDINATOR (with none, farm submit builds in this process)"
        );
    }
    crate::cmd::build::run_embedded_submit(crate::cmd::build::EmbeddedSubmit {
        stackerfile: args.stackerfile,
        output: args.output,
        no_cache: args.no_cache,
        compression: args.compression,
        layer_types: args.layer_types,
        no_verity: args.no_verity,
        require_hash: args.require_hash,
        allow_outside_context: args.allow_outside_context,
        json: args.json,
        push: args.push,
        registry: args.registry,
    })
}

async fn submit(
    addr: crate::client::Target,
    plan: farm_coordinator::Plan,
    context: BuildContext,
    request: SubmitRequest,
    args: SubmitArgs,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(&addr).await?;
    upload_context(&mut client, &context).await?;

    let submitted = match client.submit(request).await {
        Ok(submitted) => submitted,
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            // The coordinator's rendered diagnostics.
            eprintln!("{}", status.message().trim_end());
            return Ok(ExitCode::FAILURE);
        }
        Err(status) => return Err(client.error("Submit", "", status)),
    };
    let id = submitted.id;
    tracing::Span::current().record("build.id", id.as_str());
    // Pasted into a tracing UI, it shows the build across the farm.
    let trace = farm_telemetry::trace_id(&tracing::Span::current());
    if args.detach {
        if args.json {
            let mut out = serde_json::json!({ "id": id });
            if let Some(trace) = &trace {
                out["trace_id"] = trace.as_str().into();
            }
            println!("{out}");
        } else {
            println!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "farm submit: build {id} on {addr} ({} layers)",
        submitted.layers.len()
    );

    let (events, rx) = farm_model::EventSender::channel();
    let progress = Progress::start(&plan, rx);
    let watched = {
        // The coordinator may report a layer running more than once (dispatched, then
        // started by the worker): the display starts it once.
        let mut running = HashSet::new();
        let watching = watch(&mut client, &id, |ev| match progress_event(ev) {
            Some(Event::Started { .. }) if !running.insert(ev.layer.clone()) => {}
            Some(event) => {
                if !matches!(event, Event::Log { .. } | Event::Started { .. }) {
                    running.remove(&ev.layer);
                }
                events.send(event);
            }
            None => {}
        });
        tokio::select! {
            r = watching => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    };
    drop(events);
    let summary = progress.finish().await;
    let Some(watched) = watched else {
        eprintln!(
            "farm submit: stopped watching; build {id} goes on at {addr} \
             (`farm status {id} --wait`, `farm cancel {id}`)"
        );
        return Ok(ExitCode::FAILURE);
    };
    let last = watched?;
    let mut ok = last.kind
        == Some(farm_proto::v1::build_event::Kind::Build(
            BuildState::Succeeded as i32,
        ));
    eprintln!("{summary}");
    if !last.error.is_empty() {
        eprintln!("farm submit: {}", last.error);
    }

    if ok && let Some(out) = &args.output {
        let layer_type = args
            .layer_types
            .first()
            .copied()
            .unwrap_or(farm_image::LayerType::Tar);
        match super::pull::pull_as(&mut client, &id, out, layer_type).await {
            // With --json, stdout is the status object alone.
            Ok(tags) => super::pull::print_tags(out, &tags, args.json),
            Err(e) => {
                eprintln!(
                    "farm submit: writing the OCI layout {}: {e:#}",
                    out.display()
                );
                ok = false;
            }
        }
    }
    if ok && args.push.push.is_some() {
        // The images come through a local layout (-o, or a temporary one).
        let credentials = args.registry.credentials()?;
        let scratch = super::publish::ScratchLayout::new("submit")?;
        let dir = args
            .output
            .clone()
            .unwrap_or_else(|| scratch.path().to_path_buf());
        ok = match super::pull::pull(&mut client, &id, &dir).await {
            Ok(tags) => {
                let layout = farm_image::OciLayout::open(&dir).await?;
                super::publish::push_after_build(
                    layout.blobs(),
                    &tags,
                    &args.push,
                    &credentials,
                    args.json,
                )
                .await
            }
            Err(e) => {
                eprintln!("farm submit: fetching the images to push: {e:#}");
                false
            }
        };
    }
    if args.json {
        let status = client
            .status(&id)
            .await
            .map_err(|s| client.error("Status", &id, s))?;
        println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
    }
    let state = match last.kind {
        Some(farm_proto::v1::build_event::Kind::Build(s)) => build_word(s),
        _ => "unknown",
    };
    eprintln!(
        "farm submit: build {id} {state} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if let Some(trace) = &trace {
        eprintln!("farm submit: trace {trace}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Upload the context's files that the coordinator lacks; how many were sent.
#[tracing::instrument(
    target = "farm_trace",
    name = "upload context",
    skip_all,
    fields(
        files = tracing::field::Empty,
        bytes = tracing::field::Empty,
        files_sent = tracing::field::Empty,
        bytes_sent = tracing::field::Empty,
        files_skipped = tracing::field::Empty,
        bytes_skipped = tracing::field::Empty,
    )
)]
async fn upload_context(client: &mut Client, context: &BuildContext) -> anyhow::Result<usize> {
    let blobs = context.blobs();
    let digests: Vec<Digest> = blobs.iter().map(|(_, d, _)| (*d).clone()).collect();
    let missing = farm_client::blobs::find_missing(&mut client.blobs, &digests)
        .await
        .with_context(|| format!("asking {} which files it lacks", client.addr))?;
    let missing: HashSet<Digest> = missing.into_iter().collect();
    let total: u64 = blobs.iter().map(|(_, _, n)| n).sum();
    let to_send: Vec<(PathBuf, Digest, u64)> = blobs
        .iter()
        .filter(|(_, d, _)| missing.contains(*d))
        .map(|(p, d, n)| (p.to_path_buf(), (*d).clone(), *n))
        .collect();
    let bytes: u64 = to_send.iter().map(|(_, _, n)| n).sum();
    let span = tracing::Span::current();
    span.record("files", blobs.len());
    span.record("bytes", total);
    span.record("files_sent", to_send.len());
    span.record("bytes_sent", bytes);
    span.record("files_skipped", blobs.len() - to_send.len());
    span.record("bytes_skipped", total - bytes);
    eprintln!(
        "farm submit: context {} ({} files, {}); uploading {} ({})",
        context.root.display(),
        blobs.len(),
        human_bytes(total),
        to_send.len(),
        human_bytes(bytes)
    );
    let blobs_client = client.blobs.clone();
    let count = to_send.len();
    futures::stream::iter(to_send)
        .map(|(path, expected, _)| {
            let mut c = blobs_client.clone();
            async move {
                let sent = farm_client::blobs::upload_file(&mut c, &path)
                    .await
                    .with_context(|| format!("uploading {}", path.display()))?;
                anyhow::ensure!(
                    sent == expected,
                    "{} changed while it was being submitted; submit again",
                    path.display()
                );
                Ok(())
            }
        })
        .buffer_unordered(UPLOADS)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(count)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::context::Entry;
    use crate::test_coordinator::{Coordinator, ServedEmbedded};

    #[test]
    fn only_variables_a_passthrough_rule_names_are_sent() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.yaml");
        std::fs::write(
            &f,
            "a:\n  from: {type: scratch}\n\
             b:\n  from: {type: scratch}\n  build_env_passthrough: ['CI_.*']\n",
        )
        .unwrap();
        let plan =
            farm_coordinator::Plan::load(&f, &Default::default(), &farm_stackerfile::LocalFiles)
                .unwrap();
        let caller = [
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
            ("HOME", "/root"),
            ("http_proxy", "p"),
            ("TERM", "xterm"),
            ("CI_JOB", "7"),
            ("XCI_JOB", "no"),
            ("TERMINAL", "no"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let sent = passthrough_environment(&plan, caller);
        let mut names: Vec<&str> = sent.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["CI_JOB", "TERM", "http_proxy"]);
        assert_eq!(sent["CI_JOB"], "7");
    }

    fn file(dir: &std::path::Path, name: &str, content: &str) -> (String, Entry) {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        let entry = Entry::File {
            source: path,
            digest: Digest::of(content.as_bytes()),
            size: content.len() as u64,
            mode: 0o644,
        };
        (name.to_string(), entry)
    }

    #[tokio::test]
    async fn only_missing_files_are_uploaded() {
        let state = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(state.path()).await;
        let dir = tempfile::tempdir().unwrap();
        let entries: BTreeMap<String, Entry> = [
            file(dir.path(), "a", "already there"),
            file(dir.path(), "b", "new"),
            file(dir.path(), "c", "new"),
        ]
        .into_iter()
        .collect();
        let context = BuildContext {
            root: dir.path().to_path_buf(),
            entries,
            stackerfiles: vec![],
        };
        let mut c = Client::connect(&coordinator.addr).await.unwrap();
        // "a" goes up first, with a context of its own.
        let first = BuildContext {
            entries: context
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() == "a")
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            ..context.clone()
        };
        assert_eq!(upload_context(&mut c, &first).await.unwrap(), 1);
        assert!(!coordinator.store.exists(&Digest::of(b"new")).await.unwrap());
        // "b" and "c" have the same content: one upload; "a" is there already.
        assert_eq!(upload_context(&mut c, &context).await.unwrap(), 1);
        assert_eq!(
            coordinator
                .store
                .get_bytes(&Digest::of(b"new"))
                .await
                .unwrap(),
            "new"
        );
        assert_eq!(
            coordinator
                .store
                .get_bytes(&Digest::of(b"already there"))
                .await
                .unwrap(),
            "already there"
        );
        assert_eq!(upload_context(&mut c, &context).await.unwrap(), 0);

        // A file that changed after it was hashed is not submitted under a stale digest.
        std::fs::write(dir.path().join("b"), "changed").unwrap();
        let stale = BuildContext {
            entries: [file(dir.path(), "d", "newer")]
                .into_iter()
                .map(|(k, e)| match e {
                    Entry::File {
                        source, size, mode, ..
                    } => (
                        k,
                        Entry::File {
                            source,
                            digest: Digest::of(b"what it was"),
                            size,
                            mode,
                        },
                    ),
                    other => (k, other),
                })
                .collect(),
            ..context
        };
        let e = upload_context(&mut c, &stale).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("changed while it was being submitted"),
            "{e}"
        );
    }

    #[test]
    fn byte_counts() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
    }

    /// The coordinator's real server (with the embedded worker behind it) on a local
    /// port, and the client's remote path against it: upload, submit, watch, status, pull.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_build_through_the_real_coordinator() {
        let dir = tempfile::tempdir().unwrap();
        let Some(served) = ServedEmbedded::start(dir.path()).await else {
            return;
        };
        let addr = served.addr.clone();

        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("files/sub")).unwrap();
        std::fs::write(ctx.join("files/sub/hello.txt"), "hello\n").unwrap();
        std::os::unix::fs::symlink("sub/hello.txt", ctx.join("files/link")).unwrap();
        std::fs::write(
            ctx.join("stacker.yaml"),
            "app:\n  from:\n    type: scratch\n  imports:\n    - path: files\n      dest: /files\n",
        )
        .unwrap();
        let file = ctx.join("stacker.yaml");
        let plan =
            farm_stackerfile::Plan::load(&file, &Default::default(), &farm_stackerfile::LocalFiles)
                .unwrap();
        let context = collect(&plan, std::slice::from_ref(&file), false).unwrap();
        let request = SubmitRequest {
            stackerfiles: context.stackerfiles.clone(),
            context: context.to_proto(),
            compression: Default::default(),
            ..SubmitRequest::default()
        };

        let mut c = Client::connect(&addr).await.unwrap();
        assert_eq!(upload_context(&mut c, &context).await.unwrap(), 2);
        assert_eq!(upload_context(&mut c, &context).await.unwrap(), 0);
        let submitted = c.farm.submit(request.clone()).await.unwrap().into_inner();
        assert_eq!(submitted.layers, ["app"]);
        let mut seen = Vec::new();
        let last = watch(&mut c, &submitted.id, |e| seen.push(e.clone()))
            .await
            .unwrap();
        let events: Vec<_> = seen.iter().filter_map(progress_event).collect();
        assert_eq!(
            last.kind,
            Some(farm_proto::v1::build_event::Kind::Build(
                BuildState::Succeeded as i32
            )),
            "{last:?}\n{events:?}"
        );
        let status = c.status(&submitted.id).await.unwrap();
        let json = status_json(&status);
        assert_eq!(json["state"], "succeeded", "{json}");
        assert_eq!(json["layers"][0]["name"], "app", "{json}");
        assert!(json["layers"][0]["manifest_digest"].is_string(), "{json}");

        let out = dir.path().join("oci");
        let tags = super::super::pull::pull(&mut c, &submitted.id, &out)
            .await
            .unwrap();
        assert_eq!(tags.len(), 1);
        assert_eq!(tags[0].0, "app");
        let oci = farm_image::OciLayout::open(&out).await.unwrap();
        assert_eq!(oci.tags().await.unwrap(), ["app"]);

        // The same again: all cached.
        let again = c.farm.submit(request).await.unwrap().into_inner();
        let mut cached = Vec::new();
        watch(&mut c, &again.id, |e| cached.extend(progress_event(e)))
            .await
            .unwrap();
        assert!(
            cached.iter().any(|e| matches!(e, Event::Cached { .. })),
            "{cached:?}"
        );

        let e = watch(&mut c, "no-such-build", |_| {}).await.unwrap_err();
        assert_eq!(e.to_string(), format!("no build no-such-build on {addr}"));
        served.stop().await;
    }
}

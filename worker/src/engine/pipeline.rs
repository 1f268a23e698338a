//! One build, step by step: [`build`] reads as the sequence of steps, each a method of
//! [`Build`] taking and returning what the next one needs.
//!
//! 1. The base chain: materialised in the pool (image layers extracted once per
//!    ChainID; a tarball base unpacked as a chain of its own).
//! 2. A tar base becomes a layer of its own when extra layers must sit above it.
//! 3. Where each import is on this machine.
//! 4. Extra layers below the run layer: each `dest` import and `overlay_dir`, staged as
//!    container root (so mode and owner are exact) and exported.
//! 5. `run` in the sandbox on a rootless overlay whose lower layer is the chain; the
//!    upper dir is then exactly the change, so capturing it costs what the change
//!    costs, never a walk of the whole rootfs.
//! 6. `generate_labels` in a throwaway overlay over the result.
//! 7. The run's change exported in one streaming pass (tar -> diff_id -> compression ->
//!    blob digest -> blob store) and applied to the base chain to form the new chain.
//! 8. The image config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use tracing::field::Empty;
use tracing::{Instrument as _, info_span};

use farm_image::oci::ImageConfiguration;
use farm_image::{Digest, ExportOptions, ExportedLayer, export_tar_stream};
use farm_model::{BuiltImage, EventSender, Job, JobBase, LayerBlob};

use super::{Engine, EngineError, step};
use crate::assemble::{self, AddedLayer};
use crate::cancel::CancelToken;
use crate::ops::{Op, StageArgs};
use crate::pool::{ChainHandle, Workspace};
use crate::sandbox::Bind;

/// An empty tar (two zero blocks): a change with no entries.
const EMPTY_TAR_SIZE: u64 = 1024;
/// Never part of a layer: the sandbox's own mount.
const STACKER_DIR: &str = "/stacker";

/// Build one layer of `job`.
pub(super) async fn build(
    engine: &Engine,
    job: &Job,
    events: &EventSender,
    cancel: &CancelToken,
) -> Result<BuiltImage, EngineError> {
    let mut build = Build {
        engine,
        job,
        events,
        cancel,
        held: Vec::new(),
        scratch: Vec::new(),
    };
    let result = build.steps().await;
    build.release().await;
    result
}

/// One build: the job, where its output goes, and what it holds until it ends.
pub(super) struct Build<'a> {
    pub(super) engine: &'a Engine,
    pub(super) job: &'a Job,
    pub(super) events: &'a EventSender,
    pub(super) cancel: &'a CancelToken,
    /// Chains the build reads from (producers of imports, the result); held until it
    /// ends.
    pub(super) held: Vec<ChainHandle>,
    /// Workspaces removed when it ends.
    pub(super) scratch: Vec<Workspace>,
}

/// The image as it grows.
struct Stack {
    /// The chain of `layers`: the rootfs the next step builds on.
    chain: ChainHandle,
    /// Every layer of the image, base first.
    layers: Vec<LayerBlob>,
    /// The layers this build added, for the config's history.
    added: Vec<AddedLayer>,
}

impl Stack {
    /// `blob` on top, `chain` its chain.
    fn push(&mut self, chain: ChainHandle, blob: LayerBlob, what: &str) {
        self.chain = chain;
        self.added.push(AddedLayer {
            blob: blob.clone(),
            what: what.to_string(),
        });
        self.layers.push(blob);
    }
}

impl Build<'_> {
    /// The layer's name, for log lines.
    pub(super) fn name(&self) -> &str {
        self.job.layer.name.as_str()
    }

    async fn steps(&mut self) -> Result<BuiltImage, EngineError> {
        // Each step has a span (issue 16), a child of the assignment's.
        let base_layers = match &self.job.base {
            JobBase::Image(i) => i.layers.len(),
            _ => 0,
        };
        let (mut stack, base_config) = self
            .base_chain()
            .instrument(info_span!(
                target: "farm_trace",
                "base chain",
                layers = base_layers,
                extracted = Empty,
                reused = Empty
            ))
            .await?;
        // A tar base and its run form one layer, unless `dest` imports or
        // `overlay_dirs` must sit between them (each is its own layer below the run
        // layer): then the tarball is a layer of its own and the run a diff above.
        let mut tar_base_pending = matches!(
            self.job.base,
            JobBase::Tar { .. } | JobBase::TarInLayer { .. }
        );
        if tar_base_pending && self.has_extra_layers() {
            self.tar_base_layer(&mut stack).await?;
            tar_base_pending = false;
        }
        let imports = self.job.imports.len() + self.job.overlay_dirs.len();
        let staged = async {
            let sources = self.locate_imports().await?;
            for (args, what) in self.extra_layer_inputs(&sources).await? {
                self.add_staged_layer(&mut stack, args, &what).await?;
            }
            Ok::<_, EngineError>(sources)
        }
        .instrument(info_span!(target: "farm_trace", "imports", count = imports))
        .await?;
        let sources = staged;
        let run_upper = self.run(&stack, &sources).await?;
        let labels = self
            .generate_labels(&stack, run_upper.as_deref(), &sources)
            .await?;
        // Exporting prints nothing for a while: the job is busy (progress for the
        // coordinator's --progress-timeout).
        let busy = self.cancel.busy();
        match &run_upper {
            Some(upper) => {
                self.capture_run(&mut stack, upper, tar_base_pending)
                    .instrument(info_span!(target: "farm_trace", "capture"))
                    .await?
            }
            None if tar_base_pending => {
                self.tar_base_layer(&mut stack)
                    .instrument(info_span!(target: "farm_trace", "capture"))
                    .await?
            }
            None => {}
        }
        drop(busy);
        tracing::debug!(layer = self.name(), chain = %stack.chain.id(), "built");
        self.image_config(stack, base_config.as_ref(), &labels)
            .instrument(info_span!(target: "farm_trace", "image config"))
            .await
    }

    /// Removes the build's workspaces, then lets go of its chains.
    async fn release(self) {
        for ws in self.scratch {
            self.engine.remove_workspace(ws).await;
        }
        drop(self.held);
    }

    /// Step 1: the base chain, its layers, and (an image base) its config.
    async fn base_chain(&mut self) -> Result<(Stack, Option<ImageConfiguration>), EngineError> {
        let engine = self.engine;
        let (events, name) = (self.events, self.name());
        let (chain, layers, config) = match &self.job.base {
            JobBase::Scratch => (engine.empty_chain().await?, Vec::new(), None),
            JobBase::Image(image) => {
                let chain = engine.materialise(&image.layers, events, name).await?;
                let config: ImageConfiguration = serde_json::from_slice(
                    &engine
                        .blobs
                        .get_bytes(&Digest::parse(&image.config_digest)?)
                        .await?,
                )
                .map_err(|e| step("reading the base image config")(e.to_string()))?;
                (chain, image.layers.clone(), Some(config))
            }
            JobBase::Tar { digest } => {
                let chain = engine.tar_chain(digest, events, name).await?;
                (chain, Vec::new(), None)
            }
            JobBase::TarInLayer { producer, path } => {
                let producer_chain = engine.materialise(&producer.layers, events, name).await?;
                let found = engine.inspect(producer_chain.rootfs(), path, false).await?;
                let chain = engine
                    .tar_chain_from_file(&producer_chain, path, &found.resolved, events, name)
                    .await?;
                self.held.push(producer_chain);
                (chain, Vec::new(), None)
            }
        };
        let stack = Stack {
            chain,
            layers,
            added: Vec::new(),
        };
        Ok((stack, config))
    }

    /// Whether `dest` imports or `overlay_dirs` add layers below the run layer.
    fn has_extra_layers(&self) -> bool {
        self.job.imports.iter().any(|i| i.dest.is_some()) || !self.job.overlay_dirs.is_empty()
    }

    /// Step 2 (or the whole layer of a tar base without a run): the tar base's tree as
    /// a layer.
    async fn tar_base_layer(&mut self, stack: &mut Stack) -> Result<(), EngineError> {
        let rootfs = stack.chain.rootfs().to_path_buf();
        let (chain, blob) = self.whole_tree_layer(&rootfs, &[]).await?;
        stack.push(chain, blob, "tar base");
        Ok(())
    }

    /// Step 3: where each import's content is on this machine.
    async fn locate_imports(&mut self) -> Result<Vec<PathBuf>, EngineError> {
        let mut sources = Vec::with_capacity(self.job.imports.len());
        for import in &self.job.imports {
            sources.push(self.locate_import(import).await?);
        }
        Ok(sources)
    }

    /// Step 4a: what each extra layer stages (`dest` imports, then `overlay_dirs`), and
    /// what it is called in the history.
    async fn extra_layer_inputs(
        &mut self,
        sources: &[PathBuf],
    ) -> Result<Vec<(StageArgs, String)>, EngineError> {
        let job = self.job;
        let mut extra = Vec::new();
        for (import, source) in job.imports.iter().zip(sources) {
            if let Some(dest) = &import.dest {
                self.events.log(
                    self.name(),
                    format!("farm: import {} -> {dest}", import.name),
                );
                extra.push((
                    StageArgs {
                        source: source.clone(),
                        contents_only: import.contents_only,
                        name: import.name.clone(),
                        root: PathBuf::new(),
                        dest: dest.clone(),
                        mode: import.mode,
                        uid: import.uid,
                        gid: import.gid,
                        base_rootfs: None,
                    },
                    format!("import {}", import.name),
                ));
            }
        }
        for od in &job.overlay_dirs {
            self.events.log(
                self.name(),
                format!("farm: overlay_dir {} -> {}", od.source.display(), od.dest),
            );
            let source = match &od.tree {
                Some(tree) => self.materialise_tree(tree, "overlay").await?,
                None => od.source.clone(),
            };
            extra.push((
                StageArgs {
                    source,
                    contents_only: true,
                    name: String::new(),
                    root: PathBuf::new(),
                    dest: format!("{}/", od.dest.trim_end_matches('/')),
                    mode: None,
                    uid: None,
                    gid: None,
                    base_rootfs: None,
                },
                format!("overlay_dir {}", od.dest),
            ));
        }
        Ok(extra)
    }

    /// Step 4b: one extra layer, staged, exported and added (unless it is empty).
    async fn add_staged_layer(
        &mut self,
        stack: &mut Stack,
        args: StageArgs,
        what: &str,
    ) -> Result<(), EngineError> {
        let engine = self.engine;
        let (staged, root) = self.stage(args, &stack.chain).await?;
        let exported = match self.export_layer(&root, false, &[], what).await {
            Ok(e) => e,
            Err(e) => {
                engine.remove_workspace(staged).await;
                return Err(e);
            }
        };
        if let Some(blob) = exported {
            let chain = engine
                .extend_chain(&stack.chain, &blob.diff_id, &root, false)
                .await?;
            stack.push(chain, blob, what);
        }
        engine.remove_workspace(staged).await;
        Ok(())
    }

    /// Stage an import or overlay dir (as container root) in a fresh workspace; returns
    /// it and the staging root to export.
    async fn stage(
        &self,
        mut args: StageArgs,
        base: &ChainHandle,
    ) -> Result<(Workspace, PathBuf), EngineError> {
        let engine = self.engine;
        let ws = engine.workspace(false, None).await?;
        let root = ws.path().join("stage");
        std::fs::create_dir_all(&root).map_err(|e| step("staging an import")(e.to_string()))?;
        let _ = engine.userns.mapping().make_owned_by_container_root(&root);
        args.root = root.clone();
        args.base_rootfs = Some(base.rootfs().to_path_buf());
        let what = format!("import {}", args.source.display());
        if let Err(e) = engine.op(&Op::StageImport(args), None, None, &what).await {
            engine.remove_workspace(ws).await;
            return Err(e);
        }
        Ok((ws, root))
    }

    /// Step 5: `run` on an overlay over the chain; returns the upper dir (the change).
    async fn run(
        &mut self,
        stack: &Stack,
        sources: &[PathBuf],
    ) -> Result<Option<PathBuf>, EngineError> {
        let Some(script) = &self.job.layer.run else {
            return Ok(None);
        };
        let ws = self.engine.overlay_workspace().await?;
        let upper = ws.upper().expect("overlay workspace").to_path_buf();
        let spec = self.sandbox_spec(
            &ws,
            vec![stack.chain.rootfs().to_path_buf()],
            script,
            sources,
        )?;
        self.scratch.push(ws);
        self.run_script(&spec)
            .instrument(sandbox_span("run"))
            .await?;
        Ok(Some(upper))
    }

    /// Step 6: `generate_labels`, in a throwaway overlay over the result so far.
    async fn generate_labels(
        &mut self,
        stack: &Stack,
        run_upper: Option<&Path>,
        sources: &[PathBuf],
    ) -> Result<BTreeMap<String, String>, EngineError> {
        let Some(script) = &self.job.layer.generate_labels else {
            return Ok(BTreeMap::new());
        };
        let ws = self.engine.overlay_workspace().await?;
        let mut lower = Vec::new();
        lower.extend(run_upper.map(Path::to_path_buf));
        lower.push(stack.chain.rootfs().to_path_buf());
        let labels_dir = ws.path().join("oci-labels");
        std::fs::create_dir_all(&labels_dir)
            .map_err(|e| step("creating the labels directory")(e.to_string()))?;
        let _ = self
            .engine
            .userns
            .mapping()
            .make_owned_by_container_root(&labels_dir);
        let mut spec = self.sandbox_spec(&ws, lower, script, sources)?;
        spec.binds.push(Bind {
            source: labels_dir.clone(),
            dest: PathBuf::from("/stacker/oci-labels"),
            readonly: false,
        });
        self.scratch.push(ws);
        self.events.log(self.name(), "farm: generate_labels");
        self.run_script(&spec)
            .instrument(sandbox_span("generate_labels"))
            .await?;
        read_labels(&labels_dir)
    }

    /// Step 7: the run's change as a layer. With a tar base still pending, the tarball
    /// and the change form one layer: the whole tree.
    async fn capture_run(
        &mut self,
        stack: &mut Stack,
        upper: &Path,
        tar_base_pending: bool,
    ) -> Result<(), EngineError> {
        let engine = self.engine;
        let exclude = [STACKER_DIR.to_string()];
        if tar_base_pending {
            let full = engine.snapshot_workspace(&stack.chain).await?;
            let rootfs = full.rootfs().expect("snapshot workspace").to_path_buf();
            self.scratch.push(full);
            engine.apply_dir(upper, &rootfs).await?;
            let (chain, blob) = self.whole_tree_layer(&rootfs, &exclude).await?;
            stack.push(chain, blob, "tar base + run");
            return Ok(());
        }
        if let Some(blob) = self.export_layer(upper, true, &exclude, "run").await? {
            let chain = engine
                .extend_chain(&stack.chain, &blob.diff_id, upper, true)
                .await?;
            stack.push(chain, blob, "run");
        } else {
            self.events
                .log(self.name(), "farm: run changed nothing; no layer added");
        }
        Ok(())
    }

    /// Step 8: the image config, in the blob store; the result's chain is held until
    /// the build ends.
    async fn image_config(
        &mut self,
        stack: Stack,
        base_config: Option<&ImageConfiguration>,
        labels: &BTreeMap<String, String>,
    ) -> Result<BuiltImage, EngineError> {
        self.held.push(stack.chain);
        let stamp = assemble::Stamp::new(self.job.source_date_epoch);
        let config =
            assemble::image_config(&self.job.layer, base_config, &stack.added, labels, &stamp)?;
        let bytes = farm_image::to_canonical_json(&config)?;
        let size = bytes.len() as u64;
        let info = self.engine.blobs.put(bytes.into()).await?;
        Ok(BuiltImage::new(
            info.digest.to_string(),
            size,
            stack.layers,
        )?)
    }

    /// The whole tree at `rootfs` as one layer (a tar base), and the chain of it.
    async fn whole_tree_layer(
        &self,
        rootfs: &Path,
        exclude: &[String],
    ) -> Result<(ChainHandle, LayerBlob), EngineError> {
        let blob = match self.job.layer_format.layer_type.fs_kind() {
            None => LayerBlob::from(&self.export_dir(rootfs, false, exclude).await?),
            Some(_) => self
                .export_layer(rootfs, false, exclude, "tar base")
                .await?
                .ok_or_else(|| step("the tar base")("it is empty".to_string()))?,
        };
        let chain = self
            .engine
            .extend_chain_from(None, &blob.diff_id, rootfs, false)
            .await?;
        Ok((chain, blob))
    }

    /// Export `dir` (an upper dir when `overlay`) as a layer of the job's type; `None`
    /// when it holds no change.
    async fn export_layer(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &[String],
        what: &str,
    ) -> Result<Option<LayerBlob>, EngineError> {
        let format = self.job.layer_format;
        let Some(kind) = format.layer_type.fs_kind() else {
            let exported = self.export_dir(dir, overlay, exclude).await?;
            return Ok((exported.tar_size > EMPTY_TAR_SIZE).then(|| LayerBlob::from(&exported)));
        };
        let options = farm_image::MakeOptions {
            exclude: Vec::new(),
            source_date_epoch: self.job.source_date_epoch,
            uuid_seed: format!("{} {what}", self.job.cache_key),
            verity: format.verity,
            // `--compression zstd:LEVEL` sets the level of a filesystem layer too.
            zstd_level: match self.job.compression {
                farm_image::Compression::Zstd { level } => Some(level),
                _ => None,
            },
        };
        self.engine
            .export_fs_layer(kind, dir, exclude, options)
            .await
    }

    /// Export the tar of `dir` (an upper dir when `overlay`) to the blob store in one
    /// streaming pass.
    async fn export_dir(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &[String],
    ) -> Result<ExportedLayer, EngineError> {
        let span = info_span!(
            target: "farm_trace",
            "export",
            compression = %self.job.compression,
            tar_bytes = Empty,
            blob_bytes = Empty,
            digest = Empty,
            mb_per_s = Empty,
        );
        let started = std::time::Instant::now();
        let exported = self
            .export_dir_untimed(dir, overlay, exclude)
            .instrument(span.clone())
            .await?;
        let took = started.elapsed();
        let stats = self.engine.export_stats();
        stats.count.fetch_add(1, Relaxed);
        stats.tar_bytes.fetch_add(exported.tar_size, Relaxed);
        stats.blob_bytes.fetch_add(exported.size, Relaxed);
        stats.micros.fetch_add(took.as_micros() as u64, Relaxed);
        span.record("tar_bytes", exported.tar_size);
        span.record("blob_bytes", exported.size);
        span.record("digest", tracing::field::display(&exported.digest));
        span.record(
            "mb_per_s",
            exported.tar_size as f64 / 1e6 / took.as_secs_f64().max(1e-6),
        );
        Ok(exported)
    }

    /// [`Build::export_dir`]: tar -> diff_id -> compression -> digest, streamed into the
    /// blob store (the upload).
    async fn export_dir_untimed(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &[String],
    ) -> Result<ExportedLayer, EngineError> {
        let engine = self.engine;
        let (what, mut child) = engine
            .tar_process(dir, overlay, exclude, self.job.source_date_epoch)
            .await?;
        let out = child.stdout.take().expect("piped");
        let mut opts = ExportOptions::new(self.job.compression);
        opts.threads = engine.options.compression_threads;
        let exported = export_tar_stream(&engine.blobs, out, &opts).await;
        let status = child
            .wait()
            .await
            .map_err(|e| step("writing a layer tar")(e.to_string()))?;
        if !status.success() {
            return Err(step("capturing the layer")(what));
        }
        Ok(exported?)
    }
}

/// The span of one sandbox run (`run` or `generate_labels`); `run_script` records how
/// it ended and how long the sandbox took to start.
fn sandbox_span(what: &'static str) -> tracing::Span {
    info_span!(
        target: "farm_trace",
        "sandbox",
        script = what,
        start_ms = Empty,
        exit = Empty,
        otel.status_description = Empty,
    )
}

/// Labels written by generate_labels: one per file, named by the file, its content the
/// value (as stacker does: `echo v > f` gives "v\n").
fn read_labels(dir: &Path) -> Result<BTreeMap<String, String>, EngineError> {
    let mut out = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| step("reading generated labels")(e.to_string()))?;
    for e in entries {
        let e = e.map_err(|e| step("reading generated labels")(e.to_string()))?;
        if !e.path().is_file() {
            continue;
        }
        let value = std::fs::read_to_string(e.path()).map_err(|err| {
            step(format!("reading label {}", e.file_name().to_string_lossy()))(err.to_string())
        })?;
        out.insert(e.file_name().to_string_lossy().into_owned(), value);
    }
    Ok(out)
}

//! The build engine: one stacker layer, rootless, from its base to its image config.
//!
//! 1. Materialise the base chain in the pool: each OCI layer chain is extracted once, as
//!    a read-only snapshot of its parent plus one layer, keyed by ChainID.
//! 2. Each `dest` import becomes its own layer on top (staged as container root, so its
//!    mode and owner are exact).
//! 3. `run` executes in the sandbox on a rootless overlay whose lower layer is the chain;
//!    the upper directory is then exactly the change, so capturing it costs what the
//!    change costs, never a walk of the whole rootfs.
//! 4. The change is exported in one streaming pass (tar -> diff_id -> compression ->
//!    blob digest -> blob store), and applied to a snapshot of the base to form the new
//!    chain for later builds.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use farm_image::oci::ImageConfiguration;
use farm_image::{BlobStore, Compression, Digest, ExportOptions, export_tar_stream};
use farm_model::{
    BuiltImage, EventSender, FailureKind, ImportSource, Job, JobBase, JobImport, LayerBlob,
    LayerFailure,
};

use crate::assemble::{self, AddedLayer};
use crate::cancel::CancelToken;
use crate::ops::{self, ApplyArgs, Op, RemoveArgs, StageArgs, WriteTarArgs};
use crate::pool::{Begin, ChainHandle, ChainId, Deleter, Pool, PoolError, WorkspaceOptions};
use crate::sandbox::{Bind, Rootfs, SandboxError, SandboxSpec, ScriptStatus};
use crate::userns::Userns;

/// An empty tar (two zero blocks): a change with no entries.
const EMPTY_TAR_SIZE: u64 = 1024;
/// Lines of script output kept for the error message of a failed run.
const TAIL_LINES: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Chain(#[from] farm_model::InvalidChainId),
    #[error(transparent)]
    Image(#[from] farm_image::Error),
    #[error(transparent)]
    Userns(#[from] crate::userns::UsernsError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Assemble(#[from] assemble::AssembleError),
    #[error("{what}: {message}")]
    Step { what: String, message: String },
    #[error("run failed ({status}); the last lines of its output:\n{tail}")]
    RunFailed { status: String, tail: String },
    /// An input is not what the stackerfile says (a hash, a file where a directory
    /// must be).
    #[error("{what}: {message}")]
    Input { what: String, message: String },
    #[error("cancelled")]
    Cancelled,
}

impl EngineError {
    /// The layer failure this error is: what the coordinator decides on.
    pub fn failure(&self) -> LayerFailure {
        let kind = match self {
            EngineError::Cancelled => FailureKind::Cancelled,
            EngineError::RunFailed { .. } | EngineError::Sandbox(SandboxError::TimedOut(_)) => {
                FailureKind::RunFailed
            }
            EngineError::Input { .. } => FailureKind::Input,
            EngineError::Pool(_)
            | EngineError::Chain(_)
            | EngineError::Image(_)
            | EngineError::Userns(_)
            | EngineError::Sandbox(_)
            | EngineError::Assemble(_)
            | EngineError::Step { .. } => FailureKind::Internal,
        };
        LayerFailure::new(kind, self.to_string())
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> EngineError {
    let what = what.into();
    move |message| EngineError::Step { what, message }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub timeout: Option<Duration>,
    pub compression_threads: usize,
}

/// Builds layers on one pool.
pub struct Engine {
    pool: Pool,
    blobs: BlobStore,
    userns: Userns,
    options: EngineOptions,
    cancel: CancelToken,
}

/// Deletes trees inside the user namespace (files of other container users cannot be
/// removed from outside it).
pub struct UsernsDeleter(pub Userns);

impl Deleter for UsernsDeleter {
    fn remove_tree(&self, path: &Path) -> std::io::Result<()> {
        // What the worker owns it removes itself (always, as real root); the rest is
        // removed by container root.
        if crate::pool::StdDeleter.remove_tree(path).is_ok() || !path.exists() {
            return Ok(());
        }
        let mut cmd = self
            .0
            .op_command(&Op::RemoveTree(RemoveArgs { path: path.into() }))
            .map_err(std::io::Error::other)?;
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(std::io::Error::other)?;
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = child.wait_blocking()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "removing {} in the user namespace failed ({status}): {}",
                path.display(),
                err.trim()
            )))
        }
    }
}

impl Engine {
    pub fn new(pool: Pool, blobs: BlobStore, userns: Userns, options: EngineOptions) -> Self {
        Engine {
            pool,
            blobs,
            userns,
            options,
            cancel: CancelToken::new(),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Cancel every build of this engine (Ctrl-C): sandboxes are killed.
    pub fn cancel_all(&self) {
        self.cancel.cancel();
    }

    /// Build one layer.
    pub async fn build(&self, job: &Job, events: &EventSender) -> Result<BuiltImage, EngineError> {
        self.build_cancellable(job, events, &self.cancel.child())
            .await
    }

    /// A token that stops one build (and is stopped by [`cancel_all`](Self::cancel_all)).
    pub fn job_cancel_token(&self) -> CancelToken {
        self.cancel.child()
    }

    /// Build one layer; `cancel` (from [`job_cancel_token`](Self::job_cancel_token))
    /// kills its sandbox.
    pub async fn build_cancellable(
        &self,
        job: &Job,
        events: &EventSender,
        cancel: &CancelToken,
    ) -> Result<BuiltImage, EngineError> {
        // Chains and workspaces this build reads from; held until it ends.
        let mut held: Vec<ChainHandle> = Vec::new();
        let mut scratch: Vec<crate::pool::Workspace> = Vec::new();
        let result = self
            .build_inner(job, events, &mut held, &mut scratch, cancel)
            .await;
        for ws in scratch {
            self.remove_workspace(ws).await;
        }
        drop(held);
        result
    }

    async fn build_inner(
        &self,
        job: &Job,
        events: &EventSender,
        held: &mut Vec<ChainHandle>,
        scratch: &mut Vec<crate::pool::Workspace>,
        cancel: &CancelToken,
    ) -> Result<BuiltImage, EngineError> {
        let name = job.layer.name.as_str();
        let compression = job.compression;
        // 1. The base chain.
        let (mut chain, mut layers, base_config) = match &job.base {
            JobBase::Scratch => (self.empty_chain().await?, Vec::new(), None),
            JobBase::Image(image) => {
                let chain = self.materialise(&image.layers, events, name).await?;
                let config: ImageConfiguration = serde_json::from_slice(
                    &self
                        .blobs
                        .get_bytes(&Digest::parse(&image.config_digest)?)
                        .await?,
                )
                .map_err(|e| step("reading the base image config")(e.to_string()))?;
                (chain, image.layers.clone(), Some(config))
            }
            JobBase::Tar { digest } => {
                let chain = self.tar_chain(digest, events, name).await?;
                (chain, Vec::new(), None)
            }
            JobBase::TarInLayer { producer, path } => {
                let producer_chain = self.materialise(&producer.layers, events, name).await?;
                let found = self.inspect(producer_chain.rootfs(), path, false).await?;
                let chain = self
                    .tar_chain_from_file(&producer_chain, path, &found.resolved, events, name)
                    .await?;
                held.push(producer_chain);
                (chain, Vec::new(), None)
            }
        };
        let mut new_layers = Vec::new();

        // A tar base and its run form one layer, unless `dest` imports or
        // `overlay_dirs` must sit between them (each is its own layer below the run
        // layer): then the tarball is a layer of its own and the run a diff above.
        let mut tar_base = matches!(job.base, JobBase::Tar { .. } | JobBase::TarInLayer { .. });
        let has_extra_layers =
            job.imports.iter().any(|i| i.dest.is_some()) || !job.overlay_dirs.is_empty();
        if tar_base && has_extra_layers {
            let rootfs = chain.rootfs().to_path_buf();
            let blob;
            (chain, blob) = self
                .whole_tree_layer(&rootfs, &[], job, compression)
                .await?;
            new_layers.push(added(&blob, "tar base"));
            layers.push(blob);
            tar_base = false;
        }

        // Where each import's content is on this machine.
        let mut sources: Vec<PathBuf> = Vec::with_capacity(job.imports.len());
        for import in &job.imports {
            sources.push(
                self.locate_import(import, events, name, held, scratch)
                    .await?,
            );
        }

        // 2. `dest` imports and `overlay_dirs`, each its own layer below the run layer.
        let mut extra: Vec<(StageArgs, String)> = Vec::new();
        for (import, source) in job.imports.iter().zip(&sources) {
            if let Some(dest) = &import.dest {
                events.log(name, format!("farm: import {} -> {dest}", import.name));
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
            events.log(
                name,
                format!("farm: overlay_dir {} -> {}", od.source.display(), od.dest),
            );
            let source = match &od.tree {
                Some(tree) => self.materialise_tree(tree, "overlay", scratch).await?,
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
        for (args, what) in extra {
            let (staged, root) = self.stage(args, &chain).await?;
            let exported = self.export_dir(&root, false, &[], job, compression).await;
            let exported = match exported {
                Ok(e) => e,
                Err(e) => {
                    self.remove_workspace(staged).await;
                    return Err(e);
                }
            };
            if exported.tar_size > EMPTY_TAR_SIZE {
                let blob = LayerBlob::from(&exported);
                chain = self
                    .extend_chain(&chain, &blob.diff_id, &root, false)
                    .await?;
                new_layers.push(added(&blob, &what));
                layers.push(blob);
            }
            self.remove_workspace(staged).await;
        }

        // 3. `run` on an overlay over the chain, 4. capture and export the change.
        let mut run_upper: Option<PathBuf> = None;
        if let Some(script) = &job.layer.run {
            let ws = self.overlay_workspace().await?;
            let upper = ws.upper().expect("overlay workspace").to_path_buf();
            let spec = self.spec(
                job,
                &ws,
                vec![chain.rootfs().to_path_buf()],
                script,
                &job.imports,
                &sources,
            )?;
            scratch.push(ws);
            self.run(&spec, events, name, cancel).await?;
            run_upper = Some(upper);
        }

        // generate_labels runs in a throwaway copy of the result.
        let mut labels = BTreeMap::new();
        if let Some(script) = &job.layer.generate_labels {
            let ws = self.overlay_workspace().await?;
            let mut lower = Vec::new();
            lower.extend(run_upper.clone());
            lower.push(chain.rootfs().to_path_buf());
            let labels_dir = ws.path().join("oci-labels");
            std::fs::create_dir_all(&labels_dir)
                .map_err(|e| step("creating the labels directory")(e.to_string()))?;
            let _ = self
                .userns
                .mapping()
                .make_owned_by_container_root(&labels_dir);
            let mut spec = self.spec(job, &ws, lower, script, &job.imports, &sources)?;
            spec.binds.push(Bind {
                source: labels_dir.clone(),
                dest: PathBuf::from("/stacker/oci-labels"),
                readonly: false,
            });
            scratch.push(ws);
            events.log(name, "farm: generate_labels");
            self.run(&spec, events, name, cancel).await?;
            labels = read_labels(&labels_dir)?;
        }

        let exclude = ["/stacker".to_string()];
        if let Some(upper) = &run_upper {
            if tar_base {
                // The tarball and the run changes form one layer: the whole tree.
                let full = self.pool_workspace_snapshot(&chain).await?;
                let rootfs = full.rootfs().expect("snapshot workspace").to_path_buf();
                scratch.push(full);
                self.apply_dir(upper, &rootfs).await?;
                let blob;
                (chain, blob) = self
                    .whole_tree_layer(&rootfs, &exclude, job, compression)
                    .await?;
                new_layers.push(added(&blob, "tar base + run"));
                layers.push(blob);
            } else {
                let exported = self
                    .export_dir(upper, true, &exclude, job, compression)
                    .await?;
                if exported.tar_size > EMPTY_TAR_SIZE {
                    let blob = LayerBlob::from(&exported);
                    chain = self
                        .extend_chain(&chain, &blob.diff_id, upper, true)
                        .await?;
                    new_layers.push(added(&blob, "run"));
                    layers.push(blob);
                } else {
                    events.log(name, "farm: run changed nothing; no layer added");
                }
            }
        } else if tar_base {
            let rootfs = chain.rootfs().to_path_buf();
            let blob;
            (chain, blob) = self
                .whole_tree_layer(&rootfs, &[], job, compression)
                .await?;
            new_layers.push(added(&blob, "tar base"));
            layers.push(blob);
        }
        tracing::debug!(layer = name, chain = %chain.id(), "built");
        held.push(chain);

        // 5. The image config.
        let created = assemble::created_time(job.source_date_epoch);
        let config = assemble::image_config(
            &job.layer,
            base_config.as_ref(),
            &new_layers,
            &labels,
            &created,
        )?;
        let bytes = farm_image::to_canonical_json(&config)?;
        let size = bytes.len() as u64;
        let info = self.blobs.put(bytes.into()).await?;
        Ok(BuiltImage::new(info.digest.to_string(), size, layers)?)
    }

    /// The whole tree at `rootfs` as one layer (a tar base), and the chain of it.
    async fn whole_tree_layer(
        &self,
        rootfs: &Path,
        exclude: &[String],
        job: &Job,
        compression: Compression,
    ) -> Result<(ChainHandle, LayerBlob), EngineError> {
        let exported = self
            .export_dir(rootfs, false, exclude, job, compression)
            .await?;
        let blob = LayerBlob::from(&exported);
        let chain = self
            .extend_chain_from(None, &blob.diff_id, rootfs, false)
            .await?;
        Ok((chain, blob))
    }

    /// The sandbox spec of a script of `job` on an overlay of `lower` (top first).
    fn spec(
        &self,
        job: &Job,
        ws: &crate::pool::Workspace,
        lower: Vec<PathBuf>,
        script: &str,
        imports: &[JobImport],
        sources: &[PathBuf],
    ) -> Result<SandboxSpec, EngineError> {
        let mount_dir = ws.path().join("mnt");
        std::fs::create_dir_all(&mount_dir)
            .map_err(|e| step("creating the sandbox mount point")(e.to_string()))?;
        let mut spec = SandboxSpec::new(
            Rootfs::Overlay {
                lower,
                upper: ws.upper().expect("overlay workspace").to_path_buf(),
                work: ws.work().expect("overlay workspace").to_path_buf(),
            },
            &mount_dir,
            script.to_string(),
        );
        spec.env = job.env.clone();
        spec.timeout = self.options.timeout;
        let imports_dir = if job.layer.legacy_import {
            "/stacker"
        } else {
            "/stacker/imports"
        };
        for (import, source) in imports.iter().zip(sources) {
            if import.dest.is_none() {
                spec.binds.push(Bind {
                    source: source.clone(),
                    dest: PathBuf::from(imports_dir).join(&import.name),
                    readonly: true,
                });
            }
        }
        for b in &job.layer.binds {
            spec.binds.push(Bind {
                source: b.source.clone(),
                dest: PathBuf::from(&b.dest),
                readonly: false,
            });
        }
        Ok(spec)
    }

    /// Run a sandbox, streaming its output; a failure carries the end of the output.
    async fn run(
        &self,
        spec: &SandboxSpec,
        events: &EventSender,
        name: &str,
        cancel: &CancelToken,
    ) -> Result<(), EngineError> {
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        let status = self
            .userns
            .run_sandbox(spec, Some(cancel), |line| {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
                events.log(name, line);
            })
            .await;
        let status = match status {
            Ok(s) => s,
            Err(_) if cancel.is_cancelled() => return Err(EngineError::Cancelled),
            Err(e) => return Err(e.into()),
        };
        if !status.success() {
            return Err(EngineError::RunFailed {
                status: match status {
                    ScriptStatus::Exited(c) => format!("exit code {c}"),
                    ScriptStatus::Signaled(s) => format!("killed by signal {s}"),
                },
                tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
            });
        }
        Ok(())
    }

    /// Write a tree from the blob store (a local input of a remote submission) into a
    /// scratch workspace; returns its path.
    async fn materialise_tree(
        &self,
        digest: &str,
        file_name: &str,
        scratch: &mut Vec<crate::pool::Workspace>,
    ) -> Result<PathBuf, EngineError> {
        let ws = self.workspace(false, None).await?;
        let dir = ws.path().join("tree");
        std::fs::create_dir_all(&dir).map_err(|e| step("staging an input")(e.to_string()))?;
        let path = dir.join(file_name);
        let result = self
            .blobs
            .materialize_tree(&Digest::parse(digest)?, &path)
            .await;
        scratch.push(ws);
        result?;
        Ok(path)
    }

    /// Where an import's content is on this machine (inside a chain for `stacker://`,
    /// a downloaded file for http).
    async fn locate_import(
        &self,
        import: &JobImport,
        events: &EventSender,
        name: &str,
        held: &mut Vec<ChainHandle>,
        scratch: &mut Vec<crate::pool::Workspace>,
    ) -> Result<PathBuf, EngineError> {
        match &import.source {
            ImportSource::Local(path) => Ok(path.clone()),
            ImportSource::Tree { digest } => {
                self.materialise_tree(digest, &import.name, scratch).await
            }
            ImportSource::Blob { digest } => {
                let ws = self.workspace(false, None).await?;
                let dir = ws.path().join("download");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| step("staging a download")(e.to_string()))?;
                let file = dir.join(&import.name);
                let mut reader = self.blobs.reader(&Digest::parse(digest)?).await?;
                let f2 = file.clone();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let mut out = std::fs::File::create(&f2)?;
                    std::io::copy(&mut reader, &mut out)?;
                    Ok(())
                })
                .await
                .map_err(|e| step("staging a download")(e.to_string()))?
                .map_err(|e| step(format!("staging download {}", import.name))(e.to_string()))?;
                scratch.push(ws);
                Ok(file)
            }
            ImportSource::Layer { producer, path } => {
                let producer_chain = self.materialise(&producer.layers, events, name).await?;
                let found = self
                    .inspect(producer_chain.rootfs(), path, import.hash.is_some())
                    .await?;
                if let (Some(expected), Some(actual)) = (&import.hash, &found.sha256)
                    && !expected.eq_ignore_ascii_case(actual)
                {
                    return Err(EngineError::Input {
                        what: format!("import '{}'", import.written),
                        message: format!(
                            "hash mismatch: expected sha256:{expected}, got sha256:{actual}"
                        ),
                    });
                }
                if import.hash.is_some() && found.is_dir {
                    return Err(EngineError::Input {
                        what: format!("import '{}'", import.written),
                        message: "'hash' applies to files, but this is a directory".to_string(),
                    });
                }
                held.push(producer_chain);
                Ok(found.resolved)
            }
        }
    }

    /// Resolve `path` inside `root` as container root.
    async fn inspect(
        &self,
        root: &Path,
        path: &str,
        sha256: bool,
    ) -> Result<ops::Inspected, EngineError> {
        let args = ops::InspectArgs {
            root: root.to_path_buf(),
            path: path.to_string(),
            sha256,
        };
        let what = format!("stacker:// path '{path}'");
        let out = self.op(&Op::InspectSource(args), None, None, &what).await?;
        serde_json::from_slice(&out).map_err(|e| step(what)(e.to_string()))
    }

    /// A shell (or `command`) in a throwaway copy of a built layer's filesystem, in the
    /// same sandbox as builds, attached to this terminal (`farm chroot`).
    pub async fn chroot(
        &self,
        image: &BuiltImage,
        command: &[String],
        env: Vec<(String, String)>,
        events: &EventSender,
    ) -> Result<ScriptStatus, EngineError> {
        let chain = self.materialise(&image.layers, events, "chroot").await?;
        let ws = self.overlay_workspace().await?;
        let mount_dir = ws.path().join("mnt");
        std::fs::create_dir_all(&mount_dir)
            .map_err(|e| step("creating the sandbox mount point")(e.to_string()))?;
        let command = if command.is_empty() {
            "/bin/sh".to_string()
        } else {
            shell_words::join(command)
        };
        let mut spec = SandboxSpec::new(
            Rootfs::Overlay {
                lower: vec![chain.rootfs().to_path_buf()],
                upper: ws.upper().expect("overlay workspace").to_path_buf(),
                work: ws.work().expect("overlay workspace").to_path_buf(),
            },
            &mount_dir,
            format!("#!/bin/sh\nexec {command}\n"),
        );
        spec.env = env;
        spec.interactive = true;
        let status = self
            .userns
            .run_sandbox(&spec, Some(&self.cancel), |_| {})
            .await;
        self.remove_workspace(ws).await;
        drop(chain);
        Ok(status?)
    }

    /// Copy the file at `path` of a built layer to `dest` (`farm grab`).
    pub async fn grab(
        &self,
        image: &BuiltImage,
        path: &str,
        dest: &Path,
        events: &EventSender,
    ) -> Result<u64, EngineError> {
        let chain = self.materialise(&image.layers, events, "grab").await?;
        let args = ops::ReadFileArgs {
            root: chain.rootfs().to_path_buf(),
            path: path.to_string(),
        };
        let file = std::fs::File::create(dest)
            .map_err(|e| step(format!("creating {}", dest.display()))(e.to_string()))?;
        let result = self
            .op(
                &Op::ReadFile(args),
                None,
                Some(Box::new(file)),
                &format!("grab {path}"),
            )
            .await;
        drop(chain);
        if let Err(e) = result {
            let _ = std::fs::remove_file(dest);
            return Err(e);
        }
        Ok(std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0))
    }

    /// Run a userns op to completion: `input` feeds its stdin, `output` takes its stdout
    /// (collected and returned when `None`). A failure carries the op's own message.
    async fn op(
        &self,
        op: &Op,
        input: Option<Box<dyn Read + Send>>,
        output: Option<Box<dyn std::io::Write + Send>>,
        what: &str,
    ) -> Result<Vec<u8>, EngineError> {
        let mut cmd = self.userns.op_command(op)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn_async().await?;
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let feed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let (Some(mut input), Some(mut stdin)) = (input, stdin) {
                std::io::copy(&mut input, &mut stdin)?;
            }
            Ok(())
        });
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut collected = Vec::new();
            match output {
                Some(mut sink) => {
                    std::io::copy(&mut stdout, &mut sink)?;
                    sink.flush()?;
                }
                None => {
                    stdout.read_to_end(&mut collected)?;
                }
            }
            Ok(collected)
        });
        let errors = tokio::task::spawn_blocking(move || {
            let mut e = String::new();
            let _ = stderr.read_to_string(&mut e);
            e
        });
        let joined = |e: tokio::task::JoinError| step(what)(e.to_string());
        let fed = feed.await.map_err(joined)?;
        let status = child.wait().await.map_err(|e| step(what)(e.to_string()))?;
        let out = read.await.map_err(joined)?;
        let errors = errors.await.unwrap_or_default();
        if !status.success() {
            let msg = errors.trim().trim_start_matches("farm userns op failed: ");
            return Err(step(what)(msg.to_string()));
        }
        fed.map_err(|e| step(what)(format!("feeding input: {e}")))?;
        out.map_err(|e| step(what)(format!("reading output: {e}")))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Pool) -> Result<T, PoolError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(pool))
            .await
            .map_err(|e| step("pool")(e.to_string()))?
            .map_err(Into::into)
    }

    async fn empty_chain(&self) -> Result<ChainHandle, EngineError> {
        let id = ChainId::empty();
        let mapping = self.userns.mapping().clone();
        self.blocking(move |pool| match pool.begin_chain(&id, None)? {
            Begin::Exists(h) => Ok(h),
            Begin::Create(pending) => {
                let _ = mapping.make_owned_by_container_root(pending.rootfs());
                pending.commit()
            }
        })
        .await
    }

    /// The chain of `layers` (base first), extracting the missing ones.
    async fn materialise(
        &self,
        layers: &[LayerBlob],
        events: &EventSender,
        name: &str,
    ) -> Result<ChainHandle, EngineError> {
        let mut chain = self.empty_chain().await?;
        for (n, layer) in layers.iter().enumerate() {
            let id = farm_model::chain_id(layers[..=n].iter().map(|l| l.diff_id.as_str()))?;
            let parent = chain;
            let begin = {
                let id = id.clone();
                self.blocking(move |pool| pool.begin_chain(&id, Some(&parent)))
                    .await?
            };
            chain = match begin {
                Begin::Exists(h) => h,
                Begin::Create(pending) => {
                    events.log(
                        name,
                        format!(
                            "farm: extracting base layer {}/{} ({})",
                            n + 1,
                            layers.len(),
                            short(&layer.digest)
                        ),
                    );
                    let _ = self
                        .userns
                        .mapping()
                        .make_owned_by_container_root(pending.rootfs());
                    let digest = Digest::parse(&layer.digest)?;
                    let reader = self.blobs.reader(&digest).await?;
                    let mut pending = pending;
                    let applied = self.apply_stream(reader, pending.rootfs()).await?;
                    warn_skipped(events, name, &applied);
                    // The blob digest was verified as it was read; the uncompressed
                    // content must be the layer the image config names.
                    if !layer.diff_id.is_empty() && applied.diff_id != layer.diff_id {
                        return Err(step(format!("base layer {}", layer.digest))(format!(
                            "its content has diff_id {}, but the image config says {}",
                            applied.diff_id, layer.diff_id
                        )));
                    }
                    pending.set_layer_size(applied.tar_size);
                    self.blocking(move |_| pending.commit()).await?
                }
            };
        }
        Ok(chain)
    }

    /// A tarball base as a chain of its own (keyed by the tarball's digest).
    async fn tar_chain(
        &self,
        digest: &str,
        events: &EventSender,
        name: &str,
    ) -> Result<ChainHandle, EngineError> {
        use sha2::{Digest as _, Sha256};
        let id = ChainId::parse(&format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("farm tar base {digest}").as_bytes()))
        ))?;
        let begin = {
            let id = id.clone();
            self.blocking(move |pool| pool.begin_chain(&id, None))
                .await?
        };
        match begin {
            Begin::Exists(h) => Ok(h),
            Begin::Create(pending) => {
                events.log(name, format!("farm: unpacking tar base {}", short(digest)));
                let _ = self
                    .userns
                    .mapping()
                    .make_owned_by_container_root(pending.rootfs());
                let reader = self.blobs.reader(&Digest::parse(digest)?).await?;
                let mut pending = pending;
                let applied = self.apply_stream(reader, pending.rootfs()).await?;
                warn_skipped(events, name, &applied);
                pending.set_layer_size(applied.tar_size);
                self.blocking(move |_| pending.commit()).await
            }
        }
    }

    /// A tarball found inside another layer's result, unpacked as a chain of its own.
    async fn tar_chain_from_file(
        &self,
        producer: &ChainHandle,
        path: &str,
        file: &Path,
        events: &EventSender,
        name: &str,
    ) -> Result<ChainHandle, EngineError> {
        use sha2::{Digest as _, Sha256};
        let id = ChainId::parse(&format!(
            "sha256:{}",
            hex::encode(Sha256::digest(
                format!("farm tar base {} {path}", producer.id()).as_bytes()
            ))
        ))?;
        let begin = {
            let id = id.clone();
            self.blocking(move |pool| pool.begin_chain(&id, None))
                .await?
        };
        match begin {
            Begin::Exists(h) => Ok(h),
            Begin::Create(pending) => {
                events.log(
                    name,
                    format!("farm: unpacking tar base stacker://.../{path}"),
                );
                let _ = self
                    .userns
                    .mapping()
                    .make_owned_by_container_root(pending.rootfs());
                let args = ApplyArgs {
                    target: pending.rootfs().to_path_buf(),
                    source_file: Some(file.to_path_buf()),
                };
                let what = format!("unpacking stacker://.../{path}");
                let out = self.op(&Op::ApplyLayer(args), None, None, &what).await?;
                let applied: ops::Applied =
                    serde_json::from_slice(&out).map_err(|e| step(what)(e.to_string()))?;
                let mut pending = pending;
                pending.set_layer_size(applied.tar_size);
                self.blocking(move |_| pending.commit()).await
            }
        }
    }

    /// Pipe `reader` into the apply-layer op on `target`.
    async fn apply_stream<R: Read + Send + 'static>(
        &self,
        reader: R,
        target: &Path,
    ) -> Result<ops::Applied, EngineError> {
        let args = ApplyArgs {
            target: target.to_path_buf(),
            source_file: None,
        };
        let what = format!("applying a layer to {}", target.display());
        let out = self
            .op(&Op::ApplyLayer(args), Some(Box::new(reader)), None, &what)
            .await?;
        serde_json::from_slice(&out).map_err(|e| step(what)(e.to_string()))
    }

    /// A child chain: `parent` plus the tar of `dir`.
    async fn extend_chain(
        &self,
        parent: &ChainHandle,
        diff_id: &str,
        dir: &Path,
        overlay: bool,
    ) -> Result<ChainHandle, EngineError> {
        self.extend_chain_from(Some(parent), diff_id, dir, overlay)
            .await
    }

    async fn extend_chain_from(
        &self,
        parent: Option<&ChainHandle>,
        diff_id: &str,
        dir: &Path,
        overlay: bool,
    ) -> Result<ChainHandle, EngineError> {
        let id = match parent {
            Some(p) => farm_model::chain_id([p.id().as_str(), diff_id])?,
            None => ChainId::parse(diff_id)?,
        };
        let parent_id = parent.map(|p| p.id().clone());
        let begin = self
            .blocking(move |pool| {
                // A handle of our own for the blocking thread (handles hold locks).
                let parent = match &parent_id {
                    Some(p) => pool.chain(p)?,
                    None => None,
                };
                pool.begin_chain(&id, parent.as_ref())
            })
            .await?;
        match begin {
            Begin::Exists(h) => Ok(h),
            Begin::Create(pending) if overlay => {
                // A run's change: applied straight from the upper dir, file data shared
                // by reflink on btrfs (no second tar of the change).
                let args = ops::ApplyUpperArgs {
                    upper: dir.to_path_buf(),
                    target: pending.rootfs().to_path_buf(),
                    exclude: vec!["stacker".into()],
                };
                let what = format!("applying the change to chain {}", pending.id());
                let out = self.op(&Op::ApplyUpper(args), None, None, &what).await?;
                let bytes = serde_json::from_slice::<serde_json::Value>(&out)
                    .ok()
                    .and_then(|v| v["bytes"].as_u64())
                    .unwrap_or(0);
                let mut pending = pending;
                pending.set_layer_size(bytes);
                self.blocking(move |_| pending.commit()).await
            }
            Begin::Create(pending) => {
                let _ = self
                    .userns
                    .mapping()
                    .make_owned_by_container_root(pending.rootfs());
                let (tar, mut writer) = self
                    .tar_process(dir, overlay, &["/stacker".into()], None)
                    .await?;
                let out = writer.stdout.take().expect("piped");
                let mut pending = pending;
                let applied = self.apply_stream(out, pending.rootfs()).await?;
                let status = writer
                    .wait()
                    .await
                    .map_err(|e| step("writing a layer tar")(e.to_string()))?;
                if !status.success() {
                    return Err(step("writing a layer tar")(tar));
                }
                // Sized from the layer, so sealing never walks the whole rootfs.
                pending.set_layer_size(applied.tar_size);
                self.blocking(move |_| pending.commit()).await
            }
        }
    }

    /// Apply an overlay upper dir onto a writable tree (for the tar-base case).
    async fn apply_dir(&self, upper: &Path, target: &Path) -> Result<(), EngineError> {
        let args = ops::ApplyUpperArgs {
            upper: upper.to_path_buf(),
            target: target.to_path_buf(),
            exclude: vec!["stacker".into()],
        };
        let what = format!("applying the change to {}", target.display());
        self.op(&Op::ApplyUpper(args), None, None, &what)
            .await
            .map(drop)
    }

    /// Start the write-tar op for `dir`, stdout piped.
    async fn tar_process(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &[String],
        source_date_epoch: Option<u64>,
    ) -> Result<(String, crate::userns::UsernsChild), EngineError> {
        let mut cmd = self.userns.op_command(&Op::WriteTar(WriteTarArgs {
            dir: dir.to_path_buf(),
            overlay,
            exclude: exclude.to_vec(),
            source_date_epoch,
        }))?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let child = cmd.spawn_async().await?;
        Ok((format!("tar of {}", dir.display()), child))
    }

    /// Export the tar of `dir` to the blob store in one streaming pass.
    async fn export_dir(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &[String],
        job: &Job,
        compression: Compression,
    ) -> Result<farm_image::ExportedLayer, EngineError> {
        let (what, mut child) = self
            .tar_process(dir, overlay, exclude, job.source_date_epoch)
            .await?;
        let out = child.stdout.take().expect("piped");
        let mut opts = ExportOptions::new(compression);
        opts.threads = self.options.compression_threads;
        let exported = export_tar_stream(&self.blobs, out, &opts).await;
        let status = child
            .wait()
            .await
            .map_err(|e| step("writing a layer tar")(e.to_string()))?;
        if !status.success() {
            return Err(step("capturing the layer")(what));
        }
        Ok(exported?)
    }

    /// Stage an import or overlay dir (as container root) in a fresh workspace; returns
    /// it and the staging root to export.
    async fn stage(
        &self,
        mut args: StageArgs,
        base: &ChainHandle,
    ) -> Result<(crate::pool::Workspace, PathBuf), EngineError> {
        let ws = self.workspace(false, None).await?;
        let root = ws.path().join("stage");
        std::fs::create_dir_all(&root).map_err(|e| step("staging an import")(e.to_string()))?;
        let _ = self.userns.mapping().make_owned_by_container_root(&root);
        args.root = root.clone();
        args.base_rootfs = Some(base.rootfs().to_path_buf());
        let what = format!("import {}", args.source.display());
        if let Err(e) = self.op(&Op::StageImport(args), None, None, &what).await {
            self.remove_workspace(ws).await;
            return Err(e);
        }
        Ok((ws, root))
    }

    async fn overlay_workspace(&self) -> Result<crate::pool::Workspace, EngineError> {
        let ws = self.workspace(true, None).await?;
        let m = self.userns.mapping();
        for d in [ws.upper(), ws.work()].into_iter().flatten() {
            let _ = m.make_owned_by_container_root(d);
        }
        Ok(ws)
    }

    async fn pool_workspace_snapshot(
        &self,
        chain: &ChainHandle,
    ) -> Result<crate::pool::Workspace, EngineError> {
        self.workspace(false, Some(chain.id().clone())).await
    }

    /// A fresh workspace in the pool: overlay upper/work dirs, and/or a writable
    /// snapshot of a chain.
    async fn workspace(
        &self,
        overlay_dirs: bool,
        snapshot_of: Option<ChainId>,
    ) -> Result<crate::pool::Workspace, EngineError> {
        self.blocking(move |pool| {
            // A handle of our own for the blocking thread (handles hold locks).
            let chain = match &snapshot_of {
                Some(id) => pool.chain(id)?,
                None => None,
            };
            pool.workspace(WorkspaceOptions {
                overlay_dirs,
                snapshot_of: chain.as_ref(),
            })
        })
        .await
    }

    async fn remove_workspace(&self, ws: crate::pool::Workspace) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = ws.remove() {
                tracing::warn!("removing a build workspace: {e}");
            }
        })
        .await;
    }
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

/// Say so when a base layer had entries a rootless build cannot create (device nodes).
fn warn_skipped(events: &EventSender, name: &str, applied: &ops::Applied) {
    if applied.skipped > 0 {
        events.log(
            name,
            format!(
                "farm: {} device node(s) in the base were not created (a rootless build \
                 cannot make them; /dev comes from the sandbox)",
                applied.skipped
            ),
        );
    }
}

fn added(blob: &LayerBlob, what: &str) -> AddedLayer {
    AddedLayer {
        blob: blob.clone(),
        what: what.to_string(),
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

//! The pool chains a build stands on: each OCI layer chain is extracted once, as a
//! read-only snapshot of its parent plus one layer, keyed by ChainID; a tarball base is
//! a chain of its own; each new layer extends its parent chain for later builds.

use std::io::Read;
use std::path::Path;

use farm_image::Digest;
use farm_model::{EventSender, LayerBlob};

use super::{Engine, EngineError, step};
use crate::ops::{Applied, ApplyArgs, ApplyUpperArgs, Op, UpperApplied};
use crate::pool::{Begin, ChainHandle, ChainId};

impl Engine {
    /// The chain of no layers (a scratch base, and the root of every other chain).
    pub(super) async fn empty_chain(&self) -> Result<ChainHandle, EngineError> {
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
    pub(super) async fn materialise(
        &self,
        layers: &[LayerBlob],
        events: &EventSender,
        name: &str,
    ) -> Result<ChainHandle, EngineError> {
        let mut chain = self.empty_chain().await?;
        let (mut extracted, mut reused) = (0usize, 0usize);
        for (n, layer) in layers.iter().enumerate() {
            let id = farm_model::chain_id(layers[..=n].iter().map(|l| l.diff_id.as_str()))?;
            let parent = chain;
            let begin = {
                let id = id.clone();
                self.blocking(move |pool| pool.begin_chain(&id, Some(&parent)))
                    .await?
            };
            self.count(&begin);
            chain = match begin {
                Begin::Exists(h) => {
                    reused += 1;
                    h
                }
                Begin::Create(pending) => {
                    extracted += 1;
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
                    let mut pending = pending;
                    // A squashfs/erofs layer (stacker's other layer types): verified
                    // against its verity root hash, unpacked, applied.
                    if let Some(media) = farm_image::FsMediaType::parse(&layer.media_type) {
                        self.apply_fs_layer(layer, &media, pending.rootfs()).await?;
                        pending.set_layer_size(layer.size);
                        chain = self.blocking(move |_| pending.commit()).await?;
                        continue;
                    }
                    let digest = Digest::parse(&layer.digest)?;
                    let reader = self.blobs.reader(&digest).await?;
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
        // On the "base chain" span: how much of the base the pool already held.
        let span = tracing::Span::current();
        span.record("extracted", extracted);
        span.record("reused", reused);
        Ok(chain)
    }

    /// Counts a base chain found in the pool, or to be made (the worker's metrics).
    fn count(&self, begin: &Begin) {
        let counter = match begin {
            Begin::Exists(_) => &self.chain_hits,
            Begin::Create(_) => &self.chain_misses,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A tarball base as a chain of its own (keyed by the tarball's digest).
    pub(super) async fn tar_chain(
        &self,
        digest: &str,
        events: &EventSender,
        name: &str,
    ) -> Result<ChainHandle, EngineError> {
        let id = tar_chain_id(&format!("farm tar base {digest}"))?;
        let begin = {
            let id = id.clone();
            self.blocking(move |pool| pool.begin_chain(&id, None))
                .await?
        };
        self.count(&begin);
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
    pub(super) async fn tar_chain_from_file(
        &self,
        producer: &ChainHandle,
        path: &str,
        file: &Path,
        events: &EventSender,
        name: &str,
    ) -> Result<ChainHandle, EngineError> {
        let id = tar_chain_id(&format!("farm tar base {} {path}", producer.id()))?;
        let begin = {
            let id = id.clone();
            self.blocking(move |pool| pool.begin_chain(&id, None))
                .await?
        };
        self.count(&begin);
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
                let op = Op::ApplyLayer(ApplyArgs {
                    target: pending.rootfs().to_path_buf(),
                    source_file: Some(file.to_path_buf()),
                    limits: self.options.extract,
                });
                let what = format!("unpacking stacker://.../{path}");
                let applied: Applied = self.op_json(&op, None, &what).await?;
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
    ) -> Result<Applied, EngineError> {
        let op = Op::ApplyLayer(ApplyArgs {
            target: target.to_path_buf(),
            source_file: None,
            limits: self.options.extract,
        });
        let what = format!("applying a layer to {}", target.display());
        self.op_json(&op, Some(Box::new(reader)), &what).await
    }

    /// A child chain: `parent` plus the tar of `dir` (a run's upper dir when
    /// `overlay`).
    pub(super) async fn extend_chain(
        &self,
        parent: &ChainHandle,
        diff_id: &str,
        dir: &Path,
        overlay: bool,
    ) -> Result<ChainHandle, EngineError> {
        self.extend_chain_from(Some(parent), diff_id, dir, overlay)
            .await
    }

    /// [`extend_chain`](Self::extend_chain), or without a parent a chain of the tar of
    /// `dir` alone.
    pub(super) async fn extend_chain_from(
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
                let op = Op::ApplyUpper(ApplyUpperArgs {
                    upper: dir.to_path_buf(),
                    target: pending.rootfs().to_path_buf(),
                    exclude: vec!["stacker".into()],
                });
                let what = format!("applying the change to chain {}", pending.id());
                let out = self.op(&op, None, None, &what).await?;
                let bytes = serde_json::from_slice::<UpperApplied>(&out)
                    .map(|a| a.bytes)
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
    pub(super) async fn apply_dir(&self, upper: &Path, target: &Path) -> Result<(), EngineError> {
        let op = Op::ApplyUpper(ApplyUpperArgs {
            upper: upper.to_path_buf(),
            target: target.to_path_buf(),
            exclude: vec!["stacker".into()],
        });
        let what = format!("applying the change to {}", target.display());
        self.op(&op, None, None, &what).await.map(drop)
    }
}

/// The id of a tarball base's chain: no layer digest names it, so a hash of what it is.
fn tar_chain_id(key: &str) -> Result<ChainId, EngineError> {
    use sha2::{Digest as _, Sha256};
    Ok(ChainId::parse(&format!(
        "sha256:{}",
        hex::encode(Sha256::digest(key.as_bytes()))
    ))?)
}

/// Say so when a base layer had entries a rootless build cannot create (device nodes).
fn warn_skipped(events: &EventSender, name: &str, applied: &Applied) {
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

/// The first 12 hex digits of a digest, for log lines.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

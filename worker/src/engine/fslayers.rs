//! stacker's squashfs and erofs layer types on a worker: a captured directory made into
//! an image (as container root, so it records the container's owners) with dm-verity
//! data, uploaded like a tar layer; and such a layer of a base image verified against
//! its root hash, then unpacked (as container root) and applied to a chain.

use std::io::{Read, Write};
use std::path::Path;

use farm_image::{Digest, FsKind, FsMediaType, MadeImage, MakeOptions};
use farm_model::LayerBlob;

use super::{Engine, EngineError, step};
use crate::ops::{ExtractFsArgs, MakeFsArgs, Op};

/// Bytes read from the image file per chunk sent to the store.
const CHUNK: usize = 1 << 20;

impl Engine {
    /// Make a `kind` image of `dir` (an overlay upper dir keeps its whiteouts and
    /// opaque markers as overlayfs writes them, as stacker's images do) and upload it.
    /// `None` when `dir` holds nothing but excluded names: no layer.
    pub(super) async fn export_fs_layer(
        &self,
        kind: FsKind,
        dir: &Path,
        exclude: &[String],
        options: MakeOptions,
    ) -> Result<Option<LayerBlob>, EngineError> {
        if is_empty_but(dir, exclude) {
            return Ok(None);
        }
        let ws = self.workspace(false, None).await?;
        let result = self
            .make_and_upload(kind, dir, exclude, options, ws.path())
            .await;
        self.remove_workspace(ws).await;
        result.map(Some)
    }

    async fn make_and_upload(
        &self,
        kind: FsKind,
        dir: &Path,
        exclude: &[String],
        mut options: MakeOptions,
        scratch: &Path,
    ) -> Result<LayerBlob, EngineError> {
        let what = format!("making the {kind} layer of {}", dir.display());
        let out_dir = scratch.join("fsimage");
        std::fs::create_dir_all(&out_dir).map_err(|e| step(&what)(e.to_string()))?;
        let _ = self.userns.mapping().make_owned_by_container_root(&out_dir);
        let out = out_dir.join("layer.img");
        options.exclude = exclude.to_vec();
        let op = Op::MakeFsImage(MakeFsArgs {
            kind,
            dir: dir.to_path_buf(),
            out: out.clone(),
            options,
        });
        let made: MadeImage = self.op_json(&op, None, &what).await?;
        let file = std::fs::File::open(&out).map_err(|e| step(&what)(e.to_string()))?;
        let info = self.upload_file(file).await?;
        let digest = info.digest.to_string();
        Ok(LayerBlob {
            media_type: made.media_type,
            digest: digest.clone(),
            size: info.size,
            // stacker names the blob itself in the config's diff_ids.
            diff_id: digest,
            verity_root_hash: made.root_hash,
        })
    }

    /// Stream a file into the blob store (hashed as it goes, named when complete).
    async fn upload_file(&self, file: std::fs::File) -> Result<farm_image::BlobInfo, EngineError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
        let reader = tokio::task::spawn_blocking(move || {
            let mut file = std::io::BufReader::with_capacity(CHUNK, file);
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                buf.truncate(n);
                if tx.blocking_send(Ok(buf.into())).is_err() {
                    return;
                }
            }
        });
        let mut writer = self.blobs.writer();
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Ok(c) => writer.write(c).await?,
                Err(e) => {
                    writer.abort().await;
                    return Err(step("reading the layer image")(e.to_string()));
                }
            }
        }
        let _ = reader.await;
        Ok(writer.finish().await?)
    }

    /// Apply a squashfs/erofs base layer to `target`: the blob copied to a file,
    /// checked against its verity root hash (a tampered image is refused before
    /// anything of it is unpacked), unpacked as container root, applied as an overlay
    /// upper dir (whiteouts remove, opaque directories replace).
    pub(super) async fn apply_fs_layer(
        &self,
        layer: &LayerBlob,
        media: &FsMediaType,
        target: &Path,
    ) -> Result<(), EngineError> {
        let ws = self.workspace(false, None).await?;
        let result = self
            .apply_fs_layer_in(layer, media, target, ws.path())
            .await;
        self.remove_workspace(ws).await;
        result
    }

    async fn apply_fs_layer_in(
        &self,
        layer: &LayerBlob,
        media: &FsMediaType,
        target: &Path,
        scratch: &Path,
    ) -> Result<(), EngineError> {
        let what = format!("base layer {} ({})", layer.digest, media.kind);
        let file = scratch.join("layer.img");
        // The digest is verified as the blob is read.
        let mut reader = self.blobs.reader(&Digest::parse(&layer.digest)?).await?;
        let copy_to = file.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut out = std::fs::File::create(&copy_to)?;
            std::io::copy(&mut reader, &mut out)?;
            out.flush()
        })
        .await
        .map_err(|e| step(&what)(e.to_string()))?
        .map_err(|e| step(&what)(e.to_string()))?;
        let (m, f, root) = (media.clone(), file.clone(), layer.verity_root_hash.clone());
        tokio::task::spawn_blocking(move || farm_image::verify_fs_image(&m, &f, root.as_deref()))
            .await
            .map_err(|e| step(&what)(e.to_string()))?
            .map_err(|e| EngineError::Input {
                what: what.clone(),
                message: e.to_string(),
            })?;
        let tree = scratch.join("tree");
        std::fs::create_dir_all(&tree).map_err(|e| step(&what)(e.to_string()))?;
        let _ = self.userns.mapping().make_owned_by_container_root(&tree);
        let op = Op::ExtractFsImage(ExtractFsArgs {
            kind: media.kind,
            image: file,
            dest: tree.clone(),
            limits: self.options.extract,
        });
        self.op(&op, None, None, &format!("unpacking {what}"))
            .await?;
        self.apply_dir(&tree, target).await
    }
}

/// `dir` has no entries but the excluded top-level names.
fn is_empty_but(dir: &Path, exclude: &[String]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().all(|e| {
        let name = e.file_name();
        exclude
            .iter()
            .any(|x| x.trim_start_matches('/') == name.to_string_lossy())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emptiness_ignores_excluded_names() {
        let d = tempfile::tempdir().unwrap();
        let ex = vec!["/stacker".to_string()];
        assert!(is_empty_but(d.path(), &ex));
        std::fs::create_dir(d.path().join("stacker")).unwrap();
        assert!(is_empty_but(d.path(), &ex));
        std::fs::write(d.path().join("f"), "x").unwrap();
        assert!(!is_empty_but(d.path(), &ex));
        assert!(!is_empty_but(&d.path().join("missing"), &ex));
    }
}

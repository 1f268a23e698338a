//! Where a job's inputs are on this machine: local paths as they are, trees and
//! downloads from the blob store written into scratch workspaces, `stacker://` paths
//! resolved inside the producer's chain.

use std::path::PathBuf;

use farm_image::Digest;
use farm_model::{ImportSource, JobImport};

use super::pipeline::Build;
use super::{EngineError, step};

impl Build<'_> {
    /// Where an import's content is on this machine (inside a chain for `stacker://`,
    /// a downloaded file for http).
    pub(super) async fn locate_import(
        &mut self,
        import: &JobImport,
    ) -> Result<PathBuf, EngineError> {
        let engine = self.engine;
        match &import.source {
            ImportSource::Local(path) => Ok(path.clone()),
            ImportSource::Tree { digest } => self.materialise_tree(digest, &import.name).await,
            ImportSource::Blob { digest } => {
                let ws = engine.workspace(false, None).await?;
                let dir = ws.path().join("download");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| step("staging a download")(e.to_string()))?;
                let file = dir.join(&import.name);
                let mut reader = engine.blobs.reader(&Digest::parse(digest)?).await?;
                let f2 = file.clone();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let mut out = std::fs::File::create(&f2)?;
                    std::io::copy(&mut reader, &mut out)?;
                    Ok(())
                })
                .await
                .map_err(|e| step("staging a download")(e.to_string()))?
                .map_err(|e| step(format!("staging download {}", import.name))(e.to_string()))?;
                self.scratch.push(ws);
                Ok(file)
            }
            ImportSource::Layer { producer, path } => {
                let producer_chain = engine
                    .materialise(&producer.layers, self.events, self.name())
                    .await?;
                let found = engine
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
                self.held.push(producer_chain);
                Ok(found.resolved)
            }
        }
    }

    /// Write a tree from the blob store (a local input of a remote submission) into a
    /// scratch workspace; returns its path.
    pub(super) async fn materialise_tree(
        &mut self,
        digest: &str,
        file_name: &str,
    ) -> Result<PathBuf, EngineError> {
        let engine = self.engine;
        let ws = engine.workspace(false, None).await?;
        let dir = ws.path().join("tree");
        std::fs::create_dir_all(&dir).map_err(|e| step("staging an input")(e.to_string()))?;
        let path = dir.join(file_name);
        let result = engine
            .blobs
            .materialize_tree(&Digest::parse(digest)?, &path)
            .await;
        self.scratch.push(ws);
        result?;
        Ok(path)
    }
}

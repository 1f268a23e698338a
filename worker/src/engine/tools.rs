//! Tools on a built layer: `farm chroot` (a shell in a throwaway copy of its
//! filesystem, in the same sandbox as builds) and `farm grab` (copy one file out).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use farm_model::{BuiltImage, EventSender};

use super::{Engine, EngineError, step};
use crate::ops::{Op, ReadFileArgs};
use crate::sandbox::{Rootfs, SandboxSpec, ScriptStatus};

impl Engine {
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
        spec.proc = self.options.sandbox_proc;
        let status = self
            .userns
            .run_sandbox(&spec, Some(&self.cancel), |_| {})
            .await;
        self.remove_workspace(ws).await;
        drop(chain);
        Ok(status?)
    }

    /// Copy the file at `path` of a built layer to `dest` (`farm grab`) with its mode;
    /// returns its size.
    pub async fn grab(
        &self,
        image: &BuiltImage,
        path: &str,
        dest: &Path,
        events: &EventSender,
    ) -> Result<u64, EngineError> {
        let chain = self.materialise(&image.layers, events, "grab").await?;
        let op = Op::ReadFile(ReadFileArgs {
            root: chain.rootfs().to_path_buf(),
            path: path.to_string(),
        });
        let file = std::fs::File::create(dest)
            .map_err(|e| step(format!("creating {}", dest.display()))(e.to_string()))?;
        let mut result = self
            .op(&op, None, Some(Box::new(file)), &format!("grab {path}"))
            .await
            .map(drop);
        if result.is_ok() {
            // The mode too (as stacker's grab): a tool comes out executable.
            result = match self.inspect(chain.rootfs(), path, false).await {
                Ok(info) => {
                    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(info.mode))
                        .map_err(|e| {
                            step(format!("setting the mode of {}", dest.display()))(e.to_string())
                        })
                }
                Err(e) => Err(e),
            };
        }
        drop(chain);
        if let Err(e) = result {
            let _ = std::fs::remove_file(dest);
            return Err(e);
        }
        Ok(std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0))
    }
}

//! Running [`Op`]s in the user namespace from async code: input fed from a reader,
//! output collected or streamed to a writer, a failure carrying the op's own message.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;

use super::{Engine, EngineError, step};
use crate::ops::{InspectArgs, Inspected, Op, WriteTarArgs};
use crate::userns::UsernsChild;

impl Engine {
    /// Run `op` to completion: `input` feeds its stdin, `output` takes its stdout
    /// (collected and returned when `None`). A failure carries the op's own message;
    /// `what` says what was being done.
    pub(super) async fn op(
        &self,
        op: &Op,
        input: Option<Box<dyn Read + Send>>,
        output: Option<Box<dyn Write + Send>>,
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

    /// [`op`](Self::op) for an op that prints one JSON object: that object.
    pub(super) async fn op_json<T: serde::de::DeserializeOwned>(
        &self,
        op: &Op,
        input: Option<Box<dyn Read + Send>>,
        what: &str,
    ) -> Result<T, EngineError> {
        let out = self.op(op, input, None, what).await?;
        serde_json::from_slice(&out).map_err(|e| step(what)(e.to_string()))
    }

    /// Start the write-tar op for `dir`, stdout piped; also returns what it is (for
    /// errors).
    pub(super) async fn tar_process(
        &self,
        dir: &Path,
        overlay: bool,
        exclude: &[String],
        source_date_epoch: Option<u64>,
    ) -> Result<(String, UsernsChild), EngineError> {
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

    /// Resolve `path` inside `root` as container root.
    pub(super) async fn inspect(
        &self,
        root: &Path,
        path: &str,
        sha256: bool,
    ) -> Result<Inspected, EngineError> {
        let op = Op::InspectSource(InspectArgs {
            root: root.to_path_buf(),
            path: path.to_string(),
            sha256,
        });
        self.op_json(&op, None, &format!("stacker:// path '{path}'"))
            .await
    }
}

//! A build's log output, in an append-only file beside the state
//! (`<state dir>/logs/<build>.log`), not in SQLite.
//!
//! A worker's batch of lines is written to the build's file in chunks of at most
//! [`CHUNK_BYTES`]; each chunk becomes one event ([`EventKind::Output`]) that names its
//! place in the file (offset, length, line count) and carries no text. Watchers and
//! `Logs` read a chunk's text back when they send it, one chunk at a time, so neither
//! the event stream, its replay nor a reader ever holds a whole log.
//!
//! Each assignment's output is capped ([`LogFiles::max_layer_log`], `farm coordinator
//! --max-layer-log`): the worker is told the cap with the assignment and stops sending
//! past it (it sends one marker line saying what it dropped); a worker that sends more
//! anyway has the rest dropped here, with one marker line of the coordinator's.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::events::{EventKind, StoredEvent};

/// The most bytes of output one chunk (one event) holds, about; a line longer than this
/// is cut to it (the worker splits lines at this length already).
pub(crate) const CHUNK_BYTES: usize = 64 << 10;

/// The default of `--max-layer-log`: 64 MiB of output per layer (per attempt).
pub const DEFAULT_MAX_LAYER_LOG: u64 = 64 << 20;

/// Room above the cap for the worker's own marker line.
const MARKER_SLACK: u64 = 4 << 10;

/// Where a chunk of output lies in its build's log file. Stored in the event; `text`
/// is filled in when the chunk is read back (or while it is fresh) and never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub offset: u64,
    pub len: u32,
    pub lines: u32,
    #[serde(skip)]
    pub text: Vec<String>,
}

/// What the log files know about one build being written.
#[derive(Default)]
struct BuildLog {
    /// The file's length (where the next chunk goes); `None` until opened.
    len: Option<u64>,
    /// Bytes accepted from each assignment, and whether its marker was written.
    sent: HashMap<u64, (u64, bool)>,
}

/// The build log files of one state dir.
pub(crate) struct LogFiles {
    dir: PathBuf,
    max_layer_log: u64,
    open: Mutex<HashMap<String, Arc<tokio::sync::Mutex<BuildLog>>>>,
}

/// `what` as a size people read (`64 MiB`, `1.5 GiB`, `120 B`).
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() < 0.05 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl LogFiles {
    pub(crate) fn new(state_dir: &Path, max_layer_log: u64) -> Self {
        LogFiles {
            dir: state_dir.join("logs"),
            max_layer_log,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The cap on one assignment's output, in bytes (lines counted with their newline).
    pub(crate) fn max_layer_log(&self) -> u64 {
        self.max_layer_log
    }

    fn path(&self, build: &str) -> PathBuf {
        self.dir.join(format!("{build}.log"))
    }

    fn build_log(&self, build: &str) -> Arc<tokio::sync::Mutex<BuildLog>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(build.to_string())
            .or_default()
            .clone()
    }

    /// The build ended here: forget what is kept about its file (not the file).
    pub(crate) fn close(&self, build: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(build);
    }

    /// Remove build `build`'s log file (for garbage collection; its events then name
    /// chunks that are gone, and readers skip them). A missing file is not an error.
    pub(crate) fn remove(&self, build: &str) -> io::Result<()> {
        self.close(build);
        match std::fs::remove_file(self.path(build)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Remove every build log file whose build is not in `known`.
    pub(crate) fn sweep(&self, known: &std::collections::HashSet<String>) -> io::Result<()> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(build) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
                continue;
            };
            if !known.contains(build) {
                self.remove(build)?;
            }
        }
        Ok(())
    }

    /// Write `lines` of `layer`, sent for assignment `source`, to the build's file; the
    /// events to publish, one per chunk (without their text: a watcher reads it back
    /// when it sends the chunk, so a watcher that lags holds no output). Lines past the
    /// cap are dropped, the first time with a marker line.
    pub(crate) async fn append(
        &self,
        build: &str,
        layer: &str,
        source: u64,
        lines: Vec<String>,
    ) -> io::Result<Vec<StoredEvent>> {
        let log = self.build_log(build);
        let mut log = log.lock().await;
        let cap = self.max_layer_log.saturating_add(MARKER_SLACK);
        let (mut sent, mut marked) = log.sent.get(&source).copied().unwrap_or((0, false));
        // Cut into chunks; a line is split on newlines and cut to a chunk.
        let mut chunks: Vec<Vec<String>> = Vec::new();
        let mut current: Vec<String> = Vec::new();
        let mut current_len = 0usize;
        let mut dropped = false;
        for line in lines.iter().flat_map(|l| l.split('\n')) {
            let mut line = line.to_string();
            if line.len() > CHUNK_BYTES {
                let mut end = CHUNK_BYTES;
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
            }
            if sent + line.len() as u64 + 1 > cap {
                dropped = true;
                break;
            }
            sent += line.len() as u64 + 1;
            if current_len + line.len() + 1 > CHUNK_BYTES {
                chunks.push(std::mem::take(&mut current));
                current_len = 0;
            }
            current_len += line.len() + 1;
            current.push(line);
        }
        if dropped && !marked {
            marked = true;
            let marker = format!(
                "farm: this layer's output passed the coordinator's log cap of {}; the rest \
                 of it is dropped (raise the cap with `farm coordinator --max-layer-log SIZE`)",
                human(self.max_layer_log)
            );
            if current_len + marker.len() + 1 > CHUNK_BYTES {
                chunks.push(std::mem::take(&mut current));
            }
            current.push(marker);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        log.sent.insert(source, (sent, marked));
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let path = self.path(build);
        if log.len.is_none() {
            tokio::fs::create_dir_all(&self.dir).await?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let mut offset = match log.len {
            Some(len) => len,
            None => file.metadata().await?.len(),
        };
        let mut events = Vec::with_capacity(chunks.len());
        let mut buf = Vec::with_capacity(CHUNK_BYTES);
        for text in chunks {
            buf.clear();
            for line in &text {
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
            }
            if let Err(e) = file.write_all(&buf).await {
                // Where the file ends now is unknown: read it again next time.
                log.len = None;
                return Err(e);
            }
            events.push(StoredEvent::output(
                layer.to_string(),
                LogChunk {
                    offset,
                    len: buf.len() as u32,
                    lines: text.len() as u32,
                    text: Vec::new(),
                },
            ));
            offset += buf.len() as u64;
        }
        if let Err(e) = file.flush().await {
            log.len = None;
            return Err(e);
        }
        log.len = Some(offset);
        Ok(events)
    }

    /// The text of `chunk` of build `build` (its lines), read from the file.
    pub(crate) async fn read(&self, build: &str, chunk: &LogChunk) -> io::Result<Vec<String>> {
        if !chunk.text.is_empty() || chunk.lines == 0 {
            return Ok(chunk.text.clone());
        }
        // A chunk is at most one line of CHUNK_BYTES and its newline, or the marker.
        let len = (chunk.len as usize).min(CHUNK_BYTES + MARKER_SLACK as usize + 1);
        let mut file = tokio::fs::File::open(self.path(build)).await?;
        file.seek(io::SeekFrom::Start(chunk.offset)).await?;
        let mut buf = vec![0u8; len];
        file.read_exact(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        Ok(text
            .strip_suffix('\n')
            .unwrap_or(&text)
            .split('\n')
            .map(str::to_string)
            .collect())
    }
}

impl StoredEvent {
    /// A chunk of `layer`'s output.
    pub(crate) fn output(layer: String, chunk: LogChunk) -> Self {
        StoredEvent {
            layer,
            kind: EventKind::Output(chunk),
            worker: None,
            error: None,
            duration_ms: None,
            failure: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize, width: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:0width$}")).collect()
    }

    fn chunk(e: &StoredEvent) -> &LogChunk {
        match &e.kind {
            EventKind::Output(c) => c,
            k => panic!("not output: {k:?}"),
        }
    }

    #[tokio::test]
    async fn output_is_written_in_bounded_chunks_and_read_back_line_for_line() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::new(dir.path(), DEFAULT_MAX_LAYER_LOG);
        let sent = lines(20_000, 20);
        let events = files.append("b-1", "a", 1, sent.clone()).await.unwrap();
        assert!(events.len() > 1, "{}", events.len());
        let mut back = Vec::new();
        for e in &events {
            let c = chunk(e);
            assert!(c.len as usize <= CHUNK_BYTES, "{}", c.len);
            // As stored and published: no text; read from the file.
            assert!(c.text.is_empty());
            back.extend(files.read("b-1", c).await.unwrap());
        }
        assert_eq!(back, sent);
        // A second batch goes after the first, also across a reopen.
        files.close("b-1");
        let more = files
            .append("b-1", "b", 2, vec!["x\ny".into()])
            .await
            .unwrap();
        assert_eq!(
            files.read("b-1", chunk(&more[0])).await.unwrap(),
            ["x", "y"]
        );
        files.remove("b-1").unwrap();
        assert!(!dir.path().join("logs/b-1.log").exists());
        files.remove("b-1").unwrap();
        // A sweep keeps the known builds' files only.
        for b in ["b-2", "b-3"] {
            files.append(b, "a", 1, vec!["x".into()]).await.unwrap();
        }
        files.sweep(&["b-3".to_string()].into()).unwrap();
        assert!(!dir.path().join("logs/b-2.log").exists());
        assert!(dir.path().join("logs/b-3.log").exists());
    }

    #[tokio::test]
    async fn output_past_the_cap_is_dropped_with_one_marker_line() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::new(dir.path(), 1000);
        let mut got = Vec::new();
        for _ in 0..10 {
            for e in files.append("b-1", "a", 7, lines(100, 9)).await.unwrap() {
                got.extend(files.read("b-1", chunk(&e)).await.unwrap());
            }
        }
        let markers: Vec<&String> = got.iter().filter(|l| l.starts_with("farm:")).collect();
        assert_eq!(markers.len(), 1, "{markers:?}");
        assert!(
            markers[0].contains("--max-layer-log") && markers[0].contains("1000 B"),
            "{}",
            markers[0]
        );
        let bytes: u64 = got.iter().map(|l| l.len() as u64 + 1).sum();
        assert!(bytes <= 1000 + MARKER_SLACK + 300, "{bytes}");
        // Another assignment (a retry) has a cap of its own.
        let other = files.append("b-1", "a", 8, lines(1, 9)).await.unwrap();
        assert_eq!(
            files.read("b-1", chunk(&other[0])).await.unwrap(),
            ["000000000"]
        );
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(1000), "1000 B");
        assert_eq!(human(1536), "1.5 KiB");
    }
}

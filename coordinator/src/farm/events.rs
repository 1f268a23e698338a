//! A build's event stream: what the build driver reports becomes layer states in the
//! state store and numbered events that every watcher receives, live or replayed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::logs::LogChunk;
use super::{FarmError, Inner};
use crate::state::{BuildState, LayerState, StateError};
use farm_model::{Event, LayerFailure};

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A layer's state changed.
    Layer(LayerState),
    /// A line of a layer's output (or farm's notes about it).
    Log(String),
    /// The build finished.
    Build(BuildState),
    /// A chunk of a layer's output: where it lies in the build's log file (the text is
    /// read back when it is sent; see `logs`).
    Output(LogChunk),
}

/// One event of a build, as stored and streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub layer: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// A failed layer's failure (its kind decides; `error` has its message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<LayerFailure>,
}

impl StoredEvent {
    fn layer(layer: String, state: LayerState) -> Self {
        StoredEvent {
            layer,
            kind: EventKind::Layer(state),
            worker: None,
            error: None,
            duration_ms: None,
            failure: None,
        }
    }

    pub fn finished(state: BuildState, error: Option<String>) -> Self {
        StoredEvent {
            layer: String::new(),
            kind: EventKind::Build(state),
            worker: None,
            error,
            duration_ms: None,
            failure: None,
        }
    }

    /// The build's last event.
    pub fn is_final(&self) -> bool {
        matches!(self.kind, EventKind::Build(_))
    }
}

impl StoredEvent {
    /// The progress display's events for this one: one, one per line of a chunk of
    /// output (as sent to a watcher, with its text), none for the build's end.
    pub fn progress_events(&self) -> Vec<Event> {
        match &self.kind {
            EventKind::Output(chunk) => chunk
                .text
                .iter()
                .map(|line| Event::Log {
                    layer: self.layer.clone(),
                    line: line.clone(),
                })
                .collect(),
            _ => self.to_progress().into_iter().collect(),
        }
    }

    /// The progress display's event for this one (`None` for the build's end and for
    /// a chunk of output: see [`StoredEvent::progress_events`]).
    pub fn to_progress(&self) -> Option<Event> {
        let layer = self.layer.clone();
        Some(match &self.kind {
            EventKind::Layer(LayerState::Running) => match &self.worker {
                Some(worker) => Event::Assigned {
                    layer,
                    worker: worker.clone(),
                },
                None => Event::Started { layer },
            },
            EventKind::Layer(LayerState::Cached) => Event::Cached { layer },
            EventKind::Layer(LayerState::Built) => Event::Built {
                layer,
                duration: std::time::Duration::from_millis(self.duration_ms.unwrap_or(0)),
            },
            EventKind::Layer(LayerState::Failed) => Event::Failed {
                layer,
                failure: self.failure.clone().unwrap_or_else(|| {
                    LayerFailure::internal(self.error.clone().unwrap_or_default())
                }),
            },
            EventKind::Layer(LayerState::Skipped) => Event::Skipped {
                layer,
                because: self.error.clone().unwrap_or_default(),
            },
            EventKind::Layer(LayerState::Cancelled) => Event::Cancelled {
                layer,
                reason: self.error.clone().unwrap_or_default(),
            },
            EventKind::Layer(LayerState::Waiting) | EventKind::Build(_) | EventKind::Output(_) => {
                return None;
            }
            EventKind::Log(line) => Event::Log {
                layer,
                line: line.clone(),
            },
        })
    }
}

/// Turn the driver's events into stored events and layer states, in batches (a chatty
/// build writes one transaction per batch, not per line).
pub(super) async fn record(
    inner: Arc<Inner>,
    build: String,
    names: Vec<String>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let index: std::collections::HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let idx = |layer: &str| index.get(layer).copied();
    // Where each layer ran (kept in the layer's row when it fails).
    let mut workers: std::collections::HashMap<String, String> = Default::default();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut stored = Vec::with_capacity(batch.len());
        // Cache hits of the batch, recorded in one write.
        let mut cached = Vec::new();
        for event in batch {
            let (e, state_change) = match event {
                Event::Started { layer } => {
                    inner.metrics.layer_queued();
                    (StoredEvent::layer(layer, LayerState::Running), None)
                }
                Event::Assigned { layer, worker } => {
                    workers.insert(layer.clone(), worker.clone());
                    let mut e = StoredEvent::layer(layer, LayerState::Running);
                    e.worker = Some(worker);
                    (e, None)
                }
                Event::Log { layer, line } => (
                    StoredEvent {
                        layer,
                        kind: EventKind::Log(line),
                        worker: None,
                        error: None,
                        duration_ms: None,
                        failure: None,
                    },
                    None,
                ),
                Event::Cached { layer } => {
                    inner.metrics.cache_hit();
                    cached.extend(idx(&layer));
                    (StoredEvent::layer(layer, LayerState::Cached), None)
                }
                Event::Built { layer, duration } => {
                    inner.metrics.layer_built(duration);
                    let mut e = StoredEvent::layer(layer.clone(), LayerState::Built);
                    e.duration_ms = Some(duration.as_millis() as u64);
                    (e, None)
                }
                Event::Failed { layer, failure } => {
                    let mut e = StoredEvent::layer(layer.clone(), LayerState::Failed);
                    e.error = Some(failure.message.clone());
                    let message = failure.message.clone();
                    e.failure = Some(failure);
                    (e, Some((layer, LayerState::Failed, Some(message))))
                }
                // A running layer stopped by `farm cancel` was cancelled, not failed (its
                // state must not overwrite the cancel's).
                Event::Cancelled { layer, reason } => {
                    let mut e = StoredEvent::layer(layer.clone(), LayerState::Cancelled);
                    e.error = Some(reason.clone());
                    (e, Some((layer, LayerState::Cancelled, Some(reason))))
                }
                Event::Skipped { layer, because } => {
                    let mut e = StoredEvent::layer(layer.clone(), LayerState::Skipped);
                    e.error = Some(because.clone());
                    (e, Some((layer, LayerState::Skipped, Some(because))))
                }
            };
            if let Some((layer, state, error)) = state_change
                && let Some(i) = idx(&layer)
            {
                let worker = workers.get(&layer).map(String::as_str);
                if let Err(err) = inner
                    .state
                    .set_layer_state(&build, i, state, worker, error.as_deref())
                    .await
                {
                    tracing::error!(%build, %layer, "recording the layer's state: {err}; its status keeps the previous one");
                }
            }
            stored.push(e);
        }
        if !cached.is_empty()
            && let Err(err) = inner.state.mark_cached_many(&build, cached).await
        {
            tracing::error!(%build, "recording cache hits: {err}; the layers' status shows them cached when the build ends");
        }
        inner.publish(&build, stored).await;
    }
}

/// Stored events read per query while replaying.
const PAGE: usize = 256;

/// Events a watcher's stream holds before its sender waits for it: with chunks of
/// output at most [`super::logs::CHUNK_BYTES`] each, what one reader costs is bounded.
const WATCH_BUFFER: usize = 16;

/// Send `e` to a watcher, with the text of a chunk of output read in; false once the
/// watcher is gone. A chunk whose file is gone (collected) is skipped, and logged.
async fn send(
    inner: &Inner,
    id: &str,
    tx: &mpsc::Sender<(u64, StoredEvent)>,
    seq: u64,
    mut e: StoredEvent,
) -> bool {
    if let EventKind::Output(chunk) = &mut e.kind
        && chunk.text.is_empty()
    {
        match inner.logs.read(id, chunk).await {
            Ok(text) => chunk.text = text,
            Err(err) => {
                tracing::warn!(build = %id, seq, "reading a chunk of the build's log: {err}; skipping it");
                return !tx.is_closed();
            }
        }
    }
    tx.send((seq, e)).await.is_ok()
}

/// Send build `id`'s stored events after `*last` to `tx`, a page at a time, advancing
/// `*last`. True when the stream is over (the build's final event was sent, or the
/// watcher went away).
async fn replay(
    inner: &Inner,
    id: &str,
    last: &mut u64,
    tx: &mpsc::Sender<(u64, StoredEvent)>,
) -> Result<bool, StateError> {
    inner.metrics.watch_catch_up();
    loop {
        let rows = inner.state.events_page(id, *last, PAGE).await?;
        let full = rows.len() == PAGE;
        for (seq, json) in rows {
            *last = seq;
            let event: StoredEvent = match serde_json::from_str(&json) {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(build = %id, seq, "skipping an unreadable stored event: {e}");
                    continue;
                }
            };
            let done = event.is_final();
            if !send(inner, id, tx, seq, event).await || done {
                return Ok(true);
            }
        }
        if !full {
            return Ok(false);
        }
    }
}

/// Events of `id` after `after`: stored ones, then live ones, ending with the build's
/// final event. The receiver holds a few events at most: a watcher that does not keep
/// up holds up its own task only, which falls behind the live stream and catches up
/// from the store (by sequence number).
pub(super) async fn watch(
    inner: Arc<Inner>,
    id: &str,
    after: u64,
) -> Result<mpsc::Receiver<(u64, StoredEvent)>, FarmError> {
    let Some(build) = inner.state.build(id).await? else {
        return Err(FarmError::NotFound(id.to_string()));
    };
    // Subscribe before reading the store, so nothing falls between the two.
    let mut live = inner.subscribe(id);
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let id = id.to_string();
    tokio::spawn(async move {
        let mut last = after;
        // Read the store first, and again only when the live stream has a gap (the
        // watcher fell behind it, or events came before the subscription): a watcher
        // that keeps up costs no store reads.
        let mut catch_up = true;
        loop {
            if catch_up {
                match replay(&inner, &id, &mut last, &tx).await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(build = %id, "reading events: {e}; the watcher's stream ends here");
                        return;
                    }
                }
                catch_up = false;
            }
            let Some(rx) = live.as_mut() else {
                // Not running here: the stored events were all there is. A finished
                // build's last event is its final one; an unfinished one (resumed
                // elsewhere) is re-read until it ends.
                if build.state.is_finished() || tx.is_closed() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                live = inner.subscribe(&id);
                catch_up = true;
                continue;
            };
            let mut next = rx.recv().await;
            loop {
                match next {
                    Ok(event) => {
                        let (seq, e) = &*event;
                        if *seq > last + 1 {
                            // Missed some (published before the read, or dropped
                            // while this watcher lagged): read them back.
                            catch_up = true;
                            break;
                        }
                        if *seq == last + 1 {
                            last = *seq;
                            let done = e.is_final();
                            if !send(&inner, &id, &tx, *seq, e.clone()).await || done {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        catch_up = true;
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        // The build ended: read the rest from the store.
                        if let Err(e) = replay(&inner, &id, &mut last, &tx).await {
                            tracing::error!(
                                build = %id,
                                "reading the build's last events: {e}; the watcher's stream \
                                 ends without them"
                            );
                        }
                        return;
                    }
                }
                // Drain what is already queued before waiting again (a lag or the end
                // found here shows at the next `recv`: as a gap, or as closed).
                let Ok(event) = rx.try_recv() else { break };
                next = Ok(event);
            }
        }
    });
    Ok(rx)
}

/// Build `id`'s stored events after `after` (with the text of its output), a few at a
/// time through the receiver; it ends with the last stored one.
pub(super) fn stored(
    inner: Arc<Inner>,
    id: &str,
    after: u64,
) -> mpsc::Receiver<(u64, StoredEvent)> {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let id = id.to_string();
    tokio::spawn(async move {
        let mut last = after;
        if let Err(e) = replay(&inner, &id, &mut last, &tx).await {
            tracing::error!(build = %id, "reading events: {e}; the reader's stream ends here");
        }
    });
    rx
}

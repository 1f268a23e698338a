//! What the coordinator's answers look like to a person or a script: proto states as
//! words, the status and workers JSON of `farm status --json` / `farm workers --json`,
//! the human tables, and build events turned into the progress display's events.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use farm_model::{Event, LayerFailure};
use farm_proto::v1::build_event::Kind;
use farm_proto::v1::{BuildEvent, BuildStatus, LayerState, LayerStatus, WorkerInfo};
use serde_json::{Value, json};

/// `queued`, `running`, `succeeded`, `failed`, `cancelled` (`unknown` for a value this
/// client does not know).
pub(crate) fn build_word(state: i32) -> &'static str {
    farm_model::BuildState::from_wire(state).map_or("unknown", |s| s.as_str())
}

/// `waiting`, `running`, `built`, `cached`, `failed`, `skipped`, `cancelled`.
pub(crate) fn layer_word(state: i32) -> &'static str {
    farm_model::LayerState::from_wire(state).map_or("unknown", |s| s.as_str())
}

/// Whether a layer in `state` is done (for better or worse).
pub(crate) fn layer_finished(state: i32) -> bool {
    !matches!(
        LayerState::try_from(state),
        Ok(LayerState::LayerWaiting | LayerState::LayerRunning | LayerState::Unspecified) | Err(_)
    )
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// One layer of the status JSON.
pub(crate) fn layer_json(l: &LayerStatus) -> Value {
    let duration = if l.duration_ms == 0 && !layer_finished(l.state) {
        Value::Null
    } else {
        l.duration_ms.into()
    };
    let mut v = json!({
        "name": l.name,
        "state": layer_word(l.state),
        "worker": non_empty(&l.worker),
        "cached": l.cached,
        "duration_ms": duration,
        "manifest_digest": non_empty(&l.manifest_digest),
    });
    if !l.error.is_empty() {
        v["error"] = l.error.clone().into();
    }
    v
}

/// The status JSON: `{"id", "state", "layers": [...]}`, plus `"error"` when there is one.
pub(crate) fn status_json(s: &BuildStatus) -> Value {
    let mut v = json!({
        "id": s.id,
        "state": build_word(s.state),
        "layers": s.layers.iter().map(layer_json).collect::<Vec<_>>(),
    });
    if !s.error.is_empty() {
        v["error"] = s.error.clone().into();
    }
    // Paste it into a tracing UI (set when the coordinator exports traces).
    if !s.trace_id.is_empty() {
        v["trace_id"] = s.trace_id.clone().into();
    }
    if let Some(w) = &s.webhook {
        v["webhook"] = json!({
            "provider": w.provider,
            "repo": w.repo,
            "ref": w.git_ref,
            "sha": w.sha,
            "delivery": w.delivery,
            "build": w.build,
        });
    }
    v
}

/// One worker of the workers JSON: `{"name", "slots", "running", "last_seen"}` (RFC 3339,
/// UTC, milliseconds; null when never seen), plus `"platform"`, `"connected"` and
/// `"unavailable"` when set, and `"webhooks"`: the running layers whose build came from
/// a webhook delivery (`{"build", "layer", "provider", "repo", "ref", "sha", "delivery"}`).
pub(crate) fn worker_json(w: &WorkerInfo) -> Value {
    let last_seen = if w.last_seen_unix_ms > 0 {
        Value::String(rfc3339_ms(w.last_seen_unix_ms))
    } else {
        Value::Null
    };
    let mut v = json!({
        "name": w.name,
        "slots": w.slots,
        "running": w.running,
        "last_seen": last_seen,
    });
    if !w.platform.is_empty() {
        v["platform"] = w.platform.clone().into();
    }
    v["connected"] = w.connected.into();
    if !w.unavailable.is_empty() {
        v["unavailable"] = w.unavailable.clone().into();
    }
    let webhooks: Vec<Value> = w
        .running_layers
        .iter()
        .filter_map(|r| {
            let h = r.webhook.as_ref()?;
            Some(json!({
                "build": r.build,
                "layer": r.layer,
                "provider": h.provider,
                "repo": h.repo,
                "ref": h.git_ref,
                "sha": h.sha,
                "delivery": h.delivery,
            }))
        })
        .collect();
    if !webhooks.is_empty() {
        v["webhooks"] = webhooks.into();
    }
    v
}

/// Unix milliseconds as RFC 3339 UTC text (`2024-05-01T12:00:00.250Z`).
pub(crate) fn rfc3339_ms(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn duration_text(ms: u64) -> String {
    match ms {
        0 => "-".to_string(),
        1..1000 => format!("{ms}ms"),
        _ => format!("{:.1}s", ms as f64 / 1000.0),
    }
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// Rows as aligned columns (two spaces apart; the last column is not padded).
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let n = cells.len();
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i + 1 == n {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:w$}  ", w = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for row in rows {
        line(&mut out, row.iter().map(String::as_str).collect());
    }
    out
}

/// `farm status ID` for a person.
pub(crate) fn status_table(s: &BuildStatus) -> String {
    let mut out = format!("build {}: {}\n", s.id, build_word(s.state));
    if s.created_unix_ms > 0 {
        let _ = writeln!(out, "submitted {}", rfc3339_ms(s.created_unix_ms));
    }
    if !s.error.is_empty() {
        let _ = writeln!(out, "error: {}", s.error);
    }
    if let Some(w) = &s.webhook {
        let _ = writeln!(
            out,
            "webhook: {} {} {} at {} ({}, delivery {})",
            w.provider, w.repo, w.git_ref, w.sha, w.build, w.delivery
        );
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .layers
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                layer_word(l.state).to_string(),
                dash(&l.worker).to_string(),
                duration_text(l.duration_ms),
                dash(&l.manifest_digest).to_string(),
                l.error.lines().next().unwrap_or("").to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["LAYER", "STATE", "WORKER", "TIME", "MANIFEST", "ERROR"],
        &rows,
    ));
    out
}

/// `farm status` (every build) for a person.
pub(crate) fn list_table(builds: &[BuildStatus]) -> String {
    let rows: Vec<Vec<String>> = builds
        .iter()
        .map(|b| {
            let (counts, total) = layer_counts(b);
            let count = |st| counts.get(&st).copied().unwrap_or(0);
            vec![
                b.id.clone(),
                build_word(b.state).to_string(),
                format!(
                    "{}/{}/{}/{}",
                    count(farm_model::LayerState::Built),
                    count(farm_model::LayerState::Cached),
                    count(farm_model::LayerState::Failed),
                    total
                ),
                if b.created_unix_ms > 0 {
                    rfc3339_ms(b.created_unix_ms)
                } else {
                    "-".to_string()
                },
                b.error.lines().next().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "BUILT/CACHED/FAILED/LAYERS",
            "SUBMITTED",
            "ERROR",
        ],
        &rows,
    )
}

/// How many of `build`'s layers are in each state: from its counts when the coordinator
/// sent them, else counted from its layers. The second value is the number of layers.
fn layer_counts(build: &BuildStatus) -> (HashMap<farm_model::LayerState, u32>, u32) {
    let mut by_state: HashMap<farm_model::LayerState, u32> = Default::default();
    if build.layer_counts.is_empty() {
        for l in &build.layers {
            if let Some(state) = farm_model::LayerState::from_wire(l.state) {
                *by_state.entry(state).or_default() += 1;
            }
        }
        return (by_state, build.layers.len() as u32);
    }
    let mut total = 0u32;
    for c in &build.layer_counts {
        total = total.saturating_add(c.count);
        if let Some(state) = farm_model::LayerState::from_wire(c.state) {
            *by_state.entry(state).or_default() += c.count;
        }
    }
    (by_state, total)
}

/// `farm workers` for a person.
pub(crate) fn workers_table(workers: &[WorkerInfo]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let state = if !w.unavailable.is_empty() {
                format!("unavailable: {}", w.unavailable)
            } else if w.connected {
                "connected".to_string()
            } else {
                "disconnected".to_string()
            };
            vec![
                w.name.clone(),
                dash(&w.platform).to_string(),
                format!("{}/{}", w.running.len(), w.slots),
                if w.last_seen_unix_ms > 0 {
                    rfc3339_ms(w.last_seen_unix_ms)
                } else {
                    "-".to_string()
                },
                state,
            ]
        })
        .collect();
    let mut out = table(
        &["NAME", "PLATFORM", "BUSY/SLOTS", "LAST SEEN", "STATE"],
        &rows,
    );
    // The running layers that a webhook delivery started, below the table.
    for w in workers {
        for r in &w.running_layers {
            if let Some(h) = &r.webhook {
                let _ = writeln!(
                    out,
                    "{}: {}/{} from webhook {} {} {} at {} (delivery {})",
                    w.name, r.build, r.layer, h.provider, h.repo, h.git_ref, h.sha, h.delivery
                );
            }
        }
    }
    out
}

/// A build event as the progress display's event; `None` for events it does not show
/// (waiting, the final build state).
pub(crate) fn progress_event(ev: &BuildEvent) -> Option<Event> {
    let layer = ev.layer.clone();
    match ev.kind.as_ref()? {
        Kind::Log(line) => Some(Event::Log {
            layer,
            line: line.clone(),
        }),
        Kind::Build(_) => None,
        Kind::State(state) => match LayerState::try_from(*state).ok()? {
            LayerState::LayerRunning => Some(Event::Started { layer }),
            LayerState::LayerCached => Some(Event::Cached { layer }),
            LayerState::LayerBuilt => Some(Event::Built {
                layer,
                duration: Duration::from_millis(ev.duration_ms),
            }),
            LayerState::LayerFailed => Some(Event::Failed {
                layer,
                failure: match &ev.failure {
                    Some(f) => LayerFailure::from(f),
                    // A coordinator that sends no kind: the message is all there is.
                    None => LayerFailure::internal(if ev.error.is_empty() {
                        "failed".to_string()
                    } else {
                        ev.error.clone()
                    }),
                },
            }),
            LayerState::LayerSkipped => Some(Event::Skipped {
                layer,
                because: ev.error.clone(),
            }),
            LayerState::LayerCancelled => Some(Event::Cancelled {
                layer,
                reason: if ev.error.is_empty() {
                    "cancelled".to_string()
                } else {
                    ev.error.clone()
                },
            }),
            LayerState::LayerWaiting | LayerState::Unspecified => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::v1::{BuildState, RunningLayer, WebhookOrigin};

    fn layer(name: &str, state: LayerState) -> LayerStatus {
        LayerStatus {
            name: name.into(),
            state: state as i32,
            ..LayerStatus::default()
        }
    }

    #[test]
    fn state_words() {
        let builds: Vec<&str> = (0..=6).map(build_word).collect();
        assert_eq!(
            builds,
            [
                "unknown",
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                "unknown"
            ]
        );
        let layers: Vec<&str> = (0..=8).map(layer_word).collect();
        assert_eq!(
            layers,
            [
                "unknown",
                "waiting",
                "running",
                "built",
                "cached",
                "failed",
                "skipped",
                "cancelled",
                "unknown"
            ]
        );
        assert!(!layer_finished(LayerState::LayerRunning as i32));
        assert!(layer_finished(LayerState::LayerCached as i32));
    }

    #[test]
    fn status_json_shape() {
        let mut built = layer("app", LayerState::LayerBuilt);
        built.worker = "w1".into();
        built.duration_ms = 1500;
        built.manifest_digest = format!("sha256:{}", "a".repeat(64));
        built.tagged = true;
        let mut cached = layer("base", LayerState::LayerCached);
        cached.cached = true;
        let running = layer("slow", LayerState::LayerRunning);
        let mut failed = layer("bad", LayerState::LayerFailed);
        failed.error = "exit 1".into();
        failed.worker = "w2".into();
        failed.duration_ms = 20;
        let s = BuildStatus {
            id: "b1".into(),
            state: BuildState::Running as i32,
            layers: vec![cached, built, running, failed],
            error: String::new(),
            created_unix_ms: 1,
            webhook: None,
            trace_id: String::new(),
            layer_counts: Vec::new(),
        };
        let v = status_json(&s);
        assert_eq!(
            v,
            json!({
                "id": "b1",
                "state": "running",
                "layers": [
                    {"name": "base", "state": "cached", "worker": null, "cached": true,
                     "duration_ms": 0, "manifest_digest": null},
                    {"name": "app", "state": "built", "worker": "w1", "cached": false,
                     "duration_ms": 1500, "manifest_digest": format!("sha256:{}", "a".repeat(64))},
                    {"name": "slow", "state": "running", "worker": null, "cached": false,
                     "duration_ms": null, "manifest_digest": null},
                    {"name": "bad", "state": "failed", "worker": "w2", "cached": false,
                     "duration_ms": 20, "manifest_digest": null, "error": "exit 1"},
                ]
            })
        );
        // Key order is part of the shape people read.
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "state", "layers"]);

        let failed = BuildStatus {
            id: "b2".into(),
            state: BuildState::Failed as i32,
            error: "layer bad failed".into(),
            ..BuildStatus::default()
        };
        let v = status_json(&failed);
        assert_eq!(v["state"], "failed");
        assert_eq!(v["error"], "layer bad failed");
        assert_eq!(v["layers"], json!([]));
    }

    #[test]
    fn worker_json_shape() {
        let w = WorkerInfo {
            name: "w1".into(),
            slots: 4,
            running: vec!["app".into()],
            last_seen_unix_ms: 1_700_000_000_123,
            platform: "linux/amd64".into(),
            unavailable: String::new(),
            connected: true,
            running_layers: Vec::new(),
        };
        assert_eq!(
            worker_json(&w),
            json!({"name": "w1", "slots": 4, "running": ["app"],
                   "last_seen": "2023-11-14T22:13:20.123Z", "platform": "linux/amd64",
                   "connected": true})
        );
        let idle = WorkerInfo {
            name: "w2".into(),
            unavailable: "pool is not writable".into(),
            ..WorkerInfo::default()
        };
        assert_eq!(
            worker_json(&idle),
            json!({"name": "w2", "slots": 0, "running": [], "last_seen": null,
                   "connected": false, "unavailable": "pool is not writable"})
        );
    }

    #[test]
    fn workers_show_the_webhook_of_running_layers() {
        let w = WorkerInfo {
            name: "w1".into(),
            slots: 2,
            running: vec!["b-1/app".into(), "b-2/lib".into()],
            connected: true,
            running_layers: vec![
                RunningLayer {
                    build: "b-1".into(),
                    layer: "app".into(),
                    webhook: Some(WebhookOrigin {
                        provider: "github".into(),
                        repo: "acme/app".into(),
                        git_ref: "refs/heads/main".into(),
                        sha: "abc".into(),
                        delivery: "d-1".into(),
                        build: "app".into(),
                    }),
                },
                RunningLayer {
                    build: "b-2".into(),
                    layer: "lib".into(),
                    webhook: None,
                },
            ],
            ..WorkerInfo::default()
        };
        assert_eq!(
            worker_json(&w)["webhooks"],
            json!([{"build": "b-1", "layer": "app", "provider": "github", "repo": "acme/app",
                    "ref": "refs/heads/main", "sha": "abc", "delivery": "d-1"}])
        );
        let table = workers_table(&[w]);
        assert!(
            table.contains(
                "w1: b-1/app from webhook github acme/app refs/heads/main at abc (delivery d-1)"
            ),
            "{table}"
        );
        assert!(!table.contains("b-2/lib from"), "{table}");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn events_become_progress_events() {
        let ev = |kind: Kind, error: &str, duration_ms: u64| BuildEvent {
            seq: 1,
            layer: "app".into(),
            kind: Some(kind),
            worker: "w1".into(),
            error: error.into(),
            duration_ms,
            failure: None,
        };
        let st = |s: LayerState| Kind::State(s as i32);
        assert!(matches!(
            progress_event(&ev(st(LayerState::LayerRunning), "", 0)),
            Some(Event::Started { layer }) if layer == "app"
        ));
        assert!(matches!(
            progress_event(&ev(Kind::Log("hello".into()), "", 0)),
            Some(Event::Log { line, .. }) if line == "hello"
        ));
        assert!(matches!(
            progress_event(&ev(st(LayerState::LayerBuilt), "", 2500)),
            Some(Event::Built { duration, .. }) if duration == Duration::from_millis(2500)
        ));
        assert!(matches!(
            progress_event(&ev(st(LayerState::LayerCached), "", 0)),
            Some(Event::Cached { .. })
        ));
        assert!(matches!(
            progress_event(&ev(st(LayerState::LayerFailed), "exit 2", 0)),
            Some(Event::Failed { failure, .. }) if failure.message == "exit 2"
        ));
        assert!(matches!(
            progress_event(&ev(st(LayerState::LayerSkipped), "base failed", 0)),
            Some(Event::Skipped { because, .. }) if because == "base failed"
        ));
        assert!(matches!(
            progress_event(&ev(st(LayerState::LayerCancelled), "", 0)),
            Some(Event::Cancelled { reason, .. }) if reason == "cancelled"
        ));
        assert!(progress_event(&ev(st(LayerState::LayerWaiting), "", 0)).is_none());
        let done = ev(Kind::Build(BuildState::Succeeded as i32), "", 0);
        assert!(progress_event(&done).is_none());
    }

    #[test]
    fn tables_align() {
        let s = BuildStatus {
            id: "b1".into(),
            state: BuildState::Succeeded as i32,
            layers: vec![
                layer("a-long-name", LayerState::LayerBuilt),
                layer("b", LayerState::LayerCached),
            ],
            ..BuildStatus::default()
        };
        let t = status_table(&s);
        assert!(t.starts_with("build b1: succeeded\n"), "{t}");
        let rows: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("LAYER")).collect();
        assert_eq!(rows.len(), 3, "{t}");
        let col = rows[0].find("STATE").unwrap();
        assert_eq!(rows[1].find("built"), Some(col), "{t}");
        assert_eq!(rows[2].find("cached"), Some(col), "{t}");
        assert_eq!(duration_text(31), "31ms");
        assert_eq!(duration_text(1500), "1.5s");
        let l = list_table(std::slice::from_ref(&s));
        assert!(l.contains("b1") && l.contains("1/1/0/2"), "{l}");
    }

    /// The list table counts from a build's layer counts when the coordinator sent
    /// them (no layers), and from its layers when it did not (an older coordinator).
    #[test]
    fn the_list_table_counts_from_layer_counts_or_layers() {
        let count = |state: LayerState, count| farm_proto::v1::LayerCount {
            state: state as i32,
            count,
        };
        let counted = BuildStatus {
            id: "b2".into(),
            state: BuildState::Running as i32,
            layer_counts: vec![
                count(LayerState::LayerBuilt, 7),
                count(LayerState::LayerCached, 3),
                count(LayerState::LayerFailed, 1),
                count(LayerState::LayerWaiting, 20_000),
            ],
            ..BuildStatus::default()
        };
        let l = list_table(std::slice::from_ref(&counted));
        assert!(l.contains("7/3/1/20011"), "{l}");
        let listed = BuildStatus {
            id: "b3".into(),
            state: BuildState::Running as i32,
            layers: vec![
                layer("a", LayerState::LayerFailed),
                layer("b", LayerState::LayerRunning),
            ],
            ..BuildStatus::default()
        };
        let l = list_table(std::slice::from_ref(&listed));
        assert!(l.contains("0/0/1/2"), "{l}");
    }
}

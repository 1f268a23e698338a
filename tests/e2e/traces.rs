//! Traces (issue 16): a `farm submit` to a coordinator and a worker, all three exporting
//! over OTLP/gRPC to a receiver inside this test (the `opentelemetry-proto` crate's
//! generated server on 127.0.0.1), gives one trace from the client's span down to the
//! worker's sandbox; a cached resubmission has cache hits and no worker spans; an
//! unreachable collector leaves the build's result as it is and its lost spans are
//! counted; the worker's metrics move when a layer builds.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::Value;

use crate::procs::*;
use crate::util::*;

/// A client command that takes longer than this is stuck.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
    /// 2 = ERROR (OTLP's `Status.code`).
    status: i32,
    status_message: String,
    /// How long it took.
    ms: f64,
}

/// The OTLP/gRPC receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Spans {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    trace: hex::encode(&span.trace_id),
                    id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    attrs: span
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.clone(),
                                text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                            )
                        })
                        .collect(),
                    ms: span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano) as f64
                        / 1e6,
                    status: span.status.as_ref().map_or(0, |s| s.code),
                    status_message: span.status.map(|s| s.message).unwrap_or_default(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The receiver on a free loopback port, served by a runtime of its own.
struct Receiver {
    spans: Spans,
    endpoint: String,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let spans = Spans::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let service = TraceServiceServer::new(spans.clone());
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Receiver {
            spans,
            endpoint,
            _runtime: runtime,
        }
    }

    fn all(&self) -> Vec<Got> {
        self.spans.0.lock().unwrap().clone()
    }

    /// The spans of `trace`, once `ready` says they are all there.
    fn trace_when(&self, trace: &str, ready: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        wait_until(
            &format!("the spans of trace {trace} arrive"),
            Duration::from_secs(60),
            || {
                let spans: Vec<Got> = self
                    .all()
                    .into_iter()
                    .filter(|s| s.trace == trace)
                    .collect();
                if ready(&spans) {
                    Ok(spans)
                } else {
                    Err(describe(&spans))
                }
            },
        )
    }
}

fn describe(spans: &[Got]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{}/{} {} <- {} {:?}",
                s.service, s.name, s.id, s.parent, s.attrs
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spans as an indented tree (`--no-capture` shows it: the README's example).
fn tree(spans: &[Got]) -> String {
    fn below(spans: &[Got], parent: &str, depth: usize, out: &mut String) {
        for s in spans.iter().filter(|s| s.parent == parent) {
            let keep = [
                "build.id",
                "layer",
                "cache",
                "worker",
                "placement",
                "queue_wait_ms",
                "outcome",
                "files_sent",
                "bytes_sent",
                "files_skipped",
                "extracted",
                "reused",
                "exit",
                "start_ms",
                "compression",
                "tar_bytes",
                "blob_bytes",
                "state",
            ];
            let attrs: Vec<String> = keep
                .iter()
                .filter_map(|k| s.attrs.get(*k).map(|v| format!("{k}={v}")))
                .collect();
            out.push_str(&format!(
                "{}{} [{}] {:.0} ms {}\n",
                "  ".repeat(depth),
                s.name,
                s.service,
                s.ms,
                attrs.join(" ")
            ));
            below(spans, &s.id, depth + 1, out);
        }
    }
    let mut out = String::new();
    below(spans, "", 0, &mut out);
    out
}

fn named<'a>(spans: &'a [Got], service: &str, name: &str) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

fn one<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    let found = named(spans, service, name);
    assert_eq!(found.len(), 1, "{service}/{name}:\n{}", describe(spans));
    found[0]
}

/// A coordinator and one worker exporting to `endpoint` (the coordinator through
/// OTEL_EXPORTER_OTLP_ENDPOINT, the worker through --otlp-endpoint), in a test dir of
/// the e2e user.
struct TracedFarm {
    worker: Option<Proc>,
    coordinator: Option<Coordinator>,
    worker_metrics: String,
    endpoint: String,
    t: TestDir,
}

impl TracedFarm {
    fn start(name: &str, endpoint: &str) -> Option<TracedFarm> {
        let e = e2e()?;
        let t = TestDir::new(e, &format!("traces-{name}"), Who::User);
        let blobs = format!("file://{}", t.join("blobs").display());
        let spec = CoordinatorSpec {
            state_dir: t.state.clone(),
            blobs: blobs.clone(),
            lease: Some(5.0),
            metrics: false,
            port: None,
            inputs: Vec::new(),
        };
        let env = [
            ("NO_COLOR", "1"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
        ];
        let cmd = t.command(&env, farm_bin().to_str().unwrap());
        let coordinator = Coordinator::start_with(&spec, cmd, &t.join("coordinator.log"));
        let pool = private_pool(e, &format!("traces-{name}"));
        let worker_metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = t.command(&[("NO_COLOR", "1")], farm_bin().to_str().unwrap());
        cmd.args(["worker", "--coordinator", &coordinator.addr])
            .arg("--pool")
            .arg(&pool)
            .args(["--blobs", &blobs, "--slots", "2", "--name", "w1"])
            .args(["--metrics", &worker_metrics])
            .args(["--otlp-endpoint", endpoint]);
        let worker = Proc::spawn("worker w1", cmd, &t.join("w1.log"));
        let f = TracedFarm {
            worker: Some(worker),
            coordinator: Some(coordinator),
            worker_metrics,
            endpoint: endpoint.to_string(),
            t,
        };
        wait_until("the worker is ready", Duration::from_secs(60), || {
            if std::net::TcpStream::connect(&f.worker_metrics).is_err() {
                return Err("not listening".into());
            }
            match http_status(&f.worker_metrics, "/readyz") {
                (200, _) => Ok(()),
                (code, body) => Err(format!("{code}: {body}")),
            }
        });
        Some(f)
    }

    fn addr(&self) -> &str {
        &self.coordinator.as_ref().unwrap().addr
    }

    /// `farm ARGS --coordinator ADDR --otlp-endpoint ENDPOINT`, bounded.
    fn client(&self, args: &[&str]) -> Run {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--coordinator".into(), self.addr().to_string()]);
        all.extend(["--otlp-endpoint".into(), self.endpoint.clone()]);
        let mut cmd = self.t.command(&[], farm_bin().to_str().unwrap());
        cmd.args(&all);
        run_bounded(cmd, all)
    }

    fn worker_metric(&self, name: &str) -> f64 {
        let text = http_get(&self.worker_metrics, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

fn run_bounded(mut cmd: Command, args: Vec<String>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().unwrap();
    let status = wait_until("the client ends", CLIENT_LIMIT, || {
        child.try_wait().unwrap().ok_or_else(String::new)
    });
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Run {
        args,
        status,
        stdout: read(&out),
        stderr: read(&err),
    }
}

const STACKERFILE: &str = "base:\n  from:\n    type: tar\n    url: busybox.tar\n\
     app:\n  from:\n    type: built\n    tag: base\n  run: echo traced > /traced\n";

fn layer_states(status: &Value) -> BTreeMap<String, String> {
    status["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {status}"))
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The trace id `farm submit` printed at its end.
fn printed_trace(run: &Run) -> String {
    run.stderr
        .lines()
        .find_map(|l| l.strip_prefix("farm submit: trace "))
        .unwrap_or_else(|| panic!("no trace id printed:\n{}", run.describe()))
        .trim()
        .to_string()
}

#[test]
fn a_submitted_build_is_one_trace_from_the_client_to_the_sandbox() {
    let receiver = Receiver::start();
    let Some(f) = TracedFarm::start("one", &receiver.endpoint) else {
        return;
    };
    f.t.write("stacker.yaml", STACKERFILE);
    assert_eq!(f.worker_metric("farm_worker_exports_total"), 0.0);

    let run = f.client(&["submit", "--json"]);
    run.assert_ok();
    let status = run.json();
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let trace = printed_trace(&run);
    assert_eq!(trace.len(), 32, "{trace}");
    assert_eq!(status["trace_id"], trace.as_str(), "{status:#}");
    let by_status = f.client(&["status", status["id"].as_str().unwrap(), "--json"]);
    assert_eq!(by_status.json()["trace_id"], trace.as_str());

    let spans = receiver.trace_when(&trace, |s| {
        named(s, "farm-cli", "submit").len() == 1
            && named(s, "farm-coordinator", "build").len() == 1
            && named(s, "farm-worker", "sandbox").len() == 1
            && named(s, "farm-worker", "assignment").len() == 2
    });
    println!("{}", tree(&spans));
    // All three services, one trace.
    let submit = one(&spans, "farm-cli", "submit");
    assert_eq!(submit.parent, "", "the client's span is the root");
    assert_eq!(submit.attrs["build.id"], status["id"].as_str().unwrap());
    let upload = one(&spans, "farm-cli", "upload context");
    assert_eq!(upload.parent, submit.id);
    assert!(
        upload.attrs["files"].parse::<u64>().unwrap() >= 2,
        "{upload:?}"
    );
    // The coordinator's build: below the client's span (through the Submit call).
    let rpc = one(&spans, "farm-coordinator", "Submit");
    assert_eq!(rpc.parent, submit.id);
    let build = one(&spans, "farm-coordinator", "build");
    assert_eq!(build.parent, rpc.id);
    assert_eq!(build.attrs["build.id"], status["id"].as_str().unwrap());
    assert_eq!(build.attrs["state"], "succeeded");
    // Each layer below the build, a miss, placed on w1.
    let layers = named(&spans, "farm-coordinator", "layer");
    assert_eq!(layers.len(), 2, "{}", describe(&spans));
    for l in &layers {
        assert_eq!(l.parent, build.id, "{l:?}");
        assert_eq!(l.attrs["cache"], "miss", "{l:?}");
        assert_eq!(l.attrs["worker"], "w1", "{l:?}");
        assert_eq!(l.attrs["outcome"], "built", "{l:?}");
        assert!(l.attrs.contains_key("queue_wait_ms"), "{l:?}");
        assert!(l.attrs["cache_key"].starts_with("sha256:"), "{l:?}");
    }
    // The worker's assignment below its layer's span; the sandbox below that.
    let app = layers.iter().find(|l| l.attrs["layer"] == "app").unwrap();
    let assignments = named(&spans, "farm-worker", "assignment");
    let app_assignment = assignments
        .iter()
        .find(|a| a.attrs["layer"] == "app")
        .unwrap_or_else(|| panic!("{}", describe(&spans)));
    assert_eq!(app_assignment.parent, app.id);
    assert_eq!(app_assignment.attrs["cache_key"], app.attrs["cache_key"]);
    let sandbox = one(&spans, "farm-worker", "sandbox");
    assert_eq!(sandbox.parent, app_assignment.id);
    assert_eq!(sandbox.attrs["exit"], "0");
    let exports = named(&spans, "farm-worker", "export");
    assert!(!exports.is_empty(), "{}", describe(&spans));
    assert!(exports.iter().all(|e| e.attrs["compression"] == "gzip"));
    assert!(
        exports
            .iter()
            .any(|e| e.attrs["tar_bytes"].parse::<u64>().unwrap() > 0)
    );
    // The standard resource variables are honoured.
    assert!(
        spans.iter().all(|s| s.trace == trace),
        "{}",
        describe(&spans)
    );

    // The worker's metrics moved with the build.
    assert!(f.worker_metric("farm_worker_exports_total") >= 2.0);
    assert!(f.worker_metric("farm_worker_export_tar_bytes_total") > 0.0);
    assert!(f.worker_metric("farm_worker_sandbox_start_seconds_count") >= 1.0);
    assert!(f.worker_metric("farm_worker_sandbox_start_seconds_sum") > 0.0);

    // The same submission again: a new trace whose layers are cache hits, and no
    // worker spans in it.
    let again = f.client(&["submit", "--json"]);
    again.assert_ok();
    let trace2 = printed_trace(&again);
    assert_ne!(trace2, trace);
    let spans2 = receiver.trace_when(&trace2, |s| {
        named(s, "farm-coordinator", "layer").len() == 2
            && named(s, "farm-coordinator", "build")
                .iter()
                .any(|b| b.attrs.get("state").is_some_and(|v| v == "succeeded"))
            && !named(s, "farm-cli", "submit").is_empty()
    });
    for l in named(&spans2, "farm-coordinator", "layer") {
        assert_eq!(l.attrs["cache"], "hit", "{l:?}");
        assert_eq!(l.attrs["outcome"], "cached", "{l:?}");
    }
    // The worker exports within half a second; give it a few more to show nothing.
    std::thread::sleep(Duration::from_secs(2));
    let late: Vec<Got> = receiver
        .all()
        .into_iter()
        .filter(|s| s.trace == trace2 && s.service == "farm-worker")
        .collect();
    assert!(
        late.is_empty(),
        "worker spans in a cached build:\n{}",
        describe(&late)
    );
    drop(f.worker);
    drop(f.coordinator);
}

/// A failed layer's span says why, with the text the user sees.
#[test]
fn a_failed_layer_s_spans_carry_the_error() {
    let receiver = Receiver::start();
    let Some(f) = TracedFarm::start("fail", &receiver.endpoint) else {
        return;
    };
    f.t.write(
        "stacker.yaml",
        "bad:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo nope; exit 3\n",
    );
    let run = f.client(&["submit", "--json"]);
    assert!(!run.status.success(), "{}", run.describe());
    let trace = printed_trace(&run);
    let spans = receiver.trace_when(&trace, |s| {
        !named(s, "farm-worker", "sandbox").is_empty()
            && !named(s, "farm-coordinator", "layer").is_empty()
            && named(s, "farm-coordinator", "build")
                .iter()
                .any(|b| b.status == 2)
    });
    let layer = one(&spans, "farm-coordinator", "layer");
    assert_eq!(layer.status, 2, "{layer:?}");
    assert!(layer.status_message.contains("exit code 3"), "{layer:?}");
    let sandbox = one(&spans, "farm-worker", "sandbox");
    assert_eq!(sandbox.attrs["exit"], "3");
    assert_eq!(sandbox.status, 2, "{sandbox:?}");
}

/// A collector nobody listens on: the build succeeds as without one, and the client,
/// the coordinator and the worker each say at exit how many spans did not reach it.
#[test]
fn an_unreachable_collector_changes_nothing_about_the_build() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let Some(mut f) = TracedFarm::start("unreachable", &closed) else {
        return;
    };
    f.t.write("stacker.yaml", STACKERFILE);
    let run = f.client(&["submit", "--json"]);
    run.assert_ok();
    let status = run.json();
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(
        layer_states(&status),
        BTreeMap::from([
            ("base".to_string(), "built".to_string()),
            ("app".to_string(), "built".to_string())
        ])
    );
    // The ids are made locally: the trace id is there even if no span arrives.
    assert_eq!(printed_trace(&run).len(), 32);
    let lost = format!("did not reach {closed}");
    run.assert_stderr_contains(&lost);
    // The daemons count theirs and say so when they stop.
    let mut worker = f.worker.take().unwrap();
    worker.term();
    assert!(worker.wait_exit(Duration::from_secs(30)).is_some());
    assert!(worker.output().contains(&lost), "{}", worker.output());
    let mut coordinator = f.coordinator.take().unwrap();
    coordinator.proc.term();
    assert!(
        coordinator
            .proc
            .wait_exit(Duration::from_secs(30))
            .is_some()
    );
    assert!(
        coordinator.proc.output().contains(&lost),
        "{}",
        coordinator.proc.output()
    );
}

//! Talking to a coordinator: its address (`--coordinator` / `FARM_COORDINATOR`), a
//! connection that fails fast and says how to fix it, gRPC errors in words, and watching
//! a build through coordinator restarts.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Args;
use farm_proto::v1::blobs_client::BlobsClient;
use farm_proto::v1::farm_client::FarmClient;
use farm_proto::v1::{BuildEvent, WatchRequest};
use tonic::transport::{Channel, Endpoint};

/// How long connecting may take before the coordinator counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a watcher keeps trying to get back to a coordinator that went away.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// `--coordinator URL` (or `FARM_COORDINATOR`).
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArg {
    /// The coordinator, as HOST:PORT or http://HOST:PORT [env: FARM_COORDINATOR]
    #[arg(long = "coordinator", value_name = "URL")]
    pub coordinator: Option<String>,
}

impl CoordinatorArg {
    /// The configured address, if any (an empty FARM_COORDINATOR counts as unset).
    pub fn address(&self) -> anyhow::Result<Option<String>> {
        let given = self
            .coordinator
            .clone()
            .or_else(|| std::env::var("FARM_COORDINATOR").ok())
            .filter(|s| !s.trim().is_empty());
        match given {
            None => Ok(None),
            Some(s) => parse_address(&s)
                .map(Some)
                .map_err(|e| anyhow!("coordinator address '{s}': {e}")),
        }
    }

    /// The configured address; an error saying how to configure one when there is none.
    pub fn required(&self, command: &str) -> anyhow::Result<String> {
        self.address()?.ok_or_else(|| {
            anyhow!(
                "farm {command} needs a coordinator: pass --coordinator HOST:PORT or set \
                 FARM_COORDINATOR (start one with `farm coordinator --listen HOST:PORT ...`)"
            )
        })
    }
}

/// `host:port` or `http://host:port` (a trailing `/` is fine) as `http://host:port`.
pub fn parse_address(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = if let Some(rest) = s.strip_prefix("http://") {
        rest
    } else if s.starts_with("https://") {
        return Err("https is not supported yet; use http://HOST:PORT".into());
    } else if let Some((scheme, _)) = s.split_once("://") {
        return Err(format!(
            "unknown scheme '{scheme}'; expected HOST:PORT or http://HOST:PORT"
        ));
    } else {
        s
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err("expected HOST:PORT or http://HOST:PORT".into());
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err("no port; expected HOST:PORT (for example 127.0.0.1:7070)".into());
    };
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.is_empty() || (host.contains(':') && !bracketed) {
        return Err("expected HOST:PORT (an IPv6 host goes in brackets: [::1]:7070)".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("'{port}' is not a port number")),
    }
    Ok(format!("http://{rest}"))
}

/// A connection to a coordinator.
#[derive(Debug, Clone)]
pub struct Client {
    /// `http://host:port`, for messages.
    pub addr: String,
    pub farm: FarmClient<Channel>,
    pub blobs: BlobsClient<Channel>,
}

impl Client {
    /// Connect to `addr` (from [`parse_address`]); fails within a few seconds when nobody
    /// answers there, with an error that names the address and says what to do.
    pub async fn connect(addr: &str) -> anyhow::Result<Client> {
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| anyhow!("coordinator address {addr}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect())
                .await;
        let channel = match connected {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(unreachable_error(addr, &error_chain(&e))),
            Err(_) => return Err(unreachable_error(addr, "timed out")),
        };
        Ok(Client {
            addr: addr.to_string(),
            farm: FarmClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            blobs: farm_coordinator::grpc::blobs::client(channel),
        })
    }

    /// A gRPC error of `call` in words (see [`status_error`]).
    pub fn error(&self, call: &str, id: &str, status: tonic::Status) -> anyhow::Error {
        status_error(&self.addr, call, id, &status)
    }
}

fn unreachable_error(addr: &str, why: &str) -> anyhow::Error {
    anyhow!(
        "cannot reach the coordinator at {addr}: {why}\n\
         Start one with `farm coordinator --listen HOST:PORT --state-dir DIR --blobs URL`, \
         check --coordinator / FARM_COORDINATOR, or unset FARM_COORDINATOR (and drop \
         --coordinator) to build in this process"
    )
}

/// An error and its sources, `: `-joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A gRPC error in words: not found names the build and the coordinator; unavailable
/// says the coordinator cannot be reached; anything else shows the coordinator's message.
pub fn status_error(addr: &str, call: &str, id: &str, status: &tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::NotFound if !id.is_empty() => anyhow!("no build {id} on {addr}"),
        tonic::Code::Unavailable => unreachable_error(addr, status.message()),
        code => anyhow!("{call} on {addr}: {code:?}: {}", status.message()),
    }
}

/// Errors after which watching again may work (the coordinator restarting, a broken
/// connection).
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
    )
}

/// Watch build `id` from its first event to its last, calling `on_event` for each (once
/// each, in order), and return the final event (its `build` holds the final state).
/// When the stream breaks, connect again with backoff and go on after the last event
/// seen; give up after [`RECONNECT_FOR`] without the coordinator.
pub async fn watch(
    client: &mut Client,
    id: &str,
    mut on_event: impl FnMut(&BuildEvent),
) -> anyhow::Result<BuildEvent> {
    watch_with(client, id, RECONNECT_FOR, &mut on_event).await
}

async fn watch_with(
    client: &mut Client,
    id: &str,
    give_up_after: Duration,
    on_event: &mut dyn FnMut(&BuildEvent),
) -> anyhow::Result<BuildEvent> {
    let mut last_seq = 0u64;
    let mut lost_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let why = match client
            .farm
            .watch(WatchRequest {
                id: id.to_string(),
                after_seq: last_seq,
            })
            .await
        {
            Err(status) if !retryable(status.code()) => {
                return Err(client.error("Watch", id, status));
            }
            Err(status) => status.message().to_string(),
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            lost_since = None;
                            backoff = Duration::from_millis(200);
                            if ev.seq != 0 && ev.seq <= last_seq {
                                continue;
                            }
                            last_seq = last_seq.max(ev.seq);
                            on_event(&ev);
                            if crate::states::final_state(&ev).is_some() {
                                return Ok(ev);
                            }
                        }
                        Ok(None) => break "the coordinator ended the stream early".to_string(),
                        Err(status) if !retryable(status.code()) => {
                            return Err(client.error("Watch", id, status));
                        }
                        Err(status) => break status.message().to_string(),
                    }
                }
            }
        };
        let since = *lost_since.get_or_insert_with(|| {
            eprintln!(
                "farm: lost the coordinator at {} ({why}); reconnecting",
                client.addr
            );
            Instant::now()
        });
        if since.elapsed() >= give_up_after {
            anyhow::bail!(
                "gave up waiting for the coordinator at {} after {}s ({why}); build {id} was \
                 not cancelled: `farm status {id} --wait` picks it up again",
                client.addr,
                give_up_after.as_secs()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if let Ok(fresh) = Client::connect(&client.addr).await {
            *client = fresh;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use farm_proto::v1::build_event::Kind;
    use farm_proto::v1::{BuildState, CancelRequest};
    use tokio::sync::mpsc;

    use super::*;
    use crate::test_coordinator::Coordinator;

    /// Two layers that run something: with no worker attached both are started (queued
    /// for a worker) and stay so until the build is cancelled.
    fn queued_build(dir: &Path) -> PathBuf {
        let file = dir.join("stacker.yaml");
        std::fs::write(
            &file,
            "a:\n  from:\n    type: scratch\n  run: echo a\n\
             b:\n  from:\n    type: scratch\n  run: echo b\n",
        )
        .unwrap();
        file
    }

    /// What arrived on `rx` so far.
    fn drain(rx: &mut mpsc::UnboundedReceiver<BuildEvent>) -> Vec<BuildEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn watch_resumes_after_the_last_event_seen_when_the_stream_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(dir.path()).await;
        let (addr, socket) = (coordinator.addr.clone(), coordinator.socket);
        let id = coordinator.submit(queued_build(dir.path())).await;
        let mut c = Client::connect(&addr).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watching = watch(&mut c, &id, |e| {
            let _ = tx.send(e.clone());
        });
        let restarting = async {
            // The coordinator stops once the watcher has seen an event of the running
            // build, and starts again on the same state dir and port.
            let first = rx.recv().await.unwrap();
            coordinator.stop().await;
            let mut before = vec![first];
            before.extend(drain(&mut rx));
            let again = Coordinator::start_on(dir.path(), socket).await;
            let mut other = Client::connect(&addr).await.unwrap();
            other
                .farm
                .cancel(CancelRequest { id: id.clone() })
                .await
                .unwrap();
            (before, again)
        };
        let (last, (before, again)) = futures::join!(watching, restarting);
        let last = last.unwrap();
        let after = drain(&mut rx);
        assert_eq!(
            crate::states::final_state(&last),
            Some(BuildState::Cancelled as i32),
            "{last:?}"
        );
        assert!(
            before
                .iter()
                .all(|e| crate::states::final_state(e).is_none()),
            "{before:?}"
        );
        assert!(
            before
                .iter()
                .any(|e| matches!(e.kind, Some(Kind::State(_))) && !e.layer.is_empty()),
            "{before:?}"
        );
        assert!(!after.is_empty());

        // Every stored event once, in order, the final one last: what a watcher that
        // never lost the coordinator sees.
        let seen: Vec<BuildEvent> = before.into_iter().chain(after).collect();
        let mut c = Client::connect(&addr).await.unwrap();
        let mut all = Vec::new();
        watch(&mut c, &id, |e| all.push(e.clone())).await.unwrap();
        assert_eq!(seen, all);
        assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq), "{seen:?}");
        assert_eq!(seen.last(), Some(&last));
        again.stop().await;
    }

    #[tokio::test]
    async fn watching_an_unknown_build_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(dir.path()).await;
        let mut c = Client::connect(&coordinator.addr).await.unwrap();
        let e = watch(&mut c, "nope", |_| {}).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no build nope on {}", coordinator.addr)
        );
        coordinator.stop().await;
    }

    #[tokio::test]
    async fn a_watcher_gives_up_on_a_coordinator_that_stays_away() {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(dir.path()).await;
        let addr = coordinator.addr.clone();
        let id = coordinator.submit(queued_build(dir.path())).await;
        let mut c = Client::connect(&addr).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut on_event = |e: &BuildEvent| {
            let _ = tx.send(e.clone());
        };
        let watching = watch_with(&mut c, &id, Duration::from_secs(1), &mut on_event);
        // The coordinator goes away for good once the first event is out.
        let stopping = async {
            let first = rx.recv().await.unwrap();
            coordinator.stop().await;
            (first, Instant::now())
        };
        let (result, (first, stopped)) = futures::join!(watching, stopping);
        let e = result.unwrap_err().to_string();
        assert!(stopped.elapsed() < Duration::from_secs(15));
        assert!(crate::states::final_state(&first).is_none(), "{first:?}");
        assert!(
            e.contains("gave up")
                && e.contains(&addr)
                && e.contains(&format!("farm status {id} --wait")),
            "{e}"
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("127.0.0.1:7070"),
            Ok("http://127.0.0.1:7070".into())
        );
        assert_eq!(
            parse_address("http://farm.example:80/"),
            Ok("http://farm.example:80".into())
        );
        assert_eq!(parse_address(" [::1]:9 "), Ok("http://[::1]:9".into()));
        assert_eq!(parse_address("http://[::1]:9"), Ok("http://[::1]:9".into()));
        for bad in [
            "",
            "localhost",
            "http://localhost",
            "host:port",
            "host:0",
            "host:70000",
            "::1:9",
            "grpc://h:1",
            "https://h:1",
            "h:1/path",
            ":7070",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_address("https://h:1").unwrap_err().contains("https"));
        assert!(parse_address("localhost").unwrap_err().contains("port"));
    }

    #[test]
    fn not_found_names_the_build_and_the_coordinator() {
        let e = status_error(
            "http://h:1",
            "Status",
            "b42",
            &tonic::Status::not_found("x"),
        );
        assert_eq!(e.to_string(), "no build b42 on http://h:1");
        let e = status_error(
            "http://h:1",
            "Status",
            "b42",
            &tonic::Status::unavailable("down"),
        );
        assert!(
            e.to_string()
                .contains("cannot reach the coordinator at http://h:1")
        );
        let e = status_error("http://h:1", "Submit", "", &tonic::Status::internal("boom"));
        assert!(e.to_string().contains("boom"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_fails_fast_and_says_how_to_fix_it() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let e = Client::connect(&addr).await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(e.contains(&addr), "{e}");
        assert!(
            e.contains("farm coordinator --listen") && e.contains("FARM_COORDINATOR"),
            "{e}"
        );
    }
}

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
    use farm_proto::v1::build_event::Kind;
    use farm_proto::v1::{BuildState, BuildStatus, LayerState};

    use super::*;
    use crate::fake::{Fake, Script};

    fn ev(seq: u64, kind: Kind) -> BuildEvent {
        BuildEvent {
            seq,
            layer: "app".into(),
            kind: Some(kind),
            ..BuildEvent::default()
        }
    }

    fn script() -> Script {
        Script {
            status: BuildStatus {
                id: "b1".into(),
                state: BuildState::Succeeded as i32,
                ..BuildStatus::default()
            },
            events: vec![
                ev(1, Kind::State(LayerState::LayerRunning as i32)),
                ev(2, Kind::Log("hello".into())),
                ev(3, Kind::Log("world".into())),
                ev(4, Kind::State(LayerState::LayerBuilt as i32)),
                ev(5, Kind::Build(BuildState::Succeeded as i32)),
            ],
            ..Script::default()
        }
    }

    #[tokio::test]
    async fn watch_resumes_after_the_last_event_seen_when_the_stream_breaks() {
        let fake = Fake::start(Script {
            break_after: Some(2),
            ..script()
        })
        .await;
        let mut c = Client::connect(&fake.addr).await.unwrap();
        let mut seen = Vec::new();
        let last = watch(&mut c, "b1", |e| seen.push(e.seq)).await.unwrap();
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        assert_eq!(
            crate::states::final_state(&last),
            Some(BuildState::Succeeded as i32)
        );
        assert_eq!(fake.script.lock().unwrap().watched_from, [0, 2]);
    }

    #[tokio::test]
    async fn watching_an_unknown_build_is_not_found() {
        let fake = Fake::start(script()).await;
        let mut c = Client::connect(&fake.addr).await.unwrap();
        let e = watch(&mut c, "nope", |_| {}).await.unwrap_err();
        assert_eq!(e.to_string(), format!("no build nope on {}", fake.addr));
    }

    #[tokio::test]
    async fn a_watcher_gives_up_on_a_coordinator_that_stays_away() {
        let fake = Fake::start(Script {
            break_after: Some(1),
            ..script()
        })
        .await;
        let mut c = Client::connect(&fake.addr).await.unwrap();
        let script = fake.script.clone();
        // The coordinator goes away for good once the first event is out.
        let mut fake = Some(fake);
        let started = Instant::now();
        let mut seen = Vec::new();
        let result = watch_with(&mut c, "b1", Duration::from_secs(1), &mut |e| {
            seen.push(e.seq);
            if let Some(f) = fake.take() {
                drop(f);
            }
        })
        .await;
        let e = result.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(15));
        assert_eq!(seen, [1]);
        assert!(
            e.contains("gave up") && e.contains("farm status b1 --wait"),
            "{e}"
        );
        assert_eq!(script.lock().unwrap().watched_from, [0]);
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

//! Talking to a coordinator, as the CLI presents it: its address (`--coordinator` /
//! `FARM_COORDINATOR`), a connection that fails fast and says how to fix it, gRPC errors
//! in words, and watching a build through coordinator restarts (the transport is
//! `farm_client`'s).

use std::time::Duration;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use farm_client::{Bearer, ConnectError, ConnectOptions, RECONNECT_FOR, WatchError, Watched};
use farm_proto::v1::BuildEvent;

pub(crate) use farm_client::Client;

/// `--coordinator URL` (or `FARM_COORDINATOR`) and the credentials for it.
#[derive(Debug, Clone, Args)]
pub(crate) struct CoordinatorArg {
    /// The coordinator, as HOST:PORT, http://HOST:PORT or https://HOST:PORT (TLS)
    /// [env: FARM_COORDINATOR]
    #[arg(long = "coordinator", value_name = "URL")]
    pub coordinator: Option<String>,

    /// A file holding this client's token (sent as `authorization: Bearer`) [env:
    /// FARM_TOKEN holds the token itself]
    #[arg(long = "token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// The CA (PEM) the coordinator's certificate is signed by, for https:// [default:
    /// the system's roots] [env: FARM_CA_CERT]
    #[arg(long = "ca-cert", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// A client certificate (PEM) to present, when the coordinator asks for one
    /// (mutual TLS; with --tls-key)
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The key (PEM) of --tls-cert
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// A coordinator's address and how to connect to it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `http://host:port` or `https://host:port`.
    pub addr: String,
    pub options: ConnectOptions,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Read `path` for `flag` (a message that names both when it cannot be).
pub(crate) fn read_for(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))
}

/// A token from `file` (`flag`) or else the environment variable `env`: trimmed, one
/// line; `None` when neither is set.
pub(crate) fn token_from(
    file: Option<&Path>,
    flag: &str,
    env: &str,
) -> anyhow::Result<Option<String>> {
    let (token, from) = match file {
        Some(path) => (
            String::from_utf8(read_for(flag, path)?)
                .map_err(|_| anyhow!("{flag} {}: not text", path.display()))?,
            format!("{flag} {}", path.display()),
        ),
        None => match std::env::var(env) {
            Ok(t) if !t.trim().is_empty() => (t, env.to_string()),
            _ => return Ok(None),
        },
    };
    let token = token.trim().to_string();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!("{from}: expected one token (as printed by `farm token new NAME`)");
    }
    Ok(Some(token))
}

/// Warn when `token_kind` would travel in plaintext to a coordinator off this machine.
pub(crate) fn warn_plaintext_token(addr: &str, token_kind: &str) {
    let Some(rest) = addr.strip_prefix("http://") else {
        return;
    };
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local {
        eprintln!(
            "farm: warning: sending the {token_kind} in plaintext to {addr}; use an https:// \
             address (the coordinator's --tls-cert) so it cannot be read on the way"
        );
    }
}

impl CoordinatorArg {
    /// The configured address, if any (an empty FARM_COORDINATOR counts as unset).
    pub(crate) fn address(&self) -> anyhow::Result<Option<Target>> {
        let given = self
            .coordinator
            .clone()
            .or_else(|| std::env::var("FARM_COORDINATOR").ok())
            .filter(|s| !s.trim().is_empty());
        let Some(s) = given else {
            return Ok(None);
        };
        let addr = farm_client::parse_address(&s)
            .map_err(|e| anyhow!("coordinator address '{s}': {e}"))?;
        let mut options = ConnectOptions::default();
        if let Some(token) = token_from(self.token_file.as_deref(), "--token-file", "FARM_TOKEN")? {
            warn_plaintext_token(&addr, "client token");
            options.bearer = Bearer::new(&token)
                .map_err(|e| anyhow!("the client token (--token-file / FARM_TOKEN): {e}"))?;
        }
        let ca = self
            .ca_cert
            .clone()
            .or_else(|| std::env::var_os("FARM_CA_CERT").map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty());
        if let Some(ca) = ca {
            options.ca_cert_pem = Some(read_for("--ca-cert", &ca)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options.identity_pem =
                Some((read_for("--tls-cert", cert)?, read_for("--tls-key", key)?));
        }
        options
            .tls_for(&addr)
            .map_err(|e| anyhow!("{e} (--ca-cert / --tls-cert need it)"))?;
        Ok(Some(Target { addr, options }))
    }

    /// The configured address; an error saying how to configure one when there is none.
    pub(crate) fn required(&self, command: &str) -> anyhow::Result<Target> {
        self.address()?.ok_or_else(|| {
            anyhow!(
                "farm {command} needs a coordinator: pass --coordinator HOST:PORT or set \
                 FARM_COORDINATOR (start one with `farm coordinator --listen HOST:PORT ...`)"
            )
        })
    }
}

/// Connect to `target`; fails within a few seconds when nobody answers there, with an
/// error that names the address and says what to do.
pub(crate) async fn connect(target: &Target) -> anyhow::Result<Client> {
    Client::connect_with(&target.addr, &target.options)
        .await
        .map_err(|e| match e {
            ConnectError::Unreachable { addr, reason } => unreachable_error(&addr, &reason),
            // Its message says it all (and names the address).
            e => anyhow!("{e}"),
        })
}

/// gRPC errors of a [`Client`]'s calls in words.
pub(crate) trait StatusInWords {
    /// A gRPC error of `call` (about build `id`, if any) in words (see [`status_error`]).
    fn error(&self, call: &str, id: &str, status: tonic::Status) -> anyhow::Error;
}

impl StatusInWords for Client {
    fn error(&self, call: &str, id: &str, status: tonic::Status) -> anyhow::Error {
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

/// A gRPC error in words: not found names the build and the coordinator; unavailable
/// says the coordinator cannot be reached; anything else shows the coordinator's message.
pub(crate) fn status_error(
    addr: &str,
    call: &str,
    id: &str,
    status: &tonic::Status,
) -> anyhow::Error {
    match status.code() {
        tonic::Code::NotFound if !id.is_empty() => anyhow!("no build {id} on {addr}"),
        tonic::Code::Unavailable => unreachable_error(addr, status.message()),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => anyhow!(
            "the coordinator at {addr} refused this client's credential: {}",
            status.message()
        ),
        code => anyhow!("{call} on {addr}: {code:?}: {}", status.message()),
    }
}

/// Watch build `id` from its first event to its last, calling `on_event` for each (once
/// each, in order), and return the final event (its `build` holds the final state).
/// When the stream breaks, say so on stderr and go on after the last event seen once the
/// coordinator is back; give up after [`RECONNECT_FOR`] without it.
pub(crate) async fn watch(
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
    let addr = client.addr.clone();
    let watched = client
        .watch(id, give_up_after, |update| match update {
            Watched::Event(ev) => on_event(ev),
            Watched::Lost { reason } => {
                eprintln!("farm: lost the coordinator at {addr} ({reason}); reconnecting")
            }
        })
        .await;
    watched.map_err(|e| match e {
        WatchError::Rpc { status, .. } => client.error("Watch", id, status),
        WatchError::GaveUp {
            addr,
            after,
            reason,
        } => anyhow!(
            "gave up waiting for the coordinator at {addr} after {}s ({reason}); build {id} was \
             not cancelled: `farm status {id} --wait` picks it up again",
            after.as_secs()
        ),
        e => anyhow!("{e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant;

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
            farm_client::final_state(&last),
            Some(BuildState::Cancelled as i32),
            "{last:?}"
        );
        assert!(
            before.iter().all(|e| farm_client::final_state(e).is_none()),
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
        assert!(farm_client::final_state(&first).is_none(), "{first:?}");
        assert!(
            e.contains("gave up")
                && e.contains(&addr)
                && e.contains(&format!("farm status {id} --wait")),
            "{e}"
        );
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
        let target = Target {
            addr: addr.clone(),
            options: ConnectOptions::default(),
        };
        let e = connect(&target).await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(e.contains(&addr), "{e}");
        assert!(
            e.contains("farm coordinator --listen") && e.contains("FARM_COORDINATOR"),
            "{e}"
        );
    }
}

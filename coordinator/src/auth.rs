//! Who may call the coordinator, and as what.
//!
//! Two roles: **clients** (the `Farm` API: submit, watch, status, list, logs, cancel,
//! workers) and **workers** (`Workers.Connect`). Both may use `Blobs`. A caller proves
//! its role with a bearer token (`authorization: Bearer TOKEN`) listed, as a SHA-256
//! hash, in the coordinator's `--client-tokens` or `--worker-tokens` file:
//!
//! ```text
//! # NAME sha256:HEX, one a line; a NAME may have several tokens (rotation)
//! alice sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ```
//!
//! The files are re-read when they change (their size, modification time or inode; a
//! `stat` per call), so a rotated token takes effect without a restart; a file that can
//! no longer be read refuses every token until it can (fail closed). Presented tokens
//! are hashed and compared with every listed hash in constant time.
//!
//! A role without a token file is open (the loopback and embedded set-ups need no
//! configuration); [`check_exposure`] refuses to serve a non-loopback address that way
//! unless the operator says `--insecure`. The [`Gate`] interceptor guards each gRPC
//! service: it answers `UNAUTHENTICATED` for a missing or unknown token and
//! `PERMISSION_DENIED` for a token of the other role (`Blobs` takes either, and is open
//! when clients need no token), counts refusals in the metrics
//! (`farm_auth_failures_total{reason}`), and hands the handler the caller's
//! [`Principal`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::farm::Farm;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Submits and follows builds (the `Farm` API).
    Client,
    /// Builds layers (`Workers.Connect`).
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }

    /// Where the caller configures its token, and the coordinator its list (for
    /// messages).
    fn how(self) -> &'static str {
        match self {
            Role::Client => {
                "pass --token-file FILE or set FARM_TOKEN; the token's line must be in the \
                 coordinator's --client-tokens file (make one with `farm token new NAME`)"
            }
            Role::Worker => {
                "start the worker with --token-file FILE or FARM_WORKER_TOKEN; the token's \
                 line must be in the coordinator's --worker-tokens file (make one with \
                 `farm token new NAME`)"
            }
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller: the name its token is listed under, and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

/// Why a call was refused (the label of `farm_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization: Bearer` token.
    Missing,
    /// A token no file lists (or a malformed header).
    Wrong,
    /// A token of the other role.
    WrongRole,
    /// A worker registered under a name other than its token's.
    WorkerName,
    /// The token file could not be read or parsed after a change.
    TokenFile,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::Missing,
        AuthFailure::Wrong,
        AuthFailure::WrongRole,
        AuthFailure::WorkerName,
        AuthFailure::TokenFile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Wrong => "wrong",
            AuthFailure::WrongRole => "wrong_role",
            AuthFailure::WorkerName => "worker_name",
            AuthFailure::TokenFile => "token_file",
        }
    }
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path}, line {line}: {why} (expected `NAME sha256:HEX`)")]
    Line {
        path: String,
        line: usize,
        why: String,
    },
}

/// One line of a token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub name: String,
    pub hash: [u8; 32],
}

/// The SHA-256 of a token, as listed in token files.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The line of a token file for `name` holding `token`.
pub fn token_line(name: &str, token: &str) -> String {
    format!("{name} sha256:{}", hex::encode(hash_token(token)))
}

/// Whether `name` may name a principal: 1 to 128 of `A-Z a-z 0-9 . _ @ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// A fresh random token (`farm_` and 43 characters of base64url: 256 bits).
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::from("farm_");
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    Ok(out)
}

/// Parse a token file's text (`path` is for messages). Blank lines and `#` comments
/// are skipped; a name may be listed with several tokens; one token (hash) under two
/// names is refused, as the caller could not be told apart.
pub fn parse_tokens(path: &str, text: &str) -> Result<Vec<TokenEntry>, TokenFileError> {
    let mut out: Vec<TokenEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| TokenFileError::Line {
            path: path.to_string(),
            line: i + 1,
            why: why.to_string(),
        };
        let mut fields = line.split_whitespace();
        let (Some(name), Some(hash), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("not two fields"));
        };
        if !valid_name(name) {
            return Err(bad(&format!(
                "'{name}' is not a name (1 to 128 of A-Z a-z 0-9 . _ @ -)"
            )));
        }
        let Some(hex_text) = hash.strip_prefix("sha256:") else {
            return Err(bad("the hash does not start with sha256:"));
        };
        let mut digest = [0u8; 32];
        if hex_text.len() != 64 || hex::decode_to_slice(hex_text, &mut digest).is_err() {
            return Err(bad("the hash is not 64 hex digits"));
        }
        if let Some(other) = out.iter().find(|e| e.hash == digest) {
            if other.name != name {
                return Err(bad(&format!(
                    "the same token is listed for '{}' and '{name}'",
                    other.name
                )));
            }
            continue;
        }
        out.push(TokenEntry {
            name: name.to_string(),
            hash: digest,
        });
    }
    Ok(out)
}

/// The name `token` is listed under in `entries`, if any: every entry is compared, in
/// constant time, whatever matches.
pub fn find_token<'a>(entries: &'a [TokenEntry], token: &str) -> Option<&'a str> {
    let presented = hash_token(token);
    let mut found: Option<&str> = None;
    for e in entries {
        let hit: bool = e.hash.ct_eq(&presented).into();
        if hit && found.is_none() {
            found = Some(&e.name);
        }
    }
    found
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    device: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode: m.ino(),
        device: m.dev(),
    })
}

#[derive(Debug)]
struct Loaded {
    stamp: Option<Stamp>,
    entries: Result<Vec<TokenEntry>, String>,
}

/// A token file, re-read when it changes.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

/// The answer of [`TokenFile::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    /// Listed under this name.
    Listed(String),
    NotListed,
    /// The file cannot be read now (why); nothing is accepted until it can.
    Unreadable(String),
}

impl TokenFile {
    /// Open `path`; it must be readable and valid now.
    pub fn open(path: &Path) -> Result<TokenFile, TokenFileError> {
        let shown = path.display().to_string();
        let read_err = |source| TokenFileError::Read {
            path: shown.clone(),
            source,
        };
        let st = stamp(path).map_err(read_err)?;
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let entries = parse_tokens(&shown, &text)?;
        if entries.is_empty() {
            tracing::warn!(file = %shown, "the token file lists no token: every caller is refused");
        }
        Ok(TokenFile {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded {
                stamp: Some(st),
                entries: Ok(entries),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name `token` is listed under, reading the file again first if it changed.
    pub fn check(&self, token: &str) -> TokenCheck {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut loaded);
        match &loaded.entries {
            Ok(entries) => match find_token(entries, token) {
                Some(name) => TokenCheck::Listed(name.to_string()),
                None => TokenCheck::NotListed,
            },
            Err(why) => TokenCheck::Unreadable(why.clone()),
        }
    }

    fn refresh(&self, loaded: &mut Loaded) {
        let shown = self.path.display().to_string();
        let now = stamp(&self.path);
        let now = match now {
            Ok(s) => s,
            Err(e) => {
                if loaded.stamp.is_some() {
                    tracing::error!(file = %shown, "token file unreadable: {e}; refusing its tokens until it is back");
                }
                loaded.stamp = None;
                loaded.entries = Err(format!("reading {shown}: {e}"));
                return;
            }
        };
        if loaded.stamp.as_ref() == Some(&now) {
            return;
        }
        let entries = std::fs::read_to_string(&self.path)
            .map_err(|source| TokenFileError::Read {
                path: shown.clone(),
                source,
            })
            .and_then(|text| parse_tokens(&shown, &text))
            .map_err(|e| e.to_string());
        match &entries {
            Ok(e) => tracing::info!(file = %shown, tokens = e.len(), "token file re-read"),
            Err(e) => tracing::error!("{e}; refusing its tokens until it is fixed"),
        }
        loaded.stamp = Some(now);
        loaded.entries = entries;
    }
}

/// The coordinator's token files; a role without one is open.
#[derive(Debug, Default)]
pub struct Auth {
    pub clients: Option<TokenFile>,
    pub workers: Option<TokenFile>,
}

/// Which service a call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The client API: clients only.
    Farm,
    /// `Workers.Connect`: workers only.
    Workers,
    /// Blobs: either role.
    Blobs,
}

/// A refused call: why (for the metrics) and what the caller is told.
#[derive(Debug)]
pub struct Denied {
    pub reason: AuthFailure,
    pub status: Status,
}

impl Auth {
    /// Whether any role needs a token.
    pub fn enabled(&self) -> bool {
        self.clients.is_some() || self.workers.is_some()
    }

    fn file(&self, role: Role) -> Option<&TokenFile> {
        match role {
            Role::Client => self.clients.as_ref(),
            Role::Worker => self.workers.as_ref(),
        }
    }

    /// Who calls `service` with `authorization` (the header's value, if any): `None` for
    /// an open service (no token file for its role), else the principal or why not.
    pub fn authenticate(
        &self,
        service: Service,
        authorization: Option<&[u8]>,
    ) -> Result<Option<Principal>, Denied> {
        let wanted: &[Role] = match service {
            Service::Farm => &[Role::Client],
            Service::Workers => &[Role::Worker],
            Service::Blobs => &[Role::Client, Role::Worker],
        };
        let guarded: Vec<Role> = wanted
            .iter()
            .copied()
            .filter(|r| self.file(*r).is_some())
            .collect();
        // Farm and Workers are open when their own role needs no token; Blobs when
        // clients need none (anyone may be a client then, and clients upload contexts
        // there; workers reach the blob store directly).
        let open = match service {
            Service::Blobs => self.clients.is_none(),
            _ => guarded.is_empty(),
        };
        if open {
            return Ok(None);
        }
        let expected = match service {
            Service::Farm => "a client token",
            Service::Workers => "a worker token",
            Service::Blobs => "a client or worker token",
        };
        let how = guarded
            .first()
            .map(|r| r.how())
            .unwrap_or(Role::Client.how());
        let unauthenticated = |reason: AuthFailure, what: &str| Denied {
            reason,
            status: Status::unauthenticated(format!(
                "{what}: this coordinator takes {expected} here: {how}"
            )),
        };
        let Some(token) = authorization.and_then(bearer) else {
            return Err(match authorization {
                None => unauthenticated(AuthFailure::Missing, "no credential"),
                Some(_) => unauthenticated(
                    AuthFailure::Wrong,
                    "the authorization header is not `Bearer TOKEN`",
                ),
            });
        };
        for role in &guarded {
            let file = self.file(*role).expect("guarded roles have a file");
            match file.check(token) {
                TokenCheck::Listed(name) => {
                    return Ok(Some(Principal { name, role: *role }));
                }
                TokenCheck::NotListed => {}
                TokenCheck::Unreadable(why) => {
                    tracing::error!("refusing a {role} token: {why}");
                    return Err(Denied {
                        reason: AuthFailure::TokenFile,
                        status: Status::unauthenticated(format!(
                            "the coordinator cannot read its {role} token file now (its log \
                             says why); try again when its operator has fixed it"
                        )),
                    });
                }
            }
        }
        // The other role's token: the caller authenticated, but may not do this.
        for role in [Role::Client, Role::Worker] {
            if wanted.contains(&role) {
                continue;
            }
            if let Some(file) = self.file(role)
                && let TokenCheck::Listed(name) = file.check(token)
            {
                let wanted_role = wanted[0];
                return Err(Denied {
                    reason: AuthFailure::WrongRole,
                    status: Status::permission_denied(format!(
                        "this is {role} {name}'s token, and only a {wanted_role} may call \
                         this service: {}",
                        wanted_role.how()
                    )),
                });
            }
        }
        Err(unauthenticated(
            AuthFailure::Wrong,
            "the token is not accepted (not listed, or rotated out)",
        ))
    }
}

/// The token of an `authorization: Bearer TOKEN` value.
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The interceptor in front of one gRPC service: authenticates each call, counts
/// refusals, and puts the caller's [`Principal`] in the request's extensions.
#[derive(Clone)]
pub struct Gate {
    auth: Arc<Auth>,
    farm: Farm,
    service: Service,
}

impl Gate {
    pub fn new(auth: Arc<Auth>, farm: Farm, service: Service) -> Gate {
        Gate {
            auth,
            farm,
            service,
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        match self.auth.authenticate(self.service, header.as_deref()) {
            Ok(Some(principal)) => {
                request.extensions_mut().insert(principal);
                Ok(request)
            }
            Ok(None) => Ok(request),
            Err(denied) => {
                self.farm.metrics().auth_failed(denied.reason);
                tracing::warn!(
                    service = ?self.service,
                    reason = denied.reason.as_str(),
                    remote = ?request.remote_addr(),
                    "refused a call: {}",
                    denied.status.message()
                );
                Err(denied.status)
            }
        }
    }
}

/// The caller of `request`, if its service is guarded.
pub fn principal<T>(request: &Request<T>) -> Option<Principal> {
    request.extensions().get::<Principal>().cloned()
}

/// What a listener serves, for [`check_exposure`].
#[derive(Debug, Clone, Copy)]
pub struct Exposed {
    pub addr: SocketAddr,
    pub clients: bool,
    pub workers: bool,
}

/// The security of each listener, as configured.
#[derive(Debug, Clone, Copy)]
pub struct Protection {
    pub tls: bool,
    pub client_tokens: bool,
    pub worker_tokens: bool,
}

/// What is missing to serve `listeners` on other than loopback addresses (empty: it is
/// safe; loopback listeners need nothing).
pub fn check_exposure(listeners: &[Exposed], p: Protection) -> Vec<String> {
    let mut missing = Vec::new();
    for l in listeners {
        if l.addr.ip().is_loopback() {
            continue;
        }
        let mut lacks = Vec::new();
        if !p.tls {
            lacks.push("TLS (--tls-cert and --tls-key)");
        }
        if l.clients && !p.client_tokens {
            lacks.push("client tokens (--client-tokens)");
        }
        if l.workers && !p.worker_tokens {
            lacks.push("worker tokens (--worker-tokens)");
        }
        if !lacks.is_empty() {
            missing.push(format!("{} without {}", l.addr, lacks.join(", ")));
        }
    }
    missing
}

/// Make aws-lc-rs the process's rustls crypto provider, unless one is installed (TLS
/// needs one; with more than one compiled in, rustls does not choose by itself).
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, token: &str) -> String {
        token_line(name, token) + "\n"
    }

    #[test]
    fn a_token_file_parses_with_comments_rotation_and_errors_by_line() {
        let text = format!(
            "# clients\n\n{}  {}{}",
            line("alice", "t1"),
            line("alice", "t2"),
            line("bob@x", "t3")
        );
        let entries = parse_tokens("f", &text).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(find_token(&entries, "t2"), Some("alice"));
        assert_eq!(find_token(&entries, "t3"), Some("bob@x"));
        assert_eq!(find_token(&entries, "t4"), None);
        assert_eq!(find_token(&entries, ""), None);

        for (bad, why) in [
            ("alice\n", "not two fields"),
            ("alice sha256:00 extra\n", "not two fields"),
            ("al ice\n", "sha256:"),
            ("a/b sha256:00\n", "not a name"),
            ("alice md5:00\n", "sha256:"),
            ("alice sha256:zz\n", "64 hex"),
        ] {
            let e = parse_tokens("f", &format!("# x\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("line 2") && e.contains(why), "{bad:?}: {e}");
        }
        let twice = format!("{}{}", line("a", "same"), line("b", "same"));
        let e = parse_tokens("f", &twice).unwrap_err().to_string();
        assert!(e.contains("'a' and 'b'"), "{e}");
    }

    #[test]
    fn tokens_are_random_and_their_lines_match_them() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("farm_") && a.len() == 5 + 43, "{a}");
        let entries = parse_tokens("f", &token_line("w1", &a)).unwrap();
        assert_eq!(find_token(&entries, &a), Some("w1"));
        assert_eq!(find_token(&entries, &b), None);
    }

    #[test]
    fn the_comparison_checks_every_entry() {
        // The first match wins, and a later entry is still compared (constant time
        // over the list): a match at the end is found as well as one at the start.
        let mut text = String::new();
        for i in 0..50 {
            text += &line(&format!("n{i}"), &format!("t{i}"));
        }
        let entries = parse_tokens("f", &text).unwrap();
        assert_eq!(find_token(&entries, "t0"), Some("n0"));
        assert_eq!(find_token(&entries, "t49"), Some("n49"));
    }

    #[test]
    fn a_changed_token_file_is_read_again_and_an_unreadable_one_refuses_all() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tokens");
        std::fs::write(&path, line("alice", "old")).unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(file.check("old"), TokenCheck::Listed("alice".into()));
        assert_eq!(file.check("new"), TokenCheck::NotListed);

        // Rotated in place (a new file renamed over the old one).
        let next = d.path().join("tokens.new");
        std::fs::write(&next, line("alice", "new")).unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(file.check("new"), TokenCheck::Listed("alice".into()));
        assert_eq!(file.check("old"), TokenCheck::NotListed);

        // Broken: nothing passes, not even the last good tokens.
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(file.check("new"), TokenCheck::Unreadable(_)));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(file.check("new"), TokenCheck::Unreadable(_)));
        // Back.
        std::fs::write(&path, line("bob", "b")).unwrap();
        assert_eq!(file.check("b"), TokenCheck::Listed("bob".into()));
        // A missing file at start is an error that names it.
        let e = TokenFile::open(&d.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    fn auth(d: &Path, clients: &str, workers: &str) -> Auth {
        let c = d.join("clients");
        let w = d.join("workers");
        std::fs::write(&c, clients).unwrap();
        std::fs::write(&w, workers).unwrap();
        Auth {
            clients: Some(TokenFile::open(&c).unwrap()),
            workers: Some(TokenFile::open(&w).unwrap()),
        }
    }

    #[test]
    fn roles_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let a = auth(d.path(), &line("alice", "ct"), &line("w1", "wt"));
        let ok = |s, h: &str| a.authenticate(s, Some(h.as_bytes()));
        assert_eq!(
            ok(Service::Farm, "Bearer ct").unwrap(),
            Some(Principal {
                name: "alice".into(),
                role: Role::Client
            })
        );
        assert_eq!(
            ok(Service::Workers, "bearer wt").unwrap().unwrap().name,
            "w1"
        );
        assert!(ok(Service::Blobs, "Bearer ct").unwrap().is_some());
        assert!(ok(Service::Blobs, "Bearer wt").unwrap().is_some());

        let denied = |s, h: Option<&str>| a.authenticate(s, h.map(str::as_bytes)).unwrap_err();
        let e = denied(Service::Farm, Some("Bearer wt"));
        assert_eq!(
            (e.reason, e.status.code()),
            (AuthFailure::WrongRole, tonic::Code::PermissionDenied)
        );
        assert!(e.status.message().contains("FARM_TOKEN"), "{:?}", e.status);
        let e = denied(Service::Workers, Some("Bearer ct"));
        assert_eq!(e.status.code(), tonic::Code::PermissionDenied);
        assert!(
            e.status.message().contains("FARM_WORKER_TOKEN"),
            "{:?}",
            e.status
        );
        for (h, reason) in [
            (None, AuthFailure::Missing),
            (Some("Bearer nope"), AuthFailure::Wrong),
            (Some("Basic ct"), AuthFailure::Wrong),
            (Some("Bearer "), AuthFailure::Wrong),
        ] {
            for s in [Service::Farm, Service::Workers, Service::Blobs] {
                let e = denied(s, h);
                assert_eq!(
                    (e.reason, e.status.code()),
                    (reason, tonic::Code::Unauthenticated),
                    "{s:?} {h:?}"
                );
            }
        }
    }

    #[test]
    fn without_token_files_everything_is_open() {
        let a = Auth::default();
        for s in [Service::Farm, Service::Workers, Service::Blobs] {
            assert_eq!(a.authenticate(s, None).unwrap(), None);
            assert_eq!(a.authenticate(s, Some(b"Bearer x")).unwrap(), None);
        }
        // Only clients guarded: workers connect freely, Blobs wants a token.
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("c");
        std::fs::write(&c, line("alice", "ct")).unwrap();
        let a = Auth {
            clients: Some(TokenFile::open(&c).unwrap()),
            workers: None,
        };
        assert_eq!(a.authenticate(Service::Workers, None).unwrap(), None);
        assert!(a.authenticate(Service::Blobs, None).is_err());
        assert!(a.authenticate(Service::Farm, None).is_err());
        // Only workers guarded: clients (and so Blobs) are open.
        let w = d.path().join("w");
        std::fs::write(&w, line("w1", "wt")).unwrap();
        let a = Auth {
            clients: None,
            workers: Some(TokenFile::open(&w).unwrap()),
        };
        assert_eq!(a.authenticate(Service::Farm, None).unwrap(), None);
        assert_eq!(a.authenticate(Service::Blobs, None).unwrap(), None);
        assert!(a.authenticate(Service::Workers, None).is_err());
    }

    #[test]
    fn only_non_loopback_listeners_need_protection() {
        let at = |s: &str, clients, workers| Exposed {
            addr: s.parse().unwrap(),
            clients,
            workers,
        };
        let none = Protection {
            tls: false,
            client_tokens: false,
            worker_tokens: false,
        };
        assert!(check_exposure(&[at("127.0.0.1:1", true, true)], none).is_empty());
        assert!(check_exposure(&[at("[::1]:1", true, true)], none).is_empty());
        let m = check_exposure(&[at("0.0.0.0:1", true, true)], none);
        assert_eq!(m.len(), 1);
        assert!(m[0].contains("--tls-cert") && m[0].contains("--worker-tokens"));
        let all = Protection {
            tls: true,
            client_tokens: true,
            worker_tokens: true,
        };
        assert!(check_exposure(&[at("0.0.0.0:1", true, true)], all).is_empty());
        // Workers on loopback only: their tokens are not required.
        let clients_only = Protection {
            worker_tokens: false,
            ..all
        };
        assert!(
            check_exposure(
                &[at("0.0.0.0:1", true, false), at("127.0.0.1:2", false, true)],
                clients_only
            )
            .is_empty()
        );
    }
}

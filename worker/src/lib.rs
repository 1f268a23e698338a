//! farm-worker: builds one layer at a time per slot, rootless, and decides nothing.
//!
//! Its job (filled in by the engine issue): the btrfs pool of base chains keyed by
//! ChainID, the unprivileged user-namespace sandbox, capturing a step's change in time
//! proportional to the change, exporting it in one streaming pass to the blob store,
//! assembling image configs and manifests, and the worker side of the coordinator stream.
//!
//! Present so far:
//! * [`idmap`] — which host ids back container ids 0..65535 (subuid/subgid, or a range of
//!   our own as real root).
//! * [`userns`] — [`userns::UsernsCommand`] (any program as root of a new user namespace)
//!   and the hidden entry point the `farm` binary must wire
//!   ([`userns::run_hidden_entry_if_requested`]).
//! * [`sandbox`] — the build sandbox ([`userns::Userns::run_sandbox`]).
//! * [`sys`] — the only `unsafe` code (syscalls nix lacks); its xattr readers are public
//!   for layer capture.

pub mod agent;
pub mod assemble;
pub mod cancel;
pub mod engine;
pub mod idmap;
pub mod ops;
pub mod sandbox;
pub mod sys;
pub mod userns;

pub use cancel::CancelToken;
pub use idmap::{IdMapError, IdMapping};
pub use sandbox::{Bind, Rootfs, SandboxError, SandboxSpec, ScriptStatus};
pub use userns::{Entry, HIDDEN_SUBCOMMAND, NsOp, Userns, UsernsChild, UsernsCommand, UsernsError};
pub mod pool;

//! farm-worker: builds one layer at a time per slot, rootless, and decides nothing.
//!
//! * [`agent`]: the worker side of the coordinator stream (jobs in, results and events
//!   out).
//! * [`engine`]: one layer from its base to its image config ([`engine::Engine`]).
//! * [`assemble`]: image config and manifest of a built layer.
//! * [`pool`]: the btrfs (or copy) pool of base chains keyed by ChainID, and scratch
//!   workspaces.
//! * [`sandbox`]: the build sandbox ([`Userns::run_sandbox`]).
//! * [`ops`]: the work done as container root in the user namespace ([`ops::Op`]).
//! * [`userns`]: processes in a new user namespace, and the hidden entry point the
//!   `farm` binary wires ([`userns::run_hidden_entry_if_requested`]).
//! * [`idmap`]: which host ids back container ids 0..65535.
//! * [`cgroup`]: per-build pids and memory limits in a delegated cgroup (v2, else v1).
//! * [`cancel`]: [`CancelToken`], which stops a build.
//! * [`sys`]: the only `unsafe` code (syscalls nix lacks); its xattr readers are public
//!   for layer capture.

pub mod agent;
pub mod assemble;
pub mod cancel;
pub mod cgroup;
pub mod engine;
pub mod idmap;
pub mod ops;
pub mod pool;
pub mod sandbox;
pub mod sys;
pub mod userns;

pub use cancel::CancelToken;
pub use idmap::{IdMapError, IdMapping};
pub use sandbox::{Bind, Rootfs, SandboxError, SandboxProc, SandboxSpec, ScriptStatus};
pub use userns::{Entry, HIDDEN_SUBCOMMAND, NsOp, Userns, UsernsChild, UsernsCommand, UsernsError};

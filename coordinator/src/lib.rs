//! farm-coordinator: the brain of the farm. It never touches a rootfs.
//!
//! Its job: accept submissions, parse and plan them with `farm-stackerfile` (the
//! coordinator is the source of truth), pin every input to a digest ([`pin`]), compute
//! cache keys from canonical layer definitions and answer hits from the action cache
//! ([`cache`], [`build`]), schedule ready layers onto workers with leases and heartbeats
//! ([`farm`]), keep state in SQLite ([`state`]), and stream events and logs to every
//! watcher over gRPC ([`grpc`], [`server`]).

pub mod auth;
pub mod build;
pub mod cache;
pub mod db;
pub mod destinations;
pub mod farm;
pub mod fetch;
pub mod gc;
mod group_commit;
pub mod grpc;
pub mod hooks;
pub mod metrics;
pub mod output;
pub mod pin;
pub mod server;
pub mod state;

pub use farm_stackerfile::{Plan, PlanOptions};

//! End-to-end tests: each runs the real `farm` binary.

mod build;
mod client;
mod plan;
mod registry;
mod semantics;
mod util;

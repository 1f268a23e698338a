//! End-to-end tests: each runs the real `farm` binary.

mod build;
mod client;
mod plan;
mod semantics;
mod util;

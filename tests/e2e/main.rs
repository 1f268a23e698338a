//! End-to-end tests: each runs the real `farm` binary.

mod architecture;
mod auth;
mod build;
mod client;
mod farm;
mod images;
mod kubernetes;
mod plan;
mod procs;
mod registry;
mod semantics;
mod stacker_cli;
mod util;

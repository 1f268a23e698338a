//! End-to-end tests: each runs the real `farm` binary.

mod architecture;
mod auth;
mod build;
mod client;
mod farm;
mod gc;
mod images;
mod inputs;
mod kubernetes;
mod layer_types;
mod limits;
mod plan;
mod pods;
mod procs;
mod registry;
mod sandbox;
mod semantics;
mod stacker_cli;
mod traces;
mod util;
mod webhooks;

//! End-to-end tests: each runs the real `farm` binary.

mod plan;
mod util;

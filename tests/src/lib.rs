//! farm-tests: end-to-end tests that run the real `farm` binary (see `e2e/`).
//!
//! One test binary for the whole suite (`e2e/main.rs` with a module per area), because
//! every extra test binary costs a link of the full dependency graph on CI.

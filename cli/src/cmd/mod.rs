//! One module per subcommand.
pub mod build;
pub mod check;
pub mod plan;
pub mod setup;

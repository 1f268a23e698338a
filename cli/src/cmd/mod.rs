//! One module per subcommand.
pub mod build;
pub mod check;
pub mod layers;
pub mod plan;
pub mod publish;
pub mod serve;
pub mod setup;

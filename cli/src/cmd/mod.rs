//! One module per subcommand.
pub mod build;
pub mod cancel;
pub mod check;
pub mod layers;
pub mod logs;
pub mod plan;
pub mod publish;
pub mod pull;
pub mod serve;
pub mod setup;
pub mod status;
pub mod submit;
pub mod workers;

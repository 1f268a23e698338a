//! One module per subcommand.
pub(crate) mod build;
pub(crate) mod cancel;
pub(crate) mod check;
pub(crate) mod gc;
pub(crate) mod layers;
pub(crate) mod logs;
pub(crate) mod plan;
pub(crate) mod publish;
pub(crate) mod pull;
pub(crate) mod serve;
pub(crate) mod setup;
pub(crate) mod status;
pub(crate) mod submit;
pub(crate) mod token;
pub(crate) mod workers;

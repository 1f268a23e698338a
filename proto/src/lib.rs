//! farm-proto: `farm.proto` and the tonic/prost code generated from it.
//!
//! This crate holds no logic. The protocol (client API, blob API, the worker's
//! bidirectional stream) is defined by the coordinator issue; until then the crate only
//! reserves its place in the workspace so that the layout matches the design.

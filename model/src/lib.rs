//! farm-model: the types the coordinator, the workers and the clients speak.
//!
//! A worker receives a [`Job`] (a layer definition with every input pinned), builds it
//! and answers with a [`BuiltImage`] or a [`LayerFailure`]; builds and layers move
//! through [`BuildState`] and [`LayerState`]; progress travels as [`Event`]s. The value
//! types [`ChainId`], [`Platform`] and [`Compression`] are parsed once, at the edges.
//! Conversions to and from the wire types of `farm-proto` live beside each type.
//!
//! This crate depends on the language (`farm-stackerfile`), blob types (`farm-image`)
//! and the wire schema (`farm-proto`) only: never on the coordinator or the worker.

mod chain;
mod error_text;
mod event;
mod failure;
mod image;
mod job;
mod platform;
mod state;
mod version;

pub use chain::{ChainId, InvalidChainId, chain_id};
pub use error_text::error_chain;
pub use event::{Event, EventSender};
pub use failure::{FailureKind, LayerFailure, LayerOutcome};
pub use farm_image::{Compression, UnknownCompression};
pub use image::{BuiltImage, LayerBlob};
pub use job::{ImportSource, Job, JobBase, JobImport, JobOverlayDir};
pub use platform::{InvalidPlatform, Platform};
pub use state::{BuildState, LayerState, UnknownWord};
pub use version::{PROTOCOL, ProtocolVersion};

//! The coordinator's gRPC services (see `proto/farm.proto`); their clients are in
//! `farm-client`.
//!
//! - [`blobs`]: the `Blobs` service over a [`farm_image::BlobStore`] ([`BlobService`]).

pub mod blobs;
pub mod farm;

pub use blobs::BlobService;
pub use farm_proto::v1 as proto;

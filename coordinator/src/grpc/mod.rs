//! The coordinator's gRPC services (see `proto/farm.proto`); their clients are in
//! `farm-client`.
//!
//! - [`farm`]: the `Farm` service (the client API).
//! - [`workers`]: the `Workers` service, one stream per worker; the embedded worker
//!   speaks it over channels.
//! - [`blobs`]: the `Blobs` service over a [`farm_image::BlobStore`] ([`BlobService`]).

pub mod blobs;
pub mod farm;
pub mod workers;

pub use blobs::BlobService;
pub use farm_proto::v1 as proto;

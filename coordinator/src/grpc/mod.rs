//! The coordinator's gRPC services (see `proto/farm.proto`) and the client helpers that
//! go with them, for the CLI and the workers.
//!
//! - [`farm`]: the `Farm` service (the client API).
//! - [`workers`]: the `Workers` service, one stream per worker; the embedded worker
//!   speaks it over channels.
//! - [`blobs`]: the `Blobs` service over a [`farm_image::BlobStore`] ([`BlobService`]),
//!   and [`blobs::upload_missing`], [`blobs::upload_file`], [`blobs::download`].

pub mod blobs;
pub mod farm;
pub mod workers;

pub use blobs::BlobService;
pub use farm_proto::v1 as proto;

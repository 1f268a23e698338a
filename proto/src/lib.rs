//! farm-proto: `farm.proto` and the tonic/prost code generated from it.
//!
//! This crate holds no logic: it only compiles the protocol (the client API `Farm`, the
//! blob API `Blobs`, the workers' bidirectional `Workers` stream) into Rust types, client
//! stubs and server traits, and exposes the encoded file descriptor set for gRPC
//! reflection. Everything that gives those messages meaning lives in the coordinator,
//! the worker and the CLI.
//!
//! The code is generated at build time by `tonic-prost-build` with a vendored `protoc`
//! (set `PROTOC` to use another one).

/// The `farm.v1` package: messages, `*_client` and `*_server` modules.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("farm.v1");
}

/// The encoded `FileDescriptorSet` of `farm.proto`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("farm_descriptor");

pub use v1::{
    blobs_client, blobs_server, farm_client, farm_server, workers_client, workers_server,
};

/// Largest gRPC message either side accepts or sends (statuses of big builds, jobs
/// with many imports).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Blob transfer: the size of the chunks a blob is sent in.
pub const BLOB_CHUNK_SIZE: usize = 1 << 20;
/// Blob transfer: the largest chunk a peer may send.
pub const MAX_BLOB_CHUNK_SIZE: usize = 4 << 20;
/// Blob transfer: the largest message of the `Blobs` service (a chunk plus framing).
pub const MAX_BLOB_MESSAGE_SIZE: usize = MAX_BLOB_CHUNK_SIZE + (64 << 10);

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

/// The most bytes of a message a status carries. It travels in an HTTP/2 header: a
/// message of half a MB (a plan's thousands of diagnostics, or a client's oversized
/// field echoed back) made the client's HTTP/2 stack hang up, so the caller saw a
/// protocol error instead of the message.
pub(crate) const STATUS_MESSAGE_MAX: usize = 4096;

/// `status` with its message cut at a line end before [`STATUS_MESSAGE_MAX`] bytes,
/// saying how much was cut; its code kept.
pub(crate) fn bounded(status: tonic::Status) -> tonic::Status {
    let message = status.message();
    if message.len() <= STATUS_MESSAGE_MAX {
        return status;
    }
    let mut end = STATUS_MESSAGE_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let end = message[..end].rfind('\n').map_or(end, |i| i + 1);
    tonic::Status::new(
        status.code(),
        format!(
            "{}... ({} more bytes of it cut)",
            &message[..end],
            message.len() - end
        ),
    )
}

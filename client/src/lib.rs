//! farm-client: everything that talks to a farm coordinator as a client.
//!
//! - [`Client`]: a connection to a coordinator (address from [`parse_address`]), the
//!   `Farm` calls (submit, status, list, cancel, workers, logs) and [`Client::watch`],
//!   which follows a build's events through coordinator restarts.
//! - [`blobs`]: blobs up and down the `Blobs` service, streaming and verified.
//!
//! Message limits and chunk sizes are the protocol's (`farm_proto`), so they match the
//! coordinator's. Nothing here prints: errors are typed, and what a person should read
//! is for the caller to say.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blobs;
mod coordinator;

pub use blobs::BlobError;
pub use coordinator::{
    AddressError, Bearer, CONNECT_TIMEOUT, Client, ConnectError, ConnectOptions, InvalidToken,
    RECONNECT_FOR, TlsWithoutHttps, Transport, WatchError, Watched, final_state, parse_address,
    transport,
};

//! farm-registry: OCI registries, through `oci-client`.
//!
//! - [`ImageRef`]: `docker://host[:port]/repo[:tag][@sha256:...]` references (Docker Hub
//!   defaults included) and [`PushTarget`]s (`docker://host/ns`, stacker's publish naming).
//! - [`Credentials`]: `--registry-username/--registry-password`, then the container auth
//!   files; errors say which source was used, never the secret.
//! - [`pull`]: a registry image into a [`farm_image::BlobStore`]: the tag resolved to a
//!   manifest digest once, an index narrowed to one platform, blobs the store has not
//!   downloaded again, every layer streamed and verified against its digest.
//! - [`push`]: images of a blob store to a registry: HEAD before upload, cross-repository
//!   mounts, streamed uploads, the exact local manifest bytes (same digest), tags last.
//!
//! Insecure registries: plain http, or https without certificate verification.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod auth;
mod error;
mod pull;
mod push;
mod reference;
mod session;

pub use auth::{Basic, CredentialSource, Credentials, ResolvedAuth, default_auth_files};
pub use error::{Error, Result};
pub use pull::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, PulledImage, is_index, layer_media_type,
    media_type_of, pull, pull_ref, resolve,
};
pub use push::{PushImage, PushOptions, PushStats, Pushed, push};
pub use reference::{DOCKER_HUB, ImageRef, PushTarget, check_tag};
pub use session::ConnectOptions;

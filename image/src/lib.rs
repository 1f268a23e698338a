//! farm-image: everything farm knows about OCI content, and nothing about scheduling.
//!
//! - [`Digest`]: validated `sha256:<hex>` digests and hashing I/O adapters.
//! - [`BlobStore`]: a content-addressed, create-only blob store over `object_store`
//!   (`file://`, `memory://`, `s3://`, `gs://`, `az://`), laid out like an OCI layout's
//!   `blobs/` directory, with digest verification on read; remote stores retry with
//!   backoff within bounds set by [`StoreOptions`].
//! - [`write_layer_tar`]: a deterministic OCI layer tar from a directory, either an
//!   overlay upper directory (whiteouts and opaque directories become OCI `.wh.` files)
//!   or a whole directory.
//! - [`apply_layer`]: safe extraction of a (plain, gzip or zstd) layer into a directory,
//!   applying OCI whiteouts, never writing outside the target.
//! - [`export_dir`] / [`export_tar_stream`]: the one-pass export pipeline
//!   (tar -> diff_id -> parallel compression -> blob digest -> streaming upload).
//! - [`LayerFormat`], [`make_fs_image`], [`verify_fs_image`], [`extract_fs_image`]:
//!   stacker's squashfs and erofs layer types with dm-verity data (external tools).
//! - [`OciLayout`]: OCI image layout directories (index.json, tags, platform selection)
//!   and [`to_canonical_json`] for byte-reproducible manifests and configs.
//! - [`rechunk`]: a byte stream regrouped into fixed-size pieces, for blob transfers.
//!
//! Nothing here knows about namespaces or scheduling: callers run [`write_layer_tar`]
//! and [`apply_layer`] inside the build's user namespace when ownership matters.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod apply;
mod backend;
mod compress;
mod digest;
mod error;
mod export;
mod fsimage;
mod layout;
mod rechunk;
mod store;
mod tarwrite;
mod transfer;
mod tree;

#[cfg(test)]
mod tests;

pub use apply::{
    ApplyOptions, ApplyStats, DEFAULT_MAX_LAYER_BYTES, DEFAULT_MAX_LAYER_ENTRIES, apply_layer,
};
pub use backend::StoreOptions;
pub use compress::{Compression, Compressor, Format, UnknownCompression, decompress, detect};
pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::{Error, Result};
pub use export::{ExportOptions, ExportedLayer, encode_layer, export_dir, export_tar_stream};
pub use fsimage::{
    DEFAULT_FS_ZSTD_LEVEL, EROFS_MEDIA_TYPE, FS_TOOLS, FsImageError, FsKind, FsMediaType,
    LayerFormat, LayerType, MadeImage, MakeOptions, SQUASHFS_MEDIA_TYPE, Superblock,
    UnknownLayerType, VERITY_ROOT_HASH_ANNOTATION, append_verity, extract_fs_image, find_tool,
    fs_data_size, make_fs_image, strip_overlay_xattrs, superblock, verify_fs_image,
};
pub use layout::{OciLayout, REF_NAME_ANNOTATION, select_platform, to_canonical_json};
pub use rechunk::rechunk;
pub use store::{
    BlobInfo, BlobReader, BlobStore, BlobStream, BlobWriter, ListedBlob, MAX_CONCURRENT_PARTS,
    PART_SIZE, RecentUse, Sweep,
};
pub use tarwrite::{LayerTarOptions, TarStats, write_layer_tar};
pub use tree::{Tree, TreeEntry};

/// Re-export of the `oci-spec` image types used in this crate's API.
pub use oci_spec::image as oci;

//! farm-stackerfile: the stackerfile language, exactly as stacker reads it, and a little
//! stricter where stacker's behaviour was a bug.
//!
//! It reads files (and nothing else), substitutes `${{NAME}}` placeholders, parses and
//! validates every key with `file:line:column` diagnostics, follows
//! `config.prerequisites`, builds the layer DAG with its waves, and gives each layer a
//! canonical definition whose digest is the stackerfile part of the cache key.
//!
//! ```no_run
//! use farm_stackerfile::{LocalFiles, Plan, PlanOptions};
//! let plan = Plan::load("stacker.yaml".as_ref(), &PlanOptions::default(), &LocalFiles)?;
//! for wave in &plan.waves {
//!     for &i in wave {
//!         println!("{}", plan.layers[i].layer.name);
//!     }
//! }
//! # Ok::<(), farm_stackerfile::PlanError>(())
//! ```

pub mod canonical;
pub mod diag;
pub mod inputs;
pub mod load;
pub mod model;
mod oci;
mod parse;
pub mod plan;
pub mod subst;
mod yaml;

pub use canonical::{CanonicalBase, CanonicalImport, CanonicalLayer};
pub use diag::{Diagnostic, Pos, Severity};
pub use inputs::{
    InputKind, LocalInput, common_ancestor, common_dir, is_url, local_inputs, url_of, url_or_path,
};
pub use load::{FileSource, LoadedFile, LocalFiles, PlanError, normalize, too_large};
pub use model::{
    Base, Bind, BindAccess, DEFAULT_PASSTHROUGH, DEFAULT_PATH, Import, Layer, LayerSandbox,
    Network, OverlayDir, Passthrough, Source,
};
pub use oci::{oci_url_parts, split_oci_url};
pub use plan::{DEFAULT_MAX_STACKERFILE_SIZE, Plan, PlanOptions, PlannedLayer};
pub use subst::{SubstitutionInputError, Substitutions};

/// Built-in substitution names stacker defines; farm gives them values for its layout.
pub const BUILTIN_SUBSTITUTIONS: &[&str] = &[
    "STACKER_ROOTFS_DIR",
    "STACKER_STACKER_DIR",
    "STACKER_OCI_DIR",
    "STACKER_WORK_DIR",
];

#[cfg(test)]
mod tests;

//! Why a layer did not build: a kind that decides what happens next, and a message for
//! people.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::image::BuiltImage;

/// How a layer's build ended: its image, or why there is none.
pub type LayerOutcome = Result<BuiltImage, LayerFailure>;

/// What kind of failure, for decisions: a cancelled layer is shown as cancelled and a
/// build that shares it builds it again; a lost worker is retried elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Stopped by `farm cancel` or Ctrl-C.
    Cancelled,
    /// The layer's `run` (or `generate_labels`) exited non-zero or timed out.
    RunFailed,
    /// The worker went away (stopped heartbeating, restarted) too many times.
    WorkerLost,
    /// An input is wrong: a missing or mismatched file, a bad base, an unsupported
    /// combination. Building it again will fail again.
    Input,
    /// Something of the farm's own failed (a store, a worker's pool, a bug).
    Internal,
}

/// A layer that did not build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl LayerFailure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        LayerFailure {
            kind,
            message: message.into(),
        }
    }

    pub fn cancelled() -> Self {
        LayerFailure::new(FailureKind::Cancelled, "cancelled")
    }

    pub fn input(message: impl Into<String>) -> Self {
        LayerFailure::new(FailureKind::Input, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        LayerFailure::new(FailureKind::Internal, message)
    }

    pub fn is_cancelled(&self) -> bool {
        self.kind == FailureKind::Cancelled
    }

    /// The same failure with `note` after its message.
    pub fn note(mut self, note: impl fmt::Display) -> Self {
        self.message = format!("{} {note}", self.message);
        self
    }
}

impl fmt::Display for LayerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LayerFailure {}

mod wire {
    use farm_proto::v1 as pb;

    use super::{FailureKind, LayerFailure};

    impl From<FailureKind> for pb::FailureKind {
        fn from(k: FailureKind) -> Self {
            match k {
                FailureKind::Cancelled => pb::FailureKind::Cancelled,
                FailureKind::RunFailed => pb::FailureKind::RunFailed,
                FailureKind::WorkerLost => pb::FailureKind::WorkerLost,
                FailureKind::Input => pb::FailureKind::Input,
                FailureKind::Internal => pb::FailureKind::Internal,
            }
        }
    }

    impl From<&LayerFailure> for pb::LayerFailure {
        fn from(f: &LayerFailure) -> Self {
            pb::LayerFailure {
                kind: pb::FailureKind::from(f.kind) as i32,
                message: f.message.clone(),
            }
        }
    }

    impl From<&pb::LayerFailure> for LayerFailure {
        /// A kind this side does not know is an internal failure (it still fails).
        fn from(f: &pb::LayerFailure) -> Self {
            let kind = match pb::FailureKind::try_from(f.kind) {
                Ok(pb::FailureKind::Cancelled) => FailureKind::Cancelled,
                Ok(pb::FailureKind::RunFailed) => FailureKind::RunFailed,
                Ok(pb::FailureKind::WorkerLost) => FailureKind::WorkerLost,
                Ok(pb::FailureKind::Input) => FailureKind::Input,
                Ok(pb::FailureKind::Internal | pb::FailureKind::Unspecified) | Err(_) => {
                    FailureKind::Internal
                }
            };
            LayerFailure {
                kind,
                message: f.message.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::v1 as pb;

    #[test]
    fn kinds_survive_the_wire() {
        for kind in [
            FailureKind::Cancelled,
            FailureKind::RunFailed,
            FailureKind::WorkerLost,
            FailureKind::Input,
            FailureKind::Internal,
        ] {
            let f = LayerFailure::new(kind, "why");
            assert_eq!(LayerFailure::from(&pb::LayerFailure::from(&f)), f);
        }
        let unknown = pb::LayerFailure {
            kind: 99,
            message: "new".into(),
        };
        assert_eq!(LayerFailure::from(&unknown).kind, FailureKind::Internal);
    }

    #[test]
    fn a_message_that_says_cancelled_is_not_a_cancel() {
        let f = LayerFailure::new(FailureKind::RunFailed, "cancelled");
        assert!(!f.is_cancelled());
        assert!(LayerFailure::cancelled().is_cancelled());
    }
}

//! The states of builds and layers: one set of words for the state store, the status
//! JSON and the progress display, and their wire enums.

use std::fmt;
use std::str::FromStr;

use farm_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A word that names no state (or a malformed id).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {word:?}")]
pub struct UnknownWord {
    pub what: &'static str,
    pub word: String,
}

macro_rules! word_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, $pb:ty { $($variant:ident => $word:literal, $wire:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownWord { what: $what, word: s.to_string() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for $pb {
            fn from(s: $name) -> Self {
                match s { $($name::$variant => <$pb>::$wire),+ }
            }
        }

        impl From<$name> for i32 {
            fn from(s: $name) -> Self {
                <$pb>::from(s) as i32
            }
        }

        impl $name {
            /// The state a wire value stands for (`None` for one this side does not
            /// know, or the unspecified zero).
            pub fn from_wire(value: i32) -> Option<Self> {
                match <$pb>::try_from(value).ok()? {
                    $(<$pb>::$wire => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

word_enum!(
    /// A build's state, as in the status JSON.
    BuildState, "build state", pb::BuildState {
        Queued => "queued", Queued,
        Running => "running", Running,
        Succeeded => "succeeded", Succeeded,
        Failed => "failed", Failed,
        Cancelled => "cancelled", Cancelled,
    }
);

impl BuildState {
    /// Succeeded, failed or cancelled: nothing more will happen.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded | BuildState::Failed | BuildState::Cancelled
        )
    }
}

word_enum!(
    /// A layer's state, as in the status JSON.
    LayerState, "layer state", pb::LayerState {
        Waiting => "waiting", LayerWaiting,
        Running => "running", LayerRunning,
        Built => "built", LayerBuilt,
        Cached => "cached", LayerCached,
        Failed => "failed", LayerFailed,
        Skipped => "skipped", LayerSkipped,
        Cancelled => "cancelled", LayerCancelled,
    }
);

impl LayerState {
    /// Built, cached, failed, skipped or cancelled.
    pub fn is_finished(self) -> bool {
        !matches!(self, LayerState::Waiting | LayerState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_wire_values_round_trip() {
        for &s in BuildState::ALL {
            assert_eq!(s.as_str().parse::<BuildState>().unwrap(), s);
            assert_eq!(BuildState::from_wire(i32::from(s)), Some(s));
        }
        for &s in LayerState::ALL {
            assert_eq!(s.as_str().parse::<LayerState>().unwrap(), s);
            assert_eq!(LayerState::from_wire(i32::from(s)), Some(s));
        }
        assert_eq!(BuildState::from_wire(0), None);
        assert_eq!(LayerState::from_wire(42), None);
        assert!("done".parse::<BuildState>().is_err());
    }
}

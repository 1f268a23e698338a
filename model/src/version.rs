//! The version of the worker protocol (`Workers.Connect` and the job it carries).

use std::fmt;

/// `major.minor`: a coordinator accepts workers of its own major version only; minor
/// versions add what the other side may ignore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u32,
    pub minor: u32,
}

/// What this build of farm speaks. Major 1 was the unversioned protocol (a worker that
/// sends no version says 0.0); 2 brought typed failures and the versioned `Register`;
/// 2.1 the worker's `Drain` (stop taking work, hand layers back); 2.2 the heartbeat's
/// `live` list (the assignments whose sandbox runs or whose layer is being exported).
pub const PROTOCOL: ProtocolVersion = ProtocolVersion { major: 2, minor: 2 };

impl ProtocolVersion {
    /// Whether a peer speaking `other` can work with this side.
    pub fn compatible(&self, other: &ProtocolVersion) -> bool {
        self.major == other.major
    }

    /// Whether a worker speaking this version names its live assignments in its
    /// heartbeats (2.2): without that, a silent run cannot be told from a stuck one.
    pub fn reports_live(&self) -> bool {
        (self.major, self.minor) >= (2, 2)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

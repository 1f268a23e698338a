//! ChainIDs: the identity of a root filesystem made of a sequence of layers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// An OCI ChainID, `sha256:<64 lowercase hex>` (or `sha512:<128 hex>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainId(String);

/// A string that is not a ChainID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a ChainID (sha256:<64 hex> or sha512:<128 hex>)")]
pub struct InvalidChainId(pub String);

impl ChainId {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<ChainId, InvalidChainId> {
        let ok = match s.split_once(':') {
            Some(("sha256", hex)) => is_hex(hex, 64),
            Some(("sha512", hex)) => is_hex(hex, 128),
            _ => false,
        };
        if ok {
            Ok(ChainId(s.to_owned()))
        } else {
            Err(InvalidChainId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The chain of no layers: the digest of the empty string.
    pub fn empty() -> ChainId {
        ChainId(format!("sha256:{}", hex::encode(Sha256::digest(b""))))
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl fmt::Display for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ChainId {
    type Err = InvalidChainId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChainId::parse(s)
    }
}

impl Serialize for ChainId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChainId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChainId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The ChainID of a sequence of diff_ids (OCI image spec: ChainID(L0) = DiffID(L0),
/// ChainID(L0|..|Ln) = sha256(ChainID(L0|..|Ln-1) + " " + DiffID(Ln))). The empty chain
/// is the digest of the empty string. A diff_id that is not a digest gives an error.
pub fn chain_id<'a>(
    diff_ids: impl IntoIterator<Item = &'a str>,
) -> Result<ChainId, InvalidChainId> {
    let mut chain: Option<String> = None;
    for d in diff_ids {
        chain = Some(match chain {
            None => ChainId::parse(d)?.0,
            Some(c) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{c} {d}").as_bytes()))
            ),
        });
    }
    Ok(chain.map(ChainId).unwrap_or_else(ChainId::empty))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id([a.as_str()]).unwrap().as_str(), a);
        let ab = chain_id([a.as_str(), b.as_str()]).unwrap();
        assert_eq!(
            ab.as_str(),
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
            )
        );
        assert_ne!(chain_id([b.as_str(), a.as_str()]).unwrap(), ab);
        assert_eq!(chain_id([]).unwrap(), ChainId::empty());
        assert!(chain_id(["not-a-digest"]).is_err());
    }

    #[test]
    fn parse_and_serde_reject_what_is_not_a_chain_id() {
        for bad in [
            "",
            "sha256:",
            "sha256:ABC",
            "md5:00",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(ChainId::parse(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<ChainId>(&format!("\"{bad}\"")).is_err());
        }
        let good = format!("sha256:{}", "0".repeat(64));
        let id: ChainId = serde_json::from_str(&format!("\"{good}\"")).unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{good}\""));
    }
}

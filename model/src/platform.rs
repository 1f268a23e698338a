//! The platform an image is for, `os/arch[/variant]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `os/arch[/variant]`, as in OCI image indexes (`linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub arch: String,
    /// e.g. `v8`.
    pub variant: Option<String>,
}

/// A string that is not `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a platform: expected os/arch or os/arch/variant, e.g. linux/amd64")]
pub struct InvalidPlatform(pub String);

impl Platform {
    pub fn new(os: impl Into<String>, arch: impl Into<String>) -> Self {
        Platform {
            os: os.into(),
            arch: arch.into(),
            variant: None,
        }
    }

    /// This machine's platform in OCI terms.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform::new("linux", arch)
    }

    /// The same platform with `os` and/or `arch` replaced (a layer's `os:`/`arch:`).
    pub fn with(&self, os: Option<&str>, arch: Option<&str>) -> Platform {
        match (os, arch) {
            (None, None) => self.clone(),
            (os, arch) => Platform {
                os: os.unwrap_or(&self.os).to_string(),
                arch: arch.unwrap_or(&self.arch).to_string(),
                // A variant belongs to the architecture it was given with.
                variant: if arch.is_some() {
                    None
                } else {
                    self.variant.clone()
                },
            },
        }
    }
}

impl FromStr for Platform {
    type Err = InvalidPlatform;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| valid(p)) {
            return Err(InvalidPlatform(s.to_string()));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            arch: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Serialize for Platform {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Platform {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_os_arch_and_variant() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!((p.os.as_str(), p.arch.as_str()), ("linux", "arm64"));
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            "linux/amd64".parse::<Platform>().unwrap(),
            Platform::new("linux", "amd64")
        );
        for bad in ["", "amd64", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            let e = bad.parse::<Platform>().unwrap_err();
            assert!(e.to_string().contains("os/arch"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_layer_may_replace_os_or_arch() {
        let host: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(host.with(None, None), host);
        assert_eq!(host.with(None, Some("amd64")).to_string(), "linux/amd64");
        assert_eq!(
            host.with(Some("freebsd"), None).to_string(),
            "freebsd/arm64/v8"
        );
    }

    #[test]
    fn travels_as_a_string() {
        let p: Platform = serde_json::from_str("\"linux/amd64\"").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"linux/amd64\"");
        assert!(serde_json::from_str::<Platform>("\"amd64\"").is_err());
    }
}

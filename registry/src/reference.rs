//! `docker://` image references.
//!
//! Accepted forms (the `docker://` prefix is optional):
//! - `docker://host[:port]/repo/path[:tag]`
//! - `docker://host[:port]/repo/path@sha256:<hex>` (and `:tag@sha256:...`, the digest wins)
//! - `docker://repo[:tag]`, `docker://user/repo[:tag]`: Docker Hub (`docker.io`), with
//!   `library/` added to one-component names, as docker and skopeo do.
//!
//! The first path component is a registry when it contains `.` or `:` or is
//! `localhost` (docker's rule). A missing tag means `latest`.

use std::fmt;

use crate::error::Error;

/// The registry Docker Hub images live in.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `host[:port]` (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path inside the registry, e.g. `library/busybox`.
    pub repository: String,
    /// The tag (`latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// `sha256:<hex>` when the reference pins a digest.
    pub digest: Option<String>,
}

fn invalid(input: &str, reason: impl Into<String>) -> Error {
    Error::InvalidReference {
        input: input.to_string(),
        reason: reason.into(),
    }
}

fn valid_component(c: &str) -> bool {
    // distribution's path component: [a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty()
        || !b[0].is_ascii_lowercase() && !b[0].is_ascii_digit()
        || !b[b.len() - 1].is_ascii_lowercase() && !b[b.len() - 1].is_ascii_digit()
    {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        // a separator run
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'))
}

/// Check a tag for use in a reference (pushing).
pub fn check_tag(tag: &str) -> Result<(), Error> {
    if valid_tag(tag) {
        Ok(())
    } else {
        Err(invalid(
            tag,
            "a tag is 1 to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'",
        ))
    }
}

/// Check a repository path (pushing: `ns/<layer name>`).
pub(crate) fn check_repository(input: &str, repo: &str) -> Result<(), Error> {
    if repo.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(invalid(
            input,
            format!(
                "'{repo}' is not a valid repository name (lower-case letters, digits, and \
                 '.', '_', '-' between them, components separated by '/')"
            ),
        ))
    }
}

impl ImageRef {
    /// Parse `docker://...` (see the module documentation).
    pub fn parse(input: &str) -> Result<ImageRef, Error> {
        let s = input.trim();
        let s = s.strip_prefix("docker://").unwrap_or(s);
        if s.is_empty() {
            return Err(invalid(input, "no image name"));
        }
        if s.contains("://") {
            return Err(invalid(
                input,
                "only docker:// references name images in a registry",
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            let Some(hex) = d.strip_prefix("sha256:") else {
                return Err(invalid(input, "the digest must be sha256:<64 hex digits>"));
            };
            if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(input, "the digest must be sha256:<64 hex digits>"));
            }
        }
        let (registry, path) = match rest.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_host(first) {
                    return Err(invalid(input, format!("'{first}' is not a host[:port]")));
                }
                (first.to_string(), remainder)
            }
            _ => (DOCKER_HUB.to_string(), rest),
        };
        // A tag is after the last ':' of the last path component.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match path[last_slash..].rfind(':') {
            Some(i) => (&path[..last_slash + i], Some(&path[last_slash + i + 1..])),
            None => (path, None),
        };
        if repo.is_empty() {
            return Err(invalid(input, "no repository name"));
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(invalid(
                input,
                format!("'{t}' is not a valid tag (letters, digits, '_', '.', '-'; at most 128)"),
            ));
        }
        let mut repository = repo.to_string();
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        check_repository(input, &repository)?;
        if repository.len() > 255 {
            return Err(invalid(input, "the repository name is longer than 255"));
        }
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest: digest.map(|d| d.to_ascii_lowercase()),
        })
    }

    /// The same repository with a digest instead of the tag.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            tag: None,
            ..self.clone()
        }
    }

    /// The same repository with a tag.
    pub fn with_tag(&self, tag: &str) -> ImageRef {
        ImageRef {
            digest: None,
            tag: Some(tag.to_string()),
            ..self.clone()
        }
    }

    /// The reference oci-client uses.
    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.clone(),
            ),
            (Some(t), None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
            ),
            (None, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                "latest".into(),
            ),
        }
    }

    /// `host[:port]` the client connects to (Docker Hub's API host for `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "index.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where `farm publish` / `--push` put images: `docker://host[:port][/namespace]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    /// `host[:port]`.
    pub registry: String,
    /// The namespace images go under (may be empty).
    pub namespace: String,
}

impl PushTarget {
    /// Parse `docker://host[:port][/ns...]`. The registry host is required (pushing to
    /// Docker Hub needs `docker://docker.io/USER`).
    pub fn parse(input: &str) -> Result<PushTarget, Error> {
        let s = input.trim();
        let Some(s) = s.strip_prefix("docker://") else {
            return Err(invalid(
                input,
                "a push URL looks like docker://HOST[:PORT]/NAMESPACE",
            ));
        };
        let s = s.trim_end_matches('/');
        let (host, ns) = s.split_once('/').unwrap_or((s, ""));
        if host.is_empty() || !valid_host(host) {
            return Err(invalid(
                input,
                "a push URL names a registry host: docker://HOST[:PORT]/NAMESPACE",
            ));
        }
        if ns.contains([':', '@']) {
            return Err(invalid(
                input,
                "a push URL has no tag or digest; tags come from --tag/--push-tag",
            ));
        }
        if !ns.is_empty() {
            check_repository(input, ns)?;
        }
        let registry = match host {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            h => h.to_string(),
        };
        Ok(PushTarget {
            registry,
            namespace: ns.to_string(),
        })
    }

    /// `host/ns/<name>:<tag>` (stacker's publish naming).
    pub fn image(&self, name: &str, tag: &str) -> Result<ImageRef, Error> {
        let repository = if self.namespace.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.namespace)
        };
        let shown = format!("{}/{repository}:{tag}", self.registry);
        check_repository(&shown, &repository)?;
        check_tag(tag)?;
        Ok(ImageRef {
            registry: self.registry.clone(),
            repository,
            tag: Some(tag.to_string()),
            digest: None,
        })
    }
}

impl fmt::Display for PushTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "docker://{}", self.registry)
        } else {
            write!(f, "docker://{}/{}", self.registry, self.namespace)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn hosts_ports_tags_digests() {
        let r = p("docker://127.0.0.1:5000/busybox:latest");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "127.0.0.1:5000/busybox:latest");

        let r = p("docker://registry.example.com/a/b/c");
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "a/b/c");
        assert_eq!(r.tag.as_deref(), Some("latest"), "no tag means latest");

        let r = p(&format!("docker://localhost/x@{D}"));
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.to_oci().digest(), Some(D));

        let r = p(&format!("docker://h.io:443/x:v1.2@{D}"));
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.to_oci().digest(), Some(D), "the digest wins");
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("docker://busybox");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", Some("latest"))
        );
        let r = p("docker://ubuntu:22.04");
        assert_eq!(r.repository, "library/ubuntu");
        assert_eq!(r.tag.as_deref(), Some("22.04"));
        let r = p("docker://someone/tool:1");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "someone/tool");
        let r = p("docker://index.docker.io/library/alpine:3");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.api_host(), "index.docker.io");
        // no prefix is accepted too
        assert_eq!(p("alpine").repository, "library/alpine");
    }

    #[test]
    fn bad_references_are_errors_not_panics() {
        for bad in [
            "",
            "docker://",
            "docker://UPPER/case",
            "docker://host.io/",
            "docker://host.io/x:",
            "docker://host.io/x:bad tag",
            "docker://host.io/x@sha256:abc",
            "docker://host.io/x@md5:0123",
            "docker://host.io:99999/x",
            "https://host.io/x",
            "docker://host.io/a//b",
            "docker://host.io/-a",
            "docker://h.io/x:.dot",
        ] {
            let e = ImageRef::parse(bad).expect_err(bad);
            assert!(matches!(e, Error::InvalidReference { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn push_targets_use_stacker_naming() {
        let t = PushTarget::parse("docker://127.0.0.1:5000/farm/ns").unwrap();
        assert_eq!(t.registry, "127.0.0.1:5000");
        assert_eq!(t.namespace, "farm/ns");
        assert_eq!(
            t.image("app", "v1").unwrap().to_string(),
            "127.0.0.1:5000/farm/ns/app:v1"
        );
        let t = PushTarget::parse("docker://localhost:5000").unwrap();
        assert_eq!(
            t.image("app", "latest").unwrap().to_string(),
            "localhost:5000/app:latest"
        );
        assert!(PushTarget::parse("localhost:5000/x").is_err());
        assert!(PushTarget::parse("docker://h.io/x:tag").is_err());
        assert!(PushTarget::parse("docker:///x").is_err());
        assert!(t.image("Bad", "latest").is_err());
        assert!(t.image("ok", "-bad").is_err());
    }
}

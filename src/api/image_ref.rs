//! Image references as people write them (`alpine:3.20`, `docker.io/library/alpine`,
//! `ghcr.io/org/app:1.4`, `registry.local:5000/x@sha256:...`), normalised the way
//! docker and containerd do: the first component is a registry only when it looks like a
//! host (has a `.` or `:`, or is `localhost`); otherwise the image is on Docker Hub, where
//! single names live under `library/`. No tag means `latest`.

use super::docker_hub;
use crate::oci::digest::DigestError;
use crate::oci::reference::{ReferenceError, validate_repository, validate_tag};
use crate::oci::{Digest, Reference};
use std::fmt;

/// Why a text is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {image:?}: {cause}")]
pub struct ImageRefError {
    /// The text.
    pub image: String,
    /// What is wrong with it.
    pub cause: ImageRefCause,
}

/// What is wrong with an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefCause {
    /// The part after `@`.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// The repository or the tag.
    #[error(transparent)]
    Name(#[from] ReferenceError),
}

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host (Docker Hub aliases folded into `docker.io`), lowercase.
    pub registry: String,
    /// Repository as the registry knows it.
    pub repository: String,
    /// Tag or digest (a digest wins when both are given).
    pub reference: Reference,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.registry, self.repository),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.registry, self.repository),
        }
    }
}

/// Whether `s` writes a tag or a digest (`alpine:3.20`, `x@sha256:...`), not only a
/// repository (`alpine`, `registry.local:5000/team/app`).
pub fn names_reference(s: &str) -> bool {
    s.contains('@') || s.rsplit('/').next().is_some_and(|last| last.contains(':'))
}

/// Parses and normalises an image reference.
pub fn parse(s: &str) -> Result<ImageRef, ImageRefError> {
    let bad = |cause: ImageRefCause| ImageRefError {
        image: s.to_string(),
        cause,
    };
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| bad(e.into()))?)),
        None => (s, None),
    };
    let (registry, path) = match rest.split_once('/') {
        Some((first, path)) if looks_like_registry(first) => (first.to_ascii_lowercase(), path),
        _ => (docker_hub::REGISTRY.to_string(), rest),
    };
    // A tag follows the last ':' after the last '/'.
    let last_slash = path.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match path[last_slash..].rfind(':') {
        Some(i) => (&path[..last_slash + i], Some(&path[last_slash + i + 1..])),
        None => (path, None),
    };
    let registry = if docker_hub::is_alias(&registry) {
        docker_hub::REGISTRY.to_string()
    } else {
        registry
    };
    let repository = if registry == docker_hub::REGISTRY {
        docker_hub::repository(repository)
    } else {
        repository.to_string()
    };
    validate_repository(&repository).map_err(|e| bad(e.into()))?;
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d),
        (None, Some(t)) => {
            validate_tag(t).map_err(|e| bad(e.into()))?;
            Reference::Tag(t.to_string())
        }
        (None, None) => Reference::Tag("latest".into()),
    };
    Ok(ImageRef {
        registry,
        repository,
        reference,
    })
}

/// Whether the first component of a name is a registry rather than a Docker Hub
/// namespace, as docker and containerd decide: it has a `.` or a `:`, or is `localhost`.
/// Paths through the proxy (`/v2/ghcr.io/org/app/...`) are read by the same rule.
pub fn looks_like_registry(first: &str) -> bool {
    first.contains(['.', ':']) || first.eq_ignore_ascii_case("localhost")
}

/// `registry` as the first component of a path through a mirror
/// (`<mirror>/registry.local_5000/team/app`): its port written `_port`, since image
/// references allow no `:` after their first component and no host name has a `_`.
/// [`registry_from_path`] reads it back.
pub fn registry_in_path(registry: &str) -> String {
    registry.replace(':', "_")
}

/// The registry a path's first component names, as [`registry_in_path`] wrote it:
/// `registry.local_5000` is `registry.local:5000`; anything else stands as it is.
pub fn registry_from_path(first: &str) -> std::borrow::Cow<'_, str> {
    match first.rsplit_once('_') {
        Some((host, port))
            if !first.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            std::borrow::Cow::Owned(format!("{host}:{port}"))
        }
        _ => std::borrow::Cow::Borrowed(first),
    }
}

/// Whether `h` is a registry host as image references write it: DNS labels (letters,
/// digits, `-`) joined by dots, with an optional `:port`.
pub fn valid_registry_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let r = parse("alpine").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            parse("docker.io/library/alpine:3.20").unwrap().to_string(),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(
            parse("index.docker.io/bitnami/redis:7")
                .unwrap()
                .to_string(),
            "docker.io/bitnami/redis:7"
        );
        assert_eq!(parse("ghcr.io/org/app:1.4").unwrap().registry, "ghcr.io");
        let local = parse("localhost:5000/team/app").unwrap();
        assert_eq!(
            (local.registry.as_str(), local.repository.as_str()),
            ("localhost:5000", "team/app")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let pinned = parse(&format!("quay.io/x/y:1@{d}")).unwrap();
        assert_eq!(pinned.reference, Reference::Digest(d.parse().unwrap()));
        assert_eq!(
            parse("127.0.0.1:5000/a/b:c").unwrap().registry,
            "127.0.0.1:5000"
        );
    }

    #[test]
    fn a_port_is_spelled_in_a_path_and_read_back() {
        assert_eq!(
            registry_in_path("registry.local:5000"),
            "registry.local_5000"
        );
        assert_eq!(registry_in_path("docker.io"), "docker.io");
        assert_eq!(
            registry_from_path("registry.local_5000"),
            "registry.local:5000"
        );
        for stands in ["ghcr.io", "registry.local_", "registry.local_50a", "a:1_2"] {
            assert_eq!(registry_from_path(stands), stands);
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "UPPER/x",
            "a/../b",
            "x:",
            "x@sha256:12",
            "ghcr.io/",
            "a b",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! Repository names and manifest references (tag or digest), validated by the grammar of the
//! OCI Distribution spec. A validated name or tag can never contain `..`, a leading `/`, or
//! any byte outside a small ASCII set, so it is safe in URLs and logs.

use super::digest::{Digest, DigestError};
use std::fmt;

/// Longest repository name accepted (the Distribution registry's limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted (spec: 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// Why a name or reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Repository name outside the spec's grammar.
    #[error("invalid repository name: {0}")]
    Name(&'static str),
    /// Tag outside `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    #[error("invalid tag: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag,
    /// Malformed digest.
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
}

/// Checks a repository name against
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_repository(name: &str) -> Result<(), ReferenceError> {
    if name.is_empty() {
        return Err(ReferenceError::Name("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ReferenceError::Name("longer than 255 characters"));
    }
    for component in name.split('/') {
        validate_component(component)?;
    }
    Ok(())
}

fn validate_component(c: &str) -> Result<(), ReferenceError> {
    let bytes = c.as_bytes();
    if bytes.is_empty() {
        return Err(ReferenceError::Name("empty path component"));
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(ReferenceError::Name(
            "components must start and end with [a-z0-9]",
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        match b {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err(ReferenceError::Name("only [a-z0-9._-] are allowed")),
        }
        if i >= bytes.len() || !alnum(bytes[i]) || i == start {
            return Err(ReferenceError::Name("separators must sit between [a-z0-9]"));
        }
    }
    Ok(())
}

/// Checks a tag against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if b.is_empty() || b.len() > MAX_TAG_LEN || !word(b[0]) {
        return Err(ReferenceError::Tag);
    }
    if !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(ReferenceError::Tag);
    }
    Ok(())
}

/// A manifest reference: a tag, or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    /// Mutable name, resolved through the upstream.
    Tag(String),
    /// Immutable content address.
    Digest(Digest),
}

impl Reference {
    /// Parses a reference from a URL path segment: a digest when it contains `:`.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            validate_tag(s)?;
            Ok(Reference::Tag(s.to_string()))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/my__app",
            "a.b/c_d/e---f",
            "0/1",
        ] {
            validate_repository(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "/alpine",
            "alpine/",
            "a//b",
            "..",
            "a/../b",
            "a/./b",
            "Alpine",
            "a___b",
            "a_-b",
            "-a",
            "a.",
            "a%2f..",
            "a b",
            "a\\b",
            long.as_str(),
        ] {
            assert!(
                validate_repository(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn tags_and_digests() {
        assert_eq!(
            Reference::parse("3.20").unwrap(),
            Reference::Tag("3.20".into())
        );
        assert!(Reference::parse("_x-Y.z").is_ok());
        assert!(Reference::parse(".hidden").is_err());
        assert!(Reference::parse("..").is_err());
        assert!(Reference::parse("-x").is_err());
        assert!(Reference::parse(&"t".repeat(129)).is_err());
        assert!(Reference::parse(&"t".repeat(128)).is_ok());
        assert!(Reference::parse("sha256:1234").is_err());
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(
            Reference::parse(&d).unwrap(),
            Reference::Digest(_)
        ));
    }
}

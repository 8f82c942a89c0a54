//! The registry API's requests as they are written: the path (`/v2/<name>/...`, where
//! `<name>` may start with a registry: `/v2/ghcr.io/org/app/...`) parsed and validated
//! before anything is looked up, the query's `ns` apart from what is passed
//! on, and the escapes of paths, queries and forms.

use crate::api::image_ref::valid_registry_host;
use crate::oci::reference::validate_repository;
use crate::oci::{Digest, Reference};
use crate::proxy::error::ProxyError;

/// A parsed distribution API path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest(String, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(String, Digest),
    /// `/v2/<name>/tags/list`
    Tags(String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(String, Digest),
}

/// Parses and validates a request path. Nothing is looked up before this succeeds.
/// Escapes are decoded per segment, so an escaped `/` can never change the path's shape.
pub fn parse_route(raw_path: &str) -> Result<Route, ProxyError> {
    let rest = match raw_path.strip_prefix("/v2") {
        Some("") | Some("/") => return Ok(Route::Base),
        Some(r) => r.strip_prefix('/').ok_or(ProxyError::NotFound)?,
        None => return Err(ProxyError::NotFound),
    };
    let segments: Vec<String> = rest
        .split('/')
        .map(percent_decode)
        .collect::<Option<_>>()
        .ok_or_else(|| ProxyError::NameInvalid("path is not valid UTF-8".into()))?;
    let n = segments.len();
    if n < 3 {
        return Err(ProxyError::NotFound);
    }
    let name_of = |parts: &[String]| -> Result<String, ProxyError> {
        if parts.iter().any(|p| p.contains('/')) {
            return Err(ProxyError::NameInvalid(
                "invalid repository name: escaped '/' in a path component".into(),
            ));
        }
        let name = parts.join("/");
        match validate_repository(&name) {
            Ok(()) => Ok(name),
            // A registry with a port ahead of the repository (`/v2/registry.local:5000/
            // team/app/...`): a name only as the prefix that chooses an upstream.
            Err(_) if with_port_prefix(parts) => Ok(name),
            Err(e) => Err(ProxyError::NameInvalid(e.to_string())),
        }
    };
    let digest = |s: &str| -> Result<Digest, ProxyError> {
        s.parse()
            .map_err(|e: crate::oci::DigestError| ProxyError::DigestInvalid(e.to_string()))
    };
    let (endpoint, last) = (segments[n - 2].as_str(), segments[n - 1].as_str());
    let name_parts = &segments[..n - 2];
    match (endpoint, last) {
        ("tags", "list") => Ok(Route::Tags(name_of(name_parts)?)),
        ("manifests", reference) => {
            let name = name_of(name_parts)?;
            let reference = Reference::parse(reference).map_err(|e| match e {
                crate::oci::ReferenceError::Digest(d) => ProxyError::DigestInvalid(d.to_string()),
                other => ProxyError::ReferenceInvalid(other.to_string()),
            })?;
            Ok(Route::Manifest(name, reference))
        }
        ("blobs", d) => Ok(Route::Blob(name_of(name_parts)?, digest(d)?)),
        ("referrers", d) => Ok(Route::Referrers(name_of(name_parts)?, digest(d)?)),
        _ => Err(ProxyError::NotFound),
    }
}

/// Whether `parts` are a registry host with a port, then a valid repository.
fn with_port_prefix(parts: &[String]) -> bool {
    match parts {
        [first, rest @ ..] if !rest.is_empty() && first.contains(':') => {
            valid_registry_host(first) && validate_repository(&rest.join("/")).is_ok()
        }
        _ => false,
    }
}

/// Decodes `%XX` escapes; `None` when the result is not UTF-8 or an escape is broken.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query's `ns` and the rest of it, which is forwarded upstream. An `ns` that does
/// not decode, or more than one, is refused: the request is for no registry in
/// particular, and must not fall to the default one.
pub fn split_query(query: Option<&str>) -> Result<(Option<String>, Option<String>), ProxyError> {
    let Some(q) = query else {
        return Ok((None, None));
    };
    let mut ns = None;
    let mut rest = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ns", v)) => {
                let bad = |why| ProxyError::NameInvalid(format!("the ns parameter {why}"));
                let decoded = percent_decode(v).ok_or_else(|| bad("is not a valid escape"))?;
                if ns.replace(decoded).is_some() {
                    return Err(bad("is given more than once"));
                }
            }
            _ => rest.push(pair),
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    Ok((ns, rest))
}

/// Decodes a form or query value: `+` is a space, then `%XX` escapes.
pub fn form_decode(s: &str) -> Option<String> {
    percent_decode(&s.replace('+', " "))
}

/// Appends the decoded `key=value` pairs of a query or form to `params`.
pub fn form_pairs(text: &str, params: &mut Vec<(String, String)>) -> Result<(), ProxyError> {
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (form_decode(k), form_decode(v)) {
            (Some(k), Some(v)) => params.push((k, v)),
            _ => {
                return Err(ProxyError::TokenRequest(
                    "a parameter is not a valid escape".into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/").unwrap(), Route::Base);
        assert_eq!(parse_route("/v2").unwrap(), Route::Base);
        assert_eq!(
            parse_route("/v2/library/alpine/manifests/3.20").unwrap(),
            Route::Manifest("library/alpine".into(), Reference::Tag("3.20".into()))
        );
        assert!(matches!(
            parse_route(&format!("/v2/a/manifests/blobs/{}", d())).unwrap(),
            Route::Blob(n, _) if n == "a/manifests"
        ));
        assert!(matches!(
            parse_route(&format!("/v2/a/b/blobs/{}", d())).unwrap(),
            Route::Blob(..)
        ));
        assert!(matches!(
            parse_route(&format!("/v2/a/manifests/{}", d().replace(':', "%3A"))).unwrap(),
            Route::Manifest(_, Reference::Digest(_))
        ));
        assert_eq!(
            parse_route("/v2/a/b/tags/list").unwrap(),
            Route::Tags("a/b".into())
        );
        assert!(matches!(
            parse_route(&format!("/v2/a/referrers/{}", d())).unwrap(),
            Route::Referrers(..)
        ));
        // A registry with a port may lead the name, to choose the upstream.
        assert_eq!(
            parse_route("/v2/registry.local:5000/team/app/tags/list").unwrap(),
            Route::Tags("registry.local:5000/team/app".into())
        );
    }

    #[test]
    fn bad_paths_are_refused_with_the_right_code() {
        use crate::oci::ErrorCode::*;
        let code = |p: &str| parse_route(p).unwrap_err().code_and_status().0;
        assert_eq!(code("/v2/../etc/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a/%2e%2e/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/Upper/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a/manifests/..."), ManifestUnknown);
        assert_eq!(code("/v2/a/blobs/sha256:zz"), DigestInvalid);
        assert_eq!(code("/v2/a/blobs/latest"), DigestInvalid);
        assert_eq!(code("/v2/a/manifests/md5:00"), DigestInvalid);
        assert_eq!(code("/v2/a/uploads/x"), NameUnknown);
        assert_eq!(code("/other"), NameUnknown);
        assert_eq!(code("/v2/registry.local:5000/tags/list"), NameInvalid);
        assert_eq!(code("/v2/a:b:c/x/tags/list"), NameInvalid);
        assert_eq!(code("/v2/x/registry.local:5000/tags/list"), NameInvalid);
        assert_eq!(code("/v2/registry.local:5000/Team/tags/list"), NameInvalid);
        assert_eq!(code("/v2/a/%ff/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a%2fb/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a/blobs/sha256:..%2f..%2fetc"), DigestInvalid);
    }

    #[test]
    fn query_split() {
        assert_eq!(
            split_query(Some("ns=docker.io&n=10&last=b")).unwrap(),
            (Some("docker.io".into()), Some("n=10&last=b".into()))
        );
        assert_eq!(
            split_query(Some("ns=ghcr.io")).unwrap(),
            (Some("ghcr.io".into()), None)
        );
        assert_eq!(split_query(None).unwrap(), (None, None));
        assert!(split_query(Some("ns=%zz")).is_err());
        assert!(split_query(Some("ns=docker.io&ns=ghcr.io")).is_err());
    }
}

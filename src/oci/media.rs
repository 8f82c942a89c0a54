//! Manifest media types, what a client's `Accept` allows, and the `Accept` header the
//! cache sends upstream.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list (multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest type the cache stores. Asking upstream for all of them means one cached
/// object serves every client, whatever it accepts (as the Distribution proxy does).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The manifest media types a client accepts, from its `Accept` headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accept {
    /// No `Accept`, a wildcard, or every type the cache stores.
    Any,
    /// Only these (lowercase, without parameters).
    Only(Vec<String>),
}

impl Accept {
    /// Parses every `Accept` header value (`type/subtype;q=...`, comma-separated). A
    /// wildcard accepts anything; `q=0` excludes its type; parameters are ignored.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Accept {
        let mut types = Vec::new();
        for item in values.into_iter().flat_map(|v| v.split(',')) {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f32>() == Ok(0.0)
                })
            });
            if media.is_empty() || refused {
                continue;
            }
            if media == "*/*" || media == "application/*" {
                return Accept::Any;
            }
            types.push(media);
        }
        let stored = MANIFEST_ACCEPT.split(", ");
        if types.is_empty() || stored.clone().all(|t| types.iter().any(|a| a == t)) {
            return Accept::Any;
        }
        Accept::Only(types)
    }

    /// Whether a manifest of `media_type` may be served.
    pub fn allows(&self, media_type: &str) -> bool {
        match self {
            Accept::Any => true,
            Accept::Only(types) => types.iter().any(|t| t.eq_ignore_ascii_case(media_type)),
        }
    }

    /// The `Accept` header to send upstream: every stored type for [`Accept::Any`] (one
    /// cached object then serves every client), else the client's own list.
    pub fn upstream_header(&self) -> String {
        match self {
            Accept::Any => MANIFEST_ACCEPT.to_string(),
            Accept::Only(types) => types.join(", "),
        }
    }
}

/// Why an upstream answer cannot be a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAManifest(String);

/// Picks the media type of a manifest: the upstream's `Content-Type` when it names one,
/// else the document's own `mediaType` field, else OCI manifest. An answer that is not a
/// manifest (an HTML error page served with 200, say) is refused: the body must be a JSON
/// object with a `schemaVersion`, and a declared type must be a JSON one.
pub fn manifest_media_type(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<String, NotAManifest> {
    let declared = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| !c.is_empty() && c != "application/octet-stream");
    if let Some(c) = &declared
        && !(c.starts_with("application/") && c.ends_with("json"))
    {
        return Err(NotAManifest(format!(
            "the upstream answered with {c}, not a manifest"
        )));
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u64>,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe = match serde_json::from_slice::<Probe>(body) {
        Ok(p) if p.schema_version.is_some() => p,
        Ok(_) => {
            return Err(NotAManifest(
                "the upstream's answer has no schemaVersion".into(),
            ));
        }
        Err(e) => {
            return Err(NotAManifest(format!(
                "the upstream's answer is not a JSON manifest: {e}"
            )));
        }
    };
    Ok(match (declared, probe) {
        (Some(c), _) if c != "application/json" => c,
        (
            _,
            Probe {
                media_type: Some(m),
                ..
            },
        ) => m,
        (
            _,
            Probe {
                manifests: Some(_), ..
            },
        ) => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_from_header_then_body() {
        let mt = |c, b: &[u8]| manifest_media_type(c, b).unwrap();
        assert_eq!(
            mt(Some(DOCKER_MANIFEST), br#"{"schemaVersion":2}"#),
            DOCKER_MANIFEST
        );
        assert_eq!(
            mt(
                Some("application/json; charset=utf-8"),
                br#"{"schemaVersion":2,"manifests":[]}"#
            ),
            OCI_INDEX
        );
        assert_eq!(
            mt(
                None,
                br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#
            ),
            DOCKER_MANIFEST_LIST
        );
        assert_eq!(mt(None, br#"{"schemaVersion":2}"#), OCI_MANIFEST);
    }

    #[test]
    fn answers_that_are_not_manifests_are_refused() {
        let html = b"<html>rate limited</html>";
        assert!(manifest_media_type(Some("text/html; charset=utf-8"), html).is_err());
        assert!(manifest_media_type(Some("text/html"), br#"{"schemaVersion":2}"#).is_err());
        assert!(manifest_media_type(None, html).is_err());
        assert!(manifest_media_type(Some("application/json"), b"{}").is_err());
        assert!(manifest_media_type(None, b"[2]").is_err());
    }

    #[test]
    fn accept_headers() {
        assert_eq!(Accept::parse([]), Accept::Any);
        assert_eq!(Accept::parse(["*/*"]), Accept::Any);
        assert_eq!(Accept::parse([MANIFEST_ACCEPT]), Accept::Any);
        let docker = Accept::parse([DOCKER_MANIFEST]);
        assert!(docker.allows(DOCKER_MANIFEST) && !docker.allows(OCI_INDEX));
        assert_eq!(docker.upstream_header(), DOCKER_MANIFEST);
        // Several headers, parameters, q=0 and case.
        let a = Accept::parse([
            "Application/VND.oci.image.manifest.v1+json; q=0.5",
            &format!("{OCI_INDEX};q=0, {DOCKER_MANIFEST}"),
        ]);
        assert!(a.allows(OCI_MANIFEST) && a.allows(DOCKER_MANIFEST) && !a.allows(OCI_INDEX));
        assert_eq!(Accept::parse(["text/html, */*;q=0.8"]), Accept::Any);
    }
}

//! Manifest media types and the `Accept` header the cache sends upstream.

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

/// Picks the media type of a manifest: the upstream's `Content-Type` when it names a
/// manifest type, else the document's own `mediaType` field, else OCI manifest.
pub fn manifest_media_type(content_type: Option<&str>, body: &[u8]) -> String {
    let declared = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    if let Some(c) = declared {
        return c.to_string();
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Probe {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_from_header_then_body() {
        assert_eq!(
            manifest_media_type(Some(DOCKER_MANIFEST), b"{}"),
            DOCKER_MANIFEST
        );
        assert_eq!(
            manifest_media_type(
                Some("application/json; charset=utf-8"),
                br#"{"manifests":[]}"#
            ),
            OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(
                None,
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#
            ),
            DOCKER_MANIFEST_LIST
        );
        assert_eq!(manifest_media_type(None, b"not json"), OCI_MANIFEST);
    }
}

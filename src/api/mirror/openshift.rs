//! The `ImageDigestMirrorSet` and `ImageTagMirrorSet` that point an OpenShift cluster's
//! nodes at a mirror, where the node agent is not wanted: the Machine Config Operator
//! writes them into every node's registries.conf (docs/node-agent.md, "OpenShift"). Each
//! registry the mirror serves is mirrored by path, as the agent's own drop-in does it.

use super::{RegistryMirror, endpoint_location, registry_key};
use crate::api::image_ref::registry_in_path;
use kube::ResourceExt;
use serde_json::json;

/// Why a mirror cannot be written as mirror sets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorSetsError {
    /// No `status.endpoint` yet: nothing to point the nodes at.
    #[error(
        "RegistryMirror {0} has no status.endpoint yet: wait until it is Ready (kubectl get registrymirror)"
    )]
    NoEndpoint(String),
}

/// The two objects, as one YAML stream: for each registry the mirror serves (its
/// `status.servedRegistries`, or every upstream of its spec when the status has no list),
/// the mirror `<endpoint host:port>/<registry>` with the registry as the fallback
/// (`AllowContactingSource`). A plain-HTTP endpoint is named in a comment: OpenShift also
/// needs it in `spec.registrySources.insecureRegistries` of `image.config.openshift.io`.
pub fn mirror_sets(mirror: &RegistryMirror) -> Result<String, MirrorSetsError> {
    let key = format!(
        "{}/{}",
        mirror.namespace().unwrap_or_default(),
        mirror.name_any()
    );
    let status = mirror.status.as_ref();
    let endpoint = status
        .and_then(|s| s.endpoint.as_deref())
        .ok_or_else(|| MirrorSetsError::NoEndpoint(key.clone()))?;
    let (host, plain) = endpoint_location(endpoint);
    let served = status
        .map(|s| s.served_registries.clone())
        .unwrap_or_default();
    let mut registries: Vec<String> = mirror
        .spec
        .upstreams
        .iter()
        .map(|u| registry_key(&u.registry))
        .filter(|r| served.is_empty() || served.contains(r))
        .collect();
    registries.dedup();
    let entries = |field: &str| {
        let list: Vec<_> = registries
            .iter()
            .map(|r| {
                json!({
                    "source": r,
                    "mirrors": [format!("{host}/{}", registry_in_path(r))],
                    "mirrorSourcePolicy": "AllowContactingSource",
                })
            })
            .collect();
        json!({ field: list })
    };
    let name = format!(
        "pullthrough-{}-{}",
        mirror.namespace().unwrap_or_default(),
        mirror.name_any()
    );
    let object = |kind: &str, field: &str| {
        json!({
            "apiVersion": "config.openshift.io/v1",
            "kind": kind,
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "pullthrough"}},
            "spec": entries(field),
        })
    };
    let yaml = |v: serde_json::Value| serde_yaml::to_string(&v).expect("JSON values serialize");
    let mut out =
        format!("# The nodes of an OpenShift cluster pull through RegistryMirror {key}.\n");
    if plain {
        out.push_str(&format!(
            "# {host} serves plain HTTP: add it to spec.registrySources.insecureRegistries of\n\
             # image.config.openshift.io/cluster too.\n"
        ));
    }
    out.push_str("---\n");
    out.push_str(&yaml(object("ImageDigestMirrorSet", "imageDigestMirrors")));
    out.push_str("---\n");
    out.push_str(&yaml(object("ImageTagMirrorSet", "imageTagMirrors")));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::mirror::{RegistryMirrorSpec, RegistryMirrorStatus};

    fn mirror(endpoint: Option<&str>, served: &[&str]) -> RegistryMirror {
        let spec: RegistryMirrorSpec = serde_yaml::from_str(
            "upstreams: [{registry: index.docker.io}, {registry: ghcr.io}, {registry: registry.local:5000}]",
        )
        .unwrap();
        let mut m = RegistryMirror::new("public", spec);
        m.metadata.namespace = Some("pullthrough-system".into());
        m.status = Some(RegistryMirrorStatus {
            endpoint: endpoint.map(str::to_string),
            served_registries: served.iter().map(|s| s.to_string()).collect(),
            ..RegistryMirrorStatus::default()
        });
        m
    }

    #[test]
    fn each_served_registry_is_mirrored_by_path_with_the_source_as_fallback() {
        let text = mirror_sets(&mirror(Some("http://10.96.12.7:5000"), &[])).unwrap();
        assert!(text.contains("insecureRegistries"), "{text}");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|d: &serde_yaml::Value| !d.is_null())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["kind"], "ImageDigestMirrorSet");
        assert_eq!(docs[1]["kind"], "ImageTagMirrorSet");
        assert_eq!(
            docs[0]["metadata"]["name"],
            "pullthrough-pullthrough-system-public"
        );
        let digests = docs[0]["spec"]["imageDigestMirrors"].as_sequence().unwrap();
        assert_eq!(digests.len(), 3);
        assert_eq!(digests[0]["source"], "docker.io");
        assert_eq!(digests[0]["mirrors"][0], "10.96.12.7:5000/docker.io");
        assert_eq!(digests[0]["mirrorSourcePolicy"], "AllowContactingSource");
        assert_eq!(
            digests[2]["mirrors"][0],
            "10.96.12.7:5000/registry.local_5000"
        );
        assert_eq!(
            docs[1]["spec"]["imageTagMirrors"],
            docs[0]["spec"]["imageDigestMirrors"]
        );
        // Only what the controller says the mirror serves; HTTPS needs no insecure entry.
        let text = mirror_sets(&mirror(Some("https://m.example:443"), &["ghcr.io"])).unwrap();
        assert!(!text.contains("insecureRegistries"));
        assert!(text.contains("m.example:443/ghcr.io") && !text.contains("docker.io"));
        // Not Ready yet: said in one line.
        let e = mirror_sets(&mirror(None, &[])).unwrap_err();
        assert!(e.to_string().contains("no status.endpoint yet"), "{e}");
    }
}

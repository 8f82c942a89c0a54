//! `spec.rewrite`: for clusters whose nodes no one may configure, the controller's
//! admission webhook rewrites pod images of the mirror's registries to an address the
//! nodes reach it at (docs/rewrite.md). This file holds the resource's part of it: the
//! spec and status types, the names pods are marked with, and the rewritten reference.

use super::{PROXY_PORT, RegistryMirror};
use crate::api::image_ref::{ImageRef, registry_in_path};
use crate::oci::Reference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The port of the node-local entry point when the spec names none.
pub const DEFAULT_ENTRY_POINT_PORT: u16 = 5001;

/// Label of every pod the webhook rewrote (`"true"`): `kubectl get pods -l
/// pullthrough.dev/rewritten`.
pub const REWRITTEN_LABEL: &str = "pullthrough.dev/rewritten";
/// Annotation of a rewritten pod: its containers' images before the rewrite, a JSON
/// object from container name to image.
pub const ORIGINAL_IMAGES: &str = "pullthrough.dev/original-images";
/// Annotation of a rewritten pod: the mirror (`namespace/name`) its images go through.
pub const REWRITTEN_BY: &str = "pullthrough.dev/rewritten-by";
/// Annotation of a pod the webhook saw and left alone on purpose, though it has images
/// of a rewriting mirror: why (`mirror-not-ready`, `private-images`, `owner-compares-images`).
pub const NOT_REWRITTEN: &str = "pullthrough.dev/not-rewritten";
/// Annotation by which a pod (or a workload's pod template) opts out: `"false"`.
pub const OPT_OUT: &str = "pullthrough.dev/rewrite";

/// Which pods get their images rewritten to the mirror, and where nodes reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(cel, validation = Rule::new("!(has(self.address) && has(self.entryPoint))").message("set either address (nodes reach the mirror there) or entryPoint (a node-local relay), not both"))]
pub struct RewriteSpec {
    /// The namespaces whose pods are rewritten (their labels); every namespace when unset.
    /// `kube-system` and the mirror's own namespace are left out unless
    /// `includeSystemNamespaces` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The pods rewritten (their labels); every pod when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_selector: Option<LabelSelector>,
    /// Namespaces whose pods are never rewritten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_namespaces: Vec<String>,
    /// Images never rewritten: globs over the whole reference as the webhook reads it
    /// (`docker.io/library/postgres:*`, `ghcr.io/org/*`; `*` matches anything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_images: Vec<String>,
    /// Rewrite pods of `kube-system` and of the mirror's own namespace too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_system_namespaces: bool,
    /// The node-local entry point (the default when `address` is unset): a DaemonSet
    /// relaying `127.0.0.1:<port>` on every node to the mirror's Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<EntryPointSpec>,
    /// Where nodes reach the mirror instead (`host[:port]` of an Ingress or a
    /// LoadBalancer serving HTTPS with a certificate the nodes trust): no entry point runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?(:[0-9]{1,5})?$"))]
    pub address: Option<String>,
}

/// The node-local entry point.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntryPointSpec {
    /// The port on each node's loopback (default 5001); one per rewriting mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
}

/// What the rewrite does now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewriteStatus {
    /// Whether new pods are rewritten now: the mirror is Ready and nodes can reach it.
    pub active: bool,
    /// Why not, or what is rewritten.
    pub message: String,
    /// Where rewritten images point (`127.0.0.1:5001`).
    pub address: String,
    /// Since when the mirror rewrites: pods older than this are not counted as missed.
    #[serde(default)]
    pub since: Option<Time>,
    /// Entry point pods ready (with the node-local entry point).
    #[serde(default)]
    pub entry_points_ready: i32,
    /// Entry point pods wanted (one per node it may run on).
    #[serde(default)]
    pub entry_points_desired: i32,
    /// Pods in the rewrite's scope running now that the webhook never answered for (it
    /// was down or too slow, and the API server let them in unrewritten).
    #[serde(default)]
    pub missed_pods: i32,
}

impl RewriteSpec {
    /// The port of the node-local entry point.
    pub fn entry_point_port(&self) -> u16 {
        self.entry_point
            .as_ref()
            .and_then(|e| e.port)
            .unwrap_or(DEFAULT_ENTRY_POINT_PORT)
    }

    /// Where rewritten images point: the `address`, or the entry point on the node's
    /// loopback.
    pub fn address(&self) -> String {
        match &self.address {
            Some(a) => a.clone(),
            None => format!("127.0.0.1:{}", self.entry_point_port()),
        }
    }
}

impl RegistryMirror {
    /// The mirror's rewrite, if it asks for one.
    pub fn rewrite(&self) -> Option<&RewriteSpec> {
        self.spec.rewrite.as_ref()
    }
}

/// `image` as pulled through a mirror at `address`: `address/<registry>/<repository>`
/// (the registry spelled as [`registry_in_path`] does) with the same tag or digest. A
/// reference with both a tag and a digest keeps both, as the kubelet pulls by the digest.
pub fn rewritten(address: &str, original: &str, image: &ImageRef) -> String {
    let path = format!(
        "{address}/{}/{}",
        registry_in_path(&image.registry),
        image.repository
    );
    match &image.reference {
        Reference::Digest(d) => match tag_of(original) {
            Some(tag) => format!("{path}:{tag}@{d}"),
            None => format!("{path}@{d}"),
        },
        Reference::Tag(t) => format!("{path}:{t}"),
    }
}

/// The tag of a reference written with both a tag and a digest (`app:1@sha256:...`).
fn tag_of(original: &str) -> Option<&str> {
    let name = original.split_once('@')?.0;
    let last = name.rsplit('/').next()?;
    last.split_once(':').map(|(_, t)| t)
}

/// The Service address the node-local entry point relays to: the mirror's Service by
/// its DNS name.
pub fn service_url(mirror_name: &str, namespace: &str) -> String {
    format!("http://pullthrough-{mirror_name}.{namespace}.svc:{PROXY_PORT}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::image_ref::parse;

    #[test]
    fn a_rewritten_reference_keeps_tag_and_digest_and_reads_back() {
        let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        let cases = [
            ("alpine", "127.0.0.1:5001/docker.io/library/alpine:latest"),
            (
                "registry.local:5000/team/app:1",
                "127.0.0.1:5001/registry.local_5000/team/app:1",
            ),
            (
                &format!("ghcr.io/org/app@{d}"),
                &format!("127.0.0.1:5001/ghcr.io/org/app@{d}"),
            ),
            (
                &format!("ghcr.io/org/app:1.4@{d}"),
                &format!("127.0.0.1:5001/ghcr.io/org/app:1.4@{d}"),
            ),
        ];
        for (original, want) in cases {
            let got = rewritten("127.0.0.1:5001", original, &parse(original).unwrap());
            assert_eq!(got, want);
            // What the kubelet pulls is a reference of the entry point's own.
            let back = parse(&got).unwrap();
            assert_eq!(back.registry, "127.0.0.1:5001");
        }
    }
}

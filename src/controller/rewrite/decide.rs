//! What the webhook does to one pod, from the pod, its namespace's labels and the
//! mirrors: pure, so that every safety rule is a unit test. The rules, in order:
//!
//! 1. A static pod's mirror (`kubernetes.io/config.mirror`), a pod that opts out
//!    (`pullthrough.dev/rewrite: "false"`) and a pod of pullthrough itself (a proxy, an
//!    entry point, the controller, a node agent) are never touched.
//! 2. A mirror looks at a pod only when its `spec.rewrite` selects the pod's namespace
//!    and labels, and the namespace is not excluded (`kube-system` and the mirror's own
//!    unless `includeSystemNamespaces`).
//! 3. An image goes to the mirror that serves its registry (its status says), unless an
//!    `excludeImages` glob matches it.
//! 4. It is then left alone, and the pod marked with why, when: the mirror is not Ready
//!    or has no ready replica or entry point (`mirror-not-ready`); the pod's owner is of
//!    a kind known to compare its pods' images with its own spec and replace pods that
//!    differ (`owner-compares-images`); or the upstream decides who may pull
//!    (`upstreamAuth`) and the pod carries pull secrets, which the kubelet would no longer
//!    send, since it picks them by the image's host (`private-images`).
//! 5. Otherwise its reference becomes `<address>/<registry>/<repository>` with the same
//!    tag and digest; the pod keeps its original images in an annotation and gets the
//!    `pullthrough.dev/rewritten` label.

use crate::api::image_ref::{self, ImageRef};
use crate::api::mirror::rewrite::{
    NOT_REWRITTEN, OPT_OUT, ORIGINAL_IMAGES, REWRITTEN_BY, REWRITTEN_LABEL, RewriteSpec, rewritten,
};
use crate::api::mirror::{RegistryMirror, claim_order, is_ready, mirror_key, registry_key};
use crate::api::proxy_config::glob_match;
use crate::controller::workloads::desired::selects;
use k8s_openapi::api::core::v1::Pod;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Annotation the kubelet puts on the API's copy of a static pod.
pub const STATIC_POD: &str = "kubernetes.io/config.mirror";

/// API groups of owners known to compare their pods' images with their own spec, and to
/// replace a pod whose image differs: a rewritten pod would be replaced forever
/// (cloudnative-pg/cloudnative-pg#6344). Other such owners opt out with the annotation.
pub const OWNERS_COMPARING_IMAGES: &[&str] = &["postgresql.cnpg.io"];

/// What the webhook was asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A pod being created: every container.
    Create,
    /// Ephemeral containers being added (`kubectl debug`): only theirs, and only those
    /// not rewritten yet.
    EphemeralContainers,
}

/// Why a mirror's image in a pod was left as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The mirror is not Ready, or has no ready replica or entry point.
    MirrorNotReady,
    /// The pod's owner compares images.
    OwnerComparesImages,
    /// An `upstreamAuth` upstream's image in a pod with pull secrets.
    PrivateImages,
}

impl Reason {
    /// As the annotation and the metric name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MirrorNotReady => "mirror-not-ready",
            Reason::OwnerComparesImages => "owner-compares-images",
            Reason::PrivateImages => "private-images",
        }
    }
}

/// What became of a mirror's images in the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Rewritten (this many).
    Rewritten(usize),
    /// Left alone (the first reason found).
    Left(Reason),
}

/// The webhook's answer for one pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// The JSON patch (RFC 6902) to apply; empty: none.
    pub patch: Vec<Value>,
    /// Per mirror (`namespace/name`) whose images the pod has, what became of them.
    pub outcomes: BTreeMap<String, Outcome>,
}

/// The pod's namespace as the webhook knows it.
pub struct Namespace<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its labels (with `kubernetes.io/metadata.name`, which the API server sets).
    pub labels: &'a BTreeMap<String, String>,
}

/// A mirror's name in metrics, annotations and the audit: `namespace/name`.
pub fn key(m: &RegistryMirror) -> String {
    mirror_key(&m.namespace().unwrap_or_default(), &m.name_any())
}

/// Whether pullthrough's own pods: every pod it runs carries this name label.
fn is_ours(pod: &Pod) -> bool {
    pod.labels()
        .get("app.kubernetes.io/name")
        .is_some_and(|v| v == "pullthrough")
}

/// Whether the pod is never touched, whatever the mirrors (rule 1).
pub fn untouchable(pod: &Pod) -> bool {
    let a = pod.annotations();
    a.contains_key(STATIC_POD)
        || a.get(OPT_OUT)
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
        || is_ours(pod)
}

/// Whether the pod's owner compares images.
fn owner_compares_images(pod: &Pod) -> bool {
    pod.owner_references().iter().any(|o| {
        let group = o.api_version.split_once('/').map_or("", |(g, _)| g);
        OWNERS_COMPARING_IMAGES.contains(&group)
    })
}

/// Whether `mirror`'s rewrite looks at pods of `ns` labelled so (rule 2).
pub fn in_scope(
    mirror: &RegistryMirror,
    spec: &RewriteSpec,
    ns: &Namespace,
    pod_labels: &BTreeMap<String, String>,
) -> bool {
    let own = mirror.namespace().as_deref() == Some(ns.name);
    if !spec.include_system_namespaces && (ns.name == "kube-system" || own) {
        return false;
    }
    !spec.exclude_namespaces.iter().any(|n| n == ns.name)
        && selects(spec.namespace_selector.as_ref(), ns.labels)
        && selects(spec.object_selector.as_ref(), pod_labels)
}

/// Whether new pods may be rewritten to `mirror` now: Ready, with a ready replica, and
/// (the controller says in `status.rewrite.active`) reachable from the nodes.
pub fn mirror_ready(mirror: &RegistryMirror) -> bool {
    let status = mirror.status.as_ref();
    is_ready(mirror)
        && status.is_some_and(|s| s.ready_replicas > 0)
        && status
            .and_then(|s| s.rewrite.as_ref())
            .is_some_and(|r| r.active)
}

/// A rewriting mirror in scope of the pod, and the registries it serves.
struct Candidate<'a> {
    mirror: &'a RegistryMirror,
    spec: &'a RewriteSpec,
    key: String,
}

impl Candidate<'_> {
    /// Whether the mirror serves `image`'s registry and may take it (rule 3).
    fn serves(&self, image: &ImageRef, text: &str) -> bool {
        let registry = registry_key(&image.registry);
        let served = self.mirror.status.as_ref().is_some_and(|s| {
            s.served_registries
                .iter()
                .any(|r| registry_key(r) == registry)
        });
        served
            && !self
                .spec
                .exclude_images
                .iter()
                .any(|g| glob_match(g, text) || glob_match(g, &image.to_string()))
    }

    /// Whether the upstream of `image`'s registry decides who may pull.
    fn upstream_decides(&self, image: &ImageRef) -> bool {
        let registry = registry_key(&image.registry);
        self.mirror
            .spec
            .upstream_auth_registries()
            .any(|r| registry_key(r) == registry)
    }
}

/// A container's place in the pod: its list and index, its name and image.
struct Slot<'a> {
    list: &'static str,
    index: usize,
    name: &'a str,
    image: &'a str,
}

fn slots(pod: &Pod, op: Operation) -> Vec<Slot<'_>> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if op == Operation::Create {
        for (i, c) in spec.containers.iter().enumerate() {
            out.extend(c.image.as_deref().map(|image| Slot {
                list: "containers",
                index: i,
                name: &c.name,
                image,
            }));
        }
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            out.extend(c.image.as_deref().map(|image| Slot {
                list: "initContainers",
                index: i,
                name: &c.name,
                image,
            }));
        }
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        out.extend(c.image.as_deref().map(|image| Slot {
            list: "ephemeralContainers",
            index: i,
            name: &c.name,
            image,
        }));
    }
    out
}

/// What to do with `pod` (created in `ns`, or given ephemeral containers), given every
/// mirror: the rules of this module's doc.
pub fn decide(
    pod: &Pod,
    ns: &Namespace,
    op: Operation,
    mirrors: &[Arc<RegistryMirror>],
) -> Decision {
    decide_with(pod, ns, op, mirrors, mirror_ready)
}

/// [`decide`], with `ready` saying which mirrors may take pods now (the audit asks what
/// the webhook would have done had they all been).
pub fn decide_with(
    pod: &Pod,
    ns: &Namespace,
    op: Operation,
    mirrors: &[Arc<RegistryMirror>],
    ready: impl Fn(&RegistryMirror) -> bool,
) -> Decision {
    let mut decision = Decision::default();
    if untouchable(pod) {
        return decision;
    }
    let candidates = candidates(pod, ns, mirrors);
    if candidates.is_empty() {
        return decision;
    }
    let has_pull_secrets = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.as_ref())
        .is_some_and(|s| !s.is_empty());
    let owner_compares = owner_compares_images(pod);
    let mut originals = BTreeMap::new();
    let mut reasons = std::collections::BTreeSet::new();
    for slot in slots(pod, op) {
        let Ok(image) = image_ref::parse(slot.image) else {
            continue;
        };
        let Some(c) = candidates.iter().find(|c| c.serves(&image, slot.image)) else {
            continue;
        };
        let reason = if !ready(c.mirror) {
            Some(Reason::MirrorNotReady)
        } else if owner_compares {
            Some(Reason::OwnerComparesImages)
        } else if has_pull_secrets && c.upstream_decides(&image) {
            Some(Reason::PrivateImages)
        } else {
            None
        };
        let outcome = decision.outcomes.entry(c.key.clone());
        match reason {
            Some(r) => {
                reasons.insert(r);
                outcome.or_insert(Outcome::Left(r));
            }
            None => {
                // One image rewritten makes the mirror's outcome Rewritten.
                let o = outcome.or_insert(Outcome::Rewritten(0));
                let n = match o {
                    Outcome::Rewritten(n) => *n,
                    Outcome::Left(_) => 0,
                };
                *o = Outcome::Rewritten(n + 1);
                let address = c.spec.address();
                decision.patch.push(json!({
                    "op": "replace",
                    "path": format!("/spec/{}/{}/image", slot.list, slot.index),
                    "value": rewritten(&address, slot.image, &image),
                }));
                originals.insert(slot.name.to_string(), slot.image.to_string());
            }
        }
    }
    // Ephemeral containers come through a subresource that changes nothing but them.
    if op == Operation::Create {
        let marks = marks(pod, &decision.outcomes, &originals, &reasons);
        decision.patch.extend(marks);
    }
    decision
}

/// The rewriting mirrors whose scope holds the pod, oldest first (as they claim
/// registries), not being deleted.
fn candidates<'a>(
    pod: &Pod,
    ns: &Namespace,
    mirrors: &'a [Arc<RegistryMirror>],
) -> Vec<Candidate<'a>> {
    let mut live: Vec<&Arc<RegistryMirror>> = mirrors
        .iter()
        .filter(|m| m.meta().deletion_timestamp.is_none())
        .collect();
    live.sort_by_key(|m| claim_order(m));
    live.into_iter()
        .filter_map(|m| {
            let spec = m.rewrite()?;
            in_scope(m, spec, ns, pod.labels()).then(|| Candidate {
                mirror: m,
                spec,
                key: key(m),
            })
        })
        .collect()
}

/// The patch operations that mark a created pod: the label and original images of a
/// rewritten one, the reasons images were left.
fn marks(
    pod: &Pod,
    outcomes: &BTreeMap<String, Outcome>,
    originals: &BTreeMap<String, String>,
    reasons: &std::collections::BTreeSet<Reason>,
) -> Vec<Value> {
    let mut patch = Vec::new();
    let mut annotations = BTreeMap::new();
    if !originals.is_empty() {
        annotations.insert(
            ORIGINAL_IMAGES.to_string(),
            serde_json::to_string(originals).expect("a map of strings serializes"),
        );
        let by: Vec<&str> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Rewritten(_)))
            .map(|(k, _)| k.as_str())
            .collect();
        annotations.insert(REWRITTEN_BY.to_string(), by.join(","));
        patch.extend(add_entries(
            pod.labels(),
            "labels",
            [(REWRITTEN_LABEL, "true")],
        ));
    }
    let left: Vec<&str> = reasons.iter().map(|r| r.as_str()).collect();
    if !left.is_empty() {
        annotations.insert(NOT_REWRITTEN.to_string(), left.join(","));
    }
    patch.extend(add_entries(
        pod.annotations(),
        "annotations",
        annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ));
    patch
}

/// JSON patch operations adding `entries` to the pod's `field` (labels or annotations):
/// the whole map when the pod has none, else one entry at a time.
fn add_entries<'a>(
    existing: &BTreeMap<String, String>,
    field: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<Value> {
    let entries: BTreeMap<&str, &str> = entries.into_iter().collect();
    if entries.is_empty() {
        return Vec::new();
    }
    if existing.is_empty() {
        return vec![json!({"op": "add", "path": format!("/metadata/{field}"), "value": entries})];
    }
    entries
        .into_iter()
        .map(|(k, v)| {
            // RFC 6901: `~` and `/` in a key are escaped.
            let key = k.replace('~', "~0").replace('/', "~1");
            json!({"op": "add", "path": format!("/metadata/{field}/{key}"), "value": v})
        })
        .collect()
}

//! Pure status logic: conditions (with stable transition times), conflicts between
//! mirrors, node counts. The reconciler gathers observations and writes what this returns.

use crate::api::mirror::{
    CONTAINERD_ANNOTATION, LostRegistry, NODE_ANNOTATION, NodesStatus, REGISTRIES_CONF_ANNOTATION,
    RUNTIME_ANNOTATION, RegistryMirror, RegistryMirrorStatus, RewriteStatus, claim_order,
    mirror_key, parse_node_annotation, registry_key,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// Condition types.
pub const READY: &str = "Ready";
/// Rollout in progress.
pub const PROGRESSING: &str = "Progressing";
/// Something the admin must fix.
pub const DEGRADED: &str = "Degraded";
/// Another mirror serves one of this mirror's registries.
pub const CONFLICT: &str = "Conflict";
/// The Degraded reason of nodes whose containerd ignores the mirror's files: worth the
/// admin's attention, but nothing wrong with the mirror itself.
pub const NODES_IGNORING: &str = "ContainerdIgnoresMirrors";
/// The Degraded reason of pods the rewrite webhook never answered for.
pub const PODS_NOT_REWRITTEN: &str = "PodsNotRewritten";
/// The Degraded reason of a rewrite nodes cannot follow.
pub const REWRITE_UNREACHABLE: &str = "RewriteUnreachable";

/// A problem that keeps the mirror from working as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human message.
    pub message: String,
}

/// What the reconciler saw.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// metadata.generation of the mirror.
    pub generation: Option<i64>,
    /// spec.replicas.
    pub replicas: i32,
    /// Pods ready.
    pub ready_replicas: i32,
    /// Pods running the current template.
    pub updated_replicas: i32,
    /// Service endpoint.
    pub endpoint: Option<String>,
    /// Where the cache is kept.
    pub storage: Option<String>,
    /// Configuration or credentials problem.
    pub problem: Option<Problem>,
    /// The registries this mirror serves.
    pub served: Vec<String>,
    /// Registries an older mirror serves instead: registry -> that mirror.
    pub conflicts: BTreeMap<String, String>,
    /// Node configuration counts.
    pub nodes: Option<NodesStatus>,
    /// Nodes with this mirror's files whose containerd does not read them: (node, why).
    pub nodes_ignoring: Vec<(String, String)>,
    /// With `spec.tls`: the CA certificate nodes verify the proxy's with.
    pub ca_bundle: Option<String>,
    /// With `spec.rewrite`: what the rewrite needs besides a Ready mirror.
    pub rewrite: Option<RewriteObserved>,
}

/// What a rewriting mirror's reconcile saw of the rewrite.
#[derive(Clone, Debug, Default)]
pub struct RewriteObserved {
    /// Where rewritten images point.
    pub address: String,
    /// With the node-local entry point: its pods (ready, wanted).
    pub entry_points: Option<(i32, i32)>,
    /// Why nodes cannot reach the mirror through the rewrite, whatever its pods do.
    pub unreachable: Option<String>,
    /// Pods the webhook missed (see `rewrite::audit`).
    pub missed_pods: i32,
    /// The mirror's `upstreamAuth` registries, whose images stay as written in pods
    /// with pull secrets.
    pub private: Vec<String>,
}

/// Whether a mirror may claim registries: not being deleted, with a spec its proxy can
/// run, and not reported `Degraded` (a missing or invalid Secret) by its last status.
/// A broken mirror must not keep a registry from a younger one that works.
pub fn can_claim(m: &RegistryMirror) -> bool {
    m.meta().deletion_timestamp.is_none()
        && m.spec.proxy_config().is_ok()
        && !m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == DEGRADED && c.status == "True" && c.reason != NODES_IGNORING)
        })
}

/// Who serves `me`'s registries: each is served by the oldest mirror that claims it and
/// `can_claim` (see [`can_claim`]; ties go to the lower namespace/name). Returns the
/// registries `me` serves, and those it lost with the mirror that serves each. `me` is
/// taken to be able to claim (the reconciler knows its own state better than its last
/// status).
pub fn claims(
    me: &RegistryMirror,
    all: &[std::sync::Arc<RegistryMirror>],
    can_claim: impl Fn(&RegistryMirror) -> bool,
) -> (Vec<String>, BTreeMap<String, String>) {
    let mine = claim_order(me);
    let mut served = Vec::new();
    let mut lost = BTreeMap::new();
    for u in &me.spec.upstreams {
        let key = registry_key(&u.registry);
        let winner = all
            .iter()
            .filter(|other| other.uid() != me.uid() && claim_order(other) < mine)
            .filter(|other| {
                other
                    .spec
                    .upstreams
                    .iter()
                    .any(|v| registry_key(&v.registry) == key)
            })
            .filter(|other| can_claim(other))
            .min_by_key(|other| claim_order(other));
        match winner {
            Some(w) => {
                lost.insert(
                    key,
                    mirror_key(&w.namespace().unwrap_or_default(), &w.name_any()),
                );
            }
            None if !served.contains(&key) => served.push(key),
            None => {}
        }
    }
    (served, lost)
}

/// The registries a mirror claims, as [`registry_key`]s.
pub fn registry_keys(m: &RegistryMirror) -> Vec<String> {
    m.spec
        .upstreams
        .iter()
        .map(|u| registry_key(&u.registry))
        .collect()
}

/// The mirrors other than `changed` that claim one of `keys`: those whose claims may
/// change when `changed` does (a deletion or a fix lets a younger one serve).
pub fn rivals<'a>(
    changed: &RegistryMirror,
    keys: Vec<String>,
    all: &'a [std::sync::Arc<RegistryMirror>],
) -> impl Iterator<Item = &'a std::sync::Arc<RegistryMirror>> {
    let uid = changed.uid();
    all.iter().filter(move |m| {
        m.uid() != uid
            && m.spec
                .upstreams
                .iter()
                .any(|u| keys.contains(&registry_key(&u.registry)))
    })
}

/// Whether a node's labels match a selector (all pairs equal; empty matches all).
pub fn node_selected(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Counts the nodes the mirror should configure, those whose agent reports it done with
/// a containerd that reads the files, and those whose containerd ignores them (with the
/// agent's word for why).
pub fn count_nodes(
    mirror: &RegistryMirror,
    nodes: &[Node],
) -> (NodesStatus, Vec<(String, String)>) {
    let key = mirror_key(&mirror.namespace().unwrap_or_default(), &mirror.name_any());
    let mut status = NodesStatus::default();
    let mut ignoring = Vec::new();
    for node in nodes {
        if mirror.spec.nodes.configure && node_selected(node, &mirror.spec.nodes.selector) {
            status.total += 1;
        }
        if !configured_on(node, &key) {
            continue;
        }
        match runtime_ignores(node) {
            Some(why) => {
                status.ignoring_mirrors += 1;
                ignoring.push((node.name_any(), why));
            }
            None => status.configured += 1,
        }
    }
    (status, ignoring)
}

/// Why the node's runtime does not read the files its agent wrote, if it does not: on a
/// CRI-O node the drop-in's state, elsewhere containerd's `config_path`. An agent older
/// than the annotations is taken at its word.
fn runtime_ignores(node: &Node) -> Option<String> {
    let annotations = node.annotations();
    let crio = annotations
        .get(RUNTIME_ANNOTATION)
        .is_some_and(|r| r.starts_with("cri-o://"));
    if crio {
        let state = annotations.get(REGISTRIES_CONF_ANNOTATION)?;
        return (state != "in-place").then(|| format!("CRI-O, registries.conf.d {state}"));
    }
    let state = annotations.get(CONTAINERD_ANNOTATION)?;
    (state != "enabled").then(|| state.clone())
}

/// Whether a node's agent reports the mirror `key` configured.
pub fn configured_on(node: &Node, key: &str) -> bool {
    node.annotations()
        .get(NODE_ANNOTATION)
        .is_some_and(|v| parse_node_annotation(v).iter().any(|m| m == key))
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    // The transition time moves only when the status flips.
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// The status to write, from what was observed and the previous status.
pub fn build_status(
    previous: Option<&RegistryMirrorStatus>,
    o: &Observed,
    now: Timestamp,
) -> RegistryMirrorStatus {
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let make = |type_: &str, (status, reason, message): Verdict| {
        condition(prev, type_, status, reason, message, o.generation, now)
    };
    RegistryMirrorStatus {
        observed_generation: o.generation,
        endpoint: o.endpoint.clone(),
        ca_bundle: o.ca_bundle.clone(),
        ready_replicas: o.ready_replicas,
        storage: o.storage.clone(),
        nodes: o.nodes.clone(),
        served_registries: o.served.clone(),
        lost_registries: o
            .conflicts
            .iter()
            .map(|(registry, by)| LostRegistry {
                registry: registry.clone(),
                mirrored_by: by.clone(),
            })
            .collect(),
        conditions: vec![
            make(READY, ready(o)),
            make(PROGRESSING, progressing(o)),
            make(DEGRADED, degraded(o)),
            make(CONFLICT, conflict(o)),
        ],
        // Written by the replicas' loop with its own field manager (see `workloads`),
        // never here.
        prefetched_images: None,
        modes: Vec::new(),
        pinned_tags: Vec::new(),
        drop: None,
        images: None,
        rewrite: o
            .rewrite
            .as_ref()
            .map(|r| rewrite_status(previous, o, r, now)),
    }
}

/// `status.rewrite`: active when the mirror is Ready and nodes can reach it (the
/// address given, or an entry point ready); since when it rewrites, kept from before.
fn rewrite_status(
    previous: Option<&RegistryMirrorStatus>,
    o: &Observed,
    r: &RewriteObserved,
    now: Timestamp,
) -> RewriteStatus {
    let since = previous
        .and_then(|p| p.rewrite.as_ref())
        .and_then(|p| p.since.clone())
        .unwrap_or(Time(now));
    let (entry_points_ready, entry_points_desired) = r.entry_points.unwrap_or((0, 0));
    let (ready, _, why) = ready(o);
    let (active, message) = if let Some(why) = &r.unreachable {
        (false, why.clone())
    } else if !ready {
        (
            false,
            format!("not rewriting: the mirror is not Ready ({why})"),
        )
    } else if r.entry_points.is_some() && entry_points_ready == 0 {
        (
            false,
            "not rewriting: no node-local entry point is ready yet".to_string(),
        )
    } else if r.private.is_empty() {
        (true, format!("rewriting images of pods to {}", r.address))
    } else {
        let message = format!(
            "rewriting images of pods to {}; images of {} (upstreamAuth) stay as written in \
             pods with pull secrets, which the kubelet would not send to the new address",
            r.address,
            r.private.join(", ")
        );
        (true, message)
    };
    RewriteStatus {
        active,
        message,
        address: r.address.clone(),
        since: Some(since),
        entry_points_ready,
        entry_points_desired,
        missed_pods: r.missed_pods,
    }
}

/// A condition's status, reason and message.
type Verdict = (bool, &'static str, String);

/// Who else serves the mirror's registries, and what it serves itself.
fn claims_said(o: &Observed) -> (String, String) {
    let conflicts = o
        .conflicts
        .iter()
        .map(|(r, m)| format!("{r} is already mirrored by {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let serves = if o.served.is_empty() {
        "this mirror serves none of its registries".to_string()
    } else {
        format!("this mirror serves {}", o.served.join(", "))
    };
    (conflicts, serves)
}

/// Conflict: another, older mirror serves one of its registries.
fn conflict(o: &Observed) -> Verdict {
    if o.conflicts.is_empty() {
        return (
            false,
            "NoConflict",
            "no other mirror serves these registries".into(),
        );
    }
    let (conflicts, serves) = claims_said(o);
    let message =
        format!("{conflicts} (the oldest mirror that can serve a registry serves it); {serves}");
    (true, "RegistryClaimed", message)
}

/// Degraded: its spec or Secrets are wrong, or nodes' containerd ignores it.
fn degraded(o: &Observed) -> Verdict {
    if let Some(p) = &o.problem {
        return (true, p.reason, p.message.clone());
    }
    let rewrite = o.rewrite.as_ref();
    if let Some(why) = rewrite.and_then(|r| r.unreachable.clone()) {
        return (true, REWRITE_UNREACHABLE, why);
    }
    let missed = rewrite.map_or(0, |r| r.missed_pods);
    if o.nodes_ignoring.is_empty() && missed > 0 {
        let message = format!(
            "{missed} running pod(s) were admitted without the image rewrite: the webhook \
             did not answer for them (down or too slow); their Events say which \
             (reason NotRewritten)"
        );
        return (true, PODS_NOT_REWRITTEN, message);
    }
    if o.nodes_ignoring.is_empty() {
        return (false, "AsExpected", "configuration is valid".into());
    }
    let nodes = o
        .nodes_ignoring
        .iter()
        .map(|(n, why)| format!("{n} ({why})"))
        .collect::<Vec<_>>()
        .join(", ");
    let message = format!(
        "the container runtime ignores this mirror's files on {} node(s): {nodes}; for \
         containerd set its registry config_path, for CRI-O give the agent hostPID \
         (docs/node-agent.md)",
        o.nodes_ignoring.len(),
    );
    (true, NODES_IGNORING, message)
}

/// Progressing: a rollout of its proxy pods is under way.
fn progressing(o: &Observed) -> Verdict {
    let rolling = o.problem.is_none()
        && !o.served.is_empty()
        && (o.updated_replicas < o.replicas
            || o.ready_replicas < o.replicas
            || o.endpoint.is_none());
    if !rolling {
        return (false, "Complete", "no rollout in progress".into());
    }
    let message = format!(
        "{} of {} proxy pods ready and up to date",
        o.ready_replicas.min(o.updated_replicas),
        o.replicas
    );
    (true, "RollingOut", message)
}

/// Ready: it serves a registry, with a ready pod behind an address.
fn ready(o: &Observed) -> Verdict {
    if let Some(p) = &o.problem {
        return (false, p.reason, p.message.clone());
    }
    if o.served.is_empty() {
        let (conflicts, serves) = claims_said(o);
        return (false, "Conflict", format!("{conflicts}; {serves}"));
    }
    if o.replicas == 0 {
        return (false, "ScaledToZero", "replicas is 0".into());
    }
    if o.ready_replicas == 0 {
        return (false, "NoReadyPods", "no proxy pod is ready yet".into());
    }
    if o.endpoint.is_none() {
        return (
            false,
            "NoEndpoint",
            "the Service has no cluster IP yet".into(),
        );
    }
    let message = format!("{} of {} proxy pods ready", o.ready_replicas, o.replicas);
    (true, "ProxyReady", message)
}

/// Conditions whose status changed between two statuses: (type, new condition).
pub fn transitions<'a>(
    previous: Option<&RegistryMirrorStatus>,
    next: &'a RegistryMirrorStatus,
) -> Vec<&'a Condition> {
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    next.conditions
        .iter()
        .filter(|c| {
            let before = prev.iter().find(|p| p.type_ == c.type_);
            match before {
                Some(b) => b.status != c.status || b.reason != c.reason,
                // A first status is news only where it says something is wrong or done.
                None => match c.type_.as_str() {
                    READY => c.status == "True",
                    DEGRADED | CONFLICT => c.status == "True",
                    _ => false,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;

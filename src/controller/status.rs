//! Pure status logic: conditions (with stable transition times), conflicts between
//! mirrors, node counts. The reconciler gathers observations and writes what this returns.

use crate::api::mirror::{
    NODE_ANNOTATION, NodesStatus, RegistryMirror, RegistryMirrorStatus, claim_order, mirror_key,
    parse_node_annotation, registry_key,
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
    /// Configuration or credentials problem.
    pub problem: Option<Problem>,
    /// Registries claimed by an older mirror: registry -> that mirror.
    pub conflicts: BTreeMap<String, String>,
    /// Node configuration counts.
    pub nodes: Option<NodesStatus>,
}

/// Registries this mirror shares with an older mirror (the older one wins; ties go to the
/// lower namespace/name). Mirrors being deleted claim nothing.
pub fn conflicts(
    me: &RegistryMirror,
    all: &[std::sync::Arc<RegistryMirror>],
) -> BTreeMap<String, String> {
    let mine = claim_order(me);
    let my_registries: Vec<String> = me
        .spec
        .upstreams
        .iter()
        .map(|u| registry_key(&u.registry))
        .collect();
    let mut out = BTreeMap::new();
    for other in all {
        if other.uid() == me.uid() || other.meta().deletion_timestamp.is_some() {
            continue;
        }
        if claim_order(other) >= mine {
            continue;
        }
        for u in &other.spec.upstreams {
            let key = registry_key(&u.registry);
            if my_registries.contains(&key) {
                out.entry(key).or_insert_with(|| {
                    mirror_key(&other.namespace().unwrap_or_default(), &other.name_any())
                });
            }
        }
    }
    out
}

/// Whether a node's labels match a selector (all pairs equal; empty matches all).
pub fn node_selected(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Counts the nodes the mirror should configure and those whose agent reports it done.
pub fn count_nodes(mirror: &RegistryMirror, nodes: &[Node]) -> NodesStatus {
    let key = mirror_key(&mirror.namespace().unwrap_or_default(), &mirror.name_any());
    let mut status = NodesStatus::default();
    for node in nodes {
        if mirror.spec.nodes.configure && node_selected(node, &mirror.spec.nodes.selector) {
            status.total += 1;
        }
        if configured_on(node, &key) {
            status.configured += 1;
        }
    }
    status
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
    let conflict_msg = o
        .conflicts
        .iter()
        .map(|(r, m)| format!("{r} is already mirrored by {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let conflict = condition(
        prev,
        CONFLICT,
        !o.conflicts.is_empty(),
        if o.conflicts.is_empty() {
            "NoConflict"
        } else {
            "RegistryClaimed"
        },
        if o.conflicts.is_empty() {
            "no other mirror serves these registries".into()
        } else {
            format!("{conflict_msg}; the older mirror wins, nodes are not pointed at this one")
        },
        o.generation,
        now,
    );
    let degraded = match &o.problem {
        Some(p) => condition(
            prev,
            DEGRADED,
            true,
            p.reason,
            p.message.clone(),
            o.generation,
            now,
        ),
        None => condition(
            prev,
            DEGRADED,
            false,
            "AsExpected",
            "configuration is valid".into(),
            o.generation,
            now,
        ),
    };
    let rolling = o.problem.is_none()
        && (o.updated_replicas < o.replicas
            || o.ready_replicas < o.replicas
            || o.endpoint.is_none());
    let progressing = if rolling {
        condition(
            prev,
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{} of {} proxy pods ready and up to date",
                o.ready_replicas.min(o.updated_replicas),
                o.replicas
            ),
            o.generation,
            now,
        )
    } else {
        condition(
            prev,
            PROGRESSING,
            false,
            "Complete",
            "no rollout in progress".into(),
            o.generation,
            now,
        )
    };
    let (ready, reason, message) = if let Some(p) = &o.problem {
        (false, p.reason, p.message.clone())
    } else if !o.conflicts.is_empty() {
        (false, "Conflict", conflict_msg)
    } else if o.replicas == 0 {
        (false, "ScaledToZero", "replicas is 0".to_string())
    } else if o.ready_replicas == 0 {
        (
            false,
            "NoReadyPods",
            "no proxy pod is ready yet".to_string(),
        )
    } else if o.endpoint.is_none() {
        (
            false,
            "NoEndpoint",
            "the Service has no cluster IP yet".to_string(),
        )
    } else {
        (
            true,
            "ProxyReady",
            format!("{} of {} proxy pods ready", o.ready_replicas, o.replicas),
        )
    };
    let ready = condition(prev, READY, ready, reason, message, o.generation, now);
    RegistryMirrorStatus {
        observed_generation: o.generation,
        endpoint: o.endpoint.clone(),
        ready_replicas: o.ready_replicas,
        nodes: o.nodes.clone(),
        conditions: vec![ready, progressing, degraded, conflict],
    }
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
mod tests {
    use super::*;
    use crate::api::mirror::RegistryMirrorSpec;
    use std::sync::Arc;

    fn mirror(
        ns: &str,
        name: &str,
        uid: &str,
        created: i64,
        registries: &[&str],
    ) -> RegistryMirror {
        let spec: RegistryMirrorSpec = serde_yaml::from_str(&format!(
            "upstreams: [{}]",
            registries
                .iter()
                .map(|r| format!("{{registry: \"{r}\"}}"))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .unwrap();
        let mut m = RegistryMirror::new(name, spec);
        m.metadata.namespace = Some(ns.into());
        m.metadata.uid = Some(uid.into());
        m.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        m
    }

    #[test]
    fn older_mirror_wins_conflicts() {
        let a = mirror("x", "a", "1", 100, &["docker.io", "ghcr.io"]);
        let b = mirror("y", "b", "2", 200, &["index.docker.io", "quay.io"]);
        let c = mirror("z", "c", "3", 50, &["registry.k8s.io"]);
        let all: Vec<Arc<RegistryMirror>> = [&a, &b, &c]
            .iter()
            .map(|m| Arc::new((*m).clone()))
            .collect();
        assert!(conflicts(&a, &all).is_empty());
        assert_eq!(
            conflicts(&b, &all),
            BTreeMap::from([("docker.io".to_string(), "x/a".to_string())])
        );
        assert!(conflicts(&c, &all).is_empty());
        // Same age: the lower namespace/name wins, deterministically.
        let d = mirror("x", "d", "4", 100, &["ghcr.io"]);
        let all2 = vec![Arc::new(a.clone()), Arc::new(d.clone())];
        assert!(conflicts(&a, &all2).is_empty());
        assert_eq!(conflicts(&d, &all2).len(), 1);
        // A mirror being deleted gives its registries up.
        let mut gone = a.clone();
        gone.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(300).unwrap()));
        assert!(conflicts(&b, &[Arc::new(gone)]).is_empty());
    }

    fn node(labels: &[(&str, &str)], annotation: Option<&str>) -> Node {
        let mut n = Node::default();
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        if let Some(a) = annotation {
            n.metadata.annotations = Some(BTreeMap::from([(
                NODE_ANNOTATION.to_string(),
                a.to_string(),
            )]));
        }
        n
    }

    #[test]
    fn node_counts() {
        let mut m = mirror("ns", "pub", "1", 1, &["docker.io"]);
        let nodes = vec![
            node(&[("pool", "a")], Some("ns/pub,other/x")),
            node(&[("pool", "b")], Some("other/x")),
            node(&[("pool", "a")], None),
        ];
        assert_eq!(
            count_nodes(&m, &nodes),
            NodesStatus {
                configured: 1,
                total: 3
            }
        );
        m.spec.nodes.selector = BTreeMap::from([("pool".to_string(), "a".to_string())]);
        assert_eq!(
            count_nodes(&m, &nodes),
            NodesStatus {
                configured: 1,
                total: 2
            }
        );
        m.spec.nodes.configure = false;
        assert_eq!(count_nodes(&m, &nodes).total, 0);
    }

    fn cond<'a>(s: &'a RegistryMirrorStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn conditions_follow_observations_and_keep_transition_times() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let mut o = Observed {
            generation: Some(3),
            replicas: 2,
            ready_replicas: 0,
            updated_replicas: 2,
            endpoint: Some("http://10.0.0.1:5000".into()),
            ..Observed::default()
        };
        let s0 = build_status(None, &o, t0);
        assert_eq!(cond(&s0, READY).status, "False");
        assert_eq!(cond(&s0, READY).reason, "NoReadyPods");
        assert_eq!(cond(&s0, PROGRESSING).status, "True");
        assert_eq!(s0.observed_generation, Some(3));
        assert!(transitions(None, &s0).is_empty());

        o.ready_replicas = 2;
        let s1 = build_status(Some(&s0), &o, t1);
        assert_eq!(cond(&s1, READY).status, "True");
        assert_eq!(cond(&s1, READY).last_transition_time.0, t1);
        assert_eq!(
            cond(&s1, DEGRADED).last_transition_time.0,
            t0,
            "unchanged condition keeps its time"
        );
        let changed: Vec<&str> = transitions(Some(&s0), &s1)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(changed, vec![READY, PROGRESSING]);

        o.problem = Some(Problem {
            reason: "SecretNotFound",
            message: "Secret hub not found".into(),
        });
        let s2 = build_status(Some(&s1), &o, t1);
        assert_eq!(cond(&s2, READY).reason, "SecretNotFound");
        assert_eq!(cond(&s2, DEGRADED).status, "True");
        assert_eq!(cond(&s2, DEGRADED).message, "Secret hub not found");

        o.problem = None;
        o.conflicts = BTreeMap::from([("docker.io".to_string(), "x/a".to_string())]);
        let s3 = build_status(Some(&s2), &o, t1);
        assert_eq!(cond(&s3, CONFLICT).status, "True");
        assert!(
            cond(&s3, CONFLICT)
                .message
                .contains("docker.io is already mirrored by x/a")
        );
        assert_eq!(cond(&s3, READY).reason, "Conflict");
    }
}

//! The status logic's tests: claims, node counts, conditions, the rewrite's status.

use super::*;
use crate::api::mirror::RegistryMirrorSpec;
use std::sync::Arc;

fn mirror(ns: &str, name: &str, uid: &str, created: i64, registries: &[&str]) -> RegistryMirror {
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

fn arcs(ms: &[&RegistryMirror]) -> Vec<Arc<RegistryMirror>> {
    ms.iter().map(|m| Arc::new((*m).clone())).collect()
}

fn lost(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(r, m)| (r.to_string(), m.to_string()))
        .collect()
}

#[test]
fn the_oldest_mirror_that_can_serve_a_registry_serves_it() {
    let a = mirror("x", "a", "1", 100, &["docker.io", "ghcr.io"]);
    let b = mirror("y", "b", "2", 200, &["index.docker.io", "quay.io"]);
    let c = mirror("z", "c", "3", 50, &["registry.k8s.io"]);
    let all = arcs(&[&a, &b, &c]);
    assert_eq!(
        claims(&a, &all, can_claim),
        (vec!["docker.io".into(), "ghcr.io".into()], lost(&[]))
    );
    // A partial conflict: b still serves quay.io.
    assert_eq!(
        claims(&b, &all, can_claim),
        (vec!["quay.io".into()], lost(&[("docker.io", "x/a")]))
    );
    // Same age: the lower namespace/name wins, deterministically.
    let d = mirror("x", "d", "4", 100, &["ghcr.io"]);
    let all2 = arcs(&[&a, &d]);
    assert_eq!(claims(&a, &all2, can_claim).1, lost(&[]));
    assert_eq!(
        claims(&d, &all2, can_claim),
        (vec![], lost(&[("ghcr.io", "x/a")]))
    );
    // A mirror being deleted gives its registries up.
    let mut gone = a.clone();
    gone.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(300).unwrap()));
    assert_eq!(claims(&b, &arcs(&[&gone]), can_claim).1, lost(&[]));
}

#[test]
fn the_winner_is_the_oldest_claimant_not_the_first_found() {
    // Created in this order: hub (docker.io), alias (registry-1.docker.io, losing to
    // hub), public (docker.io). Whatever order the store lists them in, public lost
    // docker.io to hub.
    let hub = mirror("ns", "hub", "1", 100, &["docker.io"]);
    let alias = mirror("ns", "alias", "2", 200, &["registry-1.docker.io"]);
    let public = mirror("ns", "public", "3", 300, &["docker.io", "quay.io"]);
    for order in [
        arcs(&[&alias, &hub, &public]),
        arcs(&[&hub, &alias, &public]),
        arcs(&[&public, &alias, &hub]),
    ] {
        assert_eq!(
            claims(&public, &order, can_claim).1,
            lost(&[("docker.io", "ns/hub")])
        );
        assert_eq!(
            claims(&alias, &order, can_claim).1,
            lost(&[("docker.io", "ns/hub")])
        );
    }
}

#[test]
fn a_broken_mirror_wins_no_claim() {
    // The older mirror's spec cannot run (a duplicate registry the CRD missed): the
    // younger one serves quay.io.
    let mut broken = mirror("ns", "old", "1", 100, &["quay.io", "quay.io"]);
    let young = mirror("ns", "young", "2", 200, &["quay.io", "ghcr.io"]);
    assert!(!can_claim(&broken));
    assert_eq!(
        claims(&young, &arcs(&[&broken, &young]), can_claim),
        (vec!["quay.io".into(), "ghcr.io".into()], lost(&[]))
    );
    // Nor does one its last status says is Degraded (its Secret is missing) ...
    broken.spec.upstreams.pop();
    broken.status = Some(RegistryMirrorStatus {
        conditions: vec![Condition {
            type_: DEGRADED.into(),
            status: "True".into(),
            reason: "SecretNotFound".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::from_second(1).unwrap()),
        }],
        ..RegistryMirrorStatus::default()
    });
    assert!(!can_claim(&broken));
    // ... but nodes that ignore its files do not make a mirror lose its claims.
    broken.status.as_mut().unwrap().conditions[0].reason = NODES_IGNORING.into();
    assert!(can_claim(&broken));
    assert_eq!(
        claims(&young, &arcs(&[&broken]), can_claim).1,
        lost(&[("quay.io", "ns/old")])
    );
}

#[test]
fn rivals_share_a_registry() {
    let a = mirror("x", "a", "1", 100, &["docker.io"]);
    let b = mirror("y", "b", "2", 200, &["Index.Docker.io"]);
    let c = mirror("z", "c", "3", 50, &["quay.io"]);
    let all = arcs(&[&a, &b, &c]);
    let names: Vec<String> = rivals(&a, registry_keys(&a), &all)
        .map(|m| m.name_any())
        .collect();
    assert_eq!(names, ["b"]);
}

fn node(labels: &[(&str, &str)], annotation: Option<&str>) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(format!("node-{}", labels.len()));
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
        count_nodes(&m, &nodes).0,
        NodesStatus {
            configured: 1,
            total: 3,
            ignoring_mirrors: 0
        }
    );
    m.spec.nodes.selector = BTreeMap::from([("pool".to_string(), "a".to_string())]);
    assert_eq!(
        count_nodes(&m, &nodes).0,
        NodesStatus {
            configured: 1,
            total: 2,
            ignoring_mirrors: 0
        }
    );
    m.spec.nodes.configure = false;
    assert_eq!(count_nodes(&m, &nodes).0.total, 0);

    // A node whose agent wrote the files but whose containerd ignores them is not
    // configured, and is named.
    m.spec.nodes.configure = true;
    let mut ignoring = node(&[("pool", "a")], Some("ns/pub"));
    ignoring
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(CONTAINERD_ANNOTATION.into(), "not-set".into());
    let (counts, named) = count_nodes(&m, &[ignoring.clone()]);
    assert_eq!((counts.configured, counts.ignoring_mirrors), (0, 1));
    assert_eq!(named, [("node-1".to_string(), "not-set".to_string())]);
    // On a CRI-O node the drop-in counts, containerd's config_path does not.
    let annotations = ignoring.metadata.annotations.as_mut().unwrap();
    annotations.insert(
        RUNTIME_ANNOTATION.into(),
        "cri-o://1.29.1: hosts.toml, registries.conf.d".into(),
    );
    annotations.insert(REGISTRIES_CONF_ANNOTATION.into(), "in-place".into());
    assert_eq!(count_nodes(&m, &[ignoring.clone()]).0.configured, 1);
    let annotations = ignoring.metadata.annotations.as_mut().unwrap();
    annotations.insert(
        REGISTRIES_CONF_ANNOTATION.into(),
        "crio-not-reloaded".into(),
    );
    let (counts, named) = count_nodes(&m, &[ignoring]);
    assert_eq!((counts.configured, counts.ignoring_mirrors), (0, 1));
    assert_eq!(named[0].1, "CRI-O, registries.conf.d crio-not-reloaded");
}

#[test]
fn the_rewrite_is_active_only_when_ready_and_reachable_and_missed_pods_degrade() {
    let t0 = Timestamp::from_second(1000).unwrap();
    let t1 = Timestamp::from_second(2000).unwrap();
    let mut o = Observed {
        generation: Some(1),
        replicas: 1,
        ready_replicas: 1,
        updated_replicas: 1,
        endpoint: Some("http://10.0.0.1:5000".into()),
        served: vec!["docker.io".into()],
        rewrite: Some(RewriteObserved {
            address: "127.0.0.1:5001".into(),
            entry_points: Some((0, 3)),
            ..RewriteObserved::default()
        }),
        ..Observed::default()
    };
    let rewrite = |s: &RegistryMirrorStatus| s.rewrite.clone().unwrap();
    // No entry point ready yet: not active, and says why.
    let s0 = build_status(None, &o, t0);
    assert!(!rewrite(&s0).active);
    assert!(rewrite(&s0).message.contains("no node-local entry point"));
    assert_eq!(rewrite(&s0).since, Some(Time(t0)));
    assert_eq!(rewrite(&s0).entry_points_desired, 3);
    // One ready: active; since stays.
    o.rewrite.as_mut().unwrap().entry_points = Some((1, 3));
    let s1 = build_status(Some(&s0), &o, t1);
    assert!(rewrite(&s1).active);
    assert_eq!(rewrite(&s1).since, Some(Time(t0)));
    assert_eq!(rewrite(&s1).address, "127.0.0.1:5001");
    // The mirror not Ready: not active.
    o.ready_replicas = 0;
    let s2 = build_status(Some(&s1), &o, t1);
    assert!(!rewrite(&s2).active);
    assert!(rewrite(&s2).message.contains("not Ready"));
    // Pods the webhook missed: Degraded names how many; Ready stays.
    o.ready_replicas = 1;
    o.rewrite.as_mut().unwrap().missed_pods = 2;
    let s3 = build_status(Some(&s2), &o, t1);
    assert!(rewrite(&s3).active);
    assert_eq!(rewrite(&s3).missed_pods, 2);
    assert_eq!(cond(&s3, DEGRADED).reason, PODS_NOT_REWRITTEN);
    assert!(cond(&s3, DEGRADED).message.starts_with("2 running pod(s)"));
    assert_eq!(cond(&s3, READY).status, "True");
    // Nodes that cannot follow the rewrite at all: Degraded, not active.
    o.rewrite.as_mut().unwrap().unreachable = Some("relays plain HTTP".into());
    let s4 = build_status(Some(&s3), &o, t1);
    assert!(!rewrite(&s4).active);
    assert_eq!(cond(&s4, DEGRADED).reason, REWRITE_UNREACHABLE);
    // Private images left as written are said.
    o.rewrite.as_mut().unwrap().unreachable = None;
    o.rewrite.as_mut().unwrap().private = vec!["ghcr.io".into()];
    let s5 = build_status(Some(&s4), &o, t1);
    assert!(rewrite(&s5).active);
    assert!(
        rewrite(&s5)
            .message
            .contains("images of ghcr.io (upstreamAuth) stay as written")
    );
    // Without spec.rewrite, no status of it.
    o.rewrite = None;
    assert!(build_status(Some(&s5), &o, t1).rewrite.is_none());
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
        served: vec!["docker.io".into()],
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

    // Every registry lost: not Ready, nothing rolling out.
    o.problem = None;
    o.served.clear();
    o.conflicts = BTreeMap::from([("docker.io".to_string(), "x/a".to_string())]);
    let s3 = build_status(Some(&s2), &o, t1);
    assert_eq!(cond(&s3, CONFLICT).status, "True");
    assert!(
        cond(&s3, CONFLICT)
            .message
            .contains("docker.io is already mirrored by x/a")
    );
    assert_eq!(cond(&s3, READY).reason, "Conflict");
    assert_eq!(cond(&s3, PROGRESSING).status, "False");
    assert_eq!(s3.lost_registries[0].mirrored_by, "x/a");

    // Some registries lost: Ready for the others, which the status lists.
    o.served = vec!["quay.io".into()];
    let s4 = build_status(Some(&s3), &o, t1);
    assert_eq!(cond(&s4, READY).status, "True");
    assert_eq!(cond(&s4, CONFLICT).status, "True");
    assert!(
        cond(&s4, CONFLICT)
            .message
            .contains("this mirror serves quay.io")
    );
    assert_eq!(s4.served_registries, ["quay.io"]);

    // Nodes that ignore the files: Degraded says where, Ready stays.
    o.nodes_ignoring = vec![("n1".into(), "not-set".into())];
    let s5 = build_status(Some(&s4), &o, t1);
    assert_eq!(cond(&s5, DEGRADED).reason, NODES_IGNORING);
    assert!(cond(&s5, DEGRADED).message.contains("n1 (not-set)"));
    assert_eq!(cond(&s5, READY).status, "True");
}

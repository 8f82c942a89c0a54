//! The webhook's rules, one test each, and its wire format: a review in, the patch out,
//! applied as the API server would.

use super::audit::missed_by;
use super::decide::{Namespace as NsView, Operation, Outcome, Reason, decide};
use super::{Views, Webhook};
use crate::api::mirror::rewrite::{NOT_REWRITTEN, ORIGINAL_IMAGES, REWRITTEN_BY, REWRITTEN_LABEL};
use crate::api::mirror::{RegistryMirror, RegistryMirrorStatus, RewriteStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A mirror `m` of namespace `cache`, serving `served`, Ready with a ready replica and an
/// active rewrite unless `ready` is false.
fn mirror(spec: &str, served: &[&str], ready: bool) -> Arc<RegistryMirror> {
    let mut m = RegistryMirror::new("m", serde_yaml::from_str(spec).unwrap());
    m.metadata.namespace = Some("cache".into());
    m.metadata.creation_timestamp = Some(Time("2026-01-01T00:00:00Z".parse().unwrap()));
    let status = if ready { "True" } else { "False" };
    m.status = Some(RegistryMirrorStatus {
        served_registries: served.iter().map(|s| s.to_string()).collect(),
        ready_replicas: i32::from(ready),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: "ProxyReady".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }],
        rewrite: Some(RewriteStatus {
            active: ready,
            since: Some(Time("2026-06-01T00:00:00Z".parse().unwrap())),
            ..RewriteStatus::default()
        }),
        ..RegistryMirrorStatus::default()
    });
    Arc::new(m)
}

const SPEC: &str = "
upstreams:
  - {registry: docker.io}
  - {registry: registry.local:5000, url: 'http://127.0.0.1:1'}
  - registry: ghcr.io
    credentialsSecretRef: {name: ghcr}
rewrite: {}
";

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

fn app(image: &str) -> Pod {
    pod(json!({
        "metadata": {"name": "app", "namespace": "team", "labels": {"app": "a"},
                     "creationTimestamp": "2026-07-01T00:00:00Z"},
        "spec": {"containers": [{"name": "app", "image": image}]}
    }))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn team() -> BTreeMap<String, String> {
    labels(&[("kubernetes.io/metadata.name", "team"), ("env", "prod")])
}

fn run(
    pod: &Pod,
    ns: &str,
    ns_labels: &BTreeMap<String, String>,
    mirrors: &[Arc<RegistryMirror>],
) -> super::decide::Decision {
    decide(
        pod,
        &NsView {
            name: ns,
            labels: ns_labels,
        },
        Operation::Create,
        mirrors,
    )
}

/// Applies a JSON patch of `add` and `replace` operations, as the API server would.
fn apply(mut doc: Value, patch: &[Value]) -> Value {
    for op in patch {
        let path = op["path"].as_str().unwrap();
        let parts: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = parts.split_last().unwrap();
        let mut at = &mut doc;
        for p in parents {
            at = match at {
                Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
                Value::Object(o) => o.get_mut(p).unwrap_or_else(|| panic!("no {p} in {path}")),
                _ => panic!("{path}"),
            };
        }
        let value = op["value"].clone();
        match (op["op"].as_str().unwrap(), at) {
            ("replace", Value::Array(a)) => a[last.parse::<usize>().unwrap()] = value,
            ("replace", Value::Object(o)) => {
                assert!(o.contains_key(last), "replace of a missing {path}");
                o.insert(last.clone(), value);
            }
            ("add", Value::Object(o)) => {
                o.insert(last.clone(), value);
            }
            (op, _) => panic!("{op} {path}"),
        }
    }
    doc
}

fn patched(pod: &Pod, patch: &[Value]) -> Pod {
    serde_json::from_value(apply(serde_json::to_value(pod).unwrap(), patch)).unwrap()
}

#[test]
fn every_container_kind_is_rewritten_keeping_tags_and_digests_and_the_originals() {
    let m = mirror(SPEC, &["docker.io", "registry.local:5000", "ghcr.io"], true);
    let p = pod(json!({
        "metadata": {"name": "app", "namespace": "team"},
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox:1.36"}],
            "containers": [
                {"name": "app", "image": format!("registry.local:5000/team/app:1@{DIGEST}")},
                {"name": "side", "image": "quay.io/other/side:2"},
                {"name": "gh", "image": "ghcr.io/org/tool:3"}
            ],
            "ephemeralContainers": [{"name": "debug", "image": "alpine"}]
        }
    }));
    let d = run(&p, "team", &team(), &[m]);
    assert_eq!(d.outcomes["cache/m"], Outcome::Rewritten(4));
    let after = patched(&p, &d.patch);
    let spec = after.spec.as_ref().unwrap();
    let image = |c: &Option<String>| c.clone().unwrap();
    assert_eq!(
        image(&spec.containers[0].image),
        format!("127.0.0.1:5001/registry.local_5000/team/app:1@{DIGEST}")
    );
    // A registry the mirror does not serve stays.
    assert_eq!(image(&spec.containers[1].image), "quay.io/other/side:2");
    assert_eq!(
        image(&spec.containers[2].image),
        "127.0.0.1:5001/ghcr.io/org/tool:3"
    );
    assert_eq!(
        image(&spec.init_containers.as_ref().unwrap()[0].image),
        "127.0.0.1:5001/docker.io/library/busybox:1.36"
    );
    assert_eq!(
        image(&spec.ephemeral_containers.as_ref().unwrap()[0].image),
        "127.0.0.1:5001/docker.io/library/alpine:latest"
    );
    let meta = &after.metadata;
    assert_eq!(meta.labels.as_ref().unwrap()[REWRITTEN_LABEL], "true");
    let a = meta.annotations.as_ref().unwrap();
    assert_eq!(a[REWRITTEN_BY], "cache/m");
    let originals: BTreeMap<String, String> = serde_json::from_str(&a[ORIGINAL_IMAGES]).unwrap();
    assert_eq!(originals.len(), 4);
    assert_eq!(
        originals["app"],
        format!("registry.local:5000/team/app:1@{DIGEST}")
    );
    assert_eq!(originals["init"], "busybox:1.36");
    assert!(!a.contains_key(NOT_REWRITTEN));
}

#[test]
fn a_given_address_is_used_and_existing_labels_and_annotations_stay() {
    let spec = SPEC.replace("rewrite: {}", "rewrite: {address: 'mirror.example.com'}");
    let m = mirror(&spec, &["docker.io"], true);
    let p = pod(json!({
        "metadata": {"name": "app", "labels": {"app": "a"}, "annotations": {"x/y": "z"}},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}
    }));
    let after = patched(&p, &run(&p, "team", &team(), &[m]).patch);
    assert_eq!(
        after.spec.unwrap().containers[0].image.as_deref(),
        Some("mirror.example.com/docker.io/library/nginx:1.27")
    );
    let labels = after.metadata.labels.unwrap();
    assert_eq!(
        (labels["app"].as_str(), labels[REWRITTEN_LABEL].as_str()),
        ("a", "true")
    );
    assert_eq!(after.metadata.annotations.unwrap()["x/y"], "z");
}

#[test]
fn no_rewrite_while_the_mirror_is_not_ready_or_has_no_ready_replica_or_entry_point() {
    let p = app("nginx:1.27");
    let check = |m: RegistryMirror| {
        let d = run(&p, "team", &team(), &[Arc::new(m)]);
        assert_eq!(d.outcomes["cache/m"], Outcome::Left(Reason::MirrorNotReady));
        let after = patched(&p, &d.patch);
        assert_eq!(
            after.spec.unwrap().containers[0].image.as_deref(),
            Some("nginx:1.27")
        );
        let a = after.metadata.annotations.unwrap();
        assert_eq!(a[NOT_REWRITTEN], "mirror-not-ready");
        assert!(!after.metadata.labels.unwrap().contains_key(REWRITTEN_LABEL));
    };
    // Not Ready.
    check(RegistryMirror::clone(&mirror(SPEC, &["docker.io"], false)));
    // Ready, but no replica ready (a status that lags).
    let mut m = RegistryMirror::clone(&mirror(SPEC, &["docker.io"], true));
    m.status.as_mut().unwrap().ready_replicas = 0;
    check(m);
    // Ready, but the controller says nodes cannot reach it (no entry point ready).
    let mut m = RegistryMirror::clone(&mirror(SPEC, &["docker.io"], true));
    m.status.as_mut().unwrap().rewrite.as_mut().unwrap().active = false;
    check(m);
    // No status at all yet.
    let mut m = RegistryMirror::clone(&mirror(SPEC, &["docker.io"], true));
    m.status.as_mut().unwrap().rewrite = None;
    check(m);
}

#[test]
fn static_pods_own_pods_and_opted_out_pods_are_never_touched() {
    let m = mirror(SPEC, &["docker.io"], true);
    let with = |meta: Value| {
        let mut p = app("nginx:1.27");
        let extra: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
            serde_json::from_value(meta).unwrap();
        p.metadata.annotations = extra.annotations;
        p.metadata.labels = extra.labels;
        p
    };
    for p in [
        with(json!({"annotations": {"kubernetes.io/config.mirror": "abc"}})),
        with(json!({"annotations": {"pullthrough.dev/rewrite": "false"}})),
        with(
            json!({"labels": {"app.kubernetes.io/name": "pullthrough", "app.kubernetes.io/component": "entry-point"}}),
        ),
        with(
            json!({"labels": {"app.kubernetes.io/name": "pullthrough", "app.kubernetes.io/component": "proxy"}}),
        ),
    ] {
        let d = run(&p, "team", &team(), std::slice::from_ref(&m));
        assert!(
            d.patch.is_empty() && d.outcomes.is_empty(),
            "{:?}",
            p.metadata
        );
    }
}

#[test]
fn a_pod_whose_owner_compares_images_is_left_and_marked() {
    let m = mirror(SPEC, &["docker.io"], true);
    let mut p = app("postgres:16");
    p.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster", "name": "db", "uid": "u", "controller": true
    })).unwrap()]);
    let d = run(&p, "team", &team(), &[m]);
    assert_eq!(
        d.outcomes["cache/m"],
        Outcome::Left(Reason::OwnerComparesImages)
    );
    let after = patched(&p, &d.patch);
    assert_eq!(
        after.spec.unwrap().containers[0].image.as_deref(),
        Some("postgres:16")
    );
    assert_eq!(
        after.metadata.annotations.unwrap()[NOT_REWRITTEN],
        "owner-compares-images"
    );
}

#[test]
fn private_images_of_upstream_auth_upstreams_stay_with_their_pull_secrets() {
    let m = mirror(SPEC, &["docker.io", "ghcr.io"], true);
    let mut p = pod(json!({
        "metadata": {"name": "app"},
        "spec": {
            "imagePullSecrets": [{"name": "mine"}],
            "containers": [
                {"name": "private", "image": "ghcr.io/org/secret:1"},
                {"name": "public", "image": "nginx:1.27"}
            ]
        }
    }));
    let d = run(&p, "team", &team(), std::slice::from_ref(&m));
    let after = patched(&p, &d.patch);
    let spec = after.spec.unwrap();
    // ghcr.io decides who may pull (credentials, so upstreamAuth): the pod's own
    // secrets must keep reaching it, so its image stays.
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("ghcr.io/org/secret:1")
    );
    // docker.io is open: rewritten, whatever the pod's secrets.
    assert_eq!(
        spec.containers[1].image.as_deref(),
        Some("127.0.0.1:5001/docker.io/library/nginx:1.27")
    );
    assert_eq!(
        after.metadata.annotations.unwrap()[NOT_REWRITTEN],
        "private-images"
    );
    // Without pull secrets the pod could pull only what is public: rewritten, and the
    // mirror asks the upstream with no credentials of the pod's (none to lose).
    p.spec.as_mut().unwrap().image_pull_secrets = None;
    let d = run(&p, "team", &team(), &[m]);
    assert_eq!(d.outcomes["cache/m"], Outcome::Rewritten(2));
}

#[test]
fn scope_system_and_own_namespaces_selectors_and_exclusions() {
    let p = app("nginx:1.27");
    let rewritten = |spec: &str, ns: &str, ns_labels: &BTreeMap<String, String>, pod: &Pod| {
        let m = mirror(spec, &["docker.io"], true);
        !run(pod, ns, ns_labels, &[m]).patch.is_empty()
    };
    let system = labels(&[("kubernetes.io/metadata.name", "kube-system")]);
    let own = labels(&[("kubernetes.io/metadata.name", "cache")]);
    assert!(rewritten(SPEC, "team", &team(), &p));
    assert!(!rewritten(SPEC, "kube-system", &system, &p));
    assert!(!rewritten(SPEC, "cache", &own, &p));
    let include = SPEC.replace("rewrite: {}", "rewrite: {includeSystemNamespaces: true}");
    assert!(rewritten(&include, "kube-system", &system, &p));
    assert!(rewritten(&include, "cache", &own, &p));
    let excluded = SPEC.replace("rewrite: {}", "rewrite: {excludeNamespaces: [team]}");
    assert!(!rewritten(&excluded, "team", &team(), &p));
    let by_ns = SPEC.replace(
        "rewrite: {}",
        "rewrite: {namespaceSelector: {matchLabels: {env: prod}}}",
    );
    assert!(rewritten(&by_ns, "team", &team(), &p));
    let dev = labels(&[("kubernetes.io/metadata.name", "dev"), ("env", "dev")]);
    assert!(!rewritten(&by_ns, "dev", &dev, &p));
    let by_pod = SPEC.replace(
        "rewrite: {}",
        "rewrite: {objectSelector: {matchLabels: {app: b}}}",
    );
    assert!(!rewritten(&by_pod, "team", &team(), &p));
    let by_pod = SPEC.replace(
        "rewrite: {}",
        "rewrite: {objectSelector: {matchLabels: {app: a}}}",
    );
    assert!(rewritten(&by_pod, "team", &team(), &p));
    let images = SPEC.replace(
        "rewrite: {}",
        "rewrite: {excludeImages: ['docker.io/library/nginx:*']}",
    );
    assert!(!rewritten(&images, "team", &team(), &p));
    assert!(rewritten(&images, "team", &team(), &app("redis:7")));
    // A mirror without spec.rewrite rewrites nothing.
    let off = SPEC.replace("rewrite: {}", "");
    assert!(!rewritten(&off, "team", &team(), &p));
}

#[test]
fn a_registry_another_mirror_serves_goes_to_that_one() {
    let mut other = RegistryMirror::clone(&mirror(
        &SPEC.replace("rewrite: {}", "rewrite: {entryPoint: {port: 5002}}"),
        &["registry.local:5000"],
        true,
    ));
    other.metadata.name = Some("other".into());
    let mine = mirror(SPEC, &["docker.io"], true);
    let p = pod(json!({"metadata": {"name": "x"}, "spec": {"containers": [
        {"name": "a", "image": "registry.local:5000/team/app:1"},
        {"name": "b", "image": "nginx:1"}
    ]}}));
    let d = run(&p, "team", &team(), &[mine, Arc::new(other)]);
    let after = patched(&p, &d.patch);
    let c = after.spec.unwrap().containers;
    assert_eq!(
        c[0].image.as_deref(),
        Some("127.0.0.1:5002/registry.local_5000/team/app:1")
    );
    assert_eq!(
        c[1].image.as_deref(),
        Some("127.0.0.1:5001/docker.io/library/nginx:1")
    );
    assert_eq!(
        after.metadata.annotations.unwrap()[REWRITTEN_BY],
        "cache/m,cache/other"
    );
}

#[test]
fn ephemeral_containers_alone_are_patched_on_their_subresource() {
    let m = mirror(SPEC, &["docker.io"], true);
    let p = pod(json!({
        "metadata": {"name": "app", "labels": {REWRITTEN_LABEL: "true"}},
        "spec": {
            "containers": [{"name": "app", "image": "127.0.0.1:5001/docker.io/library/nginx:1"}],
            "ephemeralContainers": [{"name": "debug", "image": "busybox"}]
        }
    }));
    let d = decide(
        &p,
        &NsView {
            name: "team",
            labels: &team(),
        },
        Operation::EphemeralContainers,
        &[m],
    );
    assert_eq!(
        d.patch,
        vec![
            json!({"op": "replace", "path": "/spec/ephemeralContainers/0/image",
            "value": "127.0.0.1:5001/docker.io/library/busybox:latest"})
        ]
    );
}

#[test]
fn the_audit_counts_pods_the_webhook_never_answered_for() {
    let m = mirror(SPEC, &["docker.io"], true);
    let view_labels = team();
    let ns = NsView {
        name: "team",
        labels: &view_labels,
    };
    let missed = |p: &Pod| missed_by(p, &ns, std::slice::from_ref(&m));
    // Admitted unrewritten, unmarked, after the mirror began rewriting: missed.
    let p = app("nginx:1.27");
    assert_eq!(missed(&p), vec!["cache/m".to_string()]);
    // Even while the mirror is not Ready: the webhook would have marked it.
    let down = mirror(SPEC, &["docker.io"], false);
    assert_eq!(missed_by(&p, &ns, &[down]).len(), 1);
    // Rewritten, or marked as left alone: seen.
    let mut seen = p.clone();
    seen.metadata.labels = Some(labels(&[(REWRITTEN_LABEL, "true")]));
    assert!(missed(&seen).is_empty());
    let mut left = p.clone();
    left.metadata.annotations = Some(labels(&[(NOT_REWRITTEN, "mirror-not-ready")]));
    assert!(missed(&left).is_empty());
    // Created before the mirror rewrote, finished, or out of scope: not counted.
    let mut old = p.clone();
    old.metadata.creation_timestamp = Some(Time("2026-05-01T00:00:00Z".parse().unwrap()));
    assert!(missed(&old).is_empty());
    let mut done = p.clone();
    done.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).unwrap());
    assert!(missed(&done).is_empty());
    assert!(missed(&app("quay.io/x/y:1")).is_empty());
    let mut opted = p.clone();
    opted.metadata.annotations = Some(labels(&[("pullthrough.dev/rewrite", "false")]));
    assert!(missed(&opted).is_empty());
}

fn review(pod: &Pod, sub_resource: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "subResource": sub_resource,
            "namespace": "team", "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": pod, "oldObject": null, "dryRun": false
        }
    }))
    .unwrap()
}

/// Views over fixed stores (no API server).
fn views(mirrors: Vec<Arc<RegistryMirror>>) -> Views {
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;
    let (store, mut writer) = reflector::store::<RegistryMirror>();
    writer.apply_watcher_event(&Event::Init);
    for m in mirrors {
        writer.apply_watcher_event(&Event::InitApply(RegistryMirror::clone(&m)));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let (namespaces, mut nw) = reflector::store();
    nw.apply_watcher_event(&Event::Init);
    nw.apply_watcher_event(&Event::InitDone);
    Views::over(store, namespaces)
}

#[test]
fn the_wire_a_review_in_an_always_allowed_patched_answer_out() {
    use base64::Engine as _;
    let webhook = Webhook {
        views: views(vec![mirror(SPEC, &["docker.io"], true)]),
        metrics: crate::controller::ControllerMetrics::new(),
    };
    let p = app("nginx:1.27");
    let answer = webhook.review(&review(&p, None)).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let r = &answer["response"];
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().unwrap())
        .unwrap();
    let patch: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let after = patched(&p, &patch);
    assert_eq!(
        after.spec.unwrap().containers[0].image.as_deref(),
        Some("127.0.0.1:5001/docker.io/library/nginx:1.27")
    );
    let metrics = webhook.metrics.render();
    assert!(
        metrics.contains(r#"pullthrough_rewrite_pods_total{outcome="rewritten"} 1"#),
        "{metrics}"
    );
    // Nothing to do: allowed, no patch. A subresource other than ephemeral containers
    // (a pod's status, a binding): the same.
    let answer = webhook
        .review(&review(&app("quay.io/a/b:1"), None))
        .unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    let answer = webhook.review(&review(&p, Some("status"))).unwrap();
    assert!(answer["response"].get("patch").is_none());
    // Not a review: an error, which the API server meets with failurePolicy Ignore.
    assert!(webhook.review(b"{}").is_err());
    assert!(webhook.review(b"not json").is_err());
}

//! The reconciler's side effects against a mocked API server (kube-rs/controller-rs's
//! tower-test pattern): every request the controller sends is recorded and answered by a
//! small fake that knows the objects of each scenario ([`crate::common::fake_api`]).

use crate::common::fake_api::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use pullthrough::api::mirror::{FINALIZER, RegistryMirror};
use pullthrough::controller::{error_policy, reconcile};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn a_new_mirror_gets_its_finalizer_first() {
    let f = fake(World::default());
    let m = mirror("public", 100, "upstreams: [{registry: docker.io}]", false);
    let action = reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(f.summary(), vec!["PATCH registrymirrors"]);
    let patch = &f.calls()[0].body;
    assert_eq!(patch["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(
        patch["metadata"]["resourceVersion"], "1",
        "optimistic concurrency"
    );
}

#[tokio::test]
async fn create_applies_every_child_and_reports_status() {
    let world = World {
        ready_replicas: 2,
        nodes: vec![
            node("n1", Some("pullthrough-system/public")),
            node("n2", None),
        ],
        ..World::default()
    };
    let f = fake(world);
    let m = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io}]\nreplicas: 2",
        true,
    );
    let action = reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert_eq!(
        f.summary(),
        vec![
            // The admin token Secret every mirror's replicas are asked with.
            "GET secrets",
            "POST pullthrough-system",
            "PATCH configmaps",
            "PATCH deployments",
            "DELETE statefulsets",
            "PATCH services",
            "DELETE services",
            "PATCH poddisruptionbudgets",
            "GET customresourcedefinitions",
            "GET nodes",
            "PATCH status",
            "POST events",
        ]
    );
    for c in f
        .calls()
        .iter()
        .filter(|c| c.method == "PATCH" && !c.path.contains("registrymirrors"))
    {
        assert!(
            c.query.contains("fieldManager=pullthrough-controller"),
            "{c:?}"
        );
        assert!(c.query.contains("force=true"), "server-side apply: {c:?}");
        assert_eq!(
            c.body["metadata"]["ownerReferences"][0]["uid"], "uid-public",
            "{}",
            c.path
        );
    }
    let cm = f.find("PATCH", "/configmaps/pullthrough-public");
    let config: pullthrough::api::ProxyConfig =
        pullthrough::api::ProxyConfig::from_yaml(cm.body["data"]["config.yaml"].as_str().unwrap())
            .unwrap();
    assert_eq!(config.upstreams[0].registry, "docker.io");
    let dep = f.find("PATCH", "/deployments/pullthrough-public");
    assert_eq!(dep.body["spec"]["replicas"], 2);
    assert_eq!(
        dep.body["spec"]["template"]["spec"]["containers"][0]["image"],
        "example.org/pullthrough:test"
    );
    assert!(
        dep.body["spec"]["template"]["metadata"]["annotations"]["pullthrough.dev/config-hash"]
            .is_string()
    );

    let applied = f.find("PATCH", "/registrymirrors/public/status");
    assert!(
        applied
            .query
            .contains("fieldManager=pullthrough-controller")
            && applied.query.contains("force=true"),
        "status by server-side apply: {applied:?}"
    );
    assert_eq!(applied.body["kind"], "RegistryMirror");
    let status = applied.body;
    assert_eq!(status["status"]["endpoint"], "http://10.96.0.10:5000");
    assert_eq!(status["status"]["readyReplicas"], 2);
    assert_eq!(status["status"]["storage"], "emptyDir");
    assert_eq!(status["status"]["observedGeneration"], 1);
    assert_eq!(
        status["status"]["nodes"],
        json!({"configured": 1, "total": 2, "ignoringMirrors": 0})
    );
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    assert_eq!(condition(&status, "Conflict")["status"], "False");
    let event = f.find("POST", "/events").body;
    assert_eq!(event["reason"], "ProxyReady");
    assert_eq!(event["regarding"]["name"], "public");
    assert!(
        f.ctx
            .metrics
            .render()
            .contains(r#"pullthrough_reconcile_total{result="success"} 1"#),
        "{}",
        f.ctx.metrics.render()
    );
}

#[tokio::test]
async fn a_mirror_on_s3_runs_replicas_that_find_each_other_through_a_headless_service() {
    let f = fake(World::default());
    let m = mirror(
        "shared",
        100,
        "upstreams: [{registry: docker.io}]\nreplicas: 3\ncache: {storage: {s3: {bucket: cache, prefix: hub}}}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    let summary = f.summary();
    assert_eq!(
        summary.iter().filter(|c| *c == "PATCH services").count(),
        2,
        "{summary:?}"
    );
    assert!(
        !summary
            .iter()
            .any(|c| c.contains("statefulsets") && c.starts_with("PATCH"))
    );
    let peers = f.find("PATCH", "/services/pullthrough-shared-peers");
    assert_eq!(peers.body["spec"]["clusterIP"], "None");
    let cm = f.find("PATCH", "/configmaps/pullthrough-shared");
    let config =
        pullthrough::api::ProxyConfig::from_yaml(cm.body["data"]["config.yaml"].as_str().unwrap())
            .unwrap();
    assert_eq!(config.storage.s3.unwrap().bucket, "cache");
    assert_eq!(
        config.peers.unwrap().dns.as_deref(),
        Some("pullthrough-shared-peers")
    );
    let status = f.find("PATCH", "/registrymirrors/shared/status").body;
    assert_eq!(status["status"]["storage"], "s3://cache/hub");
}

#[tokio::test]
async fn a_bucket_with_a_size_limit_gets_its_replicas_a_lease_of_their_own() {
    let f = fake(World::default());
    let m = mirror(
        "shared",
        100,
        "upstreams: [{registry: docker.io}]\nreplicas: 3\ncache: {storage: {s3: {bucket: cache, maxSize: 200Gi}}}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    let sa = f.find("PATCH", "/serviceaccounts/pullthrough-shared-proxy");
    assert_eq!(sa.body["kind"], "ServiceAccount");
    let role = f.find("PATCH", "/roles/pullthrough-shared-evictor");
    assert_eq!(
        role.body["rules"][1]["resourceNames"][0],
        "pullthrough-shared-evictor"
    );
    let binding = f.find("PATCH", "/rolebindings/pullthrough-shared-evictor");
    assert_eq!(
        binding.body["subjects"][0]["name"],
        "pullthrough-shared-proxy"
    );
    let dep = f.find("PATCH", "/deployments/pullthrough-shared");
    let pod = &dep.body["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "pullthrough-shared-proxy");
    let cm = f.find("PATCH", "/configmaps/pullthrough-shared");
    let config =
        pullthrough::api::ProxyConfig::from_yaml(cm.body["data"]["config.yaml"].as_str().unwrap())
            .unwrap();
    assert_eq!(config.max_cache_bytes, Some(200 << 30));
    let lease = config.storage.s3.unwrap().eviction.lease;
    assert_eq!(lease.as_deref(), Some("pullthrough-shared-evictor"));

    // Without the limit the three go.
    let f = fake(World::default());
    let m = mirror(
        "shared",
        100,
        "upstreams: [{registry: docker.io}]\ncache: {storage: {s3: {bucket: cache}}}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    for part in ["/rolebindings/", "/roles/", "/serviceaccounts/"] {
        f.find("DELETE", part);
    }
}

#[tokio::test]
async fn updates_roll_the_pods_and_storage_switches_the_workload() {
    let f = fake(World {
        ready_replicas: 1,
        service_monitor_crd: true,
        ..World::default()
    });
    let m1 = mirror("public", 100, "upstreams: [{registry: docker.io}]", true);
    reconcile(Arc::new(m1.clone()), f.ctx.clone())
        .await
        .unwrap();
    let hash = |c: &Call| {
        c.body["spec"]["template"]["metadata"]["annotations"]["pullthrough.dev/config-hash"].clone()
    };
    let first = hash(&f.find("PATCH", "/deployments/"));
    // The ServiceMonitor CRD exists here, so one is applied; PDB deleted for 1 replica.
    let sm = f.find("PATCH", "/apis/monitoring.coreos.com/v1/namespaces/pullthrough-system/servicemonitors/pullthrough-public");
    assert_eq!(sm.body["kind"], "ServiceMonitor");
    f.find("DELETE", "/poddisruptionbudgets/pullthrough-public");

    let mut m2 = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io}]\ncache: {tagTTL: 1m}",
        true,
    );
    m2.metadata.generation = Some(2);
    f.calls.lock().unwrap().clear();
    reconcile(Arc::new(m2), f.ctx.clone()).await.unwrap();
    let second = hash(&f.find("PATCH", "/deployments/"));
    assert_ne!(first, second, "a config change rolls the pods");
    assert!(
        f.find("PATCH", "/configmaps/").body["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .contains("tagTTL: 1m")
    );

    let mut m3 = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io}]\ncache: {storage: {size: 10Gi}}",
        true,
    );
    m3.metadata.generation = Some(3);
    f.calls.lock().unwrap().clear();
    reconcile(Arc::new(m3), f.ctx.clone()).await.unwrap();
    let sts = f.find("PATCH", "/statefulsets/pullthrough-public");
    assert_eq!(
        sts.body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "10Gi"
    );
    f.find("DELETE", "/deployments/pullthrough-public");
}

#[tokio::test]
async fn the_younger_of_two_mirrors_of_one_registry_reports_a_conflict() {
    let mut f = fake(World {
        ready_replicas: 1,
        ..World::default()
    });
    let older = mirror("hub", 100, "upstreams: [{registry: docker.io}]", true);
    let newer = mirror(
        "public",
        200,
        "upstreams: [{registry: index.docker.io}, {registry: ghcr.io}]",
        true,
    );
    f.add_to_store(&older);
    f.add_to_store(&newer);
    reconcile(Arc::new(newer), f.ctx.clone()).await.unwrap();
    let status = f.find("PATCH", "/registrymirrors/public/status").body;
    let conflict = condition(&status, "Conflict");
    assert_eq!(conflict["status"], "True");
    assert_eq!(conflict["reason"], "RegistryClaimed");
    assert!(
        conflict["message"]
            .as_str()
            .unwrap()
            .contains("docker.io is already mirrored by pullthrough-system/hub")
    );
    // It still serves the registry nobody else does: Ready for that one, and the status
    // says which it serves and which it lost to whom.
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(
        status["status"]["servedRegistries"],
        serde_json::json!(["ghcr.io"])
    );
    assert_eq!(
        status["status"]["lostRegistries"],
        serde_json::json!([{"registry": "docker.io", "mirroredBy": "pullthrough-system/hub"}])
    );
    f.find("PATCH", "/deployments/pullthrough-public");
    let events: Vec<Value> = f
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with("/events"))
        .map(|c| c.body)
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "RegistryClaimed" && e["type"] == "Warning"),
        "{events:?}"
    );

    // The older one is unaffected.
    f.calls.lock().unwrap().clear();
    reconcile(Arc::new(older.clone()), f.ctx.clone())
        .await
        .unwrap();
    let status = f.find("PATCH", "/registrymirrors/hub/status").body;
    assert_eq!(condition(&status, "Conflict")["status"], "False");
    assert_eq!(condition(&status, "Ready")["status"], "True");

    // A mirror that lost every registry runs nothing: its children are deleted, none
    // is applied.
    let loser = mirror(
        "dup",
        300,
        "upstreams: [{registry: registry-1.docker.io}]",
        true,
    );
    f.add_to_store(&loser);
    f.calls.lock().unwrap().clear();
    reconcile(Arc::new(loser), f.ctx.clone()).await.unwrap();
    let status = f.find("PATCH", "/registrymirrors/dup/status").body;
    assert_eq!(condition(&status, "Ready")["reason"], "Conflict");
    assert!(
        condition(&status, "Conflict")["message"]
            .as_str()
            .unwrap()
            .contains("serves none of its registries")
    );
    for kind in ["deployments", "statefulsets", "services", "configmaps"] {
        f.find("DELETE", &format!("/{kind}/pullthrough-dup"));
    }
    assert!(
        !f.calls()
            .iter()
            .any(|c| c.method == "PATCH" && c.path.contains("/deployments/")),
        "a child was applied"
    );
}

#[tokio::test]
async fn a_broken_older_mirror_does_not_keep_a_registry() {
    let mut f = fake(World {
        ready_replicas: 1,
        ..World::default()
    });
    // Valid for the API server, not for the proxy: a pin on a registry it does not mirror.
    let broken = mirror(
        "broken",
        100,
        "upstreams: [{registry: quay.io}]\ncache: {pin: [\"ghcr.io/x/y:1\"]}",
        true,
    );
    let young = mirror("young", 200, "upstreams: [{registry: quay.io}]", true);
    f.add_to_store(&broken);
    f.add_to_store(&young);
    reconcile(Arc::new(young), f.ctx.clone()).await.unwrap();
    let status = f.find("PATCH", "/registrymirrors/young/status").body;
    assert_eq!(condition(&status, "Conflict")["status"], "False");
    assert_eq!(
        status["status"]["servedRegistries"],
        serde_json::json!(["quay.io"])
    );
}

#[tokio::test]
async fn a_missing_secret_degrades_the_mirror_and_touches_no_child() {
    let f = fake(World::default());
    let m = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io, credentialsSecretRef: {name: hub}}]\naccess: {plainHttp: true}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    assert_eq!(
        f.summary(),
        vec!["GET secrets", "GET nodes", "PATCH status", "POST events"]
    );
    let status = f.find("PATCH", "/status").body;
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretNotFound");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("Secret pullthrough-system/hub (credentials of docker.io) does not exist")
    );
    assert_eq!(condition(&status, "Ready")["reason"], "SecretNotFound");
    assert_eq!(f.find("POST", "/events").body["type"], "Warning");
}

#[tokio::test]
async fn a_secret_of_the_wrong_kind_is_reported() {
    let secret = json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"hub","namespace":NS},
        "type":"Opaque","data":{"password":"c2VjcmV0"}});
    let f = fake(World {
        secret: Some(secret),
        ..World::default()
    });
    let m = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io, credentialsSecretRef: {name: hub}}]\naccess: {plainHttp: true}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    let status = f.find("PATCH", "/status").body;
    assert_eq!(condition(&status, "Degraded")["reason"], "SecretInvalid");
    assert!(!f.summary().contains(&"PATCH deployments".to_string()));

    // A good Secret lets the children through, and its content is in the config hash.
    let auth = "dXNlcjpwYXNz"; // user:pass
    let good = json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"hub","namespace":NS},
        "type":"kubernetes.io/dockerconfigjson",
        "data":{".dockerconfigjson": base64(&format!(r#"{{"auths":{{"docker.io":{{"auth":"{auth}"}}}}}}"#))}});
    let f = fake(World {
        secret: Some(good),
        ready_replicas: 1,
        ..World::default()
    });
    let m = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io, credentialsSecretRef: {name: hub}}]\naccess: {plainHttp: true}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    let dep = f.find("PATCH", "/deployments/").body;
    let vols = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(vols.iter().any(|v| v["secret"]["secretName"] == "hub"));
}

#[tokio::test]
async fn an_invalid_spec_is_explained_in_a_condition() {
    let f = fake(World::default());
    let m = mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io}]\ncache: {staleIfError: forever}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    assert_eq!(
        f.summary(),
        vec!["GET nodes", "PATCH status", "POST events"]
    );
    let status = f.find("PATCH", "/status").body;
    let d = condition(&status, "Degraded");
    assert_eq!(d["reason"], "InvalidSpec");
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("cache.staleIfError")
    );
}

#[tokio::test]
async fn deletion_waits_for_node_agents_then_releases_the_finalizer() {
    let deleting = |ago_secs: i64| {
        let mut m = mirror("public", 100, "upstreams: [{registry: docker.io}]", true);
        m.metadata.deletion_timestamp =
            Some(Time(Timestamp::now() - SignedDuration::from_secs(ago_secs)));
        m
    };
    // A node still has the mirror's hosts.toml: wait, and touch nothing.
    let f = fake(World {
        nodes: vec![node("n1", Some("pullthrough-system/public"))],
        ..World::default()
    });
    let action = reconcile(Arc::new(deleting(5)), f.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(f.summary(), vec!["GET nodes"]);

    // Nodes clean: the finalizer goes.
    let f = fake(World {
        nodes: vec![node("n1", Some("other/mirror"))],
        ..World::default()
    });
    let action = reconcile(Arc::new(deleting(5)), f.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        f.summary(),
        vec!["GET nodes", "POST events", "PATCH registrymirrors"]
    );
    let patch = f.find("PATCH", "/registrymirrors/public").body;
    assert_eq!(patch["metadata"]["finalizers"], json!([]));
    assert_eq!(f.find("POST", "/events").body["reason"], "NodesCleaned");

    // A node that never reports back does not block deletion forever.
    let f = fake(World {
        nodes: vec![node("n1", Some("pullthrough-system/public"))],
        ..World::default()
    });
    reconcile(Arc::new(deleting(3600)), f.ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        f.find("POST", "/events").body["reason"],
        "NodeCleanupTimedOut"
    );
    assert_eq!(
        f.find("PATCH", "/registrymirrors/public").body["metadata"]["finalizers"],
        json!([])
    );
}

#[tokio::test]
async fn api_failures_requeue_with_growing_backoff() {
    let f = fake(World {
        fail_configmap: true,
        ..World::default()
    });
    let m = Arc::new(mirror(
        "public",
        100,
        "upstreams: [{registry: docker.io}]",
        true,
    ));
    let err = reconcile(m.clone(), f.ctx.clone()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("applying ConfigMap pullthrough-public"),
        "{err}"
    );
    assert_eq!(
        error_policy(m.clone(), &err, f.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(m.clone(), &err, f.ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(
        error_policy(m.clone(), &err, f.ctx.clone()),
        Action::requeue(Duration::from_secs(20))
    );
    assert!(
        f.ctx
            .metrics
            .render()
            .contains(r#"pullthrough_reconcile_total{result="kube_error"} 1"#)
    );
}

#[tokio::test]
async fn a_tls_mirror_with_credentials_serves_https_hands_nodes_its_ca_and_gets_a_signing_key() {
    let dockerconfig = base64(r#"{"auths":{"ghcr.io":{"auth":"dXNlcjpwYXNz"}}}"#);
    let ca = "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n";
    let pem = |s: &str| base64(&format!("-----BEGIN {s}-----\nx\n-----END {s}-----\n"));
    let f = fake(World {
        named: vec![
            (
                "gh".into(),
                json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"gh","namespace":NS},
                    "type":"kubernetes.io/dockerconfigjson","data":{".dockerconfigjson": dockerconfig}}),
            ),
            (
                "cert".into(),
                json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"cert","namespace":NS},
                    "type":"kubernetes.io/tls","data":{"tls.crt": pem("CERTIFICATE"),
                    "tls.key": pem("PRIVATE KEY"), "ca.crt": base64(ca)}}),
            ),
        ],
        ready_replicas: 1,
        ..World::default()
    });
    let m = mirror(
        "private",
        100,
        "upstreams: [{registry: ghcr.io, credentialsSecretRef: {name: gh}}]\ntls: {secretRef: {name: cert}}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    // The signing key: made, once, as a Secret the mirror owns.
    let created = f.find("POST", "/secrets");
    assert_eq!(
        created.body["metadata"]["name"],
        "pullthrough-private-access"
    );
    assert_eq!(
        created.body["metadata"]["ownerReferences"][0]["kind"],
        "RegistryMirror"
    );
    let key = created.body["stringData"]["signing-key"].as_str().unwrap();
    assert_eq!(key.len(), 64);
    let status = f.find("PATCH", "/status").body;
    assert_eq!(status["status"]["endpoint"], "https://10.96.0.10:5000");
    assert_eq!(status["status"]["caBundle"], ca);
    let dep = f.find("PATCH", "/deployments/").body;
    let vols = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(vols.iter().any(|v| v["secret"]["secretName"] == "cert"));
    assert!(
        vols.iter()
            .any(|v| v["secret"]["secretName"] == "pullthrough-private-access")
    );
    let config = f.find("PATCH", "/configmaps/").body;
    let yaml = config["data"]["config.yaml"].as_str().unwrap();
    assert!(
        yaml.contains("certFile: /var/run/pullthrough/tls/tls.crt"),
        "{yaml}"
    );
    assert!(
        yaml.contains("signingKeyFile: /var/run/pullthrough/access/signing-key"),
        "{yaml}"
    );

    // A key already there is kept.
    let f = fake(World {
        secret: Some(
            json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"x","namespace":NS},
            "type":"kubernetes.io/dockerconfigjson","data":{".dockerconfigjson": base64(r#"{"auths":{"ghcr.io":{"auth":"dXNlcjpwYXNz"}}}"#)}}),
        ),
        ready_replicas: 1,
        ..World::default()
    });
    let m = mirror(
        "private",
        100,
        "upstreams: [{registry: ghcr.io, credentialsSecretRef: {name: gh}}]\naccess: {plainHttp: true}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    assert!(
        !f.summary().contains(&"POST secrets".to_string()),
        "{:?}",
        f.summary()
    );
}

#[tokio::test]
async fn a_tls_mirror_waiting_for_its_certificate_already_has_the_address_it_must_name() {
    let f = fake(World::default());
    let m = mirror(
        "private",
        100,
        "upstreams: [{registry: ghcr.io}]\ntls: {secretRef: {name: cert}}",
        true,
    );
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    let summary = f.summary();
    assert!(
        summary.contains(&"PATCH services".to_string()),
        "{summary:?}"
    );
    assert!(
        !summary.contains(&"PATCH deployments".to_string()),
        "{summary:?}"
    );
    let status = f.find("PATCH", "/status").body;
    assert_eq!(condition(&status, "Degraded")["reason"], "SecretNotFound");
    assert_eq!(status["status"]["endpoint"], "https://10.96.0.10:5000");
}

/// What the prefetch controller's reflectors would hold: filled stores, and the
/// writers that change them.
struct Cluster {
    stores: pullthrough::controller::workloads::Stores,
    deployments: Writer<k8s_openapi::api::apps::v1::Deployment>,
    jobs: Writer<k8s_openapi::api::batch::v1::Job>,
    namespaces: Writer<k8s_openapi::api::core::v1::Namespace>,
    pods: Writer<k8s_openapi::api::core::v1::Pod>,
    all_pods: Writer<k8s_openapi::api::core::v1::Pod>,
}

/// A store with its first list done, empty, and its writer.
fn listed<K>() -> (reflector::Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

impl Cluster {
    fn new() -> Cluster {
        let (deployments, dw) = listed();
        let (jobs, jw) = listed();
        let (namespaces, nw) = listed();
        let (pods, pw) = listed();
        let (all_pods, aw) = listed();
        let stores = pullthrough::controller::workloads::Stores {
            deployments,
            stateful_sets: listed().0,
            daemon_sets: listed().0,
            jobs,
            cron_jobs: listed().0,
            namespaces,
            pods,
            all_pods,
        };
        Cluster {
            stores,
            deployments: dw,
            jobs: jw,
            namespaces: nw,
            pods: pw,
            all_pods: aw,
        }
    }

    fn apply<K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned>(
        writer: &mut Writer<K>,
        object: Value,
    ) {
        let object: K = serde_json::from_value(object).unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(object));
    }

    fn namespace(&mut self, name: &str, labels: Value) {
        let ns = json!({"metadata": {"name": name, "labels": labels}});
        Cluster::apply(&mut self.namespaces, ns);
    }

    /// A pod template of `images`.
    fn template(images: &[&str]) -> Value {
        let containers: Vec<Value> = images
            .iter()
            .enumerate()
            .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
            .collect();
        json!({"spec": {"containers": containers}})
    }

    fn deployment(&mut self, ns: &str, name: &str, images: &[&str]) {
        let d = json!({"metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {}, "template": Cluster::template(images)}});
        Cluster::apply(&mut self.deployments, d);
    }

    fn job(&mut self, ns: &str, name: &str, images: &[&str]) {
        let j = json!({"metadata": {"name": name, "namespace": ns},
            "spec": {"template": Cluster::template(images)}});
        Cluster::apply(&mut self.jobs, j);
    }

    /// A bare pod (no controller owns it) of `image`, running `image_id`.
    fn bare_pod(&mut self, ns: &str, name: &str, image: &str, image_id: &str) {
        let pod = json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": {"containers": [{"name": "c", "image": image}]},
            "status": {"containerStatuses": [{"name": "c", "image": image, "imageID": image_id,
                "ready": true, "restartCount": 0}]}});
        Cluster::apply(&mut self.all_pods, pod);
    }

    /// A ready proxy pod of mirror `m` at `ip`.
    fn replica(&mut self, m: &RegistryMirror, uid: &str, ip: &str) {
        let labels = pullthrough::controller::builders::selector_labels(m);
        let pod = json!({"metadata": {"name": uid, "namespace": NS, "uid": uid, "labels": labels},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}});
        Cluster::apply(&mut self.pods, pod);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_new_image_is_in_the_cache_before_any_client_asks() {
    use crate::common::*;
    use pullthrough::api::mirror::RegistryMirrorStatus;
    use pullthrough::controller::workloads::Warmer;
    // A real Distribution upstream, and the mirror's proxy with the admin token of the
    // Secret the controller made.
    let up = Registry::start().await;
    let app = Image::generate(95, &[30_000, 10_000], "amd64");
    push_image(&up.url, "team/app", "2.0", &app).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let mut cfg = config_for(&[("registry.test", &up.url)]);
    cfg.admin_token_file = Some(token_file.clone());
    let p = Proxy::start_config(cfg).await;
    let ops_port: u16 = p.metrics_url.rsplit(':').next().unwrap().parse().unwrap();
    let world = World {
        named: vec![(
            "pullthrough-warm-admin".into(),
            json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"pullthrough-warm-admin","namespace":NS},
                "data":{"token": base64(ADMIN_TOKEN)}}),
        )],
        nodes: vec![amd64_node("n1")],
        ops_port: Some(ops_port),
        ..World::default()
    };
    let mut f = fake(world);
    let mut m = mirror(
        "warm",
        100,
        &format!(
            "upstreams: [{{registry: registry.test, url: \"{}\"}}]\ncache: {{prefetchFromWorkloads: {{namespaceSelector: {{matchLabels: {{team: a}}}}}}}}",
            up.url
        ),
        true,
    );
    m.status = Some(RegistryMirrorStatus {
        served_registries: vec!["registry.test".into()],
        ..RegistryMirrorStatus::default()
    });
    f.add_to_store(&m);

    // A Deployment of team-a runs app:2.0 (and an image of a registry the mirror does
    // not serve); a Job of team-b, a namespace the mirror's selector does not pick, runs
    // another image of its registry.
    let mut cluster = Cluster::new();
    cluster.namespace("team-a", json!({"team": "a"}));
    cluster.namespace("team-b", json!({}));
    cluster.deployment(
        "team-a",
        "app",
        &["registry.test/team/app:2.0", "quay.io/other/tool:1"],
    );
    cluster.job("team-b", "x", &["registry.test/team/other:1"]);
    cluster.replica(&m, "replica-1", "127.0.0.1");
    let warmer = Warmer::new(f.ctx.clone(), cluster.stores.clone());
    let app_2 = "registry.test/team/app:2.0".to_string();

    // The mirror's replica is asked for the one image it should have, and told it is in
    // use.
    let synced = warmer.sync(&m).await.unwrap().expect("synced");
    assert_eq!(synced.len(), 1, "{synced:?}");
    assert_eq!(synced[0].1.asked, vec![app_2.clone()]);
    assert!(synced[0].1.told_in_use);
    // Its blobs come from the upstream, once, before any client asked.
    for b in app.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    // An Event on the mirror says so, and its status counts it (bounded wait: each sync
    // looks at the progress).
    let mut noted = None;
    for _ in 0..300 {
        warmer.sync(&m).await.unwrap();
        noted = f.calls().into_iter().find(|c| {
            c.method == "POST"
                && c.path.ends_with("/events")
                && c.body["note"].as_str().is_some_and(|n| {
                    n.starts_with("Prefetched image registry.test/team/app:2.0 in ")
                })
        });
        if noted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = noted.expect("a Prefetched event");
    assert_eq!(event.body["regarding"]["name"], "warm");
    // The last status patch (the first ones said the replica's modes before the
    // prefetch was done).
    let counted = f
        .calls()
        .into_iter()
        .rev()
        .find(|c| c.method == "PATCH" && c.path.ends_with("/registrymirrors/warm/status"));
    assert_eq!(
        counted.expect("a status patch").body["status"]["prefetchedImages"],
        1
    );
    // Then a client pulls: from the cache.
    pull(&p.url, "team/app", "2.0", Some("registry.test"))
        .await
        .unwrap();
    for b in app.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }

    // The images in use: what team-a's workloads run (not team-b's, which the mirror
    // does not select), told once, until the replica's set differs.
    let listed = p.admin_get("/admin/in-use", ADMIN_TOKEN).await;
    assert_eq!(listed["images"], json!([app_2]));
    let again = warmer.sync(&m).await.unwrap().unwrap();
    assert_eq!(
        again[0].1,
        Default::default(),
        "nothing lacking, nothing sent"
    );
    // A replica that forgot (it restarted) is told again.
    http()
        .put(format!("{}/admin/in-use", p.metrics_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"images": []}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let told = warmer.sync(&m).await.unwrap().unwrap();
    assert!(
        told[0].1.told_in_use && told[0].1.asked.is_empty(),
        "{told:?}"
    );

    // A replica that becomes ready after all that (a new pod, its cache empty) is warmed
    // with every image in use, though no workload changed: fetched and kept. The first
    // replica is asked nothing again.
    let mut cfg = config_for(&[("registry.test", &up.url)]);
    cfg.admin_token_file = Some(token_file);
    let cache = tempfile::tempdir().unwrap();
    cfg.cache_dir = cache.path().join("cache");
    let api = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let ops = tokio::net::TcpListener::bind(("127.0.0.2", ops_port))
        .await
        .unwrap();
    let p2 = Proxy::start_on(cfg, api, ops, Some(cache)).await;
    cluster.replica(&m, "replica-2", "127.0.0.2");
    let warmed = warmer.sync(&m).await.unwrap().unwrap();
    let asked: Vec<_> = warmed
        .iter()
        .map(|(r, s)| (r.uid.as_str(), &s.asked))
        .collect();
    assert_eq!(
        asked,
        [("replica-1", &vec![]), ("replica-2", &vec![app_2.clone()])]
    );
    for b in app.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 2);
    }
    let listed = p2.admin_get("/admin/in-use", ADMIN_TOKEN).await;
    assert_eq!(listed["images"], json!([app_2]));
    p2.settled().await;
    pull(&p2.url, "team/app", "2.0", Some("registry.test"))
        .await
        .unwrap();
    for b in app.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 2);
    }

    // team-a relabelled out of the selector: nothing is asked, and app:2.0 stays in use
    // for availability.keepInUseFor (24 hours by default); with none, it is in use no
    // more.
    cluster.namespace("team-a", json!({"team": "c"}));
    let moved = warmer.sync(&m).await.unwrap().unwrap();
    assert!(moved.iter().all(|(_, s)| s.asked.is_empty()), "{moved:?}");
    let listed = p.admin_get("/admin/in-use", ADMIN_TOKEN).await;
    assert_eq!(listed["images"], json!([app_2]));
    let mut no_grace = m.clone();
    no_grace.spec.availability = Some(serde_yaml::from_str("{keepInUseFor: '0s'}").unwrap());
    let moved = warmer.sync(&no_grace).await.unwrap().unwrap();
    assert!(moved.iter().all(|(_, s)| s.told_in_use), "{moved:?}");
    let listed = p.admin_get("/admin/in-use", ADMIN_TOKEN).await;
    assert_eq!(listed["images"], json!([]));

    // A mirror that does not prefetch has its replicas' modes checked, nothing asked,
    // and the images its workloads use (every namespace's) kept in use.
    let mut plain = no_grace.clone();
    plain.spec.cache.prefetch_from_workloads = None;
    let synced = warmer.sync(&plain).await.unwrap().unwrap();
    assert_eq!(synced.len(), 2);
    assert!(synced.iter().all(|(_, s)| s.asked.is_empty()), "{synced:?}");
    let listed = p.admin_get("/admin/in-use", ADMIN_TOKEN).await;
    assert_eq!(
        listed["images"],
        json!([app_2, "registry.test/team/other:1"])
    );
}

#[tokio::test]
async fn every_mirror_gets_an_admin_token_its_replicas_mount() {
    let f = fake(World {
        ready_replicas: 1,
        ..World::default()
    });
    let m = mirror("warm", 100, "upstreams: [{registry: docker.io}]", true);
    reconcile(Arc::new(m), f.ctx.clone()).await.unwrap();
    let created = f.find("POST", "/secrets");
    assert_eq!(created.body["metadata"]["name"], "pullthrough-warm-admin");
    assert_eq!(
        created.body["metadata"]["ownerReferences"][0]["kind"],
        "RegistryMirror"
    );
    assert_eq!(
        created.body["stringData"]["token"].as_str().unwrap().len(),
        64
    );
    let dep = f.find("PATCH", "/deployments/").body;
    let pod = &dep["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "pullthrough-warm-admin")
    );
    let env = pod["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "PULLTHROUGH_ADMIN_TOKEN_FILE"
                && e["value"] == "/var/run/pullthrough/admin/token")
    );
    let config = f.find("PATCH", "/configmaps/").body;
    let yaml = config["data"]["config.yaml"].as_str().unwrap();
    assert!(
        yaml.contains("adminTokenFile: /var/run/pullthrough/admin/token"),
        "{yaml}"
    );
}

/// A change of modes alone rolls no pod: the pods' config hash stays, the ConfigMap (what
/// a new pod starts with) changes; the controller carries the modes to running replicas.
#[tokio::test]
async fn a_change_of_modes_alone_rolls_no_pod() {
    let hash_and_config = async |mode: &str| {
        let f = fake(World {
            ready_replicas: 1,
            ..World::default()
        });
        let spec = format!("upstreams: [{{registry: docker.io}}]\ncache: {{mode: {mode}}}");
        reconcile(Arc::new(mirror("m", 100, &spec, true)), f.ctx.clone())
            .await
            .unwrap();
        let dep = f.find("PATCH", "/deployments/").body;
        let hash =
            dep["spec"]["template"]["metadata"]["annotations"]["pullthrough.dev/config-hash"]
                .clone();
        let config = f.find("PATCH", "/configmaps/").body["data"]["config.yaml"].clone();
        (hash, config)
    };
    let (online_hash, online_config) = hash_and_config("online").await;
    let (offline_hash, offline_config) = hash_and_config("offline").await;
    assert!(online_hash.is_string());
    assert_eq!(online_hash, offline_hash);
    assert_ne!(online_config, offline_config);
    assert!(offline_config.as_str().unwrap().contains("mode: offline"));
}

/// The availability watch (issue #40): each state a workload's image goes through, in
/// the status, the metric the alert watches and an Event on the workload; a cached image
/// stays cached with the upstream down, and is checked without asking it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_image_s_state_follows_the_cache_and_the_upstream() {
    use crate::common::fault::FaultUpstream;
    use crate::common::*;
    use pullthrough::api::mirror::RegistryMirrorStatus;
    use pullthrough::controller::workloads::Warmer;
    use std::sync::atomic::Ordering;
    let up = FaultUpstream::start().await;
    let app = Image::generate(97, &[20_000], "amd64");
    up.add_image("team/app", "1", &app);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let mut cfg = config_for(&[("registry.test", &up.url)]);
    cfg.admin_token_file = Some(token_file);
    let p = Proxy::start_config(cfg).await;
    let ops_port: u16 = p.metrics_url.rsplit(':').next().unwrap().parse().unwrap();
    let world = World {
        named: vec![(
            "pullthrough-watch-admin".into(),
            json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"pullthrough-watch-admin","namespace":NS},
                "data":{"token": base64(ADMIN_TOKEN)}}),
        )],
        nodes: vec![amd64_node("n1")],
        ops_port: Some(ops_port),
        ..World::default()
    };
    let f = fake(world);
    // Checked every second (the shortest), and each step below waits longer than that
    // before its sync: one check each.
    let mut m = mirror(
        "watch",
        100,
        &format!(
            "upstreams: [{{registry: registry.test, url: \"{}\"}}]\navailability: {{every: 1s}}",
            up.url
        ),
        true,
    );
    m.status = Some(RegistryMirrorStatus {
        served_registries: vec!["registry.test".into()],
        ..RegistryMirrorStatus::default()
    });
    let mut cluster = Cluster::new();
    cluster.namespace("team-a", json!({}));
    cluster.deployment(
        "team-a",
        "app",
        &["registry.test/team/app:1", "registry.test/team/gone:1"],
    );
    cluster.replica(&m, "replica-1", "127.0.0.1");
    let warmer = Warmer::new(f.ctx.clone(), cluster.stores.clone());
    let images = |f: &Fake| {
        let last = f
            .calls()
            .into_iter()
            .rev()
            .find(|c| c.method == "PATCH" && c.path.ends_with("/registrymirrors/watch/status"))
            .expect("a status patch");
        last.body["status"]["images"].clone()
    };
    let metric = |state: &str| {
        let text = f.ctx.metrics.render();
        crate::common::metric_value(
            &text,
            "pullthrough_workload_images",
            &[("mirror", "pullthrough-system/watch"), ("state", state)],
        )
    };

    // Not cached: app:1 is upstreamOnly; gone:1 (no such tag) is unavailable, listed with
    // its workload, counted in the metric, and an Event on the Deployment says so.
    warmer.sync(&m).await.unwrap().unwrap();
    let s = images(&f);
    assert_eq!(
        (s["upstreamOnly"].as_i64(), s["unavailable"].as_i64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["notPullable"][0]["image"], "registry.test/team/gone:1");
    assert_eq!(
        s["notPullable"][0]["workloads"],
        json!(["team-a/Deployment/app"])
    );
    assert_eq!(metric("unavailable"), 1.0);
    assert_eq!(metric("cached"), 0.0);
    let events: Vec<Call> = f
        .calls()
        .into_iter()
        .filter(|c| {
            c.method == "POST"
                && c.path.ends_with("/events")
                && c.body["reason"] == "ImageUnavailable"
        })
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["regarding"]["kind"], "Deployment");
    assert_eq!(events[0].body["regarding"]["name"], "app");
    assert!(
        events[0].body["note"]
            .as_str()
            .unwrap()
            .contains("registry.test/team/gone:1")
    );

    // Pulled through the mirror: cached. Then the upstream goes down: still cached, and
    // checked without asking it; gone:1 stays unavailable, with no second Event.
    pull(&p.url, "team/app", "1", Some("registry.test"))
        .await
        .unwrap();
    p.settled().await;
    up.state.fail_status.store(503, Ordering::SeqCst);
    let asked = up.count("/v2/team/app/");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    warmer.sync(&m).await.unwrap().unwrap();
    let s = images(&f);
    assert_eq!(
        (s["cached"].as_i64(), s["unavailable"].as_i64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(
        up.count("/v2/team/app/"),
        asked,
        "a cached image is not asked for"
    );
    assert_eq!(metric("cached"), 1.0);
    let events = f
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.body["reason"] == "ImageUnavailable")
        .count();
    assert_eq!(
        events, 1,
        "one Event per workload and image while it stays unavailable"
    );

    // The upstream refuses the mirror's credentials: unauthorized.
    up.state.fail_status.store(0, Ordering::SeqCst);
    up.state.basic_challenge.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    warmer.sync(&m).await.unwrap().unwrap();
    let s = images(&f);
    assert_eq!(
        (s["unauthorized"].as_i64(), s["unavailable"].as_i64()),
        (Some(1), Some(0)),
        "{s}"
    );
    up.state.basic_challenge.store(false, Ordering::SeqCst);

    // A bare pod runs app:1 at another digest than the tag names now: moved.
    cluster.bare_pod(
        "team-a",
        "runner",
        "registry.test/team/app:1",
        "registry.test/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    warmer.sync(&m).await.unwrap().unwrap();
    let s = images(&f);
    assert_eq!(s["moved"].as_i64(), Some(1), "{s}");
    let listed: Vec<&str> = s["notPullable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["unavailable", "moved"], "the worst first");
    assert_eq!(metric("moved"), 1.0);
    // gone:1 was unauthorized in between: unavailable again, it has a second Event.
    let events = f
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.body["reason"] == "ImageUnavailable")
        .count();
    assert_eq!(events, 2);
}

//! The builders' tests: the children as the API server gets them.

use super::pod::pod_template;
use super::*;
use crate::api::mirror::{RegistryMirror, RegistryMirrorSpec, SIGNING_KEY};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};

pub(crate) fn mirror(yaml: &str) -> RegistryMirror {
    let spec: RegistryMirrorSpec = serde_yaml::from_str(yaml).unwrap();
    let mut m = RegistryMirror::new("public", spec);
    m.metadata.namespace = Some("pullthrough-system".into());
    m.metadata.uid = Some("1234-5678".into());
    m.metadata.generation = Some(2);
    m
}

fn settings() -> ChildSettings {
    ChildSettings {
        proxy_image: "example/pullthrough:0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
    }
}

fn pod(t: &PodTemplateSpec) -> &PodSpec {
    t.spec.as_ref().unwrap()
}

/// The pod field that `c`'s environment variable `name` is set from.
fn pod_field_of<'a>(c: &'a Container, name: &str) -> &'a str {
    let var = c.env.as_ref().unwrap().iter().find(|e| e.name == name);
    let from = var.and_then(|v| v.value_from.as_ref()?.field_ref.as_ref());
    &from
        .unwrap_or_else(|| panic!("no {name} from a pod field"))
        .field_path
}

#[test]
fn every_child_is_owned_labelled_and_named() {
    let m = mirror("upstreams: [{registry: docker.io}]");
    let cm = config_map(&m, "x: 1\n");
    let svc = service(&m);
    let dep = deployment(&m, &settings(), "abc");
    let metas = [
        &cm.metadata,
        &svc.metadata,
        &dep.metadata,
        &pdb(&m).metadata,
    ];
    for meta in metas {
        assert_eq!(meta.name.as_deref(), Some("pullthrough-public"));
        assert_eq!(meta.namespace.as_deref(), Some("pullthrough-system"));
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, "1234-5678");
        assert_eq!(owner.kind, "RegistryMirror");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            meta.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "pullthrough-controller"
        );
    }
    let sm = service_monitor(&m);
    assert_eq!(sm["metadata"]["ownerReferences"][0]["uid"], "1234-5678");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
}

#[test]
fn deployment_runs_the_proxy_locked_down() {
    let m = mirror(
        "upstreams: [{registry: docker.io}]\nreplicas: 3\nresources: {limits: {memory: 128Mi}}",
    );
    assert!(!uses_pvc(&m));
    let d = deployment(&m, &settings(), "hash1");
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.selector.match_labels.as_ref(),
        Some(&selector_labels(&m))
    );
    let tpl = &spec.template;
    assert_eq!(
        tpl.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH],
        "hash1"
    );
    let p = pod(tpl);
    let c = &p.containers[0];
    assert_eq!(c.image.as_deref(), Some("example/pullthrough:0.1.0"));
    assert_eq!(
        c.args.as_ref().unwrap()[..3],
        ["proxy", "--config", "/etc/pullthrough/config.yaml"]
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
        "128Mi"
    );
    let cache = p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "cache")
        .unwrap();
    assert!(cache.empty_dir.is_some());
    // A config change changes the template, which rolls the pods.
    let d2 = deployment(&m, &settings(), "hash2");
    assert_ne!(d.spec.unwrap().template, d2.spec.unwrap().template);
}

#[test]
fn storage_size_makes_a_statefulset_with_claims_and_credentials_are_mounted() {
    let m = mirror(
        "upstreams: [{registry: docker.io}, {registry: ghcr.io, credentialsSecretRef: {name: gh}}]\ncache: {storage: {size: 50Gi, storageClassName: fast}}\naccess: {plainHttp: true}",
    );
    assert!(uses_pvc(&m));
    let s = stateful_set(&m, &settings(), "h");
    let spec = s.spec.as_ref().unwrap();
    let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(claim.metadata.name.as_deref(), Some("cache"));
    let cs = claim.spec.as_ref().unwrap();
    assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        cs.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "50Gi"
    );
    let p = pod(&spec.template);
    assert!(
        p.volumes
            .as_ref()
            .unwrap()
            .iter()
            .all(|v| v.name != "cache"),
        "the claim provides it"
    );
    let secret = p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "credentials-1")
        .unwrap();
    assert_eq!(
        secret.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("gh")
    );
    let mount = p.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "credentials-1")
        .unwrap();
    let config = m.spec.proxy_config().unwrap();
    assert_eq!(
        config.upstreams[1]
            .credentials_file
            .as_ref()
            .unwrap()
            .parent()
            .unwrap()
            .to_str(),
        Some(mount.mount_path.as_str()),
        "the proxy config points where the Secret is mounted"
    );
}

#[test]
fn a_mirror_on_s3_runs_replicas_that_find_each_other() {
    let m = mirror(
        "upstreams: [{registry: docker.io}]\nreplicas: 3\ncache: {storage: {s3: {bucket: b, endpoint: 'http://rgw:80', credentialsSecretRef: {name: keys}, redirect: true}, emptyDir: {sizeLimit: 5Gi}}}",
    );
    assert!(!uses_pvc(&m), "no volume per pod");
    let config = proxy_config(&m).unwrap();
    let s3 = config.storage.s3.as_ref().unwrap();
    assert_eq!(
        (s3.bucket.as_str(), s3.endpoint.as_deref()),
        ("b", Some("http://rgw:80"))
    );
    assert_eq!(config.max_cache_bytes, None, "the emptyDir only spools");
    assert_eq!(s3.local_copies, 5 << 29, "half the emptyDir: local copies");
    assert!(s3.redirect);
    let peers = config.peers.as_ref().unwrap();
    assert_eq!(peers.dns.as_deref(), Some("pullthrough-public-peers"));
    let svc = peers_service(&m);
    assert_eq!(
        svc.metadata.name.as_deref(),
        Some("pullthrough-public-peers")
    );
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.selector.as_ref(), Some(&selector_labels(&m)));
    let d = deployment(&m, &settings(), "h");
    let c = &pod(&d.spec.as_ref().unwrap().template).containers[0];
    assert_eq!(pod_field_of(c, "POD_IP"), "status.podIP");
    let from = &c.env_from.as_ref().unwrap()[0];
    assert_eq!(from.secret_ref.as_ref().unwrap().name, "keys");
    // The replicas prove their requests to each other with a key they share.
    let key = config
        .access
        .signing_key_file
        .as_ref()
        .expect("a shared key");
    let mount = c.volume_mounts.as_ref().unwrap().iter();
    assert!(
        mount.into_iter().any(|v| key.starts_with(&v.mount_path)),
        "the key is not mounted"
    );
    // Without a bucket: no peers, no POD_IP.
    let plain = mirror("upstreams: [{registry: docker.io}]");
    assert!(proxy_config(&plain).unwrap().peers.is_none());
    let d = deployment(&plain, &settings(), "h");
    let c = &pod(&d.spec.as_ref().unwrap().template).containers[0];
    assert!(c.env.as_ref().unwrap().iter().all(|e| e.name != "POD_IP") && c.env_from.is_none());
}

#[test]
fn a_bucket_with_a_size_limit_has_replicas_that_may_elect_their_evictor() {
    let m = mirror(
        "upstreams: [{registry: docker.io}]\nreplicas: 3\ncache: {storage: {s3: {bucket: b, maxSize: 100Gi}}}",
    );
    assert!(evicts(&m));
    let config = proxy_config(&m).unwrap();
    assert_eq!(
        config.max_cache_bytes,
        Some(100 << 30),
        "the bucket's own size"
    );
    let ev = &config.storage.s3.as_ref().unwrap().eviction;
    assert_eq!(ev.lease.as_deref(), Some("pullthrough-public-evictor"));
    assert_eq!(ev.lease_namespace, m.namespace());
    let d = deployment(&m, &settings(), "h");
    let p = pod(&d.spec.as_ref().unwrap().template);
    assert_eq!(
        p.service_account_name.as_deref(),
        Some("pullthrough-public-proxy")
    );
    assert_eq!(p.automount_service_account_token, Some(true));
    assert_eq!(pod_field_of(&p.containers[0], "POD_NAME"), "metadata.name");
    let sa = proxy_service_account(&m);
    assert_eq!(
        sa.metadata.name.as_deref(),
        Some("pullthrough-public-proxy")
    );
    let role = evictor_role(&m);
    let rules = role.rules.unwrap();
    assert!(
        rules
            .iter()
            .all(|r| r.resources.as_deref() == Some(&["leases".to_string()][..]))
    );
    let named = rules
        .iter()
        .find(|r| r.verbs.contains(&"update".to_string()))
        .unwrap();
    assert_eq!(
        named.resource_names.as_deref(),
        Some(&["pullthrough-public-evictor".to_string()][..])
    );
    let binding = evictor_role_binding(&m);
    assert_eq!(binding.role_ref.name, "pullthrough-public-evictor");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.clone()),
        ("pullthrough-public-proxy", m.namespace())
    );
    // Unbounded, or on a disk: no API access for the pods.
    for yaml in [
        "upstreams: [{registry: docker.io}]\ncache: {storage: {s3: {bucket: b}}}",
        "upstreams: [{registry: docker.io}]",
    ] {
        let m = mirror(yaml);
        assert!(!evicts(&m));
        let d = deployment(&m, &settings(), "h");
        let p = pod(&d.spec.as_ref().unwrap().template);
        assert_eq!(
            (
                p.service_account_name.as_deref(),
                p.automount_service_account_token
            ),
            (None, Some(false))
        );
    }
    let bad = mirror(
        "upstreams: [{registry: docker.io}]\ncache: {storage: {s3: {bucket: b, maxSize: lots}}}",
    );
    assert!(proxy_config(&bad).is_err());
}

#[test]
fn config_hash_covers_config_and_secrets() {
    let a = config_hash("x", &[b"s1".to_vec()]);
    assert_eq!(a, config_hash("x", &[b"s1".to_vec()]));
    assert_ne!(a, config_hash("y", &[b"s1".to_vec()]));
    assert_ne!(a, config_hash("x", &[b"s2".to_vec()]));
    assert_ne!(
        config_hash("x", &[b"ab".to_vec(), b"c".to_vec()]),
        config_hash("x", &[b"a".to_vec(), b"bc".to_vec()])
    );
}

#[test]
fn service_and_endpoint() {
    let m = mirror("upstreams: [{registry: docker.io}]");
    let mut svc = service(&m);
    let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert_eq!(ports[0].port, 5000);
    assert_eq!(endpoint(&svc, false), None);
    svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.12.7".into());
    assert_eq!(
        endpoint(&svc, false).as_deref(),
        Some("http://10.96.12.7:5000")
    );
    assert_eq!(
        endpoint(&svc, true).as_deref(),
        Some("https://10.96.12.7:5000")
    );
    svc.spec.as_mut().unwrap().cluster_ip = Some("fd00::7".into());
    assert_eq!(
        endpoint(&svc, false).as_deref(),
        Some("http://[fd00::7]:5000")
    );
}

#[test]
fn tls_and_a_guarded_upstream_mount_their_secrets_where_the_config_says() {
    let m = mirror(
        "upstreams: [{registry: ghcr.io, credentialsSecretRef: {name: gh}}]\ntls: {secretRef: {name: cert}}",
    );
    let config = proxy_config(&m).unwrap();
    let tls = config.tls.as_ref().expect("tls in the config");
    let key = config
        .access
        .signing_key_file
        .clone()
        .expect("a shared key");
    let p = pod_template(&m, &settings(), "h").spec.unwrap();
    let mounted = |file: &std::path::Path, secret: &str| {
        let dir = file.parent().unwrap().to_str().unwrap();
        let file = file.file_name().unwrap().to_str().unwrap();
        let mount = p.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.mount_path == dir)
            .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
        let vol = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap();
        let source = vol.secret.as_ref().unwrap();
        assert_eq!(source.secret_name.as_deref(), Some(secret));
        assert!(
            source
                .items
                .as_ref()
                .unwrap()
                .iter()
                .any(|i| i.path == file)
        );
    };
    mounted(&tls.cert_file, "cert");
    mounted(&tls.key_file, "cert");
    mounted(&key, &access_secret_name(&m));
    let s = access_secret(&m, "k");
    assert_eq!(
        s.metadata.owner_references.unwrap()[0].kind,
        "RegistryMirror"
    );
    assert_eq!(s.string_data.unwrap()[SIGNING_KEY], "k");
    // Without credentials nothing is guarded: no key.
    let open = mirror("upstreams: [{registry: docker.io}]");
    assert!(!open.spec.guarded());
    assert!(
        proxy_config(&open)
            .unwrap()
            .access
            .signing_key_file
            .is_none()
    );
}

#[test]
fn a_rewriting_mirror_s_entry_point_relays_the_node_s_loopback_to_its_service_unprivileged() {
    let m = mirror("upstreams: [{registry: docker.io}]\nrewrite: {entryPoint: {port: 5009}}");
    let ds = entry_point(&m, &settings(), "http://10.0.0.7:5000").unwrap();
    assert_eq!(
        ds.metadata.name.as_deref(),
        Some("pullthrough-public-entry")
    );
    assert_eq!(
        ds.metadata.owner_references.as_ref().unwrap()[0].uid,
        "1234-5678"
    );
    let spec = ds.spec.unwrap();
    // Its pods are never taken for proxy pods (whose selector they do not match).
    let selector = spec.selector.match_labels.unwrap();
    assert_ne!(selector, selector_labels(&m));
    assert!(
        !selector_labels(&m)
            .iter()
            .all(|(k, v)| selector.get(k) == Some(v))
    );
    let p = pod(&spec.template);
    assert_eq!(p.host_network, Some(true));
    assert_eq!(p.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(p.automount_service_account_token, Some(false));
    assert_eq!(
        p.tolerations.as_ref().unwrap()[0].operator.as_deref(),
        Some("Exists")
    );
    let c = &p.containers[0];
    let args = c.args.clone().unwrap();
    let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
    assert_eq!(after("--listen"), "127.0.0.1:5009");
    assert_eq!(after("--to"), "http://10.0.0.7:5000");
    assert!(args.contains(&"relay".to_string()));
    assert_eq!(c.ports.as_ref().unwrap()[0].host_port, Some(5009));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    assert!(c.volume_mounts.is_none() && p.volumes.is_none());
    // The default port; none with an address of its own, or without a rewrite.
    let m = mirror("upstreams: [{registry: docker.io}]\nrewrite: {}");
    let ds = entry_point(&m, &settings(), "http://10.0.0.7:5000").unwrap();
    let args = pod(&ds.spec.unwrap().template).containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"127.0.0.1:5001".to_string()));
    let m = mirror("upstreams: [{registry: docker.io}]\nrewrite: {address: mirror.example.com}");
    assert!(entry_point(&m, &settings(), "http://10.0.0.7:5000").is_none());
    let m = mirror("upstreams: [{registry: docker.io}]");
    assert!(entry_point(&m, &settings(), "http://10.0.0.7:5000").is_none());
}

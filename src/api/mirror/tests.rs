//! The CRD's types and the configuration a spec maps to.

use super::*;
use crate::api::proxy_config::ProxyConfig;
use std::path::PathBuf;

pub(crate) fn example(upstreams: &[&str]) -> RegistryMirrorSpec {
    serde_yaml::from_str(&format!(
        "upstreams: [{}]",
        upstreams
            .iter()
            .map(|u| format!("{{registry: \"{u}\"}}"))
            .collect::<Vec<_>>()
            .join(",")
    ))
    .unwrap()
}

#[test]
fn defaults_apply() {
    let spec = example(&["docker.io"]);
    assert_eq!(spec.replicas, 1);
    assert!(spec.nodes.configure);
    let c = spec.proxy_config().unwrap();
    assert_eq!(c.listen.port(), PROXY_PORT);
    assert_eq!(c.cache_dir, PathBuf::from(CACHE_MOUNT));
    assert_eq!(c.upstreams[0].base_url(), "https://registry-1.docker.io");
}

#[test]
fn spec_maps_to_proxy_config() {
    let spec: RegistryMirrorSpec = serde_yaml::from_str(
        r#"
upstreams:
  - registry: docker.io
    credentialsSecretRef: {name: hub}
    repositories: {allow: ["library/*"]}
  - registry: ghcr.io
    url: https://ghcr.example
cache: {tagTTL: 1m, staleIfError: 2h}
access: {plainHttp: true, allowedTTL: 1m}
"#,
    )
    .unwrap();
    let c = spec.proxy_config().unwrap();
    use crate::api::AccessMode;
    assert_eq!(c.upstreams[0].access_mode(), AccessMode::UpstreamAuth);
    assert_eq!(c.upstreams[1].access_mode(), AccessMode::Open);
    assert_eq!(c.access.allowed_ttl, std::time::Duration::from_secs(60));
    assert!(c.access.plain_http);
    let mut clear = spec.clone();
    clear.access = None;
    let e = clear.proxy_config().unwrap_err().to_string();
    assert!(e.contains("access.plainHttp"), "{e}");
    assert_eq!(c.tag_ttl, std::time::Duration::from_secs(60));
    assert_eq!(c.stale_if_error, std::time::Duration::from_secs(7200));
    assert_eq!(
        c.upstreams[0].credentials_file,
        Some(PathBuf::from(format!(
            "{SECRETS_MOUNT}/0/.dockerconfigjson"
        )))
    );
    assert_eq!(c.upstreams[0].repositories.allow, vec!["library/*"]);
    assert_eq!(c.upstreams[1].base_url(), "https://ghcr.example");
    assert_eq!(c.max_cache_bytes, None);
    let sized: RegistryMirrorSpec = serde_yaml::from_str(
            "upstreams: [{registry: docker.io}]\ncache: {storage: {size: 10Gi}, pin: [alpine:3.20], prefetch: [busybox], prefetchPlatforms: [linux/amd64]}",
        )
        .unwrap();
    let c2 = sized.proxy_config().unwrap();
    assert_eq!(c2.max_cache_bytes, Some((10u64 << 30) * 9 / 10));
    assert_eq!(c2.pin, vec!["alpine:3.20"]);
    assert_eq!(c2.prefetch_platforms, vec!["linux/amd64"]);
    let mut wrong = sized.clone();
    wrong.cache.pin = vec!["quay.io/x/y:1".into()];
    assert!(
        wrong
            .proxy_config()
            .unwrap_err()
            .to_string()
            .contains("not one of the upstreams")
    );
    // What the controller writes, the proxy reads back unchanged.
    assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
}

#[test]
fn upstream_limits_default_by_registry_and_take_the_spec() {
    let mut spec = example(&["docker.io", "ghcr.io"]);
    spec.upstreams[1].limits = Some(UpstreamLimitsSpec {
        max_concurrent_requests: Some(8),
        queue_timeout: Some("20s".into()),
        ..UpstreamLimitsSpec::default()
    });
    let c = spec.proxy_config().unwrap();
    let hub = c.upstreams[0].limits();
    assert_eq!(
        (hub.max_concurrent_requests, hub.manifest_gets_per_second),
        (Some(32), Some(10))
    );
    let ghcr = c.upstreams[1].limits();
    assert_eq!(ghcr.max_concurrent_requests, Some(8));
    assert_eq!(ghcr.manifest_gets_per_second, Some(0));
    assert_eq!(ghcr.queue_timeout, std::time::Duration::from_secs(20));
    assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    spec.upstreams[1].limits = Some(UpstreamLimitsSpec {
        backoff: Some("soon".into()),
        ..UpstreamLimitsSpec::default()
    });
    let err = spec.proxy_config().unwrap_err().to_string();
    assert!(err.contains("limits.backoff"), "{err}");
    spec.upstreams[1].limits = Some(UpstreamLimitsSpec {
        max_concurrent_requests: Some(0),
        ..UpstreamLimitsSpec::default()
    });
    let err = spec.proxy_config().unwrap_err().to_string();
    assert!(err.contains("maxConcurrentRequests"), "{err}");
}

#[test]
fn several_urls_are_tried_in_order_and_containerd_falls_back_to_the_last() {
    let mut spec = example(&["docker.io"]);
    let urls = ["https://mirror.example", "https://registry-1.docker.io/"];
    spec.upstreams[0].urls = Some(urls.map(|u| UpstreamUrl(u.into())).to_vec());
    let c = spec.proxy_config().unwrap();
    assert_eq!(
        c.upstreams[0].base_urls(),
        ["https://mirror.example", "https://registry-1.docker.io"]
    );
    assert_eq!(
        upstream_url(&spec.upstreams[0]),
        "https://registry-1.docker.io"
    );
    spec.upstreams[0].url = Some("https://other.example".into());
    let err = spec.proxy_config().unwrap_err().to_string();
    assert!(err.contains("both url and urls"), "{err}");
}

#[test]
fn invalid_specs_are_explained() {
    let mut spec = example(&["docker.io"]);
    spec.cache.tag_ttl = Some("5 minutes".into());
    let err = spec.proxy_config().unwrap_err().to_string();
    assert!(err.contains("cache.tagTTL"), "{err}");
    // Docker Hub's names are one registry, whatever the case.
    for pair in [
        ["docker.io", "index.docker.io"],
        ["registry-1.docker.io", "Index.Docker.io"],
        ["ghcr.io", "GHCR.io"],
    ] {
        assert!(
            example(&pair)
                .proxy_config()
                .unwrap_err()
                .to_string()
                .contains("twice"),
            "{pair:?}"
        );
    }
}

#[test]
fn cel_rules_hold_client_side() {
    let ok = serde_json::to_value(example(&["docker.io", "ghcr.io"])).unwrap();
    RegistryMirrorSpec::validate_cel(&ok, None).unwrap();
    for pair in [
        ["docker.io", "docker.io"],
        ["docker.io", "Docker.IO"],
        ["registry-1.docker.io", "index.docker.io"],
    ] {
        let dup = serde_json::to_value(example(&pair)).unwrap();
        let err = RegistryMirrorSpec::validate_cel(&dup, None).unwrap_err();
        assert!(
            format!("{err:?}").contains("only once"),
            "{pair:?}: {err:?}"
        );
    }
    let lots = serde_json::json!({"size": "lots"});
    assert!(
        StorageSpec::validate_cel(&lots, None).is_err(),
        "not a quantity"
    );
    StorageSpec::validate_cel(&serde_json::json!({"size": "50Gi"}), None).unwrap();
    let limit = serde_json::json!({"sizeLimit": "lots"});
    assert!(EmptyDirSpec::validate_cel(&limit, None).is_err());
    EmptyDirSpec::validate_cel(&serde_json::json!({"sizeLimit": "20Gi"}), None).unwrap();
    let both = serde_json::json!({"size": "1Gi", "emptyDir": {}});
    assert!(StorageSpec::validate_cel(&both, None).is_err());
    StorageSpec::validate_cel(&serde_json::json!({"size": "1Gi"}), None).unwrap();
    let bucket = |max: &str| serde_json::json!({"s3": {"bucket": "b", "maxSize": max}});
    assert!(StorageSpec::validate_cel(&bucket("lots"), None).is_err());
    StorageSpec::validate_cel(&bucket("500Gi"), None).unwrap();
}

#[test]
fn annotations_and_keys() {
    assert_eq!(parse_node_annotation(" a/b, c/d ,,"), vec!["a/b", "c/d"]);
    assert_eq!(registry_key("Index.Docker.io"), "docker.io");
    assert_eq!(registry_key("GHCR.io"), "ghcr.io");
}

#[test]
fn modes_tag_policies_and_the_seed_reach_the_proxy_config() {
    let spec: RegistryMirrorSpec = serde_yaml::from_str(
        r#"
upstreams:
  - registry: docker.io
    mode: offline
    tagPolicies:
      - {repositories: "library/*", tags: "v*", policy: immutable}
  - registry: ghcr.io
cache: {mode: localFirst, seed: "http://bundles.internal/cluster.tar"}
"#,
    )
    .unwrap();
    let c = spec.proxy_config().unwrap();
    use crate::api::{TagPolicyKind, UpstreamMode};
    assert_eq!(c.mode, UpstreamMode::LocalFirst);
    assert_eq!(
        c.seed.as_deref(),
        Some("http://bundles.internal/cluster.tar")
    );
    assert_eq!(c.upstreams[0].mode, Some(UpstreamMode::Offline));
    assert_eq!(c.upstreams[1].mode, None);
    assert_eq!(
        c.upstreams[0].tag_policies[0].policy,
        TagPolicyKind::Immutable
    );
    let mut bad = spec.clone();
    bad.upstreams[0].tag_policies[0].policy = TagPolicyKind::Pinned;
    let e = bad.proxy_config().unwrap_err().to_string();
    assert!(e.contains("needs the digest"), "{e}");
}

#[test]
fn modes_and_pins_come_from_the_spec_for_the_status() {
    let spec: RegistryMirrorSpec = serde_yaml::from_str(
        r#"
upstreams:
  - registry: Docker.io
    mode: offline
    tagPolicies:
      - {repositories: org/app, tags: latest, policy: pinned, digest: "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}
      - {repositories: "library/*", policy: immutable}
  - registry: ghcr.io
cache: {mode: localFirst}
"#,
    )
    .unwrap();
    use crate::api::UpstreamMode;
    assert_eq!(
        spec.modes(),
        vec![
            ("docker.io".to_string(), UpstreamMode::Offline),
            ("ghcr.io".to_string(), UpstreamMode::LocalFirst)
        ]
    );
    assert_eq!(
        spec.pinned_tags(),
        vec!["docker.io/org/app:latest -> sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_string()]
    );
    // A change of modes alone leaves the configuration the pods are rolled on as it is.
    let c = spec.proxy_config().unwrap();
    let mut other = spec.clone();
    other.cache.mode = None;
    other.upstreams[0].mode = None;
    assert_ne!(c, other.proxy_config().unwrap());
    assert_eq!(
        c.without_modes(),
        other.proxy_config().unwrap().without_modes()
    );
}

#[test]
fn the_drop_annotation_names_images_tags_and_repositories() {
    let d = |v: &str| {
        parse_drops(v).map(|items| {
            items
                .into_iter()
                .map(|i| format!("{} {}", i.scope, i.what))
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(
        d("alpine:3.20, tag=ghcr.io/org/app:latest repository=ghcr.io/org/old #2").unwrap(),
        vec![
            "image alpine:3.20",
            "tag ghcr.io/org/app:latest",
            "repository ghcr.io/org/old"
        ]
    );
    for (bad, why) in [
        ("", "names nothing"),
        ("#only-a-word", "names nothing"),
        ("layer=x", "is not image=, tag= or repository="),
        ("repository=ghcr.io/org/app:1", "without a tag"),
        (
            "tag=ghcr.io/org/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "not a digest",
        ),
        ("Not!An*Image", "invalid image reference"),
    ] {
        let e = d(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

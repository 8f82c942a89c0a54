//! The configuration as people write it: defaults, round trips, what is refused.

use super::*;

#[test]
fn empty_config_is_a_docker_hub_cache() {
    let c = ProxyConfig::from_yaml("").unwrap();
    assert_eq!(c, ProxyConfig::default());
    c.validate().unwrap();
    assert_eq!(c.listen.port(), 5000);
    assert_eq!(c.default_registry(), Some("docker.io"));
    assert_eq!(c.upstreams[0].base_url(), docker_hub::API_URL);
}

#[test]
fn yaml_round_trip() {
    let text = r#"
listen: 127.0.0.1:5555
upstreams:
  - registry: ghcr.io
  - registry: registry.local:5000
    url: http://10.0.0.1:5000/
    credentials: { username: u, password: p }
    repositories: { allow: ["team/*"], deny: ["team/secret"] }
defaultUpstream: registry.local:5000
tagTTL: 1m
staleIfError: 2h
access: { plainHttp: true, deniedTTL: 10s }
"#;
    // A misspelt field must be reported, not silently ignored.
    assert!(ProxyConfig::from_yaml(&text.replace("tagTTL", "tagTtl")).is_err());
    let c = ProxyConfig::from_yaml(text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.tag_ttl, Duration::from_secs(60));
    assert_eq!(c.access.denied_ttl, Duration::from_secs(10));
    assert_eq!(c.upstreams[1].access_mode(), AccessMode::UpstreamAuth);
    assert_eq!(c.upstreams[0].access_mode(), AccessMode::Open);
    assert_eq!(c.upstreams[1].base_url(), "http://10.0.0.1:5000");
    assert_eq!(c.upstreams[0].base_url(), "https://ghcr.io");
    assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    assert!(!format!("{:?}", c).contains("password: \"p\""));
}

#[test]
fn invalid_configs_are_explained() {
    let mut c = ProxyConfig::default();
    c.upstreams.push(UpstreamConfig::new("DOCKER.IO"));
    assert_eq!(
        c.validate(),
        Err(ConfigError::DuplicateRegistry("DOCKER.IO".into()))
    );
    let mut c = ProxyConfig::default();
    c.upstreams[0].url = Some("ftp://x".into());
    assert!(matches!(c.validate(), Err(ConfigError::BadUrl { .. })));
    // A password written into a URL is never shown.
    c.upstreams[0].url = Some("https://me:s3cret@reg.example:5000/v2".into());
    let shown = c.validate().unwrap_err().to_string();
    assert!(
        !shown.contains("s3cret") && !shown.contains("me:"),
        "{shown}"
    );
    assert!(
        shown.contains("https://<redacted>@reg.example:5000/v2"),
        "{shown}"
    );
    assert_eq!(
        without_userinfo("http://a@b@c/d?x@y"),
        "http://<redacted>@c/d?x@y"
    );
    assert_eq!(without_userinfo("http://host/p"), "http://host/p");
    let c = ProxyConfig {
        default_upstream: Some("quay.io".into()),
        ..ProxyConfig::default()
    };
    assert!(matches!(c.validate(), Err(ConfigError::UnknownDefault(_))));
    let c = ProxyConfig {
        upstreams: vec![],
        ..ProxyConfig::default()
    };
    assert_eq!(c.validate(), Err(ConfigError::NoUpstreams));
    let mut c = ProxyConfig::default();
    c.upstreams[0].registry = "bad host/x".into();
    assert!(matches!(c.validate(), Err(ConfigError::BadRegistry(_))));
    let c = ProxyConfig {
        pin: vec!["alpine:3.20".into()],
        prefetch: vec!["ghcr.io/org/app:1".into()],
        ..ProxyConfig::default()
    };
    assert!(matches!(
        c.validate(),
        Err(ConfigError::ImageNotMirrored {
            list: "prefetch",
            ..
        })
    ));
    let c = ProxyConfig {
        pin: vec!["Not/Valid".into()],
        ..ProxyConfig::default()
    };
    assert!(matches!(c.validate(), Err(ConfigError::BadImage(_))));
}

#[test]
fn every_upstream_can_be_named_by_a_path_and_no_path_names_two() {
    let with = |registries: &[&str], default: &str, allow: &[&str]| {
        let mut upstreams: Vec<UpstreamConfig> =
            registries.iter().map(|r| UpstreamConfig::new(r)).collect();
        upstreams[0].repositories.allow = allow.iter().map(|p| p.to_string()).collect();
        ProxyConfig {
            upstreams,
            default_upstream: Some(default.into()),
            ..ProxyConfig::default()
        }
        .validate()
    };
    // A name that image references read as a Docker Hub namespace.
    assert_eq!(
        with(&["myregistry"], "myregistry", &[]),
        Err(ConfigError::NotARegistryName("myregistry".into()))
    );
    assert_eq!(with(&["localhost"], "localhost", &[]), Ok(()));
    // The default claims repositories under another upstream's name.
    let both = ["registry.local:5000", "ghcr.io"];
    let e = with(&both, "registry.local:5000", &["ghcr.io/team/*"]).unwrap_err();
    assert_eq!(
        e,
        ConfigError::AmbiguousRoute {
            default: "registry.local:5000".into(),
            pattern: "ghcr.io/team/*".into(),
            registry: "ghcr.io".into(),
        }
    );
    assert!(
        e.to_string().contains("/v2/registry.local:5000/ghcr.io/"),
        "{e}"
    );
    // Docker Hub's other names are its name too.
    assert!(matches!(
        with(
            &["registry.local:5000", "docker.io"],
            "registry.local:5000",
            &["index.docker.io/x"]
        ),
        Err(ConfigError::AmbiguousRoute { .. })
    ));
    // Globs, names of no upstream, and another upstream's filter name nothing twice.
    assert_eq!(
        with(&both, "registry.local:5000", &["*", "*/app", "quay.io/x"]),
        Ok(())
    );
    assert_eq!(with(&both, "ghcr.io", &["ghcr.io/team/*"]), Ok(()));
}

#[test]
fn cache_limits_take_quantities_and_refuse_zero() {
    let c = ProxyConfig::from_yaml("maxCacheBytes: 10Gi").unwrap();
    assert_eq!(c.max_cache_bytes, Some(10 << 30));
    let c = ProxyConfig::from_yaml("maxCacheBytes: 1048576").unwrap();
    assert_eq!(c.max_cache_bytes, Some(1 << 20));
    assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    let err = ProxyConfig::from_yaml("maxCacheBytes: ten").unwrap_err();
    assert!(err.to_string().contains("storage quantity"), "{err}");
    assert!(ProxyConfig::from_yaml("maxCacheBytes: -1").is_err());
    let c = ProxyConfig::from_yaml("maxCacheBytes: 0").unwrap();
    assert_eq!(c.validate(), Err(ConfigError::ZeroCacheLimit));
}

#[test]
fn a_shared_bucket_with_a_limit_elects_its_evictor() {
    let base = "maxCacheBytes: 1Gi\nstorage: {s3: {bucket: b, endpoint: 'http://s3:7480'";
    let cfg = |rest: &str| ProxyConfig::from_yaml(&format!("{base}{rest}")).unwrap();
    let alone = cfg("}}");
    assert_eq!(alone.validate(), Ok(()), "one process evicts alone");
    let ev = &alone.storage.s3.as_ref().unwrap().eviction;
    assert_eq!(
        (ev.every, ev.record_every, ev.grace.as_secs()),
        (Duration::from_secs(60), Duration::from_secs(20), 900)
    );
    let err = |c: ProxyConfig| c.validate().unwrap_err().to_string();
    // Replicas prove their requests to each other with a key they share.
    let keyless = err(cfg(
        ", eviction: {lease: m-evictor}}}\npeers: {dns: p.ns.svc}",
    ));
    assert!(keyless.contains("access.signingKeyFile"), "{keyless}");
    let peers = "}}\npeers: {dns: p.ns.svc}\naccess: {signingKeyFile: /key/k}";
    assert!(err(cfg(peers)).contains("eviction.lease"));
    let leased = cfg(&format!(
        ", eviction: {{lease: m-evictor, every: 10s, recordEvery: 5s}}{peers}"
    ));
    assert_eq!(leased.validate(), Ok(()));
    assert_eq!(ProxyConfig::from_yaml(&leased.to_yaml()).unwrap(), leased);
    assert!(err(cfg(", eviction: {every: 10s, recordEvery: 6s}}}")).contains("twice"));
    assert!(err(cfg(", redirect: true, eviction: {grace: 5m}}}")).contains("10m"));
    assert_eq!(cfg(", redirect: true}}").validate(), Ok(()));
}

#[test]
fn listen_addresses() {
    let ok = |s: &str| parse_listen(s).unwrap().to_string();
    assert_eq!(ok("0.0.0.0:5000"), "0.0.0.0:5000");
    assert_eq!(ok("[::1]:5000"), "[::1]:5000");
    assert_eq!(ok("localhost:5000"), "127.0.0.1:5000");
    assert_eq!(ok(":5000"), "0.0.0.0:5000");
    let err = parse_listen("registry.local:5000").unwrap_err().to_string();
    assert!(err.contains("host name, which is not accepted"), "{err}");
    assert!(parse_listen("5000").is_err());
    assert!(parse_listen("localhost:http").is_err());
    let c = ProxyConfig::from_yaml("listen: localhost:5001").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:5001");

    // The two listeners on one port clash, unless each asks for a free port.
    let clash = |a: &str, b: &str| {
        let c = ProxyConfig {
            listen: parse_listen(a).unwrap(),
            metrics_listen: parse_listen(b).unwrap(),
            ..ProxyConfig::default()
        };
        matches!(c.validate(), Err(ConfigError::ListenClash(..)))
    };
    assert!(clash("0.0.0.0:5000", "0.0.0.0:5000"));
    assert!(clash("127.0.0.1:5000", "0.0.0.0:5000"));
    assert!(!clash("127.0.0.1:5000", "127.0.0.2:5000"));
    assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
    assert!(!clash("0.0.0.0:5000", "0.0.0.0:9095"));
}

#[test]
fn globs() {
    let f = RepositoryFilter {
        allow: vec!["library/*".into(), "bitnami/*".into()],
        deny: vec!["library/bad*".into()],
    };
    assert!(f.permits("library/alpine"));
    assert!(f.permits("bitnami/redis/x"));
    assert!(!f.permits("library/badger"));
    assert!(!f.permits("other/thing"));
    assert!(RepositoryFilter::default().permits("anything"));
    assert!(glob_match("a*b*c", "aXXbYYc"));
    assert!(!glob_match("a*b", "aXXc"));
}

#[test]
fn counts_of_zero_are_refused_where_they_are_read() {
    for (yaml, field) in [
        ("maxConnections: 0", "maxConnections"),
        ("maxManifestBytes: 0", "maxManifestBytes"),
        ("access: {maxFailedChecks: 0}", "maxFailedChecks"),
        (
            "access: {maxFailedChecksPerClient: 0}",
            "maxFailedChecksPerClient",
        ),
    ] {
        let err = ProxyConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("nonzero"), "{err}");
    }
    let err = |yaml: &str| {
        ProxyConfig::from_yaml(yaml)
            .unwrap()
            .validate()
            .unwrap_err()
    };
    assert_eq!(
        err("access: {deniedTTL: 0s}"),
        ConfigError::Zero("access.deniedTTL")
    );
    assert_eq!(
        err("clientIdleTimeout: 0s"),
        ConfigError::Zero("clientIdleTimeout")
    );
    let no_bucket = err("storage: {s3: {prefix: p}}");
    assert_eq!(no_bucket, ConfigError::BadS3("bucket is required"));
    // A part left out takes its defaults; a part given takes them for what it leaves out.
    let c = ProxyConfig::from_yaml("access: {plainHttp: true}").unwrap();
    assert_eq!(c.access.denied_ttl, AccessConfig::default().denied_ttl);
    let hub = ProxyConfig::from_yaml("upstreams: [{registry: docker.io, limits: {backoff: 1m}}]")
        .unwrap();
    let limits = hub.upstreams[0].limits();
    assert_eq!(
        limits.max_concurrent_requests,
        Some(32),
        "docker.io's own cap"
    );
    assert_eq!(
        limits.queue_timeout,
        UpstreamLimits::default().queue_timeout
    );
}

#[test]
fn modes_are_the_proxy_s_and_each_upstream_s_own() {
    let c = ProxyConfig::from_yaml("").unwrap();
    assert_eq!(c.mode, UpstreamMode::Online);
    assert!(!c.to_yaml().contains("mode"), "the default is not written");
    let text = "mode: offline\nupstreams:\n  - registry: docker.io\n    mode: localFirst\n  - registry: ghcr.io\n";
    let c = ProxyConfig::from_yaml(text).unwrap();
    assert_eq!(c.mode, UpstreamMode::Offline);
    assert_eq!(c.upstreams[0].mode, Some(UpstreamMode::LocalFirst));
    assert_eq!(c.upstreams[1].mode, None);
    assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    let err = ProxyConfig::from_yaml("mode: sleepy")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("online") && err.contains("localFirst"),
        "{err}"
    );
}

#[test]
fn tag_policies_are_checked() {
    let with = |policies: &str| {
        ProxyConfig::from_yaml(&format!(
            "upstreams:\n  - registry: docker.io\n    tagPolicies: [{policies}]\n"
        ))
        .unwrap()
    };
    let digest = format!("sha256:{}", "a".repeat(64));
    let ok = with(&format!(
        "{{repositories: 'library/*', tags: 'v*', policy: immutable}}, \
         {{repositories: org/app, tags: latest, policy: pinned, digest: '{digest}'}}"
    ));
    ok.validate().unwrap();
    assert_eq!(ok.upstreams[0].tag_policies[0].tags, "v*");
    assert_eq!(ProxyConfig::from_yaml(&ok.to_yaml()).unwrap(), ok);
    assert_eq!(
        with("{repositories: x, policy: refresh}").upstreams[0].tag_policies[0].tags,
        "*",
        "every tag when not given"
    );
    for (policy, why) in [
        ("{repositories: x, policy: pinned}", "needs the digest"),
        (
            "{repositories: x, policy: immutable, digest: 'sha256:00'}",
            "only a pinned policy",
        ),
        (
            "{repositories: x, policy: pinned, digest: 'latest'}",
            "is not one",
        ),
    ] {
        let err = with(policy).validate().unwrap_err().to_string();
        assert!(
            err.contains("tagPolicies[0]") && err.contains(why),
            "{policy}: {err}"
        );
    }
}

//! The proxy against an upstream that misbehaves on purpose: token auth, 5xx, dropped
//! connections, wrong bytes, slowness, oversize manifests; and clients that send bad input.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use pullthrough::api::{Credentials, RepositoryFilter};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tmp_files(proxy: &Proxy) -> usize {
    std::fs::read_dir(proxy.cache_dir.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends a request line byte for byte (no client-side path normalisation).
async fn raw_get(host: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_credentials_and_token_cache() {
    let up = FaultUpstream::start().await;
    *up.state.token_auth.lock().unwrap() = Some(("alice".into(), "s3cret".into()));
    let image = Image::generate(21, &[50_000, 60_000], "amd64");
    up.add_image("private/app", "v1", &image);

    let mut cfg = up.config();
    cfg.upstreams[0].credentials = Some(Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    });
    // The proxy's own credentials upstream, served to any client.
    cfg.upstreams[0].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::Open,
    });
    let proxy = Proxy::start_config(cfg).await;
    let pulled = pull(&proxy.url, "private/app", "v1", None).await.unwrap();
    assert_eq!(pulled.top, image.manifest.digest);
    // One token for the repository's pull scope, reused for every later request.
    assert_eq!(up.state.tokens_issued.load(Ordering::SeqCst), 1);
    assert_eq!(
        proxy
            .metric(
                "pullthrough_upstream_requests_total",
                &[("kind", "token"), ("code", "200")]
            )
            .await,
        1.0
    );

    // Wrong credentials: the token endpoint refuses, the client gets DENIED, nothing cached.
    let mut cfg = up.config();
    cfg.upstreams[0].credentials = Some(Credentials {
        username: "alice".into(),
        password: "wrong".into(),
    });
    // The proxy's own credentials upstream, served to any client.
    cfg.upstreams[0].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::Open,
    });
    let proxy2 = Proxy::start_config(cfg).await;
    let r = http()
        .get(format!("{}/v2/private/app/manifests/v1", proxy2.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, "DENIED".to_string()));
    // No credentials at all: same.
    let proxy3 = Proxy::start(&[(up.host.as_str(), up.url.as_str())]).await;
    let r = http()
        .get(format!("{}/v2/private/app/manifests/v1", proxy3.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await.1, "DENIED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_to_storage_are_followed_without_leaking_credentials() {
    let origin = FaultUpstream::start().await;
    let cdn = FaultUpstream::start().await;
    *origin.state.token_auth.lock().unwrap() = Some(("alice".into(), "s3cret".into()));
    *origin.state.redirect_blobs_to.lock().unwrap() = Some(cdn.url.clone());
    let image = Image::generate(26, &[120_000, 5_000], "amd64");
    origin.add_image("private/app", "v1", &image);
    for b in image.blobs() {
        cdn.add_blob(b);
    }
    let mut cfg = origin.config();
    cfg.upstreams[0].credentials = Some(Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    });
    // The proxy's own credentials upstream, served to any client.
    cfg.upstreams[0].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::Open,
    });
    let proxy = Proxy::start_config(cfg).await;
    let pulled = pull(&proxy.url, "private/app", "v1", None).await.unwrap();
    assert_eq!(pulled.top, image.manifest.digest);
    let blobs = image.blobs().count();
    assert_eq!(
        cdn.count("GET /storage/"),
        blobs,
        "every blob came from storage"
    );
    assert!(
        cdn.state
            .auth_log
            .lock()
            .unwrap()
            .iter()
            .all(|a| a.is_empty()),
        "registry credentials never reach another host: {:?}",
        cdn.state.auth_log.lock().unwrap()
    );
    assert!(
        origin
            .state
            .auth_log
            .lock()
            .unwrap()
            .iter()
            .any(|a| a == "Bearer secret-token")
    );
    // Cached like any other blob.
    proxy.settled().await;
    for b in image.blobs() {
        assert!(cached(&proxy.cache_dir, &b.digest));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_is_an_oci_error_and_caches_nothing() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(22, &[10_000], "amd64");
    up.add_image("a/b", "v1", &image);
    up.state.fail_status.store(503, Ordering::SeqCst);
    let mut cfg = up.config();
    // A 429 without Retry-After leaves the upstream alone for `limits.backoff`
    // (tests/upstream_limits.rs): not at all here, so the upstream's return shows at once.
    cfg.upstreams[0].limits = Some(pullthrough::api::UpstreamLimits {
        backoff: Duration::ZERO,
        ..pullthrough::api::UpstreamLimits::for_registry("fault.test")
    });
    let proxy = Proxy::start_config(cfg).await;
    let c = http();
    let r = c
        .get(format!("{}/v2/a/b/manifests/v1", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_string()));
    let r = c
        .get(format!(
            "{}/v2/a/b/blobs/{}",
            proxy.url, image.layers[0].digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_string()));
    assert!(!cached(&proxy.cache_dir, &image.layers[0].digest));
    assert!(!cached(&proxy.cache_dir, &image.manifest.digest));
    assert_eq!(
        proxy
            .metric("pullthrough_upstream_requests_total", &[("code", "503")])
            .await,
        2.0
    );
    // 429 is passed on as TOOMANYREQUESTS.
    up.state.fail_status.store(429, Ordering::SeqCst);
    let r = c
        .get(format!("{}/v2/a/b/manifests/v1", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (429, "TOOMANYREQUESTS".to_string()));
    // Upstream back: the pull works.
    up.state.fail_status.store(0, Ordering::SeqCst);
    pull(&proxy.url, "a/b", "v1", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_named_in_the_error() {
    // A port nobody listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = closed.local_addr().unwrap().to_string();
    drop(closed);
    let proxy = Proxy::start(&[("gone.test", &format!("http://{host}"))]).await;
    let r = http()
        .get(format!("{}/v2/a/b/manifests/v1", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("cannot reach http://{host}")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_mid_blob_is_never_cached_or_served_whole() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(5, 1_000_000));
    up.add_blob(&layer);
    up.state.drop_mid_blob.store(1, Ordering::SeqCst);
    let proxy = Proxy::start_config(up.config()).await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);

    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "headers go out before the upstream fails");
    let body = r.bytes().await;
    assert!(
        body.is_err(),
        "the client must see a broken body, not a short complete one"
    );
    // Let the download task clean up.
    proxy.settled().await;
    assert!(!cached(&proxy.cache_dir, &layer.digest));
    assert_eq!(tmp_files(&proxy), 0, "the partial file is removed");

    let body = get_bytes(&url).await;
    assert_eq!(sha256(&body), layer.digest);
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &layer.digest));
    assert_eq!(up.count("GET /v2/a/b/blobs/"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_for_a_digest_are_never_cached_or_served_whole() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(6, 700_000));
    up.add_blob(&layer);
    up.state
        .corrupt
        .lock()
        .unwrap()
        .insert(layer.digest.clone());
    let proxy = Proxy::start_config(up.config()).await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);

    for _ in 0..2 {
        let r = http().get(&url).send().await.unwrap();
        if let Ok(b) = r.bytes().await {
            panic!(
                "a complete body of {} bytes was served for a wrong digest",
                b.len()
            );
        }
        proxy.settled().await;
        assert!(!cached(&proxy.cache_dir, &layer.digest));
    }
    assert_eq!(tmp_files(&proxy), 0);
    // Each request tried again: a bad download is never remembered as good.
    assert_eq!(up.count("GET /v2/a/b/blobs/"), 2);

    // A manifest whose bytes do not match the digest asked for.
    let m = Blob::new(OCI_MANIFEST, br#"{"schemaVersion":2}"#.to_vec());
    let other = Blob::new(OCI_MANIFEST, br#"{"schemaVersion":2,"x":1}"#.to_vec());
    up.add_manifest("a/b", &m.digest, &other);
    let r = http()
        .get(format!("{}/v2/a/b/manifests/{}", proxy.url, m.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "DIGEST_INVALID".to_string()));
    assert!(!cached(&proxy.cache_dir, &m.digest) && !cached(&proxy.cache_dir, &other.digest));

    // Upstream fixed: the right bytes are served and cached.
    up.state.corrupt.lock().unwrap().clear();
    let body = get_bytes(&url).await;
    assert_eq!(sha256(&body), layer.digest);
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &layer.digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_upstream_streams_to_the_first_client_and_coalesces_the_rest() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(8, 64 * 16 * 1024));
    up.add_blob(&layer);
    // The upstream sends the first 16 KiB, then holds the rest back until released: a
    // cache that stored before serving would never pass those first bytes on.
    let release = up.hold_blobs(16 * 1024);
    let proxy = Proxy::start_config(up.config()).await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);

    let mut first = http().get(&url).send().await.unwrap();
    let first_chunk = tokio::time::timeout(Duration::from_secs(60), first.chunk())
        .await
        .expect("no byte while the upstream held the rest: the blob must stream")
        .unwrap()
        .unwrap();
    assert!(!first_chunk.is_empty());

    // While the download is held, seven more clients ask: they join it.
    let followers: Vec<_> = (0..7)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get_bytes(&url).await })
        })
        .collect();
    let coalesced = || async {
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "blob"), ("result", "coalesced")],
            )
            .await
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while coalesced().await < 7.0 {
        assert!(Instant::now() < deadline, "the followers did not join");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.send(true).unwrap();

    let mut body = first_chunk.to_vec();
    while let Some(c) = first.chunk().await.unwrap() {
        body.extend_from_slice(&c);
    }
    assert_eq!(sha256(&body), layer.digest);
    for f in followers {
        assert_eq!(sha256(&f.await.unwrap()), layer.digest);
    }
    assert_eq!(up.count("GET /v2/a/b/blobs/"), 1);
    assert_eq!(coalesced().await, 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tags_are_served_while_the_upstream_is_down_within_the_bound() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(23, &[30_000], "amd64");
    up.add_image("a/b", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    // Each step runs its own process on the same cache with the TTLs it needs, so that no
    // step depends on how fast the machine is: a TTL of zero is always past, an hour
    // never is.
    cfg.tag_ttl = Duration::from_secs(3600);
    cfg.stale_if_error = Duration::from_secs(3600);
    let proxy = Proxy::start_config(cfg.clone()).await;
    pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    proxy.settled().await;

    // Within the TTL the upstream is not asked at all.
    let manifest_calls = up.count("/manifests/v1");
    pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    assert_eq!(up.count("/manifests/v1"), manifest_calls);
    proxy.stop().await;

    // Past the TTL with the upstream down: the last known digest is served, counted
    // stale, also by a new process (the tag survives a restart).
    up.state.fail_status.store(503, Ordering::SeqCst);
    cfg.tag_ttl = Duration::ZERO;
    let proxy = Proxy::start_config(cfg.clone()).await;
    let pulled = pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    assert_eq!(pulled.top, image.manifest.digest);
    assert_eq!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "manifest"), ("result", "stale")]
            )
            .await,
        1.0
    );
    assert!(
        up.count("HEAD /v2/a/b/manifests/v1") >= 1,
        "revalidation uses HEAD"
    );
    proxy.stop().await;

    // Beyond staleIfError it is an error, not stale content.
    cfg.stale_if_error = Duration::ZERO;
    let proxy = Proxy::start_config(cfg).await;
    let r = http()
        .get(format!("{}/v2/a/b/manifests/v1", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_revalidated_after_ttl_and_follow_upstream_changes() {
    let up = FaultUpstream::start().await;
    let v1 = Image::generate(24, &[1000], "amd64");
    let v2 = Image::generate(25, &[1000], "amd64");
    up.add_image("a/b", "latest", &v1);
    let mut cfg = up.config();
    cfg.tag_ttl = Duration::from_millis(300);
    let proxy = Proxy::start_config(cfg).await;
    assert_eq!(
        pull(&proxy.url, "a/b", "latest", None).await.unwrap().top,
        v1.manifest.digest
    );

    // Unchanged upstream: revalidated with a HEAD, no new GET.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let gets = up.count("GET /v2/a/b/manifests/latest");
    assert_eq!(
        pull(&proxy.url, "a/b", "latest", None).await.unwrap().top,
        v1.manifest.digest
    );
    assert_eq!(up.count("GET /v2/a/b/manifests/latest"), gets);
    assert_eq!(up.count("HEAD /v2/a/b/manifests/latest"), 1);

    // The tag moves upstream: after the TTL the proxy follows.
    up.add_image("a/b", "latest", &v2);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        pull(&proxy.url, "a/b", "latest", None).await.unwrap().top,
        v2.manifest.digest
    );

    // The tag is deleted upstream: MANIFEST_UNKNOWN, not the old digest.
    up.state
        .manifests
        .lock()
        .unwrap()
        .remove(&("a/b".to_string(), "latest".to_string()));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = http()
        .get(format!("{}/v2/a/b/manifests/latest", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_any_upstream_call() {
    let up = FaultUpstream::start().await;
    let big = Blob::new(
        OCI_MANIFEST,
        format!(r#"{{"schemaVersion":2,"pad":"{}"}}"#, "x".repeat(5000)).into_bytes(),
    );
    up.add_manifest("a/b", "big", &big);
    let mut cfg = up.config();
    cfg.max_manifest_bytes = 4096.try_into().unwrap();
    cfg.upstreams[0].repositories = RepositoryFilter {
        allow: vec!["a/*".into(), "team/*".into()],
        deny: vec!["team/secret*".into()],
    };
    let proxy = Proxy::start_config(cfg).await;
    let c = http();
    let d = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(String, u16, &str)> = vec![
        ("/v2/UPPER/manifests/v1".into(), 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/v1".into(), 400, "NAME_INVALID"),
        ("/v2/a/-b/manifests/v1".into(), 400, "NAME_INVALID"),
        (
            format!("/v2/{}/manifests/v1", "a".repeat(300)),
            400,
            "NAME_INVALID",
        ),
        // A tag that cannot exist is not found (OCI conformance, as Distribution).
        ("/v2/a/b/manifests/.hidden".into(), 404, "MANIFEST_UNKNOWN"),
        (
            format!("/v2/a/b/manifests/{}", "t".repeat(129)),
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/a/b/manifests/sha256:zz".into(), 400, "DIGEST_INVALID"),
        ("/v2/a/b/blobs/sha256:1234".into(), 400, "DIGEST_INVALID"),
        ("/v2/a/b/blobs/latest".into(), 400, "DIGEST_INVALID"),
        (
            format!("/v2/a/b/blobs/{}", d.replace("sha256", "md5")),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/a/b/blobs/{}?ns=evil.example.com", d),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/a/b/manifests/v1?ns=registry-1.docker.io".into(),
            404,
            "NAME_UNKNOWN",
        ),
        ("/v2/other/x/manifests/v1".into(), 403, "DENIED"),
        ("/v2/team/secret-app/manifests/v1".into(), 403, "DENIED"),
        ("/v2/a/b/uploads/".into(), 404, "NAME_UNKNOWN"),
    ];
    for (path, status, code) in &cases {
        let r = c.get(format!("{}{path}", proxy.url)).send().await.unwrap();
        assert_eq!(error_code(r).await, (*status, code.to_string()), "{path}");
    }
    // Traversal attempts sent raw, so no client normalises them away.
    for (path, status) in [
        ("/v2/../../etc/passwd/manifests/v1", 400),
        ("/v2/a/%2e%2e/%2e%2e/manifests/v1", 400),
        ("/v2/a/b/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 400),
        ("/v2/a/b/manifests/..%2f..%2fx", 404),
    ] {
        let resp = raw_get(&proxy.host, path).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {resp}"
        );
        assert!(resp.contains("\"errors\""), "{path}: {resp}");
    }
    // Writes are refused: this is a read-only cache.
    let r = c
        .put(format!("{}/v2/a/b/manifests/v1", proxy.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (405, "UNSUPPORTED".to_string()));
    let r = c
        .post(format!("{}/v2/a/b/blobs/uploads/", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (405, "UNSUPPORTED".to_string()));
    assert_eq!(
        up.total(),
        0,
        "no bad request reached the upstream: {:?}",
        up.state.log.lock().unwrap()
    );

    // An oversize manifest upstream is refused and not cached.
    let r = c
        .get(format!("{}/v2/a/b/manifests/big", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "SIZE_INVALID".to_string()));
    assert!(!cached(&proxy.cache_dir, &big.digest));
    assert_eq!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "manifest"), ("result", "error")]
            )
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_upstreams_routed_by_ns_and_referrers_passed_through() {
    let one = FaultUpstream::start().await;
    let two = FaultUpstream::start().await;
    let a = Image::generate(31, &[1000], "amd64");
    let b = Image::generate(32, &[1000], "amd64");
    one.add_image("x/y", "v", &a);
    two.add_image("x/y", "v", &b);
    let proxy = Proxy::start(&[
        ("one.example", one.url.as_str()),
        ("two.example:5000", two.url.as_str()),
    ])
    .await;
    assert_eq!(
        pull(&proxy.url, "x/y", "v", None).await.unwrap().top,
        a.manifest.digest
    );
    assert_eq!(
        pull(&proxy.url, "x/y", "v", Some("one.example"))
            .await
            .unwrap()
            .top,
        a.manifest.digest
    );
    assert_eq!(
        pull(&proxy.url, "x/y", "v", Some("two.example:5000"))
            .await
            .unwrap()
            .top,
        b.manifest.digest
    );
    assert_eq!(
        pull(&proxy.url, "x/y", "v", Some("TWO.example:5000"))
            .await
            .unwrap()
            .top,
        b.manifest.digest
    );
    let text = proxy.metrics().await;
    assert!(
        metric_value(
            &text,
            "pullthrough_requests_total",
            &[("upstream", "two.example:5000")]
        ) > 0.0
    );

    let r = http()
        .get(format!(
            "{}/v2/x/y/referrers/{}?ns=two.example:5000&artifactType=application%2Fexample.sbom",
            proxy.url, b.manifest.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"][0]["digest"], b.manifest.digest.as_str());
    assert_eq!(
        two.count("artifactType=application%2Fexample.sbom"),
        1,
        "filters are forwarded, ns is not"
    );
    assert_eq!(two.count("ns="), 0);
    // The same referrers with the registry in the path (its port as image references
    // write it), for clients that send no ns.
    let r = http()
        .get(format!(
            "{}/v2/two.example_5000/x/y/referrers/{}",
            proxy.url, b.manifest.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"][0]["digest"], b.manifest.digest.as_str());
    assert_eq!(one.count("/referrers/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_bodies_that_stall_fail_within_the_timeout() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(500, &[100], "amd64");
    up.add_image("a/b", "v1", &image);
    up.add_image("a/c", "v1", &image);
    let mut cfg = up.config();
    cfg.upstream_timeout = Duration::from_secs(1);
    let proxy = Proxy::start_config(cfg).await;
    for part in ["/tags/list", "/referrers/", "/manifests/v1"] {
        up.state.stall_bodies.lock().unwrap().push(part.to_string());
    }
    let paths = [
        "/v2/a/b/tags/list".to_string(),
        format!("/v2/a/b/referrers/{}", image.manifest.digest),
        "/v2/a/b/manifests/v1".to_string(),
    ];
    // The client waits up to 120 s: a stall that is not cut by the proxy fails it.
    for path in &paths {
        let r = get(&format!("{}{path}", proxy.url)).await;
        assert_eq!(
            error_code(r).await,
            (502, "UNAVAILABLE".to_string()),
            "{path}"
        );
    }
    // And the token endpoint's answer.
    up.state.stall_bodies.lock().unwrap().clear();
    *up.state.token_auth.lock().unwrap() = Some(("u".into(), "p".into()));
    up.state.stall_bodies.lock().unwrap().push("/token".into());
    let mut cfg = up.config();
    cfg.upstream_timeout = Duration::from_secs(1);
    cfg.upstreams[0].credentials = Some(pullthrough::api::Credentials {
        username: "u".into(),
        password: "p".into(),
    });
    // The proxy's own credentials upstream, served to any client.
    cfg.upstreams[0].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::Open,
    });
    let proxy = Proxy::start_config(cfg).await;
    let r = get(&format!("{}/v2/a/c/manifests/v1", proxy.url)).await;
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_ns_and_odd_upstream_answers_get_their_own_errors() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(510, &[100], "amd64");
    up.add_image("a/b", "v1", &image);
    let proxy = Proxy::start_config(up.config()).await;
    let at = |path: String| {
        let url = format!("{}{path}", proxy.url);
        async move { get(&url).await }
    };
    for query in ["ns=%zz", &format!("ns={}&ns={}", up.host, up.host)] {
        let r = at(format!("/v2/a/b/manifests/v1?{query}")).await;
        assert_eq!(
            error_code(r).await,
            (400, "NAME_INVALID".to_string()),
            "{query}"
        );
    }
    assert_eq!(up.total(), 0, "refused before any upstream call");

    // A status no registry sends here is not a digest problem.
    up.state.fail_status.store(418, Ordering::SeqCst);
    let r = at("/v2/a/b/manifests/v1".into()).await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNKNOWN");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("418"));
    up.state.fail_status.store(0, Ordering::SeqCst);

    // A redirect to nowhere.
    up.state.redirect_nowhere.store(true, Ordering::SeqCst);
    let layer = &image.layers[0].digest;
    let r = at(format!("/v2/a/b/blobs/{layer}")).await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNKNOWN");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("without a Location")
    );

    // A token endpoint that answers without a token names itself.
    *up.state.token_auth.lock().unwrap() = Some(("u".into(), "p".into()));
    *up.state.token_answer.lock().unwrap() = Some(r#"{"nothing":"here"}"#.into());
    let mut cfg = up.config();
    cfg.upstreams[0].credentials = Some(pullthrough::api::Credentials {
        username: "u".into(),
        password: "p".into(),
    });
    // The proxy's own credentials upstream, served to any client.
    cfg.upstreams[0].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::Open,
    });
    let proxy = Proxy::start_config(cfg).await;
    let r = get(&format!("{}/v2/a/b/manifests/v1", proxy.url)).await;
    let v: serde_json::Value = r.json().await.unwrap();
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert_eq!(v["errors"][0]["code"], "UNKNOWN", "{message}");
    assert!(
        message.contains(&format!(
            "token endpoint {} answered without a token",
            up.url
        )),
        "{message}"
    );
}

/// A hostile upstream body of unknown length: one that never ends is written only into
/// the room set aside for it and only while a client reads it, so the cache's volume never
/// fills (no disk-full for everyone); one that drips a byte every 100 ms is cut off at the
/// end of its first window below `upstreamMinRate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_and_dripping_bodies_cannot_hold_the_cache() {
    let up = FaultUpstream::start().await;
    let (endless, dripping) = (
        Blob::new(LAYER, random_bytes(640, 1000)),
        Blob::new(LAYER, random_bytes(641, 1000)),
    );
    up.add_blob(&endless);
    up.add_blob(&dripping);
    up.state
        .endless
        .lock()
        .unwrap()
        .push(endless.digest.clone());
    up.state
        .drips
        .lock()
        .unwrap()
        .push((dripping.digest.clone(), Duration::from_millis(100)));
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), 96);
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    cfg.upstream_min_rate = 1024;
    cfg.upstream_min_rate_window = Duration::from_secs(1);
    let proxy = Proxy::start_config(cfg).await;
    let url = |b: &Blob| format!("{}/v2/team/x/blobs/{}", proxy.url, b.digest);
    let disk_full = || proxy.metric("pullthrough_cache_disk_full", &[]);

    // A client that reads 1 MiB and leaves: the download stops with it.
    let (first, _) = get_begun(&url(&endless), 1 << 20).await;
    drop(first);
    until("the endless download to stop", || async {
        proxy.metric("pullthrough_inflight_fetches", &[]).await == 0.0
    })
    .await;
    // A client that reads on: the download stops at its room, the volume never fills.
    let mut r = http().get(url(&endless)).send().await.unwrap();
    let mut got = 0u64;
    let ended = loop {
        match r.chunk().await {
            Ok(Some(c)) => got += c.len() as u64,
            Ok(None) => break "the body ended",
            Err(_) => break "cut",
        }
    };
    assert_eq!(ended, "cut");
    assert!(got < 96 << 20, "read {got} bytes of an endless body");
    assert_eq!(disk_full().await, 0.0, "the cache volume filled up");
    proxy.settled().await;
    let left = std::fs::read_dir(fs.0.join("cache/tmp")).unwrap().count();
    assert_eq!(left, 0, "partial downloads left behind");

    // A drip: cut off after its first window, not held until a timeout.
    let r = http().get(url(&dripping)).send().await.unwrap();
    assert!(r.bytes().await.is_err(), "a dripping body was not cut off");
    assert_eq!(disk_full().await, 0.0);
}

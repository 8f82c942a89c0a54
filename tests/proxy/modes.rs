//! An upstream's mode (`online`, `localFirst`, `offline`): what a client waits for when
//! the upstream is slow or gone, and the mode changed on a running proxy.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use pullthrough::api::{ProxyConfig, UpstreamMode};
use std::time::Duration;

/// The OCI error of `r`: its status, code and message.
async fn oci_error(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.expect("an OCI error body");
    let e = &v["errors"][0];
    (
        status,
        e["code"].as_str().unwrap().to_string(),
        e["message"].as_str().unwrap().to_string(),
    )
}

/// An upstream holding `a/b:v1`, and a cache directory that has pulled it (online).
async fn cached_v1() -> (FaultUpstream, Image, tempfile::TempDir) {
    let up = FaultUpstream::start().await;
    let image = Image::generate(41, &[20_000, 30_000], "amd64");
    up.add_image("a/b", "v1", &image);
    up.add_image("a/b", "other", &Image::generate(42, &[10_000], "amd64"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(cfg).await;
    pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    proxy.settled().await;
    proxy.stop().await;
    (up, image, dir)
}

/// A configuration on that cache where every tag is past its TTL and its stale window:
/// online, a tag would be revalidated before it is served, and refused while the
/// upstream fails.
fn past_every_ttl(up: &FaultUpstream, dir: &tempfile::TempDir) -> ProxyConfig {
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    cfg.tag_ttl = Duration::ZERO;
    cfg.stale_if_error = Duration::ZERO;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_serves_what_is_cached_and_fails_a_miss_at_once_without_asking() {
    let (up, image, dir) = cached_v1().await;
    let mut cfg = past_every_ttl(&up, &dir);
    cfg.mode = UpstreamMode::Offline;
    let proxy = Proxy::start_config(cfg).await;
    let asked = up.state.log.lock().unwrap().len();

    let pulled = pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    assert_eq!(pulled.top, image.manifest.digest);

    // A tag, a digest and a blob it does not have: 404 at once, naming offline mode.
    for (path, code) in [
        ("manifests/other", "MANIFEST_UNKNOWN"),
        (
            "manifests/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "MANIFEST_UNKNOWN",
        ),
        (
            "blobs/sha256:1111111111111111111111111111111111111111111111111111111111111111",
            "BLOB_UNKNOWN",
        ),
    ] {
        let r = http()
            .get(format!("{}/v2/a/b/{path}", proxy.url))
            .send()
            .await
            .unwrap();
        let (status, got, message) = oci_error(r).await;
        assert_eq!((status, got.as_str()), (404, code), "{path}");
        assert!(message.contains("offline mode"), "{path}: {message}");
    }
    assert_eq!(
        up.state.log.lock().unwrap().len(),
        asked,
        "the upstream was asked: {:?}",
        &up.state.log.lock().unwrap()[asked..]
    );
    let host = up.host.to_ascii_lowercase();
    let mode = |m: &'static str| {
        let (proxy, host) = (&proxy, host.clone());
        async move {
            proxy
                .metric(
                    "pullthrough_upstream_mode",
                    &[("upstream", &host), ("mode", m)],
                )
                .await
        }
    };
    assert_eq!(mode("offline").await, 1.0);
    assert_eq!(mode("online").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_first_serves_a_cached_tag_while_the_upstream_stalls_and_revalidates_behind() {
    let (up, image, dir) = cached_v1().await;
    let mut cfg = past_every_ttl(&up, &dir);
    cfg.upstreams[0].mode = Some(UpstreamMode::LocalFirst);
    let proxy = Proxy::start_config(cfg).await;

    // Every manifest request waits until released: a client that waited on one would
    // not finish in the minute it is given.
    let release = up.hold_requests("/manifests/");
    let pulled = tokio::time::timeout(Duration::from_secs(60), pull(&proxy.url, "a/b", "v1", None))
        .await
        .expect("the client waited on the upstream")
        .unwrap();
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

    // Behind the client, the tag is revalidated with a HEAD, which the upstream holds.
    let head = "HEAD /v2/a/b/manifests/v1";
    for _ in 0..600 {
        if up.count(head) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.count(head), 1);
    release.send(true).unwrap();

    // A miss is still fetched, as online.
    let r = http()
        .get(format!("{}/v2/a/b/manifests/other", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mode_changes_on_a_running_proxy_through_the_admin_api() {
    let (up, _image, dir) = cached_v1().await;
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(cfg.clone()).await;
    let token = std::fs::read_to_string(cfg.cache_dir.join("admin-token")).unwrap();
    let put = |body: serde_json::Value| {
        let (url, token) = (format!("{}/admin/mode", proxy.metrics_url), token.clone());
        async move {
            http()
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // A manifest the cache does not have.
    let other = || async {
        http()
            .get(format!("{}/v2/a/b/manifests/other", proxy.url))
            .send()
            .await
            .unwrap()
    };
    let host = up.host.to_ascii_lowercase();
    let listed = proxy.admin_get("/admin/mode", &token).await;
    assert_eq!(
        listed,
        serde_json::json!({"upstreams": [{"upstream": host, "mode": "online"}]})
    );

    let r = put(serde_json::json!({"mode": "offline"})).await;
    assert_eq!(r.status(), 200);
    let r = other().await;
    assert_eq!(oci_error(r).await.0, 404);
    assert_eq!(
        proxy
            .metric(
                "pullthrough_upstream_mode",
                &[("upstream", &host), ("mode", "offline")]
            )
            .await,
        1.0
    );

    // Bad requests change nothing and say why.
    for (body, status) in [
        (serde_json::json!({"mode": "sleepy"}), 400),
        (
            serde_json::json!({"mode": "online", "upstream": "nope.io"}),
            404,
        ),
    ] {
        let r = put(body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
        let refusal: serde_json::Value = r.json().await.unwrap();
        assert!(refusal["error"].as_str().is_some(), "{refusal}");
    }
    let r = http()
        .put(format!("{}/admin/mode", proxy.metrics_url))
        .json(&serde_json::json!({"mode": "online"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no admin token");

    let r = put(serde_json::json!({"mode": "online", "upstream": host})).await;
    assert_eq!(r.status(), 200);
    let r = other().await;
    assert_eq!(r.status(), 200, "online again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_policies_keep_version_tags_and_freeze_a_tag_whatever_the_upstream_says() {
    let up = FaultUpstream::start().await;
    let (one, two) = (
        Image::generate(43, &[10_000], "amd64"),
        Image::generate(44, &[12_000], "amd64"),
    );
    for tag in ["v1", "latest", "frozen"] {
        up.add_image("a/b", tag, &one);
    }
    let mut cfg = up.config();
    // Every refreshed tag is revalidated on every pull.
    cfg.tag_ttl = Duration::ZERO;
    cfg.upstreams[0].tag_policies = serde_yaml::from_str(&format!(
        "- {{repositories: a/b, tags: 'v*', policy: immutable}}\n\
         - {{repositories: 'a/*', tags: frozen, policy: pinned, digest: '{}'}}\n",
        one.manifest.digest
    ))
    .unwrap();
    let proxy = Proxy::start_config(cfg).await;
    for tag in ["v1", "latest"] {
        pull(&proxy.url, "a/b", tag, None).await.unwrap();
    }
    // Every tag moves upstream.
    for tag in ["v1", "latest", "frozen"] {
        up.add_image("a/b", tag, &two);
    }
    let top = |tag: &'static str| {
        let url = proxy.url.clone();
        async move { pull(&url, "a/b", tag, None).await.unwrap().top }
    };
    // Immutable: the version tag stays, and is not even revalidated.
    assert_eq!(top("v1").await, one.manifest.digest);
    assert_eq!(up.count("HEAD /v2/a/b/manifests/v1"), 0);
    // Refreshed: followed.
    assert_eq!(top("latest").await, two.manifest.digest);
    // Pinned: its digest, the upstream never asked for the tag.
    assert_eq!(top("frozen").await, one.manifest.digest);
    assert_eq!(up.count("/manifests/frozen"), 0);
}

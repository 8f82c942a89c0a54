//! Whether images can be pulled now (`POST /admin/availability`, issue #40): each state,
//! what it costs the upstream (a cached image nothing, any other one HEAD), and the
//! platforms the nodes run.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The states (and digests) the proxy gives `images` (each with the digests its running
/// pods use), for nodes of `platforms`.
async fn ask(
    p: &Proxy,
    token: &str,
    images: &[(String, Vec<String>)],
    platforms: &[&str],
) -> Vec<(String, Option<String>, Option<String>)> {
    let images: Vec<serde_json::Value> = images
        .iter()
        .map(|(i, running)| serde_json::json!({"image": i, "running": running}))
        .collect();
    let r = http()
        .post(format!("{}/admin/availability", p.metrics_url))
        .bearer_auth(token)
        .json(&serde_json::json!({"images": images, "platforms": platforms}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().map(str::to_string);
            (s("state").unwrap(), s("digest"), s("detail"))
        })
        .collect()
}

fn token(p: &Proxy) -> String {
    std::fs::read_to_string(p.cache_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_state_and_what_it_costs_the_upstream() {
    let up = FaultUpstream::start().await;
    let cached = Image::generate(401, &[20_000], "amd64");
    let remote = Image::generate(402, &[20_000], "amd64");
    up.add_image("team/cached", "v1", &cached);
    up.add_image("team/remote", "v1", &remote);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(cfg).await;
    pull(&proxy.url, "team/cached", "v1", None).await.unwrap();
    proxy.settled().await;
    let token = token(&proxy);
    let h = &up.host;
    let name = |repo: &str| format!("{h}/{repo}:v1");

    let before = up.total();
    let states = ask(
        &proxy,
        &token,
        &[
            (name("team/cached"), vec![cached.manifest.digest.clone()]),
            (name("team/remote"), vec![]),
            (name("team/gone"), vec![]),
            (name("team/cached"), vec![remote.manifest.digest.clone()]),
        ],
        &[],
    )
    .await;
    assert_eq!(states[0].0, "cached");
    assert_eq!(
        states[0].1.as_deref(),
        Some(cached.manifest.digest.as_str())
    );
    assert_eq!(states[1].0, "upstreamOnly");
    assert_eq!(
        states[1].1.as_deref(),
        Some(remote.manifest.digest.as_str())
    );
    assert_eq!(states[2].0, "unavailable");
    assert!(
        states[2].2.as_deref().unwrap().contains("unknown"),
        "{states:?}"
    );
    assert_eq!(states[3].0, "moved", "the running pods use another digest");
    // One HEAD for each image not cached; nothing for the cached one.
    assert_eq!(up.total() - before, 2);
    assert_eq!(up.count("HEAD /v2/team/remote/manifests/v1"), 1);
    assert_eq!(up.count("HEAD /v2/team/cached/"), 0);

    // The upstream refuses the cache's credentials: what is cached stays cached.
    up.state.basic_challenge.store(true, Ordering::SeqCst);
    let states = ask(
        &proxy,
        &token,
        &[(name("team/remote"), vec![]), (name("team/cached"), vec![])],
        &[],
    )
    .await;
    assert_eq!(
        (states[0].0.as_str(), states[1].0.as_str()),
        ("unauthorized", "cached")
    );
    up.state.basic_challenge.store(false, Ordering::SeqCst);

    // What 1,000 workload images cost: one HEAD each that is not cached, none that is.
    let many: Vec<(String, Vec<String>)> = (0..1000)
        .map(|i| (format!("{h}/team/remote:t{i}"), vec![]))
        .collect();
    let before = up.total();
    let states = ask(&proxy, &token, &many, &[]).await;
    assert!(states.iter().all(|s| s.0 == "unavailable"));
    assert_eq!(up.total() - before, 1000);
    let cached_many: Vec<(String, Vec<String>)> =
        (0..1000).map(|_| (name("team/cached"), vec![])).collect();
    let before = up.total();
    let states = ask(&proxy, &token, &cached_many, &[]).await;
    assert!(states.iter().all(|s| s.0 == "cached"));
    assert_eq!(up.total(), before);

    // Bad input: one clear refusal.
    let r = http()
        .post(format!("{}/admin/availability", proxy.metrics_url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"images": [{"image": "quay.io/x/y:1"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not mirrored"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_platform_image_is_cached_for_the_platforms_it_holds() {
    let up = FaultUpstream::start().await;
    let multi = MultiArch::generate(403, &[20_000]);
    up.add_manifest("team/multi", "v1", &multi.index);
    for img in &multi.images {
        up.add_image("team/multi", &img.manifest.digest, img);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(cfg).await;
    let token = token(&proxy);
    let name = format!("{}/team/multi:v1", up.host);
    // Prefetched for amd64 nodes only.
    let r = http()
        .post(format!("{}/admin/prefetch", proxy.metrics_url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"images": [name], "platforms": ["linux/amd64"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut done = false;
    for _ in 0..1200 {
        let v = proxy.admin_get("/admin/prefetch", &token).await;
        if v["images"][0]["state"] == "done" {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(done, "the prefetch did not finish in 60 s");
    proxy.settled().await;
    let image = vec![(name.clone(), vec![])];
    let amd64 = ask(&proxy, &token, &image, &["linux/amd64"]).await;
    assert_eq!(amd64[0].0, "cached");
    let arm64 = ask(&proxy, &token, &image, &["linux/arm64"]).await;
    assert_eq!(arm64[0].0, "upstreamOnly", "its arm64 blobs are not cached");
    let all = ask(&proxy, &token, &image, &[]).await;
    assert_eq!(all[0].0, "upstreamOnly");
    proxy.stop().await;
}

/// The checks of many images stay under the upstream's cap on requests at once: they are
/// sent as the proxy's own share, like every upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_stay_under_the_upstream_s_cap() {
    let up = FaultUpstream::start().await;
    // Each answer takes a while, so that checks would pile up at the upstream.
    up.state.manifest_delay_ms.store(20, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    cfg.upstreams[0].limits = Some(pullthrough::api::proxy_config::UpstreamLimits {
        max_concurrent_requests: Some(1),
        ..up.config().upstreams[0].limits()
    });
    let proxy = Proxy::start_config(cfg).await;
    let token = token(&proxy);
    let many: Vec<(String, Vec<String>)> = (0..40)
        .map(|i| (format!("{}/team/x:t{i}", up.host), vec![]))
        .collect();
    let states = ask(&proxy, &token, &many, &[]).await;
    assert!(states.iter().all(|s| s.0 == "unavailable"), "{states:?}");
    assert_eq!(up.count("HEAD /v2/team/x/manifests/"), 40);
    assert_eq!(up.state.max_inflight.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

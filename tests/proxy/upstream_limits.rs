//! A good citizen of its upstreams (docs/operations.md, "Keeping under the upstream's
//! limits"): rate-limit headers exported, a 429's `Retry-After` honoured by sending
//! nothing meanwhile (stale tags served, everything else refused at once with a
//! `Retry-After`), and caps on concurrent requests that the upstream itself measures.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use pullthrough::api::{ProxyConfig, UpstreamLimits};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn config(up: &FaultUpstream, limits: UpstreamLimits) -> ProxyConfig {
    let mut c = config_for(&[(up.host.as_str(), up.url.as_str())]);
    c.upstreams[0].limits = Some(limits);
    c
}

fn limits(max_concurrent: u32, queue: Duration) -> UpstreamLimits {
    UpstreamLimits {
        max_concurrent_requests: Some(max_concurrent),
        manifest_gets_per_second: Some(0),
        queue_timeout: queue,
        ..UpstreamLimits::for_registry("registry.test")
    }
}

async fn manifest(p: &Proxy, repo: &str, reference: &str) -> reqwest::Response {
    http()
        .get(format!("{}/v2/{repo}/manifests/{reference}", p.url))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .expect("a Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_leaves_the_upstream_alone_for_that_long() {
    let up = FaultUpstream::start().await;
    let (cached, uncached) = (
        Image::generate(81, &[20_000], "amd64"),
        Image::generate(82, &[20_000], "amd64"),
    );
    up.add_image("team/cached", "v1", &cached);
    up.add_image("team/new", "v1", &uncached);
    let mut cfg = config(&up, limits(8, Duration::from_secs(10)));
    // Every request for the tag asks the upstream: what is served during the back-off is
    // stale, not fresh within a TTL.
    cfg.tag_ttl = Duration::ZERO;
    cfg.stale_if_error = Duration::from_secs(3600);
    let p = Proxy::start_config(cfg).await;
    pull(&p.url, "team/cached", "v1", None).await.unwrap();
    p.settled().await;

    // Docker Hub out of pulls: 429, Retry-After: 30, its rate-limit headers.
    *up.state.extra_headers.lock().unwrap() = vec![
        ("ratelimit-limit", "100;w=21600".into()),
        ("ratelimit-remaining", "0;w=21600".into()),
        ("retry-after", "30".into()),
    ];
    up.state.fail_status.store(429, Ordering::SeqCst);
    let pulled = pull(&p.url, "team/cached", "v1", None).await.unwrap();
    assert_eq!(pulled.top, cached.manifest.digest);
    let asked = up.total();
    let m = p.metrics().await;
    let at = |name: &str, labels: &[(&str, &str)]| metric_value(&m, name, labels);
    let upstream = [("upstream", up.host.as_str())];
    assert_eq!(at("pullthrough_upstream_ratelimit_limit", &upstream), 100.0);
    assert_eq!(
        at("pullthrough_upstream_ratelimit_remaining", &upstream),
        0.0
    );
    assert_eq!(
        at("pullthrough_upstream_ratelimit_window_seconds", &upstream),
        21600.0
    );
    assert_eq!(
        at(
            "pullthrough_upstream_backoffs_total",
            &[("upstream", up.host.as_str()), ("status", "429")]
        ),
        1.0
    );
    assert!(
        at(
            "pullthrough_upstream_backoff_until_timestamp_seconds",
            &upstream
        ) > 0.0
    );

    // During the back-off: the cached tag is served stale, and nothing at all reaches
    // the upstream (its own log).
    for _ in 0..3 {
        let pulled = pull(&p.url, "team/cached", "v1", None).await.unwrap();
        assert_eq!(pulled.top, cached.manifest.digest);
    }
    // What is not cached fails at once, 429 with how long is left of the 30 s.
    let r = manifest(&p, "team/new", "v1").await;
    assert_eq!(r.status(), 429);
    let wait = retry_after(&r);
    assert!((1..=30).contains(&wait), "Retry-After {wait}");
    assert_eq!(error_code(r).await.1, "TOOMANYREQUESTS");
    let blob = &uncached.layers[0].digest;
    let r = http()
        .get(format!("{}/v2/team/new/blobs/{blob}", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) <= 30);
    assert_eq!(
        up.total(),
        asked,
        "a request reached the upstream in its back-off"
    );

    let m = p.metrics().await;
    assert!(
        metric_value(
            &m,
            "pullthrough_upstream_refused_total",
            &[("upstream", up.host.as_str()), ("reason", "backoff")]
        ) >= 5.0
    );
    assert_eq!(
        metric_value(
            &m,
            "pullthrough_requests_total",
            &[("kind", "manifest"), ("result", "stale")]
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_cold_manifest_requests_keep_within_the_concurrency_cap() {
    const CAP: u32 = 4;
    let up = FaultUpstream::start().await;
    let images: Vec<Image> = (0..50)
        .map(|i| Image::generate(100 + i, &[64], "amd64"))
        .collect();
    for (i, img) in images.iter().enumerate() {
        up.add_image("fleet/app", &format!("t{i}"), img);
    }
    // Each manifest answer takes a while, so that requests pile up at the proxy.
    up.state.manifest_delay_ms.store(20, Ordering::SeqCst);
    let p = Proxy::start_config(config(&up, limits(CAP, Duration::from_secs(120)))).await;
    let asks = (0..500).map(|n| {
        let (p, images) = (&p, &images);
        async move {
            let tag = n % 50;
            let r = manifest(p, "fleet/app", &format!("t{tag}")).await;
            assert_eq!(r.status(), 200, "t{tag}");
            assert_eq!(
                sha256(&r.bytes().await.unwrap()),
                images[tag].manifest.digest
            );
        }
    });
    futures::future::join_all(asks).await;
    let most = up.state.max_inflight.load(Ordering::SeqCst);
    assert!(
        most <= CAP as usize,
        "{most} requests at once at the upstream"
    );
    assert!(up.count("/manifests/t") >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_cap_waits_then_fails_cleanly() {
    let up = FaultUpstream::start().await;
    let (a, b) = (
        Image::generate(83, &[64], "amd64"),
        Image::generate(84, &[64], "amd64"),
    );
    up.add_image("team/a", "v1", &a);
    up.add_image("team/b", "v1", &b);
    // One request at a time, and a short queue.
    let p = Proxy::start_config(config(&up, limits(1, Duration::from_millis(200)))).await;
    // The upstream holds the first request until told: its room is taken.
    let release = up.hold_requests("/team/a/manifests/v1");
    let first = tokio::spawn({
        let url = format!("{}/v2/team/a/manifests/v1", p.url);
        async move { http().get(url).send().await.unwrap().status() }
    });
    // Bounded: the held request reaches the upstream.
    for _ in 0..600 {
        if up.count("/team/a/manifests/v1") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.count("/team/a/manifests/v1"), 1, "the first request");
    let r = manifest(&p, "team/b", "v1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(retry_after(&r), 1);
    assert_eq!(error_code(r).await.1, "TOOMANYREQUESTS");
    assert_eq!(up.count("/team/b/"), 0);
    assert_eq!(
        p.metric(
            "pullthrough_upstream_refused_total",
            &[("reason", "concurrency")]
        )
        .await,
        1.0
    );
    // Once the room is free, the same request goes through.
    release.send(true).unwrap();
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(manifest(&p, "team/b", "v1").await.status(), 200);
}

/// One client with 40 cold tags in flight under a cap of 4 neither holds up a cached
/// tag past its TTL (served stale at once: it would wait for ever here) nor keeps
/// another client's cold pull behind its queue (the room goes to the clients in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_starve_another_under_the_caps() {
    let up = FaultUpstream::start().await;
    let (cached, cold) = (
        Image::generate(89, &[64], "amd64"),
        Image::generate(90, &[64], "amd64"),
    );
    up.add_image("team/cached", "v1", &cached);
    up.add_image("team/cold", "v1", &cold);
    let hog = Image::generate(91, &[64], "amd64");
    for i in 0..40 {
        up.add_manifest("team/hog", &format!("t{i}"), &hog.manifest);
    }
    // A queue nothing outwaits in this test, and every tag past its TTL at once.
    let mut c = config(&up, limits(4, Duration::from_secs(3600)));
    c.tag_ttl = Duration::ZERO;
    let p = Proxy::start_config(c).await;
    assert_eq!(manifest(&p, "team/cached", "v1").await.status(), 200);

    // The hog's 40 tags, each held at the upstream until released one by one: four
    // reach it, 36 wait for room.
    let holds: Vec<_> = (0..40)
        .map(|i| up.hold_requests(&format!("/team/hog/manifests/t{i}?")))
        .collect();
    let hog_client = http_from("127.0.0.2");
    let hogs: Vec<_> = (0..40)
        .map(|i| {
            let url = format!("{}/v2/team/hog/manifests/t{i}", p.url);
            let c = hog_client.clone();
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    let queued = || p.metric("pullthrough_upstream_queued_requests", &[]);
    until("36 of the hog's requests to queue", || async {
        queued().await == 36.0
    })
    .await;
    assert_eq!(up.count("/team/hog/"), 4);

    // A cached tag past its TTL is served stale at once: no room for its HEAD now.
    let r = manifest(&p, "team/cached", "v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), cached.manifest.digest);
    let stale = p
        .metric("pullthrough_requests_total", &[("result", "stale")])
        .await;
    assert_eq!(stale, 1.0);

    // Another client's cold pull waits for the next room but one, not for 36.
    let other = tokio::spawn({
        let url = format!("{}/v2/team/cold/manifests/v1", p.url);
        async move { http().get(url).send().await.map(|r| r.status()) }
    });
    until("the other client to queue", || async {
        queued().await == 37.0
    })
    .await;
    let mut released = std::collections::HashSet::new();
    while up.count("/team/cold/") == 0 {
        assert!(
            released.len() < 2,
            "the other client still waits after {} rooms",
            released.len()
        );
        // One of the hog's requests the upstream holds now (which four got room first
        // is the scheduler's choice).
        let held = (0..40)
            .find(|i| !released.contains(i) && up.count(&format!("/team/hog/manifests/t{i}?")) == 1)
            .expect("a hog request held at the upstream");
        let asked = up.total();
        holds[held].send(true).unwrap();
        released.insert(held);
        // The room the released request leaves goes to one waiting request.
        until("the room to be taken again", || async {
            up.total() > asked
        })
        .await;
    }
    assert_eq!(other.await.unwrap().unwrap(), 200);
    drop(holds);
    for h in hogs {
        assert_eq!(h.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_url_is_skipped_for_the_next_one_and_shown_down() {
    // A regional mirror that fails, and the origin behind it.
    let (regional, origin) = (FaultUpstream::start().await, FaultUpstream::start().await);
    let (a, b) = (
        Image::generate(85, &[64], "amd64"),
        Image::generate(86, &[64], "amd64"),
    );
    for up in [&regional, &origin] {
        up.add_image("team/a", "v1", &a);
        up.add_image("team/b", "v1", &b);
    }
    regional.state.fail_status.store(503, Ordering::SeqCst);
    let mut c = config_for(&[("registry.test", &regional.url)]);
    c.upstreams[0].url = None;
    c.upstreams[0].urls = vec![regional.url.clone(), origin.url.clone()];
    let p = Proxy::start_config(c).await;

    let pulled = pull(&p.url, "team/a", "v1", None).await.unwrap();
    assert_eq!(pulled.top, a.manifest.digest);
    // The regional mirror was asked first, once, then left for the origin.
    assert_eq!(regional.count("/manifests/"), 1);
    assert!(origin.count("/manifests/v1") >= 1);
    let up = |url: &str| {
        let p = &p;
        let url = url.to_string();
        async move {
            p.metric(
                "pullthrough_upstream_url_up",
                &[("upstream", "registry.test"), ("url", &url)],
            )
            .await
        }
    };
    assert_eq!(up(&regional.url).await, 0.0);
    assert_eq!(up(&origin.url).await, 1.0);
    // Marked down, it goes to the back: the next pull asks only the origin.
    let asked = regional.total();
    let pulled = pull(&p.url, "team/b", "v1", None).await.unwrap();
    assert_eq!(pulled.top, b.manifest.digest);
    assert_eq!(regional.total(), asked);
    // With every URL failing the client hears the last one's failure.
    origin.state.fail_status.store(503, Ordering::SeqCst);
    let r = manifest(&p, "team/d", "v1").await;
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_string()));
    p.stop().await;

    // A regional mirror that answers but lacks an image (team/c is the origin's only):
    // its 404 moves on to the origin, and it stays up.
    regional.state.fail_status.store(0, Ordering::SeqCst);
    origin.state.fail_status.store(0, Ordering::SeqCst);
    let c = Image::generate(88, &[64], "amd64");
    origin.add_image("team/c", "v1", &c);
    let mut cfg = config_for(&[("registry.test", &regional.url)]);
    cfg.upstreams[0].url = None;
    cfg.upstreams[0].urls = vec![regional.url.clone(), origin.url.clone()];
    let p = Proxy::start_config(cfg).await;
    let pulled = pull(&p.url, "team/c", "v1", None).await.unwrap();
    assert_eq!(pulled.top, c.manifest.digest);
    assert_eq!(regional.count("GET /v2/team/c/manifests/v1"), 1);
    let regional_up = p
        .metric(
            "pullthrough_upstream_url_up",
            &[("upstream", "registry.test"), ("url", &regional.url)],
        )
        .await;
    assert_eq!(regional_up, 1.0);
}

/// containerd's Accept, and one naming a single type (as some clients send).
const ACCEPTS: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
    "application/vnd.oci.image.manifest.v1+json",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pulls_of_a_cached_tag_cost_one_get_then_heads() {
    let up = FaultUpstream::start().await;
    let img = Image::generate(87, &[64], "amd64");
    for (i, _) in ACCEPTS.iter().enumerate() {
        up.add_image(&format!("team/app{i}"), "v1", &img);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&up, UpstreamLimits::for_registry("registry.test"));
    cfg.cache_dir = dir.path().join("cache");
    let get = |p: &Proxy, i: usize| {
        let url = format!("{}/v2/team/app{i}/manifests/v1", p.url);
        async move {
            let r = http()
                .get(url)
                .header("accept", ACCEPTS[i])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // Within tagTTL: one GET for the first pull, nothing for the next 100.
    cfg.tag_ttl = Duration::from_secs(3600);
    let p = Proxy::start_config(cfg.clone()).await;
    for i in 0..ACCEPTS.len() {
        for _ in 0..101 {
            get(&p, i).await;
        }
        let path = format!("/v2/team/app{i}/manifests/v1");
        assert_eq!(up.count(&format!("GET {path}")), 1, "Accept {i}");
        assert_eq!(up.count(&format!("HEAD {path}")), 0, "Accept {i}");
    }
    p.stop().await;
    // Past tagTTL: HEADs, which Docker Hub does not count, and no GET. (A new process
    // with a TTL of zero: always past, however fast the machine.)
    cfg.tag_ttl = Duration::ZERO;
    let p = Proxy::start_config(cfg).await;
    for _ in 0..3 {
        get(&p, 0).await;
    }
    assert_eq!(up.count("GET /v2/team/app0/manifests/v1"), 1);
    assert_eq!(up.count("HEAD /v2/team/app0/manifests/v1"), 3);
}

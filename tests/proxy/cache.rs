//! Cache lifecycle: the size limit with least-recently-used eviction, pins, prefetch,
//! a real process killed mid-download, a full disk, and dropping an image on purpose.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use pullthrough::api::ProxyConfig;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn blob_dir_bytes(cache_dir: &Path) -> u64 {
    std::fs::read_dir(cache_dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// An upstream with four images of one 1 MB layer each (`team/img0:v1` .. `img3`, from
/// `seed`), and a proxy config for it with its cache in the returned directory, limited
/// to 2.5 MB: room for two images.
async fn four_images(seed: u64) -> (FaultUpstream, Vec<Image>, tempfile::TempDir, ProxyConfig) {
    let up = FaultUpstream::start().await;
    let images: Vec<Image> = (0..4)
        .map(|i| Image::generate(seed + i, &[1_000_000], "amd64"))
        .collect();
    for (i, img) in images.iter().enumerate() {
        up.add_image(&format!("team/img{i}"), "v1", img);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    cfg.max_cache_bytes = Some(2_500_000);
    (up, images, dir, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_holds_least_recently_used_goes_first_and_pins_stay() {
    let (up, images, _dir, mut cfg) = four_images(60).await;
    let limit = cfg.max_cache_bytes.unwrap();
    cfg.pin = vec![format!("{}/team/img0:v1", up.host)];
    let proxy = Proxy::start_config(cfg.clone()).await;
    let cache = cfg.cache_dir.clone();
    // The pin is prefetched at start.
    until("the pinned image to be prefetched", || async {
        proxy
            .metric("pullthrough_prefetch_images", &[("state", "done")])
            .await
            == 1.0
    })
    .await;
    assert!(cached(&cache, &images[0].layers[0].digest));

    // img1 fits; img2 does not without evicting, and img0 is pinned: img1 goes.
    pull(&proxy.url, "team/img1", "v1", None).await.unwrap();
    proxy.settled().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    pull(&proxy.url, "team/img2", "v1", None).await.unwrap();
    proxy.settled().await;
    assert!(cached(&cache, &images[0].layers[0].digest), "pinned");
    assert!(
        !cached(&cache, &images[1].layers[0].digest),
        "least recently used"
    );
    assert!(
        !cached(&cache, &images[1].manifest.digest),
        "its manifest went with it"
    );
    assert!(cached(&cache, &images[2].layers[0].digest));
    assert!(proxy.metric("pullthrough_cache_evictions_total", &[]).await >= 2.0);
    assert!(proxy.metric("pullthrough_cache_size_bytes", &[]).await <= limit as f64);
    assert!(
        blob_dir_bytes(&cache) <= limit,
        "{}",
        blob_dir_bytes(&cache)
    );

    pull(&proxy.url, "team/img3", "v1", None).await.unwrap();
    proxy.settled().await;
    assert!(cached(&cache, &images[3].layers[0].digest));
    assert!(
        !cached(&cache, &images[2].layers[0].digest),
        "now the least recently used"
    );
    assert!(blob_dir_bytes(&cache) <= limit);
    proxy.stop().await;

    // The index survives a restart: same content, same accounting, pin still honoured.
    let before = blob_dir_bytes(&cache);
    let proxy = Proxy::start_config(cfg.clone()).await;
    assert_eq!(
        proxy.metric("pullthrough_cache_size_bytes", &[]).await,
        before as f64
    );
    pull(&proxy.url, "team/img1", "v1", None).await.unwrap();
    proxy.settled().await;
    assert!(cached(&cache, &images[0].layers[0].digest));
    assert!(blob_dir_bytes(&cache) <= limit);
    proxy.stop().await;

    // Restarted with a lower limit: evicted down to it at start, the pin kept.
    cfg.max_cache_bytes = Some(1_200_000);
    let proxy = Proxy::start_config(cfg).await;
    until("the cache to shrink to its new limit", || async {
        proxy.metric("pullthrough_cache_size_bytes", &[]).await <= 1_200_000.0
    })
    .await;
    assert!(cached(&cache, &images[0].layers[0].digest), "pinned");
    assert!(!cached(&cache, &images[1].layers[0].digest));
    assert!(blob_dir_bytes(&cache) <= 1_200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_being_sent_is_never_evicted_under_its_reader() {
    let up = FaultUpstream::start().await;
    // Large enough that the socket buffers cannot swallow it: the reader really holds it.
    let held = Blob::new(LAYER, random_bytes(110, 24 << 20));
    let x = Blob::new(LAYER, random_bytes(111, 10 << 20));
    let y = Blob::new(LAYER, random_bytes(112, 10 << 20));
    for b in [&held, &x, &y] {
        up.add_blob(b);
    }
    let mut cfg = up.config();
    cfg.max_cache_bytes = Some(40 << 20);
    let proxy = Proxy::start_config(cfg).await;
    let get = |d: &str| {
        let url = format!("{}/v2/a/b/blobs/{d}", proxy.url);
        async move { get_bytes(&url).await }
    };
    get(&held.digest).await;
    get(&x.digest).await;
    proxy.settled().await;
    let mut reading = http()
        .get(format!("{}/v2/a/b/blobs/{}", proxy.url, held.digest))
        .send()
        .await
        .unwrap();
    let first = reading.chunk().await.unwrap().unwrap();
    // y needs room: the held blob is older but in use, so x goes.
    assert_eq!(sha256(&get(&y.digest).await), y.digest);
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &held.digest), "in use: kept");
    assert!(!cached(&proxy.cache_dir, &x.digest));
    assert!(cached(&proxy.cache_dir, &y.digest));
    let mut body = first.to_vec();
    while let Some(c) = reading.chunk().await.unwrap() {
        body.extend_from_slice(&c);
    }
    assert_eq!(sha256(&body), held.digest, "the reader got all of it");
    // Read and released: it can go now.
    assert_eq!(sha256(&get(&x.digest).await), x.digest);
    proxy.settled().await;
    assert!(!cached(&proxy.cache_dir, &held.digest));
    assert!(blob_dir_bytes(&proxy.cache_dir) <= 40 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_blob_is_streamed_through_whole() {
    let up = FaultUpstream::start().await;
    let big = Blob::new(LAYER, random_bytes(70, 3_000_000));
    up.add_blob(&big);
    let mut cfg = up.config();
    cfg.max_cache_bytes = Some(1_000_000);
    let proxy = Proxy::start_config(cfg).await;
    let body = get_bytes(&format!("{}/v2/a/b/blobs/{}", proxy.url, big.digest)).await;
    assert_eq!(
        sha256(&body),
        big.digest,
        "larger than the cache: served, not cached"
    );
    assert!(!cached(&proxy.cache_dir, &big.digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_pulls_the_listed_platforms_at_start() {
    let up = FaultUpstream::start().await;
    let multi = MultiArch::generate(80, &[200_000, 30_000]);
    for img in &multi.images {
        for b in img.blobs() {
            up.add_blob(b);
        }
        up.add_manifest("team/app", &img.manifest.digest, &img.manifest);
    }
    up.add_manifest("team/app", "v1", &multi.index);
    let mut cfg = up.config();
    cfg.prefetch = vec![format!("{}/team/app:v1", up.host)];
    cfg.prefetch_platforms = vec!["linux/arm64".into()];
    let proxy = Proxy::start_config(cfg).await;
    until("prefetch to finish", || async {
        proxy
            .metric("pullthrough_prefetch_images", &[("state", "done")])
            .await
            == 1.0
    })
    .await;
    assert_eq!(
        proxy
            .metric("pullthrough_prefetch_images", &[("state", "pending")])
            .await,
        0.0
    );
    let (amd64, arm64) = (&multi.images[0], &multi.images[1]);
    for b in arm64.blobs() {
        assert!(cached(&proxy.cache_dir, &b.digest), "arm64 blob prefetched");
    }
    for b in amd64.layers.iter() {
        assert!(!cached(&proxy.cache_dir, &b.digest), "amd64 not asked for");
    }
    let bytes: usize = arm64.blobs().map(|b| b.bytes.len()).sum();
    assert_eq!(
        proxy.metric("pullthrough_prefetch_bytes_total", &[]).await,
        bytes as f64
    );
    // A client then gets the arm64 image from the cache alone.
    let calls = up.total();
    let r = http()
        .get(format!(
            "{}/v2/team/app/manifests/{}",
            proxy.url, arm64.manifest.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for b in arm64.blobs() {
        let body = get_bytes(&format!("{}/v2/team/app/blobs/{}", proxy.url, b.digest)).await;
        assert_eq!(sha256(&body), b.digest);
    }
    assert_eq!(up.total(), calls, "all hits");
}

/// Runs the real binary; killed on drop.
struct ProxyProcess {
    child: std::process::Child,
    url: String,
    metrics: String,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_process(upstream: &FaultUpstream, cache: &Path, extra: &str) -> ProxyProcess {
    let (port, mport) = (free_port(), free_port());
    let cfg = cache.with_extension("yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nmetricsListen: 127.0.0.1:{mport}\ncacheDir: {}\nupstreams:\n  - registry: {}\n    url: {}\n{extra}",
            cache.display(),
            upstream.host,
            upstream.url
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .args(["proxy", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = ProxyProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
        metrics: format!("http://127.0.0.1:{mport}"),
    };
    assert!(
        serving(&p.url, Duration::from_secs(60)).await,
        "proxy process did not start"
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_download_leaves_nothing_corrupt() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(90, 4_000_000));
    up.add_blob(&layer);
    // The upstream holds the body after 320 KiB: the download is in progress for as
    // long as the test needs.
    let release = up.hold_blobs(320 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut proxy = start_process(&up, &cache, "").await;

    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);
    let (mut resp, begun) = get_begun(&url, 300_000).await;
    let got = begun.len();
    let partials: Vec<PathBuf> = std::fs::read_dir(cache.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(partials.len(), 1, "a download is in progress");
    proxy.child.kill().unwrap(); // SIGKILL
    proxy.child.wait().unwrap();
    assert!(
        resp.chunk().await.is_err() || got < layer.bytes.len(),
        "the client saw the cut"
    );
    assert!(!cached(&cache, &layer.digest));

    *up.state.hold.lock().unwrap() = None;
    drop(release);
    let proxy = start_process(&up, &cache, "").await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);
    assert_eq!(
        std::fs::read_dir(cache.join("tmp")).unwrap().count(),
        0,
        "partials cleaned at start"
    );
    let m = scrape(&proxy.metrics).await;
    assert_eq!(
        metric_value(&m, "pullthrough_cache_blobs", &[]),
        0.0,
        "the index holds nothing partial"
    );
    let body = get_bytes(&url).await;
    assert_eq!(sha256(&body), layer.digest);
    settled(&proxy.metrics).await;
    assert!(cached(&cache, &layer.digest));
    let on_disk = std::fs::read(
        cache
            .join("blobs/sha256")
            .join(layer.digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    assert_eq!(sha256(&on_disk), layer.digest);
}

/// A download sets its blob's space aside when it begins: the volume filling up (with
/// something else) while it runs does not cut its clients off, and the blob is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_during_a_download_does_not_cut_it() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(96, 8_000_000));
    up.add_blob(&layer);
    let release = up.hold_blobs(320 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 40);
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;

    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);
    let begun = get_begun(&url, 300_000).await;
    // Fill what is left of the volume, then let the upstream go on.
    let mut filler = std::fs::File::create(fs.0.join("filler")).unwrap();
    let mib = vec![0u8; 1 << 20];
    let mut filled = 0;
    while std::io::Write::write_all(&mut filler, &mib).is_ok() {
        filled += 1;
        assert!(filled <= 40, "the volume never filled");
    }
    drop(release);
    let body = get_finished(begun).await;
    assert_eq!(sha256(&body), layer.digest);
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &layer.digest), "cached");
    proxy.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_streams_through_and_caching_resumes_when_space_returns() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(95, &[1_500_000], "amd64");
    up.add_image("a/b", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 40);
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![0u8; 30 << 20]).unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;

    let pulled = pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    assert_eq!(
        pulled.top, image.manifest.digest,
        "served in full while the disk is full"
    );
    assert!(!cached(&proxy.cache_dir, &image.layers[0].digest));
    assert_eq!(proxy.metric("pullthrough_cache_disk_full", &[]).await, 1.0);
    let ready = http()
        .get(format!("{}/readyz", proxy.metrics_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "still serving");
    assert!(
        ready
            .text()
            .await
            .unwrap()
            .contains("degraded: cache disk full")
    );

    // Space comes back: the gauge clears on its own, with no request to notice, and
    // the next pull is cached again.
    std::fs::remove_file(&filler).unwrap();
    until("the disk-full gauge to clear", || async {
        proxy.metric("pullthrough_cache_disk_full", &[]).await == 0.0
    })
    .await;
    let ready = get(&format!("{}/readyz", proxy.metrics_url)).await;
    assert_eq!(ready.text().await.unwrap(), "ready\n");
    pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &image.layers[0].digest));
    proxy.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_can_be_dropped_on_purpose_from_the_cli() {
    let up = FaultUpstream::start().await;
    let shared = Blob::new(LAYER, random_bytes(100, 50_000));
    let own = Blob::new(LAYER, random_bytes(101, 60_000));
    let other = Blob::new(LAYER, random_bytes(102, 70_000));
    let a = Image::with_layers(103, vec![shared.bytes.clone(), own.bytes.clone()], "amd64");
    let b = Image::with_layers(
        104,
        vec![shared.bytes.clone(), other.bytes.clone()],
        "amd64",
    );
    up.add_image("team/a", "v1", &a);
    up.add_image("team/b", "v1", &b);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let proxy = start_process(&up, &cache, "").await;
    pull(&proxy.url, "team/a", "v1", None).await.unwrap();
    pull(&proxy.url, "team/b", "v1", None).await.unwrap();
    settled(&proxy.metrics).await;

    let token = cache.join("admin-token");
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pullthrough"))
            .args(["cache", "drop", "--admin-url", &proxy.metrics])
            .arg("--admin-token-file")
            .arg(&token)
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&[&format!("{}/team/a:v1", up.host)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let removed = &answer["removed"];
    assert_eq!(removed["manifests"], serde_json::json!([a.manifest.digest]));
    let blobs: Vec<&str> = removed["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert!(blobs.contains(&own.digest.as_str()) && blobs.contains(&a.config.digest.as_str()));
    assert!(!blobs.contains(&shared.digest.as_str()), "b still uses it");
    assert!(cached(&cache, &shared.digest) && cached(&cache, &b.manifest.digest));
    assert!(!cached(&cache, &own.digest));

    // The tag is gone too: the next pull goes upstream again.
    let before = up.count("GET /v2/team/a/manifests/v1");
    pull(&proxy.url, "team/a", "v1", None).await.unwrap();
    assert_eq!(up.count("GET /v2/team/a/manifests/v1"), before + 1);

    // Clear errors for bad input.
    let out = cli(&["Not An Image"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid image reference"));
    let out = cli(&["quay.io/x/y:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not mirrored"));
    let out = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .args(["cache", "drop", "--admin-url", "http://127.0.0.1:1"])
        .arg("--admin-token-file")
        .arg(&token)
        .arg("docker.io/library/alpine:3")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the proxy's admin endpoint")
    );

    // Loopback is not enough: without the token, or with another, nothing is dropped.
    let url = format!("{}/admin/cache?image={}/team/b:v1", proxy.metrics, up.host);
    for auth in [None, Some("Bearer wrong"), Some("Basic x")] {
        let mut req = http().delete(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        assert_eq!(req.send().await.unwrap().status(), 401, "{auth:?}");
    }
    assert!(
        cached(&cache, &b.manifest.digest),
        "dropped without the token"
    );
}

/// A tag forgotten alone keeps its image; a repository dropped takes every tag and image
/// of it (those pulled by digest too) and its links, and nothing another repository
/// still uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_alone_or_a_whole_repository_is_dropped_on_request() {
    let up = FaultUpstream::start().await;
    let shared = Blob::new(LAYER, random_bytes(110, 40_000));
    let a1 = Image::with_layers(111, vec![random_bytes(112, 30_000)], "amd64");
    let a2 = Image::with_layers(113, vec![shared.bytes.clone()], "amd64");
    let a3 = Image::with_layers(114, vec![random_bytes(115, 20_000)], "amd64");
    let b1 = Image::with_layers(116, vec![shared.bytes.clone()], "amd64");
    up.add_image("team/a", "v1", &a1);
    up.add_image("team/a", "v2", &a2);
    up.add_image("team/a", "v3", &a3);
    up.add_image("team/b", "v1", &b1);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(cfg.clone()).await;
    pull(&proxy.url, "team/a", "v1", None).await.unwrap();
    pull(&proxy.url, "team/a", "v2", None).await.unwrap();
    pull(&proxy.url, "team/a", &a3.manifest.digest, None)
        .await
        .unwrap();
    pull(&proxy.url, "team/b", "v1", None).await.unwrap();
    proxy.settled().await;
    let token = std::fs::read_to_string(cfg.cache_dir.join("admin-token")).unwrap();
    let drop = |query: String| {
        let (url, token) = (
            format!("{}/admin/cache?{query}", proxy.metrics_url),
            token.clone(),
        );
        async move {
            let r = http().delete(url).bearer_auth(token).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let host = &up.host;

    // The tag alone: the image stays, the next pull asks the upstream for the tag only.
    let (status, answer) = drop(format!("tag={host}/team/a:v1")).await;
    assert_eq!(
        (status, &answer["scope"], &answer["tags"]),
        (200, &serde_json::json!("tag"), &serde_json::json!(["v1"]))
    );
    assert!(
        answer["removed"]["manifests"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(cached(&cfg.cache_dir, &a1.manifest.digest));
    let (tags, blobs) = (up.count("GET /v2/team/a/manifests/v1"), up.count("/blobs/"));
    pull(&proxy.url, "team/a", "v1", None).await.unwrap();
    assert_eq!(up.count("GET /v2/team/a/manifests/v1"), tags + 1);
    assert_eq!(up.count("/blobs/"), blobs, "its blobs were kept");
    proxy.settled().await;

    // The repository: every tag, the image pulled by digest, what only they use.
    let (status, answer) = drop(format!("repository={host}/team/a")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tags"], serde_json::json!(["v1", "v2"]));
    let manifests: BTreeSet<&str> = answer["removed"]["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let want: BTreeSet<&str> = [&a1, &a2, &a3]
        .iter()
        .map(|i| i.manifest.digest.as_str())
        .collect();
    assert_eq!(manifests, want);
    for gone in [
        &a1.layers[0].digest,
        &a3.layers[0].digest,
        &a2.config.digest,
    ] {
        assert!(!cached(&cfg.cache_dir, gone), "{gone}");
    }
    assert!(
        cached(&cfg.cache_dir, &shared.digest),
        "team/b still uses it"
    );
    // team/b is served as before; team/a is asked for again, its links gone.
    let asked = up.count("/v2/");
    pull(&proxy.url, "team/b", "v1", None).await.unwrap();
    assert_eq!(up.count("/v2/"), asked);
    pull(&proxy.url, "team/a", "v2", None).await.unwrap();
    assert!(up.count("HEAD /v2/team/a/blobs/") + up.count("GET /v2/team/a/blobs/") > 0);

    // Bad input: one clear refusal each.
    for (query, status) in [
        (format!("repository={host}/team/a:v1"), 400),
        (format!("tag={host}/team/a@{}", a1.manifest.digest), 400),
        ("tag=x&image=y".to_string(), 400),
        ("repository=quay.io/x/y".to_string(), 404),
    ] {
        let (got, answer) = drop(query.clone()).await;
        assert_eq!(got, status, "{query}: {answer}");
        assert!(answer["error"].is_string(), "{query}: {answer}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_named_in_use_are_kept_like_pins_until_named_no_more() {
    let (up, images, _dir, cfg) = four_images(160).await;
    let proxy = Proxy::start_config(cfg.clone()).await;
    let cache = cfg.cache_dir.clone();
    let token = std::fs::read_to_string(cache.join("admin-token")).unwrap();
    let in_use = |images: Vec<String>| {
        let (url, token) = (format!("{}/admin/in-use", proxy.metrics_url), token.clone());
        async move {
            let r = http()
                .put(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"images": images}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    for i in 0..2 {
        pull(&proxy.url, &format!("team/img{i}"), "v1", None)
            .await
            .unwrap();
        proxy.settled().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // img0 is the least recently used, but in use: img1 goes instead.
    in_use(vec![format!("{}/team/img0:v1", up.host)]).await;
    pull(&proxy.url, "team/img2", "v1", None).await.unwrap();
    proxy.settled().await;
    assert!(cached(&cache, &images[0].layers[0].digest), "in use");
    assert!(!cached(&cache, &images[1].layers[0].digest), "evicted");
    // An image that is not mirrored is refused, and the set stays.
    let r = http()
        .put(format!("{}/admin/in-use", proxy.metrics_url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"images": ["quay.io/x/y:1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let listed = proxy.admin_get("/admin/in-use", &token).await;
    assert_eq!(listed["images"].as_array().unwrap().len(), 1);
    // No longer in use: the least recently used again, it goes.
    in_use(vec![]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    pull(&proxy.url, "team/img3", "v1", None).await.unwrap();
    proxy.settled().await;
    assert!(
        !cached(&cache, &images[0].layers[0].digest),
        "no longer kept"
    );
    assert!(cached(&cache, &images[3].layers[0].digest));
}

/// A blob file changed on the disk while the proxy was stopped: at the next start it is
/// checked when first read (a whole read as it streams, its last byte held back; a range
/// only after the whole file matched), never served whole with wrong bytes, dropped, and
/// fetched again. A blob the process committed itself is served without the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_changed_on_disk_while_stopped_is_never_served() {
    let up = FaultUpstream::start().await;
    let (a, b) = (
        Blob::new(LAYER, random_bytes(620, 3 << 20)),
        Blob::new(LAYER, random_bytes(621, 3 << 20)),
    );
    up.add_blob(&a);
    up.add_blob(&b);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    let url = |p: &Proxy, blob: &Blob| format!("{}/v2/team/x/blobs/{}", p.url, blob.digest);
    let proxy = Proxy::start_config(cfg.clone()).await;
    for blob in [&a, &b] {
        assert_eq!(sha256(&get_bytes(&url(&proxy, blob)).await), blob.digest);
    }
    proxy.settled().await;
    let checks = |p: &Proxy, result: &'static str| {
        let p = p.metrics_url.clone();
        async move {
            metric_value(
                &scrape(&p).await,
                "pullthrough_cache_read_checks_total",
                &[("result", result)],
            )
        }
    };
    assert_eq!(checks(&proxy, "match").await, 0.0, "checked what it wrote");
    proxy.stop().await;

    // Both files get other bytes of the same length.
    for blob in [&a, &b] {
        let path = cfg
            .cache_dir
            .join("blobs/sha256")
            .join(blob.digest.trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1000] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    let proxy = Proxy::start_config(cfg.clone()).await;
    let asked = up.count(&format!("GET /v2/team/x/blobs/{}", a.digest));
    // A whole read: cut before its end, never the whole wrong body.
    let r = http().get(url(&proxy, &a)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the wrong body went out whole");
    until("the changed file to be dropped", || async {
        !cached(&cfg.cache_dir, &a.digest)
    })
    .await;
    // The next request fetches it again, right.
    assert_eq!(sha256(&get_bytes(&url(&proxy, &a)).await), a.digest);
    assert_eq!(
        up.count(&format!("GET /v2/team/x/blobs/{}", a.digest)),
        asked + 1
    );
    // A range of a file not yet checked: the file is checked first, dropped, and the
    // range comes from the upstream's bytes.
    let r = http()
        .get(url(&proxy, &b))
        .header("range", "bytes=100-1099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), b.bytes[100..1100]);
    proxy.settled().await;
    assert_eq!(checks(&proxy, "mismatch").await, 2.0);
    // Checked (and fetched again) once, then served as any hit.
    assert_eq!(sha256(&get_bytes(&url(&proxy, &b)).await), b.digest);
    assert_eq!(checks(&proxy, "mismatch").await, 2.0);
}

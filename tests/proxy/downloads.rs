//! Downloads and the disk: one download per blob that outlives the client that started
//! it, no client left frozen by another's leaving, the index and the disk that agree
//! after any sequence of requests, room never overcommitted, what cannot be cached still
//! costing the upstream one GET, coalesced HEADs.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_never_freezes_a_manifest_answer() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(401, &[1000], "amd64");
    up.add_image("a/b", "v1", &image);
    let proxy = Proxy::start_config(up.config()).await;
    let url = format!("{}/v2/a/b/manifests/v1", proxy.url);

    // The first client asks; the upstream holds its answer; the client goes away.
    let release = up.hold_requests("GET /v2/a/b/manifests/v1");
    let first = tokio::spawn({
        let url = url.clone();
        async move { http().get(url).send().await }
    });
    until("the upstream to get the request", || async {
        up.count("GET /v2/a/b/manifests/v1") == 1
    })
    .await;
    first.abort();
    // The upstream then fails the request it held, and recovers.
    up.state.fail_status.store(503, Ordering::SeqCst);
    release.send(true).unwrap();
    until("the held answer to reach the cache", || async {
        proxy
            .metric(
                "pullthrough_upstream_requests_total",
                &[("kind", "manifest"), ("code", "503")],
            )
            .await
            == 1.0
    })
    .await;
    up.state.fail_status.store(0, Ordering::SeqCst);

    // Later clients start from the cache's state, not from the finished fetch's 502.
    until("a later request to succeed", || async {
        get(&url).await.status() == 200
    })
    .await;
    let r = get(&url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.count("GET /v2/a/b/manifests/v1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_download_finishes_when_its_first_client_leaves() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(402, 200_000));
    up.add_blob(&layer);
    let proxy = Proxy::start_config(up.config()).await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);

    let release = up.hold_blobs(16 * 1024);
    let mut first = get(&url).await;
    first.chunk().await.unwrap().unwrap();
    drop(first);
    release.send(true).unwrap();
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &layer.digest));
    assert_eq!(sha256(&get_bytes(&url).await), layer.digest);
    assert_eq!(up.count("GET /v2/a/b/blobs/"), 1);
}

/// Fails unless the index (as the metrics show it) holds exactly the files on disk.
async fn assert_index_matches_disk(proxy: &Proxy) {
    proxy.settled().await;
    let mut files = 0.0;
    let mut bytes = 0.0;
    for entry in std::fs::read_dir(proxy.cache_dir.join("blobs/sha256")).unwrap() {
        files += 1.0;
        bytes += entry.unwrap().metadata().unwrap().len() as f64;
    }
    for entry in std::fs::read_dir(proxy.cache_dir.join("meta/sha256")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            proxy.cache_dir.join("blobs/sha256").join(&name).exists(),
            "a media type without its manifest: {name:?}"
        );
    }
    let m = proxy.metrics().await;
    assert_eq!(
        (
            metric_value(&m, "pullthrough_cache_blobs", &[]),
            metric_value(&m, "pullthrough_cache_size_bytes", &[])
        ),
        (files, bytes),
        "index (objects, bytes) against the disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_and_the_disk_agree_after_any_sequence_of_requests() {
    let up = FaultUpstream::start().await;
    let images: Vec<Image> = (0..4)
        .map(|i| Image::generate(410 + i, &[40_000, 70_000], "amd64"))
        .collect();
    for (i, img) in images.iter().enumerate() {
        up.add_image("r/x", &format!("t{i}"), img);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = up.config();
    cfg.cache_dir = dir.path().join("cache");
    // Room for about two images: pulls evict.
    cfg.max_cache_bytes = Some(250_000);
    let proxy = Proxy::start_config(cfg).await;
    let token = std::fs::read_to_string(proxy.cache_dir.join("admin-token")).unwrap();
    let mut digests: Vec<String> = images
        .iter()
        .flat_map(|i| {
            i.blobs()
                .map(|b| b.digest.clone())
                .chain([i.manifest.digest.clone()])
        })
        .collect();
    digests.push(format!("sha256:{}", "0".repeat(64)));

    // A cached layer asked for as a manifest: not found, and still cached.
    let layer = &images[0].layers[0].digest;
    get_bytes(&format!("{}/v2/r/x/blobs/{layer}", proxy.url)).await;
    proxy.settled().await;
    let objects = proxy.metric("pullthrough_cache_blobs", &[]).await;
    for _ in 0..3 {
        let r = get(&format!("{}/v2/r/x/manifests/{layer}", proxy.url)).await;
        assert_eq!(r.status(), 404);
    }
    assert!(
        cached(&proxy.cache_dir, layer),
        "a manifest miss removed a blob"
    );
    assert_eq!(proxy.metric("pullthrough_cache_blobs", &[]).await, objects);
    assert_index_matches_disk(&proxy).await;

    // A fixed seed: the same sequence every run, and every kind of request mixed.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let c = http();
    for step in 0..240 {
        let d = &digests[next(digests.len())];
        let base = format!("{}/v2/r/x", proxy.url);
        let req = match next(7) {
            0 => c.get(format!("{base}/manifests/t{}", next(4))),
            // A blob's digest asked for as a manifest, and the other way round.
            1 => c.get(format!("{base}/manifests/{d}")),
            2 => c.head(format!("{base}/manifests/{d}")),
            3 => c.get(format!("{base}/blobs/{d}")),
            4 => c.head(format!("{base}/blobs/{d}")),
            5 => c
                .get(format!("{base}/blobs/{d}"))
                .header("range", "bytes=10-99"),
            _ => c
                .delete(format!(
                    "{}/admin/cache?image={}/r/x:t{}",
                    proxy.metrics_url,
                    up.host,
                    next(4)
                ))
                .header("authorization", format!("Bearer {token}")),
        };
        let _ = req.send().await.unwrap().bytes().await;
        if step % 20 == 19 {
            assert_index_matches_disk(&proxy).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_downloads_never_overcommit_the_disk() {
    let up = FaultUpstream::start().await;
    let layers: Vec<Blob> = (0..3)
        .map(|i| Blob::new(LAYER, random_bytes(420 + i, 20 << 20)))
        .collect();
    for l in &layers {
        up.add_blob(l);
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 50);
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;

    // Three cold 20 MiB pulls at once on a 50 MiB volume (16 MiB kept free): one fits,
    // the others are streamed through, and every client gets every byte right.
    let pulls: Vec<_> = layers
        .iter()
        .map(|l| {
            let url = format!("{}/v2/a/b/blobs/{}", proxy.url, l.digest);
            tokio::spawn(async move { get_bytes(&url).await })
        })
        .collect();
    for (pull, l) in pulls.into_iter().zip(&layers) {
        let body = pull.await.unwrap();
        assert_eq!(
            (body.len(), sha256(&body)),
            (l.bytes.len(), l.digest.clone())
        );
    }
    proxy.settled().await;
    let stored = layers
        .iter()
        .filter(|l| cached(&proxy.cache_dir, &l.digest))
        .count();
    assert_eq!(stored, 1, "one of the three fits beside the margin");
    assert_eq!(up.count("GET /v2/a/b/blobs/"), 3);
    // Nothing was marked full: the volume still has room for what fits.
    assert_eq!(proxy.metric("pullthrough_cache_disk_full", &[]).await, 0.0);
    assert_eq!(
        std::fs::read_dir(proxy.cache_dir.join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// Space a download set aside on the volume when it began counts once: a second download
/// that fits beside it is cached too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_that_fit_together_are_all_cached() {
    let up = FaultUpstream::start().await;
    let layers: Vec<Blob> = (0..2)
        .map(|i| Blob::new(LAYER, random_bytes(425 + i, 12 << 20)))
        .collect();
    for l in &layers {
        up.add_blob(l);
    }
    let release = up.hold_blobs(320 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 50);
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;

    // 2 x 12 MiB beside a 16 MiB margin on 50 MiB. The first is under way (its space
    // taken from the volume) before the second begins.
    let mut begun = Vec::new();
    for l in &layers {
        let url = format!("{}/v2/a/b/blobs/{}", proxy.url, l.digest);
        begun.push(get_begun(&url, 300_000).await);
    }
    drop(release);
    for (b, l) in begun.into_iter().zip(&layers) {
        assert_eq!(sha256(&get_finished(b).await), l.digest);
    }
    proxy.settled().await;
    for l in &layers {
        assert!(cached(&proxy.cache_dir, &l.digest), "both cached");
    }
}

/// The bodies four clients of `blob` (in `a/b`) got from one download: the upstream held
/// until all four wait for it.
async fn four_clients_of_one_download(
    up: &FaultUpstream,
    proxy: &Proxy,
    blob: &Blob,
) -> Vec<Vec<u8>> {
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, blob.digest);
    let release = up.hold_requests(&format!("GET /v2/a/b/blobs/{}", blob.digest));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get_bytes(&url).await })
        })
        .collect();
    until("the four clients to wait for the download", || async {
        proxy.metric("pullthrough_fetch_waiters", &[]).await == 4.0
    })
    .await;
    release.send(true).unwrap();
    let mut bodies = Vec::new();
    for c in clients {
        bodies.push(c.await.unwrap().to_vec());
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_blob_costs_one_upstream_get_for_every_client_waiting() {
    let up = FaultUpstream::start().await;
    // Larger than the whole volume: it cannot be cached, and must not mark the
    // volume full for the blobs that fit.
    let big = Blob::new(LAYER, random_bytes(430, 60 << 20));
    let small = Blob::new(LAYER, random_bytes(431, 1 << 20));
    up.add_blob(&big);
    up.add_blob(&small);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 50);
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;
    for body in four_clients_of_one_download(&up, &proxy, &big).await {
        assert_eq!(
            (body.len(), sha256(&body)),
            (big.bytes.len(), big.digest.clone())
        );
    }
    assert_eq!(up.count(&format!("GET /v2/a/b/blobs/{}", big.digest)), 1);
    proxy.settled().await;
    assert!(!cached(&proxy.cache_dir, &big.digest));
    assert_eq!(proxy.metric("pullthrough_cache_disk_full", &[]).await, 0.0);

    // A blob that fits is still cached.
    let body = get_bytes(&format!("{}/v2/a/b/blobs/{}", proxy.url, small.digest)).await;
    assert_eq!(sha256(&body), small.digest);
    proxy.settled().await;
    assert!(cached(&proxy.cache_dir, &small.digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_download_is_received_once_and_counted_as_saved_for_those_who_joined_it() {
    let up = FaultUpstream::start().await;
    let blob = Blob::new(LAYER, random_bytes(432, (4 << 20) + 9));
    up.add_blob(&blob);
    let proxy = Proxy::start_config(up.config()).await;
    for body in four_clients_of_one_download(&up, &proxy, &blob).await {
        assert_eq!(sha256(&body), blob.digest);
    }
    proxy.settled().await;
    // A fifth client, once it is cached.
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, blob.digest);
    assert_eq!(sha256(&get_bytes(&url).await), blob.digest);

    let len = blob.bytes.len() as f64;
    // The client that started it, those who joined it, the one after.
    for (source, bytes) in [("upstream", len), ("coalesced", 3.0 * len), ("cache", len)] {
        let served = proxy
            .metric("pullthrough_served_bytes_total", &[("source", source)])
            .await;
        assert_eq!(served, bytes, "source={source}");
    }
    assert_eq!(
        proxy
            .metric(
                "pullthrough_upstream_received_bytes_total",
                &[("kind", "blob")]
            )
            .await,
        len,
        "what crossed the upstream link"
    );
    assert_eq!(up.count(&format!("GET /v2/a/b/blobs/{}", blob.digest)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tag_record_write_leaves_no_temp_file() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(450, &[1000], "amd64");
    up.add_image("a/b", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 4);
    let mut cfg = up.config();
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;
    // Every byte of the volume taken: the tag record cannot be written.
    let mut filler = std::fs::File::create(fs.0.join("filler")).unwrap();
    for block in [64 << 10, 4 << 10] {
        while std::io::Write::write_all(&mut filler, &vec![0u8; block]).is_ok() {}
    }
    drop(filler);
    pull(&proxy.url, "a/b", "v1", None).await.unwrap();
    proxy.settled().await;
    let left: Vec<_> = std::fs::read_dir(proxy.cache_dir.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_heads_of_an_uncached_blob_cost_one_upstream_head() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(520, 50_000));
    up.add_blob(&layer);
    let proxy = Proxy::start_config(up.config()).await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, layer.digest);
    let release = up.hold_requests("HEAD /v2/a/b/blobs/");
    let heads: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { http().head(url).send().await.unwrap() })
        })
        .collect();
    until("the sixteen HEADs to wait for one", || async {
        proxy.metric("pullthrough_fetch_waiters", &[]).await == 16.0
    })
    .await;
    release.send(true).unwrap();
    for h in heads {
        let r = h.await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"],
            layer.bytes.len().to_string().as_str()
        );
    }
    assert_eq!(up.count("HEAD /v2/a/b/blobs/"), 1);
    assert!(
        !cached(&proxy.cache_dir, &layer.digest),
        "a HEAD downloads nothing"
    );
}

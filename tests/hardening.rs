//! What an outside audit of the proxy found, each pinned by a test: a client that leaves
//! must not freeze an answer, the index and the disk agree whatever is asked, downloads
//! do not overcommit the disk, manifests match the client's Accept, tags/list pages and
//! its cache is bounded, connections cannot be hoarded, upstream reads are bounded in
//! time, and errors say what happened.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use pullthrough::api::ProxyConfig;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(up: &FaultUpstream) -> ProxyConfig {
    config_for(&[(up.host.as_str(), up.url.as_str())])
}

fn cached(cache_dir: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache_dir.join("blobs/sha256").join(hex).exists()
}

// ----- 1. a client that leaves -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_never_freezes_a_manifest_answer() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(401, &[1000], "amd64");
    up.add_image("a/b", "v1", &image);
    let proxy = Proxy::start_config(config(&up)).await;
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
    let proxy = Proxy::start_config(config(&up)).await;
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

// ----- 2. the index and the disk agree -----

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
    let mut cfg = config(&up);
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

// ----- 3. the disk is not overcommitted -----

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
    let mut cfg = config(&up);
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
    let mut cfg = config(&up);
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
    let mut cfg = config(&up);
    cfg.cache_dir = fs.0.join("cache");
    let proxy = Proxy::start_config(cfg).await;
    let url = format!("{}/v2/a/b/blobs/{}", proxy.url, big.digest);

    let release = up.hold_requests(&format!("GET /v2/a/b/blobs/{}", big.digest));
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
    for c in clients {
        let body = c.await.unwrap();
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
async fn a_failed_tag_record_write_leaves_no_temp_file() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(450, &[1000], "amd64");
    up.add_image("a/b", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 4);
    let mut cfg = config(&up);
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

// ----- 4. manifests the client can read -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_follow_the_clients_accept_as_distribution_does() {
    let upstream = Registry::start().await;
    let image = MultiArch::generate(460, &[1000]);
    push_multiarch(&upstream.url, "acc/app", "v1", &image).await;
    let host = upstream.host();
    let proxy = Proxy::start(&[(host.as_str(), upstream.url.as_str())]).await;
    let docker = "application/vnd.docker.distribution.manifest.v2+json";
    let index = &image.index.digest;
    let answer = |base: String, reference: String, accept: &'static str| async move {
        let r = http()
            .get(format!("{base}/v2/acc/app/manifests/{reference}"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        let code = body["errors"][0]["code"].as_str().map(str::to_string);
        (status, code, body["mediaType"].as_str().map(str::to_string))
    };

    // A client that takes everything caches the index first.
    let full = answer(proxy.url.clone(), "v1".into(), ACCEPT).await;
    assert_eq!((full.0, full.2.as_deref()), (200, Some(OCI_INDEX)));
    // A client that reads only Docker schema 2 gets what Distribution itself answers
    // (404 MANIFEST_UNKNOWN), by tag and by digest, never the index.
    for reference in ["v1".to_string(), index.clone()] {
        let direct = answer(upstream.url.clone(), reference.clone(), docker).await;
        let through = answer(proxy.url.clone(), reference.clone(), docker).await;
        assert_eq!(direct.0, 404, "Distribution's answer changed");
        assert_eq!((through.0, through.1), (direct.0, direct.1), "{reference}");
    }
    // An image manifest, asked for as one, is served.
    let child = &image.images[0].manifest.digest;
    let one = answer(proxy.url.clone(), child.clone(), OCI_MANIFEST).await;
    assert_eq!((one.0, one.2.as_deref()), (200, Some(OCI_MANIFEST)));
    // The tag still serves the index to clients that take it, from the cache.
    let again = answer(proxy.url.clone(), "v1".into(), ACCEPT).await;
    assert_eq!((again.0, again.2.as_deref()), (200, Some(OCI_INDEX)));
    assert_eq!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "manifest"), ("result", "hit")]
            )
            .await,
        1.0,
        "the tag again, from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_a_manifest_is_neither_served_nor_cached() {
    let up = FaultUpstream::start().await;
    let html = Blob::new("text/html", b"<html>try again later</html>".to_vec());
    up.add_manifest("a/b", "v1", &html);
    let proxy = Proxy::start_config(config(&up)).await;
    for _ in 0..2 {
        let r = get(&format!("{}/v2/a/b/manifests/v1", proxy.url)).await;
        assert_eq!(error_code(r).await, (502, "MANIFEST_INVALID".to_string()));
    }
    assert_eq!(up.count("GET /v2/a/b/manifests/v1"), 2, "nothing cached");
    assert!(!cached(&proxy.cache_dir, &html.digest));
}

// ----- 6, 8. tags/list -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_pages_through_this_proxy_and_caches_by_n_and_last_only() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(470, &[100], "amd64");
    for i in 0..7 {
        up.add_manifest("library/tool", &format!("t{i}"), &image.manifest);
    }
    // Docker Hub naming: the client says `tool`, the upstream knows `library/tool`.
    let mut cfg = config_for(&[("docker.io", up.url.as_str())]);
    // Long enough that no page expires during the test, however slow the machine.
    cfg.tags_list_ttl = Duration::from_secs(3600);
    let proxy = Proxy::start_config(cfg).await;
    let mut tags = Vec::new();
    let mut next = Some("/v2/tool/tags/list?n=3&ns=docker.io".to_string());
    for _ in 0..10 {
        let Some(path) = next.take() else { break };
        let r = get(&format!("{}{path}", proxy.url)).await;
        assert_eq!(r.status(), 200, "{path}");
        next = r.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with(r#">; rel="next""#), "{l}");
            l[1..l.find('>').unwrap()].to_string()
        });
        if let Some(n) = &next {
            assert!(
                n.starts_with("/v2/tool/tags/list?") && n.ends_with("&ns=docker.io"),
                "{n}"
            );
        }
        let page: serde_json::Value = r.json().await.unwrap();
        tags.extend(
            page["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.to_string()),
        );
    }
    assert_eq!(tags.len(), 7, "{tags:?}");

    // Parameters other than n and last neither reach the upstream nor split the cache.
    let before = up.count("/tags/list");
    for buster in 0..5 {
        let r = get(&format!("{}/v2/tool/tags/list?n=3&x={buster}", proxy.url)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.count("/tags/list"), before, "served from the cache");
    assert_eq!(up.count("x="), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tags_list_cache_is_bounded_in_bytes_oldest_first() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(480, &[100], "amd64");
    // Long tag names make a page of 1,000 of them about 1 MiB.
    for i in 0..8000 {
        let tag = format!("{i:05}-{}", "x".repeat(1000));
        up.add_manifest("big/repo", &tag[..120], &image.manifest);
    }
    let mut cfg = config(&up);
    cfg.tags_list_ttl = Duration::from_secs(3600);
    let proxy = Proxy::start_config(cfg).await;
    let page = |last: usize| {
        let url = format!("{}/v2/big/repo/tags/list?n=8000&last={last:05}", proxy.url);
        async move { get(&url).await.bytes().await.unwrap() }
    };
    let first = page(0).await;
    assert!(first.len() > 500_000, "{} bytes", first.len());
    // Sixty more distinct pages: far more than 16 MiB, far fewer than 4,096 entries.
    for last in 1..=60 {
        page(last).await;
    }
    let before = up.count("/tags/list");
    page(60).await;
    assert_eq!(up.count("/tags/list"), before, "the newest page is cached");
    page(0).await;
    assert_eq!(up.count("/tags/list"), before + 1, "the oldest page went");
}

// ----- 7. connections -----

/// Reads from `s` until the server closes it (60 s at most); the bytes read.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("the server kept the connection open")
        .ok();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(490, 16 << 20));
    up.add_blob(&layer);
    let mut cfg = config(&up);
    cfg.client_header_timeout = Duration::from_secs(1);
    cfg.client_idle_timeout = Duration::from_secs(1);
    let proxy = Proxy::start_config(cfg).await;

    // Fifty connections that never send a byte: closed, while others are served.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tokio::net::TcpStream::connect(&proxy.host).await.unwrap());
    }
    assert_eq!(get(&format!("{}/v2/", proxy.url)).await.status(), 200);
    for s in &mut silent {
        assert!(read_to_close(s).await.is_empty());
    }

    // A client that stops reading a blob is let go, with the blob unfinished.
    let url = format!("/v2/a/b/blobs/{}", layer.digest);
    get_bytes(&format!("{}{url}", proxy.url)).await;
    proxy.settled().await;
    // A small receive buffer (a setting the kernel keeps): the socket cannot hold the
    // blob, whatever the defaults of the machine are.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut s = socket.connect(proxy.host.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    s.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));
    // Not reading: the socket buffers fill, no byte moves, and the server gives up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rest = read_to_close(&mut s).await;
    assert!(rest.len() < layer.bytes.len(), "the whole blob went out");
}

/// Idle connections holding every place on the operations port leave the probes
/// answering: a probe on a connection over the limit is answered as ever (with them
/// held, it was 503 until they timed out, and the pod would have been restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_idle_connections_hold_the_operations_port() {
    let up = FaultUpstream::start().await;
    let proxy = Proxy::start_config(config(&up)).await;
    let ops = proxy.metrics_url.trim_start_matches("http://").to_string();
    // As many idle connections as the port takes; the probes' come after them.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(&ops).await.unwrap());
    }
    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let mut s = tokio::net::TcpStream::connect(&ops).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with(&format!("\r\n\r\n{body}\n")),
            "{path}: {answer}"
        );
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_a_clear_answer_and_ops_keep_answering() {
    let up = FaultUpstream::start().await;
    let mut cfg = config(&up);
    cfg.max_connections = 4.try_into().unwrap();
    let proxy = Proxy::start_config(cfg).await;
    // Four connections that each got a real answer, and stay open (kept alive): they
    // hold the four places, whatever other connection came and went before.
    let mut held = Vec::new();
    while held.len() < 4 {
        let mut s = tokio::net::TcpStream::connect(&proxy.host).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut answer))
            .await
            .expect("no answer")
            .unwrap();
        if answer[..n].starts_with(b"HTTP/1.1 200") {
            held.push(s);
        }
    }
    let mut s = tokio::net::TcpStream::connect(&proxy.host).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("TOOMANYREQUESTS"),
        "{answer}"
    );
    let ops = get(&format!("{}/healthz", proxy.metrics_url)).await;
    assert_eq!(ops.status(), 200, "the operations port keeps answering");
    drop(held);
    until("the registry port to serve again", || async {
        http()
            .get(format!("{}/v2/", proxy.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_file_limit_never_takes_the_ports_down() {
    let up = FaultUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nmetricsListen: 127.0.0.1:{mport}\ncacheDir: {}\n\
             clientHeaderTimeout: 2s\nupstreams:\n  - registry: {}\n    url: {}\n",
            dir.path().join("cache").display(),
            up.host,
            up.url
        ),
    )
    .unwrap();
    // 256 open files at most, hard limit included.
    let mut child = std::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_pullthrough"))
        .args(["proxy", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let (url, ops) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{mport}"),
    );
    assert!(serving(&url, Duration::from_secs(60)).await, "no proxy");
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(
            tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                .await
                .unwrap(),
        );
    }
    // The operations port answers; the registry port serves again once the proxy has
    // closed the silent connections (the client still holds all 300 open).
    let health = get(&format!("{ops}/healthz")).await;
    assert_eq!(health.status(), 200);
    until("the registry port to serve again", || async {
        http()
            .get(format!("{url}/v2/"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    drop(silent);
    let _ = child.kill();
    let _ = child.wait();
}

// ----- 9. upstream reads are bounded in time -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_bodies_that_stall_fail_within_the_timeout() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(500, &[100], "amd64");
    up.add_image("a/b", "v1", &image);
    up.add_image("a/c", "v1", &image);
    let mut cfg = config(&up);
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
    let mut cfg = config(&up);
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

// ----- 13. bad ns, and errors that say what happened -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_ns_and_odd_upstream_answers_get_their_own_errors() {
    let up = FaultUpstream::start().await;
    let image = Image::generate(510, &[100], "amd64");
    up.add_image("a/b", "v1", &image);
    let proxy = Proxy::start_config(config(&up)).await;
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
    let mut cfg = config(&up);
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

// ----- 15. HEADs of an uncached blob -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_heads_of_an_uncached_blob_cost_one_upstream_head() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(520, 50_000));
    up.add_blob(&layer);
    let proxy = Proxy::start_config(config(&up)).await;
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
    let mut cfg = config(&up);
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

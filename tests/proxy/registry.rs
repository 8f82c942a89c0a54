//! The registry API as clients and Distribution use it: the proxy in front of the real
//! CNCF Distribution registry, pulled through with a Rust OCI client and with skopeo;
//! manifests that follow the client's Accept, answers that are not manifests, tags/list
//! pages and its bounded cache.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pulls_through_distribution_with_rust_client_and_skopeo() {
    let upstream = Registry::start().await;
    let image = MultiArch::generate(1, &[300_000, 1_000_000, 50_000]);
    push_multiarch(&upstream.url, "team/app", "v1", &image).await;
    let host = upstream.host();
    let proxy = Proxy::start(&[(host.as_str(), upstream.url.as_str())]).await;

    // Cold pull: every digest out matches what went in.
    let pulled = pull(&proxy.url, "team/app", "v1", None).await.unwrap();
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.digests, image.all_digests());
    let blobs: Vec<&Blob> = image.images.iter().flat_map(|i| i.blobs()).collect();
    for b in &blobs {
        upstream.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    // What the proxy sent upstream, by its own count (the registry logs late).
    let upstream_before = proxy.upstream_requests().await;
    assert_eq!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "blob"), ("result", "miss")]
            )
            .await,
        blobs.len() as f64
    );

    // Warm pull, as containerd would send it (?ns=): served from the cache, upstream untouched.
    proxy.settled().await;
    let again = pull(&proxy.url, "team/app", "v1", Some(&host))
        .await
        .unwrap();
    assert_eq!(again.digests, image.all_digests());
    assert_eq!(proxy.upstream_requests().await, upstream_before);
    assert_eq!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "blob"), ("result", "hit")]
            )
            .await,
        blobs.len() as f64
    );
    assert!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("kind", "manifest"), ("result", "hit")]
            )
            .await
            >= 3.0
    );
    let cached_bytes: usize = blobs.iter().map(|b| b.bytes.len()).sum();
    assert!(
        proxy
            .metric("pullthrough_served_bytes_total", &[("source", "cache")])
            .await
            >= cached_bytes as f64
    );
    assert!(proxy.metric("pullthrough_cache_blobs", &[]).await >= (blobs.len() + 3) as f64);

    // skopeo, a real client, copies every platform out of the warm cache.
    let out = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/team/app:v1", proxy.host);
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &src]);
    assert_eq!(sha256(raw.as_bytes()), image.index.digest);
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &src,
        &format!("dir:{}", out.path().display()),
    ]);
    let copied = dir_blobs(out.path());
    for b in &blobs {
        assert!(copied.contains(&b.digest), "skopeo is missing {}", b.digest);
    }
    assert_eq!(proxy.upstream_requests().await, upstream_before);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_cold_pull_and_docker_hub_naming() {
    // An upstream named docker.io: single-name images live under library/.
    let upstream = Registry::start().await;
    let image = Image::generate(7, &[200_000, 20_000], "amd64");
    push_image(&upstream.url, "library/tool", "1.0", &image).await;
    let proxy = Proxy::start(&[("docker.io", upstream.url.as_str())]).await;

    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/tool:1.0", proxy.host),
        &format!("dir:{}", out.path().display()),
    ]);
    let copied = dir_blobs(out.path());
    for b in image.blobs() {
        assert!(copied.contains(&b.digest));
        upstream.assert_gets(&format!("/v2/library/tool/blobs/{}", b.digest), 1);
    }
    // containerd's form of the same image: docker.io/library/tool with ?ns=docker.io.
    let pulled = pull(&proxy.url, "library/tool", "1.0", Some("docker.io"))
        .await
        .unwrap();
    assert_eq!(pulled.top, image.manifest.digest);
    for b in image.blobs() {
        upstream.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    // index.docker.io is the same registry.
    pull(&proxy.url, "tool", "1.0", Some("index.docker.io"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_cold_pulls_fetch_each_blob_once() {
    let upstream = Registry::start().await;
    let image = MultiArch::generate(3, &[4_000_000, 2_000_000, 500_000, 10_000]);
    push_multiarch(&upstream.url, "team/big", "v2", &image).await;
    let host = upstream.host();
    let proxy = Proxy::start(&[(host.as_str(), upstream.url.as_str())]).await;

    let pulls = (0..16).map(|i| {
        let url = proxy.url.clone();
        let ns = (i % 2 == 0).then(|| host.clone());
        tokio::spawn(async move { pull(&url, "team/big", "v2", ns.as_deref()).await })
    });
    for p in futures::future::join_all(pulls).await {
        assert_eq!(p.unwrap().unwrap().digests, image.all_digests());
    }
    for img in &image.images {
        for b in img.blobs() {
            upstream.assert_gets(&format!("/blobs/{}", b.digest), 1);
        }
        upstream.assert_gets(&format!("/manifests/{}", img.manifest.digest), 1);
    }
    upstream.assert_gets("/manifests/v2", 1);
    let blob_count = image
        .images
        .iter()
        .map(|i| i.blobs().count())
        .sum::<usize>() as f64;
    assert_eq!(
        proxy
            .metric("pullthrough_upstream_requests_total", &[("kind", "blob")])
            .await,
        blob_count
    );
    let answered = proxy
        .metric("pullthrough_requests_total", &[("kind", "blob")])
        .await;
    assert_eq!(answered, 16.0 * blob_count);
    proxy.settled().await; // and no download is left behind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_tags_and_head() {
    let upstream = Registry::start().await;
    let image = Image::generate(11, &[100_000], "amd64");
    push_image(&upstream.url, "r/x", "t1", &image).await;
    push_manifest(&upstream.url, "r/x", "t2", &image.manifest).await;
    let host = upstream.host();
    let proxy = Proxy::start(&[(host.as_str(), upstream.url.as_str())]).await;
    let layer = &image.layers[0];
    let url = format!("{}/v2/r/x/blobs/{}", proxy.url, layer.digest);
    let c = http();

    // HEAD of an uncached blob answers without downloading it.
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        layer.bytes.len().to_string().as_str()
    );
    upstream.assert_gets(&format!("/blobs/{}", layer.digest), 0);

    // A range on a miss, then on a hit.
    for _ in 0..2 {
        let r = c
            .get(&url)
            .header("range", "bytes=1000-1999")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes 1000-1999/{}", layer.bytes.len()).as_str()
        );
        assert!(
            r.bytes().await.unwrap() == layer.bytes[1000..2000],
            "the wrong 1000 bytes"
        );
    }
    let r = c
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.bytes().await.unwrap(),
        &layer.bytes[layer.bytes.len() - 10..]
    );
    let r = c
        .get(&url)
        .header("range", "bytes=999999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "SIZE_INVALID");
    upstream.assert_gets(&format!("/blobs/{}", layer.digest), 1);

    // tags/list passes through.
    let tags: serde_json::Value = c
        .get(format!("{}/v2/r/x/tags/list?ns={host}", proxy.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["t1", "t2"]);

    // HEAD manifest carries digest and type; an unknown tag is MANIFEST_UNKNOWN.
    let r = c
        .head(format!("{}/v2/r/x/manifests/t2", proxy.url))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        image.manifest.digest.as_str()
    );
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    let r = c
        .get(format!("{}/v2/r/x/manifests/nope", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");

    // Distribution 2.8 has no referrers API: the 404 is passed on as an OCI error.
    let r = c
        .get(format!(
            "{}/v2/r/x/referrers/{}",
            proxy.url, image.manifest.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// Cached blobs go out with sendfile(2) on HTTP/1 connections and as copied bytes on h2c
/// ones (see `zero_copy`): both must deliver the blob's exact bytes, whole or in ranges,
/// several on one kept-alive connection, on a miss and on a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_arrive_whole_over_http1_and_h2c() {
    let upstream = Registry::start().await;
    // Spans are 1 MiB: sizes that end inside one, and ranges that cross one.
    let image = Image::generate(12, &[(5 << 20) / 2 + 3, 1 << 20, 70_001], "amd64");
    push_image(&upstream.url, "z/c", "v1", &image).await;
    let host = upstream.host();
    let proxy = Proxy::start(&[(host.as_str(), upstream.url.as_str())]).await;
    let h1 = http();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let rounds = [
        (&h2, reqwest::Version::HTTP_2),
        (&h1, reqwest::Version::HTTP_11),
        (&h1, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ];
    let sendfile = || proxy.metric("pullthrough_sendfile_bytes_total", &[]);
    let mut by_sendfile = Vec::new();
    for (round, (client, version)) in rounds.into_iter().enumerate() {
        let before = sendfile().await;
        for layer in &image.layers {
            let url = format!("{}/v2/z/c/blobs/{}", proxy.url, layer.digest);
            let r = client.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.version(), version);
            let body = r.bytes().await.unwrap();
            assert!(
                sha256(&body) == layer.digest,
                "round {round}: {} bytes that do not hash to {}",
                body.len(),
                layer.digest
            );
            let (start, end) = (layer.bytes.len() / 3, layer.bytes.len() * 2 / 3 + 1);
            let r = client
                .get(&url)
                .header("range", format!("bytes={start}-{end}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            assert!(r.bytes().await.unwrap() == layer.bytes[start..=end]);
        }
        by_sendfile.push(sendfile().await - before);
    }
    // h2c copies; HTTP/1 sends what the page cache holds with sendfile(2): after a round
    // that read every byte (so they are in the page cache), the next HTTP/1 round does.
    assert_eq!(
        (by_sendfile[0], by_sendfile[3]),
        (0.0, 0.0),
        "sendfile on h2c"
    );
    assert!(
        by_sendfile[2] > 0.0,
        "no byte went out with sendfile: {by_sendfile:?}"
    );
    for layer in &image.layers {
        upstream.assert_gets(&format!("/blobs/{}", layer.digest), 1);
    }
    proxy.stop().await;
}

/// A digest cached through one repository is served under another only when the upstream
/// holds it there; links survive a restart (#21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_is_served_only_under_repositories_that_hold_it() {
    let upstream = Registry::start().await;
    let image = Image::generate(31, &[40_000], "amd64");
    push_image(&upstream.url, "team/private", "v1", &image).await;
    // Another repository holds the same layer, a third holds nothing of it.
    push_blob(&upstream.url, "team/shared", &image.layers[0]).await;
    push_image(
        &upstream.url,
        "team/public",
        "v1",
        &Image::generate(32, &[100], "amd64"),
    )
    .await;
    let host = upstream.host();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&[(host.as_str(), upstream.url.as_str())]);
    config.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(config.clone()).await;
    let pulled = pull(&proxy.url, "team/private", "v1", None).await.unwrap();
    assert_eq!(pulled.top, image.manifest.digest);

    let layer = &image.layers[0].digest;
    let c = http();
    let under = |repo: &str, what: &str| format!("{}/v2/{repo}/{what}", proxy.url);
    let blob = under("team/public", &format!("blobs/{layer}"));
    let manifest = under(
        "team/public",
        &format!("manifests/{}", image.manifest.digest),
    );
    let config_blob = under("team/public", &format!("blobs/{}", image.config.digest));
    for url in [&blob, &config_blob] {
        let (status, code) = error_code(c.get(url).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"), "{url}");
        assert_eq!(c.head(url).send().await.unwrap().status(), 404, "{url}");
    }
    let r = c
        .get(&manifest)
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".to_string()));
    assert_eq!(
        proxy
            .metric("pullthrough_link_proofs_total", &[("result", "refused")])
            .await,
        5.0
    );
    // Refused after a HEAD: nothing was downloaded for that name.
    upstream.assert_gets(&format!("/v2/team/public/blobs/{layer}"), 0);

    // Where the upstream holds it, one HEAD links it and the cached copy is served.
    let shared = under("team/shared", &format!("blobs/{layer}"));
    for _ in 0..2 {
        assert_eq!(get_bytes(&shared).await, image.layers[0].bytes);
    }
    assert_eq!(
        proxy
            .metric("pullthrough_link_proofs_total", &[("result", "linked")])
            .await,
        1.0
    );
    upstream.assert_gets(&format!("/blobs/{layer}"), 1);
    proxy.settled().await;
    proxy.stop().await;

    // After a restart the links are read back: no upstream request for what was linked,
    // and still a 404 where it was not.
    let proxy = Proxy::start_config(config).await;
    let again = |repo: &str| format!("{}/v2/{repo}/blobs/{layer}", proxy.url);
    for repo in ["team/private", "team/shared"] {
        assert_eq!(
            get_bytes(&again(repo)).await,
            image.layers[0].bytes,
            "{repo}"
        );
    }
    assert_eq!(proxy.upstream_requests().await, 0.0, "served from links");
    let r = c.get(again("team/public")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

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
    let proxy = Proxy::start_config(up.config()).await;
    for _ in 0..2 {
        let r = get(&format!("{}/v2/a/b/manifests/v1", proxy.url)).await;
        assert_eq!(error_code(r).await, (502, "MANIFEST_INVALID".to_string()));
    }
    assert_eq!(up.count("GET /v2/a/b/manifests/v1"), 2, "nothing cached");
    assert!(!cached(&proxy.cache_dir, &html.digest));
}

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
    let (tags, links) = tags_pages(&proxy.url, "/v2/tool/tags/list?n=3&ns=docker.io", 10).await;
    for n in &links {
        assert!(
            n.starts_with("/v2/tool/tags/list?") && n.ends_with("&ns=docker.io"),
            "{n}"
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
    let mut cfg = up.config();
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

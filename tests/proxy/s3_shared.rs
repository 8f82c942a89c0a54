//! The cache in an S3 bucket that replicas share. The tests that need a real S3 server
//! (Ceph's RADOS Gateway, started by `./scripts/test` with `scripts/s3-rgw`) are ignored
//! unless asked for:
//!
//! ```sh
//! eval "$(scripts/s3-rgw up /tmp/rgw)"
//! cargo test --test suite s3_shared -- --ignored
//! ```
//!
//! Each test keeps its objects under a key prefix of its own in the one bucket.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use pullthrough::api::proxy_config::{
    EvictionConfig, PeersConfig, ProxyConfig, S3Config, StorageConfig,
};
use pullthrough::proxy::peers::owner_of;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NEEDS_S3: &str = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set ({NEEDS_S3})"))
}

/// A key prefix no other test (or run) uses.
fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tests/{test}-{}-{nanos}", std::process::id())
}

/// The test bucket, under `prefix`.
fn s3(prefix: &str) -> S3Config {
    bucket_at(
        &env("PULLTHROUGH_S3_ENDPOINT"),
        &env("PULLTHROUGH_S3_BUCKET"),
        prefix,
    )
}

/// `bucket` of the S3 server at `endpoint`, under `prefix`, with the defaults.
fn bucket_at(endpoint: &str, bucket: &str, prefix: &str) -> S3Config {
    S3Config {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: Some(endpoint.to_string()),
        region: None,
        path_style: None,
        redirect: false,
        ..S3Config::default()
    }
}

/// The test's own client of the bucket, to look at what the proxies left there.
fn bucket() -> AmazonS3 {
    AmazonS3Builder::from_env()
        .with_endpoint(env("PULLTHROUGH_S3_ENDPOINT"))
        .with_bucket_name(env("PULLTHROUGH_S3_BUCKET"))
        .with_allow_http(true)
        .build()
        .unwrap()
}

/// Keys under `prefix/dir`.
async fn keys(b: &AmazonS3, prefix: &str, dir: &str) -> Vec<String> {
    let under = Key::from(format!("{prefix}/{dir}"));
    let listed: Vec<_> = b.list(Some(&under)).collect().await;
    listed
        .into_iter()
        .map(|m| m.unwrap().location.to_string())
        .collect()
}

/// Where `blob` is stored under `prefix`.
fn blob_key(prefix: &str, blob: &Blob) -> Key {
    let hex = blob.digest.trim_start_matches("sha256:");
    Key::from(format!("{prefix}/blobs/sha256/{hex}"))
}

/// Fails if anything, even a part of it, is visible under `key`.
async fn assert_absent(b: &AmazonS3, key: &Key) {
    assert!(
        matches!(b.head(key).await, Err(object_store::Error::NotFound { .. })),
        "a partial object is visible"
    );
}

fn with_storage(mut c: ProxyConfig, s3: S3Config) -> ProxyConfig {
    c.storage = StorageConfig { s3: Some(s3) };
    c
}

/// The binary run as a proxy with `config`, killed when dropped.
struct ProxyProcess {
    child: Child,
    url: String,
    metrics_url: String,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    async fn start(config: ProxyConfig, envs: &[(&str, &str)]) -> ProxyProcess {
        ProxyProcess::start_at(config, free_port(), envs).await
    }

    /// Listening on 127.0.0.1:`port`.
    async fn start_at(mut config: ProxyConfig, port: u16, envs: &[(&str, &str)]) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let ops = free_port();
        config.listen = format!("127.0.0.1:{port}").parse().unwrap();
        config.metrics_listen = format!("127.0.0.1:{ops}").parse().unwrap();
        config.cache_dir = dir.path().join("cache");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config.to_yaml()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
            .args(["proxy", "--config"])
            .arg(&path)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("proxy.log")).unwrap())
            .spawn()
            .unwrap();
        let p = ProxyProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
            metrics_url: format!("http://127.0.0.1:{ops}"),
            _dir: dir,
        };
        assert!(
            serving(&p.url, Duration::from_secs(60)).await,
            "the proxy did not start"
        );
        p
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn a_replica_that_never_saw_an_image_serves_it_from_the_bucket() {
    let up = Registry::start().await;
    let img = Image::generate(31, &[9 << 20, 3 << 20], "amd64");
    push_image(&up.url, "team/app", "v1", &img).await;
    let prefix = prefix("shared");
    let upstreams = [(up.host(), up.url.clone())];
    let upstreams: Vec<(&str, &str)> = upstreams
        .iter()
        .map(|(h, u)| (h.as_str(), u.as_str()))
        .collect();
    let a = Proxy::start_config(with_storage(config_for(&upstreams), s3(&prefix))).await;
    let b = Proxy::start_config(with_storage(config_for(&upstreams), s3(&prefix))).await;
    let first = pull(&a.url, "team/app", "v1", None).await.unwrap();
    a.settled().await;
    let second = pull(&b.url, "team/app", "v1", None).await.unwrap();
    assert_eq!(first.digests, second.digests);
    for blob in img.blobs() {
        up.assert_gets(&format!("/blobs/{}", blob.digest), 1);
    }
    // The tag too: its record in the bucket is fresh, so b asks the upstream nothing.
    assert_eq!(
        up.gets("/manifests/v1", 1),
        1,
        "manifest GETs at the upstream"
    );
    assert_eq!(b.upstream_requests().await, 0.0, "b asked the upstream");
    let hits = b
        .metric("pullthrough_requests_total", &[("result", "hit")])
        .await;
    assert!(hits >= 4.0, "hits at b: {hits}");
    let stored = keys(&bucket(), &prefix, "blobs").await;
    assert_eq!(stored.len(), 4, "objects: {stored:?}");
    // What went to the bucket and came back, as each replica counts it.
    let image_bytes: usize = img.blobs().map(|b| b.bytes.len()).sum();
    let written = a
        .metric("pullthrough_store_bytes_total", &[("direction", "written")])
        .await;
    let read = b
        .metric("pullthrough_store_bytes_total", &[("direction", "read")])
        .await;
    assert!(written >= image_bytes as f64, "written {written}");
    assert!(read >= image_bytes as f64, "read {read}");
    let parts = a
        .metric(
            "pullthrough_store_requests_total",
            &[("op", "put_part"), ("result", "ok")],
        )
        .await;
    assert!(parts >= 2.0, "parts uploaded: {parts}");
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn a_download_killed_with_its_process_leaves_nothing_visible() {
    let up = FaultUpstream::start().await;
    let blob = Blob::new(
        "application/octet-stream",
        random_bytes(32, (20 << 20) + 77),
    );
    up.add_blob(&blob);
    let prefix = prefix("killed");
    let b = bucket();
    let config = with_storage(config_for(&[("fault.test", up.url.as_str())]), s3(&prefix));
    let mut owner = ProxyProcess::start(config.clone(), &[]).await;
    // The body stops half-way until released: the upload is then in progress.
    let release = up.hold_blobs(10 << 20);
    let url = format!("{}/v2/r/blobs/{}", owner.url, blob.digest);
    let get = tokio::spawn(async move { http().get(url).send().await?.bytes().await });
    let deadline = Instant::now() + Duration::from_secs(120);
    while keys(&b, &prefix, "uploads").await.is_empty() {
        assert!(Instant::now() < deadline, "no upload began");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    owner.kill();
    assert!(
        get.await.unwrap().is_err(),
        "a whole body from a killed proxy"
    );
    let key = blob_key(&prefix, &blob);
    assert_absent(&b, &key).await;
    release.send(true).unwrap();

    // The next replica to start aborts the abandoned upload, and serves the blob whole.
    let mut s3 = s3(&prefix);
    s3.abandon_uploads_after = Duration::ZERO;
    let next = Proxy::start_config(with_storage(
        config_for(&[("fault.test", up.url.as_str())]),
        s3,
    ))
    .await;
    assert!(keys(&b, &prefix, "uploads").await.is_empty(), "upload left");
    let got = http()
        .get(format!("{}/v2/r/blobs/{}", next.url, blob.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(sha256(&got.bytes().await.unwrap()), blob.digest);
    next.settled().await;
    assert_eq!(b.head(&key).await.unwrap().size, blob.bytes.len() as u64);
}

/// No S3 server needed: the bucket's endpoint has nothing listening.
#[tokio::test]
async fn a_bucket_that_is_down_costs_no_pull_and_no_readiness() {
    let up = Registry::start().await;
    let img = Image::generate(33, &[2 << 20, 1 << 20], "amd64");
    push_image(&up.url, "team/app", "v1", &img).await;
    let down = bucket_at(&format!("http://127.0.0.1:{}", free_port()), "gone", "");
    let host = up.host();
    let config = with_storage(config_for(&[(&host, &up.url)]), down);
    let creds = [
        ("AWS_ACCESS_KEY_ID", "nobody"),
        ("AWS_SECRET_ACCESS_KEY", "nothing"),
    ];
    let p = ProxyProcess::start(config, &creds).await;
    for _ in 0..2 {
        let pulled = pull(&p.url, "team/app", "v1", None).await.unwrap();
        assert_eq!(pulled.digests.len(), 4);
    }
    let ready = http()
        .get(format!("{}/readyz", p.metrics_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "not ready while the bucket is down");
}

/// The key the replicas of these tests share (unless a test gives its own).
const REPLICAS_KEY: &str = "the key the test replicas share, long enough";

/// A file holding [`REPLICAS_KEY`].
fn replicas_key_file() -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("pullthrough-replicas-key-{}", std::process::id()));
    std::fs::write(&path, REPLICAS_KEY).unwrap();
    path
}

/// `config` as the replica at `me` among `replicas`, with the replicas' shared key
/// unless it has one.
fn as_replica(mut config: ProxyConfig, me: SocketAddr, replicas: &[SocketAddr]) -> ProxyConfig {
    config.peers = Some(PeersConfig {
        addresses: replicas.to_vec(),
        dns: None,
        self_address: Some(me),
    });
    if config.access.signing_key_file.is_none() {
        config.access.signing_key_file = Some(replicas_key_file());
    }
    config
}

/// Listeners on free loopback ports for a replica: its registry API and operations port.
async fn listeners() -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    (api, ops)
}

/// `n` replicas in this process, each on a loopback port of its own with a cache
/// directory of its own, running `config()` as one of them; and their addresses.
async fn replicas(n: usize, config: impl Fn() -> ProxyConfig) -> (Vec<Proxy>, Vec<SocketAddr>) {
    let mut bound = Vec::new();
    for _ in 0..n {
        bound.push(listeners().await);
    }
    let addrs: Vec<SocketAddr> = bound.iter().map(|(a, _)| a.local_addr().unwrap()).collect();
    let mut replicas = Vec::new();
    for (i, (api, ops)) in bound.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config();
        c.cache_dir = dir.path().join("cache");
        let c = as_replica(c, addrs[i], &addrs);
        replicas.push(Proxy::start_on(c, api, ops, Some(dir)).await);
    }
    (replicas, addrs)
}

/// GET `url` whole: its status and the digest of its body; says on `started` once the
/// first bytes arrived.
async fn read_after_first_byte(
    url: String,
    started: tokio::sync::oneshot::Sender<()>,
) -> (u16, String) {
    let mut r = http().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let (mut body, mut started) = (Vec::new(), Some(started));
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
        if let Some(s) = started.take() {
            let _ = s.send(());
        }
    }
    (status, sha256(&body))
}

async fn get_blob(url: String) -> Result<(u16, String), reqwest::Error> {
    let r = http().get(url).send().await?;
    let status = r.status().as_u16();
    Ok((status, sha256(&r.bytes().await?)))
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn sixteen_cold_pulls_over_three_replicas_fetch_the_blob_once() {
    let up = Registry::start().await;
    let blob = Blob::new("application/octet-stream", random_bytes(41, 64 << 20));
    push_blob(&up.url, "team/big", &blob).await;
    let prefix = prefix("peers");
    let host = up.host();
    let (replicas, addrs) = replicas(3, || {
        with_storage(config_for(&[(&host, &up.url)]), s3(&prefix))
    })
    .await;
    let gets = (0..16).map(|i| {
        get_blob(format!(
            "{}/v2/team/big/blobs/{}",
            replicas[i % 3].url,
            blob.digest
        ))
    });
    for got in futures::future::join_all(gets).await {
        assert_eq!(got.unwrap(), (200, blob.digest.clone()));
    }
    up.assert_gets(&format!("/blobs/{}", blob.digest), 1);
    let digest = blob.digest.parse().unwrap();
    let owner = owner_of(&addrs, &digest).unwrap();
    let (mut asked, mut failed) = (0.0, 0.0);
    for (r, addr) in replicas.iter().zip(&addrs) {
        let m = r.metrics().await;
        let owner_answered =
            metric_value(&m, "pullthrough_peer_fetches_total", &[("result", "owner")]);
        assert!(
            *addr != owner || owner_answered == 0.0,
            "the owner asked a replica"
        );
        asked += owner_answered;
        failed += metric_value(
            &m,
            "pullthrough_peer_fetches_total",
            &[("result", "failed")],
        );
    }
    assert!(
        asked >= 2.0 && failed == 0.0,
        "asked the owner {asked} times, failed {failed}"
    );
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn a_replica_takes_one_copy_from_the_owner_for_all_its_clients_late_ones_too() {
    let up = FaultUpstream::start().await;
    let prefix = prefix("one-copy");
    let (replicas, addrs) = replicas(2, || {
        with_storage(config_for(&[("fault.test", up.url.as_str())]), s3(&prefix))
    })
    .await;
    // A blob the first replica owns, asked of the second.
    let blob = (70..)
        .map(|seed| {
            Blob::new(
                "application/octet-stream",
                random_bytes(seed, (8 << 20) + 3),
            )
        })
        .take(64)
        .find(|b| owner_of(&addrs, &b.digest.parse().unwrap()) == Some(addrs[0]))
        .expect("a blob the first replica owns");
    up.add_blob(&blob);
    let asker = &replicas[1];
    let url = format!("{}/v2/r/blobs/{}", asker.url, blob.digest);
    // The upstream stops half-way until released: the owner's answer to the asker is
    // under way, and clients that come now find the asker's download streaming.
    let release = up.hold_blobs(4 << 20);
    let first = tokio::spawn(get_blob(url.clone()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while asker
        .metric("pullthrough_peer_fetches_total", &[("result", "owner")])
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the asker never heard from the owner"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three more clients, each known to be under way (its first bytes arrived, which
    // the held upstream lets through) before the rest is released.
    let mut late = Vec::new();
    for _ in 0..3 {
        let (started, began) = tokio::sync::oneshot::channel();
        late.push(tokio::spawn(read_after_first_byte(url.clone(), started)));
        began.await.unwrap();
    }
    release.send(true).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), (200, blob.digest.clone()));
    for l in late {
        assert_eq!(l.await.unwrap(), (200, blob.digest.clone()));
    }
    // One copy over the owner's link for the four clients, and one from the upstream.
    let asked = asker
        .metric("pullthrough_peer_fetches_total", &[("result", "owner")])
        .await;
    assert_eq!(asked, 1.0, "the owner was asked {asked} times");
    assert_eq!(up.count(&format!("GET /v2/r/blobs/{}", blob.digest)), 1);
    // The dashboards' account of it: the blob crossed the upstream link once, at the
    // owner; the asker's clients got it from the owner once and shared it three times;
    // the owner's bytes to the asker are not bytes to clients.
    let len = blob.bytes.len() as f64;
    let owner = &replicas[0];
    let received = "pullthrough_upstream_received_bytes_total";
    assert_eq!(owner.metric(received, &[("kind", "blob")]).await, len);
    assert_eq!(asker.metric(received, &[("kind", "blob")]).await, 0.0);
    assert_eq!(
        owner
            .metric("pullthrough_peer_served_bytes_total", &[])
            .await,
        len
    );
    assert_eq!(
        owner.metric("pullthrough_served_bytes_total", &[]).await,
        0.0
    );
    for (source, bytes) in [("peer", len), ("coalesced", 3.0 * len), ("upstream", 0.0)] {
        let served = asker
            .metric("pullthrough_served_bytes_total", &[("source", source)])
            .await;
        assert_eq!(served, bytes, "source={source}");
    }

    // Every client after: from each replica's own copy (the owner's download, the
    // asker's relay), not from the bucket, and not checked again.
    let bucket_read = "pullthrough_store_bytes_total";
    for replica in [owner, asker] {
        replica.settled().await;
        let read = replica.metric(bucket_read, &[("direction", "read")]).await;
        let checks = replica
            .metric("pullthrough_cache_read_checks_total", &[])
            .await;
        let url = format!("{}/v2/r/blobs/{}", replica.url, blob.digest);
        for _ in 0..2 {
            assert_eq!(
                get_blob(url.clone()).await.unwrap(),
                (200, blob.digest.clone())
            );
        }
        // (The repository's link record is read, not the blob.)
        let more = replica.metric(bucket_read, &[("direction", "read")]).await - read;
        assert!(more < len, "{} read {more} B of the bucket", replica.url);
        assert_eq!(
            replica
                .metric("pullthrough_cache_read_checks_total", &[])
                .await,
            checks
        );
        let cached = replica
            .metric("pullthrough_served_bytes_total", &[("source", "cache")])
            .await;
        assert_eq!(cached, 2.0 * len);
    }
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn when_the_owner_dies_mid_download_the_others_fetch_the_blob_themselves() {
    let up = FaultUpstream::start().await;
    let prefix = prefix("owner-killed");
    let (api, ops) = listeners().await;
    let asker = api.local_addr().unwrap();
    let owner = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addrs = [owner, asker];
    // A blob the replica to be killed owns.
    let blob = (50..)
        .map(|seed| {
            Blob::new(
                "application/octet-stream",
                random_bytes(seed, (20 << 20) + 5),
            )
        })
        .take(64)
        .find(|b| owner_of(&addrs, &b.digest.parse().unwrap()) == Some(owner))
        .expect("a blob the first replica owns");
    up.add_blob(&blob);
    let config = with_storage(config_for(&[("fault.test", up.url.as_str())]), s3(&prefix));
    let mut owning =
        ProxyProcess::start_at(as_replica(config.clone(), owner, &addrs), owner.port(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = as_replica(config, asker, &addrs);
    c.cache_dir = dir.path().join("cache");
    let asking = Proxy::start_on(c, api, ops, Some(dir)).await;

    // The owner's download stops half-way until released; then the owner is killed.
    let release = up.hold_blobs(10 << 20);
    let url = format!("{}/v2/r/blobs/{}", asking.url, blob.digest);
    let first = tokio::spawn(get_blob(url.clone()));
    let b = bucket();
    let deadline = Instant::now() + Duration::from_secs(120);
    while keys(&b, &prefix, "uploads").await.is_empty() {
        assert!(Instant::now() < deadline, "the owner began no upload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    owning.kill();
    match first.await.unwrap() {
        Err(_) => {}
        Ok((status, digest)) => assert!(
            status != 200 || digest != blob.digest,
            "a whole body from a killed owner"
        ),
    }
    let key = blob_key(&prefix, &blob);
    assert_absent(&b, &key).await;
    release.send(true).unwrap();
    // Asked again, the replica left fetches it itself, whole, and caches it.
    assert_eq!(get_blob(url).await.unwrap(), (200, blob.digest.clone()));
    let failed = asking
        .metric("pullthrough_peer_fetches_total", &[("result", "failed")])
        .await;
    assert!(failed >= 1.0, "the owner's failure was not counted");
    asking.settled().await;
    assert_eq!(b.head(&key).await.unwrap().size, blob.bytes.len() as u64);
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn with_redirect_a_cached_blob_comes_straight_from_the_bucket() {
    let up = Registry::start().await;
    let blob = Blob::new("application/octet-stream", random_bytes(60, (3 << 20) + 11));
    push_blob(&up.url, "team/app", &blob).await;
    let mut s3 = s3(&prefix("redirect"));
    s3.redirect = true;
    let host = up.host();
    let p = Proxy::start_config(with_storage(config_for(&[(&host, &up.url)]), s3)).await;
    let url = format!("{}/v2/team/app/blobs/{}", p.url, blob.digest);
    // Cold: served by the proxy as ever.
    assert_eq!(
        get_blob(url.clone()).await.unwrap(),
        (200, blob.digest.clone())
    );
    p.settled().await;
    let sent = p
        .metric("pullthrough_served_bytes_total", &[("source", "cache")])
        .await;
    // Warm: a 307 to a signed URL of the bucket, which serves the bytes (and a Range).
    tls_provider();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&env("PULLTHROUGH_S3_ENDPOINT")),
        "{location}"
    );
    assert!(
        location.contains("X-Amz-Signature="),
        "not signed: {location}"
    );
    assert_eq!(
        get_blob(url.clone()).await.unwrap(),
        (200, blob.digest.clone())
    );
    let part = http()
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(&part.bytes().await.unwrap()[..], &blob.bytes[10..20]);
    let after = p
        .metric("pullthrough_served_bytes_total", &[("source", "cache")])
        .await;
    assert_eq!(after, sent, "the proxy sent the warm bytes itself");
    up.assert_gets(&format!("/blobs/{}", blob.digest), 1);
}

/// Bytes of the objects under `prefix/blobs`, as the bucket lists them.
async fn bucket_bytes(b: &AmazonS3, prefix: &str) -> u64 {
    let under = Key::from(format!("{prefix}/blobs"));
    let listed: Vec<_> = b.list(Some(&under)).collect().await;
    listed.into_iter().map(|m| m.unwrap().size).sum()
}

#[tokio::test]
#[ignore = "needs an S3 server and a cluster: PULLTHROUGH_S3_ENDPOINT, PULLTHROUGH_E2E_KUBECONFIG"]
async fn three_replicas_elect_one_evictor_on_a_lease_and_keep_the_bucket_under_its_limit() {
    let kubeconfig = std::env::var("PULLTHROUGH_E2E_KUBECONFIG")
        .expect("set PULLTHROUGH_E2E_KUBECONFIG to the kubeconfig of a test cluster (the Lease)");
    let up = Registry::start().await;
    // Six images of 3 MiB, two per replica; the bucket may hold 8 MiB.
    let images: Vec<Image> = (0..6)
        .map(|i| Image::generate(700 + i, &[3 << 20], "amd64"))
        .collect();
    for (i, img) in images.iter().enumerate() {
        push_image(&up.url, &format!("team/app{i}"), "1", img).await;
    }
    let limit: u64 = 8 << 20;
    let prefix = prefix("evict");
    let lease = format!("evict-{}", &sha256(prefix.as_bytes())[7..19]);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut s3 = s3(&prefix);
        s3.eviction = EvictionConfig {
            lease: Some(lease.clone()),
            lease_namespace: Some("default".into()),
            every: Duration::from_secs(2),
            record_every: Duration::from_secs(1),
            grace: Duration::from_secs(3),
        };
        let mut c = with_storage(config_for(&[(&up.host(), &up.url)]), s3);
        c.max_cache_bytes = Some(limit);
        let c = as_replica(c, addrs[i], &addrs);
        let envs = [("KUBECONFIG", kubeconfig.as_str()), ("POD_NAME", "")];
        replicas.push(ProxyProcess::start_at(c, *port, &envs).await);
    }
    for (i, img) in images.iter().enumerate() {
        let r = &replicas[i % 3];
        let got = pull(&r.url, &format!("team/app{i}"), "1", None)
            .await
            .unwrap();
        assert_eq!(got.top, img.manifest.digest);
    }
    let b = bucket();
    // Graced 3 s, marked, deleted a round (2 s) later: well within a minute.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut bytes = bucket_bytes(&b, &prefix).await;
    while bytes > limit && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        bytes = bucket_bytes(&b, &prefix).await;
    }
    assert!(
        bytes <= limit,
        "the bucket holds {bytes} bytes, over {limit}"
    );
    let newest = &images[5];
    for blob in newest.blobs() {
        assert!(
            b.head(&blob_key(&prefix, blob)).await.is_ok(),
            "the newest image was evicted"
        );
    }
    // One replica evicted, the others did not.
    let mut evictors = Vec::new();
    for r in &replicas {
        let m = scrape(&r.metrics_url).await;
        let evicting = metric_value(&m, "pullthrough_store_evictor", &[]);
        let evicted = metric_value(&m, "pullthrough_cache_evictions_total", &[]);
        assert!(
            evicting == 1.0 || evicted == 0.0,
            "a replica that does not lead evicted"
        );
        if evicting == 1.0 {
            evictors.push(evicted);
        }
    }
    assert!(
        evictors.len() == 1 && evictors[0] > 0.0,
        "evictors: {evictors:?}"
    );
    // An evicted image is pulled again, correct, by the replica that cached it.
    let again = pull(&replicas[0].url, "team/app0", "1", None)
        .await
        .unwrap();
    assert_eq!(again.top, images[0].manifest.digest);
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn mirrors_that_do_not_know_each_other_fetch_a_blob_once_through_the_bucket_s_lease() {
    let up = FaultUpstream::start().await;
    let blob = Blob::new("application/octet-stream", random_bytes(51, (20 << 20) + 5));
    up.add_blob(&blob);
    let prefix = prefix("lease");
    // Two proxies on one bucket with no peers: as mirrors in two clusters.
    let config = || with_storage(config_for(&[("fault.test", up.url.as_str())]), s3(&prefix));
    let a = Proxy::start_config(config()).await;
    let b = Proxy::start_config(config()).await;
    for p in [&a, &b] {
        let enforced = p.metric("pullthrough_store_conditional_writes", &[]).await;
        assert_eq!(enforced, 1.0, "RGW enforces If-None-Match: *");
    }
    let release = up.hold_blobs(4 << 20);
    let get = |base: &str| {
        let url = format!("{base}/v2/r/blobs/{}", blob.digest);
        tokio::spawn(async move { get_blob(url).await })
    };
    let first = get(&a.url);
    let bucket = bucket();
    let deadline = Instant::now() + Duration::from_secs(60);
    while keys(&bucket, &prefix, "leases").await.is_empty() {
        assert!(Instant::now() < deadline, "no fetch lease taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = get(&b.url);
    // b found the lease taken (its create-only write answered "exists") before a goes on.
    let exists = [("op", "put"), ("result", "exists")];
    while b.metric("pullthrough_store_requests_total", &exists).await < 1.0 {
        assert!(Instant::now() < deadline, "b never met the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    release.send(true).unwrap();
    for got in [first, second] {
        assert_eq!(got.await.unwrap().unwrap(), (200, blob.digest.clone()));
    }
    assert_eq!(
        up.count(&format!("GET /v2/r/blobs/{}", blob.digest)),
        1,
        "fetched twice"
    );
    let leased = b
        .metric("pullthrough_peer_fetches_total", &[("result", "leased")])
        .await;
    assert_eq!(leased, 1.0, "b did not read it from the bucket");
    a.settled().await;
    let left = keys(&bucket, &prefix, "leases").await;
    assert!(left.is_empty(), "lease left: {left:?}");
}

#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn replicas_serving_tls_ask_each_other_over_it_for_private_blobs() {
    use crate::common::{ALICE, CACHE};
    let up = Registry::start_private(&format!("{CACHE}{ALICE}")).await;
    let blob = Blob::new("application/octet-stream", random_bytes(43, 4 << 20));
    push_blob(&crate::common::as_alice(&up), "team/big", &blob).await;
    // A tag in the repository, which the check of alice's credentials asks for.
    let tagged = Image::generate(47, &[1000], "amd64");
    push_image(&crate::common::as_alice(&up), "team/big", "latest", &tagged).await;
    let certs = tempfile::tempdir().unwrap();
    test_certificate(certs.path());
    let key = certs.path().join("signing-key");
    std::fs::write(&key, "the key shared by the replicas, 32 bytes or more").unwrap();
    let prefix = prefix("tls-peers");
    let host = up.host();
    let (replicas, addrs) = replicas(2, || {
        let mut c = with_storage(config_for(&[(&host, &up.url)]), s3(&prefix));
        c.upstreams[0].credentials = Some(crate::common::cache_credentials());
        c.tls = Some(pullthrough::api::TlsConfig {
            cert_file: certs.path().join("tls.crt"),
            key_file: certs.path().join("tls.key"),
        });
        c.access.signing_key_file = Some(key.clone());
        c
    })
    .await;
    let digest = blob.digest.parse().unwrap();
    let owner = owner_of(&addrs, &digest).unwrap();
    let other = replicas
        .iter()
        .zip(&addrs)
        .find(|(_, a)| **a != owner)
        .map(|(r, _)| r)
        .unwrap();
    let client = https(&certs.path().join("ca.crt"));
    let token: serde_json::Value = client
        .get(format!(
            "{}/auth/token?service=pullthrough:{host}&scope=repository:team/big:pull",
            other.url
        ))
        .basic_auth("alice", Some("wonder"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = client
        .get(format!("{}/v2/team/big/blobs/{}", other.url, blob.digest))
        .bearer_auth(token["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), blob.digest);
    let m = other.metrics().await;
    let by = |result| metric_value(&m, "pullthrough_peer_fetches_total", &[("result", result)]);
    assert_eq!(
        (by("owner"), by("failed")),
        (1.0, 0.0),
        "asked the owner over TLS"
    );
    // Served once by the upstream (its first answer to the owner was the 401 that asks
    // for the credentials): both lines logged, then the 200s counted.
    let path = format!("/blobs/{}", blob.digest);
    assert_eq!(up.gets(&path, 2), 2, "upstream GETs of the blob");
    let served = up
        .access_log()
        .lines()
        .filter(|l| l.contains(&format!("GET /v2/team/big/blobs/{}", blob.digest)))
        .filter(|l| l.contains("\" 200 "))
        .count();
    assert_eq!(served, 1, "upstream GETs of the blob");
}

/// What a replica may ask another for is a blob by digest, and only with a proof made
/// under the replicas' key: a header alone, from a replica's own address, gets nothing
/// of a private repository, and a proof gets nothing but a blob.
#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn only_a_proven_replica_gets_a_blob_and_nothing_else() {
    use crate::common::{ALICE, CACHE};
    use pullthrough::proxy::peers::{PEER_HEADER, Peers};
    use pullthrough::proxy::shared_key::SharedKey;
    let up = Registry::start_private(&format!("{CACHE}{ALICE}")).await;
    let img = Image::generate(44, &[30_000], "amd64");
    push_image(&crate::common::as_alice(&up), "team/app", "1", &img).await;
    let prefix = prefix("peer-trust");
    let host = up.host();
    let (replicas, addrs) = replicas(2, || {
        let mut c = with_storage(config_for(&[(&host, &up.url)]), s3(&prefix));
        c.upstreams[0].credentials = Some(crate::common::cache_credentials());
        c.access.plain_http = true;
        c
    })
    .await;
    let a = &replicas[0];
    let layer = &img.layers[0].digest;
    // Every request comes from 127.0.0.1, the replicas' own address.
    let ask = |path: String, head: bool, proof: Option<String>| {
        let url = format!("{}{path}", a.url);
        async move {
            let c = http();
            let mut r = if head { c.head(&url) } else { c.get(&url) };
            if let Some(p) = proof {
                r = r.header(PEER_HEADER, p);
            }
            r.send().await.unwrap()
        }
    };
    let ns = format!("?ns={}", host.replace(':', "%3A"));
    let blob = format!("/v2/team/app/blobs/{layer}{ns}");
    let manifest = format!("/v2/team/app/manifests/1{ns}");
    let tags = format!("/v2/team/app/tags/list{ns}");
    // What an attacker can send: the old header (a replica's address), anything else.
    for forged in [addrs[1].to_string(), "v1 0 00".to_string()] {
        for (path, head) in [
            (&manifest, false),
            (&blob, false),
            (&blob, true),
            (&tags, false),
        ] {
            let r = ask(path.clone(), head, Some(forged.clone())).await;
            assert_eq!(r.status(), 403, "{path} (head: {head}) with {forged:?}");
        }
    }
    // A proof under another key.
    let theirs = Peers::fixed(
        addrs[1],
        &[],
        SharedKey::new(b"not the replicas' key at all....".to_vec()),
    );
    let r = ask(blob.clone(), false, Some(theirs.proof("GET", &blob))).await;
    assert_eq!(r.status(), 403, "a proof under another key");
    // A replica's own proof: a blob, and nothing else.
    let ours = Peers::fixed(
        addrs[1],
        &[],
        SharedKey::new(REPLICAS_KEY.as_bytes().to_vec()),
    );
    let r = ask(manifest.clone(), false, Some(ours.proof("GET", &manifest))).await;
    let (status, code) = error_code(r).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DENIED"),
        "a manifest for a replica"
    );
    let r = ask(blob.clone(), true, Some(ours.proof("HEAD", &blob))).await;
    assert_eq!(r.status(), 403, "a HEAD for a replica");
    // A proof for one blob is no proof for another request.
    let other = format!("/v2/team/app/blobs/{}{ns}", img.config.digest);
    let r = ask(other, false, Some(ours.proof("GET", &blob))).await;
    assert_eq!(r.status(), 403, "a proof of another request");
    let r = ask(blob.clone(), false, Some(ours.proof("GET", &blob))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), *layer);
    // Clients without the header are challenged as ever.
    assert_eq!(ask(manifest.clone(), false, None).await.status(), 401);
    assert_eq!(ask(blob.clone(), false, None).await.status(), 401);
}

/// An upstream with one blob of `team/app` (from `seed`), and the bucket prefix `test`
/// into which a replica, stopped since, cached it.
async fn a_blob_in_the_bucket(seed: u64, test: &str) -> (Registry, Blob, String) {
    let up = Registry::start().await;
    let blob = Blob::new(LAYER, random_bytes(seed, 300_000));
    push_blob(&up.url, "team/app", &blob).await;
    let prefix = prefix(test);
    let host = up.host();
    let a = Proxy::start_config(with_storage(config_for(&[(&host, &up.url)]), s3(&prefix))).await;
    let got = get_bytes(&format!("{}/v2/team/app/blobs/{}", a.url, blob.digest)).await;
    assert_eq!(sha256(&got), blob.digest);
    a.settled().await;
    a.stop().await;
    (up, blob, prefix)
}

/// A blob object overwritten in the bucket with other bytes (anyone who may write the
/// bucket can) is checked as it is read by a replica that never saw it: the client's
/// body is cut before its end, never whole and wrong; the object is deleted, and the next
/// request fetches it from the upstream again.
#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn a_blob_overwritten_in_the_bucket_is_never_served() {
    let (up, blob, prefix) = a_blob_in_the_bucket(45, "overwritten").await;
    let host = up.host();
    let config = || with_storage(config_for(&[(&host, &up.url)]), s3(&prefix));
    let url = |p: &Proxy| format!("{}/v2/team/app/blobs/{}", p.url, blob.digest);
    let b = bucket();
    let key = blob_key(&prefix, &blob);
    let mut wrong = blob.bytes.clone();
    wrong[150_000] ^= 1;
    b.put(&key, wrong.into()).await.unwrap();

    let fresh = Proxy::start_config(config()).await;
    let r = http().get(url(&fresh)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the wrong body went out whole");
    until("the object to be deleted", || async {
        matches!(
            b.head(&key).await,
            Err(object_store::Error::NotFound { .. })
        )
    })
    .await;
    let checks = |result: &'static str| {
        let fresh = &fresh;
        async move {
            fresh
                .metric("pullthrough_cache_read_checks_total", &[("result", result)])
                .await
        }
    };
    assert_eq!(sha256(&get_bytes(&url(&fresh)).await), blob.digest);
    assert_eq!(checks("mismatch").await, 1.0);
    // Every whole read from the bucket is checked: by a replica that does not hold a
    // copy of its own (`fresh` keeps the one it fetched again).
    fresh.settled().await;
    let other = Proxy::start_config(config()).await;
    assert_eq!(sha256(&get_bytes(&url(&other)).await), blob.digest);
    let matched = other
        .metric(
            "pullthrough_cache_read_checks_total",
            &[("result", "match")],
        )
        .await;
    assert_eq!(matched, 1.0);
}

/// An S3 endpoint in front of `target` that passes every request on, but for a GET of a
/// blob's bytes, which it takes and never answers: a bucket that hangs. The endpoint and
/// the task that serves it.
async fn hanging_gets(target: &str) -> (String, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt, Full};
    let target: hyper::Uri = target.parse().unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let (addr, task) = serve_http1(move |_, req: hyper::Request<hyper::body::Incoming>| {
        let (client, target) = (client.clone(), target.clone());
        async move {
            if req.method() == hyper::Method::GET && req.uri().path().contains("/blobs/") {
                std::future::pending::<()>().await;
            }
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut out = hyper::Request::builder()
                .method(parts.method)
                .uri(format!("http://{}{path}", target.authority().unwrap()));
            // The Host too: the request is signed for it.
            for (k, v) in &parts.headers {
                out = out.header(k, v);
            }
            let resp = client
                .request(out.body(Full::new(body)).unwrap())
                .await
                .unwrap();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            hyper::Response::from_parts(parts, Full::new(body))
        }
    })
    .await;
    (format!("http://{addr}"), task)
}

/// A bucket that takes a cached blob's GET and never answers: the replica decides
/// before the status line goes out, and the client gets the whole blob from the
/// upstream (after the bucket's 10 s for an answer), not a body cut after 10 s.
#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn a_bucket_that_never_answers_a_read_leaves_the_blob_to_the_upstream() {
    let (up, blob, prefix) = a_blob_in_the_bucket(46, "hanging").await;
    let host = up.host();
    let url = |p: &Proxy| format!("{}/v2/team/app/blobs/{}", p.url, blob.digest);

    let (hanging, _relay) = hanging_gets(&env("PULLTHROUGH_S3_ENDPOINT")).await;
    let bucket = bucket_at(&hanging, &env("PULLTHROUGH_S3_BUCKET"), &prefix);
    let b = Proxy::start_config(with_storage(config_for(&[(&host, &up.url)]), bucket)).await;
    let r = http().get(url(&b)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("the whole body");
    assert_eq!(sha256(&body), blob.digest);
    let failed = b
        .metric(
            "pullthrough_store_requests_total",
            &[("op", "get"), ("result", "error")],
        )
        .await;
    assert_eq!(failed, 1.0, "the bucket's read");
    up.assert_gets(&format!("/blobs/{}", blob.digest), 2);
}

/// A replica seeded from a bundle in its own bucket serves it offline, the upstream never
/// asked; `bundle import` reads the bucket too; an image dropped on another replica,
/// which never served it, leaves the bucket, what another image uses staying.
#[tokio::test]
#[ignore = "needs an S3 server: PULLTHROUGH_S3_ENDPOINT (./scripts/test starts one)"]
async fn a_bundle_in_the_bucket_seeds_a_replica_offline_and_a_drop_empties_it() {
    let up = Registry::start().await;
    let shared = random_bytes(130, 30_000);
    let app = Image::with_layers(
        131,
        vec![random_bytes(132, 6 << 20), shared.clone()],
        "amd64",
    );
    let keep = Image::with_layers(133, vec![shared], "amd64");
    push_image(&up.url, "team/app", "v1", &app).await;
    push_image(&up.url, "team/keep", "v1", &keep).await;
    let host = up.host();
    let upstreams = [(host.as_str(), up.url.as_str())];
    let dir = tempfile::tempdir().unwrap();

    // A disk cache pulls both; its export goes into the bucket by `bundle import`.
    let mut disk = config_for(&upstreams);
    disk.cache_dir = dir.path().join("disk");
    let a = Proxy::start_config(disk.clone()).await;
    pull(&a.url, "team/app", "v1", None).await.unwrap();
    pull(&a.url, "team/keep", "v1", None).await.unwrap();
    a.settled().await;
    a.stop().await;
    let tar = dir.path().join("b.tar");
    super::bundles::bundle(&[
        "export",
        "--cache-dir",
        disk.cache_dir.to_str().unwrap(),
        tar.to_str().unwrap(),
    ])
    .unwrap();
    let prefix = prefix("bundle");
    let b = bucket();
    // The bundle kept in the cache's own bucket, beside (not under) the cache's prefix.
    let key = format!("{prefix}-bundles/b.tar");
    b.put(
        &Key::from(key.as_str()),
        std::fs::read(&tar).unwrap().into(),
    )
    .await
    .unwrap();
    let seed = format!("s3://{}/{key}", env("PULLTHROUGH_S3_BUCKET"));
    let on_bucket = with_storage(config_for(&upstreams), s3(&prefix));

    // A replica seeded from it, offline, serves it asking nobody.
    let mut offline = on_bucket.clone();
    offline.mode = pullthrough::api::UpstreamMode::Offline;
    offline.seed = Some(seed.clone());
    let r1 = Proxy::start_config(offline).await;
    for blob in app.blobs().chain(keep.blobs()) {
        assert!(
            b.head(&blob_key(&prefix, blob)).await.is_ok(),
            "{} in the bucket",
            blob.digest
        );
    }
    let pulled = pull(&r1.url, "team/app", "v1", None).await.unwrap();
    assert_eq!(pulled.top, app.manifest.digest);
    assert_eq!(r1.upstream_requests().await, 0.0);

    // `bundle import` into the bucket, from it: everything is there already.
    let cfg = dir.path().join("bucket.yaml");
    std::fs::write(&cfg, on_bucket.to_yaml()).unwrap();
    let again =
        super::bundles::bundle(&["import", "--config", cfg.to_str().unwrap(), &seed]).unwrap();
    // Six objects: two manifests, two configs, two layers (one of them shared).
    assert_eq!(
        (again["written"].as_u64(), again["already"].as_u64()),
        (Some(0), Some(6))
    );

    // Dropped on another replica, which never served it: gone from the bucket, but for
    // the layer team/keep uses.
    let r2 = Proxy::start_config(on_bucket.clone()).await;
    let token = std::fs::read_to_string(r2.cache_dir.join("admin-token")).unwrap();
    let answer: serde_json::Value = http()
        .delete(format!(
            "{}/admin/cache?image={host}/team/app:v1",
            r2.metrics_url
        ))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["removed"]["manifests"],
        serde_json::json!([app.manifest.digest])
    );
    assert_absent(&b, &blob_key(&prefix, &app.layers[0])).await;
    assert_absent(&b, &blob_key(&prefix, &app.config)).await;
    assert!(
        b.head(&blob_key(&prefix, &app.layers[1])).await.is_ok(),
        "team/keep's layer stays"
    );
    assert!(b.head(&blob_key(&prefix, &keep.manifest)).await.is_ok());
    let keep_pulled = pull(&r1.url, "team/keep", "v1", None).await.unwrap();
    assert_eq!(keep_pulled.top, keep.manifest.digest);
}

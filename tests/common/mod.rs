//! Test support: the real Distribution registry as upstream, an in-process proxy, images
//! generated on the fly, and a small OCI client that verifies every digest it pulls.
#![allow(dead_code)]

pub mod fault;
pub mod token_server;

use pullthrough::api::{ProxyConfig, UpstreamConfig};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A free loopback port (bound then released; the caller binds it right away).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// reqwest's TLS takes rustls's process-wide provider (the proxy's S3 client brings
/// reqwest in without one of its own): ring, as the proxy installs it.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn http() -> reqwest::Client {
    tls_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A client whose requests come from `address`, a loopback address of its own
/// (127.0.0.2, ...): another client as the proxy sees it.
pub fn http_from(address: &str) -> reqwest::Client {
    tls_provider();
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A client that trusts only the CA certificate in `ca` (PEM).
pub fn https(ca: &Path) -> reqwest::Client {
    tls_provider();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .tls_certs_only([ca])
        .build()
        .unwrap()
}

/// An in-process HTTP/1 server on a free loopback port, answering every request with
/// `handle(its own address, request)`; it stops when the returned task is aborted.
pub async fn serve_http1<F, Fut, B>(handle: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(SocketAddr, hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handle = handle.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let answer = handle(addr, req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A test CA and a certificate it signed for 127.0.0.1, made with the openssl CLI in
/// `dir`: `ca.crt`, `tls.crt` and `tls.key`, as a cert-manager Secret holds them.
pub fn test_certificate(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl not found: run ./scripts/test, which installs it");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=pullthrough test CA",
                "-days",
                "3",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "tls.crt",
        "-days",
        "3",
        "-extfile",
        "ext.cnf",
    ]);
}

/// How a [`Registry`] authenticates its clients.
enum RegistryAuth<'a> {
    /// Basic, against these htpasswd lines.
    Htpasswd(&'a str),
    /// Bearer tokens of this issuer.
    Token(&'a token_server::TokenServer),
}

/// A real `docker-registry` (CNCF Distribution) process on a free loopback port, killed on drop.
pub struct Registry {
    pub url: String,
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Registry {
    /// A plain registry (the upstream in tests).
    pub async fn start() -> Registry {
        Registry::start_with(None).await
    }

    /// A registry in pull-through proxy mode for `remote` (the reference cache).
    pub async fn start_with(proxy_remote: Option<&str>) -> Registry {
        Registry::start_opts(proxy_remote, None, "").await
    }

    /// A registry where every request needs one of `users` (htpasswd lines, bcrypt), by
    /// Basic auth. Distribution rereads the file when it changes ([`Self::set_users`]).
    pub async fn start_private(users: &str) -> Registry {
        Registry::start_opts(None, Some(RegistryAuth::Htpasswd(users)), "").await
    }

    /// A registry that takes the tokens of `issuer` (the distribution token spec), and
    /// nothing else.
    pub async fn start_token(issuer: &token_server::TokenServer) -> Registry {
        Registry::start_token_with(issuer, "").await
    }

    /// [`Self::start_token`], with `extra` (YAML) added to the registry's configuration.
    pub async fn start_token_with(issuer: &token_server::TokenServer, extra: &str) -> Registry {
        Registry::start_opts(None, Some(RegistryAuth::Token(issuer)), extra).await
    }

    /// Replaces the users of a [`Self::start_private`] registry.
    pub fn set_users(&self, users: &str) {
        let path = self.dir.path().join("htpasswd");
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, users).unwrap();
        // Distribution rereads the file when its modification time changes: make sure
        // it does, whatever the file system's clock granularity.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(before + Duration::from_secs(2)).unwrap();
    }

    async fn start_opts(
        proxy_remote: Option<&str>,
        auth: Option<RegistryAuth<'_>>,
        extra: &str,
    ) -> Registry {
        let bin = which("docker-registry").expect(
            "docker-registry not found: run ./scripts/test, which installs Debian's docker-registry",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some(remote) = proxy_remote {
            cfg.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        match auth {
            Some(RegistryAuth::Htpasswd(users)) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, users).unwrap();
                cfg.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    path.display()
                ));
            }
            Some(RegistryAuth::Token(issuer)) => cfg.push_str(&issuer.registry_config()),
            None => {}
        }
        cfg.push_str(extra);
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg_path)
            .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let reg = Registry {
            url: url.clone(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            child,
            dir,
        };
        assert!(
            serving(&url, Duration::from_secs(60)).await,
            "docker-registry did not come up: {}",
            reg.log()
        );
        reg
    }

    /// `host:port`, the registry name clients use.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many GETs of `path_part` the registry logged, once at least `at_least` are
    /// there. The registry writes a request's line after its handler returns, which on a
    /// loaded machine can be long after the client (here, a cache that has read the whole
    /// body) has its last byte; so this waits (60 s at most) until `at_least` lines are
    /// there, then until the log has stopped growing, and counts.
    pub fn gets(&self, path_part: &str, at_least: usize) -> usize {
        let gets = |log: &str| {
            log.lines()
                .filter(|l| l.contains("\"GET ") && l.contains(path_part))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while gets(&self.read_log()) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        gets(&self.access_log())
    }

    /// Asserts that the registry logged exactly `want` GETs of `path_part` (see
    /// [`Self::gets`]).
    #[track_caller]
    pub fn assert_gets(&self, path_part: &str, want: usize) {
        assert_eq!(
            self.gets(path_part, want),
            want,
            "GETs of {path_part} at the upstream"
        );
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// All access-log lines (one per request), once the log has not grown for 100 ms
    /// (5 s at the most). For counts, see [`Self::assert_gets`].
    pub fn access_log(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut log = self.read_log();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.read_log();
            if now == log {
                break;
            }
            log = now;
        }
        log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `limit` for a registry at `url` to answer `GET /v2/` with success (or,
/// for one that needs credentials, 401).
pub async fn serving(url: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = http().get(format!("{url}/v2/")).send().await
            && (r.status().is_success() || r.status() == 401)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits up to `limit` for an operations port at `url` to answer `/readyz` with success.
pub async fn serving_ops(url: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = http().get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// An in-process proxy on 127.0.0.1 free ports, shut down on drop.
pub struct Proxy {
    pub url: String,
    pub host: String,
    pub metrics_url: String,
    pub cache_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy mirroring the given upstreams (registry name, url), first is the default.
    pub async fn start(upstreams: &[(&str, &str)]) -> Proxy {
        Proxy::start_config(config_for(upstreams)).await
    }

    pub async fn start_config(mut config: ProxyConfig) -> Proxy {
        init_tracing();
        let dir = if config.cache_dir == ProxyConfig::default().cache_dir {
            let d = tempfile::tempdir().unwrap();
            config.cache_dir = d.path().join("cache");
            Some(d)
        } else {
            None
        };
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Proxy::start_on(config, api, ops, dir).await
    }

    /// A proxy serving on listeners the test bound (it knows their addresses before the
    /// proxy starts), keeping `dir` while it runs.
    pub async fn start_on(
        config: ProxyConfig,
        api: tokio::net::TcpListener,
        ops: tokio::net::TcpListener,
        dir: Option<tempfile::TempDir>,
    ) -> Proxy {
        init_tracing();
        let host = api.local_addr().unwrap().to_string();
        let metrics_url = format!("http://{}", ops.local_addr().unwrap());
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let cache_dir = config.cache_dir.clone();
        let task = tokio::spawn(async move {
            pullthrough::proxy::serve(config, api, ops, async {
                let _ = rx.await;
            })
            .await
            .expect("proxy runs");
        });
        let proxy = Proxy {
            url: format!("{scheme}://{host}"),
            host,
            metrics_url,
            cache_dir,
            _dir: dir,
            stop: Some(tx),
            task: Some(task),
        };
        // Requests would wait for it anyway (the listeners are bound), but what it does
        // at start (its cache directory, its admin token) must be done before a test
        // looks.
        // Over TLS, the operations port (plain HTTP) says when it serves.
        let ready = match scheme {
            "https" => serving_ops(&proxy.metrics_url, Duration::from_secs(60)).await,
            _ => serving(&proxy.url, Duration::from_secs(60)).await,
        };
        assert!(ready, "the proxy did not start");
        proxy
    }

    /// See [`settled`].
    pub async fn settled(&self) {
        settled(&self.metrics_url).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// The JSON of `GET <path>` on the operations port, with the admin `token`.
    pub async fn admin_get(&self, path: &str, token: &str) -> serde_json::Value {
        http()
            .get(format!("{}{path}", self.metrics_url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        scrape(&self.metrics_url).await
    }

    /// Value of one sample, matched by name and every `k="v"` label given (0 if absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Requests this proxy has sent to its upstreams, by its own count.
    pub async fn upstream_requests(&self) -> f64 {
        self.metric("pullthrough_upstream_requests_total", &[])
            .await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits (60 s at most) until `check` holds, failing with `what` otherwise.
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most 60 s) until the proxy whose operations server is at `metrics_url` has
/// no blob download in flight. Clients get a blob as soon as it is verified, before it
/// is flushed and stored, so a test that looks at the cache after a pull waits for this.
pub async fn settled(metrics_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_value(
        &scrape(metrics_url).await,
        "pullthrough_inflight_fetches",
        &[],
    ) != 0.0
    {
        assert!(
            Instant::now() < deadline,
            "downloads still in flight after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The Prometheus text an operations server at `metrics_url` exposes.
pub async fn scrape(metrics_url: &str) -> String {
    http()
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn config_for(upstreams: &[(&str, &str)]) -> ProxyConfig {
    ProxyConfig {
        upstreams: upstreams
            .iter()
            .map(|(r, u)| UpstreamConfig {
                url: Some(u.to_string()),
                ..UpstreamConfig::new(r)
            })
            .collect(),
        ..ProxyConfig::default()
    }
}

/// Deterministic pseudo-random bytes (incompressible enough for tests).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob with its digest and media type.
#[derive(Clone)]
pub struct Blob {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            digest: sha256(&bytes),
            media_type: media_type.into(),
            bytes,
        }
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// One platform's image: config, layers and manifest.
#[derive(Clone)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
}

impl Image {
    pub fn generate(seed: u64, layer_sizes: &[usize], arch: &str) -> Image {
        let layers = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| random_bytes(seed * 1000 + i as u64, n))
            .collect();
        Image::with_layers(seed, layers, arch)
    }

    /// An image whose layers are real tar archives (one file each), which containerd can
    /// unpack.
    pub fn generate_tar(seed: u64, file_sizes: &[usize], arch: &str) -> Image {
        let layers = file_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                tar_with_file(
                    &format!("data/file-{seed}-{i}"),
                    &random_bytes(seed * 1000 + i as u64, n),
                )
            })
            .collect();
        Image::with_layers(seed, layers, arch)
    }

    pub fn with_layers(seed: u64, layer_bytes: Vec<Vec<u8>>, arch: &str) -> Image {
        let layers: Vec<Blob> = layer_bytes
            .into_iter()
            .map(|b| Blob::new(LAYER, b))
            .collect();
        let config = Blob::new(
            CONFIG,
            serde_json::to_vec(&json!({
                "architecture": arch, "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.digest).collect::<Vec<_>>()},
                "config": {"Env": [format!("SEED={seed}")]}
            }))
            .unwrap(),
        );
        let manifest = Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>()
            }))
            .unwrap(),
        );
        Image {
            config,
            layers,
            manifest,
        }
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// A multi-platform image: an index over several images.
pub struct MultiArch {
    pub images: Vec<Image>,
    pub index: Blob,
}

impl MultiArch {
    pub fn generate(seed: u64, layer_sizes: &[usize]) -> MultiArch {
        let images: Vec<Image> = ["amd64", "arm64"]
            .iter()
            .enumerate()
            .map(|(i, arch)| Image::generate(seed * 10 + i as u64, layer_sizes, arch))
            .collect();
        let index = Blob::new(
            OCI_INDEX,
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": images.iter().zip(["amd64", "arm64"]).map(|(img, arch)| {
                    let mut d = img.manifest.descriptor();
                    d["platform"] = json!({"architecture": arch, "os": "linux"});
                    d
                }).collect::<Vec<_>>()
            }))
            .unwrap(),
        );
        MultiArch { images, index }
    }

    /// Every digest a full pull touches.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut s = BTreeSet::from([self.index.digest.clone()]);
        for img in &self.images {
            s.insert(img.manifest.digest.clone());
            s.extend(img.blobs().map(|b| b.digest.clone()));
        }
        s
    }
}

/// Pushes a blob with the distribution push API (monolithic upload).
pub async fn push_blob(base: &str, repo: &str, blob: &Blob) {
    push_blob_with(&http(), base, repo, blob).await
}

/// [`push_blob`] with client `c` (which may carry an Authorization header).
pub async fn push_blob_with(c: &reqwest::Client, base: &str, repo: &str, blob: &Blob) {
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "start upload: {:?}", r.text().await);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // On `base` (which may carry credentials), whether the registry answered with a path
    // or a whole URL.
    let loc = match loc.find("/v2/") {
        Some(i) => format!("{base}{}", &loc[i..]),
        None => loc,
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={}", blob.digest))
        .header("content-type", "application/octet-stream")
        .body(blob.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "finish upload: {:?}", r.text().await);
}

pub async fn push_manifest(base: &str, repo: &str, reference: &str, m: &Blob) {
    push_manifest_with(&http(), base, repo, reference, m).await
}

pub async fn push_manifest_with(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    m: &Blob,
) {
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", &m.media_type)
        .body(m.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "push manifest: {:?}", r.text().await);
}

pub async fn push_image(base: &str, repo: &str, tag: &str, img: &Image) {
    push_image_with(&http(), base, repo, tag, img).await
}

/// [`push_image`] with client `c` (which may carry an Authorization header).
pub async fn push_image_with(c: &reqwest::Client, base: &str, repo: &str, tag: &str, img: &Image) {
    for b in img.blobs() {
        push_blob_with(c, base, repo, b).await;
    }
    push_manifest_with(c, base, repo, tag, &img.manifest).await;
}

pub async fn push_multiarch(base: &str, repo: &str, tag: &str, m: &MultiArch) {
    for img in &m.images {
        for b in img.blobs() {
            push_blob(base, repo, b).await;
        }
        push_manifest(base, repo, &img.manifest.digest, &img.manifest).await;
    }
    push_manifest(base, repo, tag, &m.index).await;
}

/// What a pull saw: every digest fetched (verified) and the top manifest's digest.
#[derive(Debug, Default)]
pub struct Pulled {
    pub top: String,
    pub digests: BTreeSet<String>,
    pub bytes: u64,
}

/// Pulls `repo:reference` (every platform) from an OCI registry, verifying every digest.
/// `ns` is sent as containerd does when set.
pub async fn pull(
    base: &str,
    repo: &str,
    reference: &str,
    ns: Option<&str>,
) -> Result<Pulled, String> {
    let c = http();
    let q = ns.map(|n| format!("?ns={n}")).unwrap_or_default();
    let mut out = Pulled::default();
    let get = |path: String| {
        let c = c.clone();
        let q = q.clone();
        async move {
            let r = c
                .get(format!("{base}/v2/{repo}/{path}{q}"))
                .header("accept", ACCEPT)
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = r.status();
            let headers = r.headers().clone();
            let body = r
                .bytes()
                .await
                .map_err(|e| format!("GET {path} body: {e}"))?;
            if !status.is_success() {
                return Err(format!(
                    "GET {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            Ok::<_, String>((headers, body.to_vec()))
        }
    };
    let (headers, top) = get(format!("manifests/{reference}")).await?;
    let top_digest = sha256(&top);
    if let Some(h) = headers.get("docker-content-digest")
        && h.to_str().unwrap() != top_digest
    {
        return Err(format!("Docker-Content-Digest {h:?} != {top_digest}"));
    }
    if reference.starts_with("sha256:") && reference != top_digest {
        return Err(format!("asked for {reference}, got {top_digest}"));
    }
    out.top = top_digest.clone();
    out.digests.insert(top_digest);
    out.bytes += top.len() as u64;
    let doc: serde_json::Value = serde_json::from_slice(&top).map_err(|e| e.to_string())?;
    let mut manifests = vec![doc.clone()];
    if let Some(list) = doc["manifests"].as_array() {
        manifests.clear();
        for d in list {
            let digest = d["digest"].as_str().unwrap().to_string();
            let (_, body) = get(format!("manifests/{digest}")).await?;
            if sha256(&body) != digest {
                return Err(format!("manifest {digest} has wrong content"));
            }
            out.bytes += body.len() as u64;
            out.digests.insert(digest);
            manifests.push(serde_json::from_slice(&body).map_err(|e| e.to_string())?);
        }
    }
    for m in manifests {
        let mut descs = vec![m["config"].clone()];
        descs.extend(m["layers"].as_array().cloned().unwrap_or_default());
        for d in descs {
            let digest = d["digest"].as_str().unwrap().to_string();
            let (_, body) = get(format!("blobs/{digest}")).await?;
            if sha256(&body) != digest {
                return Err(format!("blob {digest} has wrong content"));
            }
            if d["size"].as_u64() != Some(body.len() as u64) {
                return Err(format!("blob {digest} has wrong size"));
            }
            out.bytes += body.len() as u64;
            out.digests.insert(digest);
        }
    }
    Ok(out)
}

/// Runs skopeo, failing with its output.
pub fn skopeo(args: &[&str]) -> String {
    let bin = which("skopeo").expect("skopeo not found: run ./scripts/test, which installs it");
    let out = Command::new(bin).args(args).output().expect("skopeo runs");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 of every file in a skopeo `dir:` copy, by file name.
pub fn dir_blobs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().to_string();
            (name.len() == 64).then(|| {
                let bytes = std::fs::read(e.path()).unwrap();
                let d = sha256(&bytes);
                assert_eq!(
                    d,
                    format!("sha256:{name}"),
                    "skopeo wrote {name} with other content"
                );
                d
            })
        })
        .collect()
}

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every RegistryMirror document in deploy/examples, with its file.
pub fn examples() -> Vec<(String, serde_yaml::Value)> {
    let mut out = Vec::new();
    let dir = root().join("deploy/examples");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            if v["kind"] == "RegistryMirror" {
                out.push((path.display().to_string(), v));
            }
        }
    }
    out
}

/// A ustar archive holding one regular file.
pub fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100);
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", content.len()).as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Validates Kubernetes manifests with kubernetes-validate (PyPI), strictly, against the
/// schemas of the oldest and newest Kubernetes versions it is checked with.
pub fn kubernetes_validate(files: &[&Path]) {
    let bin = which("kubernetes-validate")
        .expect("kubernetes-validate not found: run ./scripts/test, which installs it from PyPI");
    for version in ["1.34.0", "1.37.0"] {
        let out = Command::new(&bin)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version} failed:\n{text}"
        );
        assert!(!text.contains("ERROR") && !text.contains("WARN"), "{text}");
    }
}

/// GETs a URL (any status).
pub async fn get(url: &str) -> reqwest::Response {
    http().get(url).send().await.unwrap()
}

/// GETs a URL and returns the whole body.
pub async fn get_bytes(url: &str) -> bytes::Bytes {
    http().get(url).send().await.unwrap().bytes().await.unwrap()
}

/// A GET of `url` under way: its answer, and the first `at_least` bytes of its body (or
/// a little more) already read.
pub async fn get_begun(url: &str, at_least: usize) -> (reqwest::Response, Vec<u8>) {
    let mut resp = http().get(url).send().await.unwrap();
    let mut body = Vec::new();
    while body.len() < at_least {
        body.extend_from_slice(&resp.chunk().await.unwrap().expect("a body that long"));
    }
    (resp, body)
}

/// The whole body of a GET begun with [`get_begun`]; fails if the body is cut.
pub async fn get_finished((mut resp, mut body): (reqwest::Response, Vec<u8>)) -> Vec<u8> {
    while let Some(chunk) = resp.chunk().await.expect("the body went on to its end") {
        body.extend_from_slice(&chunk);
    }
    body
}

/// The status and OCI error code of an error answer.
pub async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.expect("an OCI error body");
    (status, v["errors"][0]["code"].as_str().unwrap().to_string())
}

/// A small tmpfs, unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (the disk-full test runs as root, as ./scripts/test does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

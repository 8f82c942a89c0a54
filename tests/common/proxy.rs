//! An in-process proxy on free loopback ports, and its configuration for a set of upstreams.

use super::{http, init_tracing, metric_value, scrape, serving, serving_ops};
use pullthrough::api::{ProxyConfig, UpstreamConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// Whether the blob `digest` is committed in the disk cache at `cache_dir`.
pub fn cached(cache_dir: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache_dir.join("blobs/sha256").join(hex).exists()
}

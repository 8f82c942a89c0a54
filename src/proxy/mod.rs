//! `pullthrough proxy`: the data plane. A read-only OCI Distribution API that answers from
//! its on-disk cache and fills it from the configured upstream registries.
//!
//! Layers, called only downwards: [`http`] (parse, validate, route, render errors) ->
//! [`pull_through`] (cache logic, coalescing, streaming) -> [`upstream`] (registry client,
//! auth) and [`storage`] (files). This module never imports `kube`.

pub mod error;
pub mod http;
pub mod metrics;
pub mod pull_through;
pub mod storage;
pub mod upstream;

use crate::api::dockerconfig::credentials_for;
use crate::api::proxy_config::is_docker_hub_alias;
use crate::api::{ConfigError, ProxyConfig};
use metrics::Metrics;
use pull_through::{CachePolicy, PullThrough};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use storage::Storage;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use upstream::Upstream;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The cache directory cannot be used.
    #[error("cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A credentials file cannot be read or parsed.
    #[error("credentials file {path} for {registry}: {reason}")]
    Credentials {
        /// The registry.
        registry: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// A running proxy's shared state.
pub struct Proxy {
    cache: Arc<PullThrough>,
    upstreams: HashMap<String, Arc<Upstream>>,
    default: Arc<Upstream>,
    metrics: Metrics,
}

impl Proxy {
    /// Builds the proxy: validates the config, opens (and cleans) the cache directory,
    /// resolves credentials.
    pub fn build(config: &ProxyConfig) -> Result<Proxy, StartError> {
        config.validate()?;
        let metrics = Metrics::new();
        let (storage, stats) =
            Storage::open(&config.cache_dir).map_err(|source| StartError::CacheDir {
                path: config.cache_dir.clone(),
                source,
            })?;
        metrics.cache_blobs.set(stats.blobs as i64);
        metrics.cache_size_bytes.set(stats.bytes as i64);
        if stats.removed_partials > 0 {
            tracing::info!(
                removed = stats.removed_partials,
                "removed partial downloads left by an earlier run"
            );
        }
        let client = upstream::http_client(config.connect_timeout);
        let mut upstreams = HashMap::new();
        for u in &config.upstreams {
            let credentials = match (&u.credentials, &u.credentials_file) {
                (Some(c), _) => Some(c.clone()),
                (None, Some(path)) => {
                    let fail = |reason: String| StartError::Credentials {
                        registry: u.registry.clone(),
                        path: path.clone(),
                        reason,
                    };
                    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
                    let creds =
                        credentials_for(&bytes, &u.registry).map_err(|e| fail(e.to_string()))?;
                    if creds.is_none() {
                        tracing::warn!(registry = %u.registry, path = %path.display(),
                            "credentials file has no entry for this registry; pulling anonymously");
                    }
                    creds
                }
                (None, None) => None,
            };
            let up = Arc::new(Upstream::new(
                u,
                credentials,
                client.clone(),
                metrics.clone(),
                config.upstream_timeout,
            ));
            upstreams.insert(u.registry.to_ascii_lowercase(), up);
        }
        let default_name = config
            .default_registry()
            .expect("validated: at least one upstream")
            .to_ascii_lowercase();
        let default = upstreams[&default_name].clone();
        let policy = CachePolicy {
            tag_ttl: config.tag_ttl,
            stale_if_error: config.stale_if_error,
            tags_list_ttl: config.tags_list_ttl,
            max_manifest_bytes: config.max_manifest_bytes,
        };
        Ok(Proxy {
            cache: Arc::new(PullThrough::new(storage, metrics.clone(), policy)),
            upstreams,
            default,
            metrics,
        })
    }

    /// The upstream serving `registry` (as sent in `?ns=`), if configured.
    pub fn upstream(&self, registry: &str) -> Option<Arc<Upstream>> {
        let key = registry.to_ascii_lowercase();
        if let Some(u) = self.upstreams.get(&key) {
            return Some(u.clone());
        }
        if is_docker_hub_alias(&key) {
            return self
                .upstreams
                .iter()
                .find(|(name, _)| is_docker_hub_alias(name))
                .map(|(_, u)| u.clone());
        }
        None
    }

    /// The upstream for clients that send no `?ns=`.
    pub fn default_upstream(&self) -> Arc<Upstream> {
        self.default.clone()
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<PullThrough> {
        &self.cache
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl crate::server::Ops for Proxy {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// Ready when the cache directory is there.
    fn readiness(&self) -> Result<(), String> {
        let tmp = self.cache.storage().root().join("tmp");
        if tmp.is_dir() {
            Ok(())
        } else {
            Err(format!("cache directory {} is gone", tmp.display()))
        }
    }
}

/// Binds the configured addresses and serves until `shutdown` completes.
pub async fn run(
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let api = bind(config.listen).await?;
    let ops = bind(config.metrics_listen).await?;
    serve(config, api, ops, shutdown).await
}

/// Serves on already-bound listeners (tests bind 127.0.0.1:0) until `shutdown` completes,
/// then lets open requests finish for up to 10 seconds.
pub async fn serve(
    config: ProxyConfig,
    api: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let proxy = Arc::new(Proxy::build(&config)?);
    tracing::info!(
        listen = %api.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?,
        metrics = %ops.local_addr().map_err(|source| StartError::Bind { addr: config.metrics_listen, source })?,
        cache_dir = %config.cache_dir.display(),
        upstreams = ?config.upstreams.iter().map(|u| u.registry.as_str()).collect::<Vec<_>>(),
        default_upstream = proxy.default.name(),
        "pullthrough proxy serving"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let p1 = proxy.clone();
    let api_loop = crate::server::accept_loop(api, stop_rx.clone(), tracker.clone(), move |req| {
        http::handle(p1.clone(), req)
    });
    let p2: Arc<dyn crate::server::Ops> = proxy.clone();
    let ops_loop = crate::server::accept_loop(ops, stop_rx, tracker.clone(), move |req| {
        crate::server::handle_ops(p2.clone(), req)
    });
    let api_task = tokio::spawn(api_loop);
    let ops_task = tokio::spawn(ops_loop);
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = api_task.await;
    let _ = ops_task.await;
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10s; closing them");
    }
    Ok(())
}

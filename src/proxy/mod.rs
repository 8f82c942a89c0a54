//! `pullthrough proxy`: the data plane. A read-only OCI Distribution API that answers from
//! its on-disk cache and fills it from the configured upstream registries.
//!
//! Layers, called only downwards: [`http`] (parse, validate, route, render errors) ->
//! [`pull_through`] (cache logic, coalescing, streaming) -> [`upstream`] (registry client,
//! auth) and [`index`] (accounting, eviction) -> [`store`] (the bytes: the local disk).
//! docs/architecture.md draws the rooms. This module never imports `kube`.

pub mod access;
pub mod admin;
pub mod error;
pub mod http;
pub mod index;
pub mod links;
pub mod metrics;
pub mod peers;
pub mod prefetcher;
pub mod pull_through;
pub mod shared_eviction;
pub mod shared_key;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod upstream;
pub mod zero_copy;

use crate::api::docker_hub;
use crate::api::dockerconfig::credentials_for;
use crate::api::image_ref;
use crate::api::{ConfigError, ProxyConfig};
use crate::server::ConnLimits;
use index::Index;
use metrics::Metrics;
use pull_through::{CachePolicy, ConfiguredImage, PullThrough};
use shared_eviction::SharedEviction;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::s3::{Bucket, S3Store};
use store::{BlobStore, DiskStore};
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
    /// The cache's store cannot be read.
    #[error("cache store {name}: {source}")]
    CacheStore {
        /// The directory or bucket.
        name: String,
        /// What went wrong.
        source: store::StoreError,
    },
    /// The shared bucket's eviction cannot be set up (no client for its Lease).
    #[error("storage.s3.eviction: {0}")]
    Eviction(String),
    /// The bucket's settings cannot make a client.
    #[error("storage.s3 ({name}): {source}")]
    Bucket {
        /// The bucket.
        name: String,
        /// What went wrong.
        source: object_store::Error,
    },
    /// A credentials file cannot be read or parsed.
    #[error("credentials file {path} for {registry}: {reason}")]
    Credentials {
        /// The upstream the credentials are for.
        registry: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The access signing key cannot be read or written.
    #[error("access signing key {path}: {source}")]
    SigningKey {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The certificate or key cannot be used.
    #[error("tls: {0}")]
    Tls(String),
    /// The admin token cannot be read or written.
    #[error("admin token {path}: {source}")]
    AdminToken {
        /// The token file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
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
    links: Arc<links::Links>,
    access: access::Access,
    upstreams: HashMap<String, Arc<Upstream>>,
    default: Arc<Upstream>,
    metrics: Metrics,
    prefetch: Vec<ConfiguredImage>,
    prefetch_platforms: Vec<String>,
    /// Images to prefetch on request (`/admin/prefetch`).
    prefetcher: prefetcher::Prefetcher,
    admin_token: String,
    /// The registry API's TLS, when it is served over HTTPS.
    tls: Option<Arc<tls::Tls>>,
    /// The shared bucket's size limit at work, when it has one.
    eviction: Option<Arc<SharedEviction>>,
}

impl Proxy {
    /// Builds the proxy: validates the config, opens (and cleans) the cache directory,
    /// resolves credentials.
    pub async fn build(config: &ProxyConfig) -> Result<Proxy, StartError> {
        config.validate()?;
        // Never an upstream at an address the client never connects to.
        for u in &config.upstreams {
            for url in u.base_urls() {
                let uri = url.parse::<hyper::Uri>().ok();
                if !uri
                    .as_ref()
                    .and_then(|u| u.host())
                    .is_some_and(upstream::allowed_host)
                {
                    return Err(StartError::Config(ConfigError::LinkLocalUrl {
                        registry: u.registry.clone(),
                        url,
                    }));
                }
            }
        }
        let metrics = Metrics::new();
        let cache_dir_error = |source| StartError::CacheDir {
            path: config.cache_dir.clone(),
            source,
        };
        // A bucket's limit is kept by its evictor, not by each replica's index.
        let mut shared = None;
        let (store, name, stats): (Arc<dyn BlobStore>, String, _) = match &config.storage.s3 {
            None => {
                let (disk, stats) = DiskStore::open(&config.cache_dir).map_err(cache_dir_error)?;
                let name = config.cache_dir.display().to_string();
                (Arc::new(disk), name, stats)
            }
            Some(s3) => {
                let bucket =
                    Bucket::s3(s3, metrics.clone()).map_err(|source| StartError::Bucket {
                        name: s3.bucket.clone(),
                        source,
                    })?;
                let spool = config.cache_dir.join("spool");
                let store = S3Store::new(
                    bucket,
                    &s3.bucket,
                    &s3.prefix,
                    &spool,
                    s3.abandon_uploads_after,
                )
                .map_err(cache_dir_error)?;
                let store = if s3.redirect {
                    store.with_redirect()
                } else {
                    store
                };
                let store = if config.max_cache_bytes.is_some() {
                    store.with_access_records()
                } else {
                    store
                };
                let name = store.name().to_string();
                let store = Arc::new(store);
                shared = Some(store.clone());
                (store, name, Default::default())
            }
        };
        let index_limit = config.max_cache_bytes.filter(|_| shared.is_none());
        let index = Index::rebuild(store, index_limit, metrics.clone())
            .await
            .map_err(|source| StartError::CacheStore {
                name: name.clone(),
                source,
            })?;
        tracing::info!(store = %name, shared = index.store().shared(), bytes = index.total(), "cache store open");
        let token_path = config.admin_token_path();
        let admin_token =
            admin::load_or_create_token(&token_path).map_err(|source| StartError::AdminToken {
                path: token_path,
                source,
            })?;
        if stats.removed_partials > 0 {
            tracing::info!(
                removed = stats.removed_partials,
                "removed partial downloads left by an earlier run"
            );
        }
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(
                tls::Tls::new(&t.cert_file, &t.key_file).map_err(StartError::Tls)?,
            )),
            None => None,
        };
        let client = upstream::http_client(config.connect_timeout);
        // Replicas serving HTTPS are asked for blobs over it.
        let peers_client = match (&tls, &config.peers) {
            (Some(t), Some(_)) => Some(upstream::http_client_with(
                t.peer_client_config(),
                config.connect_timeout,
            )),
            _ => None,
        };
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
            metrics.init_upstream(&u.registry.to_ascii_lowercase());
            if u.access_mode() == crate::api::AccessMode::UpstreamAuth {
                metrics.init_access(&u.registry.to_ascii_lowercase());
            }
            let mut up = Upstream::new(
                u,
                credentials,
                client.clone(),
                metrics.clone(),
                (config.upstream_timeout, config.upstream_min_rate()),
            );
            if let Some(c) = &peers_client {
                up = up.with_tls_peers(c.clone());
            }
            let up = Arc::new(up);
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
        let resolve = |image: &String| -> Result<ConfiguredImage, StartError> {
            let r = image_ref::parse(image).map_err(|e| StartError::Config(e.into()))?;
            let upstream = find_upstream(&upstreams, &r.registry).ok_or_else(|| {
                StartError::Config(ConfigError::ImageNotMirrored {
                    list: "pin",
                    image: image.clone(),
                    registry: r.registry.clone(),
                })
            })?;
            Ok(ConfiguredImage {
                upstream,
                repository: r.repository,
                reference: r.reference,
                name: image.clone(),
            })
        };
        let pins: Vec<_> = config.pin.iter().map(resolve).collect::<Result<_, _>>()?;
        let mut prefetch: Vec<_> = config
            .prefetch
            .iter()
            .map(resolve)
            .collect::<Result<_, _>>()?;
        // Pinned images are kept, so they are fetched too.
        for p in &pins {
            if !prefetch.iter().any(|q| q.same_image(p)) {
                prefetch.push(p.clone());
            }
        }
        let pins = pull_through::Pins::new(pins);
        let eviction = match (&shared, config.max_cache_bytes, &config.storage.s3) {
            (Some(bucket), Some(limit), Some(s3)) => {
                metrics.cache_limit_bytes.set(limit as i64);
                let eviction = SharedEviction::new(
                    bucket.clone(),
                    index.clone(),
                    limit,
                    &s3.eviction,
                    pins.clone(),
                    metrics.clone(),
                )
                .await
                .map_err(StartError::Eviction)?;
                Some(Arc::new(eviction))
            }
            _ => None,
        };
        // Kept in a file only where tokens are issued: they must outlive a restart, and
        // every replica must verify the others'.
        let key_path = config.signing_key_path();
        let key_error = |source| StartError::SigningKey {
            path: key_path.clone(),
            source,
        };
        // Replicas verify each other's tokens and requests with it; a key given is read
        // (and checked) whether or not it is needed.
        let shared = upstreams.values().any(|u| u.guarded())
            || config.peers.is_some()
            || config.access.signing_key_file.is_some();
        let signing_key = if shared {
            admin::load_or_create_token(&key_path).map_err(key_error)?
        } else {
            crate::fsutil::random_hex(32).map_err(key_error)?
        };
        let signing_key = shared_key::SharedKey::new(signing_key.into_bytes());
        let access =
            access::Access::new(signing_key.clone(), config.access.clone(), metrics.clone());
        let mut cache = PullThrough::new(index, metrics.clone(), policy, pins.clone());
        if let Some(p) = &config.peers {
            let port = config.listen.port();
            let me = match p.self_address {
                Some(a) => a,
                None => std::env::var("POD_IP")
                    .ok()
                    .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, port))
                    .ok_or(StartError::Config(ConfigError::BadPeers(
                        "selfAddress is not set and POD_IP is not an IP address",
                    )))?,
            };
            let peers = match &p.dns {
                Some(name) => peers::Peers::dns(me, name.clone(), port, signing_key),
                None => peers::Peers::fixed(me, &p.addresses, signing_key),
            };
            tracing::info!(%me, replicas = ?peers.replicas(), dns = ?p.dns, "asking the replica that owns a missing blob for it");
            cache = cache.with_peers(Arc::new(peers));
        }
        let prefetcher = prefetcher::Prefetcher::new(metrics.clone(), config.tag_ttl);
        let cache = Arc::new(cache);
        Ok(Proxy {
            links: links::Links::new(cache.clone(), metrics.clone()),
            cache,
            access,
            upstreams,
            default,
            metrics,
            prefetch,
            prefetch_platforms: config.prefetch_platforms.clone(),
            prefetcher,
            admin_token,
            tls,
            eviction,
        })
    }

    /// Whether an admin request's `Authorization` carries the admin token.
    pub fn admin_authorized(&self, authorization: Option<&str>) -> bool {
        admin::authorized(authorization, &self.admin_token)
    }

    /// The queue of images to prefetch on request.
    pub fn prefetcher(&self) -> &prefetcher::Prefetcher {
        &self.prefetcher
    }

    /// Platforms prefetches fetch of a multi-platform image when a request names none.
    pub fn prefetch_platforms(&self) -> &[String] {
        &self.prefetch_platforms
    }

    /// An image reference (`docker.io/library/alpine:3.20`) resolved to the upstream that
    /// serves it; the error says why not.
    pub fn resolve_image(&self, image: &str) -> Result<ConfiguredImage, String> {
        let r = image_ref::parse(image).map_err(|e| e.to_string())?;
        let upstream = self
            .upstream(&r.registry)
            .ok_or_else(|| format!("{} is not mirrored by this proxy", r.registry))?;
        let repository = upstream.canonical_repository(&r.repository);
        if !upstream.permits(&repository) {
            return Err(format!(
                "{repository} may not be pulled through this mirror"
            ));
        }
        Ok(ConfiguredImage {
            upstream,
            repository,
            reference: r.reference,
            name: image.to_string(),
        })
    }

    /// The upstream serving `registry` (as sent in `?ns=`), if configured.
    pub fn upstream(&self, registry: &str) -> Option<Arc<Upstream>> {
        find_upstream(&self.upstreams, registry)
    }

    /// Whether the registry API is served over HTTPS (the scheme of the token realm).
    pub fn https(&self) -> bool {
        self.tls.is_some()
    }

    /// Who may pull the private repositories of `upstreamAuth` upstreams.
    pub fn access(&self) -> &access::Access {
        &self.access
    }

    /// The upstream for clients that send no `?ns=`.
    pub fn default_upstream(&self) -> Arc<Upstream> {
        self.default.clone()
    }

    /// The pull-through cache the routes call.
    pub fn cache(&self) -> &Arc<PullThrough> {
        &self.cache
    }

    /// Which cached content may be served under which repository.
    pub fn links(&self) -> &Arc<links::Links> {
        &self.links
    }

    /// The registry-API metrics, also served on the operations port.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl crate::server::Ops for Proxy {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// Ready when the store can be used (its directory is there). A full disk does not make the proxy
    /// unready: it still serves what it has and streams the rest through.
    fn readiness(&self) -> Result<(), String> {
        self.cache.store().check().map_err(|e| e.to_string())
    }

    fn degraded(&self) -> Option<String> {
        self.cache.disk_full().then(|| {
            "cache disk full: serving cached objects, streaming the rest through without caching".to_string()
        })
    }
}

/// Fetches the images requested on the operations port, one at a time, as a client's
/// pull would (see [`prefetcher::fetch_image`]).
async fn prefetch_requested(
    proxy: Arc<Proxy>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<prefetcher::Queued>,
) {
    while let Some(q) = queue.recv().await {
        proxy.prefetcher.running(&q);
        let started = tokio::time::Instant::now();
        tracing::info!(image = %q.image.name, "prefetching on request");
        let outcome = match prefetcher::fetch_image(&proxy.links, &q.image, &q.platforms).await {
            Ok(done) => {
                tracing::info!(image = %q.image.name, manifests = done.manifests.len(),
                    blobs = done.blobs, bytes = done.bytes,
                    seconds = started.elapsed().as_secs_f64(), "prefetched on request");
                let digests = done.manifests.iter().map(|m| m.digest.clone()).collect();
                Ok((digests, done.blobs, done.bytes))
            }
            Err(e) => {
                tracing::warn!(image = %q.image.name, error = %e, "prefetch on request failed");
                Err(e.to_string())
            }
        };
        proxy.prefetcher.finished(&q, outcome);
    }
}

fn find_upstream(
    upstreams: &HashMap<String, Arc<Upstream>>,
    registry: &str,
) -> Option<Arc<Upstream>> {
    let key = registry.to_ascii_lowercase();
    if let Some(u) = upstreams.get(&key) {
        return Some(u.clone());
    }
    if docker_hub::is_alias(&key) {
        return upstreams
            .iter()
            .find(|(name, _)| docker_hub::is_alias(name))
            .map(|(_, u)| u.clone());
    }
    None
}

/// File descriptors the proxy keeps for itself beside its client connections:
/// upstream connections, downloads, the index, the operations port's clients.
const FD_RESERVE: u64 = 128;

/// Raises the soft limit on open files to the hard one, and returns how many client
/// connections fit under it: each may hold a socket and a cache file open.
fn connection_budget() -> Option<usize> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum || limit.maximum.is_none() {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "could not raise the open-file limit");
        }
    }
    let files = getrlimit(Resource::Nofile).current?;
    Some((files.saturating_sub(FD_RESERVE) / 2).max(8) as usize)
}

/// Binds the configured addresses and serves until `shutdown` completes. The open-file
/// limit is raised as far as allowed first, and `maxConnections` kept under it.
pub async fn run(
    mut config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    if let Some(budget) = connection_budget()
        && budget < config.max_connections
    {
        tracing::warn!(
            configured = config.max_connections,
            allowed = budget,
            "the open-file limit allows fewer client connections than maxConnections"
        );
        config.max_connections = budget;
    }
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
    let proxy = Arc::new(Proxy::build(&config).await?);
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
    let limits = ConnLimits {
        max_connections: config.max_connections,
        header_timeout: config.client_header_timeout,
        idle_timeout: config.client_idle_timeout,
    };
    let handler = move |req, peer| http::handle(p1.clone(), req, peer);
    let api_task = match proxy.tls.clone() {
        Some(tls) => tokio::spawn(crate::server::accept_loop(
            api,
            stop_rx.clone(),
            tracker.clone(),
            limits,
            tls,
            handler,
            None,
        )),
        None => {
            let zero_copy = Arc::new(zero_copy::ZeroCopy {
                sent: proxy.metrics.sendfile_bytes.clone(),
            });
            tokio::spawn(crate::server::accept_loop(
                api,
                stop_rx.clone(),
                tracker.clone(),
                limits,
                zero_copy,
                handler,
                None,
            ))
        }
    };
    let p2 = proxy.clone();
    let ops_loop = crate::server::accept_loop(
        ops,
        stop_rx,
        tracker.clone(),
        ConnLimits::OPS,
        Arc::new(crate::server::Plain),
        move |req, peer| http::handle_ops(p2.clone(), req, peer),
        Some(proxy.clone() as Arc<dyn crate::server::Ops>),
    );
    let ops_task = tokio::spawn(ops_loop);
    // Pins are known once prefetched: only then may a lowered limit evict.
    let p = proxy.clone();
    let startup = tokio::spawn(async move {
        if !p.prefetch.is_empty() {
            prefetcher::prefetch_all(&p.links, &p.prefetch, &p.prefetch_platforms).await;
        }
        p.cache.enforce_limit().await;
    });
    // The disk-full gauge goes back to 0 once space is back, with or without requests.
    let p = proxy.clone();
    let disk_watch = tokio::spawn(async move {
        let mut tick = tokio::time::interval(pull_through::DISK_FULL_RETRY);
        loop {
            tick.tick().await;
            p.cache.recheck_disk();
        }
    });
    let eviction = proxy.eviction.clone().map(|e| tokio::spawn(e.run()));
    let requested = proxy
        .prefetcher
        .take_queue()
        .map(|queue| tokio::spawn(prefetch_requested(proxy.clone(), queue)));
    shutdown.await;
    if let Some(task) = requested {
        task.abort();
    }
    startup.abort();
    disk_watch.abort();
    if let Some(task) = eviction {
        task.abort();
        let _ = task.await;
    }
    if let Some(e) = &proxy.eviction {
        e.release().await;
    }
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

//! Serving: the registry API and the operations port on their listeners, the prefetch of
//! `prefetch` and `pin` at start and of the images requested on the operations port, the
//! disk's recheck and a shared bucket's evictor, until shutdown.

use super::build::StartError;
use super::http;
use super::prefetcher;
use super::pull_through;
use super::state::Proxy;
use super::zero_copy;
use crate::api::ProxyConfig;
use crate::server::ConnLimits;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

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
        let outcome =
            match prefetcher::fetch_image(proxy.registry.links(), &q.image, &q.platforms).await {
                Ok(done) => {
                    tracing::info!(image = %q.image.name, manifests = done.manifests.len(),
                    blobs = done.blobs, bytes = done.bytes,
                    seconds = started.elapsed().as_secs_f64(), "prefetched on request");
                    let digests = done.manifests.iter().map(|m| m.digest.clone()).collect();
                    Ok((digests, done.blobs, done.bytes))
                }
                Err(e) => {
                    tracing::warn!(image = %q.image.name, error = %e, "prefetch on request failed");
                    Err(e)
                }
            };
        proxy.prefetcher.finished(&q, outcome);
    }
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
        && budget < config.max_connections.get()
    {
        tracing::warn!(
            configured = config.max_connections,
            allowed = budget,
            "the open-file limit allows fewer client connections than maxConnections"
        );
        // At least 8 (see `connection_budget`).
        config.max_connections = budget.try_into().unwrap_or(config.max_connections);
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
        default_upstream = proxy.registry.upstreams().default_upstream().name(),
        "pullthrough proxy serving"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let api_task = tokio::spawn(serve_api(&proxy, &config, api, stop_rx.clone(), &tracker));
    let p2 = proxy.clone();
    let ops_loop = crate::server::accept_loop(
        ops,
        stop_rx,
        tracker.clone(),
        ConnLimits::OPS,
        Arc::new(crate::server::Plain),
        move |req, _client| http::ops::handle(p2.clone(), req),
        Some(proxy.clone() as Arc<dyn crate::server::Ops>),
    );
    let ops_task = tokio::spawn(ops_loop);
    let background = Background::start(&proxy);
    shutdown.await;
    background.stop(&proxy).await;
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

/// The registry API's accept loop: over TLS, or in plain HTTP with `sendfile(2)` for
/// cached blobs (see [`zero_copy`]).
fn serve_api(
    proxy: &Arc<Proxy>,
    config: &ProxyConfig,
    api: TcpListener,
    stop: watch::Receiver<bool>,
    tracker: &TaskTracker,
) -> impl Future<Output = ()> + Send + 'static {
    let (registry, https) = (proxy.registry.clone(), proxy.https());
    let limits = ConnLimits {
        max_connections: config.max_connections.get(),
        header_timeout: config.client_header_timeout,
        idle_timeout: config.client_idle_timeout,
    };
    let handler = move |req, client| http::handle(registry.clone(), https, req, client);
    let tracker = tracker.clone();
    let tls = proxy.tls.clone();
    let sent = proxy.metrics.sendfile_bytes.clone();
    async move {
        match tls {
            Some(tls) => {
                crate::server::accept_loop(api, stop, tracker, limits, tls, handler, None).await
            }
            None => {
                let zero_copy = Arc::new(zero_copy::ZeroCopy { sent });
                crate::server::accept_loop(api, stop, tracker, limits, zero_copy, handler, None)
                    .await
            }
        }
    }
}

/// What the proxy does besides answering requests, for as long as it serves.
struct Background {
    /// Prefetch at start, then eviction down to a lowered limit.
    startup: JoinHandle<()>,
    /// The disk-full state cleared once space is back.
    disk_watch: JoinHandle<()>,
    /// A shared bucket's evictor.
    eviction: Option<JoinHandle<()>>,
    /// Prefetches asked for on the admin endpoint.
    requested: Option<JoinHandle<()>>,
}

impl Background {
    fn start(proxy: &Arc<Proxy>) -> Background {
        // Pins are known once prefetched: only then may a lowered limit evict.
        let p = proxy.clone();
        let startup = tokio::spawn(async move {
            if !p.prefetch.is_empty() {
                prefetcher::prefetch_all(p.registry.links(), &p.prefetch, &p.prefetch_platforms)
                    .await;
            }
            p.cache().enforce_limit().await;
        });
        // The disk-full gauge goes back to 0 once space is back, with or without requests.
        let p = proxy.clone();
        let disk_watch = tokio::spawn(async move {
            let mut tick = tokio::time::interval(pull_through::DISK_FULL_RETRY);
            loop {
                tick.tick().await;
                p.cache().recheck_disk();
            }
        });
        Background {
            startup,
            disk_watch,
            eviction: proxy.eviction.clone().map(|e| tokio::spawn(e.run())),
            requested: proxy
                .prefetcher
                .take_queue()
                .map(|queue| tokio::spawn(prefetch_requested(proxy.clone(), queue))),
        }
    }

    /// Stops it all; a shared bucket's evictor lets its Lease go.
    async fn stop(self, proxy: &Proxy) {
        if let Some(task) = self.requested {
            task.abort();
        }
        self.startup.abort();
        self.disk_watch.abort();
        if let Some(task) = self.eviction {
            task.abort();
            let _ = task.await;
        }
        if let Some(e) = &proxy.eviction {
            e.release().await;
        }
    }
}

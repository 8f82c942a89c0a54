//! The proxy as it runs: its request layer, the images it prefetches, its admin token,
//! its TLS and a shared bucket's evictor; what the operations port says of it.

use super::admin;
use super::metrics::Metrics;
use super::prefetcher::Prefetcher;
use super::pull_through::{ConfiguredImage, PullThrough};
use super::registry::Registry;
use super::shared_eviction::SharedEviction;
use super::tls::Tls;
use std::sync::Arc;

/// A running proxy's shared state (made by [`Proxy::build`]).
pub struct Proxy {
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Metrics,
    /// Images of `prefetch` and `pin`, fetched at start.
    pub(super) prefetch: Vec<ConfiguredImage>,
    pub(super) prefetch_platforms: Vec<String>,
    /// Images to prefetch on request (`/admin/prefetch`).
    pub(super) prefetcher: Arc<Prefetcher>,
    pub(super) admin_token: String,
    /// The registry API's TLS, when it is served over HTTPS.
    pub(super) tls: Option<Arc<Tls>>,
    /// The shared bucket's size limit at work, when it has one.
    pub(super) eviction: Option<Arc<SharedEviction>>,
}

impl Proxy {
    /// The request layer the registry API calls.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The pull-through cache.
    pub fn cache(&self) -> &Arc<PullThrough> {
        self.registry.links().cache()
    }

    /// Whether an admin request's `Authorization` carries the admin token.
    pub fn admin_authorized(&self, authorization: Option<&str>) -> bool {
        admin::authorized(authorization, &self.admin_token)
    }

    /// The queue of images to prefetch on request.
    pub fn prefetcher(&self) -> &Prefetcher {
        &self.prefetcher
    }

    /// Platforms prefetches fetch of a multi-platform image when a request names none.
    pub fn prefetch_platforms(&self) -> &[String] {
        &self.prefetch_platforms
    }

    /// Whether the registry API is served over HTTPS (the scheme of the token realm).
    pub fn https(&self) -> bool {
        self.tls.is_some()
    }
}

impl crate::server::Ops for Proxy {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// Ready when the store can be used (its directory is there). A full disk does not
    /// make the proxy unready: it still serves what it has and streams the rest through.
    fn readiness(&self) -> Result<(), String> {
        self.cache().store().check().map_err(|e| e.to_string())
    }

    fn degraded(&self) -> Option<String> {
        self.cache().disk_full().then(|| {
            "cache disk full: serving cached objects, streaming the rest through without caching"
                .to_string()
        })
    }
}

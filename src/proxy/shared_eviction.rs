//! A shared bucket's size limit at work: every replica writes what it uses to access
//! records (every `recordEvery`); one replica, elected on a Kubernetes Lease (or this
//! process alone, without one), runs the bucket's [`Evictor`] every `every`.

use super::index::Index;
use super::metrics::Metrics;
use super::pull_through::ConfiguredImage;
use super::store::BlobStore;
use super::store::s3::{EvictionRules, Evictor, S3Store};
use crate::api::proxy_config::EvictionConfig;
use crate::lease::LeaseLock;
use k8s_openapi::api::coordination::v1::Lease;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::MissedTickBehavior;

/// How long the evicting replica's Lease lasts per renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// How often a replica that does not evict tries to take the Lease.
const LEASE_RETRY: Duration = Duration::from_secs(5);

/// The recording and the evicting of one replica.
pub struct SharedEviction {
    store: Arc<S3Store>,
    index: Arc<Index>,
    config: EvictionConfig,
    rules: EvictionRules,
    pins: Vec<ConfiguredImage>,
    metrics: Metrics,
    lock: Option<LeaseLock>,
}

/// The name this replica holds the Lease under: the pod's, or the host's and the
/// process's.
fn identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

impl SharedEviction {
    /// The eviction of `store` down to `limit`, as `config` says; with a Lease, the
    /// client to the API server is made here (as kubectl finds it).
    pub async fn new(
        store: Arc<S3Store>,
        index: Arc<Index>,
        limit: u64,
        config: &EvictionConfig,
        pins: Vec<ConfiguredImage>,
        metrics: Metrics,
    ) -> Result<SharedEviction, String> {
        let lock = match &config.lease {
            None => None,
            Some(name) => {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| format!("no client for the eviction Lease: {e}"))?;
                let ns = config
                    .lease_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .filter(|ns| !ns.is_empty())
                    .unwrap_or_else(|| client.default_namespace().to_string());
                let api = kube::Api::<Lease>::namespaced(client, &ns);
                Some(LeaseLock::new(api, name, &identity(), LEASE_DURATION))
            }
        };
        Ok(SharedEviction {
            store,
            index,
            config: config.clone(),
            rules: EvictionRules {
                limit,
                grace: config.grace,
            },
            pins,
            metrics,
            lock,
        })
    }

    /// Records and (when elected) evicts, until dropped.
    pub async fn run(self: Arc<Self>) {
        let recorder = {
            let this = self.clone();
            async move {
                let mut tick = tokio::time::interval(this.config.record_every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = this.store.record_uses(this.index.in_use()).await {
                        tracing::warn!(error = %e, "could not write an access record; its uses go into the next");
                    }
                }
            }
        };
        tokio::join!(recorder, self.evict());
    }

    async fn evict(&self) {
        let mut evictor = Evictor::new(
            self.store.clone(),
            self.rules.clone(),
            self.pins.clone(),
            self.metrics.clone(),
        );
        loop {
            if let Some(lock) = &self.lock {
                lock.acquire(LEASE_RETRY).await;
            }
            tracing::info!(store = %self.store.name(), limit = self.rules.limit, "this replica keeps the bucket under maxCacheBytes");
            self.metrics.store_evictor.set(1);
            let rounds = async {
                let mut tick = tokio::time::interval(self.config.every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match evictor.round().await {
                        Ok(r) => tracing::debug!(
                            bytes = r.bytes,
                            deleted = r.deleted.len(),
                            marked = r.marked,
                            "eviction round"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "eviction round failed; trying again at the next")
                        }
                    }
                }
            };
            match &self.lock {
                Some(lock) => {
                    tokio::select! {
                        _ = lock.hold() => {}
                        _ = rounds => {}
                    }
                }
                None => rounds.await,
            }
            self.metrics.store_evictor.set(0);
            self.metrics.store_bucket_bytes.set(0);
            evictor.reset();
        }
    }

    /// Gives the Lease up (at shutdown), so that another replica evicts at once.
    pub async fn release(&self) {
        if let Some(lock) = &self.lock {
            lock.release().await;
        }
    }
}

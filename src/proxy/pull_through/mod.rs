//! The pull-through cache: answers manifest, blob, tags and referrers requests from the
//! cache or the upstream, and fills the cache on the way.
//!
//! Blobs: one download per missing digest, shared by every request for it. The download
//! runs on its own task, writes to the store and hashes as it goes; every client (the
//! first included) reads what was written as it grows, so a slow client never slows the
//! download and memory stays bounded whatever the blob size. The last byte is withheld
//! until the digest is verified: a client can never receive a complete body that does not
//! match. The write is committed into the cache only when the digest matches.
//!
//! Manifests: cached by digest forever. A tag maps to a digest for `tag_ttl`, then is
//! revalidated with a HEAD; when the upstream is down the last digest is served for up to
//! `stale_if_error` more. Concurrent misses for one manifest share one upstream request.
//!
//! The rooms: [`manifests`] (tags, freshness, coalesced fetches), [`blobs`] (downloads,
//! relays, HEADs), [`live_reader`] (a client reading a download in progress), [`prefetch`]
//! (eviction at start, dropping images), [`lists`] (tags/list, referrers),
//! [`read_back`] (cached blobs read back, checked where this process has not yet),
//! [`range`] (`Range` requests) and [`single_flight`] (one fetch per key). This module
//! holds the cache itself and what they share: the policy, space and reservations, pins.
//! Bytes are kept by a [`BlobStore`] reached through the [`Index`], never by path.

mod blobs;
mod lists;
mod live_reader;
mod manifests;
mod prefetch;
mod range;
mod read_back;
pub mod single_flight;

pub use blobs::BlobAsk;
use blobs::*;
use lists::*;
use live_reader::*;
use manifests::*;
pub use manifests::{Freshness, freshness};
pub use range::ByteRange;

use crate::oci::{Digest, Reference};
use crate::proxy::error::ProxyError;
use crate::proxy::index::{Index, NoRoom, Reservation};
use crate::proxy::metrics::{CacheResult, Metrics};
use crate::proxy::peers::Peers;
use crate::proxy::store::{BlobStore, CHUNK};
use crate::proxy::upstream::Upstream;
pub use crate::proxy::upstream::{Referrers, TagsPage};
use bytes::Bytes;
use futures::stream::BoxStream;
use single_flight::{SingleFlight, Waiting};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Limits and timings of the cache.
#[derive(Clone, Debug)]
pub struct CachePolicy {
    /// How long a tag is trusted without asking upstream.
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` a tag may be served while the upstream fails.
    pub stale_if_error: Duration,
    /// How long a tags/list answer is reused.
    pub tags_list_ttl: Duration,
    /// Largest manifest accepted.
    pub max_manifest_bytes: u64,
}

/// A manifest as served.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Its digest (verified).
    pub digest: Digest,
    /// Its media type, from the upstream (or from the document itself).
    pub media_type: String,
    /// Its bytes.
    pub body: Bytes,
}

/// An image the configuration names (to pin or to prefetch), resolved to its upstream.
#[derive(Clone)]
pub struct ConfiguredImage {
    /// The upstream that serves it.
    pub upstream: Arc<Upstream>,
    /// Its canonical repository.
    pub repository: String,
    /// Its tag or digest.
    pub reference: Reference,
    /// As the configuration wrote it, for the logs.
    pub name: String,
}

impl ConfiguredImage {
    /// Whether both name the same image (however each was written).
    pub fn same_image(&self, other: &ConfiguredImage) -> bool {
        self.upstream.name() == other.upstream.name()
            && self.repository == other.repository
            && self.reference == other.reference
    }
}

/// The images eviction keeps, with everything they reference: the configured pins, and
/// the images in use that the controller names (`PUT /admin/in-use`, the images of the
/// workloads that run).
#[derive(Clone, Default)]
pub struct Pins {
    configured: Arc<Vec<ConfiguredImage>>,
    in_use: Arc<std::sync::RwLock<Vec<ConfiguredImage>>>,
}

impl Pins {
    /// The configured pins, and none in use yet.
    pub fn new(configured: Vec<ConfiguredImage>) -> Pins {
        Pins {
            configured: Arc::new(configured),
            in_use: Arc::default(),
        }
    }

    /// Every pinned image now.
    pub fn all(&self) -> Vec<ConfiguredImage> {
        let mut all = (*self.configured).clone();
        all.extend(self.in_use());
        all
    }

    /// The images in use, as last named.
    pub fn in_use(&self) -> Vec<ConfiguredImage> {
        self.in_use.read().expect("pins lock").clone()
    }

    /// Replaces the images in use.
    pub fn set_in_use(&self, images: Vec<ConfiguredImage>) {
        *self.in_use.write().expect("pins lock") = images;
    }
}

/// What a blob request is answered with.
pub struct BlobAnswer {
    /// Full size of the blob, when known (it is unless a miss is streamed chunked).
    pub len: Option<u64>,
    /// Byte range served, inclusive, when the request had a satisfiable `Range`.
    pub range: Option<(u64, u64)>,
    /// Body (absent for HEAD).
    pub body: Option<BoxStream<'static, io::Result<Bytes>>>,
    /// How it was answered.
    pub result: CacheResult,
    /// Where the client is sent for the bytes instead (a presigned URL of the bucket).
    pub redirect: Option<String>,
}

/// How long the cache stays in stream-through mode after the disk filled up before it
/// tries writing again.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(2);

/// Free space kept beyond a download's size before it is written to disk.
const DISK_MARGIN: u64 = 16 << 20;

/// The cache and its in-flight fetches.
pub struct PullThrough {
    index: Arc<Index>,
    metrics: Metrics,
    policy: CachePolicy,
    pins: Pins,
    disk_full_until: Mutex<Option<Instant>>,
    blobs: Mutex<HashMap<Digest, Arc<BlobFetch>>>,
    manifests: SingleFlight<String, ManifestResult>,
    /// HEADs of blobs that are not cached, one upstream HEAD per repository and digest
    /// at a time.
    heads: SingleFlight<(String, Digest), Result<Option<u64>, ProxyError>>,
    tags: Mutex<HashMap<String, TagState>>,
    tag_lists: TagLists,
    /// The replicas that share the store, when there are any (see [`Peers`]).
    peers: Option<Arc<Peers>>,
}

impl PullThrough {
    /// A cache over `index` and its store, never evicting what `pins` resolve to.
    pub fn new(
        index: Arc<Index>,
        metrics: Metrics,
        policy: CachePolicy,
        pins: Pins,
    ) -> PullThrough {
        PullThrough {
            index,
            manifests: SingleFlight::new(metrics.fetch_waiters.clone()),
            heads: SingleFlight::new(metrics.fetch_waiters.clone()),
            metrics,
            policy,
            pins,
            disk_full_until: Mutex::new(None),
            blobs: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            tag_lists: TagLists::default(),
            peers: None,
        }
    }

    /// The same cache, asking the replica that owns a missing blob for it (see
    /// [`Peers`]) instead of the upstream.
    pub fn with_peers(mut self, peers: Arc<Peers>) -> PullThrough {
        self.peers = Some(peers);
        self
    }

    /// The replicas that share the store with this one, if there are any.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        self.index.store()
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What is cached (sizes, references, objects in use).
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Whether the cache is in stream-through mode because its disk filled up.
    pub fn disk_full(&self) -> bool {
        self.disk_full_until
            .lock()
            .expect("disk state lock")
            .is_some_and(|until| Instant::now() < until)
    }

    fn mark_disk_full(&self, why: &str) {
        let mut until = self.disk_full_until.lock().expect("disk state lock");
        if until.is_none() {
            tracing::warn!(
                reason = why,
                "cache disk is full: streaming blobs through without caching"
            );
        }
        *until = Some(Instant::now() + DISK_FULL_RETRY);
        self.metrics.cache_disk_full.set(1);
    }

    fn mark_disk_ok(&self) {
        let mut until = self.disk_full_until.lock().expect("disk state lock");
        if until.take().is_some() {
            tracing::info!("cache disk has room again: caching resumed");
            self.metrics.cache_disk_full.set(0);
        }
    }

    /// Drops a cached object found unusable (see [`Index::discard`]). It runs on its own
    /// task, so that the index and the store agree even if the caller goes away.
    async fn discard(&self, digest: &Digest) {
        let (index, d) = (self.index.clone(), digest.clone());
        let _ = tokio::spawn(async move { index.discard(&d).await }).await;
    }

    /// The images eviction keeps.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Digests that must never be evicted: the closure of the pinned images.
    pub fn pinned(&self) -> std::collections::HashSet<Digest> {
        let roots: Vec<Digest> = self
            .pins
            .all()
            .iter()
            .filter_map(|pin| match &pin.reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(t) => self
                    .tags
                    .lock()
                    .expect("tag map lock")
                    .get(&tag_key(&pin.upstream, &pin.repository, t))
                    .map(|st| st.digest.clone()),
            })
            .collect();
        self.index.closure(roots)
    }

    /// Sets space aside for an object, evicting as needed. `None` when it must not be
    /// cached: no room under the limit, not enough free space beside the downloads in
    /// progress (this object alone is streamed through), or the disk is full.
    async fn reserve(self: &Arc<Self>, size: u64) -> Option<Reservation> {
        if self.disk_full() {
            return None;
        }
        // Whatever the size limit says, the store has the last word.
        let free = self.store().free_space();
        if free.is_some_and(|free| free < DISK_MARGIN) {
            self.mark_disk_full("less than the margin free on the cache volume");
            return None;
        }
        // On its own task: what it evicts is removed even if the caller goes away.
        let this = self.clone();
        let reservation = tokio::spawn(async move {
            let pinned = this.pinned();
            let room = free.map(|free| free - DISK_MARGIN);
            this.index.reserve(size, &pinned, room).await
        })
        .await
        .expect("reserve task");
        match reservation {
            Ok(r) => {
                self.mark_disk_ok();
                Some(r)
            }
            Err(NoRoom::Limit) => {
                tracing::warn!(
                    bytes = size,
                    "no room in the cache (pinned or in use): not caching this object"
                );
                None
            }
            Err(NoRoom::Disk) => {
                tracing::info!(
                    bytes = size,
                    free,
                    "not enough free space for this object beside the downloads in progress: \
                     streaming it through"
                );
                None
            }
        }
    }

    /// Clears the disk-full state once its back-off is over and the volume has room
    /// again, also when no request comes to notice (the gauge must not stay at 1).
    pub fn recheck_disk(&self) {
        let due = self
            .disk_full_until
            .lock()
            .expect("disk state lock")
            .is_some_and(|until| Instant::now() >= until);
        if due
            && self
                .store()
                .free_space()
                .is_none_or(|free| free >= DISK_MARGIN)
        {
            self.mark_disk_ok();
        }
    }
}

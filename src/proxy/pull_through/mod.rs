//! The pull-through cache: answers manifest, blob, tags and referrers requests from the
//! cache or the upstream, and fills the cache on the way. [`PullThrough`] is its front;
//! each concern owns its state:
//!
//! - [`space`]: the room the cache has (reservations, eviction as the size limit says,
//!   pins, a full disk), images dropped on purpose;
//! - [`tags`]: where each tag points and since when, in memory and as store records;
//! - [`manifests`]: manifests by digest, tags fresh or revalidated with a HEAD or served
//!   stale while the upstream fails, one upstream fetch per manifest at a time;
//! - [`blobs`]: one download per missing digest, shared by every request for it, streamed
//!   to every client as it is written ([`live_reader`]), its last byte held until the
//!   digest matches; relays of what cannot be cached ([`relay`]); blobs read back and
//!   checked where this process has not checked them ([`read_back`]);
//! - [`lists`]: tags/list (a short-lived cache bounded in bytes) and referrers;
//! - [`range`] (`Range` requests) and [`single_flight`] (one fetch per key).
//!
//! Bytes are kept by a [`crate::proxy::store::BlobStore`] reached through the
//! [`Index`], never by path.

mod blobs;
mod download;
#[cfg(test)]
mod download_tests;
mod fetch;
mod lists;
mod live_reader;
mod manifests;
mod range;
mod read_back;
mod relay;
pub mod single_flight;
mod space;
mod tags;

pub use blobs::BlobAsk;
pub use manifests::{Freshness, freshness};
pub use range::ByteRange;
pub use space::DISK_FULL_RETRY;
pub use tags::TagState;

use crate::oci::{Digest, Reference};
use crate::proxy::error::ProxyError;
use crate::proxy::index::{Index, Removal};
use crate::proxy::metrics::{CacheResult, Metrics};
use crate::proxy::peers::Peers;
use crate::proxy::store::{BlobStore, StoreError};
use crate::proxy::upstream::Upstream;
pub use crate::proxy::upstream::{Referrers, TagsPage};
use blobs::Blobs;
use bytes::Bytes;
use futures::stream::BoxStream;
use lists::Lists;
use manifests::Manifests;
use space::Space;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tags::Tags;

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
    /// The download started for this request was asked of the replica that owns the
    /// blob, not the upstream (see [`crate::proxy::metrics::ByteSource`]).
    pub via_owner: bool,
}

impl BlobAnswer {
    /// How many bytes the answer sends (or redirects for): its range, or all of it.
    pub fn sent_len(&self) -> Option<u64> {
        match self.range {
            Some((first, last)) => Some(last + 1 - first),
            None => self.len,
        }
    }
}

/// The cache: its parts, each with its own state.
pub struct PullThrough {
    space: Arc<Space>,
    manifests: Arc<Manifests>,
    blobs: Arc<Blobs>,
    lists: Lists,
    metrics: Metrics,
}

impl PullThrough {
    /// A cache over `index` and its store, never evicting what `pins` resolve to, asking
    /// the replica that owns a missing blob for it when there are `peers`.
    pub fn new(
        index: Arc<Index>,
        metrics: Metrics,
        policy: CachePolicy,
        pins: Pins,
        peers: Option<Arc<Peers>>,
    ) -> PullThrough {
        let tags = Arc::new(Tags::new(index.store().clone()));
        let space = Arc::new(Space::new(index, metrics.clone(), pins, tags.clone()));
        let waiters = metrics.fetch_waiters.clone();
        PullThrough {
            manifests: Arc::new(Manifests::new(space.clone(), tags, policy.clone(), waiters)),
            blobs: Arc::new(Blobs::new(space.clone(), metrics.clone(), peers)),
            lists: Lists::new(policy.tags_list_ttl),
            space,
            metrics,
        }
    }

    /// A manifest by tag or digest, of a media type `accept` allows (see
    /// [`manifests`]). `unlinked`: the digest asked for is not linked to the repository
    /// (see [`crate::proxy::links`]), and the cache's copy is [`ProxyError::NotLinked`].
    pub async fn manifest(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
        accept: &crate::oci::media::Accept,
        unlinked: bool,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        self.manifests
            .manifest(up, repository, reference, accept, unlinked)
            .await
    }

    /// A blob (body or HEAD), from the cache, a running download, or a new one (see
    /// [`blobs`]).
    pub async fn blob(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        ask: BlobAsk<'_>,
    ) -> Result<BlobAnswer, ProxyError> {
        self.blobs.blob(up, repository, digest, ask).await
    }

    /// Waits until a running download of `digest`, if there is one, has stored the blob.
    pub async fn stored(&self, digest: &Digest) -> Result<(), ProxyError> {
        self.blobs.stored(digest).await
    }

    /// `tags/list`, reused for `tags_list_ttl` (see [`lists`]).
    pub async fn tags_list(
        &self,
        up: &Upstream,
        repository: &str,
        query: Option<&str>,
    ) -> Result<TagsPage, ProxyError> {
        self.lists.tags_list(up, repository, query).await
    }

    /// `referrers/<digest>`, passed through.
    pub async fn referrers(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        query: Option<&str>,
    ) -> Result<Referrers, ProxyError> {
        self.lists.referrers(up, repository, digest, query).await
    }

    /// The replicas that share the store with this one, if there are any.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.blobs.peers()
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        self.space.store()
    }

    /// What is cached (sizes, references, objects in use).
    pub fn index(&self) -> &Arc<Index> {
        self.space.index()
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The images eviction keeps.
    pub fn pins(&self) -> &Pins {
        self.space.pins()
    }

    /// Whether the cache is in stream-through mode because its disk filled up.
    pub fn disk_full(&self) -> bool {
        self.space.disk_full()
    }

    /// Clears the disk-full state once the volume has room again.
    pub fn recheck_disk(&self) {
        self.space.recheck_disk()
    }

    /// Evicts down to the size limit (after a restart with a lower limit), keeping pins.
    pub async fn enforce_limit(&self) {
        self.space.enforce_limit().await
    }

    /// Where a tag pointed when the cache last knew (memory, or its record), without
    /// asking the upstream.
    pub async fn cached_tag(&self, up: &Upstream, repository: &str, tag: &str) -> Option<Digest> {
        self.space.cached_tag(up, repository, tag).await
    }

    /// Whether the cache holds `digest` whole: in its index, or (a shared bucket, which
    /// other replicas fill) in its store.
    pub async fn holds(&self, digest: &Digest) -> bool {
        let store = self.space.store();
        self.space.index().contains(digest)
            || (store.shared() && matches!(store.open(digest).await, Ok(Some(_))))
    }

    /// Forgets where a tag points, keeping what it pointed to (see
    /// [`Space::forget_tag`]).
    pub async fn forget_tag(&self, up: &Upstream, repository: &str, tag: &str) -> Option<Digest> {
        self.space.forget_tag(up, repository, tag).await
    }

    /// Drops a repository's tags and the images they and `by_digest` name (see
    /// [`Space::drop_repository`]).
    pub async fn drop_repository(
        &self,
        up: &Upstream,
        repository: &str,
        by_digest: Vec<Digest>,
    ) -> Result<(Vec<String>, Removal), StoreError> {
        self.space.drop_repository(up, repository, by_digest).await
    }

    /// Drops an image (tag or digest) from the cache on purpose: the tag record, the
    /// manifests, and the blobs no other cached manifest or pin needs.
    pub async fn drop_image(
        &self,
        up: &Upstream,
        repository: &str,
        reference: &Reference,
    ) -> Removal {
        self.space.drop_image(up, repository, reference).await
    }
}

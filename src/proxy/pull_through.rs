//! The pull-through cache: answers manifest, blob, tags and referrers requests from the
//! cache or the upstream, and fills the cache on the way.
//!
//! Blobs: one download per missing digest, shared by every request for it. The download
//! runs on its own task, writes to a temp file and hashes as it goes; every client (the
//! first included) reads that file as it grows, so a slow client never slows the download
//! and memory stays bounded whatever the blob size. The last byte is withheld until the
//! digest is verified: a client can never receive a complete body that does not match.
//! The file is renamed into the cache only when the digest matches.
//!
//! Manifests: cached by digest forever. A tag maps to a digest for `tag_ttl`, then is
//! revalidated with a HEAD; when the upstream is down the last digest is served for up to
//! `stale_if_error` more. Concurrent misses for one manifest share one upstream request.

use super::error::ProxyError;
use super::index::{Index, NoRoom, Reservation};
use super::metrics::{CacheResult, Kind, Metrics};
use super::single_flight::{SingleFlight, Waiting};
use super::storage::{Storage, TagRecord, unix_now_ms};
use super::tag_lists::{self, TagLists, TagsPage};
use super::upstream::{Upstream, read_limited};
use crate::oci::media::{Accept, MANIFEST_ACCEPT, manifest_media_type};
use crate::oci::{Digest, Hasher, Reference};
use crate::proxy::zero_copy::{MAX_SPAN, Spans};
use bytes::{Bytes, BytesMut};
use futures::future::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode};
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;

/// Size of disk reads and writes.
const CHUNK: usize = 256 * 1024;
/// Size of the reads of a cached blob served with one of the [`LARGE_READERS`] slots.
/// Fewer, larger reads and socket writes cost less CPU per byte: about 10% less server
/// CPU and 4-7% more warm throughput than 256 KiB reads here (docs/benchmarks.md), for up
/// to 3 MiB of chunk buffers per connection instead of 768 KiB (see [`RECYCLED`]).
const LARGE_CHUNK: usize = 1 << 20;
/// How many connections at once may serve a cached blob in [`LARGE_CHUNK`] reads; the
/// others read [`CHUNK`]s. This bounds what the larger reads add to memory (at most
/// 4 x 3 MiB of buffers), however many clients pull at once. Four slots cover one node
/// pulling an image: containerd downloads three layers at a time by default.
const LARGE_READERS: usize = 4;
/// A [`ChunkReader`] lets its task's worker thread run other tasks after handing out
/// this many bytes from the page cache: read without waiting, or as file ranges for
/// `sendfile(2)` (see [`crate::proxy::zero_copy`]). Those reads and sends to a fast
/// socket are always ready, so without it a connection sending a blob keeps its worker
/// until tokio's budget of 128 socket writes runs out (128 MiB at [`LARGE_CHUNK`]s):
/// meanwhile the requests queued behind it wait, and an idle worker cannot take one of
/// two busy connections over. Two clients at once fetched a cached blob 30-44% faster
/// with it here (docs/proxy.md).
const YIELD_EVERY: u64 = 1 << 20;
/// Largest tags/list or referrers answer passed through.
const MAX_LIST_BYTES: usize = 4 << 20;

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
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub body: Bytes,
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
}

/// A `Range: bytes=...` request, not yet resolved against a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `start-` or `start-end` (inclusive).
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: Option<u64>,
    },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a single-range `Range` header. `None` for headers the proxy ignores (not
    /// bytes, multiple ranges): the full body is served then, as HTTP allows.
    pub fn parse(header: &str) -> Option<Result<ByteRange, ()>> {
        let spec = header.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        let num = |s: &str| s.parse::<u64>().map_err(|_| ());
        Some(if a.is_empty() {
            num(b).map(ByteRange::Suffix)
        } else {
            match (num(a), b.is_empty()) {
                (Ok(start), true) => Ok(ByteRange::From { start, end: None }),
                (Ok(start), false) => num(b).and_then(|end| {
                    if end < start {
                        Err(())
                    } else {
                        Ok(ByteRange::From {
                            start,
                            end: Some(end),
                        })
                    }
                }),
                (Err(()), _) => Err(()),
            }
        })
    }

    /// The inclusive byte span within a blob of `len` bytes, if satisfiable.
    pub fn resolve(self, len: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::From { start, end } if start < len => {
                Some((start, end.map_or(len - 1, |e| e.min(len - 1))))
            }
            ByteRange::Suffix(n) if n > 0 && len > 0 => Some((len - n.min(len), len - 1)),
            _ => None,
        }
    }
}

/// Whether a tag of a given age may be served without asking, only while the upstream
/// fails, or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Within `tag_ttl`.
    Fresh,
    /// Past `tag_ttl` but within `stale_if_error` after it.
    StaleServable,
    /// Too old to serve.
    Expired,
}

/// Classifies a tag by the time since the upstream last confirmed it.
pub fn freshness(age: Duration, policy: &CachePolicy) -> Freshness {
    if age < policy.tag_ttl {
        Freshness::Fresh
    } else if age < policy.tag_ttl + policy.stale_if_error {
        Freshness::StaleServable
    } else {
        Freshness::Expired
    }
}

#[derive(Clone, Debug)]
struct TagState {
    digest: Digest,
    age_at: Duration,
    since: Instant,
}

impl TagState {
    fn age(&self) -> Duration {
        self.age_at + self.since.elapsed()
    }
}

#[derive(Clone, Debug)]
enum FetchState {
    Connecting,
    Streaming {
        len: Option<u64>,
        written: u64,
    },
    /// Every byte is written and hashes to the digest: clients may have all of it while
    /// the file is flushed to disk and renamed into the cache.
    Verified {
        len: u64,
    },
    Done {
        len: u64,
    },
    Failed(ProxyError),
    /// The blob will not be cached (no room, disk full): the clients that waited for the
    /// download get its body relayed through memory (see [`BlobFetch::relay`]); later
    /// ones stream it from the upstream themselves.
    Uncacheable {
        len: Option<u64>,
    },
}

/// Chunks buffered per client of a relayed (uncacheable) blob.
const RELAY_DEPTH: usize = 8;

/// Where a relayed blob's chunks go to one client.
type RelayTx = mpsc::Sender<io::Result<Bytes>>;

struct BlobFetch {
    temp: PathBuf,
    state: watch::Receiver<FetchState>,
    /// The clients that joined before the download's first answer. If the blob cannot
    /// be cached, the download relays its body to them, so that one upstream GET serves
    /// them all; once the download streams into the cache (they read the file) or the
    /// relay started, it is `None` and later clients do not join it.
    relay: Mutex<Option<Vec<RelayTx>>>,
}

impl BlobFetch {
    /// A place among the relay's clients, if it still takes them.
    fn subscribe(&self) -> Option<mpsc::Receiver<io::Result<Bytes>>> {
        let mut relay = self.relay.lock().expect("relay lock");
        relay.as_mut().map(|clients| {
            let (tx, rx) = mpsc::channel(RELAY_DEPTH);
            clients.push(tx);
            rx
        })
    }
}

/// How a download ended well.
enum Downloaded {
    /// In the temp file, verified: to be committed.
    Stored { len: u64, reservation: Reservation },
    /// Not to be cached: the body is still to be read.
    Uncacheable { len: Option<u64>, body: Incoming },
}

type ManifestResult = Result<(Manifest, CacheResult), ProxyError>;

/// How long the cache stays in stream-through mode after the disk filled up before it
/// tries writing again.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(2);
/// Free space kept beyond a download's size before it is written to disk.
const DISK_MARGIN: u64 = 16 << 20;

/// The cache and its in-flight fetches.
pub struct PullThrough {
    storage: Arc<Storage>,
    index: Arc<Index>,
    metrics: Metrics,
    policy: CachePolicy,
    pins: Vec<(Arc<Upstream>, String, Reference)>,
    disk_full_until: Mutex<Option<Instant>>,
    blobs: Mutex<HashMap<Digest, Arc<BlobFetch>>>,
    manifests: SingleFlight<String, ManifestResult>,
    /// HEADs of blobs that are not cached, one upstream HEAD per digest at a time.
    heads: SingleFlight<Digest, Result<Option<u64>, ProxyError>>,
    tags: Mutex<HashMap<String, TagState>>,
    tag_lists: TagLists,
    /// Slots for serving cached blobs in [`LARGE_CHUNK`] reads.
    large_reads: Arc<Semaphore>,
}

fn tag_key(up: &Upstream, repository: &str, tag: &str) -> String {
    format!("{}\0{repository}\0{tag}", up.name())
}

/// Maps an upstream status that is not success to the error the client gets.
pub fn status_error(status: StatusCode, kind: Kind) -> ProxyError {
    match status.as_u16() {
        404 => match kind {
            Kind::Manifest => ProxyError::ManifestUnknown,
            Kind::Blob => ProxyError::BlobUnknown,
            _ => ProxyError::NameUnknown,
        },
        401 | 403 => ProxyError::UpstreamDenied(status.as_u16()),
        429 => ProxyError::UpstreamRateLimited,
        500..=599 => ProxyError::unavailable(format!("upstream answered HTTP {status}")),
        _ => ProxyError::UpstreamProtocol(
            format!("HTTP {status}, which a registry does not answer here").into(),
        ),
    }
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

fn docker_digest(headers: &HeaderMap) -> Option<Digest> {
    header_str(headers, "docker-content-digest").and_then(|v| v.parse().ok())
}

impl PullThrough {
    /// A cache over `storage`, indexed by `index`, never evicting what `pins` (upstream,
    /// repository, reference) resolve to.
    pub fn new(
        storage: Arc<Storage>,
        index: Arc<Index>,
        metrics: Metrics,
        policy: CachePolicy,
        pins: Vec<(Arc<Upstream>, String, Reference)>,
    ) -> PullThrough {
        PullThrough {
            storage,
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
            large_reads: Arc::new(Semaphore::new(LARGE_READERS)),
        }
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The index.
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

    /// Drops a cached object found unusable (see [`Index::discard`]).
    async fn discard(&self, digest: &Digest) {
        let (index, d) = (self.index.clone(), digest.clone());
        let _ = tokio::task::spawn_blocking(move || index.discard(&d)).await;
    }

    /// Digests that must never be evicted: the closure of the pinned images.
    pub fn pinned(&self) -> std::collections::HashSet<Digest> {
        let roots: Vec<Digest> = self
            .pins
            .iter()
            .filter_map(|(up, repo, reference)| match reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(t) => self
                    .tags
                    .lock()
                    .expect("tag map lock")
                    .get(&tag_key(up, repo, t))
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
        // Whatever the size limit says, the file system has the last word.
        let free = self.storage.available_space().ok();
        if free.is_some_and(|free| free < DISK_MARGIN) {
            self.mark_disk_full("less than the margin free on the cache volume");
            return None;
        }
        let this = self.clone();
        let reservation = tokio::task::spawn_blocking(move || {
            let pinned = this.pinned();
            let room = free.map(|free| free - DISK_MARGIN);
            this.index.reserve(size, &pinned, room)
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
                .storage
                .available_space()
                .is_ok_and(|free| free >= DISK_MARGIN)
        {
            self.mark_disk_ok();
        }
    }

    // ----- manifests -----

    /// A manifest by tag or digest, of a media type `accept` allows.
    ///
    /// Tags are kept for clients that accept every type (what the cache asks upstream
    /// for, so that one object serves them all). A client that accepts fewer types is
    /// served a cached manifest only of a type it accepts; otherwise the upstream is asked
    /// with its own `Accept` (it may have another manifest for it, as Docker Hub does for
    /// schema 2 clients), without touching the tag's record.
    pub async fn manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let fetch_as = |reference: String, expect: Option<Digest>, result| {
            let (this, up, repo, accept) = (
                self.clone(),
                up.clone(),
                repository.to_string(),
                accept.clone(),
            );
            async move {
                let m = this
                    .fetch_manifest(&up, &repo, &reference, expect.as_ref(), &accept)
                    .await?;
                Ok((acceptable(m, &accept)?, result))
            }
        };
        let key = |reference: &str| {
            format!(
                "{}\0{repository}\0{reference}\0{}",
                up.name(),
                accept.upstream_header()
            )
        };
        match reference {
            Reference::Digest(digest) => {
                if let Some(m) = self.cached_manifest(digest).await? {
                    // A digest's content never changes: another type is not to be had.
                    return Ok((acceptable(m, accept)?, CacheResult::Hit));
                }
                let d = digest.to_string();
                let fetch = fetch_as(d.clone(), Some(digest.clone()), CacheResult::Miss);
                self.coalesce(key(&d), fetch).await
            }
            Reference::Tag(tag) => {
                let state = self.tag_state(up, repository, tag).await;
                if let Some(st) = &state
                    && freshness(st.age(), &self.policy) == Freshness::Fresh
                    && let Some(m) = self.cached_manifest(&st.digest).await?
                    && accept.allows(&m.media_type)
                {
                    return Ok((m, CacheResult::Hit));
                }
                if *accept != Accept::Any {
                    return self
                        .coalesce(key(tag), fetch_as(tag.clone(), None, CacheResult::Miss))
                        .await;
                }
                let (this, up2, repo, tag) = (
                    self.clone(),
                    up.clone(),
                    repository.to_string(),
                    tag.clone(),
                );
                self.coalesce(key(&tag), async move {
                    this.resolve_tag(&up2, &repo, &tag, state).await
                })
                .await
            }
        }
    }

    /// Runs `fetch` unless an identical one is running; then waits for that one instead
    /// (see [`SingleFlight`]: the fetch finishes even if every client leaves).
    async fn coalesce(
        &self,
        key: String,
        fetch: impl Future<Output = Result<(Manifest, CacheResult), ProxyError>> + Send + 'static,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let (result, started) = self
            .manifests
            .run(key, fetch, |e| {
                Err(ProxyError::internal(format!("manifest fetch failed: {e}")))
            })
            .await;
        match result {
            Ok((m, CacheResult::Miss)) if !started => Ok((m, CacheResult::Coalesced)),
            other => other,
        }
    }

    async fn tag_state(&self, up: &Upstream, repository: &str, tag: &str) -> Option<TagState> {
        let key = tag_key(up, repository, tag);
        if let Some(st) = self.tags.lock().expect("tag map lock").get(&key) {
            return Some(st.clone());
        }
        let rec = self.storage.get_tag(up.name(), repository, tag).await?;
        let digest: Digest = rec.digest.parse().ok()?;
        let st = TagState {
            digest,
            age_at: Duration::from_millis(unix_now_ms().saturating_sub(rec.checked_at_ms)),
            since: Instant::now(),
        };
        self.tags
            .lock()
            .expect("tag map lock")
            .insert(key, st.clone());
        Some(st)
    }

    async fn confirm_tag(&self, up: &Upstream, repository: &str, tag: &str, digest: &Digest) {
        let st = TagState {
            digest: digest.clone(),
            age_at: Duration::ZERO,
            since: Instant::now(),
        };
        self.tags
            .lock()
            .expect("tag map lock")
            .insert(tag_key(up, repository, tag), st);
        let rec = TagRecord {
            upstream: up.name().to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
            digest: digest.to_string(),
            checked_at_ms: unix_now_ms(),
        };
        if let Err(e) = self.storage.put_tag(&rec).await {
            tracing::warn!(upstream = up.name(), repo = repository, tag, error = %e, "could not persist tag");
        }
    }

    async fn forget_tag(&self, up: &Upstream, repository: &str, tag: &str) {
        self.tags
            .lock()
            .expect("tag map lock")
            .remove(&tag_key(up, repository, tag));
        let _ = self.storage.delete_tag(up.name(), repository, tag).await;
    }

    /// Tag not fresh (or unknown): revalidate with HEAD, fetch on change, fall back to the
    /// last known digest while the upstream is down.
    async fn resolve_tag(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        tag: &str,
        state: Option<TagState>,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let known = match &state {
            Some(st) => self.cached_manifest(&st.digest).await?.map(|m| (m, st)),
            None => None,
        };
        let stale_ok = |st: &TagState, e: &ProxyError| {
            e.upstream_is_down() && freshness(st.age(), &self.policy) != Freshness::Expired
        };
        if let Some((m, st)) = &known {
            let head = up
                .request(
                    Method::HEAD,
                    Kind::Manifest,
                    repository,
                    &format!("manifests/{tag}"),
                    None,
                    Some(MANIFEST_ACCEPT),
                )
                .await;
            let outcome = match head {
                Ok(resp) if resp.status() == StatusCode::OK => {
                    if docker_digest(resp.headers()).as_ref() == Some(&m.digest) {
                        self.confirm_tag(up, repository, tag, &m.digest).await;
                        return Ok((m.clone(), CacheResult::Hit));
                    }
                    Ok(())
                }
                Ok(resp) => Err(status_error(resp.status(), Kind::Manifest)),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {}
                Err(ProxyError::ManifestUnknown) => {
                    self.forget_tag(up, repository, tag).await;
                    return Err(ProxyError::ManifestUnknown);
                }
                Err(e) if stale_ok(st, &e) => {
                    tracing::warn!(upstream = up.name(), repo = repository, tag, error = %e, cache = "stale", "serving last known digest");
                    return Ok((m.clone(), CacheResult::Stale));
                }
                Err(e) => return Err(e),
            }
        }
        match self
            .fetch_manifest(up, repository, tag, None, &Accept::Any)
            .await
        {
            Ok(m) => {
                self.confirm_tag(up, repository, tag, &m.digest).await;
                Ok((m, CacheResult::Miss))
            }
            Err(ProxyError::ManifestUnknown) => {
                self.forget_tag(up, repository, tag).await;
                Err(ProxyError::ManifestUnknown)
            }
            Err(e) => match &known {
                Some((m, st)) if stale_ok(st, &e) => Ok((m.clone(), CacheResult::Stale)),
                _ => Err(e),
            },
        }
    }

    async fn cached_manifest(&self, digest: &Digest) -> Result<Option<Manifest>, ProxyError> {
        let Some(_guard) = self.index.acquire_manifest(digest) else {
            return Ok(None);
        };
        let found = self
            .storage
            .get_manifest(digest)
            .await
            .map_err(ProxyError::internal)?;
        if found.is_none() {
            self.discard(digest).await;
        }
        Ok(found.map(|(body, media_type)| Manifest {
            digest: digest.clone(),
            media_type,
            body,
        }))
    }

    /// Caches a verified manifest when there is room; it is served either way.
    async fn store_manifest(self: &Arc<Self>, digest: &Digest, body: &Bytes, media_type: &str) {
        if self.index.contains(digest) {
            return;
        }
        let Some(reservation) = self.reserve(body.len() as u64).await else {
            return;
        };
        let (this, d, b, mt) = (
            self.clone(),
            digest.clone(),
            body.clone(),
            media_type.to_string(),
        );
        let result = tokio::task::spawn_blocking(move || {
            this.index.commit_manifest(&d, &b, &mt, reservation)
        })
        .await
        .expect("commit task");
        match result {
            Ok(()) => self.mark_disk_ok(),
            Err(e) if is_disk_full(&e) => self.mark_disk_full("manifest write failed"),
            Err(e) => tracing::warn!(%digest, error = %e, "could not cache a manifest"),
        }
    }

    /// GETs a manifest, checks that it is one, its size and its digest, and stores it.
    async fn fetch_manifest(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        reference: &str,
        expect: Option<&Digest>,
        accept: &Accept,
    ) -> Result<Manifest, ProxyError> {
        let resp = up
            .request(
                Method::GET,
                Kind::Manifest,
                repository,
                &format!("manifests/{reference}"),
                None,
                Some(&accept.upstream_header()),
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp.status(), Kind::Manifest));
        }
        let limit = self.policy.max_manifest_bytes;
        let headers = resp.headers().clone();
        if content_length(&headers).is_some_and(|l| l > limit) {
            return Err(ProxyError::ManifestTooLarge { limit });
        }
        let body = read_capped(resp.into_body(), limit, up.timeout()).await?;
        let claimed = docker_digest(&headers);
        let algorithm = expect
            .or(claimed.as_ref())
            .map_or(crate::oci::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &body);
        if let Some(want) = expect.or(claimed.as_ref())
            && *want != digest
        {
            return Err(ProxyError::UpstreamInvalid(
                format!("manifest {reference} hashes to {digest}, expected {want}").into(),
            ));
        }
        let media_type = manifest_media_type(header_str(&headers, header::CONTENT_TYPE), &body)
            .map_err(|e| ProxyError::UpstreamNotAManifest(e.to_string().into()))?;
        self.store_manifest(&digest, &body, &media_type).await;
        Ok(Manifest {
            digest,
            media_type,
            body,
        })
    }

    // ----- blobs -----

    /// A blob (body or HEAD), from the cache, a running download, or a new one.
    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
        spans: Option<&Spans>,
    ) -> Result<BlobAnswer, ProxyError> {
        if let Some(answer) = self.cached_blob(digest, range, head, spans).await? {
            return Ok(answer);
        }
        if head {
            return self.head_blob(up, repository, digest).await;
        }
        let Some((fetch, leader, relayed)) = self.join_or_start(up, repository, digest) else {
            // Finished between our cache check and taking the lock.
            return self
                .cached_blob(digest, range, head, spans)
                .await?
                .ok_or_else(|| ProxyError::internal("blob vanished from the cache"));
        };
        let mut rx = fetch.state.clone();
        let waiting = Waiting(&self.metrics.fetch_waiters);
        let state = rx
            .wait_for(|s| !matches!(s, FetchState::Connecting))
            .await
            .map_err(|_| ProxyError::internal("download task ended without a result"))?
            .clone();
        drop(waiting);
        let len = match state {
            FetchState::Failed(e) => return Err(e),
            FetchState::Uncacheable { len } => {
                let result = if leader {
                    CacheResult::Miss
                } else {
                    CacheResult::Coalesced
                };
                return match relayed {
                    Some(rx) => Ok(relay_answer(rx, len, result)),
                    None => self.pass_through(up, repository, digest).await,
                };
            }
            FetchState::Streaming { len, .. } => len,
            FetchState::Verified { len } | FetchState::Done { len } => Some(len),
            FetchState::Connecting => unreachable!("waited for a later state"),
        };
        let span = match (range, len) {
            (Some(r), Some(len)) => Some(
                r.resolve(len)
                    .ok_or(ProxyError::RangeNotSatisfiable { len })?,
            ),
            _ => None,
        };
        let (start, end) = span.map_or((0, len), |(s, e)| (s, Some(e + 1)));
        let reader = LiveReader {
            rx,
            temp: fetch.temp.clone(),
            final_path: self.storage.blob_path(digest),
            file: None,
            pos: start,
            end,
            verified: None,
            finished: false,
            spans: spans.cloned(),
            page_cache: PageCache::Kernel,
        };
        let body = futures::stream::unfold(reader, |mut r| async move {
            if r.finished {
                return None;
            }
            match r.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), r)),
                Ok(None) => None,
                Err(e) => {
                    r.finished = true;
                    Some((Err(e), r))
                }
            }
        })
        .boxed();
        Ok(BlobAnswer {
            len,
            range: span,
            body: Some(body),
            result: if leader {
                CacheResult::Miss
            } else {
                CacheResult::Coalesced
            },
        })
    }

    /// Joins the running download of `digest` or starts one, with a place among the
    /// clients it would relay to (see [`BlobFetch::relay`]). `None` when the blob turned
    /// out to be cached already.
    #[allow(clippy::type_complexity)]
    fn join_or_start(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
    ) -> Option<(
        Arc<BlobFetch>,
        bool,
        Option<mpsc::Receiver<io::Result<Bytes>>>,
    )> {
        let mut map = self.blobs.lock().expect("blob map lock");
        if let Some(f) = map.get(digest) {
            let relayed = f.subscribe();
            // Uncounted once the download answers (see `blob`).
            self.metrics.fetch_waiters.inc();
            return Some((f.clone(), false, relayed));
        }
        if self.index.contains(digest) {
            return None;
        }
        self.metrics.fetch_waiters.inc();
        let (tx, rx) = watch::channel(FetchState::Connecting);
        let fetch = Arc::new(BlobFetch {
            temp: self.storage.temp_path(),
            state: rx,
            relay: Mutex::new(Some(Vec::new())),
        });
        let relayed = fetch.subscribe();
        map.insert(digest.clone(), fetch.clone());
        let (this, up2, repo, d, f) = (
            self.clone(),
            up.clone(),
            repository.to_string(),
            digest.clone(),
            fetch.clone(),
        );
        tokio::spawn(async move { this.download(up2, repo, d, f, tx).await });
        Some((fetch, true, relayed))
    }

    /// A cached blob's answer, or `None` if it is not cached. With `spans` (an HTTP/1
    /// connection), the body hands the connection file ranges to send instead of bytes
    /// wherever they are in the page cache (see [`file_chunks`]).
    async fn cached_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
        spans: Option<&Spans>,
    ) -> Result<Option<BlobAnswer>, ProxyError> {
        // Held by the body stream: the blob cannot be evicted while it is being sent.
        let Some(guard) = self.index.acquire(digest) else {
            return Ok(None);
        };
        let path = self.storage.blob_path(digest);
        let file = match tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                self.discard(digest).await;
                return Ok(None);
            }
            Ok(Err(e)) => return Err(ProxyError::internal(e)),
            Err(e) => return Err(ProxyError::internal(e)),
        };
        let len = file.metadata().map_err(ProxyError::internal)?.len();
        let span = match range {
            Some(r) => Some(
                r.resolve(len)
                    .ok_or(ProxyError::RangeNotSatisfiable { len })?,
            ),
            None => None,
        };
        let body = if head {
            None
        } else {
            let (start, count) = span.map_or((0, len), |(s, e)| (s, e - s + 1));
            // Ranges sent from the page cache need no chunk buffers.
            let large = match spans {
                Some(_) => None,
                None => self.large_reads.clone().try_acquire_owned().ok(),
            };
            Some(
                file_chunks(
                    ChunkReader::new(file, PageCache::Kernel),
                    start,
                    count,
                    large,
                    spans.cloned(),
                )
                .map(move |chunk| {
                    let _held = &guard;
                    chunk
                })
                .boxed(),
            )
        };
        Ok(Some(BlobAnswer {
            len: Some(len),
            range: span,
            body,
            result: CacheResult::Hit,
        }))
    }

    /// HEAD of a blob that is not cached: answered from a running download or upstream,
    /// without starting a download.
    async fn head_blob(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobAnswer, ProxyError> {
        if let Some(f) = self.running(digest) {
            let len = match &*f.state.borrow() {
                FetchState::Streaming { len, .. } | FetchState::Uncacheable { len } => *len,
                FetchState::Verified { len } | FetchState::Done { len } => Some(*len),
                _ => None,
            };
            if len.is_some() {
                return Ok(BlobAnswer {
                    len,
                    range: None,
                    body: None,
                    result: CacheResult::Coalesced,
                });
            }
        }
        let (up2, repo, d) = (up.clone(), repository.to_string(), digest.clone());
        let head = async move {
            let resp = blob_request(&up2, Method::HEAD, &repo, &d).await?;
            Ok(content_length(resp.headers()))
        };
        let (len, started) = self
            .heads
            .run(digest.clone(), head, |e| {
                Err(ProxyError::internal(format!("blob HEAD failed: {e}")))
            })
            .await;
        Ok(BlobAnswer {
            len: len?,
            range: None,
            body: None,
            result: if started {
                CacheResult::Miss
            } else {
                CacheResult::Coalesced
            },
        })
    }

    /// Streams a blob from the upstream for this client alone, without caching it (see
    /// [`relay`]).
    async fn pass_through(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobAnswer, ProxyError> {
        let resp = blob_request(up, Method::GET, repository, digest).await?;
        let len = content_length(resp.headers());
        let (tx, rx) = mpsc::channel(RELAY_DEPTH);
        let (d, timeout) = (digest.clone(), up.timeout());
        tokio::spawn(async move { relay(resp.into_body(), &d, len, timeout, vec![tx]).await });
        Ok(relay_answer(rx, len, CacheResult::Miss))
    }

    /// The download task of one blob: runs to the end even if its first client leaves, so
    /// the others (and the cache) still get it.
    async fn download(
        self: Arc<Self>,
        up: Arc<Upstream>,
        repository: String,
        digest: Digest,
        fetch: Arc<BlobFetch>,
        tx: watch::Sender<FetchState>,
    ) {
        self.metrics.inflight_fetches.inc();
        let started = Instant::now();
        let temp = fetch.temp.clone();
        let result = self
            .download_to(&up, &repository, &digest, &fetch, &tx)
            .await;
        let result = match result {
            Ok(Downloaded::Stored { len, reservation }) => {
                let (this, t, d) = (self.clone(), temp.clone(), digest.clone());
                tokio::task::spawn_blocking(move || {
                    this.index.commit_blob(&t, &d, len, reservation)
                })
                .await
                .expect("commit task")
                .map(|()| Some(len))
                .map_err(ProxyError::internal)
            }
            Ok(Downloaded::Uncacheable { len, body }) => {
                let clients = fetch
                    .relay
                    .lock()
                    .expect("relay lock")
                    .take()
                    .unwrap_or_default();
                tx.send_replace(FetchState::Uncacheable { len });
                relay(body, &digest, len, up.timeout(), clients).await;
                Ok(None)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(len)) => {
                self.mark_disk_ok();
                tracing::info!(upstream = up.name(), repo = %repository, %digest, bytes = len,
                    seconds = started.elapsed().as_secs_f64(), "blob cached");
                tx.send_replace(FetchState::Done { len });
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                tracing::warn!(upstream = up.name(), repo = %repository, %digest, error = %e, "blob download failed; nothing cached");
                tx.send_replace(FetchState::Failed(e));
            }
        }
        self.blobs.lock().expect("blob map lock").remove(&digest);
        self.metrics.inflight_fetches.dec();
    }

    /// Downloads into the fetch's temp file, or hands the body back when the blob is not
    /// to be cached.
    async fn download_to(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        fetch: &BlobFetch,
        tx: &watch::Sender<FetchState>,
    ) -> Result<Downloaded, ProxyError> {
        let resp = blob_request(up, Method::GET, repository, digest).await?;
        let len = content_length(resp.headers());
        // With a size limit, a blob of unknown size cannot be accounted for: stream it.
        let reservation = match len {
            Some(l) => self.reserve(l).await,
            None if self.index.limit().is_none() => self.reserve(0).await,
            None => None,
        };
        let Some(mut reservation) = reservation else {
            let body = resp.into_body();
            return Ok(Downloaded::Uncacheable { len, body });
        };
        let mut file = match tokio::fs::File::create(&fetch.temp).await {
            Ok(f) => f,
            Err(e) if is_disk_full(&e) => {
                self.mark_disk_full("cannot create a download file");
                let body = resp.into_body();
                return Ok(Downloaded::Uncacheable { len, body });
            }
            Err(e) => return Err(ProxyError::internal(e)),
        };
        // The clients that waited read the file from now on, as later ones do.
        fetch.relay.lock().expect("relay lock").take();
        tx.send_replace(FetchState::Streaming { len, written: 0 });
        let mut body = resp.into_body();
        let mut hasher = Hasher::new(digest.algorithm());
        let mut written = 0u64;
        let mut pending: Vec<u8> = Vec::with_capacity(CHUNK);
        let mut ended = false;
        while !ended {
            // Wait for one chunk, then take whatever else is already here, so disk writes
            // and reader wake-ups happen per ~256 KiB rather than per network packet.
            match next_data(&mut body, up.timeout()).await? {
                Some(data) => pending.extend_from_slice(&data),
                None => ended = true,
            }
            while !ended && pending.len() < CHUNK {
                match body.frame().now_or_never() {
                    None => break,
                    Some(None) => ended = true,
                    Some(Some(Err(e))) => {
                        return Err(ProxyError::unavailable(format!("blob body: {e}")));
                    }
                    Some(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            pending.extend_from_slice(&data);
                        }
                    }
                }
            }
            if pending.is_empty() {
                continue;
            }
            written += pending.len() as u64;
            if len.is_some_and(|l| written > l) {
                return Err(ProxyError::UpstreamInvalid(
                    "blob body longer than its Content-Length".into(),
                ));
            }
            hasher.update(&pending);
            let wrote = match file.write_all(&pending).await {
                Ok(()) => file.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = wrote {
                if is_disk_full(&e) {
                    self.mark_disk_full("a download ran out of space");
                }
                return Err(ProxyError::internal(e));
            }
            reservation.wrote(pending.len() as u64);
            pending.clear();
            tx.send_modify(|s| {
                if let FetchState::Streaming { written: w, .. } = s {
                    *w = written;
                }
            });
        }
        if let Some(l) = len
            && written != l
        {
            return Err(ProxyError::unavailable(format!(
                "blob body ended after {written} of {l} bytes"
            )));
        }
        let got = hasher.finish();
        if got != *digest {
            return Err(ProxyError::UpstreamInvalid(
                format!("blob content hashes to {got}, not {digest}").into(),
            ));
        }
        // The clients need not wait for the disk: what they read is verified already.
        tx.send_replace(FetchState::Verified { len: written });
        file.sync_data().await.map_err(ProxyError::internal)?;
        Ok(Downloaded::Stored {
            len: written,
            reservation,
        })
    }

    /// The running download of `digest`, if there is one.
    fn running(&self, digest: &Digest) -> Option<Arc<BlobFetch>> {
        self.blobs
            .lock()
            .expect("blob map lock")
            .get(digest)
            .cloned()
    }

    /// Waits until a running download of `digest`, if there is one, has stored the blob
    /// (clients may have had all of it before that, see [`FetchState::Verified`]).
    async fn stored(&self, digest: &Digest) -> Result<(), ProxyError> {
        let Some(fetch) = self.running(digest) else {
            return Ok(());
        };
        let mut rx = fetch.state.clone();
        let state = rx
            .wait_for(|s| {
                matches!(
                    s,
                    FetchState::Done { .. }
                        | FetchState::Failed(_)
                        | FetchState::Uncacheable { .. }
                )
            })
            .await
            .map_err(|_| ProxyError::internal("download task ended without a result"))?
            .clone();
        match state {
            FetchState::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    // ----- prefetch and drop -----

    /// Pulls images into the cache ahead of need, one after the other, logging progress
    /// and counting it in `pullthrough_prefetch_images{state}` and
    /// `pullthrough_prefetch_bytes_total`. `platforms` limits multi-platform images.
    pub async fn prefetch(
        self: &Arc<Self>,
        images: &[(Arc<Upstream>, String, Reference, String)],
        platforms: &[String],
    ) {
        let gauge = |state: &str| self.metrics.prefetch_images.with_label_values(&[state]);
        gauge("pending").set(images.len() as i64);
        for (up, repo, reference, name) in images {
            let started = Instant::now();
            tracing::info!(image = %name, "prefetching");
            match self.prefetch_one(up, repo, reference, platforms).await {
                Ok((manifests, blobs, bytes)) => {
                    gauge("done").inc();
                    tracing::info!(image = %name, manifests, blobs, bytes,
                        seconds = started.elapsed().as_secs_f64(), "prefetched");
                }
                Err(e) => {
                    gauge("failed").inc();
                    tracing::warn!(image = %name, error = %e, "prefetch failed");
                }
            }
            gauge("pending").dec();
        }
    }

    /// Returns (manifests, blobs, bytes downloaded).
    async fn prefetch_one(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
        platforms: &[String],
    ) -> Result<(usize, usize, u64), ProxyError> {
        let (top, _) = self
            .manifest(up, repository, reference, &Accept::Any)
            .await?;
        let mut images = Vec::new();
        let doc: serde_json::Value = serde_json::from_slice(&top.body).map_err(|e| {
            ProxyError::UpstreamNotAManifest(format!("manifest is not JSON: {e}").into())
        })?;
        let mut manifests = 1;
        match doc.get("manifests").and_then(|m| m.as_array()) {
            Some(children) => {
                for child in children {
                    if !platform_wanted(child.get("platform"), platforms) {
                        continue;
                    }
                    let Some(d) = child
                        .get("digest")
                        .and_then(|d| d.as_str())
                        .and_then(|d| d.parse().ok())
                    else {
                        continue;
                    };
                    let digest = Reference::Digest(d);
                    let (m, _) = self.manifest(up, repository, &digest, &Accept::Any).await?;
                    manifests += 1;
                    images.push(m);
                }
            }
            None => images.push(top),
        }
        let mut blobs = 0;
        let mut bytes = 0u64;
        for image in images {
            for d in super::index::manifest_refs(&image.body) {
                let answer = self.blob(up, repository, &d, None, false, None).await?;
                let fetched = answer.result != CacheResult::Hit;
                if let Some(mut body) = answer.body {
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.map_err(ProxyError::unavailable)?;
                        if fetched {
                            bytes += chunk.len() as u64;
                            self.metrics.prefetch_bytes.inc_by(chunk.len() as u64);
                        }
                    }
                }
                self.stored(&d).await?;
                blobs += 1;
            }
        }
        Ok((manifests, blobs, bytes))
    }

    /// Evicts down to the size limit (after a restart with a lower limit), keeping pins.
    pub async fn enforce_limit(self: &Arc<Self>) {
        if self.index.limit().is_some() {
            drop(self.reserve(0).await);
        }
    }

    /// Drops an image (tag or digest) from the cache on purpose: the tag record, the
    /// manifests, and the blobs no other cached manifest or pin needs.
    pub async fn drop_image(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
    ) -> super::index::Removal {
        let root = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => {
                let st = self.tag_state(up, repository, t).await;
                self.forget_tag(up, repository, t).await;
                st.map(|s| s.digest)
            }
        };
        let Some(root) = root else {
            return super::index::Removal::default();
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let dropped = this.index.closure([root.clone()]);
            let keep: std::collections::HashSet<Digest> =
                this.pinned().difference(&dropped).cloned().collect();
            this.index.drop_images(&[root], &keep)
        })
        .await
        .expect("drop task")
    }

    // ----- pass-through lists -----

    /// `tags/list`, reused for `tags_list_ttl`. Only `n` and `last` of the client's query
    /// are passed on (see [`tag_lists::query`]); the upstream's next page is returned
    /// for the client's `Link`.
    pub async fn tags_list(
        &self,
        up: &Upstream,
        repository: &str,
        query: Option<&str>,
    ) -> Result<TagsPage, ProxyError> {
        let query = tag_lists::query(query);
        let key = format!(
            "{}\0{repository}\0{}",
            up.name(),
            query.as_deref().unwrap_or("")
        );
        if let Some(page) = self.tag_lists.get(&key, self.policy.tags_list_ttl) {
            return Ok(page);
        }
        let resp = up
            .request(
                Method::GET,
                Kind::Tags,
                repository,
                "tags/list",
                query.as_deref(),
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp.status(), Kind::Tags));
        }
        let next = tag_lists::next_page(header_str(resp.headers(), header::LINK));
        let body = read_limited(resp.into_body(), MAX_LIST_BYTES, up.timeout()).await?;
        let page = TagsPage { body, next };
        self.tag_lists.put(key, page.clone());
        Ok(page)
    }

    /// `referrers/<digest>`, passed through. Returns the body and its content type.
    pub async fn referrers(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        query: Option<&str>,
    ) -> Result<(Bytes, Option<String>, Option<String>), ProxyError> {
        let resp = up
            .request(
                Method::GET,
                Kind::Referrers,
                repository,
                &format!("referrers/{digest}"),
                query,
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp.status(), Kind::Referrers));
        }
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_string);
        let filters = header_str(resp.headers(), "oci-filters-applied").map(str::to_string);
        let body = read_limited(resp.into_body(), MAX_LIST_BYTES, up.timeout()).await?;
        Ok((body, content_type, filters))
    }
}

/// `m`, if the client accepts its type.
fn acceptable(m: Manifest, accept: &Accept) -> Result<Manifest, ProxyError> {
    if accept.allows(&m.media_type) {
        Ok(m)
    } else {
        Err(ProxyError::NotAcceptable(format!(
            "the manifest is {}, which the Accept header does not allow",
            m.media_type
        )))
    }
}

/// Whether a platform descriptor is among `wanted` (`os/arch` or `os/arch/variant`);
/// everything is wanted when the list is empty.
fn platform_wanted(platform: Option<&serde_json::Value>, wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(p) = platform else {
        return false;
    };
    let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let short = format!("{}/{}", field("os"), field("architecture"));
    let long = format!("{short}/{}", field("variant"));
    wanted.iter().any(|w| *w == short || *w == long)
}

/// Sends an uncacheable blob's body to `clients` as it arrives, hashing it on the way.
/// The last chunk goes out only once the whole body matches `digest` (and `len`), so no
/// client ever gets a complete wrong body; a failure reaches every client as an error.
/// The slowest client sets the pace; one that goes away is dropped, and when none is
/// left the upstream body is dropped too.
async fn relay(
    mut body: Incoming,
    digest: &Digest,
    len: Option<u64>,
    timeout: Duration,
    mut clients: Vec<RelayTx>,
) {
    let mut hasher = Hasher::new(digest.algorithm());
    let mut held: Option<Bytes> = None;
    let mut got = 0u64;
    let failure = loop {
        if clients.is_empty() {
            return;
        }
        match next_data(&mut body, timeout).await {
            Ok(Some(data)) => {
                got += data.len() as u64;
                hasher.update(&data);
                if let Some(prev) = held.replace(data) {
                    send_all(&mut clients, prev).await;
                }
            }
            Ok(None) => {
                let hashed = std::mem::replace(&mut hasher, Hasher::new(digest.algorithm()));
                let got_digest = hashed.finish();
                if len.is_some_and(|l| l != got) {
                    break format!("blob body ended after {got} of {len:?} bytes");
                }
                if got_digest != *digest {
                    break format!("upstream sent {got_digest} for {digest}");
                }
                if let Some(last) = held.take() {
                    send_all(&mut clients, last).await;
                }
                return;
            }
            Err(e) => break e.to_string(),
        }
    };
    for client in &clients {
        let _ = client.send(Err(io::Error::other(failure.clone()))).await;
    }
}

/// Sends a chunk to every client, dropping those that went away.
async fn send_all(clients: &mut Vec<RelayTx>, chunk: Bytes) {
    let mut i = 0;
    while i < clients.len() {
        if clients[i].send(Ok(chunk.clone())).await.is_ok() {
            i += 1;
        } else {
            clients.swap_remove(i);
        }
    }
}

/// The answer of a client that reads a relayed blob.
fn relay_answer(
    rx: mpsc::Receiver<io::Result<Bytes>>,
    len: Option<u64>,
    result: CacheResult,
) -> BlobAnswer {
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed();
    BlobAnswer {
        len,
        range: None,
        body: Some(body),
        result,
    }
}

/// Sends a GET or HEAD for a blob upstream; any status but 200 is an error.
async fn blob_request(
    up: &Upstream,
    method: Method,
    repository: &str,
    digest: &Digest,
) -> Result<hyper::Response<Incoming>, ProxyError> {
    let path = format!("blobs/{digest}");
    let resp = up
        .request(method, Kind::Blob, repository, &path, None, None)
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(status_error(resp.status(), Kind::Blob));
    }
    Ok(resp)
}

/// `count` bytes of `reader`'s file from `start`, a chunk at a time (see [`ChunkReader`]).
///
/// With `spans`, each [`MAX_SPAN`] of the file that is in the page cache becomes a
/// placeholder frame, and the connection sends those bytes from the file itself
/// (`sendfile(2)`, see [`crate::proxy::zero_copy`]). The rest (all of it without `spans`) is
/// read and yielded: in [`LARGE_CHUNK`]s while the stream holds a `large` slot (given
/// back when the stream is dropped), else in [`CHUNK`]s.
fn file_chunks(
    reader: ChunkReader,
    start: u64,
    count: u64,
    large: Option<OwnedSemaphorePermit>,
    spans: Option<Spans>,
) -> BoxStream<'static, io::Result<Bytes>> {
    struct State {
        reader: ChunkReader,
        pos: u64,
        left: u64,
        spans: Option<Spans>,
        _large: Option<OwnedSemaphorePermit>,
    }
    let chunk = if large.is_some() { LARGE_CHUNK } else { CHUNK };
    let state = State {
        reader,
        pos: start,
        left: count,
        spans,
        _large: large,
    };
    futures::stream::unfold(Some(state), move |state| async move {
        let mut s = state?;
        if s.left == 0 {
            return None;
        }
        match s.reader.next(s.spans.as_ref(), s.pos, s.left, chunk).await {
            Ok(data) => {
                let n = data.len() as u64;
                s.pos += n;
                s.left -= n;
                Some((Ok(data), Some(s)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

/// How many chunk buffers a [`ChunkReader`] keeps for reuse: the connection holds about
/// two chunks queued for the socket while the next one is read.
const RECYCLED: usize = 3;

/// Reads a file known to hold the bytes asked for, a chunk at a time.
///
/// Data already in the page cache is read on the calling task (`preadv2` with
/// `RWF_NOWAIT`): handing every chunk to the blocking pool cost more CPU than the copy
/// itself on a warm pull. Data that would wait for the disk (or a kernel or file system
/// without the flag) is read on the blocking pool.
///
/// The buffers of chunks handed out are reused once the connection has sent them and
/// dropped its copy (the reader keeps a clone and checks that it is the only one left), so
/// that serving a cached blob neither allocates nor zeroes memory for each chunk. A buffer
/// still held anywhere else is never written to.
struct ChunkReader {
    file: Arc<std::fs::File>,
    page_cache: PageCache,
    sent: Vec<Bytes>,
    /// Bytes read from the page cache since the task last let its worker go (see
    /// [`YIELD_EVERY`]).
    unyielded: u64,
}

/// How a [`ChunkReader`] reads without waiting for the disk: what decides between the
/// page-cache paths (read on the task, `sendfile(2)` ranges) and the blocking pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageCache {
    /// Ask the kernel (`preadv2` with `RWF_NOWAIT`).
    Kernel,
    /// As if nothing were in the page cache: every read goes to the blocking pool. Tests
    /// use it because the kernel evicts pages when it likes, not when asked.
    #[cfg(test)]
    Empty,
    /// As if everything were in the page cache (plain reads of a file the test just
    /// wrote, which the kernel might have partly evicted).
    #[cfg(test)]
    Full,
}

impl PageCache {
    /// Reads into `buf` at `pos` only what is in the page cache; `Err` (`EAGAIN`, or a
    /// kernel without the flag) when that is nothing.
    fn read_nowait(self, file: &std::fs::File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        use rustix::io::{ReadWriteFlags, preadv2};
        match self {
            PageCache::Kernel => Ok(preadv2(
                file,
                &mut [io::IoSliceMut::new(buf)],
                pos,
                ReadWriteFlags::NOWAIT,
            )?),
            #[cfg(test)]
            PageCache::Empty => Err(rustix::io::Errno::AGAIN.into()),
            #[cfg(test)]
            PageCache::Full => {
                let mut got = 0;
                while got < buf.len() {
                    match rustix::io::pread(file, &mut buf[got..], pos + got as u64)? {
                        0 => break,
                        n => got += n,
                    }
                }
                Ok(got)
            }
        }
    }
}

impl ChunkReader {
    fn new(file: std::fs::File, page_cache: PageCache) -> ChunkReader {
        ChunkReader {
            file: Arc::new(file),
            page_cache,
            sent: Vec::with_capacity(RECYCLED),
            unyielded: 0,
        }
    }

    /// The next of the `left` (> 0) bytes at `pos`: with `spans`, a placeholder frame for
    /// up to [`MAX_SPAN`] of them if they are in the page cache (see [`Self::span`]), else
    /// up to `chunk` of them read (see [`Self::read`]).
    async fn next(
        &mut self,
        spans: Option<&Spans>,
        pos: u64,
        left: u64,
        chunk: usize,
    ) -> io::Result<Bytes> {
        if let Some(spans) = spans {
            let want = left.min(MAX_SPAN as u64) as usize;
            if let Some(frame) = self.span(spans, pos, want).await {
                return Ok(frame);
            }
        }
        self.read(pos, left.min(chunk as u64) as usize).await
    }

    /// Lets the worker thread go if [`YIELD_EVERY`] bytes went out since it last did.
    async fn yield_now_and_then(&mut self) {
        if self.unyielded >= YIELD_EVERY {
            self.unyielded = 0;
            tokio::task::yield_now().await;
        }
    }

    /// A placeholder frame for the `want` (1 to [`MAX_SPAN`]) bytes at `pos`, registered
    /// with `spans`, if they are in the page cache: `sendfile(2)` must not wait for the
    /// disk on a worker thread. Only the range's first and last bytes are checked (pages
    /// are read and dropped in runs); a page evicted in between makes the send wait for
    /// the disk. `None` when the bytes must be read instead.
    async fn span(&mut self, spans: &Spans, pos: u64, want: usize) -> Option<Bytes> {
        self.yield_now_and_then().await;
        let resident = [pos, pos + want as u64 - 1].into_iter().all(|at| {
            let mut byte = [0u8];
            matches!(
                self.page_cache.read_nowait(&self.file, &mut byte, at),
                Ok(1)
            )
        });
        let frame = if resident {
            spans.frame(&self.file, pos, want)
        } else {
            None
        };
        if frame.is_some() {
            self.unyielded += want as u64;
        }
        frame
    }

    /// Between 1 and `want` (> 0) bytes at `pos`; an error if the file ends there, since
    /// callers read only what they know was written.
    async fn read(&mut self, pos: u64, want: usize) -> io::Result<Bytes> {
        self.yield_now_and_then().await;
        let mut buf = self.buffer(want);
        if let Ok(n @ 1..) = self.page_cache.read_nowait(&self.file, &mut buf, pos) {
            buf.truncate(n);
            self.unyielded += n as u64;
            return Ok(self.hand_out(buf));
        }
        // The buffer was not filled: keep it for the next chunk. The task waits for the
        // blocking pool below, which lets its worker go.
        self.keep(buf.freeze());
        self.unyielded = 0;
        let file = self.file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(want);
            rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), pos)?;
            Ok::<_, io::Error>(buf)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))?;
        if buf.is_empty() {
            return Err(io::Error::other("cache file is shorter than expected"));
        }
        Ok(Bytes::from(buf))
    }

    /// A `want`-byte buffer: a sent chunk's that nobody holds any more, or a new one.
    fn buffer(&mut self, want: usize) -> BytesMut {
        let free = self.sent.iter().position(Bytes::is_unique);
        let mut buf = match free.map(|i| self.sent.swap_remove(i).try_into_mut()) {
            Some(Ok(buf)) => buf,
            _ => BytesMut::zeroed(want),
        };
        buf.resize(want, 0);
        buf
    }

    fn hand_out(&mut self, buf: BytesMut) -> Bytes {
        let chunk = buf.freeze();
        self.keep(chunk.clone());
        chunk
    }

    fn keep(&mut self, buffer: Bytes) {
        if self.sent.len() < RECYCLED {
            self.sent.push(buffer);
        }
    }
}

/// Whether an I/O error means the disk is full.
fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

async fn next_data(body: &mut Incoming, timeout: Duration) -> Result<Option<Bytes>, ProxyError> {
    loop {
        let frame = tokio::time::timeout(timeout, body.frame())
            .await
            .map_err(|_| {
                ProxyError::unavailable(format!("no data from upstream for {timeout:?}"))
            })?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(ProxyError::unavailable(format!("blob body: {e}"))),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads a manifest's body whole: at most `limit` bytes, within `timeout` in all.
async fn read_capped(body: Incoming, limit: u64, timeout: Duration) -> Result<Bytes, ProxyError> {
    let read = async {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(data) = next_data(&mut body, timeout).await? {
            if (out.len() + data.len()) as u64 > limit {
                return Err(ProxyError::ManifestTooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ProxyError::unavailable(format!("the manifest did not arrive within {timeout:?}"))
    })?
}

/// A client's view of a running download: reads the temp file up to what has been
/// written (less the last byte, withheld until the digest is verified), then the
/// committed file.
struct LiveReader {
    rx: watch::Receiver<FetchState>,
    temp: PathBuf,
    final_path: PathBuf,
    file: Option<ChunkReader>,
    pos: u64,
    end: Option<u64>,
    /// The blob's length once it was seen verified: the bytes stay good (and readable
    /// from an open file) even if storing the blob then fails.
    verified: Option<u64>,
    finished: bool,
    /// The connection's, to send what is in the page cache from the file (as
    /// [`file_chunks`] does).
    spans: Option<Spans>,
    /// How the file is read (see [`PageCache`]).
    page_cache: PageCache,
}

impl LiveReader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            let state = self.rx.borrow_and_update().clone();
            // How much may be read, whether that is all, whether the file was renamed.
            let (available, ended, committed) = match (&state, self.verified) {
                (FetchState::Done { len }, _) => (*len, true, true),
                (FetchState::Verified { len }, _) => {
                    self.verified = Some(*len);
                    (*len, true, false)
                }
                (_, Some(len)) => (len, true, false),
                (FetchState::Connecting, None) => (0, false, false),
                (FetchState::Streaming { written, .. }, None) => {
                    (written.saturating_sub(1), false, false)
                }
                (FetchState::Failed(e), None) => {
                    return Err(io::Error::other(format!("upstream download failed: {e}")));
                }
                (FetchState::Uncacheable { .. }, None) => {
                    return Err(io::Error::other("the download was not cached"));
                }
            };
            let limit = available.min(self.end.unwrap_or(u64::MAX));
            if self.pos < limit {
                if self.file.is_none() && !self.open(committed).await? {
                    self.rx
                        .changed()
                        .await
                        .map_err(|_| io::Error::other("download abandoned"))?;
                    continue;
                }
                let reader = self.file.as_mut().expect("opened above");
                let chunk = reader
                    .next(self.spans.as_ref(), self.pos, limit - self.pos, CHUNK)
                    .await?;
                self.pos += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if ended {
                return Ok(None);
            }
            self.rx
                .changed()
                .await
                .map_err(|_| io::Error::other("download abandoned"))?;
        }
    }

    /// Opens the temp file (or the committed one once done). `false` when neither is
    /// there yet: the rename is in progress and the state is about to change.
    async fn open(&mut self, committed: bool) -> io::Result<bool> {
        let paths = if committed {
            vec![&self.final_path]
        } else {
            vec![&self.temp, &self.final_path]
        };
        for path in paths {
            match tokio::fs::File::open(path).await {
                Ok(f) => {
                    self.file = Some(ChunkReader::new(f.into_std().await, self.page_cache));
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        if committed {
            return Err(io::Error::other("committed blob is missing"));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn policy() -> CachePolicy {
        CachePolicy {
            tag_ttl: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(3600),
            tags_list_ttl: Duration::from_secs(30),
            max_manifest_bytes: 1 << 20,
        }
    }

    /// Fails with the lengths, digests and first difference of two byte strings, never
    /// the bytes themselves (a blob-sized message helps nobody).
    #[track_caller]
    fn assert_same(got: &[u8], want: &[u8], what: &str) {
        if got != want {
            let sha = |b: &[u8]| Digest::of(crate::oci::Algorithm::Sha256, b);
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            panic!(
                "{what}: got {} bytes ({}), want {} ({}), first difference at {at:?}",
                got.len(),
                sha(got),
                want.len(),
                sha(want)
            );
        }
    }

    /// A file of `len` known bytes in a temp dir.
    fn blob_file(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (dir, path, data)
    }

    /// Reads every chunk of a `count`-byte span from `start` and joins them, in both
    /// chunk sizes; fails unless both give the same bytes.
    async fn read_span(
        file: &std::fs::File,
        page_cache: PageCache,
        start: u64,
        count: u64,
    ) -> io::Result<Vec<u8>> {
        let mut both = Vec::new();
        for large in [None, Some(one_slot())] {
            let reader = ChunkReader::new(file.try_clone()?, page_cache);
            let chunks: Vec<io::Result<Bytes>> = file_chunks(reader, start, count, large, None)
                .collect()
                .await;
            let mut out = Vec::new();
            for c in chunks {
                out.extend_from_slice(&c?);
            }
            both.push(out);
        }
        let large = both.pop().expect("two reads");
        assert_same(&both[0], &large, "the two chunk sizes");
        Ok(large)
    }

    fn one_slot() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    #[tokio::test]
    async fn a_large_read_slot_sets_the_chunk_size_until_the_stream_is_dropped() {
        let (_dir, path, data) = blob_file(LARGE_CHUNK * 2 + 1000);
        let len = data.len() as u64;
        let open = || ChunkReader::new(std::fs::File::open(&path).unwrap(), PageCache::Full);

        let sizes = |chunks: Vec<io::Result<Bytes>>| -> Vec<usize> {
            chunks.into_iter().map(|c| c.unwrap().len()).collect()
        };
        let small = sizes(file_chunks(open(), 0, len, None, None).collect().await);
        assert_eq!(small.len(), (LARGE_CHUNK * 2 + 1000).div_ceil(CHUNK));
        assert!(
            small[..small.len() - 1].iter().all(|n| *n == CHUNK),
            "{small:?}"
        );

        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().unwrap();
        let mut stream = file_chunks(open(), 0, len, Some(slot), None);
        assert_eq!(stream.next().await.unwrap().unwrap().len(), LARGE_CHUNK);
        assert_eq!(slots.available_permits(), 0, "the stream holds its slot");
        drop(stream);
        assert_eq!(
            slots.available_permits(),
            1,
            "a dropped stream gives it back"
        );

        let slot = slots.clone().try_acquire_owned().unwrap();
        let large = sizes(
            file_chunks(open(), 0, len, Some(slot), None)
                .collect()
                .await,
        );
        assert_eq!(large, [LARGE_CHUNK, LARGE_CHUNK, 1000]);
        assert_eq!(
            slots.available_permits(),
            1,
            "a finished stream gives it back"
        );
    }

    #[tokio::test]
    async fn a_stream_of_a_cached_blob_lets_other_tasks_run_every_mib() {
        let (_dir, path, _) = blob_file(LARGE_CHUNK * 3);
        let open = || ChunkReader::new(std::fs::File::open(&path).unwrap(), PageCache::Full);
        // Every read is ready at once (as from the page cache), so only the stream's own
        // yields let the ticker run (one thread here).
        let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        for large in [Some(one_slot()), None] {
            let mut seen = Vec::new();
            let mut stream = file_chunks(open(), 0, (LARGE_CHUNK * 3) as u64, large, None);
            while let Some(chunk) = stream.next().await {
                chunk.unwrap();
                seen.push(ticks.load(std::sync::atomic::Ordering::Relaxed));
            }
            // The first chunk of each MiB after the first comes after a yield.
            let step = seen.len() / 3;
            for mib in 1..3 {
                assert!(
                    seen[mib * step] > seen[mib * step - 1],
                    "no other task ran after MiB {mib}: ticks after each chunk {seen:?}"
                );
            }
        }
        ticker.abort();
    }

    /// A `len`-byte file of known bytes on the build's own disk (a tmpfs /tmp would keep
    /// its pages in memory whatever the test asks), flushed, so that the kernel may drop
    /// its pages from the page cache when asked (see [`drop_from_page_cache`]).
    fn file_on_disk(len: usize) -> (tempfile::TempDir, std::fs::File, Vec<u8>) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        (dir, file, data)
    }

    /// Asks the kernel to drop a flushed file's pages. It is a hint: some or all pages
    /// may stay, or come back by read-ahead, so tests assert only what holds either way.
    fn drop_from_page_cache(file: &std::fs::File) {
        rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    #[tokio::test]
    async fn cached_blobs_are_read_from_memory_or_from_disk() {
        let (_dir, path, data) = blob_file(CHUNK * 2 + 1000);
        let file = std::fs::File::open(&path).unwrap();
        let len = data.len() as u64;

        for page_cache in [PageCache::Full, PageCache::Empty] {
            let what = format!("{page_cache:?}");
            // Read on the task (in the page cache) or on the blocking pool (not in it),
            // whole and from an offset.
            let whole = read_span(&file, page_cache, 0, len).await.unwrap();
            assert_same(&whole, &data, &what);
            let tail = read_span(&file, page_cache, 7, len - 7).await.unwrap();
            assert_same(&tail, &data[7..], &what);
            // A file shorter than the span asked for is an error, not a short body.
            let err = read_span(&file, page_cache, 0, len + 10).await.unwrap_err();
            assert!(err.to_string().contains("shorter"), "{what}: {err}");
        }

        // The real kernel, with the pages perhaps dropped, perhaps not: the same bytes.
        let (_dir, file, data) = file_on_disk(CHUNK * 2 + 1000);
        drop_from_page_cache(&file);
        let tail = read_span(&file, PageCache::Kernel, 3, len - 3)
            .await
            .unwrap();
        assert_same(&tail, &data[3..], "kernel");
    }

    /// What a connection would send for `frames`: each placeholder replaced by the bytes
    /// of the next range registered with `spans` (which must start where the frame does
    /// and be as long), every other frame as it is.
    fn as_sent(frames: &[Bytes], spans: &Spans, file: &std::fs::File, start: u64) -> Vec<u8> {
        use crate::proxy::zero_copy::is_placeholder;
        let mut ranges = spans.pending().into_iter();
        let mut out = Vec::new();
        for frame in frames {
            let at = start + out.len() as u64;
            if is_placeholder(frame) {
                let (offset, len) = ranges.next().expect("a range for each placeholder");
                assert_eq!((offset, len), (at, frame.len()), "range out of step");
                let mut buf = vec![0u8; len];
                rustix::io::pread(file, &mut buf, offset).unwrap();
                out.extend_from_slice(&buf);
            } else {
                out.extend_from_slice(frame);
            }
        }
        assert!(ranges.next().is_none(), "a range without its placeholder");
        out
    }

    #[tokio::test]
    async fn blobs_in_the_page_cache_go_out_as_file_ranges_the_rest_as_bytes() {
        use crate::proxy::zero_copy::is_placeholder;
        let (_dir, path, data) = blob_file(MAX_SPAN * 2 + 1000);
        let file = std::fs::File::open(&path).unwrap();
        let len = data.len() as u64;
        let frames = |page_cache, start, spans: &Spans| {
            let reader = ChunkReader::new(file.try_clone().unwrap(), page_cache);
            file_chunks(reader, start, len - start, None, Some(spans.clone()))
                .map(Result::unwrap)
                .collect::<Vec<Bytes>>()
        };

        // In the page cache: every frame a placeholder, the ranges registered in order.
        let spans = Spans::default();
        let sent = frames(PageCache::Full, 5, &spans).await;
        assert!(sent.iter().all(|f| is_placeholder(f)));
        let sizes: Vec<usize> = sent.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [MAX_SPAN, MAX_SPAN, 995]);
        assert_eq!(
            spans.pending(),
            [
                (5, MAX_SPAN),
                (5 + MAX_SPAN as u64, MAX_SPAN),
                (5 + 2 * MAX_SPAN as u64, 995)
            ]
        );
        assert_same(&as_sent(&sent, &spans, &file, 5), &data[5..], "ranges");

        // Not in the page cache: read (on the blocking pool) and yielded as bytes, and no
        // range registered.
        let spans = Spans::default();
        let sent = frames(PageCache::Empty, 0, &spans).await;
        assert!(sent.iter().all(|f| !is_placeholder(f)));
        assert_eq!(sent[0].len(), CHUNK);
        assert!(spans.pending().is_empty());
        assert_same(&sent.concat(), &data, "bytes");

        // The real kernel, with the pages perhaps dropped, perhaps not: ranges where they
        // are in memory, bytes elsewhere, and together exactly the file.
        let (_dir, file, data) = file_on_disk(MAX_SPAN * 2 + 1000);
        drop_from_page_cache(&file);
        let spans = Spans::default();
        let reader = ChunkReader::new(file.try_clone().unwrap(), PageCache::Kernel);
        let sent: Vec<Bytes> = file_chunks(reader, 0, len, None, Some(spans.clone()))
            .map(Result::unwrap)
            .collect()
            .await;
        assert_same(&as_sent(&sent, &spans, &file, 0), &data, "kernel");
    }

    #[tokio::test]
    async fn chunk_buffers_are_reused_only_once_released() {
        let (_dir, path, data) = blob_file(CHUNK * 6);
        let mut reader = ChunkReader::new(std::fs::File::open(&path).unwrap(), PageCache::Full);
        let at = |i: usize| (i * CHUNK) as u64;
        let chunk = |i: usize| &data[i * CHUNK..(i + 1) * CHUNK];

        // While every chunk handed out is still held, each read gets a buffer of its own.
        let mut held = Vec::new();
        for i in 0..=RECYCLED {
            held.push(reader.read(at(i), CHUNK).await.unwrap());
        }
        for (i, c) in held.iter().enumerate() {
            assert_same(c, chunk(i), &format!("chunk {i}"));
        }
        let buffers: HashSet<*const u8> = held.iter().map(|c| c.as_ptr()).collect();
        assert_eq!(buffers.len(), held.len());

        // Once released, the buffers are read into again.
        drop(held);
        let again = reader.read(at(4), CHUNK).await.unwrap();
        assert!(
            buffers.contains(&again.as_ptr()),
            "a released buffer was not reused"
        );
        assert_same(&again, chunk(4), "chunk 4 read again");
        drop(again);

        // A short chunk's buffer serves a whole chunk afterwards.
        let tail = reader.read(at(6) - 100, CHUNK).await.unwrap();
        assert_same(&tail, &data[6 * CHUNK - 100..], "the tail");
        drop(tail);
        for i in [5, 0] {
            let c = reader.read(at(i), CHUNK).await.unwrap();
            assert_same(&c, chunk(i), &format!("chunk {i} after the tail"));
        }
    }

    /// A reader of a download of `data`, all of it written to the temp file.
    fn live_reader(dir: &std::path::Path, data: &[u8]) -> (watch::Sender<FetchState>, LiveReader) {
        let temp = dir.join("temp");
        std::fs::write(&temp, data).unwrap();
        let (tx, rx) = watch::channel(FetchState::Streaming {
            len: Some(data.len() as u64),
            written: data.len() as u64,
        });
        let reader = LiveReader {
            rx,
            temp,
            final_path: dir.join("final"),
            file: None,
            pos: 0,
            end: None,
            verified: None,
            finished: false,
            spans: None,
            page_cache: PageCache::Full,
        };
        (tx, reader)
    }

    #[tokio::test]
    async fn live_readers_get_the_last_byte_once_verified_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (tx, mut r) = live_reader(dir.path(), &data);
        assert_same(
            &r.next_chunk().await.unwrap().unwrap(),
            &data[..999],
            "all but one",
        );
        let early = tokio::time::timeout(Duration::from_millis(100), r.next_chunk()).await;
        assert!(early.is_err(), "the last byte went out before verification");

        // Verified: the rest and the end, while the file is still being flushed.
        tx.send_replace(FetchState::Verified { len: 1000 });
        assert_same(
            &r.next_chunk().await.unwrap().unwrap(),
            &data[999..],
            "the rest",
        );
        assert!(r.next_chunk().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn verified_bytes_still_go_out_when_storing_the_blob_fails() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 10).map(|i| (i % 251) as u8).collect();
        let (tx, mut r) = live_reader(dir.path(), &data);
        tx.send_replace(FetchState::Verified {
            len: data.len() as u64,
        });
        let mut got = r.next_chunk().await.unwrap().unwrap().to_vec();
        // Flushing or renaming failed: the temp file is removed and the download failed.
        std::fs::remove_file(dir.path().join("temp")).unwrap();
        tx.send_replace(FetchState::Failed(ProxyError::internal("disk gone")));
        while let Some(chunk) = r.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_same(&got, &data, "the blob");
    }

    #[test]
    fn ranges() {
        let p = |s| ByteRange::parse(s);
        assert_eq!(
            p("bytes=0-9"),
            Some(Ok(ByteRange::From {
                start: 0,
                end: Some(9)
            }))
        );
        assert_eq!(
            p("bytes=5-"),
            Some(Ok(ByteRange::From {
                start: 5,
                end: None
            }))
        );
        assert_eq!(p("bytes=-3"), Some(Ok(ByteRange::Suffix(3))));
        assert_eq!(p("bytes=9-5"), Some(Err(())));
        assert_eq!(p("bytes=x-5"), Some(Err(())));
        assert_eq!(p("bytes=0-1,3-4"), None);
        assert_eq!(p("items=0-1"), None);
        let r = |s| ByteRange::parse(s).unwrap().unwrap();
        assert_eq!(r("bytes=0-9").resolve(5), Some((0, 4)));
        assert_eq!(r("bytes=5-").resolve(5), None);
        assert_eq!(r("bytes=-3").resolve(10), Some((7, 9)));
        assert_eq!(r("bytes=-30").resolve(10), Some((0, 9)));
        assert_eq!(r("bytes=-0").resolve(10), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tag_freshness_follows_the_clock() {
        let p = policy();
        let st = TagState {
            digest: Digest::of(crate::oci::Algorithm::Sha256, b"x"),
            age_at: Duration::from_secs(100),
            since: Instant::now(),
        };
        assert_eq!(freshness(st.age(), &p), Freshness::Fresh);
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(freshness(st.age(), &p), Freshness::StaleServable);
        tokio::time::advance(Duration::from_secs(3599)).await;
        assert_eq!(freshness(st.age(), &p), Freshness::StaleServable);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(freshness(st.age(), &p), Freshness::Expired);
    }

    #[test]
    fn platform_filter() {
        let p = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(platform_wanted(Some(&p), &[]));
        assert!(platform_wanted(Some(&p), &["linux/arm64".into()]));
        assert!(platform_wanted(Some(&p), &["linux/arm64/v8".into()]));
        assert!(!platform_wanted(Some(&p), &["linux/amd64".into()]));
        assert!(!platform_wanted(None, &["linux/amd64".into()]));
    }

    #[test]
    fn upstream_statuses_map_to_client_errors() {
        use crate::oci::ErrorCode;
        let code = |s: u16, k| status_error(StatusCode::from_u16(s).unwrap(), k).code_and_status();
        assert_eq!(code(404, Kind::Manifest).0, ErrorCode::ManifestUnknown);
        assert_eq!(code(404, Kind::Blob).0, ErrorCode::BlobUnknown);
        assert_eq!(code(401, Kind::Blob).0, ErrorCode::Denied);
        assert_eq!(code(429, Kind::Blob).1, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(code(503, Kind::Blob).1, StatusCode::BAD_GATEWAY);
        assert!(status_error(StatusCode::SERVICE_UNAVAILABLE, Kind::Manifest).upstream_is_down());
        assert!(!status_error(StatusCode::NOT_FOUND, Kind::Manifest).upstream_is_down());
    }
}

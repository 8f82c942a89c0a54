//! Blobs: one download per missing digest, shared by every request for it. The download
//! runs on its own task, writes to the store ([`BlobWrite`]) and hashes as it goes; every
//! client (the first included) reads what was written as it grows ([`Written`]), so a slow
//! client never slows the download and memory stays bounded whatever the blob size. The
//! last byte is withheld until the digest is verified: a client can never receive a
//! complete body that does not match. The write is committed only when the digest
//! matches. A blob that cannot be cached is relayed through memory to the clients that
//! waited for it; HEADs of uncached blobs are coalesced too.

use super::*;
use crate::oci::{Digest, Hasher};
use crate::proxy::error::ProxyError;
use crate::proxy::index::Reservation;
use crate::proxy::metrics::{CacheResult, PeerFetch};
use crate::proxy::store::{BlobWrite, FetchClaim, FetchLease, StoreError, Written};
use crate::proxy::upstream::{Asker, BlobBody, Upstream, UpstreamError};
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use futures::stream::StreamExt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long a download waits for a blob that a process this replica does not know (a
/// mirror in another cluster sharing the bucket) is fetching into the store, before it
/// fetches the blob itself.
pub const FOREIGN_FETCH_WAIT: Duration = Duration::from_secs(60);

/// How often the store is looked at meanwhile.
const FOREIGN_FETCH_POLL: Duration = Duration::from_secs(1);

/// The most a blob of unknown length (no `Content-Length`) is written into the cache.
const UNKNOWN_LENGTH_ROOM: u64 = 8 << 30;

/// What a download has written, for its clients to read (see [`Written`]).
#[derive(Clone)]
pub(super) struct Source(pub(super) Arc<dyn Written>);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Source")
    }
}

#[derive(Clone, Debug)]
pub(super) enum FetchState {
    Connecting,
    Streaming {
        len: Option<u64>,
        written: u64,
        source: Source,
    },
    /// Every byte is written and hashes to the digest: clients may have all of it while
    /// the write is made durable and committed into the cache.
    Verified {
        len: u64,
        source: Source,
    },
    Done {
        len: u64,
        source: Source,
    },
    /// Verified, so its clients may have all of it, but the store could not keep it (a
    /// bucket that is down): not cached, and said so to whoever waits for it to be.
    Unstored {
        len: u64,
        source: Source,
        error: ProxyError,
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
pub(super) const RELAY_DEPTH: usize = 8;

/// Where a relayed blob's chunks go to one client.
pub(super) type RelayTx = mpsc::Sender<io::Result<Bytes>>;

impl FetchState {
    /// Where the bytes written so far are read, once there are any.
    pub(super) fn source(&self) -> Option<&Source> {
        match self {
            FetchState::Streaming { source, .. }
            | FetchState::Verified { source, .. }
            | FetchState::Done { source, .. }
            | FetchState::Unstored { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub(super) struct BlobFetch {
    pub(super) state: watch::Receiver<FetchState>,
    /// The replica that owns the blob, when the download asks it instead of the upstream
    /// (see [`crate::proxy::peers`]): the owner caches it, this replica relays it.
    pub(super) via: Option<SocketAddr>,
    /// The upstream and repository it was started for (`upstream\0repository`): a
    /// client of another repository joins it only for a digest linked there.
    pub(super) origin: String,
    /// The clients that joined before the download's first answer. If the blob cannot
    /// be cached, the download relays its body to them, so that one upstream GET serves
    /// them all; once the download streams into the cache (they read the file) or the
    /// relay started, it is `None` and later clients do not join it.
    pub(super) relay: Mutex<Option<Vec<RelayTx>>>,
    /// The clients following it now (see [`Follower`]): a download of unknown length
    /// goes on only while someone reads it.
    followers: AtomicUsize,
}

/// A client following a download, until it is dropped (its body ended or went away).
pub(super) struct Follower(Arc<BlobFetch>);

impl Follower {
    fn of(fetch: &Arc<BlobFetch>) -> Follower {
        fetch.followers.fetch_add(1, Ordering::SeqCst);
        Follower(fetch.clone())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlobFetch {
    /// A place among the relay's clients, if it still takes them.
    pub(super) fn subscribe(&self) -> Option<mpsc::Receiver<io::Result<Bytes>>> {
        let mut relay = self.relay.lock().expect("relay lock");
        relay.as_mut().map(|clients| {
            let (tx, rx) = mpsc::channel(RELAY_DEPTH);
            clients.push(tx);
            rx
        })
    }
}

/// A client's place in a download (see [`PullThrough::join_or_start`]).
pub(super) struct Joined {
    pub(super) fetch: Arc<BlobFetch>,
    /// Whether this client started it.
    pub(super) leader: bool,
    /// Where its body comes if the blob is relayed instead of cached.
    pub(super) relayed: Option<mpsc::Receiver<io::Result<Bytes>>>,
    /// Counted among the download's followers while it is held.
    pub(super) follower: Follower,
}

/// How a download ended well.
pub(super) enum Downloaded {
    /// Written and verified: to be committed.
    Stored {
        len: u64,
        reservation: Reservation,
        write: Box<dyn BlobWrite>,
        source: Source,
        /// The store's lease on the fetch: let go once the blob is committed.
        lease: FetchLease,
    },
    /// Not to be cached: the body is still to be read.
    Uncacheable { body: BlobBody },
}

/// Records that the store holds `now` bytes of a download the clients may read (where
/// `readable` were before): they are off the space still to be taken, and the clients
/// are told.
fn landed(
    now: u64,
    readable: &mut u64,
    reservation: &mut Reservation,
    tx: &watch::Sender<FetchState>,
) {
    if now > *readable {
        reservation.wrote(now - *readable);
        *readable = now;
        tx.send_modify(|s| {
            if let FetchState::Streaming { written, .. } = s {
                *written = now;
            }
        });
    }
}

/// Sends an uncacheable blob's body to `clients` as it arrives, hashing it on the way.
/// The last chunk goes out only once the whole body matches `digest` (and `len`), so no
/// client ever gets a complete wrong body; a failure reaches every client as an error.
/// The slowest client sets the pace; one that goes away is dropped, and when none is
/// left the upstream body is dropped too.
pub(super) async fn relay(mut body: BlobBody, digest: &Digest, mut clients: Vec<RelayTx>) {
    let len = body.content_length();
    let mut hasher = Hasher::new(digest.algorithm());
    let mut held: Option<Bytes> = None;
    let mut got = 0u64;
    let failure = loop {
        if clients.is_empty() {
            return;
        }
        match body.next().await {
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
                if let Some(want) = len.filter(|l| *l != got) {
                    break ProxyError::from(UpstreamError::Truncated { got, want });
                }
                if got_digest != *digest {
                    break ProxyError::UpstreamInvalid(
                        format!("blob content hashes to {got_digest}, not {digest}").into(),
                    );
                }
                if let Some(last) = held.take() {
                    send_all(&mut clients, last).await;
                }
                return;
            }
            Err(e) => break ProxyError::from(e),
        }
    };
    for client in &clients {
        let _ = client.send(Err(io::Error::other(failure.clone()))).await;
    }
}

/// Sends a chunk to every client, dropping those that went away.
pub(super) async fn send_all(clients: &mut Vec<RelayTx>, chunk: Bytes) {
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
pub(super) fn relay_answer(
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
        redirect: None,
    }
}

/// How a client asks for a blob.
#[derive(Clone, Copy, Default)]
pub struct BlobAsk<'a> {
    /// The `Range` it asks for, if any.
    pub range: Option<ByteRange>,
    /// A HEAD.
    pub head: bool,
    /// The HTTP/1 connection's file ranges (see [`crate::proxy::zero_copy`]).
    pub spans: Option<&'a Spans>,
    /// Asked by another replica for a blob this one owns (see [`crate::proxy::peers`]).
    pub from_peer: bool,
    /// The digest is not linked to the repository (see [`crate::proxy::links`]): it is
    /// served only through the upstream's own answer for this repository, and
    /// [`ProxyError::NotLinked`] is the answer when that would take the cache's copy, a
    /// download for another repository, or another replica.
    pub unlinked: bool,
}

/// The flights key of a download or HEAD for `repository` of `up`.
fn origin(up: &Upstream, repository: &str) -> String {
    format!("{}\0{repository}", up.name())
}

impl PullThrough {
    /// A blob (body or HEAD), from the cache, a running download, or a new one.
    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        ask: BlobAsk<'_>,
    ) -> Result<BlobAnswer, ProxyError> {
        let BlobAsk {
            range,
            head,
            spans,
            from_peer,
            unlinked,
        } = ask;
        match self.cached_blob(digest, range, head, spans, unlinked).await {
            Ok(Some(answer)) => return Ok(answer),
            Ok(None) => {}
            // The store cannot be read (a bucket that is down): the upstream can.
            Err(ProxyError::Storage(e)) => {
                tracing::warn!(%digest, error = %e, "cache store unreadable; serving the blob from the upstream");
                if !head {
                    return self.pass_through(up, repository, digest, None).await;
                }
            }
            Err(e) => return Err(e),
        }
        if head {
            return self.head_blob(up, repository, digest, unlinked).await;
        }
        // Another replica asking: never through a download that asks a replica in turn
        // (two replicas whose views of the owner differ would wait on each other).
        if from_peer && self.running(digest).is_some_and(|f| f.via.is_some()) {
            return self.pass_through(up, repository, digest, None).await;
        }
        let Some(Joined {
            fetch,
            leader,
            relayed,
            follower,
        }) = self.join_or_start(up, repository, digest, from_peer, unlinked)?
        else {
            // Finished between our cache check and taking the lock.
            if unlinked {
                return Err(ProxyError::NotLinked);
            }
            return self
                .cached_blob(digest, range, head, spans, false)
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
                    None => self.pass_through(up, repository, digest, fetch.via).await,
                };
            }
            FetchState::Streaming { len, .. } => len,
            FetchState::Verified { len, .. }
            | FetchState::Done { len, .. }
            | FetchState::Unstored { len, .. } => Some(len),
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
        let reader = LiveReader::new(rx, start, end, spans.cloned());
        // The body follows the download for as long as it is read.
        let body = futures::stream::unfold((reader, follower), |(mut r, f)| async move {
            if r.finished {
                return None;
            }
            match r.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), (r, f))),
                Ok(None) => None,
                Err(e) => {
                    r.finished = true;
                    Some((Err(e), (r, f)))
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
            redirect: None,
        })
    }

    /// Joins the running download of `digest` or starts one, with a place among the
    /// clients it would relay to (see [`BlobFetch::relay`]). `None` when the blob turned
    /// out to be cached already.
    pub(super) fn join_or_start(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        from_peer: bool,
        unlinked: bool,
    ) -> Result<Option<Joined>, ProxyError> {
        let origin = origin(up, repository);
        let mut map = self.blobs.lock().expect("blob map lock");
        if let Some(f) = map.get(digest) {
            if unlinked && f.origin != origin {
                return Err(ProxyError::NotLinked);
            }
            // Uncounted once the download answers (see `blob`).
            self.metrics.fetch_waiters.inc();
            return Ok(Some(Joined {
                relayed: f.subscribe(),
                follower: Follower::of(f),
                fetch: f.clone(),
                leader: false,
            }));
        }
        if self.index.contains(digest) {
            return Ok(None);
        }
        let via = match (&self.peers, from_peer) {
            (Some(peers), false) => peers.owner(digest),
            _ => None,
        };
        if unlinked && via.is_some() {
            return Err(ProxyError::NotLinked);
        }
        self.metrics.fetch_waiters.inc();
        let (tx, rx) = watch::channel(FetchState::Connecting);
        let fetch = Arc::new(BlobFetch {
            state: rx,
            via,
            origin,
            relay: Mutex::new(Some(Vec::new())),
            followers: AtomicUsize::new(0),
        });
        let relayed = fetch.subscribe();
        // Counted before the download starts: it never sees a moment without its first.
        let follower = Follower::of(&fetch);
        map.insert(digest.clone(), fetch.clone());
        let (this, up2, repo, d, f) = (
            self.clone(),
            up.clone(),
            repository.to_string(),
            digest.clone(),
            fetch.clone(),
        );
        let asker = Asker::current();
        tokio::spawn(asker.scope(async move { this.download(up2, repo, d, f, tx).await }));
        Ok(Some(Joined {
            fetch,
            leader: true,
            relayed,
            follower,
        }))
    }

    /// HEAD of a blob that is not cached: answered from a running download or upstream,
    /// without starting a download.
    pub(super) async fn head_blob(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        unlinked: bool,
    ) -> Result<BlobAnswer, ProxyError> {
        let origin = origin(up, repository);
        if let Some(f) = self
            .running(digest)
            .filter(|f| !unlinked || f.origin == origin)
        {
            let len = match &*f.state.borrow() {
                FetchState::Streaming { len, .. } | FetchState::Uncacheable { len } => *len,
                FetchState::Verified { len, .. }
                | FetchState::Done { len, .. }
                | FetchState::Unstored { len, .. } => Some(*len),
                _ => None,
            };
            if len.is_some() {
                return Ok(BlobAnswer {
                    len,
                    range: None,
                    body: None,
                    result: CacheResult::Coalesced,
                    redirect: None,
                });
            }
        }
        let (up2, repo, d) = (up.clone(), repository.to_string(), digest.clone());
        let head = async move { Ok(up2.blob_size(&repo, &d).await?) };
        let (len, started) = self
            .heads
            .run((origin, digest.clone()), head, |e| {
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
            redirect: None,
        })
    }

    /// Streams a blob from the upstream (or from the replica `via` that owns it) for this
    /// client alone, without caching it (see [`relay`]).
    pub(super) async fn pass_through(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> Result<BlobAnswer, ProxyError> {
        let (body, _) = self.blob_body(up, repository, digest, via).await?;
        let len = body.content_length();
        let (tx, rx) = mpsc::channel(RELAY_DEPTH);
        let d = digest.clone();
        tokio::spawn(async move { relay(body, &d, vec![tx]).await });
        Ok(relay_answer(rx, len, CacheResult::Miss))
    }

    /// The download task of one blob: runs to the end even if its first client leaves, so
    /// the others (and the cache) still get it.
    pub(super) async fn download(
        self: Arc<Self>,
        up: Arc<Upstream>,
        repository: String,
        digest: Digest,
        fetch: Arc<BlobFetch>,
        tx: watch::Sender<FetchState>,
    ) {
        self.metrics.inflight_fetches.inc();
        let started = Instant::now();
        let result = self
            .download_to(&up, &repository, &digest, &fetch, &tx)
            .await;
        let result = match result {
            Ok(Downloaded::Stored {
                len,
                reservation,
                write,
                source,
                lease,
            }) => {
                let committed = self
                    .index
                    .commit_blob(write, &digest, len, reservation)
                    .await;
                // Stored or not: another process may fetch it now.
                drop(lease);
                match committed {
                    Ok(()) => Ok(Some((len, source))),
                    // Its clients still get all of it: the bytes are verified and spooled.
                    Err(e) => {
                        let error = self.store_failed(e);
                        tracing::warn!(upstream = up.name(), repo = %repository, %digest, error = %error,
                            "blob served but not cached: the store could not keep it");
                        tx.send_replace(FetchState::Unstored { len, source, error });
                        Ok(None)
                    }
                }
            }
            Ok(Downloaded::Uncacheable { body }) => {
                let clients = fetch
                    .relay
                    .lock()
                    .expect("relay lock")
                    .take()
                    .unwrap_or_default();
                let len = body.content_length();
                tx.send_replace(FetchState::Uncacheable { len });
                relay(body, &digest, clients).await;
                Ok(None)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Some((len, source))) => {
                self.mark_disk_ok();
                tracing::info!(upstream = up.name(), repo = %repository, %digest, bytes = len,
                    seconds = started.elapsed().as_secs_f64(), "blob cached");
                tx.send_replace(FetchState::Done { len, source });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(upstream = up.name(), repo = %repository, %digest, error = %e, "blob download failed; nothing cached");
                tx.send_replace(FetchState::Failed(e));
            }
        }
        self.blobs.lock().expect("blob map lock").remove(&digest);
        self.metrics.inflight_fetches.dec();
    }

    /// Downloads into a new write to the store, or hands the body back when the blob is
    /// not to be cached.
    pub(super) async fn download_to(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        fetch: &BlobFetch,
        tx: &watch::Sender<FetchState>,
    ) -> Result<Downloaded, ProxyError> {
        let (mut body, elsewhere, lease) = self
            .download_body(up, repository, digest, fetch.via)
            .await?;
        if elsewhere {
            // The owner (or a process that held the fetch lease) caches it: this replica
            // relays it to its clients.
            return Ok(Downloaded::Uncacheable { body });
        }
        let len = body.content_length();
        // With a size limit, a blob of unknown size cannot be accounted for: stream it.
        // Without one, it may take a share of the room the store can spare, no more.
        let reservation = match len {
            Some(l) => self.reserve(l).await,
            None if self.index.limit().is_none() => self.reserve(self.unknown_length_room()).await,
            None => None,
        };
        let Some(mut reservation) = reservation else {
            return Ok(Downloaded::Uncacheable { body });
        };
        let room = len.unwrap_or(reservation.size());
        let mut write = match self.store().begin(digest, len).await {
            Ok(w) => w,
            Err(e) => {
                // Not cached, still served: the clients get the body relayed.
                if e.is_full() {
                    self.mark_disk_full("cannot begin a download");
                } else {
                    tracing::warn!(%digest, error = %e, "cannot write to the cache store; relaying the blob uncached");
                }
                return Ok(Downloaded::Uncacheable { body });
            }
        };
        reservation.wrote(write.set_aside());
        let source = Source(write.written());
        // The clients that waited read the write from now on, as later ones do.
        fetch.relay.lock().expect("relay lock").take();
        tx.send_replace(FetchState::Streaming {
            len,
            written: 0,
            source: source.clone(),
        });
        let mut hasher = Hasher::new(digest.algorithm());
        // Bytes received, and bytes in the store that the clients may read.
        let mut received = 0u64;
        let mut readable = 0u64;
        let mut batch: Vec<Bytes> = Vec::new();
        loop {
            // Wait for one chunk, then take whatever else is already here, so that writes
            // and reader wake-ups happen per ~256 KiB rather than per network packet.
            let mut ended = false;
            let mut batch_len = 0;
            let next = match body.ready() {
                Some(next) => next,
                None => {
                    // Nothing to go on with yet: let the clients have what was written
                    // meanwhile, before waiting for the upstream.
                    let now = write.flush().await.map_err(|e| self.store_failed(e))?;
                    landed(now, &mut readable, &mut reservation, tx);
                    body.next().await
                }
            };
            match next? {
                Some(data) => {
                    batch_len += data.len();
                    batch.push(data);
                }
                None => ended = true,
            }
            while !ended && batch_len < CHUNK {
                match body.ready() {
                    None => break,
                    Some(Ok(None)) => ended = true,
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Some(data))) => {
                        batch_len += data.len();
                        batch.push(data);
                    }
                }
            }
            received += batch_len as u64;
            if len.is_some_and(|l| received > l) {
                return Err(ProxyError::UpstreamInvalid(
                    "blob body longer than its Content-Length".into(),
                ));
            }
            // A body of unknown length (which could go on for ever) is written only into
            // the room set aside for it, and only while a client reads it.
            if len.is_none() && received > room {
                return Err(ProxyError::UpstreamInvalid(
                    format!("a blob of unknown length went past the {room} bytes set aside for it")
                        .into(),
                ));
            }
            if len.is_none() && fetch.followers.load(Ordering::SeqCst) == 0 {
                return Err(ProxyError::UpstreamInvalid(
                    "a blob of unknown length no client reads any more".into(),
                ));
            }
            for chunk in &batch {
                hasher.update(chunk);
            }
            // The store writes this batch while the next one is received and hashed; at
            // the end, everything must be readable before the digest is checked.
            let mut now = write
                .append(std::mem::take(&mut batch))
                .await
                .map_err(|e| self.store_failed(e))?;
            if ended {
                now = write.flush().await.map_err(|e| self.store_failed(e))?;
            }
            landed(now, &mut readable, &mut reservation, tx);
            if ended {
                break;
            }
        }
        let written = readable;
        if let Some(want) = len.filter(|l| *l != written) {
            return Err(UpstreamError::Truncated { got: written, want }.into());
        }
        let got = hasher.finish();
        if got != *digest {
            return Err(ProxyError::UpstreamInvalid(
                format!("blob content hashes to {got}, not {digest}").into(),
            ));
        }
        // The clients need not wait for the commit: what they read is verified already.
        tx.send_replace(FetchState::Verified {
            len: written,
            source: source.clone(),
        });
        Ok(Downloaded::Stored {
            len: written,
            reservation,
            write,
            source,
            lease,
        })
    }

    /// A blob's body from the replica `via` that owns it, or from the upstream when there
    /// is none or it cannot answer; says whether it came from the owner.
    async fn blob_body(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> Result<(BlobBody, bool), ProxyError> {
        if let Some(body) = self.owner_body(up, repository, digest, via).await {
            return Ok((body, true));
        }
        Ok((up.blob(repository, digest).await?, false))
    }

    /// The room a download of unknown length may take: half of what the store can spare
    /// beside the margin (other downloads need room too), [`UNKNOWN_LENGTH_ROOM`] at most.
    fn unknown_length_room(&self) -> u64 {
        let spare = self
            .store()
            .free_space()
            .map_or(UNKNOWN_LENGTH_ROOM, |free| {
                free.saturating_sub(DISK_MARGIN) / 2
            });
        spare.min(UNKNOWN_LENGTH_ROOM)
    }

    /// The blob from the replica `via` that owns it; `None` when there is none or it
    /// did not answer well.
    async fn owner_body(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> Option<BlobBody> {
        let (owner, peers) = (via?, self.peers.as_ref()?);
        match up.blob_via(owner, peers, repository, digest).await {
            Ok(body) => {
                self.metrics.peer_fetch(PeerFetch::Owner);
                Some(body)
            }
            Err(e) => {
                self.metrics.peer_fetch(PeerFetch::Failed);
                tracing::warn!(%owner, %digest, error = %e, "the replica that owns the blob did not serve it; fetching it here");
                None
            }
        }
    }

    /// A download's body, as [`Self::blob_body`] gets it, and whether another process
    /// caches it (this one then relays it). Before the upstream is asked, the store's
    /// fetch lease is taken ([`BlobStore::claim_fetch`]): while a process this one does
    /// not know holds it, the blob is awaited in the store and read from there, for up to
    /// [`FOREIGN_FETCH_WAIT`]. The lease held is returned, to be dropped once the blob is
    /// committed.
    async fn download_body(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> Result<(BlobBody, bool, FetchLease), ProxyError> {
        if let Some(body) = self.owner_body(up, repository, digest, via).await {
            return Ok((body, true, None));
        }
        let deadline = Instant::now() + FOREIGN_FETCH_WAIT;
        let mut waited = false;
        loop {
            match self.store().claim_fetch(digest).await {
                FetchClaim::Mine(lease) => {
                    // Let go of just now: stored by then, perhaps.
                    if waited && let Some(body) = self.stored_body(up, digest).await {
                        return Ok((body, true, None));
                    }
                    return Ok((up.blob(repository, digest).await?, false, lease));
                }
                FetchClaim::Elsewhere if Instant::now() >= deadline => {
                    tracing::warn!(%digest, waited = ?FOREIGN_FETCH_WAIT,
                        "another process still fetches this blob into the shared store; fetching it here too");
                    return Ok((up.blob(repository, digest).await?, false, None));
                }
                FetchClaim::Elsewhere => {
                    waited = true;
                    tokio::time::sleep(FOREIGN_FETCH_POLL).await;
                    if let Some(body) = self.stored_body(up, digest).await {
                        self.metrics.peer_fetch(PeerFetch::Leased);
                        return Ok((body, true, None));
                    }
                }
            }
        }
    }

    /// The blob as the store has it (committed by another process), if it does.
    async fn stored_body(&self, up: &Upstream, digest: &Digest) -> Option<BlobBody> {
        let blob = self.store().open(digest).await.ok()??;
        let len = blob.len();
        let (timeout, floor) = (up.timeout(), up.min_rate());
        Some(BlobBody::stored(
            len,
            blob.read(0, len, None),
            timeout,
            floor,
        ))
    }

    /// What a download that the store failed (writing or committing it) says; a full
    /// store also turns caching off for a while.
    fn store_failed(&self, e: StoreError) -> ProxyError {
        if e.is_full() {
            self.mark_disk_full("a download ran out of space");
        }
        e.into()
    }

    /// The running download of `digest`, if there is one.
    pub(super) fn running(&self, digest: &Digest) -> Option<Arc<BlobFetch>> {
        self.blobs
            .lock()
            .expect("blob map lock")
            .get(digest)
            .cloned()
    }

    /// Waits until a running download of `digest`, if there is one, has stored the blob
    /// (clients may have had all of it before that, see [`FetchState::Verified`]).
    pub async fn stored(&self, digest: &Digest) -> Result<(), ProxyError> {
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
                        | FetchState::Unstored { .. }
                        | FetchState::Uncacheable { .. }
                )
            })
            .await
            .map_err(|_| ProxyError::internal("download task ended without a result"))?
            .clone();
        match state {
            FetchState::Failed(e) | FetchState::Unstored { error: e, .. } => Err(e),
            _ => Ok(()),
        }
    }
}

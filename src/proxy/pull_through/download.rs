//! A blob's download: one task per missing digest, asking the replica that owns it, a
//! process that holds the store's fetch lease, or the upstream. It reserves room, begins
//! a write to the store ([`BlobWrite`]) and hashes as it goes; every client reads what was
//! written as it grows ([`Written`], see [`super::live_reader`]). The last byte is
//! withheld until the digest is verified, and the write is committed only when it
//! matches. A blob that cannot be cached is relayed instead ([`super::relay`]).

use super::blobs::Blobs;
use super::fetch::{BlobFetch, FetchState, Source};
use super::relay::relay;
use super::space::DISK_MARGIN;
use crate::oci::{Digest, Hasher};
use crate::proxy::error::ProxyError;
use crate::proxy::index::Reservation;
use crate::proxy::metrics::PeerFetch;
use crate::proxy::store::{BlobWrite, CHUNK, FetchClaim, FetchLease, LeaseReplicas, StoreError};
use crate::proxy::upstream::{BlobBody, Upstream, UpstreamError};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a download waits for a blob that a process this replica does not know (a
/// mirror in another cluster sharing the bucket) is fetching into the store, before it
/// fetches the blob itself.
pub const FOREIGN_FETCH_WAIT: Duration = Duration::from_secs(60);

/// How often the store is looked at meanwhile.
const FOREIGN_FETCH_POLL: Duration = Duration::from_secs(1);

/// How long a batch of a download's body is gathered, from its first chunk, before it is
/// written and its clients woken (unless it fills [`CHUNK`] first): a slow upstream's
/// packets come a few hundred microseconds apart, and each batch costs a write and a
/// wake-up of every client that follows the download. At 250 Mbit/s
/// a batch fills in about 8 ms; short enough that no client notices.
const BATCH_WAIT: Duration = Duration::from_millis(10);

/// The most a blob of unknown length (no `Content-Length`) is written into the cache.
const UNKNOWN_LENGTH_ROOM: u64 = 8 << 30;

/// What the replica that owns a blob gave for it.
enum FromOwner {
    Body(BlobBody),
    /// There is none: no peers, or this replica owns the blob.
    NoOwner,
    /// It answered, but not with the blob.
    Failed,
    /// It could not be reached: a fetch lease it holds is taken over at once (see
    /// [`LeaseReplicas`]).
    Gone(SocketAddr),
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
        /// Relayed from the replica that owns it, which stores it: written for this
        /// replica's clients only, never committed here.
        local: bool,
    },
    /// Not to be cached: the body is still to be read.
    Uncacheable { body: BlobBody },
}

/// A download's write, as its clients see it.
pub(super) struct Landing<'a> {
    write: &'a mut dyn BlobWrite,
    reservation: &'a mut Reservation,
    tx: &'a watch::Sender<FetchState>,
    /// Bytes in the store that the clients may read.
    readable: u64,
}

impl Landing<'_> {
    /// Records that the store holds `now` bytes the clients may read: they are off the
    /// space still to be taken, and the clients are told.
    fn landed(&mut self, now: u64) {
        if now > self.readable {
            self.reservation.wrote(now - self.readable);
            self.readable = now;
            self.tx.send_modify(|s| {
                if let FetchState::Streaming { written, .. } = s {
                    *written = now;
                }
            });
        }
    }
}

impl Blobs {
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
                local,
            }) if local => {
                // The owner stores it; what is left here is the spool, for its readers
                // and as this replica's own copy (see `store::s3::local`).
                drop((reservation, lease));
                if let Err(e) = write.commit(digest.clone()).await {
                    tracing::warn!(%digest, error = %e, "could not keep the owner's blob as a local copy");
                }
                tracing::info!(upstream = up.name(), repo = %repository, %digest, bytes = len,
                    seconds = started.elapsed().as_secs_f64(), "blob relayed from the replica that owns it");
                tx.send_replace(FetchState::Unstored {
                    len,
                    source,
                    error: ProxyError::internal("stored by the replica that owns it"),
                });
                Ok(None)
            }
            Ok(Downloaded::Stored {
                len,
                reservation,
                write,
                source,
                lease,
                ..
            }) => {
                // Before the index has it: a client of this repository that finds it
                // there unlinked, before this download's first client links it, must
                // not have to prove it again.
                self.fetched_for(&fetch.origin, &digest);
                let committed = self
                    .space
                    .index()
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
                self.space.mark_disk_ok();
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
        self.downloads
            .lock()
            .expect("blob map lock")
            .remove(&digest);
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
        // The owner (or a process that held the fetch lease) caches it: this replica
        // spools it for its clients alone (all of them follow one copy over the owner's
        // link), or relays it through memory where the store has no spool.
        let len = body.content_length();
        let Some((mut reservation, mut write)) = self.begin_write(digest, len, elsewhere).await
        else {
            // Not cached, still served: the clients get the body relayed.
            return Ok(Downloaded::Uncacheable { body });
        };
        let room = len.unwrap_or(reservation.size());
        let source = Source(write.written());
        // The clients that waited read the write from now on, as later ones do.
        fetch.relay.lock().expect("relay lock").take();
        tx.send_replace(FetchState::Streaming {
            len,
            written: 0,
            source: source.clone(),
        });
        let mut into = Landing {
            write: write.as_mut(),
            reservation: &mut reservation,
            tx,
            readable: 0,
        };
        let got = self
            .stream(&mut body, &mut into, digest, (len, room), fetch)
            .await?;
        let written = into.readable;
        if let Some(want) = len.filter(|l| *l != written) {
            return Err(UpstreamError::Truncated { got: written, want }.into());
        }
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
            local: elsewhere,
        })
    }

    /// Room for a blob of `len` bytes (or of unknown length) and a write to the store
    /// begun for it (`local`: for this replica's clients alone, see
    /// [`crate::proxy::store::BlobStore::begin_local`]); `None` when it is not to be
    /// cached. With a size limit, a blob of
    /// unknown size cannot be accounted for: it is streamed. Without one, it may take a
    /// share of the room the store can spare, no more.
    async fn begin_write(
        &self,
        digest: &Digest,
        len: Option<u64>,
        local: bool,
    ) -> Option<(Reservation, Box<dyn BlobWrite>)> {
        let mut reservation = match len {
            Some(l) => self.space.reserve(l).await,
            None if self.space.index().limit().is_none() => {
                self.space.reserve(self.unknown_length_room()).await
            }
            None => None,
        }?;
        let begun = match local {
            false => self.space.store().begin(digest, len).await.map(Some),
            true => self.space.store().begin_local(digest, len).await,
        };
        match begun {
            Ok(Some(write)) => {
                reservation.wrote(write.set_aside());
                Some((reservation, write))
            }
            Ok(None) => None,
            Err(e) => {
                if e.is_full() {
                    self.space.mark_disk_full("cannot begin a download");
                } else {
                    tracing::warn!(%digest, error = %e, "cannot write to the cache store; relaying the blob uncached");
                }
                None
            }
        }
    }

    /// Streams `body` into the write, hashing it; says what it hashes to. `len` is the
    /// length the upstream announced, `room` the most that may be written.
    async fn stream(
        &self,
        body: &mut BlobBody,
        into: &mut Landing<'_>,
        digest: &Digest,
        (len, room): (Option<u64>, u64),
        fetch: &BlobFetch,
    ) -> Result<Digest, ProxyError> {
        let mut hasher = Hasher::new(digest.algorithm());
        let mut received = 0u64;
        loop {
            let (batch, ended) = self.next_batch(body, into).await?;
            received += batch.iter().map(|b| b.len() as u64).sum::<u64>();
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
            let mut now = into
                .write
                .append(batch)
                .await
                .map_err(|e| self.store_failed(e))?;
            if ended {
                now = into.write.flush().await.map_err(|e| self.store_failed(e))?;
            }
            into.landed(now);
            if ended {
                return Ok(hasher.finish());
            }
        }
    }

    /// The next chunks of `body`: one waited for, then whatever else comes within
    /// [`BATCH_WAIT`] of it (up to [`CHUNK`]), so that writes and reader wake-ups happen
    /// per ~256 KiB rather than per network packet, however slowly the upstream sends;
    /// and whether the body ended.
    async fn next_batch(
        &self,
        body: &mut BlobBody,
        into: &mut Landing<'_>,
    ) -> Result<(Vec<Bytes>, bool), ProxyError> {
        let mut batch = Vec::new();
        let mut batch_len = 0;
        let next = match body.ready() {
            Some(next) => next,
            None => {
                // Nothing to go on with yet: let the clients have what was written
                // meanwhile, before waiting for the upstream.
                let now = into.write.flush().await.map_err(|e| self.store_failed(e))?;
                into.landed(now);
                body.next().await
            }
        };
        let Some(data) = next? else {
            return Ok((batch, true));
        };
        batch_len += data.len();
        batch.push(data);
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch_len < CHUNK {
            let more = match body.ready() {
                Some(more) => more,
                // Cancel-safe: a chunk is taken whole or not at all.
                None => match tokio::time::timeout_at(deadline, body.next()).await {
                    Ok(more) => more,
                    Err(_) => break,
                },
            };
            match more {
                Ok(None) => return Ok((batch, true)),
                Err(e) => return Err(e.into()),
                Ok(Some(data)) => {
                    batch_len += data.len();
                    batch.push(data);
                }
            }
        }
        Ok((batch, false))
    }

    /// A blob's body from the replica `via` that owns it, or from the upstream when there
    /// is none or it cannot answer; says whether it came from the owner.
    pub(super) async fn blob_body(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> Result<(BlobBody, bool), ProxyError> {
        if let FromOwner::Body(body) = self.owner_body(up, repository, digest, via).await {
            return Ok((body, true));
        }
        Ok((up.blob(repository, digest).await?, false))
    }

    /// The room a download of unknown length may take: half of what the store can spare
    /// beside the margin (other downloads need room too), [`UNKNOWN_LENGTH_ROOM`] at most.
    fn unknown_length_room(&self) -> u64 {
        let spare = self
            .space
            .store()
            .free_space()
            .map_or(UNKNOWN_LENGTH_ROOM, |free| {
                free.saturating_sub(DISK_MARGIN) / 2
            });
        spare.min(UNKNOWN_LENGTH_ROOM)
    }

    /// The blob from the replica `via` that owns it, if there is one and it serves it.
    async fn owner_body(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> FromOwner {
        let (Some(owner), Some(peers)) = (via, self.peers.as_ref()) else {
            return FromOwner::NoOwner;
        };
        match up.blob_via(owner, peers, repository, digest).await {
            Ok(body) => {
                self.metrics.peer_fetch(PeerFetch::Owner);
                FromOwner::Body(body)
            }
            Err(e) => {
                self.metrics.peer_fetch(PeerFetch::Failed);
                tracing::warn!(%owner, %digest, error = %e, "the replica that owns the blob did not serve it; fetching it here");
                match e {
                    UpstreamError::Unreachable { .. } => FromOwner::Gone(owner),
                    _ => FromOwner::Failed,
                }
            }
        }
    }

    /// A download's body, as [`Self::blob_body`] gets it, and whether another process
    /// caches it (this one then relays it). Before the upstream is asked, the store's
    /// fetch lease is taken ([`BlobStore::claim_fetch`]): while a process this one does
    /// not know holds it, the blob is awaited in the store and read from there, for up to
    /// [`FOREIGN_FETCH_WAIT`]. A lease of the owner that could not be reached just now is
    /// taken over at once. The lease held is returned, to be dropped once the blob is
    /// committed.
    async fn download_body(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        via: Option<SocketAddr>,
    ) -> Result<(BlobBody, bool, FetchLease), ProxyError> {
        let gone = match self.owner_body(up, repository, digest, via).await {
            FromOwner::Body(body) => return Ok((body, true, None)),
            FromOwner::Gone(owner) => Some(owner),
            FromOwner::NoOwner | FromOwner::Failed => None,
        };
        let replicas = LeaseReplicas {
            me: self.peers.as_ref().map(|p| p.me()),
            gone,
        };
        let deadline = Instant::now() + FOREIGN_FETCH_WAIT;
        let mut waited = false;
        loop {
            match self.space.store().claim_fetch(digest, replicas).await {
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
        let blob = self.space.store().open(digest).await.ok()??;
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
            self.space.mark_disk_full("a download ran out of space");
        }
        e.into()
    }
}

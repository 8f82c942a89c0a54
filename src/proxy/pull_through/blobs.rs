//! Blobs: one download per missing digest, shared by every request for it. The download
//! runs on its own task ([`super::download`]); every client (the first included) reads
//! what was written as it grows ([`super::live_reader`]), so a slow client never slows the
//! download and memory stays bounded whatever the blob size. The last byte is withheld
//! until the digest is verified: a client can never receive a complete body that does not
//! match. A blob that cannot be cached is relayed through memory to the clients that
//! waited for it ([`super::relay`]); HEADs of uncached blobs are coalesced too.

use super::fetch::{BlobFetch, FetchState, Follower, Joined};
use super::live_reader::LiveReader;
use super::relay::{RELAY_DEPTH, relay, relay_answer};
use super::single_flight::{SingleFlight, Waiting};
use super::space::Space;
use super::{BlobAnswer, ByteRange};
use crate::oci::Digest;
use crate::proxy::error::ProxyError;
use crate::proxy::metrics::{CacheResult, Metrics};
use crate::proxy::peers::Peers;
use crate::proxy::upstream::{Asker, Upstream};
use crate::proxy::zero_copy::Spans;
use futures::stream::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

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

/// The blobs of the cache: the downloads running, one per digest, shared by every client
/// that asks; the HEADs of uncached blobs, one per repository and digest at a time; the
/// replicas that own what this one misses.
pub struct Blobs {
    pub(super) space: Arc<Space>,
    pub(super) metrics: Metrics,
    pub(super) downloads: Mutex<HashMap<Digest, Arc<BlobFetch>>>,
    heads: SingleFlight<(String, Digest), Result<Option<u64>, ProxyError>>,
    /// The replicas that share the store, when there are any (see [`Peers`]).
    pub(super) peers: Option<Arc<Peers>>,
    /// The last [`FETCHED_KEPT`] blobs downloaded whole and verified, each with the
    /// repository it was downloaded for (its flights key, see [`origin`]): the upstream
    /// served it there, as a link proof would ask.
    fetched: Mutex<VecDeque<(String, Digest)>>,
}

/// How many downloads [`Blobs`] remembers the repository of: enough to outlast the
/// moment between a download's commit and its first client's link.
const FETCHED_KEPT: usize = 1024;

impl Blobs {
    /// The blobs of the cache in `space`, asking the replica that owns a missing blob
    /// for it when there are `peers`.
    pub fn new(space: Arc<Space>, metrics: Metrics, peers: Option<Arc<Peers>>) -> Blobs {
        Blobs {
            space,
            downloads: Mutex::new(HashMap::new()),
            heads: SingleFlight::new(metrics.fetch_waiters.clone()),
            metrics,
            peers,
            fetched: Mutex::new(VecDeque::new()),
        }
    }

    /// Remembers that `digest` was downloaded whole for `origin`.
    pub(super) fn fetched_for(&self, origin: &str, digest: &Digest) {
        let mut fetched = self.fetched.lock().expect("fetched lock");
        if fetched.len() == FETCHED_KEPT {
            fetched.pop_front();
        }
        fetched.push_back((origin.to_string(), digest.clone()));
    }

    /// Whether `digest` was lately downloaded for `repository` of `up`.
    fn fetched_lately(&self, up: &Upstream, repository: &str, digest: &Digest) -> bool {
        let origin = origin(up, repository);
        let fetched = self.fetched.lock().expect("fetched lock");
        fetched.iter().any(|(o, d)| d == digest && *o == origin)
    }

    /// The replicas that share the store with this one, if there are any.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    /// A blob (body or HEAD), from the cache, a running download, or a new one.
    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        ask: BlobAsk<'_>,
    ) -> Result<BlobAnswer, ProxyError> {
        match self.answer(up, repository, digest, ask).await {
            // Downloaded for this repository, and committed before its first client
            // linked it: the upstream served it there, which is the proof.
            Err(ProxyError::NotLinked) if self.fetched_lately(up, repository, digest) => {
                let ask = BlobAsk {
                    unlinked: false,
                    ..ask
                };
                self.answer(up, repository, digest, ask).await
            }
            answer => answer,
        }
    }

    /// [`Self::blob`], taking `ask.unlinked` as it is.
    async fn answer(
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
        let via_owner = leader && fetch.via.is_some();
        let len = match state {
            FetchState::Failed(e) => return Err(e),
            FetchState::Uncacheable { len } => {
                let result = if leader {
                    CacheResult::Miss
                } else {
                    CacheResult::Coalesced
                };
                return match relayed {
                    Some(rx) => Ok(BlobAnswer {
                        via_owner,
                        ..relay_answer(rx, len, result)
                    }),
                    None => self.pass_through(up, repository, digest, fetch.via).await,
                };
            }
            FetchState::Streaming { len, .. } => len,
            FetchState::Verified { len, .. }
            | FetchState::Done { len, .. }
            | FetchState::Unstored { len, .. } => Some(len),
            FetchState::Connecting => unreachable!("waited for a later state"),
        };
        let answer = live_answer(rx, len, range, spans, follower, leader)?;
        Ok(BlobAnswer {
            via_owner,
            ..answer
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
        let mut map = self.downloads.lock().expect("blob map lock");
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
        if self.space.index().contains(digest) {
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
        let fetch = Arc::new(BlobFetch::new(rx, via, origin));
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
                    via_owner: false,
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
            via_owner: false,
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
        Ok(BlobAnswer {
            via_owner: via.is_some(),
            ..relay_answer(rx, len, CacheResult::Miss)
        })
    }

    /// The running download of `digest`, if there is one.
    pub(super) fn running(&self, digest: &Digest) -> Option<Arc<BlobFetch>> {
        self.downloads
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

/// The answer of a client that follows a download: the bytes (of its `range`, if
/// satisfiable) read from the write as it grows, for as long as the client reads them.
fn live_answer(
    rx: watch::Receiver<FetchState>,
    len: Option<u64>,
    range: Option<ByteRange>,
    spans: Option<&Spans>,
    follower: Follower,
    leader: bool,
) -> Result<BlobAnswer, ProxyError> {
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
        via_owner: false,
    })
}

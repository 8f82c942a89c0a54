//! One download's state, as its clients see it: where it is ([`FetchState`]), what it
//! has written ([`Source`]), who follows it ([`Follower`]), who joined before its first
//! answer (the relay's clients). Shared by the blobs' front ([`super::blobs`]), the
//! download task ([`super::download`]) and the clients' readers ([`super::live_reader`]).

use super::relay::{RELAY_DEPTH, RelayTx};
use crate::proxy::error::ProxyError;
use crate::proxy::store::Written;
use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

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
    pub(super) followers: AtomicUsize,
}

/// A client following a download, until it is dropped (its body ended or went away).
pub(super) struct Follower(Arc<BlobFetch>);

impl Follower {
    pub(super) fn of(fetch: &Arc<BlobFetch>) -> Follower {
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
    /// A download that has not answered yet, asking the replica `via` if there is one.
    pub(super) fn new(
        state: watch::Receiver<FetchState>,
        via: Option<SocketAddr>,
        origin: String,
    ) -> BlobFetch {
        BlobFetch {
            state,
            via,
            origin,
            relay: Mutex::new(Some(Vec::new())),
            followers: AtomicUsize::new(0),
        }
    }

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

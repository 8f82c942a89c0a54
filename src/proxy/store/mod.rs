//! Where the cache keeps its objects: the seam between the cache's logic and the bytes.
//!
//! The cache ([`crate::proxy::pull_through`]) and its [`crate::proxy::index`] talk to a
//! [`BlobStore`] and never to file paths. A store holds content-addressed objects (blobs,
//! and manifests with their media type), tag records and link records. Its writes are begun, appended to
//! and committed under a digest the caller has verified, so that an object becomes visible
//! whole or not at all (a rename on a disk, the completion of a multipart upload in an
//! object store); a write dropped before its commit leaves nothing. Its reads are ranges of
//! a committed object (a file range, a ranged GET). While a write runs, the clients
//! waiting for it follow what it has written so far through [`Written`].
//!
//! [`disk::DiskStore`] is the local-disk store: it keeps the page-cache reads and the
//! `sendfile(2)` ranges of its `file_body` module. [`s3::S3Store`] keeps the cache in an
//! S3-compatible bucket that several replicas share ([`BlobStore::shared`]).

pub mod disk;
mod file_body;
pub mod s3;

use crate::oci::{Algorithm, Digest};
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use disk::DiskStore;
pub use file_body::CHUNK;
#[cfg(test)]
pub(crate) use file_body::PageCache;

/// A store's failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store has no room left for what is being written.
    #[error("no space left in the cache store while {0}")]
    Full(&'static str),
    /// Reading or writing failed.
    #[error("cache store failed while {what}: {source}")]
    Io {
        /// What the store was doing.
        what: &'static str,
        /// The cause.
        source: Arc<io::Error>,
    },
}

impl StoreError {
    /// `what` failed with `e`: [`StoreError::Full`] when `e` says there is no space left.
    pub fn io(what: &'static str, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            StoreError::Full(what)
        } else {
            StoreError::Io {
                what,
                source: Arc::new(e),
            }
        }
    }

    /// Whether the store is out of space.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full(_))
    }
}

/// A store operation's result.
pub type StoreResult<T> = Result<T, StoreError>;

/// One committed object, as [`BlobStore::list`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The digest it is stored under.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last used as far as the store knows ([`BlobStore::touch`]),
    /// milliseconds since the epoch.
    pub used_ms: u64,
    /// Whether it was stored as a manifest (with a media type).
    pub manifest: bool,
}

/// A cached manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// Its bytes (they hash to the digest it was asked for).
    pub body: Bytes,
    /// The media type it was served with.
    pub media_type: String,
}

/// Where a tag last pointed, persisted so a restart keeps serving (and serving stale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TagRecord {
    /// Upstream registry.
    pub upstream: String,
    /// Canonical repository.
    pub repository: String,
    /// The tag.
    pub tag: String,
    /// Digest of the manifest the tag resolved to.
    pub digest: String,
    /// When the upstream last confirmed it, milliseconds since the epoch.
    pub checked_at_ms: u64,
}

/// Which tag: upstream registry, canonical repository, tag.
#[derive(Debug, Clone, Copy)]
pub struct TagKey<'a> {
    /// Upstream registry.
    pub upstream: &'a str,
    /// Canonical repository.
    pub repository: &'a str,
    /// The tag.
    pub tag: &'a str,
}

impl TagRecord {
    /// Whether this record is `key`'s.
    pub fn is_for(&self, key: TagKey<'_>) -> bool {
        self.upstream == key.upstream && self.repository == key.repository && self.tag == key.tag
    }

    /// Which tag it is.
    pub fn key(&self) -> TagKey<'_> {
        TagKey {
            upstream: &self.upstream,
            repository: &self.repository,
            tag: &self.tag,
        }
    }

    /// As stored.
    pub fn to_bytes(&self) -> Bytes {
        serde_json::to_vec(self)
            .expect("a tag record serializes")
            .into()
    }

    /// `key`'s record from what was stored under its name: `None` when it cannot be read
    /// (as good as absent: the upstream is asked again) or is another tag's (the name is
    /// a hash).
    pub fn parse_for(bytes: &[u8], key: TagKey<'_>) -> Option<TagRecord> {
        serde_json::from_slice::<TagRecord>(bytes)
            .ok()
            .filter(|r| r.is_for(key))
    }
}

/// Every tag and link record of a store (see [`BlobStore::records`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    /// The tag records.
    pub tags: Vec<TagRecord>,
    /// The link records.
    pub links: Vec<LinkRecord>,
}

impl Records {
    /// Adds a record file's `bytes`, found in the store's `tags` or `links` folder.
    pub fn add(&mut self, folder: &str, bytes: &[u8]) {
        match folder {
            "tags" => self.tags.extend(serde_json::from_slice(bytes).ok()),
            _ => self.links.extend(serde_json::from_slice(bytes).ok()),
        }
    }
}

/// Which repository of which upstream: the key of a [`LinkRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoKey {
    /// Upstream registry.
    pub upstream: String,
    /// Canonical repository.
    pub repository: String,
}

/// The digests an upstream served under one repository (see [`crate::proxy::links`]):
/// what the cache may serve under that repository's name, with the blobs and child
/// manifests the manifests among them reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkRecord {
    /// Upstream registry.
    pub upstream: String,
    /// Canonical repository.
    pub repository: String,
    /// The digests linked directly, sorted.
    pub digests: Vec<String>,
}

impl LinkRecord {
    /// Which repository it is.
    pub fn key(&self) -> RepoKey {
        RepoKey {
            upstream: self.upstream.clone(),
            repository: self.repository.clone(),
        }
    }

    /// As stored.
    pub fn to_bytes(&self) -> Bytes {
        serde_json::to_vec(self)
            .expect("a link record serializes")
            .into()
    }

    /// `key`'s record from what was stored under its name: `None` when it cannot be read
    /// (its links are proven again by asking the upstream) or is another repository's.
    pub fn parse_for(bytes: &[u8], key: &RepoKey) -> Option<LinkRecord> {
        serde_json::from_slice::<LinkRecord>(bytes)
            .ok()
            .filter(|r| r.upstream == key.upstream && r.repository == key.repository)
    }
}

/// The name a repository's link record is stored under: a hash of the key, as for tags.
pub fn link_name(key: &RepoKey) -> String {
    record_name(&[&key.upstream, &key.repository])
}

/// The name a record is stored under: the hex SHA-256 of its key's parts, joined by NUL
/// (any key, a name safe as a file or object name).
fn record_name(parts: &[&str]) -> String {
    Digest::of(Algorithm::Sha256, parts.join("\0").as_bytes())
        .hex()
        .to_string()
}

/// The cache's storage. The [`crate::proxy::index::Index`] decides what is added and
/// removed; a store does what it is told and keeps no accounting of its own.
pub trait BlobStore: Send + Sync + 'static {
    /// Every committed object, to rebuild the index at start. Debris of an earlier run
    /// (partial writes, half-removed objects) is cleaned up first.
    fn list(&self) -> BoxFuture<'_, StoreResult<Vec<Listed>>>;

    /// Every committed object, also those other processes added: a shared bucket's whole
    /// listing (which [`Self::list`] leaves out, the index filling as objects are used),
    /// for what must see all of it (an image dropped on purpose). By default, `list`.
    fn everything(&self) -> BoxFuture<'_, StoreResult<Vec<Listed>>> {
        self.list()
    }

    /// A committed object for reading; `None` when it is not there.
    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<Box<dyn StoredBlob>>>>;

    /// Begins writing the object `digest`, which the caller verifies as it writes (and
    /// commits only under that digest). With the length known, the store may set the
    /// space aside at once, so that a full store says so here rather than in the middle
    /// of the download.
    fn begin<'a>(
        &'a self,
        digest: &'a Digest,
        len: Option<u64>,
    ) -> BoxFuture<'a, StoreResult<Box<dyn BlobWrite>>>;

    /// Begins a write of `digest` for this process's clients alone, that another
    /// process (the replica that owns the digest) stores: its commit makes nothing
    /// visible. A store shared by replicas has one (the spool its downloads are read
    /// from); others have none, and such a download is relayed through memory.
    fn begin_local<'a>(
        &'a self,
        _digest: &'a Digest,
        _len: Option<u64>,
    ) -> BoxFuture<'a, StoreResult<Option<Box<dyn BlobWrite>>>> {
        Box::pin(async { Ok(None) })
    }

    /// Removes an object (and its media type). Removing what is not there is no error.
    fn remove<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<()>>;

    /// Records that an object was used now, so that a restart knows its last use. Best
    /// effort, in the background.
    fn touch(&self, digest: &Digest);

    /// A cached manifest. Content that no longer matches its digest (corruption) is
    /// reported as absent.
    fn manifest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<StoredManifest>>>;

    /// Stores a verified manifest and its media type.
    fn put_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        body: Bytes,
        media_type: &'a str,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// The persisted record of a tag, if there is one.
    fn tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<Option<TagRecord>>>;

    /// Persists a tag record.
    fn put_tag<'a>(&'a self, record: &'a TagRecord) -> BoxFuture<'a, StoreResult<()>>;

    /// Forgets a tag.
    fn delete_tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<()>>;

    /// The persisted link record of a repository, if there is one. Stores that keep none
    /// (test doubles) have none: links are then proven again after a restart.
    fn links<'a>(&'a self, _key: &'a RepoKey) -> BoxFuture<'a, StoreResult<Option<LinkRecord>>> {
        Box::pin(async { Ok(None) })
    }

    /// Persists a repository's link record, replacing the one before.
    fn put_links<'a>(&'a self, _record: &'a LinkRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Every tag record and every link record the store holds, for a bundle's export
    /// (see [`crate::proxy::bundle`]); records that cannot be read are left out. Stores
    /// that keep none (test doubles) have none.
    fn records(&self) -> BoxFuture<'_, StoreResult<Records>> {
        Box::pin(async { Ok(Records::default()) })
    }

    /// Bytes the store can still take, when it has such a bound (a volume does, a bucket
    /// does not).
    fn free_space(&self) -> Option<u64>;

    /// Whether the store can be used at all (the readiness check): why not, if not.
    fn check(&self) -> StoreResult<()>;

    /// A short-lived URL a client can GET a committed blob from directly, when the store
    /// is set up to hand them out (an S3 bucket with `redirect`); `None` otherwise.
    fn presign<'a>(&'a self, _digest: &'a Digest) -> BoxFuture<'a, StoreResult<Option<String>>> {
        Box::pin(async { Ok(None) })
    }

    /// Writes down the uses recorded by [`Self::touch`] since the last call, and
    /// `in_use` (objects being read) as used now, where other processes need to know
    /// them (the access records of a shared bucket with a size limit). Nothing by default.
    fn record_uses(&self, _in_use: Vec<Digest>) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether this process is to fetch the missing blob `digest` from the upstream, or
    /// another one sharing the store (one that this process's replicas do not know,
    /// such as a mirror in another cluster) is fetching it into the store now. Stores
    /// that keep no such leases say it is this one's, always.
    fn claim_fetch<'a>(
        &'a self,
        _digest: &'a Digest,
        _replicas: LeaseReplicas,
    ) -> BoxFuture<'a, FetchClaim> {
        Box::pin(async { FetchClaim::Mine(None) })
    }

    /// Whether other processes add objects to this store too (replicas sharing a
    /// bucket): an object the index does not know may still be there. Such a store's
    /// objects can also change under any name without this process knowing (whoever may
    /// write the bucket), so every whole read of one is verified against its digest.
    fn shared(&self) -> bool {
        false
    }
}

/// A store's lease on a fetch (see [`FetchClaim`]), held until dropped; `None` where the
/// store keeps none.
pub type FetchLease = Option<Box<dyn std::any::Any + Send + Sync>>;

/// What a fetch lease knows of the replicas that share the store: this one's address,
/// kept in a lease it takes, and the address of one that did not answer (it died, or
/// cannot be reached): a lease that one holds is taken over at once, not when it runs
/// out, since nobody renews it and clients wait meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseReplicas {
    /// This replica, when it has peers.
    pub me: Option<SocketAddr>,
    /// A replica that just did not answer.
    pub gone: Option<SocketAddr>,
}

/// Who fetches a missing blob from the upstream (see [`BlobStore::claim_fetch`]).
pub enum FetchClaim {
    /// This process: the store's lease on the fetch, if it keeps one, is held until
    /// this is dropped (after the blob is committed).
    Mine(FetchLease),
    /// Another process is fetching it into the store now.
    Elsewhere,
}

/// The name a tag's record is stored under: a hash of the key, so that no client input
/// ever becomes a path.
pub fn tag_name(key: TagKey<'_>) -> String {
    record_name(&[key.upstream, key.repository, key.tag])
}

/// A committed object open for reading.
pub trait StoredBlob: Send {
    /// Its size.
    fn len(&self) -> u64;

    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this process checked its bytes against the digest when it wrote them
    /// (a replica's copy of a bucket's blob), so that it is read as a verified file.
    fn verified(&self) -> bool {
        false
    }

    /// Its `count` bytes from `start` (which the caller checked against [`Self::len`]), a
    /// chunk at a time. With `spans` (an HTTP/1 connection, see
    /// [`crate::proxy::zero_copy`]), a store that can may hand over file ranges to send
    /// instead of bytes.
    fn read(
        self: Box<Self>,
        start: u64,
        count: u64,
        spans: Option<Spans>,
    ) -> BoxStream<'static, io::Result<Bytes>>;
}

/// An object being written. Dropped before [`BlobWrite::commit`], it is aborted: nothing
/// of it stays visible or billed.
pub trait BlobWrite: Send {
    /// Hands `chunks` over to be appended, in order, and says how many bytes of the
    /// object (of all handed over so far) its followers can read now. A store may write
    /// them at once (the disk store does, into the page cache), in the background (the
    /// disk store, when writes are slow, so that the next chunks are received and hashed
    /// meanwhile) or buffer them into larger parts: the call waits at most for what was
    /// handed over before, and for a write into memory.
    fn append(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, StoreResult<u64>>;

    /// Waits until all that was handed over can be read, and says how much that is.
    fn flush(&mut self) -> BoxFuture<'_, StoreResult<u64>>;

    /// Bytes of the volume that the store took for the object when it began (see
    /// [`BlobStore::begin`]): they are no longer space still to be taken.
    fn set_aside(&self) -> u64 {
        0
    }

    /// What was written so far, for the readers that follow the write. It stays readable
    /// for them after the commit, and after an abort, as long as they hold it.
    fn written(&self) -> Arc<dyn Written>;

    /// Makes the object durable and visible under `digest`, which its bytes hash to (the
    /// digest it was begun with).
    fn commit(self: Box<Self>, digest: Digest) -> BoxFuture<'static, StoreResult<()>>;
}

/// The bytes of a write in progress, as far as they are written.
pub trait Written: Send + Sync {
    /// A new reader of them.
    fn reader(&self) -> StoreResult<Box<dyn WrittenReader>>;
}

/// One client's reader of a write in progress.
pub trait WrittenReader: Send {
    /// Between 1 and `left.min(max)` (`left` > 0) of the bytes at `pos`, which the caller
    /// knows are written. With `spans`, a file range to send where the store can.
    fn read<'a>(
        &'a mut self,
        spans: Option<&'a Spans>,
        pos: u64,
        left: u64,
    ) -> BoxFuture<'a, io::Result<Bytes>>;
}

/// Milliseconds since the epoch now.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! The cache's index: what is stored, how big, when last used, which manifests reference
//! which blobs, and what is being read right now. It enforces the size limit by evicting
//! least recently used objects, never a pinned one or one being served, and it is the one
//! place that adds objects to or removes them from the store ([`BlobStore`]): what goes
//! is decided under its lock, so eviction and commits cannot interleave, and the store's
//! I/O runs outside it. An object being removed or committed is busy: a commit of it waits
//! until that is over, so a removal never deletes what a later commit stored.
//!
//! It survives restarts by being rebuilt from the store: sizes, last use (touched, at
//! most once a minute, on use), manifest references by parsing the manifests.

mod removal;
#[cfg(test)]
mod tests;
pub use removal::Removal;

use super::metrics::Metrics;
use super::store::{BlobStore, BlobWrite, Listed, StoreResult, unix_now_ms};
use crate::oci::Digest;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// How often a use is recorded in the store.
const PERSIST_EVERY_MS: u64 = 60_000;

/// One cached object.
#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    last_used_ms: u64,
    persisted_ms: u64,
    in_use: u32,
    /// For manifests: the digests they reference (children, config, layers).
    refs: Option<Vec<Digest>>,
    /// Whether this process knows the stored bytes match the digest: it committed them
    /// (verified as they were written) or read them back whole and checked them. What
    /// it found in the store at start, or another process stored, is not known to.
    verified: bool,
}

impl Entry {
    fn new(size: u64, used_ms: u64, refs: Option<Vec<Digest>>) -> Entry {
        Entry {
            size,
            last_used_ms: used_ms,
            persisted_ms: used_ms,
            in_use: 0,
            refs,
            verified: false,
        }
    }

    /// An object this process has just committed, with verified bytes.
    fn committed(size: u64, refs: Option<Vec<Digest>>) -> Entry {
        Entry {
            verified: true,
            ..Entry::new(size, unix_now_ms(), refs)
        }
    }
}

#[derive(Default, Clone)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    total: u64,
    /// Sizes of the objects being downloaded or written (with or without a limit).
    reserved: u64,
    /// Bytes of those already written (see [`Reservation::wrote`]).
    written: u64,
    /// Objects being removed from the store or committed to it (see [`Busy`]).
    busy: HashSet<Digest>,
}

/// The index of one cache store.
pub struct Index {
    store: Arc<dyn BlobStore>,
    limit: Option<u64>,
    metrics: Metrics,
    inner: Mutex<Inner>,
    /// Woken whenever an object stops being busy.
    settled: Notify,
    /// How many times a commit waited for a busy object (tests).
    #[cfg(test)]
    commit_waits: std::sync::atomic::AtomicUsize,
}

/// An object being committed: no removal takes it, and other commits of it wait, until
/// this is dropped.
struct Busy<'a> {
    index: &'a Index,
    digest: Digest,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut inner = self.index.inner.lock().expect("index lock");
        inner.busy.remove(&self.digest);
        drop(inner);
        self.index.settled.notify_waiters();
    }
}

/// Why an object cannot be cached now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Under the size limit: everything else is pinned or in use, or the object is
    /// larger than the whole cache.
    Limit,
    /// On the volume: the free space, less what the downloads in progress will still
    /// write, is smaller than the object.
    Disk,
}

/// Space set aside for a download; given back when dropped unless committed.
pub struct Reservation {
    index: Arc<Index>,
    size: u64,
    written: u64,
}

impl Reservation {
    /// The bytes set aside.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Records that `bytes` more of the object are on disk: they no longer count as
    /// space still to be taken from the volume.
    pub fn wrote(&mut self, bytes: u64) {
        let bytes = bytes.min(self.size.saturating_sub(self.written));
        if bytes > 0 {
            self.written += bytes;
            self.index.inner.lock().expect("index lock").written += bytes;
        }
    }

    fn release(&mut self, inner: &mut Inner) {
        inner.reserved = inner.reserved.saturating_sub(self.size);
        inner.written = inner.written.saturating_sub(self.written);
        self.size = 0;
        self.written = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.size > 0 {
            let index = self.index.clone();
            let mut inner = index.inner.lock().expect("index lock");
            self.release(&mut inner);
        }
    }
}

/// A cached object being read: it cannot be evicted until this is dropped.
pub struct UseGuard {
    index: Arc<Index>,
    digest: Digest,
}

impl Drop for UseGuard {
    fn drop(&mut self) {
        let mut inner = self.index.inner.lock().expect("index lock");
        if let Some(e) = inner.entries.get_mut(&self.digest) {
            e.in_use = e.in_use.saturating_sub(1);
        }
    }
}

/// The digests a manifest references: an index's manifests, an image's config and layers
/// (and an artifact's blobs). Not its `subject`, which it does not own.
pub fn manifest_refs(body: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |d: &serde_json::Value| {
        if let Some(d) = d
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
        {
            out.push(d);
        }
    };
    for key in ["manifests", "layers", "blobs"] {
        if let Some(list) = v.get(key).and_then(|l| l.as_array()) {
            list.iter().for_each(&mut push);
        }
    }
    if let Some(c) = v.get("config") {
        push(c);
    }
    out
}

impl Index {
    /// Rebuilds the index from the store (at start). If the store holds more than `limit`
    /// (the limit was lowered), [`Index::reserve`] evicts down to it, pins known, once the
    /// cache is running. A manifest that no longer matches its digest is removed.
    pub async fn rebuild(
        store: Arc<dyn BlobStore>,
        limit: Option<u64>,
        metrics: Metrics,
    ) -> StoreResult<Arc<Index>> {
        let mut entries = Vec::new();
        for listed in store.list().await? {
            let refs = if listed.manifest {
                match store.manifest(&listed.digest).await? {
                    Some(m) => Some(manifest_refs(&m.body)),
                    None => {
                        store.remove(&listed.digest).await?;
                        continue;
                    }
                }
            } else {
                None
            };
            entries.push((listed, refs));
        }
        Ok(Index::of_listing(store, entries, limit, metrics))
    }

    /// The index of the objects `entries` list (with, for a manifest, the digests it
    /// references), as [`Self::rebuild`] builds it from the store's own listing.
    pub fn of_listing(
        store: Arc<dyn BlobStore>,
        entries: Vec<(Listed, Option<Vec<Digest>>)>,
        limit: Option<u64>,
        metrics: Metrics,
    ) -> Arc<Index> {
        let mut inner = Inner::default();
        for (listed, refs) in entries {
            inner.total += listed.size;
            inner
                .entries
                .insert(listed.digest, Entry::new(listed.size, listed.used_ms, refs));
        }
        let index = Arc::new(Index {
            store,
            limit,
            metrics,
            inner: Mutex::new(inner),
            settled: Notify::new(),
            #[cfg(test)]
            commit_waits: Default::default(),
        });
        index
            .metrics
            .cache_limit_bytes
            .set(limit.unwrap_or(0) as i64);
        index.publish();
        index
    }

    fn publish(&self) {
        let inner = self.inner.lock().expect("index lock");
        self.metrics.cache_size_bytes.set(inner.total as i64);
        self.metrics.cache_blobs.set(inner.entries.len() as i64);
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// The size limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Bytes committed.
    pub fn total(&self) -> u64 {
        self.inner.lock().expect("index lock").total
    }

    /// Whether the object is cached.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner
            .lock()
            .expect("index lock")
            .entries
            .contains_key(digest)
    }

    /// Whether this process knows the stored bytes of `digest` match it (see
    /// [`Self::set_verified`]): it committed them, or read them back and checked them.
    pub fn verified(&self, digest: &Digest) -> bool {
        self.inner
            .lock()
            .expect("index lock")
            .entries
            .get(digest)
            .is_some_and(|e| e.verified)
    }

    /// Records that the stored bytes of `digest` were read back whole and match it.
    pub fn set_verified(&self, digest: &Digest) {
        if let Some(e) = self
            .inner
            .lock()
            .expect("index lock")
            .entries
            .get_mut(digest)
        {
            e.verified = true;
        }
    }

    /// Marks a cached object (blob or manifest: a manifest is a blob too) as in use, and
    /// used now. `None` when it is not cached.
    pub fn acquire(self: &Arc<Self>, digest: &Digest) -> Option<UseGuard> {
        self.acquire_if(digest, |_| true)
    }

    /// Like [`Self::acquire`], for manifests only: a blob's digest asked for as a manifest
    /// is not cached as one, and must not be touched.
    pub fn acquire_manifest(self: &Arc<Self>, digest: &Digest) -> Option<UseGuard> {
        self.acquire_if(digest, |e| e.refs.is_some())
    }

    /// Whether `digest` is a cached manifest (`Some(false)`: a blob); `None` when this
    /// index does not know it.
    pub fn is_manifest(&self, digest: &Digest) -> Option<bool> {
        let inner = self.inner.lock().expect("index lock");
        inner.entries.get(digest).map(|e| e.refs.is_some())
    }

    /// Counts an object that another process committed to a shared store (see
    /// [`BlobStore::shared`]), found there with `size` (and, for a manifest, its `refs`),
    /// and marks it in use as [`Self::acquire`] does.
    pub fn adopt(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        refs: Option<Vec<Digest>>,
    ) -> UseGuard {
        let mut inner = self.inner.lock().expect("index lock");
        if !inner.entries.contains_key(digest) {
            let entry = Entry::new(size, unix_now_ms(), refs);
            self.add_locked(&mut inner, digest, entry);
        }
        if let Some(e) = inner.entries.get_mut(digest) {
            e.in_use += 1;
            e.last_used_ms = unix_now_ms();
            e.persisted_ms = e.last_used_ms;
        }
        drop(inner);
        self.store.touch(digest);
        self.publish();
        UseGuard {
            index: self.clone(),
            digest: digest.clone(),
        }
    }

    fn acquire_if(
        self: &Arc<Self>,
        digest: &Digest,
        wanted: impl Fn(&Entry) -> bool,
    ) -> Option<UseGuard> {
        let now = unix_now_ms();
        let persist = {
            let mut inner = self.inner.lock().expect("index lock");
            let e = inner.entries.get_mut(digest).filter(|e| wanted(e))?;
            e.in_use += 1;
            e.last_used_ms = now;
            let due = now.saturating_sub(e.persisted_ms) >= PERSIST_EVERY_MS;
            if due {
                e.persisted_ms = now;
            }
            due
        };
        if persist {
            // Last use survives a restart.
            self.store.touch(digest);
        }
        Some(UseGuard {
            index: self.clone(),
            digest: digest.clone(),
        })
    }

    /// Sets `size` bytes aside, evicting least recently used objects (except `pinned`
    /// ones and those in use) as needed under the size limit. `free` is the space the
    /// store can give (what is free less a safety margin), when known: the object must
    /// fit in it beside what the downloads in progress will still write, so that
    /// concurrent downloads never overcommit the disk.
    pub async fn reserve(
        self: &Arc<Self>,
        size: u64,
        pinned: &HashSet<Digest>,
        free: Option<u64>,
    ) -> Result<Reservation, NoRoom> {
        let mut doomed = Vec::new();
        let reserved = self.reserve_locked(size, pinned, free, &mut doomed);
        if !doomed.is_empty() {
            let removal = self.remove_doomed(doomed).await;
            let evicted = (removal.manifests.len() + removal.blobs.len()) as u64;
            self.metrics.cache_evictions.inc_by(evicted);
            tracing::info!(
                objects = evicted,
                bytes = removal.bytes,
                "evicted least recently used objects"
            );
        }
        reserved
    }

    fn reserve_locked(
        self: &Arc<Self>,
        size: u64,
        pinned: &HashSet<Digest>,
        free: Option<u64>,
        doomed: &mut Vec<(Digest, Entry)>,
    ) -> Result<Reservation, NoRoom> {
        let mut inner = self.inner.lock().expect("index lock");
        let pending = inner.reserved.saturating_sub(inner.written);
        if free.is_some_and(|free| free < pending.saturating_add(size)) {
            return Err(NoRoom::Disk);
        }
        if let Some(limit) = self.limit {
            if size > limit {
                return Err(NoRoom::Limit);
            }
            let wanted = inner.total + inner.reserved + size;
            if wanted > limit {
                self.evict_locked(&mut inner, wanted - limit, pinned, doomed);
            }
            if inner.total + inner.reserved + size > limit {
                return Err(NoRoom::Limit);
            }
        }
        inner.reserved += size;
        Ok(Reservation {
            index: self.clone(),
            size,
            written: 0,
        })
    }

    /// Makes `digest` busy for a commit: waits while it is being removed or committed,
    /// and says `None` when it is cached by the time it is free.
    async fn claim(&self, digest: &Digest) -> Option<Busy<'_>> {
        loop {
            let settled = {
                let mut inner = self.inner.lock().expect("index lock");
                if inner.entries.contains_key(digest) {
                    return None;
                }
                if inner.busy.insert(digest.clone()) {
                    return Some(Busy {
                        index: self,
                        digest: digest.clone(),
                    });
                }
                // Registered before the lock goes: no wake-up is missed.
                self.settled.notified()
            };
            #[cfg(test)]
            self.commit_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            settled.await;
        }
    }

    fn add_locked(&self, inner: &mut Inner, digest: &Digest, entry: Entry) {
        inner.total += entry.size;
        if let Some(old) = inner.entries.insert(digest.clone(), entry) {
            inner.total = inner.total.saturating_sub(old.size);
        }
    }

    /// Commits a verified download to the store and counts it. Already cached (by a
    /// concurrent commit of the same bytes), the write is dropped.
    pub async fn commit_blob(
        &self,
        write: Box<dyn BlobWrite>,
        digest: &Digest,
        size: u64,
        mut reservation: Reservation,
    ) -> StoreResult<()> {
        let Some(busy) = self.claim(digest).await else {
            return Ok(());
        };
        write.commit(digest.clone()).await?;
        let mut inner = self.inner.lock().expect("index lock");
        self.add_locked(&mut inner, digest, Entry::committed(size, None));
        reservation.release(&mut inner);
        drop(inner);
        drop(busy);
        self.publish();
        Ok(())
    }

    /// Stores a verified manifest and its media type, and counts it.
    pub async fn commit_manifest(
        &self,
        digest: &Digest,
        body: Bytes,
        media_type: &str,
        reservation: Reservation,
    ) -> StoreResult<()> {
        let Some(busy) = self.claim(digest).await else {
            return Ok(());
        };
        let refs = manifest_refs(&body);
        let size = body.len() as u64;
        self.store.put_manifest(digest, body, media_type).await?;
        let mut inner = self.inner.lock().expect("index lock");
        self.add_locked(&mut inner, digest, Entry::committed(size, Some(refs)));
        drop(inner);
        drop((busy, reservation));
        self.publish();
        Ok(())
    }

    /// Everything reachable from `roots` through manifest references.
    pub fn closure(&self, roots: impl IntoIterator<Item = Digest>) -> HashSet<Digest> {
        let inner = self.inner.lock().expect("index lock");
        let mut seen = HashSet::new();
        let mut todo: Vec<Digest> = roots.into_iter().collect();
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if let Some(refs) = inner.entries.get(&d).and_then(|e| e.refs.as_ref()) {
                todo.extend(refs.iter().cloned());
            }
        }
        seen
    }

    /// The objects an eviction down to the limit would take now (least recently used
    /// first, a manifest with the blobs only it references; never `pinned` ones or those
    /// in use), without taking them.
    pub fn over_limit(&self, pinned: &HashSet<Digest>) -> Vec<Digest> {
        let Some(limit) = self.limit else {
            return Vec::new();
        };
        let mut inner = self.inner.lock().expect("index lock").clone();
        let over = (inner.total + inner.reserved).saturating_sub(limit);
        let mut doomed = Vec::new();
        if over > 0 {
            self.evict_locked(&mut inner, over, pinned, &mut doomed);
        }
        doomed.into_iter().map(|(d, _)| d).collect()
    }

    /// The objects being read now.
    pub fn in_use(&self) -> Vec<Digest> {
        let inner = self.inner.lock().expect("index lock");
        inner
            .entries
            .iter()
            .filter(|(_, e)| e.in_use > 0)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Ages an object's last use (tests of the eviction order).
    #[cfg(test)]
    pub fn set_last_used(&self, digest: &Digest, ago: std::time::Duration) {
        let mut inner = self.inner.lock().expect("index lock");
        if let Some(e) = inner.entries.get_mut(digest) {
            e.last_used_ms = unix_now_ms().saturating_sub(ago.as_millis() as u64);
        }
    }
}

//! The cache's index: what is on disk, how big, when last used, which manifests reference
//! which blobs, and what is being read right now. It enforces the size limit by evicting
//! least recently used objects, never a pinned one or one being served, and it is the one
//! place that adds files to or removes files from the cache, under one lock, so eviction
//! and commits cannot interleave.
//!
//! It survives restarts by being rebuilt from the files: sizes from their length, last
//! use from their modification time (touched, at most once a minute, on use), manifest
//! references by parsing the manifests.

use super::metrics::Metrics;
use super::storage::{Storage, unix_now_ms};
use crate::oci::Digest;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// How often a use is written to the file's modification time.
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
}

impl Entry {
    fn new(size: u64, used_ms: u64, refs: Option<Vec<Digest>>) -> Entry {
        Entry {
            size,
            last_used_ms: used_ms,
            persisted_ms: used_ms,
            in_use: 0,
            refs,
        }
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    total: u64,
    /// Sizes of the objects being downloaded or written (with or without a limit).
    reserved: u64,
    /// Bytes of those already on disk (see [`Reservation::wrote`]).
    written: u64,
}

/// The index of one cache directory.
pub struct Index {
    storage: Arc<Storage>,
    limit: Option<u64>,
    metrics: Metrics,
    inner: Mutex<Inner>,
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

/// What an eviction or a drop removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removal {
    /// Manifests removed.
    pub manifests: Vec<String>,
    /// Blobs removed.
    pub blobs: Vec<String>,
    /// Bytes freed.
    pub bytes: u64,
    /// Objects kept because a client is reading them.
    pub in_use: Vec<String>,
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

fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Index {
    /// Rebuilds the index from the cache directory (blocking: call at start). If the
    /// directory holds more than `limit` (the limit was lowered), [`Index::reserve`] evicts
    /// down to it, pins known, once the cache is running.
    pub fn rebuild(
        storage: Arc<Storage>,
        limit: Option<u64>,
        metrics: Metrics,
    ) -> io::Result<Arc<Index>> {
        let mut inner = Inner::default();
        for (digest, path) in storage.list_blobs()? {
            let meta = std::fs::metadata(&path)?;
            let used = mtime_ms(&meta);
            let refs = if storage.meta_path(&digest).exists() {
                Some(manifest_refs(&std::fs::read(&path)?))
            } else {
                None
            };
            inner.total += meta.len();
            inner
                .entries
                .insert(digest, Entry::new(meta.len(), used, refs));
        }
        // A media type file whose manifest is gone (crash between the two deletions).
        for digest in storage.list_meta()? {
            if !inner.entries.contains_key(&digest) {
                let _ = std::fs::remove_file(storage.meta_path(&digest));
            }
        }
        let index = Arc::new(Index {
            storage,
            limit,
            metrics,
            inner: Mutex::new(inner),
        });
        index
            .metrics
            .cache_limit_bytes
            .set(limit.unwrap_or(0) as i64);
        index.publish();
        Ok(index)
    }

    fn publish(&self) {
        let inner = self.inner.lock().expect("index lock");
        self.metrics.cache_size_bytes.set(inner.total as i64);
        self.metrics.cache_blobs.set(inner.entries.len() as i64);
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
            // Last use survives a restart through the file's modification time.
            let path = self.storage.blob_path(digest);
            tokio::task::spawn_blocking(move || {
                let t = SystemTime::now();
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t));
                }
            });
        }
        Some(UseGuard {
            index: self.clone(),
            digest: digest.clone(),
        })
    }

    /// Drops an object that turned out to be unusable (a file missing or corrupt): its
    /// entry and whatever of its files is left, so that the index and the disk agree.
    /// Blocking: it deletes files.
    pub fn discard(&self, digest: &Digest) {
        let mut inner = self.inner.lock().expect("index lock");
        if let Some(e) = inner.entries.remove(digest) {
            inner.total = inner.total.saturating_sub(e.size);
        }
        for path in [
            self.storage.blob_path(digest),
            self.storage.meta_path(digest),
        ] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(%digest, error = %e, "could not remove an unusable cached object");
                }
                _ => {}
            }
        }
        drop(inner);
        self.publish();
    }

    /// Sets `size` bytes aside, evicting least recently used objects (except `pinned`
    /// ones and those in use) as needed under the size limit. `free` is the space the
    /// volume can give (what is free less a safety margin), when known: the object must
    /// fit in it beside what the downloads in progress will still write, so that
    /// concurrent downloads never overcommit the disk. Blocking: it deletes files.
    pub fn reserve(
        self: &Arc<Self>,
        size: u64,
        pinned: &HashSet<Digest>,
        free: Option<u64>,
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
                self.evict_locked(&mut inner, wanted - limit, pinned);
            }
            if inner.total + inner.reserved + size > limit {
                return Err(NoRoom::Limit);
            }
        }
        inner.reserved += size;
        drop(inner);
        self.publish();
        Ok(Reservation {
            index: self.clone(),
            size,
            written: 0,
        })
    }

    /// Moves a verified download into the cache. Blocking.
    pub fn commit_blob(
        &self,
        temp: &Path,
        digest: &Digest,
        size: u64,
        mut reservation: Reservation,
    ) -> io::Result<()> {
        let mut inner = self.inner.lock().expect("index lock");
        std::fs::rename(temp, self.storage.blob_path(digest))?;
        let now = unix_now_ms();
        if let Some(old) = inner
            .entries
            .insert(digest.clone(), Entry::new(size, now, None))
        {
            inner.total = inner.total.saturating_sub(old.size);
        }
        inner.total += size;
        reservation.release(&mut inner);
        drop(inner);
        self.publish();
        Ok(())
    }

    /// Stores a verified manifest and its media type. Blocking.
    pub fn commit_manifest(
        &self,
        digest: &Digest,
        body: &[u8],
        media_type: &str,
        mut reservation: Reservation,
    ) -> io::Result<()> {
        let mut inner = self.inner.lock().expect("index lock");
        reservation.release(&mut inner);
        if inner.entries.contains_key(digest) {
            return Ok(());
        }
        self.storage
            .write_atomic_sync(&self.storage.meta_path(digest), media_type.as_bytes())?;
        self.storage
            .write_atomic_sync(&self.storage.blob_path(digest), body)?;
        let now = unix_now_ms();
        let size = body.len() as u64;
        inner.entries.insert(
            digest.clone(),
            Entry::new(size, now, Some(manifest_refs(body))),
        );
        inner.total += size;
        drop(inner);
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

    /// Removes the manifests `roots` (and the manifests an index among them lists), and
    /// every blob they reference that no other cached manifest references. Objects being
    /// read are kept and reported. Blocking.
    pub fn drop_images(&self, roots: &[Digest], pinned: &HashSet<Digest>) -> Removal {
        let mut inner = self.inner.lock().expect("index lock");
        let mut removal = Removal::default();
        let mut manifests: Vec<Digest> = Vec::new();
        let mut todo: Vec<Digest> = roots.to_vec();
        while let Some(d) = todo.pop() {
            if manifests.contains(&d) {
                continue;
            }
            if let Some(refs) = inner.entries.get(&d).and_then(|e| e.refs.as_ref()) {
                manifests.push(d.clone());
                // An index's children are manifests too; an image's refs are blobs.
                todo.extend(
                    refs.iter()
                        .filter(|r| inner.entries.get(*r).is_some_and(|e| e.refs.is_some()))
                        .cloned(),
                );
            }
        }
        let mut counts = Self::ref_counts(&inner);
        let mut victims: Vec<Digest> = manifests.clone();
        for m in &manifests {
            let refs = inner.entries[m].refs.clone().unwrap_or_default();
            for r in Self::orphans(&inner, &mut counts, &refs, pinned) {
                if !victims.contains(&r) {
                    victims.push(r);
                }
            }
        }
        for d in victims {
            self.remove_locked(&mut inner, &d, &mut removal);
        }
        drop(inner);
        self.publish();
        removal
    }

    /// How many cached manifests reference each digest.
    fn ref_counts(inner: &Inner) -> HashMap<Digest, usize> {
        let mut counts = HashMap::new();
        for refs in inner.entries.values().filter_map(|e| e.refs.as_ref()) {
            for r in refs {
                *counts.entry(r.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Takes a manifest that goes off the reference counts and returns the blobs it leaves
    /// referenced by no cached manifest (pinned ones excepted).
    fn orphans(
        inner: &Inner,
        counts: &mut HashMap<Digest, usize>,
        refs: &[Digest],
        pinned: &HashSet<Digest>,
    ) -> Vec<Digest> {
        let mut out = Vec::new();
        for r in refs {
            let Some(n) = counts.get_mut(r) else {
                continue;
            };
            *n = n.saturating_sub(1);
            let blob = inner.entries.get(r).is_some_and(|e| e.refs.is_none());
            if *n == 0 && blob && !pinned.contains(r) && !out.contains(r) {
                out.push(r.clone());
            }
        }
        out
    }

    fn remove_locked(&self, inner: &mut Inner, d: &Digest, removal: &mut Removal) -> bool {
        let Some(e) = inner.entries.get(d) else {
            return false;
        };
        if e.in_use > 0 {
            removal.in_use.push(d.to_string());
            return false;
        }
        let manifest = e.refs.is_some();
        match std::fs::remove_file(self.storage.blob_path(d)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(digest = %d, error = %err, "could not remove a cached object");
                return false;
            }
        }
        if manifest {
            let _ = std::fs::remove_file(self.storage.meta_path(d));
            removal.manifests.push(d.to_string());
        } else {
            removal.blobs.push(d.to_string());
        }
        let e = inner.entries.remove(d).expect("checked above");
        inner.total = inner.total.saturating_sub(e.size);
        removal.bytes += e.size;
        true
    }

    /// Evicts least recently used objects until `need` bytes are freed or nothing more
    /// may go. A manifest takes with it the blobs only it referenced.
    fn evict_locked(&self, inner: &mut Inner, need: u64, pinned: &HashSet<Digest>) -> u64 {
        let mut candidates: Vec<(u64, Digest)> = inner
            .entries
            .iter()
            .filter(|(d, e)| e.in_use == 0 && !pinned.contains(*d))
            .map(|(d, e)| (e.last_used_ms, d.clone()))
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.hex().cmp(b.1.hex())));
        let mut removal = Removal::default();
        // Counted once, kept up to date as manifests go: not recounted per victim.
        let mut counts: Option<HashMap<Digest, usize>> = None;
        for (_, d) in candidates {
            if removal.bytes >= need {
                break;
            }
            let refs = inner.entries.get(&d).and_then(|e| e.refs.clone());
            if refs.is_some() && counts.is_none() {
                counts = Some(Self::ref_counts(inner));
            }
            if !self.remove_locked(inner, &d, &mut removal) {
                continue;
            }
            if let Some(refs) = refs {
                let counts = counts
                    .as_mut()
                    .expect("counted before the first manifest went");
                for r in Self::orphans(inner, counts, &refs, pinned) {
                    self.remove_locked(inner, &r, &mut removal);
                }
            }
        }
        let evicted = (removal.manifests.len() + removal.blobs.len()) as u64;
        if evicted > 0 {
            self.metrics.cache_evictions.inc_by(evicted);
            tracing::info!(
                objects = evicted,
                bytes = removal.bytes,
                "evicted least recently used objects"
            );
        }
        removal.bytes
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use std::time::Duration;

    fn setup(limit: Option<u64>) -> (tempfile::TempDir, Arc<Index>) {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _) = Storage::open(dir.path()).unwrap();
        let index = Index::rebuild(Arc::new(storage), limit, Metrics::new()).unwrap();
        (dir, index)
    }

    fn add_blob(index: &Arc<Index>, bytes: &[u8]) -> Digest {
        let d = Digest::of(Algorithm::Sha256, bytes);
        let r = index
            .reserve(bytes.len() as u64, &HashSet::new(), None)
            .unwrap();
        let temp = index.storage.temp_path();
        std::fs::write(&temp, bytes).unwrap();
        index.commit_blob(&temp, &d, bytes.len() as u64, r).unwrap();
        d
    }

    fn add_manifest(index: &Arc<Index>, refs: &[&Digest]) -> Digest {
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": refs[0].to_string(), "size": 1},
            "layers": refs[1..].iter().map(|d| serde_json::json!({"digest": d.to_string(), "size": 1})).collect::<Vec<_>>()
        }))
        .unwrap();
        let d = Digest::of(Algorithm::Sha256, &body);
        let r = index
            .reserve(body.len() as u64, &HashSet::new(), None)
            .unwrap();
        index
            .commit_manifest(&d, &body, "application/vnd.oci.image.manifest.v1+json", r)
            .unwrap();
        d
    }

    #[tokio::test]
    async fn evicts_least_recently_used_but_never_pinned_or_in_use() {
        let (_dir, index) = setup(Some(3000));
        let a = add_blob(&index, &[1; 1000]);
        let b = add_blob(&index, &[2; 1000]);
        let c = add_blob(&index, &[3; 1000]);
        index.set_last_used(&a, Duration::from_secs(30));
        index.set_last_used(&b, Duration::from_secs(20));
        index.set_last_used(&c, Duration::from_secs(10));
        // a is pinned, b is being read: c, the newest, is the one that can go.
        let guard = index.acquire(&b).unwrap();
        let pinned = HashSet::from([a.clone()]);
        let r = index.reserve(1000, &pinned, None).unwrap();
        assert!(index.contains(&a) && index.contains(&b) && !index.contains(&c));
        drop(r);
        // Nothing else may go: no room.
        assert!(index.reserve(2000, &pinned, None).is_err());
        drop(guard);
        // Now b (least recently used unpinned) goes.
        let _r = index.reserve(1500, &pinned, None).unwrap();
        assert!(!index.contains(&b));
        assert!(!index.storage.blob_path(&b).exists(), "the file went too");
        assert!(
            index.reserve(5000, &pinned, None).is_err(),
            "larger than the cache"
        );
    }

    #[tokio::test]
    async fn a_manifest_takes_its_own_blobs_along_and_state_survives_restart() {
        let (dir, index) = setup(Some(10_000));
        let shared = add_blob(&index, &[9; 500]);
        let own = add_blob(&index, &[8; 500]);
        let m1 = add_manifest(&index, &[&shared, &own]);
        let other = add_blob(&index, &[7; 500]);
        let m2 = add_manifest(&index, &[&shared, &other]);
        assert_eq!(
            index.closure([m1.clone()]),
            HashSet::from([m1.clone(), shared.clone(), own.clone()])
        );
        let removal = index.drop_images(std::slice::from_ref(&m1), &HashSet::new());
        assert_eq!(removal.manifests, vec![m1.to_string()]);
        assert_eq!(
            removal.blobs,
            vec![own.to_string()],
            "the shared blob stays with m2"
        );
        assert!(index.contains(&shared) && index.contains(&m2));
        let total = index.total();

        // A new process rebuilds the same index from the files.
        let (storage, _) = Storage::open(dir.path()).unwrap();
        let again = Index::rebuild(Arc::new(storage), Some(10_000), Metrics::new()).unwrap();
        assert_eq!(again.total(), total);
        assert!(again.contains(&m2) && again.contains(&shared) && !again.contains(&own));
        assert_eq!(
            again.closure([m2.clone()]).len(),
            3,
            "references re-parsed from the manifest"
        );
        // A lower limit at start: the first reservation evicts down to it.
        let (storage, _) = Storage::open(dir.path()).unwrap();
        let small = Index::rebuild(Arc::new(storage), Some(600), Metrics::new()).unwrap();
        assert!(small.total() > 600);
        drop(small.reserve(0, &HashSet::new(), None).unwrap());
        assert!(small.total() <= 600, "{}", small.total());
    }

    #[tokio::test]
    async fn downloads_in_progress_count_against_the_free_space() {
        let (_dir, index) = setup(None);
        let none = HashSet::new();
        // 50 bytes free: a 20-byte download fits, twice; a third does not while the two
        // have written nothing.
        let mut a = index.reserve(20, &none, Some(50)).unwrap();
        let b = index.reserve(20, &none, Some(50)).unwrap();
        assert_eq!(index.reserve(20, &none, Some(50)).err(), Some(NoRoom::Disk));
        // What a download has written is already out of the free space measured: with
        // 15 bytes written, 35 are free and 25 still to come.
        a.wrote(15);
        assert_eq!(index.reserve(11, &none, Some(35)).err(), Some(NoRoom::Disk));
        let c = index.reserve(10, &none, Some(35)).unwrap();
        drop((b, c));
        // Writing past its size counts only up to it.
        a.wrote(100);
        assert!(
            index.reserve(45, &none, Some(50)).is_ok(),
            "nothing pending"
        );
        drop(a);
        // Larger than the free space: no room on the disk, whatever else runs.
        assert_eq!(index.reserve(60, &none, Some(50)).err(), Some(NoRoom::Disk));
        let inner = index.inner.lock().unwrap();
        assert_eq!((inner.reserved, inner.written), (0, 0), "all given back");
    }

    #[test]
    fn manifest_refs_cover_indexes_images_and_artifacts() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = serde_json::json!({"manifests": [{"digest": d('a')}, {"digest": d('b')}], "subject": {"digest": d('f')}});
        assert_eq!(manifest_refs(index.to_string().as_bytes()).len(), 2);
        let image =
            serde_json::json!({"config": {"digest": d('c')}, "layers": [{"digest": d('d')}]});
        assert_eq!(manifest_refs(image.to_string().as_bytes()).len(), 2);
        assert!(manifest_refs(b"not json").is_empty());
    }
}

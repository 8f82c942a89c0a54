//! Taking objects out of the cache: eviction under the size limit, dropping images on
//! purpose, discarding what turned out unusable. What goes is decided under the index's
//! lock ([`Index::take_locked`]); the store removes it afterwards, outside the lock, while
//! the object is busy (see [`super::Busy`]).

use super::{Entry, Index, Inner};
use crate::oci::Digest;
use std::collections::{HashMap, HashSet};

/// What an eviction or a drop removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

impl Removal {
    /// Adds what another removal took.
    pub fn merge(&mut self, other: Removal) {
        let add = |to: &mut Vec<String>, from: Vec<String>| {
            for d in from {
                if !to.contains(&d) {
                    to.push(d);
                }
            }
        };
        add(&mut self.manifests, other.manifests);
        add(&mut self.blobs, other.blobs);
        add(&mut self.in_use, other.in_use);
        self.bytes += other.bytes;
    }
}

impl Index {
    /// Drops an object that turned out to be unusable (missing or corrupt in the store),
    /// also while it is in use: its entry and whatever the store has left of it, so that
    /// the index and the store agree.
    pub async fn discard(&self, digest: &Digest) {
        let mut doomed = Vec::new();
        {
            let mut inner = self.inner.lock().expect("index lock");
            self.take_locked(&mut inner, digest, &mut doomed, None);
        }
        self.remove_doomed(doomed).await;
    }

    /// Removes the manifests `roots` (and the manifests an index among them lists), and
    /// every blob they reference that no other cached manifest references. Objects being
    /// read are kept and reported.
    pub async fn drop_images(&self, roots: &[Digest], pinned: &HashSet<Digest>) -> Removal {
        let mut in_use = Vec::new();
        let mut doomed = Vec::new();
        {
            let mut inner = self.inner.lock().expect("index lock");
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
                self.take_locked(&mut inner, &d, &mut doomed, Some(&mut in_use));
            }
        }
        let mut removal = self.remove_doomed(doomed).await;
        removal.in_use = in_use;
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

    /// Takes an object off the index and marks it busy, for [`Self::remove_doomed`] to
    /// remove from the store. One in use is kept and listed in `in_use`; without
    /// `in_use` (a discard) it goes anyway. One being committed is kept.
    fn take_locked(
        &self,
        inner: &mut Inner,
        d: &Digest,
        doomed: &mut Vec<(Digest, Entry)>,
        in_use: Option<&mut Vec<String>>,
    ) -> bool {
        let Some(e) = inner.entries.get(d) else {
            return false;
        };
        if inner.busy.contains(d) {
            return false;
        }
        if e.in_use > 0
            && let Some(in_use) = in_use
        {
            in_use.push(d.to_string());
            return false;
        }
        let e = inner.entries.remove(d).expect("checked above");
        inner.total = inner.total.saturating_sub(e.size);
        inner.busy.insert(d.clone());
        doomed.push((d.clone(), e));
        true
    }

    /// Removes objects taken off the index from the store. One the store fails to remove
    /// goes back into the index (it is still there), so that the two agree.
    pub(super) async fn remove_doomed(&self, doomed: Vec<(Digest, Entry)>) -> Removal {
        let mut removal = Removal::default();
        for (d, e) in doomed {
            let result = self.store.remove(&d).await;
            let mut inner = self.inner.lock().expect("index lock");
            inner.busy.remove(&d);
            match result {
                Ok(()) => {
                    removal.bytes += e.size;
                    match e.refs {
                        Some(_) => removal.manifests.push(d.to_string()),
                        None => removal.blobs.push(d.to_string()),
                    }
                }
                Err(err) => {
                    tracing::warn!(digest = %d, error = %err, "could not remove a cached object");
                    self.add_locked(&mut inner, &d, e);
                }
            }
            drop(inner);
            self.settled.notify_waiters();
        }
        self.publish();
        removal
    }

    /// Takes least recently used objects off the index until `need` bytes are freed or
    /// nothing more may go. A manifest takes with it the blobs only it referenced.
    pub(super) fn evict_locked(
        &self,
        inner: &mut Inner,
        need: u64,
        pinned: &HashSet<Digest>,
        doomed: &mut Vec<(Digest, Entry)>,
    ) {
        let mut candidates: Vec<(u64, Digest)> = inner
            .entries
            .iter()
            .filter(|(d, e)| e.in_use == 0 && !pinned.contains(*d))
            .map(|(d, e)| (e.last_used_ms, d.clone()))
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.hex().cmp(b.1.hex())));
        let mut freed = 0u64;
        let mut in_use = Vec::new();
        // Counted once, kept up to date as manifests go: not recounted per victim.
        let mut counts: Option<HashMap<Digest, usize>> = None;
        for (_, d) in candidates {
            if freed >= need {
                break;
            }
            let (size, refs) = match inner.entries.get(&d) {
                Some(e) => (e.size, e.refs.clone()),
                None => continue,
            };
            if refs.is_some() && counts.is_none() {
                counts = Some(Self::ref_counts(inner));
            }
            if !self.take_locked(inner, &d, doomed, Some(&mut in_use)) {
                continue;
            }
            freed += size;
            if let Some(refs) = refs {
                let counts = counts
                    .as_mut()
                    .expect("counted before the first manifest went");
                for r in Self::orphans(inner, counts, &refs, pinned) {
                    let size = inner.entries.get(&r).map_or(0, |e| e.size);
                    if self.take_locked(inner, &r, doomed, Some(&mut in_use)) {
                        freed += size;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{add_blob, add_manifest};
    use super::*;
    use crate::oci::Algorithm;
    use crate::proxy::metrics::Metrics;
    use crate::proxy::store::{
        BlobStore, BlobWrite, DiskStore, Listed, StoreResult, StoredBlob, StoredManifest, TagKey,
        TagRecord,
    };
    use bytes::Bytes;
    use futures::future::BoxFuture;
    use std::sync::Arc;
    use tokio::sync::{Semaphore, mpsc};

    /// A disk store whose removals wait at a gate the test opens, and say when they do.
    struct Gated {
        disk: DiskStore,
        entered: mpsc::UnboundedSender<()>,
        gate: Arc<Semaphore>,
    }

    impl BlobStore for Gated {
        fn remove<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<()>> {
            Box::pin(async move {
                let _ = self.entered.send(());
                self.gate.acquire().await.expect("gate open").forget();
                self.disk.remove(digest).await
            })
        }
        fn list(&self) -> BoxFuture<'_, StoreResult<Vec<Listed>>> {
            self.disk.list()
        }
        fn open<'a>(
            &'a self,
            digest: &'a Digest,
        ) -> BoxFuture<'a, StoreResult<Option<Box<dyn StoredBlob>>>> {
            self.disk.open(digest)
        }
        fn begin<'a>(
            &'a self,
            digest: &'a Digest,
            len: Option<u64>,
        ) -> BoxFuture<'a, StoreResult<Box<dyn BlobWrite>>> {
            self.disk.begin(digest, len)
        }
        fn touch(&self, digest: &Digest) {
            self.disk.touch(digest)
        }
        fn manifest<'a>(
            &'a self,
            digest: &'a Digest,
        ) -> BoxFuture<'a, StoreResult<Option<StoredManifest>>> {
            self.disk.manifest(digest)
        }
        fn put_manifest<'a>(
            &'a self,
            digest: &'a Digest,
            body: Bytes,
            media_type: &'a str,
        ) -> BoxFuture<'a, StoreResult<()>> {
            self.disk.put_manifest(digest, body, media_type)
        }
        fn tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<Option<TagRecord>>> {
            self.disk.tag(key)
        }
        fn put_tag<'a>(&'a self, record: &'a TagRecord) -> BoxFuture<'a, StoreResult<()>> {
            self.disk.put_tag(record)
        }
        fn delete_tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<()>> {
            self.disk.delete_tag(key)
        }
        fn free_space(&self) -> Option<u64> {
            self.disk.free_space()
        }
        fn check(&self) -> StoreResult<()> {
            self.disk.check()
        }
    }

    #[tokio::test]
    async fn a_commit_waits_for_a_removal_of_the_same_object_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = DiskStore::open(dir.path()).unwrap();
        let (entered, mut removing) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let store = Gated {
            disk,
            entered,
            gate: gate.clone(),
        };
        let index = Index::rebuild(Arc::new(store), None, Metrics::new())
            .await
            .unwrap();
        let data = [5u8; 3000];
        let blob = add_blob(&index, &data).await;
        let image = add_manifest(&index, &[&blob]).await;

        // Dropping the image: the manifest and its blob are off the index at once, and
        // the store is told to remove them (the first removal waits at the gate).
        let dropping = tokio::spawn({
            let (index, image) = (index.clone(), image.clone());
            async move { index.drop_images(&[image], &HashSet::new()).await }
        });
        removing.recv().await.unwrap();
        assert!(!index.contains(&image) && !index.contains(&blob));

        // Meanwhile the blob is downloaded again: its commit must wait for the removal,
        // or the removal would delete what it stored.
        let r = index.reserve(3000, &HashSet::new(), None).await.unwrap();
        let mut w = index.store().begin(&blob, None).await.unwrap();
        w.append(vec![Bytes::copy_from_slice(&data)]).await.unwrap();
        let commit = tokio::spawn({
            let (index, blob) = (index.clone(), blob.clone());
            async move { index.commit_blob(w, &blob, 3000, r).await }
        });
        let waits = || {
            index
                .commit_waits
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        for _ in 0..100 {
            if waits() > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(waits(), 1, "the commit did not wait");
        assert!(!commit.is_finished());

        gate.add_permits(2);
        let removal = dropping.await.unwrap();
        assert_eq!((removal.manifests.len(), removal.blobs.len()), (1, 1));
        commit.await.unwrap().unwrap();
        assert!(index.contains(&blob));
        assert!(
            index.store().open(&blob).await.unwrap().is_some(),
            "the index has a blob the store lost"
        );
        assert_eq!(index.total(), 3000);
        let other = Digest::of(Algorithm::Sha256, b"never cached");
        index.discard(&other).await;
        assert_eq!(
            index.total(),
            3000,
            "discarding what is not cached changes nothing"
        );
    }
}

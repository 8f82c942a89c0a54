//! A replica's own copies of bucket blobs, on its disk, so that a blob it sends again and
//! again is read from the bucket at most once: a rollout's every node asking one replica
//! for the same layers would otherwise cost one bucket read (and one check of the whole
//! object against its digest) per node.
//!
//! A copy is what this replica already had on its disk, kept instead of dropped: the
//! spool file of a download it stored in the bucket, or of a blob it took from the
//! replica that owns it. Either was hashed as it was written and is kept only when the
//! whole matched its digest, so a copy is served as a verified file is (sendfile, no
//! check), never as a bucket's object is. Copies are kept up to a size (the least
//! recently used go first) and never over the disk's free space less a margin; the
//! directory starts empty at every start.

use crate::oci::Digest;
use crate::proxy::store::disk::DiskStore;
use crate::proxy::store::{BlobStore, BlobWrite, StoreResult, StoredBlob, Written};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Room a copy must leave free on the disk, for the downloads that spool there.
const FREE_MARGIN: u64 = 1 << 30;

/// The copies and their bound.
pub(super) struct LocalCopies {
    store: DiskStore,
    limit: u64,
    held: Mutex<Held>,
}

/// The copies kept: each one's size and when it was last used.
#[derive(Default)]
struct Held {
    copies: HashMap<Digest, (u64, u64)>,
    bytes: u64,
    clock: u64,
}

impl Held {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks the copy of `digest` used now; whether there is one.
    fn used(&mut self, digest: &Digest) -> bool {
        let clock = self.tick();
        self.copies
            .get_mut(digest)
            .map(|(_, used)| *used = clock)
            .is_some()
    }

    /// Counts a copy of `len` bytes kept now.
    fn insert(&mut self, digest: Digest, len: u64) {
        let clock = self.tick();
        if self.copies.insert(digest, (len, clock)).is_none() {
            self.bytes += len;
        }
    }

    /// The least recently used copies to drop for `incoming` more bytes under `limit`.
    fn over(&self, incoming: u64, limit: u64) -> Vec<Digest> {
        let mut by_use: Vec<_> = self.copies.iter().collect();
        by_use.sort_by_key(|(_, (_, used))| *used);
        let mut bytes = self.bytes + incoming;
        let mut out = Vec::new();
        for (digest, (len, _)) in by_use {
            if bytes <= limit {
                break;
            }
            bytes -= len;
            out.push(digest.clone());
        }
        out
    }
}

impl LocalCopies {
    /// Copies under `root` (emptied), `limit` bytes of them at most.
    pub(super) fn new(root: &Path, limit: u64) -> io::Result<LocalCopies> {
        let _ = std::fs::remove_dir_all(root.join("blobs"));
        let (store, _) = DiskStore::open(root)?;
        Ok(LocalCopies {
            store,
            limit,
            held: Mutex::new(Held::default()),
        })
    }

    /// Begins a write (a spool file) that may become a copy.
    pub(super) async fn begin(
        &self,
        digest: &Digest,
        len: Option<u64>,
    ) -> StoreResult<Box<dyn BlobWrite>> {
        self.store.begin(digest, len).await
    }

    /// Keeps `write`, whose `len` bytes hash to `digest`, as a copy if it fits (else it is
    /// dropped, as a spool file is). Never fails: a copy is only a saving.
    pub(super) async fn keep(&self, write: Box<dyn BlobWrite>, digest: Digest, len: u64) {
        let free = self.store.free_space().unwrap_or(0);
        if len > self.limit || free < len.saturating_add(FREE_MARGIN) {
            return;
        }
        let dropped = {
            let held = self.held.lock().expect("local copies lock");
            if held.copies.contains_key(&digest) {
                return;
            }
            held.over(len, self.limit)
        };
        for d in dropped {
            self.remove(&d).await;
        }
        if let Err(e) = write.commit(digest.clone()).await {
            tracing::warn!(%digest, error = %e, "could not keep a local copy of a blob");
            return;
        }
        self.held
            .lock()
            .expect("local copies lock")
            .insert(digest, len);
    }

    /// The copy of `digest`, if this replica keeps one.
    pub(super) async fn open(&self, digest: &Digest) -> Option<Box<dyn StoredBlob>> {
        if !self.held.lock().expect("local copies lock").used(digest) {
            return None;
        }
        match self.store.open(digest).await {
            Ok(Some(blob)) => Some(Box::new(Copy(blob))),
            Ok(None) | Err(_) => {
                self.forget(digest);
                None
            }
        }
    }

    /// Drops the copy of `digest`, if any (readers keep theirs open).
    pub(super) async fn remove(&self, digest: &Digest) {
        if self.forget(digest)
            && let Err(e) = self.store.remove(digest).await
        {
            tracing::warn!(%digest, error = %e, "could not remove a local copy of a blob");
        }
    }

    fn forget(&self, digest: &Digest) -> bool {
        let mut held = self.held.lock().expect("local copies lock");
        match held.copies.remove(digest) {
            Some((len, _)) => {
                held.bytes -= len;
                true
            }
            None => false,
        }
    }

    /// Bytes of the copies kept.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.held.lock().expect("local copies lock").bytes
    }
}

/// A copy open for reading: verified when it was written, by this process.
struct Copy(Box<dyn StoredBlob>);

impl StoredBlob for Copy {
    fn len(&self) -> u64 {
        self.0.len()
    }

    fn verified(&self) -> bool {
        true
    }

    fn read(
        self: Box<Self>,
        start: u64,
        count: u64,
        spans: Option<crate::proxy::zero_copy::Spans>,
    ) -> futures::stream::BoxStream<'static, io::Result<Bytes>> {
        self.0.read(start, count, spans)
    }
}

/// A spool write that only this replica's clients read: the owner of the digest stores
/// it in the bucket, so its commit makes nothing visible there; the spool file is kept as
/// a local copy (when given where), else dropped.
pub(super) struct LocalOnly(
    pub(super) Box<dyn BlobWrite>,
    pub(super) Option<Arc<LocalCopies>>,
);

impl BlobWrite for LocalOnly {
    fn append(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, StoreResult<u64>> {
        self.0.append(chunks)
    }

    fn flush(&mut self) -> BoxFuture<'_, StoreResult<u64>> {
        self.0.flush()
    }

    fn set_aside(&self) -> u64 {
        self.0.set_aside()
    }

    fn written(&self) -> Arc<dyn Written> {
        self.0.written()
    }

    fn commit(self: Box<Self>, digest: Digest) -> BoxFuture<'static, StoreResult<()>> {
        let LocalOnly(mut spool, keep) = *self;
        Box::pin(async move {
            // Not kept, the spool file goes once its readers let go of it.
            if let Some(copies) = keep {
                let len = spool.flush().await?;
                copies.keep(spool, digest, len).await;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use futures::StreamExt;

    async fn kept(copies: &LocalCopies, seed: u8, len: usize) -> Digest {
        let data = vec![seed; len];
        let digest = Digest::of(Algorithm::Sha256, &data);
        let mut write = copies.begin(&digest, Some(len as u64)).await.unwrap();
        write.append(vec![Bytes::from(data)]).await.unwrap();
        let len = write.flush().await.unwrap();
        copies.keep(write, digest.clone(), len).await;
        digest
    }

    async fn read(copies: &LocalCopies, digest: &Digest) -> Option<Vec<u8>> {
        let blob = copies.open(digest).await?;
        assert!(blob.verified());
        let len = blob.len();
        let mut out = Vec::new();
        let mut chunks = blob.read(0, len, None);
        while let Some(c) = chunks.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        Some(out)
    }

    #[tokio::test]
    async fn copies_stay_under_their_limit_the_least_recently_used_going_first() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::new(dir.path(), 3000).unwrap();
        let a = kept(&copies, 1, 1000).await;
        let b = kept(&copies, 2, 1000).await;
        let c = kept(&copies, 3, 1000).await;
        assert_eq!(copies.bytes(), 3000);
        // `a` used since `b`: `b` goes for `d`.
        assert_eq!(read(&copies, &a).await.unwrap(), vec![1; 1000]);
        let d = kept(&copies, 4, 1000).await;
        assert_eq!(copies.bytes(), 3000);
        assert!(read(&copies, &b).await.is_none());
        for (digest, seed) in [(&a, 1), (&c, 3), (&d, 4)] {
            assert_eq!(read(&copies, digest).await.unwrap(), vec![seed; 1000]);
        }
        // Larger than the limit: not kept, nothing dropped for it.
        let e = kept(&copies, 5, 4000).await;
        assert!(read(&copies, &e).await.is_none());
        assert_eq!(copies.bytes(), 3000);
        // Removed: gone from the disk too.
        copies.remove(&a).await;
        assert!(read(&copies, &a).await.is_none());
        assert_eq!(copies.bytes(), 2000);
        let files = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(files, 2);
        // A new start begins with none.
        drop(copies);
        let copies = LocalCopies::new(dir.path(), 3000).unwrap();
        assert!(read(&copies, &c).await.is_none());
        let files = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(files, 0);
    }
}

//! The cache's room: space set aside for what is being written (evicting as the size
//! limit says), never what is pinned or in use; a full disk, which stops caching for a
//! while; objects found unusable, discarded; eviction down to a lowered limit at start;
//! images dropped on purpose.

use super::Pins;
use super::tags::Tags;
use crate::oci::{Digest, Reference};
use crate::proxy::index::{Index, NoRoom, Removal, Reservation, manifest_refs};
use crate::proxy::metrics::Metrics;
use crate::proxy::store::{BlobStore, StoreError};
use crate::proxy::upstream::Upstream;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long the cache stays in stream-through mode after the disk filled up before it
/// tries writing again.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(2);

/// Free space kept beyond a download's size before it is written to disk.
pub const DISK_MARGIN: u64 = 16 << 20;

/// The cache's room.
pub struct Space {
    index: Arc<Index>,
    metrics: Metrics,
    pins: Pins,
    /// Where pinned tags point.
    tags: Arc<Tags>,
    disk_full_until: Mutex<Option<Instant>>,
}

impl Space {
    /// The room of `index`'s store, never evicting what `pins` (their tags, as `tags`
    /// knows them) reach.
    pub fn new(index: Arc<Index>, metrics: Metrics, pins: Pins, tags: Arc<Tags>) -> Space {
        Space {
            index,
            metrics,
            pins,
            tags,
            disk_full_until: Mutex::new(None),
        }
    }

    /// What is cached.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        self.index.store()
    }

    /// The images eviction keeps.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Whether the cache is in stream-through mode because its disk filled up.
    pub fn disk_full(&self) -> bool {
        self.disk_full_until
            .lock()
            .expect("disk state lock")
            .is_some_and(|until| Instant::now() < until)
    }

    /// The disk filled up (`why`): nothing is written for [`DISK_FULL_RETRY`].
    pub fn mark_disk_full(&self, why: &str) {
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

    /// A write went through: the disk has room again.
    pub fn mark_disk_ok(&self) {
        let mut until = self.disk_full_until.lock().expect("disk state lock");
        if until.take().is_some() {
            tracing::info!("cache disk has room again: caching resumed");
            self.metrics.cache_disk_full.set(0);
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
                .store()
                .free_space()
                .is_none_or(|free| free >= DISK_MARGIN)
        {
            self.mark_disk_ok();
        }
    }

    /// Drops a cached object found unusable (see [`Index::discard`]). It runs on its own
    /// task, so that the index and the store agree even if the caller goes away.
    pub async fn discard(&self, digest: &Digest) {
        let (index, d) = (self.index.clone(), digest.clone());
        let _ = tokio::spawn(async move { index.discard(&d).await }).await;
    }

    /// Digests that must never be evicted: the closure of the pinned images.
    pub fn pinned(&self) -> HashSet<Digest> {
        let roots: Vec<Digest> = self
            .pins
            .all()
            .iter()
            .filter_map(|pin| match &pin.reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(t) => self.tags.known(&pin.upstream, &pin.repository, t),
            })
            .collect();
        self.index.closure(roots)
    }

    /// Sets space aside for an object, evicting as needed. `None` when it must not be
    /// cached: no room under the limit, not enough free space beside the downloads in
    /// progress (this object alone is streamed through), or the disk is full.
    pub async fn reserve(self: &Arc<Self>, size: u64) -> Option<Reservation> {
        if self.disk_full() {
            return None;
        }
        // Whatever the size limit says, the store has the last word.
        let free = self.store().free_space();
        if free.is_some_and(|free| free < DISK_MARGIN) {
            self.mark_disk_full("less than the margin free on the cache volume");
            return None;
        }
        // On its own task: what it evicts is removed even if the caller goes away.
        let this = self.clone();
        let reservation = tokio::spawn(async move {
            let pinned = this.pinned();
            let room = free.map(|free| free - DISK_MARGIN);
            this.index.reserve(size, &pinned, room).await
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
        up: &Upstream,
        repository: &str,
        reference: &Reference,
    ) -> Removal {
        let root = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => self.forget_tag(up, repository, t).await,
        };
        match root {
            Some(root) => self.remove_images(vec![root]).await,
            None => Removal::default(),
        }
    }

    /// Where a tag pointed when the cache last knew, without asking the upstream.
    pub async fn cached_tag(&self, up: &Upstream, repository: &str, tag: &str) -> Option<Digest> {
        self.tags.state(up, repository, tag).await.map(|s| s.digest)
    }

    /// Forgets where a tag points (its record too), keeping what it pointed to: the next
    /// pull of the tag asks the upstream. The digest it pointed to, if it was known.
    pub async fn forget_tag(&self, up: &Upstream, repository: &str, tag: &str) -> Option<Digest> {
        let st = self.tags.state(up, repository, tag).await;
        self.tags.forget(up, repository, tag).await;
        st.map(|s| s.digest)
    }

    /// Drops a repository: every tag of it, and the images they and `by_digest` (its
    /// images pulled by digest) name, with the blobs no other cached manifest or pin
    /// needs. The tags forgotten.
    pub async fn drop_repository(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        by_digest: Vec<Digest>,
    ) -> Result<(Vec<String>, Removal), StoreError> {
        let tags = self.tags.of_repository(up, repository).await?;
        let mut roots = by_digest;
        let mut names = Vec::new();
        for (tag, digest) in tags {
            self.tags.forget(up, repository, &tag).await;
            roots.push(digest);
            names.push(tag);
        }
        roots.sort_by_key(Digest::to_string);
        roots.dedup();
        Ok((names, self.remove_images(roots).await))
    }

    /// Removes the images `roots` and the blobs only they use, from this process's index
    /// and its store; in a shared bucket, also what other replicas put there that this
    /// index does not know, by the same rule over the bucket's whole listing.
    async fn remove_images(self: &Arc<Self>, roots: Vec<Digest>) -> Removal {
        if roots.is_empty() {
            return Removal::default();
        }
        // On its own task: the index and the store agree even if the caller goes away.
        let this = self.clone();
        tokio::spawn(async move {
            let dropped = this.index.closure(roots.iter().cloned());
            let keep: HashSet<Digest> = this.pinned().difference(&dropped).cloned().collect();
            let mut removal = this.index.drop_images(&roots, &keep).await;
            if this.store().shared() {
                match this.bucket_view().await {
                    Ok(view) => {
                        let dropped = view.closure(roots.iter().cloned());
                        // What this process is reading stays, as in its own index.
                        let reading = removal.in_use.iter().filter_map(|d| d.parse().ok());
                        let keep: HashSet<Digest> = view
                            .closure(keep.into_iter().chain(reading))
                            .difference(&dropped)
                            .cloned()
                            .collect();
                        let more = view.drop_images(&roots, &keep).await;
                        for d in more.manifests.iter().chain(&more.blobs) {
                            if let Ok(d) = d.parse() {
                                this.index.discard(&d).await;
                            }
                        }
                        removal.merge(more);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not list the bucket: what other replicas cached of the dropped images stays until it is evicted")
                    }
                }
            }
            removal
        })
        .await
        .expect("drop task")
    }

    /// An index of everything the shared store holds, every manifest's references read.
    async fn bucket_view(&self) -> Result<Arc<Index>, StoreError> {
        let store = self.store().clone();
        let mut entries = Vec::new();
        for listed in store.everything().await? {
            let refs = if listed.manifest {
                let body = store.manifest(&listed.digest).await?.map(|m| m.body);
                Some(body.map(|b| manifest_refs(&b)).unwrap_or_default())
            } else {
                None
            };
            entries.push((listed, refs));
        }
        Ok(Index::of_listing(store, entries, None, Metrics::new()))
    }
}

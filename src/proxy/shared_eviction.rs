//! Keeping a shared bucket under `maxCacheBytes`.
//!
//! No replica sees every use of the bucket's objects, so each one that serves from the
//! bucket appends what it used to an access record (`access/<writer>-<ms>`) every
//! `recordEvery`, with the objects it is still reading as used now. One replica, the
//! evictor (elected on a Kubernetes Lease, see [`crate::lease`]; without one, this
//! process alone), does the rest every `every`: it merges the records into its view of
//! last uses (kept in `access/merged`, so a new evictor starts from it), lists the
//! bucket, and plans an eviction down to the limit with the index's own
//! least-recently-used rule (a manifest takes its orphaned blobs along; pinned images
//! stay). Reads and deletions:
//!
//! - an object used (by any replica) within `grace` is not a candidate; `grace` outlasts
//!   the signed URLs handed to clients (10 minutes);
//! - a candidate is only marked in one round and deleted in the next, if no record says
//!   it was used in between: a read that began before the mark is in a record by then
//!   (`every` is at least twice `recordEvery`), and a read that goes on is recorded
//!   again in every record;
//! - a read that begins after the mark and is not yet recorded when the object is
//!   deleted is one GET already answering (a blob is read with one ranged GET): RGW
//!   finishes it (checked: a 64 MiB GET deleted after its first MiB still returned every
//!   byte); a store that cut it short would fail that one client, which retries;
//! - a read that begins after the deletion finds nothing and is served from the upstream.
//!
//! What goes is deleted bytes first, then its media type; a replica whose index still
//! lists it finds it missing, forgets it and fetches it again.
//!
//! The bucket's side (records, listing, the merged view) is
//! [`crate::proxy::store::s3::S3Store`]'s.

use super::index::{Index, manifest_refs};
use super::metrics::Metrics;
use super::pull_through::Pins;
use super::store::s3::{S3Store, Stored, Uses};
use super::store::{BlobStore, Listed, StoreResult, TagKey, unix_now_ms};
use crate::api::proxy_config::EvictionConfig;
use crate::lease::LeaseLock;
use crate::oci::{Digest, Reference};
use k8s_openapi::api::coordination::v1::Lease;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::MissedTickBehavior;

/// How long the evicting replica's Lease lasts per renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// How often a replica that does not evict tries to take the Lease.
const LEASE_RETRY: Duration = Duration::from_secs(5);

/// When the shared bucket's objects may go.
#[derive(Debug, Clone)]
pub struct EvictionRules {
    /// The bytes the bucket may hold.
    pub limit: u64,
    /// Objects used more recently than this stay.
    pub grace: Duration,
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// Bytes in the bucket after the round.
    pub bytes: u64,
    /// Objects deleted (marked in the round before, not used since).
    pub deleted: Vec<Digest>,
    /// Bytes they held.
    pub deleted_bytes: u64,
    /// Objects marked, to be deleted in the next round if not used meanwhile.
    pub marked: usize,
}

/// The evicting replica's state: the merged uses, the manifests' references (content is
/// immutable, so read once), the marked objects.
pub struct Evictor {
    store: Arc<S3Store>,
    rules: EvictionRules,
    pins: Pins,
    metrics: Metrics,
    /// What the index of the whole bucket counts into: not this replica's own gauges.
    view_metrics: Metrics,
    uses: Option<Uses>,
    refs: HashMap<Digest, Vec<Digest>>,
    marked: HashMap<Digest, u64>,
}

impl Evictor {
    /// The evictor of `store`, keeping the closure of `pins` whatever their last use.
    pub fn new(store: Arc<S3Store>, rules: EvictionRules, pins: Pins, metrics: Metrics) -> Evictor {
        Evictor {
            store,
            rules,
            pins,
            metrics,
            view_metrics: Metrics::new(),
            uses: None,
            refs: HashMap::new(),
            marked: HashMap::new(),
        }
    }

    /// Forgets the marks (leadership lost: the next evictor starts over).
    pub fn reset(&mut self) {
        self.marked.clear();
        self.uses = None;
    }

    /// The pinned images' manifests, through the tag records in the bucket.
    async fn pin_roots(&self) -> StoreResult<Vec<Digest>> {
        let mut roots = Vec::new();
        for pin in &self.pins.all() {
            match &pin.reference {
                Reference::Digest(d) => roots.push(d.clone()),
                Reference::Tag(tag) => {
                    let key = TagKey {
                        upstream: pin.upstream.name(),
                        repository: &pin.repository,
                        tag,
                    };
                    if let Some(rec) = self.store.tag(key).await?
                        && let Ok(d) = rec.digest.parse()
                    {
                        roots.push(d);
                    }
                }
            }
        }
        Ok(roots)
    }

    /// Merges the access records, deletes the marked objects not used since, and marks
    /// what the bucket must lose to be under the limit.
    pub async fn round(&mut self) -> StoreResult<Round> {
        let store = self.store.clone();
        let now = unix_now_ms();
        let mut uses = match self.uses.take() {
            Some(uses) => uses,
            None => store.kept_uses().await?,
        };
        let merged = store.merge_access_records(&mut uses).await?;
        let listing = store.inventory().await?;
        let last_use =
            |uses: &Uses, o: &Stored| uses.get(&o.digest).copied().unwrap_or(0).max(o.stored_ms);

        // Delete what was marked and not used since.
        let mut round = Round::default();
        let marked = std::mem::take(&mut self.marked);
        let mut kept = Vec::with_capacity(listing.len());
        for o in listing {
            match marked.get(&o.digest) {
                Some(at) if last_use(&uses, &o) < *at => {
                    store.remove(&o.digest).await?;
                    round.deleted_bytes += o.size;
                    round.deleted.push(o.digest);
                }
                _ => kept.push(o),
            }
        }
        let listing = kept;

        // Plan the next: the index's rule over the whole bucket.
        let mut protected = HashSet::new();
        let mut entries = Vec::with_capacity(listing.len());
        let grace = self.rules.grace.as_millis() as u64;
        for o in &listing {
            let used = last_use(&uses, o);
            if now.saturating_sub(used) < grace {
                protected.insert(o.digest.clone());
            }
            let refs = if o.manifest {
                if !self.refs.contains_key(&o.digest)
                    && let Some(m) = store.manifest(&o.digest).await?
                {
                    self.refs.insert(o.digest.clone(), manifest_refs(&m.body));
                }
                Some(self.refs.get(&o.digest).cloned().unwrap_or_default())
            } else {
                None
            };
            let listed = Listed {
                digest: o.digest.clone(),
                size: o.size,
                used_ms: used,
                manifest: o.manifest,
            };
            entries.push((listed, refs));
        }
        let view = Index::of_listing(
            store.clone() as Arc<dyn BlobStore>,
            entries,
            Some(self.rules.limit),
            self.view_metrics.clone(),
        );
        protected.extend(view.closure(self.pin_roots().await?));
        let victims = view.over_limit(&protected);
        // Every mark of the round before is spent (deleted, or used since): all anew.
        self.marked = victims.iter().map(|d| (d.clone(), now)).collect();
        round.marked = victims.len();
        round.bytes = view.total();

        // Keep the merged view (of what is still there), then drop the merged records.
        let present: HashSet<&Digest> = listing.iter().map(|o| &o.digest).collect();
        uses.retain(|d, _| present.contains(d));
        store.keep_uses(&uses, merged).await?;
        self.refs.retain(|d, _| present.contains(d));
        self.uses = Some(uses);

        self.metrics.store_bucket_bytes.set(round.bytes as i64);
        self.metrics
            .cache_evictions
            .inc_by(round.deleted.len() as u64);
        if !round.deleted.is_empty() {
            tracing::info!(
                store = %store.name(),
                objects = round.deleted.len(),
                bytes = round.deleted_bytes,
                "evicted least recently used objects from the bucket"
            );
        }
        Ok(round)
    }
}

/// The recording and the evicting of one replica.
pub struct SharedEviction {
    store: Arc<S3Store>,
    index: Arc<Index>,
    config: EvictionConfig,
    rules: EvictionRules,
    pins: Pins,
    metrics: Metrics,
    lock: Option<LeaseLock>,
}

/// The name this replica holds the Lease under: the pod's, or the host's and the
/// process's.
fn identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

impl SharedEviction {
    /// The eviction of `store` down to `limit`, as `config` says; with a Lease, the
    /// client to the API server is made here (as kubectl finds it).
    pub async fn new(
        store: Arc<S3Store>,
        index: Arc<Index>,
        limit: u64,
        config: &EvictionConfig,
        pins: Pins,
        metrics: Metrics,
    ) -> Result<SharedEviction, kube::Error> {
        let lock = match &config.lease {
            None => None,
            Some(name) => {
                let client = kube::Client::try_default().await?;
                let ns = config
                    .lease_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .filter(|ns| !ns.is_empty())
                    .unwrap_or_else(|| client.default_namespace().to_string());
                let api = kube::Api::<Lease>::namespaced(client, &ns);
                Some(LeaseLock::new(api, name, &identity(), LEASE_DURATION))
            }
        };
        Ok(SharedEviction {
            store,
            index,
            config: config.clone(),
            rules: EvictionRules {
                limit,
                grace: config.grace,
            },
            pins,
            metrics,
            lock,
        })
    }

    /// Records and (when elected) evicts, until dropped.
    pub async fn run(self: Arc<Self>) {
        let recorder = {
            let this = self.clone();
            async move {
                let mut tick = tokio::time::interval(this.config.record_every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = this.store.record_uses(this.index.in_use()).await {
                        tracing::warn!(error = %e, "could not write an access record; its uses go into the next");
                    }
                }
            }
        };
        tokio::join!(recorder, self.evict());
    }

    async fn evict(&self) {
        let mut evictor = Evictor::new(
            self.store.clone(),
            self.rules.clone(),
            self.pins.clone(),
            self.metrics.clone(),
        );
        loop {
            if let Some(lock) = &self.lock {
                lock.acquire(LEASE_RETRY).await;
            }
            tracing::info!(store = %self.store.name(), limit = self.rules.limit, "this replica keeps the bucket under maxCacheBytes");
            self.metrics.store_evictor.set(1);
            let rounds = async {
                let mut tick = tokio::time::interval(self.config.every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match evictor.round().await {
                        Ok(r) => tracing::debug!(
                            bytes = r.bytes,
                            deleted = r.deleted.len(),
                            marked = r.marked,
                            "eviction round"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "eviction round failed; trying again at the next")
                        }
                    }
                }
            };
            match &self.lock {
                Some(lock) => {
                    tokio::select! {
                        _ = lock.hold() => {}
                        _ = rounds => {}
                    }
                }
                None => rounds.await,
            }
            self.metrics.store_evictor.set(0);
            self.metrics.store_bucket_bytes.set(0);
            evictor.reset();
        }
    }

    /// Gives the Lease up (at shutdown), so that another replica evicts at once.
    pub async fn release(&self) {
        if let Some(lock) = &self.lock {
            lock.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use crate::proxy::pull_through::ConfiguredImage;
    use crate::proxy::store::TagRecord;
    use crate::proxy::store::s3::Bucket;
    use bytes::Bytes;
    use futures::StreamExt;
    use object_store::memory::InMemory;
    use object_store::path::Path as Key;
    use object_store::{ObjectStore, ObjectStoreExt};

    struct Setup {
        _dir: tempfile::TempDir,
        mem: InMemory,
        store: Arc<S3Store>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let bucket = Bucket::new(mem.clone(), Metrics::new());
        let store = S3Store::new(bucket, "test", "p", dir.path(), Duration::from_secs(3600))
            .unwrap()
            .with_access_records();
        Setup {
            _dir: dir,
            mem,
            store: Arc::new(store),
        }
    }

    fn evictor(s: &Setup, limit: u64, grace: Duration, pins: Vec<ConfiguredImage>) -> Evictor {
        let rules = EvictionRules { limit, grace };
        Evictor::new(s.store.clone(), rules, Pins::new(pins), Metrics::new())
    }

    async fn put_blob(s: &Setup, byte: u8) -> Digest {
        let data = vec![byte; 1000];
        let d = Digest::of(Algorithm::Sha256, &data);
        let mut w = s.store.begin(&d, Some(1000)).await.unwrap();
        w.append(vec![Bytes::from(data)]).await.unwrap();
        w.commit(d.clone()).await.unwrap();
        // Stored a millisecond before any mark that follows (marks need a later use).
        tokio::time::sleep(Duration::from_millis(2)).await;
        d
    }

    /// An access record saying `digests` were used at `at` (ms), as another replica
    /// writes it.
    async fn record(s: &Setup, name: &str, digests: &[&Digest], at: u64) {
        let used: serde_json::Map<String, serde_json::Value> =
            digests.iter().map(|d| (d.to_string(), at.into())).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "used": used })).unwrap();
        let key = Key::from(format!("p/access/{name}"));
        s.mem.put(&key, body.into()).await.unwrap();
    }

    /// Keys under `prefix`.
    async fn keys(s: &Setup, prefix: &str) -> Vec<String> {
        let under = Key::from(prefix);
        let listed: Vec<_> = s.mem.list(Some(&under)).collect().await;
        let mut keys: Vec<String> = listed
            .into_iter()
            .map(|m| m.unwrap().location.to_string())
            .collect();
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn the_least_recently_used_go_one_round_after_they_are_marked() {
        let s = setup();
        let [a, b, c, d] = [
            put_blob(&s, 1).await,
            put_blob(&s, 2).await,
            put_blob(&s, 3).await,
            put_blob(&s, 4).await,
        ];
        // Other replicas used a and b after c and d were stored.
        let later = unix_now_ms() + 60_000;
        record(&s, "r1-1", &[&a], later).await;
        record(&s, "r2-1", &[&b], later).await;
        let mut ev = evictor(&s, 2500, Duration::ZERO, Vec::new());
        let first = ev.round().await.unwrap();
        assert_eq!((first.bytes, first.marked), (4000, 2));
        assert!(first.deleted.is_empty(), "deleted before a round passed");
        assert_eq!(
            keys(&s, "p/access").await,
            ["p/access/merged"],
            "records not merged"
        );
        let second = ev.round().await.unwrap();
        let mut deleted = second.deleted.clone();
        deleted.sort_by(|x, y| x.hex().cmp(y.hex()));
        let mut want = vec![c.clone(), d.clone()];
        want.sort_by(|x, y| x.hex().cmp(y.hex()));
        assert_eq!(deleted, want);
        assert_eq!((second.bytes, second.marked), (2000, 0));
        assert!(s.store.open(&c).await.unwrap().is_none());
        assert!(s.store.open(&a).await.unwrap().is_some());

        // A new evictor starts from the merged view: a and b are still the newest.
        let [e] = [put_blob(&s, 5).await];
        let mut next = evictor(&s, 2500, Duration::ZERO, Vec::new());
        next.round().await.unwrap();
        let r = next.round().await.unwrap();
        assert_eq!(r.deleted, vec![e], "the merged view was lost");
    }

    #[tokio::test]
    async fn what_is_used_after_its_mark_or_within_the_grace_stays() {
        let s = setup();
        let [a, b, c] = [
            put_blob(&s, 1).await,
            put_blob(&s, 2).await,
            put_blob(&s, 3).await,
        ];
        record(&s, "r1-1", &[&c], unix_now_ms() + 60_000).await;
        // Within the grace: nothing is even marked.
        let mut ev = evictor(&s, 1500, Duration::from_secs(3600), Vec::new());
        assert_eq!(ev.round().await.unwrap().marked, 0);

        let mut ev = evictor(&s, 1500, Duration::ZERO, Vec::new());
        assert_eq!(ev.round().await.unwrap().marked, 2, "a and b");
        // This replica uses both meanwhile: a touched, b being read.
        tokio::time::sleep(Duration::from_millis(2)).await;
        s.store.touch(&a);
        s.store.record_uses(vec![b.clone()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        let r = ev.round().await.unwrap();
        assert!(r.deleted.is_empty(), "deleted after a use");
        assert_eq!(r.marked, 2, "marked again: still the least recently used");
        // Unused since: they go.
        let r = ev.round().await.unwrap();
        assert_eq!(r.deleted.len(), 2);
        assert!(s.store.open(&a).await.unwrap().is_none());
        assert!(s.store.open(&b).await.unwrap().is_none());
        assert!(s.store.open(&c).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn pinned_images_stay_with_their_blobs() {
        let s = setup();
        let [config, layer, other] = [
            put_blob(&s, 1).await,
            put_blob(&s, 2).await,
            put_blob(&s, 3).await,
        ];
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": config.to_string(), "size": 1000},
            "layers": [{"digest": layer.to_string(), "size": 1000}],
        }))
        .unwrap();
        let m = Digest::of(Algorithm::Sha256, &body);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        s.store.put_manifest(&m, body.into(), mt).await.unwrap();
        let rec = TagRecord {
            upstream: "docker.io".into(),
            repository: "library/app".into(),
            tag: "1".into(),
            digest: m.to_string(),
            checked_at_ms: 0,
        };
        s.store.put_tag(&rec).await.unwrap();
        let upstream =
            crate::proxy::test_support::upstream("registry: docker.io", Duration::from_secs(1));
        let pin = ConfiguredImage {
            upstream,
            repository: "library/app".into(),
            reference: Reference::Tag("1".into()),
            name: "app:1".into(),
        };
        // The limit leaves room for nothing: only the unpinned blob is marked.
        let mut ev = evictor(&s, 1, Duration::ZERO, vec![pin]);
        assert_eq!(ev.round().await.unwrap().marked, 1);
        assert_eq!(ev.round().await.unwrap().deleted, vec![other]);
        for d in [&m, &config, &layer] {
            assert!(s.store.open(d).await.unwrap().is_some());
        }
        // Unpinned, the image goes whole: the manifest and the blobs only it references.
        let mut ev = evictor(&s, 1, Duration::ZERO, Vec::new());
        assert_eq!(ev.round().await.unwrap().marked, 3);
        assert_eq!(ev.round().await.unwrap().deleted.len(), 3);
        assert!(keys(&s, "p/meta").await.is_empty(), "media type left");
    }
}

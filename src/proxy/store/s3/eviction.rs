//! Keeping a shared bucket under `maxCacheBytes`.
//!
//! No replica sees every use of the bucket's objects, so each one that serves from the
//! bucket appends what it used to an access record (`access/<writer>-<ms>`) every
//! `recordEvery`, with the objects it is still reading as used now. One replica, the
//! evictor (elected on a Kubernetes Lease, see [`crate::lease`]), does the rest every
//! `every`: it merges the records into its view of last uses (kept in `access/merged`,
//! so a new evictor starts from it), lists the bucket, and plans an eviction down to the
//! limit with the index's own least-recently-used rule (a manifest takes its orphaned
//! blobs along; pinned images stay). Reads and deletions:
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

use super::{S3Store, absent_ok, s3_error};
use crate::oci::{Digest, Reference};
use crate::proxy::index::{Index, manifest_refs};
use crate::proxy::metrics::Metrics;
use crate::proxy::pull_through::ConfiguredImage;
use crate::proxy::store::{BlobStore, Listed, StoreResult, TagKey, unix_now_ms};
use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The last use of objects, milliseconds since the epoch, by digest.
type Uses = HashMap<Digest, u64>;

/// One access record, as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AccessRecord {
    used: BTreeMap<String, u64>,
}

impl AccessRecord {
    fn of(uses: &Uses) -> AccessRecord {
        AccessRecord {
            used: uses.iter().map(|(d, ms)| (d.to_string(), *ms)).collect(),
        }
    }

    fn merge_into(self, uses: &mut Uses) {
        for (d, ms) in self.used {
            if let Ok(d) = d.parse::<Digest>() {
                let at = uses.entry(d).or_insert(0);
                *at = (*at).max(ms);
            }
        }
    }
}

/// This replica's uses, waiting for the next access record.
pub(super) struct AccessLog {
    pending: Mutex<Uses>,
}

impl AccessLog {
    pub(super) fn new() -> AccessLog {
        AccessLog {
            pending: Mutex::new(Uses::new()),
        }
    }

    pub(super) fn used(&self, digest: &Digest) {
        self.pending
            .lock()
            .expect("access log lock")
            .insert(digest.clone(), unix_now_ms());
    }
}

/// A name for this process's records and leases: random, or the time and process id.
pub(super) fn writer_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if random.is_err() {
        b = (unix_now_ms() ^ (u64::from(std::process::id()) << 44)).to_be_bytes();
    }
    hex::encode(b)
}

/// The name of the evictor's merged view, under `access/`.
const MERGED: &str = "merged";

impl S3Store {
    fn access_prefix(&self) -> Key {
        self.key(["access"])
    }

    /// Appends this replica's uses since the last record (and `in_use`, as used now) as
    /// one access record. Uses that could not be written are kept for the next one.
    pub(super) async fn write_access_record(&self, in_use: Vec<Digest>) -> StoreResult<()> {
        let Some(log) = &self.access else {
            return Ok(());
        };
        let now = unix_now_ms();
        let mut uses = std::mem::take(&mut *log.pending.lock().expect("access log lock"));
        for d in in_use {
            uses.insert(d, now);
        }
        if uses.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(&AccessRecord::of(&uses)).expect("a record serializes");
        let key = self
            .access_prefix()
            .join(format!("{}-{now:013}", self.writer));
        let written = self
            .put("writing an access record", &key, body.into(), None)
            .await;
        if written.is_err() {
            let mut pending = log.pending.lock().expect("access log lock");
            for (d, ms) in uses {
                let at = pending.entry(d).or_insert(0);
                *at = (*at).max(ms);
            }
        }
        written
    }

    /// Every committed object: digest, size, when it was stored (ms), and whether it is a
    /// manifest (has a media type). Media types whose bytes are gone are removed.
    async fn inventory(&self) -> StoreResult<Vec<(Digest, u64, u64, bool)>> {
        let what = "listing the bucket";
        let digest_of = |key: &Key| -> Option<Digest> {
            let parts: Vec<_> = key.parts().collect();
            let [.., alg, hex] = parts.as_slice() else {
                return None;
            };
            format!("{}:{}", alg.as_ref(), hex.as_ref()).parse().ok()
        };
        let metas: HashSet<Digest> = self
            .bucket
            .list(&self.key(["meta"]))
            .await
            .map_err(|e| s3_error(what, e))?
            .iter()
            .filter_map(|m| digest_of(&m.location))
            .collect();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for m in self
            .bucket
            .list(&self.key(["blobs"]))
            .await
            .map_err(|e| s3_error(what, e))?
        {
            let Some(d) = digest_of(&m.location) else {
                continue;
            };
            let stored = m.last_modified.timestamp_millis().max(0) as u64;
            let manifest = metas.contains(&d);
            seen.insert(d.clone());
            out.push((d, m.size, stored, manifest));
        }
        for orphan in metas.difference(&seen) {
            self.delete("removing a media type left behind", &self.meta_key(orphan))
                .await?;
        }
        Ok(out)
    }

    /// The access records to merge (not the merged view) and what they say.
    async fn access_records(&self) -> StoreResult<Vec<(Key, AccessRecord)>> {
        let what = "reading access records";
        let prefix = self.access_prefix();
        let mut out = Vec::new();
        for m in self
            .bucket
            .list(&prefix)
            .await
            .map_err(|e| s3_error(what, e))?
        {
            if m.location.filename() == Some(MERGED) {
                continue;
            }
            let Some(bytes) = self.get_bytes(what, &m.location).await? else {
                continue;
            };
            // Unreadable, it is as good as empty: removed with the others once merged.
            let record = serde_json::from_slice(&bytes).unwrap_or_default();
            out.push((m.location, record));
        }
        Ok(out)
    }
}

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
    pins: Vec<ConfiguredImage>,
    metrics: Metrics,
    uses: Option<Uses>,
    refs: HashMap<Digest, Vec<Digest>>,
    marked: HashMap<Digest, u64>,
}

impl Evictor {
    /// The evictor of `store`, keeping the closure of `pins` whatever their last use.
    pub fn new(
        store: Arc<S3Store>,
        rules: EvictionRules,
        pins: Vec<ConfiguredImage>,
        metrics: Metrics,
    ) -> Evictor {
        Evictor {
            store,
            rules,
            pins,
            metrics,
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
        for pin in &self.pins {
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
            None => {
                let key = store.access_prefix().join(MERGED);
                let mut uses = Uses::new();
                if let Some(bytes) = store.get_bytes("reading access records", &key).await? {
                    serde_json::from_slice::<AccessRecord>(&bytes)
                        .unwrap_or_default()
                        .merge_into(&mut uses);
                }
                uses
            }
        };
        let records = store.access_records().await?;
        let merged: Vec<Key> = records.iter().map(|(k, _)| k.clone()).collect();
        for (_, record) in records {
            record.merge_into(&mut uses);
        }
        let mut listing = store.inventory().await?;
        let last_use =
            |uses: &Uses, d: &Digest, stored: u64| uses.get(d).copied().unwrap_or(0).max(stored);

        // Delete what was marked and not used since.
        let mut round = Round::default();
        let marked = std::mem::take(&mut self.marked);
        let mut kept = Vec::with_capacity(listing.len());
        for entry in listing.drain(..) {
            let (d, size, stored, _) = &entry;
            match marked.get(d) {
                Some(at) if last_use(&uses, d, *stored) < *at => {
                    store.remove(d).await?;
                    round.deleted_bytes += size;
                    round.deleted.push(d.clone());
                }
                _ => kept.push(entry),
            }
        }
        let listing = kept;

        // Plan the next: the index's rule over the whole bucket.
        let mut protected = HashSet::new();
        let mut entries = Vec::with_capacity(listing.len());
        let grace = self.rules.grace.as_millis() as u64;
        for (d, size, stored, manifest) in &listing {
            let used = last_use(&uses, d, *stored);
            if now.saturating_sub(used) < grace {
                protected.insert(d.clone());
            }
            let refs = if *manifest {
                if !self.refs.contains_key(d)
                    && let Some(m) = store.manifest(d).await?
                {
                    self.refs.insert(d.clone(), manifest_refs(&m.body));
                }
                Some(self.refs.get(d).cloned().unwrap_or_default())
            } else {
                None
            };
            let listed = Listed {
                digest: d.clone(),
                size: *size,
                used_ms: used,
                manifest: *manifest,
            };
            entries.push((listed, refs));
        }
        let view = Index::of_listing(
            store.clone(),
            entries,
            Some(self.rules.limit),
            Metrics::new(),
        );
        protected.extend(view.closure(self.pin_roots().await?));
        let victims = view.over_limit(&protected);
        // Every mark of the round before is spent (deleted, or used since): all anew.
        self.marked = victims.iter().map(|d| (d.clone(), now)).collect();
        round.marked = victims.len();
        round.bytes = view.total();

        // Keep the merged view (of what is still there), then drop the merged records.
        let present: HashSet<&Digest> = listing.iter().map(|(d, ..)| d).collect();
        uses.retain(|d, _| present.contains(d));
        let body = serde_json::to_vec(&AccessRecord::of(&uses)).expect("a record serializes");
        let key = store.access_prefix().join(MERGED);
        store
            .put("writing access records", &key, body.into(), None)
            .await?;
        for key in merged {
            absent_ok(store.bucket.delete(&key).await)
                .map_err(|e| s3_error("removing merged access records", e))?;
        }
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

#[cfg(test)]
mod tests {
    use super::super::Bucket;
    use super::*;
    use crate::oci::Algorithm;
    use crate::proxy::store::TagRecord;
    use crate::proxy::upstream::{Upstream, http_client};
    use bytes::Bytes;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

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
        Evictor::new(s.store.clone(), rules, pins, Metrics::new())
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
        let uses: Uses = digests.iter().map(|d| ((*d).clone(), at)).collect();
        let body = serde_json::to_vec(&AccessRecord::of(&uses)).unwrap();
        let key = Key::from(format!("p/access/{name}"));
        s.mem.put(&key, body.into()).await.unwrap();
    }

    async fn access_keys(s: &Setup) -> Vec<String> {
        let listed = s.store.bucket.list(&Key::from("p/access")).await.unwrap();
        let mut keys: Vec<String> = listed.into_iter().map(|m| m.location.to_string()).collect();
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
            access_keys(&s).await,
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
        let up: crate::api::proxy_config::UpstreamConfig =
            serde_yaml::from_str("registry: docker.io").unwrap();
        let upstream = Arc::new(Upstream::new(
            &up,
            None,
            http_client(Duration::from_secs(1)),
            Metrics::new(),
            Duration::from_secs(1),
        ));
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
        let left = s.store.bucket.list(&Key::from("p/meta")).await.unwrap();
        assert!(left.is_empty(), "media type left");
    }
}

//! The bucket's side of keeping a shared bucket under `maxCacheBytes` (the evictor that
//! decides is [`crate::proxy::shared_eviction`]): each replica that serves from the
//! bucket appends what it used to an access record (`access/<writer>-<ms>`), with the
//! objects it is still reading as used now; the evictor reads them back merged, lists
//! what the bucket holds, and keeps its merged view of last uses as `access/merged`
//! (so that a new evictor starts from it), deleting the records it merged.

use super::{S3Store, absent_ok, s3_error};
use crate::oci::Digest;
use crate::proxy::store::{StoreResult, unix_now_ms};
use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// The last use of objects, milliseconds since the epoch, by digest.
pub type Uses = HashMap<Digest, u64>;

/// A committed object, as the bucket lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// When it was stored, milliseconds since the epoch.
    pub stored_ms: u64,
    /// Whether it is a manifest (has a media type).
    pub manifest: bool,
}

/// Access records merged by [`S3Store::merge_access_records`], to be removed by
/// [`S3Store::keep_uses`] once what they say is kept.
pub struct Merged(Vec<Key>);

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
    crate::fsutil::random_hex(8).unwrap_or_else(|_| {
        hex::encode((unix_now_ms() ^ (u64::from(std::process::id()) << 44)).to_be_bytes())
    })
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

    /// Every committed object. Media types whose bytes are gone are removed.
    pub async fn inventory(&self) -> StoreResult<Vec<Stored>> {
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
            let Some(digest) = digest_of(&m.location) else {
                continue;
            };
            seen.insert(digest.clone());
            out.push(Stored {
                manifest: metas.contains(&digest),
                digest,
                size: m.size,
                stored_ms: m.last_modified.timestamp_millis().max(0) as u64,
            });
        }
        for orphan in metas.difference(&seen) {
            self.delete("removing a media type left behind", &self.meta_key(orphan))
                .await?;
        }
        Ok(out)
    }

    /// The merged view of last uses that an evictor kept ([`Self::keep_uses`]).
    pub async fn kept_uses(&self) -> StoreResult<Uses> {
        let key = self.access_prefix().join(MERGED);
        let mut uses = Uses::new();
        if let Some(bytes) = self.get_bytes("reading access records", &key).await? {
            serde_json::from_slice::<AccessRecord>(&bytes)
                .unwrap_or_default()
                .merge_into(&mut uses);
        }
        Ok(uses)
    }

    /// Merges every access record the replicas wrote into `uses`.
    pub async fn merge_access_records(&self, uses: &mut Uses) -> StoreResult<Merged> {
        let what = "reading access records";
        let mut merged = Vec::new();
        for m in self
            .bucket
            .list(&self.access_prefix())
            .await
            .map_err(|e| s3_error(what, e))?
        {
            if m.location.filename() == Some(MERGED) {
                continue;
            }
            let Some(bytes) = self.get_bytes(what, &m.location).await? else {
                continue;
            };
            // Unreadable, it is as good as empty: removed with the others.
            serde_json::from_slice::<AccessRecord>(&bytes)
                .unwrap_or_default()
                .merge_into(uses);
            merged.push(m.location);
        }
        Ok(Merged(merged))
    }

    /// Keeps `uses` as the merged view, then removes the records `merged` came from.
    pub async fn keep_uses(&self, uses: &Uses, merged: Merged) -> StoreResult<()> {
        let body = serde_json::to_vec(&AccessRecord::of(uses)).expect("a record serializes");
        let key = self.access_prefix().join(MERGED);
        self.put("writing access records", &key, body.into(), None)
            .await?;
        for key in merged.0 {
            absent_ok(self.bucket.delete(&key).await)
                .map_err(|e| s3_error("removing merged access records", e))?;
        }
        Ok(())
    }
}

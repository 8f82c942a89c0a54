//! Tags: the digest a tag points to and how long ago the upstream confirmed it. For
//! clients that take every manifest type, kept in memory and as records in the store, so
//! that a restart keeps serving (and serving stale); for a narrower `Accept`, kept in
//! memory only, under the types it names (the upstream may answer such a client another
//! manifest).

use crate::oci::Digest;
use crate::oci::media::{Accept, MANIFEST_ACCEPT};
use crate::proxy::store::{BlobStore, TagKey, TagRecord, unix_now_ms};
use crate::proxy::upstream::Upstream;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Where a tag pointed when the upstream last said, and how long ago that was.
#[derive(Clone, Debug)]
pub struct TagState {
    /// The manifest's digest.
    pub digest: Digest,
    /// Its age when this state was made.
    pub age_at: Duration,
    /// When this state was made.
    pub since: Instant,
}

impl TagState {
    /// How long ago the upstream confirmed it.
    pub fn age(&self) -> Duration {
        self.age_at + self.since.elapsed()
    }
}

/// The key of a tag of `repository` of `up`, for a client that takes every type.
fn tag_key(up: &Upstream, repository: &str, tag: &str) -> String {
    format!("{}\0{repository}\0{tag}", up.name())
}

/// The key of a tag as a client with `accept` sees it: the tag's own for one that takes
/// every type; for an `Accept` of fewer known manifest types, the tag under those types;
/// `None` for an `Accept` naming other types, which is not remembered.
pub fn tag_key_for(up: &Upstream, repository: &str, tag: &str, accept: &Accept) -> Option<String> {
    match accept {
        Accept::Any => Some(tag_key(up, repository, tag)),
        Accept::Only(types) => {
            let mut known: Vec<&str> = types.iter().map(String::as_str).collect();
            if !known
                .iter()
                .all(|t| MANIFEST_ACCEPT.split(", ").any(|m| m == *t))
            {
                return None;
            }
            known.sort_unstable();
            known.dedup();
            Some(format!(
                "{}\0{}",
                tag_key(up, repository, tag),
                known.join(",")
            ))
        }
    }
}

/// Every tag this process knows.
pub struct Tags {
    map: Mutex<HashMap<String, TagState>>,
    store: Arc<dyn BlobStore>,
}

impl Tags {
    /// None known yet; records are read from `store` when first needed.
    pub fn new(store: Arc<dyn BlobStore>) -> Tags {
        Tags {
            map: Mutex::new(HashMap::new()),
            store,
        }
    }

    /// The digest a tag pointed to last, as far as this process knows without asking
    /// the store (what a pinned tag keeps).
    pub fn known(&self, up: &Upstream, repository: &str, tag: &str) -> Option<Digest> {
        let key = tag_key(up, repository, tag);
        let map = self.map.lock().expect("tag map lock");
        map.get(&key).map(|st| st.digest.clone())
    }

    /// A tag's state as a client with `accept` sees it: for every type, from memory or
    /// the store's record; for a narrower `Accept`, from memory.
    pub async fn state_for(
        &self,
        up: &Upstream,
        repository: &str,
        tag: &str,
        accept: &Accept,
    ) -> Option<TagState> {
        match accept {
            Accept::Any => self.state(up, repository, tag).await,
            Accept::Only(_) => tag_key_for(up, repository, tag, accept)
                .and_then(|k| self.map.lock().expect("tag map lock").get(&k).cloned()),
        }
    }

    /// A tag's state for clients that take every type: from memory, or read from the
    /// store's record the first time.
    pub async fn state(&self, up: &Upstream, repository: &str, tag: &str) -> Option<TagState> {
        let key = tag_key(up, repository, tag);
        if let Some(st) = self.map.lock().expect("tag map lock").get(&key) {
            return Some(st.clone());
        }
        let stored = TagKey {
            upstream: up.name(),
            repository,
            tag,
        };
        let rec = match self.store.tag(stored).await {
            Ok(rec) => rec?,
            Err(e) => {
                tracing::warn!(upstream = up.name(), repo = repository, tag, error = %e, "could not read a tag record");
                return None;
            }
        };
        let digest: Digest = rec.digest.parse().ok()?;
        let st = TagState {
            digest,
            age_at: Duration::from_millis(unix_now_ms().saturating_sub(rec.checked_at_ms)),
            since: Instant::now(),
        };
        self.map
            .lock()
            .expect("tag map lock")
            .insert(key, st.clone());
        Some(st)
    }

    /// The upstream said now that the tag points to `digest`, for a client with
    /// `accept`. Only the record for every type is written to the store.
    pub async fn confirm(
        &self,
        up: &Upstream,
        repository: &str,
        tag: &str,
        digest: &Digest,
        accept: &Accept,
    ) {
        let st = TagState {
            digest: digest.clone(),
            age_at: Duration::ZERO,
            since: Instant::now(),
        };
        let Some(key) = tag_key_for(up, repository, tag, accept) else {
            return;
        };
        self.map.lock().expect("tag map lock").insert(key, st);
        if *accept != Accept::Any {
            return;
        }
        let rec = TagRecord {
            upstream: up.name().to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
            digest: digest.to_string(),
            checked_at_ms: unix_now_ms(),
        };
        if let Err(e) = self.store.put_tag(&rec).await {
            tracing::warn!(upstream = up.name(), repo = repository, tag, error = %e, "could not persist tag");
        }
    }

    /// Forgets what a tag is for a client with `accept`: for one that takes every type,
    /// the tag itself (see [`Self::forget`]); for a narrower one, only what it was told
    /// (the upstream having no manifest of its types says nothing of the others).
    pub async fn forget_for(&self, up: &Upstream, repository: &str, tag: &str, accept: &Accept) {
        if *accept == Accept::Any {
            return self.forget(up, repository, tag).await;
        }
        if let Some(key) = tag_key_for(up, repository, tag, accept) {
            self.map.lock().expect("tag map lock").remove(&key);
        }
    }

    /// Every tag of `repository` this process knows or the store has a record of, with
    /// the digest it points to.
    pub async fn of_repository(
        &self,
        up: &Upstream,
        repository: &str,
    ) -> Result<Vec<(String, Digest)>, crate::proxy::store::StoreError> {
        let prefix = format!("{}\0{repository}\0", up.name());
        let mut out: HashMap<String, Digest> = self
            .map
            .lock()
            .expect("tag map lock")
            .iter()
            .filter_map(|(k, st)| {
                let tag = k.strip_prefix(&prefix)?;
                (!tag.contains('\0')).then(|| (tag.to_string(), st.digest.clone()))
            })
            .collect();
        for r in self.store.records().await?.tags {
            if r.upstream == up.name()
                && r.repository == repository
                && let Ok(d) = r.digest.parse()
            {
                out.entry(r.tag).or_insert(d);
            }
        }
        let mut out: Vec<_> = out.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Forgets a tag, under every `Accept`, and its record.
    pub async fn forget(&self, up: &Upstream, repository: &str, tag: &str) {
        let key = tag_key(up, repository, tag);
        let narrow = format!("{key}\0");
        self.map
            .lock()
            .expect("tag map lock")
            .retain(|k, _| *k != key && !k.starts_with(&narrow));
        let key = TagKey {
            upstream: up.name(),
            repository,
            tag,
        };
        if let Err(e) = self.store.delete_tag(key).await {
            tracing::warn!(upstream = up.name(), repo = repository, tag, error = %e, "could not remove a tag record");
        }
    }
}

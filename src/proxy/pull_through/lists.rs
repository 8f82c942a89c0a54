//! tags/list and referrers, passed through, and a short-lived cache of tags/list pages
//! bounded in bytes and entries.

use crate::oci::Digest;
use crate::proxy::error::ProxyError;
use crate::proxy::upstream::{Referrers, TagsPage, Upstream, tags_query};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Most bytes of tags/list answers kept at once.
const MAX_BYTES: usize = 16 << 20;
/// Most tags/list answers kept at once.
const MAX_ENTRIES: usize = 4096;

struct Entry {
    at: Instant,
    /// Which put stored it (see [`Held::order`]).
    seq: u64,
    page: TagsPage,
}

/// Remembered tags/list pages, oldest dropped first once over [`MAX_BYTES`] or
/// [`MAX_ENTRIES`].
#[derive(Default)]
pub struct TagLists {
    inner: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    pages: HashMap<String, Entry>,
    /// Keys in the order they were stored, with the put that stored them: a key stored
    /// again has an older, stale place here too.
    order: VecDeque<(String, u64)>,
    bytes: usize,
    seq: u64,
}

impl TagLists {
    /// The page remembered under `key`, if younger than `ttl`.
    pub fn get(&self, key: &str, ttl: Duration) -> Option<TagsPage> {
        let lists = self.inner.lock().expect("tag list lock");
        lists
            .pages
            .get(key)
            .filter(|e| e.at.elapsed() < ttl)
            .map(|e| e.page.clone())
    }

    /// Remembers a page, dropping the oldest ones to stay in bounds.
    pub fn put(&self, key: String, page: TagsPage) {
        let mut lists = self.inner.lock().expect("tag list lock");
        lists.seq += 1;
        let seq = lists.seq;
        let size = page.body.len() + key.len();
        let entry = Entry {
            at: Instant::now(),
            seq,
            page,
        };
        if let Some(old) = lists.pages.insert(key.clone(), entry) {
            lists.bytes -= old.page.body.len() + key.len();
        }
        lists.bytes += size;
        lists.order.push_back((key, seq));
        while lists.bytes > MAX_BYTES || lists.pages.len() > MAX_ENTRIES {
            let Some((oldest, seq)) = lists.order.pop_front() else {
                break;
            };
            if lists.pages.get(&oldest).is_some_and(|e| e.seq == seq) {
                let e = lists.pages.remove(&oldest).expect("just seen");
                lists.bytes -= e.page.body.len() + oldest.len();
            }
        }
        // Stale places of keys stored again would pile up under a client that asks for
        // the same pages over and over: drop them now and then.
        if lists.order.len() > 2 * MAX_ENTRIES {
            let Held { pages, order, .. } = &mut *lists;
            order.retain(|(k, seq)| pages.get(k).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Bytes and pages held (tests).
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let lists = self.inner.lock().expect("tag list lock");
        (lists.bytes, lists.pages.len())
    }
}

/// tags/list and referrers of every upstream, tags/list pages kept for `ttl`.
pub struct Lists {
    pages: TagLists,
    ttl: Duration,
}

impl Lists {
    /// Nothing kept yet; pages are kept for `ttl`.
    pub fn new(ttl: Duration) -> Lists {
        Lists {
            pages: TagLists::default(),
            ttl,
        }
    }

    /// `tags/list`, reused for `tags_list_ttl`. Only `n` and `last` of the client's query
    /// are passed on (see [`tags_query`]); the upstream's next page is returned
    /// for the client's `Link`.
    pub async fn tags_list(
        &self,
        up: &Upstream,
        repository: &str,
        query: Option<&str>,
    ) -> Result<TagsPage, ProxyError> {
        let query = tags_query(query);
        let key = format!(
            "{}\0{repository}\0{}",
            up.name(),
            query.as_deref().unwrap_or("")
        );
        if let Some(page) = self.pages.get(&key, self.ttl) {
            return Ok(page);
        }
        let page = up.tags(repository, query.as_deref()).await?;
        self.pages.put(key, page.clone());
        Ok(page)
    }

    /// `referrers/<digest>`, passed through.
    pub async fn referrers(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        query: Option<&str>,
    ) -> Result<Referrers, ProxyError> {
        Ok(up.referrers(repository, digest, query).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn pages_are_bounded_in_bytes_oldest_first() {
        let lists = TagLists::default();
        let page = |n: usize| TagsPage {
            body: Bytes::from(vec![b'x'; n]),
            next: None,
        };
        for i in 0..40 {
            lists.put(format!("k{i}"), page(1 << 20));
        }
        let (bytes, pages) = lists.held();
        assert!(bytes <= MAX_BYTES, "{bytes}");
        assert!(pages < 40);
        let ttl = Duration::from_secs(60);
        assert!(lists.get("k0", ttl).is_none(), "the oldest went first");
        assert!(lists.get("k39", ttl).is_some());
        // Storing a key again does not count it twice.
        lists.put("k39".into(), page(10));
        lists.put("k39".into(), page(10));
        assert_eq!(lists.get("k39", ttl).unwrap().body.len(), 10);
        for i in 0..3 * MAX_ENTRIES {
            lists.put(format!("small{i}"), page(1));
        }
        let (bytes, pages) = lists.held();
        assert!(pages <= MAX_ENTRIES && bytes <= MAX_BYTES);
    }
}

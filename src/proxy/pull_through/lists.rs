//! tags/list and referrers, passed through: what of a client's query is passed on and
//! remembered, the upstream's `Link` pagination, and a short-lived cache of tags/list
//! pages bounded in bytes and entries.

use super::*;
use crate::oci::Digest;
use crate::proxy::error::ProxyError;
use crate::proxy::metrics::Kind;
use crate::proxy::upstream::{Upstream, read_limited};
use bytes::Bytes;
use hyper::header::{self};
use hyper::{Method, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Largest tags/list or referrers answer passed through.
pub(super) const MAX_LIST_BYTES: usize = 4 << 20;

/// Most bytes of tags/list answers kept at once.
const MAX_BYTES: usize = 16 << 20;
/// Most tags/list answers kept at once.
const MAX_ENTRIES: usize = 4096;

/// One page of a repository's tags, as the upstream answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagsPage {
    /// The JSON body.
    pub body: Bytes,
    /// The query of the next page (`n=...&last=...`), from the upstream's `Link`.
    pub next: Option<String>,
}

/// The parameters of a tags/list query that mean something (`n`, `last`), in a fixed
/// order: what is passed upstream and what the cache is keyed by. Anything else a
/// client adds would only split the cache.
pub fn query(client: Option<&str>) -> Option<String> {
    let mut n = None;
    let mut last = None;
    for pair in client.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) if !v.is_empty() => n = Some(v),
            Some(("last", v)) if !v.is_empty() => last = Some(v),
            _ => {}
        }
    }
    let parts: Vec<String> = [("n", n), ("last", last)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join("&"))
}

/// The query of a `Link: <...>; rel="next"` header (a path or a full URL); `None` when
/// there is no next page or the header names none.
pub fn next_page(link: Option<&str>) -> Option<String> {
    link?.split(',').find_map(|item| {
        let (target, params) = item.trim().strip_prefix('<')?.split_once('>')?;
        let next = params.split(';').any(|p| {
            p.trim()
                .strip_prefix("rel=")
                .is_some_and(|r| r.trim_matches('"') == "next")
        });
        next.then(|| target.split_once('?').and_then(|(_, q)| query(Some(q))))
            .flatten()
    })
}

struct Entry {
    at: Instant,
    /// Which put stored it (see [`Lists::order`]).
    seq: u64,
    page: TagsPage,
}

/// Remembered tags/list pages, oldest dropped first once over [`MAX_BYTES`] or
/// [`MAX_ENTRIES`].
#[derive(Default)]
pub struct TagLists {
    inner: Mutex<Lists>,
}

#[derive(Default)]
struct Lists {
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
            let Lists { pages, order, .. } = &mut *lists;
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

impl PullThrough {
    /// `tags/list`, reused for `tags_list_ttl`. Only `n` and `last` of the client's query
    /// are passed on (see [`query`]); the upstream's next page is returned
    /// for the client's `Link`.
    pub async fn tags_list(
        &self,
        up: &Upstream,
        repository: &str,
        query: Option<&str>,
    ) -> Result<TagsPage, ProxyError> {
        let query = self::query(query);
        let key = format!(
            "{}\0{repository}\0{}",
            up.name(),
            query.as_deref().unwrap_or("")
        );
        if let Some(page) = self.tag_lists.get(&key, self.policy.tags_list_ttl) {
            return Ok(page);
        }
        let resp = up
            .request(
                Method::GET,
                Kind::Tags,
                repository,
                "tags/list",
                query.as_deref(),
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp.status(), Kind::Tags));
        }
        let next = next_page(header_str(resp.headers(), header::LINK));
        let body = read_limited(resp.into_body(), MAX_LIST_BYTES, up.timeout()).await?;
        let page = TagsPage { body, next };
        self.tag_lists.put(key, page.clone());
        Ok(page)
    }

    /// `referrers/<digest>`, passed through. Returns the body and its content type.
    pub async fn referrers(
        &self,
        up: &Upstream,
        repository: &str,
        digest: &Digest,
        query: Option<&str>,
    ) -> Result<(Bytes, Option<String>, Option<String>), ProxyError> {
        let resp = up
            .request(
                Method::GET,
                Kind::Referrers,
                repository,
                &format!("referrers/{digest}"),
                query,
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp.status(), Kind::Referrers));
        }
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_string);
        let filters = header_str(resp.headers(), "oci-filters-applied").map(str::to_string);
        let body = read_limited(resp.into_body(), MAX_LIST_BYTES, up.timeout()).await?;
        Ok((body, content_type, filters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_n_and_last_are_kept_in_order() {
        assert_eq!(query(Some("last=b&x=1&n=10")), Some("n=10&last=b".into()));
        assert_eq!(query(Some("cachebuster=7")), None);
        assert_eq!(query(None), None);
    }

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        let link = r#"</v2/library/alpine/tags/list?last=3.19&n=50>; rel="next""#;
        assert_eq!(next_page(Some(link)), Some("n=50&last=3.19".into()));
        let full = r#"<https://reg.example/v2/a/tags/list?n=2&last=b>; rel=next"#;
        assert_eq!(next_page(Some(full)), Some("n=2&last=b".into()));
        assert_eq!(
            next_page(Some(r#"</v2/a/tags/list?n=2>; rel="prev""#)),
            None
        );
        assert_eq!(next_page(None), None);
    }

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

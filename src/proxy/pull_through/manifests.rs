//! Manifests: cached by digest forever; a tag maps to a digest for `tag_ttl`, then is
//! revalidated with a HEAD, and while the upstream is down the last digest is served for
//! up to `stale_if_error` more. Concurrent misses for one manifest share one upstream
//! request; what a client's `Accept` allows decides what it is served.

use super::single_flight::SingleFlight;
use super::space::Space;
use super::tags::{TagState, Tags, tag_key_for};
use super::{CachePolicy, Manifest};
use crate::api::UpstreamMode;
use crate::oci::media::{Accept, manifest_media_type};
use crate::oci::{Digest, Reference};
use crate::proxy::error::ProxyError;
use crate::proxy::metrics::CacheResult;
use crate::proxy::upstream::{Patience, TagRule, Upstream};
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Whether a tag of a given age may be served without asking, only while the upstream
/// fails, or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Within `tag_ttl`.
    Fresh,
    /// Past `tag_ttl` but within `stale_if_error` after it.
    StaleServable,
    /// Too old to serve.
    Expired,
}

/// Classifies a tag by the time since the upstream last confirmed it.
pub fn freshness(age: Duration, policy: &CachePolicy) -> Freshness {
    if age < policy.tag_ttl {
        Freshness::Fresh
    } else if age < policy.tag_ttl + policy.stale_if_error {
        Freshness::StaleServable
    } else {
        Freshness::Expired
    }
}

pub(super) type ManifestResult = Result<(Manifest, CacheResult), ProxyError>;

/// `m`, if the client accepts its type.
pub(super) fn acceptable(m: Manifest, accept: &Accept) -> Result<Manifest, ProxyError> {
    if accept.allows(&m.media_type) {
        Ok(m)
    } else {
        Err(ProxyError::NotAcceptable(format!(
            "the manifest is {}, which the Accept header does not allow",
            m.media_type
        )))
    }
}

/// The manifests of the cache: what is cached by digest, tags as the [`Tags`] know them,
/// and the one upstream fetch per manifest at a time.
pub struct Manifests {
    space: Arc<Space>,
    tags: Arc<Tags>,
    flights: SingleFlight<String, ManifestResult>,
    policy: CachePolicy,
}

impl Manifests {
    /// The manifests of the cache in `space`, tags kept by `tags`.
    pub fn new(
        space: Arc<Space>,
        tags: Arc<Tags>,
        policy: CachePolicy,
        waiters: prometheus::IntGauge,
    ) -> Manifests {
        Manifests {
            space,
            tags,
            flights: SingleFlight::new(waiters),
            policy,
        }
    }

    /// A manifest by tag or digest, of a media type `accept` allows.
    ///
    /// Tags are kept for clients that accept every type (what the cache asks upstream
    /// for, so that one object serves them all). A client that accepts fewer types is
    /// served a cached manifest only of a type it accepts; otherwise the upstream is asked
    /// with its own `Accept` (it may have another manifest for it, as Docker Hub does for
    /// schema 2 clients), without touching the tag's record.
    ///
    /// `unlinked`: the digest asked for is not linked to the repository (see
    /// [`crate::proxy::links`]), and the cache's copy is [`ProxyError::NotLinked`]; what
    /// the upstream serves for the repository is served.
    pub async fn manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
        accept: &Accept,
        unlinked: bool,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let fetch_as = |reference: Reference, expect: Option<Digest>, result| {
            let (this, up, repo, accept) = (
                self.clone(),
                up.clone(),
                repository.to_string(),
                accept.clone(),
            );
            async move {
                // A fetch that ended between the caller's look at the cache and this one's
                // start may have stored it.
                if let Some(d) = &expect
                    && let Some(m) = this.cached_manifest(d).await?
                {
                    if unlinked {
                        return Err(ProxyError::NotLinked);
                    }
                    return Ok((acceptable(m, &accept)?, CacheResult::Hit));
                }
                let m = this
                    .fetch_manifest(&up, &repo, &reference, expect.as_ref(), &accept)
                    .await?;
                Ok((acceptable(m, &accept)?, result))
            }
        };
        let key = |reference: &str| {
            format!(
                "{}\0{repository}\0{reference}\0{}",
                up.name(),
                accept.upstream_header()
            )
        };
        // A pinned tag is its digest, whatever the upstream says.
        let rule = match reference {
            Reference::Tag(tag) => up.tag_rule(repository, tag),
            Reference::Digest(_) => TagRule::Refresh,
        };
        let immutable = rule == TagRule::Immutable;
        let pinned;
        let reference = match rule {
            TagRule::Pinned(digest) => {
                pinned = Reference::Digest(digest);
                &pinned
            }
            _ => reference,
        };
        match reference {
            Reference::Digest(digest) => {
                if let Some(m) = self.cached_manifest(digest).await? {
                    if unlinked {
                        return Err(ProxyError::NotLinked);
                    }
                    // A digest's content never changes: another type is not to be had.
                    return Ok((acceptable(m, accept)?, CacheResult::Hit));
                }
                let fetch = fetch_as(reference.clone(), Some(digest.clone()), CacheResult::Miss);
                self.coalesce(key(&digest.to_string()), fetch).await
            }
            Reference::Tag(tag) => {
                // The tag's record for every type serves any client of a type it has.
                let (state, fresh) = self
                    .fresh_tag(up, repository, tag, &Accept::Any, immutable)
                    .await?;
                if let Some(m) = fresh
                    && accept.allows(&m.media_type)
                {
                    let aged = state
                        .as_ref()
                        .is_some_and(|st| freshness(st.age(), &self.policy) != Freshness::Fresh);
                    if !aged || immutable {
                        return Ok((m, CacheResult::Hit));
                    }
                    if up.mode() == UpstreamMode::LocalFirst {
                        self.revalidate_later(up, repository, tag, state, key(tag));
                    }
                    return Ok((m, CacheResult::Stale));
                }
                // The tag's record for every type does not serve this client: its own
                // record, if its types can have one, else the upstream for each request.
                let narrow = *accept != Accept::Any;
                if narrow && tag_key_for(up, repository, tag, accept).is_none() {
                    return self
                        .coalesce(
                            key(tag),
                            fetch_as(reference.clone(), None, CacheResult::Miss),
                        )
                        .await;
                }
                let (this, up2, repo, tag, accept) = (
                    self.clone(),
                    up.clone(),
                    repository.to_string(),
                    tag.clone(),
                    accept.clone(),
                );
                self.coalesce(key(&tag), async move {
                    // A fetch that ended between the caller's look at the tag and this
                    // one's start may have refreshed it.
                    let (state, fresh) = this
                        .fresh_tag(&up2, &repo, &tag, &accept, immutable)
                        .await?;
                    if let Some(m) = fresh
                        && accept.allows(&m.media_type)
                    {
                        return Ok((m, CacheResult::Hit));
                    }
                    let (m, result) = this.resolve_tag(&up2, &repo, &tag, state, &accept).await?;
                    Ok((acceptable(m, &accept)?, result))
                })
                .await
            }
        }
    }

    /// Runs `fetch` unless an identical one is running; then waits for that one instead
    /// (see [`SingleFlight`]: the fetch finishes even if every client leaves).
    pub(super) async fn coalesce(
        &self,
        key: String,
        fetch: impl Future<Output = Result<(Manifest, CacheResult), ProxyError>> + Send + 'static,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let (result, started) = self
            .flights
            .run(key, fetch, |e| {
                Err(ProxyError::internal(format!("manifest fetch failed: {e}")))
            })
            .await;
        match result {
            Ok((m, CacheResult::Miss)) if !started => Ok((m, CacheResult::Coalesced)),
            other => other,
        }
    }

    /// A tag's state as `accept` sees it, and the cached manifest it points to if that
    /// may be served without asking the upstream: while it is fresh, or whatever its age
    /// when the upstream is `localFirst` or `offline` or the tag is `immutable`.
    async fn fresh_tag(
        &self,
        up: &Upstream,
        repository: &str,
        tag: &str,
        accept: &Accept,
        immutable: bool,
    ) -> Result<(Option<TagState>, Option<Manifest>), ProxyError> {
        let state = self.tags.state_for(up, repository, tag, accept).await;
        let fresh = match &state {
            Some(st)
                if up.mode() != UpstreamMode::Online
                    || freshness(st.age(), &self.policy) == Freshness::Fresh
                    || immutable =>
            {
                self.cached_manifest(&st.digest).await?
            }
            _ => None,
        };
        Ok((state, fresh))
    }

    /// Revalidates a tag that a `localFirst` upstream's client was just served from the
    /// cache past its TTL, in the background: one revalidation at a time per tag (it
    /// shares `key` with the clients' fetches), whose failure is only logged.
    fn revalidate_later(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        tag: &str,
        state: Option<TagState>,
        key: String,
    ) {
        let (this, up, repo, tag) = (
            self.clone(),
            up.clone(),
            repository.to_string(),
            tag.to_string(),
        );
        tokio::spawn(async move {
            let revalidate = {
                let (this, up, repo, tag) = (this.clone(), up.clone(), repo.clone(), tag.clone());
                async move {
                    this.resolve_tag(&up, &repo, &tag, state, &Accept::Any)
                        .await
                }
            };
            if let Err(e) = this.coalesce(key, revalidate).await {
                tracing::warn!(upstream = up.name(), repo, tag, error = %e, "revalidating a tag in the background failed");
            }
        });
    }

    /// Tag not fresh (or unknown): revalidate with HEAD, fetch on change, fall back to the
    /// last known digest while the upstream is down.
    pub(super) async fn resolve_tag(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        tag: &str,
        state: Option<TagState>,
        accept: &Accept,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let known = match &state {
            Some(st) => self.cached_manifest(&st.digest).await?.map(|m| (m, st)),
            None => None,
        };
        let stale_ok = |st: &TagState, e: &ProxyError| {
            e.upstream_is_down() && freshness(st.age(), &self.policy) != Freshness::Expired
        };
        if let Some((m, st)) = &known {
            // A copy that may be served stale does not wait in the upstream's queue.
            let patience = if freshness(st.age(), &self.policy) == Freshness::Expired {
                Patience::Queue
            } else {
                Patience::Now
            };
            let reference = Reference::Tag(tag.to_string());
            let head = up
                .manifest_digest(repository, &reference, accept, patience)
                .await;
            let outcome = match head {
                Ok(digest) if digest.as_ref() == Some(&m.digest) => {
                    self.tags
                        .confirm(up, repository, tag, &m.digest, accept)
                        .await;
                    return Ok((m.clone(), CacheResult::Hit));
                }
                Ok(_) => Ok(()),
                Err(e) => Err(ProxyError::from(e)),
            };
            match outcome {
                Ok(()) => {}
                Err(e) if e.upstream_not_found() => {
                    self.tags.forget_for(up, repository, tag, accept).await;
                    return Err(e);
                }
                Err(e) if stale_ok(st, &e) => {
                    tracing::warn!(upstream = up.name(), repo = repository, tag, error = %e, cache = "stale", "serving last known digest");
                    return Ok((m.clone(), CacheResult::Stale));
                }
                Err(e) => return Err(e),
            }
        }
        let reference = Reference::Tag(tag.to_string());
        match self
            .fetch_manifest(up, repository, &reference, None, accept)
            .await
        {
            Ok(m) => {
                self.tags
                    .confirm(up, repository, tag, &m.digest, accept)
                    .await;
                Ok((m, CacheResult::Miss))
            }
            Err(e) if e.upstream_not_found() => {
                self.tags.forget_for(up, repository, tag, accept).await;
                Err(e)
            }
            Err(e) => match &known {
                Some((m, st)) if stale_ok(st, &e) => Ok((m.clone(), CacheResult::Stale)),
                _ => Err(e),
            },
        }
    }

    /// A cached manifest. A store that cannot be read (a bucket that is down) is as good
    /// as a miss: the upstream is asked.
    pub(super) async fn cached_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<Manifest>, ProxyError> {
        match self.stored_manifest(digest).await {
            Err(ProxyError::Storage(e)) => {
                tracing::warn!(%digest, error = %e, "cache store unreadable; asking the upstream for the manifest");
                Ok(None)
            }
            found => found,
        }
    }

    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<Manifest>, ProxyError> {
        // Not in the index, it may still be in a store another replica shares.
        let index = self.space.index();
        let known = index.acquire_manifest(digest);
        if known.is_none() && !self.space.store().shared() {
            return Ok(None);
        }
        let found = self.space.store().manifest(digest).await?;
        let _guard = match (&found, known) {
            (None, Some(_)) => {
                self.space.discard(digest).await;
                None
            }
            (Some(m), None) => {
                let refs = crate::proxy::index::manifest_refs(&m.body);
                Some(index.adopt(digest, m.body.len() as u64, Some(refs)))
            }
            (_, known) => known,
        };
        Ok(found.map(|m| Manifest {
            digest: digest.clone(),
            media_type: m.media_type,
            body: m.body,
        }))
    }

    /// Caches a verified manifest when there is room; it is served either way.
    pub(super) async fn store_manifest(
        self: &Arc<Self>,
        digest: &Digest,
        body: &Bytes,
        media_type: &str,
    ) {
        if self.space.index().contains(digest) {
            return;
        }
        let Some(reservation) = self.space.reserve(body.len() as u64).await else {
            return;
        };
        let (index, d, b, mt) = (
            self.space.index().clone(),
            digest.clone(),
            body.clone(),
            media_type.to_string(),
        );
        // On its own task: the index and the store agree even if the client goes away.
        let result =
            tokio::spawn(async move { index.commit_manifest(&d, b, &mt, reservation).await })
                .await
                .expect("commit task");
        match result {
            Ok(()) => self.space.mark_disk_ok(),
            Err(e) if e.is_full() => self.space.mark_disk_full("manifest write failed"),
            Err(e) => tracing::warn!(%digest, error = %e, "could not cache a manifest"),
        }
    }

    /// GETs a manifest, checks that it is one, its size and its digest, and stores it.
    pub(super) async fn fetch_manifest(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
        reference: &Reference,
        expect: Option<&Digest>,
        accept: &Accept,
    ) -> Result<Manifest, ProxyError> {
        let limit = self.policy.max_manifest_bytes;
        let answer = up.manifest(repository, reference, accept, limit).await?;
        let claimed = answer.digest;
        let body = answer.body;
        let algorithm = expect
            .or(claimed.as_ref())
            .map_or(crate::oci::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &body);
        if let Some(want) = expect.or(claimed.as_ref())
            && *want != digest
        {
            return Err(ProxyError::UpstreamInvalid(
                format!("manifest {reference} hashes to {digest}, expected {want}").into(),
            ));
        }
        let media_type = manifest_media_type(answer.content_type.as_deref(), &body)
            .map_err(|e| ProxyError::UpstreamNotAManifest(e.to_string().into()))?;
        self.store_manifest(&digest, &body, &media_type).await;
        Ok(Manifest {
            digest,
            media_type,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn policy() -> CachePolicy {
        CachePolicy {
            tag_ttl: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(3600),
            tags_list_ttl: Duration::from_secs(30),
            max_manifest_bytes: 1 << 20,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tag_freshness_follows_the_clock() {
        let p = policy();
        let st = TagState {
            digest: Digest::of(crate::oci::Algorithm::Sha256, b"x"),
            age_at: Duration::from_secs(100),
            since: Instant::now(),
        };
        assert_eq!(freshness(st.age(), &p), Freshness::Fresh);
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(freshness(st.age(), &p), Freshness::StaleServable);
        tokio::time::advance(Duration::from_secs(3599)).await;
        assert_eq!(freshness(st.age(), &p), Freshness::StaleServable);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(freshness(st.age(), &p), Freshness::Expired);
    }
}

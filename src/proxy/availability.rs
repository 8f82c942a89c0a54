//! Whether images can be pulled now, asked by the controller for its workloads' images
//! (`POST /admin/availability`, docs/operations.md, "Know before the outage"). An image
//! the cache holds whole (its manifest and, for the platforms asked, every manifest and
//! blob under it) is `cached`, found without asking the upstream. Any other is asked
//! with one HEAD of its manifest, which registries do not count as a pull (Docker Hub's
//! limit counts GETs), sent as every upstream request is, under the upstream's caps and
//! back-off: `upstreamOnly` when the upstream has it, `unavailable` when it says it has
//! not (404) or cannot answer (down, offline mode), `unauthorized` when it refuses the
//! cache's credentials. `moved` says the tag names another digest than the one the
//! running pods use; `unchecked`, that the upstream asked to be left alone and nothing is
//! known now.

use super::admin::api::{Availability, ImageState};
use super::links::Links;
use super::pull_through::ConfiguredImage;
use super::upstream::{Patience, UpstreamError};
use crate::oci::media::Accept;
use crate::oci::{Digest, Reference};
use std::sync::Arc;

/// Images one request may name.
pub const MAX_IMAGES: usize = 2000;

/// The state of `image`, whose running pods use `running` (the digests of their
/// `imageID`s), for nodes of `platforms` (all when empty).
pub async fn check(
    links: &Arc<Links>,
    image: &ConfiguredImage,
    running: &[Digest],
    platforms: &[String],
) -> Availability {
    let cache = links.cache();
    let (up, repository) = (&image.upstream, image.repository.as_str());
    let known = match &image.reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(t) => cache.cached_tag(up, repository, t).await,
    };
    let answer = |state: ImageState, digest: Option<&Digest>, detail: Option<String>| {
        let moved = matches!(state, ImageState::Cached | ImageState::UpstreamOnly)
            && matches!(image.reference, Reference::Tag(_))
            && !running.is_empty()
            && digest.is_some_and(|d| !running.contains(d));
        Availability {
            image: image.name.clone(),
            state: if moved { ImageState::Moved } else { state },
            digest: digest.map(Digest::to_string),
            detail,
        }
    };
    if let Some(d) = &known
        && whole(links, d, platforms, 0).await
    {
        return answer(ImageState::Cached, Some(d), None);
    }
    let asked = up
        .manifest_digest(repository, &image.reference, &Accept::Any, Patience::Queue)
        .await;
    match asked {
        Ok(digest) => answer(
            ImageState::UpstreamOnly,
            digest.as_ref().or(known.as_ref()),
            None,
        ),
        Err(e) => {
            let state = match &e {
                UpstreamError::Denied(_) => ImageState::Unauthorized,
                UpstreamError::RateLimited { .. }
                | UpstreamError::BackedOff { .. }
                | UpstreamError::Busy { .. } => ImageState::Unchecked,
                _ => ImageState::Unavailable,
            };
            answer(state, None, Some(e.to_string()))
        }
    }
}

/// Whether the cache holds the manifest `digest` and everything under it that the
/// nodes of `platforms` pull.
async fn whole(links: &Arc<Links>, digest: &Digest, platforms: &[String], depth: usize) -> bool {
    let cache = links.cache();
    let Ok(Some(m)) = cache.store().manifest(digest).await else {
        return false;
    };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&m.body) else {
        return false;
    };
    if let Some(children) = doc.get("manifests").and_then(|c| c.as_array()) {
        if depth >= super::prefetcher::MAX_NESTING {
            return false;
        }
        for child in children {
            if !super::prefetcher::child_wanted(child, platforms) {
                continue;
            }
            let Some(d) = super::prefetcher::descriptor_digest(child) else {
                return false;
            };
            if !Box::pin(whole(links, &d, platforms, depth + 1)).await {
                return false;
            }
        }
        return true;
    }
    for d in super::index::manifest_refs(&m.body) {
        if !cache.holds(&d).await {
            return false;
        }
    }
    true
}

//! The admin endpoints' requests and answers, as JSON: one definition for the proxy that
//! serves them ([`crate::proxy::http`]) and the clients that ask (`pullthrough cache
//! drop`, the controller). docs/proxy.md, "Prefetching on request" and "Dropping an
//! image on purpose", says what each does.

use crate::api::UpstreamMode;
use crate::proxy::index::Removal;
use serde::{Deserialize, Serialize};

/// `POST /admin/prefetch`: images to pull into the cache before a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    /// Image references (`docker.io/library/alpine:3.20`).
    pub images: Vec<String>,
    /// Platforms of multi-platform images to fetch (`linux/amd64`); the proxy's
    /// `prefetchPlatforms` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Vec<String>>,
}

/// What `POST /admin/prefetch` was answered (202).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchAccepted {
    /// Queued now.
    pub queued: Vec<String>,
    /// Queued, being fetched, or fetched within `tagTTL` already: not queued again.
    pub known: Vec<String>,
}

/// Where a requested image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Queued.
    Pending,
    /// Being fetched.
    Running,
    /// In the cache.
    Done,
    /// Could not be fetched (see `error`).
    Failed,
}

/// One requested image's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// As requested.
    pub image: String,
    /// Where it is.
    pub state: State,
    /// Seconds it took, once done or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Blobs downloaded for it (what was cached already is not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blobs: Option<usize>,
    /// Bytes downloaded for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /admin/prefetch`: every requested image's progress, in the order requested.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefetchProgress {
    /// The images.
    pub images: Vec<Progress>,
}

/// `PUT /admin/in-use` (the images in use, replacing the set before) and its `GET`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InUse {
    /// Image references.
    pub images: Vec<String>,
}

/// What `PUT /admin/in-use` was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InUseSet {
    /// How many images are in use now.
    pub in_use: usize,
}

/// What `DELETE /admin/cache` drops: `?image=`, `?tag=` or `?repository=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum DropScope {
    /// An image (by tag or digest) and the blobs only it uses.
    #[default]
    Image,
    /// Where a tag points, alone: the next pull of it asks the upstream.
    Tag,
    /// Every tag and image of a repository, and its links.
    Repository,
}

impl DropScope {
    /// Its query parameter.
    pub fn param(self) -> &'static str {
        match self {
            DropScope::Image => "image",
            DropScope::Tag => "tag",
            DropScope::Repository => "repository",
        }
    }
}

/// What `DELETE /admin/cache` was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// What was asked for, as the proxy resolved it (an image, a tag, a repository).
    pub image: String,
    /// What was dropped.
    #[serde(default)]
    pub scope: DropScope,
    /// The tags forgotten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// What went.
    pub removed: Removal,
}

/// An admin endpoint's refusal (4xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why.
    pub error: String,
    /// The image it is about, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Refusal {
    /// A refusal saying `why`.
    pub fn new(why: impl Into<String>) -> Refusal {
        Refusal {
            error: why.into(),
            image: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_is_what_the_docs_show() {
        let asked: PrefetchRequest = serde_json::from_str(
            r#"{"images": ["docker.io/library/alpine:3.20"], "platforms": ["linux/amd64"]}"#,
        )
        .unwrap();
        assert_eq!(
            asked.platforms.as_deref(),
            Some(&["linux/amd64".to_string()][..])
        );
        assert!(serde_json::from_str::<PrefetchRequest>(r#"{"images": [], "x": 1}"#).is_err());
        let set = serde_json::to_value(InUseSet { in_use: 3 }).unwrap();
        assert_eq!(set, serde_json::json!({"inUse": 3}));
        let p = Progress {
            image: "a".into(),
            state: State::Pending,
            seconds: None,
            blobs: None,
            bytes: None,
            error: None,
        };
        let shown = serde_json::to_value(&p).unwrap();
        assert_eq!(shown, serde_json::json!({"image": "a", "state": "pending"}));
        assert_eq!(serde_json::from_value::<Progress>(shown).unwrap(), p);
    }
}

/// `POST /admin/availability`: the images to check, for nodes of `platforms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityRequest {
    /// The images.
    pub images: Vec<ImageToCheck>,
    /// The platforms the nodes run (`linux/amd64`); all when empty.
    #[serde(default)]
    pub platforms: Vec<String>,
}

/// One image to check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageToCheck {
    /// Its reference, as the workload names it.
    pub image: String,
    /// The digests the running pods of it use (their `imageID`s).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<String>,
}

/// What `POST /admin/availability` answers, in the order asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailabilityAnswer {
    /// One per image.
    pub images: Vec<Availability>,
}

/// Whether an image can be pulled now (see [`crate::proxy::availability`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Availability {
    /// As asked.
    pub image: String,
    /// Its state.
    pub state: ImageState,
    /// The digest its reference names now, as far as known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why it is unavailable, unauthorized or unchecked: the upstream's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// An image's state, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImageState {
    /// Every blob of the nodes' platforms is in the cache.
    Cached,
    /// Not (all) cached; the upstream has it.
    UpstreamOnly,
    /// Not asked now: the upstream asked to be left alone (its last state stands).
    Unchecked,
    /// The tag names another digest than the running pods use.
    Moved,
    /// The upstream refuses the cache's credentials.
    Unauthorized,
    /// Neither cached nor pullable: the next pull fails.
    Unavailable,
}

impl ImageState {
    /// Every state, best first.
    pub const ALL: [ImageState; 6] = [
        ImageState::Cached,
        ImageState::UpstreamOnly,
        ImageState::Unchecked,
        ImageState::Moved,
        ImageState::Unauthorized,
        ImageState::Unavailable,
    ];

    /// As the API and the metric's label write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Cached => "cached",
            ImageState::UpstreamOnly => "upstreamOnly",
            ImageState::Unchecked => "unchecked",
            ImageState::Moved => "moved",
            ImageState::Unauthorized => "unauthorized",
            ImageState::Unavailable => "unavailable",
        }
    }
}

/// `PUT /admin/mode`: the mode to put every upstream in, or one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMode {
    /// `online`, `localFirst` or `offline`.
    pub mode: UpstreamMode,
    /// The upstream's registry (`docker.io`); every upstream when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

/// What `GET` and `PUT /admin/mode` answer: the mode each upstream is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Modes {
    /// One per upstream.
    pub upstreams: Vec<UpstreamModeOf>,
}

/// One upstream's mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamModeOf {
    /// Its registry.
    pub upstream: String,
    /// The mode it is in.
    pub mode: UpstreamMode,
}

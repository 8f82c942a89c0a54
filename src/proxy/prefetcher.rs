//! Prefetching on request: `POST /admin/prefetch` on the operations port (with the admin
//! token) queues images to pull into the cache before a client asks for them
//! (docs/proxy.md, "Prefetching on request"). Requests are deduplicated: an image queued, being
//! fetched, or fetched within `tagTTL` is not queued again. Images are fetched one at a
//! time; `GET /admin/prefetch` shows each one's progress. Once an image is in, the time
//! until a client first pulls it is its lead time (`pullthrough_prefetch_lead_seconds`).
//!
//! An image is fetched as a client's pull would fetch it, through [`Links`]: each manifest
//! and blob is served from the cache under the image's repository only when the upstream
//! served or proved it there, so that a prefetch (which a workload's image names) can link
//! nothing that the image's own repository does not hold. [`prefetch_all`] fetches the
//! images of `prefetch` and `pin` at start.

use super::admin::api::{PrefetchAccepted, Progress, State};
use super::error::ProxyError;
use super::links::Links;
use super::pull_through::{BlobAsk, ConfiguredImage, Manifest};
use super::store::RepoKey;
use crate::oci::media::{Accept, DOCKER_MANIFEST_LIST, OCI_INDEX};
use crate::oci::{Digest, Reference};
use crate::proxy::metrics::{CacheResult, Metrics};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Images one request may name.
pub const MAX_IMAGES_PER_REQUEST: usize = 256;
/// Images whose state is kept: the oldest finished ones go first to make room, and a
/// request that would leave more than this many waiting or being fetched is refused.
pub const MAX_JOBS: usize = 1024;
/// Prefetched manifests waiting for a first pull; older ones are dropped past this.
const MAX_WAITING: usize = 50_000;

struct Job {
    progress: Progress,
    started: Instant,
    finished: Option<Instant>,
}

/// A queued image.
pub struct Queued {
    pub image: ConfiguredImage,
    pub platforms: Vec<String>,
    key: String,
}

/// Why a request was refused: it would leave more than [`MAX_JOBS`] images waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Images waiting or being fetched now.
    pub waiting: usize,
}

/// The queue and the state of requested images.
pub struct Prefetcher {
    jobs: Mutex<HashMap<String, Job>>,
    tx: mpsc::UnboundedSender<Queued>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Queued>>>,
    /// Manifests prefetched and not yet pulled by a client, with when they came in and
    /// the image they are of.
    waiting: Mutex<HashMap<(RepoKey, Digest), (Instant, String)>>,
    waiting_len: AtomicUsize,
    metrics: Metrics,
    /// How long a fetched image counts as fresh (a tag may move after).
    fresh_for: Duration,
}

/// The key that deduplicates requests: the image as the upstream names it.
fn key(image: &ConfiguredImage) -> String {
    format!(
        "{}/{}@{}",
        image.upstream.name(),
        image.repository,
        image.reference
    )
}

impl Prefetcher {
    pub fn new(metrics: Metrics, fresh_for: Duration) -> Prefetcher {
        let (tx, rx) = mpsc::unbounded_channel();
        Prefetcher {
            jobs: Mutex::default(),
            tx,
            rx: Mutex::new(Some(rx)),
            waiting: Mutex::default(),
            waiting_len: AtomicUsize::new(0),
            metrics,
            fresh_for,
        }
    }

    /// The queue's receiving end, for the one worker ([`super::run`]).
    pub fn take_queue(&self) -> Option<mpsc::UnboundedReceiver<Queued>> {
        self.rx.lock().expect("prefetch lock").take()
    }

    /// Queues `images` unless they are known already; none of them when that would leave
    /// more than [`MAX_JOBS`] images waiting or being fetched.
    pub fn request(
        &self,
        images: Vec<ConfiguredImage>,
        platforms: &[String],
    ) -> Result<PrefetchAccepted, QueueFull> {
        let mut out = PrefetchAccepted::default();
        let now = Instant::now();
        let mut jobs = self.jobs.lock().expect("prefetch lock");
        let known = |jobs: &HashMap<String, Job>, k: &str| {
            jobs.get(k).is_some_and(|j| match j.progress.state {
                State::Pending | State::Running => true,
                State::Done => j.finished.is_some_and(|f| now - f < self.fresh_for),
                State::Failed => false,
            })
        };
        let waiting = jobs.values().filter(|j| j.finished.is_none()).count();
        let new: std::collections::HashSet<String> = images
            .iter()
            .map(key)
            .filter(|k| !known(&jobs, k))
            .collect();
        if waiting + new.len() > MAX_JOBS {
            return Err(QueueFull { waiting });
        }
        // Room for them: the oldest finished images' states go.
        let over = (jobs.len() + new.len()).saturating_sub(MAX_JOBS);
        if over > 0 {
            let mut finished: Vec<(Instant, String)> = jobs
                .iter()
                .filter_map(|(k, j)| j.finished.map(|f| (f, k.clone())))
                .collect();
            finished.sort_unstable();
            for (_, k) in finished.into_iter().take(over) {
                jobs.remove(&k);
            }
        }
        for image in images {
            let k = key(&image);
            if known(&jobs, &k) {
                out.known.push(image.name.clone());
                continue;
            }
            jobs.insert(
                k.clone(),
                Job {
                    progress: Progress {
                        image: image.name.clone(),
                        state: State::Pending,
                        seconds: None,
                        blobs: None,
                        bytes: None,
                        error: None,
                    },
                    started: now,
                    finished: None,
                },
            );
            self.metrics
                .prefetch_images
                .with_label_values(&["pending"])
                .inc();
            out.queued.push(image.name.clone());
            let _ = self.tx.send(Queued {
                image,
                platforms: platforms.to_vec(),
                key: k,
            });
        }
        Ok(out)
    }

    /// Every requested image's progress, in the order requested.
    pub fn progress(&self) -> Vec<Progress> {
        let jobs = self.jobs.lock().expect("prefetch lock");
        let mut all: Vec<_> = jobs.values().collect();
        all.sort_by_key(|j| j.started);
        all.into_iter().map(|j| j.progress.clone()).collect()
    }

    /// The worker took `q` up.
    pub fn running(&self, q: &Queued) {
        if let Some(j) = self.jobs.lock().expect("prefetch lock").get_mut(&q.key) {
            j.progress.state = State::Running;
            j.started = Instant::now();
        }
    }

    /// `q` is in the cache (with these manifests) or failed.
    pub fn finished(&self, q: &Queued, outcome: Result<(Vec<Digest>, usize, u64), ProxyError>) {
        let now = Instant::now();
        let gauge = |state: &str| self.metrics.prefetch_images.with_label_values(&[state]);
        gauge("pending").dec();
        let mut jobs = self.jobs.lock().expect("prefetch lock");
        let job = jobs.get_mut(&q.key);
        match outcome {
            Ok((digests, blobs, bytes)) => {
                gauge("done").inc();
                if let Some(j) = job {
                    j.progress.state = State::Done;
                    j.progress.seconds = Some((now - j.started).as_secs_f64());
                    j.progress.blobs = Some(blobs);
                    j.progress.bytes = Some(bytes);
                    j.progress.error = None;
                    j.finished = Some(now);
                }
                drop(jobs);
                let repo = RepoKey {
                    upstream: q.image.upstream.name().to_string(),
                    repository: q.image.repository.clone(),
                };
                let mut waiting = self.waiting.lock().expect("prefetch lock");
                if waiting.len() + digests.len() > MAX_WAITING {
                    // The oldest have waited long enough to say nothing of a lead.
                    let cutoff = now.checked_sub(Duration::from_secs(86_400));
                    waiting.retain(|_, (t, _)| cutoff.is_none_or(|c| *t > c));
                }
                for d in digests {
                    if waiting.len() < MAX_WAITING {
                        waiting.insert((repo.clone(), d), (now, q.key.clone()));
                    }
                }
                self.waiting_len.store(waiting.len(), Ordering::Relaxed);
            }
            Err(error) => {
                gauge("failed").inc();
                if let Some(j) = job {
                    j.progress.state = State::Failed;
                    j.progress.seconds = Some((now - j.started).as_secs_f64());
                    j.progress.error = Some(error.to_string());
                    j.finished = Some(now);
                }
            }
        }
    }

    /// A client was served manifest `digest` of `repo`: the first pull of any manifest
    /// of a prefetched image counts the image's lead time, once.
    pub fn pulled(&self, repo: &RepoKey, digest: &Digest) {
        if self.waiting_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut waiting = self.waiting.lock().expect("prefetch lock");
        if let Some((at, image)) = waiting.remove(&(repo.clone(), digest.clone())) {
            self.metrics
                .prefetch_lead
                .observe(at.elapsed().as_secs_f64());
            waiting.retain(|_, (_, other)| *other != image);
        }
        self.waiting_len.store(waiting.len(), Ordering::Relaxed);
    }
}

/// Indexes within indexes followed at most (an index of an index is allowed; a loop of
/// them is not followed for ever).
pub(crate) const MAX_NESTING: usize = 4;

/// What prefetching an image took.
pub struct Prefetched {
    /// Manifests it has (its indexes and the wanted platforms' images).
    pub manifests: Vec<Manifest>,
    /// Blobs they reference.
    pub blobs: usize,
    /// Bytes downloaded for them (not counting what was cached already).
    pub bytes: u64,
}

/// Whether the child `child` of an index is one nodes of `platforms` pull: an index
/// within the index whatever its platform (it has none; its own entries are filtered),
/// an image when its platform is wanted.
pub(crate) fn child_wanted(child: &serde_json::Value, platforms: &[String]) -> bool {
    let kind = child.get("mediaType").and_then(|t| t.as_str());
    matches!(kind, Some(OCI_INDEX | DOCKER_MANIFEST_LIST))
        || platform_wanted(child.get("platform"), platforms)
}

/// Whether a platform descriptor is among `wanted` (`os/arch` or `os/arch/variant`);
/// everything is wanted when the list is empty.
fn platform_wanted(platform: Option<&serde_json::Value>, wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(p) = platform else {
        return false;
    };
    let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let short = format!("{}/{}", field("os"), field("architecture"));
    let long = format!("{short}/{}", field("variant"));
    wanted.iter().any(|w| *w == short || *w == long)
}

/// The digest a descriptor names, if it is valid.
pub(crate) fn descriptor_digest(d: &serde_json::Value) -> Option<Digest> {
    d.get("digest")?.as_str()?.parse().ok()
}

/// Pulls one image (of a multi-platform one, the platforms among `platforms`) into the
/// cache, through `links` as a client would: indexes (nested ones too), the platforms'
/// manifests, their configs and layers. A layer that names `urls` (a foreign or
/// non-distributable one) is fetched from there by the client, not prefetched.
pub async fn fetch_image(
    links: &Arc<Links>,
    image: &ConfiguredImage,
    platforms: &[String],
) -> Result<Prefetched, ProxyError> {
    let (up, repository) = (&image.upstream, image.repository.as_str());
    let not_json =
        |e: serde_json::Error| ProxyError::UpstreamNotAManifest(format!("not JSON: {e}").into());
    let (top, _) = links
        .manifest(up, repository, &image.reference, &Accept::Any)
        .await?;
    let mut manifests = Vec::new();
    let mut images = Vec::new();
    let mut queue = std::collections::VecDeque::from([(top, 0)]);
    while let Some((m, depth)) = queue.pop_front() {
        let doc: serde_json::Value = serde_json::from_slice(&m.body).map_err(not_json)?;
        manifests.push(m);
        let Some(children) = doc.get("manifests").and_then(|c| c.as_array()) else {
            images.push(doc);
            continue;
        };
        if depth >= MAX_NESTING {
            return Err(ProxyError::UpstreamNotAManifest(
                format!("indexes nested more than {MAX_NESTING} deep").into(),
            ));
        }
        for child in children {
            if !child_wanted(child, platforms) {
                continue;
            }
            let Some(d) = descriptor_digest(child) else {
                continue;
            };
            let (m, _) = links
                .manifest(up, repository, &Reference::Digest(d), &Accept::Any)
                .await?;
            queue.push_back((m, depth + 1));
        }
    }
    let (mut blobs, mut bytes) = (0, 0u64);
    for doc in &images {
        let mut descriptors: Vec<&serde_json::Value> = doc.get("config").into_iter().collect();
        for list in ["layers", "blobs"] {
            descriptors.extend(
                doc.get(list)
                    .and_then(|l| l.as_array())
                    .into_iter()
                    .flatten(),
            );
        }
        for desc in descriptors {
            let foreign = desc
                .get("urls")
                .and_then(|u| u.as_array())
                .is_some_and(|u| !u.is_empty());
            let Some(d) = descriptor_digest(desc).filter(|_| !foreign) else {
                continue;
            };
            bytes += fetch_blob(links, image, &d).await?;
            blobs += 1;
        }
    }
    Ok(Prefetched {
        manifests,
        blobs,
        bytes,
    })
}

/// Makes sure blob `d` of `image` is cached and linked to the image's repository; the
/// bytes downloaded for it.
async fn fetch_blob(
    links: &Arc<Links>,
    image: &ConfiguredImage,
    d: &Digest,
) -> Result<u64, ProxyError> {
    let (up, repository) = (&image.upstream, image.repository.as_str());
    let cache = links.cache();
    // Cached already (or perhaps, in a shared bucket): linked, or proven by a HEAD.
    if cache.index().contains(d) || cache.store().shared() {
        let head = BlobAsk {
            head: true,
            ..BlobAsk::default()
        };
        if links.blob(up, repository, d, head, false).await?.result == CacheResult::Hit {
            return Ok(0);
        }
    }
    let answer = links
        .blob(up, repository, d, BlobAsk::default(), false)
        .await?;
    let fetched = answer.result != CacheResult::Hit;
    let mut bytes = 0;
    if let Some(mut body) = answer.body {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ProxyError::Body(Arc::new(e)))?;
            if fetched {
                bytes += chunk.len() as u64;
                cache.metrics().prefetch_bytes.inc_by(chunk.len() as u64);
            }
        }
    }
    cache.stored(d).await?;
    Ok(bytes)
}

/// Pulls `images` (those of `prefetch` and `pin`) into the cache one after the other,
/// logging progress and counting it in `pullthrough_prefetch_images{state}` and
/// `pullthrough_prefetch_bytes_total`; `platforms` limits multi-platform images.
pub async fn prefetch_all(links: &Arc<Links>, images: &[ConfiguredImage], platforms: &[String]) {
    let metrics = links.cache().metrics().clone();
    let gauge = |state: &str| metrics.prefetch_images.with_label_values(&[state]);
    // Added to: images requested on the operations port count here too.
    gauge("pending").add(images.len() as i64);
    for image in images {
        let started = Instant::now();
        tracing::info!(image = %image.name, "prefetching");
        match fetch_image(links, image, platforms).await {
            Ok(done) => {
                gauge("done").inc();
                tracing::info!(image = %image.name, manifests = done.manifests.len(),
                    blobs = done.blobs, bytes = done.bytes,
                    seconds = started.elapsed().as_secs_f64(), "prefetched");
            }
            Err(e) => {
                gauge("failed").inc();
                tracing::warn!(image = %image.name, error = %e, "prefetch failed");
            }
        }
        gauge("pending").dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_filter() {
        let p = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(platform_wanted(Some(&p), &[]));
        assert!(platform_wanted(Some(&p), &["linux/arm64".into()]));
        assert!(platform_wanted(Some(&p), &["linux/arm64/v8".into()]));
        assert!(!platform_wanted(Some(&p), &["linux/amd64".into()]));
        assert!(!platform_wanted(None, &["linux/amd64".into()]));
    }
}

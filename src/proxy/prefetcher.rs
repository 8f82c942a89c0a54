//! Prefetching on request: `POST /admin/prefetch` on the operations port (with the admin
//! token) queues images to pull into the cache before a client asks for them
//! (docs/proxy.md, "Prefetching on request"). Requests are deduplicated: an image queued, being
//! fetched, or fetched within `tagTTL` is not queued again. Images are fetched one at a
//! time; `GET /admin/prefetch` shows each one's progress. Once an image is in, the time
//! until a client first pulls it is its lead time (`pullthrough_prefetch_lead_seconds`).

use super::pull_through::ConfiguredImage;
use super::store::RepoKey;
use crate::oci::Digest;
use crate::proxy::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Images one request may name.
pub const MAX_IMAGES_PER_REQUEST: usize = 256;
/// Images whose state is kept (the oldest finished ones go first).
const MAX_JOBS: usize = 10_000;
/// Prefetched manifests waiting for a first pull; older ones are dropped past this.
const MAX_WAITING: usize = 50_000;

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

/// One requested image's progress, as `GET /admin/prefetch` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// As requested.
    pub image: String,
    /// Where it is.
    pub state: State,
    /// Seconds it took, once done or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Blobs and bytes downloaded for it (what was cached already is not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blobs: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

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

/// What a request was answered.
#[derive(Debug, Default, Serialize)]
pub struct Accepted {
    /// Queued now.
    pub queued: Vec<String>,
    /// Queued, being fetched, or fetched within tagTTL already: not queued again.
    pub known: Vec<String>,
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

    /// Queues `images` unless they are known already.
    pub fn request(&self, images: Vec<ConfiguredImage>, platforms: &[String]) -> Accepted {
        let mut out = Accepted::default();
        let now = Instant::now();
        let mut jobs = self.jobs.lock().expect("prefetch lock");
        for image in images {
            let k = key(&image);
            let known = jobs.get(&k).is_some_and(|j| match j.progress.state {
                State::Pending | State::Running => true,
                State::Done => j.finished.is_some_and(|f| now - f < self.fresh_for),
                State::Failed => false,
            });
            if known {
                out.known.push(image.name.clone());
                continue;
            }
            if jobs.len() >= MAX_JOBS {
                let oldest = jobs
                    .iter()
                    .filter(|(_, j)| j.finished.is_some())
                    .min_by_key(|(_, j)| j.finished)
                    .map(|(k, _)| k.clone());
                if let Some(o) = oldest {
                    jobs.remove(&o);
                }
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
        out
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
    pub fn finished(&self, q: &Queued, outcome: Result<(Vec<Digest>, usize, u64), String>) {
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
                    j.progress.error = Some(error);
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

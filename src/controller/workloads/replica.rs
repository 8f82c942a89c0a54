//! One replica brought to what its mirror wants: it is asked for the images it lacks
//! (those it has not fetched, is not fetching, and did not just fail), told the images in
//! use when its set differs, and the images the controller asked of it are followed to an
//! Event each. What the replica has is read from it each time (`GET /admin/prefetch`,
//! `GET /admin/in-use`): a replica that restarted and forgot is brought back the same way
//! as a new one.

use super::desired::Replica;
use crate::controller::context::Error;
use crate::proxy::admin::{self, AdminError, api::State};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// How long an image that failed on a replica waits before it is asked for there again.
pub const RETRY_FAILED: Duration = Duration::from_secs(300);

/// What the controller remembers of a replica: the images it asked for and has not
/// seen finish, and those that failed, since when.
#[derive(Debug, Default)]
pub struct Memory {
    asked: BTreeSet<String>,
    failed: BTreeMap<String, Instant>,
}

/// How an image the controller asked for ended on a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// As asked.
    pub image: String,
    /// Seconds it took.
    pub seconds: f64,
    /// Why it failed; `None` when it is in the cache.
    pub error: Option<String>,
}

/// What a sync did to one replica.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Synced {
    /// The images it was asked to prefetch now.
    pub asked: Vec<String>,
    /// Whether it was told the images in use (its set differed).
    pub told_in_use: bool,
    /// The images asked for before that it finished since.
    pub finished: Vec<Finished>,
    /// Whether images it was asked for are still on their way.
    pub following: bool,
}

/// Brings `replica` to `wanted`: asks it for what it lacks (of `platforms`), tells it the
/// images `in_use` when its set differs, and says which images asked for before finished.
pub async fn sync(
    replica: &Replica,
    memory: &mut Memory,
    wanted: &BTreeSet<String>,
    in_use: &BTreeSet<String>,
    platforms: &[String],
    token: &str,
) -> Result<Synced, Error> {
    let url = replica.url.as_str();
    let failed = |source: AdminError| Error::Replica {
        url: url.to_string(),
        source,
    };
    let progress = admin::prefetch_progress(url, token).await.map_err(failed)?;
    let mut out = Synced::default();
    let now = Instant::now();
    memory
        .failed
        .retain(|_, at| now.duration_since(*at) < RETRY_FAILED);
    let mut has = BTreeSet::new();
    let mut underway = BTreeSet::new();
    for p in progress.images {
        match p.state {
            State::Pending | State::Running => {
                underway.insert(p.image.clone());
                has.insert(p.image);
            }
            State::Done | State::Failed if memory.asked.remove(&p.image) => {
                if p.state == State::Failed {
                    memory.failed.insert(p.image.clone(), now);
                } else {
                    has.insert(p.image.clone());
                }
                out.finished.push(Finished {
                    image: p.image,
                    seconds: p.seconds.unwrap_or_default(),
                    error: (p.state == State::Failed).then(|| p.error.unwrap_or_default()),
                });
            }
            State::Done => {
                has.insert(p.image);
            }
            State::Failed => {}
        }
    }
    // What it no longer knows of (it restarted) is asked for again below.
    memory.asked.retain(|i| underway.contains(i));
    let lacking: Vec<String> = wanted
        .iter()
        .filter(|i| !has.contains(*i) && !memory.failed.contains_key(*i))
        .cloned()
        .collect();
    if !lacking.is_empty() {
        let answer = admin::prefetch(url, &lacking, platforms, token)
            .await
            .map_err(failed)?;
        memory.asked.extend(answer.queued.iter().cloned());
        out.asked = answer.queued;
    }
    let told = admin::in_use(url, token).await.map_err(failed)?;
    if told.images.iter().collect::<BTreeSet<_>>() != in_use.iter().collect() {
        let images: Vec<String> = in_use.iter().cloned().collect();
        admin::set_in_use(url, &images, token)
            .await
            .map_err(failed)?;
        out.told_in_use = true;
    }
    out.following = !memory.asked.is_empty();
    Ok(out)
}

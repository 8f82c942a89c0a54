//! Pods the webhook never saw. `failurePolicy: Ignore` lets a pod in unrewritten when
//! the webhook is down or too slow, and nobody would know: the leader watches every pod
//! and counts, per rewriting mirror, those running now that its rewrite would have
//! rewritten and that carry neither the `rewritten` label nor the `not-rewritten`
//! annotation (which the webhook puts on every pod it answered for with a mirror's
//! images), created since the mirror rewrites. Each such pod gets one Event; the counts
//! go to the mirrors' status (and their Degraded condition), their sum to the
//! `pullthrough_rewrite_missed_pods` metric.

use super::decide::{self, Namespace as NsView, Operation, Outcome};
use crate::api::mirror::RegistryMirror;
use crate::api::mirror::rewrite::{NOT_REWRITTEN, REWRITTEN_LABEL};
use crate::controller::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The mirrors (`namespace/name`) whose rewrite `pod` missed: none for a pod the webhook
/// answered for, one not running, or one created before the mirror rewrote.
pub fn missed_by(pod: &Pod, ns: &NsView, mirrors: &[Arc<RegistryMirror>]) -> Vec<String> {
    let seen =
        pod.labels().contains_key(REWRITTEN_LABEL) || pod.annotations().contains_key(NOT_REWRITTEN);
    let done = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if seen || done || pod.meta().deletion_timestamp.is_some() {
        return Vec::new();
    }
    let created = pod.creation_timestamp().map(|t| t.0);
    // What the webhook would have done had every mirror been ready.
    let decision = decide::decide_with(pod, ns, Operation::Create, mirrors, |_| true);
    decision
        .outcomes
        .into_iter()
        .filter(|(_, o)| matches!(o, Outcome::Rewritten(_)))
        .map(|(key, _)| key)
        .filter(|key| {
            let since = mirrors
                .iter()
                .find(|m| decide::key(m) == *key)
                .and_then(|m| m.status.as_ref()?.rewrite.as_ref()?.since.clone());
            match (since, created) {
                (Some(since), Some(created)) => created >= since.0,
                _ => false,
            }
        })
        .collect()
}

/// What the audit keeps of a missed pod.
struct Missed {
    mirrors: Vec<String>,
}

/// Watches every pod until dropped, keeping `ctx`'s missed counts (and the metric)
/// current and saying on `changed` when they change.
pub async fn run(
    ctx: Arc<Context>,
    views: super::Views,
    changed: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let mut missed: HashMap<String, Missed> = HashMap::new();
    let mut listing: Option<HashMap<String, Missed>> = None;
    let mut told: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(event) = event else { continue };
        let (pod, present) = match event {
            watcher::Event::Init => {
                listing = Some(HashMap::new());
                continue;
            }
            watcher::Event::InitDone => {
                if let Some(fresh) = listing.take() {
                    missed = fresh;
                    publish(&ctx, &missed, &changed);
                }
                continue;
            }
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => (p, true),
            watcher::Event::Delete(p) => (p, false),
        };
        let uid = pod.uid().unwrap_or_default();
        let found = if present {
            let ns = pod.namespace().unwrap_or_default();
            let labels = views.namespace_labels(&ns);
            let view = NsView {
                name: &ns,
                labels: &labels,
            };
            missed_by(&pod, &view, &views.mirrors.state())
        } else {
            Vec::new()
        };
        if !found.is_empty() && told.insert(uid.clone()) {
            tell(&ctx, &pod, &found).await;
        }
        if found.is_empty() {
            told.remove(&uid);
        }
        let target = listing.as_mut().unwrap_or(&mut missed);
        let before = if found.is_empty() {
            target.remove(&uid).map(|m| m.mirrors)
        } else {
            target
                .insert(
                    uid,
                    Missed {
                        mirrors: found.clone(),
                    },
                )
                .map(|m| m.mirrors)
        };
        if listing.is_none() && before.unwrap_or_default() != found {
            publish(&ctx, &missed, &changed);
        }
    }
}

/// The counts per mirror, to the context and the metric; a word on `changed`.
fn publish(
    ctx: &Context,
    missed: &HashMap<String, Missed>,
    changed: &tokio::sync::mpsc::UnboundedSender<()>,
) {
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for m in missed.values().flat_map(|m| &m.mirrors) {
        *counts.entry(m.clone()).or_default() += 1;
    }
    ctx.metrics.set_missed(counts.values().sum());
    *ctx.missed.lock().expect("lock") = counts;
    let _ = changed.send(());
}

/// An Event on the pod: admitted without the rewrite.
async fn tell(ctx: &Context, pod: &Pod, mirrors: &[String]) {
    let event = Event {
        type_: EventType::Warning,
        reason: "NotRewritten".into(),
        note: Some(format!(
            "admitted without the image rewrite of mirror {}: the webhook did not answer \
             (down or too slow, and failurePolicy is Ignore), so the images are pulled as \
             written; delete the pod to have it rewritten",
            mirrors.join(", ")
        )),
        action: "Audit".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

//! What a node should have: for each registry, the mirror that serves it there; which of
//! those mirrors answer from the node ([`probe`](super::probe)); and, after a sync, which
//! mirrors are configured on it.

use super::hosts::{DesiredHost, SyncReport};
use super::probe;
use crate::api::mirror::{
    RegistryMirror, claim_order, is_ready, mirror_key, registry_key, upstream_url,
};
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The files a node should have: for each registry, the oldest Ready mirror that
/// selects the node and serves it.
pub fn desired_hosts(
    node_labels: &BTreeMap<String, String>,
    mirrors: &[Arc<RegistryMirror>],
) -> BTreeMap<String, DesiredHost> {
    let mut eligible: Vec<&Arc<RegistryMirror>> = mirrors
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .filter(|m| m.spec.nodes.configure)
        .filter(|m| {
            m.spec
                .nodes
                .selector
                .iter()
                .all(|(k, v)| node_labels.get(k) == Some(v))
        })
        .filter(|m| is_ready(m))
        .filter(|m| {
            m.status
                .as_ref()
                .and_then(|s| s.endpoint.as_ref())
                .is_some()
        })
        .collect();
    eligible.sort_by_key(|m| claim_order(m));
    let mut out = BTreeMap::new();
    for m in eligible {
        let endpoint = m
            .status
            .as_ref()
            .and_then(|s| s.endpoint.clone())
            .expect("filtered");
        let key = mirror_key(&m.namespace().unwrap_or_default(), &m.name_any());
        // The registries the controller says it serves (one it lost to an older mirror
        // is that one's); a status without the list, from an older controller: all.
        let served = &m.status.as_ref().expect("filtered").served_registries;
        for u in &m.spec.upstreams {
            let registry = registry_key(&u.registry);
            if !served.is_empty() && !served.contains(&registry) {
                continue;
            }
            out.entry(registry).or_insert_with(|| DesiredHost {
                mirror: key.clone(),
                server: upstream_url(u),
                endpoint: endpoint.clone(),
                ca: m.status.as_ref().and_then(|s| s.ca_bundle.clone()),
                skip_verify: m.spec.tls.as_ref().is_some_and(|t| t.skip_verify),
            });
        }
    }
    out
}

/// Mirrors all of whose files are in place after a sync (the Node annotation's value).
pub fn configured_mirrors(
    desired: &BTreeMap<String, DesiredHost>,
    report: &SyncReport,
) -> BTreeSet<String> {
    let in_place: BTreeSet<&String> = report.in_place().collect();
    let mut ok: BTreeSet<String> = desired.values().map(|h| h.mirror.clone()).collect();
    for (registry, host) in desired {
        if !in_place.contains(registry) {
            ok.remove(&host.mirror);
        }
    }
    ok
}

/// Failed probes in a row after which a mirror is left out (one more is a blip: a
/// replica restarting behind its Service).
pub(super) const PROBES_TO_LEAVE_OUT: u32 = 2;

/// The registries of `desired` whose mirror answers: each distinct endpoint asked once
/// ([`probe::answers`]), its failures in a row counted in `failures`; one that failed
/// `needed` times in a row is left out. What changed is logged.
pub(super) async fn answering(
    desired: BTreeMap<String, DesiredHost>,
    failures: &mut BTreeMap<String, u32>,
    needed: u32,
) -> BTreeMap<String, DesiredHost> {
    let endpoints: BTreeSet<String> = desired.values().map(|h| h.endpoint.clone()).collect();
    let answers = futures::future::join_all(endpoints.iter().map(|e| probe::answers(e))).await;
    failures.retain(|e, _| endpoints.contains(e));
    for (endpoint, answer) in endpoints.iter().zip(answers) {
        let count = failures.entry(endpoint.clone()).or_default();
        match answer {
            Ok(()) => {
                if *count >= needed {
                    tracing::info!(mirror = %endpoint, "the mirror answers again; pulls go through it");
                }
                *count = 0;
            }
            Err(why) => {
                *count += 1;
                if *count == needed {
                    tracing::warn!(mirror = %endpoint, %why, "the mirror does not answer; pulls on this node go to the upstreams until it does");
                }
            }
        }
    }
    desired
        .into_iter()
        .filter(|(_, h)| failures.get(&h.endpoint).is_none_or(|n| *n < needed))
        .collect()
}

//! What the controller carries to a mirror's running replicas besides prefetches: the
//! spec's modes (a change of modes alone rolls no pod, see `reconcile`), and the drops
//! the `pullthrough.dev/drop` annotation asks for. And the status fields that say so
//! (`modes`, `pinnedTags`, `drop`, with `prefetchedImages`), which this loop writes with
//! a field manager of its own.

use super::desired::Replica;
use crate::api::UpstreamMode;
use crate::api::mirror::{
    DROP_ANNOTATION, DropStatus, ImagesStatus, RegistryMirror, RegistryMirrorStatus,
    UpstreamModeStatus, parse_drops,
};
use crate::controller::context::Error;
use crate::proxy::admin::{self, AdminError, api::DropScope};
use kube::ResourceExt;

fn replica_error(replica: &Replica) -> impl Fn(AdminError) -> Error + '_ {
    move |source| Error::Replica {
        url: replica.url.clone(),
        source,
    }
}

/// Puts each upstream of `replica` in the mode `wanted` says, where it is in another:
/// the modes it reports after.
pub async fn sync_modes(
    replica: &Replica,
    wanted: &[(String, UpstreamMode)],
    token: &str,
) -> Result<Vec<UpstreamModeStatus>, Error> {
    let url = replica.url.as_str();
    let mut have = admin::modes(url, token)
        .await
        .map_err(replica_error(replica))?;
    for (upstream, mode) in wanted {
        let now = have.upstreams.iter().find(|u| &u.upstream == upstream);
        if now.is_some_and(|u| u.mode != *mode) {
            tracing::info!(replica = url, upstream, %mode, "carrying the mirror's mode to a replica");
            have = admin::set_mode(url, upstream, *mode, token)
                .await
                .map_err(replica_error(replica))?;
        }
    }
    Ok(have
        .upstreams
        .into_iter()
        .map(|u| UpstreamModeStatus {
            upstream: u.upstream,
            mode: u.mode,
        })
        .collect())
}

/// The drop the mirror's annotation asks for and its status does not show done yet:
/// made on every one of `replicas` (all or none: a replica that fails fails the
/// reconcile, which is retried, and what the others did again is done again harmlessly),
/// or refused when the annotation does not parse. `None` when nothing new is asked.
pub async fn carry_drop(
    mirror: &RegistryMirror,
    replicas: &[Replica],
    token: &str,
    now: &str,
) -> Result<Option<DropStatus>, Error> {
    let Some(request) = mirror.annotations().get(DROP_ANNOTATION) else {
        return Ok(None);
    };
    let done = mirror.status.as_ref().and_then(|s| s.drop.as_ref());
    if done.is_some_and(|d| &d.request == request) || replicas.is_empty() {
        return Ok(None);
    }
    let items = match parse_drops(request) {
        Ok(items) => items,
        Err(why) => {
            return Ok(Some(DropStatus {
                request: request.clone(),
                error: Some(format!("not done: {why}")),
                ..DropStatus::default()
            }));
        }
    };
    let mut status = DropStatus {
        request: request.clone(),
        done_at: Some(now.to_string()),
        replicas: replicas.len() as i32,
        ..DropStatus::default()
    };
    for r in replicas {
        for item in &items {
            let scope = match item.scope {
                "tag" => DropScope::Tag,
                "repository" => DropScope::Repository,
                _ => DropScope::Image,
            };
            let dropped = admin::drop(&r.url, scope, &item.what, token)
                .await
                .map_err(replica_error(r))?;
            status.tags += dropped.tags.len() as i64;
            status.manifests += dropped.removed.manifests.len() as i64;
            status.blobs += dropped.removed.blobs.len() as i64;
            status.bytes += dropped.removed.bytes as i64;
        }
    }
    tracing::info!(mirror = %mirror.name_any(), request, replicas = replicas.len(), "dropped from every replica's cache");
    Ok(Some(status))
}

/// The status fields this loop owns, as they should read now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Owned {
    /// Images prefetched for workloads (prefetching mirrors only).
    pub prefetched_images: Option<i64>,
    /// The modes the replicas report.
    pub modes: Vec<UpstreamModeStatus>,
    /// The spec's pinned tags.
    pub pinned_tags: Vec<String>,
    /// The last drop.
    pub drop: Option<DropStatus>,
    /// The workloads' images by availability.
    pub images: Option<ImagesStatus>,
}

impl Owned {
    /// What `status` shows of them.
    pub fn of(status: Option<&RegistryMirrorStatus>) -> Owned {
        let Some(s) = status else {
            return Owned::default();
        };
        Owned {
            prefetched_images: s.prefetched_images,
            modes: s.modes.clone(),
            pinned_tags: s.pinned_tags.clone(),
            drop: s.drop.clone(),
            images: s.images.clone(),
        }
    }

    /// The server-side apply patch that writes them all (a field this manager wrote
    /// before and leaves out would be removed).
    pub fn patch(&self) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        if let Some(n) = self.prefetched_images {
            status.insert("prefetchedImages".into(), n.into());
        }
        if !self.modes.is_empty() {
            status.insert(
                "modes".into(),
                serde_json::to_value(&self.modes).expect("modes"),
            );
        }
        if !self.pinned_tags.is_empty() {
            status.insert("pinnedTags".into(), self.pinned_tags.clone().into());
        }
        if let Some(d) = &self.drop {
            status.insert(
                "drop".into(),
                serde_json::to_value(d).expect("a drop status"),
            );
        }
        if let Some(i) = &self.images {
            status.insert(
                "images".into(),
                serde_json::to_value(i).expect("an images status"),
            );
        }
        serde_json::json!({
            "apiVersion": "pullthrough.dev/v1alpha1",
            "kind": "RegistryMirror",
            "status": status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_names_every_owned_field_and_only_those() {
        let owned = Owned {
            prefetched_images: Some(2),
            modes: vec![UpstreamModeStatus {
                upstream: "docker.io".into(),
                mode: UpstreamMode::Offline,
            }],
            pinned_tags: vec!["docker.io/org/app:latest -> sha256:aa".into()],
            drop: Some(DropStatus {
                request: "image=alpine:3".into(),
                done_at: Some("2026-12-06T08:00:00Z".into()),
                replicas: 2,
                ..DropStatus::default()
            }),
            images: Some(ImagesStatus {
                cached: 3,
                unavailable: 1,
                ..ImagesStatus::default()
            }),
        };
        let p = owned.patch();
        let status = p["status"].as_object().unwrap();
        let mut keys: Vec<&str> = status.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["drop", "images", "modes", "pinnedTags", "prefetchedImages"]
        );
        assert_eq!(p["status"]["images"]["unavailable"], 1);
        assert_eq!(p["status"]["modes"][0]["mode"], "offline");
        assert_eq!(p["status"]["drop"]["doneAt"], "2026-12-06T08:00:00Z");
        let back: RegistryMirrorStatus = serde_json::from_value(p["status"].clone()).unwrap();
        assert_eq!(Owned::of(Some(&back)), owned);
        assert!(
            Owned::default().patch()["status"]
                .as_object()
                .unwrap()
                .is_empty()
        );
    }
}

//! Know before the outage (issue #40, docs/operations.md): every image the workloads a
//! mirror serves use, checked on its replicas (`POST /admin/availability`) when the
//! workloads' images change and every `availability.every`; what the status, the metric,
//! the alert and the workloads' Events say of them. Pure but for [`check`].

use super::desired::{Workload, selects};
use crate::api::docker_hub::registry_key;
use crate::api::mirror::{ImageInTrouble, ImagesStatus, RegistryMirror};
use crate::proxy::admin::api::{Availability, ImageState, ImageToCheck};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Images in trouble the status lists.
pub const MAX_LISTED: usize = 20;

/// Workloads the status names per image.
const MAX_WORKLOADS: usize = 5;

/// Images asked of a replica per request.
const PER_REQUEST: usize = crate::proxy::availability::MAX_IMAGES;

/// A workload that uses images: what an Event on it needs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkloadRef {
    /// `apps/v1`, `batch/v1`, `v1`.
    pub api_version: String,
    /// `Deployment`, `Pod`, ...
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
}

impl WorkloadRef {
    /// `namespace/Kind/name`.
    pub fn label(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.kind, self.name)
    }

    /// What an Event is about.
    pub fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.api_version.clone()),
            kind: Some(self.kind.clone()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

/// Every workload, with the images its pods use.
pub type Users = Vec<(WorkloadRef, BTreeSet<String>)>;

/// Adds the workloads of `items` (for Pods, only those no controller owns: bare pods).
pub fn add_users<K: Workload>(out: &mut Users, items: &[Arc<K>]) {
    for w in items {
        let owned = w
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true));
        if K::kind(&()) == "Pod" && owned {
            continue;
        }
        let images = super::desired::pod_images(w.pod_spec());
        if images.is_empty() {
            continue;
        }
        let r = WorkloadRef {
            api_version: K::api_version(&()).to_string(),
            kind: K::kind(&()).to_string(),
            namespace: w.namespace().unwrap_or_default(),
            name: w.name_any(),
            uid: w.uid().unwrap_or_default(),
        };
        out.push((r, images));
    }
}

/// The images `mirror` watches, written out whole (`docker.io/library/alpine:3.20`), with
/// the workloads that use each: those of the registries it serves, in the namespaces its
/// `cache.prefetchFromWorkloads` selects (every namespace without one).
pub fn watched(
    mirror: &RegistryMirror,
    users: &Users,
    namespaces: &[Arc<Namespace>],
) -> BTreeMap<String, Vec<WorkloadRef>> {
    let selector = mirror
        .spec
        .cache
        .prefetch_from_workloads
        .as_ref()
        .and_then(|p| p.namespace_selector.as_ref());
    let served: BTreeSet<String> = mirror
        .status
        .iter()
        .flat_map(|s| s.served_registries.iter().map(|r| registry_key(r)))
        .collect();
    let none = BTreeMap::new();
    let labels: BTreeMap<String, &BTreeMap<String, String>> = namespaces
        .iter()
        .map(|n| (n.name_any(), n.metadata.labels.as_ref().unwrap_or(&none)))
        .collect();
    let mut out: BTreeMap<String, Vec<WorkloadRef>> = BTreeMap::new();
    for (w, images) in users {
        let ns_labels = labels.get(&w.namespace).copied().unwrap_or(&none);
        if !selects(selector, ns_labels) {
            continue;
        }
        for i in images {
            let Ok(r) = crate::api::image_ref::parse(i) else {
                continue;
            };
            if served.contains(&registry_key(&r.registry)) {
                out.entry(r.to_string()).or_default().push(w.clone());
            }
        }
    }
    out
}

/// The digests the running containers of `pods` use, by image (written out whole): from
/// each container's `imageID` (`...@sha256:...`).
pub fn running(pods: &[Arc<Pod>]) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for p in pods {
        let (Some(spec), Some(status)) = (&p.spec, &p.status) else {
            continue;
        };
        let statuses = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten());
        for cs in statuses {
            let Some(digest) = cs.image_id.split_once('@').map(|(_, d)| d) else {
                continue;
            };
            let image = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == cs.name)
                .and_then(|c| c.image.as_deref())
                .and_then(|i| crate::api::image_ref::parse(i).ok());
            if let Some(image) = image {
                out.entry(image.to_string())
                    .or_default()
                    .insert(digest.to_string());
            }
        }
    }
    out
}

/// Asks the replica at `url` about `images` (with the digests their pods run), for
/// nodes of `platforms`, a request per [`PER_REQUEST`] images.
pub async fn check(
    url: &str,
    images: &BTreeMap<String, Vec<WorkloadRef>>,
    running: &HashMap<String, BTreeSet<String>>,
    platforms: &[String],
    token: &str,
) -> Result<Vec<Availability>, crate::proxy::admin::AdminError> {
    let asked: Vec<ImageToCheck> = images
        .keys()
        .map(|i| ImageToCheck {
            image: i.clone(),
            running: running
                .get(i)
                .map(|d| d.iter().cloned().collect())
                .unwrap_or_default(),
        })
        .collect();
    let mut out = Vec::with_capacity(asked.len());
    for chunk in asked.chunks(PER_REQUEST) {
        let answer =
            crate::proxy::admin::availability(url, chunk.to_vec(), platforms, token).await?;
        out.extend(answer.images);
    }
    Ok(out)
}

/// Each image's state now: what `fresh` says, but where it is `unchecked` (the upstream
/// asked to be left alone), what was known before (`known`); images no longer watched
/// are forgotten.
pub fn merge(known: &mut HashMap<String, Availability>, fresh: Vec<Availability>) {
    let mut next = HashMap::with_capacity(fresh.len());
    for a in fresh {
        let kept = match (a.state, known.remove(&a.image)) {
            (ImageState::Unchecked, Some(before)) => before,
            _ => a,
        };
        next.insert(kept.image.clone(), kept);
    }
    *known = next;
}

/// What the status says of `states` (the users of each from `images`), checked at `at`.
pub fn status(
    states: &HashMap<String, Availability>,
    images: &BTreeMap<String, Vec<WorkloadRef>>,
    at: &str,
) -> ImagesStatus {
    let mut s = ImagesStatus {
        checked_at: Some(at.to_string()),
        ..ImagesStatus::default()
    };
    let mut trouble: Vec<&Availability> = Vec::new();
    for a in states.values() {
        match a.state {
            ImageState::Cached => s.cached += 1,
            ImageState::UpstreamOnly | ImageState::Unchecked => s.upstream_only += 1,
            ImageState::Moved => s.moved += 1,
            ImageState::Unauthorized => s.unauthorized += 1,
            ImageState::Unavailable => s.unavailable += 1,
        }
        if matches!(
            a.state,
            ImageState::Moved | ImageState::Unauthorized | ImageState::Unavailable
        ) {
            trouble.push(a);
        }
    }
    // The worst first, then by name.
    trouble.sort_by(|a, b| b.state.cmp(&a.state).then(a.image.cmp(&b.image)));
    s.not_pullable = trouble
        .into_iter()
        .take(MAX_LISTED)
        .map(|a| ImageInTrouble {
            image: a.image.clone(),
            state: a.state.as_str().to_string(),
            detail: a.detail.clone(),
            workloads: images
                .get(&a.image)
                .into_iter()
                .flatten()
                .take(MAX_WORKLOADS)
                .map(WorkloadRef::label)
                .collect(),
        })
        .collect();
    s
}

/// Counts by state, every state named (the metric's series).
pub fn counts(states: &HashMap<String, Availability>) -> Vec<(ImageState, i64)> {
    ImageState::ALL
        .iter()
        .map(|s| (*s, states.values().filter(|a| a.state == *s).count() as i64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(image: &str, state: ImageState) -> Availability {
        Availability {
            image: image.into(),
            state,
            digest: None,
            detail: None,
        }
    }

    fn w(name: &str) -> WorkloadRef {
        WorkloadRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: "team".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn mirror(yaml: &str, served: &[&str]) -> RegistryMirror {
        let mut m = RegistryMirror::new("m", serde_yaml::from_str(yaml).unwrap());
        m.status = Some(crate::api::mirror::RegistryMirrorStatus {
            served_registries: served.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        m
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Arc<Namespace> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}}),
            )
            .unwrap(),
        )
    }

    #[test]
    fn a_mirror_watches_its_registries_images_of_the_namespaces_it_selects() {
        let user = |ns: &str, name: &str, images: &[&str]| {
            let mut r = w(name);
            r.namespace = ns.into();
            (
                r,
                images
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<BTreeSet<_>>(),
            )
        };
        let users: Users = vec![
            user(
                "team-a",
                "app",
                &["alpine:3.20", "registry.test/app:1", "quay.io/other/tool:1"],
            ),
            user("team-a", "job", &["registry.test/app:1"]),
            user("team-b", "other", &["registry.test/app:2"]),
            // A namespace the reflector has not seen yet: no labels, not selected.
            user("new", "x", &["registry.test/app:3"]),
        ];
        let namespaces = [
            namespace("team-a", &[("team", "a")]),
            namespace("team-b", &[]),
        ];
        let m = mirror(
            "upstreams: [{registry: docker.io}, {registry: registry.test}]\ncache: {prefetchFromWorkloads: {namespaceSelector: {matchLabels: {team: a}}}}",
            &["docker.io", "registry.test"],
        );
        let got = watched(&m, &users, &namespaces);
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["docker.io/library/alpine:3.20", "registry.test/app:1"]
        );
        let users_of: Vec<String> = got["registry.test/app:1"]
            .iter()
            .map(WorkloadRef::label)
            .collect();
        assert_eq!(users_of, ["team-a/Deployment/app", "team-a/Deployment/job"]);
        // Not serving a registry yet (its status says none): nothing of it.
        let unserved = mirror("upstreams: [{registry: registry.test}]", &[]);
        assert!(watched(&unserved, &users, &namespaces).is_empty());
        // Without a prefetch selector: every namespace, the unseen one too.
        let plain = mirror("upstreams: [{registry: registry.test}]", &["registry.test"]);
        let names: Vec<String> = watched(&plain, &users, &namespaces).into_keys().collect();
        assert_eq!(
            names,
            [
                "registry.test/app:1",
                "registry.test/app:2",
                "registry.test/app:3"
            ]
        );
    }

    #[test]
    fn an_unchecked_image_keeps_its_last_state_and_gone_ones_are_forgotten() {
        let mut known = HashMap::new();
        merge(
            &mut known,
            vec![a("x", ImageState::Unavailable), a("y", ImageState::Cached)],
        );
        merge(
            &mut known,
            vec![a("x", ImageState::Unchecked), a("z", ImageState::Unchecked)],
        );
        assert_eq!(known["x"].state, ImageState::Unavailable);
        assert_eq!(known["z"].state, ImageState::Unchecked);
        assert!(!known.contains_key("y"));
        merge(&mut known, vec![a("x", ImageState::Cached)]);
        assert_eq!(known["x"].state, ImageState::Cached);
    }

    #[test]
    fn the_status_counts_each_state_and_lists_the_worst_first_bounded() {
        let mut states = HashMap::new();
        for i in 0..30 {
            let s = match i % 3 {
                0 => ImageState::Moved,
                1 => ImageState::Unavailable,
                _ => ImageState::Cached,
            };
            let name = format!("img{i:02}");
            states.insert(name.clone(), a(&name, s));
        }
        states.insert("auth".into(), a("auth", ImageState::Unauthorized));
        let images: BTreeMap<String, Vec<WorkloadRef>> = BTreeMap::from([(
            "img01".to_string(),
            (0..8).map(|i| w(&format!("w{i}"))).collect(),
        )]);
        let s = status(&states, &images, "2026-12-06T09:00:00Z");
        assert_eq!(
            (s.cached, s.moved, s.unavailable, s.unauthorized),
            (10, 10, 10, 1)
        );
        assert_eq!(s.not_pullable.len(), MAX_LISTED);
        assert!(
            s.not_pullable[..10]
                .iter()
                .all(|i| i.state == "unavailable")
        );
        assert_eq!(s.not_pullable[10].state, "unauthorized");
        assert_eq!(s.not_pullable[0].image, "img01");
        assert_eq!(s.not_pullable[0].workloads.len(), 5);
        assert_eq!(s.not_pullable[0].workloads[0], "team/Deployment/w0");
        let c = counts(&states);
        assert_eq!(c.len(), ImageState::ALL.len());
        assert!(c.contains(&(ImageState::Unchecked, 0)));
    }
}

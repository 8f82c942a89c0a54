//! What a mirror's replicas should have, from what the reflectors hold (pure): the images
//! of the workloads in the namespaces the mirror selects, of the registries it serves;
//! the platforms of the cluster's nodes; the mirror's ready replicas.

use crate::api::docker_hub::registry_key;
use crate::api::mirror::RegistryMirror;
use crate::controller::builders;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The images of a pod spec: its containers' and init containers'.
pub fn pod_images(spec: Option<&PodSpec>) -> BTreeSet<String> {
    let Some(spec) = spec else {
        return BTreeSet::new();
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.image.clone())
        .filter(|i| !i.is_empty())
        .collect()
}

/// A kind of workload whose pod template names images.
pub trait Workload: Resource<DynamicType = ()> + ResourceExt {
    /// Its pod template's spec.
    fn pod_spec(&self) -> Option<&PodSpec>;
}

impl Workload for Deployment {
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref()?.template.spec.as_ref()
    }
}

impl Workload for StatefulSet {
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref()?.template.spec.as_ref()
    }
}

impl Workload for DaemonSet {
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref()?.template.spec.as_ref()
    }
}

impl Workload for Job {
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref()?.template.spec.as_ref()
    }
}

impl Workload for Pod {
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref()
    }
}

impl Workload for CronJob {
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec
            .as_ref()?
            .job_template
            .spec
            .as_ref()?
            .template
            .spec
            .as_ref()
    }
}

/// The images of workloads, by namespace.
pub type ImagesByNamespace = BTreeMap<String, BTreeSet<String>>;

/// Adds the images of `workloads` to `out`, by namespace.
pub fn add_images<K: Workload>(out: &mut ImagesByNamespace, workloads: &[Arc<K>]) {
    for w in workloads {
        let images = pod_images(w.pod_spec());
        if !images.is_empty() {
            out.entry(w.namespace().unwrap_or_default())
                .or_default()
                .extend(images);
        }
    }
}

/// Whether a namespace labelled `labels` is one `selector` picks: every namespace when
/// there is no selector, none when it cannot be read as one.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    match Selector::try_from(selector.clone()) {
        Ok(s) => s.matches(labels),
        Err(e) => {
            tracing::warn!(error = %e, "a namespaceSelector that selects nothing");
            false
        }
    }
}

/// The images `mirror`'s replicas should have (and keep from eviction): those of the
/// workloads in the namespaces its `cache.prefetchFromWorkloads` selects (labels from
/// `namespaces`), of the registries it serves (its status says), written out whole
/// (`docker.io/library/alpine:3.20`). Empty for a mirror that does not prefetch.
pub fn images(
    mirror: &RegistryMirror,
    workloads: &ImagesByNamespace,
    namespaces: &[Arc<Namespace>],
) -> BTreeSet<String> {
    let Some(spec) = &mirror.spec.cache.prefetch_from_workloads else {
        return BTreeSet::new();
    };
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
    workloads
        .iter()
        .filter(|(ns, _)| {
            let labels = labels.get(*ns).copied().unwrap_or(&none);
            selects(spec.namespace_selector.as_ref(), labels)
        })
        .flat_map(|(_, images)| images)
        .filter_map(|i| crate::api::image_ref::parse(i).ok())
        .filter(|r| served.contains(&registry_key(&r.registry)))
        .map(|r| r.to_string())
        .collect()
}

/// The platforms of the cluster's nodes (`linux/amd64`), from their status.
pub fn platforms(nodes: &[Node]) -> Vec<String> {
    let set: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.node_info.as_ref())
        .map(|i| format!("{}/{}", i.operating_system, i.architecture))
        .collect();
    set.into_iter().collect()
}

/// A ready replica of a mirror: its pod's uid and its operations port's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The pod's uid (a new pod is a new replica, its cache perhaps empty).
    pub uid: String,
    /// `http://10.1.2.3:9095`.
    pub url: String,
}

/// The ready replicas of `mirror` among `pods`, their operations port at `port`.
pub fn replicas(mirror: &RegistryMirror, pods: &[Arc<Pod>], port: u16) -> Vec<Replica> {
    let selector: Selector = builders::selector_labels(mirror).into_iter().collect();
    let mut out: Vec<Replica> = pods
        .iter()
        .filter(|p| p.namespace() == mirror.namespace() && selector.matches(p.labels()))
        .filter_map(|p| {
            Some(Replica {
                uid: p.uid()?,
                url: builders::url("http", ready_ip(p)?, port),
            })
        })
        .collect();
    out.sort_by(|a, b| a.url.cmp(&b.url));
    out
}

/// A pod's IP while it is Ready.
pub fn ready_ip(pod: &Pod) -> Option<&str> {
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    status
        .pod_ip
        .as_deref()
        .filter(|ip| ready && !ip.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors_match_as_kubernetes_does() {
        let labels = BTreeMap::from([("team".to_string(), "a".to_string())]);
        assert!(selects(None, &labels));
        let sel = |labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: Some(exprs),
        };
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        assert!(selects(Some(&sel(&[("team", "a")], vec![])), &labels));
        assert!(!selects(Some(&sel(&[("team", "b")], vec![])), &labels));
        assert!(selects(
            Some(&sel(&[], vec![req("team", "In", &["a", "b"])])),
            &labels
        ));
        assert!(!selects(
            Some(&sel(&[], vec![req("team", "NotIn", &["a"])])),
            &labels
        ));
        assert!(selects(
            Some(&sel(&[], vec![req("team", "Exists", &[])])),
            &labels
        ));
        assert!(!selects(
            Some(&sel(&[], vec![req("env", "Exists", &[])])),
            &labels
        ));
        assert!(selects(
            Some(&sel(&[], vec![req("env", "DoesNotExist", &[])])),
            &labels
        ));
        assert!(!selects(
            Some(&sel(&[], vec![req("env", "Bogus", &[])])),
            &labels
        ));
    }

    fn mirror(yaml: &str, served: &[&str]) -> RegistryMirror {
        let mut m = RegistryMirror::new("m", serde_yaml::from_str(yaml).unwrap());
        m.metadata.namespace = Some("ns".into());
        m.status = Some(crate::api::mirror::RegistryMirrorStatus {
            served_registries: served.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        m
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Arc<Namespace> {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Arc::new(n)
    }

    #[test]
    fn a_mirror_wants_its_registries_images_of_the_namespaces_it_selects() {
        let m = mirror(
            "upstreams: [{registry: docker.io}, {registry: registry.test}]\ncache: {prefetchFromWorkloads: {namespaceSelector: {matchLabels: {team: a}}}}",
            &["docker.io", "registry.test"],
        );
        let workloads = ImagesByNamespace::from([
            (
                "team-a".to_string(),
                BTreeSet::from([
                    "alpine:3.20".to_string(),
                    "registry.test/app:1".to_string(),
                    "quay.io/other/tool:1".to_string(),
                ]),
            ),
            (
                "team-b".to_string(),
                BTreeSet::from(["registry.test/app:2".to_string()]),
            ),
            // A namespace the reflector has not seen yet: no labels, not selected.
            (
                "new".to_string(),
                BTreeSet::from(["registry.test/app:3".to_string()]),
            ),
        ]);
        let namespaces = [
            namespace("team-a", &[("team", "a")]),
            namespace("team-b", &[]),
        ];
        assert_eq!(
            images(&m, &workloads, &namespaces),
            BTreeSet::from([
                "docker.io/library/alpine:3.20".to_string(),
                "registry.test/app:1".to_string(),
            ])
        );
        // Not serving a registry yet (its status says none): nothing of it.
        let unserved = mirror(
            "upstreams: [{registry: registry.test}]\ncache: {prefetchFromWorkloads: {}}",
            &[],
        );
        assert!(images(&unserved, &workloads, &namespaces).is_empty());
        // Not prefetching: nothing.
        let plain = mirror("upstreams: [{registry: registry.test}]", &["registry.test"]);
        assert!(images(&plain, &workloads, &namespaces).is_empty());
    }

    #[test]
    fn only_ready_pods_of_the_mirror_are_its_replicas() {
        let m = mirror("upstreams: [{registry: docker.io}]", &[]);
        let pod = |name: &str, instance: &str, ip: &str, ready: &str| {
            let mut labels = builders::selector_labels(&m);
            labels.insert(builders::INSTANCE_LABEL.into(), instance.into());
            Arc::new(
                serde_json::from_value::<Pod>(serde_json::json!({
                    "metadata": {"name": name, "namespace": "ns", "uid": name, "labels": labels},
                    "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
                }))
                .unwrap(),
            )
        };
        let pods = [
            pod("b", "m", "10.0.0.2", "True"),
            pod("a", "m", "fd00::1", "True"),
            pod("c", "m", "10.0.0.3", "False"),
            pod("d", "other", "10.0.0.4", "True"),
        ];
        let urls: Vec<_> = replicas(&m, &pods, 9095)
            .into_iter()
            .map(|r| (r.uid, r.url))
            .collect();
        assert_eq!(
            urls,
            [
                ("b".to_string(), "http://10.0.0.2:9095".to_string()),
                ("a".to_string(), "http://[fd00::1]:9095".to_string()),
            ]
        );
    }
}

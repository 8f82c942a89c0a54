//! What a mirror's replicas should have, from what the reflectors hold (pure): which
//! namespaces a selector picks (the images themselves: [`super::watch::watched`]); the
//! platforms of the cluster's nodes; the mirror's ready replicas.

use crate::api::mirror::RegistryMirror;
use crate::controller::builders;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
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

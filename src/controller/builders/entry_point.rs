//! The node-local entry point of a rewriting mirror (`spec.rewrite` without an
//! `address`): a DaemonSet of `pullthrough relay` on every Linux node, on the node's
//! network, listening on its loopback and handing pulls to the mirror's Service by its
//! cluster IP (no DNS on the way). It needs nothing but its port: no privilege, no
//! service account token, no volume. Its readiness is its process: a relay that cannot
//! take its port exits, and the pod is not ready.

use super::{ChildSettings, child_name, labels, locked_down, owner};
use crate::api::mirror::RegistryMirror;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// The component label of entry point pods.
pub const ENTRY_POINT_COMPONENT: &str = "entry-point";

/// Name of a mirror's entry point DaemonSet.
pub fn entry_point_name(mirror: &RegistryMirror) -> String {
    entry_point_of(&child_name(mirror))
}

/// [`entry_point_name`], from the name of the other children.
pub fn entry_point_of(child: &str) -> String {
    format!("{child}-entry")
}

/// Labels selecting a mirror's entry point pods (never its proxy pods).
pub fn entry_point_selector(mirror: &RegistryMirror) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "pullthrough".into()),
        (
            "app.kubernetes.io/component".into(),
            ENTRY_POINT_COMPONENT.into(),
        ),
        (super::INSTANCE_LABEL.into(), mirror.name_any()),
    ])
}

/// The relay: `127.0.0.1:<port>` of the node to `endpoint`, unprivileged.
fn relay_container(settings: &ChildSettings, port: u16, endpoint: &str) -> Container {
    Container {
        name: "relay".into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(vec![
            "--log-format".into(),
            "json".into(),
            "relay".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--to".into(),
            endpoint.to_string(),
        ]),
        // Declared so that the scheduler places no other pod wanting the port.
        ports: Some(vec![ContainerPort {
            name: Some("entry".into()),
            container_port: port.into(),
            host_port: Some(port.into()),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Measured: 14-17 MiB resident relaying a 256 MiB pull (docs/benchmarks.md).
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("24Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("96Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(locked_down()),
        ..Container::default()
    }
}

/// The DaemonSet relaying `127.0.0.1:<port>` of every node to `endpoint`
/// (`http://<cluster IP>:5000`), or None for a mirror that rewrites to an address of its
/// own (or not at all).
pub fn entry_point(
    mirror: &RegistryMirror,
    settings: &ChildSettings,
    endpoint: &str,
) -> Option<DaemonSet> {
    let rewrite = mirror.rewrite().filter(|r| r.address.is_none())?;
    let port = rewrite.entry_point_port();
    let mut pod_labels = labels(mirror);
    pod_labels.extend(entry_point_selector(mirror));
    let container = relay_container(settings, port, endpoint);
    Some(DaemonSet {
        metadata: ObjectMeta {
            name: Some(entry_point_name(mirror)),
            namespace: mirror.namespace(),
            labels: Some(pod_labels.clone()),
            owner_references: Some(vec![owner(mirror)]),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(entry_point_selector(mirror)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    node_selector: Some(BTreeMap::from([(
                        "kubernetes.io/os".into(),
                        "linux".into(),
                    )])),
                    // Every node pulls: tainted ones too.
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Toleration::default()
                    }]),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(10),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    })
}

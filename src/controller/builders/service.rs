//! How the mirror's replicas are reached: the Service nodes pull through, the headless
//! Service replicas on a bucket find each other by, the ServiceMonitor; and the
//! PodDisruptionBudget that keeps them up.

use super::{meta, peers_service_name, selector_labels, url};
use crate::api::mirror::{METRICS_PORT, PROXY_PORT, RegistryMirror};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The Service nodes' containerd reaches the mirror through (ClusterIP).
pub fn service(mirror: &RegistryMirror) -> Service {
    let port = |name: &str, port: u16| ServicePort {
        name: Some(name.into()),
        port: port.into(),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: meta(mirror),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(mirror)),
            ports: Some(vec![
                port("registry", PROXY_PORT),
                port("metrics", METRICS_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless Service of a mirror on S3: its DNS name resolves to the ready replicas,
/// which is how each finds the owner of a digest (see [`crate::proxy::peers`]).
pub fn peers_service(mirror: &RegistryMirror) -> Service {
    let mut metadata = meta(mirror);
    metadata.name = Some(peers_service_name(mirror));
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(mirror)),
            ports: Some(vec![ServicePort {
                name: Some("registry".into()),
                port: PROXY_PORT.into(),
                target_port: Some(IntOrString::String("registry".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(false),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A PodDisruptionBudget keeping all but one replica up; only wanted when replicas > 1.
pub fn pdb(mirror: &RegistryMirror) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(mirror),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(mirror)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// A prometheus-operator ServiceMonitor for the proxy's metrics port.
pub fn service_monitor(mirror: &RegistryMirror) -> serde_json::Value {
    let meta = serde_json::to_value(meta(mirror)).expect("metadata serializes");
    serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector_labels(mirror)},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        }
    })
}

/// `http://<cluster IP>:5000` (`https` when `https`) once the Service has an address.
pub fn endpoint(service: &Service, https: bool) -> Option<String> {
    let ip = service.spec.as_ref()?.cluster_ip.as_ref()?;
    if ip.is_empty() || ip == "None" {
        return None;
    }
    let scheme = if https { "https" } else { "http" };
    Some(url(scheme, ip, PROXY_PORT))
}

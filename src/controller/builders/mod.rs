//! Pure builders of every object the controller owns for a RegistryMirror. No I/O: the
//! reconciler applies what these return, and tests check them directly. This file holds
//! the names, labels and metadata every child shares, the ConfigMap and the hash that
//! rolls the pods; one file per kind of child beside it: the pods and what runs them
//! ([`pod`]), the Services, PodDisruptionBudget and ServiceMonitor ([`service`]), the
//! evictor's RBAC ([`rbac`]), the Secrets the controller makes ([`secrets`]), the
//! node-local entry point of a rewriting mirror ([`entry_point`]).

mod entry_point;
mod pod;
mod rbac;
mod secrets;
mod service;
#[cfg(test)]
pub(crate) mod tests;

pub use entry_point::{
    ENTRY_POINT_COMPONENT, entry_point, entry_point_name, entry_point_of, entry_point_selector,
};
pub use pod::{deployment, stateful_set};
pub use rbac::{
    evictor_name, evictor_rbac_names, evictor_role, evictor_role_binding, proxy_service_account,
    proxy_service_account_name,
};
pub use secrets::{
    access_secret, access_secret_name, admin_secret, admin_secret_name, secret_names,
};
pub use service::{endpoint, pdb, peers_service, service, service_monitor};

use crate::api::mirror::{RegistryMirror, SpecError};
use crate::api::proxy_config::{PeersConfig, ProxyConfig};
use k8s_openapi::api::core::v1::{Capabilities, ConfigMap, SecurityContext};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::Selector;
use kube::{Resource, ResourceExt};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

/// Annotation on the pod template carrying the hash of config and credentials, so any
/// change rolls the pods.
pub const CONFIG_HASH: &str = "pullthrough.dev/config-hash";
/// Key of the proxy configuration in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Non-root user the proxy runs as (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;

/// Settings of the controller that shape the children (not part of the resource).
#[derive(Clone, Debug)]
pub struct ChildSettings {
    /// Container image of the proxy.
    pub proxy_image: String,
    /// Image pull policy of the proxy.
    pub image_pull_policy: Option<String>,
}

/// Name of every child object of a mirror.
pub fn child_name(mirror: &RegistryMirror) -> String {
    format!("pullthrough-{}", mirror.name_any())
}

/// Name of the headless Service through which the replicas of a mirror on S3 find each
/// other (see [`crate::proxy::peers`]).
pub fn peers_service_name(mirror: &RegistryMirror) -> String {
    peers_of(&child_name(mirror))
}

/// [`peers_service_name`], from the name of the other children.
pub fn peers_of(child: &str) -> String {
    format!("{child}-peers")
}

/// The configuration the mirror's proxies run with: the spec's, and with a bucket, the
/// replicas found through the headless Service (each pod's own address from `POD_IP`).
pub fn proxy_config(mirror: &RegistryMirror) -> Result<ProxyConfig, SpecError> {
    let mut config = mirror.spec.proxy_config()?;
    let limited = config.max_cache_bytes.is_some();
    if let Some(s3) = &mut config.storage.s3 {
        config.peers = Some(PeersConfig {
            dns: Some(peers_service_name(mirror)),
            ..PeersConfig::default()
        });
        if limited {
            s3.eviction.lease = Some(evictor_name(mirror));
            s3.eviction.lease_namespace = mirror.namespace();
        }
    }
    config.validate()?;
    Ok(config)
}

/// Whether the mirror's replicas share a bucket with a size limit: one of them, elected
/// on a Lease, evicts (and the pods need a service account that may hold it).
pub fn evicts(mirror: &RegistryMirror) -> bool {
    mirror
        .spec
        .cache
        .storage
        .s3
        .as_ref()
        .is_some_and(|s| s.max_size.is_some())
}

/// The label naming the mirror whose proxy pod a pod is.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

/// Labels every mirror's proxy pods carry.
pub(super) fn proxy_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "pullthrough".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "proxy".to_string(),
        ),
    ])
}

/// Labels selecting a mirror's proxy pods.
pub fn selector_labels(mirror: &RegistryMirror) -> BTreeMap<String, String> {
    let mut l = proxy_labels();
    l.insert(INSTANCE_LABEL.to_string(), mirror.name_any());
    l
}

/// A label selector (`k=v,k=v`) for `labels`.
pub fn selector(labels: &BTreeMap<String, String>) -> String {
    labels.clone().into_iter().collect::<Selector>().to_string()
}

/// The label selector of every mirror's proxy pods.
pub fn proxy_pods_selector() -> String {
    selector(&proxy_labels())
}

/// `scheme://ip:port`, the IP in brackets when it is IPv6.
pub fn url(scheme: &str, ip: &str, port: u16) -> String {
    match ip.contains(':') {
        true => format!("{scheme}://[{ip}]:{port}"),
        false => format!("{scheme}://{ip}:{port}"),
    }
}

/// Labels on every child.
pub fn labels(mirror: &RegistryMirror) -> BTreeMap<String, String> {
    let mut l = selector_labels(mirror);
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "pullthrough-controller".into(),
    );
    l.insert(
        "app.kubernetes.io/version".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    l
}

pub(super) fn owner(mirror: &RegistryMirror) -> OwnerReference {
    mirror
        .controller_owner_ref(&())
        .expect("a RegistryMirror from the API server has a uid")
}

/// The metadata of the mirror's child named like every child.
pub(super) fn meta(mirror: &RegistryMirror) -> ObjectMeta {
    ObjectMeta {
        name: Some(child_name(mirror)),
        namespace: mirror.namespace(),
        labels: Some(labels(mirror)),
        owner_references: Some(vec![owner(mirror)]),
        ..ObjectMeta::default()
    }
}

/// The ConfigMap holding the proxy configuration (the YAML `pullthrough proxy` reads).
pub fn config_map(mirror: &RegistryMirror, config_yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(mirror),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            config_yaml.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// Hash of everything the pods read at start: the config and each credentials Secret's data.
pub fn config_hash(config_yaml: &str, secrets: &[Vec<u8>]) -> String {
    let mut h = Sha256::new();
    h.update(config_yaml.as_bytes());
    for s in secrets {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// The security context of every container the controller runs: non-root, a read-only
/// root file system, no privilege escalation, no capability.
pub(super) fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Whether the mirror keeps its cache on PersistentVolumeClaims (StatefulSet) or an
/// emptyDir (Deployment).
pub fn uses_pvc(mirror: &RegistryMirror) -> bool {
    mirror.spec.cache.storage.size.is_some()
}

//! Pure builders of every object the controller owns for a RegistryMirror. No I/O: the
//! reconciler applies what these return, and tests check them directly.

use crate::api::mirror::{
    ACCESS_MOUNT, ADMIN_MOUNT, ADMIN_TOKEN, CACHE_MOUNT, CONFIG_MOUNT, METRICS_PORT, PROXY_PORT,
    RegistryMirror, SECRETS_MOUNT, SIGNING_KEY, SpecError, TLS_MOUNT,
};
use crate::api::proxy_config::{PeersConfig, ProxyConfig};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet,
    StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret,
    SecretEnvSource, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

/// Name of the Lease the replicas of an evicting mirror elect on, and of the Role and
/// RoleBinding that let them hold it.
pub fn evictor_name(mirror: &RegistryMirror) -> String {
    evictor_rbac_names(&child_name(mirror)).0
}

/// Name of the service account of an evicting mirror's pods.
pub fn proxy_service_account_name(mirror: &RegistryMirror) -> String {
    evictor_rbac_names(&child_name(mirror)).1
}

/// [`evictor_name`] and [`proxy_service_account_name`], from the name of the other
/// children.
pub fn evictor_rbac_names(child: &str) -> (String, String) {
    (format!("{child}-evictor"), format!("{child}-proxy"))
}

/// The service account of an evicting mirror's pods.
pub fn proxy_service_account(mirror: &RegistryMirror) -> ServiceAccount {
    let mut metadata = meta(mirror);
    metadata.name = Some(proxy_service_account_name(mirror));
    ServiceAccount {
        metadata,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// What the pods of an evicting mirror may do: hold their one Lease, nothing else.
pub fn evictor_role(mirror: &RegistryMirror) -> Role {
    let mut metadata = meta(mirror);
    metadata.name = Some(evictor_name(mirror));
    let leases = |verbs: &[&str], names: Option<Vec<String>>| PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        resource_names: names,
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    Role {
        metadata,
        rules: Some(vec![
            // A create names no object yet: it cannot be narrowed to one name.
            leases(&["create"], None),
            leases(&["get", "update"], Some(vec![evictor_name(mirror)])),
        ]),
    }
}

/// Binds [`evictor_role`] to [`proxy_service_account`].
pub fn evictor_role_binding(mirror: &RegistryMirror) -> RoleBinding {
    let mut metadata = meta(mirror);
    metadata.name = Some(evictor_name(mirror));
    RoleBinding {
        metadata,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: evictor_name(mirror),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: proxy_service_account_name(mirror),
            namespace: mirror.namespace(),
            ..Subject::default()
        }]),
    }
}

/// The label naming the mirror whose proxy pod a pod is.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

/// Labels every mirror's proxy pods carry.
fn proxy_labels() -> BTreeMap<String, String> {
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
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
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

fn owner(mirror: &RegistryMirror) -> OwnerReference {
    mirror
        .controller_owner_ref(&())
        .expect("a RegistryMirror from the API server has a uid")
}

fn meta(mirror: &RegistryMirror) -> ObjectMeta {
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

/// Whether the mirror keeps its cache on PersistentVolumeClaims (StatefulSet) or an
/// emptyDir (Deployment).
pub fn uses_pvc(mirror: &RegistryMirror) -> bool {
    mirror.spec.cache.storage.size.is_some()
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// The environment variable `name` set to the pod's field `path` (the downward API).
fn pod_field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn pod_template(mirror: &RegistryMirror, settings: &ChildSettings, hash: &str) -> PodTemplateSpec {
    let name = child_name(mirror);
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.clone(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "cache".into(),
            mount_path: CACHE_MOUNT.into(),
            ..VolumeMount::default()
        },
    ];
    if !uses_pvc(mirror) {
        volumes.push(Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: mirror
                    .spec
                    .cache
                    .storage
                    .empty_dir
                    .as_ref()
                    .and_then(|e| e.size_limit.clone()),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    for (i, u) in mirror.spec.upstreams.iter().enumerate() {
        if let Some(secret) = &u.credentials_secret_ref {
            let vol = format!("credentials-{i}");
            volumes.push(Volume {
                name: vol.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    items: Some(vec![KeyToPath {
                        key: ".dockerconfigjson".into(),
                        path: ".dockerconfigjson".into(),
                        ..KeyToPath::default()
                    }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: vol,
                mount_path: format!("{SECRETS_MOUNT}/{i}"),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    let mut secret = |vol: &str, name: String, keys: &[&str], mount: &str| {
        volumes.push(Volume {
            name: vol.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(name),
                items: Some(
                    keys.iter()
                        .map(|k| KeyToPath {
                            key: k.to_string(),
                            path: k.to_string(),
                            ..KeyToPath::default()
                        })
                        .collect(),
                ),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: vol.into(),
            mount_path: mount.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    };
    if let Some(tls) = &mirror.spec.tls {
        secret(
            "tls",
            tls.secret_ref.name.clone(),
            &["tls.crt", "tls.key"],
            TLS_MOUNT,
        );
    }
    if mirror.spec.shares_key() {
        secret(
            "access",
            access_secret_name(mirror),
            &[SIGNING_KEY],
            ACCESS_MOUNT,
        );
    }
    let prefetching = mirror.spec.cache.prefetch_from_workloads.is_some();
    if prefetching {
        secret(
            "admin",
            admin_secret_name(mirror),
            &[ADMIN_TOKEN],
            ADMIN_MOUNT,
        );
    }
    // Where `kubectl exec ... pullthrough cache drop` finds the admin token.
    let mut env = vec![EnvVar {
        name: "PULLTHROUGH_ADMIN_TOKEN_FILE".into(),
        value: Some(if prefetching {
            format!("{ADMIN_MOUNT}/{ADMIN_TOKEN}")
        } else {
            format!(
                "{CACHE_MOUNT}/{}",
                crate::api::proxy_config::ADMIN_TOKEN_FILE
            )
        }),
        ..EnvVar::default()
    }];
    let s3 = mirror.spec.cache.storage.s3.as_ref();
    if s3.is_some() {
        // The address the other replicas know this one by.
        env.push(pod_field_env("POD_IP", "status.podIP"));
    }
    if evicts(mirror) {
        // The Lease's holder is the pod; its namespace is the mirror's.
        env.push(pod_field_env("POD_NAME", "metadata.name"));
    }
    let container = Container {
        name: "proxy".into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(vec![
            "proxy".into(),
            "--config".into(),
            format!("{CONFIG_MOUNT}/{CONFIG_KEY}"),
            "--log-format".into(),
            "json".into(),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("registry".into()),
                container_port: PROXY_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        env: Some(env),
        env_from: s3.and_then(|s| s.credentials_secret_ref.as_ref()).map(|r| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: r.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        resources: mirror.spec.resources.clone(),
        security_context: Some(SecurityContext {
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
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut annotations = BTreeMap::from([
        (CONFIG_HASH.to_string(), hash.to_string()),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
    ]);
    annotations.insert(
        "kubectl.kubernetes.io/default-container".into(),
        "proxy".into(),
    );
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(mirror)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            // Only an evicting mirror's pods talk to the API server (for their Lease).
            service_account_name: evicts(mirror).then(|| proxy_service_account_name(mirror)),
            automount_service_account_token: Some(evicts(mirror)),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            // Spread replicas over nodes so one node going does not take the cache down.
            affinity: Some(Affinity {
                pod_anti_affinity: Some(PodAntiAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![
                        WeightedPodAffinityTerm {
                            weight: 100,
                            pod_affinity_term: PodAffinityTerm {
                                label_selector: Some(LabelSelector {
                                    match_labels: Some(selector_labels(mirror)),
                                    ..LabelSelector::default()
                                }),
                                topology_key: "kubernetes.io/hostname".into(),
                                ..PodAffinityTerm::default()
                            },
                        },
                    ]),
                    ..PodAntiAffinity::default()
                }),
                ..Affinity::default()
            }),
            termination_grace_period_seconds: Some(30),
            ..PodSpec::default()
        }),
    }
}

/// The proxy Deployment (cache on an emptyDir).
pub fn deployment(mirror: &RegistryMirror, settings: &ChildSettings, hash: &str) -> Deployment {
    Deployment {
        metadata: meta(mirror),
        spec: Some(DeploymentSpec {
            replicas: Some(mirror.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(mirror)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                ..DeploymentStrategy::default()
            }),
            template: pod_template(mirror, settings, hash),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The proxy StatefulSet (cache on one PersistentVolumeClaim per pod).
pub fn stateful_set(mirror: &RegistryMirror, settings: &ChildSettings, hash: &str) -> StatefulSet {
    let storage = &mirror.spec.cache.storage;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("cache".into()),
            labels: Some(selector_labels(mirror)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: storage
                    .size
                    .clone()
                    .map(|s| BTreeMap::from([("storage".to_string(), s)])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: meta(mirror),
        spec: Some(StatefulSetSpec {
            replicas: Some(mirror.spec.replicas),
            service_name: Some(child_name(mirror)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(mirror)),
                ..LabelSelector::default()
            },
            template: pod_template(mirror, settings, hash),
            volume_claim_templates: Some(vec![claim]),
            // A cache's volumes are worth nothing without it: they go with the
            // StatefulSet (a mirror deleted, or left with no registry to serve).
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

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

/// The Secret that holds the admin token of a mirror's proxies, with which the
/// controller asks them to prefetch (`cache.prefetchFromWorkloads`).
pub fn admin_secret_name(mirror: &RegistryMirror) -> String {
    format!("{}-admin", child_name(mirror))
}

/// A new admin token Secret for the mirror's proxies (`token`, random): created once,
/// deleted with the mirror.
pub fn admin_secret(mirror: &RegistryMirror, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(admin_secret_name(mirror)),
            ..meta(mirror)
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            ADMIN_TOKEN.to_string(),
            token.to_string(),
        )])),
        ..Secret::default()
    }
}

/// The Secret that holds the key a mirror's proxies sign access tokens with.
pub fn access_secret_name(mirror: &RegistryMirror) -> String {
    format!("{}-access", child_name(mirror))
}

/// A new signing key Secret for the mirror's proxies (`key`, random): created once,
/// never updated, deleted with the mirror.
pub fn access_secret(mirror: &RegistryMirror, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(access_secret_name(mirror)),
            ..meta(mirror)
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(SIGNING_KEY.to_string(), key.to_string())])),
        ..Secret::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::mirror::RegistryMirrorSpec;

    pub(crate) fn mirror(yaml: &str) -> RegistryMirror {
        let spec: RegistryMirrorSpec = serde_yaml::from_str(yaml).unwrap();
        let mut m = RegistryMirror::new("public", spec);
        m.metadata.namespace = Some("pullthrough-system".into());
        m.metadata.uid = Some("1234-5678".into());
        m.metadata.generation = Some(2);
        m
    }

    fn settings() -> ChildSettings {
        ChildSettings {
            proxy_image: "example/pullthrough:0.1.0".into(),
            image_pull_policy: Some("IfNotPresent".into()),
        }
    }

    fn pod(t: &PodTemplateSpec) -> &PodSpec {
        t.spec.as_ref().unwrap()
    }

    /// The pod field that `c`'s environment variable `name` is set from.
    fn pod_field_of<'a>(c: &'a Container, name: &str) -> &'a str {
        let var = c.env.as_ref().unwrap().iter().find(|e| e.name == name);
        let from = var.and_then(|v| v.value_from.as_ref()?.field_ref.as_ref());
        &from
            .unwrap_or_else(|| panic!("no {name} from a pod field"))
            .field_path
    }

    #[test]
    fn every_child_is_owned_labelled_and_named() {
        let m = mirror("upstreams: [{registry: docker.io}]");
        let cm = config_map(&m, "x: 1\n");
        let svc = service(&m);
        let dep = deployment(&m, &settings(), "abc");
        let metas = [
            &cm.metadata,
            &svc.metadata,
            &dep.metadata,
            &pdb(&m).metadata,
        ];
        for meta in metas {
            assert_eq!(meta.name.as_deref(), Some("pullthrough-public"));
            assert_eq!(meta.namespace.as_deref(), Some("pullthrough-system"));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.uid, "1234-5678");
            assert_eq!(owner.kind, "RegistryMirror");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(
                meta.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
                "pullthrough-controller"
            );
        }
        let sm = service_monitor(&m);
        assert_eq!(sm["metadata"]["ownerReferences"][0]["uid"], "1234-5678");
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    }

    #[test]
    fn deployment_runs_the_proxy_locked_down() {
        let m = mirror(
            "upstreams: [{registry: docker.io}]\nreplicas: 3\nresources: {limits: {memory: 128Mi}}",
        );
        assert!(!uses_pvc(&m));
        let d = deployment(&m, &settings(), "hash1");
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(&selector_labels(&m))
        );
        let tpl = &spec.template;
        assert_eq!(
            tpl.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH],
            "hash1"
        );
        let p = pod(tpl);
        let c = &p.containers[0];
        assert_eq!(c.image.as_deref(), Some("example/pullthrough:0.1.0"));
        assert_eq!(
            c.args.as_ref().unwrap()[..3],
            ["proxy", "--config", "/etc/pullthrough/config.yaml"]
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
            "128Mi"
        );
        let cache = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "cache")
            .unwrap();
        assert!(cache.empty_dir.is_some());
        // A config change changes the template, which rolls the pods.
        let d2 = deployment(&m, &settings(), "hash2");
        assert_ne!(d.spec.unwrap().template, d2.spec.unwrap().template);
    }

    #[test]
    fn storage_size_makes_a_statefulset_with_claims_and_credentials_are_mounted() {
        let m = mirror(
            "upstreams: [{registry: docker.io}, {registry: ghcr.io, credentialsSecretRef: {name: gh}}]\ncache: {storage: {size: 50Gi, storageClassName: fast}}\naccess: {plainHttp: true}",
        );
        assert!(uses_pvc(&m));
        let s = stateful_set(&m, &settings(), "h");
        let spec = s.spec.as_ref().unwrap();
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("cache"));
        let cs = claim.spec.as_ref().unwrap();
        assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            cs.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            "50Gi"
        );
        let p = pod(&spec.template);
        assert!(
            p.volumes
                .as_ref()
                .unwrap()
                .iter()
                .all(|v| v.name != "cache"),
            "the claim provides it"
        );
        let secret = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "credentials-1")
            .unwrap();
        assert_eq!(
            secret.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("gh")
        );
        let mount = p.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "credentials-1")
            .unwrap();
        let config = m.spec.proxy_config().unwrap();
        assert_eq!(
            config.upstreams[1]
                .credentials_file
                .as_ref()
                .unwrap()
                .parent()
                .unwrap()
                .to_str(),
            Some(mount.mount_path.as_str()),
            "the proxy config points where the Secret is mounted"
        );
    }

    #[test]
    fn a_mirror_on_s3_runs_replicas_that_find_each_other() {
        let m = mirror(
            "upstreams: [{registry: docker.io}]\nreplicas: 3\ncache: {storage: {s3: {bucket: b, endpoint: 'http://rgw:80', credentialsSecretRef: {name: keys}, redirect: true}, emptyDir: {sizeLimit: 5Gi}}}",
        );
        assert!(!uses_pvc(&m), "no volume per pod");
        let config = proxy_config(&m).unwrap();
        let s3 = config.storage.s3.as_ref().unwrap();
        assert_eq!(
            (s3.bucket.as_str(), s3.endpoint.as_deref()),
            ("b", Some("http://rgw:80"))
        );
        assert_eq!(config.max_cache_bytes, None, "the emptyDir only spools");
        assert!(s3.redirect);
        let peers = config.peers.as_ref().unwrap();
        assert_eq!(peers.dns.as_deref(), Some("pullthrough-public-peers"));
        let svc = peers_service(&m);
        assert_eq!(
            svc.metadata.name.as_deref(),
            Some("pullthrough-public-peers")
        );
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector.as_ref(), Some(&selector_labels(&m)));
        let d = deployment(&m, &settings(), "h");
        let c = &pod(&d.spec.as_ref().unwrap().template).containers[0];
        assert_eq!(pod_field_of(c, "POD_IP"), "status.podIP");
        let from = &c.env_from.as_ref().unwrap()[0];
        assert_eq!(from.secret_ref.as_ref().unwrap().name, "keys");
        // The replicas prove their requests to each other with a key they share.
        let key = config
            .access
            .signing_key_file
            .as_ref()
            .expect("a shared key");
        let mount = c.volume_mounts.as_ref().unwrap().iter();
        assert!(
            mount.into_iter().any(|v| key.starts_with(&v.mount_path)),
            "the key is not mounted"
        );
        // Without a bucket: no peers, no POD_IP.
        let plain = mirror("upstreams: [{registry: docker.io}]");
        assert!(proxy_config(&plain).unwrap().peers.is_none());
        let d = deployment(&plain, &settings(), "h");
        let c = &pod(&d.spec.as_ref().unwrap().template).containers[0];
        assert!(c.env.as_ref().unwrap().iter().all(|e| e.name != "POD_IP") && c.env_from.is_none());
    }

    #[test]
    fn a_bucket_with_a_size_limit_has_replicas_that_may_elect_their_evictor() {
        let m = mirror(
            "upstreams: [{registry: docker.io}]\nreplicas: 3\ncache: {storage: {s3: {bucket: b, maxSize: 100Gi}}}",
        );
        assert!(evicts(&m));
        let config = proxy_config(&m).unwrap();
        assert_eq!(
            config.max_cache_bytes,
            Some(100 << 30),
            "the bucket's own size"
        );
        let ev = &config.storage.s3.as_ref().unwrap().eviction;
        assert_eq!(ev.lease.as_deref(), Some("pullthrough-public-evictor"));
        assert_eq!(ev.lease_namespace, m.namespace());
        let d = deployment(&m, &settings(), "h");
        let p = pod(&d.spec.as_ref().unwrap().template);
        assert_eq!(
            p.service_account_name.as_deref(),
            Some("pullthrough-public-proxy")
        );
        assert_eq!(p.automount_service_account_token, Some(true));
        assert_eq!(pod_field_of(&p.containers[0], "POD_NAME"), "metadata.name");
        let sa = proxy_service_account(&m);
        assert_eq!(
            sa.metadata.name.as_deref(),
            Some("pullthrough-public-proxy")
        );
        let role = evictor_role(&m);
        let rules = role.rules.unwrap();
        assert!(
            rules
                .iter()
                .all(|r| r.resources.as_deref() == Some(&["leases".to_string()][..]))
        );
        let named = rules
            .iter()
            .find(|r| r.verbs.contains(&"update".to_string()))
            .unwrap();
        assert_eq!(
            named.resource_names.as_deref(),
            Some(&["pullthrough-public-evictor".to_string()][..])
        );
        let binding = evictor_role_binding(&m);
        assert_eq!(binding.role_ref.name, "pullthrough-public-evictor");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.clone()),
            ("pullthrough-public-proxy", m.namespace())
        );
        // Unbounded, or on a disk: no API access for the pods.
        for yaml in [
            "upstreams: [{registry: docker.io}]\ncache: {storage: {s3: {bucket: b}}}",
            "upstreams: [{registry: docker.io}]",
        ] {
            let m = mirror(yaml);
            assert!(!evicts(&m));
            let d = deployment(&m, &settings(), "h");
            let p = pod(&d.spec.as_ref().unwrap().template);
            assert_eq!(
                (
                    p.service_account_name.as_deref(),
                    p.automount_service_account_token
                ),
                (None, Some(false))
            );
        }
        let bad = mirror(
            "upstreams: [{registry: docker.io}]\ncache: {storage: {s3: {bucket: b, maxSize: lots}}}",
        );
        assert!(proxy_config(&bad).is_err());
    }

    #[test]
    fn config_hash_covers_config_and_secrets() {
        let a = config_hash("x", &[b"s1".to_vec()]);
        assert_eq!(a, config_hash("x", &[b"s1".to_vec()]));
        assert_ne!(a, config_hash("y", &[b"s1".to_vec()]));
        assert_ne!(a, config_hash("x", &[b"s2".to_vec()]));
        assert_ne!(
            config_hash("x", &[b"ab".to_vec(), b"c".to_vec()]),
            config_hash("x", &[b"a".to_vec(), b"bc".to_vec()])
        );
    }

    #[test]
    fn service_and_endpoint() {
        let m = mirror("upstreams: [{registry: docker.io}]");
        let mut svc = service(&m);
        let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(ports[0].port, 5000);
        assert_eq!(endpoint(&svc, false), None);
        svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.12.7".into());
        assert_eq!(
            endpoint(&svc, false).as_deref(),
            Some("http://10.96.12.7:5000")
        );
        assert_eq!(
            endpoint(&svc, true).as_deref(),
            Some("https://10.96.12.7:5000")
        );
        svc.spec.as_mut().unwrap().cluster_ip = Some("fd00::7".into());
        assert_eq!(
            endpoint(&svc, false).as_deref(),
            Some("http://[fd00::7]:5000")
        );
    }

    #[test]
    fn tls_and_a_guarded_upstream_mount_their_secrets_where_the_config_says() {
        let m = mirror(
            "upstreams: [{registry: ghcr.io, credentialsSecretRef: {name: gh}}]\ntls: {secretRef: {name: cert}}",
        );
        let config = proxy_config(&m).unwrap();
        let tls = config.tls.as_ref().expect("tls in the config");
        let key = config
            .access
            .signing_key_file
            .clone()
            .expect("a shared key");
        let p = pod_template(&m, &settings(), "h").spec.unwrap();
        let mounted = |file: &std::path::Path, secret: &str| {
            let dir = file.parent().unwrap().to_str().unwrap();
            let file = file.file_name().unwrap().to_str().unwrap();
            let mount = p.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.mount_path == dir)
                .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
            let vol = p
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == mount.name)
                .unwrap();
            let source = vol.secret.as_ref().unwrap();
            assert_eq!(source.secret_name.as_deref(), Some(secret));
            assert!(
                source
                    .items
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|i| i.path == file)
            );
        };
        mounted(&tls.cert_file, "cert");
        mounted(&tls.key_file, "cert");
        mounted(&key, &access_secret_name(&m));
        let s = access_secret(&m, "k");
        assert_eq!(
            s.metadata.owner_references.unwrap()[0].kind,
            "RegistryMirror"
        );
        assert_eq!(s.string_data.unwrap()[SIGNING_KEY], "k");
        // Without credentials nothing is guarded: no key.
        let open = mirror("upstreams: [{registry: docker.io}]");
        assert!(!open.spec.guarded());
        assert!(
            proxy_config(&open)
                .unwrap()
                .access
                .signing_key_file
                .is_none()
        );
    }
}

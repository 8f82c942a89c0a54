//! The proxy's pods and what runs them: the Deployment (cache on an emptyDir) or the
//! StatefulSet (cache on claims), their pod template, its container, volumes and
//! environment.

use super::{
    CONFIG_HASH, CONFIG_KEY, ChildSettings, RUN_AS, access_secret_name, admin_secret_name,
    child_name, evicts, labels, locked_down, meta, proxy_service_account_name, selector_labels,
    uses_pvc,
};
use crate::api::mirror::{
    ACCESS_MOUNT, ADMIN_MOUNT, ADMIN_TOKEN, CACHE_MOUNT, CONFIG_MOUNT, METRICS_PORT, PROXY_PORT,
    RegistryMirror, SECRETS_MOUNT, SIGNING_KEY, TLS_MOUNT,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet,
    StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretEnvSource, SecretVolumeSource, Volume,
    VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

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

/// The volumes of the proxy pod and where the container mounts them: its configuration,
/// its cache (an emptyDir unless it is on claims), and the Secrets it reads.
fn volumes(mirror: &RegistryMirror) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: child_name(mirror),
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
    let mut secret = |vol: String, name: String, keys: &[&str], mount: String| {
        volumes.push(Volume {
            name: vol.clone(),
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
            name: vol,
            mount_path: mount,
            read_only: Some(true),
            ..VolumeMount::default()
        });
    };
    for (i, u) in mirror.spec.upstreams.iter().enumerate() {
        if let Some(r) = &u.credentials_secret_ref {
            let (vol, mount) = (format!("credentials-{i}"), format!("{SECRETS_MOUNT}/{i}"));
            secret(vol, r.name.clone(), &[".dockerconfigjson"], mount);
        }
    }
    if let Some(tls) = &mirror.spec.tls {
        let keys = ["tls.crt", "tls.key"];
        secret(
            "tls".into(),
            tls.secret_ref.name.clone(),
            &keys,
            TLS_MOUNT.into(),
        );
    }
    if mirror.spec.shares_key() {
        let name = access_secret_name(mirror);
        secret("access".into(), name, &[SIGNING_KEY], ACCESS_MOUNT.into());
    }
    // The admin token the controller asks the replicas with (prefetches, modes, drops).
    let name = admin_secret_name(mirror);
    secret("admin".into(), name, &[ADMIN_TOKEN], ADMIN_MOUNT.into());
    (volumes, mounts)
}

/// The proxy container's environment: where `pullthrough cache drop` finds the admin
/// token, and the pod fields the proxy needs (its address among replicas on a bucket,
/// its name as the holder of the evictor's Lease).
fn env(mirror: &RegistryMirror) -> Vec<EnvVar> {
    // Where `kubectl exec ... pullthrough cache drop` finds the admin token.
    let token = format!("{ADMIN_MOUNT}/{ADMIN_TOKEN}");
    let mut env = vec![EnvVar {
        name: "PULLTHROUGH_ADMIN_TOKEN_FILE".into(),
        value: Some(token),
        ..EnvVar::default()
    }];
    if mirror.spec.cache.storage.s3.is_some() {
        // The address the other replicas know this one by.
        env.push(pod_field_env("POD_IP", "status.podIP"));
    }
    if evicts(mirror) {
        // The Lease's holder is the pod; its namespace is the mirror's.
        env.push(pod_field_env("POD_NAME", "metadata.name"));
    }
    env
}

/// The proxy container, locked down: non-root, read-only root, no capabilities.
fn container(
    mirror: &RegistryMirror,
    settings: &ChildSettings,
    mounts: Vec<VolumeMount>,
) -> Container {
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: port.into(),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let s3 = mirror.spec.cache.storage.s3.as_ref();
    Container {
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
            port("registry", PROXY_PORT),
            port("metrics", METRICS_PORT),
        ]),
        env: Some(env(mirror)),
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
        security_context: Some(locked_down()),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// Replicas spread over nodes, so that one node going does not take the cache down.
fn spread(mirror: &RegistryMirror) -> Affinity {
    Affinity {
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
    }
}

/// The proxy pod: its container, volumes and security context, annotated with the hash
/// of what it reads at start (a change rolls the pods).
pub(super) fn pod_template(
    mirror: &RegistryMirror,
    settings: &ChildSettings,
    hash: &str,
) -> PodTemplateSpec {
    let (volumes, mounts) = volumes(mirror);
    let annotations = BTreeMap::from([
        (CONFIG_HASH.to_string(), hash.to_string()),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        (
            "kubectl.kubernetes.io/default-container".to_string(),
            "proxy".to_string(),
        ),
    ]);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(mirror)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container(mirror, settings, mounts)],
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
            affinity: Some(spread(mirror)),
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

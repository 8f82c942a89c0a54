//! The `RegistryMirror` custom resource (`pullthrough.dev/v1alpha1`): the Rust types are the
//! source of truth for the CRD (`pullthrough crd` prints it; `crds/` holds its output).
//! Also the pure mapping from a mirror's spec to the [`ProxyConfig`] its proxy runs with.

use super::proxy_config::{
    AccessConfig, AccessMode, ConfigError, ProxyConfig, RepositoryFilter, S3Config, StorageConfig,
    TlsConfig, UpstreamAccess, UpstreamConfig, UpstreamLimits,
};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// API group of the resource.
pub const GROUP: &str = "pullthrough.dev";
/// Port of the proxy's registry API inside the pod and on the Service.
pub const PROXY_PORT: u16 = 5000;
/// Port of the proxy's metrics and health endpoints.
pub const METRICS_PORT: u16 = 9095;
/// Where the proxy pod mounts its cache volume.
pub const CACHE_MOUNT: &str = "/var/cache/pullthrough";
/// Where the proxy pod mounts its configuration.
pub const CONFIG_MOUNT: &str = "/etc/pullthrough";
/// Where credentials Secrets are mounted, one directory per upstream index.
pub const SECRETS_MOUNT: &str = "/var/run/pullthrough/credentials";
/// Where the `spec.tls` Secret is mounted (`tls.crt`, `tls.key`).
pub const TLS_MOUNT: &str = "/var/run/pullthrough/tls";
/// Where the signing key Secret the controller makes is mounted.
pub const ACCESS_MOUNT: &str = "/var/run/pullthrough/access";
/// The signing key's name in its Secret and its mount.
pub const SIGNING_KEY: &str = "signing-key";
/// Where the admin token Secret the controller makes (for prefetch requests) is mounted.
pub const ADMIN_MOUNT: &str = "/var/run/pullthrough/admin";
/// The admin token's name in its Secret and its mount.
pub const ADMIN_TOKEN: &str = "token";

/// Desired state of a pull-through cache for one or more upstream registries.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pullthrough.dev",
    version = "v1alpha1",
    kind = "RegistryMirror",
    namespaced,
    status = "RegistryMirrorStatus",
    shortname = "rmirror",
    category = "pullthrough",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodes.configured"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 40").message("the name may be at most 40 characters (it prefixes the names of the mirror's objects)")
)]
#[x_kube(cel)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorSpec {
    /// Registries this cache mirrors. Each registry may appear once (in any case, and
    /// Docker Hub under one of its names: docker.io, index.docker.io, registry-1.docker.io).
    #[x_kube(validation = Rule::new("self.all(u, self.filter(v, (v.registry.lowerAscii() in ['docker.io', 'index.docker.io', 'registry-1.docker.io'] ? 'docker.io' : v.registry.lowerAscii()) == (u.registry.lowerAscii() in ['docker.io', 'index.docker.io', 'registry-1.docker.io'] ? 'docker.io' : u.registry.lowerAscii())).size() == 1)").message("each upstream registry may appear only once (case and Docker Hub's names folded)"))]
    #[schemars(length(min = 1, max = 32))]
    pub upstreams: Vec<MirrorUpstream>,
    /// Cache storage and freshness.
    #[serde(default)]
    pub cache: CacheSpec,
    /// Number of proxy pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Compute resources of the proxy pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Which nodes get containerd configured to use this mirror.
    #[serde(default)]
    pub nodes: NodesSpec,
    /// How `upstreamAuth` upstreams decide who may pull (docs/proxy.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessSpec>,
    /// Serve HTTPS to the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// The proxy's certificate, and what nodes check of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret in the mirror's namespace (`tls.crt`, `tls.key`, and
    /// `ca.crt` as cert-manager writes it): its certificate must name the address in
    /// `status.endpoint`. Nodes trust `ca.crt` (without one, `tls.crt` itself).
    pub secret_ref: SecretReference,
    /// Nodes do not verify the certificate (`skip_verify` in hosts.toml): only for
    /// trying things out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_verify: bool,
}

/// How the proxy decides, and remembers, who may pull a private repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// How long the upstream's yes to a client's credentials is trusted: the delay before
    /// a revoked client loses access through the cache (default `5m`).
    #[serde(
        rename = "allowedTTL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub allowed_ttl: Option<String>,
    /// How long the upstream's no is remembered (default `30s`).
    #[serde(rename = "deniedTTL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub denied_ttl: Option<String>,
    /// Challenge clients for credentials over plain HTTP, where they cross the pod
    /// network in clear. Needed for `upstreamAuth` without `spec.tls`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

fn default_replicas() -> i32 {
    1
}

/// One mirrored registry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorUpstream {
    /// Host name as image references use it: `docker.io`, `ghcr.io`, `registry.local:5000`.
    #[schemars(
        regex(pattern = r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?(:[0-9]{1,5})?$"),
        length(max = 253)
    )]
    pub registry: String,
    /// Registry API base URL; defaulted for well-known registries
    /// (`https://registry-1.docker.io` for docker.io, `https://<registry>` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/?#@ ]+(/[^?# ]*)?$"))]
    pub url: Option<String>,
    /// Several base URLs instead of `url`, tried in order (a regional mirror first, the
    /// origin last); containerd falls back to the last. Credentials go to the last one
    /// only, which also decides who may pull private repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8))]
    pub urls: Option<Vec<UpstreamUrl>>,
    /// A `kubernetes.io/dockerconfigjson` Secret in the mirror's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
    /// Repository allow/deny globs (`*` matches anything, `/` included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories: Option<RepositoryFilter>,
    /// Who may pull through: `open` (anyone), or `upstreamAuth` (a private repository
    /// only with the client's own credentials, checked with the upstream). Default:
    /// `upstreamAuth` with `credentialsSecretRef`, else `open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<UpstreamAccess>,
    /// How hard the proxy may press the upstream (docs/operations.md, "Keeping under the
    /// upstream's limits").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<UpstreamLimitsSpec>,
}

/// A registry API base URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct UpstreamUrl(
    #[schemars(regex(pattern = r"^https?://[^/?#@ ]+(/[^?# ]*)?$"))]
    pub String,
);

/// Caps on what the proxy asks of one upstream; requests over a cap wait `queueTimeout`,
/// then fail with 429 and `Retry-After`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamLimitsSpec {
    /// Requests sent to the upstream at once (default 32 for docker.io, 64 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_requests: Option<u32>,
    /// Manifest GETs per second, what Docker Hub counts as pulls; 0: no cap (default 10
    /// for docker.io, no cap otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_gets_per_second: Option<u32>,
    /// How long a request over a cap waits before it fails (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub queue_timeout: Option<String>,
    /// How long the upstream is left alone after a 429 without `Retry-After` (default
    /// `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub backoff: Option<String>,
    /// The longest `Retry-After` honoured (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_backoff: Option<String>,
}

/// Name of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretReference {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

const DURATION_PATTERN: &str = r"^(0|([0-9]+(ms|s|m|h|d))+)$";

/// Cache storage and freshness.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Where the cache lives. Default: an emptyDir.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How long a tag is trusted before it is revalidated upstream (e.g. `5m`).
    #[serde(rename = "tagTTL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub tag_ttl: Option<String>,
    /// How long past its TTL a tag is still served while the upstream fails (e.g. `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub stale_if_error: Option<String>,
    /// Images never evicted (`registry/repository:tag` or `@sha256:...`); also prefetched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    /// Images pulled into the cache ahead of need, when the proxy starts (and so whenever
    /// the spec changes, since that rolls the pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<String>,
    /// Platforms prefetched from multi-platform images (`linux/amd64`, `linux/arm64/v8`);
    /// empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch_platforms: Vec<String>,
    /// Prefetch the images of workloads (Deployments, StatefulSets, DaemonSets, Jobs,
    /// CronJobs) whenever a pod template's images change, before a pod asks for them
    /// (docs/operations.md, "Warm before the rollout"). Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_from_workloads: Option<WorkloadPrefetchSpec>,
}

/// Which workloads' images a mirror prefetches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPrefetchSpec {
    /// The namespaces whose workloads count (their labels); every namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Cache volume: a PersistentVolumeClaim per pod (StatefulSet) when `size` is set, else an
/// emptyDir (Deployment); or an S3-compatible bucket that every replica shares (a
/// Deployment whose emptyDir only spools downloads).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(cel, validation = Rule::new("!(has(self.size) && has(self.emptyDir))").message("set either size (a PersistentVolumeClaim) or emptyDir, not both"), validation = Rule::new("!(has(self.s3) && has(self.size))").message("a mirror on s3 keeps no volume per pod: leave size out"), validation = Rule::new("!has(self.size) || isQuantity(string(self.size))").message("size must be a quantity, e.g. 50Gi"), validation = Rule::new("!has(self.s3) || !has(self.s3.maxSize) || isQuantity(string(self.s3.maxSize))").message("s3.maxSize must be a quantity, e.g. 500Gi"))]
pub struct StorageSpec {
    /// Size of each pod's PersistentVolumeClaim (e.g. `50Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// StorageClass of the claims; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Use an emptyDir (lost when the pod goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirSpec>,
    /// Keep the cache in an S3-compatible bucket that every replica shares: one upstream
    /// fetch per blob for the whole mirror, and a cache that outlives its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3StorageSpec>,
}

/// An S3-compatible bucket (AWS S3, GCS's S3 API, Ceph RGW, MinIO).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3StorageSpec {
    /// The bucket; it must exist.
    #[schemars(length(min = 1))]
    pub bucket: String,
    /// Key prefix of the mirror's objects (several mirrors can share a bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Endpoint URL of a store other than AWS (`http://rgw.ceph.svc:7480`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region; `us-east-1` when unset and the Secret gives no `AWS_REGION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style requests; by default on with an `endpoint`, off without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Send clients of cached blobs to a URL of the bucket signed for 10 minutes (a 307)
    /// instead of through the proxy: the nodes must reach the bucket's endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<bool>,
    /// The bytes of cached objects the bucket may hold (e.g. `500Gi`): one replica,
    /// elected on a Lease, evicts the least recently used objects of all the replicas'
    /// uses beyond it. Unbounded when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<Quantity>,
    /// A Secret in the mirror's namespace whose keys are environment variables of the
    /// AWS tools (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally
    /// `AWS_SESSION_TOKEN`, `AWS_REGION`); without one, the pod's own identity (web
    /// identity such as EKS IRSA, or the instance's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

/// emptyDir options.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(cel, validation = Rule::new("!has(self.sizeLimit) || isQuantity(string(self.sizeLimit))").message("sizeLimit must be a quantity, e.g. 20Gi"))]
pub struct EmptyDirSpec {
    /// Upper bound of the volume (e.g. `20Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

/// Which nodes get containerd configured for this mirror.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodesSpec {
    /// Write containerd `hosts.toml` files on matching nodes.
    #[serde(default = "default_true")]
    pub configure: bool,
    /// Node labels that must all match; empty matches every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

impl Default for NodesSpec {
    fn default() -> Self {
        NodesSpec {
            configure: true,
            selector: BTreeMap::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Observed state, written by the controller. Every field is always written (empty
/// lists as `[]`, absent values as `null`): the controller merge-patches the status, and a
/// field left out of a merge patch would keep its old value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorStatus {
    /// The generation this status describes.
    #[serde(default)]
    pub observed_generation: Option<i64>,
    /// Where nodes reach the mirror: `http://<service cluster IP>:5000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Proxy pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Where the cache is kept: `s3://<bucket>/<prefix>` (shared by the replicas),
    /// `persistentVolumeClaim` or `emptyDir` (one per pod).
    #[serde(default)]
    pub storage: Option<String>,
    /// Node configuration progress.
    #[serde(default)]
    pub nodes: Option<NodesStatus>,
    /// The registries this mirror serves (nodes are pointed at it for these).
    #[serde(default)]
    pub served_registries: Vec<String>,
    /// Its registries that an older mirror serves instead.
    #[serde(default)]
    pub lost_registries: Vec<LostRegistry>,
    /// `Ready`, `Progressing`, `Degraded`, `Conflict` (metav1.Condition).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// With `spec.tls`: the CA certificate (PEM) nodes verify the proxy's with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// With `cache.prefetchFromWorkloads`: images of workloads the proxies have
    /// prefetched since the controller started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetched_images: Option<i64>,
}

/// A registry of the mirror's that another mirror serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LostRegistry {
    /// The registry (lowercase, Docker Hub as docker.io).
    pub registry: String,
    /// The mirror that serves it (`namespace/name`): the oldest that can.
    pub mirrored_by: String,
}

/// How many nodes point containerd at this mirror.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodesStatus {
    /// Nodes whose agent reports this mirror configured, with a containerd that reads
    /// the files.
    pub configured: i32,
    /// Nodes the selector matches.
    pub total: i32,
    /// Nodes whose agent wrote the files but whose containerd does not read them (its
    /// registry `config_path` is not set or points elsewhere): not counted as configured.
    #[serde(default)]
    pub ignoring_mirrors: i32,
}

/// Why a mirror's spec does not make a proxy configuration.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The cache's size.
    #[error("cache.storage: {0}")]
    Storage(#[from] super::quantity::QuantityError),
    /// One of the cache's durations.
    #[error("cache.{field}: {source}")]
    Duration {
        /// The field under `cache`, as the CRD spells it.
        field: &'static str,
        /// What is wrong with it.
        source: super::duration::DurationError,
    },
    /// The configuration it maps to.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Share of the cache volume the cache itself may fill: the rest is room for downloads in
/// progress, tag records and the file system's own overhead.
pub const CACHE_FILL_RATIO: f64 = 0.9;

impl RegistryMirrorSpec {
    /// The proxy's size limit from the volume size (PVC size or emptyDir sizeLimit).
    pub fn cache_limit(&self) -> Result<Option<u64>, SpecError> {
        let storage = &self.cache.storage;
        let size = storage.size.as_ref().or(storage
            .empty_dir
            .as_ref()
            .and_then(|e| e.size_limit.as_ref()));
        match size {
            None => Ok(None),
            Some(q) => {
                let bytes = super::quantity::to_bytes(&q.0)?;
                Ok(Some((bytes as f64 * CACHE_FILL_RATIO) as u64))
            }
        }
    }

    /// Where the cache is kept, as the status says it (see [`RegistryMirrorStatus::storage`]).
    pub fn storage_kind(&self) -> String {
        let storage = &self.cache.storage;
        match (&storage.s3, &storage.size) {
            (Some(s3), _) => format!(
                "s3://{}/{}",
                s3.bucket,
                s3.prefix.as_deref().unwrap_or("").trim_matches('/')
            ),
            (None, Some(_)) => "persistentVolumeClaim".into(),
            (None, None) => "emptyDir".into(),
        }
    }

    /// Whether any upstream is in access mode `upstreamAuth` (as set, or by default with
    /// credentials): its proxies then issue tokens under a key they share.
    pub fn guarded(&self) -> bool {
        self.upstreams.iter().any(|u| {
            let mode = match &u.access {
                Some(a) => a.mode,
                None if u.credentials_secret_ref.is_some() => AccessMode::UpstreamAuth,
                None => AccessMode::Open,
            };
            mode == AccessMode::UpstreamAuth
        })
    }

    /// The Secrets the spec names: each upstream's credentials, the bucket's keys, the
    /// TLS certificate.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        let upstreams = self
            .upstreams
            .iter()
            .filter_map(|u| u.credentials_secret_ref.as_ref());
        let bucket = self
            .cache
            .storage
            .s3
            .as_ref()
            .and_then(|s| s.credentials_secret_ref.as_ref());
        let tls = self.tls.as_ref().map(|t| &t.secret_ref);
        upstreams.chain(bucket).chain(tls).map(|r| r.name.as_str())
    }

    /// Whether the mirror's proxies share a key (a Secret the controller makes): to
    /// issue tokens any replica verifies ([`Self::guarded`]), and to prove their requests
    /// to each other when they share a bucket.
    pub fn shares_key(&self) -> bool {
        self.guarded() || self.cache.storage.s3.is_some()
    }

    /// The configuration the mirror's proxy runs with. Credentials are referenced as
    /// files where the pod mounts each upstream's Secret.
    pub fn proxy_config(&self) -> Result<ProxyConfig, SpecError> {
        let defaults = ProxyConfig::default();
        let parse = |field: &'static str, v: &Option<String>, default| match v {
            Some(s) => {
                super::duration::parse(s).map_err(|source| SpecError::Duration { field, source })
            }
            None => Ok(default),
        };
        let config = ProxyConfig {
            listen: ([0, 0, 0, 0], PROXY_PORT).into(),
            metrics_listen: ([0, 0, 0, 0], METRICS_PORT).into(),
            cache_dir: PathBuf::from(CACHE_MOUNT),
            storage: StorageConfig {
                s3: self.cache.storage.s3.as_ref().map(|s| S3Config {
                    bucket: s.bucket.clone(),
                    prefix: s.prefix.clone().unwrap_or_default(),
                    endpoint: s.endpoint.clone(),
                    region: s.region.clone(),
                    path_style: s.path_style,
                    redirect: s.redirect.unwrap_or(false),
                    ..S3Config::default()
                }),
            },
            peers: None,
            upstreams: self
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    Ok(UpstreamConfig {
                        registry: u.registry.clone(),
                        url: u.url.clone(),
                        urls: u.urls.iter().flatten().map(|x| x.0.clone()).collect(),
                        credentials: None,
                        credentials_file: u.credentials_secret_ref.as_ref().map(|_| {
                            PathBuf::from(format!("{SECRETS_MOUNT}/{i}/.dockerconfigjson"))
                        }),
                        repositories: u.repositories.clone().unwrap_or_default(),
                        access: u.access.clone(),
                        limits: match &u.limits {
                            None => None,
                            Some(l) => {
                                let d = UpstreamLimits::for_registry(&u.registry);
                                Some(UpstreamLimits {
                                    max_concurrent_requests: l.max_concurrent_requests,
                                    manifest_gets_per_second: l.manifest_gets_per_second,
                                    queue_timeout: parse(
                                        "limits.queueTimeout",
                                        &l.queue_timeout,
                                        d.queue_timeout,
                                    )?,
                                    backoff: parse("limits.backoff", &l.backoff, d.backoff)?,
                                    max_backoff: parse(
                                        "limits.maxBackoff",
                                        &l.max_backoff,
                                        d.max_backoff,
                                    )?,
                                })
                            }
                        },
                    })
                })
                .collect::<Result<_, SpecError>>()?,
            default_upstream: None,
            // A bucket's emptyDir only spools downloads: the limit is the bucket's own.
            max_cache_bytes: match &self.cache.storage.s3 {
                Some(s3) => s3
                    .max_size
                    .as_ref()
                    .map(|q| super::quantity::to_bytes(&q.0))
                    .transpose()?,
                None => self.cache_limit()?,
            },
            pin: self.cache.pin.clone(),
            prefetch: self.cache.prefetch.clone(),
            prefetch_platforms: self.cache.prefetch_platforms.clone(),
            tag_ttl: parse("tagTTL", &self.cache.tag_ttl, defaults.tag_ttl)?,
            stale_if_error: parse(
                "staleIfError",
                &self.cache.stale_if_error,
                defaults.stale_if_error,
            )?,
            access: {
                let spec = self.access.clone().unwrap_or_default();
                let d = AccessConfig::default();
                AccessConfig {
                    allowed_ttl: parse("access.allowedTTL", &spec.allowed_ttl, d.allowed_ttl)?,
                    denied_ttl: parse("access.deniedTTL", &spec.denied_ttl, d.denied_ttl)?,
                    plain_http: spec.plain_http,
                    // One key for every replica, from the Secret the controller makes.
                    signing_key_file: self
                        .shares_key()
                        .then(|| PathBuf::from(format!("{ACCESS_MOUNT}/{SIGNING_KEY}"))),
                    ..d
                }
            },
            tls: self.tls.as_ref().map(|_| TlsConfig {
                cert_file: PathBuf::from(format!("{TLS_MOUNT}/tls.crt")),
                key_file: PathBuf::from(format!("{TLS_MOUNT}/tls.key")),
            }),
            // The controller asks for prefetches with the token of the Secret it makes.
            admin_token_file: self
                .cache
                .prefetch_from_workloads
                .as_ref()
                .map(|_| PathBuf::from(format!("{ADMIN_MOUNT}/{ADMIN_TOKEN}"))),
            ..defaults
        };
        config.validate()?;
        Ok(config)
    }
}

/// The CRD as YAML, exactly what `pullthrough crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    format!(
        "# Generated by `pullthrough crd` from src/api/mirror.rs. Do not edit.\n{}",
        serde_yaml::to_string(&RegistryMirror::crd()).expect("CRD serializes")
    )
}

/// Node annotation the node agent keeps up to date: the mirrors (`namespace/name`,
/// comma-separated, sorted) whose `hosts.toml` files are written on that node.
pub const NODE_ANNOTATION: &str = "pullthrough.dev/mirrors";

/// Node annotation the node agent keeps: whether the node's containerd reads the
/// `hosts.toml` files (`enabled`), else why not (`not-set`, `elsewhere`, ...).
pub const CONTAINERD_ANNOTATION: &str = "pullthrough.dev/containerd-config-path";

/// Finalizer that holds a deleted mirror until no node is configured for it any more.
pub const FINALIZER: &str = "pullthrough.dev/node-cleanup";

/// The mirrors listed in a node's [`NODE_ANNOTATION`] value.
pub fn parse_node_annotation(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The key a mirror has in node annotations.
pub fn mirror_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The order in which mirrors claim registries: older first, then namespace/name. The
/// first claim of a registry wins (the controller reports the others as conflicting, the
/// node agent configures only the winner).
pub fn claim_order(m: &RegistryMirror) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
    use kube::ResourceExt;
    (
        m.creation_timestamp().map(|t| t.0),
        m.namespace().unwrap_or_default(),
        m.name_any(),
    )
}

/// Whether the mirror's Ready condition is True.
pub fn is_ready(m: &RegistryMirror) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The upstream's own API URL (containerd's fallback): the last of `urls`, the origin.
pub fn upstream_url(u: &MirrorUpstream) -> String {
    let c = UpstreamConfig {
        url: u.url.clone(),
        urls: u.urls.iter().flatten().map(|x| x.0.clone()).collect(),
        ..UpstreamConfig::new(&u.registry)
    };
    c.base_urls().pop().unwrap_or_else(|| c.base_url())
}

pub use super::docker_hub::registry_key;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn example(upstreams: &[&str]) -> RegistryMirrorSpec {
        serde_yaml::from_str(&format!(
            "upstreams: [{}]",
            upstreams
                .iter()
                .map(|u| format!("{{registry: \"{u}\"}}"))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .unwrap()
    }

    #[test]
    fn defaults_apply() {
        let spec = example(&["docker.io"]);
        assert_eq!(spec.replicas, 1);
        assert!(spec.nodes.configure);
        let c = spec.proxy_config().unwrap();
        assert_eq!(c.listen.port(), PROXY_PORT);
        assert_eq!(c.cache_dir, PathBuf::from(CACHE_MOUNT));
        assert_eq!(c.upstreams[0].base_url(), "https://registry-1.docker.io");
    }

    #[test]
    fn spec_maps_to_proxy_config() {
        let spec: RegistryMirrorSpec = serde_yaml::from_str(
            r#"
upstreams:
  - registry: docker.io
    credentialsSecretRef: {name: hub}
    repositories: {allow: ["library/*"]}
  - registry: ghcr.io
    url: https://ghcr.example
cache: {tagTTL: 1m, staleIfError: 2h}
access: {plainHttp: true, allowedTTL: 1m}
"#,
        )
        .unwrap();
        let c = spec.proxy_config().unwrap();
        use crate::api::AccessMode;
        assert_eq!(c.upstreams[0].access_mode(), AccessMode::UpstreamAuth);
        assert_eq!(c.upstreams[1].access_mode(), AccessMode::Open);
        assert_eq!(c.access.allowed_ttl, std::time::Duration::from_secs(60));
        assert!(c.access.plain_http);
        let mut clear = spec.clone();
        clear.access = None;
        let e = clear.proxy_config().unwrap_err().to_string();
        assert!(e.contains("access.plainHttp"), "{e}");
        assert_eq!(c.tag_ttl, std::time::Duration::from_secs(60));
        assert_eq!(c.stale_if_error, std::time::Duration::from_secs(7200));
        assert_eq!(
            c.upstreams[0].credentials_file,
            Some(PathBuf::from(format!(
                "{SECRETS_MOUNT}/0/.dockerconfigjson"
            )))
        );
        assert_eq!(c.upstreams[0].repositories.allow, vec!["library/*"]);
        assert_eq!(c.upstreams[1].base_url(), "https://ghcr.example");
        assert_eq!(c.max_cache_bytes, None);
        let sized: RegistryMirrorSpec = serde_yaml::from_str(
            "upstreams: [{registry: docker.io}]\ncache: {storage: {size: 10Gi}, pin: [alpine:3.20], prefetch: [busybox], prefetchPlatforms: [linux/amd64]}",
        )
        .unwrap();
        let c2 = sized.proxy_config().unwrap();
        assert_eq!(c2.max_cache_bytes, Some((10u64 << 30) * 9 / 10));
        assert_eq!(c2.pin, vec!["alpine:3.20"]);
        assert_eq!(c2.prefetch_platforms, vec!["linux/amd64"]);
        let mut wrong = sized.clone();
        wrong.cache.pin = vec!["quay.io/x/y:1".into()];
        assert!(
            wrong
                .proxy_config()
                .unwrap_err()
                .to_string()
                .contains("not one of the upstreams")
        );
        // What the controller writes, the proxy reads back unchanged.
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn upstream_limits_default_by_registry_and_take_the_spec() {
        let mut spec = example(&["docker.io", "ghcr.io"]);
        spec.upstreams[1].limits = Some(UpstreamLimitsSpec {
            max_concurrent_requests: Some(8),
            queue_timeout: Some("20s".into()),
            ..UpstreamLimitsSpec::default()
        });
        let c = spec.proxy_config().unwrap();
        let hub = c.upstreams[0].limits();
        assert_eq!(
            (hub.max_concurrent_requests, hub.manifest_gets_per_second),
            (Some(32), Some(10))
        );
        let ghcr = c.upstreams[1].limits();
        assert_eq!(ghcr.max_concurrent_requests, Some(8));
        assert_eq!(ghcr.manifest_gets_per_second, Some(0));
        assert_eq!(ghcr.queue_timeout, std::time::Duration::from_secs(20));
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
        spec.upstreams[1].limits = Some(UpstreamLimitsSpec {
            backoff: Some("soon".into()),
            ..UpstreamLimitsSpec::default()
        });
        let err = spec.proxy_config().unwrap_err().to_string();
        assert!(err.contains("limits.backoff"), "{err}");
        spec.upstreams[1].limits = Some(UpstreamLimitsSpec {
            max_concurrent_requests: Some(0),
            ..UpstreamLimitsSpec::default()
        });
        let err = spec.proxy_config().unwrap_err().to_string();
        assert!(err.contains("maxConcurrentRequests"), "{err}");
    }

    #[test]
    fn several_urls_are_tried_in_order_and_containerd_falls_back_to_the_last() {
        let mut spec = example(&["docker.io"]);
        let urls = ["https://mirror.example", "https://registry-1.docker.io/"];
        spec.upstreams[0].urls = Some(urls.map(|u| UpstreamUrl(u.into())).to_vec());
        let c = spec.proxy_config().unwrap();
        assert_eq!(
            c.upstreams[0].base_urls(),
            ["https://mirror.example", "https://registry-1.docker.io"]
        );
        assert_eq!(
            upstream_url(&spec.upstreams[0]),
            "https://registry-1.docker.io"
        );
        spec.upstreams[0].url = Some("https://other.example".into());
        let err = spec.proxy_config().unwrap_err().to_string();
        assert!(err.contains("both url and urls"), "{err}");
    }

    #[test]
    fn invalid_specs_are_explained() {
        let mut spec = example(&["docker.io"]);
        spec.cache.tag_ttl = Some("5 minutes".into());
        let err = spec.proxy_config().unwrap_err().to_string();
        assert!(err.contains("cache.tagTTL"), "{err}");
        // Docker Hub's names are one registry, whatever the case.
        for pair in [
            ["docker.io", "index.docker.io"],
            ["registry-1.docker.io", "Index.Docker.io"],
            ["ghcr.io", "GHCR.io"],
        ] {
            assert!(
                example(&pair)
                    .proxy_config()
                    .unwrap_err()
                    .to_string()
                    .contains("twice"),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn cel_rules_hold_client_side() {
        let ok = serde_json::to_value(example(&["docker.io", "ghcr.io"])).unwrap();
        RegistryMirrorSpec::validate_cel(&ok, None).unwrap();
        for pair in [
            ["docker.io", "docker.io"],
            ["docker.io", "Docker.IO"],
            ["registry-1.docker.io", "index.docker.io"],
        ] {
            let dup = serde_json::to_value(example(&pair)).unwrap();
            let err = RegistryMirrorSpec::validate_cel(&dup, None).unwrap_err();
            assert!(
                format!("{err:?}").contains("only once"),
                "{pair:?}: {err:?}"
            );
        }
        let lots = serde_json::json!({"size": "lots"});
        assert!(
            StorageSpec::validate_cel(&lots, None).is_err(),
            "not a quantity"
        );
        StorageSpec::validate_cel(&serde_json::json!({"size": "50Gi"}), None).unwrap();
        let limit = serde_json::json!({"sizeLimit": "lots"});
        assert!(EmptyDirSpec::validate_cel(&limit, None).is_err());
        EmptyDirSpec::validate_cel(&serde_json::json!({"sizeLimit": "20Gi"}), None).unwrap();
        let both = serde_json::json!({"size": "1Gi", "emptyDir": {}});
        assert!(StorageSpec::validate_cel(&both, None).is_err());
        StorageSpec::validate_cel(&serde_json::json!({"size": "1Gi"}), None).unwrap();
        let bucket = |max: &str| serde_json::json!({"s3": {"bucket": "b", "maxSize": max}});
        assert!(StorageSpec::validate_cel(&bucket("lots"), None).is_err());
        StorageSpec::validate_cel(&bucket("500Gi"), None).unwrap();
    }

    #[test]
    fn annotations_and_keys() {
        assert_eq!(parse_node_annotation(" a/b, c/d ,,"), vec!["a/b", "c/d"]);
        assert_eq!(registry_key("Index.Docker.io"), "docker.io");
        assert_eq!(registry_key("GHCR.io"), "ghcr.io");
    }
}

//! The `RegistryMirror` custom resource (`pullthrough.dev/v1alpha1`): the Rust types are the
//! source of truth for the CRD (`pullthrough crd` prints it; `crds/` holds its output).
//! The pure mapping from a mirror's spec to the [`ProxyConfig`](super::ProxyConfig) its
//! proxy runs with is [`config`]; the OpenShift objects that point nodes at it, in
//! [`openshift`].

mod config;
pub mod openshift;
pub mod rewrite;
#[cfg(test)]
mod tests;

pub use config::{CACHE_FILL_RATIO, SpecError};
pub use rewrite::{RewriteSpec, RewriteStatus};

use super::proxy_config::{
    RepositoryFilter, TagPolicy, UpstreamAccess, UpstreamConfig, UpstreamMode,
};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
/// The annotation that asks for a drop from a mirror's caches on every replica
/// (docs/operations.md, "Dropping from a mirror"): `image=REF`, `tag=REF`,
/// `repository=REGISTRY/REPO` (a bare reference is an image), separated by spaces or
/// commas; `#word` items only make a value new. Each value is done once.
pub const DROP_ANNOTATION: &str = "pullthrough.dev/drop";
/// Where the admin token Secret the controller makes (for the replicas' admin endpoints) is mounted.
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
    printcolumn = r#"{"name":"Unavailable","type":"integer","jsonPath":".status.images.unavailable"}"#,
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
    /// Rewrite the images of pods to go through this mirror, for nodes no one may
    /// configure (docs/rewrite.md). Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RewriteSpec>,
    /// The availability watch of the workloads' images (docs/operations.md, "Know
    /// before the outage"): on unless disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<AvailabilitySpec>,
}

/// How the workloads' images are watched for availability.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailabilitySpec {
    /// Do not watch.
    #[serde(default)]
    pub disabled: bool,
    /// How often every image is checked again (default `10m`); a change of the
    /// workloads' images is checked at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub every: Option<String>,
    /// How long an image stays kept from eviction after the last workload that uses it
    /// went (deleted; a workload scaled to zero still uses its images). Default `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub keep_in_use_for: Option<String>,
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
    /// Whether and when the proxy asks this upstream (`online`, `localFirst`,
    /// `offline`; docs/operations.md, "When the upstream fails: modes"); the cache's
    /// `mode` when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpstreamMode>,
    /// How the tags of some repositories are kept (`refresh`, `immutable`, `pinned`
    /// with its `digest`), first match first (docs/operations.md, "Tag policies").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag_policies: Vec<TagPolicy>,
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
    /// Whether and when the upstreams are asked: `online` (default), `localFirst` (a
    /// cached tag at once, revalidated behind), `offline` (never; a miss fails at once).
    /// Each upstream's own `mode` where it sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpstreamMode>,
    /// A bundle (an OCI image layout tar, `pullthrough bundle export`) the cache is seeded
    /// from when it first starts: an `http(s)://` URL (a file server in the disconnected
    /// network), `s3://<bucket>/<key>` in the cache's own bucket (read with its
    /// credentials), or a path in the proxy pod (on the cache's volume).
    /// docs/operations.md, "An air-gapped cluster".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
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
/// Deployment whose emptyDir spools downloads and keeps local copies).
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
    /// With `spec.rewrite`: whether pods are rewritten now, and what the webhook missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RewriteStatus>,
    /// The mode each upstream is in on the replicas, as they report it (the spec's, which
    /// the controller carries to running replicas without a restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modes: Vec<UpstreamModeStatus>,
    /// The tags a `pinned` tag policy freezes: `registry/repositories:tags -> digest`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned_tags: Vec<String>,
    /// The last drop asked for with the `pullthrough.dev/drop` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropStatus>,
    /// The workloads' images, by availability (the watch's last check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImagesStatus>,
}

/// The workloads' images by state, and the ones that cannot be pulled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagesStatus {
    /// Every blob of the nodes' platforms is in the cache.
    #[serde(default)]
    pub cached: i64,
    /// Not (all) cached; the upstream has it.
    #[serde(default)]
    pub upstream_only: i64,
    /// The tag names another digest than the running pods use.
    #[serde(default)]
    pub moved: i64,
    /// The upstream refuses the mirror's credentials.
    #[serde(default)]
    pub unauthorized: i64,
    /// Neither cached nor pullable: the next pull fails.
    #[serde(default)]
    pub unavailable: i64,
    /// When they were checked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    /// The images in trouble (unavailable, unauthorized, moved), the worst first, at
    /// most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_pullable: Vec<ImageInTrouble>,
}

/// An image that cannot be pulled as the workloads expect.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageInTrouble {
    /// The image.
    pub image: String,
    /// `unavailable`, `unauthorized` or `moved`.
    pub state: String,
    /// What the upstream said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The workloads that use it (`namespace/Kind/name`), at most 5.
    #[serde(default)]
    pub workloads: Vec<String>,
}

/// One upstream's mode on the replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct UpstreamModeStatus {
    /// The upstream's registry.
    pub upstream: String,
    /// `online`, `localFirst` or `offline`.
    pub mode: UpstreamMode,
}

/// A drop from the mirror's caches (the `pullthrough.dev/drop` annotation), once made on
/// every ready replica, or refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DropStatus {
    /// The annotation's value.
    pub request: String,
    /// When it was done on every replica (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at: Option<String>,
    /// The replicas it was made on.
    #[serde(default)]
    pub replicas: i32,
    /// Tags forgotten, summed over the replicas.
    #[serde(default)]
    pub tags: i64,
    /// Manifests removed, summed over the replicas (a shared bucket's once).
    #[serde(default)]
    pub manifests: i64,
    /// Blobs removed, summed over the replicas.
    #[serde(default)]
    pub blobs: i64,
    /// Bytes freed, summed over the replicas.
    #[serde(default)]
    pub bytes: i64,
    /// Why it was refused (an annotation that does not parse); not retried until the
    /// value changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One drop an annotation asks for: what, as `DELETE /admin/cache` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropItem {
    /// `image`, `tag` or `repository`.
    pub scope: &'static str,
    /// The reference or repository.
    pub what: String,
}

/// The drops the `pullthrough.dev/drop` annotation's `value` asks for, or why it does
/// not parse.
pub fn parse_drops(value: &str) -> Result<Vec<DropItem>, String> {
    let mut out = Vec::new();
    for item in value.split(|c: char| c == ',' || c.is_whitespace()) {
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        let (scope, what) = match item.split_once('=') {
            Some(("image", w)) => ("image", w),
            Some(("tag", w)) => ("tag", w),
            Some(("repository", w)) => ("repository", w),
            Some((k, _)) => {
                return Err(format!(
                    "{item:?}: {k:?} is not image=, tag= or repository="
                ));
            }
            None => ("image", item),
        };
        let parsed = super::image_ref::parse(what).map_err(|e| e.to_string())?;
        let tagged = super::image_ref::names_reference(what);
        match scope {
            "tag" if matches!(parsed.reference, crate::oci::Reference::Digest(_)) => {
                return Err(format!("{item:?}: tag= names a tag, not a digest"));
            }
            "repository" if tagged => {
                return Err(format!(
                    "{item:?}: repository= names a repository, without a tag"
                ));
            }
            _ => {}
        }
        out.push(DropItem {
            scope,
            what: what.to_string(),
        });
    }
    if out.is_empty() {
        return Err("it names nothing to drop".into());
    }
    Ok(out)
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

/// The CRD as YAML, exactly what `pullthrough crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    format!(
        "# Generated by `pullthrough crd` from src/api/mirror/. Do not edit.\n{}",
        serde_yaml::to_string(&RegistryMirror::crd()).expect("CRD serializes")
    )
}

/// Node annotation the node agent keeps up to date: the mirrors (`namespace/name`,
/// comma-separated, sorted) whose `hosts.toml` files are written on that node.
pub const NODE_ANNOTATION: &str = "pullthrough.dev/mirrors";

/// Node annotation the node agent keeps: whether the node's containerd reads the
/// `hosts.toml` files (`enabled`), else why not (`not-set`, `elsewhere`, ...).
pub const CONTAINERD_ANNOTATION: &str = "pullthrough.dev/containerd-config-path";

/// Node annotation the node agent keeps: the node's container runtime, as its status
/// names it (`containerd://1.7.13`, `cri-o://1.29.1`), and the files the agent keeps for
/// it (`hosts.toml`, `registries.conf.d`).
pub const RUNTIME_ANNOTATION: &str = "pullthrough.dev/runtime";

/// Node annotation the node agent keeps: the state of its containers-registries.conf(5)
/// drop-in, read by CRI-O, podman and skopeo (`in-place`, `crio-reloaded`, `not-written`,
/// `crio-not-reloaded`, `unmanaged`, `failed`).
pub const REGISTRIES_CONF_ANNOTATION: &str = "pullthrough.dev/registries-conf";

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

/// A mirror's (or an upstream's) URL as containers/image and OpenShift's mirror sets name
/// a location: without its scheme or a trailing `/` (`host:port`), and whether it is
/// plain HTTP. A text without a scheme stands as it is.
pub fn endpoint_location(url: &str) -> (&str, bool) {
    let url = url.trim_end_matches('/');
    match url.split_once("://") {
        Some((scheme, rest)) => (rest, scheme.eq_ignore_ascii_case("http")),
        None => (url, false),
    }
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

//! The proxy's configuration: read by `pullthrough proxy` from YAML, written by the
//! controller into the ConfigMap it owns. Every field has a default, so an empty file (or
//! no file) is a working docker.io cache on port 5000.

use super::docker_hub;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The admin token's file name in the cache directory, by default.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Configuration of one `pullthrough proxy` process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address of the registry API (see [`parse_listen`] for the forms accepted).
    #[serde(default = "default_listen", deserialize_with = "listen_serde")]
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_metrics_listen", deserialize_with = "listen_serde")]
    pub metrics_listen: SocketAddr,
    /// Directory holding the cache (created if missing).
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Where the objects are kept: `cacheDir` on the local disk (the default), or an
    /// S3-compatible bucket that replicas share (`cacheDir` then only spools downloads).
    #[serde(default, skip_serializing_if = "StorageConfig::is_local")]
    pub storage: StorageConfig,
    /// The other replicas that share the bucket: a blob missing from it is asked of the
    /// replica that owns it, so that the fleet fetches it from the upstream once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    /// Registries this proxy mirrors. Requests for any other registry are refused.
    #[serde(default = "default_upstreams")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Registry served to clients that do not say which one they want (no `?ns=`);
    /// defaults to the first upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_upstream: Option<String>,
    /// How long a tag maps to the digest last seen before it is revalidated upstream.
    #[serde(
        rename = "tagTTL",
        default = "default_tag_ttl",
        with = "crate::api::duration::serde"
    )]
    pub tag_ttl: Duration,
    /// How long past its TTL a tag is still served when the upstream is down or failing.
    #[serde(
        default = "default_stale_if_error",
        with = "crate::api::duration::serde"
    )]
    pub stale_if_error: Duration,
    /// How long a tags/list answer is reused.
    #[serde(
        rename = "tagsListTTL",
        default = "default_tags_list_ttl",
        with = "crate::api::duration::serde"
    )]
    pub tags_list_ttl: Duration,
    /// Largest manifest accepted from an upstream, in bytes.
    #[serde(default = "default_max_manifest_bytes")]
    pub max_manifest_bytes: u64,
    /// Size limit of the cache in bytes; least recently used objects are evicted to stay
    /// under it. No limit when unset. YAML takes a number of bytes or a quantity (`10Gi`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::api::quantity::deserialize_opt"
    )]
    pub max_cache_bytes: Option<u64>,
    /// Images never evicted (`docker.io/library/alpine:3.20`, `ghcr.io/org/app@sha256:...`).
    /// They are also prefetched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    /// Images pulled into the cache at start, before anyone asks for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<String>,
    /// Platforms (`linux/amd64`, `linux/arm64/v8`) prefetched from multi-platform images;
    /// empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch_platforms: Vec<String>,
    /// Time allowed to connect to an upstream.
    #[serde(
        default = "default_connect_timeout",
        with = "crate::api::duration::serde"
    )]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream to start answering, and for a blob download to make
    /// progress between two chunks; also the most a small answer (a token, tags/list,
    /// referrers, a manifest) may take to arrive whole.
    #[serde(
        default = "default_upstream_timeout",
        with = "crate::api::duration::serde"
    )]
    pub upstream_timeout: Duration,
    /// The slowest a blob download may arrive, in bytes per second (or a quantity such as
    /// `16Ki`), measured over every `upstreamMinRateWindow`: a body that brings less in
    /// one (a drip, which no timeout between chunks catches) is cut off. 0: no floor.
    #[serde(
        default = "default_upstream_min_rate",
        deserialize_with = "crate::api::quantity::deserialize"
    )]
    pub upstream_min_rate: u64,
    /// The window `upstreamMinRate` is measured over (the first one included).
    #[serde(
        default = "default_upstream_min_rate_window",
        with = "crate::api::duration::serde"
    )]
    pub upstream_min_rate_window: Duration,
    /// The secret `pullthrough cache drop` must show the admin endpoint; created (mode
    /// 0600) with a random token if missing; at least 32 bytes. Default: `admin-token` in
    /// `cacheDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Client connections open at once; more are answered 503 and closed. Also kept
    /// under what the process's file-descriptor limit allows.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a complete request head: from the connection's
    /// opening, and between requests on an HTTP/1 connection kept alive.
    #[serde(
        default = "default_client_header_timeout",
        with = "crate::api::duration::serde"
    )]
    pub client_header_timeout: Duration,
    /// Time a client connection with no request being handled may go without a byte
    /// moving (an idle HTTP/2 connection, a client that stopped reading a blob).
    #[serde(
        default = "default_client_idle_timeout",
        with = "crate::api::duration::serde"
    )]
    pub client_idle_timeout: Duration,
    /// Decisions of `upstreamAuth` upstreams: TTLs, the signing key, plain HTTP.
    #[serde(default, skip_serializing_if = "AccessConfig::is_default")]
    pub access: AccessConfig,
    /// Serve the registry API over HTTPS with this certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// The registry API's certificate: PEM files, as a `kubernetes.io/tls` Secret mounts them
/// (`tls.crt`, `tls.key`); read again when they change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, the server's first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// One mirrored registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name as image references use it (`docker.io`, `ghcr.io`, `registry.local:5000`).
    /// containerd passes it as `?ns=`.
    pub registry: String,
    /// Registry API base URL; defaults to `https://registry-1.docker.io` for docker.io and
    /// `https://<registry>` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Several base URLs instead of `url`, tried in order (a regional mirror first, the
    /// origin last): a URL that cannot be reached or answers 5xx is skipped for 30 s
    /// while the next one answers (`pullthrough_upstream_url_up`). Credentials go to the
    /// last one only (the origin), which also decides who may pull private repositories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Inline credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// A `.dockerconfigjson` file (a mounted `kubernetes.io/dockerconfigjson` Secret) to take
    /// this registry's credentials from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Which repositories may be pulled through.
    #[serde(default, skip_serializing_if = "RepositoryFilter::is_empty")]
    pub repositories: RepositoryFilter,
    /// Who may pull through: see [`AccessMode`]. Default: `upstreamAuth` when the
    /// upstream has credentials, else `open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<UpstreamAccess>,
    /// How hard the proxy may press this upstream (docs/operations.md, "Keeping under
    /// the upstream's limits"). Default: [`UpstreamLimits::for_registry`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<UpstreamLimits>,
}

/// Caps on what the proxy asks of one upstream. Requests over a cap wait for up to
/// `queueTimeout`, then fail with 429 and a `Retry-After`, as do requests while the
/// upstream has asked to wait (429, or 503 with `Retry-After`); cached tags are served
/// stale meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamLimits {
    /// Requests out to the upstream at once, each until its answer's headers arrive.
    /// Default: 32 for docker.io, 64 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Manifest GETs sent per second (what Docker Hub counts as pulls; HEADs are not
    /// capped), with a burst of as many; 0: no cap. Default: 10 for docker.io, no cap
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_gets_per_second: Option<u32>,
    /// How long a request over a cap waits before it fails.
    #[serde(
        default = "default_queue_timeout",
        with = "crate::api::duration::serde"
    )]
    pub queue_timeout: Duration,
    /// How long the upstream is left alone after a 429 without `Retry-After`.
    #[serde(default = "default_backoff", with = "crate::api::duration::serde")]
    pub backoff: Duration,
    /// The longest `Retry-After` honoured.
    #[serde(default = "default_max_backoff", with = "crate::api::duration::serde")]
    pub max_backoff: Duration,
}

impl UpstreamLimits {
    /// The defaults for `registry`: Docker Hub's stricter.
    pub fn for_registry(registry: &str) -> UpstreamLimits {
        let hub = docker_hub::is_alias(registry);
        UpstreamLimits {
            max_concurrent_requests: Some(if hub { 32 } else { 64 }),
            manifest_gets_per_second: Some(if hub { 10 } else { 0 }),
            queue_timeout: default_queue_timeout(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(600)
}

/// Who may pull an upstream's repositories through the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AccessMode {
    /// Anyone who reaches the proxy: what the proxy's own credentials fetch is served to
    /// every client.
    Open,
    /// A repository the upstream serves anonymously is served to anyone; any other only
    /// to a client whose own credentials the upstream accepts for it (a 401 challenge,
    /// then the proxy's token endpoint checks them with the upstream).
    UpstreamAuth,
}

/// An upstream's access setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamAccess {
    /// `open` or `upstreamAuth`.
    pub mode: AccessMode,
}

/// How `upstreamAuth` upstreams decide and remember who may pull (docs/proxy.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessConfig {
    /// The key the replicas share (a mounted Secret): it signs the proxy's tokens, keys
    /// its decision cache and proves the replicas' requests to each other. Default:
    /// `access-signing-key` in `cacheDir`, created (0600) if missing; replicas (`peers`)
    /// must set one they share. At least 32 bytes (`openssl rand -hex 32`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// How long the upstream's yes to a client's credentials is trusted: the delay
    /// before a revoked client loses access through the cache.
    #[serde(
        rename = "allowedTTL",
        default = "default_allowed_ttl",
        with = "crate::api::duration::serde"
    )]
    pub allowed_ttl: Duration,
    /// How long the upstream's no is remembered before the same credentials are checked
    /// again.
    #[serde(
        rename = "deniedTTL",
        default = "default_denied_ttl",
        with = "crate::api::duration::serde"
    )]
    pub denied_ttl: Duration,
    /// How long a repository is known to be public (or not) before it is probed again.
    #[serde(
        rename = "publicTTL",
        default = "default_public_ttl",
        with = "crate::api::duration::serde"
    )]
    pub public_ttl: Duration,
    /// Lifetime of a token the proxy issues (never past its decision's `allowedTTL`).
    #[serde(
        rename = "tokenTTL",
        default = "default_token_ttl",
        with = "crate::api::duration::serde"
    )]
    pub token_ttl: Duration,
    /// Failed credential checks allowed per user name, client address and upstream in
    /// `deniedTTL`; more are refused (429) without asking the upstream (but for
    /// credentials the upstream accepted before).
    #[serde(default = "default_failed_checks")]
    pub max_failed_checks: u32,
    /// Failed credential checks allowed per client address and upstream in `deniedTTL`,
    /// whatever the user names; more are refused (429) without asking the upstream (but
    /// for credentials the upstream accepted before).
    #[serde(default = "default_failed_checks_per_client")]
    pub max_failed_checks_per_client: u32,
    /// Challenge clients over plain HTTP: their credentials then cross the network in
    /// clear. Required for `upstreamAuth` on a proxy without `tls`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            signing_key_file: None,
            allowed_ttl: default_allowed_ttl(),
            denied_ttl: default_denied_ttl(),
            public_ttl: default_public_ttl(),
            token_ttl: default_token_ttl(),
            max_failed_checks: default_failed_checks(),
            max_failed_checks_per_client: default_failed_checks_per_client(),
            plain_http: false,
        }
    }
}

impl AccessConfig {
    /// Every field at its default.
    pub fn is_default(&self) -> bool {
        *self == AccessConfig::default()
    }
}

/// The signing key's file name in the cache directory, by default.
pub const SIGNING_KEY_FILE: &str = "access-signing-key";

/// Where the cache keeps its objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageConfig {
    /// An S3-compatible bucket (AWS S3, GCS's S3 API, Ceph RGW, MinIO) instead of the
    /// local disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
}

impl StorageConfig {
    /// The local disk.
    pub fn is_local(&self) -> bool {
        self.s3.is_none()
    }
}

/// An S3-compatible bucket. Credentials come from the environment, as the AWS tools take
/// them (`AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, web identity, instance
/// metadata), never from this file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Config {
    /// The bucket (it must exist).
    pub bucket: String,
    /// Key prefix of every object (`mirrors/docker-hub`); none by default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Endpoint URL of a store other than AWS (`http://rgw.ceph:7480`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region; from `AWS_REGION` or `us-east-1` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted ones
    /// (`bucket.endpoint/key`); by default on with an `endpoint`, off without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Cached blobs are not sent through the proxy but by a redirect (307) to a URL of the
    /// bucket signed for 10 minutes: the bytes go straight from the store to the client
    /// (containerd follows it, and sends its registry credentials only to the registry).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect: bool,
    /// Age after which the multipart upload of a replica that died is aborted (at a
    /// replica's start): longer than any download takes.
    #[serde(
        default = "default_abandon_uploads_after",
        with = "crate::api::duration::serde"
    )]
    pub abandon_uploads_after: Duration,
    /// How the replicas keep the bucket under `maxCacheBytes` (with a limit only).
    #[serde(default, skip_serializing_if = "EvictionConfig::is_default")]
    pub eviction: EvictionConfig,
}

/// How long a URL of the bucket handed to a client for a blob (`redirect`) is valid.
pub const REDIRECT_EXPIRY: Duration = Duration::from_secs(600);

/// How the replicas that share a bucket keep it under `maxCacheBytes`: each records what
/// it uses, one (elected on a Kubernetes Lease) evicts the least recently used objects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvictionConfig {
    /// The Kubernetes Lease the replicas elect the evicting one on (needed with
    /// `peers`); without one, this process evicts alone. The API server is found as
    /// kubectl finds it (in a pod: its service account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The Lease's namespace; by default `POD_NAMESPACE`, else the client's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_namespace: Option<String>,
    /// How often the evicting replica lists the bucket, deletes what it marked in the
    /// round before (if unused since) and marks what is over the limit.
    #[serde(default = "default_evict_every", with = "crate::api::duration::serde")]
    pub every: Duration,
    /// How often each replica writes what it used (and is reading) to an access record.
    #[serde(default = "default_record_every", with = "crate::api::duration::serde")]
    pub record_every: Duration,
    /// Objects used more recently than this are never evicted: longer than the signed
    /// URLs of `redirect` live (10 minutes).
    #[serde(default = "default_evict_grace", with = "crate::api::duration::serde")]
    pub grace: Duration,
}

impl Default for EvictionConfig {
    fn default() -> EvictionConfig {
        EvictionConfig {
            lease: None,
            lease_namespace: None,
            every: default_evict_every(),
            record_every: default_record_every(),
            grace: default_evict_grace(),
        }
    }
}

impl EvictionConfig {
    fn is_default(&self) -> bool {
        *self == EvictionConfig::default()
    }
}

fn default_evict_every() -> Duration {
    Duration::from_secs(60)
}

fn default_record_every() -> Duration {
    Duration::from_secs(20)
}

fn default_evict_grace() -> Duration {
    Duration::from_secs(15 * 60)
}

impl S3Config {
    /// Whether requests are path-style.
    pub fn path_style(&self) -> bool {
        self.path_style.unwrap_or(self.endpoint.is_some())
    }
}

/// How long after it began a multipart upload is taken for abandoned, by default.
pub fn default_abandon_uploads_after() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// How a replica finds the others (a fixed list, or a DNS name: a headless Service).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeersConfig {
    /// The replicas' registry API addresses (`IP:PORT`), this one's among them or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// A name whose addresses are the ready replicas (the headless Service the controller
    /// makes), each at `listen`'s port; looked up every 5 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// This replica's address as the others reach it; by default the `POD_IP`
    /// environment variable with `listen`'s port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_address: Option<SocketAddr>,
}

/// Username and password (or token) for an upstream.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// For Basic auth, and for token requests when the registry asks for a token.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Allow/deny globs over repository names (`*` matches any run of characters, `/` too).
/// Deny wins; an empty allow list allows everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepositoryFilter {
    /// Globs of repositories that may be pulled; empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Globs of repositories that may not be pulled; wins over allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl RepositoryFilter {
    /// No rules at all.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether `repository` may be pulled.
    pub fn permits(&self, repository: &str) -> bool {
        if self.deny.iter().any(|g| glob_match(g, repository)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|g| glob_match(g, repository))
    }
}

/// Glob match where `*` matches any (possibly empty) run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `limits.maxConcurrentRequests: 0`: nothing could ever be fetched.
    #[error(
        "upstream {0:?}: limits.maxConcurrentRequests must be at least 1 (leave it out for the default)"
    )]
    NoConcurrency(String),
    /// No upstream at all.
    #[error("at least one upstream registry is required")]
    NoUpstreams,
    /// The same registry twice.
    #[error("upstream registry {0:?} is configured twice")]
    DuplicateRegistry(String),
    /// Registry host name that cannot be one.
    #[error(
        "upstream registry {0:?} is not a host name (expected e.g. docker.io or registry.local:5000)"
    )]
    BadRegistry(String),
    /// URL that is not http(s)://host[:port][/path].
    #[error("upstream {registry:?} has invalid url {url:?}: expected http(s)://host[:port]")]
    BadUrl {
        /// The upstream, as configured.
        registry: String,
        /// The offending URL.
        url: String,
    },
    /// A URL at an address the proxy never connects to.
    #[error(
        "upstream {registry:?} has url {url:?}, a link-local address (where clouds serve \
         instance metadata), which the proxy never connects to"
    )]
    LinkLocalUrl {
        /// The upstream, as configured.
        registry: String,
        /// The URL.
        url: String,
    },
    /// Both `url` and `urls`.
    #[error("upstream {0:?} sets both url and urls; list every URL in urls")]
    UrlAndUrls(String),
    /// Both inline credentials and a credentials file.
    #[error("upstream {0:?} sets both credentials and credentialsFile; use one")]
    TwoCredentialSources(String),
    /// defaultUpstream names no configured upstream.
    #[error("defaultUpstream {0:?} is not one of the configured upstreams")]
    UnknownDefault(String),
    /// Manifest cap of zero.
    #[error("maxManifestBytes must be greater than zero")]
    ZeroManifestCap,
    /// A connection limit or client timeout of zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Cache size limit of zero.
    #[error(
        "maxCacheBytes (--max-cache-size) must be greater than zero; leave it out for no limit"
    )]
    ZeroCacheLimit,
    /// Peers set up in a way that cannot work.
    #[error("peers: {0}")]
    BadPeers(&'static str),
    /// An S3 bucket setting that cannot work.
    #[error("storage.s3: {0}")]
    BadS3(&'static str),
    /// The registry API and the operations endpoint on one port.
    #[error("listen ({0}) and metricsListen ({1}) use the same port; give them different ones")]
    ListenClash(SocketAddr, SocketAddr),
    /// Challenges, and so client credentials, over plain HTTP without the opt-in.
    #[error(
        "upstream {0:?} is in access mode upstreamAuth (the default with credentials): clients \
         are challenged for their own credentials, which would cross the network in clear; \
         serve TLS (tls.certFile and tls.keyFile), set access.plainHttp: true to accept \
         that, or set access.mode: open on the upstream to serve what its credentials \
         fetch to anyone"
    )]
    ChallengesInClear(String),
    /// A pin or prefetch entry that is not an image reference.
    #[error(transparent)]
    BadImage(#[from] super::image_ref::ImageRefError),
    /// A pin or prefetch entry for a registry this proxy does not mirror.
    #[error("{list} entry {image:?} is on {registry}, which is not one of the upstreams")]
    ImageNotMirrored {
        /// `pin` or `prefetch`.
        list: &'static str,
        /// The entry.
        image: String,
        /// The registry the entry names, which no upstream serves.
        registry: String,
    },
}

impl ProxyConfig {
    /// Parses YAML; missing fields take their defaults.
    pub fn from_yaml(text: &str) -> Result<ProxyConfig, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(ProxyConfig::default());
        }
        serde_yaml::from_str(text)
    }

    /// YAML text of this configuration.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serializes")
    }

    /// This configuration with inline passwords replaced, for showing to people.
    pub fn redacted(&self) -> ProxyConfig {
        let mut shown = self.clone();
        for u in &mut shown.upstreams {
            if let Some(c) = &mut u.credentials {
                c.password = "<redacted>".to_string();
            }
        }
        shown
    }

    /// Checks everything serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::NoUpstreams);
        }
        let mut seen = HashSet::new();
        for u in &self.upstreams {
            let key = docker_hub::registry_key(&u.registry);
            if !valid_registry_host(&key) {
                return Err(ConfigError::BadRegistry(u.registry.clone()));
            }
            if !seen.insert(key) {
                return Err(ConfigError::DuplicateRegistry(u.registry.clone()));
            }
            if u.credentials.is_some() && u.credentials_file.is_some() {
                return Err(ConfigError::TwoCredentialSources(u.registry.clone()));
            }
            if u.limits().max_concurrent_requests == Some(0) {
                return Err(ConfigError::NoConcurrency(u.registry.clone()));
            }
            if u.url.is_some() && !u.urls.is_empty() {
                return Err(ConfigError::UrlAndUrls(u.registry.clone()));
            }
            for url in u.base_urls() {
                if split_url(&url).is_none() {
                    return Err(ConfigError::BadUrl {
                        registry: u.registry.clone(),
                        url: without_userinfo(&url),
                    });
                }
            }
        }
        if let Some(d) = &self.default_upstream
            && !self
                .upstreams
                .iter()
                .any(|u| u.registry.eq_ignore_ascii_case(d))
        {
            return Err(ConfigError::UnknownDefault(d.clone()));
        }
        if self.max_manifest_bytes == 0 {
            return Err(ConfigError::ZeroManifestCap);
        }
        if self.max_cache_bytes == Some(0) {
            return Err(ConfigError::ZeroCacheLimit);
        }
        if let Some(s3) = &self.storage.s3 {
            if s3.bucket.is_empty() {
                return Err(ConfigError::BadS3("bucket is required"));
            }
            if s3
                .endpoint
                .as_deref()
                .is_some_and(|e| split_url(e).is_none())
            {
                return Err(ConfigError::BadS3(
                    "endpoint must be an http(s)://host[:port] URL",
                ));
            }
            let ev = &s3.eviction;
            if self.max_cache_bytes.is_some() && self.peers.is_some() && ev.lease.is_none() {
                return Err(ConfigError::BadS3(
                    "maxCacheBytes with peers needs eviction.lease: the replicas elect the one that evicts on it",
                ));
            }
            if ev.every < ev.record_every * 2 {
                return Err(ConfigError::BadS3(
                    "eviction.every must be at least twice eviction.recordEvery (a use is recorded before what it reads is deleted)",
                ));
            }
            if s3.redirect && ev.grace < REDIRECT_EXPIRY {
                return Err(ConfigError::BadS3(
                    "eviction.grace must be at least 10m with redirect (the life of a signed URL)",
                ));
            }
        }
        let eviction = self.storage.s3.as_ref().map(|s| &s.eviction);
        for (zero, name) in [
            (self.max_connections == 0, "maxConnections"),
            (
                eviction.is_some_and(|e| e.every.is_zero()),
                "storage.s3.eviction.every",
            ),
            (
                eviction.is_some_and(|e| e.record_every.is_zero()),
                "storage.s3.eviction.recordEvery",
            ),
            (self.client_header_timeout.is_zero(), "clientHeaderTimeout"),
            (self.client_idle_timeout.is_zero(), "clientIdleTimeout"),
            (self.upstream_timeout.is_zero(), "upstreamTimeout"),
            (
                self.upstream_min_rate_window.is_zero(),
                "upstreamMinRateWindow",
            ),
            (self.connect_timeout.is_zero(), "connectTimeout"),
            (self.access.allowed_ttl.is_zero(), "access.allowedTTL"),
            (self.access.denied_ttl.is_zero(), "access.deniedTTL"),
            (self.access.public_ttl.is_zero(), "access.publicTTL"),
            (self.access.token_ttl.is_zero(), "access.tokenTTL"),
            (self.access.max_failed_checks == 0, "access.maxFailedChecks"),
            (
                self.access.max_failed_checks_per_client == 0,
                "access.maxFailedChecksPerClient",
            ),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        let guarded = self
            .upstreams
            .iter()
            .find(|u| u.access_mode() == AccessMode::UpstreamAuth);
        if let Some(u) = guarded
            && self.tls.is_none()
            && !self.access.plain_http
        {
            return Err(ConfigError::ChallengesInClear(u.registry.clone()));
        }
        if let Some(p) = &self.peers {
            if self.access.signing_key_file.is_none() {
                return Err(ConfigError::BadPeers(
                    "replicas prove their requests to each other (and verify each other's tokens) with a key they share: set access.signingKeyFile to a file they share (a Secret)",
                ));
            }
            if self.storage.s3.is_none() {
                return Err(ConfigError::BadPeers(
                    "replicas share a bucket: set storage.s3 too",
                ));
            }
            if p.addresses.is_empty() && p.dns.is_none() {
                return Err(ConfigError::BadPeers("give addresses or dns"));
            }
        }
        if listeners_clash(self.listen, self.metrics_listen) {
            return Err(ConfigError::ListenClash(self.listen, self.metrics_listen));
        }
        for (list, images) in [("pin", &self.pin), ("prefetch", &self.prefetch)] {
            for image in images {
                let r = super::image_ref::parse(image).map_err(ConfigError::BadImage)?;
                let mirrored = self.upstreams.iter().any(|u| {
                    let key = u.registry.to_ascii_lowercase();
                    key == r.registry
                        || (docker_hub::is_alias(&key) && docker_hub::is_alias(&r.registry))
                });
                if !mirrored {
                    return Err(ConfigError::ImageNotMirrored {
                        list,
                        image: image.clone(),
                        registry: r.registry,
                    });
                }
            }
        }
        Ok(())
    }

    /// Where the admin token is kept.
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.cache_dir.join(ADMIN_TOKEN_FILE))
    }

    /// Where the key that signs access tokens is kept.
    pub fn signing_key_path(&self) -> PathBuf {
        self.access
            .signing_key_file
            .clone()
            .unwrap_or_else(|| self.cache_dir.join(SIGNING_KEY_FILE))
    }

    /// The floor of blob downloads (`upstreamMinRate` over `upstreamMinRateWindow`).
    pub fn upstream_min_rate(&self) -> crate::proxy::upstream::MinRate {
        crate::proxy::upstream::MinRate {
            bytes_per_second: self.upstream_min_rate,
            window: self.upstream_min_rate_window,
        }
    }

    /// The registry used when a request has no `?ns=`.
    pub fn default_registry(&self) -> Option<&str> {
        self.default_upstream
            .as_deref()
            .or_else(|| self.upstreams.first().map(|u| u.registry.as_str()))
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: default_listen(),
            metrics_listen: default_metrics_listen(),
            cache_dir: default_cache_dir(),
            storage: StorageConfig::default(),
            peers: None,
            upstreams: default_upstreams(),
            default_upstream: None,
            tag_ttl: default_tag_ttl(),
            stale_if_error: default_stale_if_error(),
            tags_list_ttl: default_tags_list_ttl(),
            max_manifest_bytes: default_max_manifest_bytes(),
            max_cache_bytes: None,
            pin: Vec::new(),
            prefetch: Vec::new(),
            prefetch_platforms: Vec::new(),
            connect_timeout: default_connect_timeout(),
            upstream_timeout: default_upstream_timeout(),
            upstream_min_rate: default_upstream_min_rate(),
            upstream_min_rate_window: default_upstream_min_rate_window(),
            admin_token_file: None,
            max_connections: default_max_connections(),
            client_header_timeout: default_client_header_timeout(),
            client_idle_timeout: default_client_idle_timeout(),
            access: AccessConfig::default(),
            tls: None,
        }
    }
}

impl UpstreamConfig {
    /// An upstream with its default URL and no credentials or filters.
    pub fn new(registry: &str) -> UpstreamConfig {
        UpstreamConfig {
            registry: registry.to_string(),
            url: None,
            urls: Vec::new(),
            credentials: None,
            credentials_file: None,
            repositories: RepositoryFilter::default(),
            access: None,
            limits: None,
        }
    }

    /// The caps on requests to this upstream: as set, the registry's defaults for what
    /// is not.
    pub fn limits(&self) -> UpstreamLimits {
        let d = UpstreamLimits::for_registry(&self.registry);
        match &self.limits {
            None => d,
            Some(l) => UpstreamLimits {
                max_concurrent_requests: l.max_concurrent_requests.or(d.max_concurrent_requests),
                manifest_gets_per_second: l.manifest_gets_per_second.or(d.manifest_gets_per_second),
                ..l.clone()
            },
        }
    }

    /// Who may pull through this upstream: as set, else `upstreamAuth` when it has
    /// credentials (what they reach is not for everyone), else `open`.
    pub fn access_mode(&self) -> AccessMode {
        match &self.access {
            Some(a) => a.mode,
            None if self.credentials.is_some() || self.credentials_file.is_some() => {
                AccessMode::UpstreamAuth
            }
            None => AccessMode::Open,
        }
    }

    /// The registry API base URL, without a trailing slash.
    pub fn base_url(&self) -> String {
        if let Some(first) = self.urls.first() {
            return first.trim_end_matches('/').to_string();
        }
        let url = match &self.url {
            Some(u) => u.clone(),
            None if self.is_docker_hub() => docker_hub::API_URL.to_string(),
            None => format!("https://{}", self.registry),
        };
        url.trim_end_matches('/').to_string()
    }

    /// Every base URL to try, in order, without trailing slashes: `urls`, or else the
    /// one [`Self::base_url`].
    pub fn base_urls(&self) -> Vec<String> {
        if self.urls.is_empty() {
            return vec![self.base_url()];
        }
        self.urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect()
    }

    /// Whether Docker Hub's naming rules apply (`library/` for single-name images).
    pub fn is_docker_hub(&self) -> bool {
        docker_hub::is_alias(&self.registry)
    }
}

/// A listen address: `IP:PORT` (`0.0.0.0:5000`, `[::]:5000`), `:PORT` for every
/// interface, or `localhost:PORT` for the IPv4 loopback. Other host names are refused
/// rather than looked up: an address to bind must not depend on DNS.
pub fn parse_listen(text: &str) -> Result<SocketAddr, ListenError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| ListenError::NotAnAddress(text.to_string()))?;
    let port: u16 = port.parse().map_err(|_| ListenError::BadPort {
        text: text.to_string(),
        port: port.to_string(),
    })?;
    match host {
        "" => Ok(([0, 0, 0, 0], port).into()),
        h if h.eq_ignore_ascii_case("localhost") => Ok(([127, 0, 0, 1], port).into()),
        h => Err(ListenError::HostName {
            text: text.to_string(),
            host: h.to_string(),
            port,
        }),
    }
}

/// Why a text is not a listen address (see [`parse_listen`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// No port at all.
    #[error("{0:?} is not an address: expected IP:PORT, e.g. 0.0.0.0:5000")]
    NotAnAddress(String),
    /// The port is not a number from 0 to 65535.
    #[error("{text:?}: {port:?} is not a port number")]
    BadPort {
        /// The address.
        text: String,
        /// Its port part.
        port: String,
    },
    /// A host name, which would need DNS to bind.
    #[error(
        "{text:?}: {host:?} is a host name, which is not accepted; use an IP address \
         (127.0.0.1:{port} for this machine only, 0.0.0.0:{port} for every interface)"
    )]
    HostName {
        /// The address.
        text: String,
        /// Its host part.
        host: String,
        /// Its port, for the addresses suggested instead.
        port: u16,
    },
}

fn listen_serde<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// Whether two listeners would fight over one port (port 0 asks for a free one).
fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn valid_registry_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Splits `http(s)://authority[/path]` into scheme, authority and path prefix.
/// `url` as an error may show it: a `user:password@` in it (not accepted, but written by
/// mistake) replaced, so that a password never reaches a log or a terminal.
pub fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((_, host)) if scheme.is_empty() => format!("<redacted>@{host}{tail}"),
        Some((_, host)) => format!("{scheme}://<redacted>@{host}{tail}"),
        None => url.to_string(),
    }
}

pub fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return None;
    }
    Some((scheme, authority, path.trim_end_matches('/')))
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:5000".parse().expect("valid")
}
fn default_metrics_listen() -> SocketAddr {
    "0.0.0.0:9095".parse().expect("valid")
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("pullthrough-cache")
}
fn default_upstreams() -> Vec<UpstreamConfig> {
    vec![UpstreamConfig::new(docker_hub::REGISTRY)]
}
fn default_tag_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_stale_if_error() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_tags_list_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_max_manifest_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_allowed_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_denied_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_public_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_failed_checks() -> u32 {
    10
}
fn default_upstream_min_rate() -> u64 {
    16 << 10
}
fn default_upstream_min_rate_window() -> Duration {
    Duration::from_secs(10)
}
fn default_failed_checks_per_client() -> u32 {
    30
}
fn default_max_connections() -> usize {
    4096
}
fn default_client_header_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_client_idle_timeout() -> Duration {
    Duration::from_secs(120)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_a_docker_hub_cache() {
        let c = ProxyConfig::from_yaml("").unwrap();
        assert_eq!(c, ProxyConfig::default());
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.default_registry(), Some("docker.io"));
        assert_eq!(c.upstreams[0].base_url(), docker_hub::API_URL);
    }

    #[test]
    fn yaml_round_trip() {
        let text = r#"
listen: 127.0.0.1:5555
upstreams:
  - registry: ghcr.io
  - registry: registry.local:5000
    url: http://10.0.0.1:5000/
    credentials: { username: u, password: p }
    repositories: { allow: ["team/*"], deny: ["team/secret"] }
defaultUpstream: registry.local:5000
tagTTL: 1m
staleIfError: 2h
access: { plainHttp: true, deniedTTL: 10s }
"#;
        // A misspelt field must be reported, not silently ignored.
        assert!(ProxyConfig::from_yaml(&text.replace("tagTTL", "tagTtl")).is_err());
        let c = ProxyConfig::from_yaml(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.access.denied_ttl, Duration::from_secs(10));
        assert_eq!(c.upstreams[1].access_mode(), AccessMode::UpstreamAuth);
        assert_eq!(c.upstreams[0].access_mode(), AccessMode::Open);
        assert_eq!(c.upstreams[1].base_url(), "http://10.0.0.1:5000");
        assert_eq!(c.upstreams[0].base_url(), "https://ghcr.io");
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
        assert!(!format!("{:?}", c).contains("password: \"p\""));
    }

    #[test]
    fn invalid_configs_are_explained() {
        let mut c = ProxyConfig::default();
        c.upstreams.push(UpstreamConfig::new("DOCKER.IO"));
        assert_eq!(
            c.validate(),
            Err(ConfigError::DuplicateRegistry("DOCKER.IO".into()))
        );
        let mut c = ProxyConfig::default();
        c.upstreams[0].url = Some("ftp://x".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadUrl { .. })));
        // A password written into a URL is never shown.
        c.upstreams[0].url = Some("https://me:s3cret@reg.example:5000/v2".into());
        let shown = c.validate().unwrap_err().to_string();
        assert!(
            !shown.contains("s3cret") && !shown.contains("me:"),
            "{shown}"
        );
        assert!(
            shown.contains("https://<redacted>@reg.example:5000/v2"),
            "{shown}"
        );
        assert_eq!(
            without_userinfo("http://a@b@c/d?x@y"),
            "http://<redacted>@c/d?x@y"
        );
        assert_eq!(without_userinfo("http://host/p"), "http://host/p");
        let c = ProxyConfig {
            default_upstream: Some("quay.io".into()),
            ..ProxyConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::UnknownDefault(_))));
        let c = ProxyConfig {
            upstreams: vec![],
            ..ProxyConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::NoUpstreams));
        let mut c = ProxyConfig::default();
        c.upstreams[0].registry = "bad host/x".into();
        assert!(matches!(c.validate(), Err(ConfigError::BadRegistry(_))));
        let c = ProxyConfig {
            pin: vec!["alpine:3.20".into()],
            prefetch: vec!["ghcr.io/org/app:1".into()],
            ..ProxyConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ImageNotMirrored {
                list: "prefetch",
                ..
            })
        ));
        let c = ProxyConfig {
            pin: vec!["Not/Valid".into()],
            ..ProxyConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::BadImage(_))));
    }

    #[test]
    fn cache_limits_take_quantities_and_refuse_zero() {
        let c = ProxyConfig::from_yaml("maxCacheBytes: 10Gi").unwrap();
        assert_eq!(c.max_cache_bytes, Some(10 << 30));
        let c = ProxyConfig::from_yaml("maxCacheBytes: 1048576").unwrap();
        assert_eq!(c.max_cache_bytes, Some(1 << 20));
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml()).unwrap(), c);
        let err = ProxyConfig::from_yaml("maxCacheBytes: ten").unwrap_err();
        assert!(err.to_string().contains("storage quantity"), "{err}");
        assert!(ProxyConfig::from_yaml("maxCacheBytes: -1").is_err());
        let c = ProxyConfig::from_yaml("maxCacheBytes: 0").unwrap();
        assert_eq!(c.validate(), Err(ConfigError::ZeroCacheLimit));
    }

    #[test]
    fn a_shared_bucket_with_a_limit_elects_its_evictor() {
        let base = "maxCacheBytes: 1Gi\nstorage: {s3: {bucket: b, endpoint: 'http://s3:7480'";
        let cfg = |rest: &str| ProxyConfig::from_yaml(&format!("{base}{rest}")).unwrap();
        let alone = cfg("}}");
        assert_eq!(alone.validate(), Ok(()), "one process evicts alone");
        let ev = &alone.storage.s3.as_ref().unwrap().eviction;
        assert_eq!(
            (ev.every, ev.record_every, ev.grace.as_secs()),
            (Duration::from_secs(60), Duration::from_secs(20), 900)
        );
        let err = |c: ProxyConfig| c.validate().unwrap_err().to_string();
        // Replicas prove their requests to each other with a key they share.
        let keyless = err(cfg(
            ", eviction: {lease: m-evictor}}}\npeers: {dns: p.ns.svc}",
        ));
        assert!(keyless.contains("access.signingKeyFile"), "{keyless}");
        let peers = "}}\npeers: {dns: p.ns.svc}\naccess: {signingKeyFile: /key/k}";
        assert!(err(cfg(peers)).contains("eviction.lease"));
        let leased = cfg(&format!(
            ", eviction: {{lease: m-evictor, every: 10s, recordEvery: 5s}}{peers}"
        ));
        assert_eq!(leased.validate(), Ok(()));
        assert_eq!(ProxyConfig::from_yaml(&leased.to_yaml()).unwrap(), leased);
        assert!(err(cfg(", eviction: {every: 10s, recordEvery: 6s}}}")).contains("twice"));
        assert!(err(cfg(", redirect: true, eviction: {grace: 5m}}}")).contains("10m"));
        assert_eq!(cfg(", redirect: true}}").validate(), Ok(()));
    }

    #[test]
    fn listen_addresses() {
        let ok = |s: &str| parse_listen(s).unwrap().to_string();
        assert_eq!(ok("0.0.0.0:5000"), "0.0.0.0:5000");
        assert_eq!(ok("[::1]:5000"), "[::1]:5000");
        assert_eq!(ok("localhost:5000"), "127.0.0.1:5000");
        assert_eq!(ok(":5000"), "0.0.0.0:5000");
        let err = parse_listen("registry.local:5000").unwrap_err().to_string();
        assert!(err.contains("host name, which is not accepted"), "{err}");
        assert!(parse_listen("5000").is_err());
        assert!(parse_listen("localhost:http").is_err());
        let c = ProxyConfig::from_yaml("listen: localhost:5001").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5001");

        // The two listeners on one port clash, unless each asks for a free port.
        let clash = |a: &str, b: &str| {
            let c = ProxyConfig {
                listen: parse_listen(a).unwrap(),
                metrics_listen: parse_listen(b).unwrap(),
                ..ProxyConfig::default()
            };
            matches!(c.validate(), Err(ConfigError::ListenClash(..)))
        };
        assert!(clash("0.0.0.0:5000", "0.0.0.0:5000"));
        assert!(clash("127.0.0.1:5000", "0.0.0.0:5000"));
        assert!(!clash("127.0.0.1:5000", "127.0.0.2:5000"));
        assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
        assert!(!clash("0.0.0.0:5000", "0.0.0.0:9095"));
    }

    #[test]
    fn globs() {
        let f = RepositoryFilter {
            allow: vec!["library/*".into(), "bitnami/*".into()],
            deny: vec!["library/bad*".into()],
        };
        assert!(f.permits("library/alpine"));
        assert!(f.permits("bitnami/redis/x"));
        assert!(!f.permits("library/badger"));
        assert!(!f.permits("other/thing"));
        assert!(RepositoryFilter::default().permits("anything"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b", "aXXc"));
    }
}

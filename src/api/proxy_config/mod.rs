//! The proxy's configuration: read by `pullthrough proxy` from YAML, written by the
//! controller into the ConfigMap it owns. Every field has a default (each struct's one
//! `Default`), so an empty file (or no file) is a working docker.io cache on port 5000.
//! This file holds the top level and the checks across parts; one file per part beside
//! it: [`upstream`] (a mirrored registry), [`storage`] (the disk or a bucket, replicas),
//! [`access`] (`upstreamAuth`'s decisions), [`listen`] (addresses, the certificate).

mod access;
mod listen;
mod storage;
#[cfg(test)]
mod tests;
mod upstream;

pub use access::{AccessConfig, SIGNING_KEY_FILE};
pub use listen::{ListenError, TlsConfig, parse_listen};
pub use storage::{
    DEFAULT_LOCAL_COPIES, EvictionConfig, PeersConfig, REDIRECT_EXPIRY, S3Config, StorageConfig,
};
pub use upstream::{
    AccessMode, Credentials, RepositoryFilter, TagPolicy, TagPolicyKind, UpstreamAccess,
    UpstreamConfig, UpstreamLimits, UpstreamMode, glob_match, split_url, without_userinfo,
};

use super::docker_hub;
use listen::{listen_serde, listeners_clash};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

/// The admin token's file name in the cache directory, by default.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Configuration of one `pullthrough proxy` process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address of the registry API (see [`parse_listen`] for the forms accepted).
    #[serde(deserialize_with = "listen_serde")]
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[serde(deserialize_with = "listen_serde")]
    pub metrics_listen: SocketAddr,
    /// Directory holding the cache (created if missing).
    pub cache_dir: PathBuf,
    /// Where the objects are kept: `cacheDir` on the local disk (the default), or an
    /// S3-compatible bucket that replicas share (`cacheDir` then spools downloads and keeps local copies).
    #[serde(skip_serializing_if = "StorageConfig::is_local")]
    pub storage: StorageConfig,
    /// The other replicas that share the bucket: a blob missing from it is asked of the
    /// replica that owns it, so that the fleet fetches it from the upstream once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    /// Registries this proxy mirrors. Requests for any other registry are refused.
    pub upstreams: Vec<UpstreamConfig>,
    /// Registry served to clients that do not say which one they want (no `?ns=`);
    /// defaults to the first upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_upstream: Option<String>,
    /// How long a tag maps to the digest last seen before it is revalidated upstream.
    #[serde(rename = "tagTTL", with = "crate::api::duration::serde")]
    pub tag_ttl: Duration,
    /// How long past its TTL a tag is still served when the upstream is down or failing.
    #[serde(with = "crate::api::duration::serde")]
    pub stale_if_error: Duration,
    /// Whether and when the upstreams are asked (`online`, `localFirst`, `offline`):
    /// each upstream's own `mode` where it sets one.
    #[serde(skip_serializing_if = "is_online")]
    pub mode: UpstreamMode,
    /// How long a tags/list answer is reused.
    #[serde(rename = "tagsListTTL", with = "crate::api::duration::serde")]
    pub tags_list_ttl: Duration,
    /// Largest manifest accepted from an upstream, in bytes.
    pub max_manifest_bytes: NonZeroU64,
    /// Size limit of the cache in bytes; least recently used objects are evicted to stay
    /// under it. No limit when unset. YAML takes a number of bytes or a quantity (`10Gi`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::api::quantity::deserialize_opt"
    )]
    pub max_cache_bytes: Option<u64>,
    /// Images never evicted (`docker.io/library/alpine:3.20`, `ghcr.io/org/app@sha256:...`).
    /// They are also prefetched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    /// Images pulled into the cache at start, before anyone asks for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<String>,
    /// Platforms (`linux/amd64`, `linux/arm64/v8`) prefetched from multi-platform images;
    /// empty means all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefetch_platforms: Vec<String>,
    /// A bundle the cache is seeded from when it first starts (docs/operations.md, "An
    /// air-gapped cluster"): an OCI image layout directory or tar on a path, a tar at an
    /// `http(s)://` URL, or a tar in the cache's own bucket (`s3://<bucket>/<key>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// Time allowed to connect to an upstream.
    #[serde(with = "crate::api::duration::serde")]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream to start answering, and for a blob download to make
    /// progress between two chunks; also the most a small answer (a token, tags/list,
    /// referrers, a manifest) may take to arrive whole.
    #[serde(with = "crate::api::duration::serde")]
    pub upstream_timeout: Duration,
    /// The slowest a blob download may arrive, in bytes per second (or a quantity such as
    /// `16Ki`), measured over every `upstreamMinRateWindow`: a body that brings less in
    /// one (a drip, which no timeout between chunks catches) is cut off. 0: no floor.
    #[serde(deserialize_with = "crate::api::quantity::deserialize")]
    pub upstream_min_rate: u64,
    /// The window `upstreamMinRate` is measured over (the first one included).
    #[serde(with = "crate::api::duration::serde")]
    pub upstream_min_rate_window: Duration,
    /// The secret `pullthrough cache drop` must show the admin endpoint; created (mode
    /// 0600) with a random token if missing; at least 32 bytes. Default: `admin-token` in
    /// `cacheDir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Client connections open at once; more are answered 503 and closed. Also kept
    /// under what the process's file-descriptor limit allows.
    pub max_connections: NonZeroUsize,
    /// Time a client has to send a complete request head: from the connection's
    /// opening, and between requests on an HTTP/1 connection kept alive.
    #[serde(with = "crate::api::duration::serde")]
    pub client_header_timeout: Duration,
    /// Time a client connection with no request being handled may go without a byte
    /// moving (an idle HTTP/2 connection, a client that stopped reading a blob).
    #[serde(with = "crate::api::duration::serde")]
    pub client_idle_timeout: Duration,
    /// Decisions of `upstreamAuth` upstreams: TTLs, the signing key, plain HTTP.
    #[serde(skip_serializing_if = "AccessConfig::is_default")]
    pub access: AccessConfig,
    /// Serve the registry API over HTTPS with this certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
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
    /// A tag policy that cannot be carried out.
    #[error("upstream {registry:?}: tagPolicies[{index}]: {why}")]
    BadTagPolicy {
        /// The upstream.
        registry: String,
        /// Which policy, from 0.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The same registry twice.
    #[error("upstream registry {0:?} is configured twice")]
    DuplicateRegistry(String),
    /// Registry host name that cannot be one.
    #[error(
        "upstream registry {0:?} is not a host name (expected e.g. docker.io or registry.local:5000)"
    )]
    BadRegistry(String),
    /// A registry name that image references and paths read as a Docker Hub namespace.
    #[error(
        "upstream registry {0:?} has no '.' or ':' and is not localhost, so image references \
         and paths through the proxy read it as a Docker Hub namespace; name the registry by \
         its full host (e.g. {0}.example.com or {0}:5000)"
    )]
    NotARegistryName(String),
    /// The default upstream's filter names repositories under another upstream's name,
    /// which a path without `?ns=` sends to that upstream.
    #[error(
        "upstream {default:?} is the default and allows {pattern:?}, but /v2/{registry}/... \
         is a pull from the upstream {registry:?}: remove the pattern, or pull those \
         repositories as /v2/{default}/{registry}/... (or with ?ns={default})"
    )]
    AmbiguousRoute {
        /// The default upstream.
        default: String,
        /// Its allow pattern.
        pattern: String,
        /// The other upstream that pattern's first component names.
        registry: String,
    },
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

    /// The same configuration with every mode `online`: what a change of modes alone
    /// leaves as it is.
    pub fn without_modes(&self) -> ProxyConfig {
        let mut c = self.clone();
        c.mode = UpstreamMode::default();
        for u in &mut c.upstreams {
            u.mode = None;
        }
        c
    }

    /// Checks everything serde cannot: each part (see [`UpstreamConfig::validate`],
    /// [`S3Config::validate`], [`PeersConfig::validate`], [`AccessConfig::validate`]),
    /// then what parts say of each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_upstreams()?;
        if self.max_cache_bytes == Some(0) {
            return Err(ConfigError::ZeroCacheLimit);
        }
        if let Some(s3) = &self.storage.s3 {
            s3.validate(self.max_cache_bytes.is_some(), self.peers.is_some())?;
        }
        for (zero, name) in [
            (self.client_header_timeout.is_zero(), "clientHeaderTimeout"),
            (self.client_idle_timeout.is_zero(), "clientIdleTimeout"),
            (self.upstream_timeout.is_zero(), "upstreamTimeout"),
            (
                self.upstream_min_rate_window.is_zero(),
                "upstreamMinRateWindow",
            ),
            (self.connect_timeout.is_zero(), "connectTimeout"),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        self.access.validate()?;
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
            let shared_key = self.access.signing_key_file.is_some();
            p.validate(shared_key, self.storage.s3.is_some())?;
        }
        if listeners_clash(self.listen, self.metrics_listen) {
            return Err(ConfigError::ListenClash(self.listen, self.metrics_listen));
        }
        self.validate_images()
    }

    /// Every upstream valid, none twice, and the default one of them.
    fn validate_upstreams(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::NoUpstreams);
        }
        let mut seen = HashSet::new();
        for u in &self.upstreams {
            u.validate()?;
            if !seen.insert(docker_hub::registry_key(&u.registry)) {
                return Err(ConfigError::DuplicateRegistry(u.registry.clone()));
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
        self.validate_routes()
    }

    /// No path means two upstreams: a request without `?ns=` whose first component names
    /// an upstream goes to it (docs/proxy.md, "Which upstream a request is for"), so the
    /// default upstream may not also claim, by name, repositories under that component.
    fn validate_routes(&self) -> Result<(), ConfigError> {
        let Some(default) = self.default_registry() else {
            return Ok(());
        };
        let keys: HashSet<String> = self
            .upstreams
            .iter()
            .map(|u| docker_hub::registry_key(&u.registry))
            .collect();
        let default_key = docker_hub::registry_key(default);
        let Some(up) = self
            .upstreams
            .iter()
            .find(|u| docker_hub::registry_key(&u.registry) == default_key)
        else {
            return Ok(());
        };
        for pattern in &up.repositories.allow {
            let Some((first, _)) = pattern.split_once('/') else {
                continue;
            };
            let key = docker_hub::registry_key(first);
            if !first.contains('*')
                && key != default_key
                && keys.contains(&key)
                && super::image_ref::looks_like_registry(first)
            {
                return Err(ConfigError::AmbiguousRoute {
                    default: default.to_string(),
                    pattern: pattern.clone(),
                    registry: first.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Every `pin` and `prefetch` entry an image of a mirrored registry.
    fn validate_images(&self) -> Result<(), ConfigError> {
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

    /// The registry used when a request has no `?ns=`.
    pub fn default_registry(&self) -> Option<&str> {
        self.default_upstream
            .as_deref()
            .or_else(|| self.upstreams.first().map(|u| u.registry.as_str()))
    }
}

fn is_online(mode: &UpstreamMode) -> bool {
    *mode == UpstreamMode::Online
}

impl Default for ProxyConfig {
    /// A docker.io cache on port 5000, metrics on 9095, in `./pullthrough-cache`.
    fn default() -> Self {
        ProxyConfig {
            listen: ([0, 0, 0, 0], 5000).into(),
            metrics_listen: ([0, 0, 0, 0], 9095).into(),
            cache_dir: PathBuf::from("pullthrough-cache"),
            storage: StorageConfig::default(),
            peers: None,
            upstreams: vec![UpstreamConfig::new(docker_hub::REGISTRY)],
            default_upstream: None,
            tag_ttl: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(24 * 3600),
            mode: UpstreamMode::Online,
            tags_list_ttl: Duration::from_secs(30),
            max_manifest_bytes: NonZeroU64::new(4 << 20).expect("not zero"),
            max_cache_bytes: None,
            pin: Vec::new(),
            prefetch: Vec::new(),
            prefetch_platforms: Vec::new(),
            seed: None,
            connect_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            upstream_min_rate: 16 << 10,
            upstream_min_rate_window: Duration::from_secs(10),
            admin_token_file: None,
            max_connections: NonZeroUsize::new(4096).expect("not zero"),
            client_header_timeout: Duration::from_secs(30),
            client_idle_timeout: Duration::from_secs(120),
            access: AccessConfig::default(),
            tls: None,
        }
    }
}

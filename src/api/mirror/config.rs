//! The pure mapping from a mirror's spec to the configuration its proxy runs with: what
//! the CRD says, where the pod mounts what the controller makes (Secrets, the
//! ConfigMap), and the proxy's defaults for the rest.

use super::{
    ACCESS_MOUNT, ADMIN_MOUNT, ADMIN_TOKEN, CACHE_MOUNT, METRICS_PORT, MirrorUpstream, PROXY_PORT,
    RegistryMirrorSpec, SECRETS_MOUNT, SIGNING_KEY, TLS_MOUNT,
};
use crate::api::proxy_config::{
    AccessConfig, AccessMode, ConfigError, DEFAULT_LOCAL_COPIES, ProxyConfig, S3Config,
    StorageConfig, TlsConfig, UpstreamConfig, UpstreamLimits,
};
use crate::api::{TagPolicyKind, UpstreamMode, duration, quantity};
use std::path::PathBuf;
use std::time::Duration;

/// Why a mirror's spec does not make a proxy configuration.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The cache's size.
    #[error("cache.storage: {0}")]
    Storage(#[from] quantity::QuantityError),
    /// One of the cache's durations.
    #[error("cache.{field}: {source}")]
    Duration {
        /// The field under `cache`, as the CRD spells it.
        field: &'static str,
        /// What is wrong with it.
        source: duration::DurationError,
    },
    /// The configuration it maps to.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Share of the cache volume the cache itself may fill: the rest is room for downloads in
/// progress, tag records and the file system's own overhead.
pub const CACHE_FILL_RATIO: f64 = 0.9;

impl MirrorUpstream {
    /// Who may pull through: as set, else `upstreamAuth` with credentials, `open` without.
    pub fn access_mode(&self) -> AccessMode {
        match &self.access {
            Some(a) => a.mode,
            None if self.credentials_secret_ref.is_some() => AccessMode::UpstreamAuth,
            None => AccessMode::Open,
        }
    }
}

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
                let bytes = quantity::to_bytes(&q.0)?;
                Ok(Some((bytes as f64 * CACHE_FILL_RATIO) as u64))
            }
        }
    }

    /// Bytes of local copies of bucket blobs each replica keeps in its emptyDir: half of
    /// its `sizeLimit` (the rest spools downloads), the default without one.
    fn local_copies(&self) -> Result<u64, SpecError> {
        let limit = self.cache.storage.empty_dir.as_ref();
        match limit.and_then(|e| e.size_limit.as_ref()) {
            Some(q) => Ok((quantity::to_bytes(&q.0)? / 2).min(DEFAULT_LOCAL_COPIES)),
            None => Ok(DEFAULT_LOCAL_COPIES),
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
        self.upstream_auth_registries().next().is_some()
    }

    /// The registries of the upstreams in access mode `upstreamAuth`: where the upstream
    /// decides who may pull.
    pub fn upstream_auth_registries(&self) -> impl Iterator<Item = &str> {
        self.upstreams
            .iter()
            .filter(|u| u.access_mode() == AccessMode::UpstreamAuth)
            .map(|u| u.registry.as_str())
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

    /// The mode each upstream is to be in (its own, or the cache's), by registry as the
    /// proxy names it (lowercase): what the controller carries to running replicas.
    pub fn modes(&self) -> Vec<(String, UpstreamMode)> {
        let default = self.cache.mode.unwrap_or_default();
        self.upstreams
            .iter()
            .map(|u| (u.registry.to_ascii_lowercase(), u.mode.unwrap_or(default)))
            .collect()
    }

    /// The tags its `pinned` tag policies freeze, as the status shows them:
    /// `registry/repositories:tags -> digest`.
    pub fn pinned_tags(&self) -> Vec<String> {
        let mut out = Vec::new();
        for u in &self.upstreams {
            for p in &u.tag_policies {
                if let (TagPolicyKind::Pinned, Some(d)) = (p.policy, &p.digest) {
                    out.push(format!(
                        "{}/{}:{} -> {d}",
                        u.registry.to_ascii_lowercase(),
                        p.repositories,
                        p.tags
                    ));
                }
            }
        }
        out
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
        let local_copies = self.local_copies()?;
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
                    local_copies,
                    ..S3Config::default()
                }),
            },
            peers: None,
            upstreams: self
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| upstream_config(i, u))
                .collect::<Result<_, SpecError>>()?,
            default_upstream: None,
            // A bucket's emptyDir spools downloads and local copies: the limit is the bucket's own.
            max_cache_bytes: match &self.cache.storage.s3 {
                Some(s3) => s3
                    .max_size
                    .as_ref()
                    .map(|q| quantity::to_bytes(&q.0))
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
            mode: self.cache.mode.unwrap_or_default(),
            seed: self.cache.seed.clone(),
            access: self.access_config()?,
            tls: self.tls.as_ref().map(|_| TlsConfig {
                cert_file: PathBuf::from(format!("{TLS_MOUNT}/tls.crt")),
                key_file: PathBuf::from(format!("{TLS_MOUNT}/tls.key")),
            }),
            // The controller asks the replicas (prefetches, modes, drops) with the token
            // of the Secret it makes.
            admin_token_file: Some(PathBuf::from(format!("{ADMIN_MOUNT}/{ADMIN_TOKEN}"))),
            ..defaults
        };
        config.validate()?;
        Ok(config)
    }

    /// The proxy's `access`: the spec's TTLs, and the key every replica shares.
    fn access_config(&self) -> Result<AccessConfig, SpecError> {
        let spec = self.access.clone().unwrap_or_default();
        let d = AccessConfig::default();
        Ok(AccessConfig {
            allowed_ttl: parse("access.allowedTTL", &spec.allowed_ttl, d.allowed_ttl)?,
            denied_ttl: parse("access.deniedTTL", &spec.denied_ttl, d.denied_ttl)?,
            plain_http: spec.plain_http,
            // One key for every replica, from the Secret the controller makes.
            signing_key_file: self
                .shares_key()
                .then(|| PathBuf::from(format!("{ACCESS_MOUNT}/{SIGNING_KEY}"))),
            ..d
        })
    }
}

/// The proxy's configuration of the spec's upstream `u`, the `i`th: its credentials from
/// where the pod mounts its Secret.
fn upstream_config(i: usize, u: &MirrorUpstream) -> Result<UpstreamConfig, SpecError> {
    let limits = match &u.limits {
        None => None,
        Some(l) => {
            let d = UpstreamLimits::for_registry(&u.registry);
            Some(UpstreamLimits {
                max_concurrent_requests: l.max_concurrent_requests,
                manifest_gets_per_second: l.manifest_gets_per_second,
                queue_timeout: parse("limits.queueTimeout", &l.queue_timeout, d.queue_timeout)?,
                backoff: parse("limits.backoff", &l.backoff, d.backoff)?,
                max_backoff: parse("limits.maxBackoff", &l.max_backoff, d.max_backoff)?,
            })
        }
    };
    Ok(UpstreamConfig {
        registry: u.registry.clone(),
        url: u.url.clone(),
        urls: u.urls.iter().flatten().map(|x| x.0.clone()).collect(),
        credentials: None,
        credentials_file: u
            .credentials_secret_ref
            .as_ref()
            .map(|_| PathBuf::from(format!("{SECRETS_MOUNT}/{i}/.dockerconfigjson"))),
        repositories: u.repositories.clone().unwrap_or_default(),
        access: u.access.clone(),
        limits,
        mode: u.mode,
        tag_policies: u.tag_policies.clone(),
    })
}

/// The duration `field` of the spec says, or `default` when it says none.
fn parse(
    field: &'static str,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration, SpecError> {
    match v {
        Some(s) => duration::parse(s).map_err(|source| SpecError::Duration { field, source }),
        None => Ok(default),
    }
}

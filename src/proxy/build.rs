//! Building a proxy from its configuration: checked, its store opened (a disk cleaned of
//! partial downloads, or a bucket), its upstreams with their credentials, the images it
//! pins and prefetches, the replicas' shared key, the replicas themselves; every part
//! wired into the [`Proxy`] that serves.

use super::access::Access;
use super::index::Index;
use super::links::Links;
use super::metrics::Metrics;
use super::peers::Peers;
use super::prefetcher::Prefetcher;
use super::pull_through::{CachePolicy, ConfiguredImage, Pins, PullThrough};
use super::registry::{Registry, Upstreams};
use super::shared_eviction::SharedEviction;
use super::shared_key::SharedKey;
use super::state::Proxy;
use super::store::s3::{Bucket, S3Store};
use super::store::{BlobStore, DiskStore, StoreError};
use super::tls::Tls;
use super::upstream::{self, MinRate, Upstream};
use crate::api::dockerconfig::credentials_for;
use crate::api::image_ref;
use crate::api::{ConfigError, Credentials, ProxyConfig, UpstreamConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the proxy could not start.
/// Why a credentials file gives no credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// It cannot be read.
    #[error("{0}")]
    Read(std::io::Error),
    /// It is not a `.dockerconfigjson` with the registry's entry.
    #[error("{0}")]
    Parse(crate::api::dockerconfig::DockerConfigError),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The cache directory cannot be used.
    #[error("cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The cache's store cannot be read.
    #[error("cache store {name}: {source}")]
    CacheStore {
        /// The directory or bucket.
        name: String,
        /// What went wrong.
        source: StoreError,
    },
    /// The shared bucket's eviction cannot be set up: no client for its Lease.
    #[error("storage.s3.eviction: no client for the eviction Lease: {0}")]
    Eviction(#[source] kube::Error),
    /// The bucket's settings cannot make a client.
    #[error("storage.s3 ({name}): {source}")]
    Bucket {
        /// The bucket.
        name: String,
        /// What went wrong.
        source: object_store::Error,
    },
    /// A credentials file cannot be read or parsed.
    #[error("credentials file {path} for {registry}: {reason}")]
    Credentials {
        /// The upstream the credentials are for.
        registry: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: CredentialsError,
    },
    /// The access signing key cannot be read or written.
    #[error("access signing key {path}: {source}")]
    SigningKey {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The certificate or key cannot be used.
    #[error("tls: {0}")]
    Tls(#[from] crate::proxy::tls::TlsError),
    /// The cache could not be seeded from its bundle.
    #[error("seeding the cache from {seed}: {source}")]
    Seed {
        /// The bundle.
        seed: String,
        /// Why.
        source: crate::proxy::bundle::BundleError,
    },
    /// The admin token cannot be read or written.
    #[error("admin token {path}: {source}")]
    AdminToken {
        /// The token file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// A cache's store opened beside its proxy (see [`open_store_beside`]).
pub struct Beside {
    /// The store.
    pub store: Arc<dyn BlobStore>,
    /// The bucket, when the cache is in one.
    pub bucket: Option<Arc<S3Store>>,
    /// Its directory or bucket, for what is logged.
    pub name: String,
}

/// The store a proxy keeps its cache in, and what it is.
struct Opened {
    store: Arc<dyn BlobStore>,
    /// Its directory or bucket, for the logs.
    name: String,
    /// Partial downloads a disk held from an earlier run, removed.
    removed_partials: u64,
    /// The bucket, when the store is one replicas share.
    bucket: Option<Arc<S3Store>>,
}

impl Proxy {
    /// Builds the proxy: validates the config, opens (and cleans) the cache's store,
    /// resolves credentials and images, reads or makes its secrets.
    pub async fn build(config: &ProxyConfig) -> Result<Proxy, StartError> {
        config.validate()?;
        check_addresses(config)?;
        let metrics = Metrics::new();
        let opened = open_store(config, &metrics)?;
        if let Some(seed) = &config.seed {
            let bucket = opened.bucket.as_deref();
            crate::proxy::bundle::seed::seed(&*opened.store, bucket, seed, &config.cache_dir)
                .await
                .map_err(|source| StartError::Seed {
                    seed: seed.clone(),
                    source,
                })?;
        }
        // A bucket's limit is kept by its evictor, not by each replica's index.
        let index_limit = config.max_cache_bytes.filter(|_| opened.bucket.is_none());
        let index = Index::rebuild(opened.store.clone(), index_limit, metrics.clone())
            .await
            .map_err(|source| StartError::CacheStore {
                name: opened.name.clone(),
                source,
            })?;
        tracing::info!(store = %opened.name, shared = index.store().shared(), bytes = index.total(), "cache store open");
        if opened.removed_partials > 0 {
            tracing::info!(
                removed = opened.removed_partials,
                "removed partial downloads left by an earlier run"
            );
        }
        let token_path = config.admin_token_path();
        let admin_token = crate::fsutil::load_or_create_secret(&token_path).map_err(|source| {
            StartError::AdminToken {
                path: token_path,
                source,
            }
        })?;
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(
                Tls::new(&t.cert_file, &t.key_file).map_err(StartError::Tls)?,
            )),
            None => None,
        };
        let upstreams = upstreams(config, &metrics, tls.as_deref())?;
        let pins = configured_images(&upstreams, "pin", &config.pin)?;
        let mut prefetch = configured_images(&upstreams, "prefetch", &config.prefetch)?;
        // Pinned images are kept, so they are fetched too.
        for p in &pins {
            if !prefetch.iter().any(|q| q.same_image(p)) {
                prefetch.push(p.clone());
            }
        }
        let pins = Pins::new(pins);
        let eviction = match (&opened.bucket, config.max_cache_bytes, &config.storage.s3) {
            (Some(bucket), Some(limit), Some(s3)) => {
                metrics.cache_limit_bytes.set(limit as i64);
                let eviction = SharedEviction::new(
                    bucket.clone(),
                    index.clone(),
                    limit,
                    &s3.eviction,
                    pins.clone(),
                    metrics.clone(),
                )
                .await
                .map_err(StartError::Eviction)?;
                Some(Arc::new(eviction))
            }
            _ => None,
        };
        let key = signing_key(config, &upstreams)?;
        let policy = CachePolicy {
            tag_ttl: config.tag_ttl,
            stale_if_error: config.stale_if_error,
            tags_list_ttl: config.tags_list_ttl,
            max_manifest_bytes: config.max_manifest_bytes.get(),
        };
        let peers = peers(config, key.clone())?.map(Arc::new);
        let cache = PullThrough::new(index, metrics.clone(), policy, pins, peers);
        let prefetcher = Arc::new(Prefetcher::new(metrics.clone(), config.tag_ttl));
        let links = Links::new(Arc::new(cache), metrics.clone());
        let access = Access::new(key, config.access.clone(), metrics.clone());
        let registry = Registry::new(
            upstreams,
            access,
            links,
            prefetcher.clone(),
            metrics.clone(),
        );
        Ok(Proxy {
            registry: Arc::new(registry),
            metrics,
            prefetch,
            prefetch_platforms: config.prefetch_platforms.clone(),
            prefetcher,
            admin_token,
            tls,
            eviction,
        })
    }
}

/// Refuses an upstream at an address the upstream client never connects to.
fn check_addresses(config: &ProxyConfig) -> Result<(), StartError> {
    for u in &config.upstreams {
        for url in u.base_urls() {
            let uri = url.parse::<hyper::Uri>().ok();
            let host = uri.as_ref().and_then(|u| u.host());
            if !host.is_some_and(upstream::allowed_host) {
                return Err(StartError::Config(ConfigError::LinkLocalUrl {
                    registry: u.registry.clone(),
                    url,
                }));
            }
        }
    }
    Ok(())
}

/// The store of `config`'s cache for a tool that works beside a proxy that may be
/// running on it (`pullthrough bundle`): a disk cache's directory as it is, or the bucket,
/// with downloads spooled under `scratch` (not the proxy's `cacheDir`), also as the
/// bucket it is.
pub fn open_store_beside(config: &ProxyConfig, scratch: &Path) -> Result<Beside, StartError> {
    let Some(s3) = &config.storage.s3 else {
        let disk = DiskStore::beside(&config.cache_dir).map_err(|source| StartError::CacheDir {
            path: config.cache_dir.clone(),
            source,
        })?;
        return Ok(Beside {
            store: Arc::new(disk),
            bucket: None,
            name: config.cache_dir.display().to_string(),
        });
    };
    let scratch_config = ProxyConfig {
        cache_dir: scratch.to_path_buf(),
        ..config.clone()
    };
    let store = Arc::new(bucket_store(&scratch_config, s3, &Metrics::new())?);
    Ok(Beside {
        store: store.clone(),
        name: store.name().to_string(),
        bucket: Some(store),
    })
}

/// Opens the cache's store: the disk (`cacheDir`, cleaned of partial downloads), or the
/// bucket (`storage.s3`, downloads spooled in `cacheDir`).
fn open_store(config: &ProxyConfig, metrics: &Metrics) -> Result<Opened, StartError> {
    let cache_dir_error = |source| StartError::CacheDir {
        path: config.cache_dir.clone(),
        source,
    };
    let Some(s3) = &config.storage.s3 else {
        let (disk, stats) = DiskStore::open(&config.cache_dir).map_err(cache_dir_error)?;
        return Ok(Opened {
            store: Arc::new(disk),
            name: config.cache_dir.display().to_string(),
            removed_partials: stats.removed_partials,
            bucket: None,
        });
    };
    let bucket = Arc::new(bucket_store(config, s3, metrics)?);
    Ok(Opened {
        store: bucket.clone(),
        name: bucket.name().to_string(),
        removed_partials: 0,
        bucket: Some(bucket),
    })
}

/// The bucket `s3` as the cache's store, spooling (and copying blobs) under `cacheDir`.
fn bucket_store(
    config: &ProxyConfig,
    s3: &crate::api::proxy_config::S3Config,
    metrics: &Metrics,
) -> Result<S3Store, StartError> {
    let cache_dir_error = |source| StartError::CacheDir {
        path: config.cache_dir.clone(),
        source,
    };
    let bucket = Bucket::s3(s3, metrics.clone()).map_err(|source| StartError::Bucket {
        name: s3.bucket.clone(),
        source,
    })?;
    let spool = config.cache_dir.join("spool");
    let mut store = S3Store::new(
        bucket,
        &s3.bucket,
        &s3.prefix,
        &spool,
        s3.abandon_uploads_after,
    )
    .map_err(cache_dir_error)?;
    if s3.redirect {
        store = store.with_redirect();
    }
    let copies = config.cache_dir.join("copies");
    store = store
        .with_local_copies(&copies, s3.local_copies)
        .map_err(cache_dir_error)?;
    if config.max_cache_bytes.is_some() {
        store = store.with_access_records();
    }
    Ok(store)
}

/// The configured upstreams, each with its credentials; replicas serving HTTPS (`tls`)
/// are asked for blobs over it.
fn upstreams(
    config: &ProxyConfig,
    metrics: &Metrics,
    tls: Option<&Tls>,
) -> Result<Upstreams, StartError> {
    let client = upstream::http_client(config.connect_timeout);
    let peers_client = match (tls, &config.peers) {
        (Some(t), Some(_)) => Some(upstream::http_client_with(
            t.peer_client_config(),
            config.connect_timeout,
        )),
        _ => None,
    };
    let mut by_name = HashMap::new();
    for u in &config.upstreams {
        let name = u.registry.to_ascii_lowercase();
        metrics.init_upstream(&name);
        if u.access_mode() == crate::api::AccessMode::UpstreamAuth {
            metrics.init_access(&name);
        }
        let mut up = Upstream::new(
            u,
            credentials(u)?,
            client.clone(),
            metrics.clone(),
            (config.upstream_timeout, MinRate::of(config)),
        )
        .in_mode(u.mode.unwrap_or(config.mode));
        if let Some(c) = &peers_client {
            up = up.with_tls_peers(c.clone());
        }
        by_name.insert(name, Arc::new(up));
    }
    let default = config
        .default_registry()
        .expect("validated: at least one upstream")
        .to_ascii_lowercase();
    Ok(Upstreams::new(by_name, &default))
}

/// An upstream's credentials: inline, or read from its credentials file.
fn credentials(u: &UpstreamConfig) -> Result<Option<Credentials>, StartError> {
    let Some(path) = &u.credentials_file else {
        return Ok(u.credentials.clone());
    };
    let fail = |reason: CredentialsError| StartError::Credentials {
        registry: u.registry.clone(),
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(CredentialsError::Read(e)))?;
    let creds =
        credentials_for(&bytes, &u.registry).map_err(|e| fail(CredentialsError::Parse(e)))?;
    if creds.is_none() {
        tracing::warn!(registry = %u.registry, path = %path.display(),
            "credentials file has no entry for this registry; pulling anonymously");
    }
    Ok(creds)
}

/// The images of the configuration's `list` (`pin`, `prefetch`), resolved to upstreams.
fn configured_images(
    upstreams: &Upstreams,
    list: &'static str,
    images: &[String],
) -> Result<Vec<ConfiguredImage>, StartError> {
    images
        .iter()
        .map(|image| {
            let r = image_ref::parse(image).map_err(|e| StartError::Config(e.into()))?;
            let upstream = upstreams.find(&r.registry).ok_or_else(|| {
                StartError::Config(ConfigError::ImageNotMirrored {
                    list,
                    image: image.clone(),
                    registry: r.registry.clone(),
                })
            })?;
            Ok(ConfiguredImage {
                upstream,
                repository: r.repository,
                reference: r.reference,
                name: image.clone(),
            })
        })
        .collect()
}

/// The key the replicas share: read (and checked) from `access.signingKeyFile` where
/// tokens are issued or replicas ask each other (or a file is given), made there once if
/// missing; else a random one of this process's.
fn signing_key(config: &ProxyConfig, upstreams: &Upstreams) -> Result<SharedKey, StartError> {
    let path = config.signing_key_path();
    let fail = |source| StartError::SigningKey {
        path: path.clone(),
        source,
    };
    let shared = upstreams.all().any(|u| u.guarded())
        || config.peers.is_some()
        || config.access.signing_key_file.is_some();
    let key = if shared {
        crate::fsutil::load_or_create_secret(&path).map_err(fail)?
    } else {
        crate::fsutil::random_hex(32).map_err(fail)?
    };
    Ok(SharedKey::new(key.into_bytes()))
}

/// The replicas sharing the bucket, when `peers` is set: their requests to each other
/// are proven under `key`.
fn peers(config: &ProxyConfig, key: SharedKey) -> Result<Option<Peers>, StartError> {
    let Some(p) = &config.peers else {
        return Ok(None);
    };
    let port = config.listen.port();
    let me = match p.self_address {
        Some(a) => a,
        None => std::env::var("POD_IP")
            .ok()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, port))
            .ok_or(StartError::Config(ConfigError::BadPeers(
                "selfAddress is not set and POD_IP is not an IP address",
            )))?,
    };
    let peers = match &p.dns {
        Some(name) => Peers::dns(me, name.clone(), port, key),
        None => Peers::fixed(me, &p.addresses, key),
    };
    tracing::info!(%me, replicas = ?peers.replicas(), dns = ?p.dns, "asking the replica that owns a missing blob for it");
    Ok(Some(peers))
}

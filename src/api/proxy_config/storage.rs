//! Where the cache keeps its objects: the local disk, or an S3-compatible bucket that
//! replicas share (with how they keep it under its size limit and how they find each
//! other).

use super::ConfigError;
use super::upstream::split_url;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// Where the cache keeps its objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StorageConfig {
    /// An S3-compatible bucket (AWS S3, GCS's S3 API, Ceph RGW, MinIO) instead of the
    /// local disk.
    #[serde(skip_serializing_if = "Option::is_none")]
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
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct S3Config {
    /// The bucket (it must exist; required).
    pub bucket: String,
    /// Key prefix of every object (`mirrors/docker-hub`); none by default.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Endpoint URL of a store other than AWS (`http://rgw.ceph:7480`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region; from `AWS_REGION` or `us-east-1` when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted ones
    /// (`bucket.endpoint/key`); by default on with an `endpoint`, off without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Cached blobs are not sent through the proxy but by a redirect (307) to a URL of the
    /// bucket signed for 10 minutes: the bytes go straight from the store to the client
    /// (containerd follows it, and sends its registry credentials only to the registry).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub redirect: bool,
    /// Bytes of blobs each replica keeps a copy of on its disk (`cacheDir`): those it
    /// stored in the bucket or took from the replica that owns them, read instead of
    /// the bucket's for every client after the first (least recently used dropped
    /// first; never over the disk's free space less 1 GiB). 0: none. Not with
    /// `redirect`. A quantity (`4Gi`) or bytes.
    #[serde(deserialize_with = "crate::api::quantity::deserialize")]
    pub local_copies: u64,
    /// Age after which the multipart upload of a replica that died is aborted (at a
    /// replica's start): longer than any download takes.
    #[serde(with = "crate::api::duration::serde")]
    pub abandon_uploads_after: Duration,
    /// How the replicas keep the bucket under `maxCacheBytes` (with a limit only).
    #[serde(skip_serializing_if = "EvictionConfig::is_default")]
    pub eviction: EvictionConfig,
}

/// Bytes of local copies of bucket blobs a replica keeps unless told (`localCopies`).
pub const DEFAULT_LOCAL_COPIES: u64 = 4 << 30;

/// How long a URL of the bucket handed to a client for a blob (`redirect`) is valid.
pub const REDIRECT_EXPIRY: Duration = Duration::from_secs(600);

/// How the replicas that share a bucket keep it under `maxCacheBytes`: each records what
/// it uses, one (elected on a Kubernetes Lease) evicts the least recently used objects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EvictionConfig {
    /// The Kubernetes Lease the replicas elect the evicting one on (needed with
    /// `peers`); without one, this process evicts alone. The API server is found as
    /// kubectl finds it (in a pod: its service account).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The Lease's namespace; by default `POD_NAMESPACE`, else the client's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_namespace: Option<String>,
    /// How often the evicting replica lists the bucket, deletes what it marked in the
    /// round before (if unused since) and marks what is over the limit.
    #[serde(with = "crate::api::duration::serde")]
    pub every: Duration,
    /// How often each replica writes what it used (and is reading) to an access record.
    #[serde(with = "crate::api::duration::serde")]
    pub record_every: Duration,
    /// Objects used more recently than this are never evicted: longer than the signed
    /// URLs of `redirect` live (10 minutes).
    #[serde(with = "crate::api::duration::serde")]
    pub grace: Duration,
}

impl Default for EvictionConfig {
    fn default() -> EvictionConfig {
        EvictionConfig {
            lease: None,
            lease_namespace: None,
            every: Duration::from_secs(60),
            record_every: Duration::from_secs(20),
            grace: Duration::from_secs(15 * 60),
        }
    }
}

impl EvictionConfig {
    fn is_default(&self) -> bool {
        *self == EvictionConfig::default()
    }
}

impl Default for S3Config {
    /// No bucket yet (one is required), every other field at its default.
    fn default() -> S3Config {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: None,
            redirect: false,
            local_copies: DEFAULT_LOCAL_COPIES,
            abandon_uploads_after: Duration::from_secs(24 * 3600),
            eviction: EvictionConfig::default(),
        }
    }
}

impl S3Config {
    /// Whether requests are path-style.
    pub fn path_style(&self) -> bool {
        self.path_style.unwrap_or(self.endpoint.is_some())
    }
}

impl S3Config {
    /// Checks what serde cannot; `limited` and `peers` say whether the proxy has a size
    /// limit and replicas.
    pub(super) fn validate(&self, limited: bool, peers: bool) -> Result<(), ConfigError> {
        if self.bucket.is_empty() {
            return Err(ConfigError::BadS3("bucket is required"));
        }
        if self
            .endpoint
            .as_deref()
            .is_some_and(|e| split_url(e).is_none())
        {
            return Err(ConfigError::BadS3(
                "endpoint must be an http(s)://host[:port] URL",
            ));
        }
        let ev = &self.eviction;
        if limited && peers && ev.lease.is_none() {
            return Err(ConfigError::BadS3(
                "maxCacheBytes with peers needs eviction.lease: the replicas elect the one that evicts on it",
            ));
        }
        if ev.every.is_zero() {
            return Err(ConfigError::Zero("storage.s3.eviction.every"));
        }
        if ev.record_every.is_zero() {
            return Err(ConfigError::Zero("storage.s3.eviction.recordEvery"));
        }
        if ev.every < ev.record_every * 2 {
            return Err(ConfigError::BadS3(
                "eviction.every must be at least twice eviction.recordEvery (a use is recorded before what it reads is deleted)",
            ));
        }
        if self.redirect && ev.grace < REDIRECT_EXPIRY {
            return Err(ConfigError::BadS3(
                "eviction.grace must be at least 10m with redirect (the life of a signed URL)",
            ));
        }
        Ok(())
    }
}

/// How a replica finds the others (a fixed list, or a DNS name: a headless Service).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PeersConfig {
    /// The replicas' registry API addresses (`IP:PORT`), this one's among them or not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// A name whose addresses are the ready replicas (the headless Service the controller
    /// makes), each at `listen`'s port; looked up every 5 seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// This replica's address as the others reach it; by default the `POD_IP`
    /// environment variable with `listen`'s port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_address: Option<SocketAddr>,
}

impl PeersConfig {
    /// Checks what serde cannot: replicas share a bucket and a key, and are found.
    pub(super) fn validate(&self, shared_key: bool, bucket: bool) -> Result<(), ConfigError> {
        if !shared_key {
            return Err(ConfigError::BadPeers(
                "replicas prove their requests to each other (and verify each other's tokens) with a key they share: set access.signingKeyFile to a file they share (a Secret)",
            ));
        }
        if !bucket {
            return Err(ConfigError::BadPeers(
                "replicas share a bucket: set storage.s3 too",
            ));
        }
        if self.addresses.is_empty() && self.dns.is_none() {
            return Err(ConfigError::BadPeers("give addresses or dns"));
        }
        Ok(())
    }
}

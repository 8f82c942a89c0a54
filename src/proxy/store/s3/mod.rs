//! The cache in an S3-compatible bucket, which every replica pointed at it shares:
//!
//! ```text
//! <prefix>/blobs/<alg>/<hex>    blob and manifest bytes, written only with verified bytes
//! <prefix>/meta/<alg>/<hex>     media type of a cached manifest (written before it)
//! <prefix>/tags/<sha256(key)>   tag -> digest record (JSON)
//! <prefix>/links/<sha256(repo)> digests served under a repository (JSON)
//! <prefix>/uploads/<name>       a multipart upload in progress: its key and upload id
//! <prefix>/access/<writer>-<ms> what a replica used lately, for the evictor (JSON)
//! <prefix>/access/merged        the evictor's merged view of the last uses (JSON)
//! <prefix>/leases/<alg>/<hex>   who fetches a missing blob from the upstream now (JSON)
//! ```
//!
//! A download is uploaded in parts straight under its final key: S3 shows an object only
//! once its multipart upload completes, and [`BlobWrite::commit`] completes it only for
//! bytes that hash to the digest; dropped before that, the upload is aborted. An upload
//! whose process died is left in the bucket, invisible but billed: its record under
//! `uploads/` lets [`BlobStore::list`] (at every start of every replica) abort it once it
//! is older than the uploads any replica still runs. While a download runs, its clients
//! read it from a spool file on the local disk (a [`DiskStore`] write that is never
//! committed), since the bucket has nothing of it to show until the end; a task of its
//! own begins the upload and reads the parts back from the spool as they land, so that
//! neither the download nor its clients ever wait for the bucket.
//!
//! Paths are built from validated digests and from hashes of keys, as on the disk.
//!
//! With a size limit, every replica writes access records and one keeps the bucket under
//! it (its `eviction` module, and [`crate::proxy::shared_eviction`]).

mod eviction;
mod fetch_lease;
pub use eviction::{Merged, Stored, Uses};
pub use fetch_lease::FETCH_LEASE;

use super::disk::DiskStore;
use super::{
    BlobStore, BlobWrite, FetchClaim, LinkRecord, Listed, RepoKey, StoreError, StoreResult,
    StoredBlob, StoredManifest, TagKey, TagRecord, Written, link_name, tag_name, unix_now_ms,
};
use crate::api::proxy_config::S3Config;
use crate::oci::{Algorithm, Digest};
use crate::proxy::metrics::Metrics;
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::signer::{Method, Signer};
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, MultipartId, ObjectStore,
    ObjectStoreExt, PutOptions, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Size of the parts a download is uploaded in (S3's least is 5 MiB but for the last).
pub const PART: usize = 8 << 20;

/// Parts of one download uploaded at once (at most 2 x 8 MiB of a download in memory
/// for the bucket).
const PARTS_IN_FLIGHT: usize = 2;

/// A multipart upload in progress, as recorded under `uploads/`.
#[derive(Debug, Serialize, Deserialize)]
struct UploadRecord {
    key: String,
    id: String,
}

/// The bucket's failure `e`, while doing `what`.
fn s3_error(what: &'static str, e: object_store::Error) -> StoreError {
    StoreError::Io {
        what,
        source: Arc::new(io::Error::other(e)),
    }
}

/// `Ok(None)` for an object that is not there.
fn absent_ok<T>(r: object_store::Result<T>) -> object_store::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The bucket, as the cache uses it: objects, and multipart uploads with their ids;
/// every request counted and timed (`pullthrough_store_*`).
#[derive(Clone)]
pub struct Bucket {
    objects: Arc<dyn ObjectStore>,
    parts: Arc<dyn MultipartStore>,
    metrics: Metrics,
    /// Until when requests are not sent (see [`DOWN_FOR`]).
    down_until: Arc<std::sync::Mutex<Option<Instant>>>,
    /// What signs URLs of objects, when the store can.
    signer: Option<Arc<dyn Signer>>,
}

pub use crate::api::proxy_config::REDIRECT_EXPIRY;

/// After a request fails (an error, not an answer such as "not found") or takes too long,
/// the bucket is left alone this long: requests fail at once and the cache serves from
/// the upstream meanwhile, instead of every client waiting for a bucket that is down.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

/// How long one request to the bucket may take (for a ranged read, until its headers):
/// the lookups that clients wait for least, a part the most.
fn request_timeout(op: &str) -> Duration {
    match op {
        "head" | "get" => Duration::from_secs(10),
        "put_part" => Duration::from_secs(120),
        _ => Duration::from_secs(20),
    }
}

impl Bucket {
    /// One store that is both.
    pub fn new<S: ObjectStore + MultipartStore>(store: S, metrics: Metrics) -> Bucket {
        Bucket::of(Arc::new(store), None, metrics)
    }

    fn of<S: ObjectStore + MultipartStore>(
        store: Arc<S>,
        signer: Option<Arc<dyn Signer>>,
        metrics: Metrics,
    ) -> Bucket {
        Bucket {
            objects: store.clone(),
            parts: store,
            metrics,
            down_until: Default::default(),
            signer,
        }
    }

    /// A URL that GETs `key` for [`REDIRECT_EXPIRY`], signed with the store's
    /// credentials; `None` when the store signs none.
    async fn signed_get(&self, key: &Key) -> object_store::Result<Option<String>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer.signed_url(Method::GET, key, REDIRECT_EXPIRY).await?;
        Ok(Some(url.to_string()))
    }

    /// Runs one request, counting it as `op`.
    async fn timed<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let started = Instant::now();
        let down = *self.down_until.lock().expect("bucket lock");
        if down.is_some_and(|until| started < until) {
            self.metrics.store_request(op, "skipped", 0.0);
            let e = io::Error::other("the bucket failed a moment ago; not asked again yet");
            return Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            });
        }
        let result = match tokio::time::timeout(request_timeout(op), request).await {
            Ok(result) => result,
            Err(_) => Err(object_store::Error::Generic {
                store: "S3",
                source: format!("no answer within {:?}", request_timeout(op)).into(),
            }),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(object_store::Error::NotFound { .. }) => "not_found",
            // A create-only write that found the object there: an answer, not a failure.
            Err(object_store::Error::AlreadyExists { .. }) => "exists",
            Err(e) => {
                tracing::warn!(op, error = %e, "the bucket failed; leaving it alone for {DOWN_FOR:?}");
                *self.down_until.lock().expect("bucket lock") = Some(Instant::now() + DOWN_FOR);
                "error"
            }
        };
        self.metrics
            .store_request(op, outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn head(&self, key: &Key) -> object_store::Result<object_store::ObjectMeta> {
        self.timed("head", self.objects.head(key)).await
    }

    /// An object whole.
    async fn get_bytes(&self, key: &Key) -> object_store::Result<Bytes> {
        let bytes = self
            .timed("get", async { self.objects.get(key).await?.bytes().await })
            .await?;
        self.metrics.store_bytes(true).inc_by(bytes.len() as u64);
        Ok(bytes)
    }

    async fn put(&self, key: &Key, body: Bytes, opts: PutOptions) -> object_store::Result<()> {
        let len = body.len() as u64;
        self.timed(
            "put",
            self.objects.put_opts(key, PutPayload::from(body), opts),
        )
        .await?;
        self.metrics.store_bytes(false).inc_by(len);
        Ok(())
    }

    async fn delete(&self, key: &Key) -> object_store::Result<()> {
        self.timed("delete", self.objects.delete(key)).await
    }

    /// Every object under `prefix`.
    async fn list(&self, prefix: &Key) -> object_store::Result<Vec<object_store::ObjectMeta>> {
        self.timed("list", self.objects.list(Some(prefix)).try_collect())
            .await
    }

    async fn create_upload(&self, key: &Key) -> object_store::Result<MultipartId> {
        self.timed("create_upload", self.parts.create_multipart(key))
            .await
    }

    async fn put_part(
        &self,
        key: &Key,
        id: &MultipartId,
        idx: usize,
        chunks: Vec<Bytes>,
    ) -> object_store::Result<PartId> {
        let payload = PutPayload::from_iter(chunks);
        let len = payload.content_length() as u64;
        let part = self
            .timed("put_part", self.parts.put_part(key, id, idx, payload))
            .await?;
        self.metrics.store_bytes(false).inc_by(len);
        Ok(part)
    }

    async fn complete_upload(
        &self,
        key: &Key,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<()> {
        self.timed(
            "complete_upload",
            self.parts.complete_multipart(key, id, parts),
        )
        .await?;
        Ok(())
    }

    async fn abort_upload(&self, key: &Key, id: &MultipartId) -> object_store::Result<()> {
        self.timed("abort_upload", self.parts.abort_multipart(key, id))
            .await
    }

    /// `count` bytes from `start`, as they arrive.
    fn read(&self, key: Key, start: u64, count: u64) -> BoxStream<'static, io::Result<Bytes>> {
        let bucket = self.clone();
        let read = self.metrics.store_bytes(true);
        stream::once(async move {
            let opts = GetOptions::new().with_range(Some(GetRange::Bounded(start..start + count)));
            let got = bucket
                .timed("get", bucket.objects.get_opts(&key, opts))
                .await;
            got.map(|got| got.into_stream())
        })
        .try_flatten()
        .map_ok(move |chunk| {
            read.inc_by(chunk.len() as u64);
            chunk
        })
        .map_err(io::Error::other)
        .boxed()
    }

    /// An S3 bucket as configured. Credentials come from the environment as the AWS
    /// tools take them (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// web identity with `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`, the instance
    /// metadata), so a Kubernetes Secret mounted as environment works, as does IRSA.
    pub fn s3(config: &S3Config, metrics: Metrics) -> Result<Bucket, object_store::Error> {
        // reqwest takes TLS from rustls's process-wide provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A bucket that is down costs a request a few hundred milliseconds, not minutes
        // of retries: the upstream serves meanwhile.
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
            ..Default::default()
        };
        // The client options first: they hold what `with_allow_http` sets.
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(300));
        let mut b = AmazonS3Builder::from_env()
            .with_client_options(client)
            .with_retry(retry)
            .with_bucket_name(&config.bucket)
            .with_virtual_hosted_style_request(!config.path_style());
        if let Some(region) = &config.region {
            b = b.with_region(region);
        }
        if let Some(endpoint) = &config.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let s3 = Arc::new(b.build()?);
        Ok(Bucket::of(s3.clone(), Some(s3), metrics))
    }
}

/// The cache's objects in a bucket.
pub struct S3Store {
    bucket: Bucket,
    /// The key prefix's segments.
    prefix: Vec<String>,
    /// Where the downloads in progress are spooled for their clients.
    spool: DiskStore,
    /// Uploads older than this are taken for abandoned.
    abandon_after: Duration,
    /// Whether clients are sent to signed URLs of cached blobs.
    redirect: bool,
    /// `s3://bucket/prefix`, for what is logged.
    name: String,
    /// This replica's uses, for the access records (with a size limit only).
    access: Option<eviction::AccessLog>,
    /// Names this process's records and leases apart from other replicas'.
    writer: String,
    /// Whether the bucket enforces create-only writes (found out by `list`, at start).
    conditional: std::sync::OnceLock<bool>,
}

impl S3Store {
    /// The store in `bucket` under `prefix`, spooling downloads under `spool` (emptied).
    /// Multipart uploads recorded more than `abandon_after` ago are aborted by `list`.
    pub fn new(
        bucket: Bucket,
        name: &str,
        prefix: &str,
        spool: &Path,
        abandon_after: Duration,
    ) -> io::Result<S3Store> {
        let prefix: Vec<String> = prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Ok(S3Store {
            name: format!("s3://{name}/{}", prefix.join("/")),
            bucket,
            prefix,
            spool: DiskStore::spool(spool)?,
            abandon_after,
            redirect: false,
            access: None,
            writer: eviction::writer_id(),
            conditional: std::sync::OnceLock::new(),
        })
    }

    /// The same store, writing what this replica uses to access records for the
    /// replica that evicts (see [`crate::proxy::shared_eviction`]).
    pub fn with_access_records(mut self) -> S3Store {
        self.access = Some(eviction::AccessLog::new());
        self
    }

    /// The same store, sending clients of cached blobs to signed URLs of the bucket (see
    /// [`BlobStore::presign`]).
    pub fn with_redirect(mut self) -> S3Store {
        self.redirect = true;
        self
    }

    /// `s3://bucket/prefix`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the bucket was found to enforce create-only writes (so that processes
    /// that do not know each other can agree on who fetches a blob).
    pub fn conditional_writes(&self) -> bool {
        self.conditional.get().copied().unwrap_or(false)
    }

    fn key<'a>(&'a self, parts: impl IntoIterator<Item = &'a str>) -> Key {
        Key::from_iter(self.prefix.iter().map(String::as_str).chain(parts))
    }

    fn object_key(&self, dir: &str, digest: &Digest) -> Key {
        self.key([dir, digest.algorithm().as_str(), digest.hex()])
    }

    fn blob_key(&self, digest: &Digest) -> Key {
        self.object_key("blobs", digest)
    }

    fn meta_key(&self, digest: &Digest) -> Key {
        self.object_key("meta", digest)
    }

    fn tag_key(&self, key: TagKey<'_>) -> Key {
        self.key(["tags", &tag_name(key)])
    }

    /// Aborts the multipart uploads recorded longer ago than `abandon_after`: those of
    /// processes that died mid-download. Says how many.
    async fn abort_abandoned(&self) -> StoreResult<usize> {
        let what = "aborting abandoned uploads";
        let now = unix_now_ms();
        let records = self
            .bucket
            .list(&self.key(["uploads"]))
            .await
            .map_err(|e| s3_error(what, e))?;
        let mut old = Vec::new();
        for meta in records {
            let age = now.saturating_sub(meta.last_modified.timestamp_millis().max(0) as u64);
            if age >= self.abandon_after.as_millis() as u64 {
                old.push(meta.location);
            }
        }
        let mut aborted = 0;
        for location in old {
            let Some(bytes) =
                absent_ok(self.bucket.get_bytes(&location).await).map_err(|e| s3_error(what, e))?
            else {
                continue;
            };
            if let Ok(rec) = serde_json::from_slice::<UploadRecord>(&bytes) {
                let key = Key::from(rec.key.as_str());
                match self.bucket.abort_upload(&key, &rec.id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => aborted += 1,
                    Err(e) => return Err(s3_error(what, e)),
                }
            }
            absent_ok(self.bucket.delete(&location).await).map_err(|e| s3_error(what, e))?;
        }
        Ok(aborted)
    }

    async fn get_bytes(&self, what: &'static str, key: &Key) -> StoreResult<Option<Bytes>> {
        absent_ok(self.bucket.get_bytes(key).await).map_err(|e| s3_error(what, e))
    }

    async fn put(
        &self,
        what: &'static str,
        key: &Key,
        body: Bytes,
        content_type: Option<&str>,
    ) -> StoreResult<()> {
        let mut attributes = Attributes::new();
        if let Some(ct) = content_type {
            attributes.insert(Attribute::ContentType, ct.to_string().into());
        }
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        self.bucket
            .put(key, body, opts)
            .await
            .map_err(|e| s3_error(what, e))
    }

    async fn delete(&self, what: &'static str, key: &Key) -> StoreResult<()> {
        absent_ok(self.bucket.delete(key).await).map_err(|e| s3_error(what, e))?;
        Ok(())
    }
}

impl BlobStore for S3Store {
    /// Nothing: the index of a shared bucket fills as objects are used (see
    /// [`BlobStore::shared`]), so that a replica starts at once however large the bucket,
    /// and starts while the bucket is down. The uploads of replicas that died are
    /// aborted first.
    fn list(&self) -> BoxFuture<'_, StoreResult<Vec<Listed>>> {
        Box::pin(async move {
            match self.abort_abandoned().await {
                Ok(0) => {}
                Ok(aborted) => {
                    tracing::info!(store = %self.name, aborted, "aborted multipart uploads abandoned by processes that died")
                }
                Err(e) => {
                    tracing::warn!(store = %self.name, error = %e, "could not look for abandoned uploads")
                }
            }
            let enforced = self.probe_conditional_writes().await;
            let _ = self.conditional.set(enforced);
            self.bucket
                .metrics
                .store_conditional_writes
                .set(i64::from(enforced));
            if enforced {
                tracing::info!(store = %self.name, "the bucket enforces create-only writes: a blob is fetched once also by replicas that do not know each other (leases/)");
            } else {
                tracing::warn!(store = %self.name, "the bucket does not enforce create-only writes (If-None-Match: *): replicas that do not know each other (other clusters) may each fetch a blob; never wrong data");
            }
            Ok(Vec::new())
        })
    }

    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<Box<dyn StoredBlob>>>> {
        let key = self.blob_key(digest);
        Box::pin(async move {
            let meta = absent_ok(self.bucket.head(&key).await)
                .map_err(|e| s3_error("looking a blob up in the bucket", e))?;
            Ok(meta.map(|m| {
                Box::new(S3Blob {
                    bucket: self.bucket.clone(),
                    key,
                    len: m.size,
                }) as Box<dyn StoredBlob>
            }))
        })
    }

    fn begin<'a>(
        &'a self,
        digest: &'a Digest,
        len: Option<u64>,
    ) -> BoxFuture<'a, StoreResult<Box<dyn BlobWrite>>> {
        Box::pin(async move {
            // Only the spool is made here: the upload begins on the uploader's task, so
            // that a bucket that is slow to answer delays no client.
            let spool = self.spool.begin(digest, len).await?;
            let (landed, rx) = watch::channel(Landed::default());
            let uploader = tokio::spawn(upload(
                self.bucket.clone(),
                self.blob_key(digest),
                self.key(["uploads"]),
                spool.written(),
                rx,
            ));
            Ok(Box::new(S3Write {
                spool,
                bucket: self.bucket.clone(),
                digest: digest.clone(),
                landed,
                uploader: Some(uploader),
            }) as Box<dyn BlobWrite>)
        })
    }

    fn remove<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let what = "removing a cached object";
            // The bytes first: a media type left behind is cleaned up by the next list.
            self.delete(what, &self.blob_key(digest)).await?;
            self.delete(what, &self.meta_key(digest)).await
        })
    }

    fn touch(&self, digest: &Digest) {
        // Objects in a bucket keep no time of last use: with a size limit, the uses go
        // to the access records (see `record_uses`).
        if let Some(log) = &self.access {
            log.used(digest);
        }
    }

    fn record_uses(&self, in_use: Vec<Digest>) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.write_access_record(in_use))
    }

    fn manifest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<StoredManifest>>> {
        Box::pin(async move {
            let what = "reading a cached manifest";
            let Some(media_type) = self.get_bytes(what, &self.meta_key(digest)).await? else {
                return Ok(None);
            };
            let Some(body) = self.get_bytes(what, &self.blob_key(digest)).await? else {
                return Ok(None);
            };
            if Digest::of(digest.algorithm(), &body) != *digest {
                tracing::warn!(%digest, store = %self.name, "cached manifest does not match its digest");
                return Ok(None);
            }
            Ok(Some(StoredManifest {
                body,
                media_type: String::from_utf8_lossy(&media_type).into_owned(),
            }))
        })
    }

    fn put_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        body: Bytes,
        media_type: &'a str,
    ) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let what = "writing a manifest";
            let mt = Bytes::copy_from_slice(media_type.as_bytes());
            // The media type first: a blob with one is a manifest.
            self.put(what, &self.meta_key(digest), mt, None).await?;
            self.put(what, &self.blob_key(digest), body, Some(media_type))
                .await
        })
    }

    fn tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<Option<TagRecord>>> {
        Box::pin(async move {
            let Some(bytes) = self
                .get_bytes("reading a tag record", &self.tag_key(key))
                .await?
            else {
                return Ok(None);
            };
            Ok(TagRecord::parse_for(&bytes, key))
        })
    }

    fn put_tag<'a>(&'a self, record: &'a TagRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let key = self.tag_key(record.key());
            self.put("writing a tag record", &key, record.to_bytes(), None)
                .await
        })
    }

    fn links<'a>(&'a self, key: &'a RepoKey) -> BoxFuture<'a, StoreResult<Option<LinkRecord>>> {
        Box::pin(async move {
            let name = self.key(["links", &link_name(key)]);
            let Some(bytes) = self.get_bytes("reading a link record", &name).await? else {
                return Ok(None);
            };
            Ok(LinkRecord::parse_for(&bytes, key))
        })
    }

    fn put_links<'a>(&'a self, record: &'a LinkRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let name = self.key(["links", &link_name(&record.key())]);
            self.put("writing a link record", &name, record.to_bytes(), None)
                .await
        })
    }

    fn delete_tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            self.delete("removing a tag record", &self.tag_key(key))
                .await
        })
    }

    fn free_space(&self) -> Option<u64> {
        None
    }

    fn check(&self) -> StoreResult<()> {
        // Ready while the bucket is down: misses are relayed from the upstream then.
        self.spool.check()
    }

    fn shared(&self) -> bool {
        true
    }

    fn claim_fetch<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, FetchClaim> {
        Box::pin(self.claim(digest))
    }

    fn presign<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<Option<String>>> {
        Box::pin(async move {
            if !self.redirect {
                return Ok(None);
            }
            self.bucket
                .signed_get(&self.blob_key(digest))
                .await
                .map_err(|e| s3_error("signing a URL", e))
        })
    }
}

/// The name of the record of the upload `id` of `key`.
fn record_name(key: &str, id: &str) -> String {
    Digest::of(Algorithm::Sha256, format!("{key}\0{id}").as_bytes())
        .hex()
        .to_string()
}

/// A blob in the bucket.
struct S3Blob {
    bucket: Bucket,
    key: Key,
    len: u64,
}

impl StoredBlob for S3Blob {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(
        self: Box<Self>,
        start: u64,
        count: u64,
        _spans: Option<Spans>,
    ) -> BoxStream<'static, io::Result<Bytes>> {
        if count == 0 {
            return stream::empty().boxed();
        }
        self.bucket.read(self.key, start, count)
    }
}

/// A download spooled for its clients and uploaded in parts from the spool by a task of
/// its own, which follows the spool as the bytes land: the download never waits for the
/// bucket (a slow or hung bucket delays only the blob's caching), and the parts are read
/// back from the page cache rather than held in memory.
struct S3Write {
    spool: Box<dyn BlobWrite>,
    bucket: Bucket,
    digest: Digest,
    /// What the uploader may read of the spool.
    landed: watch::Sender<Landed>,
    /// The uploader: the upload and its parts, in order, once it has sent the last one.
    uploader: Option<JoinHandle<StoreResult<Uploaded>>>,
}

/// An upload with every part sent, to be completed.
type Uploaded = (Upload, Vec<PartId>);

/// A multipart upload begun: aborted (and its record removed) when dropped before it is
/// completed, also when the task that holds it is aborted.
struct Upload {
    bucket: Bucket,
    key: Key,
    id: MultipartId,
    /// Its record under `uploads/`.
    record: Key,
    completed: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (bucket, key, id, record) = (
            self.bucket.clone(),
            self.key.clone(),
            self.id.clone(),
            self.record.clone(),
        );
        rt.spawn(async move {
            if let Err(e) = bucket.abort_upload(&key, &id).await {
                tracing::warn!(%key, error = %e, "could not abort an upload; it is retried at the next start after it is abandoned");
                return;
            }
            let _ = bucket.delete(&record).await;
        });
    }
}

/// How much of the spool is written, and whether that is all of it.
#[derive(Clone, Copy, Default)]
struct Landed {
    bytes: u64,
    end: bool,
}

/// Begins a multipart upload of `key`, records it under `records`, and uploads the
/// spool `written` in parts as it grows (told by `landed`): a whole [`PART`] whenever one
/// is there, the rest at the end (an empty part for an empty blob), with
/// [`PARTS_IN_FLIGHT`] at once. Ends with the upload and its parts once the end is
/// uploaded, or fails when the bucket does or the write is dropped.
async fn upload(
    bucket: Bucket,
    key: Key,
    records: Key,
    written: Arc<dyn Written>,
    mut landed: watch::Receiver<Landed>,
) -> StoreResult<Uploaded> {
    let what = "beginning an upload";
    let id = bucket
        .create_upload(&key)
        .await
        .map_err(|e| s3_error(what, e))?;
    let upload = Upload {
        record: records.join(record_name(key.as_ref(), &id)),
        bucket: bucket.clone(),
        key: key.clone(),
        id: id.clone(),
        completed: false,
    };
    let rec = UploadRecord {
        key: key.to_string(),
        id: id.clone(),
    };
    let body = serde_json::to_vec(&rec).expect("an upload record serializes");
    bucket
        .put(&upload.record, body.into(), PutOptions::default())
        .await
        .map_err(|e| s3_error(what, e))?;
    let what = "uploading a part";
    let mut reader = written.reader()?;
    let (mut pos, mut sent) = (0u64, 0usize);
    let mut parts = Vec::new();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    loop {
        let Landed { bytes, end } = *landed.borrow_and_update();
        let ready = bytes - pos;
        if ready >= PART as u64 || (end && (ready > 0 || sent == 0)) {
            let len = ready.min(PART as u64);
            let mut chunks = Vec::new();
            let mut at = pos;
            while at < pos + len {
                let chunk = reader
                    .read(None, at, pos + len - at)
                    .await
                    .map_err(|e| StoreError::io("reading the spool", e))?;
                at += chunk.len() as u64;
                chunks.push(chunk);
            }
            in_flight.push_back(bucket.put_part(&key, &id, sent, chunks));
            pos += len;
            sent += 1;
            while in_flight.len() >= PARTS_IN_FLIGHT {
                let part = in_flight.next().await.expect("a part in flight");
                parts.push(part.map_err(|e| s3_error(what, e))?);
            }
            continue;
        }
        if end {
            break;
        }
        if landed.changed().await.is_err() {
            let e = io::Error::other("the download was dropped");
            return Err(StoreError::io(what, e));
        }
    }
    while let Some(part) = in_flight.next().await {
        parts.push(part.map_err(|e| s3_error(what, e))?);
    }
    drop(in_flight);
    Ok((upload, parts))
}

impl S3Write {
    /// Lets the uploader read `bytes` of the spool.
    fn landed(&self, bytes: u64, end: bool) {
        self.landed.send_replace(Landed { bytes, end });
    }
}

impl BlobWrite for S3Write {
    fn append(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(async move {
            let landed = self.spool.append(chunks).await?;
            self.landed(landed, false);
            Ok(landed)
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(async move {
            let landed = self.spool.flush().await?;
            self.landed(landed, false);
            Ok(landed)
        })
    }

    fn written(&self) -> Arc<dyn Written> {
        self.spool.written()
    }

    fn commit(mut self: Box<Self>, digest: Digest) -> BoxFuture<'static, StoreResult<()>> {
        Box::pin(async move {
            if digest != self.digest {
                let e = io::Error::other(format!(
                    "an upload for {} committed as {digest}",
                    self.digest
                ));
                return Err(StoreError::io("completing an upload", e));
            }
            let len = self.spool.flush().await?;
            self.landed(len, true);
            let uploader = self.uploader.take().expect("one commit");
            let (mut upload, parts) = uploader
                .await
                .unwrap_or_else(|e| Err(StoreError::io("uploading a part", io::Error::other(e))))?;
            self.bucket
                .complete_upload(&upload.key, &upload.id, parts)
                .await
                .map_err(|e| s3_error("completing an upload", e))?;
            upload.completed = true;
            if let Err(e) = absent_ok(self.bucket.delete(&upload.record).await) {
                tracing::warn!(key = %upload.record, error = %e, "could not remove an upload's record");
            }
            Ok(())
        })
    }
}

impl Drop for S3Write {
    fn drop(&mut self) {
        // Its `Upload`, dropped with the task (or with the task's result), is aborted.
        if let Some(t) = self.uploader.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn store(mem: &InMemory, spool: &Path, abandon_after: Duration) -> S3Store {
        let bucket = Bucket::new(mem.clone(), Metrics::new());
        S3Store::new(bucket, "test", "a/b", spool, abandon_after).unwrap()
    }

    async fn read_all(s: &S3Store, d: &Digest, start: u64, count: u64) -> Option<Vec<u8>> {
        let blob = s.open(d).await.unwrap()?;
        let chunks: Vec<io::Result<Bytes>> = blob.read(start, count, None).collect().await;
        Some(chunks.into_iter().flat_map(|c| c.unwrap()).collect())
    }

    /// Objects whose key starts with `prefix`.
    async fn keys(mem: &InMemory, prefix: &str) -> Vec<String> {
        let all: Vec<_> = mem.list(None).collect().await;
        all.into_iter()
            .map(|m| m.unwrap().location.to_string())
            .filter(|k| k.starts_with(prefix))
            .collect()
    }

    /// How many objects are under `prefix`, once they are `n` (the uploader and the
    /// aborts run on tasks of their own; waits 5 s at the most).
    async fn settle_keys(mem: &InMemory, prefix: &str, n: usize) -> usize {
        for _ in 0..500 {
            if keys(mem, prefix).await.len() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        keys(mem, prefix).await.len()
    }

    #[tokio::test]
    async fn uploads_are_visible_only_when_committed_and_followed_from_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let s = store(&mem, dir.path(), Duration::from_secs(3600));
        // Three parts: two whole ones and a short last one.
        let data: Vec<u8> = (0..2 * PART + 1000).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(Algorithm::Sha256, &data);
        let mut w = s.begin(&d, Some(data.len() as u64)).await.unwrap();
        let mut r = w.written().reader().unwrap();
        for chunk in data.chunks(super::super::CHUNK) {
            w.append(vec![Bytes::copy_from_slice(chunk)]).await.unwrap();
        }
        assert_eq!(w.flush().await.unwrap(), data.len() as u64);
        assert_eq!(r.read(None, 0, 10).await.unwrap(), &data[..10]);
        assert_eq!(settle_keys(&mem, "a/b/uploads/", 1).await, 1, "no record");
        assert!(s.open(&d).await.unwrap().is_none(), "visible before commit");
        w.commit(d.clone()).await.unwrap();
        let len = data.len() as u64;
        assert!(read_all(&s, &d, 0, len).await.unwrap() == data);
        let tail = read_all(&s, &d, PART as u64 - 5, 10).await.unwrap();
        assert_eq!(tail, &data[PART - 5..PART + 5]);
        assert!(keys(&mem, "a/b/uploads/").await.is_empty(), "record left");
        assert_eq!(keys(&mem, "a/b/blobs/").await.len(), 1);
    }

    #[tokio::test]
    async fn a_dropped_upload_is_aborted_and_a_wrong_digest_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let s = store(&mem, dir.path(), Duration::from_secs(3600));
        let data = vec![3u8; PART + 1];
        let d = Digest::of(Algorithm::Sha256, &data);
        let mut w = s.begin(&d, None).await.unwrap();
        w.append(vec![Bytes::from(data.clone())]).await.unwrap();
        assert_eq!(settle_keys(&mem, "a/b/uploads/", 1).await, 1, "no record");
        drop(w);
        assert_eq!(settle_keys(&mem, "a/b/uploads/", 0).await, 0, "record left");
        assert!(s.open(&d).await.unwrap().is_none());

        let other = Digest::of(Algorithm::Sha256, b"other");
        let mut w = s.begin(&d, None).await.unwrap();
        w.append(vec![Bytes::from(data)]).await.unwrap();
        assert!(w.commit(other.clone()).await.is_err());
        assert!(s.open(&d).await.unwrap().is_none() && s.open(&other).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn uploads_of_a_process_that_died_are_aborted_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let s = store(&mem, dir.path(), Duration::from_secs(3600));
        let d = Digest::of(Algorithm::Sha256, b"x");
        let mut w = s.begin(&d, None).await.unwrap();
        w.append(vec![Bytes::from_static(b"x")]).await.unwrap();
        assert_eq!(settle_keys(&mem, "a/b/uploads/", 1).await, 1, "no record");
        std::mem::forget(w);
        // Younger than the age of abandonment: another replica may be uploading it.
        assert!(s.list().await.unwrap().is_empty());
        assert_eq!(keys(&mem, "a/b/uploads/").await.len(), 1);
        let s = store(&mem, dir.path(), Duration::ZERO);
        s.list().await.unwrap();
        assert!(keys(&mem, "a/b/uploads/").await.is_empty(), "record left");
        assert!(s.open(&d).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_bucket_that_does_not_answer_holds_up_no_download() {
        use object_store::throttle::{ThrottleConfig, ThrottledStore};
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let hung = ThrottleConfig {
            wait_put_per_call: Duration::from_secs(3600),
            ..ThrottleConfig::default()
        };
        let bucket = Bucket::new(ThrottledStore::new(mem.clone(), hung), Metrics::new());
        let s = S3Store::new(bucket, "test", "a/b", dir.path(), Duration::from_secs(3600)).unwrap();
        // More parts than are ever in flight: none of them is ever uploaded.
        let data: Vec<u8> = (0..4 * PART + 7).map(|i| (i % 253) as u8).collect();
        let d = Digest::of(Algorithm::Sha256, &data);
        let mut w = s.begin(&d, Some(data.len() as u64)).await.unwrap();
        let mut r = w.written().reader().unwrap();
        let written = tokio::time::timeout(Duration::from_secs(60), async {
            for chunk in data.chunks(super::super::CHUNK) {
                w.append(vec![Bytes::copy_from_slice(chunk)]).await.unwrap();
            }
            w.flush().await.unwrap()
        })
        .await
        .expect("the download waited for the bucket");
        assert_eq!(written, data.len() as u64);
        let mut got = Vec::new();
        while got.len() < data.len() {
            let pos = got.len() as u64;
            let left = data.len() as u64 - pos;
            got.extend_from_slice(&r.read(None, pos, left).await.unwrap());
        }
        assert!(got == data, "the clients read the spool whole");
        assert!(keys(&mem, "a/b/blobs/").await.is_empty());
    }

    #[tokio::test]
    async fn manifests_and_tags_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let s = store(&mem, dir.path(), Duration::from_secs(3600));
        let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::of(Algorithm::Sha256, &body);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        s.put_manifest(&d, body.clone(), mt).await.unwrap();
        let m = s.manifest(&d).await.unwrap().unwrap();
        assert_eq!((m.body, m.media_type.as_str()), (body, mt));
        // Corrupted: absent.
        mem.put(&s.blob_key(&d), PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        assert!(s.manifest(&d).await.unwrap().is_none());
        s.remove(&d).await.unwrap();
        assert!(keys(&mem, "a/b/").await.is_empty());

        let key = TagKey {
            upstream: "docker.io",
            repository: "library/alpine",
            tag: "3",
        };
        let rec = TagRecord {
            upstream: "docker.io".into(),
            repository: "library/alpine".into(),
            tag: "3".into(),
            digest: d.to_string(),
            checked_at_ms: 7,
        };
        assert!(s.tag(key).await.unwrap().is_none());
        s.put_tag(&rec).await.unwrap();
        assert_eq!(s.tag(key).await.unwrap(), Some(rec));
        s.delete_tag(key).await.unwrap();
        assert!(s.tag(key).await.unwrap().is_none());
    }
}

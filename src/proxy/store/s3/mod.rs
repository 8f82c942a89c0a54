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

mod bucket;
mod eviction;
mod fetch_lease;
mod local;
mod upload;
pub use bucket::{Bucket, DOWN_FOR, REDIRECT_EXPIRY};
pub use eviction::{Merged, Stored, Uses};
pub use fetch_lease::FETCH_LEASE;
pub use upload::PART;

use super::disk::DiskStore;
use super::{
    BlobStore, BlobWrite, FetchClaim, LeaseReplicas, LinkRecord, Listed, Records, RepoKey,
    StoreError, StoreResult, StoredBlob, StoredManifest, TagKey, TagRecord, link_name, tag_name,
    unix_now_ms,
};
use crate::oci::Digest;
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use local::{LocalCopies, LocalOnly};
use object_store::path::Path as Key;
use object_store::{Attribute, Attributes, PutOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use upload::{S3Write, UploadRecord};

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

/// The cache's objects in a bucket.
pub struct S3Store {
    bucket: Bucket,
    /// The key prefix's segments.
    prefix: Vec<String>,
    /// Where the downloads in progress are spooled for their clients.
    spool: DiskStore,
    /// This replica's copies of blobs on its disk, read instead of the bucket's.
    local: Option<Arc<LocalCopies>>,
    /// Uploads older than this are taken for abandoned.
    abandon_after: Duration,
    /// Whether clients are sent to signed URLs of cached blobs.
    redirect: bool,
    /// `s3://bucket/prefix`, for what is logged.
    name: String,
    /// The bucket's name.
    bucket_name: String,
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
            bucket_name: name.to_string(),
            bucket,
            prefix,
            spool: DiskStore::spool(spool)?,
            local: None,
            abandon_after,
            redirect: false,
            access: None,
            writer: eviction::writer_id(),
            conditional: std::sync::OnceLock::new(),
        })
    }

    /// The same store, keeping up to `limit` bytes of copies of the blobs this replica
    /// stored or took from their owner under `root` (emptied), and reading those instead
    /// of the bucket's (see [`local`]). Not with `redirect`, whose clients read the
    /// bucket.
    pub fn with_local_copies(mut self, root: &Path, limit: u64) -> io::Result<S3Store> {
        if limit > 0 && !self.redirect {
            self.local = Some(Arc::new(LocalCopies::new(root, limit)?));
        }
        Ok(self)
    }

    /// A spool write for `digest`, and where it is kept once it is complete: a local
    /// copy, when this replica keeps them.
    async fn spool_write(
        &self,
        digest: &Digest,
        len: Option<u64>,
    ) -> StoreResult<(Box<dyn BlobWrite>, Option<Arc<LocalCopies>>)> {
        match &self.local {
            Some(local) => Ok((local.begin(digest, len).await?, Some(local.clone()))),
            None => Ok((self.spool.begin(digest, len).await?, None)),
        }
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

    /// The object `url` (`s3://<this bucket>/<key>`, the key whole, not under the
    /// cache's prefix) streamed: a bundle kept in the cache's own bucket. Its size, and
    /// its bytes.
    pub async fn object(
        &self,
        url: &str,
    ) -> io::Result<(u64, BoxStream<'static, io::Result<Bytes>>)> {
        let (bucket, key) = url
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(_, key)| !key.is_empty())
            .ok_or_else(|| io::Error::other(format!("{url} is not s3://<bucket>/<key>")))?;
        if bucket != self.bucket_name {
            return Err(io::Error::other(format!(
                "{url} is not in the cache's bucket ({}): only its own bucket's credentials are known",
                self.bucket_name
            )));
        }
        let key = Key::parse(key).map_err(io::Error::other)?;
        let (size, body) = self
            .bucket
            .get_stream(&key)
            .await
            .map_err(io::Error::other)?;
        Ok((size, body.map(|r| r.map_err(io::Error::other)).boxed()))
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

    fn everything(&self) -> BoxFuture<'_, StoreResult<Vec<Listed>>> {
        Box::pin(async move {
            Ok(self
                .inventory()
                .await?
                .into_iter()
                .map(|o| Listed {
                    digest: o.digest,
                    size: o.size,
                    used_ms: o.stored_ms,
                    manifest: o.manifest,
                })
                .collect())
        })
    }

    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<Box<dyn StoredBlob>>>> {
        let key = self.blob_key(digest);
        Box::pin(async move {
            if let Some(copy) = match &self.local {
                Some(local) => local.open(digest).await,
                None => None,
            } {
                return Ok(Some(copy));
            }
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
            let spool = self.spool_write(digest, len).await?;
            let (key, records) = (self.blob_key(digest), self.key(["uploads"]));
            let write = S3Write::begin(self.bucket.clone(), spool, digest, key, records);
            Ok(Box::new(write) as Box<dyn BlobWrite>)
        })
    }

    fn begin_local<'a>(
        &'a self,
        digest: &'a Digest,
        len: Option<u64>,
    ) -> BoxFuture<'a, StoreResult<Option<Box<dyn BlobWrite>>>> {
        Box::pin(async move {
            let (spool, keep) = self.spool_write(digest, len).await?;
            Ok(Some(Box::new(LocalOnly(spool, keep)) as Box<dyn BlobWrite>))
        })
    }

    fn remove<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let what = "removing a cached object";
            // The bytes first: a media type left behind is cleaned up by the next list.
            if let Some(local) = &self.local {
                local.remove(digest).await;
            }
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

    fn records(&self) -> BoxFuture<'_, StoreResult<Records>> {
        Box::pin(async move {
            let what = "listing the tag and link records";
            let mut records = Records::default();
            for folder in ["tags", "links"] {
                let listed = self
                    .bucket
                    .list(&self.key([folder]))
                    .await
                    .map_err(|e| s3_error(what, e))?;
                for meta in listed {
                    if let Some(bytes) = self.get_bytes(what, &meta.location).await? {
                        records.add(folder, &bytes);
                    }
                }
            }
            Ok(records)
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

    fn claim_fetch<'a>(
        &'a self,
        digest: &'a Digest,
        replicas: LeaseReplicas,
    ) -> BoxFuture<'a, FetchClaim> {
        Box::pin(self.claim(digest, replicas))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use crate::proxy::metrics::Metrics;
    use object_store::memory::InMemory;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

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

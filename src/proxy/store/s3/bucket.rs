//! The bucket as the cache uses it: objects and multipart uploads, every request
//! counted, timed and cut off when it takes too long, and the bucket left alone for a
//! while after it fails ([`DOWN_FOR`]).

use crate::api::proxy_config::S3Config;
use crate::proxy::metrics::Metrics;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::signer::{Method, Signer};
use object_store::{
    ClientOptions, GetOptions, GetRange, MultipartId, ObjectStore, ObjectStoreExt, PutOptions,
    PutPayload, RetryConfig,
};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The bucket, as the cache uses it: objects, and multipart uploads with their ids;
/// every request counted and timed (`pullthrough_store_*`).
#[derive(Clone)]
pub struct Bucket {
    objects: Arc<dyn ObjectStore>,
    parts: Arc<dyn MultipartStore>,
    pub(super) metrics: Metrics,
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

    pub(super) fn of<S: ObjectStore + MultipartStore>(
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
    pub(super) async fn signed_get(&self, key: &Key) -> object_store::Result<Option<String>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer.signed_url(Method::GET, key, REDIRECT_EXPIRY).await?;
        Ok(Some(url.to_string()))
    }

    /// Runs one request, counting it as `op`.
    pub(super) async fn timed<T>(
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

    pub(super) async fn head(&self, key: &Key) -> object_store::Result<object_store::ObjectMeta> {
        self.timed("head", self.objects.head(key)).await
    }

    /// An object whole.
    pub(super) async fn get_bytes(&self, key: &Key) -> object_store::Result<Bytes> {
        let bytes = self
            .timed("get", async { self.objects.get(key).await?.bytes().await })
            .await?;
        self.metrics.store_bytes(true).inc_by(bytes.len() as u64);
        Ok(bytes)
    }

    /// An object streamed (a bundle): its size, and its bytes as they come. The request
    /// is timed until its headers; the body has no limit of the bucket's own.
    pub(super) async fn get_stream(
        &self,
        key: &Key,
    ) -> object_store::Result<(u64, BoxStream<'static, object_store::Result<Bytes>>)> {
        let got = self.timed("get", self.objects.get(key)).await?;
        let size = got.meta.size;
        let metrics = self.metrics.clone();
        let body = got
            .into_stream()
            .inspect_ok(move |b| metrics.store_bytes(true).inc_by(b.len() as u64))
            .boxed();
        Ok((size, body))
    }

    pub(super) async fn put(
        &self,
        key: &Key,
        body: Bytes,
        opts: PutOptions,
    ) -> object_store::Result<()> {
        let len = body.len() as u64;
        self.timed(
            "put",
            self.objects.put_opts(key, PutPayload::from(body), opts),
        )
        .await?;
        self.metrics.store_bytes(false).inc_by(len);
        Ok(())
    }

    pub(super) async fn delete(&self, key: &Key) -> object_store::Result<()> {
        self.timed("delete", self.objects.delete(key)).await
    }

    /// Every object under `prefix`.
    pub(super) async fn list(
        &self,
        prefix: &Key,
    ) -> object_store::Result<Vec<object_store::ObjectMeta>> {
        self.timed("list", self.objects.list(Some(prefix)).try_collect())
            .await
    }

    pub(super) async fn create_upload(&self, key: &Key) -> object_store::Result<MultipartId> {
        self.timed("create_upload", self.parts.create_multipart(key))
            .await
    }

    pub(super) async fn put_part(
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

    pub(super) async fn complete_upload(
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

    pub(super) async fn abort_upload(
        &self,
        key: &Key,
        id: &MultipartId,
    ) -> object_store::Result<()> {
        self.timed("abort_upload", self.parts.abort_multipart(key, id))
            .await
    }

    /// `count` bytes from `start`, as they arrive.
    pub(super) fn read(
        &self,
        key: Key,
        start: u64,
        count: u64,
    ) -> BoxStream<'static, io::Result<Bytes>> {
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

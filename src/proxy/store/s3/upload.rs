//! A download's upload: spooled on the local disk for its clients, and uploaded in
//! parts from the spool by a task of its own as the bytes land, so that neither the
//! download nor its clients wait for the bucket. The multipart upload is completed only
//! on commit (for bytes that hash to the digest), aborted when dropped before, and
//! recorded under `uploads/` so that one whose process died is aborted at a later start.

use super::bucket::Bucket;
use super::local::LocalCopies;
use super::{absent_ok, s3_error};
use crate::oci::{Algorithm, Digest};
use crate::proxy::store::{BlobWrite, StoreError, StoreResult, Written};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use object_store::multipart::PartId;
use object_store::path::Path as Key;
use object_store::{MultipartId, PutOptions};
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Size of the parts a download is uploaded in (S3's least is 5 MiB but for the last).
pub const PART: usize = 8 << 20;

/// Parts of one download uploaded at once (at most 2 x 8 MiB of a download in memory
/// for the bucket).
const PARTS_IN_FLIGHT: usize = 2;

/// A multipart upload in progress, as recorded under `uploads/`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct UploadRecord {
    pub(super) key: String,
    pub(super) id: String,
}

/// The name of the record of the upload `id` of `key`.
fn record_name(key: &str, id: &str) -> String {
    Digest::of(Algorithm::Sha256, format!("{key}\0{id}").as_bytes())
        .hex()
        .to_string()
}

/// A download spooled for its clients and uploaded in parts from the spool by a task of
/// its own, which follows the spool as the bytes land: the download never waits for the
/// bucket (a slow or hung bucket delays only the blob's caching), and the parts are read
/// back from the page cache rather than held in memory.
pub(super) struct S3Write {
    /// Taken by a commit that keeps it as a local copy.
    spool: Option<Box<dyn BlobWrite>>,
    /// Where the spool is kept once the upload is complete, if anywhere.
    keep: Option<Arc<LocalCopies>>,
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
    fn spool(&mut self) -> &mut Box<dyn BlobWrite> {
        self.spool.as_mut().expect("the spool until commit")
    }

    /// Lets the uploader read `bytes` of the spool.
    fn landed(&self, bytes: u64, end: bool) {
        self.landed.send_replace(Landed { bytes, end });
    }
}

impl BlobWrite for S3Write {
    fn append(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(async move {
            let landed = self.spool().append(chunks).await?;
            self.landed(landed, false);
            Ok(landed)
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(async move {
            let landed = self.spool().flush().await?;
            self.landed(landed, false);
            Ok(landed)
        })
    }

    fn written(&self) -> Arc<dyn Written> {
        self.spool
            .as_ref()
            .expect("the spool until commit")
            .written()
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
            let len = self.spool().flush().await?;
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
            if let (Some(copies), Some(spool)) = (self.keep.take(), self.spool.take()) {
                copies.keep(spool, digest, len).await;
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

impl S3Write {
    /// A write of `digest` to `key` through `spool`: the upload begins on the uploader's
    /// task, so that a bucket that is slow to answer delays no client; its record goes
    /// under `records`. Once complete, the spool is kept in `keep`, if given.
    pub(super) fn begin(
        bucket: Bucket,
        (spool, keep): (Box<dyn BlobWrite>, Option<Arc<LocalCopies>>),
        digest: &Digest,
        key: Key,
        records: Key,
    ) -> S3Write {
        let (landed, rx) = watch::channel(Landed::default());
        let uploader = tokio::spawn(upload(bucket.clone(), key, records, spool.written(), rx));
        S3Write {
            spool: Some(spool),
            keep,
            bucket,
            digest: digest.clone(),
            landed,
            uploader: Some(uploader),
        }
    }
}

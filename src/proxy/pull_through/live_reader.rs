//! A client's view of a blob download in progress: it reads what the download has written
//! (all but the last byte until the digest is verified), through the store's [`Written`]
//! (`crate::proxy::store::Written`), which stays readable after the commit.

use super::fetch::FetchState;
use crate::proxy::store::WrittenReader;
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use std::io;
use tokio::sync::watch;

/// A client's view of a running download: reads up to what has been written (less the
/// last byte, withheld until the digest is verified).
pub(super) struct LiveReader {
    rx: watch::Receiver<FetchState>,
    reader: Option<Box<dyn WrittenReader>>,
    pos: u64,
    end: Option<u64>,
    /// The blob's length once it was seen verified: the bytes stay good (and readable
    /// through the reader) even if storing the blob then fails.
    verified: Option<u64>,
    pub(super) finished: bool,
    /// The connection's, to send file ranges where the store can (see
    /// [`crate::proxy::store::StoredBlob::read`]).
    spans: Option<Spans>,
}

impl LiveReader {
    /// A reader of the bytes `start..end` (to the end of the blob without `end`).
    pub(super) fn new(
        rx: watch::Receiver<FetchState>,
        start: u64,
        end: Option<u64>,
        spans: Option<Spans>,
    ) -> LiveReader {
        LiveReader {
            rx,
            reader: None,
            pos: start,
            end,
            verified: None,
            finished: false,
            spans,
        }
    }

    pub(super) async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            let state = self.rx.borrow_and_update().clone();
            if self.reader.is_none()
                && let Some(source) = state.source()
            {
                self.reader = Some(source.0.reader().map_err(io::Error::other)?);
            }
            // How much may be read, and whether that is all.
            let (available, ended) = match (&state, self.verified) {
                (FetchState::Done { len, .. } | FetchState::Unstored { len, .. }, _) => {
                    (*len, true)
                }
                (FetchState::Verified { len, .. }, _) => {
                    self.verified = Some(*len);
                    (*len, true)
                }
                (_, Some(len)) => (len, true),
                (FetchState::Connecting, None) => (0, false),
                (FetchState::Streaming { written, .. }, None) => (written.saturating_sub(1), false),
                (FetchState::Failed(e), None) => {
                    return Err(io::Error::other(format!("upstream download failed: {e}")));
                }
                (FetchState::Uncacheable { .. }, None) => {
                    return Err(io::Error::other("the download was not cached"));
                }
            };
            let limit = available.min(self.end.unwrap_or(u64::MAX));
            if self.pos < limit {
                let reader = self
                    .reader
                    .as_mut()
                    .expect("a state with bytes to read has their source");
                let chunk = reader
                    .read(self.spans.as_ref(), self.pos, limit - self.pos)
                    .await?;
                self.pos += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if ended {
                return Ok(None);
            }
            self.rx
                .changed()
                .await
                .map_err(|_| io::Error::other("download abandoned"))?;
        }
    }
}

#[cfg(test)]
mod tests {

    use super::super::fetch::Source;
    use super::*;
    use crate::proxy::error::ProxyError;
    use crate::proxy::store::{BlobStore, BlobWrite, CHUNK, DiskStore, PageCache};
    use crate::proxy::test_support::*;
    use std::time::Duration;

    /// A reader of a download of `data`, all of it written to the store.
    async fn live_reader(
        dir: &std::path::Path,
        data: &[u8],
    ) -> (
        watch::Sender<FetchState>,
        Source,
        Box<dyn BlobWrite>,
        LiveReader,
    ) {
        let (store, _) = DiskStore::open(dir).unwrap();
        let store = store.with_page_cache(PageCache::Full);
        let digest = crate::oci::Digest::of(crate::oci::Algorithm::Sha256, data);
        let mut write = store.begin(&digest, None).await.unwrap();
        write
            .append(vec![Bytes::copy_from_slice(data)])
            .await
            .unwrap();
        write.flush().await.unwrap();
        let source = Source(write.written());
        let (tx, rx) = watch::channel(FetchState::Streaming {
            len: Some(data.len() as u64),
            written: data.len() as u64,
            source: source.clone(),
        });
        (tx, source, write, LiveReader::new(rx, 0, None, None))
    }

    #[tokio::test]
    async fn live_readers_get_the_last_byte_once_verified_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (tx, source, _write, mut r) = live_reader(dir.path(), &data).await;
        assert_same(
            &r.next_chunk().await.unwrap().unwrap(),
            &data[..999],
            "all but one",
        );
        let early = tokio::time::timeout(Duration::from_millis(100), r.next_chunk()).await;
        assert!(early.is_err(), "the last byte went out before verification");

        // Verified: the rest and the end, while the write is still being committed.
        tx.send_replace(FetchState::Verified { len: 1000, source });
        assert_same(
            &r.next_chunk().await.unwrap().unwrap(),
            &data[999..],
            "the rest",
        );
        assert!(r.next_chunk().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn verified_bytes_still_go_out_when_storing_the_blob_fails() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 10).map(|i| (i % 251) as u8).collect();
        let (tx, source, write, mut r) = live_reader(dir.path(), &data).await;
        tx.send_replace(FetchState::Verified {
            len: data.len() as u64,
            source,
        });
        let mut got = r.next_chunk().await.unwrap().unwrap().to_vec();
        // Committing failed: the write is aborted (its file removed), the download failed.
        drop(write);
        tx.send_replace(FetchState::Failed(ProxyError::internal("disk gone")));
        while let Some(chunk) = r.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_same(&got, &data, "the blob");
    }

    #[tokio::test]
    async fn verified_bytes_go_out_to_a_reader_that_missed_the_verification() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 10).map(|i| (i % 253) as u8).collect();
        let (tx, source, write, mut r) = live_reader(dir.path(), &data).await;
        let mut got = r.next_chunk().await.unwrap().unwrap().to_vec();
        // Verified, then not kept by the store, both while this reader was busy (a slow
        // client): it sees only the second state.
        let len = data.len() as u64;
        tx.send_replace(FetchState::Verified {
            len,
            source: source.clone(),
        });
        drop(write);
        let error = ProxyError::internal("the bucket refused it");
        tx.send_replace(FetchState::Unstored { len, source, error });
        while let Some(chunk) = r.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_same(&got, &data, "the blob");
    }
}

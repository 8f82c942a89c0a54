//! A client's view of a blob download in progress: it reads the temp file as it grows
//! (all but the last byte until the digest is verified), then the committed file.

use super::*;
use crate::proxy::zero_copy::Spans;
use std::io;
use std::path::PathBuf;
use tokio::sync::watch;

/// A client's view of a running download: reads the temp file up to what has been
/// written (less the last byte, withheld until the digest is verified), then the
/// committed file.
pub(super) struct LiveReader {
    pub(super) rx: watch::Receiver<FetchState>,
    pub(super) temp: PathBuf,
    pub(super) final_path: PathBuf,
    pub(super) file: Option<ChunkReader>,
    pub(super) pos: u64,
    pub(super) end: Option<u64>,
    /// The blob's length once it was seen verified: the bytes stay good (and readable
    /// from an open file) even if storing the blob then fails.
    pub(super) verified: Option<u64>,
    pub(super) finished: bool,
    /// The connection's, to send what is in the page cache from the file (as
    /// [`file_chunks`] does).
    pub(super) spans: Option<Spans>,
    /// How the file is read (see [`PageCache`]).
    pub(super) page_cache: PageCache,
}

impl LiveReader {
    pub(super) async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            let state = self.rx.borrow_and_update().clone();
            // How much may be read, whether that is all, whether the file was renamed.
            let (available, ended, committed) = match (&state, self.verified) {
                (FetchState::Done { len }, _) => (*len, true, true),
                (FetchState::Verified { len }, _) => {
                    self.verified = Some(*len);
                    (*len, true, false)
                }
                (_, Some(len)) => (len, true, false),
                (FetchState::Connecting, None) => (0, false, false),
                (FetchState::Streaming { written, .. }, None) => {
                    (written.saturating_sub(1), false, false)
                }
                (FetchState::Failed(e), None) => {
                    return Err(io::Error::other(format!("upstream download failed: {e}")));
                }
                (FetchState::Uncacheable { .. }, None) => {
                    return Err(io::Error::other("the download was not cached"));
                }
            };
            let limit = available.min(self.end.unwrap_or(u64::MAX));
            if self.pos < limit {
                if self.file.is_none() && !self.open(committed).await? {
                    self.rx
                        .changed()
                        .await
                        .map_err(|_| io::Error::other("download abandoned"))?;
                    continue;
                }
                let reader = self.file.as_mut().expect("opened above");
                let chunk = reader
                    .next(self.spans.as_ref(), self.pos, limit - self.pos, CHUNK)
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

    /// Opens the temp file (or the committed one once done). `false` when neither is
    /// there yet: the rename is in progress and the state is about to change.
    pub(super) async fn open(&mut self, committed: bool) -> io::Result<bool> {
        let paths = if committed {
            vec![&self.final_path]
        } else {
            vec![&self.temp, &self.final_path]
        };
        for path in paths {
            match tokio::fs::File::open(path).await {
                Ok(f) => {
                    self.file = Some(ChunkReader::new(f.into_std().await, self.page_cache));
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        if committed {
            return Err(io::Error::other("committed blob is missing"));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::pull_through::test_support::*;
    use std::time::Duration;

    /// A reader of a download of `data`, all of it written to the temp file.
    fn live_reader(dir: &std::path::Path, data: &[u8]) -> (watch::Sender<FetchState>, LiveReader) {
        let temp = dir.join("temp");
        std::fs::write(&temp, data).unwrap();
        let (tx, rx) = watch::channel(FetchState::Streaming {
            len: Some(data.len() as u64),
            written: data.len() as u64,
        });
        let reader = LiveReader {
            rx,
            temp,
            final_path: dir.join("final"),
            file: None,
            pos: 0,
            end: None,
            verified: None,
            finished: false,
            spans: None,
            page_cache: PageCache::Full,
        };
        (tx, reader)
    }

    #[tokio::test]
    async fn live_readers_get_the_last_byte_once_verified_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (tx, mut r) = live_reader(dir.path(), &data);
        assert_same(
            &r.next_chunk().await.unwrap().unwrap(),
            &data[..999],
            "all but one",
        );
        let early = tokio::time::timeout(Duration::from_millis(100), r.next_chunk()).await;
        assert!(early.is_err(), "the last byte went out before verification");

        // Verified: the rest and the end, while the file is still being flushed.
        tx.send_replace(FetchState::Verified { len: 1000 });
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
        let (tx, mut r) = live_reader(dir.path(), &data);
        tx.send_replace(FetchState::Verified {
            len: data.len() as u64,
        });
        let mut got = r.next_chunk().await.unwrap().unwrap().to_vec();
        // Flushing or renaming failed: the temp file is removed and the download failed.
        std::fs::remove_file(dir.path().join("temp")).unwrap();
        tx.send_replace(FetchState::Failed(ProxyError::internal("disk gone")));
        while let Some(chunk) = r.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_same(&got, &data, "the blob");
    }
}

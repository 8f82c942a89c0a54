//! Reading a cached blob back. Stored bytes are trusted only as far as this process has
//! checked them: what it committed itself was verified as it was written; what it found
//! on its disk at start, and whatever a shared bucket holds (whoever may write the bucket
//! can change an object under any name), is checked against the digest as it is read,
//! its last chunk held back until the whole matches, as a download's is. A range of an
//! object not yet checked is served once the whole object was read and matched. An
//! object that does not match is dropped, and fetched from the upstream again. A
//! replica's own copy of a bucket's blob (see `store::s3::local`) was checked as this
//! process wrote it, and is read as a verified file.
//!
//! Of a shared bucket, the first bytes are awaited before the client is answered: a
//! bucket that takes the request and never answers leaves the request to the upstream,
//! not the client to a status line followed by a broken body.

use super::blobs::Blobs;
use super::{BlobAnswer, ByteRange};
use crate::oci::{Digest, Hasher};
use crate::proxy::error::ProxyError;
use crate::proxy::index::Index;
use crate::proxy::metrics::{CacheResult, Metrics};
use crate::proxy::store::{StoreError, StoredBlob};
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use std::io;

/// A blob's chunks as they are read.
type Chunks = BoxStream<'static, io::Result<Bytes>>;

impl Blobs {
    /// A cached blob's answer, or `None` if it is not cached (or was, and did not match
    /// its digest). With `spans` (an HTTP/1 connection), the body of a checked object may
    /// hand the connection file ranges to send instead of bytes (see
    /// [`crate::proxy::store::StoredBlob::read`]). `unlinked`: the digest is not linked to
    /// the repository asked for, and its being cached is [`ProxyError::NotLinked`].
    pub(super) async fn cached_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
        spans: Option<&Spans>,
        unlinked: bool,
    ) -> Result<Option<BlobAnswer>, ProxyError> {
        // Held by the body stream: the blob cannot be evicted while it is being sent.
        // Not in the index, it may still be in a store another replica shares.
        let known = self.space.index().acquire(digest);
        let shared = self.space.store().shared();
        if known.is_none() && !shared {
            return Ok(None);
        }
        let Some(blob) = self.space.store().open(digest).await? else {
            if known.is_some() {
                self.space.discard(digest).await;
            }
            return Ok(None);
        };
        if unlinked {
            return Err(ProxyError::NotLinked);
        }
        let guard = known.unwrap_or_else(|| self.space.index().adopt(digest, blob.len(), None));
        let len = blob.len();
        let hit = |range, body| {
            Ok(Some(BlobAnswer {
                len: Some(len),
                range,
                body,
                result: CacheResult::Hit,
                redirect: None,
                via_owner: false,
            }))
        };
        if head {
            return hit(None, None);
        }
        // A store that hands out URLs of its own: the client fetches the bytes there (and
        // checks them against the digest, as every OCI client does).
        if let Some(url) = self.space.store().presign(digest).await? {
            return Ok(Some(BlobAnswer {
                redirect: Some(url),
                ..hit(None, None)?.expect("an answer")
            }));
        }
        let span = match range {
            Some(r) => Some(
                r.resolve(len)
                    .ok_or(ProxyError::RangeNotSatisfiable { len })?,
            ),
            None => None,
        };
        // A replica's own copy of a bucket's blob was checked as it was written.
        let from_bucket = shared && !blob.verified();
        let checked = blob.verified() || self.space.index().verified(digest);
        let blob = match span {
            // A range cannot be checked alone: the whole object first, once.
            Some(_) if !checked => {
                if !self.check_whole(digest, blob).await? {
                    return Ok(None);
                }
                match self.space.store().open(digest).await? {
                    Some(b) => b,
                    None => return Ok(None),
                }
            }
            _ => blob,
        };
        let check_as_read = span.is_none() && (from_bucket || !checked);
        let (start, count) = span.map_or((0, len), |(s, e)| (s, e - s + 1));
        let spans = if check_as_read { None } else { spans.cloned() };
        let mut chunks = blob.read(start, count, spans);
        if from_bucket {
            chunks = first_chunk(chunks).await?;
        }
        if check_as_read {
            let record = self.recorder(digest);
            chunks = hold_last(chunks, digest.clone(), len, record);
        }
        let body = chunks
            .map(move |chunk| {
                let _held = &guard;
                chunk
            })
            .boxed();
        hit(span, Some(body))
    }

    /// Reads a stored blob whole and says whether it matches `digest` (recorded, see
    /// [`Self::recorder`]).
    async fn check_whole(
        &self,
        digest: &Digest,
        blob: Box<dyn StoredBlob>,
    ) -> Result<bool, ProxyError> {
        let len = blob.len();
        let mut chunks = blob.read(0, len, None);
        let mut hasher = Hasher::new(digest.algorithm());
        let mut got = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| StoreError::io("checking a cached blob", e))?;
            got += chunk.len() as u64;
            hasher.update(&chunk);
        }
        let matched = got == len && hasher.finish() == *digest;
        record(self.space.index(), &self.metrics, digest, matched);
        if !matched {
            // Gone before this request goes on to the upstream for it.
            self.space.discard(digest).await;
        }
        Ok(matched)
    }

    /// What is done once a stored blob was read whole as it streamed: recorded, and a
    /// mismatch dropped from the cache (in the background: the stream cannot wait).
    fn recorder(&self, digest: &Digest) -> impl FnOnce(bool) + Send + 'static {
        let (index, metrics, digest) = (
            self.space.index().clone(),
            self.metrics.clone(),
            digest.clone(),
        );
        move |matched| {
            record(&index, &metrics, &digest, matched);
            if !matched {
                tokio::spawn(async move { index.discard(&digest).await });
            }
        }
    }
}

/// Counts a stored blob read back whole and checked: a match needs no check again.
fn record(index: &Index, metrics: &Metrics, digest: &Digest, matched: bool) {
    metrics.read_check(matched);
    if matched {
        index.set_verified(digest);
    } else {
        tracing::warn!(%digest, "a cached blob does not match its digest: dropped, fetched again");
    }
}

/// `chunks` as they come, once the first is here: an error (a store that did not answer
/// in its time) is the store's failure, told before anything is sent.
async fn first_chunk(mut chunks: Chunks) -> Result<Chunks, ProxyError> {
    match chunks.next().await {
        None => Ok(stream::empty().boxed()),
        Some(Ok(first)) => Ok(stream::once(async { Ok(first) }).chain(chunks).boxed()),
        Some(Err(e)) => Err(StoreError::io("reading a cached blob", e).into()),
    }
}

/// What [`hold_last`] keeps between chunks.
struct Holding<F> {
    chunks: Chunks,
    /// `None` once the stream has ended (or failed).
    hasher: Option<Hasher>,
    held: Option<Bytes>,
    got: u64,
    digest: Digest,
    len: u64,
    done: Option<F>,
}

/// `chunks` (the `len` bytes of `digest`), hashed as they go, the last one held back
/// until the whole matches: a client never gets all of a wrong body, its read fails
/// instead. `done(matched)` is called at the end (not if the client leaves first).
fn hold_last<F>(chunks: Chunks, digest: Digest, len: u64, done: F) -> Chunks
where
    F: FnOnce(bool) + Send + 'static,
{
    let start = Holding {
        chunks,
        hasher: Some(Hasher::new(digest.algorithm())),
        held: None,
        got: 0,
        digest,
        len,
        done: Some(done),
    };
    stream::unfold(start, |mut st| async move {
        loop {
            st.hasher.as_ref()?;
            match st.chunks.next().await {
                Some(Ok(chunk)) => {
                    st.got += chunk.len() as u64;
                    if let Some(h) = st.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    if let Some(previous) = st.held.replace(chunk) {
                        return Some((Ok(previous), st));
                    }
                }
                Some(Err(e)) => {
                    st.hasher = None;
                    return Some((Err(e), st));
                }
                None => {
                    let got = st.hasher.take().map(Hasher::finish);
                    let matched = st.got == st.len && got.as_ref() == Some(&st.digest);
                    if let Some(done) = st.done.take() {
                        done(matched);
                    }
                    if matched {
                        return st.held.take().map(|last| (Ok(last), st));
                    }
                    let e = io::Error::other("the cached blob does not match its digest");
                    return Some((Err(e), st));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use std::sync::{Arc, Mutex};

    async fn run(parts: &[&[u8]], digest: Digest, len: u64) -> (Vec<io::Result<Bytes>>, Vec<bool>) {
        let chunks: Vec<io::Result<Bytes>> = parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let out = hold_last(stream::iter(chunks).boxed(), digest, len, move |m| {
            s.lock().unwrap().push(m)
        })
        .collect()
        .await;
        let seen = seen.lock().unwrap().clone();
        (out, seen)
    }

    #[tokio::test]
    async fn the_last_chunk_goes_out_only_when_the_whole_matches() {
        let d = Digest::of(Algorithm::Sha256, b"abcdef");
        let (out, seen) = run(&[b"ab", b"cd", b"ef"], d.clone(), 6).await;
        let bytes: Vec<u8> = out.into_iter().flat_map(|c| c.unwrap()).collect();
        assert_eq!((bytes.as_slice(), seen), (&b"abcdef"[..], vec![true]));

        // Other bytes: everything but the last chunk, then an error.
        let (out, seen) = run(&[b"ab", b"cd", b"eX"], d.clone(), 6).await;
        assert_eq!(seen, [false]);
        assert_eq!(out.len(), 3);
        assert!(out[..2].iter().all(Result::is_ok) && out[2].is_err());
        // Short: the same.
        let (out, seen) = run(&[b"ab", b"cd"], d, 6).await;
        assert_eq!((out.len(), seen), (2, vec![false]));
        assert!(out[1].is_err());
    }
}

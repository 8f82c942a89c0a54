//! Bodies read from cache files: in chunks whose buffers are reused, from the page cache
//! on the task or from the disk on the blocking pool, and as file ranges for `sendfile(2)`
//! where the connection takes them (see [`crate::proxy::zero_copy`]).

use crate::proxy::zero_copy::{MAX_SPAN, Spans};
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use std::io;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// Size of disk reads and writes.
pub const CHUNK: usize = 256 * 1024;

/// Size of the reads of a cached blob served with one of the [`LARGE_READERS`] slots.
/// Fewer, larger reads and socket writes cost less CPU per byte: about 10% less server
/// CPU and 4-7% more warm throughput than 256 KiB reads here (docs/benchmarks.md), for up
/// to 3 MiB of chunk buffers per connection instead of 768 KiB (see [`RECYCLED`]).
pub(super) const LARGE_CHUNK: usize = 1 << 20;

/// How many connections at once may serve a cached blob in [`LARGE_CHUNK`] reads; the
/// others read [`CHUNK`]s. This bounds what the larger reads add to memory (at most
/// 4 x 3 MiB of buffers), however many clients pull at once. Four slots cover one node
/// pulling an image: containerd downloads three layers at a time by default.
pub(super) const LARGE_READERS: usize = 4;

/// A [`ChunkReader`] lets its task's worker thread run other tasks after handing out
/// this many bytes from the page cache: read without waiting, or as file ranges for
/// `sendfile(2)` (see [`crate::proxy::zero_copy`]). Those reads and sends to a fast
/// socket are always ready, so without it a connection sending a blob keeps its worker
/// until tokio's budget of 128 socket writes runs out (128 MiB at [`LARGE_CHUNK`]s):
/// meanwhile the requests queued behind it wait, and an idle worker cannot take one of
/// two busy connections over. Two clients at once fetched a cached blob 30-44% faster
/// with it here (docs/proxy.md).
pub(super) const YIELD_EVERY: u64 = 1 << 20;

/// `count` bytes of `reader`'s file from `start`, a chunk at a time (see [`ChunkReader`]).
///
/// With `spans`, each [`MAX_SPAN`] of the file that is in the page cache becomes a
/// placeholder frame, and the connection sends those bytes from the file itself
/// (`sendfile(2)`, see [`crate::proxy::zero_copy`]). The rest (all of it without `spans`) is
/// read and yielded: in [`LARGE_CHUNK`]s while the stream holds a `large` slot (given
/// back when the stream is dropped), else in [`CHUNK`]s.
pub(super) fn file_chunks(
    reader: ChunkReader,
    start: u64,
    count: u64,
    large: Option<OwnedSemaphorePermit>,
    spans: Option<Spans>,
) -> BoxStream<'static, io::Result<Bytes>> {
    struct State {
        reader: ChunkReader,
        pos: u64,
        left: u64,
        spans: Option<Spans>,
        _large: Option<OwnedSemaphorePermit>,
    }
    let chunk = if large.is_some() { LARGE_CHUNK } else { CHUNK };
    let state = State {
        reader,
        pos: start,
        left: count,
        spans,
        _large: large,
    };
    futures::stream::unfold(Some(state), move |state| async move {
        let mut s = state?;
        if s.left == 0 {
            return None;
        }
        match s.reader.next(s.spans.as_ref(), s.pos, s.left, chunk).await {
            Ok(data) => {
                let n = data.len() as u64;
                s.pos += n;
                s.left -= n;
                Some((Ok(data), Some(s)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

/// How many chunk buffers a [`ChunkReader`] keeps for reuse: the connection holds about
/// two chunks queued for the socket while the next one is read.
const RECYCLED: usize = 3;

/// Reads a file known to hold the bytes asked for, a chunk at a time.
///
/// Data already in the page cache is read on the calling task (`preadv2` with
/// `RWF_NOWAIT`): handing every chunk to the blocking pool cost more CPU than the copy
/// itself on a warm pull. Data that would wait for the disk (or a kernel or file system
/// without the flag) is read on the blocking pool.
///
/// The buffers of chunks handed out are reused once the connection has sent them and
/// dropped its copy (the reader keeps a clone and checks that it is the only one left), so
/// that serving a cached blob neither allocates nor zeroes memory for each chunk. A buffer
/// still held anywhere else is never written to.
pub(super) struct ChunkReader {
    file: Arc<std::fs::File>,
    page_cache: PageCache,
    sent: Vec<Bytes>,
    /// Bytes read from the page cache since the task last let its worker go (see
    /// [`YIELD_EVERY`]).
    unyielded: u64,
    /// Where the last span found in the page cache ended: the next span from there has
    /// its first byte's page checked already (see [`Self::span`]).
    resident_to: Option<u64>,
}

/// How a [`ChunkReader`] reads without waiting for the disk: what decides between the
/// page-cache paths (read on the task, `sendfile(2)` ranges) and the blocking pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageCache {
    /// Ask the kernel (`preadv2` with `RWF_NOWAIT`).
    Kernel,
    /// As if nothing were in the page cache: every read goes to the blocking pool. Tests
    /// use it because the kernel evicts pages when it likes, not when asked.
    #[cfg(test)]
    Empty,
    /// As if everything were in the page cache (plain reads of a file the test just
    /// wrote, which the kernel might have partly evicted).
    #[cfg(test)]
    Full,
}

impl PageCache {
    /// Reads into `buf` at `pos` only what is in the page cache; `Err` (`EAGAIN`, or a
    /// kernel without the flag) when that is nothing.
    fn read_nowait(self, file: &std::fs::File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        use rustix::io::{ReadWriteFlags, preadv2};
        match self {
            PageCache::Kernel => Ok(preadv2(
                file,
                &mut [io::IoSliceMut::new(buf)],
                pos,
                ReadWriteFlags::NOWAIT,
            )?),
            #[cfg(test)]
            PageCache::Empty => Err(rustix::io::Errno::AGAIN.into()),
            #[cfg(test)]
            PageCache::Full => {
                let mut got = 0;
                while got < buf.len() {
                    match rustix::io::pread(file, &mut buf[got..], pos + got as u64)? {
                        0 => break,
                        n => got += n,
                    }
                }
                Ok(got)
            }
        }
    }
}

impl ChunkReader {
    pub(super) fn new(file: std::fs::File, page_cache: PageCache) -> ChunkReader {
        ChunkReader::shared(Arc::new(file), page_cache)
    }

    /// A reader of a file others read too.
    pub(super) fn shared(file: Arc<std::fs::File>, page_cache: PageCache) -> ChunkReader {
        ChunkReader {
            file,
            page_cache,
            sent: Vec::with_capacity(RECYCLED),
            unyielded: 0,
            resident_to: None,
        }
    }

    /// The next of the `left` (> 0) bytes at `pos`: with `spans`, a placeholder frame for
    /// up to [`MAX_SPAN`] of them if they are in the page cache (see [`Self::span`]), else
    /// up to `chunk` of them read (see [`Self::read`]).
    pub(super) async fn next(
        &mut self,
        spans: Option<&Spans>,
        pos: u64,
        left: u64,
        chunk: usize,
    ) -> io::Result<Bytes> {
        if let Some(spans) = spans {
            let want = left.min(MAX_SPAN as u64) as usize;
            if let Some(frame) = self.span(spans, pos, want).await {
                return Ok(frame);
            }
        }
        self.read(pos, left.min(chunk as u64) as usize).await
    }

    /// Lets the worker thread go if [`YIELD_EVERY`] bytes went out since it last did.
    async fn yield_now_and_then(&mut self) {
        if self.unyielded >= YIELD_EVERY {
            self.unyielded = 0;
            tokio::task::yield_now().await;
        }
    }

    /// A placeholder frame for the `want` (1 to [`MAX_SPAN`]) bytes at `pos`, registered
    /// with `spans`, if they are in the page cache: `sendfile(2)` must not wait for the
    /// disk on a worker thread. Only the range's first and last bytes are checked (pages
    /// are read and dropped in runs), and only the last when the range goes on from the
    /// last one sent (whose last byte was checked: a client following a download takes
    /// many short spans); a page evicted in between makes the send wait for the disk.
    /// `None` when the bytes must be read instead.
    async fn span(&mut self, spans: &Spans, pos: u64, want: usize) -> Option<Bytes> {
        self.yield_now_and_then().await;
        let last = pos + want as u64 - 1;
        let first = (self.resident_to != Some(pos)).then_some(pos);
        let resident = first.into_iter().chain([last]).all(|at| {
            let mut byte = [0u8];
            matches!(
                self.page_cache.read_nowait(&self.file, &mut byte, at),
                Ok(1)
            )
        });
        let frame = if resident {
            spans.frame(&self.file, pos, want)
        } else {
            None
        };
        self.resident_to = frame.is_some().then_some(last + 1);
        if frame.is_some() {
            self.unyielded += want as u64;
        }
        frame
    }

    /// Between 1 and `want` (> 0) bytes at `pos`; an error if the file ends there, since
    /// callers read only what they know was written.
    async fn read(&mut self, pos: u64, want: usize) -> io::Result<Bytes> {
        self.yield_now_and_then().await;
        let mut buf = self.buffer(want);
        if let Ok(n @ 1..) = self.page_cache.read_nowait(&self.file, &mut buf, pos) {
            buf.truncate(n);
            self.unyielded += n as u64;
            return Ok(self.hand_out(buf));
        }
        // The buffer was not filled: keep it for the next chunk. The task waits for the
        // blocking pool below, which lets its worker go.
        self.keep(buf.freeze());
        self.unyielded = 0;
        let file = self.file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(want);
            rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), pos)?;
            Ok::<_, io::Error>(buf)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))?;
        if buf.is_empty() {
            return Err(io::Error::other("cache file is shorter than expected"));
        }
        Ok(Bytes::from(buf))
    }

    /// A `want`-byte buffer: a sent chunk's that nobody holds any more, or a new one.
    fn buffer(&mut self, want: usize) -> BytesMut {
        let free = self.sent.iter().position(Bytes::is_unique);
        let mut buf = match free.map(|i| self.sent.swap_remove(i).try_into_mut()) {
            Some(Ok(buf)) => buf,
            _ => BytesMut::zeroed(want),
        };
        buf.resize(want, 0);
        buf
    }

    fn hand_out(&mut self, buf: BytesMut) -> Bytes {
        let chunk = buf.freeze();
        self.keep(chunk.clone());
        chunk
    }

    fn keep(&mut self, buffer: Bytes) {
        if self.sent.len() < RECYCLED {
            self.sent.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::*;
    use std::collections::HashSet;
    use tokio::sync::Semaphore;

    /// Reads every chunk of a `count`-byte span from `start` and joins them, in both
    /// chunk sizes; fails unless both give the same bytes.
    async fn read_span(
        file: &std::fs::File,
        page_cache: PageCache,
        start: u64,
        count: u64,
    ) -> io::Result<Vec<u8>> {
        let mut both = Vec::new();
        for large in [None, Some(one_slot())] {
            let reader = ChunkReader::new(file.try_clone()?, page_cache);
            let chunks: Vec<io::Result<Bytes>> = file_chunks(reader, start, count, large, None)
                .collect()
                .await;
            let mut out = Vec::new();
            for c in chunks {
                out.extend_from_slice(&c?);
            }
            both.push(out);
        }
        let large = both.pop().expect("two reads");
        assert_same(&both[0], &large, "the two chunk sizes");
        Ok(large)
    }

    fn one_slot() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    #[tokio::test]
    async fn a_large_read_slot_sets_the_chunk_size_until_the_stream_is_dropped() {
        let (_dir, path, data) = blob_file(LARGE_CHUNK * 2 + 1000);
        let len = data.len() as u64;
        let open = || ChunkReader::new(std::fs::File::open(&path).unwrap(), PageCache::Full);

        let sizes = |chunks: Vec<io::Result<Bytes>>| -> Vec<usize> {
            chunks.into_iter().map(|c| c.unwrap().len()).collect()
        };
        let small = sizes(file_chunks(open(), 0, len, None, None).collect().await);
        assert_eq!(small.len(), (LARGE_CHUNK * 2 + 1000).div_ceil(CHUNK));
        assert!(
            small[..small.len() - 1].iter().all(|n| *n == CHUNK),
            "{small:?}"
        );

        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().unwrap();
        let mut stream = file_chunks(open(), 0, len, Some(slot), None);
        assert_eq!(stream.next().await.unwrap().unwrap().len(), LARGE_CHUNK);
        assert_eq!(slots.available_permits(), 0, "the stream holds its slot");
        drop(stream);
        assert_eq!(
            slots.available_permits(),
            1,
            "a dropped stream gives it back"
        );

        let slot = slots.clone().try_acquire_owned().unwrap();
        let large = sizes(
            file_chunks(open(), 0, len, Some(slot), None)
                .collect()
                .await,
        );
        assert_eq!(large, [LARGE_CHUNK, LARGE_CHUNK, 1000]);
        assert_eq!(
            slots.available_permits(),
            1,
            "a finished stream gives it back"
        );
    }

    #[tokio::test]
    async fn a_stream_of_a_cached_blob_lets_other_tasks_run_every_mib() {
        let (_dir, path, _) = blob_file(LARGE_CHUNK * 3);
        let open = || ChunkReader::new(std::fs::File::open(&path).unwrap(), PageCache::Full);
        // Every read is ready at once (as from the page cache), so only the stream's own
        // yields let the ticker run (one thread here).
        let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        for large in [Some(one_slot()), None] {
            let mut seen = Vec::new();
            let mut stream = file_chunks(open(), 0, (LARGE_CHUNK * 3) as u64, large, None);
            while let Some(chunk) = stream.next().await {
                chunk.unwrap();
                seen.push(ticks.load(std::sync::atomic::Ordering::Relaxed));
            }
            // The first chunk of each MiB after the first comes after a yield.
            let step = seen.len() / 3;
            for mib in 1..3 {
                assert!(
                    seen[mib * step] > seen[mib * step - 1],
                    "no other task ran after MiB {mib}: ticks after each chunk {seen:?}"
                );
            }
        }
        ticker.abort();
    }

    /// A `len`-byte file of known bytes on the build's own disk (a tmpfs /tmp would keep
    /// its pages in memory whatever the test asks), flushed, so that the kernel may drop
    /// its pages from the page cache when asked (see [`drop_from_page_cache`]).
    fn file_on_disk(len: usize) -> (tempfile::TempDir, std::fs::File, Vec<u8>) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        (dir, file, data)
    }

    /// Asks the kernel to drop a flushed file's pages. It is a hint: some or all pages
    /// may stay, or come back by read-ahead, so tests assert only what holds either way.
    fn drop_from_page_cache(file: &std::fs::File) {
        rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    #[tokio::test]
    async fn cached_blobs_are_read_from_memory_or_from_disk() {
        let (_dir, path, data) = blob_file(CHUNK * 2 + 1000);
        let file = std::fs::File::open(&path).unwrap();
        let len = data.len() as u64;

        for page_cache in [PageCache::Full, PageCache::Empty] {
            let what = format!("{page_cache:?}");
            // Read on the task (in the page cache) or on the blocking pool (not in it),
            // whole and from an offset.
            let whole = read_span(&file, page_cache, 0, len).await.unwrap();
            assert_same(&whole, &data, &what);
            let tail = read_span(&file, page_cache, 7, len - 7).await.unwrap();
            assert_same(&tail, &data[7..], &what);
            // A file shorter than the span asked for is an error, not a short body.
            let err = read_span(&file, page_cache, 0, len + 10).await.unwrap_err();
            assert!(err.to_string().contains("shorter"), "{what}: {err}");
        }

        // The real kernel, with the pages perhaps dropped, perhaps not: the same bytes.
        let (_dir, file, data) = file_on_disk(CHUNK * 2 + 1000);
        drop_from_page_cache(&file);
        let tail = read_span(&file, PageCache::Kernel, 3, len - 3)
            .await
            .unwrap();
        assert_same(&tail, &data[3..], "kernel");
    }

    /// What a connection would send for `frames`: each placeholder replaced by the bytes
    /// of the next range registered with `spans` (which must start where the frame does
    /// and be as long), every other frame as it is.
    fn as_sent(frames: &[Bytes], spans: &Spans, file: &std::fs::File, start: u64) -> Vec<u8> {
        use crate::proxy::zero_copy::is_placeholder;
        let mut ranges = spans.pending().into_iter();
        let mut out = Vec::new();
        for frame in frames {
            let at = start + out.len() as u64;
            if is_placeholder(frame) {
                let (offset, len) = ranges.next().expect("a range for each placeholder");
                assert_eq!((offset, len), (at, frame.len()), "range out of step");
                let mut buf = vec![0u8; len];
                rustix::io::pread(file, &mut buf, offset).unwrap();
                out.extend_from_slice(&buf);
            } else {
                out.extend_from_slice(frame);
            }
        }
        assert!(ranges.next().is_none(), "a range without its placeholder");
        out
    }

    #[tokio::test]
    async fn blobs_in_the_page_cache_go_out_as_file_ranges_the_rest_as_bytes() {
        use crate::proxy::zero_copy::is_placeholder;
        let (_dir, path, data) = blob_file(MAX_SPAN * 2 + 1000);
        let file = std::fs::File::open(&path).unwrap();
        let len = data.len() as u64;
        let frames = |page_cache, start, spans: &Spans| {
            let reader = ChunkReader::new(file.try_clone().unwrap(), page_cache);
            file_chunks(reader, start, len - start, None, Some(spans.clone()))
                .map(Result::unwrap)
                .collect::<Vec<Bytes>>()
        };

        // In the page cache: every frame a placeholder, the ranges registered in order.
        let spans = Spans::default();
        let sent = frames(PageCache::Full, 5, &spans).await;
        assert!(sent.iter().all(|f| is_placeholder(f)));
        let sizes: Vec<usize> = sent.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [MAX_SPAN, MAX_SPAN, 995]);
        assert_eq!(
            spans.pending(),
            [
                (5, MAX_SPAN),
                (5 + MAX_SPAN as u64, MAX_SPAN),
                (5 + 2 * MAX_SPAN as u64, 995)
            ]
        );
        assert_same(&as_sent(&sent, &spans, &file, 5), &data[5..], "ranges");

        // Not in the page cache: read (on the blocking pool) and yielded as bytes, and no
        // range registered.
        let spans = Spans::default();
        let sent = frames(PageCache::Empty, 0, &spans).await;
        assert!(sent.iter().all(|f| !is_placeholder(f)));
        assert_eq!(sent[0].len(), CHUNK);
        assert!(spans.pending().is_empty());
        assert_same(&sent.concat(), &data, "bytes");

        // The real kernel, with the pages perhaps dropped, perhaps not: ranges where they
        // are in memory, bytes elsewhere, and together exactly the file.
        let (_dir, file, data) = file_on_disk(MAX_SPAN * 2 + 1000);
        drop_from_page_cache(&file);
        let spans = Spans::default();
        let reader = ChunkReader::new(file.try_clone().unwrap(), PageCache::Kernel);
        let sent: Vec<Bytes> = file_chunks(reader, 0, len, None, Some(spans.clone()))
            .map(Result::unwrap)
            .collect()
            .await;
        assert_same(&as_sent(&sent, &spans, &file, 0), &data, "kernel");
    }

    #[tokio::test]
    async fn chunk_buffers_are_reused_only_once_released() {
        let (_dir, path, data) = blob_file(CHUNK * 6);
        let mut reader = ChunkReader::new(std::fs::File::open(&path).unwrap(), PageCache::Full);
        let at = |i: usize| (i * CHUNK) as u64;
        let chunk = |i: usize| &data[i * CHUNK..(i + 1) * CHUNK];

        // While every chunk handed out is still held, each read gets a buffer of its own.
        let mut held = Vec::new();
        for i in 0..=RECYCLED {
            held.push(reader.read(at(i), CHUNK).await.unwrap());
        }
        for (i, c) in held.iter().enumerate() {
            assert_same(c, chunk(i), &format!("chunk {i}"));
        }
        let buffers: HashSet<*const u8> = held.iter().map(|c| c.as_ptr()).collect();
        assert_eq!(buffers.len(), held.len());

        // Once released, the buffers are read into again.
        drop(held);
        let again = reader.read(at(4), CHUNK).await.unwrap();
        assert!(
            buffers.contains(&again.as_ptr()),
            "a released buffer was not reused"
        );
        assert_same(&again, chunk(4), "chunk 4 read again");
        drop(again);

        // A short chunk's buffer serves a whole chunk afterwards.
        let tail = reader.read(at(6) - 100, CHUNK).await.unwrap();
        assert_same(&tail, &data[6 * CHUNK - 100..], "the tail");
        drop(tail);
        for i in [5, 0] {
            let c = reader.read(at(i), CHUNK).await.unwrap();
            assert_same(&c, chunk(i), &format!("chunk {i} after the tail"));
        }
    }
}

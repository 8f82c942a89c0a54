//! Sending file ranges from the page cache to a client with `sendfile(2)`, underneath
//! hyper's HTTP/1 connection, so that serving a cached blob copies no byte through user
//! space.
//!
//! hyper writes every byte of a response through its connection's I/O object.
//! [`ZeroCopyIo`] is that object for the servers here: a TCP stream that lets a response
//! body hand over file ranges instead of bytes. The body registers a range with the
//! connection's [`Spans`] and yields a placeholder frame: a slice of a region of memory
//! that nothing else uses and nothing reads. hyper's HTTP/1 connection queues body frames
//! without copying them (with vectored writes, which the accept loop asks for) and passes
//! them to the I/O object as `IoSlice`s. Where a slice points into the placeholder region,
//! [`ZeroCopyIo`] sends the registered range with `sendfile(2)` instead, as many bytes as
//! the slice holds. How far into the region a slice starts says how far into its range
//! hyper has got, so partial writes resume where they stopped.
//!
//! Only HTTP/1 requests carry [`Spans`]: HTTP/2 copies frames into its own buffers, which
//! would send the placeholder's zeros. A placeholder slice the connection cannot account
//! for fails the write, and hyper closes the connection: the client sees a short body,
//! never wrong bytes.
//!
//! What this relies on in hyper: its HTTP/1 connection, with `writev(true)` (the queue
//! write strategy), keeps each body frame as a buffer of its own and hands them to
//! `poll_write_vectored` as they are, never copying one into a buffer of its own. The
//! test `hyper_hands_body_frames_over_uncopied` serves placeholder frames through a real
//! hyper connection and fails if a hyper upgrade changes that (the client would then get
//! the placeholder's zeros). The bytes sent this way are counted in
//! `pullthrough_sendfile_bytes_total`.

use bytes::Bytes;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Longest range one placeholder frame stands for.
pub const MAX_SPAN: usize = 1 << 20;

/// The placeholder region. Allocated zeroed and never touched, so it costs address space,
/// not memory.
static PLACEHOLDER: LazyLock<&'static [u8]> =
    LazyLock::new(|| Vec::leak(vec![0u8; MAX_SPAN]) as &'static [u8]);

/// Cleared the first time `sendfile(2)` refuses a cache file (a file system without it):
/// from then on bodies are copied.
static SENDFILE_WORKS: AtomicBool = AtomicBool::new(true);

/// Where `slice` starts in the placeholder region, if it lies in it.
fn placeholder_offset(slice: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let at = (slice.as_ptr() as usize).checked_sub(base)?;
    (at < MAX_SPAN && !slice.is_empty()).then_some(at)
}

struct Span {
    file: Arc<File>,
    offset: u64,
    len: usize,
    sent: usize,
}

/// The file ranges a connection's responses have registered and not yet sent, in the order
/// of their placeholder frames. Cloned into each HTTP/1 request's extensions.
#[derive(Clone, Default)]
pub struct Spans(Arc<Mutex<VecDeque<Span>>>);

impl Spans {
    /// A placeholder frame standing for `len` (1 to [`MAX_SPAN`]) bytes of `file` from
    /// `offset`, to be yielded by the response body in place of those bytes; `None` when
    /// ranges cannot be sent this way, and the bytes must be read and yielded instead.
    ///
    /// The caller must know that the file holds those bytes; the frame must be yielded
    /// (a frame that is dropped unsent leaves the connection out of step, and its next
    /// placeholder fails).
    pub fn frame(&self, file: &Arc<File>, offset: u64, len: usize) -> Option<Bytes> {
        assert!(
            (1..=MAX_SPAN).contains(&len),
            "a span of {len} bytes (1 to {MAX_SPAN})"
        );
        if !SENDFILE_WORKS.load(Ordering::Relaxed) {
            return None;
        }
        self.0.lock().expect("spans lock").push_back(Span {
            file: file.clone(),
            offset,
            len,
            sent: 0,
        });
        Some(Bytes::from_static(&PLACEHOLDER[..len]))
    }
}

/// A server connection's TCP stream, as hyper's I/O object: placeholder slices are sent
/// from their files (see the module documentation), every other byte as written.
pub struct ZeroCopyIo {
    io: TokioIo<TcpStream>,
    spans: Spans,
    sent: Option<IntCounter>,
}

impl ZeroCopyIo {
    /// Wraps `stream`; `spans` is what the connection's requests register ranges with,
    /// and `sent` counts the bytes that went out with `sendfile(2)`.
    pub fn new(stream: TcpStream, spans: Spans, sent: Option<IntCounter>) -> ZeroCopyIo {
        ZeroCopyIo {
            io: TokioIo::new(stream),
            spans,
            sent,
        }
    }

    /// Sends up to `len` bytes of the oldest registered range, from `at` bytes into it.
    fn poll_span(
        &mut self,
        cx: &mut Context<'_>,
        at: usize,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let mut spans = self.spans.0.lock().expect("spans lock");
        let Some(span) = spans
            .front_mut()
            .filter(|s| s.sent == at && at + len <= s.len)
        else {
            return Poll::Ready(Err(io::Error::other(
                "a placeholder frame that matches no registered file range",
            )));
        };
        let tcp = self.io.inner();
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            let mut offset = span.offset + at as u64;
            let sent = tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(tcp, &*span.file, Some(&mut offset), len)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cache file shorter than the range being sent",
                    )));
                }
                Ok(n) => {
                    if let Some(sent) = &self.sent {
                        sent.inc_by(n as u64);
                    }
                    span.sent += n;
                    if span.sent == span.len {
                        spans.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    if matches!(
                        e.raw_os_error(),
                        Some(code) if code == rustix::io::Errno::INVAL.raw_os_error()
                            || code == rustix::io::Errno::NOSYS.raw_os_error()
                    ) {
                        SENDFILE_WORKS.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, "sendfile(2) refused a cache file; blobs are copied from now on");
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl Read for ZeroCopyIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for ZeroCopyIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Writes the slices in order, each run of ordinary slices with one `writev`, each
    /// placeholder slice with `sendfile`; stops at the first that is not written whole.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut written = 0;
        let mut rest = bufs;
        while !rest.is_empty() {
            let ordinary = rest
                .iter()
                .position(|s| placeholder_offset(s).is_some())
                .unwrap_or(rest.len());
            let (step, want) = if ordinary > 0 {
                let want: usize = rest[..ordinary].iter().map(|s| s.len()).sum();
                let step = Pin::new(&mut this.io).poll_write_vectored(cx, &rest[..ordinary]);
                rest = &rest[ordinary..];
                (step, want)
            } else {
                let slice = &rest[0];
                let at = placeholder_offset(slice).expect("a placeholder slice");
                rest = &rest[1..];
                (this.poll_span(cx, at, slice.len()), slice.len())
            };
            match step {
                Poll::Ready(Ok(n)) => {
                    written += n;
                    if n < want {
                        break;
                    }
                }
                // What was written is reported; the error or the wait comes again with
                // the next call.
                Poll::Ready(Err(_)) | Poll::Pending if written > 0 => break,
                other => return other,
            }
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The proxy's connections: each a [`ZeroCopyIo`] whose HTTP/1 requests carry its
/// [`Spans`] (HTTP/2 copies body frames into its own buffers, so its requests get none).
pub struct ZeroCopy {
    /// Counts the bytes sent with `sendfile(2)` (`pullthrough_sendfile_bytes_total`).
    pub sent: IntCounter,
}

impl crate::server::Connection for ZeroCopy {
    type Io = ZeroCopyIo;

    fn open(&self, stream: TcpStream) -> (ZeroCopyIo, crate::server::Tag) {
        let spans = Spans::default();
        let io = ZeroCopyIo::new(stream, spans.clone(), Some(self.sent.clone()));
        let tag = Box::new(move |req: &mut hyper::Request<hyper::body::Incoming>| {
            if req.version() < hyper::Version::HTTP_2 {
                req.extensions_mut().insert(spans.clone());
            }
        });
        (io, tag)
    }
}

/// Whether `frame` is a placeholder frame (see [`Spans::frame`]).
#[cfg(test)]
pub(crate) fn is_placeholder(frame: &[u8]) -> bool {
    placeholder_offset(frame).is_some()
}

#[cfg(test)]
impl Spans {
    /// The registered ranges not yet sent, as (offset, length).
    pub(crate) fn pending(&self) -> Vec<(u64, usize)> {
        let spans = self.0.lock().expect("spans lock");
        spans
            .iter()
            .map(|s| (s.offset + s.sent as u64, s.len - s.sent))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncReadExt;

    fn file_of(data: &[u8]) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, data).unwrap();
        (dir, Arc::new(File::open(&path).unwrap()))
    }

    /// A loopback connection: the server's end as a [`ZeroCopyIo`], and the client's.
    /// Small socket buffers on both ends, so that a client that does not read soon makes
    /// the server's writes come back short.
    async fn connection(spans: &Spans) -> (ZeroCopyIo, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Accepted connections inherit it.
        socket.set_send_buffer_size(16 << 10).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4).unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(16 << 10).unwrap();
        let client = client.connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (
            ZeroCopyIo::new(accepted.unwrap().0, spans.clone(), None),
            client.unwrap(),
        )
    }

    /// Writes `frames` in order the way hyper does: as many as are left in each vectored
    /// write, advancing past what each write took. Returns how many writes took less than
    /// they were given.
    async fn write_all(io: &mut ZeroCopyIo, mut frames: Vec<Bytes>) -> io::Result<usize> {
        let mut short = 0;
        while !frames.is_empty() {
            let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
            let want: usize = frames.iter().map(Bytes::len).sum();
            let mut n = poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, &slices)).await?;
            if n < want {
                short += 1;
            }
            while n > 0 {
                let take = n.min(frames[0].len());
                bytes::Buf::advance(&mut frames[0], take);
                n -= take;
                if frames[0].is_empty() {
                    frames.remove(0);
                }
            }
        }
        Ok(short)
    }

    #[tokio::test]
    async fn placeholder_frames_go_out_as_the_bytes_of_their_file_ranges() {
        let data: Vec<u8> = (0..3 * MAX_SPAN + 5).map(|i| (i % 253) as u8).collect();
        let (_dir, file) = file_of(&data);
        let spans = Spans::default();
        let (mut server, mut client) = connection(&spans).await;
        let frames = vec![
            Bytes::from_static(b"head\r\n"),
            spans.frame(&file, 0, MAX_SPAN).unwrap(),
            spans.frame(&file, MAX_SPAN as u64, MAX_SPAN).unwrap(),
            Bytes::from_static(b"between"),
            spans.frame(&file, 2 * MAX_SPAN as u64 + 3, 2).unwrap(),
            spans.frame(&file, 7, 10).unwrap(),
        ];
        assert!(frames[1..3].iter().all(|f| is_placeholder(f)));
        assert!(!is_placeholder(&frames[0]));
        let mut expected = b"head\r\n".to_vec();
        expected.extend_from_slice(&data[..2 * MAX_SPAN]);
        expected.extend_from_slice(b"between");
        expected.extend_from_slice(&data[2 * MAX_SPAN + 3..2 * MAX_SPAN + 5]);
        expected.extend_from_slice(&data[7..17]);

        // The client reads only after a while: the socket fills, so writes come back
        // short and must resume inside a range.
        let len = expected.len();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let mut got = vec![0u8; len];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        let short = write_all(&mut server, frames).await.unwrap();
        assert!(
            short > 0,
            "no write came back short: resuming was not tested"
        );
        assert!(spans.pending().is_empty(), "{:?}", spans.pending());
        let got = reader.await.unwrap();
        assert!(
            got == expected,
            "the client got other bytes than the file's"
        );
    }

    #[tokio::test]
    async fn hyper_hands_body_frames_over_uncopied() {
        use http_body_util::{BodyExt, StreamBody};
        use hyper::body::Frame;
        let data: Vec<u8> = (0..2 * MAX_SPAN + 77).map(|i| (i % 241) as u8).collect();
        let (_dir, file) = file_of(&data);
        let len = data.len();
        let tail = Bytes::copy_from_slice(&data[2 * MAX_SPAN..]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let spans = Spans::default();
            let io = ZeroCopyIo::new(stream, spans.clone(), None);
            let service = hyper::service::service_fn(move |_req| {
                // The body as the cache yields it: placeholders for two file ranges, and
                // some bytes after them.
                let frames: Vec<Result<Frame<Bytes>, io::Error>> = vec![
                    Ok(Frame::data(spans.frame(&file, 0, MAX_SPAN).unwrap())),
                    Ok(Frame::data(
                        spans.frame(&file, MAX_SPAN as u64, MAX_SPAN).unwrap(),
                    )),
                    Ok(Frame::data(tail.clone())),
                ];
                let body = StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-length", len)
                            .body(body)
                            .unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(true)
                .serve_connection(io, service)
                .await;
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut client,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let body = &answer[body_at..];
        assert_eq!(body.len(), 2 * MAX_SPAN + 77);
        assert!(
            body == &data[..],
            "hyper copied the frames: the client got the placeholder's zeros"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_placeholder_that_matches_no_range_fails_the_write() {
        let data = vec![7u8; 4096];
        let (_dir, file) = file_of(&data);
        let spans = Spans::default();
        let (mut server, _client) = connection(&spans).await;

        // No range registered for it (a frame of another connection, say).
        let other = Spans::default().frame(&file, 0, 100).unwrap();
        let err = write_all(&mut server, vec![other]).await.unwrap_err();
        assert!(
            err.to_string().contains("no registered file range"),
            "{err}"
        );

        // Out of step: starts past where the registered range stands.
        let frame = spans.frame(&file, 0, 100).unwrap();
        let err = write_all(&mut server, vec![frame.slice(10..)])
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("no registered file range"),
            "{err}"
        );

        // Ordinary bytes before a bad placeholder still go out, and are reported.
        let slices = [IoSlice::new(b"ok"), IoSlice::new(&frame[20..])];
        let n = poll_fn(|cx| Pin::new(&mut server).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_range_fails_the_write() {
        let (_dir, file) = file_of(&[1u8; 100]);
        let spans = Spans::default();
        let (mut server, _client) = connection(&spans).await;
        let frame = spans.frame(&file, 50, 80).unwrap();
        let err = write_all(&mut server, vec![frame]).await.unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
    }
}

//! The HTTP plumbing every role shares: an accept loop with graceful shutdown, and the
//! small operations server (`/metrics`, `/healthz`, `/readyz`) of the controller and the
//! node agent.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::header;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Response body type of every server.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A body with these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What one client may hold of a server: how many connections at once, and for how
/// long a connection may sit without a request or without a byte moving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once; beyond it a new one is answered 503 and closed.
    pub max_connections: usize,
    /// Time for a new connection's first request head to arrive (also between
    /// requests on an HTTP/1 connection kept alive).
    pub header_timeout: Duration,
    /// Time an open connection with no request being handled may go without a byte
    /// read or written (an idle HTTP/2 connection, a client that stopped reading).
    pub idle_timeout: Duration,
}

impl ConnLimits {
    /// The operations endpoints': few connections, nothing slow. Their clients (probes,
    /// Prometheus, the controller) send a request as soon as they connect: a connection
    /// that does not is closed after 5 s, so idle connections cannot hold the port.
    pub const OPS: ConnLimits = ConnLimits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
    };
}

/// What a connection's watchdog looks at: when bytes last moved, how many requests
/// arrived, and how many are being handled.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    requests: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Counts a request from its head's arrival until its handler has answered.
    fn enter(self: &Arc<Self>) -> Busy {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// Returns once the connection has been idle too long: no request head within
    /// `header_timeout` of opening, or, later, no request being handled and no byte
    /// moved for `idle_timeout`.
    async fn idle(&self, limits: ConnLimits) {
        loop {
            let now = Instant::now();
            let deadline = if self.requests.load(Ordering::Relaxed) == 0 {
                self.opened + limits.header_timeout
            } else {
                self.opened
                    + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
                    + limits.idle_timeout
            };
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            if now >= deadline && !busy {
                return;
            }
            // A request being handled (waiting for its upstream, say) keeps the
            // connection: look again in a while.
            let again = now + limits.idle_timeout.min(Duration::from_secs(1));
            tokio::time::sleep_until(if now >= deadline { again } else { deadline }).await;
        }
    }
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's I/O object that tells its [`Activity`] when bytes move.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if polled.is_ready() {
            self.activity.touch();
        }
        polled
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How many connections over the limit are answered at once.
const REFUSALS: usize = 16;

/// The answer to a connection over the limit: written, then the connection is closed.
fn too_many_connections() -> Vec<u8> {
    let body = crate::oci::error::error_body(
        crate::oci::ErrorCode::TooManyRequests,
        "too many connections; try again shortly",
    );
    let mut answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Retry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body.as_ref());
    answer
}

/// The answer to a probe (`GET /healthz` or `GET /readyz`) whose request `head` came on
/// a connection over the limit, as a whole HTTP/1.1 message: probes are answered
/// whatever else holds the connections, so that a pod is not taken for dead because
/// someone keeps its port busy. `None` for any other request.
fn probe_over_the_limit(ops: &dyn Ops, head: &[u8]) -> Option<Vec<u8>> {
    let line = head.split(|&b| b == b'\r' || b == b'\n').next()?;
    let mut parts = std::str::from_utf8(line).ok()?.split(' ');
    let (Some("GET"), Some(path)) = (parts.next(), parts.next()) else {
        return None;
    };
    let (status, body) = probe(ops, path)?;
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body.as_bytes());
    Some(answer)
}

/// The answer to `GET path` when it is a probe (`/healthz`, `/readyz`).
fn probe(ops: &dyn Ops, path: &str) -> Option<(StatusCode, String)> {
    match path {
        "/healthz" => Some((StatusCode::OK, "ok\n".into())),
        "/readyz" => Some(match ops.readiness() {
            Ok(()) => match ops.degraded() {
                Some(why) => (StatusCode::OK, format!("ready, degraded: {why}\n")),
                None => (StatusCode::OK, "ready\n".into()),
            },
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }),
        _ => None,
    }
}

/// Logs at most one warning a minute, for events that can come by the thousand.
fn warn_now(last: &AtomicU64) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let before = last.load(Ordering::Relaxed);
    now >= before + 60
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Tags a request with what its connection gives it (in its extensions).
pub type Tag = Box<dyn Fn(&mut Request<Incoming>) + Send + Sync>;

/// What a server makes of each connection it accepts: the I/O object hyper serves it
/// through, and the tag each of its requests gets.
pub trait Connection: Send + Sync + 'static {
    /// The I/O object.
    type Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static;
    /// The connection over `stream`.
    fn open(&self, stream: tokio::net::TcpStream) -> (Self::Io, Tag);
}

/// Connections served as they are (the operations endpoints).
pub struct Plain;

impl Connection for Plain {
    type Io = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

    fn open(&self, stream: tokio::net::TcpStream) -> (Self::Io, Tag) {
        (hyper_util::rt::TokioIo::new(stream), Box::new(|_| {}))
    }
}

/// Accepts connections until `stop` turns true, serving each (HTTP/1.1 or h2c) with
/// `handler` on a task tracked by `tracker`; open connections are asked to finish. Each
/// connection is made by `connections` (the proxy's send blob bytes with `sendfile(2)`,
/// see [`crate::proxy::zero_copy`]).
///
/// `limits` bound what clients hold: a connection over `max_connections` is answered
/// 503 and closed (but for a probe, answered from `probes` when given), one that sends
/// no request head in time or sits idle is closed, and accept errors (out of file
/// descriptors) back off instead of spinning.
pub async fn accept_loop<C, F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
    limits: ConnLimits,
    connections: Arc<C>,
    handler: F,
    probes: Option<Arc<dyn Ops>>,
) where
    C: Connection,
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Connections over the limit being answered: themselves bounded, since each holds
    // a file descriptor while its request is read (beyond it they are just closed).
    let refusals = Arc::new(Semaphore::new(REFUSALS));
    let (accept_warned, full_warned) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    if warn_now(&accept_warned) {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if warn_now(&full_warned) {
                tracing::warn!(
                    limit = limits.max_connections,
                    "connection limit reached: answering new connections 503"
                );
            }
            let Ok(refusal) = refusals.clone().try_acquire_owned() else {
                continue;
            };
            let probes = probes.clone();
            tracker.spawn(async move {
                let _refusal = refusal;
                refuse(stream, probes).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stop = stop.clone();
        let (io, tag) = connections.open(stream);
        tracker.spawn(async move {
            let _slot = slot;
            serve_connection(io, tag, handler, peer, limits, stop).await;
        });
    }
}

/// Answers a connection over the limit and closes it: a probe of the operations port
/// with its answer (`probes`), anything else 503. The request is read first (what of it
/// arrives within half a second), so that an HTTP client reads the answer as the answer
/// to its request; all within a second.
async fn refuse(mut stream: tokio::net::TcpStream, probes: Option<Arc<dyn Ops>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut head = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut head)).await;
        let n = read.ok().and_then(Result::ok).unwrap_or(0);
        let answer = probes
            .as_deref()
            .and_then(|ops| probe_over_the_limit(ops, &head[..n]))
            .unwrap_or_else(too_many_connections);
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves one connection (HTTP/1 or HTTP/2) with `handler` until it ends, goes idle past
/// the limits, or `stop` says so (requests under way get 10 s to finish).
async fn serve_connection<I, F, Fut>(
    io: I,
    tag: Tag,
    handler: F,
    peer: SocketAddr,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Body frames queued as they are, never copied into one buffer: what lets
    // the proxy's placeholder frames reach its I/O object (see `zero_copy`).
    builder
        .http1()
        .writev(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let activity = Activity::new();
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    let requests = activity.clone();
    let conn = builder.serve_connection(
        io,
        service_fn(move |mut req: Request<Incoming>| {
            tag(&mut req);
            let busy = requests.enter();
            let answer = handler(req, peer);
            async move {
                let answer = answer.await;
                drop(busy);
                answer
            }
        }),
    );
    tokio::pin!(conn);
    // Stopping lets requests finish; an idle connection has nothing to finish
    // (or a client that stopped reading): it goes at once.
    let grace = tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.changed() => Duration::from_secs(10),
        _ = activity.idle(limits) => Duration::from_secs(1),
    };
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, conn).await;
}

/// What an operations server exposes.
pub trait Ops: Send + Sync + 'static {
    /// Prometheus text of every metric.
    fn metrics(&self) -> String;
    /// `Ok` when ready to serve, else why not.
    fn readiness(&self) -> Result<(), String>;
    /// Ready but impaired: said in the `/readyz` body.
    fn degraded(&self) -> Option<String> {
        None
    }
}

/// Answers `/metrics`, `/healthz` and `/readyz`.
pub async fn handle_ops(
    ops: Arc<dyn Ops>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, ctype)
            .body(full(body))
            .expect("valid response")
    };
    if req.method() == Method::GET
        && let Some((status, body)) = probe(ops.as_ref(), req.uri().path())
    {
        return Ok(text(status, body, "text/plain"));
    }
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            text(StatusCode::OK, ops.metrics(), "text/plain; version=0.0.4")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    })
}

/// Serves an operations endpoint until `stop` turns true.
pub async fn serve_ops(listener: TcpListener, ops: Arc<dyn Ops>, stop: watch::Receiver<bool>) {
    let tracker = TaskTracker::new();
    let probes = Some(ops.clone());
    accept_loop(
        listener,
        stop,
        tracker.clone(),
        ConnLimits::OPS,
        Arc::new(Plain),
        move |req, _| handle_ops(ops.clone(), req),
        probes,
    )
    .await;
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

/// Registers `collectors` with `registry` and returns the names of the series they can
/// export (a histogram's `_bucket`, `_sum` and `_count`), for checks that dashboards and
/// alerts use real names.
pub fn register_all(
    registry: &prometheus::Registry,
    collectors: Vec<Box<dyn prometheus::core::Collector>>,
) -> Vec<String> {
    let mut names = Vec::new();
    for c in collectors {
        for family in c.collect() {
            let name = family.name();
            if family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            } else {
                names.push(name.to_string());
            }
        }
        registry.register(c).expect("unique metric");
    }
    names
}

/// Prometheus text exposition of everything in `registry`.
pub fn render(registry: &prometheus::Registry) -> String {
    let mut buf = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut buf,
    )
    .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("text encoding is utf-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_all_registers_and_names_every_series() {
        let registry = prometheus::Registry::new();
        let count =
            prometheus::IntCounterVec::new(prometheus::Opts::new("t_total", "t"), &["l"]).unwrap();
        let hist =
            prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t_seconds", "t"))
                .unwrap();
        let names = register_all(
            &registry,
            vec![Box::new(count.clone()), Box::new(hist.clone())],
        );
        assert_eq!(
            names,
            [
                "t_total",
                "t_seconds_bucket",
                "t_seconds_sum",
                "t_seconds_count"
            ]
        );
        count.with_label_values(&["x"]).inc();
        hist.observe(0.5);
        let text = render(&registry);
        for name in &names {
            assert!(text.contains(name.as_str()), "{name} not in {text}");
        }
    }
}

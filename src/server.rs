//! The HTTP plumbing every role shares: an accept loop with graceful shutdown, and the
//! small operations server (`/metrics`, `/healthz`, `/readyz`) of the controller and the
//! node agent.

use crate::zero_copy::{Spans, ZeroCopyIo};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::header;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Response body type of every server.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A body with these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Accepts connections until `stop` turns true, serving each (HTTP/1.1 or h2c) with
/// `handler` on a task tracked by `tracker`; open connections are asked to finish.
/// HTTP/1 requests carry their connection's [`Spans`] in their extensions, for bodies
/// that send file ranges with `sendfile(2)` (see [`crate::zero_copy`]).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
    handler: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut stop = stop.clone();
        tracker.spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // Body frames queued as they are, never copied into one buffer: what lets
            // placeholder frames reach `ZeroCopyIo` (see `zero_copy`).
            builder.http1().writev(true);
            let spans = Spans::default();
            let io = ZeroCopyIo::new(stream, spans.clone());
            let conn = builder.serve_connection(
                io,
                service_fn(move |mut req: Request<Incoming>| {
                    // HTTP/2 copies body frames: its requests get no spans.
                    if req.version() < Version::HTTP_2 {
                        req.extensions_mut().insert(spans.clone());
                    }
                    handler(req, peer)
                }),
            );
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
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
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            text(StatusCode::OK, ops.metrics(), "text/plain; version=0.0.4")
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        (&Method::GET, "/readyz") => match ops.readiness() {
            Ok(()) => match ops.degraded() {
                Some(why) => text(
                    StatusCode::OK,
                    format!("ready, degraded: {why}\n"),
                    "text/plain",
                ),
                None => text(StatusCode::OK, "ready\n".into(), "text/plain"),
            },
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{why}\n"),
                "text/plain",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    })
}

/// Serves an operations endpoint until `stop` turns true.
pub async fn serve_ops(listener: TcpListener, ops: Arc<dyn Ops>, stop: watch::Receiver<bool>) {
    let tracker = TaskTracker::new();
    accept_loop(listener, stop, tracker.clone(), move |req, _| {
        handle_ops(ops.clone(), req)
    })
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

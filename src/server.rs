//! The HTTP plumbing every role shares: an accept loop with graceful shutdown, and the
//! small operations server (`/metrics`, `/healthz`, `/readyz`) of the controller and the
//! node agent.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::header;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
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
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| handler(req, peer)),
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

/// Names of the series `plain` (counters, gauges) and `histograms` export, for checks
/// that dashboards and alerts use real names.
pub fn metric_names(
    plain: &[&dyn prometheus::core::Collector],
    histograms: &[&dyn prometheus::core::Collector],
) -> Vec<String> {
    let mut out = Vec::new();
    for c in plain {
        out.extend(c.desc().iter().map(|d| d.fq_name.clone()));
    }
    for c in histograms {
        for d in c.desc() {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.push(format!("{}{suffix}", d.fq_name));
            }
        }
    }
    out
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

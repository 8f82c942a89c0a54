//! `pullthrough relay`: a node-local entry point to a mirror. It listens on the node's
//! loopback and hands every registry request to the mirror unchanged, streaming both
//! ways, so that a kubelet whose containerd has no configuration for the mirror can pull
//! `127.0.0.1:<port>/<registry>/<repo>:<tag>`: containerd speaks plain HTTP to a loopback
//! registry on its own (docs/node-agent.md, "A node-local entry point"), and the proxy
//! reads the registry from the path. It keeps nothing: no cache, no credentials.
//!
//! The `Host` the client sent is kept, so that a challenge's realm (made from it) sends
//! the client back through the relay for its token. Hop-by-hop headers are dropped both
//! ways. Only what a pull sends is relayed: `GET` and `HEAD`, and `POST /auth/token`.

use crate::server::{Body, ConnLimits, Plain, accept_loop, full};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

/// What clients of the node may hold of the relay: as many connections as a node's pulls
/// open, none idle for long.
const LIMITS: ConnLimits = ConnLimits {
    max_connections: 512,
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(120),
};

/// How long a connection to the mirror may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Headers of one hop only (RFC 9110, 7.6.1), never relayed.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Why the relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// `--to` is not `http://host:port`.
    #[error(
        "--to {0:?}: expected http://host[:port] (the mirror's Service; a TLS mirror is not relayed yet)"
    )]
    BadTarget(String),
    /// The listening address is taken.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// The mirror a relay hands requests to.
struct Target {
    /// `http://host:port`, without a trailing slash.
    base: String,
    client: Client<HttpConnector, Incoming>,
}

/// Relays `listen` to the mirror at `to` until `shutdown` completes.
pub async fn run(
    listen: SocketAddr,
    to: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RelayError> {
    let base = to.trim_end_matches('/').to_string();
    let valid = base
        .strip_prefix("http://")
        .is_some_and(|a| !a.is_empty() && !a.contains(['/', '?', '#', '@']))
        && base.parse::<Uri>().is_ok();
    if !valid {
        return Err(RelayError::BadTarget(to.to_string()));
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
    serve(listener, base, shutdown).await;
    Ok(())
}

/// Relays the connections of `listener` to `base` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    base: String,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    let target = Arc::new(Target {
        base,
        client: Client::builder(TokioExecutor::new()).build(connector),
    });
    tracing::info!(listen = %listener.local_addr().map_or(String::new(), |a| a.to_string()),
        to = %target.base, "pullthrough relay serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tracker = TaskTracker::new();
    let serving = accept_loop(
        listener,
        stop_rx,
        tracker.clone(),
        LIMITS,
        Arc::new(Plain),
        move |req, _client| relay(target.clone(), req),
        None,
    );
    let task = tokio::spawn(serving);
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = task.await;
    tracker.close();
    tracker.wait().await;
}

/// One request, handed on; an OCI error when it is not one a pull sends, or when the
/// mirror cannot be reached.
async fn relay(target: Arc<Target>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let allowed = matches!(method, Method::GET | Method::HEAD)
        || (method == Method::POST && path == "/auth/token");
    if !allowed {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the relay hands on pulls only",
        ));
    }
    let target_uri = format!(
        "{}{}",
        target.base,
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let (mut parts, body) = req.into_parts();
    parts.uri = match target_uri.parse() {
        Ok(u) => u,
        Err(_) => return Ok(error(StatusCode::BAD_REQUEST, "NAME_INVALID", "bad path")),
    };
    parts.version = hyper::Version::HTTP_11;
    drop_hop_by_hop(&mut parts.headers);
    match target
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            drop_hop_by_hop(&mut parts.headers);
            let body = body.map_err(std::io::Error::other).boxed_unsync();
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => {
            tracing::warn!(method = %method, path = %path, to = %target.base, error = %e,
                "the mirror cannot be reached");
            Ok(error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("the mirror {} cannot be reached", target.base),
            ))
        }
    }
}

/// Drops the hop-by-hop headers, and those the `Connection` header names.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .map(HeaderName::from_static)
        .chain(named)
    {
        headers.remove(name);
    }
}

/// An OCI error answer.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    Response::builder()
        .status(status)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )
        .body(full(body))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        h.insert("host", HeaderValue::from_static("127.0.0.1:5001"));
        drop_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "host"]);
    }

    #[tokio::test]
    async fn a_target_that_is_not_a_plain_http_authority_is_refused() {
        for bad in [
            "https://m:5000",
            "m:5000",
            "http://",
            "http://m:5000/v2",
            "http://u@m",
        ] {
            let e = run("127.0.0.1:0".parse().unwrap(), bad, async {}).await;
            assert!(matches!(e, Err(RelayError::BadTarget(_))), "{bad}");
        }
    }
}

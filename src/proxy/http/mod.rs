//! The HTTP surface: parses requests and renders answers, nothing more. The registry API
//! ([`registry`]) and the token endpoint ([`token`]) hand what they parsed to the request
//! layer ([`crate::proxy::registry`]) and render what it answers; the operations port
//! ([`ops`]) does the same for the admin endpoints. Errors become OCI error JSON here, in
//! one place ([`error_response`]), and every request is logged once, here.

pub mod ops;
mod registry;
pub mod route;
mod token;

pub use route::{Route, parse_route};

use super::error::ProxyError;
use super::metrics::CacheResult;
use super::registry::{Registry, Served};
use crate::oci::error::error_body;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

pub use crate::server::Body;
use crate::server::full;

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// Where clients get tokens for the private repositories of `upstreamAuth` upstreams.
pub const TOKEN_PATH: &str = "/auth/token";

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The registry API's front: `/auth/token` or a registry request, answered and logged.
/// `https`: whether it is served over TLS (the scheme of a challenge's realm).
pub async fn handle(
    registry: Arc<Registry>,
    https: bool,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // What the request asks of the upstreams is its client's share of their caps.
    let asker = super::upstream::Asker::Client(client.ip());
    let (result, served) = if path == TOKEN_PATH {
        asker.scope(token::serve(&registry, req, client.ip())).await
    } else {
        asker.scope(registry::serve(&registry, https, req)).await
    };
    let mut resp = match result {
        Ok(resp) => {
            tracing::info!(method = %method, path = %path, status = resp.status().as_u16(),
                upstream = served.upstream.as_deref(), repo = served.repo.as_deref(),
                reference = served.reference.as_deref(),
                cache = served.cache.map(CacheResult::as_str), "request");
            resp
        }
        Err(e) => {
            log_refusal(&method, &path, &served, &e);
            error_response(&e, method == Method::HEAD)
        }
    };
    resp.headers_mut()
        .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    Ok(resp)
}

/// The one log line of a request answered with an error: a warning for the server's (and
/// the upstream's) failures, information for the client's.
fn log_refusal(method: &Method, path: &str, served: &Served, e: &ProxyError) {
    let (code, status) = e.code_and_status();
    let (upstream, repo, reference) = (
        served.upstream.as_deref(),
        served.repo.as_deref(),
        served.reference.as_deref(),
    );
    if status.is_server_error() {
        tracing::warn!(method = %method, path = %path, status = status.as_u16(), code = code.as_str(),
            upstream, repo, reference, error = %e, "request failed");
    } else {
        tracing::info!(method = %method, path = %path, status = status.as_u16(), code = code.as_str(),
            upstream, repo, reference, error = %e, "request refused");
    }
}

/// The OCI error response for an error.
pub fn error_response(e: &ProxyError, head: bool) -> Response<Body> {
    let (code, status) = e.code_and_status();
    let body = error_body(code, &e.to_string());
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let ProxyError::RangeNotSatisfiable { len } = e {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes */{len}"));
    }
    if let ProxyError::Unsupported(_) = e {
        builder = builder.header(header::ALLOW, "GET, HEAD");
    }
    if let ProxyError::Unauthorized { challenge } = e {
        builder = builder.header(header::WWW_AUTHENTICATE, challenge.as_str());
    }
    if let Some(secs) = e.retry_after() {
        builder = builder.header(header::RETRY_AFTER, secs);
    }
    builder
        .body(if head { empty() } else { full(body) })
        .expect("valid response")
}

//! The registry API's requests (`/v2/...`): parsed into what the request layer asks
//! ([`Ask`]), and its answers rendered: manifests, blobs (ranges, redirects), tags/list
//! pages with this proxy's `Link`, referrers.

use super::route::{Route, parse_route, split_query};
use super::{Body, TOKEN_PATH, empty};
use crate::oci::Digest;
use crate::oci::media::Accept;
use crate::proxy::error::ProxyError;
use crate::proxy::peers::PEER_HEADER;
use crate::proxy::pull_through::{BlobAnswer, ByteRange, Manifest};
use crate::proxy::registry::{Ask, PeerProof, Registry, Served};
use crate::proxy::upstream::{Referrers, TagsPage};
use crate::server::full;
use futures::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

/// Answers one registry request.
pub(super) async fn serve(
    registry: &Registry,
    https: bool,
    req: Request<Incoming>,
) -> (Result<Response<Body>, ProxyError>, Served) {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let e = ProxyError::Unsupported("this registry is a read-only pull-through cache");
            return (Err(e), Served::default());
        }
    };
    let parsed = parse_route(req.uri().path())
        .and_then(|route| Ok((route, split_query(req.uri().query())?)));
    let (route, (ns, query)) = match parsed {
        Ok(p) => p,
        Err(e) => return (Err(e), Served::default()),
    };
    let header = |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let name = match &route {
        Route::Base => {
            let realm = realm(&req, https);
            let asked = registry.base(header(header::AUTHORIZATION), realm.as_deref());
            return (asked.map(|()| base(head)), Served::default());
        }
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::Tags(n) | Route::Referrers(n, _) => n,
    };
    let ask = Ask {
        ns: ns.as_deref(),
        name,
        head,
        authorization: header(header::AUTHORIZATION),
        realm: realm(&req, https),
        peer: req.headers().get(PEER_HEADER).map(|proof| PeerProof {
            proof: proof.to_str().unwrap_or(""),
            method: req.method().as_str(),
            target: req.uri().path_and_query().map_or("", |t| t.as_str()),
        }),
    };
    match &route {
        Route::Manifest(_, reference) => {
            let accept = Accept::parse(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let (m, served) = registry.manifest(&ask, reference, &accept).await;
            (m.map(|m| manifest(m, head)), served)
        }
        Route::Blob(_, digest) => {
            let range = header(header::RANGE)
                .and_then(ByteRange::parse)
                .and_then(Result::ok);
            let spans = req.extensions().get::<crate::proxy::zero_copy::Spans>();
            let (answer, served) = registry.blob(&ask, digest, range, spans).await;
            (answer.map(|a| blob(digest, a)), served)
        }
        Route::Tags(name) => {
            let (page, served) = registry.tags(&ask, query.as_deref()).await;
            (page.map(|p| tags(p, name, ns.as_deref(), head)), served)
        }
        Route::Referrers(_, digest) => {
            let (list, served) = registry.referrers(&ask, digest, query.as_deref()).await;
            (list.map(|r| referrers(r, head)), served)
        }
        Route::Base => unreachable!("answered above"),
    }
}

/// `/v2/`: `200 {}`.
fn base(head: bool) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 2)
        .body(if head { empty() } else { full("{}") })
        .expect("valid response")
}

/// Where a challenge sends the client for a token: this proxy's token endpoint, on the
/// host the client asked for; `None` without a valid Host.
fn realm(req: &Request<Incoming>, https: bool) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 261
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })?;
    let scheme = if https { "https" } else { "http" };
    Some(format!("{scheme}://{host}{TOKEN_PATH}"))
}

fn manifest(m: Manifest, head: bool) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type.as_str())
        .header(header::CONTENT_LENGTH, m.body.len())
        .header("docker-content-digest", m.digest.to_string())
        .header(header::ETAG, format!("\"{}\"", m.digest))
        .body(if head { empty() } else { full(m.body) })
        .expect("valid response")
}

fn blob(digest: &Digest, answer: BlobAnswer) -> Response<Body> {
    if let Some(url) = &answer.redirect {
        // The bytes come from the bucket; containerd sends its registry credentials only
        // to the registry, not to where it is redirected.
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, url.as_str())
            .header("docker-content-digest", digest.to_string())
            .header(header::CONTENT_LENGTH, 0)
            .body(empty())
            .expect("valid response");
    }
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes");
    match (answer.range, answer.len) {
        (Some((start, end)), Some(len)) => {
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .header(header::CONTENT_LENGTH, end - start + 1);
        }
        (_, Some(len)) => b = b.status(StatusCode::OK).header(header::CONTENT_LENGTH, len),
        (_, None) => b = b.status(StatusCode::OK),
    }
    let body = match answer.body {
        Some(stream) => StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync(),
        None => empty(),
    };
    b.body(body).expect("valid response")
}

/// A tags/list page, with the upstream's next page as this proxy's `Link`: the client's
/// own name for the repository, and its `ns`, so that it stays on the same upstream.
fn tags(page: TagsPage, name: &str, ns: Option<&str>, head: bool) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, page.body.len());
    if let Some(next) = &page.next {
        let ns = ns
            .map(|ns| format!("&ns={}", crate::proxy::upstream::query_escape(ns)))
            .unwrap_or_default();
        let link = format!("</v2/{name}/tags/list?{next}{ns}>; rel=\"next\"");
        if let Ok(link) = HeaderValue::from_str(&link) {
            b = b.header(header::LINK, link);
        }
    }
    b.body(if head { empty() } else { full(page.body) })
        .expect("valid response")
}

fn referrers(list: Referrers, head: bool) -> Response<Body> {
    let content_type = list
        .content_type
        .unwrap_or_else(|| crate::oci::media::OCI_INDEX.to_string());
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, list.body.len());
    if let Some(f) = list.filters_applied {
        b = b.header("oci-filters-applied", f);
    }
    b.body(if head { empty() } else { full(list.body) })
        .expect("valid response")
}

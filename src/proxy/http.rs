//! The HTTP surface: parses and validates requests, picks the upstream, calls the cache,
//! and turns every result into a response. Errors become OCI error JSON here, in one
//! place, and are logged once here.

use super::Proxy;
use super::access::Admission;
use super::error::ProxyError;
use super::metrics::{CacheResult, Kind};
use super::peers::PEER_HEADER;
use super::pull_through::{BlobAnswer, BlobAsk, ByteRange};
use super::upstream::{Secret, Upstream};
use crate::api::Credentials;
use crate::oci::error::error_body;
use crate::oci::media::Accept;
use crate::oci::reference::validate_repository;
use crate::oci::{Digest, Reference};
use futures::TryStreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;

pub use crate::server::Body;
use crate::server::full;

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A parsed distribution API path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest(String, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(String, Digest),
    /// `/v2/<name>/tags/list`
    Tags(String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(String, Digest),
}

/// Parses and validates a request path. Nothing is looked up before this succeeds.
/// Escapes are decoded per segment, so an escaped `/` can never change the path's shape.
pub fn parse_route(raw_path: &str) -> Result<Route, ProxyError> {
    let rest = match raw_path.strip_prefix("/v2") {
        Some("") | Some("/") => return Ok(Route::Base),
        Some(r) => r.strip_prefix('/').ok_or(ProxyError::NotFound)?,
        None => return Err(ProxyError::NotFound),
    };
    let segments: Vec<String> = rest
        .split('/')
        .map(percent_decode)
        .collect::<Option<_>>()
        .ok_or_else(|| ProxyError::NameInvalid("path is not valid UTF-8".into()))?;
    let n = segments.len();
    if n < 3 {
        return Err(ProxyError::NotFound);
    }
    let name_of = |parts: &[String]| -> Result<String, ProxyError> {
        if parts.iter().any(|p| p.contains('/')) {
            return Err(ProxyError::NameInvalid(
                "invalid repository name: escaped '/' in a path component".into(),
            ));
        }
        let name = parts.join("/");
        validate_repository(&name).map_err(|e| ProxyError::NameInvalid(e.to_string()))?;
        Ok(name)
    };
    let digest = |s: &str| -> Result<Digest, ProxyError> {
        s.parse()
            .map_err(|e: crate::oci::DigestError| ProxyError::DigestInvalid(e.to_string()))
    };
    let (endpoint, last) = (segments[n - 2].as_str(), segments[n - 1].as_str());
    let name_parts = &segments[..n - 2];
    match (endpoint, last) {
        ("tags", "list") => Ok(Route::Tags(name_of(name_parts)?)),
        ("manifests", reference) => {
            let name = name_of(name_parts)?;
            let reference = Reference::parse(reference).map_err(|e| match e {
                crate::oci::ReferenceError::Digest(d) => ProxyError::DigestInvalid(d.to_string()),
                other => ProxyError::ReferenceInvalid(other.to_string()),
            })?;
            Ok(Route::Manifest(name, reference))
        }
        ("blobs", d) => Ok(Route::Blob(name_of(name_parts)?, digest(d)?)),
        ("referrers", d) => Ok(Route::Referrers(name_of(name_parts)?, digest(d)?)),
        _ => Err(ProxyError::NotFound),
    }
}

/// Decodes `%XX` escapes; `None` when the result is not UTF-8 or an escape is broken.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query's `ns` and the rest of it, which is forwarded upstream. An `ns` that does
/// not decode, or more than one, is refused: the request is for no registry in
/// particular, and must not fall to the default one.
fn split_query(query: Option<&str>) -> Result<(Option<String>, Option<String>), ProxyError> {
    let Some(q) = query else {
        return Ok((None, None));
    };
    let mut ns = None;
    let mut rest = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ns", v)) => {
                let bad = |why| ProxyError::NameInvalid(format!("the ns parameter {why}"));
                let decoded = percent_decode(v).ok_or_else(|| bad("is not a valid escape"))?;
                if ns.replace(decoded).is_some() {
                    return Err(bad("is given more than once"));
                }
            }
            _ => rest.push(pair),
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    Ok((ns, rest))
}

/// Everything known about a request for the one log line.
struct Outcome {
    upstream: Option<String>,
    repo: Option<String>,
    reference: Option<String>,
    cache: Option<CacheResult>,
}

/// Entry point of the registry API server.
pub async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    client: std::net::SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut outcome = Outcome {
        upstream: None,
        repo: None,
        reference: None,
        cache: None,
    };
    // What the request asks of the upstreams is its client's share of their caps.
    let asker = super::upstream::Asker::Client(client.ip());
    let result = if path == TOKEN_PATH {
        asker
            .scope(auth_token(&proxy, req, client.ip(), &mut outcome))
            .await
    } else {
        asker.scope(route(&proxy, &req, &mut outcome)).await
    };
    let mut resp = match result {
        Ok(resp) => {
            tracing::info!(method = %method, path = %path, status = resp.status().as_u16(),
                upstream = outcome.upstream.as_deref(), repo = outcome.repo.as_deref(),
                reference = outcome.reference.as_deref(),
                cache = outcome.cache.map(CacheResult::as_str), "request");
            resp
        }
        Err(e) => {
            let (code, status) = e.code_and_status();
            if status.is_server_error() {
                tracing::warn!(method = %method, path = %path, status = status.as_u16(), code = code.as_str(),
                    upstream = outcome.upstream.as_deref(), repo = outcome.repo.as_deref(),
                    reference = outcome.reference.as_deref(), error = %e, "request failed");
            } else {
                tracing::info!(method = %method, path = %path, status = status.as_u16(), code = code.as_str(),
                    upstream = outcome.upstream.as_deref(), repo = outcome.repo.as_deref(),
                    reference = outcome.reference.as_deref(), error = %e, "request refused");
            }
            error_response(&e, method == Method::HEAD)
        }
    };
    resp.headers_mut()
        .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    Ok(resp)
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

fn pick_upstream(proxy: &Proxy, ns: Option<&str>) -> Result<Arc<Upstream>, ProxyError> {
    match ns {
        Some(ns) => proxy
            .upstream(ns)
            .ok_or_else(|| ProxyError::UnknownRegistry(ns.chars().take(253).collect())),
        None => Ok(proxy.default_upstream()),
    }
}

async fn route(
    proxy: &Arc<Proxy>,
    req: &Request<Incoming>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Err(ProxyError::Unsupported(
                "this registry is a read-only pull-through cache",
            ));
        }
    };
    let route = parse_route(req.uri().path())?;
    let (ns, forward_query) = split_query(req.uri().query())?;
    if route == Route::Base {
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, 2)
            .body(if head { empty() } else { full("{}") })
            .expect("valid response"));
    }
    let up = pick_upstream(proxy, ns.as_deref())?;
    outcome.upstream = Some(up.name().to_string());
    let name = match &route {
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::Tags(n) | Route::Referrers(n, _) => n,
        Route::Base => unreachable!("answered above"),
    };
    let repo = up.canonical_repository(name);
    validate_repository(&repo).map_err(|e| ProxyError::NameInvalid(e.to_string()))?;
    outcome.repo = Some(repo.clone());
    if !up.permits(&repo) {
        return Err(ProxyError::RepositoryDenied(repo));
    }
    let cache = proxy.cache();
    // Another replica, asking the owner for a blob it proved itself: it is trusted for
    // that (no challenge, no proof again) once its proof verifies, and for nothing else.
    let from_peer = match req.headers().get(PEER_HEADER) {
        None => false,
        Some(proof) => {
            let peers = cache
                .peers()
                .ok_or(ProxyError::PeerRefused("this proxy has no replicas"))?;
            let target = req.uri().path_and_query().map_or("", |t| t.as_str());
            peers
                .check(proof.to_str().unwrap_or(""), req.method().as_str(), target)
                .map_err(ProxyError::PeerRefused)?;
            if head || !matches!(route, Route::Blob(..)) {
                return Err(ProxyError::PeerRefused(
                    "a replica may ask another only for a blob (GET)",
                ));
            }
            true
        }
    };
    let trusted = from_peer;
    if up.guarded() && !trusted {
        let scheme = if proxy.https() { "https" } else { "http" };
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Admission::Challenge { insufficient_scope } =
            proxy.access().admit(&up, &repo, authorization).await
        {
            proxy.metrics().access_challenge(up.name());
            return Err(ProxyError::Unauthorized {
                challenge: challenge(req, scheme, &up, &repo, insufficient_scope)?,
            });
        }
    }
    let links = proxy.links();
    match route {
        Route::Manifest(_, reference) => {
            outcome.reference = Some(reference.to_string());
            let accept = Accept::parse(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let result = links.manifest(&up, &repo, &reference, &accept).await;
            let (m, res) = count(proxy, &up, Kind::Manifest, outcome, result)?;
            proxy
                .prefetcher()
                .pulled(&super::links::repo_key(&up, &repo), &m.digest);
            if !head {
                proxy
                    .metrics()
                    .served_bytes(
                        up.name(),
                        matches!(res, CacheResult::Hit | CacheResult::Stale),
                    )
                    .inc_by(m.body.len() as u64);
            }
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, m.media_type.as_str())
                .header(header::CONTENT_LENGTH, m.body.len())
                .header("docker-content-digest", m.digest.to_string())
                .header(header::ETAG, format!("\"{}\"", m.digest))
                .body(if head { empty() } else { full(m.body) })
                .expect("valid response"))
        }
        Route::Blob(_, digest) => {
            outcome.reference = Some(digest.to_string());
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(ByteRange::parse)
                .and_then(Result::ok);
            let ask = BlobAsk {
                range,
                head,
                spans: req.extensions().get::<crate::proxy::zero_copy::Spans>(),
                from_peer,
                unlinked: false,
            };
            let result = links.blob(&up, &repo, &digest, ask, trusted).await;
            let answer = count(
                proxy,
                &up,
                Kind::Blob,
                outcome,
                result.map(|a| {
                    let r = a.result;
                    (a, r)
                }),
            )?
            .0;
            Ok(blob_response(&digest, answer, proxy.metrics(), up.name()))
        }
        Route::Tags(name) => {
            let page = cache
                .tags_list(&up, &repo, forward_query.as_deref())
                .await?;
            let mut b = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, page.body.len());
            if let Some(next) = &page.next {
                // The next page through this proxy: the client's own name for the
                // repository, and its `ns`, so that it stays on the same upstream.
                let ns = ns
                    .as_deref()
                    .map(|ns| format!("&ns={}", super::upstream::query_escape(ns)))
                    .unwrap_or_default();
                let link = format!("</v2/{name}/tags/list?{next}{ns}>; rel=\"next\"");
                if let Ok(link) = HeaderValue::from_str(&link) {
                    b = b.header(header::LINK, link);
                }
            }
            Ok(b.body(if head { empty() } else { full(page.body) })
                .expect("valid response"))
        }
        Route::Referrers(_, digest) => {
            outcome.reference = Some(digest.to_string());
            let referrers = cache
                .referrers(&up, &repo, &digest, forward_query.as_deref())
                .await?;
            let content_type = referrers
                .content_type
                .unwrap_or_else(|| crate::oci::media::OCI_INDEX.to_string());
            let mut b = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CONTENT_LENGTH, referrers.body.len());
            if let Some(f) = referrers.filters_applied {
                b = b.header("oci-filters-applied", f);
            }
            Ok(b.body(if head { empty() } else { full(referrers.body) })
                .expect("valid response"))
        }
        Route::Base => unreachable!("answered above"),
    }
}

/// Where clients get tokens for the private repositories of `upstreamAuth` upstreams.
pub const TOKEN_PATH: &str = "/auth/token";
/// Largest token request body read (a POSTed form).
const MAX_TOKEN_FORM: usize = 64 << 10;
/// Repositories one token request may ask for: each is a check with the upstream.
/// containerd and docker ask for one or two.
pub const MAX_TOKEN_SCOPES: usize = 16;

/// The `WWW-Authenticate` challenge for `repository` of `up`: the realm is this proxy's
/// token endpoint, on the host the client asked for.
fn challenge(
    req: &Request<Incoming>,
    scheme: &str,
    up: &Upstream,
    repository: &str,
    insufficient_scope: bool,
) -> Result<String, ProxyError> {
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
        })
        .ok_or_else(|| {
            ProxyError::NameInvalid("a request for a private repository needs a valid Host".into())
        })?;
    let mut c = format!(
        "Bearer realm=\"{scheme}://{host}{TOKEN_PATH}\",service=\"{}\",scope=\"repository:{repository}:pull\"",
        super::access::service(up.name())
    );
    if insufficient_scope {
        c.push_str(",error=\"insufficient_scope\"");
    }
    Ok(c)
}

/// Decodes a form or query value: `+` is a space, then `%XX` escapes.
fn form_decode(s: &str) -> Option<String> {
    percent_decode(&s.replace('+', " "))
}

/// Appends the decoded `key=value` pairs of a query or form to `params`.
fn form_pairs(text: &str, params: &mut Vec<(String, String)>) -> Result<(), ProxyError> {
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (form_decode(k), form_decode(v)) {
            (Some(k), Some(v)) => params.push((k, v)),
            _ => {
                return Err(ProxyError::TokenRequest(
                    "a parameter is not a valid escape".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Username and password of an `Authorization: Basic` header.
fn basic_credentials(header: Option<&str>) -> Option<Credentials> {
    use base64::Engine as _;
    let encoded = header?.strip_prefix("Basic ")?.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let (user, pass) = std::str::from_utf8(&raw).ok()?.split_once(':')?;
    Some(Credentials {
        username: user.to_string(),
        password: pass.to_string(),
    })
}

/// `/auth/token`: the distribution token spec's GET (credentials in Basic) and its OAuth2
/// POST (`grant_type=password`, or `refresh_token` with an identity token of the
/// upstream's token server, which is passed on to it as such). Issues a token for the
/// repositories of the `scope`s the client's own secret may pull upstream (see
/// [`crate::proxy::access`]).
async fn auth_token(
    proxy: &Proxy,
    req: Request<Incoming>,
    client: std::net::IpAddr,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    let mut secret = basic_credentials(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .map(Secret::Password);
    let mut params: Vec<(String, String)> = Vec::new();
    form_pairs(req.uri().query().unwrap_or(""), &mut params)?;
    let method = req.method().clone();
    if method == Method::POST {
        let body = http_body_util::Limited::new(req.into_body(), MAX_TOKEN_FORM);
        let body = tokio::time::timeout(std::time::Duration::from_secs(30), body.collect())
            .await
            .map_err(|_| ProxyError::TokenRequest("the form did not arrive in time".into()))?
            .map_err(|_| ProxyError::TokenRequest("the form is too large or broke off".into()))?
            .to_bytes();
        let text = std::str::from_utf8(&body)
            .map_err(|_| ProxyError::TokenRequest("the form is not UTF-8".into()))?;
        form_pairs(text, &mut params)?;
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        match get("grant_type").as_deref() {
            Some("password") => {
                secret = Some(Secret::Password(Credentials {
                    username: get("username").unwrap_or_default(),
                    password: get("password").unwrap_or_default(),
                }));
            }
            Some("refresh_token") => {
                let token = get("refresh_token")
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        ProxyError::TokenRequest(
                            "a refresh_token grant needs a refresh_token".into(),
                        )
                    })?;
                secret = Some(Secret::IdentityToken(token));
            }
            _ => {
                return Err(ProxyError::TokenRequest(
                    "grant_type must be password or refresh_token (or use GET with Basic)".into(),
                ));
            }
        }
    } else if method != Method::GET {
        return Err(ProxyError::Unsupported(
            "the token endpoint takes GET or POST",
        ));
    }
    let up = params
        .iter()
        .find(|(k, _)| k == "service")
        .and_then(|(_, v)| v.strip_prefix("pullthrough:"))
        .and_then(|name| proxy.upstream(name))
        .filter(|u| u.guarded())
        .ok_or_else(|| {
            ProxyError::TokenRequest(
                "service must be pullthrough:<registry> for an upstreamAuth upstream".into(),
            )
        })?;
    outcome.upstream = Some(up.name().to_string());
    let mut repositories = Vec::new();
    for scope in params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' '))
    {
        let mut parts = scope.splitn(3, ':');
        let (Some("repository"), Some(name), Some(actions)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let repo = up.canonical_repository(name);
        if actions.split(',').any(|a| a == "pull" || a == "*")
            && validate_repository(&repo).is_ok()
            && up.permits(&repo)
            && !repositories.contains(&repo)
        {
            repositories.push(repo);
        }
    }
    outcome.repo = repositories.first().cloned();
    if repositories.len() > MAX_TOKEN_SCOPES {
        return Err(ProxyError::TokenRequest(format!(
            "at most {MAX_TOKEN_SCOPES} repositories per token request"
        )));
    }
    let issued = proxy
        .access()
        .issue(&up, &repositories, secret.as_ref(), client)
        .await?;
    let body = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
    })
    .to_string();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .expect("valid response"))
}

/// Counts a manifest or blob request in `pullthrough_requests_total`.
fn count<T>(
    proxy: &Proxy,
    up: &Upstream,
    kind: Kind,
    outcome: &mut Outcome,
    result: Result<(T, CacheResult), ProxyError>,
) -> Result<(T, CacheResult), ProxyError> {
    let res = match &result {
        Ok((_, r)) => *r,
        Err(_) => CacheResult::Error,
    };
    outcome.cache = Some(res);
    proxy.metrics().request(up.name(), kind, res);
    result
}

fn blob_response(
    digest: &Digest,
    answer: BlobAnswer,
    metrics: &super::metrics::Metrics,
    upstream: &str,
) -> Response<Body> {
    let served = metrics.served_bytes(upstream, answer.result == CacheResult::Hit);
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
        Some(stream) => StreamBody::new(
            stream
                .inspect_ok(move |chunk| served.inc_by(chunk.len() as u64))
                .map_ok(Frame::data),
        )
        .boxed_unsync(),
        None => empty(),
    };
    b.body(body).expect("valid response")
}

/// Entry point of the operations server: `/metrics`, `/healthz`, `/readyz`, and
/// `DELETE /admin/cache?image=<reference>` to drop one image or tag from the cache:
/// from loopback only (`pullthrough cache drop` in the pod), and only with the admin
/// token (`Authorization: Bearer <token>`; loopback alone is not enough, sidecars
/// connect from there too).
pub async fn handle_ops(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    // Prefetches and the images in use come from the controller, from its own pod;
    // dropping only from the proxy's pod.
    let from_controller = path == "/admin/prefetch" || path == "/admin/in-use";
    if path != "/admin/cache" && !from_controller {
        return crate::server::handle_ops(proxy, req).await;
    }
    if !from_controller && !peer.ip().is_loopback() {
        return Ok(json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "the admin endpoint only answers on loopback"}),
        ));
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !proxy.admin_authorized(authorization) {
        let mut refused = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "missing or wrong admin token (the proxy's admin-token file)"}),
        );
        refused
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Ok(refused);
    }
    if path == "/admin/prefetch" {
        return Ok(prefetch_admin(&proxy, req).await);
    }
    if path == "/admin/in-use" {
        return Ok(in_use_admin(&proxy, req).await);
    }
    if req.method() != Method::DELETE {
        return Ok(json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "use DELETE /admin/cache?image=<reference>"}),
        ));
    }
    let image = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("image="))
        .and_then(percent_decode);
    let Some(image) = image else {
        return Ok(json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "missing ?image=<reference>, e.g. docker.io/library/alpine:3.20"}),
        ));
    };
    let parsed = match crate::api::image_ref::parse(&image) {
        Ok(r) => r,
        Err(e) => {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": e.to_string()}),
            ));
        }
    };
    let Some(up) = proxy.upstream(&parsed.registry) else {
        return Ok(json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("{} is not mirrored by this proxy", parsed.registry)}),
        ));
    };
    let removal = proxy
        .cache()
        .drop_image(&up, &parsed.repository, &parsed.reference)
        .await;
    tracing::info!(image = %parsed, manifests = removal.manifests.len(), blobs = removal.blobs.len(),
        bytes = removal.bytes, "dropped from the cache on request");
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"image": parsed.to_string(), "removed": removal}),
    ))
}

/// A JSON answer of the operations port.
fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(v.to_string()))
        .expect("valid response")
}

/// `POST /admin/prefetch` with `{"images": [...], "platforms": [...]}` queues images to
/// prefetch (see [`crate::proxy::prefetcher`]), answering 202 with what was queued and
/// what was known already; `GET /admin/prefetch` shows every requested image's progress.
/// Nothing is queued unless every image resolves.
async fn prefetch_admin(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    use crate::proxy::prefetcher::MAX_IMAGES_PER_REQUEST;
    if req.method() == Method::GET {
        return json(
            StatusCode::OK,
            serde_json::json!({"images": proxy.prefetcher().progress()}),
        );
    }
    if req.method() != Method::POST {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "use POST /admin/prefetch with {\"images\": [...]}, or GET for progress"}),
        );
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        images: Vec<String>,
        #[serde(default)]
        platforms: Option<Vec<String>>,
    }
    let example = r#"{"images": ["docker.io/library/alpine:3.20"], "platforms": ["linux/amd64"]}"#;
    let limits = (64 << 10, MAX_IMAGES_PER_REQUEST);
    let (ask, images) = match admin_images(proxy, req, limits, example, |a: &Ask| &a.images).await {
        Ok(r) => r,
        Err(e) => return json(StatusCode::BAD_REQUEST, e),
    };
    let platforms = ask
        .platforms
        .unwrap_or_else(|| proxy.prefetch_platforms().to_vec());
    let accepted = match proxy.prefetcher().request(images, &platforms) {
        Ok(a) => a,
        Err(full) => {
            let mut refused = json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": format!(
                    "the prefetch queue is full: {} images wait or are being fetched, at most {} may; ask again once some are done",
                    full.waiting,
                    crate::proxy::prefetcher::MAX_JOBS
                )}),
            );
            refused
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            return refused;
        }
    };
    tracing::info!(
        queued = accepted.queued.len(),
        known = accepted.known.len(),
        "prefetch requested"
    );
    json(
        StatusCode::ACCEPTED,
        serde_json::to_value(&accepted).expect("serializable"),
    )
}

/// The JSON body (`T`, like `example`) of an admin request naming images (`images` of
/// it), read whole within 30 s: at most `limit` bytes and `max` images, every one
/// resolved to its upstream; else the error to answer 400 with.
async fn admin_images<T: serde::de::DeserializeOwned>(
    proxy: &Proxy,
    req: Request<Incoming>,
    (limit, max): (usize, usize),
    example: &str,
    images: impl Fn(&T) -> &[String],
) -> Result<(T, Vec<crate::proxy::pull_through::ConfiguredImage>), serde_json::Value> {
    let error = |e: String| serde_json::json!({"error": e});
    let body = http_body_util::Limited::new(req.into_body(), limit);
    let body = match tokio::time::timeout(std::time::Duration::from_secs(30), body.collect()).await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return Err(error(format!(
                "the body is over {} KiB, broke off or did not arrive in 30 s",
                limit >> 10
            )));
        }
    };
    let asked: T =
        serde_json::from_slice(&body).map_err(|e| error(format!("expected {example}: {e}")))?;
    let names = images(&asked);
    if names.len() > max {
        return Err(error(format!("at most {max} images per request")));
    }
    let resolved = names
        .iter()
        .map(|image| {
            proxy
                .resolve_image(image)
                .map_err(|e| serde_json::json!({"error": format!("{image}: {e}"), "image": image}))
        })
        .collect::<Result<_, _>>()?;
    Ok((asked, resolved))
}

/// Images a request may name as in use.
const MAX_IN_USE: usize = 10_000;

/// `PUT /admin/in-use` with `{"images": [...]}` replaces the images in use: kept from
/// eviction, with everything they reference, like pins, until the next `PUT` (the
/// controller names the images of the workloads that run; in memory only, so it sends
/// them again every few minutes). `GET /admin/in-use` lists them.
async fn in_use_admin(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let pins = proxy.cache().pins();
    if req.method() == Method::GET {
        let names: Vec<String> = pins.in_use().into_iter().map(|i| i.name).collect();
        return json(StatusCode::OK, serde_json::json!({"images": names}));
    }
    if req.method() != Method::PUT {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "use PUT /admin/in-use with {\"images\": [...]}, or GET"}),
        );
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct InUse {
        images: Vec<String>,
    }
    let example = r#"{"images": ["docker.io/library/alpine:3.20"]}"#;
    let limits = (1 << 20, MAX_IN_USE);
    let (_, images) = match admin_images(proxy, req, limits, example, |n: &InUse| &n.images).await {
        Ok(r) => r,
        Err(e) => return json(StatusCode::BAD_REQUEST, e),
    };
    let count = images.len();
    pins.set_in_use(images);
    tracing::info!(images = count, "images in use replaced");
    json(StatusCode::OK, serde_json::json!({"inUse": count}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/").unwrap(), Route::Base);
        assert_eq!(parse_route("/v2").unwrap(), Route::Base);
        assert_eq!(
            parse_route("/v2/library/alpine/manifests/3.20").unwrap(),
            Route::Manifest("library/alpine".into(), Reference::Tag("3.20".into()))
        );
        assert!(matches!(
            parse_route(&format!("/v2/a/manifests/blobs/{}", d())).unwrap(),
            Route::Blob(n, _) if n == "a/manifests"
        ));
        assert!(matches!(
            parse_route(&format!("/v2/a/b/blobs/{}", d())).unwrap(),
            Route::Blob(..)
        ));
        assert!(matches!(
            parse_route(&format!("/v2/a/manifests/{}", d().replace(':', "%3A"))).unwrap(),
            Route::Manifest(_, Reference::Digest(_))
        ));
        assert_eq!(
            parse_route("/v2/a/b/tags/list").unwrap(),
            Route::Tags("a/b".into())
        );
        assert!(matches!(
            parse_route(&format!("/v2/a/referrers/{}", d())).unwrap(),
            Route::Referrers(..)
        ));
    }

    #[test]
    fn bad_paths_are_refused_with_the_right_code() {
        use crate::oci::ErrorCode::*;
        let code = |p: &str| parse_route(p).unwrap_err().code_and_status().0;
        assert_eq!(code("/v2/../etc/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a/%2e%2e/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/Upper/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a/manifests/..."), ManifestUnknown);
        assert_eq!(code("/v2/a/blobs/sha256:zz"), DigestInvalid);
        assert_eq!(code("/v2/a/blobs/latest"), DigestInvalid);
        assert_eq!(code("/v2/a/manifests/md5:00"), DigestInvalid);
        assert_eq!(code("/v2/a/uploads/x"), NameUnknown);
        assert_eq!(code("/other"), NameUnknown);
        assert_eq!(code("/v2/a/%ff/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a%2fb/manifests/x"), NameInvalid);
        assert_eq!(code("/v2/a/blobs/sha256:..%2f..%2fetc"), DigestInvalid);
    }

    #[test]
    fn query_split() {
        assert_eq!(
            split_query(Some("ns=docker.io&n=10&last=b")).unwrap(),
            (Some("docker.io".into()), Some("n=10&last=b".into()))
        );
        assert_eq!(
            split_query(Some("ns=ghcr.io")).unwrap(),
            (Some("ghcr.io".into()), None)
        );
        assert_eq!(split_query(None).unwrap(), (None, None));
        assert!(split_query(Some("ns=%zz")).is_err());
        assert!(split_query(Some("ns=docker.io&ns=ghcr.io")).is_err());
    }
}

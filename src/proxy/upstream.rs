//! Talking to one upstream registry: URL building, anonymous/basic/Bearer-token auth with a
//! token cache per scope, redirects to blob storage, timeouts and upstream metrics.
//! Knows nothing of the cache.

use super::error::ProxyError;
use super::metrics::{Kind, Metrics};
use crate::api::{Credentials, RepositoryFilter, UpstreamConfig};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The HTTP client shared by every upstream.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

const USER_AGENT: &str = concat!("pullthrough/", env!("CARGO_PKG_VERSION"));
const MAX_REDIRECTS: usize = 5;
const MAX_TOKEN_BYTES: usize = 1 << 20;
/// Token lifetime when the token endpoint does not say (the spec's default).
const DEFAULT_TOKEN_SECS: u64 = 60;

/// Builds the shared client: HTTP/1.1 and HTTP/2, TLS with the Mozilla roots plus the
/// system's (for private registries signed by a local CA).
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot parse is skipped, not fatal.
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

struct Token {
    header: String,
    expires: Instant,
}

/// One configured upstream registry.
pub struct Upstream {
    name: String,
    base: String,
    docker_hub: bool,
    filter: RepositoryFilter,
    credentials: Option<Credentials>,
    client: HttpClient,
    metrics: Metrics,
    timeout: Duration,
    tokens: Mutex<HashMap<String, Token>>,
    wants_basic: AtomicBool,
}

impl Upstream {
    /// Builds an upstream from its config. `credentials` are already resolved (inline or
    /// read from the credentials file).
    pub fn new(
        config: &UpstreamConfig,
        credentials: Option<Credentials>,
        client: HttpClient,
        metrics: Metrics,
        timeout: Duration,
    ) -> Upstream {
        Upstream {
            name: config.registry.to_ascii_lowercase(),
            base: config.base_url(),
            docker_hub: config.is_docker_hub(),
            filter: config.repositories.clone(),
            credentials,
            client,
            metrics,
            timeout,
            tokens: Mutex::new(HashMap::new()),
            wants_basic: AtomicBool::new(false),
        }
    }

    /// The registry name (the `upstream` metric label).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The time allowed between two chunks of a download.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The repository as the upstream knows it: Docker Hub puts single-name images under
    /// `library/`.
    pub fn canonical_repository(&self, repository: &str) -> String {
        if self.docker_hub {
            crate::api::docker_hub::repository(repository)
        } else {
            repository.to_string()
        }
    }

    /// Whether the repository may be pulled through this upstream.
    pub fn permits(&self, repository: &str) -> bool {
        self.filter.permits(repository)
    }

    /// Sends `method /v2/<repository>/<path>[?query]` upstream, authenticating as the
    /// upstream asks and following redirects. The response may have any status.
    pub async fn request(
        &self,
        method: Method,
        kind: Kind,
        repository: &str,
        path: &str,
        query: Option<&str>,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut url = format!("{}/v2/{repository}/{path}", self.base);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let scope = format!("repository:{repository}:pull");
        let mut auth = self.cached_auth(&scope);
        let started = Instant::now();
        let result = async {
            for attempt in 0..2 {
                let resp = self.send(&method, &url, auth.as_deref(), accept).await?;
                if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                    return Ok(resp);
                }
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match challenge.as_deref().map(parse_challenge) {
                    Some(Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: challenge_scope,
                    })) => {
                        let want = challenge_scope.unwrap_or_else(|| scope.clone());
                        let header = self
                            .fetch_token(&realm, service.as_deref(), &want, &scope)
                            .await?;
                        auth = Some(header);
                    }
                    Some(Some(Challenge::Basic)) if self.credentials.is_some() => {
                        self.wants_basic.store(true, Ordering::Relaxed);
                        auth = self.basic_header();
                    }
                    _ => return Ok(resp),
                }
            }
            unreachable!("the loop returns on its second attempt")
        }
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        match &result {
            Ok(resp) => {
                self.metrics
                    .upstream(&self.name, kind, Some(resp.status().as_u16()), elapsed);
            }
            Err(_) => self.metrics.upstream(&self.name, kind, None, elapsed),
        }
        result
    }

    fn cached_auth(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().expect("token cache lock");
        if let Some(t) = tokens.get(scope)
            && t.expires > Instant::now()
        {
            return Some(t.header.clone());
        }
        drop(tokens);
        if self.wants_basic.load(Ordering::Relaxed) {
            return self.basic_header();
        }
        None
    }

    fn basic_header(&self) -> Option<String> {
        self.credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    /// Gets a Bearer token for `scope` from the token endpoint and caches it under
    /// `cache_key` (the repository's pull scope) until it expires.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cache_key: &str,
    ) -> Result<String, ProxyError> {
        let mut url = realm.to_string();
        url.push(if realm.contains('?') { '&' } else { '?' });
        if let Some(s) = service {
            url.push_str("service=");
            url.push_str(&query_escape(s));
            url.push('&');
        }
        url.push_str("scope=");
        url.push_str(&query_escape(scope));
        let basic = self.basic_header();
        let started = Instant::now();
        let resp = self.send(&Method::GET, &url, basic.as_deref(), None).await;
        let code = resp.as_ref().ok().map(|r| r.status().as_u16());
        self.metrics.upstream(
            &self.name,
            Kind::Token,
            code,
            started.elapsed().as_secs_f64(),
        );
        let resp = resp?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ProxyError::UpstreamDenied(status.as_u16()));
        }
        if !status.is_success() {
            return Err(ProxyError::unavailable(format!(
                "token endpoint {} answered HTTP {status}",
                origin_of(realm)
            )));
        }
        let body = read_limited(resp.into_body(), MAX_TOKEN_BYTES, self.timeout).await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            ProxyError::UpstreamProtocol(
                format!(
                    "token endpoint {}: not a token answer: {e}",
                    origin_of(realm)
                )
                .into(),
            )
        })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ProxyError::UpstreamProtocol(
                    format!(
                        "token endpoint {} answered without a token",
                        origin_of(realm)
                    )
                    .into(),
                )
            })?;
        let header = format!("Bearer {token}");
        // Renew a little early so a token never expires between cache lookup and use.
        let lifetime = parsed
            .expires_in
            .unwrap_or(DEFAULT_TOKEN_SECS)
            .max(DEFAULT_TOKEN_SECS);
        let expires = Instant::now() + Duration::from_secs(lifetime.saturating_sub(10));
        self.tokens.lock().expect("token cache lock").insert(
            cache_key.to_string(),
            Token {
                header: header.clone(),
                expires,
            },
        );
        Ok(header)
    }

    /// One request, following redirects. `Authorization` is sent only to the origin it
    /// was meant for (scheme, host and port: see [`same_origin`]): pre-signed storage URLs
    /// must not receive registry credentials, nor may a redirect to plain HTTP.
    async fn send(
        &self,
        method: &Method,
        url: &str,
        auth: Option<&str>,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut uri: Uri = url
            .parse()
            .map_err(|e| ProxyError::internal(format!("bad upstream url {url:?}: {e}")))?;
        let origin = uri.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(header::USER_AGENT, USER_AGENT);
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if let Some(a) = auth
                && same_origin(&uri, &origin)
            {
                let mut v = HeaderValue::from_str(a).map_err(ProxyError::internal)?;
                v.set_sensitive(true);
                req = req.header(header::AUTHORIZATION, v);
            }
            let req = req.body(Empty::new()).map_err(ProxyError::internal)?;
            // Errors name the server tried (never the whole URL: a redirect's query may
            // carry a signature): "registry-1.docker.io: dns error" says where to look.
            let server = origin_of(&uri.to_string());
            let resp = tokio::time::timeout(self.timeout, self.client.request(req))
                .await
                .map_err(|_| {
                    ProxyError::unavailable(format!(
                        "no answer from {server} within {:?}",
                        self.timeout
                    ))
                })?
                .map_err(|e| {
                    ProxyError::unavailable(format!("cannot reach {server}: {}", error_chain(&e)))
                })?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| {
                    ProxyError::UpstreamProtocol(
                        format!("{} redirected without a Location", origin_of(url)).into(),
                    )
                })?;
            uri = resolve_location(&uri, location)?;
        }
        Err(ProxyError::UpstreamProtocol(
            format!(
                "more than {MAX_REDIRECTS} redirects from {}",
                origin_of(url)
            )
            .into(),
        ))
    }
}

/// Reads a small body whole, failing once it exceeds `limit` bytes or takes longer than
/// `timeout` in all: an upstream that sends headers and then stalls (or trickles) must
/// not hold a request past the configured timeout.
pub async fn read_limited(
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ProxyError> {
    tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            ProxyError::unavailable(format!(
                "the upstream's answer did not arrive within {timeout:?}"
            ))
        })?
        .map(|c| c.to_bytes())
        .map_err(|e| ProxyError::unavailable(format!("reading upstream body: {e}")))
}

fn resolve_location(base: &Uri, location: &str) -> Result<Uri, ProxyError> {
    let bad = |e: &dyn std::fmt::Display| {
        ProxyError::UpstreamProtocol(format!("bad redirect {location:?}: {e}").into())
    };
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(|e| bad(&e));
    }
    if !location.starts_with('/') {
        return Err(bad(&"relative redirects must be absolute paths"));
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    format!("{scheme}://{authority}{location}")
        .parse()
        .map_err(|e| bad(&e))
}

/// Whether `to` is the same origin as `from`: scheme, host (in any case) and port (the
/// scheme's default when not given). Credentials go only there: a redirect from https
/// to http on the same host would otherwise send them in clear text.
pub fn same_origin(to: &Uri, from: &Uri) -> bool {
    let port = |u: &Uri| {
        u.port_u16().or(match u.scheme_str() {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => None,
        })
    };
    to.scheme() == from.scheme()
        && to
            .host()
            .zip(from.host())
            .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
        && port(to) == port(from)
}

/// `scheme://host[:port]` of a URL: what error messages name (a query may be secret).
fn origin_of(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(u) => format!(
            "{}://{}",
            u.scheme_str().unwrap_or("https"),
            u.authority().map_or("", |a| a.as_str())
        ),
        Err(_) => "the upstream".to_string(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Token flow: ask `realm` for a token.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter to pass along.
        service: Option<String>,
        /// `scope` the registry asked for.
        scope: Option<String>,
    },
    /// Plain basic auth.
    Basic,
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut map = HashMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        map.insert(key, value.to_string());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: map.remove("realm")?,
        service: map.remove("service"),
        scope: map.remove("scope"),
    })
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_to_their_own_scheme_host_and_port() {
        let same = |to: &str, from: &str| same_origin(&to.parse().unwrap(), &from.parse().unwrap());
        assert!(same("https://reg.example/v2/x", "https://reg.example/v2/"));
        assert!(same("https://REG.example:443/a", "https://reg.example/b"));
        assert!(same("http://10.0.0.1:80/a", "http://10.0.0.1/b"));
        assert!(
            !same("http://reg.example/a", "https://reg.example/b"),
            "https to http"
        );
        assert!(!same("http://reg.example:443/a", "https://reg.example/b"));
        assert!(!same("https://reg.example:8443/a", "https://reg.example/b"));
        assert!(!same("https://cdn.example/a", "https://reg.example/b"));
    }

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        let comma = parse_challenge(r#"Bearer realm="https://a/t",scope="repository:a:pull,push""#);
        assert!(
            matches!(comma, Some(Challenge::Bearer { scope: Some(s), .. }) if s == "repository:a:pull,push")
        );
    }

    #[test]
    fn resolves_redirects() {
        let base: Uri = "https://registry.example/v2/a/blobs/x".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "/storage/x?sig=1")
                .unwrap()
                .to_string(),
            "https://registry.example/storage/x?sig=1"
        );
        assert_eq!(
            resolve_location(&base, "https://cdn.example/x")
                .unwrap()
                .to_string(),
            "https://cdn.example/x"
        );
        assert!(resolve_location(&base, "x").is_err());
    }

    #[test]
    fn escapes_scope() {
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}

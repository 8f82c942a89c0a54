//! HTTP to the upstreams: the shared client (HTTP/1.1 and HTTP/2, TLS), redirects
//! followed with credentials kept to their origin, timeouts, small bodies read whole.
//!
//! The client never connects to a link-local address ([`forbidden`]: where clouds serve
//! instance metadata and its credentials): a redirect there is refused, a host name is
//! never resolved to one, and no upstream URL may name one.

use super::error::UpstreamError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioExecutor;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The HTTP client shared by every upstream.
pub type HttpClient = Client<HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>;

/// Whether the client never connects to `ip`: a link-local address (169.254.0.0/16,
/// fe80::/10, also as an IPv4-mapped one), where clouds serve instance metadata and the
/// node's credentials (169.254.169.254), or EC2's IPv6 metadata address (fd00:ec2::254).
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.is_link_local(),
            None => {
                v6.segments()[0] & 0xffc0 == 0xfe80
                    || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            }
        },
    }
}

/// The address a URL's host names literally (`10.0.0.1`, `[fd00::1]`, `[fe80::1%25eth0]`
/// with a zone), if it does.
fn literal(host: &str) -> Option<IpAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.split('%').next().unwrap_or(host).parse().ok()
}

/// Whether a URL host may be connected to as far as it says itself: not a forbidden
/// literal address (host names are checked when resolved).
pub fn allowed_host(host: &str) -> bool {
    !literal(host).is_some_and(forbidden)
}

/// The addresses a host name resolved to that the client may connect to; an error when
/// none is left.
fn permitted(name: &str, found: Vec<SocketAddr>) -> std::io::Result<Vec<SocketAddr>> {
    let allowed: Vec<SocketAddr> = found.into_iter().filter(|a| !forbidden(a.ip())).collect();
    if allowed.is_empty() {
        return Err(std::io::Error::other(format!(
            "{name} resolves to no address the proxy connects to (never a link-local one)"
        )));
    }
    Ok(allowed)
}

/// The system resolver, less the addresses the client never connects to.
#[derive(Clone)]
pub struct Resolver(GaiResolver);

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, std::io::Result<Self::Response>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolving = self.0.call(name.clone());
        Box::pin(async move {
            let found = resolving.await?.collect();
            Ok(permitted(name.as_str(), found)?.into_iter())
        })
    }
}

const USER_AGENT: &str = concat!("pullthrough/", env!("CARGO_PKG_VERSION"));
const MAX_REDIRECTS: usize = 5;

/// Builds the shared client: HTTP/1.1 and HTTP/2, TLS with the Mozilla roots plus the
/// system's (for private registries signed by a local CA).
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    http_client_with(web_roots(), connect_timeout)
}

/// The TLS settings of [`http_client`]: the Mozilla roots and the system's.
fn web_roots() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot parse is skipped, not fatal.
        let _ = roots.add(cert);
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// The shared client's shape (HTTP/1.1 and HTTP/2, timeouts, pooling) with `tls`.
pub fn http_client_with(tls: rustls::ClientConfig, connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
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

/// HTTP requests to one upstream: redirects followed, credentials kept to their origin,
/// every request bounded by the timeout.
pub(super) struct Transport {
    client: HttpClient,
    timeout: Duration,
}

impl Transport {
    pub(super) fn new(client: HttpClient, timeout: Duration) -> Transport {
        Transport { client, timeout }
    }

    /// The time allowed for an answer, and between two chunks of a body.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One request, following redirects. `Authorization` is sent only to the origin it
    /// was meant for (scheme, host and port: see [`same_origin`]): pre-signed storage URLs
    /// must not receive registry credentials, nor may a redirect to plain HTTP.
    pub(super) async fn send(
        &self,
        method: &Method,
        url: &str,
        auth: Option<&str>,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_with(method, url, auth, accept, None).await
    }

    /// [`Self::send`], with one more header.
    pub(super) async fn send_with(
        &self,
        method: &Method,
        url: &str,
        auth: Option<&str>,
        accept: Option<&str>,
        extra: Option<(&'static str, &str)>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.exchange(method, url, auth, accept, extra, Bytes::new())
            .await
    }

    /// POSTs an `application/x-www-form-urlencoded` `form` (a token request's), with no
    /// credentials but those in it.
    pub(super) async fn post_form(
        &self,
        url: &str,
        form: String,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.exchange(
            &Method::POST,
            url,
            None,
            None,
            Some(("content-type", "application/x-www-form-urlencoded")),
            Bytes::from(form),
        )
        .await
    }

    /// Sends one request with `body`, following redirects.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        auth: Option<&str>,
        accept: Option<&str>,
        extra: Option<(&'static str, &str)>,
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::protocol(format!("{}: not a URL: {e}", origin_of(url))))?;
        let origin = uri.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(header::USER_AGENT, USER_AGENT);
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if let Some((name, value)) = extra {
                req = req.header(name, value);
            }
            if let Some(a) = auth
                && same_origin(&uri, &origin)
            {
                let mut v = HeaderValue::from_str(a).map_err(|_| {
                    UpstreamError::protocol("a token that cannot be sent in a header")
                })?;
                v.set_sensitive(true);
                req = req.header(header::AUTHORIZATION, v);
            }
            let req = req.body(Full::new(body.clone())).map_err(|e| {
                UpstreamError::protocol(format!("cannot request {}: {e}", origin_of(url)))
            })?;
            // Errors name the server tried (never the whole URL: a redirect's query may
            // carry a signature): "registry-1.docker.io: dns error" says where to look.
            let server = origin_of(&uri.to_string());
            let resp = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
                Err(_) => {
                    return Err(UpstreamError::NoAnswer {
                        server,
                        after: self.timeout,
                    });
                }
                Ok(Err(e)) => {
                    return Err(UpstreamError::Unreachable {
                        server,
                        source: Arc::new(e),
                    });
                }
                Ok(Ok(resp)) => resp,
            };
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| {
                    UpstreamError::protocol(format!(
                        "{} redirected without a Location",
                        origin_of(url)
                    ))
                })?;
            uri = redirect_target(&uri, location)?;
        }
        Err(UpstreamError::protocol(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            origin_of(url)
        )))
    }
}

/// Reads a small body whole, failing once it exceeds `limit` bytes or takes longer than
/// `timeout` in all: an upstream that sends headers and then stalls (or trickles) must
/// not hold a request past the configured timeout. `what` names the body in errors.
pub(super) async fn read_limited(
    body: Incoming,
    what: &'static str,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let read = async {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| UpstreamError::Body(Arc::new(e)))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(UpstreamError::TooLarge {
                        what,
                        limit: limit as u64,
                    });
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| UpstreamError::Stalled {
            what,
            after: timeout,
        })?
}

fn resolve_location(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = |e: &dyn std::fmt::Display| {
        UpstreamError::protocol(format!("bad redirect {location:?}: {e}"))
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

/// Where a redirect from `base` to `location` goes, unless it goes where the client
/// never connects ([`forbidden`]).
fn redirect_target(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let uri = resolve_location(base, location)?;
    if !uri.host().is_some_and(allowed_host) {
        return Err(UpstreamError::protocol(format!(
            "{} redirected to {}, a link-local address (instance metadata), which is never followed",
            origin_of(&base.to_string()),
            uri.host().unwrap_or("no host")
        )));
    }
    Ok(uri)
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
pub(super) fn origin_of(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(u) => format!(
            "{}://{}",
            u.scheme_str().unwrap_or("https"),
            u.authority().map_or("", |a| a.as_str())
        ),
        Err(_) => "the upstream".to_string(),
    }
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
    fn link_local_addresses_are_never_connected_to() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for bad in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
        ] {
            assert!(forbidden(ip(bad)), "{bad}");
        }
        for good in [
            "10.0.0.1",
            "127.0.0.1",
            "8.8.8.8",
            "fec0::1",
            "fd00:ec2::253",
            "::1",
        ] {
            assert!(!forbidden(ip(good)), "{good}");
        }
        // Redirects: by the target's literal address, whatever the way it is written.
        let base: Uri = "https://registry.example/v2/a/blobs/x".parse().unwrap();
        for to in [
            "http://169.254.169.254/latest/meta-data/iam/",
            "http://[fe80::1%25eth0]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://[fd00:ec2::254]/latest",
        ] {
            assert!(redirect_target(&base, to).is_err(), "{to}");
        }
        assert!(redirect_target(&base, "https://cdn.example/blob?sig=1").is_ok());
        assert!(redirect_target(&base, "/storage/x").is_ok());
        // Host names: what they resolve to, less the forbidden addresses.
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mixed = vec![sa("169.254.169.254:80"), sa("10.1.2.3:80")];
        assert_eq!(permitted("x.example", mixed).unwrap(), [sa("10.1.2.3:80")]);
        let only = vec![sa("169.254.169.254:80"), sa("[fe80::1]:80")];
        assert!(permitted("metadata.example", only).is_err());
    }

    #[test]
    fn escapes_scope() {
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}

//! One upstream registry, as the cache needs it: typed operations (a manifest, a blob, a
//! tag's digest, a blob's size, tags/list, referrers) that build the URLs, authenticate
//! ([`auth`]), read the headers and map the statuses ([`UpstreamError`]), and count every
//! request in the upstream metrics. Knows nothing of the cache.

mod auth;
mod body;
mod error;
mod failover;
mod pressure;
mod transport;

pub use auth::{Challenge, Secret, parse_challenge};
pub use body::{BlobBody, MinRate};
pub use error::{Object, UpstreamError};
pub use pressure::{Asker, Patience, RateLimit, retry_after};
pub(crate) use transport::query_escape;
pub use transport::{
    HttpClient, allowed_host, forbidden, http_client, http_client_with, same_origin,
};

use crate::api::{
    Credentials, RepositoryFilter, TagPolicy, TagPolicyKind, UpstreamConfig, UpstreamMode,
};
use crate::oci::media::Accept;
use crate::oci::{Digest, Reference};
use crate::proxy::metrics::{Kind, Metrics};
use crate::proxy::peers::{PEER_HEADER, Peers};
use auth::Auth;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use transport::{Transport, origin_of, read_limited};

/// Largest tags/list or referrers answer passed through.
pub const MAX_LIST_BYTES: usize = 4 << 20;

/// A manifest as the upstream sent it: not yet checked against its digest or its type.
#[derive(Debug)]
pub struct ManifestAnswer {
    /// The bytes.
    pub body: Bytes,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest: Option<Digest>,
}

/// One page of a repository's tags, as the upstream answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagsPage {
    /// The JSON body.
    pub body: Bytes,
    /// The query of the next page (`n=...&last=...`), from the upstream's `Link`.
    pub next: Option<String>,
}

/// A referrers answer (an image index), as the upstream sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Referrers {
    /// The JSON body.
    pub body: Bytes,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `OCI-Filters-Applied`: the filters the upstream applied (`artifactType`).
    pub filters_applied: Option<String>,
}

/// The parameters of a tags/list query that mean something (`n`, `last`), in a fixed
/// order: what is passed upstream and what a cache of pages is keyed by. Anything else a
/// client adds would only split that cache.
pub fn tags_query(client: Option<&str>) -> Option<String> {
    let mut n = None;
    let mut last = None;
    for pair in client.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) if !v.is_empty() => n = Some(v),
            Some(("last", v)) if !v.is_empty() => last = Some(v),
            _ => {}
        }
    }
    let parts: Vec<String> = [("n", n), ("last", last)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join("&"))
}

/// The query of a `Link: <...>; rel="next"` header (a path or a full URL); `None` when
/// there is no next page or the header names none.
pub fn next_page(link: Option<&str>) -> Option<String> {
    link?.split(',').find_map(|item| {
        let (target, params) = item.trim().strip_prefix('<')?.split_once('>')?;
        let next = params.split(';').any(|p| {
            p.trim()
                .strip_prefix("rel=")
                .is_some_and(|r| r.trim_matches('"') == "next")
        });
        next.then(|| {
            target
                .split_once('?')
                .and_then(|(_, q)| tags_query(Some(q)))
        })
        .flatten()
    })
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_string(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    header_str(headers, name).map(str::to_string)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

fn docker_digest(headers: &HeaderMap) -> Option<Digest> {
    header_str(headers, "docker-content-digest").and_then(|v| v.parse().ok())
}

/// One configured upstream registry.
pub struct Upstream {
    name: String,
    /// Its base URLs, each with the proxy's tokens for it.
    endpoints: failover::Endpoints,
    docker_hub: bool,
    filter: RepositoryFilter,
    /// `upstreamAuth`: private repositories only for clients the upstream lets pull them.
    guarded: bool,
    transport: Transport,
    /// To the other replicas, when they serve HTTPS (see [`Self::with_tls_peers`]).
    peers_tls: Option<Transport>,
    /// Its caps and back-off: every request to it passes here.
    pressure: pressure::Pressure,
    /// The slowest a blob body from it may arrive.
    min_rate: MinRate,
    /// Whether and when it is asked ([`UpstreamMode`]), as an index into
    /// [`UpstreamMode::ALL`]: changed while the proxy runs.
    mode: AtomicU8,
    /// How some repositories' tags are kept, first match first: the `repositories` and
    /// `tags` globs of each policy, and its rule.
    tag_policies: Vec<(String, String, TagRule)>,
    metrics: Metrics,
}

/// How a tag is kept (see [`crate::api::TagPolicy`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagRule {
    /// Trusted for `tagTTL`, then revalidated.
    Refresh,
    /// Once cached, never revalidated.
    Immutable,
    /// Answers this digest, whatever the upstream says.
    Pinned(Digest),
}

/// A policy's globs and rule, its digest parsed once (a configuration that validated has
/// one that parses; one that does not is a `refresh` policy).
fn tag_rule_of(p: &TagPolicy) -> (String, String, TagRule) {
    let rule = match p.policy {
        TagPolicyKind::Refresh => TagRule::Refresh,
        TagPolicyKind::Immutable => TagRule::Immutable,
        TagPolicyKind::Pinned => p
            .digest
            .as_deref()
            .and_then(|d| d.parse().ok())
            .map_or(TagRule::Refresh, TagRule::Pinned),
    };
    (p.repositories.clone(), p.tags.clone(), rule)
}

/// One request to send: what `Upstream::call` needs besides the repository.
struct Call<'a> {
    method: Method,
    /// What it is for: the metrics label, and what is missing on a 404.
    kind: Kind,
    object: Object,
    /// After `/v2/<repository>/`.
    path: &'a str,
    query: Option<&'a str>,
    accept: Option<&'a str>,
    /// Whether it may wait for room under the upstream's caps.
    patience: Patience,
}

impl<'a> Call<'a> {
    /// A request for the manifest at `path` (`manifests/<reference>`).
    fn manifest(method: Method, path: &'a str, accept: &'a str) -> Call<'a> {
        Call {
            method,
            kind: Kind::Manifest,
            object: Object::Manifest,
            path,
            query: None,
            accept: Some(accept),
            patience: Patience::Queue,
        }
    }
}

impl Upstream {
    /// One request to `url`, answering the upstream's challenge with `auth` once.
    async fn send_as(
        &self,
        auth: &Auth,
        url: &str,
        scope: &str,
        call: &Call<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut header = auth.cached(scope);
        let mut resp = self
            .transport
            .send(&call.method, url, header.as_deref(), call.accept)
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = header_string(resp.headers(), header::WWW_AUTHENTICATE);
            header = auth
                .answer(
                    challenge.as_deref(),
                    scope,
                    &self.transport,
                    (&self.metrics, &self.name),
                )
                .await?;
            if header.is_some() {
                resp = self
                    .transport
                    .send(&call.method, url, header.as_deref(), call.accept)
                    .await?;
            }
        }
        Ok(resp)
    }

    /// Builds an upstream from its config. `credentials` are already resolved (inline or
    /// read from the credentials file).
    pub fn new(
        config: &UpstreamConfig,
        credentials: Option<Credentials>,
        client: HttpClient,
        metrics: Metrics,
        (timeout, min_rate): (Duration, MinRate),
    ) -> Upstream {
        Upstream {
            name: config.registry.to_ascii_lowercase(),
            endpoints: failover::Endpoints::new(
                &config.registry.to_ascii_lowercase(),
                config.base_urls(),
                credentials.map(Secret::Password),
                &metrics,
            ),
            docker_hub: config.is_docker_hub(),
            filter: config.repositories.clone(),
            guarded: config.access_mode() == crate::api::AccessMode::UpstreamAuth,
            transport: Transport::new(client, timeout),
            peers_tls: None,
            pressure: pressure::Pressure::new(
                &config.registry.to_ascii_lowercase(),
                config.limits(),
                metrics.clone(),
            ),
            min_rate,
            mode: AtomicU8::new(0),
            tag_policies: config.tag_policies.iter().map(tag_rule_of).collect(),
            metrics,
        }
        .in_mode(config.mode.unwrap_or_default())
    }

    /// The same upstream in `mode`.
    pub fn in_mode(self, mode: UpstreamMode) -> Upstream {
        self.set_mode(mode);
        self
    }

    /// How the tag `tag` of `repository` is kept: the first policy that matches it.
    pub fn tag_rule(&self, repository: &str, tag: &str) -> TagRule {
        use crate::api::proxy_config::glob_match;
        self.tag_policies
            .iter()
            .find(|(repositories, tags, _)| {
                glob_match(repositories, repository) && glob_match(tags, tag)
            })
            .map_or(TagRule::Refresh, |(_, _, rule)| rule.clone())
    }

    /// Whether and when it is asked.
    pub fn mode(&self) -> UpstreamMode {
        UpstreamMode::ALL[usize::from(self.mode.load(Ordering::Relaxed))]
    }

    /// Puts it in `mode` (and says so in `pullthrough_upstream_mode`).
    pub fn set_mode(&self, mode: UpstreamMode) {
        let i = UpstreamMode::ALL
            .iter()
            .position(|m| *m == mode)
            .expect("every mode is in ALL");
        self.mode.store(i as u8, Ordering::Relaxed);
        self.metrics.upstream_mode(&self.name, mode);
    }

    /// Asks the other replicas for blobs over HTTPS with `client` (they serve TLS).
    pub fn with_tls_peers(mut self, client: HttpClient) -> Upstream {
        self.peers_tls = Some(Transport::new(client, self.transport.timeout()));
        self
    }

    /// The registry name (the `upstream` metric label).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The time allowed for an answer, and between two chunks of a download.
    pub fn timeout(&self) -> Duration {
        self.transport.timeout()
    }

    /// The slowest a blob body may arrive.
    pub fn min_rate(&self) -> MinRate {
        self.min_rate
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

    /// Whether clients must be entitled upstream to its private repositories
    /// (`upstreamAuth`, see [`crate::proxy::access`]).
    pub fn guarded(&self) -> bool {
        self.guarded
    }

    /// Whether the repository may be pulled through this upstream.
    pub fn permits(&self, repository: &str) -> bool {
        self.filter.permits(repository)
    }

    /// GETs a manifest of a type `accept` allows, reading at most `limit` bytes of it,
    /// within the timeout in all.
    pub async fn manifest(
        &self,
        repository: &str,
        reference: &Reference,
        accept: &Accept,
        limit: u64,
    ) -> Result<ManifestAnswer, UpstreamError> {
        let path = format!("manifests/{reference}");
        let header = accept.upstream_header();
        let resp = self
            .call(repository, Call::manifest(Method::GET, &path, &header))
            .await?;
        let too_large = UpstreamError::TooLarge {
            what: "manifest",
            limit,
        };
        if content_length(resp.headers()).is_some_and(|l| l > limit) {
            return Err(too_large);
        }
        let content_type = header_string(resp.headers(), header::CONTENT_TYPE);
        let digest = docker_digest(resp.headers());
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let body = read_limited(resp.into_body(), "manifest", limit, self.timeout()).await?;
        self.metrics
            .received_bytes(&self.name, Kind::Manifest)
            .inc_by(body.len() as u64);
        Ok(ManifestAnswer {
            body,
            content_type,
            digest,
        })
    }

    /// HEADs a manifest: the digest the reference points at now for a client with
    /// `accept`, when the upstream says. With [`Patience::Now`] it is not asked at all
    /// when the upstream's caps leave no room now.
    pub async fn manifest_digest(
        &self,
        repository: &str,
        reference: &Reference,
        accept: &Accept,
        patience: Patience,
    ) -> Result<Option<Digest>, UpstreamError> {
        let path = format!("manifests/{reference}");
        let header = accept.upstream_header();
        let mut call = Call::manifest(Method::HEAD, &path, &header);
        call.patience = patience;
        let resp = self.call(repository, call).await?;
        Ok(docker_digest(resp.headers()))
    }

    /// GETs a blob, whole: its body is read as it arrives.
    pub async fn blob(&self, repository: &str, digest: &Digest) -> Result<BlobBody, UpstreamError> {
        let resp = self.blob_call(Method::GET, repository, digest).await?;
        let received = self.metrics.received_bytes(&self.name, Kind::Blob);
        Ok(self.blob_body(resp).counted(received))
    }

    /// The body of a blob's answer, read with this upstream's timeout and floor.
    fn blob_body(&self, resp: Response<Incoming>) -> BlobBody {
        BlobBody::http(
            content_length(resp.headers()),
            resp.into_body(),
            self.timeout(),
            self.min_rate,
        )
    }

    /// GETs a blob from `owner`, the replica that owns it (see [`crate::proxy::peers`]),
    /// which fetches it from this upstream for every replica and caches it. Not an
    /// upstream request: it is not counted as one.
    pub async fn blob_via(
        &self,
        owner: SocketAddr,
        peers: &Peers,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobBody, UpstreamError> {
        let (scheme, transport) = match &self.peers_tls {
            Some(t) => ("https", t),
            None => ("http", &self.transport),
        };
        let target = format!(
            "/v2/{repository}/blobs/{digest}?ns={}",
            query_escape(&self.name)
        );
        let url = format!("{scheme}://{owner}{target}");
        let proof = peers.proof("GET", &target);
        let resp = transport
            .send_with(&Method::GET, &url, None, None, Some((PEER_HEADER, &proof)))
            .await?;
        match resp.status().as_u16() {
            200 => Ok(self.blob_body(resp)),
            status => Err(UpstreamError::Failed {
                server: owner.to_string(),
                status,
            }),
        }
    }

    /// HEADs a blob: its size, when the upstream says.
    pub async fn blob_size(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let resp = self.blob_call(Method::HEAD, repository, digest).await?;
        Ok(content_length(resp.headers()))
    }

    async fn blob_call(
        &self,
        method: Method,
        repository: &str,
        digest: &Digest,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("blobs/{digest}");
        self.call(
            repository,
            Call {
                method,
                kind: Kind::Blob,
                object: Object::Blob,
                path: &path,
                query: None,
                accept: None,
                patience: Patience::Queue,
            },
        )
        .await
    }

    /// One page of `tags/list`: `query` is passed as [`tags_query`] leaves it.
    pub async fn tags(
        &self,
        repository: &str,
        query: Option<&str>,
    ) -> Result<TagsPage, UpstreamError> {
        let query = tags_query(query);
        let resp = self
            .call(
                repository,
                Call {
                    method: Method::GET,
                    kind: Kind::Tags,
                    object: Object::Repository,
                    path: "tags/list",
                    query: query.as_deref(),
                    accept: None,
                    patience: Patience::Queue,
                },
            )
            .await?;
        let next = next_page(header_str(resp.headers(), header::LINK));
        let body = read_limited(
            resp.into_body(),
            "tags list",
            MAX_LIST_BYTES,
            self.timeout(),
        )
        .await?;
        Ok(TagsPage { body, next })
    }

    /// `referrers/<digest>`, with the client's query (`artifactType`) passed on.
    pub async fn referrers(
        &self,
        repository: &str,
        digest: &Digest,
        query: Option<&str>,
    ) -> Result<Referrers, UpstreamError> {
        let path = format!("referrers/{digest}");
        let resp = self
            .call(
                repository,
                Call {
                    method: Method::GET,
                    kind: Kind::Referrers,
                    object: Object::Repository,
                    path: &path,
                    query,
                    accept: None,
                    patience: Patience::Queue,
                },
            )
            .await?;
        let content_type = header_string(resp.headers(), header::CONTENT_TYPE);
        let filters_applied = header_string(resp.headers(), "oci-filters-applied");
        let body = read_limited(
            resp.into_body(),
            "referrers list",
            MAX_LIST_BYTES,
            self.timeout(),
        )
        .await?;
        Ok(Referrers {
            body,
            content_type,
            filters_applied,
        })
    }

    /// Whether `secret` (none: anonymous) may pull `repository`, as the upstream itself
    /// decides, asked at the origin with them (authenticated as it asks; a token alone
    /// proves nothing, since registries issue tokens of reduced scope):
    ///
    /// 1. a HEAD of the repository's `latest` manifest: 200 is yes, 401 or 403 no;
    /// 2. on a 404, which a registry also answers for a private repository it hides
    ///    from who may not see it (GitHub, GitLab, Harbor): the same HEAD with the
    ///    proxy's own credentials. If they find it, the repository is hidden from
    ///    `secret`: no;
    /// 3. else (no `latest` tag, or the proxy does not see it either): the repository's
    ///    tags/list with `secret`. 200 is yes; anything else no.
    pub async fn entitled(
        &self,
        repository: &str,
        secret: Option<Secret>,
    ) -> Result<bool, UpstreamError> {
        let theirs = Auth::new(secret);
        let header = Accept::Any.upstream_header();
        let latest = || {
            let mut call = Call::manifest(Method::HEAD, "manifests/latest", &header);
            call.kind = Kind::Access;
            call
        };
        match self.call_as(Some(&theirs), repository, latest()).await {
            Ok(_) => return Ok(true),
            Err(UpstreamError::NotFound(_)) => {}
            Err(UpstreamError::Denied(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        let ours = &self.endpoints.get(self.endpoints.origin()).auth;
        match self.call_as(Some(ours), repository, latest()).await {
            Ok(_) => return Ok(false),
            Err(UpstreamError::NotFound(_) | UpstreamError::Denied(_)) => {}
            Err(e) => return Err(e),
        }
        let tags = Call {
            method: Method::GET,
            kind: Kind::Access,
            object: Object::Repository,
            path: "tags/list",
            query: Some("n=1"),
            accept: None,
            patience: Patience::Queue,
        };
        match self.call_as(Some(&theirs), repository, tags).await {
            Ok(_) => Ok(true),
            Err(UpstreamError::NotFound(_) | UpstreamError::Denied(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends `call` for `/v2/<repository>/<path>[?query]` with the proxy's credentials.
    async fn call(
        &self,
        repository: &str,
        call: Call<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.call_as(None, repository, call).await
    }

    /// Sends `call` for `/v2/<repository>/<path>[?query]`, authenticating with `auth`
    /// as the upstream asks, and counts each try. Any answer but 200 is an error.
    /// Without `auth` (the proxy's own request, with its own credentials for the origin)
    /// each URL is tried in turn while they fail or lack the object ([`failover`]); with
    /// `auth` (a client's check, or the anonymous probe) only the origin is asked: it
    /// decides, and a client's credentials go nowhere else.
    async fn call_as(
        &self,
        auth: Option<&Auth>,
        repository: &str,
        call: Call<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if self.mode() == UpstreamMode::Offline {
            return Err(UpstreamError::Offline {
                registry: self.name.clone(),
                object: call.object,
            });
        }
        let scope = format!("repository:{repository}:pull");
        let slot = self
            .pressure
            .admit(
                call.method == Method::GET && call.kind == Kind::Manifest,
                call.patience,
            )
            .await?;
        let order = match auth {
            Some(_) => vec![self.endpoints.origin()],
            None => self.endpoints.order(Instant::now()),
        };
        let tries = order.len();
        let mut answer = None;
        for (n, i) in order.into_iter().enumerate() {
            let endpoint = self.endpoints.get(i);
            let auth = auth.unwrap_or(&endpoint.auth);
            let mut url = format!("{}/v2/{repository}/{}", endpoint.base, call.path);
            if let Some(q) = call.query.filter(|q| !q.is_empty()) {
                url.push('?');
                url.push_str(q);
            }
            let started = Instant::now();
            let result = self.send_as(auth, &url, &scope, &call).await;
            let elapsed = started.elapsed().as_secs_f64();
            let code = result.as_ref().ok().map(|r| r.status().as_u16());
            self.metrics.upstream(&self.name, call.kind, code, elapsed);
            let backoff = result
                .as_ref()
                .ok()
                .and_then(|r| self.pressure.observe(r.status(), r.headers()));
            let failed = failover::worth_next(&result);
            self.endpoints.mark(i, failed, Instant::now());
            // What one URL does not have, the next may (a regional mirror that holds only
            // some images), as containerd moves on through its hosts; the URL is fine. A
            // URL before the origin that refuses (it was sent no credentials) is passed
            // over the same way.
            let missing = result.as_ref().is_ok_and(|r| {
                r.status() == StatusCode::NOT_FOUND
                    || (i != self.endpoints.origin()
                        && matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN))
            });
            // A back-off is the whole upstream's: no other URL is asked either.
            if (failed || missing) && backoff.is_none() && n + 1 < tries {
                continue;
            }
            answer = Some((result, url, backoff));
            break;
        }
        let (result, url, backoff) = answer.expect("an upstream has at least one URL");
        // The headers are in: the request's room under the cap is someone else's now.
        drop(slot);
        let resp = result?;
        match resp.status().as_u16() {
            200 => Ok(resp),
            404 => Err(UpstreamError::NotFound(call.object)),
            s @ (401 | 403) => Err(UpstreamError::Denied(s)),
            429 => Err(UpstreamError::RateLimited {
                retry_after: backoff.unwrap_or_default(),
            }),
            s @ 500..=599 => Err(UpstreamError::Failed {
                server: origin_of(&url),
                status: s,
            }),
            s => Err(UpstreamError::protocol(format!(
                "HTTP {s}, which a registry does not answer here"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_n_and_last_are_kept_in_order() {
        assert_eq!(
            tags_query(Some("last=b&x=1&n=10")),
            Some("n=10&last=b".into())
        );
        assert_eq!(tags_query(Some("cachebuster=7")), None);
        assert_eq!(tags_query(None), None);
    }

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        let link = r#"</v2/library/alpine/tags/list?last=3.19&n=50>; rel="next""#;
        assert_eq!(next_page(Some(link)), Some("n=50&last=3.19".into()));
        let full = r#"<https://reg.example/v2/a/tags/list?n=2&last=b>; rel=next"#;
        assert_eq!(next_page(Some(full)), Some("n=2&last=b".into()));
        assert_eq!(
            next_page(Some(r#"</v2/a/tags/list?n=2>; rel="prev""#)),
            None
        );
        assert_eq!(next_page(None), None);
    }
}

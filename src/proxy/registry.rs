//! The registry API's requests, each on one path from the top down: the upstream the
//! request is for, the repository as that upstream names it, its `repositories` filter,
//! a replica's proof, the client's admission ([`Access`]), then the cache through the
//! repository's links ([`Links`]); every manifest and blob request counted. Each
//! request comes back with its [`Served`] record, which the log line says. HTTP is
//! parsed and rendered in [`crate::proxy::http`]: nothing here reads a header.

use super::access::{self, Access, Admission, Issued};
use super::error::ProxyError;
use super::links::{Links, repo_key};
use super::metrics::{ByteSource, CacheResult, Kind, Metrics};
use super::prefetcher::Prefetcher;
use super::pull_through::{BlobAnswer, BlobAsk, ByteRange, ConfiguredImage, Manifest};
use super::upstream::{Referrers, Secret, TagsPage, Upstream};
use super::zero_copy::Spans;
use crate::api::docker_hub;
use crate::api::image_ref::{self, ImageRefError};
use crate::oci::media::Accept;
use crate::oci::reference::validate_repository;
use crate::oci::{Digest, Reference};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Repositories one token request may ask for: each is a check with the upstream.
/// containerd and docker ask for one or two.
pub const MAX_TOKEN_SCOPES: usize = 16;

/// The upstreams a proxy serves, by registry name, and the one for requests that name
/// none.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    default: Arc<Upstream>,
}

/// Why an image reference cannot be served here.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not an image reference.
    #[error(transparent)]
    Reference(#[from] ImageRefError),
    /// On a registry no upstream serves.
    #[error("{0} is not mirrored by this proxy")]
    NotMirrored(String),
    /// Outside the upstream's `repositories` filter.
    #[error("{0} may not be pulled through this mirror")]
    Denied(String),
}

impl Upstreams {
    /// `by_name` (lower-case registry names), `default` among them.
    pub fn new(by_name: HashMap<String, Arc<Upstream>>, default: &str) -> Upstreams {
        let default = by_name[default].clone();
        Upstreams { by_name, default }
    }

    /// The upstream serving `registry` (as sent in `?ns=`, or as an image names it), if
    /// one does; Docker Hub's names are one registry.
    pub fn find(&self, registry: &str) -> Option<Arc<Upstream>> {
        let key = registry.to_ascii_lowercase();
        if let Some(u) = self.by_name.get(&key) {
            return Some(u.clone());
        }
        if docker_hub::is_alias(&key) {
            return self
                .by_name
                .iter()
                .find(|(name, _)| docker_hub::is_alias(name))
                .map(|(_, u)| u.clone());
        }
        None
    }

    /// Which upstream a request is for (docs/proxy.md, "Which upstream a request is
    /// for"): the one `?ns=` names; else the one the name's first component names, when
    /// it is a registry as image references write one (`/v2/ghcr.io/org/app/...`), that
    /// component taken off the name; else the default upstream. A first component that
    /// names no configured upstream stays part of the name, on the default upstream.
    pub fn route<'n>(&self, ns: Option<&str>, name: &'n str) -> Result<Routed<'n>, ProxyError> {
        if let Some(ns) = ns {
            let upstream = self
                .find(ns)
                .ok_or_else(|| ProxyError::UnknownRegistry(ns.chars().take(253).collect()))?;
            return Ok(Routed {
                upstream,
                prefix: None,
                name,
            });
        }
        Ok(self.by_prefix(name).unwrap_or_else(|| Routed {
            upstream: self.default.clone(),
            prefix: None,
            name,
        }))
    }

    /// The upstream the first component of `name` names, if it is a registry that one
    /// serves, its port written either way ([`image_ref::registry_from_path`]).
    fn by_prefix<'n>(&self, name: &'n str) -> Option<Routed<'n>> {
        let (first, rest) = name.split_once('/')?;
        let registry = image_ref::registry_from_path(first);
        if !image_ref::looks_like_registry(&registry) {
            return None;
        }
        Some(Routed {
            upstream: self.find(&registry)?,
            prefix: Some(first),
            name: rest,
        })
    }

    /// The upstream for clients that name none.
    pub fn default_upstream(&self) -> &Arc<Upstream> {
        &self.default
    }

    /// Every upstream.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_name.values()
    }

    /// An image reference (`docker.io/library/alpine:3.20`) resolved to the upstream
    /// that serves it, its repository as the upstream names it.
    pub fn resolve_image(&self, image: &str) -> Result<ConfiguredImage, ImageError> {
        let r = image_ref::parse(image)?;
        let upstream = self
            .find(&r.registry)
            .ok_or_else(|| ImageError::NotMirrored(r.registry.clone()))?;
        let repository = upstream.canonical_repository(&r.repository);
        if !upstream.permits(&repository) {
            return Err(ImageError::Denied(repository));
        }
        Ok(ConfiguredImage {
            upstream,
            repository,
            reference: r.reference,
            name: image.to_string(),
        })
    }
}

/// A request's upstream, and the repository's name there as the client wrote it.
pub struct Routed<'n> {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// The path's first component, when it chose the upstream (`ghcr.io`).
    pub prefix: Option<&'n str>,
    /// The name without that component.
    pub name: &'n str,
}

/// What the log line says of a request.
#[derive(Debug, Default)]
pub struct Served {
    /// The upstream it was for.
    pub upstream: Option<String>,
    /// The repository, as the upstream names it.
    pub repo: Option<String>,
    /// The tag or digest.
    pub reference: Option<String>,
    /// How the cache answered a manifest or blob.
    pub cache: Option<CacheResult>,
}

/// What a registry request asks, as the HTTP layer read it.
pub struct Ask<'a> {
    /// The registry it names (`?ns=`), if it does.
    pub ns: Option<&'a str>,
    /// The repository, as the client wrote it.
    pub name: &'a str,
    /// A HEAD.
    pub head: bool,
    /// Its `Authorization`.
    pub authorization: Option<&'a str>,
    /// Where a challenge sends it for a token (`https://<Host>/auth/token`); `None`
    /// when it named no valid Host.
    pub realm: Option<String>,
    /// Its replica's proof, when it says it comes from one ([`super::peers`]).
    pub peer: Option<PeerProof<'a>>,
}

/// A replica's proof ([`super::peers::PEER_HEADER`]) and what it must cover.
pub struct PeerProof<'a> {
    /// The header's value.
    pub proof: &'a str,
    /// The request's method.
    pub method: &'a str,
    /// The request's path and query.
    pub target: &'a str,
}

/// What a token request asks, as the HTTP layer read it.
pub struct TokenAsk {
    /// `service`: `pullthrough:<registry>`.
    pub service: Option<String>,
    /// Every `scope` (`repository:<name>:pull`), split on spaces.
    pub scopes: Vec<String>,
    /// The client's secret, if it gave one.
    pub secret: Option<Secret>,
}

/// What a request is for, as far as its admission goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A blob's bytes: what a replica may ask another for.
    BlobBody,
    /// Anything else.
    Other,
}

/// A request admitted: its upstream and repository, and whether a replica asks.
struct Admitted {
    up: Arc<Upstream>,
    repo: String,
    from_peer: bool,
}

/// The request layer: the upstreams, who may pull what, and the cache under names.
pub struct Registry {
    upstreams: Upstreams,
    access: Access,
    links: Arc<Links>,
    prefetcher: Arc<Prefetcher>,
    metrics: Metrics,
}

impl Registry {
    /// The layer over `upstreams`, `access` and the cache behind `links`; manifests
    /// served are told to `prefetcher` (their lead time).
    pub fn new(
        upstreams: Upstreams,
        access: Access,
        links: Arc<Links>,
        prefetcher: Arc<Prefetcher>,
        metrics: Metrics,
    ) -> Registry {
        Registry {
            upstreams,
            access,
            links,
            prefetcher,
            metrics,
        }
    }

    /// The upstreams.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The cache under repository names.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// A manifest by tag or digest, for a client that takes `accept`.
    pub async fn manifest(
        &self,
        ask: &Ask<'_>,
        reference: &Reference,
        accept: &Accept,
    ) -> (Result<Manifest, ProxyError>, Served) {
        let mut served = Served {
            reference: Some(reference.to_string()),
            ..Served::default()
        };
        let result = async {
            let Admitted { up, repo, .. } = self.admit(ask, Want::Other, &mut served).await?;
            let answer = self.links.manifest(&up, &repo, reference, accept).await;
            let (m, how) = self.count(&up, Kind::Manifest, answer, &mut served)?;
            self.prefetcher.pulled(&repo_key(&up, &repo), &m.digest);
            if !ask.head {
                self.metrics
                    .served_bytes(up.name(), ByteSource::of(how, false))
                    .inc_by(m.body.len() as u64);
            }
            Ok(m)
        }
        .await;
        (result, served)
    }

    /// A blob (a HEAD, a body, a range of it); its body counted as it is sent.
    pub async fn blob(
        &self,
        ask: &Ask<'_>,
        digest: &Digest,
        range: Option<ByteRange>,
        spans: Option<&Spans>,
    ) -> (Result<BlobAnswer, ProxyError>, Served) {
        let mut served = Served {
            reference: Some(digest.to_string()),
            ..Served::default()
        };
        let want = if ask.head {
            Want::Other
        } else {
            Want::BlobBody
        };
        let result = async {
            let admitted = self.admit(ask, want, &mut served).await?;
            let (up, repo) = (&admitted.up, &admitted.repo);
            let blob_ask = BlobAsk {
                range,
                head: ask.head,
                spans,
                from_peer: admitted.from_peer,
                unlinked: false,
            };
            let answer = self
                .links
                .blob(up, repo, digest, blob_ask, admitted.from_peer)
                .await
                .map(|a| {
                    let how = a.result;
                    (a, how)
                });
            let (mut answer, _) = self.count(up, Kind::Blob, answer, &mut served)?;
            // Bytes for another replica are counted there, for its clients.
            let sent = if admitted.from_peer {
                self.metrics.peer_served_bytes.clone()
            } else if answer.redirect.is_some() {
                let sent = self.metrics.served_bytes(up.name(), ByteSource::Bucket);
                if !ask.head {
                    sent.inc_by(answer.sent_len().unwrap_or(0));
                }
                sent
            } else {
                self.metrics
                    .served_bytes(up.name(), ByteSource::of(answer.result, answer.via_owner))
            };
            answer.body = answer.body.map(|body| {
                body.inspect_ok(move |chunk| sent.inc_by(chunk.len() as u64))
                    .boxed()
            });
            Ok(answer)
        }
        .await;
        (result, served)
    }

    /// One page of a repository's tags (`query`: the client's, of which `n` and `last`
    /// are passed on).
    pub async fn tags(
        &self,
        ask: &Ask<'_>,
        query: Option<&str>,
    ) -> (Result<TagsPage, ProxyError>, Served) {
        let mut served = Served::default();
        let result = async {
            let Admitted { up, repo, .. } = self.admit(ask, Want::Other, &mut served).await?;
            self.links.cache().tags_list(&up, &repo, query).await
        }
        .await;
        (result, served)
    }

    /// The referrers of `digest` (`query`: the client's, `artifactType` passed on).
    pub async fn referrers(
        &self,
        ask: &Ask<'_>,
        digest: &Digest,
        query: Option<&str>,
    ) -> (Result<Referrers, ProxyError>, Served) {
        let mut served = Served {
            reference: Some(digest.to_string()),
            ..Served::default()
        };
        let result = async {
            let Admitted { up, repo, .. } = self.admit(ask, Want::Other, &mut served).await?;
            self.links
                .cache()
                .referrers(&up, &repo, digest, query)
                .await
        }
        .await;
        (result, served)
    }

    /// `/v2/`, which clients that start with it (docker, podman, skopeo, crane) ask before
    /// anything else, keeping its challenge for every request after: with an
    /// `upstreamAuth` upstream, a client without credentials is challenged, for a token
    /// from this proxy's service as a whole ([`Registry::token`] routes each scope). With
    /// none, or without a valid Host to name the realm, anyone may go on. containerd
    /// never asks it.
    pub fn base(&self, authorization: Option<&str>, realm: Option<&str>) -> Result<(), ProxyError> {
        match realm {
            Some(realm) if authorization.is_none() && self.upstreams.all().any(|u| u.guarded()) => {
                Err(ProxyError::Unauthorized {
                    challenge: format!("Bearer realm=\"{realm}\",service=\"{}\"", access::SERVICE),
                })
            }
            _ => Ok(()),
        }
    }

    /// A token for the repositories a token request's scopes ask to pull, as far as the
    /// client's secret may pull them upstream (see [`crate::proxy::access`]). The
    /// service names the upstream (`pullthrough:<registry>`, as a repository's challenge
    /// says), or, as `/v2/`'s challenge says, only this proxy (`pullthrough`): then each
    /// scope is read as a path is, the upstream first or the default upstream's. A
    /// token is for one upstream, the first scope's; an upstream that is not
    /// `upstreamAuth` asks for no token, and gets one that grants nothing.
    pub async fn token(
        &self,
        ask: TokenAsk,
        client: IpAddr,
    ) -> (Result<Issued, ProxyError>, Served) {
        let mut served = Served::default();
        let result = async {
            let named = self.service(ask.service.as_deref())?;
            let mut chosen = named.clone();
            let mut repositories: Vec<String> = Vec::new();
            for scope in &ask.scopes {
                let mut parts = scope.splitn(3, ':');
                let (Some("repository"), Some(name), Some(actions)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if !actions.split(',').any(|a| a == "pull" || a == "*") {
                    continue;
                }
                let (up, name) = match &named {
                    // Clients that pulled through a path prefix name it in their scope.
                    Some(up) => match self.upstreams.by_prefix(name) {
                        Some(r) if Arc::ptr_eq(&r.upstream, up) => (r.upstream, r.name),
                        _ => (up.clone(), name),
                    },
                    None => {
                        let r = self.upstreams.route(None, name)?;
                        (r.upstream, r.name)
                    }
                };
                let chosen = chosen.get_or_insert_with(|| up.clone());
                let repo = up.canonical_repository(name);
                if Arc::ptr_eq(chosen, &up)
                    && validate_repository(&repo).is_ok()
                    && up.permits(&repo)
                    && !repositories.contains(&repo)
                {
                    repositories.push(repo);
                }
            }
            let up = chosen.unwrap_or_else(|| self.upstreams.default.clone());
            served.upstream = Some(up.name().to_string());
            served.repo = repositories.first().cloned();
            if repositories.len() > MAX_TOKEN_SCOPES {
                return Err(ProxyError::TokenRequest(format!(
                    "at most {MAX_TOKEN_SCOPES} repositories per token request"
                )));
            }
            if !up.guarded() {
                repositories.clear();
            }
            self.access
                .issue(&up, &repositories, ask.secret.as_ref(), client)
                .await
        }
        .await;
        (result, served)
    }

    /// The upstream a token request's `service` names: `None` for this proxy as a whole.
    fn service(&self, service: Option<&str>) -> Result<Option<Arc<Upstream>>, ProxyError> {
        match service {
            None | Some(access::SERVICE) => Ok(None),
            Some(s) => s
                .strip_prefix(access::SERVICE)
                .and_then(|s| s.strip_prefix(':'))
                .and_then(|name| self.upstreams.find(name))
                .map(Some)
                .ok_or_else(|| {
                    ProxyError::TokenRequest(format!(
                        "service must be {0} or {0}:<registry> of a registry this proxy mirrors",
                        access::SERVICE
                    ))
                }),
        }
    }

    /// The first steps of every registry request: its upstream, its repository as the
    /// upstream names it, the filter, a replica's proof, the client's admission.
    async fn admit(
        &self,
        ask: &Ask<'_>,
        want: Want,
        served: &mut Served,
    ) -> Result<Admitted, ProxyError> {
        let routed = self.upstreams.route(ask.ns, ask.name)?;
        let up = routed.upstream;
        served.upstream = Some(up.name().to_string());
        let repo = up.canonical_repository(routed.name);
        validate_repository(&repo).map_err(|e| ProxyError::NameInvalid(e.to_string()))?;
        served.repo = Some(repo.clone());
        if !up.permits(&repo) {
            return Err(ProxyError::RepositoryDenied(repo));
        }
        // Another replica, asking the owner for a blob it proved itself: trusted for
        // that (no challenge, no proof again) once its proof verifies, for nothing else.
        let from_peer = match &ask.peer {
            None => false,
            Some(p) => {
                let peers = self
                    .links
                    .cache()
                    .peers()
                    .ok_or(ProxyError::PeerRefused("this proxy has no replicas"))?;
                peers
                    .check(p.proof, p.method, p.target)
                    .map_err(ProxyError::PeerRefused)?;
                if want != Want::BlobBody {
                    return Err(ProxyError::PeerRefused(
                        "a replica may ask another only for a blob (GET)",
                    ));
                }
                true
            }
        };
        if up.guarded() && !from_peer {
            let admission = self.access.admit(&up, &repo, ask.authorization).await;
            if let Admission::Challenge { insufficient_scope } = admission {
                self.metrics.access_challenge(up.name());
                let realm = ask.realm.as_deref().ok_or_else(|| {
                    ProxyError::NameInvalid(
                        "a request for a private repository needs a valid Host".into(),
                    )
                })?;
                // The scope names the repository as the client's path does, so that a
                // client that asks for the scope it was told asks for this one.
                let scoped = match routed.prefix {
                    Some(prefix) => format!("{prefix}/{repo}"),
                    None => repo.clone(),
                };
                return Err(ProxyError::Unauthorized {
                    challenge: challenge(realm, &up, &scoped, insufficient_scope),
                });
            }
        }
        Ok(Admitted {
            up,
            repo,
            from_peer,
        })
    }

    /// Counts a manifest or blob request in `pullthrough_requests_total`.
    fn count<T>(
        &self,
        up: &Upstream,
        kind: Kind,
        result: Result<(T, CacheResult), ProxyError>,
        served: &mut Served,
    ) -> Result<(T, CacheResult), ProxyError> {
        let how = result.as_ref().map_or(CacheResult::Error, |(_, r)| *r);
        served.cache = Some(how);
        self.metrics.request(up.name(), kind, how);
        result
    }
}

/// The `WWW-Authenticate` challenge for `repository` of `up`: a token from `realm`.
fn challenge(realm: &str, up: &Upstream, repository: &str, insufficient_scope: bool) -> String {
    let mut c = format!(
        "Bearer realm=\"{realm}\",service=\"{}\",scope=\"repository:{repository}:pull\"",
        access::service(up.name())
    );
    if insufficient_scope {
        c.push_str(",error=\"insufficient_scope\"");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::upstream;
    use std::time::Duration;

    #[tokio::test]
    async fn ns_first_then_a_registry_in_the_path_then_the_default() {
        let names = ["docker.io", "ghcr.io", "registry.local:5000"];
        let by_name = names
            .iter()
            .map(|n| {
                let up = upstream(&format!("registry: {n}"), Duration::from_secs(5));
                (n.to_string(), up)
            })
            .collect();
        let upstreams = Upstreams::new(by_name, "docker.io");
        let route = |ns: Option<&str>, name: &str| {
            let r = upstreams.route(ns, name).unwrap();
            let prefix = r.prefix.map(str::to_string);
            (r.upstream.name().to_string(), prefix, r.name.to_string())
        };
        let is = |up: &str, prefix: Option<&str>, name: &str| {
            (up.to_string(), prefix.map(str::to_string), name.to_string())
        };
        // `?ns=` wins, and the path is the repository as it stands.
        assert_eq!(
            route(Some("ghcr.io"), "docker.io/org/app"),
            is("ghcr.io", None, "docker.io/org/app")
        );
        assert_eq!(
            route(Some("INDEX.docker.io"), "library/alpine"),
            is("docker.io", None, "library/alpine")
        );
        assert!(matches!(
            upstreams.route(Some("quay.io"), "x/y"),
            Err(ProxyError::UnknownRegistry(r)) if r == "quay.io"
        ));
        // Else a first component that is a configured registry, by any of its names.
        assert_eq!(
            route(None, "ghcr.io/org/app"),
            is("ghcr.io", Some("ghcr.io"), "org/app")
        );
        assert_eq!(
            route(None, "index.docker.io/library/alpine"),
            is("docker.io", Some("index.docker.io"), "library/alpine")
        );
        assert_eq!(
            route(None, "registry.local:5000/team/app"),
            is(
                "registry.local:5000",
                Some("registry.local:5000"),
                "team/app"
            )
        );
        // Its port written as image references allow it in a path.
        assert_eq!(
            route(None, "registry.local_5000/team/app"),
            is(
                "registry.local:5000",
                Some("registry.local_5000"),
                "team/app"
            )
        );
        for not_a_port in ["registry.local_/x", "registry.local_50a/x", "ghcr.io_443/x"] {
            assert_eq!(route(None, not_a_port), is("docker.io", None, not_a_port));
        }
        // Only one component is taken: the default's own repository named like a
        // registry is reached through the default's name.
        assert_eq!(
            route(None, "docker.io/ghcr.io/app"),
            is("docker.io", Some("docker.io"), "ghcr.io/app")
        );
        // Else the default, the name whole: a namespace, a registry no upstream serves,
        // a registry's name alone.
        for name in ["library/alpine", "quay.io/x/y", "ghcr.io", "ghcr/app"] {
            assert_eq!(route(None, name), is("docker.io", None, name));
        }
    }
}

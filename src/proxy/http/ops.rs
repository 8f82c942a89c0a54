//! The operations port: `/metrics`, `/healthz`, `/readyz` (the server's own, see
//! [`crate::server::handle_ops`]) and the admin endpoints, with the admin token
//! (`Authorization: Bearer <token>`, from any address: the controller asks from its own
//! pod, and loopback alone would prove nothing, sidecars connect from there too):
//! `POST|GET /admin/prefetch`, `PUT|GET /admin/in-use`, `PUT|GET /admin/mode`,
//! `POST /admin/availability` and `DELETE /admin/cache?image=|tag=|repository=`
//! (`pullthrough cache drop`). Their
//! requests and answers are the typed ones of [`crate::proxy::admin::api`].

use super::Body;
use super::route::percent_decode;
use crate::oci::Digest;
use crate::oci::Reference;
use crate::proxy::admin::api::{
    AvailabilityAnswer, AvailabilityRequest, DropScope, Dropped, InUse, InUseSet, Modes,
    PrefetchProgress, PrefetchRequest, Refusal, SetMode, UpstreamModeOf,
};
use crate::proxy::availability::MAX_IMAGES as MAX_AVAILABILITY;
use crate::proxy::index::Removal;
use crate::proxy::prefetcher::{MAX_IMAGES_PER_REQUEST, MAX_JOBS};
use crate::proxy::pull_through::ConfiguredImage;
use crate::proxy::state::Proxy;
use crate::server::full;
use futures::StreamExt as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Images an in-use request may name.
const MAX_IN_USE: usize = 10_000;

/// Answers one request of the operations port.
pub async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let admin = matches!(
        path.as_str(),
        "/admin/prefetch"
            | "/admin/in-use"
            | "/admin/mode"
            | "/admin/cache"
            | "/admin/availability"
    );
    if !admin {
        return crate::server::handle_ops(proxy, req).await;
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !proxy.admin_authorized(authorization) {
        let why = "missing or wrong admin token (the proxy's admin-token file)";
        let mut refused = json(StatusCode::UNAUTHORIZED, &Refusal::new(why));
        refused
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Ok(refused);
    }
    Ok(match path.as_str() {
        "/admin/prefetch" => prefetch(&proxy, req).await,
        "/admin/in-use" => in_use(&proxy, req).await,
        "/admin/mode" => mode(&proxy, req).await,
        "/admin/availability" => availability(&proxy, req).await,
        _ => drop_cached(&proxy, req).await,
    })
}

/// A JSON answer of the operations port.
fn json(status: StatusCode, v: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("an answer serializes");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("valid response")
}

/// `POST /admin/prefetch` queues images to prefetch (see [`crate::proxy::prefetcher`]),
/// answering 202 with what was queued and what was known already; `GET` shows every
/// requested image's progress. Nothing is queued unless every image resolves, nor when
/// the queue would hold more than it may (429).
async fn prefetch(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let prefetcher = proxy.prefetcher();
    if req.method() == Method::GET {
        let progress = PrefetchProgress {
            images: prefetcher.progress(),
        };
        return json(StatusCode::OK, &progress);
    }
    if req.method() != Method::POST {
        let why = "use POST /admin/prefetch with {\"images\": [...]}, or GET for progress";
        return json(StatusCode::METHOD_NOT_ALLOWED, &Refusal::new(why));
    }
    let example = r#"{"images": ["docker.io/library/alpine:3.20"], "platforms": ["linux/amd64"]}"#;
    let limits = (64 << 10, MAX_IMAGES_PER_REQUEST);
    let read = images_of(proxy, req, limits, example, |a: &PrefetchRequest| {
        a.images.iter().map(String::as_str).collect()
    })
    .await;
    let (asked, images) = match read {
        Ok(r) => r,
        Err(refusal) => return json(StatusCode::BAD_REQUEST, &refusal),
    };
    let platforms = asked
        .platforms
        .unwrap_or_else(|| proxy.prefetch_platforms().to_vec());
    match prefetcher.request(images, &platforms) {
        Ok(accepted) => {
            tracing::info!(
                queued = accepted.queued.len(),
                known = accepted.known.len(),
                "prefetch requested"
            );
            json(StatusCode::ACCEPTED, &accepted)
        }
        Err(full) => {
            let why = format!(
                "the prefetch queue is full: {} images wait or are being fetched, at most \
                 {MAX_JOBS} may; ask again once some are done",
                full.waiting
            );
            let mut refused = json(StatusCode::TOO_MANY_REQUESTS, &Refusal::new(why));
            refused
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            refused
        }
    }
}

/// `PUT /admin/in-use` replaces the images in use: kept from eviction, with everything
/// they reference, like pins, until the next `PUT` (the controller names the images of
/// the workloads that run; in memory only, so it sends them again every few minutes).
/// `GET` lists them.
async fn in_use(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let pins = proxy.registry().links().cache().pins();
    if req.method() == Method::GET {
        let images = pins.in_use().into_iter().map(|i| i.name).collect();
        return json(StatusCode::OK, &InUse { images });
    }
    if req.method() != Method::PUT {
        let why = "use PUT /admin/in-use with {\"images\": [...]}, or GET";
        return json(StatusCode::METHOD_NOT_ALLOWED, &Refusal::new(why));
    }
    let example = r#"{"images": ["docker.io/library/alpine:3.20"]}"#;
    let limits = (1 << 20, MAX_IN_USE);
    let read = images_of(proxy, req, limits, example, |n: &InUse| {
        n.images.iter().map(String::as_str).collect()
    });
    let (_, images) = match read.await {
        Ok(r) => r,
        Err(refusal) => return json(StatusCode::BAD_REQUEST, &refusal),
    };
    let count = images.len();
    pins.set_in_use(images);
    tracing::info!(images = count, "images in use replaced");
    json(StatusCode::OK, &InUseSet { in_use: count })
}

/// `GET /admin/mode` says what mode each upstream is in; `PUT` with `{"mode": ...}`
/// puts every upstream in it, or with `"upstream"` one of them, at once and until the
/// next `PUT` or restart (the config's `mode` is where the proxy starts).
async fn mode(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let upstreams = proxy.registry().upstreams();
    let modes = || Modes {
        upstreams: upstreams
            .all()
            .map(|u| UpstreamModeOf {
                upstream: u.name().to_string(),
                mode: u.mode(),
            })
            .collect(),
    };
    if req.method() == Method::GET {
        return json(StatusCode::OK, &modes());
    }
    let example = r#"{"mode": "offline", "upstream": "docker.io"} (upstream optional)"#;
    if req.method() != Method::PUT {
        let why = format!("use PUT /admin/mode with {example}, or GET");
        return json(StatusCode::METHOD_NOT_ALLOWED, &Refusal::new(why));
    }
    let asked: SetMode = match json_body(req, 4 << 10, example).await {
        Ok(a) => a,
        Err(refusal) => return json(StatusCode::BAD_REQUEST, &refusal),
    };
    let chosen: Vec<_> = upstreams
        .all()
        .filter(|u| asked.upstream.as_deref().is_none_or(|n| n == u.name()))
        .collect();
    if chosen.is_empty() {
        let why = format!(
            "no upstream {}: this proxy mirrors {}",
            asked.upstream.unwrap_or_default(),
            upstreams
                .all()
                .map(|u| u.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return json(StatusCode::NOT_FOUND, &Refusal::new(why));
    }
    for u in chosen {
        if u.mode() != asked.mode {
            tracing::info!(upstream = u.name(), from = %u.mode(), to = %asked.mode, "upstream mode changed");
            u.set_mode(asked.mode);
        }
    }
    json(StatusCode::OK, &modes())
}

/// `POST /admin/availability` says whether each image asked for can be pulled now (see
/// [`crate::proxy::availability`]), four at a time.
async fn availability(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let example = "{\"images\": [{\"image\": \"docker.io/library/alpine:3.20\"}], \"platforms\": [\"linux/amd64\"]}";
    if req.method() != Method::POST {
        let why = format!("use POST /admin/availability with {example}");
        return json(StatusCode::METHOD_NOT_ALLOWED, &Refusal::new(why));
    }
    let limits = (1 << 20, MAX_AVAILABILITY);
    let read = images_of(proxy, req, limits, example, |a: &AvailabilityRequest| {
        a.images.iter().map(|i| i.image.as_str()).collect()
    });
    let (asked, resolved) = match read.await {
        Ok(r) => r,
        Err(refusal) => return json(StatusCode::BAD_REQUEST, &refusal),
    };
    let registry = proxy.registry();
    let running: Vec<Vec<Digest>> = (asked.images.iter())
        .map(|i| i.running.iter().filter_map(|d| d.parse().ok()).collect())
        .collect();
    let checks = resolved.into_iter().zip(running).map(|(image, running)| {
        let (links, platforms) = (registry.links().clone(), asked.platforms.clone());
        async move { crate::proxy::availability::check(&links, &image, &running, &platforms).await }
    });
    let images = futures::stream::iter(checks)
        .buffered(4)
        .collect::<Vec<_>>()
        .await;
    json(StatusCode::OK, &AvailabilityAnswer { images })
}

/// `DELETE /admin/cache?image=<reference>` drops an image (a tag and what it points to,
/// or a digest) and the blobs only it uses; `?tag=<reference>` forgets where a tag
/// points; `?repository=<registry/repository>` drops every tag and image of it.
async fn drop_cached(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let usage = "use DELETE /admin/cache?image=<reference>, ?tag=<reference> or \
        ?repository=<registry/repository>";
    if req.method() != Method::DELETE {
        return json(StatusCode::METHOD_NOT_ALLOWED, &Refusal::new(usage));
    }
    let asked: Vec<(DropScope, Option<String>)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let scope = [DropScope::Image, DropScope::Tag, DropScope::Repository]
                .into_iter()
                .find(|s| s.param() == k)?;
            Some((scope, percent_decode(v)))
        })
        .collect();
    let [(scope, Some(text))] = asked.as_slice() else {
        let why = format!("{usage} (exactly one), e.g. ?image=docker.io/library/alpine:3.20");
        return json(StatusCode::BAD_REQUEST, &Refusal::new(why));
    };
    let scope = *scope;
    let parsed = match crate::api::image_ref::parse(text) {
        Ok(r) => r,
        Err(e) => return json(StatusCode::BAD_REQUEST, &Refusal::new(e.to_string())),
    };
    let registry = proxy.registry();
    let Some(up) = registry.upstreams().find(&parsed.registry) else {
        let why = format!("{} is not mirrored by this proxy", parsed.registry);
        return json(StatusCode::NOT_FOUND, &Refusal::new(why));
    };
    let links = registry.links();
    let (name, tags, removed) = match (scope, &parsed.reference) {
        (DropScope::Image, reference) => {
            let removed = links
                .cache()
                .drop_image(&up, &parsed.repository, reference)
                .await;
            let tags = match reference {
                Reference::Tag(t) => vec![t.clone()],
                Reference::Digest(_) => Vec::new(),
            };
            (parsed.to_string(), tags, removed)
        }
        (DropScope::Tag, Reference::Tag(t)) => {
            links.cache().forget_tag(&up, &parsed.repository, t).await;
            (parsed.to_string(), vec![t.clone()], Removal::default())
        }
        (DropScope::Tag, Reference::Digest(_)) => {
            let why = "?tag= names a tag, not a digest (?image= drops an image by digest)";
            return json(StatusCode::BAD_REQUEST, &Refusal::new(why));
        }
        (DropScope::Repository, _) => {
            if crate::api::image_ref::names_reference(text) {
                let why = "?repository= names a repository, without a tag or digest";
                return json(StatusCode::BAD_REQUEST, &Refusal::new(why));
            }
            match links.drop_repository(&up, &parsed.repository).await {
                Ok((tags, removed)) => (
                    format!("{}/{}", parsed.registry, parsed.repository),
                    tags,
                    removed,
                ),
                Err(e) => {
                    let why = format!("the repository's tags could not be listed: {e}");
                    return json(StatusCode::SERVICE_UNAVAILABLE, &Refusal::new(why));
                }
            }
        }
    };
    tracing::info!(what = %name, scope = scope.param(), tags = tags.len(), manifests = removed.manifests.len(),
        blobs = removed.blobs.len(), bytes = removed.bytes, "dropped from the cache on request");
    let dropped = Dropped {
        image: name,
        scope,
        tags,
        removed,
    };
    json(StatusCode::OK, &dropped)
}

/// The JSON body (`T`, like `example`) of an admin request naming images (`images` of
/// it), read whole within 30 s: at most `limit` bytes and `max` images, every one
/// resolved to its upstream; else the refusal to answer 400 with.
async fn json_body<T: DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    example: &str,
) -> Result<T, Refusal> {
    let body = http_body_util::Limited::new(req.into_body(), limit);
    let body = match tokio::time::timeout(Duration::from_secs(30), body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return Err(Refusal::new(format!(
                "the body is over {} KiB, broke off or did not arrive in 30 s",
                limit >> 10
            )));
        }
    };
    serde_json::from_slice(&body).map_err(|e| Refusal::new(format!("expected {example}: {e}")))
}

async fn images_of<T: DeserializeOwned>(
    proxy: &Proxy,
    req: Request<Incoming>,
    (limit, max): (usize, usize),
    example: &str,
    images: impl Fn(&T) -> Vec<&str>,
) -> Result<(T, Vec<ConfiguredImage>), Refusal> {
    let asked: T = json_body(req, limit, example).await?;
    let names = images(&asked);
    if names.len() > max {
        return Err(Refusal::new(format!("at most {max} images per request")));
    }
    let upstreams = proxy.registry().upstreams();
    let resolved = names
        .iter()
        .map(|image| {
            upstreams.resolve_image(image).map_err(|e| Refusal {
                error: format!("{image}: {e}"),
                image: Some(image.to_string()),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((asked, resolved))
}

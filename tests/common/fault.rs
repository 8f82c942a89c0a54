//! An in-process upstream registry with fault injection: token auth, 5xx, connections
//! dropped mid-blob, wrong bytes for a digest, bodies held back. It records every request.

use super::{Blob, sha256};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;
/// (repository, tag or digest) -> (bytes, media type)
type ManifestMap = HashMap<(String, String), (Vec<u8>, String)>;

#[derive(Default)]
pub struct State {
    /// (repo, tag or digest) -> (bytes, media type)
    pub manifests: Mutex<ManifestMap>,
    pub blobs: Mutex<HashMap<String, Vec<u8>>>,
    /// Blobs served with other bytes of the same length.
    pub corrupt: Mutex<HashSet<String>>,
    /// When set: Bearer token auth, tokens issued to this user:password only.
    pub token_auth: Mutex<Option<(String, String)>>,
    pub tokens_issued: AtomicU32,
    /// When set: the token endpoint answers this body instead of a token.
    pub token_answer: Mutex<Option<String>>,
    /// When set: blob GETs are answered 307 without a Location.
    pub redirect_nowhere: std::sync::atomic::AtomicBool,
    /// Non-zero: every /v2/ request gets this status.
    pub fail_status: AtomicU16,
    /// When set: a registry that hides private repositories (see [`Hiding`]).
    pub hiding: Mutex<Option<Hiding>>,
    /// When set: every /v2/ request is answered 401 with a Basic challenge, whatever it
    /// carries (a registry that wants credentials it was never given).
    pub basic_challenge: std::sync::atomic::AtomicBool,
    /// Number of upcoming blob GETs cut off after half the body.
    pub drop_mid_blob: AtomicU32,
    /// When set (see [`FaultUpstream::hold_blobs`]): blob bodies send this many bytes
    /// (whole 16 KiB chunks), then wait until the receiver says true or its sender goes.
    pub hold: Mutex<Option<(usize, tokio::sync::watch::Receiver<bool>)>>,
    /// Requests whose "METHOD path?query" contains the text wait, before anything else,
    /// until their receiver says true or its sender goes (see
    /// [`FaultUpstream::hold_requests`]).
    pub held_requests: Mutex<Vec<(String, tokio::sync::watch::Receiver<bool>)>>,
    /// Requests whose "METHOD path?query" contains one of these get their status and
    /// headers, one byte of body, and then nothing, for ever.
    pub stall_bodies: Mutex<Vec<String>>,
    /// Blob GETs whose path contains one of these are answered with a body of unknown
    /// length (chunked) that never ends: 64 KiB chunks as fast as they are read.
    pub endless: Mutex<Vec<String>>,
    /// Blob GETs whose path contains the text are answered with a body of unknown length
    /// that never ends and drips: one byte every interval.
    pub drips: Mutex<Vec<(String, std::time::Duration)>>,
    /// Headers added to every answer under /v2/ (rate-limit headers, `Retry-After`).
    pub extra_headers: Mutex<Vec<(&'static str, String)>>,
    /// Requests being handled now, and the most there ever were at once.
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    /// Milliseconds every manifest request takes before it is answered.
    pub manifest_delay_ms: AtomicU64,
    /// Every request as "METHOD path?query".
    pub log: Mutex<Vec<String>>,
    /// The Authorization header of every request ("" when absent).
    pub auth_log: Mutex<Vec<String>>,
    /// When set: blob GETs are redirected (307) to `<this>/storage/<digest>?sig=ok`, as
    /// registries do to pre-signed object storage URLs.
    pub redirect_blobs_to: Mutex<Option<String>>,
}

/// A registry that hides private repositories as GitHub, GitLab and Harbor do: every
/// /v2/ request needs a token (a 401 Bearer challenge otherwise), the token endpoint gives
/// anyone one (anonymous without credentials, a user's with valid Basic credentials), and
/// a hidden repository answers 404, as if it did not exist, to a token whose user may not
/// see it.
#[derive(Clone, Default)]
pub struct Hiding {
    /// User names and passwords.
    pub users: Vec<(String, String)>,
    /// Hidden repositories, and the users who see each.
    pub hidden: Vec<(String, Vec<String>)>,
}

pub struct FaultUpstream {
    pub url: String,
    pub host: String,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultUpstream {
    /// A proxy's configuration with this upstream as its one (and default) upstream.
    pub fn config(&self) -> pullthrough::api::ProxyConfig {
        super::config_for(&[(self.host.as_str(), self.url.as_str())])
    }

    pub async fn start() -> FaultUpstream {
        let state = Arc::new(State::default());
        let st = state.clone();
        let (addr, task) = super::serve_http1(move |addr, req| {
            let st = st.clone();
            async move { handle(&st, &format!("http://{addr}"), req).await }
        })
        .await;
        FaultUpstream {
            url: format!("http://{addr}"),
            host: addr.to_string(),
            state,
            task,
        }
    }

    pub fn add_blob(&self, b: &Blob) {
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(b.digest.clone(), b.bytes.clone());
    }

    pub fn add_manifest(&self, repo: &str, reference: &str, m: &Blob) {
        self.state.manifests.lock().unwrap().insert(
            (repo.to_string(), reference.to_string()),
            (m.bytes.clone(), m.media_type.clone()),
        );
    }

    pub fn add_image(&self, repo: &str, tag: &str, img: &super::Image) {
        for b in img.blobs() {
            self.add_blob(b);
        }
        self.add_manifest(repo, tag, &img.manifest);
        self.add_manifest(repo, &img.manifest.digest, &img.manifest);
    }

    /// Requests whose "METHOD path" contains `part`.
    pub fn count(&self, part: &str) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(part))
            .count()
    }

    /// From now on blob bodies stop after their first `bytes` (rounded up to 16 KiB
    /// chunks) until the returned sender sends true or is dropped: a test can then look at
    /// a download in progress without racing the clock.
    pub fn hold_blobs(&self, bytes: usize) -> tokio::sync::watch::Sender<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        *self.state.hold.lock().unwrap() = Some((bytes, rx));
        tx
    }

    /// Requests whose "METHOD path?query" contains `part` wait until the returned sender
    /// sends true or is dropped.
    pub fn hold_requests(&self, part: &str) -> tokio::sync::watch::Sender<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.state
            .held_requests
            .lock()
            .unwrap()
            .push((part.to_string(), rx));
        tx
    }

    pub fn total(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(
            Full::new(body.into())
                .map_err(|n| match n {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn oci_error(status: StatusCode, code: &str) -> Response<Body> {
    let mut r = full(
        status,
        format!(r#"{{"errors":[{{"code":"{code}","message":"{code}"}}]}}"#),
    );
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// 401 with the challenge that sends a client to this upstream's token endpoint.
fn bearer_challenge(base: &str) -> Response<Body> {
    let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    r.headers_mut().insert(
        "www-authenticate",
        format!(r#"Bearer realm="{base}/token",service="fault""#)
            .parse()
            .unwrap(),
    );
    r
}

async fn handle(st: &State, base: &str, req: Request<Incoming>) -> Response<Body> {
    let line = format!(
        "{} {}?{}",
        req.method(),
        req.uri().path(),
        req.uri().query().unwrap_or("")
    );
    st.log.lock().unwrap().push(line.clone());
    let holds: Vec<_> = st
        .held_requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(part, _)| line.contains(part.as_str()))
        .map(|(_, rx)| rx.clone())
        .collect();
    for mut release in holds {
        let _ = release.wait_for(|released| *released).await;
    }
    let now = st.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_inflight.fetch_max(now, Ordering::SeqCst);
    let delay = st.manifest_delay_ms.load(Ordering::SeqCst);
    if delay > 0 && line.contains("/manifests/") {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let mut resp = respond(st, base, req).await;
    if line.contains(" /v2/") {
        for (name, value) in st.extra_headers.lock().unwrap().iter() {
            resp.headers_mut().insert(*name, value.parse().unwrap());
        }
    }
    st.inflight.fetch_sub(1, Ordering::SeqCst);
    if st
        .stall_bodies
        .lock()
        .unwrap()
        .iter()
        .any(|part| line.contains(part.as_str()))
    {
        let (mut parts, _) = resp.into_parts();
        parts.headers.remove("content-length");
        let stalled = futures::stream::iter([Ok::<_, std::io::Error>(Frame::data(
            Bytes::from_static(b"{"),
        ))])
        .chain(futures::stream::pending());
        return Response::from_parts(parts, StreamBody::new(stalled).boxed_unsync());
    }
    resp
}

async fn respond(st: &State, base: &str, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let head = req.method() == hyper::Method::HEAD;
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    st.auth_log.lock().unwrap().push(auth.clone());
    if let Some(digest) = path.strip_prefix("/storage/") {
        // Object storage: the signature in the URL is the authorization.
        if !query.contains("sig=ok") {
            return full(StatusCode::FORBIDDEN, "bad signature");
        }
        return match st.blobs.lock().unwrap().get(digest) {
            Some(b) => full(StatusCode::OK, b.clone()),
            None => full(StatusCode::NOT_FOUND, ""),
        };
    }
    let hiding = st.hiding.lock().unwrap().clone();
    if let Some(h) = &hiding {
        if path == "/token" {
            use base64::Engine as _;
            let user = match auth.strip_prefix("Basic ") {
                None => Some("anonymous".to_string()),
                Some(b64) => {
                    let given = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap_or_default();
                    let given = String::from_utf8_lossy(&given).into_owned();
                    h.users
                        .iter()
                        .find(|(u, p)| given == format!("{u}:{p}"))
                        .map(|(u, _)| u.clone())
                }
            };
            return match user {
                Some(u) => full(StatusCode::OK, format!(r#"{{"token":"user:{u}"}}"#)),
                None => oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            };
        }
        let Some(user) = auth.strip_prefix("Bearer user:") else {
            return bearer_challenge(base);
        };
        let rest = path.strip_prefix("/v2/").unwrap_or("");
        let unseen = h.hidden.iter().any(|(repo, seen_by)| {
            rest.starts_with(&format!("{repo}/")) && !seen_by.iter().any(|u| u == user)
        });
        if unseen {
            return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
        }
    }
    if path == "/token" {
        let creds = st.token_auth.lock().unwrap().clone();
        let Some((u, p)) = creds else {
            return full(StatusCode::NOT_FOUND, "");
        };
        use base64::Engine as _;
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        if auth != want {
            return oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        }
        if !query.contains("scope=repository%3A") || !query.contains("service=fault") {
            return full(StatusCode::BAD_REQUEST, "bad token request");
        }
        st.tokens_issued.fetch_add(1, Ordering::SeqCst);
        if let Some(body) = st.token_answer.lock().unwrap().clone() {
            return full(StatusCode::OK, body);
        }
        return full(
            StatusCode::OK,
            r#"{"token":"secret-token","expires_in":300}"#,
        );
    }
    if st.basic_challenge.load(Ordering::SeqCst) && path.starts_with("/v2/") {
        let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        r.headers_mut().insert(
            "www-authenticate",
            r#"Basic realm="fault""#.parse().unwrap(),
        );
        return r;
    }
    let fail = st.fail_status.load(Ordering::SeqCst);
    if fail != 0 {
        return oci_error(StatusCode::from_u16(fail).unwrap(), "UNAVAILABLE");
    }
    if st.token_auth.lock().unwrap().is_some() && auth != "Bearer secret-token" {
        return bearer_challenge(base);
    }
    if path == "/v2/" {
        return full(StatusCode::OK, "{}");
    }
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    if let Some(i) = rest.rfind("/manifests/") {
        let (repo, reference) = (&rest[..i], &rest[i + 11..]);
        let found = st
            .manifests
            .lock()
            .unwrap()
            .get(&(repo.to_string(), reference.to_string()))
            .cloned();
        return match found {
            Some((bytes, mt)) => {
                let digest = if reference.starts_with("sha256:") {
                    reference.to_string()
                } else {
                    sha256(&bytes)
                };
                let mut r = full(
                    StatusCode::OK,
                    if head { Vec::new() } else { bytes.clone() },
                );
                let h = r.headers_mut();
                h.insert("content-type", mt.parse().unwrap());
                h.insert("docker-content-digest", digest.parse().unwrap());
                h.insert("content-length", bytes.len().into());
                r
            }
            None => oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        };
    }
    if let Some(i) = rest.rfind("/blobs/") {
        let endless = st.endless.lock().unwrap().iter().any(|p| path.contains(p));
        let drip = st
            .drips
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| path.contains(p.as_str()))
            .map(|(_, every)| *every);
        if !head && (endless || drip.is_some()) {
            let chunks = futures::stream::unfold(0u64, move |n| async move {
                let chunk = match drip {
                    Some(every) => {
                        tokio::time::sleep(every).await;
                        Bytes::from_static(b"x")
                    }
                    None => Bytes::from(super::random_bytes(n, 64 << 10)),
                };
                Some((Ok::<_, std::io::Error>(Frame::data(chunk)), n + 1))
            });
            return Response::builder()
                .status(StatusCode::OK)
                .body(StreamBody::new(chunks).boxed_unsync())
                .unwrap();
        }
        let digest = rest[i + 7..].to_string();
        let Some(mut bytes) = st.blobs.lock().unwrap().get(&digest).cloned() else {
            return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
        };
        if st.corrupt.lock().unwrap().contains(&digest) {
            for b in bytes.iter_mut() {
                *b = b.wrapping_add(1);
            }
        }
        let len = bytes.len();
        if head {
            let mut r = full(StatusCode::OK, Vec::new());
            r.headers_mut().insert("content-length", len.into());
            return r;
        }
        if st.redirect_nowhere.load(Ordering::SeqCst) {
            return full(StatusCode::TEMPORARY_REDIRECT, Vec::new());
        }
        if let Some(cdn) = st.redirect_blobs_to.lock().unwrap().clone() {
            let mut r = full(StatusCode::TEMPORARY_REDIRECT, Vec::new());
            r.headers_mut().insert(
                "location",
                format!("{cdn}/storage/{digest}?sig=ok").parse().unwrap(),
            );
            return r;
        }
        let cut = st
            .drop_mid_blob
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let limit = if cut { len / 2 } else { len };
        let chunks: Vec<Bytes> = bytes[..limit]
            .chunks(16 * 1024)
            .map(Bytes::copy_from_slice)
            .collect();
        let hold = st.hold.lock().unwrap().clone();
        let stream = futures::stream::iter(chunks.into_iter().enumerate())
            .then(move |(i, c)| {
                let hold = hold.clone();
                async move {
                    if let Some((bytes, mut release)) = hold
                        && i * 16 * 1024 >= bytes
                    {
                        let _ = release.wait_for(|released| *released).await;
                    }
                    Ok::<_, std::io::Error>(Frame::data(c))
                }
            })
            .chain(futures::stream::iter(cut.then(|| {
                Err(std::io::Error::other("connection dropped on purpose"))
            })));
        let mut r = Response::builder()
            .status(StatusCode::OK)
            .body(StreamBody::new(stream).boxed_unsync())
            .unwrap();
        r.headers_mut().insert("content-length", len.into());
        r.headers_mut()
            .insert("docker-content-digest", digest.parse().unwrap());
        return r;
    }
    if let Some(i) = rest.rfind("/referrers/") {
        let subject = &rest[i + 11..];
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": subject, "size": 1, "artifactType": "application/example.sbom"}]
        })
        .to_string();
        let mut r = full(StatusCode::OK, body);
        r.headers_mut().insert(
            "content-type",
            "application/vnd.oci.image.index.v1+json".parse().unwrap(),
        );
        return r;
    }
    if rest.ends_with("/tags/list") {
        // Paginated as the distribution spec says: `n` at most, after `last`, with a
        // Link to the next page.
        let repo = rest.trim_end_matches("/tags/list");
        let mut tags: Vec<String> = st
            .manifests
            .lock()
            .unwrap()
            .keys()
            .filter(|(r, t)| r == repo && !t.contains(':'))
            .map(|(_, t)| t.clone())
            .collect();
        tags.sort();
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        if let Some(last) = param("last") {
            tags.retain(|t| *t > last);
        }
        let n = param("n").and_then(|n| n.parse::<usize>().ok());
        let more = n.is_some_and(|n| tags.len() > n);
        if let Some(n) = n {
            tags.truncate(n);
        }
        let mut r = full(
            StatusCode::OK,
            serde_json::json!({"name": repo, "tags": tags}).to_string(),
        );
        if more {
            let link = format!(
                "</v2/{repo}/tags/list?n={}&last={}>; rel=\"next\"",
                n.unwrap(),
                tags.last().unwrap()
            );
            r.headers_mut().insert("link", link.parse().unwrap());
        }
        return r;
    }
    oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN")
}

//! The admin endpoints of the operations port, as their clients use them: the typed
//! requests and answers ([`api`]), the check of the admin token, and the client of
//! `pullthrough cache drop` and of the controller (prefetch, the images in use).
//!
//! Every admin endpoint answers only a request that carries the token: being on loopback
//! is not enough, since service-mesh sidecars connect from there too.

pub mod api;

use api::{
    AvailabilityAnswer, AvailabilityRequest, DropScope, Dropped, ImageToCheck, InUse, InUseSet,
    Modes, PrefetchAccepted, PrefetchProgress, PrefetchRequest, Refusal, SetMode,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why `pullthrough cache drop` failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The token file cannot be read.
    #[error(
        "cannot read the admin token {}: {source} (the proxy writes it at start; point \
         --admin-token-file at it)",
        path.display()
    )]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The admin URL does not make a request.
    #[error("invalid admin URL {url:?}: {source}")]
    BadUrl {
        /// The admin URL given.
        url: String,
        /// Why.
        source: hyper::http::Error,
    },
    /// No answer in time.
    #[error("{0} did not answer within 60s")]
    Timeout(String),
    /// No connection.
    #[error("cannot reach the proxy's admin endpoint at {url}: {source}")]
    Unreachable {
        /// The admin URL given.
        url: String,
        /// Why.
        source: hyper_util::client::legacy::Error,
    },
    /// The answer broke off.
    #[error("reading the answer: {0}")]
    Body(#[from] hyper::Error),
    /// An answer that is not the endpoint's JSON.
    #[error("unexpected answer ({status}): {body}")]
    Unexpected {
        /// The HTTP status it came with.
        status: hyper::StatusCode,
        /// What it said, as text.
        body: String,
    },
    /// The proxy said no; its reason.
    #[error("{0}")]
    Refused(String),
}

/// Reads the token `pullthrough cache drop` sends.
pub fn read_token(path: &Path) -> Result<String, AdminError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|source| AdminError::Token {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `header` (an `Authorization` value) carries `token`, compared in constant
/// time.
pub fn authorized(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    super::shared_key::equal(given.trim().as_bytes(), token.as_bytes())
}

/// Asks the proxy whose operations port is at `admin_url` (e.g. `http://127.0.0.1:9095`)
/// to drop `what` (an image, a tag or a repository, as `scope` says) from its cache,
/// showing it `token`.
pub async fn drop(
    admin_url: &str,
    scope: DropScope,
    what: &str,
    token: &str,
) -> Result<Dropped, AdminError> {
    let encoded = super::upstream::query_escape(what);
    let path = format!("/admin/cache?{}={encoded}", scope.param());
    exchange(admin_url, Method::DELETE, &path, token, None::<&()>).await
}

/// Asks the proxy at `admin_url` to prefetch `images` (of `platforms`), showing it
/// `token` (see [`crate::proxy::prefetcher`]): what it queued, what it knew already.
pub async fn prefetch(
    admin_url: &str,
    images: &[String],
    platforms: &[String],
    token: &str,
) -> Result<PrefetchAccepted, AdminError> {
    let asked = PrefetchRequest {
        images: images.to_vec(),
        platforms: Some(platforms.to_vec()),
    };
    exchange(
        admin_url,
        Method::POST,
        "/admin/prefetch",
        token,
        Some(&asked),
    )
    .await
}

/// Tells the proxy at `admin_url` which images are in use (kept from eviction), showing
/// it `token`; the set replaces the one it had.
pub async fn set_in_use(
    admin_url: &str,
    images: &[String],
    token: &str,
) -> Result<InUseSet, AdminError> {
    let asked = InUse {
        images: images.to_vec(),
    };
    exchange(admin_url, Method::PUT, "/admin/in-use", token, Some(&asked)).await
}

/// The images the proxy at `admin_url` was told are in use.
pub async fn in_use(admin_url: &str, token: &str) -> Result<InUse, AdminError> {
    exchange(admin_url, Method::GET, "/admin/in-use", token, None::<&()>).await
}

/// The progress of every image the proxy at `admin_url` was asked to prefetch.
pub async fn prefetch_progress(
    admin_url: &str,
    token: &str,
) -> Result<PrefetchProgress, AdminError> {
    exchange(
        admin_url,
        Method::GET,
        "/admin/prefetch",
        token,
        None::<&()>,
    )
    .await
}

/// The state of each of `images` on the proxy at `admin_url`, for nodes of `platforms`
/// (see [`crate::proxy::availability`]).
pub async fn availability(
    admin_url: &str,
    images: Vec<ImageToCheck>,
    platforms: &[String],
    token: &str,
) -> Result<AvailabilityAnswer, AdminError> {
    let asked = AvailabilityRequest {
        images,
        platforms: platforms.to_vec(),
    };
    exchange(
        admin_url,
        Method::POST,
        "/admin/availability",
        token,
        Some(&asked),
    )
    .await
}

/// The mode each upstream of the proxy at `admin_url` is in.
pub async fn modes(admin_url: &str, token: &str) -> Result<Modes, AdminError> {
    exchange(admin_url, Method::GET, "/admin/mode", token, None::<&()>).await
}

/// Puts `upstream` of the proxy at `admin_url` in `mode`: the modes after.
pub async fn set_mode(
    admin_url: &str,
    upstream: &str,
    mode: crate::api::UpstreamMode,
    token: &str,
) -> Result<Modes, AdminError> {
    let asked = SetMode {
        mode,
        upstream: Some(upstream.to_string()),
    };
    exchange(admin_url, Method::PUT, "/admin/mode", token, Some(&asked)).await
}

/// One request to the admin endpoint, within 60 s: its answer, or its error.
async fn exchange<A: DeserializeOwned>(
    admin_url: &str,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&impl Serialize>,
) -> Result<A, AdminError> {
    let uri = format!("{}{path}", admin_url.trim_end_matches('/'));
    let mut req = Request::builder()
        .method(method)
        .uri(&uri)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    let body = match body {
        Some(b) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(b).expect("a request serializes"))
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(body))
        .map_err(|source| AdminError::BadUrl {
            url: admin_url.to_string(),
            source,
        })?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .map_err(|_| AdminError::Timeout(admin_url.to_string()))?
        .map_err(|source| AdminError::Unreachable {
            url: admin_url.to_string(),
            source,
        })?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let unexpected = || AdminError::Unexpected {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    if !status.is_success() {
        let refusal: Refusal = serde_json::from_slice(&body).map_err(|_| unexpected())?;
        return Err(AdminError::Refused(refusal.error));
    }
    serde_json::from_slice(&body).map_err(|_| unexpected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_read_and_checked_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        let token = crate::fsutil::load_or_create_secret(&path).unwrap();
        assert_eq!(read_token(&path).unwrap(), token);

        assert!(authorized(Some(&format!("Bearer {token}")), &token));
        assert!(!authorized(
            Some(&format!("Bearer {}", &token[1..])),
            &token
        ));
        assert!(!authorized(Some(&format!("Basic {token}")), &token));
        assert!(!authorized(None, &token));
    }
}

//! The proxy's admin endpoint's secret, and the client side of the endpoint: for
//! `pullthrough cache drop`, and for the controller's prefetch requests.
//!
//! The endpoint answers only on loopback and only to a request that carries the token:
//! being on loopback is not enough, since service-mesh sidecars connect from there too.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The fewest bytes a secret file (the admin token, the replicas' shared key) may hold.
pub const MIN_SECRET_BYTES: usize = 32;

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

/// The secret in `path` (the admin token, the replicas' shared key), created there (mode
/// 0600, 32 random bytes as hex) if missing or empty. One shorter than
/// [`MIN_SECRET_BYTES`] is refused: a short key is found offline from one token it
/// signed.
pub fn load_or_create_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let t = t.trim();
            if t.len() < MIN_SECRET_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} bytes, and a secret must be at least {MIN_SECRET_BYTES} (make one \
                         with: openssl rand -hex 32)",
                        t.len()
                    ),
                ));
            }
            return Ok(t.to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = crate::fsutil::random_hex(32)?;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(token.as_bytes())?;
    Ok(token)
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
/// to drop `image` from its cache, showing it `token`. Returns the proxy's JSON answer.
pub async fn drop_image(
    admin_url: &str,
    image: &str,
    token: &str,
) -> Result<serde_json::Value, AdminError> {
    let encoded = super::upstream::query_escape(image);
    let path = format!("/admin/cache?image={encoded}");
    exchange(admin_url, Method::DELETE, &path, token, None).await
}

/// Asks the proxy at `admin_url` to prefetch `images` (of `platforms`), showing it
/// `token` (see [`crate::proxy::prefetcher`]). Returns its answer: what it queued and
/// what it knew already.
pub async fn prefetch(
    admin_url: &str,
    images: &[String],
    platforms: &[String],
    token: &str,
) -> Result<serde_json::Value, AdminError> {
    let body = serde_json::json!({"images": images, "platforms": platforms});
    exchange(
        admin_url,
        Method::POST,
        "/admin/prefetch",
        token,
        Some(body),
    )
    .await
}

/// Tells the proxy at `admin_url` which images are in use (kept from eviction), showing
/// it `token`; the set replaces the one it had.
pub async fn set_in_use(
    admin_url: &str,
    images: &[String],
    token: &str,
) -> Result<serde_json::Value, AdminError> {
    let body = serde_json::json!({"images": images});
    exchange(admin_url, Method::PUT, "/admin/in-use", token, Some(body)).await
}

/// The progress of every image the proxy at `admin_url` was asked to prefetch.
pub async fn prefetch_progress(
    admin_url: &str,
    token: &str,
) -> Result<Vec<crate::proxy::prefetcher::Progress>, AdminError> {
    let v = exchange(admin_url, Method::GET, "/admin/prefetch", token, None).await?;
    serde_json::from_value(v["images"].clone()).map_err(|e| AdminError::Unexpected {
        status: hyper::StatusCode::OK,
        body: format!("not a progress list: {e}"),
    })
}

/// One request to the admin endpoint, within 60 s; the JSON answer, or its error.
async fn exchange(
    admin_url: &str,
    method: Method,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, AdminError> {
    let uri = format!("{}{path}", admin_url.trim_end_matches('/'));
    let mut req = Request::builder()
        .method(method)
        .uri(&uri)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
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
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| AdminError::Unexpected {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })?;
    if !status.is_success() {
        let reason = value["error"].as_str().unwrap_or("request failed");
        return Err(AdminError::Refused(reason.to_string()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_made_once_private_and_checked_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        let token = load_or_create_token(&path).unwrap();
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create_token(&path).unwrap(),
            token,
            "kept across starts"
        );
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

//! The client side of the proxy's admin endpoint, for `pullthrough cache drop`.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Asks the proxy whose operations port is at `admin_url` (e.g. `http://127.0.0.1:9095`)
/// to drop `image` from its cache. Returns the proxy's JSON answer.
pub async fn drop_image(admin_url: &str, image: &str) -> Result<serde_json::Value, String> {
    let encoded = super::upstream::query_escape(image);
    let uri = format!(
        "{}/admin/cache?image={encoded}",
        admin_url.trim_end_matches('/')
    );
    let req = Request::builder()
        .method(Method::DELETE)
        .uri(&uri)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("invalid admin URL {admin_url:?}: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .map_err(|_| format!("{admin_url} did not answer within 60s"))?
        .map_err(|e| format!("cannot reach the proxy's admin endpoint at {admin_url}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
        format!(
            "unexpected answer ({status}): {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    if !status.is_success() {
        return Err(value["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_string());
    }
    Ok(value)
}

//! HTTP clients (plain, from another loopback address, trusting a test CA), a small in-process server, and what tests read of answers.

use super::tls_provider;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn http() -> reqwest::Client {
    tls_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A client whose requests come from `address`, a loopback address of its own
/// (127.0.0.2, ...): another client as the proxy sees it.
pub fn http_from(address: &str) -> reqwest::Client {
    tls_provider();
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A client that trusts only the CA certificate in `ca` (PEM).
pub fn https(ca: &Path) -> reqwest::Client {
    tls_provider();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .tls_certs_only([ca])
        .build()
        .unwrap()
}

/// An in-process HTTP/1 server on a free loopback port, answering every request with
/// `handle(its own address, request)`; it stops when the returned task is aborted.
pub async fn serve_http1<F, Fut, B>(handle: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(SocketAddr, hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handle = handle.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let answer = handle(addr, req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Waits up to `limit` for a registry at `url` to answer `GET /v2/` with success (or,
/// for one that needs credentials, 401).
pub async fn serving(url: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = http().get(format!("{url}/v2/")).send().await
            && (r.status().is_success() || r.status() == 401)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits up to `limit` for an operations port at `url` to answer `/readyz` with success.
pub async fn serving_ops(url: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = http().get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// GETs a URL (any status).
pub async fn get(url: &str) -> reqwest::Response {
    http().get(url).send().await.unwrap()
}

/// GETs a URL and returns the whole body.
pub async fn get_bytes(url: &str) -> bytes::Bytes {
    http().get(url).send().await.unwrap().bytes().await.unwrap()
}

/// A GET of `url` under way: its answer, and the first `at_least` bytes of its body (or
/// a little more) already read.
pub async fn get_begun(url: &str, at_least: usize) -> (reqwest::Response, Vec<u8>) {
    let mut resp = http().get(url).send().await.unwrap();
    let mut body = Vec::new();
    while body.len() < at_least {
        body.extend_from_slice(&resp.chunk().await.unwrap().expect("a body that long"));
    }
    (resp, body)
}

/// The whole body of a GET begun with [`get_begun`]; fails if the body is cut.
pub async fn get_finished((mut resp, mut body): (reqwest::Response, Vec<u8>)) -> Vec<u8> {
    while let Some(chunk) = resp.chunk().await.expect("the body went on to its end") {
        body.extend_from_slice(&chunk);
    }
    body
}

/// The status and OCI error code of an error answer.
pub async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.expect("an OCI error body");
    (status, v["errors"][0]["code"].as_str().unwrap().to_string())
}

/// Every page of a tags/list from `base` (a proxy's URL), from `first` (a path) on, by its
/// `Link` headers (at most `max` pages): the tags, and each next page's path.
pub async fn tags_pages(base: &str, first: &str, max: usize) -> (Vec<String>, Vec<String>) {
    let (mut tags, mut links) = (Vec::new(), Vec::new());
    let mut next = Some(first.to_string());
    for _ in 0..max {
        let Some(path) = next.take() else { break };
        let r = get(&format!("{base}{path}")).await;
        assert_eq!(r.status(), 200, "{path}");
        next = r.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with(r#">; rel="next""#), "{l}");
            l[1..l.find('>').unwrap()].to_string()
        });
        links.extend(next.clone());
        let page: serde_json::Value = r.json().await.unwrap();
        let page_tags = page["tags"].as_array().unwrap().iter();
        tags.extend(page_tags.map(|t| t.as_str().unwrap().to_string()));
    }
    (tags, links)
}

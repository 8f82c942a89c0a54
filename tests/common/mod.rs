//! Test support, by concern: a real Distribution registry as upstream ([`registry`]), an
//! in-process proxy ([`proxy`]), images generated on the fly ([`images`]), a small OCI
//! client that verifies every digest it pulls ([`oci_client`]), HTTP clients and servers
//! ([`http`]), TLS ([`tls`]), metrics read back ([`metrics`]), the real tools tests drive
//! ([`tools`]), an upstream that misbehaves on purpose ([`fault`]), a token server
//! ([`token_server`]), a fake Kubernetes API server ([`fake_api`]) and the real-cluster
//! harness ([`cluster`]).
// The benchmark (examples/bench.rs) builds this too and uses part of it.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod fake_api;
pub mod fault;
pub mod http;
pub mod images;
pub mod metrics;
pub mod oci_client;
pub mod proxy;
pub mod registry;
pub mod tls;
pub mod token_server;
pub mod tools;

pub use http::{
    error_code, get, get_begun, get_bytes, get_finished, http, http_from, https, serve_http1,
    serving, serving_ops, tags_pages,
};
pub use images::{Blob, Image, MultiArch, random_bytes};
pub use metrics::{metric_value, scrape};
pub use oci_client::{
    pull, push_blob, push_blob_with, push_image, push_image_with, push_manifest,
    push_manifest_with, push_multiarch,
};
pub use proxy::{Proxy, cached, config_for, settled};
pub use registry::{ALICE, BOB, CACHE, Registry, as_alice, cache_credentials};
pub use tls::{test_certificate, tls_provider};
pub use tools::{
    Tmpfs, dir_blobs, examples, kubernetes_validate, podman, skopeo, try_skopeo, which,
};

use sha2::{Digest as _, Sha256};
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A free loopback port (bound then released; the caller binds it right away).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (60 s at most) until `check` holds, failing with `what` otherwise.
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

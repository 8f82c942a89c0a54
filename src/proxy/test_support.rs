//! Helpers the data plane's tests share.

use crate::oci::Digest;
use crate::proxy::upstream::Upstream;
use std::sync::Arc;
use std::time::Duration;

/// Fails with the lengths, digests and first difference of two byte strings, never
/// the bytes themselves (a blob-sized message helps nobody).
#[track_caller]
pub(crate) fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let sha = |b: &[u8]| Digest::of(crate::oci::Algorithm::Sha256, b);
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes ({}), want {} ({}), first difference at {at:?}",
            got.len(),
            sha(got),
            want.len(),
            sha(want)
        );
    }
}

/// A file of `len` known bytes in a temp dir.
pub(crate) fn blob_file(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    (dir, path, data)
}

/// An upstream of the configuration `yaml` (an `UpstreamConfig`), without credentials,
/// allowing `timeout` for answers and between chunks.
pub(crate) fn upstream(yaml: &str, timeout: Duration) -> Arc<Upstream> {
    let config: crate::api::proxy_config::UpstreamConfig = serde_yaml::from_str(yaml).unwrap();
    let defaults = crate::api::ProxyConfig::default();
    Arc::new(Upstream::new(
        &config,
        None,
        crate::proxy::upstream::http_client(defaults.connect_timeout),
        crate::proxy::metrics::Metrics::new(),
        (timeout, crate::proxy::upstream::MinRate::of(&defaults)),
    ))
}

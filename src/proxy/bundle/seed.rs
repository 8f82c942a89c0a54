//! A cache seeded from a bundle when it first starts (the proxy's `seed`, a mirror's
//! `spec.cache.seed`): a layout directory or tar on a path the pod mounts, a tar at an
//! `http(s)://` URL (a file server in the disconnected network), or a tar in the cache's
//! own bucket (`s3://<bucket>/<key>`, read with the cache's credentials).
//!
//! The import runs before the cache opens, so its index knows what was imported. Once
//! done, `<cacheDir>/seeded` says from where, and a restart with the same seed does not
//! import again; a failed seed stops the start (the pod restarts and tries again), since
//! a cache that should be seeded and is not serves nothing offline.

use super::layout::Source;
use super::{BundleError, Imported, import};
use crate::proxy::store::BlobStore;
use crate::proxy::store::s3::S3Store;
use std::io;
use std::path::Path;
use std::time::Duration;

/// The most a download of a seed may stall between two chunks.
const STALL: Duration = Duration::from_secs(60);

/// The marker file of a done seed, in the cache directory.
pub const MARKER: &str = "seeded";

/// Imports the bundle `seed` into `store`, unless `cache_dir` says it was imported
/// already; what was imported. Tags the store has a record of are kept.
pub async fn seed(
    store: &dyn BlobStore,
    bucket: Option<&S3Store>,
    seed: &str,
    cache_dir: &Path,
) -> Result<Option<Imported>, BundleError> {
    let marker = cache_dir.join(MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == seed) {
        tracing::info!(seed, "the cache was seeded from this bundle already");
        return Ok(None);
    }
    tracing::info!(seed, "seeding the cache");
    let (source, total) = open(seed, bucket).await?;
    let imported = import(store, source, total, true).await?;
    tracing::info!(
        seed,
        images = imported.images.len(),
        written = imported.written,
        bytes = imported.written_bytes,
        already = imported.already,
        seconds = imported.seconds,
        "the cache is seeded"
    );
    std::fs::create_dir_all(cache_dir)
        .and_then(|()| std::fs::write(&marker, seed))
        .map_err(|source| BundleError::Write {
            path: marker,
            source,
        })?;
    Ok(Some(imported))
}

/// The bundle at `at`: a URL, an object of `bucket` (`s3://`), a tar file or a layout
/// directory; its size when known.
pub async fn open(
    at: &str,
    bucket: Option<&S3Store>,
) -> Result<(Source, Option<u64>), BundleError> {
    let unreadable = |e: io::Error| BundleError::Refused(format!("cannot read {at}: {e}"));
    if at.starts_with("http://") || at.starts_with("https://") {
        return download(at).await;
    }
    if at.starts_with("s3://") {
        let Some(bucket) = bucket else {
            return Err(unreadable(io::Error::other(
                "the cache is not in a bucket (storage.s3): only its own bucket can be read",
            )));
        };
        let (size, body) = bucket.object(at).await.map_err(unreadable)?;
        let reader = tokio_util::io::StreamReader::new(body);
        return Ok((Source::tar(Box::new(reader)), Some(size)));
    }
    let path = Path::new(at);
    let meta = tokio::fs::metadata(path).await.map_err(unreadable)?;
    if meta.is_dir() {
        let source = Source::dir(path).await.map_err(unreadable)?;
        return Ok((source, None));
    }
    let file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let reader = tokio::io::BufReader::with_capacity(1 << 20, file);
    Ok((Source::tar(Box::new(reader)), Some(meta.len())))
}

/// A tar streamed from `url`.
async fn download(url: &str) -> Result<(Source, Option<u64>), BundleError> {
    let failed = |why: String| BundleError::Refused(format!("cannot download {url}: {why}"));
    // reqwest's TLS is rustls without a provider of its own (as for the bucket).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let response = tokio::time::timeout(STALL, client.get(url).send())
        .await
        .map_err(|_| failed(format!("no answer in {}s", STALL.as_secs())))?
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("it answered {}", response.status())));
    }
    let total = response.content_length();
    let chunks = futures::stream::unfold(Some(response), |state| async move {
        let mut response = state?;
        match tokio::time::timeout(STALL, response.chunk()).await {
            Ok(Ok(Some(c))) => Some((Ok(c), Some(response))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some((Err(io::Error::other(e)), None)),
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the download stalled for {}s", STALL.as_secs()),
                )),
                None,
            )),
        }
    });
    let reader = tokio_util::io::StreamReader::new(Box::pin(chunks));
    Ok((Source::tar(Box::new(reader)), total))
}

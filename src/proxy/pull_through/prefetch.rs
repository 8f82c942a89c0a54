//! Prefetching images at start, evicting down to a lowered limit, and dropping an image
//! on purpose.

use super::*;
use crate::oci::media::Accept;
use crate::oci::{Digest, Reference};
use crate::proxy::error::ProxyError;
use crate::proxy::metrics::CacheResult;
use crate::proxy::store::RepoKey;
use crate::proxy::upstream::Upstream;
use futures::stream::StreamExt;
use std::sync::Arc;
use tokio::time::Instant;

/// Whether a platform descriptor is among `wanted` (`os/arch` or `os/arch/variant`);
/// everything is wanted when the list is empty.
pub(super) fn platform_wanted(platform: Option<&serde_json::Value>, wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(p) = platform else {
        return false;
    };
    let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let short = format!("{}/{}", field("os"), field("architecture"));
    let long = format!("{short}/{}", field("variant"));
    wanted.iter().any(|w| *w == short || *w == long)
}

/// What prefetching an image took.
pub(crate) struct Prefetched {
    /// Manifests it has (the index and the wanted platforms' images).
    pub(crate) manifests: Vec<Manifest>,
    /// Blobs they reference.
    pub(crate) blobs: usize,
    /// Bytes downloaded for them (not counting what was cached already).
    pub(crate) bytes: u64,
}

impl PullThrough {
    /// Pulls images into the cache ahead of need, one after the other, logging progress
    /// and counting it in `pullthrough_prefetch_images{state}` and
    /// `pullthrough_prefetch_bytes_total`. `platforms` limits multi-platform images.
    /// Each image's manifests are handed to `linked` (with the image's upstream and
    /// repository) before it counts as done.
    pub async fn prefetch<F, Fut>(
        self: &Arc<Self>,
        images: &[ConfiguredImage],
        platforms: &[String],
        linked: F,
    ) where
        F: Fn(RepoKey, Vec<Manifest>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let gauge = |state: &str| self.metrics.prefetch_images.with_label_values(&[state]);
        // Added to: images requested on the operations port count here too.
        gauge("pending").add(images.len() as i64);
        for image in images {
            let started = Instant::now();
            tracing::info!(image = %image.name, "prefetching");
            match self.prefetch_one(image, platforms).await {
                Ok(Prefetched {
                    manifests,
                    blobs,
                    bytes,
                }) => {
                    let count = manifests.len();
                    let key = RepoKey {
                        upstream: image.upstream.name().to_string(),
                        repository: image.repository.to_string(),
                    };
                    linked(key, manifests).await;
                    gauge("done").inc();
                    tracing::info!(image = %image.name, manifests = count, blobs, bytes,
                        seconds = started.elapsed().as_secs_f64(), "prefetched");
                }
                Err(e) => {
                    gauge("failed").inc();
                    tracing::warn!(image = %image.name, error = %e, "prefetch failed");
                }
            }
            gauge("pending").dec();
        }
    }

    /// Pulls one image (its platforms among `platforms`) into the cache.
    pub(crate) async fn prefetch_one(
        self: &Arc<Self>,
        image: &ConfiguredImage,
        platforms: &[String],
    ) -> Result<Prefetched, ProxyError> {
        let (up, repository, reference) = (&image.upstream, &*image.repository, &image.reference);
        let (top, _) = self
            .manifest(up, repository, reference, &Accept::Any, false)
            .await?;
        let doc: serde_json::Value = serde_json::from_slice(&top.body).map_err(|e| {
            ProxyError::UpstreamNotAManifest(format!("manifest is not JSON: {e}").into())
        })?;
        let children = doc.get("manifests").and_then(|m| m.as_array());
        let mut manifests = vec![top];
        if let Some(children) = children {
            for child in children {
                if !platform_wanted(child.get("platform"), platforms) {
                    continue;
                }
                let Some(d) = child
                    .get("digest")
                    .and_then(|d| d.as_str())
                    .and_then(|d| d.parse().ok())
                else {
                    continue;
                };
                let digest = Reference::Digest(d);
                let (m, _) = self
                    .manifest(up, repository, &digest, &Accept::Any, false)
                    .await?;
                manifests.push(m);
            }
        }
        // The blobs are those of the images: the children of an index, or the one image.
        let images = &manifests[usize::from(children.is_some())..];
        let mut blobs = 0;
        let mut bytes = 0u64;
        for image in images {
            for d in crate::proxy::index::manifest_refs(&image.body) {
                let answer = self.blob(up, repository, &d, BlobAsk::default()).await?;
                let fetched = answer.result != CacheResult::Hit;
                if let Some(mut body) = answer.body {
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.map_err(|e| ProxyError::Body(Arc::new(e)))?;
                        if fetched {
                            bytes += chunk.len() as u64;
                            self.metrics.prefetch_bytes.inc_by(chunk.len() as u64);
                        }
                    }
                }
                self.stored(&d).await?;
                blobs += 1;
            }
        }
        Ok(Prefetched {
            manifests,
            blobs,
            bytes,
        })
    }

    /// Evicts down to the size limit (after a restart with a lower limit), keeping pins.
    pub async fn enforce_limit(self: &Arc<Self>) {
        if self.index.limit().is_some() {
            drop(self.reserve(0).await);
        }
    }

    /// Drops an image (tag or digest) from the cache on purpose: the tag record, the
    /// manifests, and the blobs no other cached manifest or pin needs.
    pub async fn drop_image(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
    ) -> crate::proxy::index::Removal {
        let root = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => {
                let st = self.tag_state(up, repository, t).await;
                self.forget_tag(up, repository, t).await;
                st.map(|s| s.digest)
            }
        };
        let Some(root) = root else {
            return crate::proxy::index::Removal::default();
        };
        // On its own task: the index and the store agree even if the caller goes away.
        let this = self.clone();
        tokio::spawn(async move {
            let dropped = this.index.closure([root.clone()]);
            let keep: std::collections::HashSet<Digest> =
                this.pinned().difference(&dropped).cloned().collect();
            this.index.drop_images(&[root], &keep).await
        })
        .await
        .expect("drop task")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_filter() {
        let p = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(platform_wanted(Some(&p), &[]));
        assert!(platform_wanted(Some(&p), &["linux/arm64".into()]));
        assert!(platform_wanted(Some(&p), &["linux/arm64/v8".into()]));
        assert!(!platform_wanted(Some(&p), &["linux/amd64".into()]));
        assert!(!platform_wanted(None, &["linux/amd64".into()]));
    }
}

//! Image bundles: a cache's images carried to another cache as an OCI image layout (a
//! directory or a tar), for clusters that cannot reach the upstream (docs/operations.md,
//! "An air-gapped cluster").
//!
//! [`export()`] writes what a store holds ([`layout`]); [`import()`] seeds a store from a
//! layout, whoever wrote it (skopeo, `ctr export`, another cache): every object is checked
//! against its digest, every image must be whole, and a bundle that fails leaves nothing
//! of itself in the store. Imported images are linked to their repositories (the cache
//! serves them under those names, also offline) and their tags are recorded as confirmed
//! at the import. Both work on the [`BlobStore`] directly, so a bundle is imported into
//! a bucket while its replicas run, and into a disk cache before its proxy starts (the
//! proxy's `seed`, see [`seed`]).

mod export;
mod import;
pub mod layout;
mod progress;
pub mod seed;
pub mod tar;

pub use export::{Exported, Selection, export};
pub use import::{Imported, import};

use crate::oci::Digest;
use crate::proxy::store::StoreError;
use std::path::PathBuf;

/// The most of a file read at once.
const CHUNK_MAX: usize = 1 << 20;

/// The largest manifest (or `index.json`) a bundle may hold, read into memory whole.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The cache's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An image asked for is not cached.
    #[error("{0} is not in the cache")]
    NotCached(String),
    /// An image asked for is not cached whole.
    #[error("{image} is not in the cache whole: {why}")]
    Incomplete {
        /// The image.
        image: String,
        /// What is missing.
        why: String,
    },
    /// Nothing to export.
    #[error("nothing to export: the cache holds no whole image")]
    Nothing,
    /// A cached blob went away while it was exported (evicted).
    #[error("{0} left the cache during the export (evicted?); export again")]
    Gone(Digest),
    /// A cached blob could not be read.
    #[error("reading {0} from the cache: {1}")]
    Read(Digest, std::io::Error),
    /// A cached blob does not match its digest.
    #[error("the cache's copy of {0} does not match its digest; drop the image and pull it again")]
    Corrupt(Digest),
    /// Writing the bundle failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bundle cannot be read or is not a whole, valid OCI image layout.
    #[error("the bundle was not imported, nothing of it is kept: {0}")]
    Refused(String),
}

/// A manifest's references as a bundle uses them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ImageManifest {
    /// An image index or manifest list: its children.
    Index(Vec<Ref>),
    /// An image manifest: its config and layers (and an artifact's blobs).
    Image(Vec<Ref>),
    /// Neither.
    Unknown,
}

/// A reference in a manifest.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ref {
    pub digest: Digest,
    pub size: u64,
    pub media_type: Option<String>,
    pub platform: Option<serde_json::Value>,
}

/// What `body` references; [`ImageManifest::Unknown`] for what is not JSON, or names a
/// digest that is not one.
pub(crate) fn parse_manifest(body: &[u8]) -> ImageManifest {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ImageManifest::Unknown;
    };
    let refs = |list: Vec<&serde_json::Value>| -> Option<Vec<Ref>> {
        list.into_iter()
            .map(|d| {
                Some(Ref {
                    digest: d.get("digest")?.as_str()?.parse().ok()?,
                    size: d.get("size")?.as_u64()?,
                    media_type: d
                        .get("mediaType")
                        .and_then(|m| m.as_str())
                        .map(String::from),
                    platform: d.get("platform").cloned(),
                })
            })
            .collect()
    };
    let array = |key: &str| -> Vec<&serde_json::Value> {
        v.get(key)
            .and_then(|l| l.as_array())
            .map(|l| l.iter().collect())
            .unwrap_or_default()
    };
    if v.get("manifests").is_some() {
        return refs(array("manifests")).map_or(ImageManifest::Unknown, ImageManifest::Index);
    }
    let Some(config) = v.get("config") else {
        return ImageManifest::Unknown;
    };
    let mut all = vec![config];
    all.extend(array("layers"));
    all.extend(array("blobs"));
    refs(all).map_or(ImageManifest::Unknown, ImageManifest::Image)
}

//! `pullthrough bundle export`: the images a cache holds, written as an OCI image layout.

use super::layout::{CONTAINERD_NAME, Descriptor, LayoutIndex, REF_NAME, Sink};
use super::progress::Progress;
use super::{BundleError, CHUNK_MAX, ImageManifest, parse_manifest};
use crate::api::image_ref::ImageRef;
use crate::oci::digest::Hasher;
use crate::oci::{Digest, Reference, media};
use crate::proxy::store::{BlobStore, StoredManifest, TagKey};
use futures::StreamExt as _;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Which images to export.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every tag the cache holds, and every image it holds by digest alone.
    All,
    /// These (a tag is exported as the cache last resolved it).
    Images(Vec<ImageRef>),
}

/// What an export wrote.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Exported {
    /// The images, by name.
    pub images: Vec<String>,
    /// Images left out, each with why (only when exporting everything).
    pub skipped: Vec<String>,
    /// Platforms of multi-platform images left out because the cache does not hold them.
    pub platforms_not_cached: u64,
    /// Manifests and blobs in the layout.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes written (blobs an earlier export left in the directory are kept).
    pub written: u64,
    /// How long it took.
    pub seconds: f64,
}

/// One image to write: its name, and every object of it the cache holds.
struct Planned {
    name: String,
    root: Descriptor,
    manifests: Vec<(Digest, StoredManifest)>,
    blobs: Vec<(Digest, u64)>,
    platforms_not_cached: u64,
}

/// Writes the `selection` of the images in `store` to `out` (a directory, or a tar when
/// it ends in `.tar`), every platform the cache holds of each, every digest checked as
/// it is read.
pub async fn export(
    store: &dyn BlobStore,
    selection: &Selection,
    out: &Path,
) -> Result<Exported, BundleError> {
    let mut exported = Exported::default();
    let mut plans = Vec::new();
    for (name, digest) in roots(store, selection).await? {
        match plan(store, &name, &digest).await {
            Ok(p) => plans.push(p),
            Err(why) if matches!(selection, Selection::All) => {
                tracing::warn!(image = %name, %why, "not exported");
                exported.skipped.push(format!("{name}: {why}"));
            }
            Err(why) => return Err(BundleError::Incomplete { image: name, why }),
        }
    }
    if plans.is_empty() {
        return Err(BundleError::Nothing);
    }
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut manifests: Vec<(Digest, StoredManifest)> = Vec::new();
    let mut seen = HashSet::new();
    for p in &plans {
        for (d, m) in &p.manifests {
            if seen.insert(d.clone()) {
                manifests.push((d.clone(), m.clone()));
            }
        }
        for (d, size) in &p.blobs {
            if seen.insert(d.clone()) {
                blobs.push((d.clone(), *size));
            }
        }
    }
    let total = blobs.iter().map(|(_, s)| s).sum::<u64>()
        + manifests
            .iter()
            .map(|(_, m)| m.body.len() as u64)
            .sum::<u64>();
    let mut progress = Progress::new("exporting", Some(total));
    let at = |e| BundleError::Write {
        path: out.to_path_buf(),
        source: e,
    };
    let mut sink = Sink::create(out).await.map_err(at)?;
    let written = write_all(store, &mut sink, &blobs, &manifests, &mut progress).await;
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            sink.abandon().await;
            return Err(e);
        }
    };
    let index = LayoutIndex {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.to_string()),
        manifests: plans.iter().map(|p| p.root.clone()).collect(),
    };
    sink.finish(&index).await.map_err(at)?;
    progress.finish();
    exported.images = plans.iter().map(|p| p.name.clone()).collect();
    exported.platforms_not_cached = plans.iter().map(|p| p.platforms_not_cached).sum();
    exported.objects = seen.len() as u64;
    exported.bytes = total;
    exported.written = written;
    exported.seconds = progress.seconds();
    Ok(exported)
}

/// Writes every blob and manifest not already in the sink; the bytes written.
async fn write_all(
    store: &dyn BlobStore,
    sink: &mut Sink,
    blobs: &[(Digest, u64)],
    manifests: &[(Digest, StoredManifest)],
    progress: &mut Progress,
) -> Result<u64, BundleError> {
    let mut written = 0;
    for (digest, size) in blobs {
        progress.object();
        if sink.has(digest, *size).await {
            progress.add(*size);
            continue;
        }
        let blob = store
            .open(digest)
            .await?
            .ok_or_else(|| BundleError::Gone(digest.clone()))?;
        let mut out = sink.begin(digest, *size).await.map_err(sink_error)?;
        let mut hasher = Hasher::new(digest.algorithm());
        let mut chunks = blob.read(0, *size, None);
        let mut got = 0u64;
        let mut failed = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(BundleError::Read(digest.clone(), e));
                    break;
                }
            };
            hasher.update(&chunk);
            got += chunk.len() as u64;
            for piece in chunk.chunks(CHUNK_MAX) {
                out.write(piece).await.map_err(sink_error)?;
            }
            progress.add(chunk.len() as u64);
        }
        if failed.is_none() && (got != *size || hasher.finish() != *digest) {
            failed = Some(BundleError::Corrupt(digest.clone()));
        }
        if let Some(e) = failed {
            out.abandon().await;
            return Err(e);
        }
        out.finish().await.map_err(sink_error)?;
        written += size;
    }
    for (digest, m) in manifests {
        progress.object();
        let size = m.body.len() as u64;
        progress.add(size);
        if sink.has(digest, size).await {
            continue;
        }
        let mut out = sink.begin(digest, size).await.map_err(sink_error)?;
        out.write(&m.body).await.map_err(sink_error)?;
        out.finish().await.map_err(sink_error)?;
        written += size;
    }
    Ok(written)
}

fn sink_error(e: std::io::Error) -> BundleError {
    BundleError::Write {
        path: "the bundle".into(),
        source: e,
    }
}

/// The images to export: each one's name and manifest digest.
async fn roots(
    store: &dyn BlobStore,
    selection: &Selection,
) -> Result<Vec<(String, Digest)>, BundleError> {
    let mut out = Vec::new();
    match selection {
        Selection::Images(images) => {
            for image in images {
                let digest = match &image.reference {
                    Reference::Digest(d) => Some(d.clone()),
                    Reference::Tag(tag) => store
                        .tag(TagKey {
                            upstream: &image.registry,
                            repository: &image.repository,
                            tag,
                        })
                        .await?
                        .and_then(|r| r.digest.parse().ok()),
                };
                let digest = digest.ok_or_else(|| BundleError::NotCached(image.to_string()))?;
                out.push((image.to_string(), digest));
            }
        }
        Selection::All => {
            let records = store.records().await?;
            let mut tags: Vec<_> = records
                .tags
                .iter()
                .filter_map(|t| {
                    let d = t.digest.parse::<Digest>().ok()?;
                    Some((format!("{}/{}:{}", t.upstream, t.repository, t.tag), d))
                })
                .collect();
            tags.sort_by(|a, b| a.0.cmp(&b.0));
            let tagged: HashSet<Digest> = tags.iter().map(|(_, d)| d.clone()).collect();
            // Images held by digest alone: linked manifests no tag names, which are not
            // a platform of a manifest list that is exported anyway.
            let mut children = HashSet::new();
            let mut by_digest = Vec::new();
            for link in &records.links {
                for d in link.digests.iter().filter_map(|d| d.parse::<Digest>().ok()) {
                    let Some(m) = store.manifest(&d).await? else {
                        continue;
                    };
                    if let ImageManifest::Index(list) = parse_manifest(&m.body) {
                        children.extend(list.into_iter().map(|c| c.digest));
                    }
                    let name = format!("{}/{}@{d}", link.upstream, link.repository);
                    by_digest.push((name, d));
                }
            }
            by_digest.retain(|(_, d)| !tagged.contains(d) && !children.contains(d));
            by_digest.sort_by(|a, b| a.0.cmp(&b.0));
            out.extend(tags);
            out.extend(by_digest);
        }
    }
    Ok(out)
}

/// The objects of the image `digest`: every platform held of a manifest list, every blob
/// of an image; why not, when the cache does not hold it whole.
async fn plan(store: &dyn BlobStore, name: &str, digest: &Digest) -> Result<Planned, String> {
    let mut planned = Planned {
        name: name.to_string(),
        root: Descriptor {
            media_type: String::new(),
            digest: digest.to_string(),
            size: 0,
            annotations: BTreeMap::from([
                (REF_NAME.to_string(), name.to_string()),
                (CONTAINERD_NAME.to_string(), name.to_string()),
            ]),
            platform: None,
        },
        manifests: Vec::new(),
        blobs: Vec::new(),
        platforms_not_cached: 0,
    };
    let root = manifest(store, digest).await?;
    planned.root.media_type = root.media_type.clone();
    planned.root.size = root.body.len() as u64;
    match parse_manifest(&root.body) {
        ImageManifest::Index(children) => {
            let mut held = 0;
            for child in children {
                let Ok(m) = manifest(store, &child.digest).await else {
                    planned.platforms_not_cached += 1;
                    continue;
                };
                match image_blobs(store, &m.body).await {
                    Ok(blobs) => {
                        held += 1;
                        planned.manifests.push((child.digest, m));
                        planned.blobs.extend(blobs);
                    }
                    Err(_) => planned.platforms_not_cached += 1,
                }
            }
            if held == 0 {
                return Err("the cache holds no platform of it whole".into());
            }
        }
        ImageManifest::Image(_) => planned.blobs = image_blobs(store, &root.body).await?,
        ImageManifest::Unknown => return Err("its manifest is not an image or an index".into()),
    }
    planned.manifests.push((digest.clone(), root));
    Ok(planned)
}

async fn manifest(store: &dyn BlobStore, digest: &Digest) -> Result<StoredManifest, String> {
    store
        .manifest(digest)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("manifest {digest} is not cached"))
}

/// The config and layers of an image manifest, each with its size; why not, when one is
/// not cached.
async fn image_blobs(store: &dyn BlobStore, body: &[u8]) -> Result<Vec<(Digest, u64)>, String> {
    let ImageManifest::Image(refs) = parse_manifest(body) else {
        return Err("not an image manifest".into());
    };
    let mut out = Vec::new();
    for r in refs {
        let Some(blob) = store.open(&r.digest).await.map_err(|e| e.to_string())? else {
            return Err(format!("blob {} is not cached", r.digest));
        };
        out.push((r.digest, blob.len()));
    }
    Ok(out)
}

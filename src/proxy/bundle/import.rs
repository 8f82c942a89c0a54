//! `pullthrough bundle import`: a cache seeded from an OCI image layout.
//!
//! The layout is read once, in its own order (a tar is streamed, not unpacked): a layer
//! (a blob that is not JSON, or is over [`MAX_MANIFEST`]) goes into the store as it is
//! read, committed only when its bytes match its name, so that no layer is ever held in
//! memory; a small JSON blob (a manifest, a config) is held until `index.json` says
//! what it is. Then every image is checked whole (its manifests, and
//! for each platform its config and layers, in the bundle or already in the store), and
//! only then are the manifests, tags and links written. A bundle that fails anywhere is
//! refused and what it wrote is removed.

use super::layout::{Descriptor, LAYOUT_FILE, LayoutIndex, Part, Source};
use super::progress::Progress;
use super::{BundleError, CHUNK_MAX, ImageManifest, MAX_MANIFEST, parse_manifest};
use crate::api::image_ref::{self, ImageRef};
use crate::oci::digest::Hasher;
use crate::oci::{Digest, Reference, media};
use crate::proxy::store::{BlobStore, LinkRecord, RepoKey, TagKey, TagRecord, unix_now_ms};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, HashSet};

/// What an import did.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    /// The images, by name.
    pub images: Vec<String>,
    /// Objects written into the store.
    pub written: u64,
    /// Their bytes.
    pub written_bytes: u64,
    /// Objects the store held already.
    pub already: u64,
    /// Tags the store had a record of and kept (`keep_tags`).
    pub tags_kept: u64,
    /// How long it took.
    pub seconds: f64,
}

/// What the reading of the layout found.
#[derive(Default)]
struct Read {
    layout: bool,
    index: Option<Bytes>,
    /// JSON blobs up to [`MAX_MANIFEST`] (manifests, configs), checked, not yet stored.
    small: HashMap<Digest, Bytes>,
    /// The other blobs (layers), in the store (written now, or there before), with
    /// their sizes.
    large: HashMap<Digest, u64>,
}

/// An image of the bundle, checked whole.
struct Image {
    name: ImageRef,
    root: Digest,
    /// Its manifests, children before their index, each with its media type.
    manifests: Vec<(Digest, String)>,
    /// Its config and layer digests.
    blobs: Vec<Digest>,
}

/// Imports the layout `source` into `store`. Tags the store already has a record of are
/// kept when `keep_tags` (a seed does not move tags the cache has seen since), replaced
/// otherwise.
pub async fn import(
    store: &dyn BlobStore,
    mut source: Source,
    total: Option<u64>,
    keep_tags: bool,
) -> Result<Imported, BundleError> {
    let mut progress = Progress::new("importing", total.or(source.total()));
    let mut imported = Imported::default();
    let mut wrote: Vec<Digest> = Vec::new();
    let result = run(
        store,
        &mut source,
        keep_tags,
        &mut progress,
        &mut imported,
        &mut wrote,
    )
    .await;
    progress.finish();
    if let Err(e) = result {
        for d in wrote.iter().rev() {
            if let Err(err) = store.remove(d).await {
                tracing::warn!(digest = %d, error = %err, "could not remove an object of a refused bundle");
            }
        }
        return Err(e);
    }
    imported.seconds = progress.seconds();
    Ok(imported)
}

fn refused(why: impl Into<String>) -> BundleError {
    BundleError::Refused(why.into())
}

async fn run(
    store: &dyn BlobStore,
    source: &mut Source,
    keep_tags: bool,
    progress: &mut Progress,
    imported: &mut Imported,
    wrote: &mut Vec<Digest>,
) -> Result<(), BundleError> {
    let read = read_layout(store, source, progress, imported, wrote).await?;
    if !read.layout {
        return Err(refused(
            "not an OCI image layout: it has no oci-layout file",
        ));
    }
    let index = read
        .index
        .as_ref()
        .ok_or_else(|| refused("not an OCI image layout: it has no index.json"))?;
    let index: LayoutIndex = serde_json::from_slice(index)
        .map_err(|e| refused(format!("index.json is not an image index: {e}")))?;
    if index.manifests.is_empty() {
        return Err(refused("index.json names no image"));
    }
    let mut images = Vec::new();
    for (i, d) in index.manifests.iter().enumerate() {
        images.push(check_image(store, &read, i, d).await?);
    }

    // Every image is whole: store the held blobs and the manifests, then the links, then
    // the tags (a tag is never written before what it names).
    let mut stored: HashSet<Digest> = HashSet::new();
    for image in &images {
        for d in &image.blobs {
            let Some(bytes) = read.small.get(d) else {
                continue;
            };
            if !stored.insert(d.clone()) {
                continue;
            }
            if store.open(d).await?.is_some() {
                imported.already += 1;
                continue;
            }
            let mut w = store.begin(d, Some(bytes.len() as u64)).await?;
            w.append(vec![bytes.clone()]).await?;
            w.flush().await?;
            wrote.push(d.clone());
            w.commit(d.clone()).await?;
            imported.written += 1;
            imported.written_bytes += bytes.len() as u64;
        }
        for (d, media_type) in &image.manifests {
            if !stored.insert(d.clone()) {
                continue;
            }
            if store.manifest(d).await?.is_some() {
                imported.already += 1;
                continue;
            }
            let body = read.small[d].clone();
            let len = body.len() as u64;
            wrote.push(d.clone());
            store.put_manifest(d, body, media_type).await?;
            imported.written += 1;
            imported.written_bytes += len;
        }
    }
    link(store, &images, &read).await?;
    // Layers no image of the bundle uses are not kept.
    let used: HashSet<&Digest> = images.iter().flat_map(|i| &i.blobs).collect();
    for d in read.large.keys().filter(|d| !used.contains(d)) {
        if let Some(at) = wrote.iter().position(|w| w == d) {
            store.remove(d).await?;
            wrote.remove(at);
            imported.written -= 1;
            imported.written_bytes -= read.large[d];
        }
    }
    let now = unix_now_ms();
    for image in &images {
        let Reference::Tag(tag) = &image.name.reference else {
            continue;
        };
        let key = TagKey {
            upstream: &image.name.registry,
            repository: &image.name.repository,
            tag,
        };
        if keep_tags && store.tag(key).await?.is_some() {
            imported.tags_kept += 1;
            continue;
        }
        let record = TagRecord {
            upstream: image.name.registry.clone(),
            repository: image.name.repository.clone(),
            tag: tag.clone(),
            digest: image.root.to_string(),
            checked_at_ms: now,
        };
        store.put_tag(&record).await?;
    }
    imported.images = images.iter().map(|i| i.name.to_string()).collect();
    Ok(())
}

/// Links every object the bundle carries to its image's repository: what a bundle names
/// but does not carry (an object the cache held already, through whichever repository)
/// is not linked, so that a bundle cannot make the cache serve another repository's
/// content under its name.
async fn link(store: &dyn BlobStore, images: &[Image], read: &Read) -> Result<(), BundleError> {
    let carried = |d: &Digest| read.small.contains_key(d) || read.large.contains_key(d);
    let mut repos: HashMap<RepoKey, BTreeSet<String>> = HashMap::new();
    for image in images {
        let key = RepoKey {
            upstream: image.name.registry.clone(),
            repository: image.name.repository.clone(),
        };
        let set = repos.entry(key).or_default();
        let objects = image.manifests.iter().map(|(d, _)| d).chain(&image.blobs);
        set.extend(objects.filter(|d| carried(d)).map(Digest::to_string));
    }
    for (key, digests) in repos {
        let mut all = digests;
        if let Some(before) = store.links(&key).await? {
            all.extend(before.digests);
        }
        let record = LinkRecord {
            upstream: key.upstream,
            repository: key.repository,
            digests: all.into_iter().collect(),
        };
        store.put_links(&record).await?;
    }
    Ok(())
}

/// Reads every file of the layout: small JSON blobs into memory, layers into the store.
async fn read_layout(
    store: &dyn BlobStore,
    source: &mut Source,
    progress: &mut Progress,
    imported: &mut Imported,
    wrote: &mut Vec<Digest>,
) -> Result<Read, BundleError> {
    let mut read = Read::default();
    let bad = |e: std::io::Error| refused(format!("reading the bundle: {e}"));
    while let Some(entry) = source.next().await.map_err(bad)? {
        let part = Part::of(&entry.name).map_err(bad)?;
        progress.object();
        match part {
            Part::Other => {}
            Part::Layout | Part::Index => {
                let bytes = whole(source, entry.size, MAX_MANIFEST, &entry.name, progress).await?;
                if part == Part::Layout {
                    check_layout_file(&bytes)?;
                    read.layout = true;
                } else {
                    read.index = Some(bytes);
                }
            }
            Part::Blob(digest) => {
                let first = source.chunk(CHUNK_MAX).await.map_err(bad)?;
                let json = entry.size <= MAX_MANIFEST
                    && first.as_ref().is_some_and(|c| {
                        c.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
                    });
                if json {
                    let rest =
                        whole(source, entry.size, MAX_MANIFEST, &entry.name, progress).await?;
                    let first = first.expect("a JSON blob has a first chunk");
                    progress.add(first.len() as u64);
                    let bytes = match rest.is_empty() {
                        true => first,
                        false => [first, rest].concat().into(),
                    };
                    if Digest::of(digest.algorithm(), &bytes) != digest {
                        return Err(refused(format!("{} does not match its digest", entry.name)));
                    }
                    read.small.insert(digest, bytes);
                    continue;
                }
                let present = store
                    .open(&digest)
                    .await?
                    .is_some_and(|b| b.len() == entry.size);
                if present {
                    imported.already += 1;
                    progress.add(entry.size);
                } else {
                    store_large(store, source, &digest, entry.size, first, progress).await?;
                    wrote.push(digest.clone());
                    imported.written += 1;
                    imported.written_bytes += entry.size;
                }
                read.large.insert(digest, entry.size);
            }
        }
    }
    Ok(read)
}

fn check_layout_file(bytes: &[u8]) -> Result<(), BundleError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| refused(format!("oci-layout is not JSON: {e}")))?;
    match v.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some(version) if version.starts_with("1.") => Ok(()),
        other => Err(refused(format!(
            "oci-layout says imageLayoutVersion {other:?}; this reads 1.x (it writes {})",
            String::from_utf8_lossy(LAYOUT_FILE)
        ))),
    }
}

/// A whole small file of the bundle.
async fn whole(
    source: &mut Source,
    size: u64,
    max: u64,
    name: &str,
    progress: &mut Progress,
) -> Result<Bytes, BundleError> {
    if size > max {
        return Err(refused(format!("{name} is over {} MiB", max >> 20)));
    }
    let mut buf = bytes::BytesMut::with_capacity(size as usize);
    while let Some(c) = source
        .chunk(CHUNK_MAX)
        .await
        .map_err(|e| refused(format!("reading {name}: {e}")))?
    {
        progress.add(c.len() as u64);
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

/// Streams a layer of the bundle (`first`, its first chunk, already read) into the
/// store, committed only if it matches.
async fn store_large(
    store: &dyn BlobStore,
    source: &mut Source,
    digest: &Digest,
    size: u64,
    first: Option<Bytes>,
    progress: &mut Progress,
) -> Result<(), BundleError> {
    let mut w = store.begin(digest, Some(size)).await?;
    let mut hasher = Hasher::new(digest.algorithm());
    let mut got = 0u64;
    let mut next = first;
    loop {
        let Some(c) = next.take() else {
            break;
        };
        hasher.update(&c);
        got += c.len() as u64;
        progress.add(c.len() as u64);
        w.append(vec![c]).await?;
        next = source
            .chunk(CHUNK_MAX)
            .await
            .map_err(|e| refused(format!("reading {digest}: {e}")))?;
    }
    if got != size || hasher.finish() != *digest {
        return Err(refused(format!(
            "{} does not match its digest",
            super::layout::blob_path(digest)
        )));
    }
    w.flush().await?;
    w.commit(digest.clone()).await?;
    Ok(())
}

/// Checks that the image `index.json` lists `i`-th (`root`) is whole; its objects.
async fn check_image(
    store: &dyn BlobStore,
    read: &Read,
    i: usize,
    root: &Descriptor,
) -> Result<Image, BundleError> {
    let label = format!("index.json image {} ({})", i + 1, root.digest);
    let name = root.image_name().ok_or_else(|| {
        refused(format!(
            "{label} has no name (annotation org.opencontainers.image.ref.name)"
        ))
    })?;
    let mut name = image_ref::parse(name).map_err(|e| refused(format!("{label}: {e}")))?;
    let digest: Digest = root
        .digest
        .parse()
        .map_err(|e| refused(format!("{label}: {e}")))?;
    if let Reference::Digest(d) = &name.reference
        && *d != digest
    {
        return Err(refused(format!("{label} is named {name}, another digest")));
    }
    // A name with a tag and a digest keeps the tag: the digest is the descriptor's.
    if let Reference::Digest(_) = name.reference {
        name.reference = Reference::Digest(digest.clone());
    }
    let label = name.to_string();
    let mut image = Image {
        name,
        root: digest.clone(),
        manifests: Vec::new(),
        blobs: Vec::new(),
    };
    let body = manifest_bytes(store, read, &digest, &label).await?;
    if body.len() as u64 != root.size {
        return Err(refused(format!(
            "{label}: index.json gives its manifest {} bytes, it has {}",
            root.size,
            body.len()
        )));
    }
    match parse_manifest(&body) {
        ImageManifest::Index(children) => {
            let mut whole = 0;
            for child in children {
                let Some(child_body) = held_manifest(store, read, &child.digest).await? else {
                    continue; // a platform the bundle does not carry
                };
                if child_body.len() as u64 != child.size {
                    return Err(refused(format!(
                        "{label}: {} is not the size its index gives",
                        child.digest
                    )));
                }
                let mt = child
                    .media_type
                    .clone()
                    .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
                image
                    .blobs
                    .extend(image_blobs(store, read, &child_body, &label).await?);
                image.manifests.push((child.digest, mt));
                whole += 1;
            }
            if whole == 0 {
                return Err(refused(format!(
                    "{label}: the bundle holds no platform of it"
                )));
            }
        }
        ImageManifest::Image(_) => image.blobs = image_blobs(store, read, &body, &label).await?,
        ImageManifest::Unknown => {
            return Err(refused(format!(
                "{label}: {digest} is not an image manifest or index"
            )));
        }
    }
    image.manifests.push((digest, root.media_type.clone()));
    Ok(image)
}

/// A manifest the bundle carries or the store holds, `None` when neither.
async fn held_manifest(
    store: &dyn BlobStore,
    read: &Read,
    digest: &Digest,
) -> Result<Option<Bytes>, BundleError> {
    if let Some(b) = read.small.get(digest) {
        return Ok(Some(b.clone()));
    }
    Ok(store.manifest(digest).await?.map(|m| m.body))
}

async fn manifest_bytes(
    store: &dyn BlobStore,
    read: &Read,
    digest: &Digest,
    label: &str,
) -> Result<Bytes, BundleError> {
    held_manifest(store, read, digest).await?.ok_or_else(|| {
        refused(format!(
            "{label}: its manifest {digest} is not in the bundle"
        ))
    })
}

/// The config and layers of an image manifest, each one in the bundle or in the store.
async fn image_blobs(
    store: &dyn BlobStore,
    read: &Read,
    body: &[u8],
    label: &str,
) -> Result<Vec<Digest>, BundleError> {
    let ImageManifest::Image(refs) = parse_manifest(body) else {
        return Err(refused(format!(
            "{label}: a platform's manifest is not an image manifest"
        )));
    };
    let mut out = Vec::new();
    for r in refs {
        let size_ok = match read.small.get(&r.digest) {
            Some(b) => b.len() as u64 == r.size,
            None => match read.large.get(&r.digest) {
                Some(&size) => size == r.size,
                None => store
                    .open(&r.digest)
                    .await?
                    .is_some_and(|b| b.len() == r.size),
            },
        };
        if !size_ok {
            return Err(refused(format!(
                "{label}: blob {} ({} bytes) is in neither the bundle nor the cache",
                r.digest, r.size
            )));
        }
        out.push(r.digest);
    }
    Ok(out)
}

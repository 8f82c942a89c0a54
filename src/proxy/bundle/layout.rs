//! The OCI image layout (image-spec `image-layout.md`) as a bundle holds it, in a
//! directory or in a tar:
//!
//! ```text
//! oci-layout                  {"imageLayoutVersion": "1.0.0"}
//! index.json                  an image index: one descriptor per image, named
//! blobs/<alg>/<hex>           every manifest, config and layer, by digest
//! ```
//!
//! Each image's descriptor in `index.json` carries its full name (`docker.io/library/alpine:3.20`
//! or `...@sha256:...`) as `org.opencontainers.image.ref.name`, the way skopeo's
//! `oci:DIR:NAME` reads it, and as `io.containerd.image.name`, the way `ctr import` does.

use super::tar::{Entry, TarReader, TarWriter};
use crate::oci::Digest;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncWriteExt, BufWriter};

/// The annotation that names an image in an OCI layout (skopeo, the image-spec).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation `ctr export` names an image with (its ref.name is the tag alone).
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The `oci-layout` file.
pub const LAYOUT_FILE: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// A descriptor (image-spec `descriptor.md`), as much of it as a bundle uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of what it points at.
    pub media_type: String,
    /// The digest of what it points at.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Annotations: the image's name, in `index.json`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform, kept as it was (a child of an index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    /// The image's name: containerd's annotation when there is one (its ref.name is the
    /// tag alone), else the image-spec's.
    pub fn image_name(&self) -> Option<&str> {
        self.annotations
            .get(CONTAINERD_NAME)
            .or_else(|| self.annotations.get(REF_NAME))
            .map(String::as_str)
    }
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayoutIndex {
    /// 2.
    pub schema_version: u32,
    /// The image index's media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// One per image.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// What a file of a layout is, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// `oci-layout`.
    Layout,
    /// `index.json`.
    Index,
    /// `blobs/<alg>/<hex>`.
    Blob(Digest),
    /// Anything else (directories, a docker-archive `manifest.json`): skipped.
    Other,
}

impl Part {
    /// The part `name` is; an error for a path under `blobs/` that is not a digest.
    pub fn of(name: &str) -> io::Result<Part> {
        Ok(match name {
            "oci-layout" => Part::Layout,
            "index.json" => Part::Index,
            _ => match name.strip_prefix("blobs/") {
                Some(rest) => {
                    let (alg, hex) = rest.split_once('/').unwrap_or((rest, ""));
                    let digest = format!("{alg}:{hex}").parse::<Digest>().map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{name} is not named by a digest: {e}"),
                        )
                    })?;
                    Part::Blob(digest)
                }
                None => Part::Other,
            },
        })
    }
}

/// The path of `digest` in a layout.
pub fn blob_path(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// Where an export writes: a directory, or a tar file (written beside it as `.part` and
/// renamed when whole, so that a failed export leaves no tar that looks complete).
pub enum Sink {
    /// A layout directory. Blobs already there (an earlier export) are kept.
    Dir(PathBuf),
    /// A tar being written.
    Tar {
        /// The writer.
        tar: TarWriter<BufWriter<tokio::fs::File>>,
        /// Its `.part` file.
        part: PathBuf,
        /// The path it is renamed to.
        path: PathBuf,
    },
}

/// A blob being written into a [`Sink`].
pub enum BlobOut<'a> {
    /// A temporary file in the directory, renamed when whole.
    File {
        /// The file.
        file: BufWriter<tokio::fs::File>,
        /// Its temporary path.
        tmp: PathBuf,
        /// Where it goes.
        path: PathBuf,
    },
    /// The tar's current file.
    Tar(&'a mut TarWriter<BufWriter<tokio::fs::File>>, u64),
}

impl Sink {
    /// A sink at `path`: a tar when it ends in `.tar`, else a directory (made if absent).
    pub async fn create(path: &Path) -> io::Result<Sink> {
        if path.extension().is_some_and(|e| e == "tar") {
            let mut part = path.as_os_str().to_owned();
            part.push(".part");
            let part = PathBuf::from(part);
            let file = tokio::fs::File::create(&part).await?;
            let mut tar = TarWriter::new(BufWriter::with_capacity(1 << 20, file));
            tar.file("oci-layout", LAYOUT_FILE).await?;
            return Ok(Sink::Tar {
                tar,
                part,
                path: path.to_path_buf(),
            });
        }
        tokio::fs::create_dir_all(path).await?;
        tokio::fs::write(path.join("oci-layout"), LAYOUT_FILE).await?;
        Ok(Sink::Dir(path.to_path_buf()))
    }

    /// Whether the sink already has `digest` whole (a directory from an earlier export).
    pub async fn has(&self, digest: &Digest, size: u64) -> bool {
        match self {
            Sink::Dir(root) => tokio::fs::metadata(root.join(blob_path(digest)))
                .await
                .is_ok_and(|m| m.len() == size),
            Sink::Tar { .. } => false,
        }
    }

    /// Begins writing the blob `digest` of `size` bytes.
    pub async fn begin(&mut self, digest: &Digest, size: u64) -> io::Result<BlobOut<'_>> {
        match self {
            Sink::Dir(root) => {
                let path = root.join(blob_path(digest));
                let dir = path.parent().expect("a blob path has a parent");
                tokio::fs::create_dir_all(dir).await?;
                let tmp = dir.join(format!(".{}.part", digest.hex()));
                let file = tokio::fs::File::create(&tmp).await?;
                Ok(BlobOut::File {
                    file: BufWriter::with_capacity(1 << 20, file),
                    tmp,
                    path,
                })
            }
            Sink::Tar { tar, .. } => {
                tar.begin_file(&blob_path(digest), size).await?;
                Ok(BlobOut::Tar(tar, size))
            }
        }
    }

    /// Writes `index.json` and ends the layout: the tar is renamed into place.
    pub async fn finish(self, index: &LayoutIndex) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(index).expect("an index serializes");
        match self {
            Sink::Dir(root) => {
                let tmp = root.join(".index.json.part");
                tokio::fs::write(&tmp, &json).await?;
                tokio::fs::rename(&tmp, root.join("index.json")).await
            }
            Sink::Tar {
                mut tar,
                part,
                path,
            } => {
                tar.file("index.json", &json).await?;
                let mut out = tar.finish().await?;
                out.flush().await?;
                out.into_inner().sync_all().await?;
                tokio::fs::rename(&part, &path).await
            }
        }
    }

    /// Removes what an export that failed wrote of a tar.
    pub async fn abandon(self) {
        if let Sink::Tar { part, .. } = self {
            let _ = tokio::fs::remove_file(part).await;
        }
    }
}

impl BlobOut<'_> {
    /// More of the blob.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            BlobOut::File { file, .. } => file.write_all(bytes).await,
            BlobOut::Tar(tar, _) => tar.write(bytes).await,
        }
    }

    /// The blob is whole (its digest checked by the caller).
    pub async fn finish(self) -> io::Result<()> {
        match self {
            BlobOut::File {
                mut file,
                tmp,
                path,
            } => {
                file.flush().await?;
                drop(file);
                tokio::fs::rename(&tmp, &path).await
            }
            BlobOut::Tar(tar, size) => tar.end_file(size).await,
        }
    }

    /// The blob did not match: what was written of it goes (a tar fails whole).
    pub async fn abandon(self) {
        if let BlobOut::File { tmp, .. } = self {
            let _ = tokio::fs::remove_file(tmp).await;
        }
    }
}

/// Where an import reads from: a layout directory or a tar stream (a file, a download).
pub enum Source {
    /// A layout directory: its files, in the order they are read.
    Dir {
        /// The directory.
        root: PathBuf,
        /// Its files still to read: `oci-layout`, `index.json`, then the blobs.
        files: Vec<(String, u64)>,
        /// The file being read.
        open: Option<tokio::fs::File>,
        /// Bytes of it left.
        left: u64,
    },
    /// A tar.
    Tar(TarReader<Box<dyn AsyncRead + Send + Unpin>>),
}

impl Source {
    /// The layout directory `root`.
    pub async fn dir(root: &Path) -> io::Result<Source> {
        let mut files = Vec::new();
        for name in ["oci-layout", "index.json"] {
            if let Ok(m) = tokio::fs::metadata(root.join(name)).await {
                files.push((name.to_string(), m.len()));
            }
        }
        let blobs = root.join("blobs");
        let mut algs = tokio::fs::read_dir(&blobs).await?;
        while let Some(alg) = algs.next_entry().await? {
            if !alg.file_type().await?.is_dir() {
                continue;
            }
            let mut entries = tokio::fs::read_dir(alg.path()).await?;
            while let Some(e) = entries.next_entry().await? {
                let m = e.metadata().await?;
                let name = e.file_name().to_string_lossy().into_owned();
                if m.is_file() && !name.starts_with('.') {
                    let alg = alg.file_name().to_string_lossy().into_owned();
                    files.push((format!("blobs/{alg}/{name}"), m.len()));
                }
            }
        }
        files.reverse();
        Ok(Source::Dir {
            root: root.to_path_buf(),
            files,
            open: None,
            left: 0,
        })
    }

    /// A tar read from `input`.
    pub fn tar(input: Box<dyn AsyncRead + Send + Unpin>) -> Source {
        Source::Tar(TarReader::new(input))
    }

    /// The bytes of a directory's files, when the source is one.
    pub fn total(&self) -> Option<u64> {
        match self {
            Source::Dir { files, .. } => Some(files.iter().map(|(_, s)| s).sum()),
            Source::Tar(_) => None,
        }
    }

    /// The next file.
    pub async fn next(&mut self) -> io::Result<Option<Entry>> {
        match self {
            Source::Dir {
                root,
                files,
                open,
                left,
            } => {
                let Some((name, size)) = files.pop() else {
                    return Ok(None);
                };
                *open = Some(tokio::fs::File::open(root.join(&name)).await?);
                *left = size;
                Ok(Some(Entry { name, size }))
            }
            Source::Tar(tar) => tar.next().await,
        }
    }

    /// Up to `max` bytes of the current file; `None` once it is all read.
    pub async fn chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        match self {
            Source::Dir { open, left, .. } => {
                use tokio::io::AsyncReadExt as _;
                let Some(file) = open.as_mut() else {
                    return Ok(None);
                };
                if *left == 0 {
                    return Ok(None);
                }
                let mut buf = bytes::BytesMut::zeroed((*left).min(max as u64) as usize);
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "a bundle file got shorter while it was read",
                    ));
                }
                buf.truncate(n);
                *left -= n as u64;
                Ok(Some(buf.freeze()))
            }
            Source::Tar(tar) => tar.chunk(max).await,
        }
    }
}

//! The cache on disk. Content-addressed and safe by construction:
//!
//! ```text
//! <root>/blobs/<alg>/<hex>      blob and manifest bytes, only ever created by rename
//! <root>/meta/<alg>/<hex>       media type of a cached manifest
//! <root>/tags/<sha256(key)>     tag -> digest record (JSON)
//! <root>/tmp/                   downloads in progress; emptied at start
//! ```
//!
//! Paths are built only from validated digests and from hashes of keys, never from client
//! input, so no request can name a path outside the cache.

use crate::oci::{Algorithm, Digest};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What `open` found on disk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Partial downloads removed.
    pub removed_partials: u64,
}

/// Where a tag last pointed, persisted so a restart keeps serving (and serving stale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TagRecord {
    /// Upstream registry.
    pub upstream: String,
    /// Canonical repository.
    pub repository: String,
    /// The tag.
    pub tag: String,
    /// Digest of the manifest the tag resolved to.
    pub digest: String,
    /// When the upstream last confirmed it, milliseconds since the epoch.
    pub checked_at_ms: u64,
}

/// Handle on the cache directory.
pub struct Storage {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

impl Storage {
    /// Creates the layout if missing, removes partial downloads left by a crash, and
    /// counts what is cached.
    pub fn open(root: &Path) -> io::Result<(Storage, Stats)> {
        let mut stats = Stats::default();
        for alg in ALGORITHMS {
            std::fs::create_dir_all(root.join("blobs").join(alg.as_str()))?;
            std::fs::create_dir_all(root.join("meta").join(alg.as_str()))?;
        }
        std::fs::create_dir_all(root.join("tags"))?;
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            std::fs::remove_file(entry.path())?;
            stats.removed_partials += 1;
        }
        let storage = Storage {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
        };
        Ok((storage, stats))
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a committed blob.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Every committed object with its path. Files whose names are not digests are skipped.
    pub fn list_blobs(&self) -> io::Result<Vec<(Digest, PathBuf)>> {
        self.list("blobs")
    }

    /// Digests that have a media type file.
    pub fn list_meta(&self) -> io::Result<Vec<Digest>> {
        Ok(self.list("meta")?.into_iter().map(|(d, _)| d).collect())
    }

    fn list(&self, dir: &str) -> io::Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        for alg in ALGORITHMS {
            for entry in std::fs::read_dir(self.root.join(dir).join(alg.as_str()))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                if let Ok(d) = format!("{}:{name}", alg.as_str()).parse::<Digest>()
                    && entry.metadata()?.is_file()
                {
                    out.push((d, entry.path()));
                }
            }
        }
        Ok(out)
    }

    /// Free bytes on the cache's file system.
    pub fn available_space(&self) -> io::Result<u64> {
        let st = rustix::fs::statvfs(&self.root).map_err(io::Error::from)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Path of a manifest's media type file.
    pub fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("meta")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn tag_path(&self, upstream: &str, repository: &str, tag: &str) -> PathBuf {
        let key = format!("{upstream}\0{repository}\0{tag}");
        let name = Digest::of(Algorithm::Sha256, key.as_bytes());
        self.root.join("tags").join(name.hex())
    }

    /// A fresh, unique path under `tmp/` for a download.
    pub fn temp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// A cached manifest and its media type. Content that no longer matches its digest
    /// (disk corruption) is removed and reported as absent.
    pub async fn get_manifest(&self, digest: &Digest) -> io::Result<Option<(Bytes, String)>> {
        let media_type = match tokio::fs::read_to_string(self.meta_path(digest)).await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let body = match tokio::fs::read(self.blob_path(digest)).await {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if Digest::of(digest.algorithm(), &body) != *digest {
            tracing::warn!(%digest, "cached manifest does not match its digest; removing it");
            let _ = tokio::fs::remove_file(self.blob_path(digest)).await;
            return Ok(None);
        }
        Ok(Some((body, media_type)))
    }

    /// The persisted record of a tag.
    pub async fn get_tag(&self, upstream: &str, repository: &str, tag: &str) -> Option<TagRecord> {
        let bytes = tokio::fs::read(self.tag_path(upstream, repository, tag))
            .await
            .ok()?;
        let rec: TagRecord = serde_json::from_slice(&bytes).ok()?;
        // The file name is a hash: check the record really is this tag's.
        (rec.upstream == upstream && rec.repository == repository && rec.tag == tag).then_some(rec)
    }

    /// Persists a tag record.
    pub async fn put_tag(&self, rec: &TagRecord) -> io::Result<()> {
        let path = self.tag_path(&rec.upstream, &rec.repository, &rec.tag);
        let body = serde_json::to_vec(rec).map_err(io::Error::other)?;
        self.write_atomic(path, body).await
    }

    /// Forgets a tag (the upstream says it no longer exists).
    pub async fn delete_tag(&self, upstream: &str, repository: &str, tag: &str) -> io::Result<()> {
        match tokio::fs::remove_file(self.tag_path(upstream, repository, tag)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn write_atomic(&self, path: PathBuf, bytes: Vec<u8>) -> io::Result<()> {
        let tmp = self.temp_path();
        tokio::task::spawn_blocking(move || crate::fsutil::replace_file(&tmp, &path, &bytes))
            .await
            .map_err(io::Error::other)?
    }

    /// Writes a file via a temp file and a rename (blocking).
    pub fn write_atomic_sync(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        crate::fsutil::replace_file(&self.temp_path(), path, bytes)
    }
}

/// Milliseconds since the epoch now.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_cleans_partials_and_manifests_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (s, stats) = Storage::open(dir.path()).unwrap();
        assert_eq!(stats, Stats::default());
        let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::of(Algorithm::Sha256, &body);
        s.write_atomic_sync(&s.meta_path(&d), b"x/y").unwrap();
        s.write_atomic_sync(&s.blob_path(&d), &body).unwrap();
        std::fs::write(s.temp_path(), b"partial").unwrap();
        drop(s);
        let (s, stats) = Storage::open(dir.path()).unwrap();
        assert_eq!(stats.removed_partials, 1);
        assert_eq!(s.list_blobs().unwrap().len(), 1);
        assert_eq!(s.list_meta().unwrap(), vec![d.clone()]);
        let (got, mt) = s.get_manifest(&d).await.unwrap().unwrap();
        assert_eq!((got, mt.as_str()), (body, "x/y"));
        // Corrupted on disk: removed and reported absent.
        std::fs::write(s.blob_path(&d), b"{ }").unwrap();
        assert!(s.get_manifest(&d).await.unwrap().is_none());
        assert!(s.available_space().unwrap() > 0);
    }

    #[tokio::test]
    async fn tags_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Storage::open(dir.path()).unwrap();
        let rec = TagRecord {
            upstream: "docker.io".into(),
            repository: "library/alpine".into(),
            tag: "3.20".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            checked_at_ms: 5,
        };
        s.put_tag(&rec).await.unwrap();
        assert_eq!(
            s.get_tag("docker.io", "library/alpine", "3.20").await,
            Some(rec)
        );
        assert_eq!(s.get_tag("docker.io", "library/alpine", "3.21").await, None);
        s.delete_tag("docker.io", "library/alpine", "3.20")
            .await
            .unwrap();
        assert_eq!(s.get_tag("docker.io", "library/alpine", "3.20").await, None);
    }
}

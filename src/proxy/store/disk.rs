//! The cache on a local disk. Content-addressed and safe by construction:
//!
//! ```text
//! <root>/blobs/<alg>/<hex>      blob and manifest bytes, only ever created by rename
//! <root>/meta/<alg>/<hex>       media type of a cached manifest
//! <root>/tags/<sha256(key)>     tag -> digest record (JSON)
//! <root>/links/<sha256(repo)>   digests served under a repository (JSON)
//! <root>/tmp/                   writes in progress; emptied at start
//! ```
//!
//! Paths are built only from validated digests and from hashes of keys, never from client
//! input, so no request can name a path outside the cache. Reads go through
//! `file_body`: from the page cache on the task, from the disk on the blocking pool, and
//! as file ranges for `sendfile(2)`. A write in progress is followed through the file
//! descriptor it was opened with, which stays valid across the rename of the commit (and
//! the removal of an abort).

use super::file_body::{ChunkReader, LARGE_READERS, PageCache, file_chunks};
use super::{
    BlobStore, BlobWrite, CHUNK, LinkRecord, Listed, Records, RepoKey, StoreError, StoreResult,
    StoredBlob, StoredManifest, TagKey, TagRecord, Written, WrittenReader, link_name, tag_name,
};
use crate::oci::{Algorithm, Digest};
use crate::proxy::zero_copy::Spans;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use rustix::fs::FallocateFlags;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// What `open` found on disk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Partial downloads removed.
    pub removed_partials: u64,
}

/// The cache directory.
pub struct DiskStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// How files are read (see [`PageCache`]).
    page_cache: PageCache,
    /// Slots for serving cached blobs in larger reads (see [`LARGE_READERS`]).
    large_reads: Arc<Semaphore>,
    /// Where downloads' writes are made (see [`WritePace`]).
    pace: Arc<WritePace>,
}

/// A write of a download's batch into the page cache takes tens of microseconds: made on
/// the download's task, it saves the hand-over to the blocking pool and back, two thread
/// wake-ups per batch (with the hash, most of a cold download's CPU; docs/benchmarks.md,
/// run 72). A write that takes longer than this (the kernel throttling writers, a slow
/// disk) sends every download's writes to the blocking pool for [`SLOW_WRITES_BACKOFF`].
const INLINE_WRITE_LIMIT: Duration = Duration::from_millis(2);

/// How long downloads write on the blocking pool after a slow write.
const SLOW_WRITES_BACKOFF: Duration = Duration::from_secs(30);

/// Whether downloads' writes are made on their tasks: until one is slow, and again
/// [`SLOW_WRITES_BACKOFF`] after the last slow one.
#[derive(Debug, Default)]
struct WritePace {
    slow_at: std::sync::Mutex<Option<Instant>>,
}

impl WritePace {
    fn inline(&self) -> bool {
        let slow_at = self.slow_at.lock().expect("write pace");
        slow_at.is_none_or(|at| at.elapsed() >= SLOW_WRITES_BACKOFF)
    }

    /// Records how long a write made on a task took.
    fn took(&self, elapsed: Duration) {
        if elapsed > INLINE_WRITE_LIMIT {
            *self.slow_at.lock().expect("write pace") = Some(Instant::now());
        }
    }
}

const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
        .map_err(|e| StoreError::io(what, e))
}

/// `Ok(None)` for a file that is not there.
fn absent_ok<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A record file's bytes (a tag's, a repository's links), `None` when there is none.
async fn read_record(what: &'static str, path: PathBuf) -> StoreResult<Option<Vec<u8>>> {
    absent_ok(tokio::fs::read(path).await).map_err(|e| StoreError::io(what, e))
}

fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DiskStore {
    /// Creates the layout if missing and removes partial writes left by a crash.
    pub fn open(root: &Path) -> io::Result<(DiskStore, Stats)> {
        for alg in ALGORITHMS {
            std::fs::create_dir_all(root.join("blobs").join(alg.as_str()))?;
            std::fs::create_dir_all(root.join("meta").join(alg.as_str()))?;
        }
        std::fs::create_dir_all(root.join("tags"))?;
        std::fs::create_dir_all(root.join("links"))?;
        DiskStore::spool_with_stats(root)
    }

    /// The cache directory `root` as it is, made if missing, for a tool that works beside
    /// a proxy that may be running on it (`pullthrough bundle`): what is in `tmp/` is the
    /// proxy's, and this process's own writes there are named apart by its process id.
    pub fn beside(root: &Path) -> io::Result<DiskStore> {
        for alg in ALGORITHMS {
            std::fs::create_dir_all(root.join("blobs").join(alg.as_str()))?;
            std::fs::create_dir_all(root.join("meta").join(alg.as_str()))?;
        }
        for dir in ["tags", "links", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        Ok(DiskStore::beside_unmade(root))
    }

    fn beside_unmade(root: &Path) -> DiskStore {
        DiskStore {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            page_cache: PageCache::Kernel,
            large_reads: Arc::new(Semaphore::new(LARGE_READERS)),
            pace: Arc::default(),
        }
    }

    /// A directory used only for writes in progress, never committed (the spool of the
    /// [`super::s3::S3Store`]'s downloads): `tmp/` under `root`, emptied.
    pub fn spool(root: &Path) -> io::Result<DiskStore> {
        Ok(DiskStore::spool_with_stats(root)?.0)
    }

    fn spool_with_stats(root: &Path) -> io::Result<(DiskStore, Stats)> {
        let mut stats = Stats::default();
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            std::fs::remove_file(entry.path())?;
            stats.removed_partials += 1;
        }
        Ok((DiskStore::beside_unmade(root), stats))
    }

    /// The same store, reading as if its files were all, or none, in the page cache
    /// (tests: the kernel evicts pages when it likes, not when asked).
    #[cfg(test)]
    pub(crate) fn with_page_cache(mut self, page_cache: PageCache) -> DiskStore {
        self.page_cache = page_cache;
        self
    }

    fn path(&self, dir: &str, digest: &Digest) -> PathBuf {
        self.root
            .join(dir)
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.path("blobs", digest)
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.path("meta", digest)
    }

    fn tag_path(&self, key: TagKey<'_>) -> PathBuf {
        self.root.join("tags").join(tag_name(key))
    }

    /// A fresh, unique path under `tmp/` for a write.
    fn temp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// The digests named by the files in `dir`, with their metadata. Files whose names
    /// are not digests are skipped.
    fn list_dir(root: &Path, dir: &str) -> io::Result<Vec<(Digest, std::fs::Metadata)>> {
        let mut out = Vec::new();
        for alg in ALGORITHMS {
            for entry in std::fs::read_dir(root.join(dir).join(alg.as_str()))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                if let Ok(d) = format!("{}:{name}", alg.as_str()).parse::<Digest>() {
                    let meta = entry.metadata()?;
                    if meta.is_file() {
                        out.push((d, meta));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn write_atomic(
        &self,
        what: &'static str,
        path: PathBuf,
        bytes: Bytes,
    ) -> StoreResult<()> {
        let tmp = self.temp_path();
        blocking(what, move || {
            crate::fsutil::replace_file(&tmp, &path, &bytes)
        })
        .await
    }
}

impl BlobStore for DiskStore {
    fn list(&self) -> BoxFuture<'_, StoreResult<Vec<Listed>>> {
        let root = self.root.clone();
        Box::pin(blocking("listing the cache", move || {
            let manifests: std::collections::HashSet<Digest> = DiskStore::list_dir(&root, "meta")?
                .into_iter()
                .map(|(d, _)| d)
                .collect();
            let out: Vec<Listed> = DiskStore::list_dir(&root, "blobs")?
                .into_iter()
                .map(|(digest, meta)| Listed {
                    manifest: manifests.contains(&digest),
                    size: meta.len(),
                    used_ms: mtime_ms(&meta),
                    digest,
                })
                .collect();
            // A media type file whose manifest is gone (a crash between the two removals).
            let blobs: std::collections::HashSet<&Digest> = out.iter().map(|l| &l.digest).collect();
            for d in manifests.iter().filter(|d| !blobs.contains(d)) {
                let path = root.join("meta").join(d.algorithm().as_str()).join(d.hex());
                let _ = std::fs::remove_file(path);
            }
            Ok(out)
        }))
    }

    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<Box<dyn StoredBlob>>>> {
        let path = self.blob_path(digest);
        Box::pin(async move {
            let found = blocking("opening a cached blob", move || {
                let Some(file) = absent_ok(std::fs::File::open(path))? else {
                    return Ok(None);
                };
                let len = file.metadata()?.len();
                Ok(Some((file, len)))
            })
            .await?;
            Ok(found.map(|(file, len)| {
                Box::new(DiskBlob {
                    file,
                    len,
                    page_cache: self.page_cache,
                    large_reads: self.large_reads.clone(),
                }) as Box<dyn StoredBlob>
            }))
        })
    }

    fn begin<'a>(
        &'a self,
        _digest: &'a Digest,
        len: Option<u64>,
    ) -> BoxFuture<'a, StoreResult<Box<dyn BlobWrite>>> {
        let temp = self.temp_path();
        Box::pin(async move {
            // Readers follow the write through a descriptor of their own (they read at
            // offsets, so the shared file position does not matter), which outlives the
            // temp file's name.
            let (file, reader, set_aside) = blocking("creating a download file", {
                let temp = temp.clone();
                move || {
                    let file = std::fs::File::options()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&temp)?;
                    // The blocks are set aside at once (the file's size still grows
                    // with the writes), so that no ENOSPC comes halfway. No faster
                    // (docs/benchmarks.md). File systems without fallocate skip it.
                    let mut set_aside = 0;
                    if let Some(len) = len.filter(|l| *l > 0) {
                        match rustix::fs::fallocate(&file, FallocateFlags::KEEP_SIZE, 0, len) {
                            Ok(()) => set_aside = len,
                            Err(e) if e == rustix::io::Errno::NOSPC => {
                                let _ = std::fs::remove_file(&temp);
                                return Err(e.into());
                            }
                            Err(_) => {}
                        }
                    }
                    let reader = file.try_clone()?;
                    Ok((file, reader, set_aside))
                }
            })
            .await?;
            Ok(Box::new(DiskWrite {
                temp,
                file: Arc::new(file),
                in_flight: None,
                pace: self.pace.clone(),
                landed: 0,
                set_aside,
                written: Arc::new(DiskWritten {
                    file: Arc::new(reader),
                    page_cache: self.page_cache,
                }),
                blobs: self.root.join("blobs"),
            }) as Box<dyn BlobWrite>)
        })
    }

    fn remove<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<()>> {
        let (blob, meta) = (self.blob_path(digest), self.meta_path(digest));
        Box::pin(blocking("removing a cached object", move || {
            // The bytes first: a media type left behind is cleaned up at the next start.
            absent_ok(std::fs::remove_file(blob))?;
            absent_ok(std::fs::remove_file(meta))?;
            Ok(())
        }))
    }

    fn touch(&self, digest: &Digest) {
        let path = self.blob_path(digest);
        tokio::task::spawn_blocking(move || {
            let t = SystemTime::now();
            if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                let _ = f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t));
            }
        });
    }

    fn manifest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<Option<StoredManifest>>> {
        let (blob, meta) = (self.blob_path(digest), self.meta_path(digest));
        Box::pin(async move {
            let what = "reading a cached manifest";
            let Some(media_type) = absent_ok(tokio::fs::read_to_string(meta).await)
                .map_err(|e| StoreError::io(what, e))?
            else {
                return Ok(None);
            };
            let Some(body) =
                absent_ok(tokio::fs::read(blob).await).map_err(|e| StoreError::io(what, e))?
            else {
                return Ok(None);
            };
            if Digest::of(digest.algorithm(), &body) != *digest {
                tracing::warn!(%digest, "cached manifest does not match its digest");
                return Ok(None);
            }
            Ok(Some(StoredManifest {
                body: Bytes::from(body),
                media_type,
            }))
        })
    }

    fn put_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        body: Bytes,
        media_type: &'a str,
    ) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let what = "writing a manifest";
            let media_type = Bytes::copy_from_slice(media_type.as_bytes());
            // The media type first: a blob file with one is a manifest.
            self.write_atomic(what, self.meta_path(digest), media_type)
                .await?;
            self.write_atomic(what, self.blob_path(digest), body).await
        })
    }

    fn tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<Option<TagRecord>>> {
        let path = self.tag_path(key);
        Box::pin(async move {
            let bytes = read_record("reading a tag record", path).await?;
            Ok(bytes.and_then(|b| TagRecord::parse_for(&b, key)))
        })
    }

    fn put_tag<'a>(&'a self, record: &'a TagRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let path = self.tag_path(record.key());
            self.write_atomic("writing a tag record", path, record.to_bytes())
                .await
        })
    }

    fn links<'a>(&'a self, key: &'a RepoKey) -> BoxFuture<'a, StoreResult<Option<LinkRecord>>> {
        let path = self.root.join("links").join(link_name(key));
        Box::pin(async move {
            let bytes = read_record("reading a link record", path).await?;
            Ok(bytes.and_then(|b| LinkRecord::parse_for(&b, key)))
        })
    }

    fn put_links<'a>(&'a self, record: &'a LinkRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let path = self.root.join("links").join(link_name(&record.key()));
            self.write_atomic("writing a link record", path, record.to_bytes())
                .await
        })
    }

    fn records(&self) -> BoxFuture<'_, StoreResult<Records>> {
        let root = self.root.clone();
        Box::pin(blocking("listing the tag and link records", move || {
            let mut records = Records::default();
            for folder in ["tags", "links"] {
                let Some(entries) = absent_ok(std::fs::read_dir(root.join(folder)))? else {
                    continue;
                };
                for entry in entries {
                    if let Some(bytes) = absent_ok(std::fs::read(entry?.path()))? {
                        records.add(folder, &bytes);
                    }
                }
            }
            Ok(records)
        }))
    }

    fn delete_tag<'a>(&'a self, key: TagKey<'a>) -> BoxFuture<'a, StoreResult<()>> {
        let path = self.tag_path(key);
        Box::pin(async move {
            absent_ok(tokio::fs::remove_file(path).await)
                .map_err(|e| StoreError::io("removing a tag record", e))?;
            Ok(())
        })
    }

    fn free_space(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.root).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn check(&self) -> StoreResult<()> {
        let tmp = self.root.join("tmp");
        if tmp.is_dir() {
            return Ok(());
        }
        let gone = io::Error::new(
            io::ErrorKind::NotFound,
            format!("cache directory {} is gone", tmp.display()),
        );
        Err(StoreError::io("checking the cache directory", gone))
    }
}

/// A cached blob's file.
struct DiskBlob {
    file: std::fs::File,
    len: u64,
    page_cache: PageCache,
    large_reads: Arc<Semaphore>,
}

impl StoredBlob for DiskBlob {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(
        self: Box<Self>,
        start: u64,
        count: u64,
        spans: Option<Spans>,
    ) -> BoxStream<'static, io::Result<Bytes>> {
        // Ranges sent from the page cache need no chunk buffers.
        let large = match spans {
            Some(_) => None,
            None => self.large_reads.clone().try_acquire_owned().ok(),
        };
        let reader = ChunkReader::new(self.file, self.page_cache);
        file_chunks(reader, start, count, large, spans)
    }
}

/// A download's temp file. Dropped uncommitted, it is removed.
///
/// Chunks are written on the blocking pool, one batch at a time, straight from the buffers
/// they arrived in (`writev`, no copy in user space): while a batch is written, the
/// download receives and hashes the next one.
struct DiskWrite {
    temp: PathBuf,
    file: Arc<std::fs::File>,
    /// The batch being written on the blocking pool, and its length.
    in_flight: Option<(tokio::task::JoinHandle<io::Result<()>>, u64)>,
    /// Whether a batch is written on the task instead.
    pace: Arc<WritePace>,
    /// Bytes in the file.
    landed: u64,
    /// Bytes preallocated when it began.
    set_aside: u64,
    written: Arc<DiskWritten>,
    blobs: PathBuf,
}

/// Writes all of `chunks` at the file's position.
fn write_all_vectored(mut file: &std::fs::File, chunks: &[Bytes]) -> io::Result<()> {
    use std::io::Write as _;
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = file.write_vectored(slices)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

impl DiskWrite {
    /// Waits for the batch being written, if any; says how many bytes the file holds.
    /// Cancel-safe: a batch stays in flight until its write is seen to end.
    async fn settle(&mut self) -> StoreResult<u64> {
        if let Some((task, len)) = &mut self.in_flight {
            let len = *len;
            let result = task.await;
            self.in_flight = None;
            result
                .unwrap_or_else(|e| Err(io::Error::other(e)))
                .map_err(|e| StoreError::io("writing a download", e))?;
            self.landed += len;
        }
        Ok(self.landed)
    }
}

impl BlobWrite for DiskWrite {
    fn append(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(async move {
            let landed = self.settle().await?;
            let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
            if len > 0 && self.pace.inline() {
                let started = Instant::now();
                let result = write_all_vectored(&self.file, &chunks);
                self.pace.took(started.elapsed());
                result.map_err(|e| StoreError::io("writing a download", e))?;
                self.landed += len;
                return Ok(self.landed);
            }
            if len > 0 {
                let file = self.file.clone();
                let task = tokio::task::spawn_blocking(move || write_all_vectored(&file, &chunks));
                self.in_flight = Some((task, len));
            }
            Ok(landed)
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(self.settle())
    }

    fn set_aside(&self) -> u64 {
        self.set_aside
    }

    fn written(&self) -> Arc<dyn Written> {
        self.written.clone()
    }

    fn commit(mut self: Box<Self>, digest: Digest) -> BoxFuture<'static, StoreResult<()>> {
        let temp = self.temp.clone();
        let path = self
            .blobs
            .join(digest.algorithm().as_str())
            .join(digest.hex());
        Box::pin(async move {
            self.settle().await?;
            let file = self.file.clone();
            blocking("flushing a download", move || file.sync_data()).await?;
            let result = blocking("moving a download into the cache", {
                let temp = temp.clone();
                move || std::fs::rename(&temp, &path)
            })
            .await;
            // Renamed, nothing to remove; failed, `self` removes the temp file.
            if result.is_ok() {
                self.temp = PathBuf::new();
            }
            result
        })
    }
}

impl Drop for DiskWrite {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The bytes of a download so far, read through its own descriptor of the file.
struct DiskWritten {
    file: Arc<std::fs::File>,
    page_cache: PageCache,
}

impl Written for DiskWritten {
    fn reader(&self) -> StoreResult<Box<dyn WrittenReader>> {
        Ok(Box::new(DiskWrittenReader(ChunkReader::shared(
            self.file.clone(),
            self.page_cache,
        ))))
    }
}

struct DiskWrittenReader(ChunkReader);

impl WrittenReader for DiskWrittenReader {
    fn read<'a>(
        &'a mut self,
        spans: Option<&'a Spans>,
        pos: u64,
        left: u64,
    ) -> BoxFuture<'a, io::Result<Bytes>> {
        Box::pin(self.0.next(spans, pos, left, CHUNK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn read_all(store: &DiskStore, d: &Digest) -> Option<Vec<u8>> {
        let blob = store.open(d).await.unwrap()?;
        let len = blob.len();
        let chunks: Vec<io::Result<Bytes>> = blob.read(0, len, None).collect().await;
        Some(
            chunks
                .into_iter()
                .flat_map(|c| c.unwrap().to_vec())
                .collect(),
        )
    }

    #[tokio::test]
    async fn writes_land_at_once_until_one_is_slow_then_on_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = DiskStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 241) as u8).collect();
        let d = Digest::of(Algorithm::Sha256, &data);
        let (a, b, c) = (&data[..CHUNK], &data[CHUNK..2 * CHUNK], &data[2 * CHUNK..]);
        let mut w = s.begin(&d, None).await.unwrap();
        let mut r = w.written().reader().unwrap();

        // Into the page cache on the task: readable as soon as the call returns.
        let landed = w.append(vec![Bytes::copy_from_slice(a)]).await.unwrap();
        assert_eq!(landed, CHUNK as u64);
        let mut got = Vec::new();
        while got.len() < CHUNK {
            let left = (CHUNK - got.len()) as u64;
            got.extend_from_slice(&r.read(None, got.len() as u64, left).await.unwrap());
        }
        assert_eq!(got, a);

        // A write that was slow: later ones go to the blocking pool, readable once the
        // next call (or a flush) has seen them land.
        s.pace.took(INLINE_WRITE_LIMIT * 2);
        assert!(!s.pace.inline());
        let landed = w.append(vec![Bytes::copy_from_slice(b)]).await.unwrap();
        assert_eq!(landed, CHUNK as u64, "the batch is still being written");
        let landed = w.append(vec![Bytes::copy_from_slice(c)]).await.unwrap();
        assert_eq!(landed, 2 * CHUNK as u64);
        assert_eq!(w.flush().await.unwrap(), data.len() as u64);
        w.commit(d.clone()).await.unwrap();
        assert_eq!(read_all(&s, &d).await.unwrap(), data);

        // A fast write keeps the slow mode: only the backoff ends it.
        s.pace.took(Duration::ZERO);
        assert!(!s.pace.inline());
        *s.pace.slow_at.lock().unwrap() = Instant::now().checked_sub(SLOW_WRITES_BACKOFF);
        assert!(s.pace.inline());
    }

    #[tokio::test]
    async fn writes_become_visible_only_when_committed_and_open_cleans_partials() {
        let dir = tempfile::tempdir().unwrap();
        let (s, stats) = DiskStore::open(dir.path()).unwrap();
        assert_eq!(stats, Stats::default());
        let data = vec![7u8; CHUNK + 10];
        let d = Digest::of(Algorithm::Sha256, &data);

        // Aborted: nothing left, not even in tmp/.
        let mut w = s.begin(&d, None).await.unwrap();
        w.append(vec![Bytes::from(data.clone())]).await.unwrap();
        assert_eq!(w.flush().await.unwrap(), data.len() as u64);
        drop(w);
        assert!(read_all(&s, &d).await.is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        // Followed while written, and after the commit through the same reader.
        let mut w = s.begin(&d, None).await.unwrap();
        let mut r = w.written().reader().unwrap();
        // Written in the background (as after a slow write): readable once the next
        // append (or a flush) says so.
        s.pace.took(INLINE_WRITE_LIMIT * 2);
        let first = Bytes::copy_from_slice(&data[..10]);
        assert_eq!(w.append(vec![first]).await.unwrap(), 0);
        let (a, b) = data[10..].split_at(CHUNK);
        let rest = vec![Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)];
        assert_eq!(w.append(rest).await.unwrap(), 10);
        assert_eq!(r.read(None, 0, 10).await.unwrap(), &data[..10]);
        assert_eq!(w.flush().await.unwrap(), data.len() as u64);
        assert!(
            read_all(&s, &d).await.is_none(),
            "visible before its commit"
        );
        w.commit(d.clone()).await.unwrap();
        assert_eq!(read_all(&s, &d).await.unwrap(), data);
        let mut rest = Vec::new();
        while rest.len() < data.len() - 10 {
            let pos = 10 + rest.len() as u64;
            let left = data.len() as u64 - pos;
            rest.extend_from_slice(&r.read(None, pos, left).await.unwrap());
        }
        assert!(rest == data[10..], "the rest, after the commit");
        let listed = s.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].size, listed[0].manifest),
            (data.len() as u64, false)
        );

        // A crash mid-write: the next start removes the partial file.
        let mut w = s.begin(&d, None).await.unwrap();
        w.append(vec![Bytes::from_static(b"partial")])
            .await
            .unwrap();
        w.flush().await.unwrap();
        std::mem::forget(w);
        let (s, stats) = DiskStore::open(dir.path()).unwrap();
        assert_eq!(stats.removed_partials, 1);
        s.remove(&d).await.unwrap();
        s.remove(&d).await.unwrap();
        assert!(s.list().await.unwrap().is_empty());
        assert!(s.free_space().unwrap() > 0);
        s.check().unwrap();
    }

    #[tokio::test]
    async fn manifests_verify_and_orphan_media_types_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = DiskStore::open(dir.path()).unwrap();
        let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::of(Algorithm::Sha256, &body);
        s.put_manifest(&d, body.clone(), "x/y").await.unwrap();
        let got = s.manifest(&d).await.unwrap().unwrap();
        assert_eq!((got.body, got.media_type.as_str()), (body, "x/y"));
        assert!(s.list().await.unwrap()[0].manifest);
        // Corrupted on disk: reported absent.
        std::fs::write(s.blob_path(&d), b"{ }").unwrap();
        assert!(s.manifest(&d).await.unwrap().is_none());
        // The bytes gone but not the media type: listing removes it.
        std::fs::remove_file(s.blob_path(&d)).unwrap();
        assert!(s.list().await.unwrap().is_empty());
        assert!(!s.meta_path(&d).exists());
    }

    #[tokio::test]
    async fn tags_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = DiskStore::open(dir.path()).unwrap();
        let rec = TagRecord {
            upstream: "docker.io".into(),
            repository: "library/alpine".into(),
            tag: "3.20".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            checked_at_ms: 5,
        };
        let key = |tag| TagKey {
            upstream: "docker.io",
            repository: "library/alpine",
            tag,
        };
        s.put_tag(&rec).await.unwrap();
        assert_eq!(s.tag(key("3.20")).await.unwrap(), Some(rec));
        assert_eq!(s.tag(key("3.21")).await.unwrap(), None);
        s.delete_tag(key("3.20")).await.unwrap();
        assert_eq!(s.tag(key("3.20")).await.unwrap(), None);
        s.delete_tag(key("3.20")).await.unwrap();
    }
}

//! The index against a disk store: sizes, LRU, pins, objects in use, reservations.

use super::*;
use crate::oci::Algorithm;
use crate::proxy::store::DiskStore;
use std::time::Duration;

pub(super) async fn open(dir: &std::path::Path, limit: Option<u64>) -> Arc<Index> {
    let (store, _) = DiskStore::open(dir).unwrap();
    Index::rebuild(Arc::new(store), limit, Metrics::new())
        .await
        .unwrap()
}

pub(super) async fn setup(limit: Option<u64>) -> (tempfile::TempDir, Arc<Index>) {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path(), limit).await;
    (dir, index)
}

pub(super) async fn add_blob(index: &Arc<Index>, bytes: &[u8]) -> Digest {
    let d = Digest::of(Algorithm::Sha256, bytes);
    let r = index
        .reserve(bytes.len() as u64, &HashSet::new(), None)
        .await
        .unwrap();
    let mut w = index.store.begin(&d, None).await.unwrap();
    w.append(vec![Bytes::copy_from_slice(bytes)]).await.unwrap();
    index
        .commit_blob(w, &d, bytes.len() as u64, r)
        .await
        .unwrap();
    d
}

pub(super) async fn add_manifest(index: &Arc<Index>, refs: &[&Digest]) -> Digest {
    let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": refs[0].to_string(), "size": 1},
            "layers": refs[1..].iter().map(|d| serde_json::json!({"digest": d.to_string(), "size": 1})).collect::<Vec<_>>()
        }))
        .unwrap();
    let d = Digest::of(Algorithm::Sha256, &body);
    let r = index
        .reserve(body.len() as u64, &HashSet::new(), None)
        .await
        .unwrap();
    let mt = "application/vnd.oci.image.manifest.v1+json";
    index.commit_manifest(&d, body.into(), mt, r).await.unwrap();
    d
}

#[tokio::test]
async fn evicts_least_recently_used_but_never_pinned_or_in_use() {
    let (_dir, index) = setup(Some(3000)).await;
    let a = add_blob(&index, &[1; 1000]).await;
    let b = add_blob(&index, &[2; 1000]).await;
    let c = add_blob(&index, &[3; 1000]).await;
    index.set_last_used(&a, Duration::from_secs(30));
    index.set_last_used(&b, Duration::from_secs(20));
    index.set_last_used(&c, Duration::from_secs(10));
    // a is pinned, b is being read: c, the newest, is the one that can go.
    let guard = index.acquire(&b).unwrap();
    let pinned = HashSet::from([a.clone()]);
    let r = index.reserve(1000, &pinned, None).await.unwrap();
    assert!(index.contains(&a) && index.contains(&b) && !index.contains(&c));
    drop(r);
    // Nothing else may go: no room.
    assert!(index.reserve(2000, &pinned, None).await.is_err());
    drop(guard);
    // Now b (least recently used unpinned) goes.
    let _r = index.reserve(1500, &pinned, None).await.unwrap();
    assert!(!index.contains(&b));
    assert!(
        index.store.open(&b).await.unwrap().is_none(),
        "the file went too"
    );
    assert!(
        index.reserve(5000, &pinned, None).await.is_err(),
        "larger than the cache"
    );
}

#[tokio::test]
async fn a_manifest_takes_its_own_blobs_along_and_state_survives_restart() {
    let (dir, index) = setup(Some(10_000)).await;
    let shared = add_blob(&index, &[9; 500]).await;
    let own = add_blob(&index, &[8; 500]).await;
    let m1 = add_manifest(&index, &[&shared, &own]).await;
    let other = add_blob(&index, &[7; 500]).await;
    let m2 = add_manifest(&index, &[&shared, &other]).await;
    assert_eq!(
        index.closure([m1.clone()]),
        HashSet::from([m1.clone(), shared.clone(), own.clone()])
    );
    let removal = index
        .drop_images(std::slice::from_ref(&m1), &HashSet::new())
        .await;
    assert_eq!(removal.manifests, vec![m1.to_string()]);
    assert_eq!(
        removal.blobs,
        vec![own.to_string()],
        "the shared blob stays with m2"
    );
    assert!(index.contains(&shared) && index.contains(&m2));
    let total = index.total();

    // A new process rebuilds the same index from the files.
    let again = open(dir.path(), Some(10_000)).await;
    assert_eq!(again.total(), total);
    assert!(again.contains(&m2) && again.contains(&shared) && !again.contains(&own));
    assert_eq!(
        again.closure([m2.clone()]).len(),
        3,
        "references re-parsed from the manifest"
    );
    // A lower limit at start: the first reservation evicts down to it.
    let small = open(dir.path(), Some(600)).await;
    assert!(small.total() > 600);
    drop(small.reserve(0, &HashSet::new(), None).await.unwrap());
    assert!(small.total() <= 600, "{}", small.total());
}

#[tokio::test]
async fn downloads_in_progress_count_against_the_free_space() {
    let (_dir, index) = setup(None).await;
    let none = HashSet::new();
    // 50 bytes free: a 20-byte download fits, twice; a third does not while the two
    // have written nothing.
    let mut a = index.reserve(20, &none, Some(50)).await.unwrap();
    let b = index.reserve(20, &none, Some(50)).await.unwrap();
    assert_eq!(
        index.reserve(20, &none, Some(50)).await.err(),
        Some(NoRoom::Disk)
    );
    // What a download has written is already out of the free space measured: with
    // 15 bytes written, 35 are free and 25 still to come.
    a.wrote(15);
    assert_eq!(
        index.reserve(11, &none, Some(35)).await.err(),
        Some(NoRoom::Disk)
    );
    let c = index.reserve(10, &none, Some(35)).await.unwrap();
    drop((b, c));
    // Writing past its size counts only up to it.
    a.wrote(100);
    assert!(
        index.reserve(45, &none, Some(50)).await.is_ok(),
        "nothing pending"
    );
    drop(a);
    // Larger than the free space: no room on the disk, whatever else runs.
    assert_eq!(
        index.reserve(60, &none, Some(50)).await.err(),
        Some(NoRoom::Disk)
    );
    let inner = index.inner.lock().unwrap();
    assert_eq!((inner.reserved, inner.written), (0, 0), "all given back");
}

#[test]
fn manifest_refs_cover_indexes_images_and_artifacts() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let index = serde_json::json!({"manifests": [{"digest": d('a')}, {"digest": d('b')}], "subject": {"digest": d('f')}});
    assert_eq!(manifest_refs(index.to_string().as_bytes()).len(), 2);
    let image = serde_json::json!({"config": {"digest": d('c')}, "layers": [{"digest": d('d')}]});
    assert_eq!(manifest_refs(image.to_string().as_bytes()).len(), 2);
    assert!(manifest_refs(b"not json").is_empty());
}

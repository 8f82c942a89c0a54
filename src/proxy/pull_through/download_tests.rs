//! The blob download against an in-memory store (an S3 store over `object_store`'s
//! `InMemory`) and an upstream on loopback that answers as each test tells it to.

use super::blobs::Blobs;
use super::space::Space;
use super::tags::Tags;
use super::{BlobAnswer, BlobAsk, Pins};
use crate::oci::{Algorithm, Digest};
use crate::proxy::error::ProxyError;
use crate::proxy::index::Index;
use crate::proxy::metrics::{CacheResult, Metrics};
use crate::proxy::peers::Peers;
use crate::proxy::shared_key::SharedKey;
use crate::proxy::store::s3::{Bucket, S3Store};
use crate::proxy::store::unix_now_ms;
use crate::proxy::store::{BlobStore, CHUNK};
use crate::proxy::test_support::{self, assert_same};
use crate::proxy::upstream::Upstream;
use futures::StreamExt;
use object_store::memory::InMemory;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How the upstream answers a blob GET.
#[derive(Clone)]
enum Answer {
    /// These bytes, with a `Content-Length` of `announced` (their length if `None`).
    Body {
        bytes: Vec<u8>,
        announced: Option<u64>,
    },
    /// These bytes, without a `Content-Length`: the body ends when the connection does.
    Unsized(Vec<u8>),
}

/// An upstream on loopback: counts the blob GETs it is sent, answers each once the test
/// lets it (`gate`), then closes the connection.
struct FakeUpstream {
    upstream: Arc<Upstream>,
    gets: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeUpstream {
    /// Answers every GET with `answer`; `open` GETs are answered without waiting.
    async fn start(answer: Answer, open: usize) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gets = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(open));
        let (g, s) = (gets.clone(), gate.clone());
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (answer, gets, gate) = (answer.clone(), g.clone(), s.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    gets.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    let (bytes, length) = match answer {
                        Answer::Body { bytes, announced } => {
                            let len = announced.unwrap_or(bytes.len() as u64);
                            (bytes, format!("Content-Length: {len}\r\n"))
                        }
                        Answer::Unsized(bytes) => (bytes, String::new()),
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{length}Connection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&bytes).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        let yaml = format!("registry: registry.test\nurl: http://{addr}");
        let upstream = test_support::upstream(&yaml, Duration::from_secs(30));
        FakeUpstream {
            upstream,
            gets,
            gate,
            server,
        }
    }

    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }
}

/// GETs answered at once: more than any test sends.
const OPEN: usize = 1 << 20;

/// An upstream that answers every GET at once with `data`, its length announced.
async fn serving(data: &[u8]) -> FakeUpstream {
    let answer = Answer::Body {
        bytes: data.to_vec(),
        announced: None,
    };
    FakeUpstream::start(answer, OPEN).await
}

/// The blobs of a cache over an empty in-memory bucket, of at most `limit` bytes.
async fn blobs_over(limit: Option<u64>) -> (Arc<Blobs>, Arc<Index>, tempfile::TempDir) {
    blobs_on(InMemory::new(), limit, None).await
}

/// The blobs of a cache over the in-memory bucket `mem`, of at most `limit` bytes, with
/// `peers`.
async fn blobs_on(
    mem: InMemory,
    limit: Option<u64>,
    peers: Option<Arc<Peers>>,
) -> (Arc<Blobs>, Arc<Index>, tempfile::TempDir) {
    let spool = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(mem, Metrics::new());
    let store = S3Store::new(
        bucket,
        "test",
        "cache",
        spool.path(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let store: Arc<dyn BlobStore> = Arc::new(store);
    let metrics = Metrics::new();
    let index = Index::rebuild(store.clone(), limit, metrics.clone())
        .await
        .unwrap();
    let tags = Arc::new(Tags::new(store));
    let space = Arc::new(Space::new(
        index.clone(),
        metrics.clone(),
        Pins::default(),
        tags,
    ));
    (Arc::new(Blobs::new(space, metrics, peers)), index, spool)
}

/// Known bytes: three whole chunks of the download and a few more.
fn data() -> Vec<u8> {
    (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect()
}

/// What a client reads of the answer: the bytes until the end or the first error.
async fn read(answer: BlobAnswer) -> (Vec<u8>, Option<std::io::Error>) {
    let mut body = answer.body.expect("a body");
    let mut got = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => got.extend_from_slice(&b),
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

async fn get(blobs: &Arc<Blobs>, up: &FakeUpstream, d: &Digest) -> Result<BlobAnswer, ProxyError> {
    blobs
        .blob(&up.upstream, "lib/app", d, BlobAsk::default())
        .await
}

#[tokio::test]
async fn a_fetch_lease_left_by_an_owner_that_does_not_answer_is_taken_over_at_once() {
    use object_store::ObjectStoreExt;
    // The owner: an address nothing listens on any more.
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let me = "127.0.0.1:9".parse().unwrap();
    let key = SharedKey::new(b"the replicas' key, 32 bytes long".to_vec());
    let peers = Arc::new(Peers::fixed(me, &[dead], key));
    // A blob the other replica owns (each of two replicas owns one blob in two).
    let data = (0..64u8)
        .map(|n| {
            let mut d = data();
            d[0] = n;
            d
        })
        .find(|d| peers.owner(&Digest::of(Algorithm::Sha256, d)) == Some(dead))
        .expect("one of 64 blobs is the other replica's");
    let d = Digest::of(Algorithm::Sha256, &data);
    let mem = InMemory::new();
    let (blobs, _index, _spool) = blobs_on(mem.clone(), None, Some(peers)).await;
    // It died fetching the blob: nobody renews its lease, which has long to run yet (an
    // hour, so that this replica cannot have waited for its end).
    let lease = object_store::path::Path::from(format!("cache/leases/sha256/{}", d.hex()));
    let record = serde_json::json!({
        "holder": "the dead replica",
        "until_ms": unix_now_ms() + 3_600_000,
        "replica": dead.to_string(),
    });
    let record = serde_json::to_vec(&record).unwrap();
    mem.put(&lease, record.into()).await.unwrap();

    let up = serving(&data).await;
    let (got, error) = read(get(&blobs, &up, &d).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "the blob");
    assert_eq!(up.gets(), 1);
    // Taken over, and let go once the blob was stored. Had this replica waited for the
    // lease to run out instead, it would have fetched without one, leaving it there.
    for _ in 0..500 {
        if mem.head(&lease).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        mem.head(&lease).await.is_err(),
        "the lease of the replica that did not answer still stands"
    );
}

#[tokio::test]
async fn a_blob_downloaded_for_a_repository_needs_no_proof_there_and_does_elsewhere() {
    let data = data();
    let d = Digest::of(Algorithm::Sha256, &data);
    let up = serving(&data).await;
    let (blobs, index, _spool) = blobs_over(None).await;
    let (got, error) = read(get(&blobs, &up, &d).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "the blob");
    blobs.stored(&d).await.unwrap();
    assert!(index.contains(&d));

    // Committed, and not linked yet (the links are the caller's, which had not come to
    // it): the repository it was downloaded for is served without a proof.
    let unlinked = BlobAsk {
        unlinked: true,
        ..BlobAsk::default()
    };
    let answer = blobs.blob(&up.upstream, "lib/app", &d, unlinked).await;
    let (got, error) = read(answer.expect("served as linked")).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "the blob again");
    // Another repository still needs one.
    let elsewhere = blobs.blob(&up.upstream, "lib/other", &d, unlinked).await;
    assert!(matches!(elsewhere, Err(ProxyError::NotLinked)));
    assert_eq!(up.gets(), 1);
}

#[tokio::test]
async fn a_cold_blob_is_streamed_verified_and_committed() {
    let data = data();
    let d = Digest::of(Algorithm::Sha256, &data);
    let up = serving(&data).await;
    let (blobs, index, _spool) = blobs_over(None).await;

    let answer = get(&blobs, &up, &d).await.unwrap();
    assert_eq!(answer.result, CacheResult::Miss);
    assert_eq!(answer.len, Some(data.len() as u64));
    let (got, error) = read(answer).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "first client");
    blobs.stored(&d).await.unwrap();
    assert!(index.contains(&d), "not in the index");
    assert!(
        index.store().open(&d).await.unwrap().is_some(),
        "not in the store"
    );

    // The next client reads the store's copy; the upstream is not asked again.
    let answer = get(&blobs, &up, &d).await.unwrap();
    assert_eq!(answer.result, CacheResult::Hit);
    let (got, error) = read(answer).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "second client");
    assert_eq!(up.gets(), 1);
}

#[tokio::test]
async fn clients_that_ask_together_share_one_download() {
    let data = data();
    let d = Digest::of(Algorithm::Sha256, &data);
    let up = FakeUpstream::start(
        Answer::Body {
            bytes: data.clone(),
            announced: None,
        },
        0,
    )
    .await;
    let (blobs, _index, _spool) = blobs_over(None).await;
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (blobs, upstream, d) = (blobs.clone(), up.upstream.clone(), d.clone());
            tokio::spawn(async move {
                let answer = blobs
                    .blob(&upstream, "lib/app", &d, BlobAsk::default())
                    .await
                    .unwrap();
                let result = answer.result;
                (result, read(answer).await)
            })
        })
        .collect();
    // All three wait on the one download before the upstream answers it.
    let waiting = || blobs.metrics.fetch_waiters.get();
    for _ in 0..1000 {
        if waiting() == 3 && up.gets() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        (waiting(), up.gets()),
        (3, 1),
        "the clients did not all join"
    );
    up.gate.add_permits(1);
    let mut results = Vec::new();
    for c in clients {
        let (result, (got, error)) = c.await.unwrap();
        assert!(error.is_none(), "{error:?}");
        assert_same(&got, &data, "a client");
        results.push(result);
    }
    results.sort_by_key(|r| *r != CacheResult::Miss);
    assert_eq!(
        results,
        [
            CacheResult::Miss,
            CacheResult::Coalesced,
            CacheResult::Coalesced
        ]
    );
    assert_eq!(up.gets(), 1);
}

/// A download that fails: its client never gets the whole body, and nothing is stored.
async fn fails_and_stores_nothing(answer: Answer, data: &[u8]) {
    let d = Digest::of(Algorithm::Sha256, data);
    let up = FakeUpstream::start(answer, OPEN).await;
    let (blobs, index, _spool) = blobs_over(None).await;
    let (got, error) = read(get(&blobs, &up, &d).await.unwrap()).await;
    assert!(error.is_some(), "the body ended well");
    assert!(got.len() < data.len(), "the client got {} bytes", got.len());
    assert!(blobs.stored(&d).await.is_ok(), "the download is not over");
    assert!(!index.contains(&d), "in the index");
    assert!(
        index.store().open(&d).await.unwrap().is_none(),
        "in the store"
    );
    // The next client asks the upstream again.
    let _ = read(get(&blobs, &up, &d).await.unwrap()).await;
    assert_eq!(up.gets(), 2);
}

#[tokio::test]
async fn a_body_that_does_not_match_its_digest_is_never_whole_and_never_stored() {
    let data = data();
    let mut wrong = data.clone();
    *wrong.last_mut().unwrap() ^= 1;
    let answer = Answer::Body {
        bytes: wrong,
        announced: None,
    };
    fails_and_stores_nothing(answer, &data).await;
}

#[tokio::test]
async fn a_body_shorter_than_its_length_fails_and_stores_nothing() {
    let data = data();
    let answer = Answer::Body {
        bytes: data[..data.len() - 100].to_vec(),
        announced: Some(data.len() as u64),
    };
    fails_and_stores_nothing(answer, &data).await;
}

#[tokio::test]
async fn a_blob_of_unknown_length_is_cached_when_it_matches() {
    let data = data();
    let d = Digest::of(Algorithm::Sha256, &data);
    let up = FakeUpstream::start(Answer::Unsized(data.clone()), OPEN).await;
    let (blobs, index, _spool) = blobs_over(None).await;
    let answer = get(&blobs, &up, &d).await.unwrap();
    assert_eq!(answer.len, None);
    let (got, error) = read(answer).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "the client");
    blobs.stored(&d).await.unwrap();
    assert!(
        index.store().open(&d).await.unwrap().is_some(),
        "not stored"
    );
}

#[tokio::test]
async fn a_blob_with_no_room_is_relayed_whole_and_not_stored() {
    let data = data();
    let d = Digest::of(Algorithm::Sha256, &data);
    let up = serving(&data).await;
    // The size limit leaves no room for it.
    let (blobs, index, _spool) = blobs_over(Some(data.len() as u64 / 2)).await;
    let answer = get(&blobs, &up, &d).await.unwrap();
    assert_eq!(answer.result, CacheResult::Miss);
    let (got, error) = read(answer).await;
    assert!(error.is_none(), "{error:?}");
    assert_same(&got, &data, "the client");
    blobs.stored(&d).await.unwrap();
    assert!(!index.contains(&d), "in the index");
    assert!(
        index.store().open(&d).await.unwrap().is_none(),
        "in the store"
    );
}

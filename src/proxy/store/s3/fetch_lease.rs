//! One upstream fetch per blob across processes that do not know each other (replicas of
//! mirrors in different clusters sharing one bucket): before a replica fetches a blob
//! from the upstream, it creates `leases/<alg>/<hex>` with a create-only write
//! (`If-None-Match: *`). The one whose write succeeds fetches, renewing the lease while
//! it downloads and deleting it when done; the others wait for the blob to appear in the
//! bucket (see [`FetchClaim`]). A lease whose holder stopped renewing it is taken over,
//! and so is one held by a replica that was just found not to answer (the lease names
//! the replica's address): it died fetching, and its peers' clients would otherwise
//! wait for the lease to run out.
//!
//! Whether the store enforces create-only writes is found out at start
//! ([`S3Store::probe_conditional_writes`]): where it does not, every replica fetches for
//! itself, as it would without leases (never wrong data: what is stored is verified).

use super::{S3Store, absent_ok};
use crate::oci::Digest;
use crate::proxy::store::{FetchClaim, LeaseReplicas, unix_now_ms};
use object_store::path::Path as Key;
use object_store::{PutMode, PutOptions};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a fetch lease holds without renewal; renewed every third of it.
pub const FETCH_LEASE: Duration = Duration::from_secs(30);

/// A fetch lease, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    until_ms: u64,
    /// The holder's address among its peers, when it has peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replica: Option<SocketAddr>,
}

impl LeaseRecord {
    /// Whether the replica at `address` holds it.
    fn held_by(&self, address: Option<SocketAddr>) -> bool {
        address.is_some() && self.replica == address
    }
}

/// A held fetch lease: renewed until dropped, then deleted.
struct Held {
    renewer: tokio::task::JoinHandle<()>,
    store: S3Handle,
    key: Key,
}

/// What a lease needs of the store, off the request's lifetime.
#[derive(Clone)]
struct S3Handle {
    bucket: super::Bucket,
    holder: String,
    replica: Option<SocketAddr>,
}

impl S3Handle {
    fn record(&self) -> bytes::Bytes {
        let rec = LeaseRecord {
            holder: self.holder.clone(),
            until_ms: unix_now_ms() + FETCH_LEASE.as_millis() as u64,
            replica: self.replica,
        };
        serde_json::to_vec(&rec).expect("a lease serializes").into()
    }

    async fn create(&self, key: &Key) -> object_store::Result<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.bucket.put(key, self.record(), opts).await
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewer.abort();
        let (bucket, key) = (self.store.bucket.clone(), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = absent_ok(bucket.delete(&key).await);
            });
        }
    }
}

impl S3Store {
    fn lease_key(&self, digest: &Digest) -> Key {
        self.object_key("leases", digest)
    }

    fn handle(&self, replica: Option<SocketAddr>) -> S3Handle {
        S3Handle {
            bucket: self.bucket.clone(),
            holder: self.writer.clone(),
            replica,
        }
    }

    /// Whether the bucket refuses a create-only write of an object that exists: two
    /// create-only writes of one probe object, the second of which must fail.
    pub(super) async fn probe_conditional_writes(&self) -> bool {
        let h = self.handle(None);
        let key = self.key(["probe", &self.writer]);
        let first = h.create(&key).await;
        let second = h.create(&key).await;
        let _ = absent_ok(self.bucket.delete(&key).await);
        let enforced =
            first.is_ok() && matches!(second, Err(object_store::Error::AlreadyExists { .. }));
        if let Err(e) = &first {
            tracing::warn!(store = %self.name, error = %e, "could not probe the bucket for create-only writes");
        }
        enforced
    }

    /// Takes the fetch lease of `digest` (see the module's doc).
    pub(super) async fn claim(&self, digest: &Digest, replicas: LeaseReplicas) -> FetchClaim {
        if !self.conditional_writes() {
            return FetchClaim::Mine(None);
        }
        let h = self.handle(replicas.me);
        let key = self.lease_key(digest);
        // Twice at most: a stale lease is removed and the create tried once more.
        for _ in 0..2 {
            match h.create(&key).await {
                Ok(()) => {
                    let renewing = h.clone();
                    let renew_key = key.clone();
                    let renewer = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(FETCH_LEASE / 3).await;
                            let record = renewing.record();
                            let _ = renewing
                                .bucket
                                .put(&renew_key, record, PutOptions::default())
                                .await;
                        }
                    });
                    return FetchClaim::Mine(Some(Box::new(Held {
                        renewer,
                        store: h,
                        key,
                    })));
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let rec = match absent_ok(self.bucket.get_bytes(&key).await) {
                        Ok(Some(bytes)) => serde_json::from_slice::<LeaseRecord>(&bytes).ok(),
                        // Gone meanwhile: try the create again.
                        Ok(None) => continue,
                        Err(_) => return FetchClaim::Mine(None),
                    };
                    let now = unix_now_ms();
                    match rec {
                        Some(rec) if rec.until_ms > now && !rec.held_by(replicas.gone) => {
                            return FetchClaim::Elsewhere;
                        }
                        Some(rec) if rec.until_ms > now => {
                            tracing::info!(%digest, replica = ?rec.replica, "taking over the fetch lease of a replica that did not answer");
                        }
                        // Its holder stopped renewing it (or it is unreadable).
                        _ => {}
                    }
                    if absent_ok(self.bucket.delete(&key).await).is_err() {
                        return FetchClaim::Mine(None);
                    }
                }
                // The bucket failing: fetch as if there were no leases.
                Err(_) => return FetchClaim::Mine(None),
            }
        }
        FetchClaim::Mine(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Bucket;
    use super::*;
    use crate::oci::Algorithm;
    use crate::proxy::metrics::Metrics;
    use crate::proxy::store::BlobStore;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn store(mem: &InMemory, dir: &std::path::Path) -> S3Store {
        let bucket = Bucket::new(mem.clone(), Metrics::new());
        S3Store::new(bucket, "test", "p", dir, Duration::from_secs(3600)).unwrap()
    }

    async fn lease_exists(mem: &InMemory, d: &Digest) -> bool {
        let key = Key::from(format!("p/leases/sha256/{}", d.hex()));
        mem.head(&key).await.is_ok()
    }

    #[tokio::test]
    async fn one_process_holds_a_fetch_until_it_lets_go_or_stops_renewing() {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let (a, b) = (store(&mem, dir.path()), store(&mem, &dir.path().join("b")));
        let d = Digest::of(Algorithm::Sha256, b"blob");
        let none = LeaseReplicas::default();
        // Unprobed: no leases, every process fetches.
        assert!(matches!(a.claim(&d, none).await, FetchClaim::Mine(None)));
        a.list().await.unwrap();
        b.list().await.unwrap();
        assert!(
            a.conditional_writes(),
            "the memory store enforces create-only writes"
        );
        let held = a.claim(&d, none).await;
        assert!(matches!(held, FetchClaim::Mine(Some(_))));
        assert!(matches!(b.claim(&d, none).await, FetchClaim::Elsewhere));
        drop(held);
        for _ in 0..500 {
            if !lease_exists(&mem, &d).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!lease_exists(&mem, &d).await, "not let go");
        assert!(matches!(b.claim(&d, none).await, FetchClaim::Mine(Some(_))));

        // A holder that died: its lease is past its time, and taken over.
        let other = Digest::of(Algorithm::Sha256, b"other");
        let stale = serde_json::to_vec(&LeaseRecord {
            holder: "dead".into(),
            until_ms: unix_now_ms() - 1,
            replica: None,
        })
        .unwrap();
        let key = Key::from(format!("p/leases/sha256/{}", other.hex()));
        mem.put(&key, stale.into()).await.unwrap();
        assert!(matches!(
            a.claim(&other, none).await,
            FetchClaim::Mine(Some(_))
        ));
        let rec: LeaseRecord =
            serde_json::from_slice(&mem.get(&key).await.unwrap().bytes().await.unwrap()).unwrap();
        assert_eq!(rec.holder, a.writer, "not taken over");
    }

    #[tokio::test]
    async fn a_lease_of_a_replica_that_did_not_answer_is_taken_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mem = InMemory::new();
        let (a, b) = (store(&mem, dir.path()), store(&mem, &dir.path().join("b")));
        a.list().await.unwrap();
        b.list().await.unwrap();
        let (addr_a, addr_b, addr_c): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:5000".parse().unwrap(),
            "10.0.0.2:5000".parse().unwrap(),
            "10.0.0.3:5000".parse().unwrap(),
        );
        let d = Digest::of(Algorithm::Sha256, b"blob");
        let key = Key::from(format!("p/leases/sha256/{}", d.hex()));
        let lease_of_a = LeaseReplicas {
            me: Some(addr_a),
            gone: None,
        };
        let _held = a.claim(&d, lease_of_a).await;
        let rec: LeaseRecord =
            serde_json::from_slice(&mem.get(&key).await.unwrap().bytes().await.unwrap()).unwrap();
        assert_eq!(rec.replica, Some(addr_a), "the lease names its replica");

        // Another replica, or one that answers: the lease stands.
        for gone in [None, Some(addr_c)] {
            let ask = LeaseReplicas {
                me: Some(addr_b),
                gone,
            };
            assert!(matches!(b.claim(&d, ask).await, FetchClaim::Elsewhere));
        }
        // Its holder did not answer: taken over now, though it has 30 s left.
        let ask = LeaseReplicas {
            me: Some(addr_b),
            gone: Some(addr_a),
        };
        assert!(matches!(b.claim(&d, ask).await, FetchClaim::Mine(Some(_))));
        let rec: LeaseRecord =
            serde_json::from_slice(&mem.get(&key).await.unwrap().bytes().await.unwrap()).unwrap();
        assert_eq!((rec.holder, rec.replica), (b.writer.clone(), Some(addr_b)));
    }
}

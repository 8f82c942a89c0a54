//! The other replicas of a proxy that share its bucket, and which of them owns a digest.
//!
//! Every digest has one owner among the replicas that are up, by rendezvous hashing: each
//! replica scores `sha256(address, digest)` and the highest score owns it, so that all
//! replicas agree without talking, and a replica that comes or goes moves only the
//! digests it owns. A replica that misses a blob it does not own asks the owner for it
//! (see [`crate::proxy::pull_through`]), which fetches it from the upstream once, for every
//! replica, and streams it while it downloads; when the owner cannot be reached, the
//! replica fetches the blob itself.
//!
//! The replicas are a fixed list, or the addresses a DNS name resolves to (a headless
//! Service lists the ready pods), looked up again every few seconds.
//!
//! A replica may ask another for exactly one thing: `GET` of a blob by digest, which it
//! has proven under that repository itself (the owner relay). The request proves it comes
//! from a replica with [`PEER_HEADER`]: a MAC, under the key the replicas share
//! ([`SharedKey`]), of the time and the request's method and target (path and query, the
//! repository, digest and upstream among them), good for [`PEER_SKEW`] either side of
//! the owner's clock. Nothing else is trusted for it: not a source address (a pod on a
//! reused IP, or a spoofed one, gains nothing), and no other request (a manifest, a HEAD,
//! tags/list) is answered with such a header.

use super::shared_key::SharedKey;
use crate::oci::{Algorithm, Digest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How often the DNS name of the replicas is looked up again.
pub const DNS_REFRESH: Duration = Duration::from_secs(5);

/// The header a replica's request to the owner carries: its proof (`v1 <unix seconds>
/// <hex MAC>`, see the module's doc). Such requests are never passed on to another
/// replica (so that two replicas whose views differ for a moment cannot send a request
/// round in a circle).
pub const PEER_HEADER: &str = "x-pullthrough-peer";

/// How far a replica's proof may be from the owner's clock, either way.
pub const PEER_SKEW: Duration = Duration::from_secs(60);

/// This replica and the others.
pub struct Peers {
    me: SocketAddr,
    view: watch::Receiver<Arc<Vec<SocketAddr>>>,
    refresh: Option<tokio::task::JoinHandle<()>>,
    key: SharedKey,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The proof of a request `method target` made at `unix` seconds, under `key`.
fn proof_at(key: &SharedKey, unix: u64, method: &str, target: &str) -> String {
    let mac = key.mac(&[
        b"pullthrough-peer\0",
        unix.to_string().as_bytes(),
        b"\0",
        method.as_bytes(),
        b"\0",
        target.as_bytes(),
    ]);
    format!("v1 {unix} {}", hex::encode(mac))
}

/// Whether `proof` proves the request `method target` at `now` (unix seconds); why not.
fn check_at(
    key: &SharedKey,
    proof: &str,
    method: &str,
    target: &str,
    now: u64,
) -> Result<(), &'static str> {
    let malformed = "the replica's proof is malformed";
    let mut parts = proof.split(' ');
    let (Some("v1"), Some(unix), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    let unix: u64 = unix.parse().map_err(|_| malformed)?;
    let mac = hex::decode(mac).map_err(|_| malformed)?;
    if unix.abs_diff(now) > PEER_SKEW.as_secs() {
        return Err("the replica's proof is too old or too new (are the clocks in sync?)");
    }
    let signed = proof_at(key, unix, method, target);
    let expected = hex::decode(signed.rsplit(' ').next().unwrap_or("")).unwrap_or_default();
    if !super::shared_key::equal(&expected, &mac) {
        return Err("the replica's proof does not verify under the replicas' key");
    }
    Ok(())
}

impl Peers {
    /// A fixed set of replicas (this one is counted whether listed or not), whose
    /// requests are proven under `key`.
    pub fn fixed(me: SocketAddr, addresses: &[SocketAddr], key: SharedKey) -> Peers {
        let (_tx, view) = watch::channel(Arc::new(with_me(me, addresses.to_vec())));
        Peers {
            me,
            view,
            refresh: None,
            key,
        }
    }

    /// The replicas `name` resolves to, each at `port`, looked up every [`DNS_REFRESH`],
    /// whose requests are proven under `key`. A failed lookup keeps the last view; until
    /// the first one answers, this replica is alone (it fetches what it misses itself).
    pub fn dns(me: SocketAddr, name: String, port: u16, key: SharedKey) -> Peers {
        let (tx, view) = watch::channel(Arc::new(vec![me]));
        let refresh = tokio::spawn(async move {
            let mut logged_failure = false;
            loop {
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(found) => {
                        logged_failure = false;
                        let next = with_me(me, found.collect());
                        if **tx.borrow() != next {
                            tracing::info!(replicas = ?next, "peer replicas changed");
                            tx.send_replace(Arc::new(next));
                        }
                    }
                    Err(e) if !logged_failure => {
                        logged_failure = true;
                        tracing::warn!(%name, error = %e, "cannot look the peer replicas up; keeping the last ones");
                    }
                    Err(_) => {}
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(DNS_REFRESH).await;
            }
        });
        Peers {
            me,
            view,
            refresh: Some(refresh),
            key,
        }
    }

    /// The [`PEER_HEADER`] that proves this replica's request `method target` (its path
    /// and query), now.
    pub fn proof(&self, method: &str, target: &str) -> String {
        proof_at(&self.key, unix_now(), method, target)
    }

    /// Whether `proof` proves that the request `method target` comes from a replica;
    /// why not.
    pub fn check(&self, proof: &str, method: &str, target: &str) -> Result<(), &'static str> {
        check_at(&self.key, proof, method, target, unix_now())
    }

    /// This replica's address.
    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// The replicas now, this one among them, sorted.
    pub fn replicas(&self) -> Arc<Vec<SocketAddr>> {
        self.view.borrow().clone()
    }

    /// The replica that owns `digest`, when it is not this one.
    pub fn owner(&self, digest: &Digest) -> Option<SocketAddr> {
        let owner = owner_of(&self.replicas(), digest)?;
        (owner != self.me).then_some(owner)
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        if let Some(t) = &self.refresh {
            t.abort();
        }
    }
}

fn with_me(me: SocketAddr, mut addresses: Vec<SocketAddr>) -> Vec<SocketAddr> {
    addresses.push(me);
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The owner of `digest` among `replicas` (rendezvous hashing).
pub fn owner_of(replicas: &[SocketAddr], digest: &Digest) -> Option<SocketAddr> {
    replicas.iter().copied().max_by_key(|r| score(r, digest))
}

fn score(replica: &SocketAddr, digest: &Digest) -> [u8; 32] {
    let key = format!("{replica}\0{digest}");
    let d = Digest::of(Algorithm::Sha256, key.as_bytes());
    let mut out = [0u8; 32];
    hex::decode_to_slice(d.hex(), &mut out).expect("a sha256 digest is 32 bytes of hex");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn owners_spread_and_move_only_with_their_replica() {
        let all: Vec<_> = (1..=3).map(addr).collect();
        let digests: Vec<Digest> = (0..300u32)
            .map(|i| Digest::of(Algorithm::Sha256, &i.to_be_bytes()))
            .collect();
        let owners: Vec<_> = digests.iter().map(|d| owner_of(&all, d).unwrap()).collect();
        for r in &all {
            let n = owners.iter().filter(|o| *o == r).count();
            assert!((60..=140).contains(&n), "{r} owns {n} of 300");
        }
        // Without replica 3, only its digests move.
        let two = &all[..2];
        for (d, before) in digests.iter().zip(&owners) {
            let after = owner_of(two, d).unwrap();
            if *before != addr(3) {
                assert_eq!(after, *before, "{d} moved");
            }
        }
        // Every replica agrees, whatever order it lists the others in.
        let mut reversed = all.clone();
        reversed.reverse();
        assert!(
            digests
                .iter()
                .all(|d| owner_of(&reversed, d) == owner_of(&all, d))
        );
    }

    fn key() -> SharedKey {
        SharedKey::new(b"the replicas' key, 32 bytes long".to_vec())
    }

    #[test]
    fn a_proof_holds_for_its_request_its_key_and_its_minute_only() {
        let (k, target) = (key(), "/v2/team/app/blobs/sha256:ab?ns=ghcr.io");
        let proof = proof_at(&k, 1_000, "GET", target);
        assert_eq!(check_at(&k, &proof, "GET", target, 1_000), Ok(()));
        assert_eq!(check_at(&k, &proof, "GET", target, 1_060), Ok(()));
        assert_eq!(check_at(&k, &proof, "GET", target, 940), Ok(()));
        let refused = |r: Result<(), &str>| r.is_err();
        assert!(
            refused(check_at(&k, &proof, "GET", target, 1_061)),
            "replayed late"
        );
        assert!(
            refused(check_at(&k, &proof, "GET", target, 939)),
            "from the future"
        );
        assert!(
            refused(check_at(&k, &proof, "HEAD", target, 1_000)),
            "another method"
        );
        let other = "/v2/team/app/manifests/1?ns=ghcr.io";
        assert!(
            refused(check_at(&k, &proof, "GET", other, 1_000)),
            "another target"
        );
        let theirs = SharedKey::new(b"a key the replicas do not share!".to_vec());
        assert!(
            refused(check_at(&theirs, &proof, "GET", target, 1_000)),
            "another key"
        );
        let later = proof.replacen("1000", "1001", 1);
        assert!(
            refused(check_at(&k, &later, "GET", target, 1_000)),
            "time changed"
        );
        for junk in ["", "v1", "v1 x y", "v2 1000 00", &format!("{proof} x")] {
            assert!(
                refused(check_at(&k, junk, "GET", target, 1_000)),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn a_replica_asks_no_one_for_what_it_owns() {
        let peers = Peers::fixed(addr(1), &[addr(2), addr(1)], key());
        assert_eq!(*peers.replicas(), vec![addr(1), addr(2)]);
        let d = (0..100u32)
            .map(|i| Digest::of(Algorithm::Sha256, &i.to_be_bytes()))
            .find(|d| owner_of(&peers.replicas(), d) == Some(addr(1)))
            .unwrap();
        assert_eq!(peers.owner(&d), None);
        let alone = Peers::fixed(addr(1), &[], key());
        assert_eq!(alone.owner(&d), None);
    }
}

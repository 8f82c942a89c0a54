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

use crate::oci::{Algorithm, Digest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the DNS name of the replicas is looked up again.
pub const DNS_REFRESH: Duration = Duration::from_secs(5);

/// The header a replica marks its requests to the owner with: they are never passed on
/// to another replica (so that two replicas whose views differ for a moment cannot send
/// a request round in a circle).
pub const PEER_HEADER: &str = "x-pullthrough-peer";

/// This replica and the others.
pub struct Peers {
    me: SocketAddr,
    view: watch::Receiver<Arc<Vec<SocketAddr>>>,
    refresh: Option<tokio::task::JoinHandle<()>>,
}

impl Peers {
    /// A fixed set of replicas (this one is counted whether listed or not).
    pub fn fixed(me: SocketAddr, addresses: &[SocketAddr]) -> Peers {
        let (_tx, view) = watch::channel(Arc::new(with_me(me, addresses.to_vec())));
        Peers {
            me,
            view,
            refresh: None,
        }
    }

    /// The replicas `name` resolves to, each at `port`, looked up every [`DNS_REFRESH`].
    /// A failed lookup keeps the last view; until the first one answers, this replica is
    /// alone (it fetches what it misses itself).
    pub fn dns(me: SocketAddr, name: String, port: u16) -> Peers {
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
        }
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

    #[test]
    fn a_replica_asks_no_one_for_what_it_owns() {
        let peers = Peers::fixed(addr(1), &[addr(2), addr(1)]);
        assert_eq!(*peers.replicas(), vec![addr(1), addr(2)]);
        let d = (0..100u32)
            .map(|i| Digest::of(Algorithm::Sha256, &i.to_be_bytes()))
            .find(|d| owner_of(&peers.replicas(), d) == Some(addr(1)))
            .unwrap();
        assert_eq!(peers.owner(&d), None);
        let alone = Peers::fixed(addr(1), &[]);
        assert_eq!(alone.owner(&d), None);
    }
}

//! The key the replicas of a proxy share (`access.signingKeyFile`, a Secret every replica
//! mounts): it signs the tokens `/auth/token` issues, keys the remembered access
//! decisions, and authenticates the replicas' requests to each other
//! ([`crate::proxy::peers`]). Everything made with it is an HMAC-SHA256 (RFC 2104),
//! and every MAC shown to the proxy is compared in constant time.

use sha2::{Digest as _, Sha256};
use std::sync::Arc;

const BLOCK: usize = 64;

/// HMAC-SHA256 (RFC 2104) of `parts`, concatenated, under `key`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Whether `a` and `b` are equal, in a time that depends only on their lengths.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The replicas' shared key.
#[derive(Clone)]
pub struct SharedKey(Arc<[u8]>);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(<redacted>)")
    }
}

impl SharedKey {
    /// The key made of `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> SharedKey {
        SharedKey(bytes.into().into())
    }

    /// The MAC of `parts`, concatenated, under this key.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        hmac(&self.0, parts)
    }

    /// Whether `given` is the MAC of `parts` under this key.
    pub fn verify(&self, parts: &[&[u8]], given: &[u8]) -> bool {
        equal(&self.mac(parts), given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 1 and 6 (a key longer than a block).
        let one = hmac(&[0x0b; 20], &[b"Hi There"]);
        assert_eq!(
            hex::encode(one),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        let six = hmac(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex::encode(six),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(hmac(b"k", &[b"ab", b"c"]), hmac(b"k", &[b"abc"]));
    }

    #[test]
    fn a_mac_verifies_only_under_its_key_and_parts() {
        let key = SharedKey::new(b"a key of the replicas".to_vec());
        let mac = key.mac(&[b"a", b"b"]);
        assert!(key.verify(&[b"ab"], &mac));
        assert!(!key.verify(&[b"ac"], &mac));
        assert!(!SharedKey::new(b"another".to_vec()).verify(&[b"ab"], &mac));
        assert!(!key.verify(&[b"ab"], &mac[..31]));
        assert!(!format!("{key:?}").contains("replicas"));
    }
}

//! The tokens the proxy's `/auth/token` issues: JSON Web Tokens signed with HMAC-SHA256
//! (HS256) under a key every replica shares, so any replica verifies what another
//! issued. A token names its upstream (`aud`), the repositories it may pull (`access`,
//! the distribution token spec's claim) and its expiry (`exp`); it carries no
//! credentials and no user name.

use crate::proxy::shared_key::SharedKey;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// `{"alg":"HS256","typ":"JWT"}`, encoded.
const HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
const ISSUER: &str = "pullthrough";

/// One entry of the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Always `repository`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository, as the upstream names it.
    pub name: String,
    /// `pull`, or nothing (an anonymous or refused client's token).
    pub actions: Vec<String>,
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// `pullthrough`.
    pub iss: String,
    /// The service it is for: `pullthrough:<upstream>`.
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// What it may pull.
    pub access: Vec<Grant>,
}

impl Claims {
    /// A token for `service` that lets its holder pull each of `pull`, and nothing of
    /// `refused`, until `exp`.
    pub fn new(service: &str, pull: &[String], refused: &[String], now: u64, exp: u64) -> Claims {
        let grant = |name: &String, actions: Vec<String>| Grant {
            kind: "repository".into(),
            name: name.clone(),
            actions,
        };
        let access = pull
            .iter()
            .map(|n| grant(n, vec!["pull".into()]))
            .chain(refused.iter().map(|n| grant(n, Vec::new())))
            .collect();
        Claims {
            iss: ISSUER.into(),
            aud: service.into(),
            iat: now,
            exp,
            access,
        }
    }

    /// Whether the holder may pull `repository` of `service` at `now`.
    pub fn permits(&self, service: &str, repository: &str, now: u64) -> bool {
        self.iss == ISSUER
            && self.aud == service
            && now < self.exp
            && self.access.iter().any(|g| {
                g.kind == "repository"
                    && g.name == repository
                    && g.actions.iter().any(|a| a == "pull")
            })
    }
}

/// Signs `claims` under `key`: `header.claims.signature`.
pub fn sign(key: &SharedKey, claims: &Claims) -> String {
    let body = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signed = format!("{HEADER}.{body}");
    let mac = key.mac(&[signed.as_bytes()]);
    format!("{signed}.{}", B64.encode(mac))
}

/// The claims of `token` when `key` signed it; `None` for anything else (another key, a
/// changed byte, another algorithm, not a token).
pub fn verify(key: &SharedKey, token: &str) -> Option<Claims> {
    let (signed, signature) = token.rsplit_once('.')?;
    let (header, body) = signed.split_once('.')?;
    if header != HEADER {
        return None;
    }
    let given = B64.decode(signature).ok()?;
    if !key.verify(&[signed.as_bytes()], &given) {
        return None;
    }
    serde_json::from_slice(&B64.decode(body).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_verified_only_under_its_key_and_unchanged() {
        let claims = Claims::new("pullthrough:r", &["a/b".into()], &[], 100, 400);
        let key = SharedKey::new(b"key".to_vec());
        let token = sign(&key, &claims);
        assert_eq!(verify(&key, &token), Some(claims.clone()));
        assert_eq!(verify(&SharedKey::new(b"other".to_vec()), &token), None);
        let (h, rest) = token.split_once('.').unwrap();
        let forged = B64.encode(
            serde_json::to_vec(&Claims::new("pullthrough:r", &["c".into()], &[], 100, 400))
                .unwrap(),
        );
        let sig = rest.split_once('.').unwrap().1;
        assert_eq!(verify(&key, &format!("{h}.{forged}.{sig}")), None);
        let none_alg = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), forged);
        assert_eq!(verify(&key, &none_alg), None);
        assert_eq!(verify(&key, "not a token"), None);
    }

    #[test]
    fn claims_permit_only_their_service_repository_and_time() {
        let c = Claims::new("pullthrough:r", &["a".into()], &["b".into()], 100, 400);
        assert!(c.permits("pullthrough:r", "a", 399));
        assert!(!c.permits("pullthrough:r", "a", 400));
        assert!(!c.permits("pullthrough:other", "a", 200));
        assert!(!c.permits("pullthrough:r", "b", 200));
        assert!(!c.permits("pullthrough:r", "c", 200));
    }
}

//! How `upstreamAuth` upstreams decide and remember who may pull: the TTLs of the
//! upstream's answers, the key the replicas share, the caps on failed checks.

use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// How `upstreamAuth` upstreams decide and remember who may pull (docs/proxy.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessConfig {
    /// The key the replicas share (a mounted Secret): it signs the proxy's tokens, keys
    /// its decision cache and proves the replicas' requests to each other. Default:
    /// `access-signing-key` in `cacheDir`, created (0600) if missing; replicas (`peers`)
    /// must set one they share. At least 32 bytes (`openssl rand -hex 32`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// How long the upstream's yes to a client's credentials is trusted: the delay
    /// before a revoked client loses access through the cache.
    #[serde(rename = "allowedTTL", with = "crate::api::duration::serde")]
    pub allowed_ttl: Duration,
    /// How long the upstream's no is remembered before the same credentials are checked
    /// again.
    #[serde(rename = "deniedTTL", with = "crate::api::duration::serde")]
    pub denied_ttl: Duration,
    /// How long a repository is known to be public (or not) before it is probed again.
    #[serde(rename = "publicTTL", with = "crate::api::duration::serde")]
    pub public_ttl: Duration,
    /// Lifetime of a token the proxy issues (never past its decision's `allowedTTL`).
    #[serde(rename = "tokenTTL", with = "crate::api::duration::serde")]
    pub token_ttl: Duration,
    /// Failed credential checks allowed per user name, client address and upstream in
    /// `deniedTTL`; more are refused (429) without asking the upstream (but for
    /// credentials the upstream accepted before).
    pub max_failed_checks: NonZeroU32,
    /// Failed credential checks allowed per client address and upstream in `deniedTTL`,
    /// whatever the user names; more are refused (429) without asking the upstream (but
    /// for credentials the upstream accepted before).
    pub max_failed_checks_per_client: NonZeroU32,
    /// Challenge clients over plain HTTP: their credentials then cross the network in
    /// clear. Required for `upstreamAuth` on a proxy without `tls`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            signing_key_file: None,
            allowed_ttl: Duration::from_secs(300),
            denied_ttl: Duration::from_secs(30),
            public_ttl: Duration::from_secs(600),
            token_ttl: Duration::from_secs(300),
            max_failed_checks: NonZeroU32::new(10).expect("not zero"),
            max_failed_checks_per_client: NonZeroU32::new(30).expect("not zero"),
            plain_http: false,
        }
    }
}

impl AccessConfig {
    /// Every field at its default.
    pub fn is_default(&self) -> bool {
        *self == AccessConfig::default()
    }

    /// Checks what serde cannot: no TTL of zero.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (zero, name) in [
            (self.allowed_ttl.is_zero(), "access.allowedTTL"),
            (self.denied_ttl.is_zero(), "access.deniedTTL"),
            (self.public_ttl.is_zero(), "access.publicTTL"),
            (self.token_ttl.is_zero(), "access.tokenTTL"),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }
}

/// The signing key's file name in the cache directory, by default.
pub const SIGNING_KEY_FILE: &str = "access-signing-key";

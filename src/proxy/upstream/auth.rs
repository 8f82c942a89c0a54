//! Authenticating to an upstream registry the way it asks: nothing until it answers 401,
//! then Basic or a Bearer token from its token endpoint (the distribution token spec),
//! with the tokens cached per scope until they expire. An identity token (what `docker
//! login` keeps for a token server, and a pull secret's `identitytoken`) is sent the
//! OAuth2 way: a POST with `grant_type=refresh_token`.

use super::error::UpstreamError;
use super::transport::{Transport, origin_of, query_escape, read_limited};
use crate::api::Credentials;
use crate::proxy::metrics::{Kind, Metrics};
use base64::Engine as _;
use hyper::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const MAX_TOKEN_BYTES: usize = 1 << 20;
/// Token lifetime when the token endpoint does not say (the spec's default).
const DEFAULT_TOKEN_SECS: u64 = 60;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Token flow: ask `realm` for a token.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter to pass along.
        service: Option<String>,
        /// `scope` the registry asked for.
        scope: Option<String>,
    },
    /// Plain basic auth.
    Basic,
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut map = HashMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        map.insert(key, value.to_string());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: map.remove("realm")?,
        service: map.remove("service"),
        scope: map.remove("scope"),
    })
}

/// What a client of the upstream proves itself with.
#[derive(Clone, PartialEq)]
pub enum Secret {
    /// A user name and password: Basic, or Basic to the token endpoint.
    Password(Credentials),
    /// A refresh token of the upstream's token server, exchanged for access tokens with
    /// `grant_type=refresh_token`.
    IdentityToken(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Password(c) => c.fmt(f),
            Secret::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

struct Token {
    header: String,
    expires: Instant,
}

/// One upstream's credentials and what it was last asked for: its tokens by scope, and
/// whether it wants Basic on every request.
pub(super) struct Auth {
    secret: Option<Secret>,
    tokens: Mutex<HashMap<String, Token>>,
    wants_basic: AtomicBool,
}

impl Auth {
    pub(super) fn new(secret: Option<Secret>) -> Auth {
        Auth {
            secret,
            tokens: Mutex::new(HashMap::new()),
            wants_basic: AtomicBool::new(false),
        }
    }

    /// Whether it has credentials (or an identity token) to answer with.
    #[cfg(test)]
    pub(super) fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// The `Authorization` to send for `scope` without being asked: a cached token, or
    /// Basic once the upstream has asked for it.
    pub(super) fn cached(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().expect("token cache lock");
        if let Some(t) = tokens.get(scope)
            && t.expires > Instant::now()
        {
            return Some(t.header.clone());
        }
        drop(tokens);
        if self.wants_basic.load(Ordering::Relaxed) {
            return self.basic();
        }
        None
    }

    /// The `Authorization` that answers `challenge` for `scope`; `None` when there is no
    /// answer (Basic without credentials, an unknown scheme): the 401 stands.
    pub(super) async fn answer(
        &self,
        challenge: Option<&str>,
        scope: &str,
        transport: &Transport,
        metrics: (&Metrics, &str),
    ) -> Result<Option<String>, UpstreamError> {
        match challenge.and_then(parse_challenge) {
            Some(Challenge::Bearer {
                realm,
                service,
                scope: asked,
            }) => {
                let want = asked.unwrap_or_else(|| scope.to_string());
                self.token(&realm, service.as_deref(), &want, scope, transport, metrics)
                    .await
                    .map(Some)
            }
            Some(Challenge::Basic) if matches!(self.secret, Some(Secret::Password(_))) => {
                self.wants_basic.store(true, Ordering::Relaxed);
                Ok(self.basic())
            }
            _ => Ok(None),
        }
    }

    fn basic(&self) -> Option<String> {
        match &self.secret {
            Some(Secret::Password(c)) => {
                let raw = format!("{}:{}", c.username, c.password);
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            _ => None,
        }
    }

    /// Gets a Bearer token for `scope` from the token endpoint and caches it under
    /// `cache_key` (the repository's pull scope) until it expires.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cache_key: &str,
        transport: &Transport,
        (metrics, upstream): (&Metrics, &str),
    ) -> Result<String, UpstreamError> {
        let mut query = String::new();
        if let Some(s) = service {
            query.push_str("service=");
            query.push_str(&query_escape(s));
            query.push('&');
        }
        query.push_str("scope=");
        query.push_str(&query_escape(scope));
        let started = Instant::now();
        let resp = match &self.secret {
            Some(Secret::IdentityToken(t)) => {
                query.push_str("&grant_type=refresh_token&client_id=pullthrough&refresh_token=");
                query.push_str(&query_escape(t));
                transport.post_form(realm, query).await
            }
            _ => {
                let mut url = realm.to_string();
                url.push(if realm.contains('?') { '&' } else { '?' });
                url.push_str(&query);
                let basic = self.basic();
                transport
                    .send(&Method::GET, &url, basic.as_deref(), None)
                    .await
            }
        };
        let code = resp.as_ref().ok().map(|r| r.status().as_u16());
        metrics.upstream(upstream, Kind::Token, code, started.elapsed().as_secs_f64());
        let resp = resp?;
        let status = resp.status();
        let server = origin_of(realm);
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::Denied(status.as_u16()));
        }
        if !status.is_success() {
            return Err(UpstreamError::Failed {
                server,
                status: status.as_u16(),
            });
        }
        let body = read_limited(
            resp.into_body(),
            "token endpoint's answer",
            MAX_TOKEN_BYTES,
            transport.timeout(),
        )
        .await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            UpstreamError::protocol(format!("token endpoint {server}: not a token answer: {e}"))
        })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                UpstreamError::protocol(format!("token endpoint {server} answered without a token"))
            })?;
        let header = format!("Bearer {token}");
        // Renew a little early so a token never expires between cache lookup and use.
        let lifetime = parsed
            .expires_in
            .unwrap_or(DEFAULT_TOKEN_SECS)
            .max(DEFAULT_TOKEN_SECS);
        let expires = Instant::now() + Duration::from_secs(lifetime.saturating_sub(10));
        self.tokens.lock().expect("token cache lock").insert(
            cache_key.to_string(),
            Token {
                header: header.clone(),
                expires,
            },
        );
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        let comma = parse_challenge(r#"Bearer realm="https://a/t",scope="repository:a:pull,push""#);
        assert!(
            matches!(comma, Some(Challenge::Bearer { scope: Some(s), .. }) if s == "repository:a:pull,push")
        );
    }
}

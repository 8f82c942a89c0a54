//! Reading registry credentials out of a `.dockerconfigjson` document (the payload of a
//! `kubernetes.io/dockerconfigjson` Secret).

use super::docker_hub;
use super::proxy_config::Credentials;
use base64::Engine as _;
use serde::Deserialize;
use std::collections::HashMap;

/// Why a dockerconfigjson cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    /// Not the expected JSON.
    #[error("not a valid .dockerconfigjson: {0}")]
    Json(#[from] serde_json::Error),
    /// `auth` that is not base64 of `user:password`.
    #[error("the auth entry for {0:?} is not base64 of user:password")]
    BadAuth(String),
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The credentials for `registry` in the document, if it has an entry for it. Keys may be
/// bare hosts or URLs (`https://index.docker.io/v1/` for Docker Hub).
pub fn credentials_for(
    json: &[u8],
    registry: &str,
) -> Result<Option<Credentials>, DockerConfigError> {
    let config: DockerConfig = serde_json::from_slice(json)?;
    let want = registry.to_ascii_lowercase();
    let host_of = |key: &str| {
        let k = key.to_ascii_lowercase();
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_string();
        k.split('/').next().unwrap_or("").to_string()
    };
    let entry = config.auths.iter().find(|(key, _)| {
        let host = host_of(key);
        host == want || (docker_hub::is_alias(&want) && docker_hub::is_alias(&host))
    });
    let Some((key, entry)) = entry else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| DockerConfigError::BadAuth(key.clone()))?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or_else(|| DockerConfigError::BadAuth(key.clone()))?;
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_entries() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "ghcr.io":{"username":"bot","password":"tok"},
            "bad.example":{"auth":"!!!"}
        }}"#;
        let hub = credentials_for(json, "docker.io").unwrap().unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        let gh = credentials_for(json, "GHCR.io").unwrap().unwrap();
        assert_eq!(gh.username, "bot");
        assert!(credentials_for(json, "quay.io").unwrap().is_none());
        assert!(credentials_for(json, "bad.example").is_err());
        assert!(credentials_for(b"not json", "x").is_err());
    }
}

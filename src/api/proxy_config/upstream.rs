//! One mirrored registry: where it is (its URLs, tried in order), the credentials the
//! proxy uses, which repositories may be pulled, who may pull (its access mode), and how
//! hard the proxy may press it.

use super::ConfigError;
use crate::api::docker_hub;
use crate::api::image_ref::{looks_like_registry, valid_registry_host};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// One mirrored registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name as image references use it (`docker.io`, `ghcr.io`, `registry.local:5000`).
    /// containerd passes it as `?ns=`.
    pub registry: String,
    /// Registry API base URL; defaults to `https://registry-1.docker.io` for docker.io and
    /// `https://<registry>` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Several base URLs instead of `url`, tried in order (a regional mirror first, the
    /// origin last): a URL that cannot be reached or answers 5xx is skipped for 30 s
    /// while the next one answers (`pullthrough_upstream_url_up`). Credentials go to the
    /// last one only (the origin), which also decides who may pull private repositories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Inline credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// A `.dockerconfigjson` file (a mounted `kubernetes.io/dockerconfigjson` Secret) to take
    /// this registry's credentials from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Which repositories may be pulled through.
    #[serde(default, skip_serializing_if = "RepositoryFilter::is_empty")]
    pub repositories: RepositoryFilter,
    /// Who may pull through: see [`AccessMode`]. Default: `upstreamAuth` when the
    /// upstream has credentials, else `open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<UpstreamAccess>,
    /// How hard the proxy may press this upstream (docs/operations.md, "Keeping under
    /// the upstream's limits"). Default: [`UpstreamLimits::for_registry`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<UpstreamLimits>,
    /// Whether and when the proxy asks this upstream; the proxy's `mode` when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpstreamMode>,
    /// How the tags of some repositories are kept: the first policy that matches a tag
    /// applies, and a tag none matches is `refresh`ed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag_policies: Vec<TagPolicy>,
}

/// How the tags of repositories matching `repositories` and `tags` are kept
/// (docs/operations.md, "Tag policies").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagPolicy {
    /// Repositories as the upstream names them, a glob (`library/*`, `org/app`).
    pub repositories: String,
    /// Tags, a glob (`v*`); every tag when not given.
    #[serde(default = "every_tag")]
    pub tags: String,
    /// `refresh`, `immutable` or `pinned`.
    pub policy: TagPolicyKind,
    /// With `pinned`: the digest the tags answer (`sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

fn every_tag() -> String {
    "*".to_string()
}

/// What a [`TagPolicy`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TagPolicyKind {
    /// As every tag: trusted for `tagTTL`, then revalidated.
    Refresh,
    /// Once cached, never revalidated (version tags, commit tags).
    Immutable,
    /// Answers `digest`, whatever the upstream says (a freeze during an incident).
    Pinned,
}

/// Whether and when the proxy asks an upstream (docs/operations.md, "When the upstream
/// fails"). Changed on a running proxy through `PUT /admin/mode`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamMode {
    /// A cached tag is served while its `tagTTL` lasts, then revalidated before it is
    /// served (and served stale for `staleIfError` while the upstream fails).
    #[default]
    Online,
    /// A cached tag is served at once, whatever its age, and revalidated in the
    /// background once past its `tagTTL`: no client waits on the upstream for anything
    /// cached. What is not cached is fetched as online.
    LocalFirst,
    /// The upstream is never asked: what is cached is served, whatever its age; a miss
    /// fails at once with an error that names offline mode.
    Offline,
}

impl UpstreamMode {
    /// Every mode, in the order of the metric's series.
    pub const ALL: [UpstreamMode; 3] = [
        UpstreamMode::Online,
        UpstreamMode::LocalFirst,
        UpstreamMode::Offline,
    ];

    /// As the config and the metric write it.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Online => "online",
            UpstreamMode::LocalFirst => "localFirst",
            UpstreamMode::Offline => "offline",
        }
    }
}

impl std::fmt::Display for UpstreamMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Caps on what the proxy asks of one upstream. Requests over a cap wait for up to
/// `queueTimeout`, then fail with 429 and a `Retry-After`, as do requests while the
/// upstream has asked to wait (429, or 503 with `Retry-After`); cached tags are served
/// stale meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UpstreamLimits {
    /// Requests out to the upstream at once, each until its answer's headers arrive.
    /// Default: 32 for docker.io, 64 otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Manifest GETs sent per second (what Docker Hub counts as pulls; HEADs are not
    /// capped), with a burst of as many; 0: no cap. Default: 10 for docker.io, no cap
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_gets_per_second: Option<u32>,
    /// How long a request over a cap waits before it fails.
    #[serde(with = "crate::api::duration::serde")]
    pub queue_timeout: Duration,
    /// How long the upstream is left alone after a 429 without `Retry-After`.
    #[serde(with = "crate::api::duration::serde")]
    pub backoff: Duration,
    /// The longest `Retry-After` honoured.
    #[serde(with = "crate::api::duration::serde")]
    pub max_backoff: Duration,
}

impl UpstreamLimits {
    /// The defaults for `registry`: Docker Hub's stricter.
    pub fn for_registry(registry: &str) -> UpstreamLimits {
        let hub = docker_hub::is_alias(registry);
        UpstreamLimits {
            max_concurrent_requests: Some(if hub { 32 } else { 64 }),
            manifest_gets_per_second: Some(if hub { 10 } else { 0 }),
            ..UpstreamLimits::default()
        }
    }
}

impl Default for UpstreamLimits {
    /// The caps as written when none is: the registry's own defaults take their place
    /// (see [`UpstreamConfig::limits`]), the durations are the same for every registry.
    fn default() -> UpstreamLimits {
        UpstreamLimits {
            max_concurrent_requests: None,
            manifest_gets_per_second: None,
            queue_timeout: Duration::from_secs(10),
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(600),
        }
    }
}

/// Who may pull an upstream's repositories through the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AccessMode {
    /// Anyone who reaches the proxy: what the proxy's own credentials fetch is served to
    /// every client.
    Open,
    /// A repository the upstream serves anonymously is served to anyone; any other only
    /// to a client whose own credentials the upstream accepts for it (a 401 challenge,
    /// then the proxy's token endpoint checks them with the upstream).
    UpstreamAuth,
}

/// An upstream's access setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamAccess {
    /// `open` or `upstreamAuth`.
    pub mode: AccessMode,
}

/// Username and password (or token) for an upstream.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// For Basic auth, and for token requests when the registry asks for a token.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Allow/deny globs over repository names (`*` matches any run of characters, `/` too).
/// Deny wins; an empty allow list allows everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepositoryFilter {
    /// Globs of repositories that may be pulled; empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Globs of repositories that may not be pulled; wins over allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl RepositoryFilter {
    /// No rules at all.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether `repository` may be pulled.
    pub fn permits(&self, repository: &str) -> bool {
        if self.deny.iter().any(|g| glob_match(g, repository)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|g| glob_match(g, repository))
    }
}

/// Glob match where `*` matches any (possibly empty) run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl UpstreamConfig {
    /// An upstream with its default URL and no credentials or filters.
    pub fn new(registry: &str) -> UpstreamConfig {
        UpstreamConfig {
            registry: registry.to_string(),
            url: None,
            urls: Vec::new(),
            credentials: None,
            credentials_file: None,
            repositories: RepositoryFilter::default(),
            access: None,
            limits: None,
            mode: None,
            tag_policies: Vec::new(),
        }
    }

    /// The caps on requests to this upstream: as set, the registry's defaults for what
    /// is not.
    pub fn limits(&self) -> UpstreamLimits {
        let d = UpstreamLimits::for_registry(&self.registry);
        match &self.limits {
            None => d,
            Some(l) => UpstreamLimits {
                max_concurrent_requests: l.max_concurrent_requests.or(d.max_concurrent_requests),
                manifest_gets_per_second: l.manifest_gets_per_second.or(d.manifest_gets_per_second),
                ..l.clone()
            },
        }
    }

    /// Who may pull through this upstream: as set, else `upstreamAuth` when it has
    /// credentials (what they reach is not for everyone), else `open`.
    pub fn access_mode(&self) -> AccessMode {
        match &self.access {
            Some(a) => a.mode,
            None if self.credentials.is_some() || self.credentials_file.is_some() => {
                AccessMode::UpstreamAuth
            }
            None => AccessMode::Open,
        }
    }

    /// The registry API base URL, without a trailing slash.
    pub fn base_url(&self) -> String {
        if let Some(first) = self.urls.first() {
            return first.trim_end_matches('/').to_string();
        }
        let url = match &self.url {
            Some(u) => u.clone(),
            None if self.is_docker_hub() => docker_hub::API_URL.to_string(),
            None => format!("https://{}", self.registry),
        };
        url.trim_end_matches('/').to_string()
    }

    /// Every base URL to try, in order, without trailing slashes: `urls`, or else the
    /// one [`Self::base_url`].
    pub fn base_urls(&self) -> Vec<String> {
        if self.urls.is_empty() {
            return vec![self.base_url()];
        }
        self.urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect()
    }

    /// Whether Docker Hub's naming rules apply (`library/` for single-name images).
    pub fn is_docker_hub(&self) -> bool {
        docker_hub::is_alias(&self.registry)
    }

    /// Checks what serde cannot (the registry's name as [`ProxyConfig`](super::ProxyConfig)
    /// compares it is checked there, against the others).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let key = docker_hub::registry_key(&self.registry);
        if !valid_registry_host(&key) {
            return Err(ConfigError::BadRegistry(self.registry.clone()));
        }
        if !looks_like_registry(&key) {
            return Err(ConfigError::NotARegistryName(self.registry.clone()));
        }
        if self.credentials.is_some() && self.credentials_file.is_some() {
            return Err(ConfigError::TwoCredentialSources(self.registry.clone()));
        }
        if self.limits().max_concurrent_requests == Some(0) {
            return Err(ConfigError::NoConcurrency(self.registry.clone()));
        }
        if self.url.is_some() && !self.urls.is_empty() {
            return Err(ConfigError::UrlAndUrls(self.registry.clone()));
        }
        for (i, p) in self.tag_policies.iter().enumerate() {
            let pinned = p.policy == TagPolicyKind::Pinned;
            let why = match &p.digest {
                None if pinned => Some("a pinned policy needs the digest its tags answer"),
                Some(_) if !pinned => Some("only a pinned policy takes a digest"),
                Some(d) if d.parse::<crate::oci::Digest>().is_err() => {
                    Some("its digest is not one (expected sha256: and 64 hex digits)")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(ConfigError::BadTagPolicy {
                    registry: self.registry.clone(),
                    index: i,
                    why,
                });
            }
        }
        for url in self.base_urls() {
            if split_url(&url).is_none() {
                return Err(ConfigError::BadUrl {
                    registry: self.registry.clone(),
                    url: without_userinfo(&url),
                });
            }
        }
        Ok(())
    }
}

/// `url` as an error may show it: a `user:password@` in it (not accepted, but written by
/// mistake) replaced, so that a password never reaches a log or a terminal.
pub fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((_, host)) if scheme.is_empty() => format!("<redacted>@{host}{tail}"),
        Some((_, host)) => format!("{scheme}://<redacted>@{host}{tail}"),
        None => url.to_string(),
    }
}

/// Splits `http(s)://authority[/path]` into scheme, authority and path prefix.
pub fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return None;
    }
    Some((scheme, authority, path.trim_end_matches('/')))
}

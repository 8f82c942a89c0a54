//! The proxy's error type. Every failure a client can see is one of these; `http` maps it
//! to an OCI error code, HTTP status and JSON body in one place.

use crate::oci::ErrorCode;
use hyper::StatusCode;
use std::sync::Arc;

/// A failure answering a client. Cloneable so one upstream failure can be handed to every
/// request coalesced on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// Malformed repository name.
    #[error("{0}")]
    NameInvalid(String),
    /// Malformed tag or reference.
    #[error("{0}")]
    ReferenceInvalid(String),
    /// Malformed digest.
    #[error("{0}")]
    DigestInvalid(String),
    /// `?ns=` names a registry this proxy does not mirror.
    #[error("registry {0:?} is not mirrored by this proxy")]
    UnknownRegistry(String),
    /// The repository is outside the upstream's allow list, or on its deny list.
    #[error("repository {0:?} may not be pulled through this mirror")]
    RepositoryDenied(String),
    /// Manifest not found upstream.
    #[error("manifest unknown")]
    ManifestUnknown,
    /// Blob not found upstream.
    #[error("blob unknown")]
    BlobUnknown,
    /// Repository not found upstream (tags, referrers).
    #[error("repository unknown")]
    NameUnknown,
    /// Range header that cannot be served.
    #[error("range not satisfiable")]
    RangeNotSatisfiable {
        /// Size of the blob.
        len: u64,
    },
    /// Method or endpoint the pull-only proxy does not support.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Path that is not part of the distribution API.
    #[error("not found")]
    NotFound,
    /// Upstream manifest larger than the configured cap.
    #[error("upstream manifest is larger than the {limit} byte limit")]
    ManifestTooLarge {
        /// The configured cap.
        limit: u64,
    },
    /// Upstream refused our credentials or denied access.
    #[error("upstream denied access (HTTP {0})")]
    UpstreamDenied(u16),
    /// Upstream rate limit.
    #[error("upstream rate limit reached (HTTP 429)")]
    UpstreamRateLimited,
    /// Upstream unreachable, timed out, or answered 5xx.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(Arc<str>),
    /// Upstream sent content that does not match its digest (or its length).
    #[error("upstream sent invalid content: {0}")]
    UpstreamInvalid(Arc<str>),
    /// Upstream answered a manifest request with something that is not a manifest.
    #[error("upstream sent no manifest: {0}")]
    UpstreamNotAManifest(Arc<str>),
    /// Upstream answered in a way a registry does not: a status it has no business
    /// sending, a redirect without a target, a token endpoint's answer without a token.
    #[error("upstream answered unexpectedly: {0}")]
    UpstreamProtocol(Arc<str>),
    /// The client's `Accept` allows none of the manifest types there are.
    #[error("{0}")]
    NotAcceptable(String),
    /// Local failure (disk, bug).
    #[error("internal error: {0}")]
    Internal(Arc<str>),
}

impl ProxyError {
    /// The OCI error code and HTTP status for this error.
    pub fn code_and_status(&self) -> (ErrorCode, StatusCode) {
        use ProxyError::*;
        match self {
            NameInvalid(_) => (ErrorCode::NameInvalid, StatusCode::BAD_REQUEST),
            // A tag that cannot exist cannot be found: what Distribution answers, and the
            // OCI conformance suite expects.
            ReferenceInvalid(_) => (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
            DigestInvalid(_) => (ErrorCode::DigestInvalid, StatusCode::BAD_REQUEST),
            UnknownRegistry(_) => (ErrorCode::NameUnknown, StatusCode::NOT_FOUND),
            RepositoryDenied(_) => (ErrorCode::Denied, StatusCode::FORBIDDEN),
            ManifestUnknown => (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
            BlobUnknown => (ErrorCode::BlobUnknown, StatusCode::NOT_FOUND),
            NameUnknown => (ErrorCode::NameUnknown, StatusCode::NOT_FOUND),
            RangeNotSatisfiable { .. } => {
                (ErrorCode::SizeInvalid, StatusCode::RANGE_NOT_SATISFIABLE)
            }
            Unsupported(_) => (ErrorCode::Unsupported, StatusCode::METHOD_NOT_ALLOWED),
            NotFound => (ErrorCode::NameUnknown, StatusCode::NOT_FOUND),
            ManifestTooLarge { .. } => (ErrorCode::SizeInvalid, StatusCode::BAD_GATEWAY),
            UpstreamDenied(_) => (ErrorCode::Denied, StatusCode::FORBIDDEN),
            UpstreamRateLimited => (ErrorCode::TooManyRequests, StatusCode::TOO_MANY_REQUESTS),
            UpstreamUnavailable(_) => (ErrorCode::Unavailable, StatusCode::BAD_GATEWAY),
            UpstreamInvalid(_) => (ErrorCode::DigestInvalid, StatusCode::BAD_GATEWAY),
            UpstreamNotAManifest(_) => (ErrorCode::ManifestInvalid, StatusCode::BAD_GATEWAY),
            UpstreamProtocol(_) => (ErrorCode::Unknown, StatusCode::BAD_GATEWAY),
            // What Distribution answers (and the OCI conformance suite expects) when a
            // manifest exists only in types the client does not accept.
            NotAcceptable(_) => (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
            Internal(_) => (ErrorCode::Unknown, StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// Whether the upstream is failing in a way that justifies serving a stale tag.
    pub fn upstream_is_down(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamUnavailable(_) | ProxyError::UpstreamRateLimited
        )
    }

    /// Wraps a local I/O error.
    pub fn internal(e: impl std::fmt::Display) -> ProxyError {
        ProxyError::Internal(e.to_string().into())
    }

    /// Wraps a transport failure talking to the upstream.
    pub fn unavailable(e: impl std::fmt::Display) -> ProxyError {
        ProxyError::UpstreamUnavailable(e.to_string().into())
    }
}

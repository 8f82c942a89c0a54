//! The proxy's error type. Every failure a client can see is one of these, the upstream's
//! ([`UpstreamError`]) and the store's ([`StoreError`]) among them; this module maps each
//! to an OCI error code and HTTP status, in one place, and `http` renders the JSON body.

use crate::oci::ErrorCode;
use crate::proxy::store::StoreError;
use crate::proxy::upstream::{Object, UpstreamError};
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
    /// The upstream failed, or said no.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Upstream sent content that does not match its digest (or its length).
    #[error("upstream sent invalid content: {0}")]
    UpstreamInvalid(Arc<str>),
    /// Upstream answered a manifest request with something that is not a manifest.
    #[error("upstream sent no manifest: {0}")]
    UpstreamNotAManifest(Arc<str>),
    /// A body the cache streams from a download failed part way (what prefetching reads).
    #[error("reading a blob: {0}")]
    Body(Arc<std::io::Error>),
    /// The client's `Accept` allows none of the manifest types there are.
    #[error("{0}")]
    NotAcceptable(String),
    /// The digest is cached but not linked to the repository asked for (see
    /// [`crate::proxy::links`]): the upstream is asked first. Never a client's answer but
    /// for a caller that does not ask: then it is unknown there.
    #[error("not known in this repository")]
    NotLinked,
    /// A private repository asked for without a token that covers it: answered 401 with
    /// `challenge` in `WWW-Authenticate` (see [`crate::proxy::access`]).
    #[error("authentication required: this repository is not public upstream")]
    Unauthorized {
        /// The `WWW-Authenticate` value.
        challenge: String,
    },
    /// A request that says it comes from another replica ([`crate::proxy::peers`]) and
    /// does not prove it, or asks for what a replica may not.
    #[error("refused as a replica's request: {0}")]
    PeerRefused(&'static str),
    /// Too many failed credential checks for one user name from one address, or from one
    /// address: refused without asking.
    #[error("too many failed credential checks from this client; try again later")]
    TooManyAttempts,
    /// Too many credential checks in progress to ask another now.
    #[error("too many credential checks in progress; try again shortly")]
    ChecksBusy,
    /// A token request that cannot be answered (unknown service, a grant not supported).
    #[error("{0}")]
    TokenRequest(String),
    /// The cache's store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// Something that cannot happen did (a task ended without its result).
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
            RangeNotSatisfiable { .. } => {
                (ErrorCode::SizeInvalid, StatusCode::RANGE_NOT_SATISFIABLE)
            }
            Unsupported(_) => (ErrorCode::Unsupported, StatusCode::METHOD_NOT_ALLOWED),
            NotFound => (ErrorCode::NameUnknown, StatusCode::NOT_FOUND),
            Upstream(e) => upstream_code_and_status(e),
            Body(_) => (ErrorCode::Unavailable, StatusCode::BAD_GATEWAY),
            UpstreamInvalid(_) => (ErrorCode::DigestInvalid, StatusCode::BAD_GATEWAY),
            UpstreamNotAManifest(_) => (ErrorCode::ManifestInvalid, StatusCode::BAD_GATEWAY),
            // What Distribution answers (and the OCI conformance suite expects) when a
            // manifest exists only in types the client does not accept.
            NotAcceptable(_) => (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
            NotLinked => (ErrorCode::BlobUnknown, StatusCode::NOT_FOUND),
            Unauthorized { .. } => (ErrorCode::Unauthorized, StatusCode::UNAUTHORIZED),
            PeerRefused(_) => (ErrorCode::Denied, StatusCode::FORBIDDEN),
            TooManyAttempts | ChecksBusy => {
                (ErrorCode::TooManyRequests, StatusCode::TOO_MANY_REQUESTS)
            }
            TokenRequest(_) => (ErrorCode::Unsupported, StatusCode::BAD_REQUEST),
            Storage(_) | Internal(_) => (ErrorCode::Unknown, StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The `Retry-After` to send with this error, in whole seconds (at least 1).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::Upstream(e) => e
                .retry_after()
                .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                .map(|s| s.max(1)),
            _ => None,
        }
    }

    /// Whether the upstream is failing in a way that justifies serving a stale tag.
    pub fn upstream_is_down(&self) -> bool {
        matches!(self, ProxyError::Upstream(e) if e.is_down())
    }

    /// Whether the upstream said it has no such object.
    pub fn upstream_not_found(&self) -> bool {
        matches!(self, ProxyError::Upstream(UpstreamError::NotFound(_)))
    }

    /// A broken invariant, described.
    pub fn internal(e: impl std::fmt::Display) -> ProxyError {
        ProxyError::Internal(e.to_string().into())
    }
}

/// What the client sees of an upstream failure: a 404 as the registry's own (the object
/// is unknown), a refusal as DENIED, the rate limit passed on, anything else a 502.
fn upstream_code_and_status(e: &UpstreamError) -> (ErrorCode, StatusCode) {
    use UpstreamError::*;
    match e {
        NotFound(Object::Manifest) => (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
        NotFound(Object::Blob) => (ErrorCode::BlobUnknown, StatusCode::NOT_FOUND),
        NotFound(Object::Repository) => (ErrorCode::NameUnknown, StatusCode::NOT_FOUND),
        // Unknown here, at once: a runtime moves on to its next host, or fails fast.
        Offline {
            object: Object::Manifest,
            ..
        } => (ErrorCode::ManifestUnknown, StatusCode::NOT_FOUND),
        Offline {
            object: Object::Blob,
            ..
        } => (ErrorCode::BlobUnknown, StatusCode::NOT_FOUND),
        Offline {
            object: Object::Repository,
            ..
        } => (ErrorCode::NameUnknown, StatusCode::NOT_FOUND),
        Denied(_) => (ErrorCode::Denied, StatusCode::FORBIDDEN),
        RateLimited { .. } | BackedOff { .. } | Busy { .. } => {
            (ErrorCode::TooManyRequests, StatusCode::TOO_MANY_REQUESTS)
        }
        TooLarge { .. } => (ErrorCode::SizeInvalid, StatusCode::BAD_GATEWAY),
        Protocol(_) => (ErrorCode::Unknown, StatusCode::BAD_GATEWAY),
        Failed { .. }
        | Unreachable { .. }
        | NoAnswer { .. }
        | Stalled { .. }
        | TooSlow { .. }
        | Body(_)
        | Stored(_)
        | Truncated { .. } => (ErrorCode::Unavailable, StatusCode::BAD_GATEWAY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_failures_map_to_client_errors() {
        let code = |e: UpstreamError| ProxyError::from(e).code_and_status();
        use UpstreamError::*;
        assert_eq!(
            code(NotFound(Object::Manifest)).0,
            ErrorCode::ManifestUnknown
        );
        assert_eq!(code(NotFound(Object::Blob)).0, ErrorCode::BlobUnknown);
        assert_eq!(code(Denied(401)).0, ErrorCode::Denied);
        let limited = || RateLimited {
            retry_after: std::time::Duration::from_millis(29_500),
        };
        assert_eq!(code(limited()).1, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ProxyError::from(limited()).retry_after(), Some(30));
        let busy = Busy {
            cap: "maxConcurrentRequests",
        };
        assert_eq!(code(busy.clone()).0, ErrorCode::TooManyRequests);
        assert_eq!(ProxyError::from(busy).retry_after(), Some(1));
        let failed = || Failed {
            server: "https://r.example".into(),
            status: 503,
        };
        assert_eq!(
            code(failed()),
            (ErrorCode::Unavailable, StatusCode::BAD_GATEWAY)
        );
        assert!(ProxyError::from(failed()).upstream_is_down());
        assert!(ProxyError::from(limited()).upstream_is_down());
        assert!(!ProxyError::from(NotFound(Object::Manifest)).upstream_is_down());
        assert!(!ProxyError::from(Denied(403)).upstream_is_down());
    }
}

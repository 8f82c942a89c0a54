//! What can go wrong talking to an upstream registry. The cache decides what to do about
//! it (serve stale, relay the error); [`crate::proxy::error`] maps it to what the client
//! sees.

use std::sync::Arc;
use std::time::Duration;

/// What a request was for: what is missing when the upstream answers 404.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    /// A manifest (by tag or digest).
    Manifest,
    /// A blob.
    Blob,
    /// A repository (its tags, its referrers).
    Repository,
}

impl Object {
    fn as_str(self) -> &'static str {
        match self {
            Object::Manifest => "manifest",
            Object::Blob => "blob",
            Object::Repository => "repository",
        }
    }
}

/// A failure of an upstream request. Cloneable so one failure can be handed to every
/// request coalesced on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream has no such object (HTTP 404).
    #[error("{} unknown", .0.as_str())]
    NotFound(Object),
    /// The upstream refused our credentials or denied access (HTTP 401 or 403).
    #[error("upstream denied access (HTTP {0})")]
    Denied(u16),
    /// The upstream's rate limit (HTTP 429): it is left alone for `retry_after`.
    #[error("upstream rate limit reached (HTTP 429); retrying after {}s", .retry_after.as_secs())]
    RateLimited {
        /// The back-off the answer began.
        retry_after: Duration,
    },
    /// Not sent: the upstream asked to wait (a 429, or a 503 with `Retry-After`), and
    /// has not yet been left alone for as long.
    #[error("not asked: the upstream asked to wait, another {}s", .retry_after.as_secs())]
    BackedOff {
        /// What is left of the back-off.
        retry_after: Duration,
    },
    /// Not sent: the request waited `queueTimeout` over one of the upstream's caps.
    #[error("not asked: too many requests to the upstream waiting already (limits.{cap})")]
    Busy {
        /// The cap: `maxConcurrentRequests` or `manifestGetsPerSecond`.
        cap: &'static str,
    },
    /// The upstream failed (HTTP 5xx).
    #[error("upstream unavailable: {server} answered HTTP {status}")]
    Failed {
        /// `scheme://host[:port]` of the server.
        server: String,
        /// The HTTP status it answered with (5xx or unexpected).
        status: u16,
    },
    /// The upstream cannot be reached: DNS, connection refused or reset, TLS.
    #[error("upstream unavailable: cannot reach {server}: {}", chain(.source))]
    Unreachable {
        /// `scheme://host[:port]` of the server tried (never the whole URL: a
        /// redirect's query may carry a signature).
        server: String,
        /// What the HTTP client said.
        #[source]
        source: Arc<hyper_util::client::legacy::Error>,
    },
    /// No answer (headers) within the timeout.
    #[error("upstream unavailable: no answer from {server} within {after:?}")]
    NoAnswer {
        /// `scheme://host[:port]` of the server.
        server: String,
        /// The timeout.
        after: Duration,
    },
    /// A body stopped arriving: no data for the timeout, or all of it not within it.
    #[error("upstream unavailable: {what} did not arrive within {after:?}")]
    Stalled {
        /// What was being read.
        what: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// A blob body arrived slower than the floor (`upstreamMinRate`) over a window.
    #[error(
        "upstream unavailable: a blob came at {got} bytes in {after:?}, below the floor of {floor} bytes per second"
    )]
    TooSlow {
        /// Bytes that arrived in the window.
        got: u64,
        /// The window, as long as it lasted.
        after: Duration,
        /// The floor, bytes per second.
        floor: u64,
    },
    /// The connection failed while a body was being read.
    #[error("upstream unavailable: reading the body: {}", chain(.0))]
    Body(#[source] Arc<hyper::Error>),
    /// A blob that another process fetched into the shared store failed while it was
    /// read back from there.
    #[error("reading a blob another replica stored: {0}")]
    Stored(#[source] Arc<std::io::Error>),
    /// A blob body ended before its `Content-Length`.
    #[error("upstream unavailable: blob body ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        want: u64,
    },
    /// A manifest, tags/list, referrers or token answer larger than the cap.
    #[error("upstream {what} is larger than the {limit} byte limit")]
    TooLarge {
        /// What was being read.
        what: &'static str,
        /// The cap.
        limit: u64,
    },
    /// The upstream answered in a way a registry does not: a status it has no business
    /// sending, a redirect without a target, a token endpoint's answer without a token.
    #[error("upstream answered unexpectedly: {0}")]
    Protocol(Arc<str>),
    /// Not sent: the upstream is in offline mode, and the object is not cached.
    #[error("the {} is not cached, and upstream {registry} is not asked: it is in offline mode", .object.as_str())]
    Offline {
        /// The upstream's registry.
        registry: String,
        /// What was asked for.
        object: Object,
    },
}

impl UpstreamError {
    /// Whether the upstream is failing in a way that justifies serving a stale tag:
    /// down, slow or rate limiting, not saying no.
    pub fn is_down(&self) -> bool {
        use UpstreamError::*;
        match self {
            RateLimited { .. } | BackedOff { .. } | Busy { .. } => true,
            Failed { .. } | Unreachable { .. } | NoAnswer { .. } => true,
            Stalled { .. } | TooSlow { .. } | Body(_) | Stored(_) | Truncated { .. } => true,
            NotFound(_) | Denied(_) | TooLarge { .. } | Protocol(_) | Offline { .. } => false,
        }
    }

    /// How long a client should wait before asking again, when the upstream said or a
    /// cap decides.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::RateLimited { retry_after }
            | UpstreamError::BackedOff { retry_after } => Some(*retry_after),
            UpstreamError::Busy { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    pub(super) fn protocol(message: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol(message.into().into())
    }
}

/// An error and its causes, `: `-separated, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

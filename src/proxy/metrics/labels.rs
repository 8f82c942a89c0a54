//! The labels' values: low-cardinality by construction (upstream registry, kind,
//! result, code; never a repository, tag or digest).

/// `kind` label of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A manifest request.
    Manifest,
    /// A blob request.
    Blob,
    /// A tags/list request.
    Tags,
    /// A referrers request.
    Referrers,
    /// A token endpoint request.
    Token,
    /// A manifest HEAD that decides who may pull a repository (see [`crate::proxy::access`]).
    Access,
}

impl Kind {
    /// Every kind of upstream request.
    pub const ALL: [Kind; 6] = [
        Kind::Manifest,
        Kind::Blob,
        Kind::Tags,
        Kind::Referrers,
        Kind::Token,
        Kind::Access,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Tags => "tags",
            Kind::Referrers => "referrers",
            Kind::Token => "token",
            Kind::Access => "access",
        }
    }
}

/// How a client request was answered, the `result` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache.
    Hit,
    /// Fetched from upstream for this request.
    Miss,
    /// Served from the cache past its TTL because the upstream failed.
    Stale,
    /// Joined a fetch another request had started.
    Coalesced,
    /// Failed.
    Error,
}

impl CacheResult {
    /// Every result.
    pub const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Coalesced,
        CacheResult::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Error => "error",
        }
    }
}

/// Where the bytes sent to a client came from, the `source` label of
/// `pullthrough_served_bytes_total`. Only [`ByteSource::Upstream`] crossed the upstream
/// link for this client; what did cross it, once per download, is
/// `pullthrough_upstream_received_bytes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteSource {
    /// A finished copy in the cache (a hit, or a stale tag).
    Cache,
    /// A download from the upstream started for this request (or a pass-through).
    Upstream,
    /// A download in flight that another request had started: the upstream sent these
    /// bytes once, for all of them.
    Coalesced,
    /// The replica that owns the blob, asked by this one (replicas sharing a bucket).
    Peer,
    /// The shared bucket, the client sent there by a redirect (the bytes it was sent
    /// for, counted when it is sent).
    Bucket,
}

impl ByteSource {
    /// Every source.
    pub const ALL: [ByteSource; 5] = [
        ByteSource::Cache,
        ByteSource::Upstream,
        ByteSource::Coalesced,
        ByteSource::Peer,
        ByteSource::Bucket,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ByteSource::Cache => "cache",
            ByteSource::Upstream => "upstream",
            ByteSource::Coalesced => "coalesced",
            ByteSource::Peer => "peer",
            ByteSource::Bucket => "bucket",
        }
    }

    /// The source of an answer's bytes: `via_owner` when its download (started for it)
    /// was asked of the replica that owns the blob.
    pub fn of(result: CacheResult, via_owner: bool) -> ByteSource {
        match result {
            CacheResult::Hit | CacheResult::Stale => ByteSource::Cache,
            CacheResult::Coalesced => ByteSource::Coalesced,
            CacheResult::Miss | CacheResult::Error if via_owner => ByteSource::Peer,
            CacheResult::Miss | CacheResult::Error => ByteSource::Upstream,
        }
    }
}

/// How a replica's request to the owner of a blob went, the `result` label of
/// `pullthrough_peer_fetches_total` (see [`crate::proxy::peers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerFetch {
    /// The owner answered with the blob.
    Owner,
    /// The owner could not be asked or did not answer well: fetched here instead.
    Failed,
    /// A process this replica does not know held the store's fetch lease: the blob was
    /// awaited in the bucket and read from there.
    Leased,
}

impl PeerFetch {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerFetch::Owner => "owner",
            PeerFetch::Failed => "failed",
            PeerFetch::Leased => "leased",
        }
    }
}

/// Operations on an object store, the `op` label of `pullthrough_store_requests_total`.
pub const STORE_OPS: [&str; 9] = [
    "head",
    "get",
    "put",
    "delete",
    "list",
    "create_upload",
    "put_part",
    "complete_upload",
    "abort_upload",
];

/// Static label for a status code, so label values never come from an unbounded set.
pub(super) fn status_label(code: u16) -> &'static str {
    const KNOWN: [(u16, &str); 18] = [
        (200, "200"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (303, "303"),
        (304, "304"),
        (307, "307"),
        (308, "308"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (416, "416"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = KNOWN.iter().find(|(c, _)| *c == code) {
        return label;
    }
    match code / 100 {
        0 | 1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

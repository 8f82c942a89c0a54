//! The proxy's Prometheus metrics. Each proxy owns its registry (tests run several in one
//! process). Labels stay low-cardinality ([`labels`]); the families are made by
//! [`families`], the upstreams' pressure ones in [`pressure`].

mod families;
mod labels;
mod pressure;

pub use labels::{ByteSource, CacheResult, Kind, PeerFetch, STORE_OPS};

use families::Families;
use labels::status_label;
use pressure::PressureMetrics;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

/// All proxy metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    requests: IntCounterVec,
    served_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
    /// Blob bytes sent to other replicas that asked this one, the blob's owner.
    pub peer_served_bytes: IntCounter,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    /// Bytes of committed blobs and manifests on disk.
    pub cache_size_bytes: IntGauge,
    /// Number of committed blobs and manifests on disk.
    pub cache_blobs: IntGauge,
    /// Upstream blob downloads running now.
    pub inflight_fetches: IntGauge,
    /// Client requests waiting for an upstream fetch in progress to answer.
    pub fetch_waiters: IntGauge,
    /// Blob bytes sent with `sendfile(2)` from the page cache.
    pub sendfile_bytes: IntCounter,
    /// The configured size limit (0: none).
    pub cache_limit_bytes: IntGauge,
    /// Objects evicted to stay under the limit.
    pub cache_evictions: IntCounter,
    /// Bytes in the shared bucket, as the evicting replica last counted them.
    pub store_bucket_bytes: IntGauge,
    /// 1 on the replica that evicts from the shared bucket.
    pub store_evictor: IntGauge,
    /// 1 when the shared bucket enforces create-only writes (cross-cluster fetch leases).
    pub store_conditional_writes: IntGauge,
    /// 1 while the cache's disk is full and blobs are streamed through uncached.
    pub cache_disk_full: IntGauge,
    /// Prefetch images by state (pending, done, failed).
    pub prefetch_images: IntGaugeVec,
    /// Bytes pulled into the cache by prefetching.
    pub prefetch_bytes: IntCounter,
    /// Time from a prefetched image's arrival to its first pull by a client.
    pub prefetch_lead: prometheus::Histogram,
    peer_fetches: IntCounterVec,
    link_proofs: IntCounterVec,
    read_checks: IntCounterVec,
    access_decisions: IntCounterVec,
    access_duration: HistogramVec,
    access_challenges: IntCounterVec,
    store_requests: IntCounterVec,
    store_duration: HistogramVec,
    store_bytes: IntCounterVec,
    pressure: PressureMetrics,
}

impl Metrics {
    /// Creates and registers every metric. One definition per family, all in one place,
    /// so that every name and help text the dashboards and docs/metrics.md rely on is
    /// found together: a list, longer than a screen by nature.
    pub fn new() -> Metrics {
        let mut f = Families::default();
        let requests = f.counter_vec(
            "pullthrough_requests_total",
            "Client manifest and blob requests by how they were answered.",
            &["upstream", "kind", "result"],
        );
        let served_bytes = f.counter_vec(
            "pullthrough_served_bytes_total",
            "Bytes of manifests and blobs sent to clients (not to other replicas), by where they came from: cache, upstream (a download started for the request), coalesced (a download in flight another request started), peer (the replica that owns the blob), bucket (a redirect to the shared bucket).",
            &["upstream", "source"],
        );
        let received_bytes = f.counter_vec(
            "pullthrough_upstream_received_bytes_total",
            "Bytes of manifest and blob bodies received from upstream registries: what crossed the upstream link, once per download however many clients shared it.",
            &["upstream", "kind"],
        );
        let peer_served_bytes = f.counter(
            "pullthrough_peer_served_bytes_total",
            "Blob bytes sent to other replicas sharing the bucket that asked this one, the blob's owner (not counted in pullthrough_served_bytes_total: the asking replica counts them for its clients).",
        );
        let upstream_requests = f.counter_vec(
            "pullthrough_upstream_requests_total",
            "Requests sent to upstream registries, by HTTP status (or \"error\").",
            &["upstream", "kind", "code"],
        );
        let upstream_duration = f.histogram_vec(
            "pullthrough_upstream_request_duration_seconds",
            "Time until an upstream registry answered with headers.",
            vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
            &["upstream", "kind"],
        );
        let cache_size_bytes = f.gauge(
            "pullthrough_cache_size_bytes",
            "Bytes of blobs and manifests in the cache.",
        );
        let cache_blobs = f.gauge(
            "pullthrough_cache_blobs",
            "Number of blobs and manifests in the cache.",
        );
        let inflight_fetches = f.gauge(
            "pullthrough_inflight_fetches",
            "Upstream blob downloads in progress.",
        );
        let fetch_waiters = f.gauge("pullthrough_fetch_waiters", "Client requests waiting for an upstream fetch in progress (manifest, blob, blob HEAD) to answer; more than the fetches when clients share them.");
        let sendfile_bytes = f.counter("pullthrough_sendfile_bytes_total", "Blob bytes sent to HTTP/1 clients with sendfile(2) from the page cache, without a copy through user space (part of pullthrough_served_bytes_total).");
        let cache_limit_bytes = f.gauge(
            "pullthrough_cache_limit_bytes",
            "Configured cache size limit in bytes (0 when unlimited).",
        );
        let cache_evictions = f.counter(
            "pullthrough_cache_evictions_total",
            "Blobs and manifests evicted to stay under the size limit.",
        );
        let cache_disk_full = f.gauge(
            "pullthrough_cache_disk_full",
            "1 while the cache disk is full and blobs are streamed through without caching.",
        );
        let prefetch_images = f.gauge_vec(
            "pullthrough_prefetch_images",
            "Images listed for prefetching, by state (pending, done, failed).",
            &["state"],
        );
        let prefetch_bytes = f.counter(
            "pullthrough_prefetch_bytes_total",
            "Bytes of manifests and blobs pulled into the cache by prefetching.",
        );
        for state in ["pending", "done", "failed"] {
            prefetch_images.with_label_values(&[state]);
        }
        let peer_fetches = f.counter_vec("pullthrough_peer_fetches_total", "Missing blobs asked of the replica that owns them, by result (owner: it served them; failed: fetched here instead).", &["result"]);
        for r in [PeerFetch::Owner, PeerFetch::Failed, PeerFetch::Leased] {
            peer_fetches.with_label_values(&[r.as_str()]);
        }
        let link_proofs = f.counter_vec("pullthrough_link_proofs_total", "Digests asked of the upstream under a repository they are not linked to (see docs/proxy.md), by result (linked: the repository holds them; refused: it does not, or the upstream did not answer).", &["result"]);
        for r in ["linked", "refused"] {
            link_proofs.with_label_values(&[r]);
        }
        let read_checks = f.counter_vec("pullthrough_cache_read_checks_total", "Cached blobs read back whole and checked against their digest (every read of a shared bucket's, and the first of what a disk held at start), by result (match; mismatch: the object was dropped and is fetched again).", &["result"]);
        for r in ["match", "mismatch"] {
            read_checks.with_label_values(&[r]);
        }
        let access_decisions = f.counter_vec("pullthrough_access_decisions_total", "Who may pull a repository of an upstream in upstreamAuth mode, decided with the upstream (see docs/proxy.md), by result (allowed, denied: a client's credentials checked; public, private: whether the upstream serves the repository anonymously; error: the upstream did not answer).", &["upstream", "result"]);
        let access_duration = f.histogram_vec("pullthrough_access_decision_duration_seconds", "Time the upstream took to decide one access question (a credentials check or a public probe).", vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ], &["upstream"]);
        let access_challenges = f.counter_vec("pullthrough_access_challenges_total", "Requests for a private repository of an upstreamAuth upstream answered 401 with a challenge (no token, or one that does not cover the repository).", &["upstream"]);
        let store_requests = f.counter_vec("pullthrough_store_requests_total", "Requests to the object store (a shared bucket), by operation and result (ok, not_found, exists: a create-only write found the object, error, skipped: not sent, the bucket failed a moment before).", &["op", "result"]);
        let store_duration = f.histogram_vec(
            "pullthrough_store_request_duration_seconds",
            "Time the object store took to answer, by operation.",
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ],
            &["op"],
        );
        let store_bytes = f.counter_vec(
            "pullthrough_store_bytes_total",
            "Bytes read from and written to the object store.",
            &["direction"],
        );
        for d in ["read", "written"] {
            store_bytes.with_label_values(&[d]);
        }
        for op in STORE_OPS {
            store_requests.with_label_values(&[op, "ok"]);
            store_duration.with_label_values(&[op]);
        }
        let store_bucket_bytes = f.gauge("pullthrough_store_bucket_bytes", "Bytes of cached objects in the shared bucket, as the evicting replica last counted them (0 on the others).");
        let store_evictor = f.gauge(
            "pullthrough_store_evictor",
            "1 on the replica that keeps the shared bucket under maxCacheBytes, 0 on the others.",
        );
        let store_conditional_writes = f.gauge("pullthrough_store_conditional_writes", "1 when the shared bucket enforces create-only writes (If-None-Match: *), so that replicas that do not know each other fetch a blob once; 0 when it does not or there is no bucket.");
        let prefetch_lead = f.histogram("pullthrough_prefetch_lead_seconds", "Time from an image prefetched on request (POST /admin/prefetch) being in the cache to a client's first pull of it.", vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
                86400.0,
            ]);
        let pressure = PressureMetrics::new(&mut f);
        let (registry, names) = f.into_parts();
        Metrics {
            pressure,
            prefetch_lead,
            registry,
            names,
            requests,
            served_bytes,
            received_bytes,
            peer_served_bytes,
            upstream_requests,
            upstream_duration,
            cache_size_bytes,
            cache_blobs,
            inflight_fetches,
            fetch_waiters,
            sendfile_bytes,
            cache_limit_bytes,
            cache_evictions,
            store_bucket_bytes,
            store_evictor,
            store_conditional_writes,
            cache_disk_full,
            prefetch_images,
            prefetch_bytes,
            peer_fetches,
            link_proofs,
            read_checks,
            access_decisions,
            access_duration,
            access_challenges,
            store_requests,
            store_duration,
            store_bytes,
        }
    }
}

impl Metrics {
    /// Counts one request to the object store and its latency.
    pub fn store_request(&self, op: &'static str, result: &'static str, seconds: f64) {
        self.store_requests.with_label_values(&[op, result]).inc();
        self.store_duration
            .with_label_values(&[op])
            .observe(seconds);
    }

    /// The counter of bytes `read` from (or else written to) the object store.
    pub fn store_bytes(&self, read: bool) -> IntCounter {
        let direction = if read { "read" } else { "written" };
        self.store_bytes.with_label_values(&[direction])
    }

    /// The counter of link proofs with `result` (`linked` or `refused`).
    pub fn link_proofs(&self, result: &str) -> IntCounter {
        self.link_proofs.with_label_values(&[result])
    }

    /// Counts a cached blob read back and checked: whether it `matched` its digest.
    pub fn read_check(&self, matched: bool) {
        let result = if matched { "match" } else { "mismatch" };
        self.read_checks.with_label_values(&[result]).inc();
    }

    /// Counts one access decision the upstream made for `upstream`, and how long it took.
    pub fn access_decision(&self, upstream: &str, result: &str, seconds: f64) {
        self.access_decisions
            .with_label_values(&[upstream, result])
            .inc();
        self.access_duration
            .with_label_values(&[upstream])
            .observe(seconds);
    }

    /// Creates the access series of an upstream in upstreamAuth mode at zero.
    pub fn init_access(&self, upstream: &str) {
        for result in ["allowed", "denied", "public", "private", "error"] {
            self.access_decisions.with_label_values(&[upstream, result]);
        }
        self.access_duration.with_label_values(&[upstream]);
        self.access_challenges.with_label_values(&[upstream]);
    }

    /// Counts one 401 challenge for a private repository of `upstream`.
    pub fn access_challenge(&self, upstream: &str) {
        self.access_challenges.with_label_values(&[upstream]).inc();
    }

    /// Creates the series of an upstream's caps at zero.
    pub fn init_pressure(&self, upstream: &str) {
        let p = &self.pressure;
        for g in [
            &p.ratelimit_limit,
            &p.ratelimit_remaining,
            &p.ratelimit_window,
        ] {
            g.with_label_values(&[upstream]);
        }
        p.backoff_until.with_label_values(&[upstream]);
        for status in ["429", "503"] {
            p.backoffs.with_label_values(&[upstream, status]);
        }
        for reason in ["backoff", "concurrency", "rate"] {
            p.refused.with_label_values(&[upstream, reason]);
        }
        p.inflight.with_label_values(&[upstream]);
        p.queued.with_label_values(&[upstream]);
    }

    /// Records what an answer of `upstream` said of its rate limit: requests per window,
    /// requests left, the window in seconds (each when it said).
    pub fn upstream_ratelimit(
        &self,
        upstream: &str,
        (limit, remaining, window): (Option<u64>, Option<u64>, Option<u64>),
    ) {
        let p = &self.pressure;
        let set = |g: &IntGaugeVec, v: Option<u64>| {
            if let Some(v) = v {
                g.with_label_values(&[upstream])
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        };
        set(&p.ratelimit_limit, limit);
        set(&p.ratelimit_remaining, remaining);
        set(&p.ratelimit_window, window);
    }

    /// Records a back-off of `upstream` begun by an answer with `status`, until `until`.
    pub fn upstream_backoff(&self, upstream: &str, status: u16, until: std::time::SystemTime) {
        let p = &self.pressure;
        p.backoffs
            .with_label_values(&[upstream, &status.to_string()])
            .inc();
        let unix = until
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        p.backoff_until.with_label_values(&[upstream]).set(unix);
    }

    /// Counts an upstream request not sent, for `reason`.
    pub fn upstream_refused(&self, upstream: &str, reason: &str) {
        self.pressure
            .refused
            .with_label_values(&[upstream, reason])
            .inc();
    }

    /// Shows `mode` as the one `upstream` is in.
    pub fn upstream_mode(&self, upstream: &str, mode: crate::api::UpstreamMode) {
        for m in crate::api::UpstreamMode::ALL {
            self.pressure
                .mode
                .with_label_values(&[upstream, m.as_str()])
                .set(i64::from(m == mode));
        }
    }

    /// The gauge of whether `url` of `upstream` answers.
    pub fn upstream_url_up(&self, upstream: &str, url: &str) -> IntGauge {
        self.pressure.url_up.with_label_values(&[upstream, url])
    }

    /// The gauge of `upstream`'s requests out now.
    pub fn upstream_inflight(&self, upstream: &str) -> IntGauge {
        self.pressure.inflight.with_label_values(&[upstream])
    }

    /// The gauge of `upstream`'s requests waiting under a cap now.
    pub fn upstream_queued(&self, upstream: &str) -> IntGauge {
        self.pressure.queued.with_label_values(&[upstream])
    }

    /// Counts one request to the owner of a blob.
    pub fn peer_fetch(&self, result: PeerFetch) {
        self.peer_fetches
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// Creates the series of one upstream at zero, so that dashboards and alerts see
    /// every metric from the start, not only after its first event. Upstream requests
    /// start with the `200` series of each kind (other codes appear as they happen).
    pub fn init_upstream(&self, upstream: &str) {
        for kind in [Kind::Manifest, Kind::Blob] {
            for result in CacheResult::ALL {
                self.requests
                    .with_label_values(&[upstream, kind.as_str(), result.as_str()]);
            }
        }
        for source in ByteSource::ALL {
            self.served_bytes
                .with_label_values(&[upstream, source.as_str()]);
        }
        for kind in [Kind::Manifest, Kind::Blob] {
            self.received_bytes
                .with_label_values(&[upstream, kind.as_str()]);
        }
        for kind in Kind::ALL {
            self.upstream_requests
                .with_label_values(&[upstream, kind.as_str(), "200"]);
            self.upstream_duration
                .with_label_values(&[upstream, kind.as_str()]);
        }
    }

    /// Counts one client request.
    pub fn request(&self, upstream: &str, kind: Kind, result: CacheResult) {
        self.requests
            .with_label_values(&[upstream, kind.as_str(), result.as_str()])
            .inc();
    }

    /// The counter of bytes sent to clients of `upstream` from `source`. Looked up once
    /// per response, counted per chunk.
    pub fn served_bytes(&self, upstream: &str, source: ByteSource) -> IntCounter {
        self.served_bytes
            .with_label_values(&[upstream, source.as_str()])
    }

    /// The counter of `kind` body bytes received from `upstream`. Looked up once per
    /// download, counted per chunk.
    pub fn received_bytes(&self, upstream: &str, kind: Kind) -> IntCounter {
        self.received_bytes
            .with_label_values(&[upstream, kind.as_str()])
    }

    /// Counts an upstream request and its latency. `code` is the HTTP status, or `None`
    /// when no answer came.
    pub fn upstream(&self, upstream: &str, kind: Kind, code: Option<u16>, seconds: f64) {
        let code = code.map(status_label).unwrap_or("error");
        self.upstream_requests
            .with_label_values(&[upstream, kind.as_str(), code])
            .inc();
        self.upstream_duration
            .with_label_values(&[upstream, kind.as_str()])
            .observe(seconds);
    }

    /// Names of every series this registry can export.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        crate::server::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_documented_names() {
        let m = Metrics::new();
        m.request("docker.io", Kind::Blob, CacheResult::Hit);
        m.served_bytes("docker.io", ByteSource::Cache).inc_by(10);
        m.upstream("docker.io", Kind::Manifest, Some(200), 0.1);
        let text = m.render();
        for name in [
            "pullthrough_requests_total",
            "pullthrough_served_bytes_total",
            "pullthrough_upstream_requests_total",
            "pullthrough_upstream_request_duration_seconds_bucket",
            "pullthrough_cache_size_bytes",
            "pullthrough_cache_blobs",
            "pullthrough_inflight_fetches",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains(
            r#"pullthrough_requests_total{kind="blob",result="hit",upstream="docker.io"} 1"#
        ));
    }

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(404), "404");
    }
}

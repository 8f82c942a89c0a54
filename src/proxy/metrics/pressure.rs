//! What the proxy knows of each upstream's limits, and what its own caps held back
//! (see `upstream::pressure`).

use super::families::Families;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec};

/// What the proxy knows of each upstream's limits, and what its own caps held back
/// (see `upstream::pressure`).
#[derive(Clone)]
pub(super) struct PressureMetrics {
    pub(super) ratelimit_limit: IntGaugeVec,
    pub(super) ratelimit_remaining: IntGaugeVec,
    pub(super) ratelimit_window: IntGaugeVec,
    pub(super) backoff_until: GaugeVec,
    pub(super) backoffs: IntCounterVec,
    pub(super) refused: IntCounterVec,
    pub(super) inflight: IntGaugeVec,
    pub(super) queued: IntGaugeVec,
    pub(super) url_up: IntGaugeVec,
    pub(super) mode: IntGaugeVec,
}

impl PressureMetrics {
    pub(super) fn new(f: &mut Families) -> PressureMetrics {
        PressureMetrics {
            ratelimit_limit: f.gauge_vec("pullthrough_upstream_ratelimit_limit", "The upstream's rate limit, requests per window, as its last answer that said (Docker Hub's ratelimit-limit; the RateLimit-* forms of others); 0 until one does.", &["upstream"]),
            ratelimit_remaining: f.gauge_vec("pullthrough_upstream_ratelimit_remaining", "Requests left in the upstream's rate-limit window, as its last answer that said (Docker Hub's ratelimit-remaining); 0 until one does.", &["upstream"]),
            ratelimit_window: f.gauge_vec("pullthrough_upstream_ratelimit_window_seconds", "The upstream's rate-limit window, as its last answer that said (w= of Docker Hub's headers).", &["upstream"]),
            backoff_until: f.float_gauge_vec("pullthrough_upstream_backoff_until_timestamp_seconds", "Unix time until which nothing is sent to the upstream, after it answered 429 (or 503 with Retry-After); 0 before any.", &["upstream"]),
            backoffs: f.counter_vec("pullthrough_upstream_backoffs_total", "Answers of the upstream that began a back-off, by status (429, 503).", &["upstream", "status"]),
            refused: f.counter_vec("pullthrough_upstream_refused_total", "Upstream requests not sent, by reason: backoff (the upstream asked to wait), concurrency (waited queueTimeout for maxConcurrentRequests), rate (manifestGetsPerSecond).", &["upstream", "reason"]),
            inflight: f.gauge_vec("pullthrough_upstream_inflight_requests", "Requests out to the upstream now (what maxConcurrentRequests caps).", &["upstream"]),
            queued: f.gauge_vec("pullthrough_upstream_queued_requests", "Upstream requests waiting now for room under a cap.", &["upstream"]),
            mode: f.gauge_vec("pullthrough_upstream_mode", "1 for the mode the upstream is in (online, localFirst, offline), 0 for the others.", &["upstream", "mode"]),
            url_up: f.gauge_vec("pullthrough_upstream_url_up", "1 while the upstream URL answers, 0 for 30 s after it could not be reached or answered 5xx (its other URLs are tried first meanwhile).", &["upstream", "url"]),
        }
    }
}

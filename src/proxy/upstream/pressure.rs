//! Keeping within what an upstream allows (docs/operations.md, "Keeping under the
//! upstream's limits"): the rate-limit headers it sends are exported; after a 429 (or a
//! 503 with `Retry-After`) nothing is sent to it until the time it asked for has passed;
//! at most `maxConcurrentRequests` requests are out at once and at most
//! `manifestGetsPerSecond` manifest GETs start per second. A request over a cap waits up
//! to `queueTimeout`, then fails; one that may not wait ([`Patience::Now`], the
//! revalidation of a tag whose cached copy can be served stale meanwhile) fails at once.
//! Every request of an upstream, the proxy's and the access checks alike, goes through
//! its one `Pressure`.
//!
//! The room under `maxConcurrentRequests` is handed out fairly: when it is short, the
//! requests waiting for it get it one [`Asker`] (a client address, or the proxy itself)
//! at a time, in turn, so that one client's many requests cannot keep another's waiting
//! behind them.

use super::error::UpstreamError;
use crate::api::UpstreamLimits;
use crate::proxy::metrics::Metrics;
use hyper::StatusCode;
use hyper::header::HeaderMap;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// On whose behalf a request is made: what the room under an upstream's cap is shared
/// fairly between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Asker {
    /// A client, by its address.
    Client(IpAddr),
    /// The proxy itself (prefetching, eviction's bookkeeping).
    Proxy,
}

tokio::task_local! {
    static ASKER: Asker;
}

impl Asker {
    /// Who the task running now asks for: the client whose request it serves (see
    /// [`Asker::scope`]), else the proxy itself.
    pub fn current() -> Asker {
        ASKER.try_with(|a| *a).unwrap_or(Asker::Proxy)
    }

    /// Runs `f` on behalf of this asker: what it asks of the upstreams is its share.
    pub fn scope<F: Future>(self, f: F) -> impl Future<Output = F::Output> {
        ASKER.scope(self, f)
    }
}

/// Whether a request may wait for room under an upstream's caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// Up to `queueTimeout`.
    Queue,
    /// Not at all: it fails at once when there is no room now.
    Now,
}

/// What an upstream said of its rate limit, from the headers of one answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub limit: Option<u64>,
    /// Requests left in the window.
    pub remaining: Option<u64>,
    /// The window, in seconds.
    pub window: Option<u64>,
}

/// The first integer of a header value (`100;w=21600` -> 100), and its `w=` window.
fn count_and_window(value: &str) -> (Option<u64>, Option<u64>) {
    let mut parts = value.split(';');
    let count = parts.next().and_then(|c| c.trim().parse().ok());
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse().ok());
    (count, window)
}

/// The value of `key` in a structured header's parameters (`limit=100, remaining=5` or
/// `"default";r=5;t=30`).
fn param(value: &str, key: &str) -> Option<u64> {
    value
        .split([',', ';'])
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .and_then(|(_, v)| v.trim().trim_matches('"').parse().ok())
}

impl RateLimit {
    /// Reads Docker Hub's `ratelimit-limit` / `ratelimit-remaining` (`N;w=SECONDS`), the
    /// `x-ratelimit-*` forms, and the IETF draft's `RateLimit` / `RateLimit-Policy`
    /// fields. `None` when the answer says nothing of a limit.
    pub fn from_headers(headers: &HeaderMap) -> Option<RateLimit> {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut rl = RateLimit::default();
        for prefix in ["ratelimit", "x-ratelimit"] {
            if let Some(v) = get(&format!("{prefix}-limit")) {
                let (count, window) = count_and_window(v);
                rl.limit = rl.limit.or(count);
                rl.window = rl.window.or(window);
            }
            if let Some(v) = get(&format!("{prefix}-remaining")) {
                let (count, window) = count_and_window(v);
                rl.remaining = rl.remaining.or(count);
                rl.window = rl.window.or(window);
            }
        }
        if let Some(v) = get("ratelimit") {
            rl.limit = rl.limit.or(param(v, "limit"));
            rl.remaining = rl.remaining.or(param(v, "remaining")).or(param(v, "r"));
        }
        if let Some(v) = get("ratelimit-policy") {
            rl.limit = rl.limit.or(param(v, "q"));
            rl.window = rl.window.or(param(v, "w"));
        }
        (rl != RateLimit::default()).then_some(rl)
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A token bucket of manifest GETs: `rate` per second, as many in a burst.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token at `now`: how long to wait before it may be used, or `None` (and
    /// nothing taken) when that is longer than `patience`.
    fn reserve(&mut self, rate: f64, now: Instant, patience: Duration) -> Option<Duration> {
        let burst = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        let wait = if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / rate)
        };
        if wait > patience {
            return None;
        }
        self.tokens -= 1.0;
        Some(wait)
    }
}

/// Room for `maxConcurrentRequests` requests, handed out fairly between askers.
struct Fair {
    state: Mutex<FairState>,
}

#[derive(Default)]
struct FairState {
    /// Room nobody holds. Whenever there is some, nobody waits.
    free: usize,
    /// The askers with requests waiting, in turn.
    turns: VecDeque<Asker>,
    /// Each asker's waiting requests, first come first.
    waiting: HashMap<Asker, VecDeque<oneshot::Sender<()>>>,
}

impl Fair {
    fn new(room: usize) -> Arc<Fair> {
        Arc::new(Fair {
            state: Mutex::new(FairState {
                free: room,
                ..FairState::default()
            }),
        })
    }

    /// Takes room now if there is some.
    fn try_take(&self) -> bool {
        let mut st = self.state.lock().expect("fair lock");
        if st.free > 0 {
            st.free -= 1;
            return true;
        }
        false
    }

    /// Takes room for `asker`, waiting for its turn until `deadline`; whether it got it.
    async fn take(&self, asker: Asker, deadline: Instant) -> bool {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut st = self.state.lock().expect("fair lock");
            if st.free > 0 {
                st.free -= 1;
                return true;
            }
            let queue = st.waiting.entry(asker).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                st.turns.push_back(asker);
            }
        }
        if let Ok(Ok(())) = tokio::time::timeout_at(deadline, &mut rx).await {
            return true;
        }
        // Given room just as the wait ended: it goes to the next in turn.
        rx.close();
        if rx.try_recv().is_ok() {
            self.give_back();
        }
        false
    }

    /// Gives room back: to the next asker in turn that still waits, else to the free.
    fn give_back(&self) {
        let mut st = self.state.lock().expect("fair lock");
        while let Some(asker) = st.turns.pop_front() {
            let queue = st.waiting.get_mut(&asker).expect("an asker in turn waits");
            let next = queue.pop_front();
            if queue.is_empty() {
                st.waiting.remove(&asker);
            } else {
                st.turns.push_back(asker);
            }
            // A request that stopped waiting cannot take it: the next one is asked.
            if next.is_some_and(|tx| tx.send(()).is_ok()) {
                return;
            }
        }
        st.free += 1;
    }
}

/// One upstream's caps and back-off.
pub(super) struct Pressure {
    upstream: String,
    limits: UpstreamLimits,
    metrics: Metrics,
    /// No request is sent before this.
    backoff: Mutex<Option<Instant>>,
    room: Arc<Fair>,
    bucket: Mutex<Bucket>,
}

/// Room for one request; given back when dropped.
pub(super) struct Slot {
    room: Arc<Fair>,
    inflight: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inflight.dec();
        self.room.give_back();
    }
}

impl Pressure {
    pub(super) fn new(upstream: &str, limits: UpstreamLimits, metrics: Metrics) -> Pressure {
        let slots = limits.max_concurrent_requests.unwrap_or(64).max(1) as usize;
        metrics.init_pressure(upstream);
        Pressure {
            upstream: upstream.to_string(),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(limits.manifest_gets_per_second.unwrap_or(0)).max(1.0),
                at: Instant::now(),
            }),
            limits,
            metrics,
            backoff: Mutex::new(None),
            room: Fair::new(slots),
        }
    }

    /// How much longer the upstream is to be left alone.
    fn backing_off(&self) -> Option<Duration> {
        let until = (*self.backoff.lock().expect("backoff lock"))?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    fn refuse(&self, reason: &str, e: UpstreamError) -> UpstreamError {
        self.metrics.upstream_refused(&self.upstream, reason);
        e
    }

    /// Waits for room to send one request (`manifest_get`: a manifest GET, which the
    /// rate cap counts) for the task's [`Asker`]: none while the upstream is backed off,
    /// and none for longer than `queueTimeout` over a cap, or at all with
    /// [`Patience::Now`].
    pub(super) async fn admit(
        &self,
        manifest_get: bool,
        patience: Patience,
    ) -> Result<Slot, UpstreamError> {
        if let Some(left) = self.backing_off() {
            return Err(self.refuse("backoff", UpstreamError::BackedOff { retry_after: left }));
        }
        let started = Instant::now();
        let wait = match patience {
            Patience::Queue => self.limits.queue_timeout,
            Patience::Now => Duration::ZERO,
        };
        let deadline = started + wait;
        let rate = self.limits.manifest_gets_per_second.unwrap_or(0);
        if manifest_get && rate > 0 {
            let delay =
                self.bucket
                    .lock()
                    .expect("bucket lock")
                    .reserve(f64::from(rate), started, wait);
            match delay {
                None => {
                    return Err(self.refuse(
                        "rate",
                        UpstreamError::Busy {
                            cap: "manifestGetsPerSecond",
                        },
                    ));
                }
                Some(w) if !w.is_zero() => {
                    let queued = self.metrics.upstream_queued(&self.upstream);
                    queued.inc();
                    tokio::time::sleep(w).await;
                    queued.dec();
                }
                Some(_) => {}
            }
        }
        if !self.room.try_take() {
            let got = match patience {
                Patience::Now => false,
                Patience::Queue => {
                    let queued = self.metrics.upstream_queued(&self.upstream);
                    queued.inc();
                    let got = self.room.take(Asker::current(), deadline).await;
                    queued.dec();
                    got
                }
            };
            if !got {
                return Err(self.refuse(
                    "concurrency",
                    UpstreamError::Busy {
                        cap: "maxConcurrentRequests",
                    },
                ));
            }
        }
        let inflight = self.metrics.upstream_inflight(&self.upstream);
        inflight.inc();
        let slot = Slot {
            room: self.room.clone(),
            inflight,
        };
        // The upstream may have asked to wait while this request queued.
        if let Some(left) = self.backing_off() {
            return Err(self.refuse("backoff", UpstreamError::BackedOff { retry_after: left }));
        }
        Ok(slot)
    }

    /// Takes in what an answer says of the upstream's limits: its rate-limit headers, and
    /// for a 429 (or a 503 with `Retry-After`), a back-off. Returns the back-off begun.
    pub(super) fn observe(&self, status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
        if let Some(rl) = RateLimit::from_headers(headers) {
            self.metrics
                .upstream_ratelimit(&self.upstream, (rl.limit, rl.remaining, rl.window));
        }
        let asked = retry_after(headers);
        let wait = match status {
            StatusCode::TOO_MANY_REQUESTS => asked.unwrap_or(self.limits.backoff),
            StatusCode::SERVICE_UNAVAILABLE => asked?,
            _ => return None,
        }
        .min(self.limits.max_backoff);
        let until = Instant::now() + wait;
        {
            let mut b = self.backoff.lock().expect("backoff lock");
            *b = Some(b.map_or(until, |u| u.max(until)));
        }
        self.metrics
            .upstream_backoff(&self.upstream, status.as_u16(), SystemTime::now() + wait);
        tracing::warn!(
            upstream = %self.upstream,
            status = status.as_u16(),
            seconds = wait.as_secs(),
            "the upstream asked to wait; sending it nothing until then"
        );
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_docker_hub_and_draft_rate_limit_headers() {
        let hub = headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "76;w=21600"),
            ("docker-ratelimit-source", "203.0.113.7"),
        ]);
        assert_eq!(
            RateLimit::from_headers(&hub),
            Some(RateLimit {
                limit: Some(100),
                remaining: Some(76),
                window: Some(21600)
            })
        );
        let x = headers(&[
            ("x-ratelimit-limit", "5000"),
            ("x-ratelimit-remaining", "4999"),
        ]);
        assert_eq!(RateLimit::from_headers(&x).unwrap().remaining, Some(4999));
        let draft = headers(&[("ratelimit", "limit=10, remaining=3, reset=7")]);
        assert_eq!(
            RateLimit::from_headers(&draft),
            Some(RateLimit {
                limit: Some(10),
                remaining: Some(3),
                window: None
            })
        );
        let draft9 = headers(&[
            ("ratelimit", "\"default\";r=50;t=30"),
            ("ratelimit-policy", "\"default\";q=100;w=60"),
        ]);
        assert_eq!(
            RateLimit::from_headers(&draft9),
            Some(RateLimit {
                limit: Some(100),
                remaining: Some(50),
                window: Some(60)
            })
        );
        assert_eq!(
            RateLimit::from_headers(&headers(&[("ratelimit-limit", "many")])),
            None
        );
        assert_eq!(RateLimit::from_headers(&HeaderMap::new()), None);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "30")])),
            Some(Duration::from_secs(30))
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&headers(&[("retry-after", &soon)])).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        let past = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            retry_after(&headers(&[("retry-after", past)])),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn the_bucket_spends_its_burst_then_spaces_requests() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 2.0,
            at: t0,
        };
        let patience = Duration::from_secs(1);
        assert_eq!(b.reserve(2.0, t0, patience), Some(Duration::ZERO));
        assert_eq!(b.reserve(2.0, t0, patience), Some(Duration::ZERO));
        // Empty: the next token is half a second away, the one after a second.
        assert_eq!(
            b.reserve(2.0, t0, patience),
            Some(Duration::from_millis(500))
        );
        assert_eq!(b.reserve(2.0, t0, patience), Some(Duration::from_secs(1)));
        // Further than patience: refused, nothing taken.
        assert_eq!(b.reserve(2.0, t0, patience), None);
        // A second later two tokens came back: the two reserved ones are paid for.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            b.reserve(2.0, t1, patience),
            Some(Duration::from_millis(500))
        );
        // Never more than the burst, however long it was quiet.
        let later = t0 + Duration::from_secs(3600);
        let mut quiet = Bucket {
            tokens: 0.0,
            at: t0,
        };
        for _ in 0..2 {
            assert_eq!(quiet.reserve(2.0, later, patience), Some(Duration::ZERO));
        }
        assert_eq!(
            quiet.reserve(2.0, later, patience),
            Some(Duration::from_millis(500))
        );
    }

    /// How many requests wait in `fair` now.
    fn waiting(fair: &Fair) -> usize {
        let st = fair.state.lock().unwrap();
        st.waiting.values().map(VecDeque::len).sum()
    }

    #[tokio::test(start_paused = true)]
    async fn room_goes_to_the_askers_in_turn() {
        let fair = Fair::new(1);
        assert!(fair.try_take());
        let far = Instant::now() + Duration::from_secs(60);
        let a = Asker::Client("10.0.0.1".parse().unwrap());
        let b = Asker::Client("10.0.0.2".parse().unwrap());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // a asks three times, then b once.
        for (n, who) in [a, a, a, b].into_iter().enumerate() {
            let (room, order) = (fair.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                assert!(room.take(who, far).await);
                order.lock().unwrap().push(n);
                room.give_back();
            }));
            while waiting(&fair) <= n {
                tokio::task::yield_now().await;
            }
        }
        fair.give_back();
        for t in tasks {
            t.await.unwrap();
        }
        // b's one request is served second, not behind all of a's.
        assert_eq!(*order.lock().unwrap(), [0, 3, 1, 2]);
        assert!(fair.try_take(), "the room came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_stops_waiting_loses_no_room() {
        let fair = Fair::new(1);
        assert!(fair.try_take());
        let who = Asker::Proxy;
        let soon = Instant::now() + Duration::from_secs(1);
        assert!(!fair.take(who, soon).await, "waited past its deadline");
        fair.give_back();
        assert!(fair.try_take(), "the room went to a request that left");
        assert!(!fair.try_take());
    }

    #[tokio::test(start_paused = true)]
    async fn a_back_off_ends_when_the_upstream_said() {
        let limits = UpstreamLimits {
            manifest_gets_per_second: Some(2),
            ..UpstreamLimits::for_registry("registry.test")
        };
        let p = Pressure::new("registry.test", limits, Metrics::new());
        let secs = Duration::from_secs;
        let h = headers(&[("retry-after", "30")]);
        assert_eq!(p.observe(StatusCode::TOO_MANY_REQUESTS, &h), Some(secs(30)));
        let left = |r: Result<Slot, UpstreamError>| match r {
            Err(UpstreamError::BackedOff { retry_after }) => Some(retry_after),
            _ => None,
        };
        assert_eq!(left(p.admit(false, Patience::Queue).await), Some(secs(30)));
        tokio::time::advance(secs(29)).await;
        assert_eq!(left(p.admit(true, Patience::Queue).await), Some(secs(1)));
        tokio::time::advance(secs(1)).await;
        assert!(p.admit(false, Patience::Queue).await.is_ok());
        // Without Retry-After: a 429 backs off `backoff`, a 503 not at all; no wait is
        // longer than `maxBackoff`.
        assert_eq!(
            p.observe(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()),
            None
        );
        assert_eq!(
            p.observe(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new()),
            Some(secs(30))
        );
        let long = headers(&[("retry-after", "86400")]);
        assert_eq!(
            p.observe(StatusCode::SERVICE_UNAVAILABLE, &long),
            Some(secs(600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn manifest_gets_are_spaced_by_the_rate_cap() {
        let limits = UpstreamLimits {
            manifest_gets_per_second: Some(2),
            queue_timeout: Duration::from_secs(1),
            ..UpstreamLimits::for_registry("registry.test")
        };
        let p = Pressure::new("registry.test", limits, Metrics::new());
        let t0 = Instant::now();
        let mut slots = Vec::new();
        for _ in 0..2 {
            slots.push(p.admit(true, Patience::Queue).await.unwrap());
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst");
        slots.push(p.admit(true, Patience::Queue).await.unwrap());
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        // HEADs and blobs are not counted.
        slots.push(p.admit(false, Patience::Queue).await.unwrap());
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        // Three more at once: the third would wait longer than queueTimeout.
        let t1 = Instant::now();
        let (a, b, c) = tokio::join!(
            p.admit(true, Patience::Queue),
            p.admit(true, Patience::Queue),
            p.admit(true, Patience::Queue)
        );
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(
            c,
            Err(UpstreamError::Busy {
                cap: "manifestGetsPerSecond"
            })
        ));
        assert_eq!(t1.elapsed(), Duration::from_secs(1));
    }
}

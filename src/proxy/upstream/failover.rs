//! An upstream's base URLs (`urls`: a regional mirror first, the origin last), tried in
//! order. A URL that cannot be reached, does not answer in time or answers 5xx is marked
//! down for [`RECHECK_AFTER`]: while it is, the others are tried first (and it is still
//! tried when they fail too). A 404 moves on to the next URL too, without marking the
//! URL down: a regional mirror may hold only some images. `pullthrough_upstream_url_up`
//! shows each URL's state.
//!
//! The last URL is the origin, the registry itself: the proxy's credentials go to it
//! alone (the URLs before it are asked anonymously: a regional mirror is not the
//! registry the credentials were given for), and so do the checks of clients' own
//! credentials and the public probes ([`crate::proxy::access`]), which the origin
//! decides. A URL before the origin that answers 401 or 403 moves on to the next one,
//! as a 404 does.

use super::auth::{Auth, Secret};
use super::error::UpstreamError;
use crate::proxy::metrics::Metrics;
use hyper::Response;
use hyper::body::Incoming;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long a failed URL goes to the back of the order.
pub const RECHECK_AFTER: Duration = Duration::from_secs(30);

/// One base URL, with the proxy's own tokens for it (each URL has its own token server);
/// credentials only for the origin.
pub(super) struct Endpoint {
    pub base: String,
    pub auth: Auth,
    down_until: Mutex<Option<Instant>>,
    up: prometheus::IntGauge,
}

/// The base URLs of one upstream, in the configured order.
pub(super) struct Endpoints(Vec<Endpoint>);

impl Endpoints {
    /// The URLs, in order; `secret` is the origin's (the last URL's).
    pub fn new(
        upstream: &str,
        urls: Vec<String>,
        secret: Option<Secret>,
        metrics: &Metrics,
    ) -> Endpoints {
        let origin = urls.len().saturating_sub(1);
        Endpoints(
            urls.into_iter()
                .enumerate()
                .map(|(i, base)| {
                    let up = metrics.upstream_url_up(upstream, &base);
                    up.set(1);
                    Endpoint {
                        auth: Auth::new(secret.clone().filter(|_| i == origin)),
                        base,
                        down_until: Mutex::new(None),
                        up,
                    }
                })
                .collect(),
        )
    }

    pub fn get(&self, i: usize) -> &Endpoint {
        &self.0[i]
    }

    /// The origin's index: the last URL.
    pub fn origin(&self) -> usize {
        self.0.len() - 1
    }

    /// The order to try the URLs in at `now`: those not marked down, as configured, then
    /// the ones that are.
    pub fn order(&self, now: Instant) -> Vec<usize> {
        let down = |e: &Endpoint| {
            e.down_until
                .lock()
                .expect("endpoint lock")
                .is_some_and(|t| t > now)
        };
        let (mut up, down): (Vec<usize>, Vec<usize>) =
            (0..self.0.len()).partition(|&i| !down(&self.0[i]));
        up.extend(down);
        up
    }

    /// Marks URL `i` down (it failed) or up (it answered), and shows it.
    pub fn mark(&self, i: usize, failed: bool, now: Instant) {
        let e = &self.0[i];
        *e.down_until.lock().expect("endpoint lock") = failed.then_some(now + RECHECK_AFTER);
        e.up.set(i64::from(!failed));
    }
}

/// Whether an answer (or none) is worth trying the next URL for: no answer, or a 5xx.
pub(super) fn worth_next(result: &Result<Response<Incoming>, UpstreamError>) -> bool {
    match result {
        Ok(resp) => resp.status().is_server_error(),
        Err(UpstreamError::Unreachable { .. } | UpstreamError::NoAnswer { .. }) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_the_origin_only() {
        let m = Metrics::new();
        let urls = ["https://regional.example", "https://origin.example"];
        let secret = Secret::Password(crate::api::Credentials {
            username: "u".into(),
            password: "p".into(),
        });
        let e = Endpoints::new(
            "docker.io",
            urls.map(String::from).to_vec(),
            Some(secret),
            &m,
        );
        assert_eq!(e.origin(), 1);
        assert!(
            !e.get(0).auth.has_secret(),
            "a mirror URL got the credentials"
        );
        assert!(e.get(1).auth.has_secret());
    }

    #[test]
    fn a_failed_url_goes_to_the_back_until_its_recheck() {
        let m = Metrics::new();
        let urls = ["https://regional.example", "https://origin.example"];
        let e = Endpoints::new("docker.io", urls.map(String::from).to_vec(), None, &m);
        let t0 = Instant::now();
        assert_eq!(e.order(t0), [0, 1]);
        e.mark(0, true, t0);
        assert_eq!(e.order(t0), [1, 0]);
        assert!(m.render().contains(
            "pullthrough_upstream_url_up{upstream=\"docker.io\",url=\"https://regional.example\"} 0"
        ));
        assert_eq!(e.order(t0 + RECHECK_AFTER - Duration::from_secs(1)), [1, 0]);
        assert_eq!(e.order(t0 + RECHECK_AFTER), [0, 1]);
        // Both down: both still tried, in order.
        e.mark(1, true, t0);
        assert_eq!(e.order(t0), [0, 1]);
        e.mark(0, false, t0);
        assert_eq!(e.order(t0), [0, 1]);
        assert!(m.render().contains(
            "pullthrough_upstream_url_up{upstream=\"docker.io\",url=\"https://regional.example\"} 1"
        ));
    }
}

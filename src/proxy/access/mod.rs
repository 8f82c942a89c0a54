//! Who may pull a repository of an `upstreamAuth` upstream through the cache: the
//! upstream decides, never the proxy's own credentials (docs/proxy.md, "Private
//! repositories").
//!
//! A repository the upstream serves anonymously is public: served to anyone, with no
//! challenge, the answer probed once and remembered for `publicTTL`. Any other is
//! private: a client without a token for it is answered 401 with a Bearer challenge whose
//! realm is this proxy's `/auth/token`. There the client's own credentials are checked
//! with the upstream ([`Upstream::entitled`]), the answer remembered under a
//! keyed hash of upstream, repository and credentials (`allowedTTL`, `deniedTTL`), and a
//! token signed with the replicas' shared key issued for what was allowed. Concurrent
//! checks of the same question are one check. What one client can make the proxy ask is
//! bounded: scopes per token request (at the endpoint), checks in flight per upstream and
//! per client address, failed checks per user name from one address and per address;
//! credentials the upstream accepted are never locked out by someone else's failures.

pub mod token;

use super::error::ProxyError;
use super::metrics::Metrics;
use super::pull_through::single_flight::SingleFlight;
use super::shared_key::SharedKey;
use super::store::RepoKey;
use super::upstream::{Secret, Upstream};
use crate::api::AccessConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Entries a decision map holds before expired ones are dropped.
const PRUNE_AT: usize = 50_000;

/// Questions put to one upstream at once (credential checks and public probes): what
/// the rest of its requests keep of its caps however many are asked.
const CHECKS_PER_UPSTREAM: usize = 16;

/// Credential checks made for one client address at once.
const CHECKS_PER_CLIENT: usize = 4;

/// How long a question waits for room before it is refused (429).
const CHECK_WAIT: Duration = Duration::from_secs(30);

/// How long credentials the upstream accepted stay exempt from lock-outs.
const PROVEN_FOR: Duration = Duration::from_secs(24 * 3600);

/// How a request for a repository of an `upstreamAuth` upstream may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The upstream serves the repository to anyone.
    Public,
    /// The request carries a token of this proxy's for the repository.
    Granted,
    /// Neither: answer 401 with a challenge. `insufficient_scope` when the request had a
    /// token, which does not cover the repository (containerd then tries the next host).
    Challenge {
        /// A token was given.
        insufficient_scope: bool,
    },
}

/// A token the endpoint issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The signed token.
    pub token: String,
    /// Its lifetime, in seconds.
    pub expires_in: u64,
}

struct Known {
    value: bool,
    until: Instant,
}

struct Failures {
    count: u32,
    since: Instant,
}

/// The decisions of every `upstreamAuth` upstream.
pub struct Access {
    key: SharedKey,
    config: AccessConfig,
    metrics: Metrics,
    /// Whether a repository is public.
    visibility: Answers<RepoKey>,
    /// Whether credentials may pull a repository, by keyed hash.
    decisions: Answers<[u8; 32]>,
    /// Failed checks by keyed hash: of upstream, user name and client address, and of
    /// upstream and client address.
    failures: Arc<Mutex<HashMap<[u8; 32], Failures>>>,
    /// Credentials the upstream accepted, by keyed hash of upstream and credentials:
    /// until when they are exempt from lock-outs.
    proven: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
    /// Room for questions: per upstream, and per client address.
    room: Room,
}

/// Room for questions put to the upstreams (see [`CHECKS_PER_UPSTREAM`] and
/// [`CHECKS_PER_CLIENT`]).
#[derive(Default)]
struct Room {
    upstreams: Mutex<HashMap<String, Arc<Semaphore>>>,
    clients: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl Room {
    /// The semaphores a question of `upstream`'s for `client` (none: a probe) takes.
    fn for_question(&self, upstream: &str, client: Option<IpAddr>) -> Vec<Arc<Semaphore>> {
        let mut out = vec![
            self.upstreams
                .lock()
                .expect("access lock")
                .entry(upstream.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(CHECKS_PER_UPSTREAM)))
                .clone(),
        ];
        if let Some(ip) = client {
            let mut clients = self.clients.lock().expect("access lock");
            if clients.len() >= PRUNE_AT {
                // Those nobody holds are as good as new.
                clients.retain(|_, s| s.available_permits() < CHECKS_PER_CLIENT);
            }
            let client = clients
                .entry(ip)
                .or_insert_with(|| Arc::new(Semaphore::new(CHECKS_PER_CLIENT)));
            out.push(client.clone());
        }
        out
    }
}

/// Takes room in each of `semaphores` (the client's first), waiting [`CHECK_WAIT`] at
/// most; given back when the permits are dropped.
async fn take(semaphores: Vec<Arc<Semaphore>>) -> Result<Vec<OwnedSemaphorePermit>, ProxyError> {
    let all = async {
        let mut taken = Vec::new();
        for s in semaphores.into_iter().rev() {
            taken.push(s.acquire_owned().await.expect("never closed"));
        }
        taken
    };
    tokio::time::timeout(CHECK_WAIT, all)
        .await
        .map_err(|_| ProxyError::ChecksBusy)
}

/// The `service` of `/v2/`'s challenge: this proxy, whichever upstream a scope names.
pub const SERVICE: &str = "pullthrough";

/// The `service` of an upstream's challenges and tokens.
pub fn service(upstream: &str) -> String {
    format!("{SERVICE}:{upstream}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Yes-or-no questions put to the upstream, by key: each answer remembered until its
/// time is up, and each question asked once at a time, the answer remembered by the
/// asking itself before it leaves the flight (a request that comes after finds it and
/// asks no second time).
struct Answers<K> {
    known: Arc<Mutex<HashMap<K, Known>>>,
    flights: SingleFlight<K, Result<(bool, Instant), ProxyError>>,
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Answers<K> {
    fn new(metrics: &Metrics) -> Answers<K> {
        Answers {
            known: Arc::default(),
            flights: SingleFlight::new(metrics.fetch_waiters.clone()),
        }
    }

    /// The answer for `key` while its time is not up.
    fn fresh(&self, key: &K) -> Option<Known> {
        let map = self.known.lock().expect("access lock");
        map.get(key)
            .filter(|k| k.until > Instant::now())
            .map(|k| Known {
                value: k.value,
                until: k.until,
            })
    }

    /// The last answer for `key`, however old: what is used when the upstream cannot
    /// answer again.
    fn last(&self, key: &K) -> Option<bool> {
        self.known
            .lock()
            .expect("access lock")
            .get(key)
            .map(|k| k.value)
    }

    /// Remembers `value` for `key` for `ttl`; until when.
    fn remember(&self, key: K, value: bool, ttl: Duration) -> Instant {
        remember(&self.known, key, value, ttl)
    }

    /// Asks the upstream whether `secret` (none: anonymous) may pull `repository` (see
    /// [`ask`]), unless the same question is being asked now; the answer is passed to
    /// `then` and remembered for `ttl(answer)`. The answer and until when it holds.
    async fn ask(
        &self,
        key: K,
        question: Question,
        ttl: impl FnOnce(bool) -> Duration + Send + 'static,
        then: impl FnOnce(bool) + Send + 'static,
    ) -> Result<(bool, Instant), ProxyError> {
        let known = self.known.clone();
        let remembered = key.clone();
        let asking = async move {
            let answer = question.ask().await?;
            then(answer);
            Ok((answer, remember(&known, remembered, answer, ttl(answer))))
        };
        let (result, _) = self
            .flights
            .run(key, asking, |e| Err(ProxyError::internal(e)))
            .await;
        result
    }
}

fn remember<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, Known>>,
    key: K,
    value: bool,
    ttl: Duration,
) -> Instant {
    let until = Instant::now() + ttl;
    let mut map = map.lock().expect("access lock");
    if map.len() >= PRUNE_AT {
        let now = Instant::now();
        map.retain(|_, k| k.until > now);
    }
    map.insert(key, Known { value, until });
    until
}

impl Access {
    /// Decisions signed and keyed with `key`.
    pub fn new(key: SharedKey, config: AccessConfig, metrics: Metrics) -> Access {
        Access {
            key,
            config,
            visibility: Answers::new(&metrics),
            decisions: Answers::new(&metrics),
            metrics,
            failures: Arc::default(),
            proven: Arc::default(),
            room: Room::default(),
        }
    }

    /// Whether a request for `repository` of `up` with `authorization` may go on.
    pub async fn admit(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        authorization: Option<&str>,
    ) -> Admission {
        let bearer = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim);
        if let Some(t) = bearer
            && token::verify(&self.key, t)
                .is_some_and(|c| c.permits(&service(up.name()), repository, unix_now()))
        {
            return Admission::Granted;
        }
        if self.public(up, repository).await {
            return Admission::Public;
        }
        Admission::Challenge {
            insufficient_scope: bearer.is_some(),
        }
    }

    /// Whether the upstream serves `repository` anonymously: probed once per `publicTTL`.
    /// When the upstream cannot answer, the last answer stands, and with none, private.
    async fn public(&self, up: &Arc<Upstream>, repository: &str) -> bool {
        let key = RepoKey {
            upstream: up.name().to_string(),
            repository: repository.to_string(),
        };
        if let Some(k) = self.visibility.fresh(&key) {
            return k.value;
        }
        let question = self.question(up, repository, None, ("public", "private"), None);
        let ttl = self.config.public_ttl;
        match self
            .visibility
            .ask(key.clone(), question, move |_| ttl, |_| {})
            .await
        {
            Ok((public, _)) => public,
            Err(e) => {
                let known = self.visibility.last(&key);
                tracing::warn!(upstream = up.name(), repo = repository, error = %e, last = ?known,
                    "cannot ask the upstream whether a repository is public; keeping the last answer (none: private)");
                known.unwrap_or(false)
            }
        }
    }

    /// A token for `repositories` of `up`: pull for each one `secret` may pull (as the
    /// upstream says), nothing for the others and for an anonymous client. `client` is
    /// the address the request came from.
    pub async fn issue(
        &self,
        up: &Arc<Upstream>,
        repositories: &[String],
        secret: Option<&Secret>,
        client: IpAddr,
    ) -> Result<Issued, ProxyError> {
        let (mut pull, mut refused) = (Vec::new(), Vec::new());
        let mut decided_until: Option<Instant> = None;
        for repository in repositories {
            let allowed = match secret {
                Some(c) => self.decide(up, repository, c, client).await?,
                None => None,
            };
            match allowed {
                Some(expiry) => {
                    decided_until = Some(decided_until.map_or(expiry, |u| u.min(expiry)));
                    pull.push(repository.clone());
                }
                None => refused.push(repository.clone()),
            }
        }
        // Counted from now, once the checks (which take a while) are made.
        let now = Instant::now();
        let until = decided_until.map_or(now + self.config.token_ttl, |u| {
            u.min(now + self.config.token_ttl)
        });
        // The token expires on the last whole second before its decision does: never
        // after it (but for a decision with less than a second left), at most a second
        // before.
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix = clock.as_secs();
        let exp = (clock + until.saturating_duration_since(now)).as_secs();
        let expires_in = exp.saturating_sub(unix).max(1);
        let claims = token::Claims::new(
            &service(up.name()),
            &pull,
            &refused,
            unix,
            exp.max(unix + 1),
        );
        Ok(Issued {
            token: token::sign(&self.key, &claims),
            expires_in,
        })
    }

    /// Until when `secret` may pull `repository` of `up`; `None` when it may not. Asked
    /// for by `client`.
    async fn decide(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        secret: &Secret,
        client: IpAddr,
    ) -> Result<Option<Instant>, ProxyError> {
        // Failures are counted per user name; an identity token names no user, so its
        // own hash stands in (guessing one is hopeless: what is capped is asking again).
        let (kind, user, pass): (&[u8], &[u8], &[u8]) = match secret {
            Secret::Password(c) => (b"password", c.username.as_bytes(), c.password.as_bytes()),
            Secret::IdentityToken(t) => (b"identity", t.as_bytes(), b""),
        };
        let name = up.name().as_bytes();
        let key = self.key.mac(&[
            b"decision\0",
            kind,
            b"\0",
            name,
            b"\0",
            repository.as_bytes(),
            b"\0",
            user,
            b"\0",
            pass,
        ]);
        if let Some(k) = self.decisions.fresh(&key) {
            return Ok(k.value.then_some(k.until));
        }
        let address = client.to_string();
        let address = address.as_bytes();
        let credentials = self
            .key
            .mac(&[b"proven\0", kind, b"\0", name, b"\0", user, b"\0", pass]);
        // Someone else's failures (a guesser on the user's name, or on the same address)
        // never lock out credentials the upstream accepted.
        let who = self
            .key
            .mac(&[b"user\0", kind, b"\0", name, b"\0", user, b"\0", address]);
        let from = self.key.mac(&[b"client\0", name, b"\0", address]);
        let config = &self.config;
        if !self.proven(&credentials)
            && (self.failing(&who, config.max_failed_checks.get())
                || self.failing(&from, config.max_failed_checks_per_client.get()))
        {
            return Err(ProxyError::TooManyAttempts);
        }
        // A denial counts as a failure of the user name's and of the address's, a yes
        // proves the credentials, before the answer leaves the flight.
        let question = self.question(
            up,
            repository,
            Some(secret.clone()),
            ("allowed", "denied"),
            Some(client),
        );
        let (allowed_ttl, denied_ttl) = (config.allowed_ttl, config.denied_ttl);
        let (failures, proven) = (self.failures.clone(), self.proven.clone());
        let ttl = move |allowed: bool| if allowed { allowed_ttl } else { denied_ttl };
        let count = move |allowed: bool| {
            if allowed {
                remember_proven(&proven, credentials);
            } else {
                failed(&failures, who, denied_ttl);
                failed(&failures, from, denied_ttl);
            }
        };
        match self.decisions.ask(key, question, ttl, count).await {
            Ok((allowed, until)) => Ok(allowed.then_some(until)),
            // The upstream cannot say: its last answer stands for one more `deniedTTL`
            // (an outage must not lock out who was allowed a moment ago); with none, the
            // client is told the upstream failed.
            Err(e) => match self.decisions.last(&key) {
                Some(value) => {
                    tracing::warn!(upstream = up.name(), repo = repository, error = %e,
                        "cannot check credentials with the upstream; keeping its last answer");
                    let until = self.decisions.remember(key, value, denied_ttl);
                    Ok(value.then_some(until))
                }
                None => Err(e),
            },
        }
    }

    /// Whether the credentials hashed to `credentials` were accepted lately.
    fn proven(&self, credentials: &[u8; 32]) -> bool {
        let map = self.proven.lock().expect("access lock");
        map.get(credentials)
            .is_some_and(|until| *until > Instant::now())
    }

    /// The question whether `secret` (none: anonymous) may pull `repository` of `up`,
    /// its answers counted as `labels` (yes, no).
    fn question(
        &self,
        up: &Arc<Upstream>,
        repository: &str,
        secret: Option<Secret>,
        labels: (&'static str, &'static str),
        client: Option<IpAddr>,
    ) -> Question {
        Question {
            up: up.clone(),
            metrics: self.metrics.clone(),
            repository: repository.to_string(),
            secret,
            labels,
            room: self.room.for_question(up.name(), client),
        }
    }

    /// Whether what is hashed to `who` (a user name from an address, an address) has
    /// used up its `max` failed checks.
    fn failing(&self, who: &[u8; 32], max: u32) -> bool {
        let map = self.failures.lock().expect("access lock");
        map.get(who)
            .is_some_and(|f| f.count >= max && f.since.elapsed() < self.config.denied_ttl)
    }
}

/// Whether `secret` (none: anonymous) may pull `repository` of `up`: a question for the
/// upstream, asked once there is `room` for it, its answer counted in
/// `pullthrough_access_decisions_total` as `labels` (yes, no), or `error`.
struct Question {
    up: Arc<Upstream>,
    metrics: Metrics,
    repository: String,
    secret: Option<Secret>,
    labels: (&'static str, &'static str),
    room: Vec<Arc<Semaphore>>,
}

impl Question {
    async fn ask(self) -> Result<bool, ProxyError> {
        let _room = take(self.room).await?;
        let started = Instant::now();
        let result = self
            .up
            .entitled(&self.repository, self.secret)
            .await
            .map_err(ProxyError::from);
        let label = match &result {
            Ok(true) => self.labels.0,
            Ok(false) => self.labels.1,
            Err(_) => "error",
        };
        self.metrics
            .access_decision(self.up.name(), label, started.elapsed().as_secs_f64());
        result
    }
}

/// Remembers that the credentials hashed to `credentials` were accepted.
fn remember_proven(proven: &Mutex<HashMap<[u8; 32], Instant>>, credentials: [u8; 32]) {
    let mut map = proven.lock().expect("access lock");
    if map.len() >= PRUNE_AT {
        let now = Instant::now();
        map.retain(|_, until| *until > now);
    }
    map.insert(credentials, Instant::now() + PROVEN_FOR);
}

/// Counts a failed check of what is hashed to `who`, in windows of `window`.
fn failed(failures: &Mutex<HashMap<[u8; 32], Failures>>, who: [u8; 32], window: Duration) {
    let mut map = failures.lock().expect("access lock");
    if map.len() >= PRUNE_AT {
        map.retain(|_, f| f.since.elapsed() < window);
    }
    let f = map.entry(who).or_insert(Failures {
        count: 0,
        since: Instant::now(),
    });
    if f.since.elapsed() >= window {
        *f = Failures {
            count: 0,
            since: Instant::now(),
        };
    }
    f.count += 1;
}

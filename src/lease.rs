//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas
//! exactly one acts: the controller's (one reconciles), and the proxy's that share a
//! bucket (one evicts). Updates use the Lease's resourceVersion, so two
//! replicas can never both win the same round.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use std::time::Duration;

/// What to do with a Lease as found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder stopped renewing): take it over.
    Take,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and renews it.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// Decides from the Lease's spec whether `me` may hold it at `now`.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Take;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expired = match &spec.renew_time {
        Some(t) => t.0 + SignedDuration::from_secs(duration) < now,
        None => true,
    };
    if expired {
        Decision::Take
    } else {
        Decision::Wait { holder }
    }
}

/// A Lease-based lock.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    /// A lock on Lease `name` held as `identity` (the pod name) for `duration` per renewal.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> LeaseLock {
        LeaseLock {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// Takes or renews the Lease. `Ok(true)` when we hold it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        if let Decision::Wait { holder } = &decision {
            tracing::debug!(%holder, lease = %self.name, "another replica is the leader");
            return Ok(false);
        }
        let previous = current
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let taking = decision == Decision::Take;
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: if taking {
                Some(MicroTime(now))
            } else {
                previous.acquire_time.clone()
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                previous.lease_transitions.unwrap_or(0) + i32::from(taking && current.is_some()),
            ),
            ..LeaseSpec::default()
        };
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                lease.spec = Some(spec);
                // Carries the resourceVersion we read: a concurrent writer makes this 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = &mut lease.spec
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await;
        }
    }

    /// Waits until this replica holds the Lease, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every third of the lease duration; returns when the Lease is lost (another
    /// replica took it, or renewal kept failing until it expired).
    pub async fn hold(&self) {
        let period = self.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lost the leader lease to another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    if last_ok.elapsed() >= self.duration {
                        // One more try before giving up: the API server may be back.
                        if let Ok(true) = self.try_acquire().await {
                            last_ok = tokio::time::Instant::now();
                            continue;
                        }
                        tracing::error!(
                            "the leader lease expired while the API server could not be \
                             reached"
                        );
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1000).unwrap();
        assert_eq!(decide(None, "me", now), Decision::Take);
        assert_eq!(decide(Some(&spec("", 999)), "me", now), Decision::Take);
        assert_eq!(decide(Some(&spec("me", 990)), "me", now), Decision::Renew);
        assert_eq!(
            decide(Some(&spec("other", 990)), "me", now),
            Decision::Wait {
                holder: "other".into()
            }
        );
        assert_eq!(
            decide(Some(&spec("other", 980)), "me", now),
            Decision::Take,
            "expired"
        );
        let mut no_renew = spec("other", 0);
        no_renew.renew_time = None;
        assert_eq!(decide(Some(&no_renew), "me", now), Decision::Take);
    }
}

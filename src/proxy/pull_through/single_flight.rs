//! One run of a fetch per key at a time, its result shared by every request that asks
//! while it runs.
//!
//! The fetch runs on a task of its own, not inside the request that started it: it
//! completes, and leaves the map, whether or not any client is still waiting. A client
//! that goes away (containerd cancels on its own timeouts) can therefore never leave a
//! half-run fetch behind for later requests to join, nor a finished one whose stale
//! result they would be handed: a request that comes after the fetch ended starts from
//! the cache's state again.

use crate::proxy::upstream::Asker;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prometheus::IntGauge;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

type Running<V> = Shared<BoxFuture<'static, V>>;

/// The fetches running now, by key.
pub struct SingleFlight<K, V: Clone> {
    running: Arc<Mutex<HashMap<K, Running<V>>>>,
    /// Callers waiting for a result (`pullthrough_fetch_waiters`).
    waiters: IntGauge,
}

impl<K, V: Clone> SingleFlight<K, V> {
    /// No fetch running; callers waiting are counted in `waiters`.
    pub fn new(waiters: IntGauge) -> Self {
        SingleFlight {
            running: Arc::new(Mutex::new(HashMap::new())),
            waiters,
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The result of the running fetch for `key`, or of `fetch`, started now on a task of
    /// its own if none runs. `failed` turns a fetch task that panicked into a result.
    /// The flag says whether this call started the fetch.
    pub async fn run<F>(&self, key: K, fetch: F, failed: fn(String) -> V) -> (V, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (shared, started) = {
            let mut running = self.running.lock().expect("single-flight lock");
            // Counted while the map is locked: once the gauge shows a caller, it has
            // joined (or started) the fetch.
            self.waiters.inc();
            match running.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    // The task removes its own entry: entries are only added where there
                    // is none, and only their task removes them.
                    let leave = Leave {
                        running: self.running.clone(),
                        key: Some(key.clone()),
                    };
                    // On behalf of whoever started it (see `Asker`).
                    let task = tokio::spawn(Asker::current().scope(async move {
                        let _leave = leave;
                        fetch.await
                    }));
                    let f = async move { task.await.unwrap_or_else(|e| failed(e.to_string())) }
                        .boxed()
                        .shared();
                    running.insert(key, f.clone());
                    (f, true)
                }
            }
        };
        let _waiting = Waiting(&self.waiters);
        (shared.await, started)
    }

    /// How many fetches are running (tests).
    #[cfg(test)]
    pub fn running_count(&self) -> usize {
        self.running.lock().expect("single-flight lock").len()
    }
}

/// Uncounts a waiting caller, also one that goes away.
pub struct Waiting<'a>(pub &'a IntGauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Takes a finished (or panicked) fetch's entry out of the map.
struct Leave<K: Hash + Eq, V: Clone> {
    running: Arc<Mutex<HashMap<K, Running<V>>>>,
    key: Option<K>,
}

impl<K: Hash + Eq, V: Clone> Drop for Leave<K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.running
                .lock()
                .expect("single-flight lock")
                .remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::watch;

    fn gauge() -> IntGauge {
        IntGauge::new("waiters", "w").unwrap()
    }

    #[tokio::test]
    async fn callers_that_ask_meanwhile_share_one_run() {
        let waiters = gauge();
        let flights: Arc<SingleFlight<&str, u32>> = Arc::new(SingleFlight::new(waiters.clone()));
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, gate) = watch::channel(false);
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let (flights, runs, mut gate) = (flights.clone(), runs.clone(), gate.clone());
                tokio::spawn(async move {
                    let fetch = async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        7
                    };
                    flights.run("k", fetch, |_| 0).await
                })
            })
            .collect();
        while waiters.get() < 5 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        let mut started = 0;
        for c in calls {
            let (v, s) = c.await.unwrap();
            assert_eq!(v, 7);
            started += usize::from(s);
        }
        assert_eq!((started, runs.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(flights.running_count(), 0, "the finished run left the map");
        assert_eq!(waiters.get(), 0);
    }

    #[tokio::test]
    async fn a_run_finishes_and_leaves_when_its_caller_goes_away() {
        let waiters = gauge();
        let flights: Arc<SingleFlight<&str, u32>> = Arc::new(SingleFlight::new(waiters.clone()));
        let (release, mut gate) = watch::channel(false);
        let (done_tx, mut done) = watch::channel(false);
        let caller = tokio::spawn({
            let flights = flights.clone();
            async move {
                let fetch = async move {
                    let _ = gate.wait_for(|open| *open).await;
                    done_tx.send_replace(true);
                    1
                };
                flights.run("k", fetch, |_| 0).await
            }
        });
        while flights.running_count() == 0 {
            tokio::task::yield_now().await;
        }
        // The only caller goes away before the fetch is done; the fetch still finishes.
        caller.abort();
        let _ = caller.await;
        assert_eq!(waiters.get(), 0, "a caller that left is not waiting");
        release.send(true).unwrap();
        done.wait_for(|d| *d).await.unwrap();
        while flights.running_count() != 0 {
            tokio::task::yield_now().await;
        }
        // A later caller starts a new run rather than getting the old result.
        let (v, started) = flights.run("k", async { 2 }, |_| 0).await;
        assert_eq!((v, started), (2, true));
    }

    #[tokio::test]
    async fn a_panicking_fetch_becomes_a_result() {
        let flights: SingleFlight<&str, Result<u32, String>> = SingleFlight::new(gauge());
        let (v, _) = flights.run("k", async { panic!("boom") }, Err).await;
        assert!(v.unwrap_err().contains("panicked"));
        assert_eq!(flights.running_count(), 0);
    }
}

//! What every reconcile shares: the API client, the children's settings, the stores of
//! mirrors and Nodes, the Event recorder, leadership, claims; and the errors a reconcile
//! ends with.

use super::builders::ChildSettings;
use super::metrics::ControllerMetrics;
use super::status;
use crate::api::mirror::RegistryMirror;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "pullthrough-controller";

/// How long a deleted mirror waits for node agents before letting go anyway.
pub const NODE_CLEANUP_TIMEOUT: Duration = Duration::from_secs(600);

/// A reconcile failure (requeued with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The object has no namespace (the CRD is namespaced: a bug elsewhere).
    #[error("RegistryMirror has no namespace")]
    NoNamespace,
    /// No random bytes for a new signing key.
    #[error("making a signing key: {0}")]
    Random(std::io::Error),
    /// A replica's operations port refused or failed a request.
    #[error("the admin endpoint of replica {url}: {source}")]
    Replica {
        /// Its operations port.
        url: String,
        /// What went wrong.
        #[source]
        source: crate::proxy::admin::AdminError,
    },
}

impl Error {
    /// Label value of the error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_error",
            Error::NoNamespace => "invalid_object",
            Error::Random(_) => "random_error",
            Error::Replica { .. } => "replica_error",
        }
    }
}

pub(super) fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// How long a reconcile that failed `n` times in a row waits: 5s, 10s, 20s ... up to 5
/// minutes.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << n.saturating_sub(1).min(6)))
        .min(Duration::from_secs(300))
}

/// What a mirror claims: whether it can, and its registries.
type Claim = (bool, Vec<String>);

/// Everything a reconcile needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// How children are built.
    pub settings: ChildSettings,
    /// Every RegistryMirror, for conflict detection.
    pub store: Store<RegistryMirror>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Who records Events (for Events that must not be folded into a series, see
    /// [`super::workloads`]).
    pub(super) reporter: Reporter,
    /// Reconcile counts and durations.
    pub metrics: ControllerMetrics,
    pub(super) failures: Mutex<HashMap<ObjectRef<RegistryMirror>, u32>>,
    /// Whether this replica holds the leader Lease: reconciles do nothing without it.
    pub(super) leading: AtomicBool,
    /// What each mirror claims and whether it can, as its last reconcile found: fresher
    /// than the status in the store, which lags the status it has just written.
    claimants: Mutex<HashMap<ObjectRef<RegistryMirror>, Claim>>,
    /// Where a reconcile says that its mirror's claims changed, so that the mirrors they
    /// may move are reconciled at once (see [`super::run`]); none in tests of one reconcile.
    pub(super) claims_changed: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    /// Every Node, kept by the watch in [`super::run`]; none in tests of one reconcile, which
    /// list them.
    pub(super) nodes: Option<Store<Node>>,
    /// The proxies' operations port, where prefetches are asked for (tests point it at
    /// a proxy of their own).
    pub ops_port: u16,
    /// Per rewriting mirror (`namespace/name`): running pods the webhook missed, as the
    /// audit counts them (see `rewrite::audit`).
    pub(super) missed: Mutex<std::collections::BTreeMap<String, i64>>,
}

impl Context {
    /// A context over a client and a store of all mirrors.
    pub fn new(
        client: Client,
        settings: ChildSettings,
        store: Store<RegistryMirror>,
        reporter: Reporter,
    ) -> Context {
        Context {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            settings,
            store,
            metrics: ControllerMetrics::new(),
            failures: Mutex::new(HashMap::new()),
            leading: AtomicBool::new(true),
            claimants: Mutex::new(HashMap::new()),
            claims_changed: None,
            nodes: None,
            ops_port: crate::api::mirror::METRICS_PORT,
            missed: Mutex::default(),
        }
    }

    /// Every Node: from the watched store once it has been filled, else listed.
    pub(super) async fn nodes(&self) -> Result<Vec<Node>, Error> {
        let filled = |store: &Store<Node>| {
            futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
        };
        if let Some(store) = self.nodes.as_ref().filter(|s| filled(s)) {
            return Ok(store.state().iter().map(|n| Node::clone(n)).collect());
        }
        Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(kube_err("listing nodes"))
    }

    /// Whether `m` may claim registries: from its last reconcile here when there was one,
    /// else from its status (see [`status::can_claim`]).
    pub(super) fn can_claim(&self, m: &RegistryMirror) -> bool {
        if m.meta().deletion_timestamp.is_some() {
            return false;
        }
        let known = self
            .claimants
            .lock()
            .expect("lock")
            .get(&ObjectRef::from_obj(m))
            .map(|(can, _)| *can);
        known.unwrap_or_else(|| status::can_claim(m))
    }

    /// Records what `m` claims now. When that changed and another mirror claims one of
    /// its registries (of before or of now), every mirror is reconciled, so that claims
    /// move at once rather than at the periodic look.
    pub(super) fn claimed(&self, m: &RegistryMirror, can: bool, gone: bool) {
        let key = ObjectRef::from_obj(m);
        let now = (can, status::registry_keys(m));
        let before = {
            let mut claimants = self.claimants.lock().expect("lock");
            if gone {
                claimants.remove(&key)
            } else {
                claimants.insert(key, now.clone())
            }
        };
        if before.as_ref() == Some(&now) && !gone {
            return;
        }
        let Some(tx) = &self.claims_changed else {
            return;
        };
        let mut keys = now.1;
        keys.extend(before.map(|b| b.1).unwrap_or_default());
        if status::rivals(m, keys, &self.store.state())
            .next()
            .is_some()
        {
            let _ = tx.send(());
        }
    }

    /// Whether this replica holds the leader Lease.
    pub(super) fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Records whether this replica holds the leader Lease, in the metrics too.
    pub(super) fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
        self.metrics.set_leader(leading);
    }
}

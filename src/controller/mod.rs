//! `pullthrough controller`: reconciles each RegistryMirror into the objects that run its
//! cache (ConfigMap, Deployment or StatefulSet, Service, PodDisruptionBudget,
//! ServiceMonitor) and keeps its status true. Talks to Kubernetes; the object shapes come
//! from the pure [`builders`] and the status from the pure [`status`] module.

pub mod builders;
mod metrics;
mod reconcile;
pub mod status;
pub mod workloads;

pub use metrics::ControllerMetrics;
pub use reconcile::{error_policy, reconcile};

use crate::api::mirror::RegistryMirror;
use builders::ChildSettings;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
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
    #[error("a replica's admin endpoint: {0}")]
    Replica(String),
}

impl Error {
    /// Label value of the error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_error",
            Error::NoNamespace => "invalid_object",
            Error::Random(_) => "random_error",
            Error::Replica(_) => "replica_error",
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
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
    /// [`workloads`]).
    reporter: Reporter,
    /// Reconcile counts and durations.
    pub metrics: ControllerMetrics,
    failures: Mutex<HashMap<ObjectRef<RegistryMirror>, u32>>,
    /// Whether this replica holds the leader Lease: reconciles do nothing without it.
    leading: std::sync::atomic::AtomicBool,
    /// What each mirror claims and whether it can, as its last reconcile found: fresher
    /// than the status in the store, which lags the status it has just written.
    claimants: Mutex<HashMap<ObjectRef<RegistryMirror>, Claim>>,
    /// Where a reconcile says that its mirror's claims changed, so that the mirrors they
    /// may move are reconciled at once (see [`run`]); none in tests of one reconcile.
    claims_changed: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    /// Every Node, kept by the watch in [`run`]; none in tests of one reconcile, which
    /// list them.
    nodes: Option<Store<Node>>,
    /// The proxies' operations port, where prefetches are asked for (tests point it at
    /// a proxy of their own).
    pub ops_port: u16,
    /// Images each mirror's proxies prefetched for workloads (see [`workloads`]).
    prefetched: Mutex<HashMap<ObjectRef<RegistryMirror>, i64>>,
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
            leading: std::sync::atomic::AtomicBool::new(true),
            claimants: Mutex::new(HashMap::new()),
            claims_changed: None,
            nodes: None,
            ops_port: crate::api::mirror::METRICS_PORT,
            prefetched: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one image prefetched for a workload by `m`'s proxies.
    fn count_prefetched(&self, m: &RegistryMirror) {
        *self
            .prefetched
            .lock()
            .expect("lock")
            .entry(ObjectRef::from_obj(m))
            .or_insert(0) += 1;
    }

    /// Images prefetched for workloads by `m`'s proxies so far.
    fn prefetched(&self, m: &RegistryMirror) -> i64 {
        self.prefetched
            .lock()
            .expect("lock")
            .get(&ObjectRef::from_obj(m))
            .copied()
            .unwrap_or(0)
    }

    /// Every Node: from the watched store once it has been filled, else listed.
    async fn nodes(&self) -> Result<Vec<Node>, Error> {
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
    fn can_claim(&self, m: &RegistryMirror) -> bool {
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
    fn claimed(&self, m: &RegistryMirror, can: bool, gone: bool) {
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

    fn leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Options of `pullthrough controller`.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// How children are built.
    pub settings: ChildSettings,
    /// Address of /metrics, /healthz, /readyz.
    pub metrics_listen: std::net::SocketAddr,
    /// Namespace of the leader election Lease.
    pub lease_namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Reconcile only the RegistryMirrors of this namespace (default: all). A controller
    /// scoped so can run beside another one (the e2e tests do, on a shared cluster).
    pub namespace: Option<String>,
}

struct ControllerOps {
    metrics: ControllerMetrics,
}

impl crate::server::Ops for ControllerOps {
    fn metrics(&self) -> String {
        self.metrics.render()
    }
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Runs the controller until `shutdown` completes: serves metrics, waits to be the leader,
/// then reconciles every RegistryMirror.
pub async fn run(
    client: Client,
    options: ControllerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let mirrors: Api<RegistryMirror> = scoped(&client, &options.namespace);
    // Fail early and clearly when the CRD is not installed.
    if let Err(e) = mirrors.list(&ListParams::default().limit(1)).await {
        return Err(RunError::CrdMissing(e));
    }
    let controller = Controller::new(mirrors.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: Some(options.identity.clone()),
    };
    let (claims_tx, claims_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ctx = Context::new(
        client.clone(),
        options.settings.clone(),
        store.clone(),
        reporter,
    );
    ctx.claims_changed = Some(claims_tx);
    let (node_store, node_writer) = reflector::store::<Node>();
    ctx.nodes = Some(node_store);
    let ctx = Arc::new(ctx);
    let claims_changed = futures::stream::unfold(claims_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind(options.metrics_listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: options.metrics_listen,
            source,
        })?;
    let ops: Arc<dyn crate::server::Ops> = Arc::new(ControllerOps {
        metrics: ctx.metrics.clone(),
    });
    let ops_task = tokio::spawn(crate::server::serve_ops(listener, ops, stop_rx));

    let lock = crate::lease::LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        "pullthrough-controller",
        &options.identity,
        Duration::from_secs(15),
    );
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    tokio::select! {
        _ = lock.acquire(Duration::from_secs(2)) => ctx.metrics.set_leader(true),
        _ = shutdown.clone() => {
            let _ = stop_tx.send(true);
            let _ = ops_task.await;
            return Ok(());
        }
    }
    // Lost leadership (another replica took the Lease, or the API server was out of
    // reach past it) stops reconciles, not the process: it stands by, and reconciles
    // everything again once it leads again.
    let (regained_tx, regained_rx) = tokio::sync::watch::channel(());
    let prefetch_regained = regained_tx.subscribe();
    let leadership = {
        let ctx = ctx.clone();
        async move {
            loop {
                lock.hold().await;
                ctx.leading
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                ctx.metrics.set_leader(false);
                tracing::warn!(
                    "stopped reconciling: this replica no longer holds the leader lease; \
                     standing by, and taking over again when the lease is free"
                );
                lock.acquire(Duration::from_secs(2)).await;
                ctx.leading.store(true, std::sync::atomic::Ordering::SeqCst);
                ctx.metrics.set_leader(true);
                let _ = regained_tx.send(());
            }
        }
    };
    let regained = tokio_stream_of(regained_rx);
    let label = "app.kubernetes.io/managed-by=pullthrough-controller";
    let owned = || watcher::Config::default().labels(label);
    let secret_store = store.clone();
    let controller = controller
        .owns(scoped::<ConfigMap>(&client, &options.namespace), owned())
        .owns(scoped::<Deployment>(&client, &options.namespace), owned())
        .owns(scoped::<StatefulSet>(&client, &options.namespace), owned())
        .owns(scoped::<Service>(&client, &options.namespace), owned())
        .owns(
            scoped::<PodDisruptionBudget>(&client, &options.namespace),
            owned(),
        )
        .watches(
            scoped::<Secret>(&client, &options.namespace),
            watcher::Config::default().fields("type=kubernetes.io/dockerconfigjson"),
            move |secret: Secret| {
                let ns = secret.namespace();
                let name = secret.name_any();
                secret_store
                    .state()
                    .into_iter()
                    .filter(|m| m.namespace() == ns)
                    .filter(|m| {
                        m.spec.upstreams.iter().any(|u| {
                            u.credentials_secret_ref
                                .as_ref()
                                .is_some_and(|r| r.name == name)
                        })
                    })
                    .map(|m| ObjectRef::from_obj(&*m))
                    .collect::<Vec<_>>()
            },
        )
        // A mirror that changes, breaks, is fixed or goes can hand a registry to, or
        // take one from, the mirrors that also claim it: its reconcile (which sees its
        // new state) says so (see `Context::claimed`), and all are looked at again.
        .reconcile_all_on(claims_changed)
        // Node agents report through Node annotations: the mirrors a node names (and,
        // when a node's containerd state changes, the same ones) are looked at again.
        .reconcile_all_on(node_reports(&client, node_writer))
        .reconcile_all_on(regained)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // Images of workloads, prefetched for the mirrors that ask (cache.prefetchFromWorkloads).
    let prefetching = tokio::spawn(workloads::run(ctx.clone(), prefetch_regained));
    tokio::select! {
        _ = controller => {}
        _ = leadership => {}
    }
    prefetching.abort();
    let _ = stop_tx.send(true);
    let _ = ops_task.await;
    if ctx.leading() {
        lock_release(&client, &options).await;
    }
    Ok(())
}

/// Gives the Lease up on shutdown, so that another replica takes over at once.
async fn lock_release(client: &Client, options: &ControllerOptions) {
    crate::lease::LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        "pullthrough-controller",
        &options.identity,
        Duration::from_secs(15),
    )
    .release()
    .await;
}

/// A stream with an item each time the watched value is sent (not for its first value).
/// Fills the Node store and yields whenever a node's report (the mirrors configured on
/// it, its containerd's state) changes, or a node comes or goes: every mirror's node count
/// may have changed, and a mirror being deleted may be waiting on that node. Other Node
/// updates (heartbeats, every few seconds per node) yield nothing.
fn node_reports(
    client: &Client,
    writer: reflector::store::Writer<Node>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let reports = Arc::new(Mutex::new(
        HashMap::<String, Option<(String, String)>>::new(),
    ));
    reflector::reflector(
        writer,
        watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .filter_map(move |event| {
        let reports = reports.clone();
        async move {
            let (node, present) = match event.ok()? {
                watcher::Event::Apply(n) | watcher::Event::InitApply(n) => (n, true),
                watcher::Event::Delete(n) => (n, false),
                watcher::Event::Init | watcher::Event::InitDone => return None,
            };
            let report = |key: &str| node.annotations().get(key).cloned().unwrap_or_default();
            let now = present.then(|| {
                (
                    report(crate::api::mirror::NODE_ANNOTATION),
                    report(crate::api::mirror::CONTAINERD_ANNOTATION),
                )
            });
            let mut reports = reports.lock().expect("lock");
            let before = reports.insert(node.name_any(), now.clone());
            (before != Some(now)).then_some(())
        }
    })
}

fn tokio_stream_of(rx: tokio::sync::watch::Receiver<()>) -> impl futures::Stream<Item = ()> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// RegistryMirrors cannot be listed.
    #[error(
        "cannot list RegistryMirrors (is the CRD installed? `pullthrough crd | kubectl apply -f -`): {0}"
    )]
    CrdMissing(#[source] kube::Error),
    /// The metrics address is taken.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

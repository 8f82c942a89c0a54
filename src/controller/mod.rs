//! `pullthrough controller`: reconciles each RegistryMirror into the objects that run its
//! cache (ConfigMap, Deployment or StatefulSet, Service, PodDisruptionBudget,
//! ServiceMonitor) and keeps its status true. Talks to Kubernetes; the object shapes come
//! from the pure [`builders`] and the status from the pure [`status`] module.

pub mod builders;
mod context;
mod metrics;
mod reconcile;
pub mod rewrite;
pub mod status;
pub mod workloads;

pub use context::{Context, Error, MANAGER, NODE_CLEANUP_TIMEOUT};
pub use metrics::ControllerMetrics;
pub use reconcile::{error_policy, reconcile};

use crate::api::mirror::RegistryMirror;
use builders::ChildSettings;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// The image-rewriting webhook, served by every replica (docs/rewrite.md); none: not
    /// served here.
    pub webhook: Option<rewrite::WebhookOptions>,
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
    let mirrors: Api<RegistryMirror> = scoped(&client, &options.namespace);
    // Fail early and clearly when the CRD is not installed.
    if let Err(e) = mirrors.list(&ListParams::default().limit(1)).await {
        return Err(RunError::CrdMissing(e));
    }
    let controller = Controller::new(mirrors.clone(), watcher::Config::default().any_semantic());
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: Some(options.identity.clone()),
    };
    let settings = options.settings.clone();
    let mut ctx = Context::new(client.clone(), settings, controller.store(), reporter);
    let (claims_tx, claims_rx) = tokio::sync::mpsc::unbounded_channel();
    ctx.claims_changed = Some(claims_tx);
    let (node_store, node_writer) = reflector::store::<Node>();
    ctx.nodes = Some(node_store);
    let ctx = Arc::new(ctx);
    // What the webhook (on every replica) and the audit (on the leader) read.
    let views = rewrite::Views::start(&client, mirrors.clone());
    let (stop_tx, ops_task) = serve_ports(&client, &options, &ctx, &views).await?;
    let lock = leader_lease(&client, &options);
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    tokio::select! {
        _ = lock.acquire(Duration::from_secs(2)) => ctx.metrics.set_leader(true),
        _ = shutdown.clone() => {
            let _ = stop_tx.send(true);
            let _ = ops_task.await;
            return Ok(());
        }
    }
    // Pods admitted without the rewrite, counted for the mirrors' status.
    let (missed_tx, missed_rx) = tokio::sync::mpsc::unbounded_channel();
    let auditing = tokio::spawn(rewrite::audit::run(ctx.clone(), views.clone(), missed_tx));
    let (regained_tx, regained_rx) = tokio::sync::watch::channel(());
    let prefetch_regained = tokio_stream_of(regained_tx.subscribe());
    let leadership = stand_by_when_lost(lock, ctx.clone(), regained_tx);
    let triggers = Triggers {
        claims_changed: futures::stream::unfold(claims_rx, |mut rx| async move {
            rx.recv().await.map(|()| ((), rx))
        })
        .boxed(),
        node_reports: node_reports(&client, node_writer).boxed(),
        regained: tokio_stream_of(regained_rx).boxed(),
        missed_changed: futures::stream::unfold(missed_rx, |mut rx| async move {
            rx.recv().await.map(|()| ((), rx))
        })
        .boxed(),
    };
    let reconciling = reconcile_mirrors(
        controller,
        &client,
        &options,
        triggers,
        shutdown.clone(),
        &ctx,
    );
    // Images of workloads, prefetched for the mirrors that ask (cache.prefetchFromWorkloads).
    let prefetching = tokio::spawn(workloads::run(
        ctx.clone(),
        mirrors,
        prefetch_regained,
        shutdown.clone(),
    ));
    tokio::select! {
        _ = reconciling => {}
        _ = leadership => {}
    }
    prefetching.abort();
    auditing.abort();
    views.stop();
    let _ = stop_tx.send(true);
    let _ = ops_task.await;
    if ctx.leading() {
        leader_lease(&client, &options).release().await;
    }
    Ok(())
}

/// An API of `K` in the controller's namespace, or in all of them.
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

/// Serves /metrics, /healthz and /readyz, and the webhook when asked, until the sender
/// says stop: the task ends when both have.
async fn serve_ports(
    client: &Client,
    options: &ControllerOptions,
    ctx: &Context,
    views: &rewrite::Views,
) -> Result<
    (
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ),
    RunError,
> {
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
    let webhook = match &options.webhook {
        Some(w) => Some(
            rewrite::serve(
                client.clone(),
                views.clone(),
                w.clone(),
                ctx.metrics.clone(),
                stop_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let ops = crate::server::serve_ops(listener, ops, stop_rx);
    let task = tokio::spawn(async move {
        ops.await;
        if let Some(w) = webhook {
            let _ = w.await;
        }
    });
    Ok((stop_tx, task))
}

/// The leader Lease of the controller's replicas.
fn leader_lease(client: &Client, options: &ControllerOptions) -> crate::lease::LeaseLock {
    crate::lease::LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        "pullthrough-controller",
        &options.identity,
        Duration::from_secs(15),
    )
}

/// Holds the Lease for as long as it can. Lost leadership (another replica took the
/// Lease, or the API server was out of reach past it) stops reconciles, not the process:
/// it stands by, and once it leads again says so on `regained`, so that everything is
/// reconciled again.
async fn stand_by_when_lost(
    lock: crate::lease::LeaseLock,
    ctx: Arc<Context>,
    regained: tokio::sync::watch::Sender<()>,
) {
    loop {
        lock.hold().await;
        ctx.set_leading(false);
        tracing::warn!(
            "stopped reconciling: this replica no longer holds the leader lease; \
             standing by, and taking over again when the lease is free"
        );
        lock.acquire(Duration::from_secs(2)).await;
        ctx.set_leading(true);
        let _ = regained.send(());
    }
}

/// What reconciles every mirror, besides changes to the mirrors and their children.
struct Triggers {
    /// A mirror's claims changed (see [`Context::claimed`]).
    claims_changed: futures::stream::BoxStream<'static, ()>,
    /// A node's report changed, or a node came or went (see [`node_reports`]).
    node_reports: futures::stream::BoxStream<'static, ()>,
    /// This replica leads again.
    regained: futures::stream::BoxStream<'static, ()>,
    /// The pods the rewrite webhook missed changed (see [`rewrite::audit`]).
    missed_changed: futures::stream::BoxStream<'static, ()>,
}

/// The mirrors' controller: their children owned, the Secrets they read watched, and
/// every mirror looked at again on each of `triggers`, until `shutdown`.
fn reconcile_mirrors(
    controller: Controller<RegistryMirror>,
    client: &Client,
    options: &ControllerOptions,
    triggers: Triggers,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ctx: &Arc<Context>,
) -> impl Future<Output = ()> {
    let label = "app.kubernetes.io/managed-by=pullthrough-controller";
    let owned = || watcher::Config::default().labels(label);
    let ns = &options.namespace;
    let store = controller.store();
    controller
        .owns(scoped::<ConfigMap>(client, ns), owned())
        .owns(scoped::<Deployment>(client, ns), owned())
        .owns(scoped::<StatefulSet>(client, ns), owned())
        .owns(scoped::<Service>(client, ns), owned())
        .owns(scoped::<PodDisruptionBudget>(client, ns), owned())
        .owns(scoped::<DaemonSet>(client, ns), owned())
        // A Secret a mirror reads (its spec names it, or the controller made it for the
        // mirror) that is created, changed or deleted.
        .reconcile_all_on(secret_changes(scoped(client, ns), store))
        // A mirror that changes, breaks, is fixed or goes can hand a registry to, or
        // take one from, the mirrors that also claim it: its reconcile (which sees its
        // new state) says so (see `Context::claimed`), and all are looked at again.
        .reconcile_all_on(triggers.claims_changed)
        // Node agents report through Node annotations: the mirrors a node names (and,
        // when a node's containerd state changes, the same ones) are looked at again.
        .reconcile_all_on(triggers.node_reports)
        .reconcile_all_on(triggers.regained)
        .reconcile_all_on(triggers.missed_changed)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
}

/// Yields whenever a Secret that a mirror in `mirrors` reads comes, changes or goes
/// (only the Secrets' metadata is watched: their data is read by the reconcile).
fn secret_changes(
    api: Api<PartialObjectMeta<Secret>>,
    mirrors: Store<RegistryMirror>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    watcher::watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects()
        .filter_map(move |secret| {
            let read = secret.ok().is_some_and(|secret| {
                let (ns, name) = (secret.namespace(), secret.name_any());
                mirrors
                    .state()
                    .iter()
                    .any(|m| m.namespace() == ns && builders::secret_names(m).contains(&name))
            });
            futures::future::ready(read.then_some(()))
        })
}

/// A stream with an item each time the watched value is sent (not for its first value).
/// Fills the Node store and yields whenever a node's report (the mirrors configured on
/// it, its runtime's state) changes, or a node comes or goes: every mirror's node count
/// may have changed, and a mirror being deleted may be waiting on that node. Other Node
/// updates (heartbeats, every few seconds per node) yield nothing.
fn node_reports(
    client: &Client,
    writer: reflector::store::Writer<Node>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let reports = Arc::new(Mutex::new(HashMap::<String, Option<[String; 4]>>::new()));
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
                [
                    crate::api::mirror::NODE_ANNOTATION,
                    crate::api::mirror::CONTAINERD_ANNOTATION,
                    crate::api::mirror::RUNTIME_ANNOTATION,
                    crate::api::mirror::REGISTRIES_CONF_ANNOTATION,
                ]
                .map(report)
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
    /// The webhook cannot serve.
    #[error(transparent)]
    Webhook(#[from] rewrite::ServeError),
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

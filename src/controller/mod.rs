//! `pullthrough controller`: reconciles each RegistryMirror into the objects that run its
//! cache (ConfigMap, Deployment or StatefulSet, Service, PodDisruptionBudget,
//! ServiceMonitor) and keeps its status true. Talks to Kubernetes; the object shapes come
//! from the pure [`builders`] and the status from the pure [`status`] module.

pub mod builders;
pub mod leader;
pub mod status;

use crate::api::dockerconfig::credentials_for;
use crate::api::mirror::{FINALIZER, RegistryMirror, RegistryMirrorStatus, mirror_key};
use builders::ChildSettings;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use status::{Observed, Problem};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "pullthrough-controller";
/// How long a deleted mirror waits for node agents before letting go anyway.
pub const NODE_CLEANUP_TIMEOUT: Duration = Duration::from_secs(600);
const SERVICE_MONITOR_CRD: &str = "servicemonitors.monitoring.coreos.com";

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
}

impl Error {
    /// Label value of the error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_error",
            Error::NoNamespace => "invalid_object",
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// The controller's metrics.
#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    reconciles: IntCounterVec,
    duration: HistogramVec,
}

impl ControllerMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> ControllerMetrics {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "pullthrough_reconcile_total",
                "RegistryMirror reconciles by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "pullthrough_reconcile_duration_seconds",
                "Time taken by one RegistryMirror reconcile.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["result"],
        )
        .expect("valid metric");
        // At zero from the start; error results appear as they happen.
        reconciles.with_label_values(&["success"]);
        duration.with_label_values(&["success"]);
        let names = crate::server::register_all(
            &registry,
            vec![Box::new(reconciles.clone()), Box::new(duration.clone())],
        );
        ControllerMetrics {
            registry,
            names,
            reconciles,
            duration,
        }
    }

    fn observe(&self, result: &'static str, seconds: f64) {
        self.reconciles.with_label_values(&[result]).inc();
        self.duration.with_label_values(&[result]).observe(seconds);
    }

    /// Names of every series this registry can export.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        crate::server::render(&self.registry)
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
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
    /// Metrics.
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
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            store,
            metrics: ControllerMetrics::new(),
            failures: Mutex::new(HashMap::new()),
            leading: std::sync::atomic::AtomicBool::new(true),
            claimants: Mutex::new(HashMap::new()),
            claims_changed: None,
        }
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

/// Reconciles one mirror, counting it in metrics.
pub async fn reconcile(mirror: Arc<RegistryMirror>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leading() {
        // Everything is reconciled again when the lease comes back (see `run`).
        return Ok(Action::await_change());
    }
    let started = std::time::Instant::now();
    let result = reconcile_inner(&mirror, &ctx).await;
    let label = match &result {
        Ok(_) => "success",
        Err(e) => e.metric_label(),
    };
    ctx.metrics.observe(label, started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("lock")
            .remove(&ObjectRef::from_obj(&*mirror));
    }
    result
}

/// Requeue with exponential backoff per object: 5s, 10s, 20s ... up to 5 minutes.
pub fn error_policy(mirror: Arc<RegistryMirror>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().expect("lock");
    let n = failures.entry(ObjectRef::from_obj(&*mirror)).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(5u64.saturating_mul(1 << (*n - 1).min(6)))
        .min(Duration::from_secs(300));
    tracing::warn!(mirror = %mirror.name_any(), namespace = ?mirror.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(mirror: &Arc<RegistryMirror>, ctx: &Context) -> Result<Action, Error> {
    let ns = mirror.namespace().ok_or(Error::NoNamespace)?;
    let mirrors: Api<RegistryMirror> = Api::namespaced(ctx.client.clone(), &ns);
    if mirror.meta().deletion_timestamp.is_some() {
        return cleanup(mirror, ctx, &mirrors).await;
    }
    if !mirror.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = mirror.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        set_finalizers(&mirrors, mirror, finalizers, "adding the finalizer").await?;
        // The patch is itself a change that brings the mirror back here.
        return Ok(Action::await_change());
    }
    apply(mirror, ctx, &ns, &mirrors).await
}

async fn apply_child<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(kube_err(format!("applying {} {name}", K::kind(&()))))
}

async fn delete_child<K>(client: &Client, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(kube_err(format!("deleting {} {name}", K::kind(&())))(e)),
    }
}

/// Removes what runs a mirror (workload, Service, PDB, configuration): a mirror that
/// serves no registry must not hold pods or volumes.
async fn delete_children(client: &Client, ns: &str, child: &str) -> Result<(), Error> {
    delete_child::<Deployment>(client, ns, child).await?;
    delete_child::<StatefulSet>(client, ns, child).await?;
    delete_child::<PodDisruptionBudget>(client, ns, child).await?;
    delete_child::<Service>(client, ns, child).await?;
    delete_child::<ConfigMap>(client, ns, child).await
}

/// Reads the credentials Secrets: their data for the config hash, or the problem.
async fn read_secrets(
    mirror: &RegistryMirror,
    ctx: &Context,
    ns: &str,
) -> Result<Result<Vec<Vec<u8>>, Problem>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut out = Vec::new();
    for u in &mirror.spec.upstreams {
        let Some(reference) = &u.credentials_secret_ref else {
            continue;
        };
        let secret = secrets
            .get_opt(&reference.name)
            .await
            .map_err(kube_err(format!("reading Secret {}", reference.name)))?;
        let Some(secret) = secret else {
            return Ok(Err(Problem {
                reason: "SecretNotFound",
                message: format!(
                    "Secret {ns}/{} (credentials of {}) does not exist",
                    reference.name, u.registry
                ),
            }));
        };
        let data = secret
            .data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
            .map(|b| b.0.clone());
        let invalid = |why: String| Problem {
            reason: "SecretInvalid",
            message: format!(
                "Secret {ns}/{} (credentials of {}): {why}",
                reference.name, u.registry
            ),
        };
        let Some(data) = data else {
            return Ok(Err(invalid(
                "must be of type kubernetes.io/dockerconfigjson with a .dockerconfigjson key"
                    .into(),
            )));
        };
        match credentials_for(&data, &u.registry) {
            Ok(Some(_)) => out.push(data),
            Ok(None) => return Ok(Err(invalid(format!("has no entry for {}", u.registry)))),
            Err(e) => return Ok(Err(invalid(e.to_string()))),
        }
    }
    Ok(Ok(out))
}

async fn service_monitors_available(client: &Client) -> Result<bool, Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(SERVICE_MONITOR_CRD).await {
        Ok(found) => Ok(found.is_some()),
        // Without permission to read CRDs we cannot tell: behave as if absent.
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(false),
        Err(e) => Err(kube_err("looking for the ServiceMonitor CRD")(e)),
    }
}

async fn apply(
    mirror: &Arc<RegistryMirror>,
    ctx: &Context,
    ns: &str,
    mirrors: &Api<RegistryMirror>,
) -> Result<Action, Error> {
    let client = &ctx.client;
    let name = mirror.name_any();
    let child = builders::child_name(mirror);
    let mut observed = Observed {
        generation: mirror.meta().generation,
        replicas: mirror.spec.replicas,
        ..Observed::default()
    };
    let config = mirror.spec.proxy_config();
    let secrets = match &config {
        Ok(_) => read_secrets(mirror, ctx, ns).await?,
        Err(_) => Ok(Vec::new()),
    };
    // A mirror that cannot run claims nothing; one that can serves the registries no
    // older working mirror serves.
    let can = config.is_ok() && secrets.is_ok();
    if can {
        (observed.served, observed.conflicts) =
            status::claims(mirror, &ctx.store.state(), |m| ctx.can_claim(m));
    }
    ctx.claimed(mirror, can, false);
    match (config, secrets) {
        (Err(message), _) => {
            observed.problem = Some(Problem {
                reason: "InvalidSpec",
                message,
            });
        }
        (Ok(_), Err(problem)) => observed.problem = Some(problem),
        // Every registry is served by an older mirror: nothing to run.
        (Ok(_), Ok(_)) if observed.served.is_empty() => delete_children(client, ns, &child).await?,
        (Ok(config), Ok(secret_data)) => {
            let yaml = config.to_yaml();
            let hash = builders::config_hash(&yaml, &secret_data);
            apply_child(client, ns, &builders::config_map(mirror, &yaml)).await?;
            if builders::uses_pvc(mirror) {
                let sts = apply_child(
                    client,
                    ns,
                    &builders::stateful_set(mirror, &ctx.settings, &hash),
                )
                .await?;
                delete_child::<Deployment>(client, ns, &child).await?;
                let st = sts.status.unwrap_or_default();
                observed.ready_replicas = st.ready_replicas.unwrap_or(0);
                observed.updated_replicas = st.updated_replicas.unwrap_or(0);
            } else {
                let dep = apply_child(
                    client,
                    ns,
                    &builders::deployment(mirror, &ctx.settings, &hash),
                )
                .await?;
                delete_child::<StatefulSet>(client, ns, &child).await?;
                let st = dep.status.unwrap_or_default();
                observed.ready_replicas = st.ready_replicas.unwrap_or(0);
                observed.updated_replicas = st.updated_replicas.unwrap_or(0);
            }
            let svc = apply_child(client, ns, &builders::service(mirror)).await?;
            observed.endpoint = builders::endpoint(&svc);
            if mirror.spec.replicas > 1 {
                apply_child(client, ns, &builders::pdb(mirror)).await?;
            } else {
                delete_child::<PodDisruptionBudget>(client, ns, &child).await?;
            }
            if service_monitors_available(client).await? {
                let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor");
                let ar = ApiResource::from_gvk(&gvk);
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
                api.patch(
                    &child,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(builders::service_monitor(mirror)),
                )
                .await
                .map_err(kube_err("applying ServiceMonitor"))?;
            }
        }
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing nodes"))?;
    let (nodes, ignoring) = status::count_nodes(mirror, &node_list.items);
    observed.nodes = Some(nodes);
    observed.nodes_ignoring = ignoring;

    let previous = mirror.status.clone();
    let next = status::build_status(previous.as_ref(), &observed, Timestamp::now());
    if previous.as_ref() != Some(&next) {
        let patch = serde_json::json!({ "status": next });
        mirrors
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_err("updating status"))?;
    }
    publish_transitions(ctx, mirror, previous.as_ref(), &next).await;
    tracing::info!(mirror = %name, namespace = %ns, ready = observed.ready_replicas,
        endpoint = ?observed.endpoint, problem = ?observed.problem.as_ref().map(|p| p.reason),
        served = ?observed.served, lost = observed.conflicts.len(), "reconciled");
    // Node agents report through Node annotations, which are not watched: look again soon.
    Ok(Action::requeue(Duration::from_secs(60)))
}

async fn publish_transitions(
    ctx: &Context,
    mirror: &RegistryMirror,
    previous: Option<&RegistryMirrorStatus>,
    next: &RegistryMirrorStatus,
) {
    let reference: ObjectReference = mirror.object_ref(&());
    for c in status::transitions(previous, next) {
        let warning = (c.type_ == status::READY && c.status == "False")
            || ((c.type_ == status::DEGRADED || c.type_ == status::CONFLICT) && c.status == "True");
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.clone(),
            note: Some(format!("{}={}: {}", c.type_, c.status, c.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        record(ctx, &reference, &event).await;
    }
}

/// Publishes an Event; failing to is logged, never fatal.
async fn record(ctx: &Context, reference: &ObjectReference, event: &Event) {
    if let Err(e) = ctx.recorder.publish(event, reference).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// Replaces the mirror's finalizers, failing if it changed since it was read.
async fn set_finalizers(
    mirrors: &Api<RegistryMirror>,
    mirror: &RegistryMirror,
    finalizers: Vec<String>,
    action: &str,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": mirror.resource_version()}
    });
    mirrors
        .patch(
            &mirror.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err(action))?;
    Ok(())
}

/// A mirror is being deleted: its children go by owner reference; it stays until no node
/// agent reports it configured (or the timeout passes).
async fn cleanup(
    mirror: &Arc<RegistryMirror>,
    ctx: &Context,
    mirrors: &Api<RegistryMirror>,
) -> Result<Action, Error> {
    // Going: it claims nothing from now on.
    ctx.claimed(mirror, false, true);
    if !mirror.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let key = mirror_key(&mirror.namespace().unwrap_or_default(), &mirror.name_any());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node_list = nodes
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing nodes"))?;
    let pending: Vec<String> = node_list
        .items
        .iter()
        .filter(|n| status::configured_on(n, &key))
        .map(|n| n.name_any())
        .collect();
    let waited = mirror
        .meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
        .unwrap_or_default();
    let reference = mirror.object_ref(&());
    if !pending.is_empty() && waited < NODE_CLEANUP_TIMEOUT {
        tracing::info!(mirror = %key, nodes = ?pending, "waiting for node agents to remove the mirror's hosts.toml");
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let (type_, reason, note) = if pending.is_empty() {
        (
            EventType::Normal,
            "NodesCleaned",
            "no node is configured for this mirror any more".to_string(),
        )
    } else {
        (
            EventType::Warning,
            "NodeCleanupTimedOut",
            format!(
                "gave up waiting for nodes {} after {:?}",
                pending.join(", "),
                NODE_CLEANUP_TIMEOUT
            ),
        )
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Delete".into(),
        secondary: None,
    };
    record(ctx, &reference, &event).await;
    let finalizers: Vec<String> = mirror
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(mirrors, mirror, finalizers, "removing the finalizer").await?;
    Ok(Action::await_change())
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

    let lock = leader::LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        "pullthrough-controller",
        &options.identity,
        Duration::from_secs(15),
    );
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    tokio::select! {
        _ = lock.acquire(Duration::from_secs(2)) => {}
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
    let leadership = {
        let ctx = ctx.clone();
        async move {
            loop {
                lock.hold().await;
                ctx.leading
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(
                    "stopped reconciling: this replica no longer holds the leader lease; \
                     standing by, and taking over again when the lease is free"
                );
                lock.acquire(Duration::from_secs(2)).await;
                ctx.leading.store(true, std::sync::atomic::Ordering::SeqCst);
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
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |node: Node| {
                node.annotations()
                    .get(crate::api::mirror::NODE_ANNOTATION)
                    .map(|v| crate::api::mirror::parse_node_annotation(v))
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|key| key.split_once('/'))
                    .map(|(ns, name)| ObjectRef::new(name).within(ns))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(regained)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = leadership => {}
    }
    let _ = stop_tx.send(true);
    let _ = ops_task.await;
    if ctx.leading() {
        lock_release(&client, &options).await;
    }
    Ok(())
}

/// Gives the Lease up on shutdown, so that another replica takes over at once.
async fn lock_release(client: &Client, options: &ControllerOptions) {
    leader::LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        "pullthrough-controller",
        &options.identity,
        Duration::from_secs(15),
    )
    .release()
    .await;
}

/// A stream with an item each time the watched value is sent (not for its first value).
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

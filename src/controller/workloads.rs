//! Warm before the rollout (docs/operations.md): for mirrors with
//! `spec.cache.prefetchFromWorkloads`, the images of pod templates (Deployments,
//! StatefulSets, DaemonSets, Jobs, CronJobs) are prefetched into the mirror's cache
//! whenever a template's image set changes, before the scheduler has placed a pod. The
//! controller watches the workloads (list and watch, keeping only each one's image set),
//! asks every ready replica of each mirror that serves an image's registry to prefetch it
//! (`POST /admin/prefetch` on its operations port, with the admin token of the Secret the
//! controller made), for the platforms of the cluster's nodes, then follows the progress
//! and records an Event on the mirror per image (`Prefetched image ... in 3.2s`) and the
//! count in `status.prefetchedImages`. Every replica is also told the whole set of
//! images its mirror's workloads use (`PUT /admin/in-use`), which eviction keeps like
//! pins: after each change, and every five minutes for replicas that restarted.

use super::{Context, Error, MANAGER, kube_err};
use crate::api::docker_hub::registry_key;
use crate::api::mirror::{ADMIN_TOKEN, RegistryMirror};
use crate::controller::builders;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// How often the progress of requested prefetches is looked at, and for how long.
const FOLLOW_EVERY: Duration = Duration::from_secs(2);
const FOLLOW_FOR: Duration = Duration::from_secs(1800);

/// The images of a pod spec: its containers' and init containers'.
pub fn pod_images(spec: Option<&PodSpec>) -> BTreeSet<String> {
    let Some(spec) = spec else {
        return BTreeSet::new();
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.image.clone())
        .filter(|i| !i.is_empty())
        .collect()
}

/// A workload's identity and the images of its pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `Kind/namespace/name`.
    pub key: String,
    pub namespace: String,
    pub images: BTreeSet<String>,
}

fn workload<K: Resource<DynamicType = ()> + ResourceExt>(
    obj: &K,
    spec: Option<&PodSpec>,
) -> Workload {
    let namespace = obj.namespace().unwrap_or_default();
    Workload {
        key: format!("{}/{namespace}/{}", K::kind(&()), obj.name_any()),
        namespace,
        images: pod_images(spec),
    }
}

/// Whether `labels` match `selector` (matchLabels and matchExpressions: In, NotIn,
/// Exists, DoesNotExist); no selector matches everything.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else {
        return true;
    };
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let has = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => has.is_some_and(|v| values.contains(v)),
            "NotIn" => !has.is_some_and(|v| values.contains(v)),
            "Exists" => has.is_some(),
            "DoesNotExist" => has.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Which mirrors prefetch which of `images` of a workload in a namespace labelled
/// `namespace_labels`: those with `cache.prefetchFromWorkloads` selecting the namespace,
/// each for the images of the registries it serves (its status says), written out whole
/// (`docker.io/library/alpine:3.20`).
pub fn plan(
    mirrors: &[Arc<RegistryMirror>],
    namespace_labels: &BTreeMap<String, String>,
    images: &BTreeSet<String>,
) -> Vec<(Arc<RegistryMirror>, Vec<String>)> {
    let mut out = Vec::new();
    for m in mirrors {
        let Some(spec) = &m.spec.cache.prefetch_from_workloads else {
            continue;
        };
        if m.meta().deletion_timestamp.is_some()
            || !selects(spec.namespace_selector.as_ref(), namespace_labels)
        {
            continue;
        }
        let served: BTreeSet<String> = m
            .status
            .iter()
            .flat_map(|s| s.served_registries.iter().map(|r| registry_key(r)))
            .collect();
        let mine: Vec<String> = images
            .iter()
            .filter_map(|i| crate::api::image_ref::parse(i).ok())
            .filter(|r| served.contains(&registry_key(&r.registry)))
            .map(|r| r.to_string())
            .collect();
        if !mine.is_empty() {
            out.push((m.clone(), mine));
        }
    }
    out
}

/// The platforms of the cluster's nodes (`linux/amd64`), from their status.
pub fn platforms(nodes: &[Node]) -> Vec<String> {
    let set: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.node_info.as_ref())
        .map(|i| format!("{}/{}", i.operating_system, i.architecture))
        .collect();
    set.into_iter().collect()
}

/// The images each workload had when last seen (with its namespace), so that only
/// changes ask for prefetches, and what every mirror's workloads use is known.
#[derive(Default)]
pub struct Seen(HashMap<String, (String, BTreeSet<String>)>);

impl Seen {
    /// Records `w`; the images to prefetch for it: all of them when its set changed (or
    /// it is new), none when not.
    pub fn changed(&mut self, w: &Workload) -> Option<BTreeSet<String>> {
        if w.images.is_empty() {
            self.0.remove(&w.key);
            return None;
        }
        let now = (w.namespace.clone(), w.images.clone());
        match self.0.insert(w.key.clone(), now) {
            Some((_, before)) if before == w.images => None,
            _ => Some(w.images.clone()),
        }
    }

    /// Every workload seen: its namespace and images.
    pub fn all(&self) -> Vec<(String, BTreeSet<String>)> {
        self.0.values().cloned().collect()
    }

    /// The namespaces of the workloads seen.
    pub fn namespaces(&self) -> BTreeSet<String> {
        self.0.values().map(|(ns, _)| ns.clone()).collect()
    }

    /// What the workloads seen use, per mirror that prefetches for them (by uid): every
    /// image of a registry it serves, of a workload in a namespace it selects (labels
    /// from `labels`). A prefetching mirror with none gets an empty set.
    pub fn in_use(
        &self,
        mirrors: &[Arc<RegistryMirror>],
        labels: &HashMap<String, BTreeMap<String, String>>,
    ) -> BTreeMap<String, (Arc<RegistryMirror>, BTreeSet<String>)> {
        let mut out: BTreeMap<String, (Arc<RegistryMirror>, BTreeSet<String>)> = mirrors
            .iter()
            .filter(|m| m.spec.cache.prefetch_from_workloads.is_some())
            .map(|m| (m.uid().unwrap_or_default(), (m.clone(), BTreeSet::new())))
            .collect();
        let none = BTreeMap::new();
        for (ns, images) in self.0.values() {
            let labels = labels.get(ns).unwrap_or(&none);
            for (m, mine) in plan(mirrors, labels, images) {
                if let Some((_, set)) = out.get_mut(&m.uid().unwrap_or_default()) {
                    set.extend(mine);
                }
            }
        }
        out
    }

    /// Forgets a deleted workload.
    pub fn gone(&mut self, key: &str) {
        self.0.remove(key);
    }
}

/// A ready replica's operations port (`http://10.1.2.3:9095`), from its pod; `None`
/// while the pod is not Ready or has no IP.
fn replica_url(ctx: &Context, pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let ip = status
        .pod_ip
        .as_deref()
        .filter(|ip| ready && !ip.is_empty())?;
    Some(builders::url("http", ip, ctx.ops_port))
}

/// The addresses of the operations ports of a mirror's ready replicas.
async fn replicas(ctx: &Context, mirror: &RegistryMirror) -> Result<Vec<String>, Error> {
    let ns = mirror.namespace().ok_or(Error::NoNamespace)?;
    let selector = builders::selector(&builders::selector_labels(mirror));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err(format!(
            "listing the pods of {}",
            mirror.name_any()
        )))?;
    Ok(list
        .items
        .iter()
        .filter_map(|p| replica_url(ctx, p))
        .collect())
}

/// The admin token of a mirror's proxies, from the Secret the controller made.
async fn admin_token(ctx: &Context, mirror: &RegistryMirror) -> Result<Option<String>, Error> {
    let ns = mirror.namespace().ok_or(Error::NoNamespace)?;
    let name = builders::admin_secret_name(mirror);
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading Secret {name}")))?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|d| d.get(ADMIN_TOKEN).cloned())
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string()))
}

/// The labels of namespace `ns` (none when it cannot be read).
async fn namespace_labels(ctx: &Context, ns: &str) -> BTreeMap<String, String> {
    match Api::<Namespace>::all(ctx.client.clone()).get_opt(ns).await {
        Ok(Some(n)) => n.labels().clone(),
        Ok(None) => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(namespace = ns, error = %e, "cannot read a namespace's labels");
            BTreeMap::new()
        }
    }
}

/// The admin token and the ready replicas' addresses of a mirror; `None` while it has no
/// token Secret yet.
async fn targets(
    ctx: &Context,
    mirror: &RegistryMirror,
) -> Result<Option<(String, Vec<String>)>, Error> {
    let Some(token) = admin_token(ctx, mirror).await? else {
        tracing::info!(mirror = %mirror.name_any(), "no admin token Secret yet: asked later");
        return Ok(None);
    };
    Ok(Some((token, replicas(ctx, mirror).await?)))
}

/// Asks for the prefetches a workload's new image set calls for (its namespace labelled
/// `namespace_labels`), and follows them (on tasks of their own) to Events and the
/// status. Returns the requests sent: (mirror, replica, images).
pub async fn prefetch_for(
    ctx: &Arc<Context>,
    namespace_labels: &BTreeMap<String, String>,
    images: &BTreeSet<String>,
) -> Result<Vec<(String, String, Vec<String>)>, Error> {
    let mirrors = ctx.store.state();
    let wanted = plan(&mirrors, namespace_labels, images);
    tracing::debug!(
        mirrors = mirrors.len(),
        wanted = wanted.len(),
        "prefetch plan"
    );
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let platforms = platforms(&ctx.nodes().await?);
    let mut sent = Vec::new();
    for (mirror, images) in wanted {
        let Some((token, urls)) = targets(ctx, &mirror).await? else {
            continue;
        };
        tracing::debug!(mirror = %mirror.name_any(), replicas = ?urls, platforms = ?platforms, "prefetching on");
        for url in urls {
            if ask(ctx, &mirror, &url, &token, &images, &platforms).await {
                sent.push((mirror.name_any(), url, images.clone()));
            }
        }
    }
    Ok(sent)
}

/// Asks the replica at `url` to prefetch `images` and, when it takes the request,
/// follows it (on a task of its own) to Events and the status. Whether it took it.
async fn ask(
    ctx: &Arc<Context>,
    mirror: &Arc<RegistryMirror>,
    url: &str,
    token: &str,
    images: &[String],
    platforms: &[String],
) -> bool {
    match crate::proxy::admin::prefetch(url, images, platforms, token).await {
        Ok(answer) => {
            tracing::info!(mirror = %mirror.name_any(), replica = %url, images = ?images,
                queued = ?answer.queued, "asked for a prefetch");
            tokio::spawn(follow(
                ctx.clone(),
                mirror.clone(),
                url.to_string(),
                token.to_string(),
                images.to_vec(),
            ));
            true
        }
        Err(e) => {
            tracing::warn!(mirror = %mirror.name_any(), replica = %url, error = %e,
                "a replica refused a prefetch request");
            false
        }
    }
}

/// A proxy pod that became ready since the controller started: its cache may be empty
/// (a new pod, a new volume), so it is asked for every image its mirror's workloads
/// use, not only for those that change from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReplica {
    pub namespace: String,
    /// Its mirror's name (the pod's [`builders::INSTANCE_LABEL`]).
    pub mirror: String,
    pub url: String,
}

/// Warms a new replica: asks it to prefetch every image its mirror's workloads use
/// (as `seen`, their namespaces labelled as `labels` says) and tells it they are in use.
/// The images asked for, or `None` while that cannot be known yet (its mirror not yet
/// reconciled, no admin token Secret yet): ask again later. A replica of a mirror that
/// is gone or does not prefetch is done, with nothing asked.
pub async fn warm(
    ctx: &Arc<Context>,
    seen: &Seen,
    labels: &HashMap<String, BTreeMap<String, String>>,
    replica: &NewReplica,
) -> Result<Option<Vec<String>>, Error> {
    let key = kube::runtime::reflector::ObjectRef::new(&replica.mirror).within(&replica.namespace);
    let Some(mirror) = ctx.store.get(&key) else {
        return Ok(Some(Vec::new()));
    };
    if mirror.spec.cache.prefetch_from_workloads.is_none() {
        return Ok(Some(Vec::new()));
    }
    if mirror
        .status
        .as_ref()
        .is_none_or(|s| s.served_registries.is_empty())
    {
        return Ok(None);
    }
    let Some(token) = admin_token(ctx, &mirror).await? else {
        return Ok(None);
    };
    let images: Vec<String> = seen
        .in_use(std::slice::from_ref(&mirror), labels)
        .into_values()
        .flat_map(|(_, set)| set)
        .collect();
    if !images.is_empty() {
        let platforms = platforms(&ctx.nodes().await?);
        if !ask(ctx, &mirror, &replica.url, &token, &images, &platforms).await {
            return Err(Error::Replica(format!(
                "{} did not take the prefetch of its mirror's images",
                replica.url
            )));
        }
    }
    crate::proxy::admin::set_in_use(&replica.url, &images, &token)
        .await
        .map_err(|e| Error::Replica(format!("{}: {e}", replica.url)))?;
    Ok(Some(images))
}

/// Tells every ready replica of each prefetching mirror which images its workloads use
/// (kept from eviction), when that changed since `sent` or when `resync` (replicas that
/// restarted have forgotten). Returns the requests sent: (mirror, replica, images).
pub async fn publish_in_use(
    ctx: &Context,
    seen: &Seen,
    labels: &HashMap<String, BTreeMap<String, String>>,
    sent: &mut HashMap<String, BTreeSet<String>>,
    resync: bool,
) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for (uid, (mirror, images)) in seen.in_use(&ctx.store.state(), labels) {
        if !resync && sent.get(&uid) == Some(&images) {
            continue;
        }
        let (token, urls) = match targets(ctx, &mirror).await {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(mirror = %mirror.name_any(), error = %e,
                    "cannot tell the replicas the images in use");
                continue;
            }
        };
        let list: Vec<String> = images.iter().cloned().collect();
        let mut all = true;
        for url in urls {
            match crate::proxy::admin::set_in_use(&url, &list, &token).await {
                Ok(_) => out.push((mirror.name_any(), url, list.clone())),
                Err(e) => {
                    all = false;
                    tracing::warn!(mirror = %mirror.name_any(), replica = %url, error = %e,
                        "a replica refused the images in use");
                }
            }
        }
        if all {
            sent.insert(uid, images);
        }
    }
    out
}

/// Follows `images` on one replica until each is done or failed (or [`FOLLOW_FOR`]),
/// recording an Event on the mirror per image and counting the done ones in its status.
async fn follow(
    ctx: Arc<Context>,
    mirror: Arc<RegistryMirror>,
    url: String,
    token: String,
    images: Vec<String>,
) {
    let mut waiting: BTreeSet<String> = images.into_iter().collect();
    let deadline = tokio::time::Instant::now() + FOLLOW_FOR;
    while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let progress = match crate::proxy::admin::prefetch_progress(&url, &token).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(replica = %url, error = %e, "cannot read prefetch progress");
                continue;
            }
        };
        for p in progress.images {
            use crate::proxy::admin::api::State;
            if !waiting.contains(&p.image) || !matches!(p.state, State::Done | State::Failed) {
                continue;
            }
            waiting.remove(&p.image);
            let seconds = p.seconds.unwrap_or_default();
            let (type_, reason, note) = if p.state == State::Done {
                ctx.count_prefetched(&mirror);
                (
                    EventType::Normal,
                    "Prefetched",
                    format!("Prefetched image {} in {seconds:.1}s ({url})", p.image),
                )
            } else {
                (
                    EventType::Warning,
                    "PrefetchFailed",
                    format!(
                        "Could not prefetch image {}: {} ({url})",
                        p.image,
                        p.error.unwrap_or_default()
                    ),
                )
            };
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Prefetch".into(),
                secondary: None,
            };
            // An Event of its own per image: the shared recorder folds Events of one
            // reason on one object into a series that keeps the first one's note.
            let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
            if let Err(e) = recorder.publish(&event, &mirror.object_ref(&())).await {
                tracing::warn!(error = %e, "could not publish an event");
            }
        }
        write_count(&ctx, &mirror).await;
    }
}

/// Writes the mirror's count of prefetched images into its status (its own field
/// manager: the rest of the status is the reconcile's).
async fn write_count(ctx: &Context, mirror: &RegistryMirror) {
    let Some(ns) = mirror.namespace() else {
        return;
    };
    let count = ctx.prefetched(mirror);
    let patch = serde_json::json!({
        "apiVersion": "pullthrough.dev/v1alpha1",
        "kind": "RegistryMirror",
        "status": {"prefetchedImages": count},
    });
    let api: Api<RegistryMirror> = Api::namespaced(ctx.client.clone(), &ns);
    let manager = format!("{MANAGER}-prefetch");
    if let Err(e) = api
        .patch_status(
            &mirror.name_any(),
            &PatchParams::apply(&manager).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        tracing::warn!(mirror = %mirror.name_any(), error = %e, "cannot write prefetchedImages");
    }
}

/// What the watches report: a workload (present or deleted), or a proxy pod.
enum Change {
    Workload(Workload, bool),
    /// A proxy pod seen: its uid and, while it is ready, where to reach it; `listed`
    /// when it came from a (re)list rather than as a change.
    Pod {
        uid: String,
        ready: Option<NewReplica>,
        listed: bool,
    },
    PodGone(String),
    /// A (re)list of the proxy pods is complete.
    PodsListed,
}

/// The replicas to warm: those that became ready since the controller first listed the
/// proxy pods (those it listed then had every workload's images asked for at the
/// start), each once.
#[derive(Default)]
struct Replicas {
    listed_once: bool,
    known: std::collections::HashSet<String>,
    pending: BTreeMap<String, NewReplica>,
    /// How often each pending replica refused.
    refused: HashMap<String, u32>,
}

impl Replicas {
    fn saw(&mut self, change: Change) {
        match change {
            Change::Pod { uid, ready, listed } => {
                if self.known.contains(&uid) {
                    return;
                }
                let Some(replica) = ready else {
                    return;
                };
                if listed && !self.listed_once {
                    self.known.insert(uid);
                } else {
                    self.pending.insert(uid, replica);
                }
            }
            Change::PodGone(uid) => {
                self.known.remove(&uid);
                self.pending.remove(&uid);
                self.refused.remove(&uid);
            }
            Change::PodsListed => self.listed_once = true,
            Change::Workload(..) => {}
        }
    }

    /// Warms the pending replicas that can be warmed now.
    async fn warm(
        &mut self,
        ctx: &Arc<Context>,
        seen: &Seen,
        labels: &mut HashMap<String, BTreeMap<String, String>>,
    ) {
        if self.pending.is_empty() {
            return;
        }
        fill_labels(ctx, seen, labels).await;
        let pending = std::mem::take(&mut self.pending);
        for (uid, replica) in pending {
            match warm(ctx, seen, labels, &replica).await {
                Ok(Some(images)) => {
                    tracing::info!(replica = %replica.url, mirror = %replica.mirror,
                        images = images.len(), "warmed a new replica");
                    self.refused.remove(&uid);
                    self.known.insert(uid);
                }
                Ok(None) => {
                    self.pending.insert(uid, replica);
                }
                Err(e) => {
                    let tries = self.refused.entry(uid.clone()).or_default();
                    *tries += 1;
                    if *tries < WARM_TRIES {
                        tracing::warn!(replica = %replica.url, error = %e,
                            "cannot warm a new replica yet");
                        self.pending.insert(uid, replica);
                    } else {
                        tracing::warn!(replica = %replica.url, error = %e, tries = *tries,
                            "gave up warming a new replica: it gets new images as they change, and the images in use at the next resync");
                        self.refused.remove(&uid);
                        self.known.insert(uid);
                    }
                }
            }
        }
    }
}

/// How often replicas waiting to be warmed are tried again, and how many times one
/// that refuses is (5 minutes).
const WARM_RETRY: Duration = Duration::from_secs(5);
const WARM_TRIES: u32 = 60;

/// Reads the labels of the namespaces of `seen` that `labels` lacks.
async fn fill_labels(
    ctx: &Context,
    seen: &Seen,
    labels: &mut HashMap<String, BTreeMap<String, String>>,
) {
    for ns in seen.namespaces() {
        if let std::collections::hash_map::Entry::Vacant(e) = labels.entry(ns) {
            let l = namespace_labels(ctx, e.key()).await;
            e.insert(l);
        }
    }
}

/// Watches every workload kind in the cluster, asking for prefetches as image sets
/// change, and the mirrors' proxy pods, warming each new replica with every image in
/// use, until the streams end. Acts only while this replica leads; when it leads again
/// (`regained`), it asks for every workload's images, as at the start, since changes
/// while it stood by were not asked for.
pub async fn run(ctx: Arc<Context>, mut regained: tokio::sync::watch::Receiver<()>) {
    let client = ctx.client.clone();
    let events = futures::stream::select_all([
        watch(Api::<Deployment>::all(client.clone()), |d| {
            workload(d, d.spec.as_ref().and_then(|s| s.template.spec.as_ref()))
        }),
        watch(Api::<StatefulSet>::all(client.clone()), |s| {
            workload(s, s.spec.as_ref().and_then(|s| s.template.spec.as_ref()))
        }),
        watch(Api::<DaemonSet>::all(client.clone()), |d| {
            workload(d, d.spec.as_ref().and_then(|s| s.template.spec.as_ref()))
        }),
        watch(Api::<Job>::all(client.clone()), |j| {
            workload(j, j.spec.as_ref().and_then(|s| s.template.spec.as_ref()))
        }),
        watch(Api::<CronJob>::all(client.clone()), |c| {
            workload(
                c,
                c.spec
                    .as_ref()
                    .and_then(|s| s.job_template.spec.as_ref())
                    .and_then(|s| s.template.spec.as_ref()),
            )
        }),
        proxy_pods(ctx.clone(), Api::<Pod>::all(client)),
    ]);
    let mut seen = Seen::default();
    let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut sent: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut replicas = Replicas::default();
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_IN_USE, RESYNC_IN_USE);
    futures::pin_mut!(events);
    loop {
        let waiting = !replicas.pending.is_empty();
        let event = tokio::select! {
            e = events.next() => e,
            _ = resync.tick() => {
                if ctx.leading() {
                    labels.clear();
                    for ns in seen.namespaces() {
                        labels.insert(ns.clone(), namespace_labels(&ctx, &ns).await);
                    }
                    publish_in_use(&ctx, &seen, &labels, &mut sent, true).await;
                }
                continue;
            }
            Ok(()) = regained.changed() => {
                tracing::info!(workloads = seen.all().len(), "leading again: prefetching every workload's images");
                fill_labels(&ctx, &seen, &mut labels).await;
                // One request per namespace, for its workloads' images together.
                let mut by_namespace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for (ns, images) in seen.all() {
                    by_namespace.entry(ns).or_default().extend(images);
                }
                for (ns, images) in by_namespace {
                    if let Err(e) = prefetch_for(&ctx, &labels[&ns], &images).await {
                        tracing::warn!(namespace = %ns, error = %e, "cannot ask for a prefetch");
                    }
                }
                publish_in_use(&ctx, &seen, &labels, &mut sent, true).await;
                continue;
            }
            _ = tokio::time::sleep(WARM_RETRY), if waiting => {
                if ctx.leading() {
                    replicas.warm(&ctx, &seen, &mut labels).await;
                }
                continue;
            }
        };
        let (w, present) = match event {
            None => return,
            Some(Change::Workload(w, present)) => (w, present),
            Some(pod) => {
                replicas.saw(pod);
                if ctx.leading() {
                    replicas.warm(&ctx, &seen, &mut labels).await;
                }
                continue;
            }
        };
        let changed = if present {
            seen.changed(&w)
        } else {
            seen.gone(&w.key);
            None
        };
        // Most updates (a rollout's status, scaling) change no image: nothing to do.
        if !ctx.leading() || (present && changed.is_none()) {
            continue;
        }
        if !labels.contains_key(&w.namespace) {
            labels.insert(
                w.namespace.clone(),
                namespace_labels(&ctx, &w.namespace).await,
            );
        }
        if let Some(images) = &changed {
            tracing::debug!(workload = %w.key, images = ?images, "a workload's images changed");
            if let Err(e) = prefetch_for(&ctx, &labels[&w.namespace], images).await {
                tracing::warn!(workload = %w.key, error = %e, "cannot ask for a prefetch");
            }
        }
        publish_in_use(&ctx, &seen, &labels, &mut sent, false).await;
    }
}

/// How often every replica is told again which images are in use (replicas that
/// restarted have forgotten), and namespaces' labels are read again.
const RESYNC_IN_USE: Duration = Duration::from_secs(300);

/// One kind's workloads as (workload, present) events, retried with backoff.
fn watch<K, F>(api: Api<K>, extract: F) -> futures::stream::BoxStream<'static, Change>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    F: Fn(&K) -> Workload + Send + Sync + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |e| {
            let out = match e {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    Some(Change::Workload(extract(&o), true))
                }
                Ok(watcher::Event::Delete(o)) => Some(Change::Workload(extract(&o), false)),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "workload watch");
                    None
                }
            };
            futures::future::ready(out)
        })
        .boxed()
}

/// The mirrors' proxy pods (every mirror's, by their common labels) as changes,
/// retried with backoff.
fn proxy_pods(ctx: Arc<Context>, api: Api<Pod>) -> futures::stream::BoxStream<'static, Change> {
    let seen = move |p: &Pod, listed: bool| Change::Pod {
        uid: p.uid().unwrap_or_default(),
        ready: replica_url(&ctx, p).map(|url| NewReplica {
            namespace: p.namespace().unwrap_or_default(),
            mirror: p
                .labels()
                .get(builders::INSTANCE_LABEL)
                .cloned()
                .unwrap_or_default(),
            url,
        }),
        listed,
    };
    watcher::watcher(
        api,
        watcher::Config::default().labels(&builders::proxy_pods_selector()),
    )
    .default_backoff()
    .filter_map(move |e| {
        let out = match e {
            Ok(watcher::Event::InitApply(p)) => Some(seen(&p, true)),
            Ok(watcher::Event::Apply(p)) => Some(seen(&p, false)),
            Ok(watcher::Event::Delete(p)) => Some(Change::PodGone(p.uid().unwrap_or_default())),
            Ok(watcher::Event::InitDone) => Some(Change::PodsListed),
            Ok(watcher::Event::Init) => None,
            Err(e) => {
                tracing::debug!(error = %e, "proxy pod watch");
                None
            }
        };
        futures::future::ready(out)
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors_match_as_kubernetes_does() {
        let labels = BTreeMap::from([("team".to_string(), "a".to_string())]);
        assert!(selects(None, &labels));
        let sel = |labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: Some(exprs),
        };
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        assert!(selects(Some(&sel(&[("team", "a")], vec![])), &labels));
        assert!(!selects(Some(&sel(&[("team", "b")], vec![])), &labels));
        assert!(selects(
            Some(&sel(&[], vec![req("team", "In", &["a", "b"])])),
            &labels
        ));
        assert!(!selects(
            Some(&sel(&[], vec![req("team", "NotIn", &["a"])])),
            &labels
        ));
        assert!(selects(
            Some(&sel(&[], vec![req("team", "Exists", &[])])),
            &labels
        ));
        assert!(!selects(
            Some(&sel(&[], vec![req("env", "Exists", &[])])),
            &labels
        ));
        assert!(selects(
            Some(&sel(&[], vec![req("env", "DoesNotExist", &[])])),
            &labels
        ));
        assert!(!selects(
            Some(&sel(&[], vec![req("env", "Bogus", &[])])),
            &labels
        ));
    }

    #[test]
    fn only_changed_image_sets_are_prefetched() {
        let w = |images: &[&str]| Workload {
            key: "Deployment/default/app".into(),
            namespace: "default".into(),
            images: images.iter().map(|i| i.to_string()).collect(),
        };
        let mut seen = Seen::default();
        assert!(seen.changed(&w(&["alpine:3.20"])).is_some());
        assert!(seen.changed(&w(&["alpine:3.20"])).is_none());
        assert_eq!(
            seen.changed(&w(&["alpine:3.21", "busybox"])).unwrap().len(),
            2
        );
        assert_eq!(seen.namespaces().len(), 1);
        seen.gone("Deployment/default/app");
        assert!(seen.changed(&w(&["alpine:3.21", "busybox"])).is_some());
    }

    #[test]
    fn replicas_listed_at_the_start_are_not_warmed_and_later_ones_are_once() {
        let ready = |uid: &str| NewReplica {
            namespace: "ns".into(),
            mirror: "m".into(),
            url: format!("http://{uid}:9095"),
        };
        let pod = |uid: &str, is_ready: bool, listed: bool| Change::Pod {
            uid: uid.into(),
            ready: is_ready.then(|| ready(uid)),
            listed,
        };
        let mut r = Replicas::default();
        // The first list: ready pods had every workload asked for at the start.
        r.saw(pod("a", true, true));
        r.saw(pod("b", false, true));
        r.saw(Change::PodsListed);
        assert!(r.pending.is_empty());
        // b becomes ready, c is new: both are warmed; a changing again is not.
        r.saw(pod("b", true, false));
        r.saw(pod("c", false, false));
        r.saw(pod("c", true, false));
        r.saw(pod("a", true, false));
        assert_eq!(r.pending.keys().collect::<Vec<_>>(), ["b", "c"]);
        // Once warmed, a replica is not warmed again, also not after a re-list.
        r.known.insert("b".into());
        r.pending.remove("b");
        r.saw(pod("b", true, true));
        // A pod that appears in a re-list (after a watch outage) is.
        r.saw(pod("d", true, true));
        // Gone: forgotten.
        r.saw(Change::PodGone("c".into()));
        assert_eq!(r.pending.keys().collect::<Vec<_>>(), ["d"]);
        r.saw(Change::PodGone("b".into()));
        assert!(!r.known.contains("b"));
    }
}

//! The controller's loop over every mirror's running replicas, on their admin endpoints
//! (with the admin token of the Secret the controller makes): a second
//! `Controller<RegistryMirror>`, level-triggered. For every mirror, each ready replica is
//! put in the spec's modes ([`carry`]: a change of modes alone rolls no pod), and the
//! drop the `pullthrough.dev/drop` annotation asks for is made on every replica, once per
//! value; the status says the modes the replicas report, the pinned tags and the last
//! drop.
//!
//! Warm before the rollout (docs/operations.md): for a mirror with
//! `spec.cache.prefetchFromWorkloads`, each reconcile also computes from reflector stores
//! what its replicas should have ([`desired`]): the images of the pod templates of the
//! workloads (Deployments, StatefulSets, DaemonSets, Jobs, CronJobs) in the namespaces it
//! selects, of the registries it serves. Then each ready replica is brought to that
//! ([`replica`]): asked to prefetch what it lacks (for the platforms of the cluster's
//! nodes), told the images in use (which eviction keeps like pins) when its set differs,
//! and the images asked for are followed to an Event on the mirror each (`Prefetched
//! image ... in 3.2s`) and counted in `status.prefetchedImages`.
//!
//! A mirror changing, a workload's image set changing, a namespace's labels changing, a
//! proxy pod becoming ready or going, and this replica leading again are the triggers; a
//! reconcile looks again every few seconds while prefetches it asked for are underway,
//! and every five minutes otherwise.

mod carry;
pub mod desired;
pub mod replica;
pub mod watch;

use super::context::{Context, Error, MANAGER, backoff, kube_err};
use crate::api::mirror::{ADMIN_TOKEN, DropStatus, ImagesStatus, RegistryMirror};
use crate::controller::builders;
use crate::proxy::admin::api::{Availability, ImageState};
use desired::{Replica, Workload};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use replica::{Memory, Synced};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How soon a mirror is looked at again while prefetches asked for are underway.
const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// How often every prefetching mirror is looked at anyway: its replicas' in-use sets
/// and what they lack are read again (a replica that restarted has forgotten), failed
/// images asked for again.
const RESYNC: Duration = Duration::from_secs(300);

/// How soon a mirror whose replicas cannot be asked yet (no admin token Secret yet) is
/// looked at again.
const NOT_YET: Duration = Duration::from_secs(5);

/// The reflectors' stores: every workload, namespace and proxy pod.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub stateful_sets: Store<StatefulSet>,
    pub daemon_sets: Store<DaemonSet>,
    pub jobs: Store<Job>,
    pub cron_jobs: Store<CronJob>,
    pub namespaces: Store<Namespace>,
    /// The mirrors' proxy pods.
    pub pods: Store<Pod>,
    /// Every pod: bare pods use images too, and running pods say which digests.
    pub all_pods: Store<Pod>,
}

impl Stores {
    /// Every workload (bare pods too) with its images.
    fn users(&self) -> watch::Users {
        let mut out = watch::Users::new();
        watch::add_users(&mut out, &self.deployments.state());
        watch::add_users(&mut out, &self.stateful_sets.state());
        watch::add_users(&mut out, &self.daemon_sets.state());
        watch::add_users(&mut out, &self.jobs.state());
        watch::add_users(&mut out, &self.cron_jobs.state());
        watch::add_users(&mut out, &self.all_pods.state());
        out
    }

    /// Whether every store has had its first list: until then a mirror's images would
    /// be computed from part of the cluster.
    fn ready(&self) -> bool {
        fn filled<K: Resource + Clone + 'static>(s: &Store<K>) -> bool
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            futures::FutureExt::now_or_never(s.wait_until_ready()).is_some_and(|r| r.is_ok())
        }
        filled(&self.deployments)
            && filled(&self.stateful_sets)
            && filled(&self.daemon_sets)
            && filled(&self.jobs)
            && filled(&self.cron_jobs)
            && filled(&self.namespaces)
            && filled(&self.pods)
            && filled(&self.all_pods)
    }
}

/// What the prefetch reconciles share: the controller's [`Context`], the stores, and
/// what they remember of each mirror's replicas.
pub struct Warmer {
    /// Client, Node store, leadership, the Event reporter, the operations port.
    pub ctx: Arc<Context>,
    /// Workloads, namespaces, proxy pods.
    pub stores: Stores,
    /// Per mirror, per replica (pod uid): the images asked for and those that failed.
    memory: Mutex<HashMap<ObjectRef<RegistryMirror>, HashMap<String, Memory>>>,
    /// Per mirror: images its replicas prefetched for workloads since the start.
    prefetched: Mutex<HashMap<ObjectRef<RegistryMirror>, i64>>,
    /// Per mirror: reconciles that failed in a row (for the backoff).
    failures: Mutex<HashMap<ObjectRef<RegistryMirror>, u32>>,
    /// Per mirror: what the availability watch knows.
    watches: Mutex<HashMap<ObjectRef<RegistryMirror>, Watching>>,
}

/// What the availability watch knows of one mirror.
#[derive(Default)]
struct Watching {
    /// Each watched image's last state.
    states: HashMap<String, Availability>,
    /// When the images were last checked, and the hash of the set checked.
    checked: Option<(Instant, u64)>,
    /// The status they gave.
    status: Option<ImagesStatus>,
    /// (workload uid, image) pairs an ImageUnavailable Event was published for.
    evented: HashSet<(String, String)>,
    /// When each image was last used by a workload: kept in use for `keepInUseFor`.
    seen: HashMap<String, Instant>,
}

impl Warmer {
    /// A warmer over `stores`.
    pub fn new(ctx: Arc<Context>, stores: Stores) -> Warmer {
        Warmer {
            ctx,
            stores,
            memory: Mutex::default(),
            prefetched: Mutex::default(),
            failures: Mutex::default(),
            watches: Mutex::default(),
        }
    }

    /// Brings every ready replica of `mirror` to what it should have: its modes, the
    /// drop its annotation asks for, and (prefetching mirrors) its workloads' images.
    /// Per replica, what was done for prefetches; `None` while that cannot be known yet
    /// (the stores not yet filled, no admin token Secret yet).
    pub async fn sync(
        &self,
        mirror: &RegistryMirror,
    ) -> Result<Option<Vec<(Replica, Synced)>>, Error> {
        let key = ObjectRef::from_obj(mirror);
        if mirror.meta().deletion_timestamp.is_some() {
            self.memory.lock().expect("lock").remove(&key);
            self.watches.lock().expect("lock").remove(&key);
            self.ctx
                .metrics
                .set_workload_images(&mirror_label(mirror), None);
            return Ok(Some(Vec::new()));
        }
        if !self.stores.ready() {
            return Ok(None);
        }
        let prefetching = mirror.spec.cache.prefetch_from_workloads.is_some();
        // What the workloads use: watched for availability, kept in use, and prefetched
        // by a mirror that prefetches.
        let users = self.stores.users();
        let watched = watch::watched(mirror, &users, &self.stores.namespaces.state());
        let wanted: BTreeSet<String> = match prefetching {
            true => watched.keys().cloned().collect(),
            false => BTreeSet::new(),
        };
        let replicas = desired::replicas(mirror, &self.stores.pods.state(), self.ctx.ops_port);
        // Replicas that went are forgotten; new ones start with nothing asked.
        let mut memories = self
            .memory
            .lock()
            .expect("lock")
            .remove(&key)
            .unwrap_or_default();
        memories.retain(|uid, _| replicas.iter().any(|r| &r.uid == uid));
        if replicas.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let Some(token) = admin_token(&self.ctx, mirror).await? else {
            tracing::info!(mirror = %mirror.name_any(), "no admin token Secret yet: asked later");
            return Ok(None);
        };
        let platforms = desired::platforms(&self.ctx.nodes().await?);
        // Kept from eviction on every replica, and for a while after the last workload
        // that used it went.
        let in_use = self.in_use(mirror, &wanted, &watched);
        let modes = mirror.spec.modes();
        let mut reported = Vec::new();
        let mut out = Vec::new();
        let mut failed = None;
        for r in &replicas {
            let memory = memories.entry(r.uid.clone()).or_default();
            let synced = async {
                let m = carry::sync_modes(r, &modes, &token).await?;
                let synced = replica::sync(r, memory, &wanted, &in_use, &platforms, &token).await?;
                Ok::<_, Error>((m, synced))
            };
            match synced.await {
                Ok((m, synced)) => {
                    if !synced.asked.is_empty() {
                        tracing::info!(mirror = %mirror.name_any(), replica = %r.url,
                            images = ?synced.asked, "asked for a prefetch");
                    }
                    self.record(mirror, r, &synced).await;
                    reported = m;
                    out.push((r.clone(), synced));
                }
                Err(e) => {
                    tracing::warn!(mirror = %mirror.name_any(), error = %e, "cannot bring a replica to its mirror");
                    failed = Some(e);
                }
            }
        }
        self.memory.lock().expect("lock").insert(key, memories);
        if let Some(e) = failed {
            return Err(e);
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let dropped = carry::carry_drop(mirror, &replicas, &token, &now).await?;
        if let Some(d) = &dropped {
            self.drop_event(mirror, d).await;
        }
        let images = self
            .watch(mirror, &replicas[0], &watched, &platforms, &token, &now)
            .await?;
        let before = carry::Owned::of(mirror.status.as_ref());
        let owned = carry::Owned {
            prefetched_images: prefetching.then(|| self.prefetched(mirror)),
            modes: reported,
            pinned_tags: mirror.spec.pinned_tags(),
            drop: dropped.or(before.drop.clone()),
            images,
        };
        if owned != before {
            write_status(&self.ctx, mirror, &owned).await;
        }
        Ok(Some(out))
    }

    /// The images to keep from eviction on `mirror`'s replicas: those it prefetches
    /// (`wanted`), those its workloads use (`watched`), and those a workload used within
    /// `availability.keepInUseFor`.
    fn in_use(
        &self,
        mirror: &RegistryMirror,
        wanted: &BTreeSet<String>,
        watched: &BTreeMap<String, Vec<watch::WorkloadRef>>,
    ) -> BTreeSet<String> {
        let keep = availability_durations(mirror).1;
        let mut watches = self.watches.lock().expect("lock");
        let w = watches.entry(ObjectRef::from_obj(mirror)).or_default();
        let now = Instant::now();
        w.seen.retain(|_, at| now.duration_since(*at) < keep);
        for image in watched.keys().chain(wanted) {
            w.seen.insert(image.clone(), now);
        }
        w.seen.keys().cloned().collect()
    }

    /// Checks the availability of `watched` on `replica` when due (the set changed, or
    /// `availability.every` passed): the metric, Events on the workloads of images that
    /// cannot be pulled, and the status to show (the last one when not due).
    async fn watch(
        &self,
        mirror: &RegistryMirror,
        replica: &Replica,
        watched: &BTreeMap<String, Vec<watch::WorkloadRef>>,
        platforms: &[String],
        token: &str,
        now: &str,
    ) -> Result<Option<ImagesStatus>, Error> {
        let key = ObjectRef::from_obj(mirror);
        let label = mirror_label(mirror);
        if mirror
            .spec
            .availability
            .as_ref()
            .is_some_and(|a| a.disabled)
        {
            self.watches.lock().expect("lock").remove(&key);
            self.ctx.metrics.set_workload_images(&label, None);
            return Ok(None);
        }
        let every = availability_durations(mirror).0;
        let set = hash_of(watched.keys().collect::<Vec<_>>());
        let (due, last) = {
            let watches = self.watches.lock().expect("lock");
            let w = watches.get(&key);
            let due = w
                .and_then(|w| w.checked)
                .is_none_or(|(at, h)| h != set || at.elapsed() >= every);
            (due, w.and_then(|w| w.status.clone()))
        };
        if !due {
            return Ok(last);
        }
        let running = watch::running(&self.stores.all_pods.state());
        // A replica that cannot answer now fails no drop or mode: the last status stands
        // and the check is made at the next look.
        let fresh = match watch::check(&replica.url, watched, &running, platforms, token).await {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::warn!(mirror = %label, replica = %replica.url, error = %e,
                    "cannot check the workloads' images now");
                return Ok(last);
            }
        };
        let (status, newly) = {
            let mut watches = self.watches.lock().expect("lock");
            let w = watches.entry(key).or_default();
            watch::merge(&mut w.states, fresh);
            w.checked = Some((Instant::now(), set));
            let status = watch::status(&w.states, watched, now);
            w.status = Some(status.clone());
            let counts = watch::counts(&w.states);
            let counts: Vec<(&str, i64)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
            self.ctx.metrics.set_workload_images(&label, Some(&counts));
            // An Event per workload and image newly unavailable; one that recovers may
            // have one again later.
            let unavailable: Vec<&Availability> = w
                .states
                .values()
                .filter(|a| a.state == ImageState::Unavailable)
                .collect();
            let mut newly = Vec::new();
            for a in &unavailable {
                for user in watched.get(&a.image).into_iter().flatten() {
                    if w.evented.insert((user.uid.clone(), a.image.clone())) {
                        newly.push((user.clone(), (*a).clone()));
                    }
                }
            }
            let down: HashSet<&str> = unavailable.iter().map(|a| a.image.as_str()).collect();
            w.evented.retain(|(_, image)| down.contains(image.as_str()));
            (status, newly)
        };
        for (user, a) in newly {
            let note = format!(
                "Image {} cannot be pulled (checked by mirror {label}): {}",
                a.image,
                a.detail
                    .as_deref()
                    .unwrap_or("neither cached nor in the upstream")
            );
            let kind = (EventType::Warning, "ImageUnavailable", "CheckAvailability");
            self.publish(kind, note, &user.object_ref()).await;
        }
        Ok(Some(status))
    }

    /// An Event on the mirror for a drop made (or refused).
    async fn drop_event(&self, mirror: &RegistryMirror, d: &DropStatus) {
        let (type_, reason, note) = match &d.error {
            None => (
                EventType::Normal,
                "Dropped",
                format!(
                    "Dropped {} from {} replica(s): {} tag(s), {} manifest(s), {} blob(s), {} bytes",
                    d.request, d.replicas, d.tags, d.manifests, d.blobs, d.bytes
                ),
            ),
            Some(why) => (
                EventType::Warning,
                "DropRefused",
                format!("{}: {why}", d.request),
            ),
        };
        self.publish((type_, reason, "Drop"), note, &mirror.object_ref(&()))
            .await;
    }

    /// Publishes an Event of `(type, reason, action)` saying `note` on `on`: each with a
    /// recorder of its own, since a shared one folds Events of one reason on one object
    /// into a series that keeps the first one's note.
    async fn publish(
        &self,
        (type_, reason, action): (EventType, &str, &str),
        note: String,
        on: &k8s_openapi::api::core::v1::ObjectReference,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let recorder = Recorder::new(self.ctx.client.clone(), self.ctx.reporter.clone());
        if let Err(e) = recorder.publish(&event, on).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }

    /// An Event on the mirror per image the replica finished, and the count.
    async fn record(&self, mirror: &RegistryMirror, replica: &Replica, synced: &Synced) {
        let url = &replica.url;
        for f in &synced.finished {
            let (type_, reason, note) = match &f.error {
                None => {
                    *self
                        .prefetched
                        .lock()
                        .expect("lock")
                        .entry(ObjectRef::from_obj(mirror))
                        .or_insert(0) += 1;
                    let note = format!("Prefetched image {} in {:.1}s ({url})", f.image, f.seconds);
                    (EventType::Normal, "Prefetched", note)
                }
                Some(why) => {
                    let note = format!("Could not prefetch image {}: {why} ({url})", f.image);
                    (EventType::Warning, "PrefetchFailed", note)
                }
            };
            self.publish((type_, reason, "Prefetch"), note, &mirror.object_ref(&()))
                .await;
        }
    }

    /// Images `m`'s replicas prefetched for workloads so far.
    fn prefetched(&self, m: &RegistryMirror) -> i64 {
        self.prefetched
            .lock()
            .expect("lock")
            .get(&ObjectRef::from_obj(m))
            .copied()
            .unwrap_or(0)
    }
}

/// One prefetch reconcile of a mirror: its replicas brought to what they should have,
/// then a look again soon while prefetches are underway, else at the resync.
pub async fn reconcile(mirror: Arc<RegistryMirror>, warmer: Arc<Warmer>) -> Result<Action, Error> {
    if !warmer.ctx.leading() {
        // Everything is looked at again when the lease comes back (see `run`).
        return Ok(Action::await_change());
    }
    let synced = warmer.sync(&mirror).await?;
    warmer
        .failures
        .lock()
        .expect("lock")
        .remove(&ObjectRef::from_obj(&*mirror));
    Ok(match synced {
        None => Action::requeue(NOT_YET),
        Some(s) if s.iter().any(|(_, s)| s.following) => Action::requeue(FOLLOW_EVERY),
        // The modes are checked again at the resync (a replica put in another by hand
        // is brought back to the spec's), the images' availability when it is due.
        Some(_) => Action::requeue(RESYNC.min(availability_durations(&mirror).0)),
    })
}

/// Requeue with exponential backoff per mirror: 5s, 10s, 20s ... up to 5 minutes.
pub fn error_policy(mirror: Arc<RegistryMirror>, error: &Error, warmer: Arc<Warmer>) -> Action {
    let mut failures = warmer.failures.lock().expect("lock");
    let n = failures.entry(ObjectRef::from_obj(&*mirror)).or_insert(0);
    *n = n.saturating_add(1);
    let delay = backoff(*n);
    tracing::warn!(mirror = %mirror.name_any(), error = %error, retry_in = ?delay, "prefetch reconcile failed");
    Action::requeue(delay)
}

/// `namespace/name`, the metric's `mirror` label.
fn mirror_label(mirror: &RegistryMirror) -> String {
    format!(
        "{}/{}",
        mirror.namespace().unwrap_or_default(),
        mirror.name_any()
    )
}

/// The shortest `availability.every`: a check writes the status, which makes the mirror
/// looked at again at once; that look must find no check due, or the two would follow
/// each other for ever.
const MIN_EVERY: Duration = Duration::from_secs(1);

/// How often the availability watch checks (at least [`MIN_EVERY`]), and how long an
/// image stays in use after its last workload went (`spec.availability`; 10 minutes and
/// 24 hours by default, and so when a value cannot be read).
fn availability_durations(mirror: &RegistryMirror) -> (Duration, Duration) {
    let spec = mirror.spec.availability.as_ref();
    let read = |v: Option<&String>, default: Duration| {
        v.and_then(|t| crate::api::duration::parse(t).ok())
            .unwrap_or(default)
    };
    (
        read(
            spec.and_then(|a| a.every.as_ref()),
            Duration::from_secs(600),
        )
        .max(MIN_EVERY),
        read(
            spec.and_then(|a| a.keep_in_use_for.as_ref()),
            Duration::from_secs(24 * 3600),
        ),
    )
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

/// Writes the status fields this loop owns (its own field manager: the rest of the
/// status is the other reconcile's).
async fn write_status(ctx: &Context, mirror: &RegistryMirror, owned: &carry::Owned) {
    let Some(ns) = mirror.namespace() else {
        return;
    };
    let api: Api<RegistryMirror> = Api::namespaced(ctx.client.clone(), &ns);
    let manager = format!("{MANAGER}-prefetch");
    if let Err(e) = api
        .patch_status(
            &mirror.name_any(),
            &PatchParams::apply(&manager).force(),
            &Patch::Apply(&owned.patch()),
        )
        .await
    {
        tracing::warn!(mirror = %mirror.name_any(), error = %e, "cannot write the replicas' status");
    }
}

/// The hash of what a watched object contributes (a workload's images, a namespace's
/// labels, a pod's readiness and address).
fn hash_of(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// The parts of a pod the availability watch reads, and no more: every pod of the
/// cluster is held.
fn trim_pod(p: &mut Pod) {
    let keep = |c: &k8s_openapi::api::core::v1::Container| k8s_openapi::api::core::v1::Container {
        name: c.name.clone(),
        image: c.image.clone(),
        ..Default::default()
    };
    if let Some(spec) = p.spec.take() {
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            containers: spec.containers.iter().map(keep).collect(),
            init_containers: spec.init_containers.map(|cs| cs.iter().map(keep).collect()),
            ..Default::default()
        });
    }
    if let Some(status) = p.status.take() {
        let keep = |s: &k8s_openapi::api::core::v1::ContainerStatus| {
            k8s_openapi::api::core::v1::ContainerStatus {
                name: s.name.clone(),
                image: s.image.clone(),
                image_id: s.image_id.clone(),
                ..Default::default()
            }
        };
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            container_statuses: status
                .container_statuses
                .map(|cs| cs.iter().map(keep).collect()),
            init_container_statuses: status
                .init_container_statuses
                .map(|cs| cs.iter().map(keep).collect()),
            ..Default::default()
        });
    }
    p.metadata.labels = None;
}

/// Reflects `api` into `writer` (without managed fields and annotations, which nothing
/// here reads, and trimmed by `trim`) and yields whenever what `what` takes of an object
/// changes, an object goes, or a (re)list completes. Other updates (a rollout's status,
/// scaling, a pod's heartbeat) yield nothing.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    what: impl Fn(&K) -> u64 + Send + 'static,
    trim: fn(&mut K),
) -> BoxStream<'static, ()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let mut seen: HashMap<ObjectRef<K>, u64> = HashMap::new();
    watcher::watcher(api, config)
        .default_backoff()
        .modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            o.meta_mut().annotations = None;
            trim(o);
        })
        .reflect(writer)
        .filter_map(move |event| {
            let changed = match event {
                // An object whose `what` is 0 (nothing it contributes) is no change when
                // it comes or goes.
                Ok(watcher::Event::Apply(o)) => {
                    let now = what(&o);
                    let before = seen.insert(ObjectRef::from_obj(&o), now);
                    before != Some(now) && !(before.is_none() && now == 0)
                }
                // A (re)list yields once, when complete.
                Ok(watcher::Event::InitApply(o)) => {
                    seen.insert(ObjectRef::from_obj(&o), what(&o));
                    false
                }
                Ok(watcher::Event::Delete(o)) => seen
                    .remove(&ObjectRef::from_obj(&o))
                    .is_some_and(|h| h != 0),
                Ok(watcher::Event::InitDone) => true,
                Ok(watcher::Event::Init) => false,
                Err(e) => {
                    tracing::debug!(error = %e, kind = %K::kind(&()), "watch");
                    false
                }
            };
            futures::future::ready(changed.then_some(()))
        })
        .boxed()
}

/// A workload kind reflected into a store, yielding when an image set changes.
fn workloads<K>(client: &kube::Client) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Workload + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let images = |w: &K| hash_of(desired::pod_images(w.pod_spec()));
    let changes = reflect(
        Api::<K>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        writer,
        images,
        |_| {},
    );
    (store, changes)
}

/// Runs the prefetch controller over the mirrors of `mirrors` until `shutdown`: reflects
/// the workloads, namespaces and proxy pods, and reconciles every mirror when what it
/// wants or where its replicas are may have changed, or when this replica leads again
/// (`regained`).
pub async fn run(
    ctx: Arc<Context>,
    mirrors: Api<RegistryMirror>,
    regained: impl futures::Stream<Item = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (deployments, d) = workloads::<Deployment>(&client);
    let (stateful_sets, s) = workloads::<StatefulSet>(&client);
    let (daemon_sets, ds) = workloads::<DaemonSet>(&client);
    let (jobs, j) = workloads::<Job>(&client);
    let (cron_jobs, c) = workloads::<CronJob>(&client);
    let (namespaces, writer) = reflector::store();
    let labels = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        writer,
        |n: &Namespace| hash_of(n.labels()),
        |_| {},
    );
    let (pods, writer) = reflector::store();
    let replicas = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(&builders::proxy_pods_selector()),
        writer,
        |p: &Pod| hash_of(desired::ready_ip(p)),
        |_| {},
    );
    // Every pod: a bare pod's images changing is a change (a pod a controller owns is
    // its workload's, which says so itself); what runs is read at each check.
    let (all_pods, writer) = reflector::store();
    let bare_pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        writer,
        |p: &Pod| {
            let owned = p
                .owner_references()
                .iter()
                .any(|o| o.controller == Some(true));
            if owned {
                0
            } else {
                hash_of(desired::pod_images(p.spec.as_ref()))
            }
        },
        trim_pod,
    );
    let stores = Stores {
        deployments,
        stateful_sets,
        daemon_sets,
        jobs,
        cron_jobs,
        namespaces,
        pods,
        all_pods,
    };
    let warmer = Arc::new(Warmer::new(ctx, stores));
    let changes = futures::stream::select_all([d, s, ds, j, c, labels, replicas, bare_pods]);
    Controller::new(mirrors, watcher::Config::default().any_semantic())
        .reconcile_all_on(changes)
        .reconcile_all_on(regained)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, warmer)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "prefetch controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trimmed_pod_keeps_what_the_watch_reads() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "b"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "r",
                    "uid": "o", "controller": true}]},
            "spec": {
                "containers": [{"name": "app", "image": "registry.test/app:1",
                    "env": [{"name": "X", "value": "y"}], "args": ["--big"]}],
                "initContainers": [{"name": "init", "image": "registry.test/init:1"}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.1",
                "containerStatuses": [{"name": "app", "image": "registry.test/app:1",
                    "imageID": "registry.test/app@sha256:aa", "ready": true, "restartCount": 3}],
                "initContainerStatuses": [{"name": "init", "image": "registry.test/init:1",
                    "imageID": "registry.test/init@sha256:bb", "ready": true, "restartCount": 0}]
            }
        }))
        .unwrap();
        let mut trimmed = pod.clone();
        trim_pod(&mut trimmed);
        let both = |p: Pod| {
            let p = Arc::new(p);
            let mut users = watch::Users::new();
            watch::add_users(&mut users, std::slice::from_ref(&p));
            (
                watch::running(std::slice::from_ref(&p)),
                desired::pod_images(p.spec.as_ref()),
                users,
            )
        };
        assert_eq!(both(trimmed.clone()), both(pod));
        let spec = trimmed.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none() && spec.containers[0].env.is_none());
        assert!(trimmed.status.as_ref().unwrap().pod_ip.is_none());
        assert!(!trimmed.owner_references().is_empty());
    }
}

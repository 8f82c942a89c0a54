//! One reconcile of a RegistryMirror: its children applied (or removed when it serves
//! nothing), its status written, Events recorded, and on deletion the wait for the node
//! agents before the finalizer goes.

use super::builders;
use super::context::{Context, Error, MANAGER, NODE_CLEANUP_TIMEOUT, backoff, kube_err};
use super::status::{self, Observed, Problem, RewriteObserved};
use crate::api::ProxyConfig;
use crate::api::dockerconfig::credentials_for;
use crate::api::mirror::{
    FINALIZER, MirrorUpstream, RegistryMirror, RegistryMirrorStatus, mirror_key,
};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

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
    let delay = backoff(*n);
    tracing::warn!(mirror = %mirror.name_any(), namespace = ?mirror.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub(super) async fn reconcile_inner(
    mirror: &Arc<RegistryMirror>,
    ctx: &Context,
) -> Result<Action, Error> {
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

pub(super) async fn apply_child<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
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

pub(super) async fn delete_child<K>(client: &Client, ns: &str, name: &str) -> Result<(), Error>
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
pub(super) async fn delete_children(client: &Client, ns: &str, child: &str) -> Result<(), Error> {
    delete_child::<Deployment>(client, ns, child).await?;
    delete_child::<StatefulSet>(client, ns, child).await?;
    delete_child::<PodDisruptionBudget>(client, ns, child).await?;
    delete_child::<Service>(client, ns, child).await?;
    delete_child::<Service>(client, ns, &builders::peers_of(child)).await?;
    delete_child::<DaemonSet>(client, ns, &builders::entry_point_of(child)).await?;
    delete_evictor_rbac(client, ns, child).await?;
    delete_child::<ConfigMap>(client, ns, child).await
}

/// Removes the service account, Role and RoleBinding of a mirror that no longer evicts.
async fn delete_evictor_rbac(client: &Client, ns: &str, child: &str) -> Result<(), Error> {
    let (evictor, account) = builders::evictor_rbac_names(child);
    delete_child::<RoleBinding>(client, ns, &evictor).await?;
    delete_child::<Role>(client, ns, &evictor).await?;
    delete_child::<ServiceAccount>(client, ns, &account).await
}

/// What the mirror's Secrets give its children.
#[derive(Debug, Default)]
pub(super) struct SecretData {
    /// What the config hash covers: pods roll when it changes.
    pub hashed: Vec<Vec<u8>>,
    /// With `spec.tls`: the CA nodes verify the proxy's certificate with.
    pub ca_bundle: Option<String>,
}

/// Reads the mirror's Secrets (credentials, the bucket's keys, the TLS certificate):
/// what they give the children, or the problem.
pub(super) async fn read_secrets(
    mirror: &RegistryMirror,
    ctx: &Context,
    ns: &str,
) -> Result<Result<SecretData, Problem>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut hashed = Vec::new();
    for u in &mirror.spec.upstreams {
        match read_credentials(&secrets, ns, u).await? {
            Ok(Some(data)) => hashed.push(data),
            Ok(None) => {}
            Err(problem) => return Ok(Err(problem)),
        }
    }
    match read_bucket_keys(&secrets, ns, mirror).await? {
        Ok(values) => hashed.extend(values),
        Err(problem) => return Ok(Err(problem)),
    }
    let ca_bundle = match read_certificate(&secrets, ns, mirror).await? {
        Ok(ca) => ca,
        Err(problem) => return Ok(Err(problem)),
    };
    Ok(Ok(SecretData { hashed, ca_bundle }))
}

/// The `.dockerconfigjson` of upstream `u`'s credentials Secret, if it has one, checked
/// to hold the registry's entry.
async fn read_credentials(
    secrets: &Api<Secret>,
    ns: &str,
    u: &MirrorUpstream,
) -> Result<Result<Option<Vec<u8>>, Problem>, Error> {
    let Some(reference) = &u.credentials_secret_ref else {
        return Ok(Ok(None));
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
        let why = "must be of type kubernetes.io/dockerconfigjson with a .dockerconfigjson key";
        return Ok(Err(invalid(why.into())));
    };
    Ok(match credentials_for(&data, &u.registry) {
        Ok(Some(_)) => Ok(Some(data)),
        Ok(None) => Err(invalid(format!("has no entry for {}", u.registry))),
        Err(e) => Err(invalid(e.to_string())),
    })
}

/// The values of the bucket's credentials Secret, if the mirror names one: they become
/// the pods' environment, and the pods roll when they change.
async fn read_bucket_keys(
    secrets: &Api<Secret>,
    ns: &str,
    mirror: &RegistryMirror,
) -> Result<Result<Vec<Vec<u8>>, Problem>, Error> {
    let s3 = mirror.spec.cache.storage.s3.as_ref();
    let Some(reference) = s3.and_then(|s| s.credentials_secret_ref.as_ref()) else {
        return Ok(Ok(Vec::new()));
    };
    let secret = secrets
        .get_opt(&reference.name)
        .await
        .map_err(kube_err(format!("reading Secret {}", reference.name)))?;
    let data = secret.and_then(|s| s.data).unwrap_or_default();
    if !data.contains_key("AWS_ACCESS_KEY_ID") || !data.contains_key("AWS_SECRET_ACCESS_KEY") {
        return Ok(Err(Problem {
            reason: "SecretInvalid",
            message: format!(
                "Secret {ns}/{} (credentials of the bucket) must exist and have the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                reference.name
            ),
        }));
    }
    Ok(Ok(data.into_values().map(|v| v.0).collect()))
}

/// The CA nodes verify the proxy's certificate with, if the mirror has `spec.tls`. The
/// certificate is not hashed: the proxy reads a renewed one itself, without a restart.
async fn read_certificate(
    secrets: &Api<Secret>,
    ns: &str,
    mirror: &RegistryMirror,
) -> Result<Result<Option<String>, Problem>, Error> {
    let Some(tls) = &mirror.spec.tls else {
        return Ok(Ok(None));
    };
    let name = &tls.secret_ref.name;
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading Secret {name}")))?;
    let Some(secret) = secret else {
        return Ok(Err(Problem {
            reason: "SecretNotFound",
            message: format!("Secret {ns}/{name} (spec.tls) does not exist"),
        }));
    };
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|t| t.contains("-----BEGIN"))
    };
    if text("tls.crt").is_none() || text("tls.key").is_none() {
        return Ok(Err(Problem {
            reason: "SecretInvalid",
            message: format!(
                "Secret {ns}/{name} (spec.tls) must be a kubernetes.io/tls Secret with PEM tls.crt and tls.key"
            ),
        }));
    }
    Ok(Ok(text("ca.crt").or_else(|| text("tls.crt"))))
}

/// Creates a Secret of the mirror's holding a random value (`make` builds it around
/// one) if it is not there: never replaced, since what the proxies signed or were told
/// with it stands (the signing key, the admin token).
async fn ensure_random_secret(
    client: &Client,
    ns: &str,
    name: String,
    make: impl FnOnce(&str) -> Secret,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    if api
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading Secret {name}")))?
        .is_some()
    {
        return Ok(());
    }
    let key = crate::fsutil::random_hex(32).map_err(Error::Random)?;
    match api.create(&PostParams::default(), &make(&key)).await {
        Ok(_) => Ok(()),
        // Another controller replica made it first: theirs stands.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(kube_err(format!("creating Secret {name}"))(e)),
    }
}

pub(super) async fn service_monitors_available(client: &Client) -> Result<bool, Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(SERVICE_MONITOR_CRD).await {
        Ok(found) => Ok(found.is_some()),
        // Without permission to read CRDs we cannot tell: behave as if absent.
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(false),
        Err(e) => Err(kube_err("looking for the ServiceMonitor CRD")(e)),
    }
}

/// One reconcile of a mirror that is not being deleted: what it claims, its children
/// when it can run and serves a registry, then its status.
pub(super) async fn apply(
    mirror: &Arc<RegistryMirror>,
    ctx: &Context,
    ns: &str,
    mirrors: &Api<RegistryMirror>,
) -> Result<Action, Error> {
    let client = &ctx.client;
    let child = builders::child_name(mirror);
    let mut observed = Observed {
        generation: mirror.meta().generation,
        replicas: mirror.spec.replicas,
        storage: Some(mirror.spec.storage_kind()),
        ..Observed::default()
    };
    let config = builders::proxy_config(mirror);
    let secrets = match &config {
        Ok(_) => read_secrets(mirror, ctx, ns).await?,
        Err(_) => Ok(SecretData::default()),
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
                message: message.to_string(),
            });
        }
        (Ok(_), Err(problem)) => {
            // With spec.tls the Service comes first: its cluster IP, in the status, is
            // what the certificate that is not there yet must name.
            if mirror.spec.tls.is_some() {
                let svc = apply_child(client, ns, &builders::service(mirror)).await?;
                observed.endpoint = builders::endpoint(&svc, true);
            }
            observed.problem = Some(problem);
        }
        // Every registry is served by an older mirror: nothing to run.
        (Ok(_), Ok(_)) if observed.served.is_empty() => delete_children(client, ns, &child).await?,
        (Ok(config), Ok(secret_data)) => {
            observed.ca_bundle = secret_data.ca_bundle.clone();
            apply_children(mirror, ctx, ns, &config, &secret_data, &mut observed).await?;
        }
    }
    observed.rewrite = apply_entry_point(mirror, ctx, ns, &observed).await?;
    let node_list = ctx.nodes().await?;
    let (nodes, ignoring) = status::count_nodes(mirror, &node_list);
    observed.nodes = Some(nodes);
    observed.nodes_ignoring = ignoring;
    write_status(mirror, ctx, mirrors, &observed).await?;
    tracing::info!(mirror = %mirror.name_any(), namespace = %ns, ready = observed.ready_replicas,
        endpoint = ?observed.endpoint, problem = ?observed.problem.as_ref().map(|p| p.reason),
        served = ?observed.served, lost = observed.conflicts.len(), "reconciled");
    // Nodes are watched, but a node going away is not: look again in a while.
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// A rewriting mirror's node-local entry point, applied while the mirror runs and
/// removed otherwise, and what its status says of the rewrite.
async fn apply_entry_point(
    mirror: &RegistryMirror,
    ctx: &Context,
    ns: &str,
    observed: &Observed,
) -> Result<Option<RewriteObserved>, Error> {
    let client = &ctx.client;
    let name = builders::entry_point_name(mirror);
    let Some(rewrite) = mirror.rewrite() else {
        // A mirror that rewrote (its status says) keeps no entry point; one that never
        // did is not asked about it on every reconcile.
        if mirror.status.as_ref().is_some_and(|s| s.rewrite.is_some()) {
            delete_child::<DaemonSet>(client, ns, &name).await?;
        }
        return Ok(None);
    };
    let missed_pods = ctx
        .missed
        .lock()
        .expect("lock")
        .get(&super::rewrite::decide::key(mirror))
        .copied()
        .unwrap_or(0);
    let private = mirror
        .spec
        .upstream_auth_registries()
        .map(str::to_string)
        .collect();
    let mut seen = RewriteObserved {
        address: rewrite.address(),
        private,
        missed_pods: i32::try_from(missed_pods).unwrap_or(i32::MAX),
        ..RewriteObserved::default()
    };
    let runs = observed.problem.is_none() && !observed.served.is_empty();
    let wanted = match (&rewrite.address, &observed.endpoint) {
        (Some(_), _) | (None, None) => None,
        // A mirror that does not run keeps no entry point.
        (None, Some(e)) if e.starts_with("http://") => match runs {
            true => builders::entry_point(mirror, &ctx.settings, e),
            false => None,
        },
        (None, Some(_)) => {
            seen.unreachable = Some(
                "the node-local entry point relays plain HTTP, and this mirror serves \
                 HTTPS (spec.tls): give spec.rewrite.address, an address the nodes reach \
                 it at with a certificate they trust"
                    .into(),
            );
            None
        }
    };
    match wanted {
        Some(ds) => {
            let ds = apply_child(client, ns, &ds).await?;
            let st = ds.status.unwrap_or_default();
            seen.entry_points = Some((st.number_ready, st.desired_number_scheduled));
        }
        None => {
            delete_child::<DaemonSet>(client, ns, &name).await?;
            if rewrite.address.is_none() {
                seen.entry_points = Some((0, 0));
            }
        }
    }
    Ok(Some(seen))
}

/// Everything that runs a mirror that can: the Secrets the controller makes, the
/// configuration, the evictor's RBAC, the workload, and how it is reached.
async fn apply_children(
    mirror: &RegistryMirror,
    ctx: &Context,
    ns: &str,
    config: &ProxyConfig,
    secret_data: &SecretData,
    observed: &mut Observed,
) -> Result<(), Error> {
    let client = &ctx.client;
    let child = builders::child_name(mirror);
    let yaml = config.to_yaml();
    // The modes are carried to running replicas (see `workloads`): changing them does
    // not roll the pods; a new pod starts in them from the ConfigMap.
    let hash = builders::config_hash(&config.without_modes().to_yaml(), &secret_data.hashed);
    if mirror.spec.shares_key() {
        let name = builders::access_secret_name(mirror);
        ensure_random_secret(client, ns, name, |k| builders::access_secret(mirror, k)).await?;
    }
    let name = builders::admin_secret_name(mirror);
    ensure_random_secret(client, ns, name, |k| builders::admin_secret(mirror, k)).await?;
    apply_child(client, ns, &builders::config_map(mirror, &yaml)).await?;
    // The replicas of a bucket with a size limit elect their evictor on a Lease.
    if builders::evicts(mirror) {
        apply_child(client, ns, &builders::proxy_service_account(mirror)).await?;
        apply_child(client, ns, &builders::evictor_role(mirror)).await?;
        apply_child(client, ns, &builders::evictor_role_binding(mirror)).await?;
    } else if mirror.spec.cache.storage.s3.is_some() {
        delete_evictor_rbac(client, ns, &child).await?;
    }
    let (ready, updated) = if builders::uses_pvc(mirror) {
        let sts = builders::stateful_set(mirror, &ctx.settings, &hash);
        let sts = apply_child(client, ns, &sts).await?;
        delete_child::<Deployment>(client, ns, &child).await?;
        let st = sts.status.unwrap_or_default();
        (st.ready_replicas, st.updated_replicas)
    } else {
        let dep = builders::deployment(mirror, &ctx.settings, &hash);
        let dep = apply_child(client, ns, &dep).await?;
        delete_child::<StatefulSet>(client, ns, &child).await?;
        let st = dep.status.unwrap_or_default();
        (st.ready_replicas, st.updated_replicas)
    };
    observed.ready_replicas = ready.unwrap_or(0);
    observed.updated_replicas = updated.unwrap_or(0);
    observed.endpoint = apply_reach(mirror, client, ns).await?;
    Ok(())
}

/// How a running mirror is reached and kept up: its Service (the endpoint, once it has
/// an address), the headless Service of replicas on a bucket, the PodDisruptionBudget
/// and, where prometheus-operator is installed, the ServiceMonitor.
async fn apply_reach(
    mirror: &RegistryMirror,
    client: &Client,
    ns: &str,
) -> Result<Option<String>, Error> {
    let child = builders::child_name(mirror);
    let svc = apply_child(client, ns, &builders::service(mirror)).await?;
    // Replicas sharing a bucket find each other through a headless Service.
    let peers = builders::peers_service_name(mirror);
    if mirror.spec.cache.storage.s3.is_some() {
        apply_child(client, ns, &builders::peers_service(mirror)).await?;
    } else {
        delete_child::<Service>(client, ns, &peers).await?;
    }
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
    Ok(builders::endpoint(&svc, mirror.spec.tls.is_some()))
}

/// Writes the status `observed` makes, when it differs from the mirror's, and records
/// an Event per condition that changed.
async fn write_status(
    mirror: &RegistryMirror,
    ctx: &Context,
    mirrors: &Api<RegistryMirror>,
    observed: &Observed,
) -> Result<(), Error> {
    let previous = mirror.status.clone();
    let next = status::build_status(previous.as_ref(), observed, Timestamp::now());
    // `prefetchedImages` is the prefetches' field (see `workloads`): not compared.
    let mine = previous.clone().map(|p| RegistryMirrorStatus {
        prefetched_images: None,
        ..p
    });
    if mine.as_ref() != Some(&next) {
        // Server-side apply, by the one field manager: the status is the controller's.
        let patch = serde_json::json!({
            "apiVersion": "pullthrough.dev/v1alpha1",
            "kind": "RegistryMirror",
            "status": next,
        });
        mirrors
            .patch_status(
                &mirror.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_err("updating status"))?;
    }
    publish_transitions(ctx, mirror, previous.as_ref(), &next).await;
    Ok(())
}

pub(super) async fn publish_transitions(
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
pub(super) async fn record(ctx: &Context, reference: &ObjectReference, event: &Event) {
    if let Err(e) = ctx.recorder.publish(event, reference).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// Replaces the mirror's finalizers, failing if it changed since it was read.
pub(super) async fn set_finalizers(
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
///
/// Not `kube::runtime::finalizer`: that helper takes the finalizer off as soon as the
/// cleanup returns `Ok`, so waiting for the node agents (seconds to minutes, not an
/// error) would have to be an error, with the error backoff and an error in the metrics.
pub(super) async fn cleanup(
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
    let node_list = ctx.nodes().await?;
    let pending: Vec<String> = node_list
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

pub(super) const SERVICE_MONITOR_CRD: &str = "servicemonitors.monitoring.coreos.com";

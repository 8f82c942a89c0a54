//! `pullthrough node-agent`: runs on every node (DaemonSet) and writes containerd
//! `hosts.toml` files, and for CRI-O, podman and skopeo a containers-registries.conf(5)
//! drop-in, so that pulls go through the Ready mirrors that select the node, with the
//! upstream as fallback. Reads RegistryMirrors (never writes them), reports what it
//! configured in the Node annotations `pullthrough.dev/mirrors` and
//! `pullthrough.dev/runtime`, reads containerd's config (never writes it) to say whether
//! containerd will use the files, and signals CRI-O to read its drop-in again.
//!
//! Also runs without Kubernetes (`--standalone --mirror registry=endpoint`) for nodes
//! configured by hand and for tests.

pub mod containerd;
pub mod hosts;
pub mod probe;
pub mod registries_conf;

use crate::api::mirror::{
    NODE_ANNOTATION, REGISTRIES_CONF_ANNOTATION, RUNTIME_ANNOTATION, RegistryMirror, claim_order,
    is_ready, mirror_key, registry_key, upstream_url,
};
use futures::StreamExt;
use hosts::{DesiredHost, HostsDir, SyncReport};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use registries_conf::RegistriesConf;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::api::mirror::CONTAINERD_ANNOTATION;

/// The files a node should have: for each registry, the oldest Ready mirror that
/// selects the node and serves it.
pub fn desired_hosts(
    node_labels: &BTreeMap<String, String>,
    mirrors: &[Arc<RegistryMirror>],
) -> BTreeMap<String, DesiredHost> {
    let mut eligible: Vec<&Arc<RegistryMirror>> = mirrors
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .filter(|m| m.spec.nodes.configure)
        .filter(|m| {
            m.spec
                .nodes
                .selector
                .iter()
                .all(|(k, v)| node_labels.get(k) == Some(v))
        })
        .filter(|m| is_ready(m))
        .filter(|m| {
            m.status
                .as_ref()
                .and_then(|s| s.endpoint.as_ref())
                .is_some()
        })
        .collect();
    eligible.sort_by_key(|m| claim_order(m));
    let mut out = BTreeMap::new();
    for m in eligible {
        let endpoint = m
            .status
            .as_ref()
            .and_then(|s| s.endpoint.clone())
            .expect("filtered");
        let key = mirror_key(&m.namespace().unwrap_or_default(), &m.name_any());
        // The registries the controller says it serves (one it lost to an older mirror
        // is that one's); a status without the list, from an older controller: all.
        let served = &m.status.as_ref().expect("filtered").served_registries;
        for u in &m.spec.upstreams {
            let registry = registry_key(&u.registry);
            if !served.is_empty() && !served.contains(&registry) {
                continue;
            }
            out.entry(registry).or_insert_with(|| DesiredHost {
                mirror: key.clone(),
                server: upstream_url(u),
                endpoint: endpoint.clone(),
                ca: m.status.as_ref().and_then(|s| s.ca_bundle.clone()),
                skip_verify: m.spec.tls.as_ref().is_some_and(|t| t.skip_verify),
            });
        }
    }
    out
}

/// Mirrors all of whose files are in place after a sync (the Node annotation's value).
pub fn configured_mirrors(
    desired: &BTreeMap<String, DesiredHost>,
    report: &SyncReport,
) -> BTreeSet<String> {
    let in_place: BTreeSet<&String> = report.in_place().collect();
    let mut ok: BTreeSet<String> = desired.values().map(|h| h.mirror.clone()).collect();
    for (registry, host) in desired {
        if !in_place.contains(registry) {
            ok.remove(&host.mirror);
        }
    }
    ok
}

/// Options of the node agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where the agent writes (the hostPath mount of containerd's certs.d).
    pub certs_dir: PathBuf,
    /// The same directory as containerd sees it on the host.
    pub containerd_certs_path: String,
    /// containerd's config file (mounted read-only).
    pub containerd_config: PathBuf,
    /// Where CRI-O, podman and skopeo read their registries.
    pub containers: ContainersOptions,
    /// How often each mirror is asked whether it answers from this node ([`probe`]); a
    /// mirror that does not is left out of the node's files until it does. `None`: never
    /// asked.
    pub probe: Option<Duration>,
}

/// Failed probes in a row after which a mirror is left out (one more is a blip: a
/// replica restarting behind its Service).
const PROBES_TO_LEAVE_OUT: u32 = 2;

/// The registries of `desired` whose mirror answers: each distinct endpoint asked once
/// ([`probe::answers`]), its failures in a row counted in `failures`; one that failed
/// `needed` times in a row is left out. What changed is logged.
async fn answering(
    desired: BTreeMap<String, DesiredHost>,
    failures: &mut BTreeMap<String, u32>,
    needed: u32,
) -> BTreeMap<String, DesiredHost> {
    let endpoints: BTreeSet<String> = desired.values().map(|h| h.endpoint.clone()).collect();
    let answers = futures::future::join_all(endpoints.iter().map(|e| probe::answers(e))).await;
    failures.retain(|e, _| endpoints.contains(e));
    for (endpoint, answer) in endpoints.iter().zip(answers) {
        let count = failures.entry(endpoint.clone()).or_default();
        match answer {
            Ok(()) => {
                if *count >= needed {
                    tracing::info!(mirror = %endpoint, "the mirror answers again; pulls go through it");
                }
                *count = 0;
            }
            Err(why) => {
                *count += 1;
                if *count == needed {
                    tracing::warn!(mirror = %endpoint, %why, "the mirror does not answer; pulls on this node go to the upstreams until it does");
                }
            }
        }
    }
    desired
        .into_iter()
        .filter(|(_, h)| failures.get(&h.endpoint).is_none_or(|n| *n < needed))
        .collect()
}

/// Where containers/image (CRI-O, podman, skopeo) reads its registries on the node, and
/// when the agent writes there.
#[derive(Clone, Debug)]
pub struct ContainersOptions {
    /// `registries.conf.d` (a hostPath mount of `/etc/containers`).
    pub conf_dir: PathBuf,
    /// `certs.d`, where the mirrors' CAs go.
    pub certs_dir: PathBuf,
    /// The main `registries.conf`: where it is, containers/image is used on the node.
    pub main_file: PathBuf,
    /// When the drop-in is written.
    pub write: WriteContainers,
    /// The procfs in which CRI-O is looked for (the host's: the DaemonSet's `hostPID`).
    pub proc_dir: PathBuf,
    /// Whether CRI-O is signalled when the drop-in changes (not where it reloads its
    /// registries itself: `auto_reload_registries`).
    pub signal_crio: bool,
}

impl ContainersOptions {
    /// The node's own places (`/etc/containers`, `/proc`), written where they are used.
    pub fn on_host() -> ContainersOptions {
        ContainersOptions::under(Path::new("/etc/containers"), WriteContainers::Auto)
    }

    /// `registries.conf.d`, `certs.d` and `registries.conf` under `dir`, the host's procfs.
    pub fn under(dir: &Path, write: WriteContainers) -> ContainersOptions {
        ContainersOptions {
            conf_dir: dir.join("registries.conf.d"),
            certs_dir: dir.join("certs.d"),
            main_file: dir.join("registries.conf"),
            write,
            proc_dir: PathBuf::from("/proc"),
            signal_crio: true,
        }
    }

    /// Whether the drop-in is wanted on a node running `runtime` (its status's
    /// `containerRuntimeVersion`; empty when unknown).
    pub fn wanted(&self, runtime: &str) -> bool {
        match self.write {
            WriteContainers::Always => true,
            WriteContainers::Never => false,
            WriteContainers::Auto => runtime.starts_with("cri-o://") || self.main_file.is_file(),
        }
    }
}

/// When the agent writes the containers-registries.conf(5) drop-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteContainers {
    /// Where the node runs CRI-O, or has a `registries.conf` (podman, skopeo, buildah).
    Auto,
    /// On every node.
    Always,
    /// Never (a drop-in written before is removed).
    Never,
}

/// Reads and checks containerd's config.
pub fn containerd_status(options: &AgentOptions) -> containerd::ConfigPath {
    match std::fs::read_to_string(&options.containerd_config) {
        Ok(text) => containerd::check(Some(&text), &options.containerd_certs_path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            containerd::check(None, &options.containerd_certs_path)
        }
        Err(e) => containerd::ConfigPath::Unreadable(format!(
            "{}: {e}",
            options.containerd_config.display()
        )),
    }
}

fn log_report(file: &str, report: &SyncReport) {
    for r in &report.written {
        tracing::info!(registry = %r, "{file} written");
    }
    for r in &report.removed {
        tracing::info!(registry = %r, "{file} removed");
    }
    for r in &report.unmanaged {
        tracing::warn!(registry = %r, "a {file} not written by pullthrough is there; leaving it alone");
    }
    for (r, e) in &report.failed {
        tracing::error!(registry = %r, error = %e, "could not update {file}");
    }
}

/// What the containers-registries.conf(5) drop-in came to after a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropInState {
    /// Not wanted on this node: no drop-in.
    NotWritten,
    /// Says what it should; CRI-O, where it runs, was signalled after the last change.
    InPlace,
    /// In place, but CRI-O was not signalled (it reads the drop-in when it next starts).
    CrioNotReloaded(String),
    /// A file not written by the agent is where the drop-in goes.
    Unmanaged,
    /// Could not be written.
    Failed,
}

impl DropInState {
    /// The value of [`REGISTRIES_CONF_ANNOTATION`].
    pub fn state(&self) -> &'static str {
        match self {
            DropInState::NotWritten => "not-written",
            DropInState::InPlace => "in-place",
            DropInState::CrioNotReloaded(_) => "crio-not-reloaded",
            DropInState::Unmanaged => "unmanaged",
            DropInState::Failed => "failed",
        }
    }
}

/// The drop-in brought to `desired` (or removed, where it is not wanted), and CRI-O
/// signalled when it changed or an earlier signal is still owed (`owed`, kept between
/// syncs). `crio`: whether the node runs CRI-O (unknown on a node configured by hand:
/// then any CRI-O there is signalled).
fn sync_drop_in(
    options: &ContainersOptions,
    wanted: bool,
    desired: &BTreeMap<String, DesiredHost>,
    crio: Option<bool>,
    owed: &mut bool,
) -> (SyncReport, DropInState) {
    let conf = RegistriesConf::new(&options.conf_dir, &options.certs_dir);
    let none = BTreeMap::new();
    let report = conf.sync(if wanted { desired } else { &none });
    log_report(registries_conf::FILE, &report);
    if !report.written.is_empty() || !report.removed.is_empty() {
        *owed = options.signal_crio && crio != Some(false);
    }
    let mut state = if !report.failed.is_empty() {
        DropInState::Failed
    } else if !report.unmanaged.is_empty() {
        DropInState::Unmanaged
    } else if wanted {
        DropInState::InPlace
    } else {
        DropInState::NotWritten
    };
    if *owed {
        match registries_conf::reload_crio(&options.proc_dir) {
            Ok(n) if n > 0 => {
                tracing::info!(
                    processes = n,
                    "CRI-O told to read its registries again (SIGHUP)"
                );
                *owed = false;
            }
            Ok(_) if crio.is_none() => *owed = false,
            Ok(_) => {
                let why =
                    "no crio process is visible: the agent needs hostPID (docs/node-agent.md)";
                tracing::warn!("the drop-in changed but CRI-O was not told: {why}");
                if state == DropInState::InPlace {
                    state = DropInState::CrioNotReloaded(why.into());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the drop-in changed but CRI-O could not be told");
                if state == DropInState::InPlace {
                    state = DropInState::CrioNotReloaded(e.to_string());
                }
            }
        }
    }
    (report, state)
}

/// Writes the files for hand-given mirrors once (no Kubernetes). `mirrors` maps registry to
/// mirror endpoint, `servers` optionally registry to upstream URL, `cas` optionally
/// registry to the PEM of the CA that signed its mirror's certificate.
pub async fn run_standalone(
    options: &AgentOptions,
    mirrors: &BTreeMap<String, String>,
    servers: &BTreeMap<String, String>,
    cas: &BTreeMap<String, String>,
) -> SyncReport {
    let desired: BTreeMap<String, DesiredHost> = mirrors
        .iter()
        .map(|(registry, endpoint)| {
            let upstream = crate::api::mirror::MirrorUpstream {
                registry: registry.clone(),
                url: servers.get(registry).cloned(),
                credentials_secret_ref: None,
                repositories: None,
                access: None,
                limits: None,
                urls: None,
            };
            (
                registry_key(registry),
                DesiredHost {
                    mirror: "standalone".into(),
                    server: upstream_url(&upstream),
                    endpoint: endpoint.trim_end_matches('/').to_string(),
                    ca: cas.get(registry).cloned(),
                    skip_verify: false,
                },
            )
        })
        .collect();
    let desired = match options.probe {
        Some(_) => answering(desired, &mut BTreeMap::new(), 1).await,
        None => desired,
    };
    let report = HostsDir::new(&options.certs_dir).sync(&desired);
    log_report("hosts.toml", &report);
    let wanted = options.containers.wanted("");
    let (dropped, _) = sync_drop_in(&options.containers, wanted, &desired, None, &mut false);
    let status = containerd_status(options);
    if status.enabled() {
        tracing::info!("{}", status.message(&options.containerd_certs_path));
    } else {
        tracing::warn!("{}", status.message(&options.containerd_certs_path));
    }
    SyncReport {
        failed: report.failed.into_iter().chain(dropped.failed).collect(),
        ..report
    }
}

/// The node agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    syncs: IntCounterVec,
    files: IntGauge,
    drop_in_registries: IntGauge,
    left_out: IntGauge,
    config_path: IntGauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> AgentMetrics {
        let registry = Registry::new();
        let syncs = IntCounterVec::new(
            Opts::new(
                "pullthrough_node_syncs_total",
                "hosts.toml syncs by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let files = IntGauge::new(
            "pullthrough_node_hosts_files",
            "hosts.toml files the agent keeps on this node.",
        )
        .expect("valid metric");
        let drop_in_registries = IntGauge::new(
            "pullthrough_node_registries_conf_registries",
            "Registries in the agent's containers-registries.conf drop-in on this node (CRI-O, podman).",
        )
        .expect("valid metric");
        let left_out = IntGauge::new(
            "pullthrough_node_registries_left_out",
            "Registries whose mirror does not answer from this node, left out of its files (their pulls go to the upstream).",
        )
        .expect("valid metric");
        let config_path = IntGauge::new(
            "pullthrough_node_containerd_config_path_enabled",
            "1 when containerd's registry config_path includes the directory the agent writes.",
        )
        .expect("valid metric");
        for result in ["success", "error"] {
            syncs.with_label_values(&[result]);
        }
        let names = crate::server::register_all(
            &registry,
            vec![
                Box::new(syncs.clone()),
                Box::new(files.clone()),
                Box::new(drop_in_registries.clone()),
                Box::new(left_out.clone()),
                Box::new(config_path.clone()),
            ],
        );
        AgentMetrics {
            registry,
            names,
            syncs,
            files,
            drop_in_registries,
            left_out,
            config_path,
        }
    }

    /// Names of every series this registry can export.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }
}

impl crate::server::Ops for AgentMetrics {
    fn metrics(&self) -> String {
        crate::server::render(&self.registry)
    }
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
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

/// Runs the agent for node `node_name` until `shutdown` completes, syncing on every change
/// of a RegistryMirror or of the Node, and every `resync`.
pub async fn run(
    client: Client,
    options: AgentOptions,
    node_name: String,
    metrics_listen: std::net::SocketAddr,
    resync: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let metrics = Arc::new(AgentMetrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind(metrics_listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: metrics_listen,
            source,
        })?;
    let ops: Arc<dyn crate::server::Ops> = metrics.clone();
    let ops_task = tokio::spawn(crate::server::serve_ops(listener, ops, stop_rx));
    let (mirrors, nodes, mut triggers) = watch(&client, &node_name);
    let mut tick = tokio::time::interval(options.probe.map_or(resync, |p| p.min(resync)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut agent = Agent {
        hosts: HostsDir::new(&options.certs_dir),
        options,
        nodes_api: Api::all(client.clone()),
        node_name,
        metrics,
        last_containerd: None,
        crio_owed: false,
        failures: BTreeMap::new(),
    };
    tokio::pin!(shutdown);
    let mut ready = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = triggers.next() => {}
            _ = tick.tick() => {}
        }
        if !ready {
            // Never act on a partial list: that would remove files of mirrors not seen yet.
            let listed = |f: &mut (dyn Future<Output = _> + Unpin)| {
                futures::FutureExt::now_or_never(f).is_some()
            };
            if listed(&mut Box::pin(mirrors.wait_until_ready()))
                && listed(&mut Box::pin(nodes.wait_until_ready()))
            {
                ready = true;
            } else {
                continue;
            }
        }
        // Let a burst of events settle into one sync.
        let settle = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                Some(()) = triggers.next() => {}
            }
        }
        let Some(node) = nodes.get(&ObjectRef::new(&agent.node_name)) else {
            tracing::warn!(node = %agent.node_name, "this node is not visible to the agent; is NODE_NAME right?");
            continue;
        };
        agent.sync(&node, &mirrors.state()).await;
    }
    let _ = stop_tx.send(true);
    let _ = ops_task.await;
    Ok(())
}

/// Stores of every mirror and of this node, and a stream with an item whenever either
/// changes.
fn watch(
    client: &Client,
    node_name: &str,
) -> (
    reflector::Store<RegistryMirror>,
    reflector::Store<Node>,
    futures::stream::BoxStream<'static, ()>,
) {
    let (mirrors, mirror_writer) = reflector::store::<RegistryMirror>();
    let mirror_events = reflector::reflector(
        mirror_writer,
        watcher(
            Api::<RegistryMirror>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_events = reflector::reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let triggers = futures::stream::select(mirror_events.boxed(), node_events.boxed());
    (mirrors, nodes, triggers.boxed())
}

/// What one node's agent keeps between syncs.
struct Agent {
    options: AgentOptions,
    node_name: String,
    nodes_api: Api<Node>,
    hosts: HostsDir,
    metrics: Arc<AgentMetrics>,
    /// containerd's state as last said in the log.
    last_containerd: Option<String>,
    /// The drop-in changed and CRI-O has not been told yet.
    crio_owed: bool,
    /// Failed probes in a row, by mirror endpoint.
    failures: BTreeMap<String, u32>,
}

/// The node's container runtime as its status names it (`cri-o://1.29.1`); empty when
/// it says none.
fn node_runtime(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.container_runtime_version.clone())
        .unwrap_or_default()
}

impl Agent {
    /// One sync: the node's `hosts.toml` files brought to what the mirrors want,
    /// containerd's state looked at, and both reported on the Node.
    async fn sync(&mut self, node: &Node, mirrors: &[Arc<RegistryMirror>]) {
        let mut desired = desired_hosts(node.labels(), mirrors);
        if self.options.probe.is_some() {
            let wanted = desired.len();
            desired = answering(desired, &mut self.failures, PROBES_TO_LEAVE_OUT).await;
            self.metrics.left_out.set((wanted - desired.len()) as i64);
        }
        let report = self.hosts.sync(&desired);
        log_report("hosts.toml", &report);
        let runtime = node_runtime(node);
        let crio = runtime.starts_with("cri-o://");
        let containers = &self.options.containers;
        let wanted = containers.wanted(&runtime);
        let (dropped, drop_in) = sync_drop_in(
            containers,
            wanted,
            &desired,
            Some(crio),
            &mut self.crio_owed,
        );
        let metrics = &self.metrics;
        metrics.files.set(report.in_place().count() as i64);
        metrics
            .drop_in_registries
            .set(dropped.in_place().count() as i64);
        let result = if report.failed.is_empty() && dropped.failed.is_empty() {
            "success"
        } else {
            "error"
        };
        metrics.syncs.with_label_values(&[result]).inc();
        let containerd = containerd_status(&self.options);
        metrics.config_path.set(i64::from(containerd.enabled()));
        // Said when it changes, not on every sync (the agent's own annotation patch
        // brings it back here at once).
        if self.last_containerd.as_deref() != Some(containerd.state()) {
            let message = containerd.message(&self.options.containerd_certs_path);
            if containerd.enabled() {
                tracing::info!("{message}");
            } else {
                tracing::warn!("{message}");
            }
            self.last_containerd = Some(containerd.state().to_string());
        }
        // A mirror is configured where the node's runtime reads its files.
        let configured = configured_mirrors(&desired, if crio { &dropped } else { &report });
        let value = configured.iter().cloned().collect::<Vec<_>>().join(",");
        let files = if wanted {
            "hosts.toml, registries.conf.d"
        } else {
            "hosts.toml"
        };
        let runtime = if runtime.is_empty() {
            "unknown"
        } else {
            &runtime
        };
        self.annotate(
            node,
            &[
                (
                    NODE_ANNOTATION,
                    (!value.is_empty()).then_some(value.clone()),
                ),
                (CONTAINERD_ANNOTATION, Some(containerd.state().to_string())),
                (RUNTIME_ANNOTATION, Some(format!("{runtime}: {files}"))),
                (
                    REGISTRIES_CONF_ANNOTATION,
                    Some(drop_in.state().to_string()),
                ),
            ],
            &value,
        )
        .await;
    }

    /// Writes `wanted` onto the Node (an annotation of `None` removed), when it differs
    /// from what it says; `mirrors` is what the log says.
    async fn annotate(&self, node: &Node, wanted: &[(&str, Option<String>)], mirrors: &str) {
        let annotations = node.annotations();
        if wanted
            .iter()
            .all(|(key, value)| annotations.get(*key) == value.as_ref())
        {
            return;
        }
        let values: serde_json::Map<String, serde_json::Value> = wanted
            .iter()
            .map(|(key, value)| (key.to_string(), serde_json::json!(value)))
            .collect();
        let patch = serde_json::json!({"metadata": {"annotations": values}});
        let node_name = &self.node_name;
        match self
            .nodes_api
            .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(node = %node_name, mirrors = %mirrors, "reported configured mirrors")
            }
            Err(e) => {
                tracing::error!(node = %node_name, error = %e, "could not annotate the node")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::mirror::{RegistryMirrorSpec, RegistryMirrorStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;

    fn mirror(
        name: &str,
        created: i64,
        yaml: &str,
        ready: bool,
        endpoint: Option<&str>,
    ) -> Arc<RegistryMirror> {
        let spec: RegistryMirrorSpec = serde_yaml::from_str(yaml).unwrap();
        let mut m = RegistryMirror::new(name, spec);
        m.metadata.namespace = Some("ns".into());
        m.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        m.status = Some(RegistryMirrorStatus {
            endpoint: endpoint.map(str::to_string),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: "X".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::from_second(1).unwrap()),
            }],
            ..RegistryMirrorStatus::default()
        });
        Arc::new(m)
    }

    #[test]
    fn only_ready_selecting_mirrors_with_an_endpoint_are_configured() {
        let labels = BTreeMap::from([("pool".to_string(), "a".to_string())]);
        let mirrors = vec![
            mirror(
                "public",
                10,
                "upstreams: [{registry: docker.io}, {registry: ghcr.io, url: https://ghcr.example}]",
                true,
                Some("http://10.0.0.1:5000"),
            ),
            mirror(
                "notready",
                5,
                "upstreams: [{registry: quay.io}]",
                false,
                Some("http://10.0.0.2:5000"),
            ),
            mirror(
                "noendpoint",
                5,
                "upstreams: [{registry: quay.io}]",
                true,
                None,
            ),
            mirror(
                "otherpool",
                5,
                "upstreams: [{registry: registry.k8s.io}]\nnodes: {selector: {pool: b}}",
                true,
                Some("http://10.0.0.3:5000"),
            ),
            mirror(
                "optout",
                5,
                "upstreams: [{registry: gcr.io}]\nnodes: {configure: false}",
                true,
                Some("http://10.0.0.4:5000"),
            ),
        ];
        let d = desired_hosts(&labels, &mirrors);
        assert_eq!(d.keys().collect::<Vec<_>>(), vec!["docker.io", "ghcr.io"]);
        assert_eq!(d["docker.io"].server, "https://registry-1.docker.io");
        assert_eq!(d["ghcr.io"].server, "https://ghcr.example");
        assert_eq!(d["docker.io"].endpoint, "http://10.0.0.1:5000");
        assert_eq!(d["docker.io"].mirror, "ns/public");
    }

    #[test]
    fn the_older_mirror_wins_a_registry_and_deleted_mirrors_let_go() {
        let labels = BTreeMap::new();
        let old = mirror(
            "old",
            10,
            "upstreams: [{registry: docker.io}]",
            true,
            Some("http://10.0.0.1:5000"),
        );
        let young = mirror(
            "young",
            20,
            "upstreams: [{registry: index.docker.io}, {registry: quay.io}]",
            true,
            Some("http://10.0.0.2:5000"),
        );
        let d = desired_hosts(&labels, &[young.clone(), old.clone()]);
        assert_eq!(d["docker.io"].mirror, "ns/old");
        assert_eq!(d["quay.io"].mirror, "ns/young");
        let mut deleting = (*old).clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(30).unwrap()));
        let d = desired_hosts(&labels, &[young, Arc::new(deleting)]);
        assert_eq!(d["docker.io"].mirror, "ns/young");
    }

    #[test]
    fn only_the_registries_the_controller_says_a_mirror_serves_are_configured() {
        // The older mirror is Ready but the controller gave quay.io to another one (say
        // this one lost it while an even older mirror was fixed): nodes follow the status.
        let mut partial = (*mirror(
            "partial",
            10,
            "upstreams: [{registry: docker.io}, {registry: quay.io}]",
            true,
            Some("http://10.0.0.1:5000"),
        ))
        .clone();
        partial.status.as_mut().unwrap().served_registries = vec!["docker.io".into()];
        let other = mirror(
            "other",
            20,
            "upstreams: [{registry: quay.io}]",
            true,
            Some("http://10.0.0.2:5000"),
        );
        let d = desired_hosts(&BTreeMap::new(), &[Arc::new(partial), other]);
        assert_eq!(d["docker.io"].mirror, "ns/partial");
        assert_eq!(d["quay.io"].mirror, "ns/other");
    }

    #[tokio::test]
    async fn a_mirror_is_left_out_after_two_failed_probes_and_back_after_one_answer() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A mirror that answers 503 until `up`, then 200.
        let up = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let serving = up.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let status = if serving.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\n{{}}");
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let host = DesiredHost {
            mirror: "ns/a".into(),
            server: "https://quay.io".into(),
            endpoint: endpoint.clone(),
            ca: None,
            skip_verify: false,
        };
        let desired = BTreeMap::from([("quay.io".to_string(), host)]);
        let mut failures = BTreeMap::new();
        // One failure is a blip, two leave the mirror out.
        let kept = answering(desired.clone(), &mut failures, PROBES_TO_LEAVE_OUT).await;
        assert_eq!(kept.len(), 1);
        let kept = answering(desired.clone(), &mut failures, PROBES_TO_LEAVE_OUT).await;
        assert!(kept.is_empty());
        assert_eq!(failures[&endpoint], 2);
        // It answers again: back at once.
        up.store(true, Ordering::SeqCst);
        let kept = answering(desired.clone(), &mut failures, PROBES_TO_LEAVE_OUT).await;
        assert_eq!(kept.len(), 1);
        assert_eq!(failures[&endpoint], 0);
        // Endpoints no mirror names any more are forgotten.
        answering(BTreeMap::new(), &mut failures, PROBES_TO_LEAVE_OUT).await;
        assert!(failures.is_empty());
    }

    #[test]
    fn a_signal_crio_did_not_get_is_owed_until_it_can_be_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = ContainersOptions::under(dir.path(), WriteContainers::Always);
        // A procfs without any process: CRI-O is not visible (no hostPID).
        options.proc_dir = dir.path().join("proc");
        std::fs::create_dir_all(&options.proc_dir).unwrap();
        let desired = BTreeMap::from([(
            "docker.io".to_string(),
            DesiredHost {
                mirror: "ns/a".into(),
                server: "https://registry-1.docker.io".into(),
                endpoint: "http://10.0.0.1:5000".into(),
                ca: None,
                skip_verify: false,
            },
        )]);
        let mut owed = false;
        let (report, state) = sync_drop_in(&options, true, &desired, Some(true), &mut owed);
        assert_eq!(report.written, ["docker.io"]);
        assert!(matches!(state, DropInState::CrioNotReloaded(_)) && owed);
        assert_eq!(state.state(), "crio-not-reloaded");
        // Unchanged since, but still owed.
        let (report, state) = sync_drop_in(&options, true, &desired, Some(true), &mut owed);
        assert_eq!(report.unchanged, ["docker.io"]);
        assert!(matches!(state, DropInState::CrioNotReloaded(_)) && owed);
        // Not a CRI-O node: nothing is owed; a node configured by hand: none seen, none owed.
        let mut owed = false;
        let none = BTreeMap::new();
        let (report, state) = sync_drop_in(&options, false, &none, Some(false), &mut owed);
        assert_eq!(
            (report.removed, state, owed),
            (vec!["docker.io".into()], DropInState::NotWritten, false)
        );
        let (_, state) = sync_drop_in(&options, true, &desired, None, &mut owed);
        assert_eq!((state, owed), (DropInState::InPlace, false));
    }

    #[test]
    fn a_mirror_counts_as_configured_only_when_all_its_files_are_in_place() {
        let host = |m: &str| DesiredHost {
            mirror: m.into(),
            server: "s".into(),
            endpoint: "e".into(),
            ca: None,
            skip_verify: false,
        };
        let desired = BTreeMap::from([
            ("docker.io".to_string(), host("ns/a")),
            ("ghcr.io".to_string(), host("ns/a")),
            ("quay.io".to_string(), host("ns/b")),
        ]);
        let report = SyncReport {
            written: vec!["docker.io".into()],
            unchanged: vec!["quay.io".into()],
            unmanaged: vec!["ghcr.io".into()],
            ..SyncReport::default()
        };
        assert_eq!(
            configured_mirrors(&desired, &report),
            BTreeSet::from(["ns/b".to_string()])
        );
    }
}

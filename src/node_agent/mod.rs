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
mod desired;
pub mod hosts;
mod metrics;
mod options;
pub mod probe;
pub mod registries_conf;
#[cfg(test)]
mod tests;

pub use desired::{configured_mirrors, desired_hosts};
pub use metrics::AgentMetrics;
pub use options::{AgentOptions, ContainersOptions, WriteContainers};
pub use registries_conf::DropInState;

use crate::api::mirror::{
    NODE_ANNOTATION, REGISTRIES_CONF_ANNOTATION, RUNTIME_ANNOTATION, RegistryMirror, registry_key,
    upstream_url,
};
use desired::{PROBES_TO_LEAVE_OUT, answering};
use futures::StreamExt;
use hosts::{DesiredHost, HostsDir, SyncReport};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use registries_conf::sync_drop_in;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use crate::api::mirror::CONTAINERD_ANNOTATION;

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
                mode: None,
                tag_policies: Vec::new(),
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
    report.log("hosts.toml");
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
        report.log("hosts.toml");
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

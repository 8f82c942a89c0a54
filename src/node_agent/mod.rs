//! `pullthrough node-agent`: runs on every node (DaemonSet) and writes containerd
//! `hosts.toml` files so that pulls go through the Ready mirrors that select the node,
//! with the upstream as fallback. Reads RegistryMirrors (never writes them), reports what
//! it configured in the Node annotation `pullthrough.dev/mirrors`, and reads containerd's
//! config (never writes it) to say whether containerd will use the files.
//!
//! Also runs without Kubernetes (`--standalone --mirror registry=endpoint`) for nodes
//! configured by hand and for tests.

pub mod containerd;
pub mod hosts;

use crate::api::mirror::{
    NODE_ANNOTATION, RegistryMirror, claim_order, is_ready, mirror_key, registry_key, upstream_url,
};
use futures::StreamExt;
use hosts::{DesiredHost, HostsDir, SyncReport};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
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

fn log_report(report: &SyncReport) {
    for r in &report.written {
        tracing::info!(registry = %r, "hosts.toml written");
    }
    for r in &report.removed {
        tracing::info!(registry = %r, "hosts.toml removed");
    }
    for r in &report.unmanaged {
        tracing::warn!(registry = %r, "a hosts.toml not written by pullthrough is there; leaving it alone");
    }
    for (r, e) in &report.failed {
        tracing::error!(registry = %r, error = %e, "could not update hosts.toml");
    }
}

/// Writes the files for hand-given mirrors once (no Kubernetes). `mirrors` maps registry to
/// mirror endpoint, `servers` optionally registry to upstream URL, `cas` optionally
/// registry to the PEM of the CA that signed its mirror's certificate.
pub fn run_standalone(
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
    let report = HostsDir::new(&options.certs_dir).sync(&desired);
    log_report(&report);
    let status = containerd_status(options);
    if status.enabled() {
        tracing::info!("{}", status.message(&options.containerd_certs_path));
    } else {
        tracing::warn!("{}", status.message(&options.containerd_certs_path));
    }
    report
}

/// The node agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    syncs: IntCounterVec,
    files: IntGauge,
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
                Box::new(config_path.clone()),
            ],
        );
        AgentMetrics {
            registry,
            names,
            syncs,
            files,
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
    let mut tick = tokio::time::interval(resync);
    let mut agent = Agent {
        hosts: HostsDir::new(&options.certs_dir),
        options,
        nodes_api: Api::all(client.clone()),
        node_name,
        metrics,
        last_containerd: None,
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
}

impl Agent {
    /// One sync: the node's `hosts.toml` files brought to what the mirrors want,
    /// containerd's state looked at, and both reported on the Node.
    async fn sync(&mut self, node: &Node, mirrors: &[Arc<RegistryMirror>]) {
        let desired = desired_hosts(node.labels(), mirrors);
        let report = self.hosts.sync(&desired);
        log_report(&report);
        let metrics = &self.metrics;
        metrics.files.set(report.in_place().count() as i64);
        let result = if report.failed.is_empty() {
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
        let configured = configured_mirrors(&desired, &report);
        let value = configured.iter().cloned().collect::<Vec<_>>().join(",");
        self.annotate(node, &value, containerd.state()).await;
    }

    /// Writes the mirrors configured (`value`) and containerd's state onto the Node,
    /// when they differ from what it says.
    async fn annotate(&self, node: &Node, value: &str, containerd: &str) {
        let annotations = node.annotations();
        let want_mirrors = (!value.is_empty()).then(|| value.to_string());
        let have_mirrors = annotations.get(NODE_ANNOTATION).cloned();
        if have_mirrors == want_mirrors
            && annotations.get(CONTAINERD_ANNOTATION).map(String::as_str) == Some(containerd)
        {
            return;
        }
        let patch = serde_json::json!({"metadata": {"annotations": {
            NODE_ANNOTATION: want_mirrors,
            CONTAINERD_ANNOTATION: containerd,
        }}});
        let node_name = &self.node_name;
        match self
            .nodes_api
            .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(node = %node_name, mirrors = %value, "reported configured mirrors")
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

//! The node agent's metrics, on its operations port.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// The node agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    pub(super) syncs: IntCounterVec,
    pub(super) files: IntGauge,
    pub(super) drop_in_registries: IntGauge,
    pub(super) left_out: IntGauge,
    pub(super) config_path: IntGauge,
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

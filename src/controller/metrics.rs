//! The controller's metrics: reconciles by result, and how long they take.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The controller's metrics.
#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    reconciles: IntCounterVec,
    duration: HistogramVec,
    leader: IntGauge,
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
        let leader = IntGauge::new(
            "pullthrough_controller_leader",
            "1 while this controller replica holds the leader Lease (and so reconciles and asks for prefetches), 0 while it stands by.",
        )
        .expect("valid metric");
        // At zero from the start; error results appear as they happen.
        reconciles.with_label_values(&["success"]);
        duration.with_label_values(&["success"]);
        let names = crate::server::register_all(
            &registry,
            vec![
                Box::new(reconciles.clone()),
                Box::new(duration.clone()),
                Box::new(leader.clone()),
            ],
        );
        ControllerMetrics {
            registry,
            names,
            reconciles,
            duration,
            leader,
        }
    }

    pub(super) fn observe(&self, result: &'static str, seconds: f64) {
        self.reconciles.with_label_values(&[result]).inc();
        self.duration.with_label_values(&[result]).observe(seconds);
    }

    pub(super) fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
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

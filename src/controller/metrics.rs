//! The controller's metrics: reconciles by result and how long they take, and the
//! image-rewriting webhook's answers (docs/rewrite.md).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The outcomes of `pullthrough_rewrite_pods_total`, there from the start.
const OUTCOMES: [&str; 4] = [
    "rewritten",
    "mirror-not-ready",
    "owner-compares-images",
    "private-images",
];

/// The controller's metrics.
#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Registry,
    /// Names of the series the registry can export (see [`Self::names`]).
    names: Vec<String>,
    reconciles: IntCounterVec,
    duration: HistogramVec,
    leader: IntGauge,
    webhook_duration: Histogram,
    webhook_pods: IntCounterVec,
    missed_pods: IntGauge,
    workload_images: IntGaugeVec,
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
        let webhook_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pullthrough_webhook_duration_seconds",
                "Time the image-rewriting webhook takes to answer the API server, from the request read to the answer written.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("valid metric");
        let webhook_pods = IntCounterVec::new(
            Opts::new(
                "pullthrough_rewrite_pods_total",
                "Pods with images of a rewriting mirror the webhook answered for, by outcome: rewritten, or why not (mirror-not-ready, owner-compares-images, private-images).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let missed_pods = IntGauge::new(
            "pullthrough_rewrite_missed_pods",
            "Pods in a rewriting mirror's scope, running now, that the webhook never answered for (it was down or too slow and the API server let them in unrewritten); each mirror's status says how many are its own.",
        )
        .expect("valid metric");
        let workload_images = IntGaugeVec::new(
            Opts::new(
                "pullthrough_workload_images",
                "Images the workloads a mirror serves use, by availability (cached, upstreamOnly, unchecked, moved, unauthorized, unavailable), as the controller last checked them (docs/operations.md, \"Know before the outage\").",
            ),
            &["mirror", "state"],
        )
        .expect("valid metric");
        for outcome in OUTCOMES {
            webhook_pods.with_label_values(&[outcome]);
        }
        // At zero from the start; error results appear as they happen.
        reconciles.with_label_values(&["success"]);
        duration.with_label_values(&["success"]);
        let names = crate::server::register_all(
            &registry,
            vec![
                Box::new(reconciles.clone()),
                Box::new(duration.clone()),
                Box::new(leader.clone()),
                Box::new(webhook_duration.clone()),
                Box::new(webhook_pods.clone()),
                Box::new(missed_pods.clone()),
                Box::new(workload_images.clone()),
            ],
        );
        ControllerMetrics {
            registry,
            names,
            reconciles,
            duration,
            leader,
            webhook_duration,
            webhook_pods,
            missed_pods,
            workload_images,
        }
    }

    /// The images of `mirror`'s workloads, by state (each state's series set, at 0
    /// too); `None` takes the mirror's series away.
    pub fn set_workload_images(&self, mirror: &str, counts: Option<&[(&str, i64)]>) {
        match counts {
            Some(counts) => {
                for (state, n) in counts {
                    self.workload_images
                        .with_label_values(&[mirror, state])
                        .set(*n);
                }
            }
            None => {
                for state in crate::proxy::admin::api::ImageState::ALL {
                    let _ = self
                        .workload_images
                        .remove_label_values(&[mirror, state.as_str()]);
                }
            }
        }
    }

    /// One webhook answer and how long it took.
    pub(super) fn observe_webhook(&self, seconds: f64) {
        self.webhook_duration.observe(seconds);
    }

    /// A pod the webhook answered for: what became of a mirror's images in it.
    pub(super) fn count_pod(&self, outcome: &str) {
        self.webhook_pods.with_label_values(&[outcome]).inc();
    }

    /// The running pods the webhook missed.
    pub(super) fn set_missed(&self, missed: i64) {
        self.missed_pods.set(missed);
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

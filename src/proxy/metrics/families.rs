//! Families of metrics made and registered in one registry, with the names of the series
//! each can export remembered (see [`super::Metrics::names`]).

use prometheus::core::Collector;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// A registry being filled.
#[derive(Default)]
pub(super) struct Families {
    registry: Registry,
    names: Vec<String>,
}

impl Families {
    /// Registers `c` and gives it back.
    fn add<C: Collector + Clone + 'static>(&mut self, c: C) -> C {
        let names = crate::server::register_all(&self.registry, vec![Box::new(c.clone())]);
        self.names.extend(names);
        c
    }

    pub(super) fn counter(&mut self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    pub(super) fn counter_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    pub(super) fn gauge(&mut self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    pub(super) fn gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    pub(super) fn float_gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    pub(super) fn histogram(&mut self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    pub(super) fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }

    /// The registry and the names of every series it can export.
    pub(super) fn into_parts(self) -> (Registry, Vec<String>) {
        (self.registry, self.names)
    }
}

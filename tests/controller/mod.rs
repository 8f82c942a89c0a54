//! The controller: its reconcile against a fake API server, leader election, the CRD.

/// The CRD generated from the types, and the examples parsed by them.
mod crd;
/// Leader election against a fake Lease with real resourceVersion semantics.
mod leader;
/// The reconcile's side effects, and prefetch for workloads, against a fake API server.
mod mock;

//! What is shipped: the binary as users meet it, the chart and deploy/ files, the
//! Kubernetes manifests against their schemas, and everything together on a real cluster.

/// The binary's first run and its errors.
mod cli;
/// The controller, the node agent, the shipped RBAC and CRD on a real cluster.
mod e2e_cluster;
/// Everything to be `kubectl apply`d, validated against the Kubernetes schemas.
mod kube_manifests;
/// The chart's and deploy/'s files in step with the code, the docs' checks.
mod packaging;

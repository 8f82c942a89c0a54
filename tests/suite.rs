//! Every integration test, in one test binary: one link and one build of the shared
//! support code instead of one per file (the test build took half as long; README, "The
//! two commands"). Each module is one area; `cargo test --test suite <module>::` runs one.

mod common;

mod cache_lifecycle;
mod cli;
mod controller_mock;
mod crd;
mod e2e_cluster;
mod hardening;
mod leader_mock;
mod manifests;
mod node_agent_mock;
mod node_containerd;
mod packaging;
mod prefetch_on_request;
mod private_access;
mod properties;
mod proxy_faults;
mod proxy_registry;
mod s3_shared;
mod upstream_limits;

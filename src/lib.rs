//! pullthrough: a Kubernetes-native pull-through caching registry.
//!
//! One library crate behind one thin binary. Module boundaries:
//! - [`oci`] and [`api`] are vocabulary: OCI names, digests, error codes, and the
//!   configuration types. They do no I/O.
//! - [`proxy`] is the data plane (the OCI pull API as a pull-through cache). It talks to
//!   Kubernetes only to take the [`lease`] of a shared bucket's evictor. Inside it,
//!   requests flow `http -> pull_through -> {upstream, index -> store}`, never backwards.
//! - [`lease`] is leader election on a Kubernetes Lease, for the controller's replicas
//!   and for the proxy replicas that share a bucket.
//! - [`fsutil`] holds the file-system helpers the data plane and the node agent share.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod fsutil;
pub mod lease;
pub mod node_agent;
pub mod oci;
pub mod proxy;
pub mod relay;
pub mod server;

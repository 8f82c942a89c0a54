//! pullthrough: a Kubernetes-native pull-through caching registry.
//!
//! One library crate behind one thin binary. Module boundaries:
//! - [`oci`] and [`api`] are vocabulary: OCI names, digests, error codes, and the
//!   configuration types. They do no I/O.
//! - [`proxy`] is the data plane (the OCI pull API as a pull-through cache). It never
//!   talks to Kubernetes. Inside it, requests flow `http -> pull_through -> {upstream,
//!   index -> store}`, never backwards.
//! - [`fsutil`] holds the file-system helpers the data plane and the node agent share.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod fsutil;
pub mod node_agent;
pub mod oci;
pub mod proxy;
pub mod server;

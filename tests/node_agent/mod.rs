//! The node agent: its Kubernetes side against a fake API server, and a real containerd
//! pulling through the proxy it pointed it at.

/// A private containerd pulling with `hosts.toml` files the agent wrote.
mod containerd;
/// Listing and watching mirrors and its Node, the files written, the Node annotated.
mod mock;

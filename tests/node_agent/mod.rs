//! The node agent: its Kubernetes side against a fake API server, and a real containerd,
//! podman and skopeo pulling through the proxy it pointed them at.

use std::process::{Command, Output, Stdio};

/// A private containerd pulling with `hosts.toml` files the agent wrote.
mod containerd;
/// podman and skopeo pulling with the containers-registries.conf drop-in the agent wrote.
mod containers;
/// Listing and watching mirrors and its Node, the files written, the Node annotated.
mod mock;

/// Runs the agent's binary with `args` after `node-agent`; never on this machine's own
/// containers configuration: `--containers never` unless the test says where to write.
pub fn agent(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullthrough"));
    cmd.arg("node-agent");
    if !args.contains(&"--containers-dir") {
        cmd.args(["--containers", "never"]);
    }
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A command's output, both streams.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

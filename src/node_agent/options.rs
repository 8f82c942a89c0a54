//! What the agent is told: where each runtime's files go, when CRI-O's are written, and
//! how often mirrors are asked whether they answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options of the node agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where the agent writes (the hostPath mount of containerd's certs.d).
    pub certs_dir: PathBuf,
    /// The same directory as containerd sees it on the host.
    pub containerd_certs_path: String,
    /// containerd's config file (mounted read-only).
    pub containerd_config: PathBuf,
    /// Where CRI-O, podman and skopeo read their registries.
    pub containers: ContainersOptions,
    /// How often each mirror is asked whether it answers from this node ([`probe`]); a
    /// mirror that does not is left out of the node's files until it does. `None`: never
    /// asked.
    pub probe: Option<Duration>,
}

/// Where containers/image (CRI-O, podman, skopeo) reads its registries on the node, and
/// when the agent writes there.
#[derive(Clone, Debug)]
pub struct ContainersOptions {
    /// `registries.conf.d` (a hostPath mount of `/etc/containers`).
    pub conf_dir: PathBuf,
    /// `certs.d`, where the mirrors' CAs go.
    pub certs_dir: PathBuf,
    /// The main `registries.conf`: where it is, containers/image is used on the node.
    pub main_file: PathBuf,
    /// When the drop-in is written.
    pub write: WriteContainers,
    /// The procfs in which CRI-O is looked for (the host's: the DaemonSet's `hostPID`).
    pub proc_dir: PathBuf,
    /// Whether CRI-O is signalled when the drop-in changes (not where it reloads its
    /// registries itself: `auto_reload_registries`).
    pub signal_crio: bool,
}

impl ContainersOptions {
    /// The node's own places (`/etc/containers`, `/proc`), written where they are used.
    pub fn on_host() -> ContainersOptions {
        ContainersOptions::under(Path::new("/etc/containers"), WriteContainers::Auto)
    }

    /// `registries.conf.d`, `certs.d` and `registries.conf` under `dir`, the host's procfs.
    pub fn under(dir: &Path, write: WriteContainers) -> ContainersOptions {
        ContainersOptions {
            conf_dir: dir.join("registries.conf.d"),
            certs_dir: dir.join("certs.d"),
            main_file: dir.join("registries.conf"),
            write,
            proc_dir: PathBuf::from("/proc"),
            signal_crio: true,
        }
    }

    /// Whether the drop-in is wanted on a node running `runtime` (its status's
    /// `containerRuntimeVersion`; empty when unknown).
    pub fn wanted(&self, runtime: &str) -> bool {
        match self.write {
            WriteContainers::Always => true,
            WriteContainers::Never => false,
            WriteContainers::Auto => runtime.starts_with("cri-o://") || self.main_file.is_file(),
        }
    }
}

/// When the agent writes the containers-registries.conf(5) drop-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteContainers {
    /// Where the node runs CRI-O, or has a `registries.conf` (podman, skopeo, buildah).
    Auto,
    /// On every node.
    Always,
    /// Never (a drop-in written before is removed).
    Never,
}

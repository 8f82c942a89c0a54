//! The real tools tests drive (skopeo, podman, kubernetes-validate, tmpfs mounts) and the repository's examples.

use super::{root, sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// Runs skopeo, failing with its output.
pub fn skopeo(args: &[&str]) -> String {
    try_skopeo(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs skopeo: its standard output, or why it failed.
pub fn try_skopeo(args: &[&str]) -> Result<String, String> {
    tool("skopeo", Command::new(tool_path("skopeo")).args(args))
}

/// Runs podman as a client alone, its images in `dir` (vfs storage, no journal), its
/// registries configuration only the drop-ins in `dir/home/.config/containers/
/// registries.conf.d` (where a user's go; the system's main file is replaced by an empty
/// one): its standard output, or why it failed.
pub fn podman(dir: &Path, args: &[&str]) -> Result<String, String> {
    let conf = dir.join("registries.conf");
    if !conf.exists() {
        std::fs::write(&conf, "").unwrap();
    }
    let mut cmd = Command::new(tool_path("podman"));
    cmd.env("CONTAINERS_REGISTRIES_CONF", &conf)
        .env("HOME", dir.join("home"))
        .env("TMPDIR", dir)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args([
            "--storage-driver=vfs",
            "--events-backend=file",
            "--cgroup-manager=cgroupfs",
        ])
        .args(args);
    tool("podman", &mut cmd)
}

fn tool_path(bin: &str) -> PathBuf {
    which(bin).unwrap_or_else(|| panic!("{bin} not found: run ./scripts/test, which installs it"))
}

fn tool(name: &str, cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{name} runs: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{name} {:?} failed: {}{}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// sha256 of every file in a skopeo `dir:` copy, by file name.
pub fn dir_blobs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().to_string();
            (name.len() == 64).then(|| {
                let bytes = std::fs::read(e.path()).unwrap();
                let d = sha256(&bytes);
                assert_eq!(
                    d,
                    format!("sha256:{name}"),
                    "skopeo wrote {name} with other content"
                );
                d
            })
        })
        .collect()
}

/// Every RegistryMirror document in deploy/examples, with its file.
pub fn examples() -> Vec<(String, serde_yaml::Value)> {
    let mut out = Vec::new();
    let dir = root().join("deploy/examples");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            if v["kind"] == "RegistryMirror" {
                out.push((path.display().to_string(), v));
            }
        }
    }
    out
}

/// Validates Kubernetes manifests with kubernetes-validate (PyPI), strictly, against the
/// schemas of the oldest and newest Kubernetes versions it is checked with.
pub fn kubernetes_validate(files: &[&Path]) {
    let bin = which("kubernetes-validate")
        .expect("kubernetes-validate not found: run ./scripts/test, which installs it from PyPI");
    for version in ["1.34.0", "1.37.0"] {
        let out = Command::new(&bin)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version} failed:\n{text}"
        );
        assert!(!text.contains("ERROR") && !text.contains("WARN"), "{text}");
    }
}

/// A small tmpfs, unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (the disk-full test runs as root, as ./scripts/test does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

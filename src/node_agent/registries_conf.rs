//! containers-registries.conf(5) drop-ins, which CRI-O, podman, skopeo and buildah all
//! read through containers/image: one file of the agent's own in `registries.conf.d`
//! ([`FILE`]), a `[[registry]]` for each mirrored registry whose `[[registry.mirror]]` is
//! `<mirror host:port>/<registry>` (a port written `_port`; the proxy reads the registry from the path: docs/
//! proxy.md, "Which upstream a request is for"), and each HTTPS mirror's CA under
//! `certs.d/<host:port>/`, where containers/image looks for a registry's CAs. Written
//! atomically; a file without the agent's marker is never changed or removed. CRI-O reads
//! the files at start and again on SIGHUP ([`reload_crio`]); podman and skopeo on every
//! command.

use super::hosts::{CA_FILE, DesiredHost, MARKER, SyncReport, toml_string, write_atomic};
use super::options::ContainersOptions;
use crate::api::docker_hub;
use crate::api::image_ref::registry_in_path;
use crate::api::mirror::endpoint_location;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

/// The drop-in's name: loaded after the distribution's own files (`000-shortnames.conf`,
/// `001-rhel-shortnames.conf`), so that its `[[registry]]` entries replace theirs for the
/// same prefix; an administrator's file sorting after it wins over it.
pub const FILE: &str = "50-pullthrough.conf";

/// Where pulls go when the mirror fails: the registry itself, unless the mirror's upstream
/// names another URL for it (then that URL's host).
fn fallback(registry: &str, server: &str) -> (String, bool) {
    let default = if docker_hub::is_alias(registry) {
        docker_hub::API_URL.to_string()
    } else {
        format!("https://{registry}")
    };
    if server.trim_end_matches('/') == default {
        return (registry.to_string(), false);
    }
    let (location, insecure) = endpoint_location(server);
    let host = location.split('/').next().unwrap_or(location);
    (host.to_string(), insecure)
}

/// The file: for each registry, the mirror first and the registry (or its configured URL)
/// as the fallback, so that a failing mirror never takes pulls down. `insecure` only where
/// it must be: a plain-HTTP mirror, or one whose certificate is not to be checked.
pub fn render(desired: &BTreeMap<String, DesiredHost>) -> String {
    let mut out = format!(
        "{MARKER} Mirrors of: {}. Changes are overwritten.\n",
        desired
            .values()
            .map(|h| h.mirror.replace('\n', " "))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (registry, host) in desired {
        let (fallback, fallback_insecure) = fallback(registry, &host.server);
        let (mirror, plain) = endpoint_location(&host.endpoint);
        out.push_str(&format!(
            "\n[[registry]]\nprefix = {}\nlocation = {}\n",
            toml_string(registry),
            toml_string(&fallback)
        ));
        if fallback_insecure {
            out.push_str("insecure = true\n");
        }
        let path = registry_in_path(registry);
        out.push_str(&format!(
            "\n[[registry.mirror]]\nlocation = {}\n",
            toml_string(&format!("{mirror}/{path}"))
        ));
        if plain || host.skip_verify {
            out.push_str("insecure = true\n");
        }
    }
    out
}

/// The registries a drop-in of the agent's names (its `prefix`es).
fn prefixes(content: &str) -> Vec<String> {
    let Ok(doc) = toml::from_str::<toml::Table>(content) else {
        return Vec::new();
    };
    let registries = doc.get("registry").and_then(|r| r.as_array());
    registries
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("prefix")?.as_str().map(str::to_string))
        .collect()
}

/// A node's containers/image configuration: the drop-in directory and the per-host
/// certificate directory.
pub struct RegistriesConf {
    dir: PathBuf,
    certs: PathBuf,
}

impl RegistriesConf {
    /// `dir` is `registries.conf.d`, `certs` is `certs.d` (both created when first
    /// written to).
    pub fn new(dir: &Path, certs: &Path) -> RegistriesConf {
        RegistriesConf {
            dir: dir.to_path_buf(),
            certs: certs.to_path_buf(),
        }
    }

    /// The drop-in's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Makes the drop-in and the CAs match `desired` (none: no drop-in): writes what
    /// differs, the CAs first, so that the file never names a mirror whose CA is not
    /// there yet; removes the CAs of mirrors no longer named; never touches a file it does
    /// not own. The report is per registry, as for `hosts.toml`.
    pub fn sync(&self, desired: &BTreeMap<String, DesiredHost>) -> SyncReport {
        let mut report = SyncReport::default();
        let all = |what: String| desired.keys().map(move |r| (r.clone(), what.clone()));
        let current = match std::fs::read_to_string(self.file()) {
            Ok(c) => Some(c),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                report.failed.extend(all(e.to_string()));
                return report;
            }
        };
        if current
            .as_deref()
            .is_some_and(|c| !super::hosts::is_owned(c))
        {
            report.unmanaged.extend(desired.keys().cloned());
            return report;
        }
        if let Err(e) = self.sync_cas(desired) {
            report.failed.extend(all(format!("writing a CA: {e}")));
            return report;
        }
        let before = current.as_deref().map(prefixes).unwrap_or_default();
        report.removed = before
            .into_iter()
            .filter(|r| !desired.contains_key(r))
            .collect();
        if desired.is_empty() {
            if current.is_some()
                && let Err(e) = std::fs::remove_file(self.file())
            {
                report.failed.push(("*".into(), e.to_string()));
                report.removed.clear();
            }
            return report;
        }
        let want = render(desired);
        if current.as_deref() == Some(want.as_str()) {
            report.unchanged.extend(desired.keys().cloned());
            return report;
        }
        match write_atomic(&self.file(), &want) {
            Ok(()) => report.written.extend(desired.keys().cloned()),
            Err(e) => {
                report.failed.extend(all(e.to_string()));
                report.removed.clear();
            }
        }
        report
    }

    /// Each HTTPS mirror's CA in `certs.d/<host:port>/` ([`CA_FILE`]), and the agent's CA
    /// files of hosts no longer wanted gone (their directories too, when empty).
    fn sync_cas(&self, desired: &BTreeMap<String, DesiredHost>) -> io::Result<()> {
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        for host in desired.values() {
            let (mirror, plain) = endpoint_location(&host.endpoint);
            if let (Some(pem), false) = (&host.ca, plain)
                && super::hosts::valid_dir_name(mirror)
            {
                wanted.insert(mirror, pem);
            }
        }
        for (mirror, pem) in &wanted {
            let path = self.certs.join(mirror).join(CA_FILE);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(*pem) {
                write_atomic(&path, pem)?;
            }
        }
        let entries = match std::fs::read_dir(&self.certs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let ca = entry.path().join(CA_FILE);
            if !wanted.contains_key(name.as_str()) && ca.is_file() {
                std::fs::remove_file(&ca)?;
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        Ok(())
    }
}

/// Sends SIGHUP to every process named `crio` that `proc` (a procfs) shows: CRI-O then
/// reads its registries configuration again (crio.conf(5): "The containers-registries.conf(5)
/// file can be reloaded as well by sending SIGHUP to the crio process"). The agent sees the
/// host's processes only with `hostPID` (docs/node-agent.md). The number signalled.
pub fn reload_crio(proc: &Path) -> io::Result<usize> {
    let mut signalled = 0;
    for entry in std::fs::read_dir(proc)?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "crio" {
            rustix::process::kill_process(pid, rustix::process::Signal::HUP)?;
            signalled += 1;
        }
    }
    Ok(signalled)
}

/// What the containers-registries.conf(5) drop-in came to after a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropInState {
    /// Not wanted on this node: no drop-in.
    NotWritten,
    /// Says what it should; CRI-O, where it runs, was signalled after the last change.
    InPlace,
    /// In place, but CRI-O was not signalled (it reads the drop-in when it next starts).
    CrioNotReloaded(String),
    /// A file not written by the agent is where the drop-in goes.
    Unmanaged,
    /// Could not be written.
    Failed,
}

impl DropInState {
    /// The value of [`REGISTRIES_CONF_ANNOTATION`].
    pub fn state(&self) -> &'static str {
        match self {
            DropInState::NotWritten => "not-written",
            DropInState::InPlace => "in-place",
            DropInState::CrioNotReloaded(_) => "crio-not-reloaded",
            DropInState::Unmanaged => "unmanaged",
            DropInState::Failed => "failed",
        }
    }
}

/// The drop-in brought to `desired` (or removed, where it is not wanted), and CRI-O
/// signalled when it changed or an earlier signal is still owed (`owed`, kept between
/// syncs). `crio`: whether the node runs CRI-O (unknown on a node configured by hand:
/// then any CRI-O there is signalled).
pub(super) fn sync_drop_in(
    options: &ContainersOptions,
    wanted: bool,
    desired: &BTreeMap<String, DesiredHost>,
    crio: Option<bool>,
    owed: &mut bool,
) -> (SyncReport, DropInState) {
    let conf = RegistriesConf::new(&options.conf_dir, &options.certs_dir);
    let none = BTreeMap::new();
    let report = conf.sync(if wanted { desired } else { &none });
    report.log(FILE);
    if !report.written.is_empty() || !report.removed.is_empty() {
        *owed = options.signal_crio && crio != Some(false);
    }
    let mut state = if !report.failed.is_empty() {
        DropInState::Failed
    } else if !report.unmanaged.is_empty() {
        DropInState::Unmanaged
    } else if wanted {
        DropInState::InPlace
    } else {
        DropInState::NotWritten
    };
    if *owed {
        match reload_crio(&options.proc_dir) {
            Ok(n) if n > 0 => {
                tracing::info!(
                    processes = n,
                    "CRI-O told to read its registries again (SIGHUP)"
                );
                *owed = false;
            }
            Ok(_) if crio.is_none() => *owed = false,
            Ok(_) => {
                let why =
                    "no crio process is visible: the agent needs hostPID (docs/node-agent.md)";
                tracing::warn!("the drop-in changed but CRI-O was not told: {why}");
                if state == DropInState::InPlace {
                    state = DropInState::CrioNotReloaded(why.into());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the drop-in changed but CRI-O could not be told");
                if state == DropInState::InPlace {
                    state = DropInState::CrioNotReloaded(e.to_string());
                }
            }
        }
    }
    (report, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(mirror: &str, endpoint: &str, server: &str) -> DesiredHost {
        DesiredHost {
            mirror: mirror.into(),
            server: server.into(),
            endpoint: endpoint.into(),
            ca: None,
            skip_verify: false,
        }
    }

    fn registries(text: &str) -> Vec<toml::Value> {
        let doc: toml::Table = toml::from_str(text).unwrap();
        doc["registry"].as_array().unwrap().clone()
    }

    #[test]
    fn each_registry_goes_to_its_mirror_by_path_and_falls_back_to_itself() {
        let desired = BTreeMap::from([
            (
                "docker.io".to_string(),
                host(
                    "ns/hub",
                    "http://10.96.0.10:5000",
                    "https://registry-1.docker.io",
                ),
            ),
            (
                "ghcr.io".to_string(),
                host("ns/tls", "https://mirror.example:5443/", "https://ghcr.io"),
            ),
            (
                "registry.local:5000".to_string(),
                host("ns/hub", "http://10.96.0.10:5000", "http://10.1.2.3:5000"),
            ),
        ]);
        let text = render(&desired);
        assert!(super::super::hosts::is_owned(&text));
        assert!(text.starts_with(&format!("{MARKER} Mirrors of: ns/hub, ns/tls.")));
        let r = registries(&text);
        assert_eq!(r.len(), 3);
        // Docker Hub: its own name as the fallback, the mirror by path, plain HTTP.
        assert_eq!(r[0]["prefix"].as_str(), Some("docker.io"));
        assert_eq!(r[0]["location"].as_str(), Some("docker.io"));
        assert!(r[0].get("insecure").is_none());
        let m = &r[0]["mirror"].as_array().unwrap()[0];
        assert_eq!(m["location"].as_str(), Some("10.96.0.10:5000/docker.io"));
        assert_eq!(m["insecure"].as_bool(), Some(true));
        // HTTPS mirror: checked.
        let m = &r[1]["mirror"].as_array().unwrap()[0];
        assert_eq!(m["location"].as_str(), Some("mirror.example:5443/ghcr.io"));
        assert!(m.get("insecure").is_none());
        // An upstream with a URL of its own: that host, plain HTTP where it is; a port in
        // the mirror's path as the proxy reads it.
        assert_eq!(r[2]["location"].as_str(), Some("10.1.2.3:5000"));
        let m = &r[2]["mirror"].as_array().unwrap()[0];
        assert_eq!(
            m["location"].as_str(),
            Some("10.96.0.10:5000/registry.local_5000")
        );
        assert_eq!(r[2]["insecure"].as_bool(), Some(true));
        assert_eq!(
            prefixes(&text),
            ["docker.io", "ghcr.io", "registry.local:5000"]
        );
    }

    #[test]
    fn the_drop_in_and_its_cas_follow_the_mirrors_and_leave_others_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (d, certs) = (
            dir.path().join("registries.conf.d"),
            dir.path().join("certs.d"),
        );
        let conf = RegistriesConf::new(&d, &certs);
        let mut tls = host("ns/tls", "https://mirror.example:5443", "https://ghcr.io");
        tls.ca = Some("-----BEGIN CERTIFICATE-----\n...\n".into());
        let both = BTreeMap::from([
            ("ghcr.io".to_string(), tls.clone()),
            (
                "quay.io".to_string(),
                host("ns/hub", "http://10.96.0.10:5000", "https://quay.io"),
            ),
        ]);
        assert_eq!(conf.sync(&both).written, ["ghcr.io", "quay.io"]);
        let ca = certs.join("mirror.example:5443").join(CA_FILE);
        assert_eq!(
            std::fs::read_to_string(&ca).unwrap(),
            tls.ca.clone().unwrap()
        );
        assert_eq!(conf.sync(&both).unchanged, ["ghcr.io", "quay.io"]);
        // One mirror goes: its registry is removed, its CA too; another CA stays.
        std::fs::create_dir_all(certs.join("other:443")).unwrap();
        std::fs::write(certs.join("other:443/ca.crt"), "theirs").unwrap();
        let one = BTreeMap::from([("quay.io".to_string(), both["quay.io"].clone())]);
        let report = conf.sync(&one);
        assert_eq!(
            (report.written, report.removed),
            (vec!["quay.io".into()], vec!["ghcr.io".into()])
        );
        assert!(!ca.exists() && !certs.join("mirror.example:5443").exists());
        assert!(certs.join("other:443/ca.crt").exists());
        // None: the drop-in goes.
        assert_eq!(conf.sync(&BTreeMap::new()).removed, ["quay.io"]);
        assert!(!conf.file().exists());
        // A file of someone else's under the agent's name is left as it is.
        std::fs::write(conf.file(), "[[registry]]\nprefix = \"quay.io\"\n").unwrap();
        assert_eq!(conf.sync(&one).unmanaged, ["quay.io"]);
        assert_eq!(conf.sync(&BTreeMap::new()), SyncReport::default());
        assert!(conf.file().exists());
    }

    #[test]
    fn only_processes_named_crio_are_signalled() {
        // A procfs of two processes that no longer exist: nothing named crio among them
        // is signalled, and the other is never looked at beyond its name.
        let dir = tempfile::tempdir().unwrap();
        for (pid, comm) in [("4194304", "crio\n"), ("4194303", "containerd\n")] {
            std::fs::create_dir_all(dir.path().join(pid)).unwrap();
            std::fs::write(dir.path().join(pid).join("comm"), comm).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("self")).unwrap();
        let err = reload_crio(dir.path()).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(3),
            "ESRCH: the crio of pid 4194304 is gone"
        );
        std::fs::remove_dir_all(dir.path().join("4194304")).unwrap();
        assert_eq!(reload_crio(dir.path()).unwrap(), 0);
    }
}

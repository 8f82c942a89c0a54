//! containerd `hosts.toml` files: rendering, ownership, and keeping a `certs.d` directory
//! in the wanted state with atomic writes, touching only files this agent wrote.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// First line of every file the agent owns. Files without it are never changed or removed.
pub const MARKER: &str = "# Managed by pullthrough node-agent.";

/// What one registry's `hosts.toml` should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredHost {
    /// The mirror (`namespace/name`, or `standalone`) this file is for.
    pub mirror: String,
    /// The upstream registry's own URL, containerd's fallback (`server`).
    pub server: String,
    /// The mirror's URL, tried first.
    pub endpoint: String,
    /// The CA certificate (PEM) that signed the mirror's certificate, when it serves
    /// HTTPS: written beside `hosts.toml` ([`CA_FILE`]) and named by its `ca`.
    pub ca: Option<String>,
    /// `skip_verify = true`: the mirror's certificate is not checked (only when asked).
    pub skip_verify: bool,
}

/// The CA file the agent writes beside a `hosts.toml` of its own.
pub const CA_FILE: &str = "pullthrough-ca.crt";

pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How long containerd waits for a connection to the mirror before it falls back
/// (`dial_timeout`, honoured from containerd 2.0.7 and 2.1; earlier versions ignore the
/// key, as they ignore every key they do not know: their decoding is not strict).
pub const DIAL_TIMEOUT: &str = "1s";

/// The file: the mirror first (pull and resolve), the upstream as fallback, so a failing
/// mirror never takes pulls down. `ca` is where the mirror's CA certificate is, when it
/// has one.
pub fn render(host: &DesiredHost, ca: Option<&Path>) -> String {
    let mut out = format!(
        "{MARKER} Mirror: {}. Changes are overwritten.\nserver = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = {}\n",
        host.mirror.replace('\n', " "),
        toml_string(&host.server),
        toml_string(&host.endpoint),
        toml_string(DIAL_TIMEOUT),
    );
    if let Some(ca) = ca {
        out.push_str(&format!(
            "  ca = {}\n",
            toml_string(&ca.display().to_string())
        ));
    }
    if host.skip_verify {
        out.push_str("  skip_verify = true\n");
    }
    out
}

/// Whether a file's content was written by the agent.
pub fn is_owned(content: &str) -> bool {
    content.starts_with(MARKER)
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Registries whose file was (re)written.
    pub written: Vec<String>,
    /// Registries whose file already said the right thing.
    pub unchanged: Vec<String>,
    /// Registries whose owned file was removed.
    pub removed: Vec<String>,
    /// Registries left alone because a file the agent does not own is there.
    pub unmanaged: Vec<String>,
    /// Registries that failed, with the error.
    pub failed: Vec<(String, String)>,
}

impl SyncReport {
    /// Registries that now point where they should.
    pub fn in_place(&self) -> impl Iterator<Item = &String> {
        self.written.iter().chain(self.unchanged.iter())
    }

    /// Says what the sync did to `file`s in the log.
    pub fn log(&self, file: &str) {
        for r in &self.written {
            tracing::info!(registry = %r, "{file} written");
        }
        for r in &self.removed {
            tracing::info!(registry = %r, "{file} removed");
        }
        for r in &self.unmanaged {
            tracing::warn!(registry = %r, "a {file} not written by pullthrough is there; leaving it alone");
        }
        for (r, e) in &self.failed {
            tracing::error!(registry = %r, error = %e, "could not update {file}");
        }
    }
}

/// A containerd `certs.d` directory.
pub struct HostsDir {
    root: PathBuf,
}

/// Directory names are registry hosts (`docker.io`, `registry.local:5000`): nothing that
/// could leave the directory.
pub fn valid_dir_name(registry: &str) -> bool {
    !registry.is_empty()
        && registry != "."
        && registry != ".."
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
}

impl HostsDir {
    /// A handle on `root` (created when first written to).
    pub fn new(root: &Path) -> HostsDir {
        HostsDir {
            root: root.to_path_buf(),
        }
    }

    fn file(&self, registry: &str) -> PathBuf {
        self.root.join(registry).join("hosts.toml")
    }

    /// Makes the directory match `desired` (registry -> file): writes what differs, removes
    /// owned files no longer wanted, never touches files it does not own.
    pub fn sync(&self, desired: &BTreeMap<String, DesiredHost>) -> SyncReport {
        let mut report = SyncReport::default();
        for (registry, host) in desired {
            if !valid_dir_name(registry) {
                report
                    .failed
                    .push((registry.clone(), "not a registry host name".into()));
                continue;
            }
            let path = self.file(registry);
            let ca_path = self.root.join(registry).join(CA_FILE);
            let want = render(host, host.ca.as_ref().map(|_| ca_path.as_path()));
            let ca_now = std::fs::read_to_string(&ca_path).ok();
            match std::fs::read_to_string(&path) {
                Ok(current) if current == want && ca_now == host.ca => {
                    report.unchanged.push(registry.clone());
                    continue;
                }
                Ok(current) if !is_owned(&current) => {
                    report.unmanaged.push(registry.clone());
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    report.failed.push((registry.clone(), e.to_string()));
                    continue;
                }
            }
            // The CA first: a hosts.toml never names a CA file that is not there.
            let ca = match &host.ca {
                Some(pem) => write_atomic(&ca_path, pem),
                None => match std::fs::remove_file(&ca_path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            match ca.and_then(|()| write_atomic(&path, &want)) {
                Ok(()) => report.written.push(registry.clone()),
                Err(e) => report.failed.push((registry.clone(), e.to_string())),
            }
        }
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return report,
            Err(e) => {
                report
                    .failed
                    .push(("*".into(), format!("reading {}: {e}", self.root.display())));
                return report;
            }
        };
        for entry in entries.flatten() {
            let registry = entry.file_name().to_string_lossy().to_string();
            if desired.contains_key(&registry) || !entry.path().is_dir() {
                continue;
            }
            let path = entry.path().join("hosts.toml");
            let Ok(current) = std::fs::read_to_string(&path) else {
                continue;
            };
            if !is_owned(&current) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    let _ = std::fs::remove_file(entry.path().join(CA_FILE));
                    // Leave the directory if anything else lives there (certificates).
                    let _ = std::fs::remove_dir(entry.path());
                    report.removed.push(registry);
                }
                Err(e) => report.failed.push((registry, e.to_string())),
            }
        }
        report
    }
}

/// Writes via a temp file in the same directory and a rename: containerd, which reads the
/// file on every pull, sees the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, content: &str) -> io::Result<()> {
    let dir = path.parent().expect("hosts.toml has a directory");
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().expect("a file").to_string_lossy();
    let tmp = dir.join(format!(".{name}.pullthrough-{}", std::process::id()));
    crate::fsutil::replace_file(&tmp, path, content.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(endpoint: &str) -> DesiredHost {
        DesiredHost {
            mirror: "ns/public".into(),
            server: "https://registry-1.docker.io".into(),
            endpoint: endpoint.into(),
            ca: None,
            skip_verify: false,
        }
    }

    #[test]
    fn renders_valid_toml_with_the_mirror_first() {
        let text = render(&host("http://10.96.12.7:5000"), None);
        assert!(is_owned(&text));
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["server"].as_str(), Some("https://registry-1.docker.io"));
        let h = &v["host"]["http://10.96.12.7:5000"];
        assert_eq!(h["capabilities"].as_array().unwrap().len(), 2);
        assert_eq!(h["dial_timeout"].as_str(), Some("1s"));
        let tricky = render(
            &DesiredHost {
                mirror: "a\nb".into(),
                server: "https://x\"y".into(),
                endpoint: "http://e".into(),
                ca: None,
                skip_verify: true,
            },
            Some(Path::new("/etc/containerd/certs.d/x/pullthrough-ca.crt")),
        );
        let v: toml::Value = toml::from_str(&tricky).unwrap();
        assert_eq!(v["server"].as_str(), Some("https://x\"y"));
        let h = &v["host"]["http://e"];
        assert_eq!(
            h["ca"].as_str(),
            Some("/etc/containerd/certs.d/x/pullthrough-ca.crt")
        );
        assert_eq!(h["skip_verify"].as_bool(), Some(true));
    }

    #[test]
    fn a_mirror_s_ca_is_written_beside_its_file_and_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = HostsDir::new(dir.path());
        let mut h = host("https://10.96.12.7:5000");
        h.ca = Some("-----BEGIN CERTIFICATE-----\n...\n".into());
        let desired = BTreeMap::from([("docker.io".to_string(), h.clone())]);
        assert_eq!(hosts.sync(&desired).written, ["docker.io"]);
        let ca = dir.path().join("docker.io").join(CA_FILE);
        assert_eq!(std::fs::read_to_string(&ca).unwrap(), h.ca.clone().unwrap());
        let text = std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).unwrap();
        assert!(
            text.contains(&format!("ca = \"{}\"", ca.display())),
            "{text}"
        );
        assert_eq!(hosts.sync(&desired).unchanged, ["docker.io"]);
        // A new CA is written over the old one.
        h.ca = Some("-----BEGIN CERTIFICATE-----\nnew\n".into());
        let renewed = BTreeMap::from([("docker.io".to_string(), h.clone())]);
        assert_eq!(hosts.sync(&renewed).written, ["docker.io"]);
        assert_eq!(std::fs::read_to_string(&ca).unwrap(), h.ca.clone().unwrap());
        // The mirror stops serving TLS: the CA goes.
        h.ca = None;
        let plain = BTreeMap::from([("docker.io".to_string(), h)]);
        assert_eq!(hosts.sync(&plain).written, ["docker.io"]);
        assert!(!ca.exists());
        // The mirror goes: both go.
        let desired = BTreeMap::from([("docker.io".to_string(), host("https://e"))]);
        let mut with_ca = desired["docker.io"].clone();
        with_ca.ca = Some("pem".into());
        hosts.sync(&BTreeMap::from([("docker.io".to_string(), with_ca)]));
        assert_eq!(hosts.sync(&BTreeMap::new()).removed, ["docker.io"]);
        assert!(!dir.path().join("docker.io").exists());
    }

    #[test]
    fn sync_writes_leaves_alone_and_removes_only_what_it_owns() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = HostsDir::new(dir.path());
        // An admin's own file for quay.io, and a certificate next to ours.
        std::fs::create_dir_all(dir.path().join("quay.io")).unwrap();
        std::fs::write(
            dir.path().join("quay.io/hosts.toml"),
            "server = \"https://quay.io\"\n",
        )
        .unwrap();
        let mut want = BTreeMap::from([
            ("docker.io".to_string(), host("http://10.0.0.1:5000")),
            ("quay.io".to_string(), host("http://10.0.0.1:5000")),
        ]);
        let r = hosts.sync(&want);
        assert_eq!(r.written, vec!["docker.io"]);
        assert_eq!(r.unmanaged, vec!["quay.io"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("quay.io/hosts.toml")).unwrap(),
            "server = \"https://quay.io\"\n"
        );

        // Nothing changed: no write (no churn).
        let before = std::fs::metadata(dir.path().join("docker.io/hosts.toml"))
            .unwrap()
            .modified()
            .unwrap();
        let r = hosts.sync(&want);
        assert_eq!(r.unchanged, vec!["docker.io"]);
        assert!(r.written.is_empty());
        let after = std::fs::metadata(dir.path().join("docker.io/hosts.toml"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);

        // The endpoint moves: rewritten.
        want.insert("docker.io".into(), host("http://10.0.0.2:5000"));
        assert_eq!(hosts.sync(&want).written, vec!["docker.io"]);
        assert!(
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml"))
                .unwrap()
                .contains("10.0.0.2")
        );

        // Gone from the wanted set: removed, with its directory unless something else is in it.
        std::fs::write(dir.path().join("docker.io/ca.crt"), "cert").unwrap();
        let r = hosts.sync(&BTreeMap::new());
        assert_eq!(r.removed, vec!["docker.io"]);
        assert!(!dir.path().join("docker.io/hosts.toml").exists());
        assert!(dir.path().join("docker.io/ca.crt").exists());
        assert!(
            dir.path().join("quay.io/hosts.toml").exists(),
            "not ours: kept"
        );
        // No temp files left behind.
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.contains(".hosts.toml."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn walk(p: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
        out
    }

    #[test]
    fn refuses_path_like_registry_names() {
        let dir = tempfile::tempdir().unwrap();
        let r = HostsDir::new(dir.path())
            .sync(&BTreeMap::from([("../etc".to_string(), host("http://x"))]));
        assert_eq!(r.failed.len(), 1);
        assert!(valid_dir_name("registry.local:5000"));
        assert!(!valid_dir_name(".."));
        assert!(!valid_dir_name("a/b"));
    }
}

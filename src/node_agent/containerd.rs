//! Reading (never writing) the node's containerd configuration to tell whether containerd
//! will read the `hosts.toml` files at all: it does only when the CRI registry
//! `config_path` includes the directory the agent writes to.

/// containerd 2.x's built-in `config_path`.
pub const CONTAINERD2_DEFAULT: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";

/// What the configuration says about `config_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// `config_path` includes the directory.
    Enabled {
        /// The configured value.
        config_path: String,
    },
    /// `config_path` is set but does not include the directory.
    Elsewhere {
        /// The configured value.
        config_path: String,
    },
    /// `config_path` is not set, and this containerd does not default it.
    NotSet,
    /// Legacy `mirrors` are configured: containerd refuses `config_path` next to them.
    LegacyMirrors,
    /// The file cannot be read or parsed.
    Unreadable(String),
}

impl ConfigPath {
    /// Whether containerd will use the agent's files.
    pub fn enabled(&self) -> bool {
        matches!(self, ConfigPath::Enabled { .. })
    }

    /// A short machine-readable state for the Node annotation and metrics.
    pub fn state(&self) -> &'static str {
        match self {
            ConfigPath::Enabled { .. } => "enabled",
            ConfigPath::Elsewhere { .. } => "elsewhere",
            ConfigPath::NotSet => "not-set",
            ConfigPath::LegacyMirrors => "legacy-mirrors",
            ConfigPath::Unreadable(_) => "unreadable",
        }
    }

    /// What to tell the admin.
    pub fn message(&self, certs_dir: &str) -> String {
        match self {
            ConfigPath::Enabled { config_path } => {
                format!("containerd reads hosts.toml from {config_path}")
            }
            ConfigPath::Elsewhere { config_path } => format!(
                "containerd's registry config_path is {config_path:?}, which does not include {certs_dir}: \
                 the mirror files written there are ignored; add {certs_dir} to config_path or point the agent's --containerd-certs-path at it"
            ),
            ConfigPath::NotSet => format!(
                "containerd's CRI registry config_path is not set, so containerd ignores hosts.toml files: set \
                 config_path = \"{certs_dir}\" under [plugins.\"io.containerd.grpc.v1.cri\".registry] (containerd 1.x) and restart containerd"
            ),
            ConfigPath::LegacyMirrors => "containerd's config uses the deprecated registry.mirrors section, which cannot be combined with config_path: \
                 move those mirrors to hosts.toml files and set config_path".to_string(),
            ConfigPath::Unreadable(e) => format!("cannot read containerd's config: {e}"),
        }
    }
}

/// Checks a containerd `config.toml` (its text; `None` when the file does not exist)
/// against the host directory the agent writes to.
pub fn check(config: Option<&str>, certs_dir: &str) -> ConfigPath {
    let Some(text) = config else {
        // No file: containerd runs on built-in defaults, and only 2.x defaults config_path.
        return ConfigPath::NotSet;
    };
    let value: toml::Value = match toml::from_str(text) {
        Ok(v) => v,
        Err(e) => return ConfigPath::Unreadable(e.to_string()),
    };
    let version = value
        .get("version")
        .and_then(|v| v.as_integer())
        .unwrap_or(1);
    let plugins = value.get("plugins");
    let registry = match version {
        3 => plugins
            .and_then(|p| p.get("io.containerd.cri.v1.images"))
            .and_then(|c| c.get("registry")),
        2 => plugins
            .and_then(|p| p.get("io.containerd.grpc.v1.cri"))
            .and_then(|c| c.get("registry")),
        _ => plugins
            .and_then(|p| p.get("cri"))
            .and_then(|c| c.get("registry")),
    };
    let mirrors = registry
        .and_then(|r| r.get("mirrors"))
        .and_then(|m| m.as_table())
        .is_some_and(|m| !m.is_empty());
    let configured = registry
        .and_then(|r| r.get("config_path"))
        .and_then(|c| c.as_str())
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let config_path = match (configured, version) {
        (Some(c), _) => c,
        (None, 3) => CONTAINERD2_DEFAULT.to_string(),
        (None, _) if mirrors => return ConfigPath::LegacyMirrors,
        (None, _) => return ConfigPath::NotSet,
    };
    if mirrors {
        return ConfigPath::LegacyMirrors;
    }
    let want = certs_dir.trim_end_matches('/');
    if config_path
        .split(':')
        .any(|p| p.trim_end_matches('/') == want)
    {
        ConfigPath::Enabled { config_path }
    } else {
        ConfigPath::Elsewhere { config_path }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/etc/containerd/certs.d";

    #[test]
    fn containerd_1x_needs_config_path() {
        let enabled = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        assert!(check(Some(enabled), DIR).enabled());
        let not_set =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause\"\n";
        assert_eq!(check(Some(not_set), DIR), ConfigPath::NotSet);
        assert!(
            check(Some(not_set), DIR)
                .message(DIR)
                .contains("config_path = \"/etc/containerd/certs.d\"")
        );
        let elsewhere = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/docker/certs.d\"\n";
        assert!(matches!(
            check(Some(elsewhere), DIR),
            ConfigPath::Elsewhere { .. }
        ));
        let legacy = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://x\"]\n";
        assert_eq!(check(Some(legacy), DIR), ConfigPath::LegacyMirrors);
        let v1 = "[plugins.cri.registry]\n  config_path = \"/etc/containerd/certs.d/\"\n";
        assert!(check(Some(v1), DIR).enabled());
        assert_eq!(check(None, DIR), ConfigPath::NotSet);
    }

    #[test]
    fn containerd_2x_defaults_to_certs_d() {
        assert!(check(Some("version = 3\n"), DIR).enabled());
        let custom = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/a:/etc/containerd/certs.d\"\n";
        assert!(check(Some(custom), DIR).enabled());
        assert!(matches!(
            check(Some("version = [\n"), DIR),
            ConfigPath::Unreadable(_)
        ));
    }
}

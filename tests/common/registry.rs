//! A real Distribution registry as the upstream (open, htpasswd or token auth), and the users of the private one.

use super::{free_port, serving, token_server, which};
use pullthrough::api::Credentials;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a [`Registry`] authenticates its clients.
enum RegistryAuth<'a> {
    /// Basic, against these htpasswd lines.
    Htpasswd(&'a str),
    /// Bearer tokens of this issuer.
    Token(&'a token_server::TokenServer),
}

/// A real `docker-registry` (CNCF Distribution) process on a free loopback port, killed on drop.
pub struct Registry {
    pub url: String,
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Registry {
    /// A plain registry (the upstream in tests).
    pub async fn start() -> Registry {
        Registry::start_with(None).await
    }

    /// A registry in pull-through proxy mode for `remote` (the reference cache).
    pub async fn start_with(proxy_remote: Option<&str>) -> Registry {
        Registry::start_opts(proxy_remote, None, "").await
    }

    /// A registry where every request needs one of `users` (htpasswd lines, bcrypt), by
    /// Basic auth. Distribution rereads the file when it changes ([`Self::set_users`]).
    pub async fn start_private(users: &str) -> Registry {
        Registry::start_opts(None, Some(RegistryAuth::Htpasswd(users)), "").await
    }

    /// A registry that takes the tokens of `issuer` (the distribution token spec), and
    /// nothing else.
    pub async fn start_token(issuer: &token_server::TokenServer) -> Registry {
        Registry::start_token_with(issuer, "").await
    }

    /// [`Self::start_token`], with `extra` (YAML) added to the registry's configuration.
    pub async fn start_token_with(issuer: &token_server::TokenServer, extra: &str) -> Registry {
        Registry::start_opts(None, Some(RegistryAuth::Token(issuer)), extra).await
    }

    /// Replaces the users of a [`Self::start_private`] registry.
    pub fn set_users(&self, users: &str) {
        let path = self.dir.path().join("htpasswd");
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, users).unwrap();
        // Distribution rereads the file when its modification time changes: make sure
        // it does, whatever the file system's clock granularity.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(before + Duration::from_secs(2)).unwrap();
    }

    async fn start_opts(
        proxy_remote: Option<&str>,
        auth: Option<RegistryAuth<'_>>,
        extra: &str,
    ) -> Registry {
        let bin = which("docker-registry").expect(
            "docker-registry not found: run ./scripts/test, which installs Debian's docker-registry",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some(remote) = proxy_remote {
            cfg.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        match auth {
            Some(RegistryAuth::Htpasswd(users)) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, users).unwrap();
                cfg.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    path.display()
                ));
            }
            Some(RegistryAuth::Token(issuer)) => cfg.push_str(&issuer.registry_config()),
            None => {}
        }
        cfg.push_str(extra);
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg_path)
            .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let reg = Registry {
            url: url.clone(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            child,
            dir,
        };
        assert!(
            serving(&url, Duration::from_secs(60)).await,
            "docker-registry did not come up: {}",
            reg.log()
        );
        reg
    }

    /// `host:port`, the registry name clients use.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many GETs of `path_part` the registry logged, once at least `at_least` are
    /// there. The registry writes a request's line after its handler returns, which on a
    /// loaded machine can be long after the client (here, a cache that has read the whole
    /// body) has its last byte; so this waits (60 s at most) until `at_least` lines are
    /// there, then until the log has stopped growing, and counts.
    pub fn gets(&self, path_part: &str, at_least: usize) -> usize {
        let gets = |log: &str| {
            log.lines()
                .filter(|l| l.contains("\"GET ") && l.contains(path_part))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while gets(&self.read_log()) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        gets(&self.access_log())
    }

    /// Asserts that the registry logged exactly `want` GETs of `path_part` (see
    /// [`Self::gets`]).
    #[track_caller]
    pub fn assert_gets(&self, path_part: &str, want: usize) {
        assert_eq!(
            self.gets(path_part, want),
            want,
            "GETs of {path_part} at the upstream"
        );
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// All access-log lines (one per request), once the log has not grown for 100 ms
    /// (5 s at the most). For counts, see [`Self::assert_gets`].
    pub fn access_log(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut log = self.read_log();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.read_log();
            if now == log {
                break;
            }
            log = now;
        }
        log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// htpasswd lines (bcrypt, cost 4): cache:stash (the proxy's own), alice:wonder,
/// bob:builder.
pub const CACHE: &str = "cache:$2b$04$es1FBHi4rE1F0WDaj9M.q.OytbToYO6a1FJgb5whB3UX6FEmiU7xK\n";
pub const ALICE: &str = "alice:$2b$04$TwXjjJWJnR8Mh0jdpU37POgeOMpEganXZYC42vKGEkHIYzhpZHHP6\n";
pub const BOB: &str = "bob:$2b$04$HZrnC6gMd75VvjRd6.20meK4Yz6p.G8t3PUTEW5X2SGx5lv9RHtPO\n";

/// The proxy's own credentials on the private registry: the `cache` user.
pub fn cache_credentials() -> Credentials {
    Credentials {
        username: "cache".into(),
        password: "stash".into(),
    }
}

/// The private registry's URL with alice's credentials in it, to push with.
pub fn as_alice(r: &Registry) -> String {
    format!("http://alice:wonder@{}", r.host())
}

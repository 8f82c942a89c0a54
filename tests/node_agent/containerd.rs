//! The node agent with the real node runtime: a private containerd (own root, state,
//! socket and config in a temp dir) pulls with `ctr images pull --hosts-dir` from a
//! `docker-registry` upstream, through the proxy the agent pointed it at; then, with the
//! proxy gone, straight from the upstream.

use super::{agent, text};
use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Containerd {
    fn start(dir: &Path, config_path_line: &str) -> Containerd {
        let bin = which("containerd")
            .expect("containerd not found: run ./scripts/test, which installs it");
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri".registry]
  {config_path_line}
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
                opt = dir.join("opt").display(),
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("containerd.err")).unwrap())
            .spawn()
            .unwrap();
        let c = Containerd {
            child,
            socket,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.err")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new(which("ctr").expect("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn pull(&self, hosts_dir: &Path, reference: &str) -> Output {
        self.pull_as(hosts_dir, reference, None)
    }

    /// A pull with `user` (`name:password`) as the pod's pull secret would give it.
    fn pull_as(&self, hosts_dir: &Path, reference: &str, user: Option<&str>) -> Output {
        let mut args = vec![
            "images",
            "pull",
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
            "--platform",
            "linux/amd64",
            "--snapshotter",
            "native",
        ];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.push(reference);
        self.ctr(&args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_mirror_and_falls_back_without_it() {
    let upstream = Registry::start().await;
    let first = Image::generate_tar(41, &[300_000, 40_000], "amd64");
    let second = Image::generate_tar(42, &[200_000], "amd64");
    push_image(&upstream.url, "team/app", "v1", &first).await;
    push_image(&upstream.url, "team/app", "v2", &second).await;
    let registry = upstream.host();
    let proxy = Proxy::start(&[(registry.as_str(), upstream.url.as_str())]).await;

    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs.d");
    let containerd = Containerd::start(
        work.path(),
        &format!("config_path = \"{}\"", certs.display()),
    );

    // The agent, as on a node configured by hand, writes hosts.toml for the upstream.
    let out = agent(&[
        "--standalone",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--containerd-config",
        work.path().join("config.toml").to_str().unwrap(),
        "--containerd-certs-path",
        certs.to_str().unwrap(),
        "--mirror",
        &format!("{registry}={}", proxy.url),
        "--server",
        &format!("{registry}={}", upstream.url),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("containerd reads hosts.toml from"),
        "{}",
        text(&out)
    );
    let hosts = std::fs::read_to_string(certs.join(&registry).join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"{}\"]", proxy.url)),
        "{hosts}"
    );

    // A pull goes through the mirror.
    let reference = format!("{registry}/team/app:v1");
    let out = containerd.pull(&certs, &reference);
    assert!(
        out.status.success(),
        "ctr pull failed: {}\n{}",
        text(&out),
        containerd.log()
    );
    let images = text(&containerd.ctr(&["images", "ls"]));
    assert!(images.contains(&first.manifest.digest), "{images}");
    let content = text(&containerd.ctr(&["content", "ls"]));
    for b in first.blobs() {
        assert!(
            content.contains(&b.digest),
            "containerd has {}: {content}",
            b.digest
        );
        upstream.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    let m = proxy.metrics().await;
    let blobs = first.blobs().count() as f64;
    assert_eq!(
        metric_value(
            &m,
            "pullthrough_requests_total",
            &[("kind", "blob"), ("result", "miss")]
        ),
        blobs
    );
    assert!(metric_value(&m, "pullthrough_requests_total", &[("kind", "manifest")]) >= 1.0);
    let layer_bytes: usize = first.blobs().map(|b| b.bytes.len()).sum();
    assert!(metric_value(&m, "pullthrough_served_bytes_total", &[]) >= layer_bytes as f64);

    // The mirror goes away: pulls still work, straight from the upstream.
    proxy.stop().await;
    upstream.assert_gets(&format!("/blobs/{}", second.layers[0].digest), 0);
    let out = containerd.pull(&certs, &format!("{registry}/team/app:v2"));
    assert!(
        out.status.success(),
        "fallback pull failed: {}\n{}",
        text(&out),
        containerd.log()
    );
    let images = text(&containerd.ctr(&["images", "ls"]));
    assert!(images.contains(&second.manifest.digest), "{images}");
    upstream.assert_gets(&format!("/blobs/{}", second.layers[0].digest), 1);

    // Removing the mirror removes the file the agent owns.
    let out = agent(&[
        "--standalone",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--containerd-config",
        "/nonexistent",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!certs.join(&registry).join("hosts.toml").exists());
}

/// A mirror that does not answer from the node is left out of its files (`--probe-mirrors`):
/// stopped, answering 503, or sending headers and then nothing; one that answers stays.
/// containerd then pulls the left-out registry straight from its upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_that_do_not_answer_are_left_out_of_the_node_s_files() {
    let upstream = Registry::start().await;
    let image = Image::generate_tar(43, &[100_000], "amd64");
    let second = Image::generate_tar(45, &[90_000], "amd64");
    push_image(&upstream.url, "team/app", "v1", &image).await;
    push_image(&upstream.url, "team/app", "v2", &second).await;
    let live = Proxy::start(&[(upstream.host().as_str(), upstream.url.as_str())]).await;
    let stopped = format!("127.0.0.1:{}", free_port());
    let (unavailable, _a) = serve_http1(|_, _| async {
        hyper::Response::builder()
            .status(503)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    })
    .await;
    // Headers, then a body that never comes (until the test ends).
    let (hung, _b) = serve_http1(|_, _| async {
        let never =
            futures::stream::pending::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>();
        hyper::Response::builder()
            .header("content-length", "100")
            .body(http_body_util::StreamBody::new(never))
            .unwrap()
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs.d");
    let registry = upstream.host();
    let mirrors = [
        (registry.clone(), live.url.clone()),
        ("stopped.test".to_string(), format!("http://{stopped}")),
        (
            "unavailable.test".to_string(),
            format!("http://{unavailable}"),
        ),
        ("hung.test".to_string(), format!("http://{hung}")),
    ];
    let mut args = vec![
        "--standalone".to_string(),
        "--probe-mirrors".into(),
        "--certs-dir".into(),
        certs.display().to_string(),
        "--containerd-config".into(),
        "/nonexistent".into(),
        "--server".into(),
        format!("{registry}={}", upstream.url),
    ];
    for (r, m) in &mirrors {
        args.extend(["--mirror".to_string(), format!("{r}={m}")]);
    }
    let out = agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(certs.join(&registry).join("hosts.toml").exists(), "{t}");
    for (r, m) in &mirrors[1..] {
        assert!(!certs.join(r).exists(), "{r} was written: {t}");
        assert!(
            t.contains(&format!("mirror={m}")) && t.contains("does not answer"),
            "{t}"
        );
    }
    assert!(t.contains("503"), "{t}");

    // The live mirror's registry still pulls through it; stopped, its file stays until the
    // agent runs again, which then leaves it out, and containerd pulls from the upstream.
    let containerd = Containerd::start(
        work.path(),
        &format!("config_path = \"{}\"", certs.display()),
    );
    let reference = format!("{registry}/team/app:v1");
    let out = containerd.pull(&certs, &reference);
    assert!(out.status.success(), "{}\n{}", text(&out), containerd.log());
    upstream.assert_gets(&format!("/blobs/{}", image.layers[0].digest), 1);
    live.stop().await;
    let out = agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !certs.join(&registry).join("hosts.toml").exists(),
        "{}",
        text(&out)
    );
    // Another image (new layers: nothing of it is on the node yet), from the upstream.
    let out = containerd.pull(&certs, &format!("{registry}/team/app:v2"));
    assert!(out.status.success(), "{}\n{}", text(&out), containerd.log());
    for b in second.blobs() {
        upstream.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    let from_containerd = upstream
        .access_log()
        .lines()
        .filter(|l| l.contains(&second.layers[0].digest) && l.contains("containerd/"))
        .count();
    assert_eq!(
        from_containerd, 1,
        "containerd itself fetched the new layer"
    );
}

/// The node-local entry point: with no configuration for it at all (an empty hosts
/// directory), containerd pulls `127.0.0.1:<port>/<registry>/<repo>` from the relay over
/// plain HTTP, the relay hands it to the mirror, and the mirror reads the registry from
/// the path. A second image of the same layers is served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_a_loopback_relay_with_no_configuration() {
    let upstream = Registry::start().await;
    let image = Image::generate_tar(44, &[200_000, 30_000], "amd64");
    push_image(&upstream.url, "team/app", "v1", &image).await;
    push_image(&upstream.url, "team/app", "v2", &image).await;
    let registry = upstream.host();
    let proxy = Proxy::start(&[(registry.as_str(), upstream.url.as_str())]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relaying = tokio::spawn(pullthrough::relay::serve(
        listener,
        proxy.url.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("certs.d");
    std::fs::create_dir_all(&empty).unwrap();
    let containerd = Containerd::start(
        work.path(),
        &format!("config_path = \"{}\"", empty.display()),
    );
    // The registry's port as image references allow it in a path.
    let path = registry.replace(':', "_");
    for tag in ["v1", "v2"] {
        let out = containerd.pull(&empty, &format!("{relay}/{path}/team/app:{tag}"));
        assert!(out.status.success(), "{}\n{}", text(&out), containerd.log());
    }
    let images = text(&containerd.ctr(&["images", "ls"]));
    assert!(images.contains(&image.manifest.digest), "{images}");
    for b in image.blobs() {
        upstream.assert_gets(&format!("/v2/team/app/blobs/{}", b.digest), 1);
    }
    let m = proxy.metrics().await;
    let miss = [
        ("upstream", registry.as_str()),
        ("kind", "manifest"),
        ("result", "miss"),
    ];
    assert_eq!(
        metric_value(&m, "pullthrough_requests_total", &miss),
        2.0,
        "a manifest per tag"
    );

    // The mirror gone: the relay says so, as an OCI error.
    proxy.stop().await;
    let r = get(&format!("http://{relay}/v2/{path}/team/app/manifests/v1")).await;
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_string()));
    // What a pull does not send is not relayed.
    let r = http()
        .delete(format!("http://{relay}/v2/{path}/team/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (405, "UNSUPPORTED".to_string()));
    let _ = stop.send(());
    relaying.await.unwrap();
}

#[test]
fn the_agent_says_clearly_when_containerd_ignores_hosts_toml() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.9\"\n",
    )
    .unwrap();
    let out = agent(&[
        "--standalone",
        "--certs-dir",
        dir.path().join("certs.d").to_str().unwrap(),
        "--containerd-config",
        config.to_str().unwrap(),
        "--mirror",
        "docker.io=http://127.0.0.1:5000",
    ]);
    assert!(out.status.success());
    let t = text(&out);
    assert!(
        t.contains("config_path is not set, so containerd ignores hosts.toml"),
        "{t}"
    );
    // The agent never edits containerd's config.
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("sandbox_image")
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap().lines().count(), 3);
    // Bad flags are explained.
    let out = agent(&["--standalone", "--mirror", "docker.io"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("expected REGISTRY=URL"),
        "{}",
        text(&out)
    );
}

/// Lines of the upstream's access log for `path` that containerd sent itself (not the
/// proxy: its user agent is pullthrough's) and that were refused.
fn refused_from_containerd(upstream: &Registry, path: &str) -> usize {
    upstream
        .access_log()
        .lines()
        .filter(|l| l.contains(path) && l.contains("\" 401 ") && l.contains("containerd/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_a_private_image_through_the_mirror_only_with_good_credentials() {
    use crate::common::{ALICE, BOB, CACHE};
    let private = Registry::start_private(&format!("{CACHE}{ALICE}{BOB}")).await;
    let public = Registry::start().await;
    let secret = Image::generate_tar(61, &[200_000, 30_000], "amd64");
    let open = Image::generate_tar(62, &[100_000], "amd64");
    push_image(
        &crate::common::as_alice(&private),
        "team/app",
        "v1",
        &secret,
    )
    .await;
    push_image(&public.url, "lib/open", "v1", &open).await;
    let (p, o) = (private.host(), public.host());
    let mut config = config_for(&[(&p, &private.url), (&o, &public.url)]);
    config.upstreams[0].credentials = Some(crate::common::cache_credentials());
    config.upstreams[1].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::UpstreamAuth,
    });
    config.access.plain_http = true;
    let proxy = Proxy::start_config(config).await;

    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs.d");
    let out = agent(&[
        "--standalone",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--containerd-config",
        "/nonexistent",
        "--mirror",
        &format!("{p}={}", proxy.url),
        "--server",
        &format!("{p}={}", private.url),
        "--mirror",
        &format!("{o}={}", proxy.url),
        "--server",
        &format!("{o}={}", public.url),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let line = format!("config_path = \"{}\"", certs.display());
    let first = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(first.path(), &line);
    let reference = format!("{p}/team/app:v1");
    let manifest_path = "/v2/team/app/manifests/v1";

    // No credentials, then wrong ones: the mirror refuses, containerd falls back to the
    // upstream, which refuses too.
    for (user, why) in [(None, "anonymous"), (Some("alice:wrong"), "wrong password")] {
        let before = refused_from_containerd(&private, manifest_path);
        let out = containerd.pull_as(&certs, &reference, user);
        assert!(!out.status.success(), "{why}: the pull worked");
        assert!(
            refused_from_containerd(&private, manifest_path) > before,
            "{why}: containerd did not fall back to the upstream"
        );
    }
    let m = proxy.metrics().await;
    let served =
        |m: &str, up: &str| metric_value(m, "pullthrough_requests_total", &[("upstream", up)]);
    assert_eq!(served(&m, &p), 0.0, "the mirror served a refused client");
    assert!(
        metric_value(
            &m,
            "pullthrough_access_challenges_total",
            &[("upstream", &p)]
        ) >= 2.0
    );

    // The right credentials: pulled through the mirror.
    let out = containerd.pull_as(&certs, &reference, Some("alice:wonder"));
    assert!(
        out.status.success(),
        "ctr pull failed: {}\n{}",
        text(&out),
        containerd.log()
    );
    let content = text(&containerd.ctr(&["content", "ls"]));
    for b in secret.blobs() {
        assert!(content.contains(&b.digest), "containerd lacks {}", b.digest);
        private.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    // Another node, another client the upstream accepts: from the cache.
    let second = tempfile::tempdir().unwrap();
    let other = Containerd::start(second.path(), &line);
    let out = other.pull_as(&certs, &reference, Some("bob:builder"));
    assert!(
        out.status.success(),
        "second pull failed: {}\n{}",
        text(&out),
        other.log()
    );
    for b in secret.blobs() {
        private.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    let m = proxy.metrics().await;
    let hits = metric_value(
        &m,
        "pullthrough_requests_total",
        &[("upstream", &p), ("kind", "blob"), ("result", "hit")],
    );
    assert_eq!(hits, secret.blobs().count() as f64, "blobs from the cache");

    // A public image: no challenge at all.
    let out = other.pull(&certs, &format!("{o}/lib/open:v1"));
    assert!(
        out.status.success(),
        "public pull failed: {}\n{}",
        text(&out),
        other.log()
    );
    let m = proxy.metrics().await;
    assert!(
        served(&m, &o) >= 2.0,
        "the public pull did not use the mirror"
    );
    assert_eq!(
        metric_value(
            &m,
            "pullthrough_access_challenges_total",
            &[("upstream", &o)]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_verifies_a_tls_mirror_with_the_ca_the_agent_writes() {
    use crate::common::{ALICE, CACHE};
    let private = Registry::start_private(&format!("{CACHE}{ALICE}")).await;
    let image = Image::generate_tar(63, &[150_000], "amd64");
    push_image(&crate::common::as_alice(&private), "team/app", "v1", &image).await;
    let certs = tempfile::tempdir().unwrap();
    test_certificate(certs.path());
    let p = private.host();
    let mut config = config_for(&[(&p, &private.url)]);
    config.upstreams[0].credentials = Some(crate::common::cache_credentials());
    config.tls = Some(pullthrough::api::TlsConfig {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
    });
    let proxy = Proxy::start_config(config).await;

    let work = tempfile::tempdir().unwrap();
    let hosts = work.path().join("certs.d");
    let ca = certs.path().join("ca.crt");
    let out = agent(&[
        "--standalone",
        "--certs-dir",
        hosts.to_str().unwrap(),
        "--containerd-config",
        "/nonexistent",
        "--mirror",
        &format!("{p}={}", proxy.url),
        "--server",
        &format!("{p}={}", private.url),
        "--ca",
        &format!("{p}={}", ca.display()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(hosts.join(&p).join("hosts.toml")).unwrap();
    assert!(file.contains("ca = "), "{file}");
    let containerd = Containerd::start(
        work.path(),
        &format!("config_path = \"{}\"", hosts.display()),
    );
    let out = containerd.pull_as(&hosts, &format!("{p}/team/app:v1"), Some("alice:wonder"));
    assert!(
        out.status.success(),
        "ctr pull failed: {}\n{}",
        text(&out),
        containerd.log()
    );
    let m = proxy.metrics().await;
    let missed = metric_value(
        &m,
        "pullthrough_requests_total",
        &[("upstream", &p), ("kind", "blob"), ("result", "miss")],
    );
    assert_eq!(
        missed,
        image.blobs().count() as f64,
        "blobs through the mirror"
    );
}

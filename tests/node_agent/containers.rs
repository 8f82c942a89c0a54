//! The node agent for CRI-O nodes, with the real clients that read the same files
//! (containers/image): the agent writes its containers-registries.conf(5) drop-in; podman
//! and skopeo, each with a private store and nothing but that drop-in for configuration,
//! pull through the mirror it names (by path: the proxy reads the registry from it), and
//! straight from the upstream when the mirror is down, or without trying it once the agent
//! found it dead (`--probe-mirrors`). Plain HTTP and TLS mirrors.

use super::{agent, text};
use crate::common::*;
use std::path::Path;

/// The agent standalone, its drop-in where `podman(dir, ...)` reads a user's: mirror
/// `endpoint` for the registry `upstream` (its fallback the upstream's own URL), and
/// `extra` arguments.
fn write_drop_in(dir: &Path, upstream: &Registry, endpoint: &str, extra: &[&str]) -> String {
    let containers = dir.join("home/.config/containers");
    let host = upstream.host();
    let mut args = vec![
        "--standalone".to_string(),
        "--certs-dir".into(),
        dir.join("containerd-certs.d").display().to_string(),
        "--containerd-config".into(),
        "/nonexistent".into(),
        "--containers".into(),
        "always".into(),
        "--containers-dir".into(),
        containers.display().to_string(),
        "--mirror".into(),
        format!("{host}={endpoint}"),
        "--server".into(),
        format!("{host}={}", upstream.url),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read_to_string(containers.join("registries.conf.d/50-pullthrough.conf")).unwrap()
}

/// Each blob of `image` asked of `upstream` `n` times so far.
fn assert_upstream_gets(upstream: &Registry, image: &Image, n: usize) {
    for b in image.blobs() {
        upstream.assert_gets(&format!("/v2/team/app/blobs/{}", b.digest), n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_and_skopeo_pull_through_the_drop_in_and_fall_back_without_the_mirror() {
    let upstream = Registry::start().await;
    let image = Image::generate_tar(81, &[250_000, 30_000], "amd64");
    push_image(&upstream.url, "team/app", "1", &image).await;
    let host = upstream.host();
    let proxy = Proxy::start(&[(host.as_str(), upstream.url.as_str())]).await;

    let first = tempfile::tempdir().unwrap();
    let drop_in = write_drop_in(first.path(), &upstream, &proxy.url, &[]);
    assert!(
        drop_in.contains(&format!(
            "location = \"{}/{}\"",
            proxy.host,
            host.replace(':', "_")
        )),
        "{drop_in}"
    );
    // The image by its own name: the drop-in alone sends it to the mirror (plain HTTP
    // there, and at the upstream here, both marked insecure by the agent).
    let reference = format!("{host}/team/app:1");
    podman(first.path(), &["pull", &reference]).unwrap();
    let digest = podman(
        first.path(),
        &["image", "inspect", "--format", "{{.Digest}}", &reference],
    )
    .unwrap();
    assert_eq!(digest.trim(), image.manifest.digest);
    let blob = |result: &'static str| {
        let proxy = &proxy;
        let host = host.clone();
        async move {
            proxy
                .metric(
                    "pullthrough_requests_total",
                    &[("upstream", &host), ("kind", "blob"), ("result", result)],
                )
                .await
        }
    };
    assert_eq!(blob("miss").await, image.blobs().count() as f64);
    assert_upstream_gets(&upstream, &image, 1);

    // skopeo reads the same drop-in: a second pull, from the cache.
    proxy.settled().await;
    let out = tempfile::tempdir().unwrap();
    let home = first.path().join("home");
    let copied = std::process::Command::new("skopeo")
        .env("HOME", &home)
        .args([
            "--registries-conf",
            &first.path().join("registries.conf").display().to_string(),
        ])
        .args([
            "copy",
            &format!("docker://{reference}"),
            &format!("dir:{}", out.path().display()),
        ])
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", text(&copied));
    assert!(dir_blobs(out.path()).contains(&image.layers[0].digest));
    assert_eq!(blob("hit").await, image.blobs().count() as f64);
    assert_upstream_gets(&upstream, &image, 1);

    // The mirror down (nothing listens on its port): podman pulls from the upstream.
    let port = proxy.host.clone();
    proxy.stop().await;
    let fallback = tempfile::tempdir().unwrap();
    let drop_in_again = write_drop_in(fallback.path(), &upstream, &format!("http://{port}"), &[]);
    assert_eq!(drop_in_again, drop_in);
    podman(fallback.path(), &["pull", &reference]).unwrap();
    assert_upstream_gets(&upstream, &image, 2);

    // Asked first (--probe-mirrors), the agent leaves the dead mirror out: its drop-in
    // goes, the node's own word on the registry (plain HTTP here) stands, and podman pulls
    // from the upstream without trying the mirror.
    let asked = tempfile::tempdir().unwrap();
    let own = asked
        .path()
        .join("home/.config/containers/registries.conf.d");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(
        own.join("10-registry.conf"),
        format!("[[registry]]\nprefix = \"{host}\"\nlocation = \"{host}\"\ninsecure = true\n"),
    )
    .unwrap();
    let out = agent(&[
        "--standalone",
        "--probe-mirrors",
        "--certs-dir",
        asked.path().join("containerd-certs.d").to_str().unwrap(),
        "--containerd-config",
        "/nonexistent",
        "--containers",
        "always",
        "--containers-dir",
        asked
            .path()
            .join("home/.config/containers")
            .to_str()
            .unwrap(),
        "--mirror",
        &format!("{host}=http://{port}"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("does not answer"), "{}", text(&out));
    assert!(!own.join("50-pullthrough.conf").exists());
    podman(asked.path(), &["pull", &reference]).unwrap();
    assert_upstream_gets(&upstream, &image, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_checks_a_tls_mirror_with_the_ca_the_agent_writes() {
    let upstream = Registry::start().await;
    let image = Image::generate_tar(82, &[120_000], "amd64");
    push_image(&upstream.url, "team/app", "1", &image).await;
    let host = upstream.host();
    let certs = tempfile::tempdir().unwrap();
    test_certificate(certs.path());
    let mut config = config_for(&[(host.as_str(), upstream.url.as_str())]);
    config.tls = Some(pullthrough::api::TlsConfig {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
    });
    let proxy = Proxy::start_config(config).await;

    let dir = tempfile::tempdir().unwrap();
    let ca = certs.path().join("ca.crt");
    let drop_in = write_drop_in(
        dir.path(),
        &upstream,
        &proxy.url,
        &["--ca", &format!("{host}={}", ca.display())],
    );
    // The mirror is checked (no insecure under it), with the CA where containers/image
    // looks for the mirror's host.
    let mirror = drop_in.split("[[registry.mirror]]").nth(1).unwrap();
    assert!(!mirror.contains("insecure"), "{drop_in}");
    let written = dir
        .path()
        .join("home/.config/containers/certs.d")
        .join(&proxy.host)
        .join("pullthrough-ca.crt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        std::fs::read_to_string(&ca).unwrap()
    );
    podman(
        dir.path(),
        &[
            "pull",
            "--cert-dir",
            written.parent().unwrap().to_str().unwrap(),
            &format!("{host}/team/app:1"),
        ],
    )
    .unwrap();
    let m = proxy.metrics().await;
    let missed = metric_value(
        &m,
        "pullthrough_requests_total",
        &[("upstream", &host), ("kind", "blob"), ("result", "miss")],
    );
    assert_eq!(missed, image.blobs().count() as f64, "through the mirror");
    proxy.stop().await;
}

//! Upstreams chosen by path (docs/proxy.md, "Which upstream a request is for"): clients
//! that cannot send containerd's `?ns=` (skopeo, podman, docker, crane) name the
//! registry as the path's first component, `mirror:5000/ghcr.io/org/app:1.0`, in front
//! of real Distribution upstreams.

use crate::common::fault::FaultUpstream;
use crate::common::*;

const OTHER: &str = "other.test";
const PORTED: &str = "ported.test:5000";

/// Docker Hub (the default) on `hub`, `other.test` and `ported.test:5000` both on `other`.
fn config(hub: &Registry, other: &Registry) -> pullthrough::api::ProxyConfig {
    config_for(&[
        ("docker.io", &hub.url),
        (OTHER, &other.url),
        (PORTED, &other.url),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_in_the_path_chooses_the_upstream() {
    let (hub, other) = (Registry::start().await, Registry::start().await);
    let app = Image::generate(41, &[300_000, 20_000], "amd64");
    let tool = Image::generate(42, &[50_000], "amd64");
    let named_like = Image::generate(43, &[10_000], "amd64");
    push_image(&other.url, "team/app", "v1", &app).await;
    push_image(&other.url, "team/app", "v2", &app).await;
    push_image(&hub.url, "library/tool", "1.0", &tool).await;
    // On the default upstream, a repository whose first component looks like a registry
    // that no upstream serves.
    push_image(&hub.url, "quay.test/x/y", "1", &named_like).await;
    let proxy = Proxy::start_config(config(&hub, &other)).await;

    // skopeo names the registry in the path: the other upstream serves it, once.
    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/{OTHER}/team/app:v1", proxy.host),
        &format!("dir:{}", out.path().display()),
    ]);
    let copied = dir_blobs(out.path());
    for b in app.blobs() {
        assert!(copied.contains(&b.digest), "skopeo is missing {}", b.digest);
        other.assert_gets(&format!("/v2/team/app/blobs/{}", b.digest), 1);
    }
    assert!(
        proxy
            .metric(
                "pullthrough_requests_total",
                &[("upstream", OTHER), ("kind", "blob")]
            )
            .await
            >= 2.0
    );
    // The same repository through `?ns=` is the same cached repository.
    proxy.settled().await;
    let before = proxy.upstream_requests().await;
    let by_ns = pull(&proxy.url, "team/app", "v1", Some(OTHER))
        .await
        .unwrap();
    assert_eq!(by_ns.top, app.manifest.digest);
    let by_path = pull(&proxy.url, &format!("{OTHER}/team/app"), "v1", None)
        .await
        .unwrap();
    assert_eq!(by_path.digests, by_ns.digests);
    assert_eq!(
        proxy.upstream_requests().await,
        before,
        "served from the cache"
    );

    // A registry with a port, and Docker Hub by any of its names with its library/ rule
    // after the prefix is taken off.
    let ported = pull(&proxy.url, &format!("{PORTED}/team/app"), "v1", None)
        .await
        .unwrap();
    assert_eq!(ported.top, app.manifest.digest);
    // The port written as image references allow it (podman and skopeo refuse a `:`).
    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/ported.test_5000/team/app:v1", proxy.host),
        &format!("dir:{}", out.path().display()),
    ]);
    assert!(dir_blobs(out.path()).contains(&app.layers[0].digest));
    for name in ["docker.io/tool", "index.docker.io/library/tool", "tool"] {
        let pulled = pull(&proxy.url, name, "1.0", None).await.unwrap();
        assert_eq!(pulled.top, tool.manifest.digest, "{name}");
    }
    for b in tool.blobs() {
        hub.assert_gets(&format!("/v2/library/tool/blobs/{}", b.digest), 1);
    }

    // A first component that names no upstream is the default's repository, as before;
    // without a prefix or `ns` the other upstream's repository is not found.
    let pulled = pull(&proxy.url, "quay.test/x/y", "1", None).await.unwrap();
    assert_eq!(pulled.top, named_like.manifest.digest);
    let missing = get(&format!("{}/v2/team/app/manifests/v1", proxy.url)).await;
    assert_eq!(missing.status(), 404);
    hub.assert_gets("/v2/team/app/manifests/v1", 1);

    // Errors name the repository as the upstream knows it.
    let unknown = get(&format!("{}/v2/{OTHER}/team/none/manifests/v1", proxy.url)).await;
    assert_eq!(
        error_code(unknown).await,
        (404, "MANIFEST_UNKNOWN".to_string())
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_pages_stay_on_the_path_s_upstream() {
    let (hub, paged) = (FaultUpstream::start().await, FaultUpstream::start().await);
    let image = Image::generate(46, &[100], "amd64");
    for tag in ["a", "b", "c"] {
        paged.add_manifest("team/app", tag, &image.manifest);
    }
    let proxy = Proxy::start(&[("docker.io", &hub.url), (OTHER, &paged.url)]).await;
    let first = format!("/v2/{OTHER}/team/app/tags/list?n=2");
    let (tags, links) = tags_pages(&proxy.url, &first, 4).await;
    assert_eq!(tags, ["a", "b", "c"]);
    assert_eq!(
        links,
        [format!("/v2/{OTHER}/team/app/tags/list?n=2&last=b")]
    );
    assert_eq!(hub.total(), 0, "nothing went to the default upstream");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn podman_pulls_through_a_path_prefix() {
    let (hub, other) = (Registry::start().await, Registry::start().await);
    let app = Image::generate_tar(44, &[200_000, 30_000], "amd64");
    push_image(&other.url, "team/app", "v1", &app).await;
    let proxy = Proxy::start_config(config(&hub, &other)).await;

    let dir = tempfile::tempdir().unwrap();
    let image = format!("{}/{OTHER}/team/app:v1", proxy.host);
    podman(dir.path(), &["pull", "--tls-verify=false", &image]).unwrap();
    let id = podman(
        dir.path(),
        &["image", "inspect", "--format", "{{.Digest}}", &image],
    )
    .unwrap();
    assert_eq!(id.trim(), app.manifest.digest);
    for b in app.blobs() {
        other.assert_gets(&format!("/v2/team/app/blobs/{}", b.digest), 1);
    }
    // A second podman store pulls it from the cache.
    proxy.settled().await;
    let before = proxy.upstream_requests().await;
    let again = tempfile::tempdir().unwrap();
    podman(again.path(), &["pull", "--tls-verify=false", &image]).unwrap();
    assert_eq!(proxy.upstream_requests().await, before);
    proxy.stop().await;
}

/// What a client sees of one request: its status, the headers the spec names, and the
/// body's digest.
async fn seen(r: reqwest::Response) -> (u16, Option<String>, Option<String>, String) {
    let status = r.status().as_u16();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (digest, range) = (header("docker-content-digest"), header("content-range"));
    let body = r.bytes().await.unwrap();
    (status, digest, range, sha256(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_oci_pull_checks_pass_through_a_prefix_as_without_one() {
    // One upstream registry under two names: the default (no prefix) and another.
    let upstream = Registry::start().await;
    let image = Image::generate(45, &[100_000, 7_000], "amd64");
    push_image(&upstream.url, "conformance/pull", "tagged", &image).await;
    let proxy = Proxy::start(&[("default.test", &upstream.url), (OTHER, &upstream.url)]).await;
    let c = http();
    let (manifest, layer) = (&image.manifest.digest, &image.layers[0].digest);
    let missing = format!("sha256:{}", "0".repeat(64));
    // The pull workflow of the OCI distribution-spec conformance suite (01_pull_test.go):
    // each request, and the status it must get.
    let checks = |name: String| {
        let base = format!("{}/v2/{name}", proxy.url);
        let c = c.clone();
        let (manifest, layer, missing) = (manifest.clone(), layer.clone(), missing.clone());
        async move {
            let accept = OCI_MANIFEST;
            let mut out = Vec::new();
            for (what, req, status) in [
                (
                    "HEAD manifest by tag",
                    c.head(format!("{base}/manifests/tagged")),
                    200,
                ),
                (
                    "GET manifest by tag",
                    c.get(format!("{base}/manifests/tagged")),
                    200,
                ),
                (
                    "HEAD manifest by digest",
                    c.head(format!("{base}/manifests/{manifest}")),
                    200,
                ),
                (
                    "GET manifest by digest",
                    c.get(format!("{base}/manifests/{manifest}")),
                    200,
                ),
                (
                    "GET missing manifest",
                    c.get(format!("{base}/manifests/{missing}")),
                    404,
                ),
                (
                    "GET missing tag",
                    c.get(format!("{base}/manifests/nonexistent")),
                    404,
                ),
                ("HEAD blob", c.head(format!("{base}/blobs/{layer}")), 200),
                ("GET blob", c.get(format!("{base}/blobs/{layer}")), 200),
                (
                    "GET blob range",
                    c.get(format!("{base}/blobs/{layer}"))
                        .header("range", "bytes=0-9"),
                    206,
                ),
                (
                    "GET missing blob",
                    c.get(format!("{base}/blobs/{missing}")),
                    404,
                ),
                ("GET tags", c.get(format!("{base}/tags/list")), 200),
                ("GET tags n=0", c.get(format!("{base}/tags/list?n=0")), 200),
            ] {
                let got = seen(req.header("accept", accept).send().await.unwrap()).await;
                assert_eq!(got.0, status, "{what} of {base}");
                out.push((what, got));
            }
            out
        }
    };
    let without = checks("conformance/pull".to_string()).await;
    let through = checks(format!("{OTHER}/conformance/pull")).await;
    assert_eq!(through, without);
    proxy.stop().await;
}

//! Proven disconnected (issue #39), on the kit's node: a mirror seeded from a bundle, its
//! upstream a server that never answers, serves a workload's image to the real kubelet in
//! `offline` mode and fails a pull of anything else at once; a change of mode reaches the
//! running replica without a restart, and a drop asked with the annotation is made on it.

use super::kubelet_pull::{entry_point, kubelet_event, pulled_in};
use super::rewrite::pod_api;
use crate::common::cluster::*;
use crate::common::{Image, Registry, config_for, metric_value, pull, push_image, scrape};
use http_body_util::Full;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use pullthrough::api::UpstreamMode;
use pullthrough::api::image_ref::registry_in_path;
use pullthrough::api::mirror::{DROP_ANNOTATION, METRICS_PORT, PROXY_PORT};
use std::time::{Duration, Instant};

/// The kubelet's `Failed` Event on `pod`: its note, and how long after `since` it was seen.
async fn failed_pull(events: &Api<Event>, pod: &str, since: Instant) -> (String, Duration) {
    let note = kubelet_event(events, pod, "Failed").await;
    (note, since.elapsed())
}

/// A pod of `image` on the host's network that pulls it and never runs.
fn pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "hostNetwork": true,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": image, "command": ["/not-there"]}]
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_a_node_a_mirror_seeded_from_a_bundle_serves_the_kubelet_offline() {
    let env = Env::new("offline").await;
    let Some(node) = env.node_for_pods().await else {
        return;
    };
    give_node_an_address(&env.client, &node).await;
    let a = env.registry("a");

    // The bundle, made where the upstream was reachable: an image pulled through a cache
    // on the host, exported.
    let up = Registry::start().await;
    let app = Image::generate_tar(331, &[200_000, 50_000], "amd64");
    push_image(&up.url, "team/app", "1", &app).await;
    let dir = tempfile::tempdir().unwrap();
    let mut fill = config_for(&[(a.as_str(), up.url.as_str())]);
    fill.cache_dir = dir.path().join("fill");
    let filler = crate::common::Proxy::start_config(fill.clone()).await;
    pull(&filler.url, "team/app", "1", None).await.unwrap();
    filler.settled().await;
    filler.stop().await;
    drop(up);
    let tar = dir.path().join("bundle.tar");
    let cache_dir = fill.cache_dir.to_str().unwrap();
    crate::proxy::bundles::bundle(&["export", "--cache-dir", cache_dir, tar.to_str().unwrap()])
        .unwrap();
    let bundle = bytes::Bytes::from(std::fs::read(&tar).unwrap());
    let (files, _serving) = crate::common::serve_http1(move |_, _| {
        let bundle = bundle.clone();
        async move { hyper::Response::new(Full::new(bundle)) }
    })
    .await;

    // The upstream is now a server that accepts and never answers: a proxy that asked it
    // would wait its upstreamTimeout (60 s) for each pull.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let (_, _host) = env
        .create_on_host(
        "air",
        &format!(
            "  upstreams: [{{registry: {a}, url: '{silent_url}'}}]\n  cache: {{mode: offline, seed: 'http://{files}/bundle.tar'}}"
        ),
        )
        .await;
    env.status_where("air", 60, "the replica's modes", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.modes.len() == 1 && s.modes[0].mode == UpstreamMode::Offline)
    })
    .await;

    // The kubelet pulls the workload's image through a node-local entry point.
    let (entry, stop, relay) = entry_point().await;
    let through = format!("127.0.0.1:{entry}/{}", registry_in_path(&a));
    let pods = pod_api(&env).await;
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    pods.create(
        &PostParams::default(),
        &pod("app", &format!("{through}/team/app:1")),
    )
    .await
    .unwrap();
    let secs = pulled_in(&events, "app").await;
    println!("the kubelet pulled the seeded image offline in {secs:.3} s");

    // Anything else fails at once, with the offline error, never waiting on the upstream.
    let asked = Instant::now();
    pods.create(
        &PostParams::default(),
        &pod("other", &format!("{through}/team/other:1")),
    )
    .await
    .unwrap();
    let (note, took) = failed_pull(&events, "other", asked).await;
    println!(
        "a pull of an image not in the bundle failed in {:.3} s: {note}",
        took.as_secs_f64()
    );
    assert!(note.contains("not found"), "{note}");
    assert!(took < Duration::from_secs(30), "the pull waited {took:?}");
    let metrics = scrape(&format!("http://127.0.0.1:{METRICS_PORT}")).await;
    let asked_upstream: f64 = metric_value(&metrics, "pullthrough_upstream_requests_total", &[]);
    assert_eq!(asked_upstream, 0.0, "the replica asked the upstream");

    // A drop asked with the annotation is made on the replica, and said in the status:
    // the image is then unknown there (offline: at once).
    let value = format!("image={a}/team/app:1");
    let annotate = serde_json::json!({"metadata": {"annotations": {DROP_ANNOTATION: value}}});
    env.mirrors
        .patch("air", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    let m = env
        .status_where("air", 60, "the drop done", |m| {
            m.status
                .as_ref()
                .and_then(|s| s.drop.as_ref())
                .is_some_and(|d| d.request == value && d.done_at.is_some())
        })
        .await;
    let done = m.status.unwrap().drop.unwrap();
    assert_eq!(
        (done.replicas, done.manifests, done.tags),
        (1, 1, 1),
        "{done:?}"
    );
    assert!(done.blobs >= 3, "{done:?}");
    event_on(
        &env,
        "air",
        &format!("Dropped {value} from 1 replica(s)"),
        60,
    )
    .await;
    let manifest = format!(
        "http://127.0.0.1:{PROXY_PORT}/v2/{}/team/app/manifests/1",
        registry_in_path(&a)
    );
    let r = reqwest::get(&manifest).await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("offline mode"));

    // A change of mode reaches the running replica: no new pod.
    let proxies: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let selector = "app.kubernetes.io/instance=air";
    let replica_uids = || async {
        let list = proxies
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        // The running one (a pod of the ReplicaSet before the host-network patch may
        // still be going).
        list.items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| p.uid())
            .collect::<Vec<_>>()
    };
    let before = replica_uids().await;
    assert_eq!(before.len(), 1);
    let patch = serde_json::json!({"spec": {"cache": {"mode": "localFirst"}}});
    env.mirrors
        .patch("air", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    env.status_where("air", 60, "the replica in localFirst", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.modes.len() == 1 && s.modes[0].mode == UpstreamMode::LocalFirst)
    })
    .await;
    assert_eq!(replica_uids().await, before, "the replica was replaced");
    let _ = stop.send(());
    relay.await.unwrap();
}

//! The image-rewriting webhook on a real cluster (docs/rewrite.md): the API server calls
//! the controller's webhook over loopback (a `url` clientConfig, its caBundle set by the
//! controller), and the real kubelet pulls the rewritten image through a node-local
//! entry point to the mirror's replica.
//!
//! The kit has no kube-proxy, so the entry point DaemonSet's relay, which hands pulls to
//! the Service's cluster IP, runs and is counted but cannot reach the replica. For the
//! pulls the mirror is switched to `rewrite.address: 127.0.0.1:<port>`, which removes the
//! DaemonSet, and the test runs the same relay (`pullthrough::relay`) on that port,
//! handing pulls to the replica on the host's network.

use crate::common::cluster::*;
use crate::common::{Image, Registry, metric_value, pull, push_image, scrape};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use pullthrough::api::image_ref::registry_in_path;
use pullthrough::api::mirror::rewrite::{NOT_REWRITTEN, ORIGINAL_IMAGES, REWRITTEN_LABEL};
use pullthrough::api::mirror::{METRICS_PORT, PROXY_PORT, RegistryMirror};

/// The MutatingWebhookConfiguration of the test: every pod created in its namespace
/// (and ephemeral containers added) sent to the controller's webhook on `port`.
fn configuration(ns: &str, port: u16) -> MutatingWebhookConfiguration {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": webhook_configuration(ns)},
        "webhooks": [{
            "name": "rewrite.pullthrough.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "Never",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate")},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "objectSelector": {"matchExpressions": [
                {"key": "app.kubernetes.io/name", "operator": "NotIn", "values": ["pullthrough"]}
            ]},
            "rules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"},
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"}
            ]
        }]
    }))
    .unwrap()
}

/// Creates the test's MutatingWebhookConfiguration (see [`configuration`]).
async fn install(configurations: &Api<MutatingWebhookConfiguration>, ns: &str, port: u16) {
    configurations
        .create(&PostParams::default(), &configuration(ns, port))
        .await
        .unwrap();
}

/// A pod of the test image, on the host's network (the kit has no pod network: the
/// kubelet makes a pod's sandbox before it pulls). Its command does not exist: the pull
/// is what is looked at.
fn pod_spec(image: &str) -> serde_json::Value {
    serde_json::json!({
        "hostNetwork": true,
        "automountServiceAccountToken": false,
        "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always", "command": ["/not-there"]}]
    })
}

fn bare_pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": pod_spec(image)
    }))
    .unwrap()
}

/// The pods of the test's namespace, once pods can be created there (the API server
/// refuses them until the namespace's default ServiceAccount exists).
pub(super) async fn pod_api(env: &Env) -> Api<Pod> {
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(60, "the namespace's default ServiceAccount", || async {
        accounts.get_opt("default").await.ok()?
    })
    .await;
    Api::namespaced(env.client.clone(), &env.ns)
}

/// Whether the mirror's status says it rewrites now.
fn active(m: &RegistryMirror) -> bool {
    m.status
        .as_ref()
        .and_then(|s| s.rewrite.as_ref())
        .is_some_and(|r| r.active)
}

fn image_of(p: &Pod) -> String {
    p.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_a_node_pods_are_rewritten_pulled_through_the_entry_point_and_missed_ones_counted() {
    let env = Env::with_webhook("rewrite").await;
    let Some(node) = env.node_for_pods().await else {
        return;
    };
    give_node_an_address(&env.client, &node).await;
    let webhook_port = env.webhook_port.unwrap();
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    install(&configurations, &env.ns, webhook_port).await;
    // The upstream: a real Distribution on the host.
    let up = Registry::start().await;
    // An image of this run's own: the node's containerd keeps what earlier runs pulled.
    let image = Image::generate_tar(u64::from(std::process::id()), &[30_000, 12_000], "amd64");
    push_image(&up.url, "team/app", "1", &image).await;
    let a = env.registry("a");
    let original = format!("{a}/team/app:1");
    let entry = crate::common::free_port();
    let rewritten = format!("127.0.0.1:{entry}/{}/team/app:1", registry_in_path(&a));

    // A rewriting mirror with the node-local entry point: its DaemonSet runs on the
    // node, and once a replica and an entry point are ready it rewrites. The test's
    // pods are in the mirror's own namespace, which is left out unless asked for.
    env.create(
        "rw",
        &format!(
            "  upstreams: [{{registry: {a}, url: '{}'}}]\n  rewrite: {{entryPoint: {{port: {entry}}}, includeSystemNamespaces: true}}",
            up.url
        ),
    )
    .await;
    let _host = env.on_host_network("rw").await;
    let m = env
        .status_where("rw", 180, "rewriting through the entry point", |m| {
            active(m)
                && m.status
                    .as_ref()
                    .unwrap()
                    .rewrite
                    .as_ref()
                    .unwrap()
                    .entry_points_ready
                    == 1
        })
        .await;
    let rw = m.status.unwrap().rewrite.unwrap();
    assert_eq!(rw.address, format!("127.0.0.1:{entry}"));
    let daemon_sets: Api<DaemonSet> = Api::namespaced(env.client.clone(), &env.ns);
    let ds = daemon_sets.get("pullthrough-rw-entry").await.unwrap();
    let args = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&format!("127.0.0.1:{entry}")), "{args:?}");
    // The controller made the webhook's certificate and gave the API server its CA.
    eventually(60, "the caBundle set", || async {
        let config = configurations
            .get(&webhook_configuration(&env.ns))
            .await
            .ok()?;
        let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
        String::from_utf8_lossy(&bundle.0)
            .contains("BEGIN CERTIFICATE")
            .then_some(())
    })
    .await;

    // The nodes reach the mirror at an address of their own: no DaemonSet. The test's
    // relay stands in for the entry point, on its port once the DaemonSet's pod let go.
    let patch = serde_json::json!({"spec": {"rewrite": {"entryPoint": null, "address": format!("127.0.0.1:{entry}")}}});
    env.mirrors
        .patch("rw", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(120, "the entry point DaemonSet gone", || async {
        daemon_sets
            .get_opt("pullthrough-rw-entry")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let listener = eventually(120, "the entry point's port free", || async {
        std::net::TcpListener::bind(("127.0.0.1", entry)).ok()
    })
    .await;
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(pullthrough::relay::serve(
        listener,
        format!("http://127.0.0.1:{PROXY_PORT}"),
        async {
            let _ = relay_stopped.await;
        },
    ));
    env.status_where("rw", 60, "rewriting to the address", |m| {
        active(m)
            && m.status.as_ref().unwrap().rewrite.as_ref().unwrap().address
                == format!("127.0.0.1:{entry}")
    })
    .await;

    // The webhook's view of the mirror follows its status: asked with dry runs (which
    // the webhook answers, sideEffects None) until it rewrites.
    let pods = pod_api(&env).await;
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let probe = async |want: &str| {
        eventually(60, &format!("a dry-run pod's image {want}"), || async {
            let p = pods
                .create(&dry, &bare_pod("probe", &original))
                .await
                .ok()?;
            (image_of(&p) == want).then_some(p)
        })
        .await
    };
    probe(&rewritten).await;

    // A Deployment of two pods of the upstream's image: admitted rewritten, labelled,
    // the original kept; the real kubelet pulls it through the entry point.
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {"metadata": {"labels": {"app": "app"}}, "spec": pod_spec(&original)}
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let app_pods = eventually(120, "two pods of the Deployment", || async {
        let list = pods
            .list(&ListParams::default().labels("app=app"))
            .await
            .ok()?;
        (list.items.len() == 2).then_some(list.items)
    })
    .await;
    for p in &app_pods {
        assert_eq!(image_of(p), rewritten);
        assert_eq!(p.labels()[REWRITTEN_LABEL], "true");
        assert!(p.annotations()[ORIGINAL_IMAGES].contains(&original));
    }
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    for p in &app_pods {
        let name = p.name_any();
        eventually(
            180,
            &format!("the kubelet's Pulled Event on {name}"),
            || async {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .into_iter()
                    .find(|e| {
                        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                            && e.reason.as_deref() == Some("Pulled")
                    })
                    .map(|_| ())
            },
        )
        .await;
    }
    // One fetch of each blob for both pods (and every pull the kubelet retries).
    tokio::task::block_in_place(|| {
        for b in image.blobs() {
            up.assert_gets(&format!("/blobs/{}", b.digest), 1);
        }
    });
    // A pull through the entry point is served from the cache: its hits are counted.
    pull(
        &format!("http://127.0.0.1:{entry}"),
        &format!("{}/team/app", registry_in_path(&a)),
        "1",
        None,
    )
    .await
    .unwrap();
    let metrics = scrape(&format!("http://127.0.0.1:{METRICS_PORT}")).await;
    let hits = metric_value(
        &metrics,
        "pullthrough_requests_total",
        &[("kind", "blob"), ("result", "hit")],
    );
    assert!(hits >= 2.0, "blob hits: {hits}");
    tokio::task::block_in_place(|| {
        for b in image.blobs() {
            up.assert_gets(&format!("/blobs/{}", b.digest), 1);
        }
    });
    let controller = scrape(&env.metrics_url).await;
    assert!(
        metric_value(
            &controller,
            "pullthrough_rewrite_pods_total",
            &[("outcome", "rewritten")]
        ) >= 2.0
    );

    // The webhook out of reach (the API server's calls refused): a pod is let in with
    // its image as written, and the audit counts it, in the metric the alert watches,
    // the mirror's status and an Event on the pod.
    let closed = crate::common::free_port();
    let point_at = async |port: u16| {
        let mut c = configurations
            .get(&webhook_configuration(&env.ns))
            .await
            .unwrap();
        c.webhooks.as_mut().unwrap()[0].client_config.url =
            Some(format!("https://127.0.0.1:{port}/mutate"));
        configurations
            .replace(&webhook_configuration(&env.ns), &PostParams::default(), &c)
            .await
            .unwrap();
    };
    point_at(closed).await;
    let missed = eventually(60, "a pod admitted past the webhook", || async {
        let p = pods
            .create(&dry, &bare_pod("missed", &original))
            .await
            .ok()?;
        (image_of(&p) == original).then_some(())
    });
    missed.await;
    let p = pods
        .create(&PostParams::default(), &bare_pod("missed", &original))
        .await
        .unwrap();
    assert_eq!(image_of(&p), original);
    assert!(!p.labels().contains_key(REWRITTEN_LABEL));
    let missed_metric = async |want: f64| {
        eventually(
            60,
            &format!("{want} missed pod(s) in the metric"),
            || async {
                let m = scrape(&env.metrics_url).await;
                (metric_value(&m, "pullthrough_rewrite_missed_pods", &[]) == want).then_some(())
            },
        )
        .await
    };
    missed_metric(1.0).await;
    env.status_where("rw", 60, "one missed pod, Degraded", |m| {
        let st = m.status.as_ref().unwrap();
        st.rewrite.as_ref().is_some_and(|r| r.missed_pods == 1)
            && cond(m, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "PodsNotRewritten")
    })
    .await;
    eventually(60, "the NotRewritten Event on the pod", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("missed")
                    && e.reason.as_deref() == Some("NotRewritten")
            })
            .map(|_| ())
    })
    .await;
    // Gone, it is no longer counted.
    pods.delete("missed", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    missed_metric(0.0).await;
    point_at(webhook_port).await;
    probe(&rewritten).await;

    // The mirror not Ready (scaled to zero): no rewrite; the pod is marked as left
    // alone on purpose, and not counted as missed.
    let scale = serde_json::json!({"spec": {"replicas": 0}});
    env.mirrors
        .patch("rw", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    env.status_where("rw", 120, "not Ready, not rewriting", |m| {
        cond(m, "Ready").is_some_and(|c| c.0 == "False") && !active(m)
    })
    .await;
    probe(&original).await;
    let p = pods
        .create(&PostParams::default(), &bare_pod("unready", &original))
        .await
        .unwrap();
    assert_eq!(image_of(&p), original);
    assert_eq!(p.annotations()[NOT_REWRITTEN], "mirror-not-ready");
    let m = scrape(&env.metrics_url).await;
    assert_eq!(
        metric_value(
            &m,
            "pullthrough_rewrite_pods_total",
            &[("outcome", "mirror-not-ready")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(&m, "pullthrough_rewrite_missed_pods", &[]),
        0.0
    );
    let _ = stop_relay.send(());
    relay.await.unwrap();
}

/// The webhook's answer time under load: `scripts/bench-cluster webhook` runs this (release
/// build, the cluster kit) and docs/benchmarks.md keeps what it printed. ROUNDS rounds
/// (`PULLTHROUGH_BENCH_ROUNDS`, default 3) of 200 pod creations, 20 at a time, with the
/// webhook configured and without it, in turn; the pods never run (no node matches
/// them). Printed: the creations' latency as the client sees it (p50, p99, exact), and
/// the webhook's own answer time (p99, from its histogram's buckets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench-cluster webhook"]
async fn bench_the_webhook_under_200_pod_creations() {
    use futures::StreamExt as _;
    let rounds: usize = std::env::var("PULLTHROUGH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let env = Env::with_webhook("bench").await;
    let Some(_node) = env.node_for_pods().await else {
        panic!("the benchmark needs a node and PULLTHROUGH_E2E_PROXY_IMAGE");
    };
    let webhook_port = env.webhook_port.unwrap();
    let a = env.registry("a");
    env.create(
        "rw",
        &format!(
            "  upstreams: [{{registry: {a}, url: 'http://127.0.0.1:1'}}]\n  rewrite: {{address: '127.0.0.1:5999', includeSystemNamespaces: true}}"
        ),
    )
    .await;
    let _host = env.on_host_network("rw").await;
    env.status_where("rw", 180, "rewriting", active).await;
    let pods = pod_api(&env).await;
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    let name = webhook_configuration(&env.ns);
    let original = format!("{a}/team/app:1");
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    // The API server's view of the configuration follows in a moment: dry runs until
    // pods are (or are not) rewritten.
    let settle = async |rewritten: bool| {
        eventually(60, "the webhook configuration in force", || async {
            let p = pods
                .create(&dry, &bare_pod("probe", &original))
                .await
                .ok()?;
            (image_of(&p).starts_with("127.0.0.1:5999/") == rewritten).then_some(())
        })
        .await
    };
    // Without the webhook the pods opt out, so that the audit does not count them (and
    // send Events) while the round is timed.
    let pod = |i: usize, on: bool| -> Pod {
        let opt_out = if on { "true" } else { "false" };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p{i}"), "labels": {"bench": "webhook"},
                         "annotations": {"pullthrough.dev/rewrite": opt_out}},
            "spec": {
                "nodeSelector": {"pullthrough.dev/bench": "nowhere"},
                "automountServiceAccountToken": false,
                "containers": [
                    {"name": "app", "image": original},
                    {"name": "side", "image": "docker.io/library/busybox:1.36"}
                ]
            }
        }))
        .unwrap()
    };
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut own_p99 = Vec::new();
    for round in 0..rounds * 2 {
        // Rotating order: with, without, without, with, ...
        let on = (round % 4 == 0) || (round % 4 == 3);
        if on {
            install(&configurations, &env.ns, webhook_port).await;
            eventually(60, "the caBundle set", || async {
                let c = configurations.get(&name).await.ok()?;
                c.webhooks?
                    .first()?
                    .client_config
                    .ca_bundle
                    .as_ref()
                    .map(|_| ())
            })
            .await;
        }
        settle(on).await;
        let before = scrape(&env.metrics_url).await;
        let started = std::time::Instant::now();
        let latencies: Vec<f64> = futures::stream::iter(0..200)
            .map(|i| {
                let pods = pods.clone();
                let p = pod(i, on);
                async move {
                    let t = std::time::Instant::now();
                    let made = pods.create(&PostParams::default(), &p).await.unwrap();
                    assert_eq!(image_of(&made).starts_with("127.0.0.1:5999/"), on);
                    t.elapsed().as_secs_f64() * 1000.0
                }
            })
            .buffer_unordered(20)
            .collect()
            .await;
        let wall = started.elapsed().as_secs_f64();
        let after = scrape(&env.metrics_url).await;
        pods.delete_collection(
            &DeleteParams::default().grace_period(0),
            &ListParams::default().labels("bench=webhook"),
        )
        .await
        .unwrap();
        eventually(120, "the round's pods gone", || async {
            let left = pods
                .list(&ListParams::default().labels("bench=webhook"))
                .await
                .ok()?;
            left.items.is_empty().then_some(())
        })
        .await;
        if on {
            own_p99.push(histogram_p99(
                &before,
                &after,
                "pullthrough_webhook_duration_seconds",
            ));
            configurations
                .delete(&name, &DeleteParams::default())
                .await
                .unwrap();
        }
        let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
        println!(
            "round {round}: webhook {}: 200 creations in {wall:.2} s, p50 {p50:.1} ms, p99 {p99:.1} ms",
            if on { "on" } else { "off" }
        );
        if on { &mut with } else { &mut without }.extend(latencies);
    }
    println!(
        "BENCH creations with the webhook: p50 {:.1} ms, p99 {:.1} ms ({} creations)",
        percentile(&with, 0.50),
        percentile(&with, 0.99),
        with.len()
    );
    println!(
        "BENCH creations without it: p50 {:.1} ms, p99 {:.1} ms ({} creations)",
        percentile(&without, 0.50),
        percentile(&without, 0.99),
        without.len()
    );
    println!("BENCH the webhook's own answer time, p99 at most (ms, per round): {own_p99:?}");
}

/// The `q` quantile of `samples` (nearest rank).
fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// The upper bound (ms) of the histogram bucket holding the 99th percentile of what
/// `name` observed between two scrapes.
fn histogram_p99(before: &str, after: &str, name: &str) -> f64 {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
            .map(|l| {
                let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                let count: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
                (le, count)
            })
            .collect()
    };
    let (b, a) = (buckets(before), buckets(after));
    let total = a.last().unwrap().1 - b.last().unwrap().1;
    a.iter()
        .zip(&b)
        .find(|((_, ca), (_, cb))| ca - cb >= 0.99 * total)
        .map(|((le, _), _)| le * 1000.0)
        .unwrap()
}

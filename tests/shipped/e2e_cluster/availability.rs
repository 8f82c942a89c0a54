//! Know before the outage (issue #40), on the kit: a Deployment whose tag is deleted
//! upstream turns `unavailable` in its mirror's status, raises the metric the alert
//! watches, and gets an Event; a cached image stays `cached` with the upstream down.

use super::rewrite::pod_api;
use crate::common::cluster::*;
use crate::common::fault::FaultUpstream;
use crate::common::{Image, metric_value, pull, scrape};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pullthrough::api::image_ref::registry_in_path;
use pullthrough::api::mirror::{PROXY_PORT, RegistryMirror};
use std::sync::atomic::Ordering;

/// The mirror's count of images in `state` (`cached`, `unavailable`, ...).
fn count(m: &RegistryMirror, state: &str) -> Option<i64> {
    let images = serde_json::to_value(m.status.as_ref()?.images.as_ref()?).ok()?;
    images[state].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_a_node_a_deleted_tag_turns_unavailable_and_a_cached_image_stays() {
    let env = Env::new("avail").await;
    let Some(node) = env.node_for_pods().await else {
        return;
    };
    give_node_an_address(&env.client, &node).await;
    let a = env.registry("a");
    let up = FaultUpstream::start().await;
    let app = Image::generate(341, &[30_000], "amd64");
    let old = Image::generate(342, &[20_000], "amd64");
    up.add_image("team/app", "1", &app);
    up.add_image("team/old", "1", &old);
    let (_, _host) = env
        .create_on_host(
            "watch",
            &format!(
                "  upstreams: [{{registry: {a}, url: '{}'}}]\n  availability: {{every: 0s}}",
                up.url
            ),
        )
        .await;
    // A Deployment of both images, scaled to zero: nothing pulls them.
    pod_api(&env).await;
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.ns);
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {"containers": [
                    {"name": "app", "image": format!("{a}/team/app:1")},
                    {"name": "old", "image": format!("{a}/team/old:1")}
                ]}
            }
        }
    });
    deployments
        .patch(
            "app",
            &PatchParams::apply("pullthrough-e2e").force(),
            &Patch::Apply(&deployment),
        )
        .await
        .unwrap();
    env.status_where("watch", 60, "two images upstreamOnly", |m| {
        count(m, "upstreamOnly") == Some(2)
    })
    .await;

    // app:1 pulled through the replica: cached at the next check. The mirror is
    // touched to be looked at again now (a check is due at every look: every 0s).
    let replica = format!("http://127.0.0.1:{PROXY_PORT}");
    pull(
        &replica,
        &format!("{}/team/app", registry_in_path(&a)),
        "1",
        None,
    )
    .await
    .unwrap();
    let touch = async |n: u32| {
        let p = serde_json::json!({"metadata": {"annotations": {"e2e/touch": n.to_string()}}});
        env.mirrors
            .patch("watch", &PatchParams::default(), &Patch::Merge(&p))
            .await
            .unwrap();
    };
    touch(1).await;
    env.status_where("watch", 60, "app:1 cached", |m| {
        count(m, "cached") == Some(1)
    })
    .await;

    // old:1 deleted upstream: unavailable in the status, the metric, and an Event on the
    // Deployment.
    up.state
        .manifests
        .lock()
        .unwrap()
        .retain(|(repo, _), _| repo != "team/old");
    touch(2).await;
    let m = env
        .status_where("watch", 60, "old:1 unavailable", |m| {
            count(m, "unavailable") == Some(1)
        })
        .await;
    let listed = &m.status.unwrap().images.unwrap().not_pullable;
    assert_eq!(listed[0].image, format!("{a}/team/old:1"));
    assert_eq!(
        listed[0].workloads,
        vec![format!("{}/Deployment/app", env.ns)]
    );
    let mirror = format!("{}/watch", env.ns);
    let metrics = scrape(&env.metrics_url).await;
    let unavailable = metric_value(
        &metrics,
        "pullthrough_workload_images",
        &[("mirror", mirror.as_str()), ("state", "unavailable")],
    );
    assert_eq!(unavailable, 1.0);
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        60,
        "an ImageUnavailable Event on the Deployment",
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("ImageUnavailable")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("app")
            })
        },
    )
    .await;

    // The upstream down: at the next check, app:1 stays cached.
    let checked = |m: &RegistryMirror| {
        m.status
            .as_ref()
            .and_then(|s| s.images.as_ref())
            .and_then(|i| i.checked_at.clone())
    };
    let before = checked(&env.mirrors.get("watch").await.unwrap());
    up.state.fail_status.store(503, Ordering::SeqCst);
    touch(3).await;
    env.status_where("watch", 60, "a check with the upstream down", |m| {
        checked(m) != before && count(m, "cached") == Some(1) && count(m, "unavailable") == Some(1)
    })
    .await;
}

//! The kubelet's own pull, timed the way Spegel's published benchmark times it: from the
//! kubelet's `Pulled` Event ("Successfully pulled image ... in 1.234s"). On the kit's
//! node (containerd 1.6), each round pulls three fresh images of the same size:
//! straight from the upstream Distribution registry (on the host), through the mirror
//! cold (nothing cached), and through the mirror warm (the mirror's cache filled first by
//! another client, the node's containerd still without the image). Through the mirror
//! means through a node-local entry point (`pullthrough::relay` on the node's loopback, as
//! docs/rewrite.md has it) to a replica on the host's network.
//! `scripts/bench-cluster kubelet-pull` runs it; docs/benchmarks.md keeps what it printed.

use super::rewrite::pod_api;
use crate::common::cluster::*;
use crate::common::{Image, Registry, pull, push_image};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use pullthrough::api::image_ref::registry_in_path;
use pullthrough::api::mirror::PROXY_PORT;

/// A node-local entry point (`pullthrough::relay`) on the node's loopback to the replica
/// on the host's network: its port, what stops it, and its task.
pub(super) async fn entry_point() -> (
    u16,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let entry = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(pullthrough::relay::serve(
        listener,
        format!("http://127.0.0.1:{PROXY_PORT}"),
        async {
            let _ = stopped.await;
        },
    ));
    (entry, stop, relay)
}

/// The note of the kubelet's Event `reason` (`Pulled`, `Failed`) on `pod`, once there.
pub(super) async fn kubelet_event(events: &Api<Event>, pod: &str, reason: &str) -> String {
    eventually(
        300,
        &format!("the kubelet's {reason} Event on {pod}"),
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find_map(|e| {
                let on = e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod);
                (on && e.reason.as_deref() == Some(reason)).then_some(e.note?)
            })
        },
    )
    .await
}

/// Seconds the kubelet says its pull of `pod`'s image took (its `Pulled` Event).
pub(super) async fn pulled_in(events: &Api<Event>, pod: &str) -> f64 {
    let note = kubelet_event(events, pod, "Pulled").await;
    // "Successfully pulled image "x" in 1.234s (1.234s including waiting). ..."
    let took = note
        .split(" in ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no duration in {note:?}"));
    parse_go_duration(took).unwrap_or_else(|| panic!("not a duration: {took:?} in {note:?}"))
}

/// Seconds of a Go duration as the kubelet prints it (`1.234s`, `812ms`, `1m2.5s`).
fn parse_go_duration(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let n: f64 = number.parse().ok()?;
        total += n * match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "µs" | "us" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = next;
    }
    Some(total)
}

#[test]
fn go_durations_read_as_the_kubelet_prints_them() {
    assert_eq!(parse_go_duration("1.5s"), Some(1.5));
    assert_eq!(parse_go_duration("812ms"), Some(0.812));
    assert_eq!(parse_go_duration("1m2.5s"), Some(62.5));
    assert_eq!(parse_go_duration("3x"), None);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `PULLTHROUGH_BENCH_ROUNDS` rounds (default 3) of images of `PULLTHROUGH_BENCH_MIB`
/// (default 64) in 4 layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench-cluster kubelet-pull"]
async fn bench_the_kubelet_s_own_pull_direct_and_through_the_mirror() {
    let env_num = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env_num("PULLTHROUGH_BENCH_ROUNDS", 3);
    let mib = env_num("PULLTHROUGH_BENCH_MIB", 64);
    let env = Env::new("kubelet").await;
    let Some(node) = env.node_for_pods().await else {
        panic!("the benchmark needs a node and PULLTHROUGH_E2E_PROXY_IMAGE");
    };
    give_node_an_address(&env.client, &node).await;
    let up = Registry::start().await;
    let a = env.registry("a");
    let (_, _host) = env
        .create_on_host(
            "m",
            &format!("  upstreams: [{{registry: {a}, url: '{}'}}]", up.url),
        )
        .await;
    let (entry, stop, relay) = entry_point().await;
    let pods = pod_api(&env).await;
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let up_host = up.url.trim_start_matches("http://").to_string();
    let through = format!("127.0.0.1:{entry}/{}", registry_in_path(&a));
    let layer = (mib << 20) / 4;
    let (mut direct, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let seed = u64::from(std::process::id()) * 100;
    for round in 0..rounds {
        let arms = [
            ("direct", up_host.as_str()),
            ("cold", &through),
            ("warm", &through),
        ];
        for (i, (arm, base)) in arms.into_iter().enumerate() {
            let repo = format!("bench/{arm}{round}");
            // An image of its own each time: the node's containerd keeps what it pulled.
            let image =
                Image::generate_tar(seed + round as u64 * 3 + i as u64, &[layer; 4], "amd64");
            push_image(&up.url, &repo, "1", &image).await;
            if arm == "warm" {
                pull(
                    &format!("http://127.0.0.1:{entry}"),
                    &format!("{}/{repo}", registry_in_path(&a)),
                    "1",
                    None,
                )
                .await
                .unwrap();
            }
            let name = format!("{arm}{round}");
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {
                    "hostNetwork": true,
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": format!("{base}/{repo}:1"), "command": ["/not-there"]}]
                }
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap();
            let secs = pulled_in(&events, &name).await;
            println!("round {round} {arm}: the kubelet pulled {mib} MiB in {secs:.3} s");
            match arm {
                "direct" => direct.push(secs),
                "cold" => cold.push(secs),
                _ => warm.push(secs),
            }
            pods.delete(&name, &DeleteParams::default().grace_period(0))
                .await
                .unwrap();
        }
    }
    let (d, c, w) = (median(direct), median(cold), median(warm));
    println!(
        "BENCH the kubelet's pull of {mib} MiB (4 layers), median of {rounds}: direct {d:.3} s, through the mirror cold {c:.3} s ({:.2}x), warm {w:.3} s ({:.2}x)",
        c / d,
        w / d
    );
    let _ = stop.send(());
    relay.await.unwrap();
}

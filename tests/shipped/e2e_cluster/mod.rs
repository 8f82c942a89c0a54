//! Real-cluster tests: the controller (in-process, scoped to a namespace of the test's
//! own) and the node agent against a real Kubernetes API server. Ignored unless asked
//! for, and then they need a cluster:
//!
//! ```sh
//! PULLTHROUGH_E2E_KUBECONFIG=~/.kube/config cargo test --test suite e2e_cluster -- --ignored
//! ```
//!
//! `./scripts/test` runs them itself when it can start the local cluster kit (see
//! docs/development.md). Any cluster does (kind, k3d, a real one): every test works in a
//! namespace of its own, with registry names no real mirror uses (`*.e2e.test`), and a
//! controller that watches only that namespace, so an operator installed in the cluster is
//! neither disturbed nor in the way. What a test creates is removed when it ends, also when it
//! fails (finalizers included). With a node and `PULLTHROUGH_E2E_PROXY_IMAGE` (an image
//! of this project the node already has), two tests also run real proxy pods (host
//! network: the kit has no pod network), one at a time: one with a node agent for that
//! node, one following a workload's images into a replica's cache.

mod availability;
mod disconnected;
mod kubelet_pull;
mod rewrite;

use crate::common::cluster::*;
use crate::common::{metric_value, root, scrape};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, ResourceExt};
use pullthrough::api::mirror::{FINALIZER, METRICS_PORT, PROXY_PORT, RegistryMirror};
use pullthrough::node_agent::{AgentOptions, ContainersOptions, WriteContainers};
use std::time::Duration;

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn deploy_and_examples_pass_server_side_validation() {
    let env = Env::new("deploy").await;
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for dir in ["deploy", "deploy/examples", "deploy/rewrite"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut checked = 0;
    for file in &files {
        for mut obj in documents(file) {
            let types = obj.types.clone().expect("apiVersion and kind");
            let (group, version) = types
                .api_version
                .split_once('/')
                .unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let (resource, caps) = kube::discovery::pinned_kind(&env.client, &gvk)
                .await
                .unwrap_or_else(|e| {
                    panic!("{}: {gvk:?} unknown to the cluster: {e}", file.display())
                });
            let api: Api<DynamicObject> = match caps.scope {
                kube::discovery::Scope::Namespaced => {
                    // Into the test's namespace: nothing an installed operator uses.
                    obj.metadata.namespace = Some(env.ns.clone());
                    Api::namespaced_with(env.client.clone(), &env.ns, &resource)
                }
                kube::discovery::Scope::Cluster => Api::all_with(env.client.clone(), &resource),
            };
            let name = obj.name_any();
            api.patch(
                &name,
                &PatchParams::apply("pullthrough-e2e").dry_run(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("{} {}/{name}: {e}", file.display(), types.kind));
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} objects checked");
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn the_api_server_refuses_invalid_mirrors() {
    let env = Env::new("invalid").await;
    let a = env.registry("a");
    let refused = |name: &str, spec: String, says: &'static str| {
        let env = &env;
        let name = name.to_string();
        async move {
            let mut m: RegistryMirror = serde_yaml::from_str(&format!(
                "apiVersion: pullthrough.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: {name}}}\nspec:\n{spec}"
            ))
            .unwrap();
            m.metadata.namespace = Some(env.ns.clone());
            let err = env
                .mirrors
                .create(&PostParams::default(), &m)
                .await
                .expect_err(&format!("{name} was accepted"));
            assert!(err.to_string().contains(says), "{name}: {err}");
        }
    };
    // Every CEL rule of the CRD, and the schema's patterns and bounds.
    refused(
        &"n".repeat(41),
        format!("  upstreams: [{{registry: {a}}}]"),
        "at most 40",
    )
    .await;
    refused(
        "dup",
        format!(
            "  upstreams: [{{registry: {a}}}, {{registry: {}}}]",
            a.to_uppercase()
        ),
        "only once",
    )
    .await;
    refused(
        "aliases",
        "  upstreams: [{registry: registry-1.docker.io}, {registry: index.docker.io}]".into(),
        "only once",
    )
    .await;
    refused(
        "both",
        format!(
            "  upstreams: [{{registry: {a}}}]\n  cache: {{storage: {{size: 1Gi, emptyDir: {{}}}}}}"
        ),
        "not both",
    )
    .await;
    refused(
        "lots",
        format!("  upstreams: [{{registry: {a}}}]\n  cache: {{storage: {{size: lots}}}}"),
        "quantity",
    )
    .await;
    refused(
        "lotslimit",
        format!("  upstreams: [{{registry: {a}}}]\n  cache: {{storage: {{emptyDir: {{sizeLimit: lots}}}}}}"),
        "quantity",
    )
    .await;
    refused(
        "ttl",
        format!("  upstreams: [{{registry: {a}}}]\n  cache: {{tagTTL: five minutes}}"),
        "tagTTL",
    )
    .await;
    refused(
        "replicas",
        format!("  upstreams: [{{registry: {a}}}]\n  replicas: -1"),
        "replicas",
    )
    .await;
    refused(
        "nohost",
        "  upstreams: [{registry: 'not a host/'}]".into(),
        "registry",
    )
    .await;
    refused("none", "  upstreams: []".into(), "upstreams").await;
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn a_mirror_gets_its_children_rolls_on_change_scales_and_goes() {
    let env = Env::new("children").await;
    let a = env.registry("a");
    env.create(
        "cache",
        &format!("  upstreams: [{{registry: {a}, url: 'http://127.0.0.1:1'}}]"),
    )
    .await;
    let m = env
        .status_where("cache", 90, "an endpoint", |m| {
            m.status.as_ref().is_some_and(|s| s.endpoint.is_some())
        })
        .await;
    assert!(m.finalizers().iter().any(|f| f == FINALIZER));
    assert_eq!(cond(&m, "Degraded").unwrap().0, "False");
    assert_eq!(cond(&m, "Conflict").unwrap().0, "False");
    assert_eq!(m.status.as_ref().unwrap().served_registries, [a]);
    let uid = m.uid().unwrap();
    let owned =
        |refs: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.as_ref()
                .is_some_and(|r| r.iter().any(|o| o.uid == uid && o.controller == Some(true)))
        };
    let child = "pullthrough-cache";
    let cm = Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .get(child)
        .await
        .unwrap();
    assert!(owned(&cm.metadata.owner_references));
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.ns);
    let dep = deployments.get(child).await.unwrap();
    assert!(owned(&dep.metadata.owner_references));
    let svc = Api::<Service>::namespaced(env.client.clone(), &env.ns)
        .get(child)
        .await
        .unwrap();
    assert!(owned(&svc.metadata.owner_references));
    let lease = Api::<Lease>::namespaced(env.client.clone(), &env.ns)
        .get("pullthrough-controller")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("e2e-children")
    );

    // A change rolls the pods: the template's config hash moves.
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["pullthrough.dev/config-hash"]
            .clone()
    };
    let before = hash(&dep);
    env.mirrors
        .patch(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cache": {"tagTTL": "1m"}}})),
        )
        .await
        .unwrap();
    eventually(60, "the config hash to change", || async {
        let d = deployments.get(child).await.ok()?;
        (hash(&d) != before).then_some(())
    })
    .await;

    // Scaled to two: a PodDisruptionBudget; back to one: none.
    let pdbs = Api::<PodDisruptionBudget>::namespaced(env.client.clone(), &env.ns);
    for (replicas, want_pdb) in [(2, true), (1, false)] {
        env.mirrors
            .patch(
                "cache",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
            )
            .await
            .unwrap();
        eventually(60, &format!("{replicas} replicas"), || async {
            let d = deployments.get(child).await.ok()?;
            let pdb = pdbs.get_opt(child).await.ok()?;
            (d.spec?.replicas == Some(replicas) && pdb.is_some() == want_pdb).then_some(())
        })
        .await;
    }

    // The controller's metrics count the reconciles.
    let metrics = scrape(&env.metrics_url).await;
    assert!(
        metric_value(
            &metrics,
            "pullthrough_reconcile_total",
            &[("result", "success")]
        ) >= 3.0,
        "reconciles not counted"
    );

    // Deleted: the finalizer lets it go (no node reports it), the children follow.
    env.gone("cache").await;
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn a_registry_goes_to_the_oldest_mirror_that_can_serve_it_and_moves_at_once() {
    let env = Env::new("conflict").await;
    let (a, b, c) = (env.registry("a"), env.registry("b"), env.registry("c"));
    let up = "url: 'http://127.0.0.1:1'";
    // Created in this order, a second apart (creation times have whole seconds; a tie
    // would go to the lower name): hub (a), second (a, losing to hub), public (a and b).
    let apart = || tokio::time::sleep(Duration::from_millis(1100));
    env.create("hub", &format!("  upstreams: [{{registry: {a}, {up}}}]"))
        .await;
    apart().await;
    env.create(
        "second",
        &format!("  upstreams: [{{registry: {}, {up}}}]", a.to_uppercase()),
    )
    .await;
    apart().await;
    env.create(
        "public",
        &format!("  upstreams: [{{registry: {a}, {up}}}, {{registry: {b}, {up}}}]"),
    )
    .await;
    let public = env
        .status_where("public", 60, "Conflict", |m| {
            cond(m, "Conflict").is_some_and(|c| c.0 == "True")
        })
        .await;
    let st = public.status.as_ref().unwrap();
    // The winner named is the oldest claimant, hub, not the first found.
    assert_eq!(st.lost_registries.len(), 1);
    assert_eq!(st.lost_registries[0].mirrored_by, format!("{}/hub", env.ns));
    // A mirror in partial conflict still serves its other registry, and has children.
    assert_eq!(st.served_registries, [b.as_str()]);
    Api::<Deployment>::namespaced(env.client.clone(), &env.ns)
        .get("pullthrough-public")
        .await
        .expect("public runs");
    // One that lost everything runs nothing.
    let second = env
        .status_where("second", 60, "Ready=False Conflict", |m| {
            cond(m, "Ready").is_some_and(|c| c.1 == "Conflict")
        })
        .await;
    assert!(second.status.unwrap().served_registries.is_empty());
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.ns);
    eventually(60, "second to run nothing", || async {
        deployments
            .get_opt("pullthrough-second")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // A broken older mirror does not keep a registry: the proxy could not run its spec
    // (a pin on a registry it does not mirror), so the younger one serves c.
    env.create(
        "broken",
        &format!("  upstreams: [{{registry: {c}, {up}}}]\n  cache: {{pin: ['{a}/x:1']}}"),
    )
    .await;
    env.status_where("broken", 60, "Degraded", |m| {
        cond(m, "Degraded").is_some_and(|c| c.1 == "InvalidSpec")
    })
    .await;
    apart().await;
    env.create("young", &format!("  upstreams: [{{registry: {c}, {up}}}]"))
        .await;
    env.status_where("young", 60, "c served", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.served_registries == [c.clone()])
    })
    .await;

    // hub goes: second (older than public) takes a within seconds, not at the
    // controller's periodic look (60 s after its last); public still lost it, now to
    // second.
    env.gone("hub").await;
    env.status_where("second", 30, "a served, nothing lost", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.served_registries == [a.clone()] && s.lost_registries.is_empty())
    })
    .await;
    env.status_where("public", 30, "a lost to second", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.lost_registries.len() == 1
                && s.lost_registries[0].mirrored_by == format!("{}/second", env.ns)
        })
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn a_missing_secret_degrades_the_mirror_until_it_is_created() {
    // As shipped: the controller may create the signing key Secret, and nothing more.
    let env = Env::start("secret", true).await;
    let a = env.registry("a");
    env.create(
        "private",
        &format!("  upstreams: [{{registry: {a}, url: 'http://127.0.0.1:1', credentialsSecretRef: {{name: creds}}}}]\n  access: {{plainHttp: true}}"),
    )
    .await;
    env.status_where("private", 60, "SecretNotFound", |m| {
        cond(m, "Degraded").is_some_and(|c| c.1 == "SecretNotFound")
    })
    .await;
    let config = serde_json::json!({"auths": {a.clone(): {"auth": "dTpw"}}}).to_string();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "creds"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config}
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // The Secret is watched: no waiting for the periodic look.
    env.status_where("private", 30, "Degraded=False", |m| {
        cond(m, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    // Credentials make the upstream upstreamAuth: its replicas' signing key, made once.
    env.random_secret("pullthrough-private-access", "private", "signing-key")
        .await;

    // Every Secret a mirror reads is watched, of any type: a certificate too.
    let tls = serde_json::json!({"spec": {"tls": {"secretRef": {"name": "cert"}}}});
    env.mirrors
        .patch("private", &PatchParams::default(), &Patch::Merge(&tls))
        .await
        .unwrap();
    env.status_where("private", 60, "SecretNotFound (spec.tls)", |m| {
        cond(m, "Degraded").is_some_and(|c| c.1 == "SecretNotFound")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    crate::common::test_certificate(dir.path());
    let pem = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let cert: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cert"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": pem("tls.crt"), "tls.key": pem("tls.key"), "ca.crt": pem("ca.crt")}
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &cert)
        .await
        .unwrap();
    env.status_where("private", 30, "Degraded=False with a certificate", |m| {
        cond(m, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_a_node_proxy_pods_run_and_the_node_agent_reports() {
    let env = Env::new("node").await;
    let Some(node) = env.node_for_pods().await else {
        return;
    };
    let a = env.registry("a");
    let (m, _host) = env
        .create_on_host(
            "pods",
            &format!("  upstreams: [{{registry: {a}, url: 'http://127.0.0.1:1'}}]"),
        )
        .await;
    let st = m.status.as_ref().unwrap();
    assert_eq!(st.ready_replicas, 1);
    assert!(st.endpoint.as_ref().unwrap().starts_with("http://"));

    // A node agent for this node, its containerd not reading hosts.toml: the files are
    // written, but the node does not count as configured, and the status says why.
    let certs = tempfile::tempdir().unwrap();
    let ignoring_config = certs.path().join("ignoring.toml");
    std::fs::write(&ignoring_config, "version = 2\n").unwrap();
    let reading_config = certs.path().join("reading.toml");
    std::fs::write(
        &reading_config,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            certs.path().display()
        ),
    )
    .unwrap();
    let agent = |config: std::path::PathBuf| {
        let options = AgentOptions {
            certs_dir: certs.path().to_path_buf(),
            containerd_certs_path: certs.path().display().to_string(),
            containerd_config: config,
            containers: ContainersOptions::under(
                &certs.path().join("containers"),
                WriteContainers::Auto,
            ),
            probe: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(pullthrough::node_agent::run(
            env.client.clone(),
            options,
            node.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Duration::from_secs(5),
            async {
                let _ = stopped.await;
            },
        ));
        (stop, task)
    };
    let (stop, task) = agent(ignoring_config);
    let hosts = certs.path().join(&a).join("hosts.toml");
    env.status_where("pods", 60, "a node ignoring the mirror", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.nodes.as_ref())
            .is_some_and(|n| n.ignoring_mirrors == 1 && n.configured == 0)
    })
    .await;
    assert!(hosts.exists());
    let m = env.mirrors.get("pods").await.unwrap();
    assert_eq!(cond(&m, "Degraded").unwrap().1, "ContainerdIgnoresMirrors");
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    // The same agent with a containerd that reads them: configured.
    let (stop, task) = agent(reading_config);
    env.status_where("pods", 60, "the node configured", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.nodes.as_ref())
            .is_some_and(|n| n.configured == 1 && n.ignoring_mirrors == 0)
    })
    .await;
    // The real node's runtime, as its status names it, and the files the agent keeps.
    let nodes: Api<Node> = Api::all(env.client.clone());
    let annotations = nodes.get(&node).await.unwrap().annotations().clone();
    let runtime = &annotations["pullthrough.dev/runtime"];
    assert!(
        runtime.starts_with("containerd://") && runtime.ends_with(": hosts.toml"),
        "{runtime}"
    );
    assert_eq!(
        annotations["pullthrough.dev/registries-conf"],
        "not-written"
    );

    // Deleted: it waits for the node agent to remove the file, then goes.
    env.gone("pods").await;
    assert!(!hosts.exists(), "the file outlived its mirror");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_a_node_a_workload_s_images_are_in_its_mirror_s_replica_before_a_pod_pulls() {
    use crate::common::{Image, Registry, pull, push_image};
    let env = Env::new("warmup").await;
    let Some(node) = env.node_for_pods().await else {
        return;
    };
    give_node_an_address(&env.client, &node).await;
    // The upstream: a real Distribution on the host, whose network the pods share.
    let up = Registry::start().await;
    let v1 = Image::generate(221, &[40_000, 12_000], "amd64");
    let v2 = Image::generate(222, &[35_000, 9_000], "amd64");
    push_image(&up.url, "team/app", "1", &v1).await;
    push_image(&up.url, "team/app", "2", &v2).await;
    let blob_gets = |img: &Image, want: usize| {
        tokio::task::block_in_place(|| {
            for b in img.blobs() {
                up.assert_gets(&format!("/blobs/{}", b.digest), want);
            }
        })
    };
    // The workloads' namespace is one the mirror's selector picks.
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let team = serde_json::json!({"metadata": {"labels": {"team": "a"}}});
    namespaces
        .patch(&env.ns, &PatchParams::default(), &Patch::Merge(&team))
        .await
        .unwrap();
    // A Deployment of app:1, scaled to 0 (no pod of it ever pulls), made before its
    // mirror exists.
    let a = env.registry("a");
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.ns);
    let app = |tag: &str| {
        serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "app"},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "app"}},
                "template": {
                    "metadata": {"labels": {"app": "app"}},
                    "spec": {"containers": [{"name": "app", "image": format!("{a}/team/app:{tag}")}]}
                }
            }
        })
    };
    let roll_to = async |tag: &str| {
        deployments
            .patch(
                "app",
                &PatchParams::apply("pullthrough-e2e").force(),
                &Patch::Apply(&app(tag)),
            )
            .await
            .unwrap();
    };
    let prefetched = async |tag: &str| {
        let note = format!("Prefetched image {a}/team/app:{tag} in ");
        event_on(&env, "warm", &note, 120).await;
    };
    roll_to("1").await;
    let (_, _host) = env
        .create_on_host(
        "warm",
        &format!(
            "  upstreams: [{{registry: {a}, url: '{}'}}]\n  cache: {{prefetchFromWorkloads: {{namespaceSelector: {{matchLabels: {{team: a}}}}}}}}",
            up.url
        ),
        )
        .await;
    // Its replica, new since the Deployment changed, is warmed with what the mirror's
    // workloads use: app:1's blobs come from the upstream once, with no client asking.
    prefetched("1").await;
    blob_gets(&v1, 1);
    // A rollout to app:2: prefetched as the Deployment changes.
    roll_to("2").await;
    prefetched("2").await;
    blob_gets(&v2, 1);
    env.status_where("warm", 60, "two prefetched images", |m| {
        m.status.as_ref().and_then(|s| s.prefetched_images) == Some(2)
    })
    .await;
    // Then a client pulls app:2 from the replica (its pod IP is the host's): all from
    // the cache, and the lead time is recorded.
    let replica = format!("http://127.0.0.1:{PROXY_PORT}");
    pull(&replica, "team/app", "2", Some(&a)).await.unwrap();
    blob_gets(&v2, 1);
    let metrics = scrape(&format!("http://127.0.0.1:{METRICS_PORT}")).await;
    assert!(metric_value(&metrics, "pullthrough_prefetch_lead_seconds_count", &[]) >= 1.0);

    // Another replica takes the leader Lease: this controller stands by, and a rollout
    // to app:3 is not asked for while it does. Once the Lease is free it leads again and
    // asks for every workload's images, as at its start: app:3 is warmed then.
    let v3 = Image::generate(223, &[20_000], "amd64");
    push_image(&up.url, "team/app", "3", &v3).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    // The Lease held by `holder` for `secs`, and this controller leading (1) or not (0).
    let lease_to = async |holder: Option<&str>, secs: i32, leading: f64| {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let spec = serde_json::json!({"spec": {"holderIdentity": holder, "leaseDurationSeconds": secs, "renewTime": now}});
        leases
            .patch(
                "pullthrough-controller",
                &PatchParams::default(),
                &Patch::Merge(&spec),
            )
            .await
            .unwrap();
        eventually(
            60,
            &format!("pullthrough_controller_leader {leading}"),
            || async {
                let metrics = scrape(&env.metrics_url).await;
                (metric_value(&metrics, "pullthrough_controller_leader", &[]) == leading)
                    .then_some(())
            },
        )
        .await;
    };
    lease_to(Some("e2e-other"), 3600, 0.0).await;
    roll_to("3").await;
    lease_to(None, 1, 1.0).await;
    prefetched("3").await;
    blob_gets(&v3, 1);
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_the_shipped_rbac_an_evicting_mirror_s_pods_may_hold_their_lease_and_no_other() {
    let env = Env::start("evictor", true).await;
    let registry = env.registry("hub");
    env.create(
        "bucket",
        &format!("  upstreams: [{{registry: {registry}}}]\n  cache: {{storage: {{s3: {{bucket: b, endpoint: 'http://127.0.0.1:9', maxSize: 10Gi}}}}}}"),
    )
    .await;
    // Made by the controller acting as its own service account: the API server let it
    // grant what it holds.
    let bindings: Api<RoleBinding> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(60, "the evictor's RoleBinding", || async {
        bindings
            .get_opt("pullthrough-bucket-evictor")
            .await
            .ok()
            .flatten()
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let dep = eventually(60, "the Deployment", || async {
        deployments
            .get_opt("pullthrough-bucket")
            .await
            .ok()
            .flatten()
    })
    .await;
    let pod = dep.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("pullthrough-bucket-proxy")
    );
    let (ns, sa) = (env.ns.as_str(), "pullthrough-bucket-proxy");
    let lease = "pullthrough-bucket-evictor";
    for verb in ["get", "update", "create"] {
        assert!(
            may_lease(&env.client, ns, sa, verb, lease).await,
            "may not {verb} its Lease"
        );
    }
    assert!(
        !may_lease(&env.client, ns, sa, "update", "pullthrough-controller").await,
        "may update another Lease"
    );
    assert!(
        !may_lease(&env.client, ns, "default", "update", lease).await,
        "the default account may"
    );
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn with_the_shipped_rbac_a_prefetching_mirror_gets_its_admin_token_and_workloads_are_read_only()
 {
    let env = Env::start("warm", true).await;
    let a = env.registry("a");
    env.create(
        "warm",
        &format!(
            "  upstreams: [{{registry: {a}, url: 'http://127.0.0.1:1'}}]\n  cache: {{prefetchFromWorkloads: {{namespaceSelector: {{matchLabels: {{team: a}}}}}}}}"
        ),
    )
    .await;
    // Its replicas' admin token, made once, owned by the mirror, mounted in the pods.
    env.random_secret("pullthrough-warm-admin", "warm", "token")
        .await;
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.ns);
    let dep = eventually(60, "the Deployment", || async {
        deployments.get_opt("pullthrough-warm").await.ok()?
    })
    .await;
    let pod = dep.spec.unwrap().template.spec.unwrap();
    assert!(
        pod.volumes.unwrap().iter().any(|v| v
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some("pullthrough-warm-admin"))
    );
    // As shipped, the controller may read every workload kind, its replicas' pods and
    // namespaces' labels, and changes no workload that is not its own kind of child.
    let sa = "pullthrough-controller";
    let ns = env.ns.as_str();
    for (group, resource) in [
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("apps", "daemonsets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
    ] {
        for verb in ["list", "watch"] {
            let what = serde_json::json!({"group": group, "resource": resource, "verb": verb});
            assert!(may(&env.client, ns, sa, what).await, "{verb} {resource}");
        }
    }
    for (group, resource, verb) in [
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "namespaces", "get"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    ] {
        let what = serde_json::json!({"group": group, "resource": resource, "verb": verb});
        assert!(may(&env.client, ns, sa, what).await, "{verb} {resource}");
    }
    // DaemonSets are the one kind of workload it writes: the entry points of rewriting
    // mirrors (docs/rewrite.md).
    for (group, resource, verb) in [
        ("batch", "jobs", "create"),
        ("batch", "cronjobs", "patch"),
        ("", "pods", "delete"),
    ] {
        let what = serde_json::json!({"namespace": ns, "group": group, "resource": resource, "verb": verb});
        assert!(!may(&env.client, ns, sa, what).await, "{verb} {resource}");
    }
}

//! Real-cluster tests. Ignored unless asked for, and then they need a cluster:
//!
//! ```sh
//! PULLTHROUGH_E2E_KUBECONFIG=~/.kube/config cargo test --test suite e2e_cluster -- --ignored
//! ```
//!
//! They install the CRD, run the controller in-process against the cluster, apply an
//! example RegistryMirror into a fresh namespace and check children, status, conflicts,
//! updates and cleanup. Only a kube-apiserver is needed; with a full cluster and
//! `PULLTHROUGH_E2E_PROXY_IMAGE` set to a pullable image of this project, they also wait
//! for the proxy pods to be Ready, run a node agent for one node (files in a temp
//! directory) and check the Node annotation, `status.nodes` and cleanup on deletion.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use pullthrough::api::mirror::{FINALIZER, RegistryMirror};
use pullthrough::controller::builders::ChildSettings;
use pullthrough::controller::{ControllerOptions, run};
use pullthrough::node_agent::AgentOptions;
use std::time::{Duration, Instant};

async fn client() -> Client {
    let path = std::env::var("PULLTHROUGH_E2E_KUBECONFIG")
        .expect("set PULLTHROUGH_E2E_KUBECONFIG to the kubeconfig of a test cluster");
    let kubeconfig = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    Client::try_from(config).expect("client")
}

/// Polls `check` until it returns Some, for at most `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn cond(m: &RegistryMirror, t: &str) -> Option<String> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

#[tokio::test]
#[ignore = "needs a cluster: set PULLTHROUGH_E2E_KUBECONFIG"]
async fn controller_runs_a_mirror_end_to_end() {
    let client = client().await;
    let ns_name = format!("pullthrough-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    // The CRD, exactly as generated.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "registrymirrors.pullthrough.dev",
        &PatchParams::apply("pullthrough-e2e").force(),
        &Patch::Apply(RegistryMirror::crd()),
    )
    .await
    .unwrap();
    eventually(60, "the CRD to be established", || async {
        let crd = crds.get("registrymirrors.pullthrough.dev").await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;

    // The controller, in-process.
    let image = std::env::var("PULLTHROUGH_E2E_PROXY_IMAGE").ok();
    let options = ControllerOptions {
        settings: ChildSettings {
            proxy_image: image.clone().unwrap_or_else(|| "pullthrough:e2e".into()),
            image_pull_policy: Some("IfNotPresent".into()),
        },
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        lease_namespace: ns_name.clone(),
        identity: "e2e".into(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run(client.clone(), options, async {
        let _ = stopped.await;
    }));

    // The Docker Hub example, in our namespace.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/dockerhub.yaml"
    ))
    .unwrap();
    let mut mirror: RegistryMirror = serde_yaml::from_str(&text).unwrap();
    mirror.metadata.namespace = Some(ns_name.clone());
    let mirrors: Api<RegistryMirror> = Api::namespaced(client.clone(), &ns_name);
    mirrors
        .create(&PostParams::default(), &mirror)
        .await
        .unwrap();

    let m = eventually(90, "status with an endpoint", || async {
        let m = mirrors.get("dockerhub").await.ok()?;
        let st = m.status.as_ref()?;
        (st.observed_generation == m.metadata.generation && st.endpoint.is_some()).then_some(m)
    })
    .await;
    assert!(m.finalizers().iter().any(|f| f == FINALIZER));
    assert!(
        m.status
            .as_ref()
            .unwrap()
            .endpoint
            .as_ref()
            .unwrap()
            .starts_with("http://")
    );
    assert_eq!(cond(&m, "Degraded").as_deref(), Some("False"));
    assert_eq!(cond(&m, "Conflict").as_deref(), Some("False"));
    let uid = m.uid().unwrap();
    let owned =
        |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.is_some_and(|r| r.iter().any(|o| o.uid == uid && o.controller == Some(true)))
        };
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns_name)
        .get("pullthrough-dockerhub")
        .await
        .unwrap();
    assert!(owned(cm.metadata.owner_references.as_ref()));
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns_name);
    let dep = deployments.get("pullthrough-dockerhub").await.unwrap();
    assert!(owned(dep.metadata.owner_references.as_ref()));
    let svc = Api::<Service>::namespaced(client.clone(), &ns_name)
        .get("pullthrough-dockerhub")
        .await
        .unwrap();
    assert!(owned(svc.metadata.owner_references.as_ref()));
    let lease = Api::<Lease>::namespaced(client.clone(), &ns_name)
        .get("pullthrough-controller")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("e2e"));

    // With real proxy pods: Ready, and a node agent (in-process, writing to a temp
    // directory for one node) configures the node and reports it.
    let certs = tempfile::tempdir().unwrap();
    let mut agent = None;
    if image.is_some() {
        eventually(300, "the mirror to be Ready", || async {
            let m = mirrors.get("dockerhub").await.ok()?;
            (cond(&m, "Ready").as_deref() == Some("True")).then_some(())
        })
        .await;
        let nodes: Api<Node> = Api::all(client.clone());
        let node = nodes
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .remove(0)
            .name_any();
        let options = AgentOptions {
            certs_dir: certs.path().to_path_buf(),
            containerd_certs_path: certs.path().display().to_string(),
            containerd_config: certs.path().join("absent.toml"),
        };
        let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(pullthrough::node_agent::run(
            client.clone(),
            options,
            node.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Duration::from_secs(5),
            async {
                let _ = agent_stopped.await;
            },
        ));
        agent = Some((agent_stop, task));
        let key = format!("{ns_name}/dockerhub");
        eventually(60, "the node annotation", || async {
            let n = nodes.get(&node).await.ok()?;
            n.annotations()
                .get("pullthrough.dev/mirrors")
                .is_some_and(|v| v.split(',').any(|m| m == key))
                .then_some(())
        })
        .await;
        assert!(certs.path().join("docker.io/hosts.toml").exists());
        eventually(120, "status.nodes.configured", || async {
            let m = mirrors.get("dockerhub").await.ok()?;
            (m.status?.nodes?.configured >= 1).then_some(())
        })
        .await;
    }

    // An update rolls the pods: the template's config hash changes.
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
    mirrors
        .patch(
            "dockerhub",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cache": {"tagTTL": "1m"}}})),
        )
        .await
        .unwrap();
    eventually(60, "the config hash to change", || async {
        let d = deployments.get("pullthrough-dockerhub").await.ok()?;
        (hash(&d) != before).then_some(())
    })
    .await;

    // A second mirror of docker.io, younger: Conflict.
    let mut second = mirror.clone();
    second.metadata = Default::default();
    second.metadata.name = Some("dockerhub-2".into());
    second.metadata.namespace = Some(ns_name.clone());
    mirrors
        .create(&PostParams::default(), &second)
        .await
        .unwrap();
    eventually(60, "the younger mirror to report Conflict", || async {
        let m = mirrors.get("dockerhub-2").await.ok()?;
        (cond(&m, "Conflict").as_deref() == Some("True")).then_some(())
    })
    .await;

    // The CRD's validation rejects a duplicate registry and a bad duration.
    let mut bad = mirror.clone();
    bad.metadata = Default::default();
    bad.metadata.name = Some("bad".into());
    bad.spec.upstreams.push(bad.spec.upstreams[0].clone());
    let err = mirrors
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only once"), "{err}");
    bad.spec.upstreams.pop();
    bad.spec.cache.tag_ttl = Some("five minutes".into());
    assert!(mirrors.create(&PostParams::default(), &bad).await.is_err());

    // Deletion: the finalizer is released (no node reports the mirror) and it goes.
    for name in ["dockerhub", "dockerhub-2"] {
        mirrors
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in ["dockerhub", "dockerhub-2"] {
        eventually(60, "the mirror to be gone", || async {
            match mirrors.get_opt(name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        })
        .await;
    }

    if let Some((agent_stop, task)) = agent {
        // The agent removed the mirror's file before the finalizer let it go.
        assert!(!certs.path().join("docker.io/hosts.toml").exists());
        let _ = agent_stop.send(());
        task.await.unwrap().unwrap();
    }
    let _ = stop.send(());
    controller.await.unwrap().unwrap();
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .unwrap();
}

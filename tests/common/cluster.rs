//! The real-cluster harness: a client from `PULLTHROUGH_E2E_KUBECONFIG`, the CRD
//! installed, a namespace of the test's own with a controller scoped to it ([`Env`]),
//! the shipped RBAC as the controller's identity, and waits with a bound.

use super::{free_port, root};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use pullthrough::api::mirror::{FINALIZER, METRICS_PORT, PROXY_PORT, RegistryMirror};
use pullthrough::controller::builders::ChildSettings;
use pullthrough::controller::rewrite::WebhookOptions;
use pullthrough::controller::rewrite::certs::{CertOptions, Issuance};
use pullthrough::controller::{ControllerOptions, run};
use std::time::{Duration, Instant};

pub fn kubeconfig_path() -> String {
    std::env::var("PULLTHROUGH_E2E_KUBECONFIG")
        .expect("set PULLTHROUGH_E2E_KUBECONFIG to the kubeconfig of a test cluster")
}

pub async fn config_from(path: &str) -> kube::Config {
    let kubeconfig = Kubeconfig::read_from(path).expect("readable kubeconfig");
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig")
}

pub async fn client_from(path: &str) -> Client {
    Client::try_from(config_from(path).await).expect("client")
}

/// Polls `check` until it returns Some, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn cond(m: &RegistryMirror, t: &str) -> Option<(String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The CRD, exactly as generated, applied and established.
pub async fn install_crd(client: &Client) {
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
}

/// A namespace of the test's own, with the CRD installed and a controller watching only
/// it. Dropped (also when the test fails): the controller stops, the finalizers it owns
/// are removed, and the namespace goes.
pub struct Env {
    pub client: Client,
    pub ns: String,
    pub mirrors: Api<RegistryMirror>,
    pub metrics_url: String,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub controller: Option<tokio::task::JoinHandle<Result<(), pullthrough::controller::RunError>>>,
    /// With [`Env::with_webhook`]: the port of the controller's webhook (HTTPS on
    /// 127.0.0.1, its self-made certificate naming that address).
    pub webhook_port: Option<u16>,
}

impl Env {
    pub async fn new(test: &str) -> Env {
        Env::start(test, false).await
    }

    /// With `shipped_rbac`, the controller runs as a service account of the namespace
    /// bound to the ClusterRole and Role of deploy/02-rbac.yaml (impersonated), not as
    /// the cluster's admin.
    pub async fn start(test: &str, shipped_rbac: bool) -> Env {
        Env::start_with(test, shipped_rbac, false).await
    }

    /// A controller serving the image-rewriting webhook on a port of loopback, keeping
    /// the caBundle of [`webhook_configuration`] (which the test makes: its `url`
    /// clientConfig names the port, its namespaceSelector this namespace alone).
    pub async fn with_webhook(test: &str) -> Env {
        Env::start_with(test, false, true).await
    }

    async fn start_with(test: &str, shipped_rbac: bool, webhook: bool) -> Env {
        crate::common::init_tracing();
        let client = client_from(&kubeconfig_path()).await;
        install_crd(&client).await;
        let ns = format!("e2e-{test}-{}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let object: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
        namespaces
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
        // With the shipped RBAC, the controller's own Lease is in a namespace of its own,
        // as in an install (pullthrough-system): it holds nothing in the mirror's.
        let lease_ns = match shipped_rbac {
            false => ns.clone(),
            true => {
                let lease_ns = format!("{ns}-system");
                let object: Namespace =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": lease_ns}}))
                        .unwrap();
                namespaces
                    .create(&PostParams::default(), &object)
                    .await
                    .unwrap();
                lease_ns
            }
        };
        let port = free_port();
        let webhook_port = webhook.then(free_port);
        let webhook = webhook_port.map(|p| WebhookOptions {
            listen: format!("127.0.0.1:{p}").parse().unwrap(),
            certs: CertOptions {
                namespace: lease_ns.clone(),
                secret: "pullthrough-webhook-tls".into(),
                hosts: vec!["127.0.0.1".into()],
                issuance: Issuance::SelfSigned,
                configuration: Some(webhook_configuration(&ns)),
            },
        });
        let options = ControllerOptions {
            settings: ChildSettings {
                proxy_image: std::env::var("PULLTHROUGH_E2E_PROXY_IMAGE")
                    .unwrap_or_else(|_| "pullthrough:e2e".into()),
                image_pull_policy: Some("IfNotPresent".into()),
            },
            metrics_listen: format!("127.0.0.1:{port}").parse().unwrap(),
            lease_namespace: lease_ns.clone(),
            identity: format!("e2e-{test}"),
            namespace: Some(ns.clone()),
            webhook,
        };
        let controller_client = match shipped_rbac {
            false => client.clone(),
            true => controller_as_shipped(&client, &ns, &lease_ns).await,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let controller = tokio::spawn(run(controller_client, options, async {
            let _ = stopped.await;
        }));
        Env {
            mirrors: Api::namespaced(client.clone(), &ns),
            client,
            ns,
            metrics_url: format!("http://127.0.0.1:{port}"),
            stop: Some(stop),
            controller: Some(controller),
            webhook_port,
        }
    }

    /// A mirror of this namespace from YAML (the spec; registries as given).
    pub async fn create(&self, name: &str, spec: &str) -> RegistryMirror {
        let mut m: RegistryMirror = serde_yaml::from_str(&format!(
            "apiVersion: pullthrough.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {{name: {name}}}\nspec:\n{spec}"
        ))
        .unwrap();
        m.metadata.namespace = Some(self.ns.clone());
        self.mirrors
            .create(&PostParams::default(), &m)
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"))
    }

    /// Waits until the controller has written a status for the mirror's generation that
    /// satisfies `check`.
    pub async fn status_where(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        check: impl Fn(&RegistryMirror) -> bool,
    ) -> RegistryMirror {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.mirrors.get(name).await.ok();
            if let Some(m) = &m
                && let Some(st) = &m.status
                && st.observed_generation == m.metadata.generation
                && check(m)
            {
                return m.clone();
            }
            if Instant::now() >= deadline {
                let last = m.and_then(|m| m.status).map(|s| {
                    let conds: Vec<String> = s
                        .conditions
                        .iter()
                        .map(|c| format!("{}={} {}", c.type_, c.status, c.reason))
                        .collect();
                    format!(
                        "nodes {:?}, served {:?}, {}",
                        s.nodes,
                        s.served_registries,
                        conds.join(", ")
                    )
                });
                panic!(
                    "timed out after {secs} s waiting for {name}: {what}; last status: {last:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn gone(&self, name: &str) {
        self.mirrors
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        eventually(60, &format!("{name} to be gone"), || async {
            matches!(self.mirrors.get_opt(name).await, Ok(None)).then_some(())
        })
        .await;
    }

    /// Waits for the Secret `name` the controller makes for mirror `owner`, and checks
    /// it: owned by the mirror, `key` holding 32 random bytes as hex.
    pub async fn random_secret(&self, name: &str, owner: &str, key: &str) {
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.ns);
        let secret = eventually(30, &format!("the Secret {name}"), || {
            let secrets = secrets.clone();
            async move { secrets.get_opt(name).await.ok().flatten() }
        })
        .await;
        let by = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (by.kind.as_str(), by.name.as_str()),
            ("RegistryMirror", owner)
        );
        assert_eq!(secret.data.unwrap()[key].0.len(), 64);
    }

    /// The node's name, when the cluster has a node and `PULLTHROUGH_E2E_PROXY_IMAGE`
    /// names an image of this build it has: proxy pods can run.
    pub async fn node_for_pods(&self) -> Option<String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let Some(node) = nodes.list(&Default::default()).await.unwrap().items.pop() else {
            eprintln!("no node in the cluster: the proxy pod part is not run");
            return None;
        };
        if std::env::var("PULLTHROUGH_E2E_PROXY_IMAGE").is_err() {
            eprintln!("PULLTHROUGH_E2E_PROXY_IMAGE unset: the proxy pod part is not run");
            return None;
        }
        Some(node.name_any())
    }

    /// Puts mirror `name`'s proxy pods on the host's network: the kit has no pod network.
    /// A test-only patch (its own field manager, a field the controller does not set).
    /// The pods then hold the proxy's fixed ports on the host, so this waits its turn
    /// (the guard) and until an earlier test's pods have let go of them.
    pub async fn on_host_network(&self, name: &str) -> tokio::sync::MutexGuard<'static, ()> {
        static HOST_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let guard = HOST_PORTS.lock().await;
        eventually(120, "the host's proxy ports to be free", || async {
            [PROXY_PORT, METRICS_PORT]
                .iter()
                .all(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
                .then_some(())
        })
        .await;
        let deployments = Api::<Deployment>::namespaced(self.client.clone(), &self.ns);
        let deployment = format!("pullthrough-{name}");
        eventually(60, "the Deployment", || async {
            deployments.get_opt(&deployment).await.ok()?
        })
        .await;
        let host_network = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": deployment},
            "spec": {"template": {"spec": {"hostNetwork": true}}}
        });
        deployments
            .patch(
                &deployment,
                &PatchParams::apply("pullthrough-e2e-hostnet").force(),
                &Patch::Apply(&host_network),
            )
            .await
            .unwrap();
        guard
    }

    /// Mirror `name` from `spec` (as [`Self::create`]), its proxy pods on the host's
    /// network (see [`Self::on_host_network`], whose guard this holds), once Ready.
    pub async fn create_on_host(
        &self,
        name: &str,
        spec: &str,
    ) -> (RegistryMirror, tokio::sync::MutexGuard<'static, ()>) {
        self.create(name, spec).await;
        let host = self.on_host_network(name).await;
        let m = self
            .status_where(name, 180, "Ready", |m| {
                cond(m, "Ready").is_some_and(|c| c.0 == "True")
            })
            .await;
        (m, host)
    }

    /// A registry name of this test's own.
    pub fn registry(&self, which: &str) -> String {
        format!("{which}.{}.e2e.test", self.ns)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.controller.take() {
            task.abort();
        }
        // Async cleanup, on a runtime of its own: this may run while a failed test
        // unwinds.
        let ns = self.ns.clone();
        let path = kubeconfig_path();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = client_from(&path).await;
                let mirrors: Api<RegistryMirror> = Api::namespaced(client.clone(), &ns);
                if let Ok(list) = mirrors.list(&Default::default()).await {
                    for m in list {
                        let rest: Vec<String> = m
                            .finalizers()
                            .iter()
                            .filter(|f| *f != FINALIZER)
                            .cloned()
                            .collect();
                        let patch = serde_json::json!({"metadata": {"finalizers": rest}});
                        let _ = mirrors
                            .patch(
                                &m.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(&patch),
                            )
                            .await;
                    }
                }
                let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
                    .delete(&webhook_configuration(&ns), &DeleteParams::background())
                    .await;
                let name = shipped_rbac_name(&ns);
                let _ = Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&name, &DeleteParams::background())
                    .await;
                let _ = Api::<ClusterRole>::all(client.clone())
                    .delete(&name, &DeleteParams::background())
                    .await;
                let namespaces = Api::<Namespace>::all(client);
                let _ = namespaces
                    .delete(&format!("{ns}-system"), &DeleteParams::background())
                    .await;
                let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
            });
        })
        .join();
    }
}

/// Name of the MutatingWebhookConfiguration of the test of namespace `ns`.
pub fn webhook_configuration(ns: &str) -> String {
    format!("pullthrough-{ns}")
}

/// Name of the cluster-scoped copies of the shipped RBAC for the namespace `ns`.
pub fn shipped_rbac_name(ns: &str) -> String {
    format!("e2e-{ns}")
}

/// A client acting as the service account `pullthrough-controller` of `ns`, made here and
/// bound to copies of the controller's ClusterRole and leader-election Role (in
/// `lease_ns`) exactly as deploy/02-rbac.yaml ships them.
pub async fn controller_as_shipped(admin: &Client, ns: &str, lease_ns: &str) -> Client {
    let docs = documents(&root().join("deploy/02-rbac.yaml"));
    let rules = |kind: &str, name: &str| {
        let doc = docs
            .iter()
            .find(|d| d.types.as_ref().is_some_and(|t| t.kind == kind) && d.name_any() == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/02-rbac.yaml"));
        doc.data["rules"].clone()
    };
    let name = shipped_rbac_name(ns);
    let sa = "pullthrough-controller";
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": sa, "namespace": ns}]);
    let create = |api: Api<DynamicObject>, obj: serde_json::Value| async move {
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        api.create(&PostParams::default(), &obj).await.unwrap();
    };
    let ar = |kind: &str| {
        let (group, version) = match kind {
            "ServiceAccount" => ("", "v1"),
            _ => ("rbac.authorization.k8s.io", "v1"),
        };
        kube::discovery::ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
    };
    create(
        Api::namespaced_with(admin.clone(), ns, &ar("ServiceAccount")),
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}),
    )
    .await;
    create(
        Api::all_with(admin.clone(), &ar("ClusterRole")),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": rules("ClusterRole", "pullthrough-controller")}),
    )
    .await;
    create(
        Api::all_with(admin.clone(), &ar("ClusterRoleBinding")),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name}, "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}}),
    )
    .await;
    create(
        Api::namespaced_with(admin.clone(), lease_ns, &ar("Role")),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "leader-election"},
            "rules": rules("Role", "pullthrough-leader-election")}),
    )
    .await;
    create(
        Api::namespaced_with(admin.clone(), lease_ns, &ar("RoleBinding")),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "leader-election"}, "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leader-election"}}),
    )
    .await;
    let mut config = config_from(&kubeconfig_path()).await;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{sa}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    Client::try_from(config).expect("client")
}

/// Whether the API server lets the service account `sa` of `ns` `verb` the Lease `name`.
pub async fn may_lease(client: &Client, ns: &str, sa: &str, verb: &str, name: &str) -> bool {
    let what = serde_json::json!({"namespace": ns, "group": "coordination.k8s.io",
        "resource": "leases", "verb": verb, "name": name});
    may(client, ns, sa, what).await
}

/// Whether the API server lets the service account `sa` of `ns` do `what` (a
/// SubjectAccessReview's resourceAttributes).
pub async fn may(client: &Client, ns: &str, sa: &str, what: serde_json::Value) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {
            "user": format!("system:serviceaccount:{ns}:{sa}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")],
            "resourceAttributes": what,
        }
    }))
    .unwrap();
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.unwrap();
    answer.status.is_some_and(|s| s.allowed)
}

/// Every document of a YAML file.
pub fn documents(path: &std::path::Path) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap();
            (!v.is_null()).then(|| serde_yaml::from_value(v).unwrap())
        })
        .collect()
}

/// Gives the node an InternalIP when it has none. The kit's kubelet refuses
/// `--node-ip 127.0.0.1`, so its node has no address, its host-network pods no IP, and
/// nothing could reach a replica at its pod IP as the controller does. A test-only
/// patch of the node's status gives it the address a real node has; the kubelet keeps
/// it (it only logs that it cannot set one). A node with an address is left alone.
pub async fn give_node_an_address(client: &Client, node: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = nodes.get_status(node).await.unwrap().status;
    let addresses = status.and_then(|s| s.addresses).unwrap_or_default();
    if addresses.iter().any(|a| a.type_ == "InternalIP") {
        return;
    }
    let patch = serde_json::json!({"status": {"addresses": [
        {"type": "InternalIP", "address": "127.0.0.1"},
        {"type": "Hostname", "address": node},
    ]}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Waits for an Event on mirror `mirror` whose note starts with `note`.
pub async fn event_on(env: &Env, mirror: &str, note: &str, secs: u64) -> String {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(secs, &format!("an Event '{note}...'"), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(mirror))
            .filter_map(|e| e.note)
            .find(|n| n.starts_with(note))
    })
    .await
}

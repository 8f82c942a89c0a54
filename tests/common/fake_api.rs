//! A fake Kubernetes API server for the controller's tests (kube-rs/controller-rs's
//! tower-test pattern): every request the controller sends is recorded and answered from
//! what the scenario's [`World`] holds.

use http_body_util::BodyExt;
use hyper::{Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use pullthrough::api::mirror::{FINALIZER, RegistryMirror, RegistryMirrorSpec};
use pullthrough::controller::Context;
use pullthrough::controller::builders::ChildSettings;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

pub const NS: &str = "pullthrough-system";
/// The admin token of the proxies of these tests (as long as a real one must be).
pub const ADMIN_TOKEN: &str = "the admin token of the test proxies, 32+ bytes";

#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// What the fake API server holds for one scenario.
#[derive(Clone, Default)]
pub struct World {
    pub secret: Option<Value>,
    /// Secrets by name, before `secret` (which answers for any name).
    pub named: Vec<(String, Value)>,
    pub nodes: Vec<Value>,
    pub ready_replicas: i64,
    pub service_monitor_crd: bool,
    pub fail_configmap: bool,
    /// Pods, for every pod list.
    pub pods: Vec<Value>,
    /// Where the controller asks proxies for prefetches.
    pub ops_port: Option<u16>,
}

pub fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not found"}),
    )
}

pub fn answer(world: &World, call: &Call) -> (u16, Value) {
    let p = call.path.as_str();
    let m = call.method.as_str();
    let mut echo = call.body.clone();
    if echo.is_object() {
        echo["metadata"]["resourceVersion"] = json!("2");
    }
    match m {
        "GET" if p.contains("/secrets/") => {
            let name = p.rsplit('/').next().unwrap();
            match world.named.iter().find(|(n, _)| n == name) {
                Some((_, s)) => (200, s.clone()),
                None => match &world.secret {
                    Some(s) => (200, s.clone()),
                    None => not_found(),
                },
            }
        }
        "POST" if p.ends_with("/secrets") => (201, echo),
        "GET"
            if p.ends_with("/customresourcedefinitions/servicemonitors.monitoring.coreos.com") =>
        {
            if world.service_monitor_crd {
                (
                    200,
                    json!({"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition",
                    "metadata":{"name":"servicemonitors.monitoring.coreos.com"},
                    "spec":{"group":"monitoring.coreos.com","names":{"kind":"ServiceMonitor","plural":"servicemonitors"},
                        "scope":"Namespaced","versions":[]}}),
                )
            } else {
                not_found()
            }
        }
        "GET" if p.ends_with("/pods") => (
            200,
            json!({"apiVersion":"v1","kind":"PodList","metadata":{},"items":world.pods}),
        ),
        "GET" if p == "/api/v1/nodes" => (
            200,
            json!({"apiVersion":"v1","kind":"NodeList","metadata":{},"items":world.nodes}),
        ),
        "DELETE" => not_found(),
        "PATCH" if p.contains("/configmaps/") && world.fail_configmap => (
            500,
            json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"InternalError","code":500,"message":"etcd is sad"}),
        ),
        "PATCH" if p.contains("/deployments/") || p.contains("/statefulsets/") => {
            echo["status"] = json!({"readyReplicas": world.ready_replicas, "updatedReplicas": world.ready_replicas});
            (200, echo)
        }
        "PATCH" if p.contains("/services/") => {
            echo["spec"]["clusterIP"] = json!("10.96.0.10");
            (200, echo)
        }
        "PATCH" if p.contains("/registrymirrors/") => {
            // Merge patches of a mirror: answer with a plausible whole object.
            (
                200,
                json!({"apiVersion":"pullthrough.dev/v1alpha1","kind":"RegistryMirror",
                "metadata":{"name":"public","namespace":NS,"uid":"u-1","resourceVersion":"3"},
                "spec":{"upstreams":[{"registry":"docker.io"}]}}),
            )
        }
        "PATCH" => (200, echo),
        "POST" if p.ends_with("/events") => (201, echo),
        _ => panic!("unexpected request {m} {p}"),
    }
}

pub struct Fake {
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub ctx: Arc<Context>,
    pub writer: Writer<RegistryMirror>,
}

pub fn fake(world: World) -> Fake {
    let world_ops_port = world.ops_port;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let call = Call {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or("").to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, value) = answer(&world, &call);
            log.lock().unwrap().push(call);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = Client::new(service, NS);
    let (store, writer) = reflector::store::<RegistryMirror>();
    let settings = ChildSettings {
        proxy_image: "example.org/pullthrough:test".into(),
        image_pull_policy: None,
    };
    let reporter = Reporter {
        controller: "pullthrough-controller".into(),
        instance: Some("test".into()),
    };
    let mut ctx = Context::new(client, settings, store, reporter);
    if let Some(port) = world_ops_port {
        ctx.ops_port = port;
    }
    let ctx = Arc::new(ctx);
    Fake { calls, ctx, writer }
}

impl Fake {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    pub fn summary(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|c| {
                let kind = c.path.rsplit('/').nth(1).unwrap_or("");
                let last = c.path.rsplit('/').next().unwrap_or("");
                if last == "status" || last == "events" || last == "nodes" {
                    format!("{} {last}", c.method)
                } else {
                    format!("{} {kind}", c.method)
                }
            })
            .collect()
    }
    pub fn find(&self, method: &str, path_part: &str) -> Call {
        self.calls()
            .into_iter()
            .find(|c| c.method == method && c.path.contains(path_part))
            .unwrap_or_else(|| panic!("no {method} {path_part} in {:?}", self.summary()))
    }
    pub fn add_to_store(&mut self, m: &RegistryMirror) {
        self.writer
            .apply_watcher_event(&watcher::Event::Apply(m.clone()));
    }
}

pub fn mirror(name: &str, created: i64, yaml: &str, finalized: bool) -> RegistryMirror {
    let spec: RegistryMirrorSpec = serde_yaml::from_str(yaml).unwrap();
    let mut m = RegistryMirror::new(name, spec);
    m.metadata.namespace = Some(NS.into());
    m.metadata.uid = Some(format!("uid-{name}"));
    m.metadata.generation = Some(1);
    m.metadata.resource_version = Some("1".into());
    m.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
    if finalized {
        m.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    m
}

pub fn node(name: &str, annotation: Option<&str>) -> Value {
    let mut n = json!({"apiVersion":"v1","kind":"Node","metadata":{"name":name,"labels":{"kubernetes.io/hostname":name}}});
    if let Some(a) = annotation {
        n["metadata"]["annotations"] = json!({"pullthrough.dev/mirrors": a});
    }
    n
}

pub fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

pub fn base64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A node of linux/amd64, as its kubelet reports it.
pub fn amd64_node(name: &str) -> Value {
    let mut n = node(name, None);
    n["status"] = json!({"nodeInfo": {
        "architecture": "amd64", "operatingSystem": "linux", "bootID": "b", "containerRuntimeVersion": "containerd://1.6",
        "kernelVersion": "6.1", "kubeProxyVersion": "", "kubeletVersion": "v1.32.6", "machineID": "m",
        "osImage": "Debian GNU/Linux 12", "systemUUID": "u"}});
    n
}

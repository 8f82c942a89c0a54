//! The node agent's Kubernetes side against a mocked API server: it lists and watches
//! RegistryMirrors and its Node, writes the files, and reports in the Node annotation.

use http_body_util::BodyExt;
use hyper::{Request, Response};
use kube::Client;
use kube::client::Body;
use pullthrough::node_agent::{AgentOptions, ContainersOptions, WriteContainers, run};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ready_mirror(endpoint: &str) -> Value {
    json!({
        "apiVersion": "pullthrough.dev/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": "public", "namespace": "ns", "uid": "u1", "resourceVersion": "5",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"upstreams": [{"registry": "docker.io"}, {"registry": "ghcr.io"}],
                 "nodes": {"configure": true, "selector": {"pool": "a"}}},
        "status": {"endpoint": endpoint, "readyReplicas": 1, "conditions": [
            {"type": "Ready", "status": "True", "reason": "ProxyReady", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    })
}

/// An agent for node `n1` (`node`: its JSON) against a mocked API server that lists
/// [`ready_mirror`]; the first annotation patch it sends, and its temp directory (the
/// containerd certs.d under `certs.d`, the containers configuration under `containers`).
async fn first_patch(node: Value, write: WriteContainers) -> (Value, tempfile::TempDir) {
    let mirror = ready_mirror("http://10.96.0.10:5000");
    let (patches, dir) = agent_patches(node, mirror, write, None, |p| !p.is_empty()).await;
    (patches[0].clone(), dir)
}

/// The annotation patches an agent (asking mirrors every `probe`, if given) sends until
/// `enough` says so (bounded), with `mirror` listed.
async fn agent_patches(
    node: Value,
    mirror: Value,
    write: WriteContainers,
    probe: Option<Duration>,
    enough: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, tempfile::TempDir) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let patches: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let seen = patches.clone();
    tokio::spawn(async move {
        // Watch requests are never answered: the agent then waits, as on a quiet cluster.
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let query = parts.uri.query().unwrap_or("").to_string();
            if query.contains("watch=true") {
                held.push(send);
                continue;
            }
            let bytes = body.collect().await.unwrap().to_bytes();
            let path = parts.uri.path();
            let value = match (parts.method.as_str(), path) {
                ("GET", "/apis/pullthrough.dev/v1alpha1/registrymirrors") => json!({
                    "apiVersion": "pullthrough.dev/v1alpha1", "kind": "RegistryMirrorList",
                    "metadata": {"resourceVersion": "10"}, "items": [mirror.clone()]}),
                ("GET", "/api/v1/nodes") => {
                    assert!(
                        query.contains("fieldSelector=metadata.name%3Dn1"),
                        "{query}"
                    );
                    json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "10"},
                        "items": [node.clone()]})
                }
                ("PATCH", "/api/v1/nodes/n1") => {
                    let patch: Value = serde_json::from_slice(&bytes).unwrap();
                    seen.lock().unwrap().push(patch);
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
                }
                (m, p) => panic!("unexpected {m} {p}?{query}"),
            };
            send.send_response(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = Client::new(service, "default");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n", certs.display()),
    )
    .unwrap();
    let options = AgentOptions {
        certs_dir: certs.clone(),
        containerd_certs_path: certs.display().to_string(),
        containerd_config: config,
        containers: ContainersOptions::under(&dir.path().join("containers"), write),
        probe,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run(
        client,
        options,
        "n1".into(),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(3600),
        async {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !enough(&patches.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the agent never annotated its node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = patches.lock().unwrap().clone();
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    (seen, dir)
}

fn node(runtime: Option<&str>) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "resourceVersion": "3", "labels": {"pool": "a"}}});
    if let Some(r) = runtime {
        n["status"] = json!({"nodeInfo": {"containerRuntimeVersion": r, "machineID": "", "systemUUID": "",
            "bootID": "", "kernelVersion": "", "osImage": "", "kubeletVersion": "", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64"}});
    }
    n
}

#[tokio::test]
async fn agent_writes_files_for_ready_mirrors_and_annotates_its_node() {
    let (patch, dir) = first_patch(node(Some("containerd://1.7.13")), WriteContainers::Auto).await;
    let annotations = &patch["metadata"]["annotations"];
    assert_eq!(annotations["pullthrough.dev/mirrors"], "ns/public");
    assert_eq!(
        annotations["pullthrough.dev/containerd-config-path"],
        "enabled"
    );
    assert_eq!(
        annotations["pullthrough.dev/runtime"],
        "containerd://1.7.13: hosts.toml"
    );
    assert_eq!(
        annotations["pullthrough.dev/registries-conf"],
        "not-written"
    );
    let certs = dir.path().join("certs.d");
    for registry in ["docker.io", "ghcr.io"] {
        let file = std::fs::read_to_string(certs.join(registry).join("hosts.toml")).unwrap();
        assert!(file.contains("[host.\"http://10.96.0.10:5000\"]"), "{file}");
    }
    assert!(
        std::fs::read_to_string(certs.join("docker.io/hosts.toml"))
            .unwrap()
            .contains("server = \"https://registry-1.docker.io\"")
    );
    assert!(!dir.path().join("containers").exists());
}

/// On a CRI-O node the drop-in is written, and the mirror counts as configured by it; a
/// process named crio that the agent can see is told to read it (SIGHUP).
#[tokio::test]
async fn on_a_cri_o_node_the_agent_writes_the_drop_in_and_signals_crio() {
    // A stand-in for CRI-O: `sleep` under the name crio, which a SIGHUP ends. Started
    // through `env --default-signal`, since a runner under nohup would have it ignore
    // SIGHUP, and known to be running as crio before the agent looks.
    let bin = tempfile::tempdir().unwrap();
    let crio = bin.path().join("crio");
    std::fs::copy("/bin/sleep", &crio).unwrap();
    let mut stand_in = Reaped(
        std::process::Command::new("env")
            .arg("--default-signal=HUP")
            .arg(&crio)
            .arg("600")
            .spawn()
            .unwrap(),
    );
    let comm = format!("/proc/{}/comm", stand_in.0.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&comm).unwrap().trim_end() != "crio" {
        assert!(Instant::now() < deadline, "the stand-in never ran as crio");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (patch, dir) = first_patch(node(Some("cri-o://1.29.1")), WriteContainers::Auto).await;
    let annotations = &patch["metadata"]["annotations"];
    assert_eq!(annotations["pullthrough.dev/mirrors"], "ns/public");
    assert_eq!(
        annotations["pullthrough.dev/runtime"],
        "cri-o://1.29.1: hosts.toml, registries.conf.d"
    );
    assert_eq!(annotations["pullthrough.dev/registries-conf"], "in-place");
    let drop_in = dir
        .path()
        .join("containers/registries.conf.d/50-pullthrough.conf");
    let text = std::fs::read_to_string(&drop_in).unwrap();
    assert!(
        text.contains("location = \"10.96.0.10:5000/ghcr.io\""),
        "{text}"
    );
    // Signalled before the patch was sent: it ends at once (waited for, bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = stand_in.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the stand-in was never signalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(1),
        "the stand-in got SIGHUP: {status:?}"
    );
}

/// A child process killed if the test ends before it does.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mirror that does not answer from the node (its port is held but never accepted
/// from: connections wait in the queue, unanswered) is listed after one failed probe,
/// and left out after the second: its files go, the Node no longer lists it.
#[tokio::test]
async fn a_mirror_that_does_not_answer_is_left_out_of_the_node() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    let mirrors = |p: &Value| p["metadata"]["annotations"]["pullthrough.dev/mirrors"].clone();
    let (patches, dir) = agent_patches(
        node(Some("containerd://1.7.13")),
        ready_mirror(&dead),
        WriteContainers::Auto,
        Some(Duration::from_millis(100)),
        |p| p.iter().any(|p| mirrors(p).is_null()),
    )
    .await;
    assert_eq!(mirrors(&patches[0]), "ns/public", "one failure is a blip");
    assert!(!dir.path().join("certs.d/docker.io/hosts.toml").exists());
    drop(listener);
}

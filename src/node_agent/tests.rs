//! The agent's decisions: which files a node gets, which mirrors count as configured,
//! when a mirror is left out, when CRI-O is owed a signal.

use super::desired::{PROBES_TO_LEAVE_OUT, answering};
use super::registries_conf::sync_drop_in;
use super::*;
use crate::api::mirror::{RegistryMirrorSpec, RegistryMirrorStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeSet;

fn mirror(
    name: &str,
    created: i64,
    yaml: &str,
    ready: bool,
    endpoint: Option<&str>,
) -> Arc<RegistryMirror> {
    let spec: RegistryMirrorSpec = serde_yaml::from_str(yaml).unwrap();
    let mut m = RegistryMirror::new(name, spec);
    m.metadata.namespace = Some("ns".into());
    m.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
    m.status = Some(RegistryMirrorStatus {
        endpoint: endpoint.map(str::to_string),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::from_second(1).unwrap()),
        }],
        ..RegistryMirrorStatus::default()
    });
    Arc::new(m)
}

#[test]
fn only_ready_selecting_mirrors_with_an_endpoint_are_configured() {
    let labels = BTreeMap::from([("pool".to_string(), "a".to_string())]);
    let mirrors = vec![
        mirror(
            "public",
            10,
            "upstreams: [{registry: docker.io}, {registry: ghcr.io, url: https://ghcr.example}]",
            true,
            Some("http://10.0.0.1:5000"),
        ),
        mirror(
            "notready",
            5,
            "upstreams: [{registry: quay.io}]",
            false,
            Some("http://10.0.0.2:5000"),
        ),
        mirror(
            "noendpoint",
            5,
            "upstreams: [{registry: quay.io}]",
            true,
            None,
        ),
        mirror(
            "otherpool",
            5,
            "upstreams: [{registry: registry.k8s.io}]\nnodes: {selector: {pool: b}}",
            true,
            Some("http://10.0.0.3:5000"),
        ),
        mirror(
            "optout",
            5,
            "upstreams: [{registry: gcr.io}]\nnodes: {configure: false}",
            true,
            Some("http://10.0.0.4:5000"),
        ),
    ];
    let d = desired_hosts(&labels, &mirrors);
    assert_eq!(d.keys().collect::<Vec<_>>(), vec!["docker.io", "ghcr.io"]);
    assert_eq!(d["docker.io"].server, "https://registry-1.docker.io");
    assert_eq!(d["ghcr.io"].server, "https://ghcr.example");
    assert_eq!(d["docker.io"].endpoint, "http://10.0.0.1:5000");
    assert_eq!(d["docker.io"].mirror, "ns/public");
}

#[test]
fn the_older_mirror_wins_a_registry_and_deleted_mirrors_let_go() {
    let labels = BTreeMap::new();
    let old = mirror(
        "old",
        10,
        "upstreams: [{registry: docker.io}]",
        true,
        Some("http://10.0.0.1:5000"),
    );
    let young = mirror(
        "young",
        20,
        "upstreams: [{registry: index.docker.io}, {registry: quay.io}]",
        true,
        Some("http://10.0.0.2:5000"),
    );
    let d = desired_hosts(&labels, &[young.clone(), old.clone()]);
    assert_eq!(d["docker.io"].mirror, "ns/old");
    assert_eq!(d["quay.io"].mirror, "ns/young");
    let mut deleting = (*old).clone();
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(30).unwrap()));
    let d = desired_hosts(&labels, &[young, Arc::new(deleting)]);
    assert_eq!(d["docker.io"].mirror, "ns/young");
}

#[test]
fn only_the_registries_the_controller_says_a_mirror_serves_are_configured() {
    // The older mirror is Ready but the controller gave quay.io to another one (say
    // this one lost it while an even older mirror was fixed): nodes follow the status.
    let mut partial = (*mirror(
        "partial",
        10,
        "upstreams: [{registry: docker.io}, {registry: quay.io}]",
        true,
        Some("http://10.0.0.1:5000"),
    ))
    .clone();
    partial.status.as_mut().unwrap().served_registries = vec!["docker.io".into()];
    let other = mirror(
        "other",
        20,
        "upstreams: [{registry: quay.io}]",
        true,
        Some("http://10.0.0.2:5000"),
    );
    let d = desired_hosts(&BTreeMap::new(), &[Arc::new(partial), other]);
    assert_eq!(d["docker.io"].mirror, "ns/partial");
    assert_eq!(d["quay.io"].mirror, "ns/other");
}

#[tokio::test]
async fn a_mirror_is_left_out_after_two_failed_probes_and_back_after_one_answer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A mirror that answers 503 until `up`, then 200.
    let up = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = up.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let status = if serving.load(Ordering::SeqCst) {
                "200 OK"
            } else {
                "503 Unavailable"
            };
            let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\n{{}}");
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let host = DesiredHost {
        mirror: "ns/a".into(),
        server: "https://quay.io".into(),
        endpoint: endpoint.clone(),
        ca: None,
        skip_verify: false,
    };
    let desired = BTreeMap::from([("quay.io".to_string(), host)]);
    let mut failures = BTreeMap::new();
    // One failure is a blip, two leave the mirror out.
    let kept = answering(desired.clone(), &mut failures, PROBES_TO_LEAVE_OUT).await;
    assert_eq!(kept.len(), 1);
    let kept = answering(desired.clone(), &mut failures, PROBES_TO_LEAVE_OUT).await;
    assert!(kept.is_empty());
    assert_eq!(failures[&endpoint], 2);
    // It answers again: back at once.
    up.store(true, Ordering::SeqCst);
    let kept = answering(desired.clone(), &mut failures, PROBES_TO_LEAVE_OUT).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(failures[&endpoint], 0);
    // Endpoints no mirror names any more are forgotten.
    answering(BTreeMap::new(), &mut failures, PROBES_TO_LEAVE_OUT).await;
    assert!(failures.is_empty());
}

#[test]
fn a_signal_crio_did_not_get_is_owed_until_it_can_be_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ContainersOptions::under(dir.path(), WriteContainers::Always);
    // A procfs without any process: CRI-O is not visible (no hostPID).
    options.proc_dir = dir.path().join("proc");
    std::fs::create_dir_all(&options.proc_dir).unwrap();
    let desired = BTreeMap::from([(
        "docker.io".to_string(),
        DesiredHost {
            mirror: "ns/a".into(),
            server: "https://registry-1.docker.io".into(),
            endpoint: "http://10.0.0.1:5000".into(),
            ca: None,
            skip_verify: false,
        },
    )]);
    let mut owed = false;
    let (report, state) = sync_drop_in(&options, true, &desired, Some(true), &mut owed);
    assert_eq!(report.written, ["docker.io"]);
    assert!(matches!(state, DropInState::CrioNotReloaded(_)) && owed);
    assert_eq!(state.state(), "crio-not-reloaded");
    // Unchanged since, but still owed.
    let (report, state) = sync_drop_in(&options, true, &desired, Some(true), &mut owed);
    assert_eq!(report.unchanged, ["docker.io"]);
    assert!(matches!(state, DropInState::CrioNotReloaded(_)) && owed);
    // Not a CRI-O node: nothing is owed; a node configured by hand: none seen, none owed.
    let mut owed = false;
    let none = BTreeMap::new();
    let (report, state) = sync_drop_in(&options, false, &none, Some(false), &mut owed);
    assert_eq!(
        (report.removed, state, owed),
        (vec!["docker.io".into()], DropInState::NotWritten, false)
    );
    let (_, state) = sync_drop_in(&options, true, &desired, None, &mut owed);
    assert_eq!((state, owed), (DropInState::InPlace, false));
}

#[test]
fn a_mirror_counts_as_configured_only_when_all_its_files_are_in_place() {
    let host = |m: &str| DesiredHost {
        mirror: m.into(),
        server: "s".into(),
        endpoint: "e".into(),
        ca: None,
        skip_verify: false,
    };
    let desired = BTreeMap::from([
        ("docker.io".to_string(), host("ns/a")),
        ("ghcr.io".to_string(), host("ns/a")),
        ("quay.io".to_string(), host("ns/b")),
    ]);
    let report = SyncReport {
        written: vec!["docker.io".into()],
        unchanged: vec!["quay.io".into()],
        unmanaged: vec!["ghcr.io".into()],
        ..SyncReport::default()
    };
    assert_eq!(
        configured_mirrors(&desired, &report),
        BTreeSet::from(["ns/b".to_string()])
    );
}

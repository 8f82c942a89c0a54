//! Leader election against a mocked API server that keeps one Lease with real
//! resourceVersion semantics (a write based on a stale read gets 409).

use http_body_util::BodyExt;
use hyper::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use kube::client::Body;
use kube::{Api, Client};
use pullthrough::lease::LeaseLock;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fake API server holding at most one Lease.
fn lease_server() -> (Client, Arc<Mutex<Option<Value>>>) {
    let (client, lease, _) = lease_server_with_outage();
    (client, lease)
}

/// The same, and how many of the next requests fail with 503 (an API server out of
/// reach, as its clients see it).
fn lease_server_with_outage() -> (Client, Arc<Mutex<Option<Value>>>, Arc<AtomicUsize>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let lease: Arc<Mutex<Option<Value>>> = Arc::new(Mutex::new(None));
    let outage = Arc::new(AtomicUsize::new(0));
    let failing = outage.clone();
    let state = lease.clone();
    tokio::spawn(async move {
        let mut version = 0u64;
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let status = |code: u16, reason: &str| {
                (
                    code,
                    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":reason,"code":code}),
                )
            };
            let down = failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let (code, value) = if down {
                status(503, "ServiceUnavailable")
            } else {
                let mut current = state.lock().unwrap();
                match parts.method.as_str() {
                    "GET" => match &*current {
                        Some(l) => (200, l.clone()),
                        None => status(404, "NotFound"),
                    },
                    "POST" if current.is_some() => status(409, "AlreadyExists"),
                    "POST" | "PUT" => {
                        let mut obj: Value = serde_json::from_slice(&bytes).unwrap();
                        let stale = parts.method == "PUT"
                            && obj["metadata"]["resourceVersion"]
                                != current
                                    .as_ref()
                                    .map(|c| c["metadata"]["resourceVersion"].clone())
                                    .unwrap_or(Value::Null);
                        if stale {
                            status(409, "Conflict")
                        } else {
                            version += 1;
                            obj["metadata"]["resourceVersion"] = json!(version.to_string());
                            *current = Some(obj.clone());
                            (if parts.method == "POST" { 201 } else { 200 }, obj)
                        }
                    }
                    m => panic!("unexpected {m}"),
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, "ns"), lease, outage)
}

#[tokio::test]
async fn only_one_replica_leads_and_the_other_takes_over_on_release() {
    let (client, lease) = lease_server();
    let api = || Api::<Lease>::namespaced(client.clone(), "ns");
    let a = LeaseLock::new(
        api(),
        "pullthrough-controller",
        "pod-a",
        Duration::from_secs(15),
    );
    let b = LeaseLock::new(
        api(),
        "pullthrough-controller",
        "pod-b",
        Duration::from_secs(15),
    );

    assert!(a.try_acquire().await.unwrap());
    assert!(
        !b.try_acquire().await.unwrap(),
        "the Lease is held and fresh"
    );
    assert!(a.try_acquire().await.unwrap(), "the holder renews");
    assert!(!b.try_acquire().await.unwrap());
    let held = lease.lock().unwrap().clone().unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "pod-a");
    assert_eq!(held["spec"]["leaseDurationSeconds"], 15);

    // Both race for the same round: exactly one write wins.
    a.release().await;
    let (ra, rb) = tokio::join!(a.try_acquire(), b.try_acquire());
    let winners = [ra.unwrap(), rb.unwrap()].iter().filter(|w| **w).count();
    assert_eq!(winners, 1, "never two leaders");

    // A holder that stops renewing loses the Lease once it expires.
    let expired = {
        let mut l = lease.lock().unwrap();
        let obj = l.as_mut().unwrap();
        obj["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
        obj["spec"]["holderIdentity"].as_str().unwrap().to_string()
    };
    let other = if expired == "pod-a" { &b } else { &a };
    assert!(other.try_acquire().await.unwrap());
    let now = lease.lock().unwrap().clone().unwrap();
    assert_ne!(now["spec"]["holderIdentity"], expired.as_str());
    assert!(now["spec"]["leaseTransitions"].as_i64().unwrap() >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_holder_cut_off_from_the_api_server_tries_once_more_before_giving_up() {
    let (client, _, outage) = lease_server_with_outage();
    let api = Api::<Lease>::namespaced(client, "ns");
    let lock = LeaseLock::new(
        api,
        "pullthrough-controller",
        "pod-a",
        Duration::from_secs(15),
    );
    assert!(lock.try_acquire().await.unwrap());

    // Renewals every 5 s fail for the whole 15 s of the lease; the one more try right
    // after works: the holder keeps the lease (still holding 60 s later).
    outage.store(3, Ordering::SeqCst);
    let kept = tokio::time::timeout(Duration::from_secs(60), lock.hold()).await;
    assert!(kept.is_err(), "gave the lease up though the retry worked");

    // The retry fails too: it gives the lease up.
    outage.store(4, Ordering::SeqCst);
    let lost = tokio::time::timeout(Duration::from_secs(60), lock.hold()).await;
    assert!(lost.is_ok(), "kept a lease it could not renew");
}

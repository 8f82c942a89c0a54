//! Prefetching on request (docs/proxy.md, "Prefetching on request"): the
//! operations port's `POST /admin/prefetch`, with the admin token, pulls images into the
//! cache before any client asks, from a real Distribution upstream; duplicates are not
//! fetched twice, progress is shown, and the first client pull counts the lead time.

use crate::common::*;
use std::time::Duration;

async fn ask(p: &Proxy, token: Option<&str>, body: serde_json::Value) -> reqwest::Response {
    let mut r = http()
        .post(format!("{}/admin/prefetch", p.metrics_url))
        .json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// The progress of every requested image, once none is pending or running (bounded).
async fn settled_progress(p: &Proxy, token: &str) -> Vec<serde_json::Value> {
    for _ in 0..1200 {
        let v = p.admin_get("/admin/prefetch", token).await;
        let images = v["images"].as_array().unwrap().clone();
        if images
            .iter()
            .all(|i| i["state"] == "done" || i["state"] == "failed")
        {
            return images;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("prefetch requests did not finish in 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_images_are_in_the_cache_before_a_client_asks() {
    let up = Registry::start().await;
    let (app, multi) = (
        Image::generate(91, &[40_000, 10_000], "amd64"),
        MultiArch::generate(92, &[20_000]),
    );
    push_image(&up.url, "team/app", "1.0", &app).await;
    push_multiarch(&up.url, "team/multi", "2.0", &multi).await;
    let p = Proxy::start(&[("registry.test", &up.url)]).await;
    let token = std::fs::read_to_string(p.cache_dir.join("admin-token")).unwrap();
    let images = serde_json::json!({
        "images": ["registry.test/team/app:1.0", "registry.test/team/multi:2.0"],
        "platforms": ["linux/arm64"],
    });

    // Without the token, or with an image not mirrored here: refused, nothing queued.
    assert_eq!(ask(&p, None, images.clone()).await.status(), 401);
    let r = ask(
        &p,
        Some(&token),
        serde_json::json!({"images": ["registry.test/team/app:1.0", "quay.io/x/y:1"]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let err: serde_json::Value = r.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("quay.io"), "{err}");

    let r = ask(&p, Some(&token), images.clone()).await;
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["queued"].as_array().unwrap().len(), 2, "{v}");
    let progress = settled_progress(&p, &token).await;
    assert!(
        progress.iter().all(|i| i["state"] == "done"),
        "{progress:?}"
    );
    // Asked again: known, not fetched again.
    let v: serde_json::Value = ask(&p, Some(&token), images).await.json().await.unwrap();
    assert_eq!(v["known"].as_array().unwrap().len(), 2, "{v}");

    // Every blob came from the upstream once, before any client; then a client pulls
    // the image without the upstream seeing another GET.
    p.settled().await;
    for b in app.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    // Of the multi-platform image, the platform asked for only (amd64 first, arm64
    // second in the index).
    let (amd, arm) = (&multi.images[0], &multi.images[1]);
    for b in arm.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    for b in amd.layers.iter() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 0);
    }
    let lead = || async {
        p.metric("pullthrough_prefetch_lead_seconds_count", &[])
            .await
    };
    assert_eq!(lead().await, 0.0);
    let pulled = pull(&p.url, "team/app", "1.0", Some("registry.test"))
        .await
        .unwrap();
    assert_eq!(pulled.top, app.manifest.digest);
    for b in app.blobs() {
        up.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }
    // The first pull of the image counts its lead time, once.
    assert_eq!(lead().await, 1.0);
    pull(&p.url, "team/app", "1.0", Some("registry.test"))
        .await
        .unwrap();
    assert_eq!(lead().await, 1.0);
    assert_eq!(
        p.metric("pullthrough_prefetch_images", &[("state", "done")])
            .await,
        2.0
    );
}

/// The images requested and their progress are bounded: a request that would leave
/// more than 1,024 images waiting is refused (429) whole, and finished images make room
/// for new ones, oldest first, so that `GET /admin/prefetch` never lists more than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_queue_and_its_progress_are_bounded() {
    use crate::common::fault::FaultUpstream;
    let up = FaultUpstream::start().await;
    // Nothing is fetched until released: every image waits.
    let hold = up.hold_requests("/manifests/");
    let p = Proxy::start(&[("registry.test", &up.url)]).await;
    let token = std::fs::read_to_string(p.cache_dir.join("admin-token")).unwrap();
    let batch = |from: usize| {
        let images: Vec<String> = (from..from + 256)
            .map(|i| format!("registry.test/team/img{i}:1"))
            .collect();
        serde_json::json!({ "images": images })
    };
    let listed = || async {
        p.admin_get("/admin/prefetch", &token).await["images"]
            .as_array()
            .unwrap()
            .len()
    };
    for n in 0..4 {
        assert_eq!(ask(&p, Some(&token), batch(n * 256)).await.status(), 202);
    }
    let r = ask(&p, Some(&token), batch(1024)).await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("queue is full"));
    assert_eq!(listed().await, 1024);
    // Released: each fails (the upstream has none of them), and makes room.
    drop(hold);
    for n in 4..24 {
        let progress = settled_progress(&p, &token).await;
        assert!(progress.len() <= 1024, "{} listed", progress.len());
        assert_eq!(ask(&p, Some(&token), batch(n * 256)).await.status(), 202);
    }
    assert_eq!(listed().await, 1024);
}

/// An index whose child is an index (as attestation and multi-variant images have) is
/// followed: every platform's image is fetched, blobs and all, and a platform filter
/// applies to the images at the leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_within_an_index_is_prefetched() {
    use crate::common::fault::FaultUpstream;
    let up = FaultUpstream::start().await;
    let inner = MultiArch::generate(93, &[20_000]);
    let mut inner_desc = inner.index.descriptor();
    inner_desc["mediaType"] = serde_json::json!(OCI_INDEX);
    let outer = Blob::new(
        OCI_INDEX,
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [inner_desc]
        }))
        .unwrap(),
    );
    for img in &inner.images {
        for b in img.blobs() {
            up.add_blob(b);
        }
        up.add_manifest("team/nested", &img.manifest.digest, &img.manifest);
    }
    up.add_manifest("team/nested", &inner.index.digest, &inner.index);
    up.add_manifest("team/nested", "1", &outer);
    up.add_manifest("team/nested", "2", &outer);
    let p = Proxy::start(&[("registry.test", &up.url)]).await;
    let token = std::fs::read_to_string(p.cache_dir.join("admin-token")).unwrap();
    let cached = |b: &Blob| {
        p.cache_dir
            .join("blobs/sha256")
            .join(b.digest.trim_start_matches("sha256:"))
            .exists()
    };

    let r = ask(
        &p,
        Some(&token),
        serde_json::json!({"images": ["registry.test/team/nested:1"]}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let progress = settled_progress(&p, &token).await;
    assert_eq!(progress[0]["state"], "done", "{progress:?}");
    assert_eq!(progress[0]["blobs"], 4, "{progress:?}");
    p.settled().await;
    assert!(inner.images.iter().flat_map(Image::blobs).all(cached));
    assert!(cached(&inner.index) && cached(&outer));
    // The same image under another tag, for arm64 only: only that image's blobs.
    let r = ask(
        &p,
        Some(&token),
        serde_json::json!({"images": ["registry.test/team/nested:2"], "platforms": ["linux/arm64"]}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let progress = settled_progress(&p, &token).await;
    assert_eq!(progress[1]["state"], "done", "{progress:?}");
    assert_eq!(progress[1]["blobs"], 2, "{progress:?}");
}

//! Bundles: a cache's images carried to another cache as an OCI image layout, read and
//! written by skopeo too; a cache seeded from one serves it offline; a damaged or
//! incomplete bundle is refused with nothing of it kept.

use crate::common::*;
use pullthrough::api::UpstreamMode;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// `pullthrough bundle ARGS` run to its end: its JSON summary, or its one error line
/// (checked to be one line).
pub(crate) fn bundle(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .arg("bundle")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    if out.status.success() {
        return Ok(serde_json::from_slice(&out.stdout).expect("a JSON summary"));
    }
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(
        err.starts_with("error: ") && !err.contains('\n'),
        "not one error line: {err}"
    );
    Err(err)
}

fn names(summary: &serde_json::Value) -> Vec<String> {
    summary["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Every file under `dir`, with its bytes' digest: what a cache directory holds.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(format!("{rel} {}", sha256(&std::fs::read(&p).unwrap())));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_bundle_seeds_a_cache_that_serves_it_offline_and_skopeo_reads_it() {
    let upstream = Registry::start().await;
    // Layers stream into the store on import (one over 4 MiB too); manifests and configs
    // are held until index.json says what they are.
    let multi = MultiArch::generate(71, &[300_000, 5_000_000, 2_000]);
    push_multiarch(&upstream.url, "team/app", "v1", &multi).await;
    let single = Image::generate(72, &[40_000], "amd64");
    push_image(&upstream.url, "team/tool", "2.0", &single).await;
    let host = upstream.host();
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let mut cfg = config_for(&[(host.as_str(), upstream.url.as_str())]);
    cfg.cache_dir = a_dir.clone();
    let a = Proxy::start_config(cfg.clone()).await;
    pull(&a.url, "team/app", "v1", None).await.unwrap();
    pull(&a.url, "team/tool", "2.0", None).await.unwrap();
    a.settled().await;
    a.stop().await;
    let a_files = files(&a_dir);

    // Everything, as a tar; one image, as a directory.
    let app = format!("{host}/team/app:v1");
    let tool = format!("{host}/team/tool:2.0");
    let tar = dir.path().join("all.tar");
    let a_arg = a_dir.to_str().unwrap();
    let all = bundle(&["export", "--cache-dir", a_arg, tar.to_str().unwrap()]).unwrap();
    assert_eq!(names(&all), vec![app.clone(), tool.clone()]);
    assert_eq!(all["objects"], 1 + 2 * (1 + 4) + 3);
    let layout = dir.path().join("layout");
    let one = bundle(&[
        "export",
        "--cache-dir",
        a_arg,
        "--image",
        &tool,
        layout.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(names(&one), vec![tool.clone()]);
    assert_eq!(
        files(&a_dir),
        a_files,
        "an export changes nothing in the cache"
    );
    assert!(
        bundle(&[
            "export",
            "--cache-dir",
            a_arg,
            "--image",
            &format!("{host}/team/tool:9"),
            "x"
        ])
        .unwrap_err()
        .contains("team/tool:9 is not in the cache"),
    );

    // skopeo reads both, every digest checked (it checks them; dir_blobs again).
    let out = dir.path().join("skopeo-one");
    skopeo(&[
        "copy",
        &format!("oci:{}:{tool}", layout.display()),
        &format!("dir:{}", out.display()),
    ]);
    let want: BTreeSet<String> = single.blobs().map(|b| b.digest.clone()).collect();
    assert_eq!(dir_blobs(&out), want);
    let out = dir.path().join("skopeo-all");
    skopeo(&[
        "copy",
        "--all",
        &format!("oci-archive:{}:{app}", tar.display()),
        &format!("dir:{}", out.display()),
    ]);
    let want: BTreeSet<String> = multi
        .images
        .iter()
        .flat_map(|i| i.blobs())
        .map(|b| b.digest.clone())
        .collect();
    assert_eq!(dir_blobs(&out), want);

    // A new cache seeded from the tar, offline: it serves both, asking nobody.
    let mut cfg = config_for(&[(host.as_str(), upstream.url.as_str())]);
    cfg.cache_dir = dir.path().join("b");
    cfg.seed = Some(tar.display().to_string());
    cfg.mode = UpstreamMode::Offline;
    let b = Proxy::start_config(cfg.clone()).await;
    let pulled = pull(&b.url, "team/app", "v1", None).await.unwrap();
    assert_eq!(pulled.digests, multi.all_digests());
    let pulled = pull(&b.url, "team/tool", "2.0", None).await.unwrap();
    assert_eq!(pulled.top, single.manifest.digest);
    assert_eq!(b.upstream_requests().await, 0.0);
    b.stop().await;

    // Seeded once: a restart with the same seed does not import again, even when the
    // bundle is gone.
    std::fs::remove_file(&tar).unwrap();
    let b = Proxy::start_config(cfg).await;
    pull(&b.url, "team/tool", "2.0", None).await.unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_skopeo_wrote_imports_and_a_broken_one_leaves_the_cache_as_it_was() {
    let upstream = Registry::start().await;
    let image = Image::generate(73, &[5_000_000, 30_000], "amd64");
    push_image(&upstream.url, "team/app", "v3", &image).await;
    let host = upstream.host();
    let name = format!("{host}/team/app:v3");
    let dir = tempfile::tempdir().unwrap();
    let written = dir.path().join("skopeo");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:{name}", written.display()),
    ]);
    let blob = |root: &Path, digest: &str| root.join("blobs/sha256").join(&digest[7..]);
    // skopeo compresses the layers: the image it wrote is its own.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(written.join("index.json")).unwrap()).unwrap();
    let top = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&written, &top)).unwrap()).unwrap();
    let mut layers: Vec<(u64, String)> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["size"].as_u64().unwrap(),
                l["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    layers.sort();
    let (small, large) = (layers[0].1.clone(), layers[1].1.clone());
    let copy = |to: &str| {
        let to = dir.path().join(to);
        let ok = Command::new("cp")
            .arg("-r")
            .arg(&written)
            .arg(&to)
            .status()
            .unwrap();
        assert!(ok.success());
        to
    };
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    std::fs::create_dir_all(&cache).unwrap();

    // A large layer with one byte changed (streamed into the store, then removed).
    let damaged = copy("damaged");
    let big = blob(&damaged, &large);
    let mut bytes = std::fs::read(&big).unwrap();
    bytes[4_000_000] ^= 1;
    std::fs::write(&big, bytes).unwrap();
    let before = files(&cache);
    let err = bundle(&[
        "import",
        "--cache-dir",
        cache_arg,
        damaged.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(err.contains("does not match its digest"), "{err}");
    assert!(err.contains("nothing of it is kept"), "{err}");
    // A small layer missing, found only after the large one was stored.
    let missing = copy("missing");
    std::fs::remove_file(blob(&missing, &small)).unwrap();
    let err = bundle(&[
        "import",
        "--cache-dir",
        cache_arg,
        missing.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        err.contains("is in neither the bundle nor the cache"),
        "{err}"
    );
    assert_eq!(
        files(&cache)
            .into_iter()
            .filter(|f| !f.starts_with("tmp"))
            .collect::<BTreeSet<_>>(),
        before
            .into_iter()
            .filter(|f| !f.starts_with("tmp"))
            .collect::<BTreeSet<_>>(),
        "a refused bundle leaves nothing"
    );
    assert!(!cached(&cache, &large));

    // skopeo's own layout imports, and a cache on it serves the image offline.
    let done = bundle(&[
        "import",
        "--cache-dir",
        cache_arg,
        written.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(names(&done), vec![name.clone()]);
    assert_eq!(done["written"], 4);
    let mut cfg = config_for(&[(host.as_str(), upstream.url.as_str())]);
    cfg.cache_dir = cache.clone();
    cfg.mode = UpstreamMode::Offline;
    let proxy = Proxy::start_config(cfg).await;
    let pulled = pull(&proxy.url, "team/app", "v3", None).await.unwrap();
    assert_eq!(pulled.top, top);
    assert_eq!(proxy.upstream_requests().await, 0.0);
    proxy.stop().await;

    // Again: every object is there already, nothing is written.
    let again = bundle(&[
        "import",
        "--cache-dir",
        cache_arg,
        written.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(
        (again["written"].as_u64(), again["already"].as_u64()),
        (Some(0), Some(4))
    );
}

/// `--in-use` exports what the running proxy was told is in use (by the controller, for
/// the mirror's workloads), and nothing else the cache holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_in_use_are_exported_from_beside_a_running_proxy() {
    let upstream = Registry::start().await;
    let used = Image::generate(74, &[30_000], "amd64");
    let other = Image::generate(75, &[20_000], "amd64");
    push_image(&upstream.url, "team/used", "1", &used).await;
    push_image(&upstream.url, "team/other", "1", &other).await;
    let host = upstream.host();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_for(&[(host.as_str(), upstream.url.as_str())]);
    cfg.cache_dir = dir.path().join("cache");
    let proxy = Proxy::start_config(cfg.clone()).await;
    pull(&proxy.url, "team/used", "1", None).await.unwrap();
    pull(&proxy.url, "team/other", "1", None).await.unwrap();
    proxy.settled().await;
    let token = std::fs::read_to_string(cfg.cache_dir.join("admin-token")).unwrap();
    let name = format!("{host}/team/used:1");
    let told = http()
        .put(format!("{}/admin/in-use", proxy.metrics_url))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({"images": [name]}))
        .send()
        .await
        .unwrap();
    assert_eq!(told.status(), 200);

    let out = dir.path().join("in-use");
    let done = bundle(&[
        "export",
        "--cache-dir",
        cfg.cache_dir.to_str().unwrap(),
        "--in-use",
        "--admin-url",
        &proxy.metrics_url,
        out.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(names(&done), vec![name]);
    let stored: BTreeSet<String> = std::fs::read_dir(out.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    let want: BTreeSet<String> = used
        .blobs()
        .chain([&used.manifest])
        .map(|b| b.digest.clone())
        .collect();
    assert_eq!(stored, want);
    proxy.stop().await;
}

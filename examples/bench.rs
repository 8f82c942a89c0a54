//! Benchmark: pullthrough against the CNCF Distribution registry in proxy mode, both in
//! front of the same upstream, in one run. Run it with `./scripts/bench` (which builds the
//! release binary first); it prints a Markdown report.
//!
//! Figures: cold pull time of a large image, warm pull throughput, upstream fetches per
//! blob under 16 concurrent cold pulls, manifest HEAD latency under concurrency, peak RSS.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Target {
    name: &'static str,
    url: String,
    pid: u32,
    child: Option<Child>,
    _registry: Option<Registry>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time (user + system) the process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / rustix::param::clock_ticks_per_second() as f64
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn start_pullthrough(
    bin: &Path,
    upstream: &Registry,
    dir: &Path,
    extra: &str,
) -> (Target, String) {
    let port = free_port();
    let mport = free_port();
    let cfg = format!(
        "listen: 127.0.0.1:{port}\nmetricsListen: 127.0.0.1:{mport}\ncacheDir: {}\nupstreams:\n  - registry: {}\n    url: {}\n{extra}",
        dir.join("pullthrough-cache").display(),
        upstream.host(),
        upstream.url
    );
    let cfg_path = dir.join("pullthrough.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = Command::new(bin)
        .args(["proxy", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("pullthrough.log")).unwrap())
        .spawn()
        .expect("pullthrough binary runs");
    let url = format!("http://127.0.0.1:{port}");
    assert!(
        serving(&url, Duration::from_secs(30)).await,
        "{url} did not come up"
    );
    let target = Target {
        name: "pullthrough",
        url,
        pid: child.id(),
        child: Some(child),
        _registry: None,
    };
    (target, format!("http://127.0.0.1:{mport}"))
}

async fn metric(metrics_url: &str, name: &str) -> f64 {
    metric_value(&scrape(metrics_url).await, name, &[])
}

async fn start_distribution(upstream: &Registry) -> Target {
    let reg = Registry::start_with(Some(&upstream.url)).await;
    Target {
        name: "distribution",
        url: reg.url.clone(),
        pid: reg.pid(),
        child: None,
        _registry: Some(reg),
    }
}

/// The config and layer digests of an image, from its manifest.
async fn blob_digests(base: &str, repo: &str, tag: &str) -> Vec<String> {
    let m: serde_json::Value = http()
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_string());
    }
    digests
}

/// Pulls an image (manifest, config, layers; `parallel` blobs at a time, as containerd
/// does with 3) with reqwest, streaming every body; `verify` hashes each blob. Returns
/// bytes received.
async fn pull_image(base: &str, repo: &str, tag: &str, parallel: usize, verify: bool) -> u64 {
    let c = http();
    let digests = blob_digests(base, repo, tag).await;
    futures::stream::iter(digests)
        .map(|d| {
            let c = c.clone();
            let url = format!("{base}/v2/{repo}/blobs/{d}");
            async move {
                let r = c.get(&url).send().await.unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
                let mut stream = r.bytes_stream();
                let mut n = 0u64;
                let mut hasher = verify.then(<sha2::Sha256 as sha2::Digest>::new);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.unwrap();
                    n += chunk.len() as u64;
                    if let Some(h) = &mut hasher {
                        sha2::Digest::update(h, &chunk);
                    }
                }
                if let Some(h) = hasher {
                    assert_eq!(
                        format!("sha256:{}", hex::encode(sha2::Digest::finalize(h))),
                        d
                    );
                }
                n
            }
        })
        .buffer_unordered(parallel)
        .fold(0u64, |a, b| async move { a + b })
        .await
}

/// Pulls an image like [`pull_image`] without hashing, but receives each blob with a
/// minimal client: one HTTP/1.1 GET on a plain socket per blob, read into one reused
/// 1 MiB buffer, `parallel` blocking threads. On this 2-core machine the client and the
/// cache share the CPU; a client that spends more per byte (reqwest's per-read buffers,
/// hashing) caps both caches near its own speed and hides the difference between them.
/// Returns bytes received.
async fn pull_image_raw(base: &str, repo: &str, tag: &str, parallel: usize) -> u64 {
    let addr = base
        .strip_prefix("http://")
        .expect("a plain-http cache")
        .to_string();
    let paths: Vec<String> = blob_digests(base, repo, tag)
        .await
        .iter()
        .map(|d| format!("/v2/{repo}/blobs/{d}"))
        .collect();
    tokio::task::spawn_blocking(move || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..parallel)
                .map(|_| {
                    s.spawn(|| {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut n = 0;
                        while let Some(path) = paths.get(next.fetch_add(1, Ordering::Relaxed)) {
                            n += get_raw(&addr, path, &mut buf);
                        }
                        n
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        })
    })
    .await
    .unwrap()
}

/// GET `path` from `addr` over HTTP/1.1; the body must come whole with a Content-Length.
/// Returns the body's length.
fn get_raw(addr: &str, path: &str, buf: &mut [u8]) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut have = 0;
    let (body_start, len) = loop {
        let n = s.read(&mut buf[have..]).unwrap();
        assert!(
            n > 0,
            "{addr}{path}: connection closed in the response head"
        );
        have += n;
        if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200 "), "{addr}{path}: {head}");
            let len: u64 = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .unwrap_or_else(|| panic!("{addr}{path}: no content-length in {head}"))
                .trim()
                .parse()
                .unwrap();
            break (p + 4, len);
        }
    };
    let mut got = (have - body_start) as u64;
    while got < len {
        let n = s.read(buf).unwrap();
        assert!(n > 0, "{addr}{path}: body ended at {got} of {len} bytes");
        got += n as u64;
    }
    assert_eq!(got, len, "{addr}{path}: more bytes than content-length");
    got
}

async fn head_latencies(
    base: &str,
    repo: &str,
    tag: &str,
    workers: usize,
    per_worker: usize,
) -> Vec<Duration> {
    let tasks = (0..workers).map(|_| {
        let url = format!("{base}/v2/{repo}/manifests/{tag}");
        tokio::spawn(async move {
            let c = http();
            let mut out = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let t = Instant::now();
                let r = c.head(&url).header("accept", ACCEPT).send().await.unwrap();
                assert!(r.status().is_success());
                out.push(t.elapsed());
            }
            out
        })
    });
    let mut all: Vec<Duration> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    all.sort();
    all
}

/// Latencies of HEADs of a cached blob, one at a time 5 ms apart, while a raw client pulls
/// the image `pulls` times (3 blobs at a time): how long a request waits while the cache
/// is busy sending blobs.
async fn blob_head_latencies_while_pulling(
    base: &str,
    repo: &str,
    tag: &str,
    pulls: usize,
) -> Vec<Duration> {
    let blob = blob_digests(base, repo, tag).await.pop().unwrap();
    let url = format!("{base}/v2/{repo}/blobs/{blob}");
    let done = Arc::new(AtomicBool::new(false));
    let heads = tokio::spawn({
        let done = done.clone();
        async move {
            let c = http();
            let mut out = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = c.head(&url).send().await.unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
                out.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        }
    });
    for _ in 0..pulls {
        pull_image_raw(base, repo, tag, 3).await;
    }
    done.store(true, Ordering::Relaxed);
    heads.await.unwrap()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Upstream GETs per blob of `image`, from the upstream's access log.
fn fetches_per_blob(upstream: &Registry, image: &Image) -> (usize, usize) {
    let counts: Vec<usize> = image
        .blobs()
        .map(|b| upstream.gets(&format!("/blobs/{}", b.digest), 1))
        .collect();
    (*counts.iter().min().unwrap(), *counts.iter().max().unwrap())
}

#[derive(Default)]
struct Figures {
    cold_s: f64,
    /// Every cold round, in the order run.
    cold_rounds: Vec<f64>,
    warm_mib_s: f64,
    warm_reqwest_mib_s: f64,
    warm_cpu_s_per_gib: f64,
    warm4_mib_s: f64,
    coalesce_min: usize,
    coalesce_max: usize,
    head_p50_ms: f64,
    head_p99_ms: f64,
    busy_head_p50_ms: f64,
    busy_head_p99_ms: f64,
    rss_mib: f64,
}

/// Warm samples of one cache.
#[derive(Default)]
struct Warm {
    /// MiB/s of each pull with the raw client ([`pull_image_raw`]).
    raw: Vec<f64>,
    /// MiB/s of each pull with reqwest ([`pull_image`]).
    reqwest: Vec<f64>,
    /// MiB/s of each round of 4 raw clients pulling at once.
    four_clients: Vec<f64>,
    /// Blob HEAD latencies while a client pulls ([`blob_head_latencies_while_pulling`]).
    busy_heads: Vec<Duration>,
    /// Cache CPU seconds and bytes over the raw-client pulls.
    cpu_s: f64,
    bytes: u64,
}

fn mib_per_s(bytes: u64, since: Instant) -> f64 {
    bytes as f64 / (1 << 20) as f64 / since.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let bin = std::env::args()
        .nth(1)
        .expect("usage: bench <path to pullthrough binary> [size MiB]");
    let size_mib: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(500);
    let bin = Path::new(&bin).canonicalize().unwrap();
    let work = tempfile::tempdir().unwrap();

    let layer_mib = 50usize;
    let layers = (size_mib / layer_mib).max(1);
    eprintln!("generating a {size_mib} MiB image ({layers} layers) and a 64 MiB one per target...");
    let upstream = Registry::start().await;
    let big = Image::generate(100, &vec![layer_mib << 20; layers], "amd64");
    push_image(&upstream.url, "bench/big", "v1", &big).await;
    let herd: BTreeMap<&str, Image> = [("pullthrough", 201u64), ("distribution", 202)]
        .into_iter()
        .map(|(n, seed)| {
            (
                n,
                Image::generate(seed, &[16 << 20, 16 << 20, 16 << 20, 16 << 20], "amd64"),
            )
        })
        .collect();
    for (n, img) in &herd {
        push_image(&upstream.url, &format!("bench/herd-{n}"), "v1", img).await;
    }

    // Cold pulls: each round starts both caches empty and pulls the image through each,
    // the order swapped every round; the figure is the median. The last round's caches
    // stay for the rest.
    let mut cold: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut targets = Vec::new();
    for round in 0..3 {
        targets.clear();
        let mut order = ["distribution", "pullthrough"];
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let dir = work.path().join(format!("{which}-{round}"));
            std::fs::create_dir_all(&dir).unwrap();
            targets.push(if which == "pullthrough" {
                start_pullthrough(&bin, &upstream, &dir, "").await.0
            } else {
                start_distribution(&upstream).await
            });
        }
        for target in &targets {
            eprintln!("{}: cold pull {}...", target.name, round + 1);
            let t = Instant::now();
            let bytes = pull_image(&target.url, "bench/big", "v1", 3, true).await;
            let took = t.elapsed().as_secs_f64();
            eprintln!("{}: cold pull {} took {took:.2} s", target.name, round + 1);
            cold.entry(target.name).or_default().push(took);
            assert!(bytes >= (size_mib as u64) << 20);
        }
    }
    let mut results: BTreeMap<&str, Figures> = BTreeMap::new();
    for (which, mut times) in cold {
        let f = results.entry(which).or_default();
        f.cold_rounds = times.clone();
        f.cold_s = median(&mut times);
    }

    // Warm figures are medians of samples taken from the two caches in turn, so that a
    // burst of load from elsewhere on the machine does not land on one cache only.
    let samples = 2048usize.div_ceil(size_mib).max(3) * 2;
    let mut warm: BTreeMap<&str, Warm> = BTreeMap::new();
    eprintln!("warm pulls, {samples} per cache and client in turn...");
    for _ in 0..samples {
        for target in &targets {
            let w = warm.entry(target.name).or_default();
            let cpu = cpu_seconds(target.pid);
            let t = Instant::now();
            let n = pull_image_raw(&target.url, "bench/big", "v1", 3).await;
            w.raw.push(mib_per_s(n, t));
            w.cpu_s += cpu_seconds(target.pid) - cpu;
            w.bytes += n;
            let t = Instant::now();
            let n = pull_image(&target.url, "bench/big", "v1", 3, false).await;
            w.reqwest.push(mib_per_s(n, t));
        }
    }
    // Nodes pulling the same image at once (a DaemonSet roll-out): 4 clients, each
    // pulling 3 blobs at a time.
    eprintln!(
        "warm pulls by 4 clients at once, {} per cache in turn...",
        samples / 2
    );
    for _ in 0..samples / 2 {
        for target in &targets {
            let t = Instant::now();
            let pulls = (0..4).map(|_| {
                let url = target.url.clone();
                tokio::spawn(async move { pull_image_raw(&url, "bench/big", "v1", 3).await })
            });
            let mut bytes = 0;
            for p in futures::future::join_all(pulls).await {
                bytes += p.unwrap();
            }
            warm.get_mut(target.name)
                .unwrap()
                .four_clients
                .push(mib_per_s(bytes, t));
        }
    }

    // Other requests while blobs stream: HEADs of a cached blob while a client pulls, 3
    // rounds per cache in turn.
    eprintln!("blob HEADs while a client pulls, 3 rounds per cache in turn...");
    let busy_pulls = 1024usize.div_ceil(size_mib).max(2);
    for _ in 0..3 {
        for target in &targets {
            let lat =
                blob_head_latencies_while_pulling(&target.url, "bench/big", "v1", busy_pulls).await;
            warm.get_mut(target.name).unwrap().busy_heads.extend(lat);
        }
    }

    for target in &targets {
        let which = target.name;
        let f = results.get_mut(which).unwrap();
        let mut w = warm.remove(which).unwrap();
        f.warm_mib_s = median(&mut w.raw);
        f.warm_reqwest_mib_s = median(&mut w.reqwest);
        f.warm_cpu_s_per_gib = w.cpu_s / (w.bytes as f64 / (1u64 << 30) as f64);
        f.warm4_mib_s = median(&mut w.four_clients);
        w.busy_heads.sort();
        f.busy_head_p50_ms = pct(&w.busy_heads, 0.5);
        f.busy_head_p99_ms = pct(&w.busy_heads, 0.99);

        eprintln!("{which}: 16 concurrent cold pulls...");
        let img = &herd[which];
        let repo = format!("bench/herd-{which}");
        let pulls = (0..16).map(|_| {
            let url = target.url.clone();
            let repo = repo.clone();
            tokio::spawn(async move { pull_image(&url, &repo, "v1", 3, true).await })
        });
        for p in futures::future::join_all(pulls).await {
            p.unwrap();
        }
        (f.coalesce_min, f.coalesce_max) = fetches_per_blob(&upstream, img);

        eprintln!("{which}: manifest HEADs...");
        let lat = head_latencies(&target.url, "bench/big", "v1", 32, 100).await;
        f.head_p50_ms = pct(&lat, 0.5);
        f.head_p99_ms = pct(&lat, 0.99);
        f.rss_mib = peak_rss_mib(target.pid);
    }
    drop(targets);

    // A cache at its size limit, evicting while it serves: six fresh 48 MiB images through
    // a 160 MiB pullthrough cache (every pull after the third evicts), against the same
    // pulls through a fresh Distribution proxy (which has no size limit).
    eprintln!("evicting cache: pushing 6 images...");
    let evict_images: Vec<Image> = (0..6u64)
        .map(|i| Image::generate(300 + i, &[16 << 20, 16 << 20, 16 << 20], "amd64"))
        .collect();
    for (i, img) in evict_images.iter().enumerate() {
        push_image(&upstream.url, &format!("bench/evict-{i}"), "v1", img).await;
    }
    let limit: u64 = 160 << 20;
    let dir = work.path().join("evicting");
    std::fs::create_dir_all(&dir).unwrap();
    let (evicting, metrics_url) =
        start_pullthrough(&bin, &upstream, &dir, &format!("maxCacheBytes: {limit}\n")).await;
    let reference = start_distribution(&upstream).await;
    let mut evict_s = BTreeMap::new();
    let mut max_cached = 0f64;
    for target in [&reference, &evicting] {
        eprintln!("{}: pulls through a full cache...", target.name);
        let t = Instant::now();
        for i in 0..evict_images.len() {
            pull_image(&target.url, &format!("bench/evict-{i}"), "v1", 3, true).await;
            if target.name == "pullthrough" {
                max_cached =
                    max_cached.max(metric(&metrics_url, "pullthrough_cache_size_bytes").await);
            }
        }
        evict_s.insert(target.name, t.elapsed().as_secs_f64());
    }
    let evictions = metric(&metrics_url, "pullthrough_cache_evictions_total").await;
    let evict_rss = peak_rss_mib(evicting.pid);

    let (p, d) = (&results["pullthrough"], &results["distribution"]);
    println!("| figure | pullthrough | Distribution proxy | ratio (pullthrough / Distribution) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| cold pull of {size_mib} MiB, 3 blobs in parallel, median of 3 (s, lower is better) | {:.2} | {:.2} | {:.2} |",
        p.cold_s,
        d.cold_s,
        p.cold_s / d.cold_s
    );
    let rounds = |f: &Figures| {
        let all: Vec<String> = f.cold_rounds.iter().map(|t| format!("{t:.2}")).collect();
        all.join(", ")
    };
    println!(
        "| ... each cold round (s) | {} | {} | |",
        rounds(p),
        rounds(d)
    );
    println!(
        "| warm pull throughput, raw HTTP client, median (MiB/s, higher is better) | {:.0} | {:.0} | {:.2} |",
        p.warm_mib_s,
        d.warm_mib_s,
        p.warm_mib_s / d.warm_mib_s
    );
    println!(
        "| warm pull throughput, reqwest client, median (MiB/s, higher is better) | {:.0} | {:.0} | {:.2} |",
        p.warm_reqwest_mib_s,
        d.warm_reqwest_mib_s,
        p.warm_reqwest_mib_s / d.warm_reqwest_mib_s
    );
    println!(
        "| server CPU per GiB served warm (s, lower is better) | {:.2} | {:.2} | {:.2} |",
        p.warm_cpu_s_per_gib,
        d.warm_cpu_s_per_gib,
        p.warm_cpu_s_per_gib / d.warm_cpu_s_per_gib
    );
    println!(
        "| warm pull throughput, 4 raw clients at once, median (MiB/s, higher is better) | {:.0} | {:.0} | {:.2} |",
        p.warm4_mib_s,
        d.warm4_mib_s,
        p.warm4_mib_s / d.warm4_mib_s
    );
    println!(
        "| upstream GETs per blob, 16 concurrent cold pulls (min–max) | {}–{} | {}–{} | |",
        p.coalesce_min, p.coalesce_max, d.coalesce_min, d.coalesce_max
    );
    println!(
        "| manifest HEAD by tag p50, 32 concurrent clients (ms) | {:.2} | {:.2} | {:.2} |",
        p.head_p50_ms,
        d.head_p50_ms,
        p.head_p50_ms / d.head_p50_ms
    );
    println!(
        "| manifest HEAD by tag p99, 32 concurrent clients (ms) | {:.2} | {:.2} | {:.2} |",
        p.head_p99_ms,
        d.head_p99_ms,
        p.head_p99_ms / d.head_p99_ms
    );
    println!(
        "| blob HEAD p50 / p99 while a client pulls the image warm (ms) | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
        p.busy_head_p50_ms,
        p.busy_head_p99_ms,
        d.busy_head_p50_ms,
        d.busy_head_p99_ms,
        p.busy_head_p50_ms / d.busy_head_p50_ms,
        p.busy_head_p99_ms / d.busy_head_p99_ms
    );
    println!(
        "| peak RSS (MiB) | {:.1} | {:.1} | {:.2} |",
        p.rss_mib,
        d.rss_mib,
        p.rss_mib / d.rss_mib
    );
    println!(
        "| 6 cold pulls of 48 MiB images through a full 160 MiB cache that evicts (s) | {:.2} | {:.2} (no size limit) | {:.2} |",
        evict_s["pullthrough"],
        evict_s["distribution"],
        evict_s["pullthrough"] / evict_s["distribution"]
    );
    println!(
        "| ... while evicting: largest cache size seen (MiB, limit {}), objects evicted, peak RSS (MiB) | {:.1}, {evictions:.0}, {evict_rss:.1} | | |",
        limit >> 20,
        max_cached / (1 << 20) as f64,
    );
}

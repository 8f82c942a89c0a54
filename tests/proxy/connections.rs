//! Connections cannot be hoarded: silent and idle ones are closed, ones beyond the limit
//! get a clear answer, the operations port's probes answer meanwhile, and a low file
//! limit never takes the ports down.

use crate::common::fault::FaultUpstream;
use crate::common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads from `s` until the server closes it (60 s at most); the bytes read.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("the server kept the connection open")
        .ok();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let up = FaultUpstream::start().await;
    let layer = Blob::new(LAYER, random_bytes(490, 16 << 20));
    up.add_blob(&layer);
    let mut cfg = up.config();
    cfg.client_header_timeout = Duration::from_secs(1);
    cfg.client_idle_timeout = Duration::from_secs(1);
    let proxy = Proxy::start_config(cfg).await;

    // Fifty connections that never send a byte: closed, while others are served.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tokio::net::TcpStream::connect(&proxy.host).await.unwrap());
    }
    assert_eq!(get(&format!("{}/v2/", proxy.url)).await.status(), 200);
    for s in &mut silent {
        assert!(read_to_close(s).await.is_empty());
    }

    // A client that stops reading a blob is let go, with the blob unfinished.
    let url = format!("/v2/a/b/blobs/{}", layer.digest);
    get_bytes(&format!("{}{url}", proxy.url)).await;
    proxy.settled().await;
    // A small receive buffer (a setting the kernel keeps): the socket cannot hold the
    // blob, whatever the defaults of the machine are.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut s = socket.connect(proxy.host.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    s.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));
    // Not reading: the socket buffers fill, no byte moves, and the server gives up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rest = read_to_close(&mut s).await;
    assert!(rest.len() < layer.bytes.len(), "the whole blob went out");
}

/// Idle connections holding every place on the operations port leave the probes
/// answering: a probe on a connection over the limit is answered as ever (with them
/// held, it was 503 until they timed out, and the pod would have been restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_idle_connections_hold_the_operations_port() {
    let up = FaultUpstream::start().await;
    let proxy = Proxy::start_config(up.config()).await;
    let ops = proxy.metrics_url.trim_start_matches("http://").to_string();
    // As many idle connections as the port takes; the probes' come after them.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(&ops).await.unwrap());
    }
    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let mut s = tokio::net::TcpStream::connect(&ops).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with(&format!("\r\n\r\n{body}\n")),
            "{path}: {answer}"
        );
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_a_clear_answer_and_ops_keep_answering() {
    let up = FaultUpstream::start().await;
    let mut cfg = up.config();
    cfg.max_connections = 4.try_into().unwrap();
    let proxy = Proxy::start_config(cfg).await;
    // Four connections that each got a real answer, and stay open (kept alive): they
    // hold the four places, whatever other connection came and went before.
    let mut held = Vec::new();
    while held.len() < 4 {
        let mut s = tokio::net::TcpStream::connect(&proxy.host).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut answer))
            .await
            .expect("no answer")
            .unwrap();
        if answer[..n].starts_with(b"HTTP/1.1 200") {
            held.push(s);
        }
    }
    let mut s = tokio::net::TcpStream::connect(&proxy.host).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("TOOMANYREQUESTS"),
        "{answer}"
    );
    let ops = get(&format!("{}/healthz", proxy.metrics_url)).await;
    assert_eq!(ops.status(), 200, "the operations port keeps answering");
    drop(held);
    until("the registry port to serve again", || async {
        http()
            .get(format!("{}/v2/", proxy.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_file_limit_never_takes_the_ports_down() {
    let up = FaultUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nmetricsListen: 127.0.0.1:{mport}\ncacheDir: {}\n\
             clientHeaderTimeout: 2s\nupstreams:\n  - registry: {}\n    url: {}\n",
            dir.path().join("cache").display(),
            up.host,
            up.url
        ),
    )
    .unwrap();
    // 256 open files at most, hard limit included.
    let child = std::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_pullthrough"))
        .args(["proxy", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs");
    // Killed however the test ends: a proxy left running holds its ports.
    let _child = KillOnDrop(child);
    let (url, ops) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{mport}"),
    );
    assert!(serving(&url, Duration::from_secs(60)).await, "no proxy");
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(
            tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                .await
                .unwrap(),
        );
    }
    // The operations port answers; the registry port serves again once the proxy has
    // closed the silent connections (the client still holds all 300 open).
    let health = get(&format!("{ops}/healthz")).await;
    assert_eq!(health.status(), 200);
    until("the registry port to serve again", || async {
        http()
            .get(format!("{url}/v2/"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    drop(silent);
}

/// A child process, killed and reaped when this is dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

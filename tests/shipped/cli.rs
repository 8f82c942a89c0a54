//! The binary as a user first meets it: the README's first run without Docker Hub, and
//! what ordinary mistakes print (one line, each cause once, never a backtrace).

use crate::common::*;
use std::io::BufRead as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn pullthrough() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullthrough"));
    // Users have it set for other programs; it must not change what ours print.
    cmd.env("RUST_BACKTRACE", "1").stdin(Stdio::null());
    cmd
}

/// The one `error:` line a failed command printed, checked to be all it printed.
#[track_caller]
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "the command succeeded");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(
        err.starts_with("error: ") && !err.contains('\n'),
        "not one error line: {err}"
    );
    err
}

/// What `cmd` printed once it ended, within `limit` (killed then, and the test fails).
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `kubectl get registrymirror NAME -o yaml | pullthrough openshift-mirror-sets` prints
/// the two objects; a mirror that is not Ready yet, or a file that is no mirror, is one
/// line.
#[test]
fn openshift_mirror_sets_come_from_a_mirror_s_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.yaml");
    let mirror = "apiVersion: pullthrough.dev/v1alpha1\nkind: RegistryMirror\n\
        metadata: {name: public, namespace: pullthrough-system}\n\
        spec: {upstreams: [{registry: docker.io}]}\n";
    std::fs::write(
        &file,
        format!("{mirror}status: {{endpoint: 'https://10.96.0.9:5000'}}\n"),
    )
    .unwrap();
    let out = pullthrough()
        .arg("openshift-mirror-sets")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kind: ImageDigestMirrorSet") && text.contains("kind: ImageTagMirrorSet"),
        "{text}"
    );
    assert!(text.contains("- 10.96.0.9:5000/docker.io"), "{text}");
    std::fs::write(&file, mirror).unwrap();
    let out = pullthrough()
        .arg("openshift-mirror-sets")
        .arg(&file)
        .output()
        .unwrap();
    assert!(error_line(&out).contains("no status.endpoint yet"));
    std::fs::write(&file, "kind: Pod\n").unwrap();
    let out = pullthrough()
        .arg("openshift-mirror-sets")
        .arg(&file)
        .output()
        .unwrap();
    assert!(error_line(&out).contains("not a RegistryMirror"));
}

#[test]
fn ordinary_mistakes_are_one_line_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let proxy = |args: &[&str]| {
        pullthrough()
            .arg("proxy")
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .output()
            .unwrap()
    };

    // A port in use: the cause is said once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = error_line(&proxy(&[
        "--listen",
        &addr,
        "--metrics-listen",
        "127.0.0.1:0",
    ]));
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");

    let line = error_line(&proxy(&["--upstream", "bad host"]));
    assert!(line.contains("\"bad host\" is not a host name"), "{line}");
    // An upstream at the instance-metadata address: refused before anything is sent.
    let line = error_line(&proxy(&[
        "--upstream",
        "meta.local=http://169.254.169.254",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]));
    assert!(line.contains("link-local address"), "{line}");
    // A password written into an upstream URL is never printed.
    let line = error_line(&proxy(&[
        "--upstream",
        "reg.local=http://me:s3cret@127.0.0.1:5001",
    ]));
    assert!(
        line.contains("has invalid url") && !line.contains("s3cret"),
        "{line}"
    );
    let line = error_line(&proxy(&["--max-cache-size", "0"]));
    assert!(line.contains("must be greater than zero"), "{line}");
    let line = error_line(&proxy(&[
        "--listen",
        "127.0.0.1:7000",
        "--metrics-listen",
        "0.0.0.0:7000",
    ]));
    assert!(line.contains("use the same port"), "{line}");

    // A host name where an address is wanted: said, not looked up.
    let out = proxy(&["--listen", "registry.local:5000"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host name, which is not accepted"), "{err}");

    // What is accepted, as the configuration shows it.
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "maxCacheBytes: 10Gi\n").unwrap();
    let out = proxy(&[
        "--listen",
        "localhost:7001",
        "--config",
        config.to_str().unwrap(),
        "--print-config",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("listen: 127.0.0.1:7001"), "{text}");
    assert!(text.contains("maxCacheBytes: 10737418240"), "{text}");
    assert!(
        !cache.exists(),
        "a failed or printing start touched the cache"
    );

    // Inline passwords are not shown.
    std::fs::write(
        &config,
        "upstreams:\n  - registry: reg.example\n    credentials: {username: me, password: s3cret}\naccess: {plainHttp: true}\n",
    )
    .unwrap();
    let out = proxy(&["--config", config.to_str().unwrap(), "--print-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("s3cret") && text.contains("<redacted>"),
        "{text}"
    );

    // A weak secret: refused, with how to make a good one.
    let short = dir.path().join("short");
    std::fs::write(&short, "k\n").unwrap();
    let config = dir.path().join("weak.yaml");
    for (field, what) in [
        ("adminTokenFile", "admin token"),
        ("access: {signingKeyFile", "access signing key"),
    ] {
        let closing = if field.contains('{') { "}" } else { "" };
        std::fs::write(&config, format!("{field}: {}{closing}\n", short.display())).unwrap();
        let mut start = pullthrough();
        start
            .args(["proxy", "--cache-dir"])
            .arg(&cache)
            .args(["--config", config.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
        let line = error_line(&output_within(start, Duration::from_secs(60)));
        assert!(line.contains(what), "{line}");
        assert!(
            line.contains("1 bytes, and a secret must be at least 32"),
            "{line}"
        );
    }
}

/// Runs the proxy binary with `args` until dropped, its log going to a pipe.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn logs_in_a_pipe_have_no_colours() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = pullthrough()
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("pullthrough proxy serving") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the proxy never logged that it serves");
    assert!(!line.contains('\u{1b}'), "ANSI escapes in a pipe: {line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_first_run_works_without_docker_hub() {
    // A local upstream (Debian's Distribution registry) holding the demo image.
    let upstream = Registry::start().await;
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("demo");
    let made = Command::new(root().join("scripts/demo-image"))
        .arg(&layout)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1.0", layout.display()),
        &format!("docker://{}/demo/hello:1.0", upstream.host()),
    ]);

    // The proxy as the README starts it (here on free ports).
    let (port, mport) = (free_port(), free_port());
    let child = pullthrough()
        .args(["proxy", "--upstream"])
        .arg(format!("local.test={}", upstream.url))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{mport}"))
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let url = format!("http://127.0.0.1:{port}");
    assert!(serving(&url, Duration::from_secs(60)).await, "no proxy");

    let out = work.path().join("hello");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://127.0.0.1:{port}/demo/hello:1.0"),
        &format!("dir:{}", out.display()),
    ]);
    assert_eq!(dir_blobs(&out).len(), 2, "a config and a layer");
    // The README's second copy names the registry in the path.
    let named = work.path().join("hello2");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://127.0.0.1:{port}/local.test/demo/hello:1.0"),
        &format!("dir:{}", named.display()),
    ]);
    assert_eq!(dir_blobs(&named), dir_blobs(&out));

    // A pull that fails says why in its OCI error body.
    let r = get(&format!("{url}/v2/demo/missing/manifests/1.0")).await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
}

//! TLS for tests: rustls's provider for reqwest, and a test CA with a certificate for 127.0.0.1 made with openssl.

use std::path::Path;
use std::process::Command;

/// reqwest's TLS takes rustls's process-wide provider (the proxy's S3 client brings
/// reqwest in without one of its own): ring, as the proxy installs it.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A test CA and a certificate it signed for 127.0.0.1, made with the openssl CLI in
/// `dir`: `ca.crt`, `tls.crt` and `tls.key`, as a cert-manager Secret holds them.
pub fn test_certificate(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl not found: run ./scripts/test, which installs it");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=pullthrough test CA",
                "-days",
                "3",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "tls.crt",
        "-days",
        "3",
        "-extfile",
        "ext.cnf",
    ]);
}

//! HTTPS for the registry API (`tls: {certFile, keyFile}`): what `upstreamAuth` needs so
//! that clients' credentials never cross the network in clear. The certificate and key
//! are PEM files, as a `kubernetes.io/tls` Secret (cert-manager's) mounts them; they are
//! read again when they change, so a renewed certificate is served without a restart.
//!
//! Blob bytes are encrypted on their way out, so TLS connections do not use
//! [`super::zero_copy`]'s `sendfile(2)`.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::future::Future as _;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;

/// How often the files are looked at for a renewed certificate.
const RECHECK: Duration = Duration::from_secs(10);

/// Why the certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file that cannot be read as PEM.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file with no certificate in it.
    #[error("{}: no PEM certificate in it", .0.display())]
    NoCertificate(PathBuf),
    /// A certificate and key that do not make a key pair (or a key of a kind not used).
    #[error("{} and {}: {source}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The TLS configuration itself.
    #[error("{0}")]
    Config(#[from] rustls::Error),
}

/// The certificate and key read from `cert` and `key`, checked to belong together.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let pem = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Pem { path, source }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(pem(cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, private, &provider).map_err(|source| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The certificate being served, read again from its files when they change.
#[derive(Debug)]
struct Certs {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the files last read.
    read: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
    /// When the files were last looked at, in seconds since the epoch.
    checked: AtomicU64,
}

impl Certs {
    fn reload_if_changed(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.checked.load(Ordering::Relaxed);
        if now < last + RECHECK.as_secs()
            || self
                .checked
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let times = (modified(&self.cert), modified(&self.key));
        let mut read = self.read.lock().expect("certificate lock");
        if *read == times {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(key) => {
                *self.current.write().expect("certificate lock") = Arc::new(key);
                *read = times;
                tracing::info!(cert = %self.cert.display(), "serving the renewed certificate");
            }
            // Half of a renewal written (the new certificate, the old key): the files
            // are looked at again on a later handshake.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the renewed certificate; serving the last one")
            }
        }
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(self.current.read().expect("certificate lock").clone())
    }
}

/// Connections served over TLS with the certificate a resolver picks, HTTP/2 and
/// HTTP/1.1 offered by ALPN: the registry API's ([`Tls`]) and the controller's webhook.
pub struct Accepting {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Accepting {
    /// Connections served with what `resolver` gives each handshake.
    pub fn new(resolver: Arc<dyn ResolvesServerCert>) -> Result<Accepting, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Accepting {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

impl crate::server::Connection for Accepting {
    type Io = TlsIo;

    fn open(&self, stream: TcpStream) -> (TlsIo, crate::server::Tag) {
        (
            TlsIo::Handshake(self.acceptor.accept(stream)),
            Box::new(|_| {}),
        )
    }
}

/// The registry API's connections over TLS, its certificate read from files.
pub struct Tls {
    accepting: Accepting,
    certs: Arc<Certs>,
}

impl Tls {
    /// TLS with the certificate chain in `cert` and its key in `key` (PEM), HTTP/2 and
    /// HTTP/1.1 offered by ALPN.
    pub fn new(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let certs = Arc::new(Certs {
            current: RwLock::new(Arc::new(load(cert, key)?)),
            read: Mutex::new((modified(cert), modified(key))),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            checked: AtomicU64::new(0),
        });
        Ok(Tls {
            accepting: Accepting::new(certs.clone())?,
            certs,
        })
    }

    /// What a replica connects to the others with: they serve the certificate it serves
    /// (one Secret), at pod addresses no certificate names, so the one certificate
    /// accepted is the one this replica serves now (and only a holder of its key can
    /// complete the handshake).
    pub fn peer_client_config(&self) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SameCertificate {
                certs: self.certs.clone(),
                provider,
            }))
            .with_no_client_auth()
    }
}

/// Accepts exactly the certificate this replica serves (see [`Tls::peer_client_config`]).
#[derive(Debug)]
struct SameCertificate {
    certs: Arc<Certs>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SameCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.certs.reload_if_changed();
        let ours = self.certs.current.read().expect("certificate lock").clone();
        match ours.cert.first() {
            Some(c) if c.as_ref() == end_entity.as_ref() => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::General(
                "the replica serves another certificate than this one".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl crate::server::Connection for Tls {
    type Io = TlsIo;

    fn open(&self, stream: TcpStream) -> (TlsIo, crate::server::Tag) {
        self.accepting.open(stream)
    }
}

/// A TLS connection: the handshake is made on its first read or write, within the
/// server's timeouts for a request head.
pub enum TlsIo {
    /// The handshake, under way.
    Handshake(tokio_rustls::Accept<TcpStream>),
    /// The connection, encrypted.
    Ready(hyper_util::rt::TokioIo<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The handshake failed.
    Failed,
}

impl TlsIo {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let TlsIo::Handshake(accept) = self {
            match ready!(Pin::new(accept).poll(cx)) {
                Ok(stream) => *self = TlsIo::Ready(hyper_util::rt::TokioIo::new(stream)),
                Err(e) => {
                    *self = TlsIo::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self {
            TlsIo::Ready(_) => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            ))),
        }
    }

    fn stream(
        &mut self,
    ) -> Pin<&mut hyper_util::rt::TokioIo<tokio_rustls::server::TlsStream<TcpStream>>> {
        match self {
            TlsIo::Ready(s) => Pin::new(s),
            _ => unreachable!("polled only once ready"),
        }
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        this.stream().poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        this.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        this.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsIo::Ready(s) => Pin::new(s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsIo::Ready(s) => Pin::new(s).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

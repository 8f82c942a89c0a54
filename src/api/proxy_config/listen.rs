//! Where the proxy listens and what it serves there: the listen addresses (IP:PORT,
//! `:PORT`, `localhost:PORT`, never a host name to look up), and the registry API's
//! certificate.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The registry API's certificate: PEM files, as a `kubernetes.io/tls` Secret mounts them
/// (`tls.crt`, `tls.key`); read again when they change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, the server's first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// A listen address: `IP:PORT` (`0.0.0.0:5000`, `[::]:5000`), `:PORT` for every
/// interface, or `localhost:PORT` for the IPv4 loopback. Other host names are refused
/// rather than looked up: an address to bind must not depend on DNS.
pub fn parse_listen(text: &str) -> Result<SocketAddr, ListenError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| ListenError::NotAnAddress(text.to_string()))?;
    let port: u16 = port.parse().map_err(|_| ListenError::BadPort {
        text: text.to_string(),
        port: port.to_string(),
    })?;
    match host {
        "" => Ok(([0, 0, 0, 0], port).into()),
        h if h.eq_ignore_ascii_case("localhost") => Ok(([127, 0, 0, 1], port).into()),
        h => Err(ListenError::HostName {
            text: text.to_string(),
            host: h.to_string(),
            port,
        }),
    }
}

/// Why a text is not a listen address (see [`parse_listen`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// No port at all.
    #[error("{0:?} is not an address: expected IP:PORT, e.g. 0.0.0.0:5000")]
    NotAnAddress(String),
    /// The port is not a number from 0 to 65535.
    #[error("{text:?}: {port:?} is not a port number")]
    BadPort {
        /// The address.
        text: String,
        /// Its port part.
        port: String,
    },
    /// A host name, which would need DNS to bind.
    #[error(
        "{text:?}: {host:?} is a host name, which is not accepted; use an IP address \
         (127.0.0.1:{port} for this machine only, 0.0.0.0:{port} for every interface)"
    )]
    HostName {
        /// The address.
        text: String,
        /// Its host part.
        host: String,
        /// Its port, for the addresses suggested instead.
        port: u16,
    },
}

pub(super) fn listen_serde<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// Whether two listeners would fight over one port (port 0 asks for a free one).
pub(super) fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

//! Relaying a blob that is not cached to the clients that wait for it: through memory,
//! hashed as it goes, its last chunk held back until the whole matches its digest, at the
//! pace of the slowest client.

use super::BlobAnswer;
use crate::oci::{Digest, Hasher};
use crate::proxy::error::ProxyError;
use crate::proxy::metrics::CacheResult;
use crate::proxy::upstream::{BlobBody, UpstreamError};
use bytes::Bytes;
use futures::stream::StreamExt;
use std::io;
use tokio::sync::mpsc;

/// Chunks buffered per client of a relayed (uncacheable) blob.
pub const RELAY_DEPTH: usize = 8;

/// Where a relayed blob's chunks go to one client.
pub type RelayTx = mpsc::Sender<io::Result<Bytes>>;

/// Sends an uncacheable blob's body to `clients` as it arrives, hashing it on the way.
/// The last chunk goes out only once the whole body matches `digest` (and `len`), so no
/// client ever gets a complete wrong body; a failure reaches every client as an error.
/// The slowest client sets the pace; one that goes away is dropped, and when none is
/// left the upstream body is dropped too.
pub async fn relay(mut body: BlobBody, digest: &Digest, mut clients: Vec<RelayTx>) {
    let len = body.content_length();
    let mut hasher = Hasher::new(digest.algorithm());
    let mut held: Option<Bytes> = None;
    let mut got = 0u64;
    let failure = loop {
        if clients.is_empty() {
            return;
        }
        match body.next().await {
            Ok(Some(data)) => {
                got += data.len() as u64;
                hasher.update(&data);
                if let Some(prev) = held.replace(data) {
                    send_all(&mut clients, prev).await;
                }
            }
            Ok(None) => {
                let hashed = std::mem::replace(&mut hasher, Hasher::new(digest.algorithm()));
                let got_digest = hashed.finish();
                if let Some(want) = len.filter(|l| *l != got) {
                    break ProxyError::from(UpstreamError::Truncated { got, want });
                }
                if got_digest != *digest {
                    break ProxyError::UpstreamInvalid(
                        format!("blob content hashes to {got_digest}, not {digest}").into(),
                    );
                }
                if let Some(last) = held.take() {
                    send_all(&mut clients, last).await;
                }
                return;
            }
            Err(e) => break ProxyError::from(e),
        }
    };
    for client in &clients {
        let _ = client.send(Err(io::Error::other(failure.clone()))).await;
    }
}

/// Sends a chunk to every client, dropping those that went away.
pub async fn send_all(clients: &mut Vec<RelayTx>, chunk: Bytes) {
    let mut i = 0;
    while i < clients.len() {
        if clients[i].send(Ok(chunk.clone())).await.is_ok() {
            i += 1;
        } else {
            clients.swap_remove(i);
        }
    }
}

/// The answer of a client that reads a relayed blob.
pub fn relay_answer(
    rx: mpsc::Receiver<io::Result<Bytes>>,
    len: Option<u64>,
    result: CacheResult,
) -> BlobAnswer {
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed();
    BlobAnswer {
        len,
        range: None,
        body: Some(body),
        result,
        redirect: None,
        via_owner: false,
    }
}

//! A blob's body as it arrives (from the upstream, from the replica that owns it, or from
//! the shared store another process fetched it into): chunk by chunk, each within the
//! upstream's timeout, and no slower than its floor ([`MinRate`]) once its first window
//! is over, so that a body that drips (a byte every few seconds, which no timeout
//! between chunks catches) cannot hold a download, its clients and its space for ever.

use super::error::UpstreamError;
use bytes::Bytes;
use futures::FutureExt;
use futures::stream::BoxStream;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The slowest a blob body may arrive: at least `bytes_per_second` x `window` bytes in
/// every `window` (the first one included); 0 bytes per second: no floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes per second, on average over a window.
    pub bytes_per_second: u64,
    /// The window.
    pub window: Duration,
}

impl MinRate {
    /// The floor `config` sets (`upstreamMinRate` over `upstreamMinRateWindow`).
    pub fn of(config: &crate::api::ProxyConfig) -> MinRate {
        MinRate {
            bytes_per_second: config.upstream_min_rate,
            window: config.upstream_min_rate_window,
        }
    }
}

/// A blob's body, read chunk by chunk.
pub struct BlobBody {
    length: Option<u64>,
    body: Chunks,
    timeout: Duration,
    floor: MinRate,
    /// The window being measured: when it began, and what arrived in it.
    window_start: Instant,
    window_bytes: u64,
    /// Counts every byte that arrives, when set (bytes from the upstream).
    received: Option<IntCounter>,
}

/// Where a blob body's chunks come from.
enum Chunks {
    Http(Incoming),
    Stored(BoxStream<'static, std::io::Result<Bytes>>),
}

impl BlobBody {
    fn new(length: Option<u64>, body: Chunks, timeout: Duration, floor: MinRate) -> BlobBody {
        BlobBody {
            length,
            body,
            timeout,
            floor,
            window_start: Instant::now(),
            window_bytes: 0,
            received: None,
        }
    }

    /// The body of an HTTP answer (`Content-Length` `length`, when it said).
    pub(super) fn http(
        length: Option<u64>,
        body: Incoming,
        timeout: Duration,
        floor: MinRate,
    ) -> BlobBody {
        BlobBody::new(length, Chunks::Http(body), timeout, floor)
    }

    /// The `len` bytes of a blob read back from the store (`chunks`), each chunk within
    /// `timeout`, no slower than `floor`.
    pub fn stored(
        len: u64,
        chunks: BoxStream<'static, std::io::Result<Bytes>>,
        timeout: Duration,
        floor: MinRate,
    ) -> BlobBody {
        BlobBody::new(Some(len), Chunks::Stored(chunks), timeout, floor)
    }

    /// The body with every byte that arrives counted on `counter`.
    pub(super) fn counted(self, counter: IntCounter) -> BlobBody {
        BlobBody {
            received: Some(counter),
            ..self
        }
    }

    /// `Content-Length`, when the upstream sent it.
    pub fn content_length(&self) -> Option<u64> {
        self.length
    }

    /// The next chunk, `None` at the end. Fails when none arrives within the timeout, or
    /// the body has fallen below its floor.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let timeout = self.timeout;
        let data = tokio::time::timeout(timeout, self.data())
            .await
            .map_err(|_| UpstreamError::Stalled {
                what: "the next chunk of a blob",
                after: timeout,
            })?;
        self.paced(data)
    }

    /// The next chunk if it is already here: `None` when it is not.
    pub fn ready(&mut self) -> Option<Result<Option<Bytes>, UpstreamError>> {
        let data = self.data().now_or_never()?;
        Some(self.paced(data))
    }

    /// `data`, counted against the floor: a window that ends with fewer bytes than it
    /// should have brought fails the body.
    fn paced(
        &mut self,
        data: Result<Option<Bytes>, UpstreamError>,
    ) -> Result<Option<Bytes>, UpstreamError> {
        let Ok(Some(chunk)) = &data else {
            return data;
        };
        self.window_bytes += chunk.len() as u64;
        if let Some(c) = &self.received {
            c.inc_by(chunk.len() as u64);
        }
        let MinRate {
            bytes_per_second,
            window,
        } = self.floor;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.window_start);
        if bytes_per_second > 0 && elapsed >= window {
            let wanted = (bytes_per_second as f64 * elapsed.as_secs_f64()) as u64;
            if self.window_bytes < wanted {
                return Err(UpstreamError::TooSlow {
                    got: self.window_bytes,
                    after: elapsed,
                    floor: bytes_per_second,
                });
            }
            self.window_start = now;
            self.window_bytes = 0;
        }
        data
    }

    async fn data(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let body = match &mut self.body {
            Chunks::Http(body) => body,
            Chunks::Stored(chunks) => {
                use futures::StreamExt;
                return match chunks.next().await {
                    None => Ok(None),
                    Some(Ok(chunk)) => Ok(Some(chunk)),
                    Some(Err(e)) => Err(UpstreamError::Stored(Arc::new(e))),
                };
            }
        };
        loop {
            match body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(UpstreamError::Body(Arc::new(e))),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A body whose chunks of `size` bytes come every `every`.
    fn dripping(size: usize, every: Duration, floor: MinRate) -> BlobBody {
        let chunks = futures::stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![7u8; size])), ()))
        })
        .boxed();
        BlobBody::stored(u64::MAX, chunks, Duration::from_secs(60), floor)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_below_its_floor_fails_at_the_end_of_a_window() {
        let floor = MinRate {
            bytes_per_second: 1000,
            window: Duration::from_secs(10),
        };
        // 100 bytes a second: below 1000, failed once ten seconds are over.
        let started = Instant::now();
        let mut slow = dripping(100, Duration::from_secs(1), floor);
        let failed = loop {
            match slow.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("an endless body ended"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(failed, UpstreamError::TooSlow { got: 1000, .. }),
            "{failed}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // 2000 bytes a second goes on, window after window.
        let mut fast = dripping(200, Duration::from_millis(100), floor);
        for _ in 0..1000 {
            assert!(fast.next().await.unwrap().is_some());
        }
        // No floor: anything goes.
        let none = MinRate {
            bytes_per_second: 0,
            window: Duration::from_secs(10),
        };
        let mut drip = dripping(1, Duration::from_secs(3), none);
        for _ in 0..100 {
            assert!(drip.next().await.unwrap().is_some());
        }
    }
}

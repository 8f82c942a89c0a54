//! Whether a mirror answers from this node: a runtime whose first host does not answer
//! waits for it (containerd's dial timeout is 30 s before 2.0.7; a mirror that hangs
//! after its headers holds a pull until the runtime's own progress timeout), so the agent
//! leaves a mirror that does not answer out of the node's files until it does again
//! (docs/node-agent.md, "A dead mirror").
//!
//! The question: a TCP connection within [`CONNECT`]; for a plain-HTTP mirror also
//! `GET /v2/` answered, headers and body, with a status below 500 within [`ANSWER`]. A
//! TLS mirror is asked for the connection only.

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a connection may take.
pub const CONNECT: Duration = Duration::from_secs(1);
/// How long the whole answer to `GET /v2/` may take.
pub const ANSWER: Duration = Duration::from_secs(2);
/// The most of a `/v2/` body read (a registry answers `{}` or an error of a few bytes).
const MAX_BODY: u64 = 64 * 1024;

/// Whether the mirror at `endpoint` (`http(s)://host:port`) answers; why not, if not.
pub async fn answers(endpoint: &str) -> Result<(), String> {
    let (tls, authority) = match endpoint.trim_end_matches('/').split_once("://") {
        Some(("http", a)) => (false, a),
        Some(("https", a)) => (true, a),
        _ => return Err(format!("{endpoint} is not an http(s) URL")),
    };
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    let stream = tokio::time::timeout(CONNECT, TcpStream::connect(&address))
        .await
        .map_err(|_| format!("no connection to {address} within {CONNECT:?}"))?
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    if tls {
        return Ok(());
    }
    tokio::time::timeout(ANSWER, get_v2(stream, authority))
        .await
        .map_err(|_| format!("{endpoint}/v2/ did not answer within {ANSWER:?}"))?
}

/// `GET /v2/` on `stream`: its status, and all of its body.
async fn get_v2(mut stream: TcpStream, host: &str) -> Result<(), String> {
    let request = format!(
        "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pullthrough-node-agent\r\nConnection: close\r\n\r\n"
    );
    let io = |e: std::io::Error| format!("/v2/: {e}");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.map_err(io)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("/v2/ answered {:?}, not HTTP", line.trim_end()))?;
    let mut length: Option<u64> = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).await.map_err(io)? == 0 {
            return Err("/v2/: the answer broke off in its headers".into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok();
        }
    }
    // The body too: a mirror that sends its headers and then nothing holds pulls.
    let want = length.unwrap_or(MAX_BODY).min(MAX_BODY);
    let mut body = Vec::new();
    reader.take(want).read_to_end(&mut body).await.map_err(io)?;
    if length.is_some_and(|l| (body.len() as u64) < l.min(MAX_BODY)) {
        return Err("/v2/: the body broke off".into());
    }
    if status >= 500 {
        return Err(format!("/v2/ answered {status}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each connection with `answer`, then holds it open.
    async fn serving(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn a_mirror_answers_only_with_a_whole_answer_below_500() {
        let ok = serving(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
        assert_eq!(answers(&ok).await, Ok(()));
        let auth = serving(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(answers(&auth).await, Ok(()));
        let down = serving(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        assert!(answers(&down).await.unwrap_err().contains("503"));
        let garbage = serving(b"SSH-2.0-OpenSSH\r\n").await;
        assert!(answers(&garbage).await.unwrap_err().contains("not HTTP"));
    }

    #[tokio::test(start_paused = true)]
    async fn headers_without_their_body_are_no_answer() {
        let hung = serving(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}").await;
        let e = answers(&hung).await.unwrap_err();
        assert!(e.contains("did not answer within"), "{e}");
    }

    #[tokio::test]
    async fn nothing_listening_is_no_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let e = answers(&format!("http://{address}")).await.unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
        assert!(answers("ftp://x").await.is_err());
    }
}

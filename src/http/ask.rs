//! Asks holder nodes for a challenge token this node does not have: a plain
//! HTTP/1.1 GET, marked as forwarded, with a short deadline and bounded
//! response. The first 200 wins.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::request::FORWARDED_MARK;
use crate::config::FleetDigest;
use crate::connect;

/// A key authorization is a token, a dot and a 43-character thumbprint;
/// a peer's answer larger than this is not one.
const MAX_RESPONSE: usize = 4096;

/// Asks all `holders` at once; returns the first key authorization found.
pub async fn ask_holders(
    holders: &[SocketAddr],
    source: Option<IpAddr>,
    digest: FleetDigest,
    host: &str,
    token: &str,
    timeout: Duration,
) -> Option<String> {
    let mut asks = JoinSet::new();
    for holder in holders {
        let (holder, host, token) = (*holder, host.to_string(), token.to_string());
        asks.spawn(async move {
            let answer = tokio::time::timeout(
                timeout,
                ask(holder, (source, digest), &host, &token, timeout),
            )
            .await;
            match answer {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    tracing::debug!(%holder, error = %e, "asking holder for a challenge failed");
                    None
                }
                Err(_) => None,
            }
        });
    }
    while let Some(done) = asks.join_next().await {
        if let Ok(Some(found)) = done {
            asks.abort_all();
            return Some(found);
        }
    }
    None
}

/// `from`: the address to connect from, and this node's fleet digest,
/// which the mark carries so the holder sees drift.
async fn ask(
    holder: SocketAddr,
    (source, digest): (Option<IpAddr>, FleetDigest),
    host: &str,
    token: &str,
    timeout: Duration,
) -> std::io::Result<Option<String>> {
    let mut stream = connect::connect(holder, source, timeout)
        .await
        .map_err(std::io::Error::other)?;
    let request = format!(
        "GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nhost: {host}\r\n{FORWARDED_MARK}: {digest}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut response)
        .await?;
    Ok(key_authorization(&response))
}

/// The body of a complete `200` response, if that is what `response` is.
fn key_authorization(response: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = parsed.parse(response).ok()? else {
        return None;
    };
    if parsed.code != Some(200) {
        return None;
    }
    let body = response.get(head_len..)?;
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(body.len());
    let body = std::str::from_utf8(body.get(..length)?).ok()?.trim();
    (!body.is_empty()).then(|| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_complete_200s() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\ntok.k";
        assert_eq!(key_authorization(ok).as_deref(), Some("tok.k"));
        assert_eq!(key_authorization(b"HTTP/1.1 404 Not Found\r\n\r\nno"), None);
        assert_eq!(
            key_authorization(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nshort"),
            None
        );
        assert_eq!(key_authorization(b"garbage"), None);
    }
}

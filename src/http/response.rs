//! Writing a complete HTTP/1.1 response and closing: every answer this
//! router gives itself (port 80 and the admin listener) is one of these.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub async fn text(stream: &mut TcpStream, status: u16, headers: &str, body: &str) {
    send(
        stream,
        status,
        "text/plain; charset=utf-8",
        headers,
        body.as_bytes(),
    )
    .await;
}

pub async fn send(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    headers: &str,
    body: &[u8],
) {
    let reason = match status {
        200 => "OK",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Bad Gateway",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
        body.len()
    );
    let mut response = head.into_bytes();
    response.extend_from_slice(body);
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

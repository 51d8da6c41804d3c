//! Reads what precedes routing: an optional PROXY header (from trusted
//! peers only) and the ClientHello, under a deadline and a byte cap. The
//! bytes are kept for replay, never re-read from the socket.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::client_hello::{self, ClientHello, Invalid, MAX_HELLO_BYTES, Parse};
use crate::proxy_protocol::{self, Decode, MAX_HEADER_LEN, ProxiedAddrs};

/// Most hellos fit in one read of this size; larger ones grow the buffer.
const FIRST_READ: usize = 2048;

#[derive(Debug)]
pub struct Preamble {
    /// Addresses from a PROXY header sent by a trusted peer.
    pub proxied: Option<ProxiedAddrs>,
    pub hello: ClientHello,
    /// The hello and anything the client sent after it, to replay verbatim.
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("closed by client after {0} bytes, before a complete ClientHello")]
    Closed(usize),
    #[error("reading ClientHello: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("malformed PROXY header")]
    BadProxyHeader,
}

impl HelloError {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HelloError::Timeout(_) => "timeout",
            HelloError::Closed(_) => "closed",
            HelloError::Io(_) => "io",
            HelloError::Invalid(invalid) => invalid.kind(),
            HelloError::BadProxyHeader => "bad_proxy_header",
        }
    }
}

/// Reads a PROXY header (only if `allow_proxy`) and a ClientHello.
pub async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
    allow_proxy: bool,
    deadline: Duration,
) -> Result<Preamble, HelloError> {
    tokio::time::timeout(deadline, read_until_hello(stream, allow_proxy))
        .await
        .map_err(|_| HelloError::Timeout(deadline))?
}

async fn read_until_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    allow_proxy: bool,
) -> Result<Preamble, HelloError> {
    let cap = MAX_HELLO_BYTES + if allow_proxy { MAX_HEADER_LEN } else { 0 };
    let mut buf: Vec<u8> = Vec::new();
    let mut proxy_pending = allow_proxy;
    let mut proxied = None;
    let mut offset = 0;
    loop {
        let filled = buf.len();
        if filled >= cap {
            return Err(Invalid::TooLarge.into());
        }
        let want = if filled == 0 {
            FIRST_READ
        } else {
            filled.max(FIRST_READ)
        };
        buf.resize((filled + want).min(cap), 0);
        let n = stream.read(&mut buf[filled..]).await?;
        buf.truncate(filled + n);
        if n == 0 {
            return Err(HelloError::Closed(filled));
        }
        if proxy_pending {
            match proxy_protocol::decode(&buf) {
                Decode::Absent => proxy_pending = false,
                Decode::Incomplete => continue,
                Decode::Complete { len, addrs } => {
                    proxied = Some(addrs);
                    offset = len;
                    proxy_pending = false;
                }
                Decode::Invalid => return Err(HelloError::BadProxyHeader),
            }
        }
        match client_hello::parse(&buf[offset..]) {
            Parse::Complete(hello) => {
                buf.drain(..offset);
                return Ok(Preamble {
                    proxied,
                    hello,
                    bytes: buf,
                });
            }
            Parse::Incomplete => {}
            Parse::Invalid(invalid) => return Err(invalid.into()),
        }
    }
}

//! Reads what precedes a routing decision on either port: an optional
//! PROXY header (from trusted peers only), then a ClientHello or a request
//! head, under a deadline and a byte cap. The bytes are kept for replay,
//! never re-read from the socket.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use std::sync::Arc;

use std::net::SocketAddr;

use crate::config::{Config, NodeId};
use crate::limits::HelloSlots;
use crate::proxy_protocol::{self, Decode, MAX_HEADER_LEN, ProxiedAddrs};

/// Most prefaces fit in one read of this size; larger ones grow the buffer.
const FIRST_READ: usize = 2048;

/// A message read whole before routing: the ClientHello, an HTTP head.
pub trait Preface: Sized {
    /// Bytes read at most for the message (a PROXY header comes on top).
    const CAP: usize;
    type Invalid: std::error::Error + Copy + Send + Sync + 'static;
    /// Complete, incomplete (`Ok(None)`), or invalid.
    fn parse(buf: &[u8]) -> Result<Option<Self>, Self::Invalid>;
    fn too_large() -> Self::Invalid;
    fn invalid_kind(invalid: Self::Invalid) -> &'static str;
}

/// Implements [`Preface`] for a message whose module has a pure
/// `parse(&[u8]) -> Parse` with Complete / Incomplete / Invalid, an
/// `Invalid` error with `kind()` and a `TooLarge` variant.
#[macro_export]
macro_rules! impl_preface {
    ($message:ty, $cap:expr) => {
        impl $crate::preface::Preface for $message {
            const CAP: usize = $cap;
            type Invalid = Invalid;

            fn parse(buf: &[u8]) -> Result<Option<Self>, Invalid> {
                match parse(buf) {
                    Parse::Complete(message) => Ok(Some(message)),
                    Parse::Incomplete => Ok(None),
                    Parse::Invalid(invalid) => Err(invalid),
                }
            }

            fn too_large() -> Invalid {
                Invalid::TooLarge
            }

            fn invalid_kind(invalid: Invalid) -> &'static str {
                invalid.kind()
            }
        }
    };
}

#[derive(Debug)]
pub struct Preamble<T> {
    /// Addresses from a PROXY header sent by a trusted peer.
    pub proxied: Option<ProxiedAddrs>,
    pub parsed: T,
    /// The message and anything the client sent after it, to replay verbatim.
    pub bytes: Vec<u8>,
}

/// Who a connection is between, as routing and logs see it; the same on
/// both ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    /// The original client: from a trusted PROXY header, else the socket peer.
    pub client: SocketAddr,
    /// What the client connected to: from the PROXY header, else our address.
    pub destination: SocketAddr,
    /// The node that spliced the connection here, if one did: a node
    /// address **and** a PROXY header. A client on a node's host, with no
    /// header, is an ordinary client. Such connections get the loop guard.
    pub via_node: Option<NodeId>,
}

impl<T> Preamble<T> {
    /// The connection's ends, given its socket's `peer` and `local` address.
    pub fn ends(&self, config: &Config, peer: SocketAddr, local: SocketAddr) -> Ends {
        let proxied = self.proxied;
        Ends {
            client: proxied.and_then(|p| p.source).unwrap_or(peer),
            destination: proxied.and_then(|p| p.destination).unwrap_or(local),
            via_node: proxied.and_then(|_| config.node_at(peer.ip())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrefaceError<E: std::error::Error + 'static> {
    #[error("incomplete after {0:?}")]
    Timeout(Duration),
    #[error("closed by client after {0} bytes, before a complete message")]
    Closed(usize),
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Invalid(E),
    #[error("malformed PROXY header")]
    BadProxyHeader,
    #[error("evicted: too many connections still in their hello phase")]
    Evicted,
}

impl<E: std::error::Error + Copy + 'static> PrefaceError<E> {
    /// A bounded label for logs and metrics.
    pub fn kind(&self, invalid_kind: impl Fn(E) -> &'static str) -> &'static str {
        match self {
            PrefaceError::Timeout(_) => "timeout",
            PrefaceError::Closed(_) => "closed",
            PrefaceError::Io(_) => "io",
            PrefaceError::Invalid(invalid) => invalid_kind(*invalid),
            PrefaceError::BadProxyHeader => "bad_proxy_header",
            PrefaceError::Evicted => "evicted",
        }
    }
}

/// Reads a PROXY header (only if `allow_proxy`) and a `T`.
pub async fn read<T: Preface, S: AsyncRead + Unpin>(
    stream: &mut S,
    allow_proxy: bool,
    deadline: Duration,
) -> Result<Preamble<T>, PrefaceError<T::Invalid>> {
    tokio::time::timeout(deadline, read_until_complete(stream, allow_proxy))
        .await
        .map_err(|_| PrefaceError::Timeout(deadline))?
}

/// [`read`] while holding a hello-phase slot; eviction ends the read.
pub async fn read_in_slot<T: Preface, S: AsyncRead + Unpin>(
    stream: &mut S,
    allow_proxy: bool,
    deadline: Duration,
    slots: &Arc<HelloSlots>,
) -> Result<Preamble<T>, PrefaceError<T::Invalid>> {
    let mut slot = slots.enter();
    tokio::select! {
        read = read(stream, allow_proxy, deadline) => read,
        () = slot.evicted() => Err(PrefaceError::Evicted),
    }
}

async fn read_until_complete<T: Preface, S: AsyncRead + Unpin>(
    stream: &mut S,
    allow_proxy: bool,
) -> Result<Preamble<T>, PrefaceError<T::Invalid>> {
    let cap = T::CAP + if allow_proxy { MAX_HEADER_LEN } else { 0 };
    let mut buf: Vec<u8> = Vec::new();
    let mut proxy_pending = allow_proxy;
    let mut proxied = None;
    let mut offset = 0;
    loop {
        let filled = buf.len();
        if filled >= cap {
            return Err(PrefaceError::Invalid(T::too_large()));
        }
        let want = filled.max(FIRST_READ);
        buf.resize((filled + want).min(cap), 0);
        let n = match buf.get_mut(filled..) {
            Some(free) => stream.read(free).await?,
            None => 0,
        };
        buf.truncate(filled + n);
        if n == 0 {
            return Err(PrefaceError::Closed(filled));
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
                Decode::Invalid => return Err(PrefaceError::BadProxyHeader),
            }
        }
        match T::parse(buf.get(offset..).unwrap_or_default()) {
            Ok(Some(parsed)) => {
                buf.drain(..offset);
                return Ok(Preamble {
                    proxied,
                    parsed,
                    bytes: buf,
                });
            }
            Ok(None) => {}
            Err(invalid) => return Err(PrefaceError::Invalid(invalid)),
        }
    }
}

//! Raw forwarding of a connection whose first bytes were peeked: to a
//! passthrough backend, a plain-HTTP upstream, or holder nodes with failover. Nothing has reached the client until a target answers, so the
//! peeked bytes can be replayed to the next holder when one fails.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::connect::{self, ConnectError};
use crate::splice::{self, Transfer};

/// Enough for a server's first flight in one read; passed on at once.
const FIRST_READ: usize = 16 * 1024;

#[derive(Debug)]
pub struct Forwarded {
    pub target: SocketAddr,
    pub transfer: Transfer,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("replaying the hello to {0}: {1}")]
    Replay(SocketAddr, io::Error),
    #[error("holder {0} closed without answering the hello")]
    Refused(SocketAddr),
    #[error("holder {0} did not answer the hello in time")]
    Silent(SocketAddr),
    #[error("holder {0}: {1}")]
    Holder(SocketAddr, io::Error),
    #[error("writing to client: {0}")]
    Client(io::Error),
    #[error("no holder answered ({0} tried)")]
    NoHolder(usize),
}

impl ForwardError {
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(e) => e.kind(),
            ForwardError::Replay(..) => "target_error",
            ForwardError::Refused(_) => "holder_refused",
            ForwardError::Silent(_) => "holder_silent",
            ForwardError::Holder(..) => "holder_error",
            ForwardError::Client(_) => "client_error",
            ForwardError::NoHolder(_) => "no_holder_answered",
        }
    }
}

/// Joins the client to the first of `targets` that accepts a connection,
/// after sending it the optional header and the replayed bytes. Used for
/// passthrough backends and plain HTTP, where the target may wait for more
/// of the request before it answers.
pub async fn to_first_reachable(
    config: &Config,
    client: &mut TcpStream,
    targets: &[SocketAddr],
    source: Option<IpAddr>,
    header: Option<Vec<u8>>,
    replay: &[u8],
) -> Result<Forwarded, ForwardError> {
    let mut last = None;
    for target in targets {
        match connect::connect(*target, source, config.timeouts.connect).await {
            Ok(mut stream) => {
                let mut prefix = header.unwrap_or_default();
                prefix.extend_from_slice(replay);
                stream
                    .write_all(&prefix)
                    .await
                    .map_err(|e| ForwardError::Replay(*target, e))?;
                let mut transfer = splice::join(client, stream, config.timeouts.idle).await;
                transfer.to_target += replay.len() as u64;
                return Ok(Forwarded {
                    target: *target,
                    transfer,
                });
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "target unreachable, trying the next");
                last = Some(e);
            }
        }
    }
    Err(last.map_or(ForwardError::NoHolder(0), ForwardError::Connect))
}

/// Tries holders in order. A holder that cannot be reached, closes before
/// answering (a holder that cannot terminate refuses silently: see the
/// loop guard), or stays silent past the connect timeout is skipped.
pub async fn to_holders(
    config: &Config,
    client: &mut TcpStream,
    holders: &[SocketAddr],
    source: Option<IpAddr>,
    header: Vec<u8>,
    replay: &[u8],
) -> Result<Forwarded, ForwardError> {
    let mut prefix = header;
    prefix.extend_from_slice(replay);
    for holder in holders {
        match open_holder(config, *holder, source, &prefix).await {
            Ok((target, first)) => {
                client
                    .write_all(&first)
                    .await
                    .map_err(ForwardError::Client)?;
                let mut transfer = splice::join(client, target, config.timeouts.idle).await;
                transfer.to_target += replay.len() as u64;
                transfer.to_client += first.len() as u64;
                return Ok(Forwarded {
                    target: *holder,
                    transfer,
                });
            }
            Err(e) => tracing::warn!(%holder, error = %e, "holder failed, trying the next"),
        }
    }
    Err(ForwardError::NoHolder(holders.len()))
}

/// Connects, replays, and waits for the holder's first bytes.
async fn open_holder(
    config: &Config,
    holder: SocketAddr,
    source: Option<IpAddr>,
    prefix: &[u8],
) -> Result<(TcpStream, Vec<u8>), ForwardError> {
    let mut target = connect::connect(holder, source, config.timeouts.connect).await?;
    target
        .write_all(prefix)
        .await
        .map_err(|e| ForwardError::Replay(holder, e))?;
    let mut first = vec![0u8; FIRST_READ];
    let n = tokio::time::timeout(config.timeouts.connect, target.read(&mut first))
        .await
        .map_err(|_| ForwardError::Silent(holder))?
        .map_err(|e| ForwardError::Holder(holder, e))?;
    if n == 0 {
        return Err(ForwardError::Refused(holder));
    }
    first.truncate(n);
    Ok((target, first))
}

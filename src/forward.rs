//! Opening the far side of a connection whose first bytes were peeked: a
//! passthrough backend, a plain-HTTP upstream, or holder nodes with
//! failover. Nothing has reached the client until a target answers, so the
//! peeked bytes can be replayed to the next holder when one fails. The
//! caller joins the two sockets (see [`crate::splice`]).

use std::hash::Hasher;
use std::io;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Config, NodeId};
use crate::connect::{self, ConnectError};
use crate::metrics::{CONNECT_FAILURES, FAILOVERS};
use crate::peers::PeerHealth;
use crate::splice;

/// Orders holders by rendezvous hashing on the client address: each client
/// sticks to one holder, clients spread evenly, and losing a holder moves
/// only that holder's clients.
pub fn rendezvous(config: &Config, mut holders: Vec<NodeId>, client: IpAddr) -> Vec<NodeId> {
    holders
        .sort_by_cached_key(|n| std::cmp::Reverse(rendezvous_score(client, &config.node(*n).name)));
    holders
}

/// A holder's score for a client. Every node must compute the same number
/// whatever toolchain built it, so the algorithm is spelled out (std's
/// `DefaultHasher` promises no such thing): SipHash-1-3 with an all-zero
/// key over the client address as 16 bytes (IPv4 as IPv4-mapped IPv6),
/// then the node's name in UTF-8. A test pins it to known values.
pub fn rendezvous_score(client: IpAddr, node: &str) -> u64 {
    let client = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(&client.octets());
    h.write(node.as_bytes());
    h.finish()
}

/// Enough for a server's first flight in one read; passed on at once.
const FIRST_READ: usize = 16 * 1024;

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A holder node's TLS or HTTP port.
    Node,
    /// A passthrough backend, with its own certificate.
    Backend,
    /// A held site's plaintext upstream.
    Upstream,
}

impl TargetKind {
    /// The metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Node => "node",
            TargetKind::Backend => "backend",
            TargetKind::Upstream => "upstream",
        }
    }
}

/// Where to connect, and how metrics name it (a node or a site from the
/// config: a closed set).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub kind: TargetKind,
    pub label: String,
}

impl Target {
    /// A holder node's port (`tls` or `http`), named by the node.
    pub fn node(node: &crate::config::Node, addr: SocketAddr) -> Target {
        Target {
            addr,
            kind: TargetKind::Node,
            label: node.name.clone(),
        }
    }

    fn connected(&self, peers: &PeerHealth) {
        if self.kind == TargetKind::Node {
            peers.seen(&self.label);
        }
    }

    fn failed(&self, peers: &PeerHealth, error: &ForwardError) {
        if self.kind == TargetKind::Node {
            peers.failed(&self.label, &error.to_string());
        }
    }

    fn connect_failed(&self) {
        let kind = self.kind.as_str();
        metrics::counter!(CONNECT_FAILURES, "kind" => kind, "target" => self.label.clone())
            .increment(1);
    }
}

/// A target that took the replayed bytes, ready to be joined.
#[derive(Debug)]
pub struct Opened {
    pub target: SocketAddr,
    pub stream: TcpStream,
    /// Bytes replayed to the target (the peeked hello or request head).
    pub replayed: u64,
    /// Bytes of the target's answer already passed to the client.
    pub answered: u64,
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

/// What forwarding needs besides the streams.
pub struct Via<'a> {
    pub config: &'a Config,
    /// Where peers' reachability is recorded.
    pub peers: &'a PeerHealth,
    /// Local address to connect from (a node's own, for node targets).
    pub source: Option<IpAddr>,
}

/// How joined sockets move bytes under `config`.
pub fn mode(config: &Config) -> splice::Mode {
    if config.limits.zero_copy {
        splice::Mode::default_for_platform()
    } else {
        splice::Mode::Copy
    }
}

/// Opens the first of `targets` that accepts a connection and sends it the
/// optional header and the replayed bytes. Used for passthrough backends
/// and plain HTTP, where the target may wait for more of the request before
/// it answers.
pub async fn to_first_reachable(
    via: Via<'_>,
    targets: &[Target],
    header: Option<Vec<u8>>,
    replay: Vec<u8>,
) -> Result<Opened, ForwardError> {
    let replayed = replay.len() as u64;
    let prefix = match header {
        Some(mut header) => {
            header.extend_from_slice(&replay);
            header
        }
        None => replay,
    };
    let mut last = None;
    let mut connected = None;
    for target in targets {
        let timeout = via.config.timeouts.connect;
        match connect::connect_sending(target.addr, via.source, timeout, &prefix).await {
            Ok(opened) => {
                target.connected(via.peers);
                connected = Some((target, opened));
                break;
            }
            Err(e) => {
                tracing::warn!(target = %target.addr, error = %e, "target unreachable, trying the next");
                target.connect_failed();
                let e = ForwardError::Connect(e);
                target.failed(via.peers, &e);
                last = Some(e);
            }
        }
    }
    let Some((target, (mut stream, rest))) = connected else {
        return Err(last.unwrap_or(ForwardError::NoHolder(0)));
    };
    stream
        .write_all(rest)
        .await
        .map_err(|e| ForwardError::Replay(target.addr, e))?;
    Ok(Opened {
        target: target.addr,
        stream,
        replayed,
        answered: 0,
    })
}

/// Tries holders in order and passes the first answer on to `client`. A
/// holder that cannot be reached, closes before answering (a holder that
/// cannot terminate refuses silently: see the loop guard), or stays silent
/// past the connect timeout is skipped.
pub async fn to_holders(
    via: Via<'_>,
    client: &mut TcpStream,
    holders: &[Target],
    header: Vec<u8>,
    replay: Vec<u8>,
) -> Result<Opened, ForwardError> {
    let replayed = replay.len() as u64;
    let mut prefix = header;
    prefix.extend_from_slice(&replay);
    drop(replay);
    let mut opened = None;
    for holder in holders {
        match open_holder(via.config, holder.addr, via.source, &prefix).await {
            Ok(pair) => {
                holder.connected(via.peers);
                opened = Some((holder, pair));
                break;
            }
            Err(e) => {
                tracing::warn!(holder = %holder.addr, node = %holder.label, error = %e, "holder failed, trying the next");
                if matches!(e, ForwardError::Connect(_)) {
                    holder.connect_failed();
                    holder.failed(via.peers, &e);
                } else {
                    holder.connected(via.peers);
                }
                metrics::counter!(FAILOVERS, "node" => holder.label.clone()).increment(1);
            }
        }
    }
    drop(prefix);
    let Some((holder, (stream, first))) = opened else {
        return Err(ForwardError::NoHolder(holders.len()));
    };
    client
        .write_all(&first)
        .await
        .map_err(ForwardError::Client)?;
    Ok(Opened {
        target: holder.addr,
        stream,
        replayed,
        answered: first.len() as u64,
    })
}

/// Connects, replays, and waits for the holder's first bytes.
async fn open_holder(
    config: &Config,
    holder: SocketAddr,
    source: Option<IpAddr>,
    prefix: &[u8],
) -> Result<(TcpStream, Vec<u8>), ForwardError> {
    let (mut target, rest) =
        connect::connect_sending(holder, source, config.timeouts.connect, prefix).await?;
    target
        .write_all(rest)
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
    first.shrink_to_fit();
    Ok((target, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes built by different toolchains must agree: these values are the
    /// algorithm's, and may never change.
    #[test]
    fn rendezvous_scores_are_pinned() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(rendezvous_score(v4, "edge-a"), PINNED[0]);
        assert_eq!(rendezvous_score(mapped, "edge-a"), PINNED[0]);
        assert_eq!(rendezvous_score(v4, "edge-b"), PINNED[1]);
        assert_eq!(rendezvous_score(v6, "edge-a"), PINNED[2]);
    }

    // Computed independently of the crate, from the SipHash paper's
    // reference algorithm (checked against its published vector).
    const PINNED: [u64; 3] = [8078364907696529724, 543210705070796059, 8125288274471884935];
}

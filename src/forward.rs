//! Opening the far side of a connection whose first bytes were peeked: a
//! passthrough backend pool, a plain-HTTP upstream pool, or holder nodes,
//! all through one engine with failover. Nothing has reached the client until a target answers, so the
//! peeked bytes can be replayed to the next holder when one fails. The
//! caller joins the two sockets (see [`crate::splice`]).

use std::hash::Hasher;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use siphasher::sip::SipHasher13;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Config, NodeId, Pool};
use crate::connect::{self, ConnectError};
use crate::health::TargetHealth;
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
/// Borrowed from the config the connection is routed by: building the
/// list costs no string copy per connection.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub kind: TargetKind,
    pub label: &'a str,
}

impl<'a> Target<'a> {
    /// A holder node's port (`tls` or `http`), named by the node.
    pub fn node(node: &'a crate::config::Node, addr: SocketAddr) -> Self {
        Target {
            addr,
            kind: TargetKind::Node,
            label: &node.name,
        }
    }

    /// Each of `addrs`, of one `kind`, named by `label` (a site's).
    pub fn each(addrs: &[SocketAddr], kind: TargetKind, label: &'a str) -> Vec<Self> {
        addrs
            .iter()
            .map(|addr| Target {
                addr: *addr,
                kind,
                label,
            })
            .collect()
    }

    /// A held site's upstream pool, in `client`'s order.
    pub fn upstreams(pool: &Pool, client: IpAddr, label: &'a str) -> Vec<Self> {
        Self::each(pool.order(client).as_slice(), TargetKind::Upstream, label)
    }

    fn connected(&self, peers: &PeerHealth) {
        if self.kind == TargetKind::Node {
            peers.seen(self.label);
        }
    }

    fn failed(&self, peers: &PeerHealth, error: &ForwardError) {
        if self.kind == TargetKind::Node {
            peers.failed(self.label, &error.to_string());
        }
    }

    fn connect_failed(&self) {
        let kind = self.kind.as_str();
        metrics::counter!(CONNECT_FAILURES, "kind" => kind, "target" => self.label.to_string())
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
    /// The target's first bytes, when they were awaited: the caller passes
    /// them to the client before joining.
    pub first: Vec<u8>,
}

impl Opened {
    /// Passes the awaited first bytes to `client`; how many.
    pub async fn pass_first(&mut self, client: &mut TcpStream) -> Result<u64, ForwardError> {
        let first = std::mem::take(&mut self.first);
        client
            .write_all(&first)
            .await
            .map_err(ForwardError::Client)?;
        Ok(first.len() as u64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("replaying the hello to {0}: {1}")]
    Replay(SocketAddr, io::Error),
    #[error("{0} closed without answering the hello")]
    Refused(SocketAddr),
    #[error("{0} did not answer the hello in time")]
    Silent(SocketAddr),
    #[error("{0}: {1}")]
    Holder(SocketAddr, io::Error),
    #[error("writing to client: {0}")]
    Client(io::Error),
    #[error("no target answered ({0} tried)")]
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
    /// Which targets failed lately, for every target kind.
    pub health: &'a TargetHealth,
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

/// When a target counts as having answered, by who speaks next on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A holder node: its first bytes (a ServerHello) must arrive before
    /// the client is committed to it, since a holder that cannot terminate
    /// closes without a word.
    First,
    /// A passthrough backend: its first bytes are awaited while another
    /// target is left to fail over to; the last one is taken at connect.
    FirstWhileOthersLeft,
    /// A plaintext upstream, or a holder's HTTP port: the client speaks
    /// next, so a connection is the answer.
    Connect,
}

/// Opens the first of `targets` that answers, in their order with those
/// that failed lately moved to the back, and sends it the optional header
/// and the replayed bytes. One engine for holders, backend pools and
/// upstreams: the connect timeout per target, failover on refusal, on a
/// timeout and on a close before answering, and the same health record.
pub async fn open(
    via: Via<'_>,
    targets: &[Target<'_>],
    header: Option<Vec<u8>>,
    replay: Vec<u8>,
    answer: Answer,
) -> Result<Opened, ForwardError> {
    let replayed = replay.len() as u64;
    let prefix = match header {
        Some(mut header) => {
            header.extend_from_slice(&replay);
            header
        }
        None => replay,
    };
    let reordered = via
        .health
        .order(targets.iter().map(|t| &t.addr), Instant::now());
    let mut last = None;
    for n in 0..targets.len() {
        let i = reordered
            .as_ref()
            .and_then(|o| o.get(n).copied())
            .unwrap_or(n);
        let Some(target) = targets.get(i) else {
            continue;
        };
        let wait = match answer {
            Answer::First => true,
            Answer::FirstWhileOthersLeft => n + 1 < targets.len(),
            Answer::Connect => false,
        };
        match attempt(via.config, target.addr, via.source, &prefix, wait).await {
            Ok((stream, first)) => {
                target.connected(via.peers);
                via.health.succeeded(target.addr);
                return Ok(Opened {
                    target: target.addr,
                    stream,
                    replayed,
                    first,
                });
            }
            Err(e) => {
                tracing::warn!(target = %target.addr, kind = target.kind.as_str(), label = %target.label, error = %e, "target failed, trying the next");
                via.health.failed(target.addr, Instant::now());
                if matches!(e, ForwardError::Connect(_)) {
                    target.connect_failed();
                    target.failed(via.peers, &e);
                } else {
                    target.connected(via.peers);
                }
                if target.kind == TargetKind::Node {
                    metrics::counter!(FAILOVERS, "node" => target.label.to_string()).increment(1);
                }
                last = Some(e);
            }
        }
    }
    // Holders are reported together; a pool by what its last target did.
    Err(match last {
        Some(e) if answer != Answer::First => e,
        _ => ForwardError::NoHolder(targets.len()),
    })
}

/// Connects, replays, and with `wait` waits for the target's first bytes.
async fn attempt(
    config: &Config,
    addr: SocketAddr,
    source: Option<IpAddr>,
    prefix: &[u8],
    wait: bool,
) -> Result<(TcpStream, Vec<u8>), ForwardError> {
    let (mut target, rest) =
        connect::connect_sending(addr, source, config.timeouts.connect, prefix).await?;
    target
        .write_all(rest)
        .await
        .map_err(|e| ForwardError::Replay(addr, e))?;
    if !wait {
        return Ok((target, Vec::new()));
    }
    let mut first = vec![0u8; FIRST_READ];
    let n = tokio::time::timeout(config.timeouts.connect, target.read(&mut first))
        .await
        .map_err(|_| ForwardError::Silent(addr))?
        .map_err(|e| ForwardError::Holder(addr, e))?;
    if n == 0 {
        return Err(ForwardError::Refused(addr));
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

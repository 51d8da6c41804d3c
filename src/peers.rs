//! What this node last saw of its peers: every connect to a peer (splices,
//! forwarded challenges) reports here, and a light probe (a TCP connect to
//! each peer's TLS port, closed at once) fills quiet periods.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::{Config, FleetDigest};
use crate::connect;
use crate::metrics::CONFIG_DRIFT;

/// Often enough for a status page; rare enough to be noise-free.
const PROBE_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerState {
    /// Unix seconds of the last successful connect.
    pub last_seen: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    /// The fleet digest the peer last sent (on a splice or a forwarded
    /// challenge), when, and whether it was ours.
    pub config_digest: Option<String>,
    pub config_digest_seen_at: Option<u64>,
    pub config_digest_matches: Option<bool>,
    /// Whether the last connect worked: the `sni_router_peer_up` gauge.
    #[serde(skip)]
    up: Option<bool>,
}

#[derive(Debug, Default)]
pub struct PeerHealth {
    peers: Mutex<HashMap<String, PeerState>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PeerHealth {
    /// Whether the last connect to `node` worked; `None` before any.
    pub fn up(&self, node: &str) -> Option<bool> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(node).and_then(|p| p.up)
    }

    pub fn seen(&self, node: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let state = peers.entry(node.to_string()).or_default();
        state.last_seen = Some(unix_now());
        state.up = Some(true);
    }

    pub fn failed(&self, node: &str, error: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let state = peers.entry(node.to_string()).or_default();
        state.last_error = Some(error.to_string());
        state.last_error_at = Some(unix_now());
        state.up = Some(false);
    }

    /// A connection that `from` marked as a node's carried `digest`: count
    /// a mismatch with ours, and log the first of each new disagreement.
    /// Peers that send none (older builds) are not compared.
    pub fn heard(&self, config: &Config, from: IpAddr, digest: Option<FleetDigest>) {
        let (Some(node), Some(digest)) = (config.node_at(from), digest) else {
            return;
        };
        let name = &config.node(node).name;
        let matches = digest == config.digest;
        let text = digest.to_string();
        let changed = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let state = peers.entry(name.clone()).or_default();
            let changed = state.config_digest.as_deref() != Some(text.as_str());
            state.config_digest = Some(text);
            state.config_digest_seen_at = Some(unix_now());
            state.config_digest_matches = Some(matches);
            changed
        };
        if !matches {
            metrics::counter!(CONFIG_DRIFT, "node" => name.clone()).increment(1);
            if changed {
                tracing::warn!(
                    peer = %name, theirs = %digest, ours = %config.digest,
                    "config drift: this peer's nodes and sites differ from ours"
                );
            }
        }
    }

    pub fn get(&self, node: &str) -> PeerState {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(node).cloned().unwrap_or_default()
    }
}

/// What a probe round connects to: every other node's TLS port, from this
/// node's own address, within the `connect` timeout.
pub struct Targets {
    nodes: Vec<(String, SocketAddr)>,
    source: Option<IpAddr>,
    timeout: Duration,
}

pub fn targets(config: &Config) -> Targets {
    let nodes = config
        .nodes
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != config.this_node.0)
        .map(|(_, node)| (node.name.clone(), node.tls))
        .collect();
    Targets {
        nodes,
        source: Some(config.this().tls.ip()),
        timeout: config.timeouts.connect,
    }
}

/// Probes the nodes `current()` names (read again each round, so a reload
/// counts) until the task is dropped.
pub async fn probe(peers: &PeerHealth, current: impl Fn() -> Targets) {
    loop {
        let round = current();
        for (name, addr) in &round.nodes {
            match connect::connect(*addr, round.source, round.timeout).await {
                Ok(_) => peers.seen(name),
                Err(e) => peers.failed(name, &e.to_string()),
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

//! One connection on a TLS listener: read the preamble, decide, act, and log
//! one line when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::client_hello::{ClientHello, Invalid};
use super::forward::{self, ForwardError, Forwarded};
use super::route::{self, Decision, Peer};
use super::terminate::{self, Ends};
use crate::config::ProxyVersion;
use crate::preface::{self, PrefaceError};
use crate::proxy_protocol;
use crate::server::{Live, Shared};
use crate::splice::Transfer;

/// A fatal `unrecognized_name` alert (RFC 6066 section 3): tells a client
/// why we close instead of leaving it to guess.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70];

/// Everything the finished-connection log line reports.
struct Outcome {
    /// The original client, when a trusted PROXY header named one.
    client: Option<SocketAddr>,
    sni: Option<String>,
    decision: &'static str,
    reason: String,
    target: Option<SocketAddr>,
    transfer: Option<Transfer>,
}

impl Outcome {
    fn new(decision: &'static str, reason: impl Into<String>) -> Self {
        Outcome {
            client: None,
            sni: None,
            decision,
            reason: reason.into(),
            target: None,
            transfer: None,
        }
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    live: Arc<Live>,
    listener: usize,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let started = Instant::now();
    let outcome = route_connection(&shared, &live, listener, &mut stream, peer, local).await;
    let (up, down, end) = match &outcome.transfer {
        Some(t) => (t.to_target, t.to_client, t.end.to_string()),
        None => (0, 0, outcome.reason.clone()),
    };
    shared.stats.finished(outcome.decision);
    tracing::info!(
        target: "sni_router::conn",
        client = %outcome.client.unwrap_or(peer),
        via = %peer,
        sni = outcome.sni.as_deref().unwrap_or("-"),
        decision = outcome.decision,
        target = %outcome.target.map_or_else(|| "-".to_string(), |t| t.to_string()),
        bytes_up = up,
        bytes_down = down,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %end,
        "connection finished"
    );
}

async fn route_connection(
    shared: &Shared,
    live: &Live,
    listener: usize,
    stream: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Outcome {
    let config = &live.config;
    let from_node = config.is_node_address(peer.ip());
    let allow_proxy = config.may_send_proxy(peer.ip());
    let read = preface::read::<ClientHello, _>(stream, allow_proxy, config.timeouts.hello).await;
    let preamble = match read {
        Ok(preamble) => preamble,
        Err(e) => return hello_failed(e),
    };
    // The original client: from a trusted PROXY header, else the socket peer.
    let client = preamble.proxied.and_then(|p| p.source).unwrap_or(peer);
    let destination = preamble
        .proxied
        .and_then(|p| p.destination)
        .unwrap_or(local);
    let sni = preamble.parsed.sni.clone();
    let decision = route::decide(
        config,
        listener,
        sni.as_deref(),
        Peer {
            client: client.ip(),
            from_node,
        },
        |site, name| {
            let name = preamble.parsed.sni.as_deref().or(Some(name));
            shared
                .certs
                .valid_for(&config.site(site).label, name, SystemTime::now())
                .is_some()
        },
    );
    let mut outcome = match decision {
        Decision::Reject(reject) => {
            if reject == route::Reject::LoopGuard {
                tracing::warn!(
                    client = %client, via = %peer, sni = sni.as_deref().unwrap_or("-"),
                    "config conflict: a node spliced a name here that this node cannot terminate"
                );
            }
            // A node that spliced to us learns of the refusal by a close
            // with no reply, and fails over to its next holder.
            if sni.is_some() && !from_node {
                let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            }
            Outcome::new("reject", reject.kind())
        }
        Decision::Passthrough { site, backend } => {
            let header = config
                .site(site)
                .proxy_protocol
                .map(|v| proxy_protocol::encode(v, client, destination));
            let result = forward::to_first_reachable(
                config,
                stream,
                &[backend],
                None,
                header,
                &preamble.bytes,
            )
            .await;
            forwarded("passthrough", result)
        }
        Decision::Splice { site, holders } => {
            if config.holds(site) {
                shared.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    site = %config.site(site).label, client = %client,
                    "no valid certificate here for a held site: splicing to another holder"
                );
            }
            let targets: Vec<SocketAddr> = holders.iter().map(|h| config.node(*h).tls).collect();
            // Node-to-node splices always carry PROXY v2: the terminating
            // node needs the client address, and the loop guard its source.
            let header = proxy_protocol::encode(ProxyVersion::V2, client, destination);
            let source = Some(config.this().tls.ip());
            let result =
                forward::to_holders(config, stream, &targets, source, header, &preamble.bytes)
                    .await;
            forwarded("splice", result)
        }
        Decision::Terminate { site } => {
            let ends = Ends {
                client,
                destination,
            };
            match terminate::serve(config, &live.tls, site, stream, preamble.bytes, ends).await {
                Ok((upstream, transfer)) => Outcome {
                    reason: transfer.end.kind().to_string(),
                    target: Some(upstream),
                    transfer: Some(transfer),
                    ..Outcome::new("terminate", "")
                },
                Err(e) => Outcome::new("terminate", format!("{}: {e}", e.kind())),
            }
        }
    };
    outcome.sni = sni;
    outcome.client = Some(client);
    outcome
}

fn hello_failed(e: PrefaceError<Invalid>) -> Outcome {
    let kind = e.kind(Invalid::kind);
    Outcome::new("reject", format!("{kind}: ClientHello {e}"))
}

fn forwarded(decision: &'static str, result: Result<Forwarded, ForwardError>) -> Outcome {
    match result {
        Ok(Forwarded { target, transfer }) => Outcome {
            reason: transfer.end.kind().to_string(),
            target: Some(target),
            transfer: Some(transfer),
            ..Outcome::new(decision, "")
        },
        Err(e) => Outcome::new(decision, format!("{}: {e}", e.kind())),
    }
}

//! One connection on a TLS listener: read the preamble, decide, act, and log
//! one line when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::client_hello::{ClientHello, Invalid};
use super::forward::{self, ForwardError, Forwarded, Target, Via};
use super::route::{self, Decision, Peer};
use super::terminate::{self, Ends};
use crate::config::ProxyVersion;
use crate::metrics::{
    BYTES, CONNECTIONS_FINISHED, HANDSHAKE_FAILURES, HELLO_FAILURES, HELLO_SECONDS, REJECTED,
    TERMINATE_FALLBACKS,
};
use crate::preface::{self, PrefaceError};
use crate::proxy_protocol;
use crate::server::{Live, Shared};
use crate::splice::Transfer;

/// A fatal `unrecognized_name` alert (RFC 6066 section 3): tells a client
/// why we close instead of leaving it to guess.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70];

/// Everything the finished-connection log line and metrics report.
struct Outcome {
    /// The original client, when a trusted PROXY header named one.
    client: Option<SocketAddr>,
    sni: Option<String>,
    decision: &'static str,
    /// How it ended, as a bounded label (`closed`, `unknown_name`, ...).
    kind: &'static str,
    /// The same, with detail for the log.
    detail: String,
    target: Option<SocketAddr>,
    transfer: Option<Transfer>,
}

impl Outcome {
    fn new(decision: &'static str, kind: &'static str, detail: impl Into<String>) -> Self {
        Outcome {
            client: None,
            sni: None,
            decision,
            kind,
            detail: detail.into(),
            target: None,
            transfer: None,
        }
    }

    fn joined(decision: &'static str, target: SocketAddr, transfer: Transfer) -> Self {
        Outcome {
            kind: transfer.end.kind(),
            detail: transfer.end.to_string(),
            target: Some(target),
            transfer: Some(transfer),
            ..Outcome::new(decision, "", "")
        }
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    live: Arc<Live>,
    (listener, listener_label): (usize, Arc<str>),
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let started = Instant::now();
    let outcome =
        route_connection(&shared, &live, listener, &mut stream, peer, local, started).await;
    if outcome.kind == "closed" && outcome.sni.is_none() && live.config.is_node_address(peer.ip()) {
        // A peer's health probe: connected and closed without a byte.
        return;
    }
    let (up, down) = outcome
        .transfer
        .as_ref()
        .map_or((0, 0), |t| (t.to_target, t.to_client));
    shared.stats.finished(outcome.decision);
    metrics::counter!(CONNECTIONS_FINISHED, "listener" => listener_label, "decision" => outcome.decision).increment(1);
    if outcome.decision == "reject" {
        metrics::counter!(REJECTED, "reason" => outcome.kind).increment(1);
    }
    metrics::counter!(BYTES, "direction" => "up", "decision" => outcome.decision).increment(up);
    metrics::counter!(BYTES, "direction" => "down", "decision" => outcome.decision).increment(down);
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
        end = %outcome.detail,
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
    accepted: Instant,
) -> Outcome {
    let config = &live.config;
    let from_node = config.is_node_address(peer.ip());
    let allow_proxy = config.may_send_proxy(peer.ip());
    let deadline = config.timeouts.hello;
    // Setup phases are boxed: their state is freed once done, so a
    // long-lived joined connection keeps only the join's small state.
    let slots = &shared.hello_slots;
    let read = Box::pin(preface::read_in_slot::<ClientHello, _>(
        stream,
        allow_proxy,
        deadline,
        slots,
    ))
    .await;
    let preamble = match read {
        Ok(preamble) => preamble,
        Err(e) => return hello_failed(e),
    };
    metrics::histogram!(HELLO_SECONDS).record(accepted.elapsed().as_secs_f64());
    // The original client: from a trusted PROXY header, else the socket peer.
    let client = preamble.proxied.and_then(|p| p.source).unwrap_or(peer);
    let destination = preamble
        .proxied
        .and_then(|p| p.destination)
        .unwrap_or(local);
    let sni = preamble.parsed.sni.clone();
    if sni.is_none() {
        metrics::counter!(HELLO_FAILURES, "reason" => "no_sni").increment(1);
    }
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
            Outcome::new("reject", reject.kind(), reject.kind())
        }
        Decision::Passthrough { site, backend } => {
            let site = config.site(site);
            let header = site
                .proxy_protocol
                .map(|v| proxy_protocol::encode(v, client, destination));
            let target = Target {
                addr: backend,
                kind: "backend",
                label: site.label.clone(),
            };
            let via = Via {
                config,
                peers: &shared.peers,
                source: None,
            };
            let result =
                forward::to_first_reachable(via, stream, &[target], header, preamble.bytes).await;
            forwarded("passthrough", result)
        }
        Decision::Splice { site, holders } => {
            if config.holds(site) {
                shared.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                let label = config.site(site).label.clone();
                metrics::counter!(TERMINATE_FALLBACKS, "site" => label.clone()).increment(1);
                tracing::warn!(
                    site = %label, client = %client,
                    "no valid certificate here for a held site: splicing to another holder"
                );
            }
            let targets: Vec<Target> = holders
                .iter()
                .map(|h| Target {
                    addr: config.node(*h).tls,
                    kind: "node",
                    label: config.node(*h).name.clone(),
                })
                .collect();
            // Node-to-node splices always carry PROXY v2: the terminating
            // node needs the client address, and the loop guard its source.
            let header = proxy_protocol::encode(ProxyVersion::V2, client, destination);
            let via = Via {
                config,
                peers: &shared.peers,
                source: Some(config.this().tls.ip()),
            };
            let result = forward::to_holders(via, stream, &targets, header, preamble.bytes).await;
            forwarded("splice", result)
        }
        Decision::Terminate { site } => {
            let ends = Ends {
                client,
                destination,
            };
            // Boxed: only terminated connections pay for the handshake state.
            let serve = Box::pin(terminate::serve(
                config,
                &live.tls,
                site,
                stream,
                preamble.bytes,
                ends,
            ));
            match serve.await {
                Ok((upstream, transfer)) => Outcome::joined("terminate", upstream, transfer),
                Err(e) => {
                    if e.is_handshake() {
                        metrics::counter!(HANDSHAKE_FAILURES, "reason" => e.kind()).increment(1);
                    }
                    Outcome::new("terminate", e.kind(), format!("{}: {e}", e.kind()))
                }
            }
        }
    };
    outcome.sni = sni;
    outcome.client = Some(client);
    outcome
}

fn hello_failed(e: PrefaceError<Invalid>) -> Outcome {
    let kind = e.kind(Invalid::kind);
    metrics::counter!(HELLO_FAILURES, "reason" => kind).increment(1);
    Outcome::new("reject", kind, format!("{kind}: ClientHello {e}"))
}

fn forwarded(decision: &'static str, result: Result<Forwarded, ForwardError>) -> Outcome {
    match result {
        Ok(Forwarded { target, transfer }) => Outcome::joined(decision, target, transfer),
        Err(e) => Outcome::new(decision, e.kind(), format!("{}: {e}", e.kind())),
    }
}

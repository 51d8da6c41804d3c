//! One connection on a TLS listener: read the preamble, decide, act, and log
//! one line when it ends. Routing runs in the accept's task; a spliced
//! connection then lives on in a small task of its own that holds only the
//! joined sockets and what its log line needs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::client_hello::{ClientHello, Invalid};
use super::prefixed::Prefixed;
use super::route::{self, Decision, Peer};
use super::terminate::{self, Ends};
use crate::forward::{self, ForwardError, Opened, Target, TargetKind, Via};
use crate::metrics::{
    HANDSHAKE_FAILURES, HELLO_FAILURES, HELLO_SECONDS, ListenerMetrics, REJECTED,
    TERMINATE_FALLBACKS,
};
use crate::preface::{self, PrefaceError};
use crate::proxy_protocol;
use crate::splice::{Copied, Joined, Joint, Moved, Quiet, Transfer};
use crate::state::{Admission, Live, Shared};

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

/// A connection accepted on a TLS listener, before its first byte.
pub struct Accepted {
    pub shared: Arc<Shared>,
    pub live: Arc<Live>,
    /// Index into `config.listeners`, and the listener's metric handles.
    pub listener: (usize, Arc<ListenerMetrics>),
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub admission: Admission,
}

/// Where routing left a connection. Returned once and moved straight into
/// its task, so the size gap between variants costs one copy, where a box
/// would cost an allocation per connection.
#[allow(clippy::large_enum_variant)]
enum Routed {
    Done(Outcome),
    /// Both ends connected: join them in a task of their own.
    Joining(Pair, Joining),
}

/// The two ends of a routed connection.
#[allow(clippy::large_enum_variant)]
enum Pair {
    /// Raw TCP to a backend or holder node.
    Spliced(Joined),
    /// TLS terminated here, plaintext to the upstream.
    Terminated(Copied<TlsStream<Prefixed<TcpStream>>, TcpStream>),
}

/// What the log line needs of a joined connection besides its transfer.
struct Joining {
    decision: &'static str,
    client: SocketAddr,
    target: SocketAddr,
    /// Bytes replayed to the target and answered to the client while routing.
    prefix: (u64, u64),
    sni: Option<String>,
}

pub async fn handle(accepted: Accepted, stream: TcpStream) {
    let started = Instant::now();
    let Accepted {
        shared,
        live,
        listener: (listener, label),
        peer,
        local,
        admission,
    } = accepted;
    let routed = route_connection(&shared, &live, listener, stream, peer, local, started).await;
    let report = Report {
        shared,
        listener: label,
        peer,
        started,
        _admission: admission,
    };
    match routed {
        Routed::Done(outcome) => {
            let probe = outcome.kind == "closed" && outcome.sni.is_none();
            if probe && live.config.is_node_address(peer.ip()) {
                // A peer's health probe: connected and closed without a byte.
                return;
            }
            report.finish(outcome);
        }
        Routed::Joining(pair, joining) => {
            let tasks = report.shared.tasks.clone();
            match pair {
                Pair::Spliced(join) => {
                    tasks.spawn(Connected {
                        join,
                        ending: Some((report, joining)),
                    });
                }
                Pair::Terminated(join) => {
                    tasks.spawn(Connected {
                        join,
                        ending: Some((report, joining)),
                    });
                }
            };
        }
    }
}

/// What the finished-connection line and metrics need besides the outcome;
/// dropping it releases the connection's admission.
struct Report {
    shared: Arc<Shared>,
    listener: Arc<ListenerMetrics>,
    peer: SocketAddr,
    started: Instant,
    _admission: Admission,
}

impl Report {
    fn finish(self, outcome: Outcome) {
        let Report {
            shared,
            listener,
            peer,
            started,
            ..
        } = &self;
        let (up, down) = outcome
            .transfer
            .as_ref()
            .map_or((0, 0), |t| (t.to_target, t.to_client));
        shared.stats.finished(outcome.decision);
        listener.finished(outcome.decision, up, down);
        if outcome.decision == "reject" {
            metrics::counter!(REJECTED, "reason" => outcome.kind).increment(1);
        }
        tracing::info!(
            target: "sni_router::conn",
            client = %outcome.client.unwrap_or(*peer),
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
}

pin_project_lite::pin_project! {
    /// A connection after routing: its whole task, the joined ends and what
    /// its log line needs, written as a plain future so nothing is stored
    /// twice.
    struct Connected<J: Moved> {
        #[pin]
        join: J,
        // Taken when the join ends or hands its sockets on.
        ending: Option<(Report, Joining)>,
    }

    // A task dropped before its join ended (the drain period ran out and
    // the runtime is going away) still logs and counts its connection.
    impl<J: Moved> PinnedDrop for Connected<J> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((report, mut joining)) = this.ending.take() {
                let (to_target, to_client) = this.join.moved();
                let end = crate::splice::End::Drained;
                let transfer = Transfer { to_target, to_client, end };
                report.finish(joining.outcome(transfer));
            }
        }
    }
}

impl<J> Future for Connected<J>
where
    J: Future + Moved,
    J::Output: Into<Joint>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let joint = std::task::ready!(this.join.poll(cx)).into();
        if let Some((report, mut joining)) = this.ending.take() {
            match joint {
                Joint::Ended(transfer) => report.finish(joining.outcome(transfer)),
                Joint::Quiet(quiet) => hand_over(report, joining, quiet),
            }
        }
        Poll::Ready(())
    }
}

/// A spliced pair moves to a splice engine after this long without a byte:
/// long enough that a short exchange or a bulk transfer never pays for the
/// move (the engine's nested epoll costs a syscall per wake-up), short
/// enough that keep-alive connections soon cost only their slab entry.
#[cfg(target_os = "linux")]
const QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands a quiet pair to a splice engine; its log line is written when the
/// engine ends it. The tracker token keeps the drain waiting meanwhile.
fn hand_over(report: Report, mut joining: Joining, quiet: Quiet) {
    #[cfg(target_os = "linux")]
    if let Some(engine) = report.shared.engines.pick().cloned() {
        let token = report.shared.tasks.token();
        let held = report.listener.quiet.clone();
        held.increment(1.0);
        let finish = move |transfer| {
            held.decrement(1.0);
            report.finish(joining.outcome(transfer));
            drop(token);
        };
        engine.adopt(quiet, Box::new(finish));
        return;
    }
    // Only pairs with an engine to go to are ever quiet.
    let transfer = Transfer {
        to_target: quiet.moved.0,
        to_client: quiet.moved.1,
        end: crate::splice::End::Idle,
    };
    report.finish(joining.outcome(transfer));
}

impl Joining {
    /// The outcome of a joined connection, counting the routing prefix.
    fn outcome(&mut self, mut transfer: Transfer) -> Outcome {
        transfer.to_target += self.prefix.0;
        transfer.to_client += self.prefix.1;
        let mut outcome = Outcome::joined(self.decision, self.target, transfer);
        outcome.client = Some(self.client);
        outcome.sni = self.sni.take();
        outcome
    }
}

async fn route_connection(
    shared: &Shared,
    live: &Live,
    listener: usize,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    accepted: Instant,
) -> Routed {
    let config = &live.config;
    let allow_proxy = config.may_send_proxy(peer.ip());
    let deadline = config.timeouts.hello;
    let slots = &shared.hello_slots;
    let read =
        preface::read_in_slot::<ClientHello, _>(&mut stream, allow_proxy, deadline, slots).await;
    let preamble = match read {
        Ok(preamble) => preamble,
        Err(e) => return Routed::Done(hello_failed(e)),
    };
    metrics::histogram!(HELLO_SECONDS).record(accepted.elapsed().as_secs_f64());
    let spliced_by_node = config.spliced_by_node(peer.ip(), preamble.proxied.is_some());
    if spliced_by_node {
        let digest = preamble.proxied.and_then(|p| p.digest);
        shared.peers.heard(config, peer.ip(), digest);
    }
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
            spliced_by_node,
        },
        |site, name| {
            let name = preamble.parsed.sni.as_deref().or(Some(name));
            shared
                .certs
                .valid_for(&config.site(site).label, name, SystemTime::now())
                .is_some()
        },
    );
    let idle = config.timeouts.idle;
    // Raw TCP: join the client to the target that took the replayed bytes.
    let spliced = |client, opened: Opened| {
        let mode = forward::mode(config);
        let mut join = Joined::new(client, opened.stream, idle, mode);
        #[cfg(target_os = "linux")]
        if mode == crate::splice::Mode::Splice && shared.engines.available() {
            join = join.quiet_after(QUIET);
        }
        let prefix = (opened.replayed, opened.answered);
        (Pair::Spliced(join), opened.target, prefix)
    };
    let (decision, pair) = match decision {
        Decision::Reject(reject) => {
            if reject == route::Reject::LoopGuard {
                tracing::warn!(
                    client = %client, via = %peer, sni = sni.as_deref().unwrap_or("-"),
                    "config conflict: a node spliced a name here that this node cannot terminate"
                );
            }
            // A node that spliced to us learns of the refusal by a close
            // with no reply, and fails over to its next holder.
            if sni.is_some() && !spliced_by_node {
                let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            }
            let outcome = Outcome::new("reject", reject.kind(), reject.kind());
            ("reject", Err(outcome))
        }
        Decision::Passthrough { site, backend } => {
            let site = config.site(site);
            let header = site
                .proxy_protocol
                .map(|v| proxy_protocol::encode(v, client, destination));
            let target = Target {
                addr: backend,
                kind: TargetKind::Backend,
                label: site.label.clone(),
            };
            let via = Via {
                config,
                peers: &shared.peers,
                source: None,
            };
            let result = forward::to_first_reachable(via, &[target], header, preamble.bytes).await;
            let pair = result.map(|opened| spliced(stream, opened));
            (
                "passthrough",
                pair.map_err(|e| forward_failed("passthrough", e)),
            )
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
                    kind: TargetKind::Node,
                    label: config.node(*h).name.clone(),
                })
                .collect();
            // Node-to-node splices always carry PROXY v2: the terminating
            // node needs the client address, and the loop guard its source.
            let header = proxy_protocol::encode_from_node(client, destination, config.digest);
            let via = Via {
                config,
                peers: &shared.peers,
                source: Some(config.this().tls.ip()),
            };
            let result =
                forward::to_holders(via, &mut stream, &targets, header, preamble.bytes).await;
            let pair = result.map(|opened| spliced(stream, opened));
            ("splice", pair.map_err(|e| forward_failed("splice", e)))
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
                preamble.parsed.chacha_first,
                ends,
            ));
            let pair = match serve.await {
                Ok(done) => {
                    let join = Copied::new(done.tls, done.upstream, idle);
                    Ok((Pair::Terminated(join), done.addr, (0, 0)))
                }
                Err(e) => {
                    if e.is_handshake() {
                        metrics::counter!(HANDSHAKE_FAILURES, "reason" => e.kind()).increment(1);
                    }
                    let detail = format!("{}: {e}", e.kind());
                    Err(Outcome::new("terminate", e.kind(), detail))
                }
            };
            ("terminate", pair)
        }
    };
    match pair {
        Ok((pair, target, prefix)) => Routed::Joining(
            pair,
            Joining {
                decision,
                client,
                target,
                prefix,
                sni,
            },
        ),
        Err(mut outcome) => {
            outcome.sni = sni;
            outcome.client = Some(client);
            Routed::Done(outcome)
        }
    }
}

fn hello_failed(e: PrefaceError<Invalid>) -> Outcome {
    let kind = e.kind(Invalid::kind);
    metrics::counter!(HELLO_FAILURES, "reason" => kind).increment(1);
    Outcome::new("reject", kind, format!("{kind}: ClientHello {e}"))
}

fn forward_failed(decision: &'static str, e: ForwardError) -> Outcome {
    Outcome::new(decision, e.kind(), format!("{}: {e}", e.kind()))
}

#[cfg(test)]
mod tests {
    /// A spliced connection lives in this task while bytes move (a quiet
    /// one moves to a splice engine); growing this future grows every
    /// active connection.
    #[test]
    fn a_spliced_connection_task_stays_small() {
        let size = std::mem::size_of::<super::Connected<crate::splice::Joined>>();
        // Debug builds lay it out 16 bytes larger than release.
        assert!(size <= 736, "a spliced connection grew to {size} bytes");
    }
}

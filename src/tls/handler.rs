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
use super::route::{self, Decision, DecisionKind, Peer, Reject};
use super::terminate;
use crate::config::{Config, NodeId, SiteId};
use crate::forward::{self, Answer, ForwardError, Opened, Target, TargetKind, Via};
use crate::limits::LineBy;
use crate::metrics::{
    ACCESS_DENIED, HANDSHAKE_FAILURES, HELLO_FAILURES, HELLO_SECONDS, ListenerMetrics, REJECTED,
    SiteRef, TERMINATE_FALLBACKS,
};
use crate::preface::{self, Ends, PrefaceError};
use crate::proxy_protocol;
use crate::splice::{JoinEnd, Moved, Progress, QuietPair, StreamJoin, TcpJoin, Transfer};
use crate::state::{Admission, Arrival, Live, Shared};

/// A fatal `unrecognized_name` alert (RFC 6066 section 3): tells a client
/// why we close instead of leaving it to guess.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70];

/// A fatal `access_denied` alert: the site's allow/deny lists refuse the
/// client. Sent to a node too, which passes it on as the holder's answer.
const ALERT_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x31];

/// Everything the finished-connection log line and metrics report.
struct Outcome {
    /// The original client, when a trusted PROXY header named one.
    client: Option<SocketAddr>,
    sni: Option<String>,
    decision: DecisionKind,
    /// How it ended, as a bounded label (`closed`, `unknown_name`, ...).
    kind: &'static str,
    /// The same, with detail for the log.
    detail: String,
    target: Option<SocketAddr>,
    transfer: Option<Transfer>,
    /// The site it counts under in metrics.
    site: SiteRef,
    line: LineBy,
}

impl Outcome {
    fn new(decision: DecisionKind, kind: &'static str, detail: impl Into<String>) -> Self {
        Outcome {
            client: None,
            sni: None,
            decision,
            kind,
            detail: detail.into(),
            target: None,
            transfer: None,
            site: SiteRef::NoSni,
            line: LineBy::Handler,
        }
    }

    fn joined(decision: DecisionKind, target: SocketAddr, transfer: Transfer) -> Self {
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
    /// Index into `config.listeners`.
    pub listener: usize,
    /// The listener's metric handles.
    pub metrics: Arc<ListenerMetrics>,
    pub from: Arrival,
    pub admission: Admission,
}

/// Where routing left a connection. Returned once and moved straight into
/// its task, so the size gap between variants costs one copy, where a box
/// would cost an allocation per connection.
#[allow(clippy::large_enum_variant)]
enum Routed {
    Done(Outcome),
    /// Both ends connected: join them in a task of their own.
    Joined(Join, Route),
}

/// The two ends of a routed connection. The spliced pair stays inline: a
/// box would cost every spliced connection an allocation.
#[allow(clippy::large_enum_variant)]
enum Join {
    /// Raw TCP to a backend or holder node.
    Spliced(TcpJoin),
    /// TLS terminated here, plaintext to the upstream. Boxed: rustls's
    /// state inline would double the size of every connection's routing
    /// future, and every spliced connection would copy it several times.
    Terminated(Box<StreamJoin<TlsStream<Prefixed<TcpStream>>, TcpStream>>),
}

/// What the log line needs of a joined connection besides its transfer.
struct Route {
    decision: DecisionKind,
    client: SocketAddr,
    target: SocketAddr,
    /// Bytes replayed to the target and answered to the client while routing.
    prefix: Moved,
    sni: Option<String>,
    site: SiteRef,
}

pub async fn handle(accepted: Accepted, stream: TcpStream) {
    let started = Instant::now();
    let Accepted {
        shared,
        live,
        listener,
        metrics: label,
        from,
        admission,
    } = accepted;
    let peer = from.peer;
    // Boxed: routing's state is two kilobytes, and inline in the task
    // tokio copies the whole task several times over its life (when it is
    // spawned, and each time it changes stage); one allocation is cheaper.
    let routed = Box::pin(route_connection(
        &shared, &live, listener, stream, from, started,
    ))
    .await;
    let report = Report {
        shared,
        live: live.clone(),
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
        Routed::Joined(pair, route) => {
            let tasks = report.shared.tasks.clone();
            // Boxed for the reason the handler's task is (server.rs).
            match pair {
                Join::Spliced(join) => {
                    tasks.spawn(Box::pin(ConnectionTask {
                        join,
                        ending: Some((report, route)),
                    }));
                }
                Join::Terminated(join) => {
                    tasks.spawn(Box::pin(ConnectionTask {
                        join: *join,
                        ending: Some((report, route)),
                    }));
                }
            };
        }
    }
}

/// What the finished-connection line and metrics need besides the outcome;
/// dropping it releases the connection's admission.
struct Report {
    shared: Arc<Shared>,
    /// The config the connection was routed by: its site counters. Held
    /// for the connection's life, so a reload counts it where it began.
    live: Arc<Live>,
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
        self.live
            .sites
            .finished(outcome.site, outcome.decision, up, down);
        if outcome.decision == DecisionKind::Reject {
            metrics::counter!(REJECTED, "reason" => outcome.kind).increment(1);
        }
        if outcome.line == LineBy::DeniedLog {
            return;
        }
        crate::conn_log::write(&crate::conn_log::Line {
            client: outcome.client.unwrap_or(*peer),
            via: *peer,
            sni: outcome.sni.as_deref(),
            decision: outcome.decision.as_str(),
            target: outcome.target,
            bytes_up: up,
            bytes_down: down,
            duration_ms: started.elapsed().as_millis() as u64,
            end: &outcome.detail,
        });
    }
}

pin_project_lite::pin_project! {
    /// A connection after routing: its whole task, the joined ends and what
    /// its log line needs, written as a plain future so nothing is stored
    /// twice.
    struct ConnectionTask<J: Progress> {
        #[pin]
        join: J,
        // Taken when the join ends or hands its sockets on.
        ending: Option<(Report, Route)>,
    }

    // A task dropped before its join ended (the drain period ran out and
    // the runtime is going away) still logs and counts its connection.
    impl<J: Progress> PinnedDrop for ConnectionTask<J> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((report, mut route)) = this.ending.take() {
                let moved = this.join.moved();
                let transfer = Transfer {
                    to_target: moved.to_target,
                    to_client: moved.to_client,
                    end: crate::splice::End::Drained,
                };
                report.finish(route.outcome(transfer));
            }
        }
    }
}

impl<J> Future for ConnectionTask<J>
where
    J: Future + Progress,
    J::Output: Into<JoinEnd>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let joint = std::task::ready!(this.join.poll(cx)).into();
        if let Some((report, mut route)) = this.ending.take() {
            match joint {
                JoinEnd::Ended(transfer) => report.finish(route.outcome(transfer)),
                JoinEnd::Quiet(quiet) => hand_over(report, route, quiet),
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
fn hand_over(report: Report, mut route: Route, quiet: QuietPair) {
    #[cfg(target_os = "linux")]
    if let Some(engine) = report.shared.engines.pick().cloned() {
        let token = report.shared.tasks.token();
        let held = report.listener.quiet.clone();
        held.increment(1.0);
        let finish = move |transfer| {
            held.decrement(1.0);
            report.finish(route.outcome(transfer));
            drop(token);
        };
        engine.adopt(quiet, Box::new(finish));
        return;
    }
    // Only pairs with an engine to go to are ever quiet.
    let transfer = Transfer {
        to_target: quiet.moved.to_target,
        to_client: quiet.moved.to_client,
        end: crate::splice::End::Idle,
    };
    report.finish(route.outcome(transfer));
}

impl Route {
    /// The outcome of a joined connection, counting the routing prefix.
    fn outcome(&mut self, mut transfer: Transfer) -> Outcome {
        transfer.to_target += self.prefix.to_target;
        transfer.to_client += self.prefix.to_client;
        let mut outcome = Outcome::joined(self.decision, self.target, transfer);
        outcome.client = Some(self.client);
        outcome.sni = self.sni.take();
        outcome.site = self.site;
        outcome
    }
}

/// Reads the hello, decides, and acts on the decision: one function per
/// decision below.
async fn route_connection(
    shared: &Shared,
    live: &Live,
    listener: usize,
    mut stream: TcpStream,
    from: Arrival,
    accepted: Instant,
) -> Routed {
    let Arrival {
        peer,
        local,
        may_send_proxy: allow_proxy,
    } = from;
    let config = &live.config;
    let (deadline, slots) = (config.timeouts.hello, &shared.hello_slots);
    let read =
        preface::read_in_slot::<ClientHello, _>(&mut stream, allow_proxy, deadline, slots).await;
    let preamble = match read {
        Ok(preamble) => preamble,
        Err(e) => return Routed::Done(hello_failed(e)),
    };
    metrics::histogram!(HELLO_SECONDS).record(accepted.elapsed().as_secs_f64());
    let ends = preamble.ends(config, peer, local);
    if ends.via_node.is_some() {
        let digest = preamble.proxied.and_then(|p| p.digest);
        shared.peers.heard(config, peer.ip(), digest);
    }
    let hello = &preamble.parsed;
    if hello.sni.is_none() {
        metrics::counter!(HELLO_FAILURES, "reason" => "no_sni").increment(1);
    }
    let decision = decide(shared, config, listener, hello, &ends);
    let kind = decision.kind();
    let site = site_of(&decision, config, hello.sni.as_deref());
    let at = Here {
        shared,
        live,
        ends,
        sni: hello.sni.clone(),
        peer,
    };
    let chacha_first = hello.chacha_first;
    let replay = preamble.bytes;
    let joined = match decision {
        Decision::Reject(reject) => Err(at.refuse(stream, reject).await),
        Decision::Passthrough { site, backends } => {
            at.pass_through(stream, site, backends.as_slice(), replay)
                .await
        }
        Decision::Splice { site, holders } => {
            at.splice_to_holders(stream, site, &holders, replay).await
        }
        Decision::Terminate { site } => at.terminate(stream, site, replay, chacha_first).await,
    };
    match joined {
        Ok(Connected {
            join,
            target,
            prefix,
        }) => Routed::Joined(
            join,
            Route {
                decision: kind,
                client: at.ends.client,
                target,
                prefix,
                sni: at.sni,
                site,
            },
        ),
        Err(mut outcome) => {
            outcome.sni = at.sni;
            outcome.client = Some(at.ends.client);
            outcome.site = site;
            Routed::Done(outcome)
        }
    }
}

/// The site a connection counts under in metrics: the decision's, else the
/// one its name belongs to (refused for a loop, say), else `unknown`, or
/// `none` without a name.
fn site_of(decision: &Decision, config: &Config, sni: Option<&str>) -> SiteRef {
    match decision {
        Decision::Terminate { site }
        | Decision::Splice { site, .. }
        | Decision::Passthrough { site, .. } => SiteRef::Site(*site),
        Decision::Reject(Reject::Denied { site, .. }) => SiteRef::Site(*site),
        Decision::Reject(_) => match sni {
            None => SiteRef::NoSni,
            Some(name) => config
                .names
                .get(name)
                .map_or(SiteRef::Unknown, |id| SiteRef::Site(*id)),
        },
    }
}

/// The pure decision, with whether this node can terminate a name now.
fn decide(
    shared: &Shared,
    config: &Config,
    listener: usize,
    hello: &ClientHello,
    ends: &Ends,
) -> Decision {
    let peer = Peer {
        client: ends.client.ip(),
        spliced_by_node: ends.via_node.is_some(),
    };
    route::decide(
        config,
        listener,
        hello.sni.as_deref(),
        peer,
        |site, name| {
            let name = hello.sni.as_deref().or(Some(name));
            shared
                .certs
                .valid_for(&config.site(site).label, name, SystemTime::now())
                .is_some()
        },
    )
}

/// What acting on a decision needs: where the connection stands.
struct Here<'a> {
    shared: &'a Shared,
    live: &'a Live,
    ends: Ends,
    sni: Option<String>,
    /// The socket's peer (a node or a trusted proxy, when one sent a header).
    peer: SocketAddr,
}

/// Both ends connected, or how the connection ended.
type Acted = Result<Connected, Outcome>;

struct Connected {
    join: Join,
    target: SocketAddr,
    /// Bytes replayed to the target and answered to the client while routing.
    prefix: Moved,
}

impl Here<'_> {
    /// An unknown name (or no SNI, or a loop): an alert for a client, a
    /// silent close for a node, which then fails over to its next holder.
    async fn refuse(&self, mut stream: TcpStream, reject: Reject) -> Outcome {
        let spliced_by_node = self.ends.via_node.is_some();
        if reject == Reject::LoopGuard {
            tracing::warn!(
                client = %self.ends.client, via = %self.peer,
                sni = self.sni.as_deref().unwrap_or("-"),
                "config conflict: a node spliced a name here that this node cannot terminate"
            );
        }
        if let Reject::Denied { site, denial } = reject {
            let label = &self.live.config.site(site).label;
            metrics::counter!(ACCESS_DENIED, "site" => label.clone(), "reason" => denial.as_str(), "port" => "tls")
                .increment(1);
            crate::limits::log_denied("tls", self.ends.client, label, denial);
            let _ = stream.write_all(&ALERT_ACCESS_DENIED).await;
            let mut outcome = Outcome::new(DecisionKind::Reject, reject.kind(), denial.as_str());
            outcome.line = LineBy::DeniedLog;
            return outcome;
        }
        if self.sni.is_some() && !spliced_by_node {
            let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        }
        Outcome::new(DecisionKind::Reject, reject.kind(), reject.kind())
    }

    /// Raw TLS to the first backend of the pool that answers, in the
    /// client's order; the backends have their own certificates.
    async fn pass_through(
        &self,
        mut stream: TcpStream,
        site: SiteId,
        backends: &[SocketAddr],
        replay: Vec<u8>,
    ) -> Acted {
        let config = &self.live.config;
        let site = config.site(site);
        let header = site
            .proxy_protocol
            .map(|v| proxy_protocol::encode(v, self.ends.client, self.ends.destination));
        let targets = Target::each(backends, TargetKind::Backend, &site.label);
        let answer = Answer::FirstWhileOthersLeft;
        let opened = forward::open(self.via(None), &targets, header, replay, answer).await;
        self.join_opened(&mut stream, opened, DecisionKind::Passthrough)
            .await
            .map(|opened| self.spliced(stream, opened))
    }

    fn via(&self, source: Option<std::net::IpAddr>) -> Via<'_> {
        Via {
            config: &self.live.config,
            peers: &self.shared.peers,
            health: &self.shared.health,
            source,
        }
    }

    /// The opened target with its awaited first bytes passed to the client.
    async fn join_opened(
        &self,
        client: &mut TcpStream,
        opened: Result<Opened, ForwardError>,
        decision: DecisionKind,
    ) -> Result<(Opened, u64), Outcome> {
        let mut opened = opened.map_err(|e| forward_failed(decision, e))?;
        let answered = opened
            .pass_first(client)
            .await
            .map_err(|e| forward_failed(decision, e))?;
        Ok((opened, answered))
    }

    /// Raw TLS to the first holder node that answers, in rendezvous order,
    /// with a PROXY v2 header carrying the client and our fleet digest.
    async fn splice_to_holders(
        &self,
        mut stream: TcpStream,
        site: SiteId,
        holders: &[NodeId],
        replay: Vec<u8>,
    ) -> Acted {
        let config = &self.live.config;
        if config.holds(site) {
            self.shared.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            let label = config.site(site).label.clone();
            metrics::counter!(TERMINATE_FALLBACKS, "site" => label.clone()).increment(1);
            tracing::warn!(
                site = %label, client = %self.ends.client,
                "no valid certificate here for a held site: splicing to another holder"
            );
        }
        let targets: Vec<Target> = holders
            .iter()
            .map(|h| Target::node(config.node(*h), config.node(*h).tls))
            .collect();
        let (client, destination) = (self.ends.client, self.ends.destination);
        let header = proxy_protocol::encode_from_node(client, destination, config.digest);
        // From this node's own address, so the holder knows a node.
        let via = self.via(Some(config.this().tls.ip()));
        let opened = forward::open(via, &targets, Some(header), replay, Answer::First).await;
        self.join_opened(&mut stream, opened, DecisionKind::Splice)
            .await
            .map(|opened| self.spliced(stream, opened))
    }

    /// TLS ends here; the plaintext goes to the site's upstream.
    async fn terminate(
        &self,
        stream: TcpStream,
        site: SiteId,
        replay: Vec<u8>,
        chacha_first: bool,
    ) -> Acted {
        let config = &self.live.config;
        let tls = &self.live.tls;
        // Boxed: only terminated connections pay for the handshake state.
        let via = self.via(None);
        let serve = terminate::serve(via, tls, site, stream, replay, chacha_first, self.ends);
        match Box::pin(serve).await {
            Ok(done) => {
                let join = StreamJoin::new(done.tls, done.upstream, config.timeouts.idle);
                Ok(Connected {
                    join: Join::Terminated(Box::new(join)),
                    target: done.addr,
                    prefix: Moved::default(),
                })
            }
            Err(e) => {
                if e.is_handshake() {
                    metrics::counter!(HANDSHAKE_FAILURES, "reason" => e.kind()).increment(1);
                }
                let detail = format!("{}: {e}", e.kind());
                Err(Outcome::new(DecisionKind::Terminate, e.kind(), detail))
            }
        }
    }

    /// Raw TCP: joins the client to the target that took the replayed
    /// bytes and answered with `answered` bytes.
    fn spliced(&self, client: TcpStream, (opened, answered): (Opened, u64)) -> Connected {
        let config = &self.live.config;
        let mode = forward::mode(config);
        let mut join = TcpJoin::new(client, opened.stream, config.timeouts.idle, mode);
        #[cfg(target_os = "linux")]
        if mode == crate::splice::Mode::Splice && self.shared.engines.available() {
            join = join.quiet_after(QUIET);
        }
        let prefix = Moved {
            to_target: opened.replayed,
            to_client: answered,
        };
        Connected {
            join: Join::Spliced(join),
            target: opened.target,
            prefix,
        }
    }
}

fn hello_failed(e: PrefaceError<Invalid>) -> Outcome {
    let kind = e.kind(Invalid::kind);
    metrics::counter!(HELLO_FAILURES, "reason" => kind).increment(1);
    Outcome::new(
        DecisionKind::Reject,
        kind,
        format!("{kind}: ClientHello {e}"),
    )
}

fn forward_failed(decision: DecisionKind, e: ForwardError) -> Outcome {
    Outcome::new(decision, e.kind(), format!("{}: {e}", e.kind()))
}

#[cfg(test)]
mod tests {
    /// A spliced connection lives in this task while bytes move (a quiet
    /// one moves to a splice engine); growing this future grows every
    /// active connection.
    #[test]
    fn a_spliced_connection_task_stays_small() {
        let size = std::mem::size_of::<super::ConnectionTask<crate::splice::TcpJoin>>();
        // Debug builds lay it out 16 bytes larger than release.
        assert!(size <= 736, "a spliced connection grew to {size} bytes");
    }

    /// What routing returns is moved several times per connection (out of
    /// the routing future, into the joined task): terminated connections'
    /// TLS state stays behind a box.
    #[test]
    fn routing_returns_little() {
        let size = std::mem::size_of::<super::Routed>();
        assert!(size <= 512, "routing returns {size} bytes");
    }
}

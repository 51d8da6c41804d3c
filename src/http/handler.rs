//! One connection on the HTTP port: read the head, decide, answer (a
//! challenge, a redirect, an error) or splice to an upstream, and log one
//! line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::ask;
use super::request::{Head, Invalid};
use super::response::text as respond;
use super::route::{self, HttpDecision};
use crate::config::{Config, SiteId, SiteRoute};
use crate::forward::{self, Answer, Target, Via};
use crate::limits::LineBy;
use crate::metrics::{ACCESS_DENIED, HTTP_FORWARD_SECONDS, HTTP_REQUESTS};
use crate::preface::{self, Ends, PrefaceError};
use crate::proxy_protocol;
use crate::state::{Arrival, Live, Shared};

/// Largest webroot file served: a key authorization is ~90 bytes.
const MAX_WEBROOT_FILE: u64 = 4096;

/// What the log line reports.
struct Outcome {
    /// `challenge_local`, `redirect`, `bad_request`, ...: a closed set.
    result: &'static str,
    status: u16,
    detail: String,
    line: LineBy,
}

fn outcome(result: &'static str, status: u16) -> Outcome {
    Outcome {
        result,
        status,
        detail: String::new(),
        line: LineBy::Handler,
    }
}

pub async fn handle(shared: Arc<Shared>, live: Arc<Live>, mut stream: TcpStream, from: Arrival) {
    let peer = from.peer;
    let started = Instant::now();
    shared.stats.http_requests.fetch_add(1, Ordering::Relaxed);
    let mut cut = Cut {
        peer,
        started,
        armed: true,
    };
    let (host, target, out) = serve(&shared, &live, &mut stream, from).await;
    cut.armed = false;
    finished(peer, started, (host.as_deref(), target.as_deref()), &out);
}

/// A request whose task is dropped before it finished (an upstream splice
/// still open when the drain period ran out) is logged and counted too.
struct Cut {
    peer: SocketAddr,
    started: Instant,
    armed: bool,
}

impl Drop for Cut {
    fn drop(&mut self) {
        if self.armed {
            let out = Outcome {
                result: "drain_deadline",
                status: 0,
                detail: "cut when the drain period ran out".into(),
                line: LineBy::Handler,
            };
            finished(self.peer, self.started, (None, None), &out);
        }
    }
}

fn finished(
    peer: SocketAddr,
    started: Instant,
    (host, path): (Option<&str>, Option<&str>),
    out: &Outcome,
) {
    metrics::counter!(HTTP_REQUESTS, "result" => out.result).increment(1);
    if out.line == LineBy::DeniedLog {
        return;
    }
    tracing::info!(
        target: "sni_router::http",
        client = %peer,
        host = host.unwrap_or("-"),
        path = path.unwrap_or("-"),
        result = out.result,
        status = out.status,
        detail = %out.detail,
        duration_ms = started.elapsed().as_millis() as u64,
        "http request finished"
    );
}

async fn serve(
    shared: &Shared,
    live: &Live,
    stream: &mut TcpStream,
    from: Arrival,
) -> (Option<String>, Option<String>, Outcome) {
    let Arrival {
        peer,
        local,
        may_send_proxy: allow_proxy,
    } = from;
    let config = &live.config;
    // The forwarding mark counts only from a node address.
    let from_node = config.is_node_address(peer.ip());
    let preamble = match preface::read_in_slot::<Head, _>(
        stream,
        allow_proxy,
        config.timeouts.http_head,
        &shared.hello_slots,
    )
    .await
    {
        Ok(preamble) => preamble,
        Err(e) => return (None, None, head_failed(stream, e).await),
    };
    let head = &preamble.parsed;
    let ends = preamble.ends(config, peer, local);
    if ends.via_node.is_some() {
        let digest = preamble.proxied.and_then(|p| p.digest);
        shared.peers.heard(config, peer.ip(), digest);
    } else if from_node && head.forwarded {
        shared.peers.heard(config, peer.ip(), head.forwarded_digest);
    }
    let out = match route::decide(config, head, ends.client.ip()) {
        HttpDecision::Challenge { token } => {
            let (result, answer) = challenge(shared, live, head, &token, from_node).await;
            match answer {
                Some(key_authorization) => {
                    respond(stream, 200, "", &key_authorization).await;
                    outcome(result, 200)
                }
                None => {
                    respond(stream, 404, "", "no such challenge\n").await;
                    outcome(result, 404)
                }
            }
        }
        HttpDecision::BadToken => {
            respond(stream, 404, "", "no such challenge\n").await;
            outcome("bad_token", 404)
        }
        HttpDecision::Redirect { location } => {
            respond(stream, 308, &format!("location: {location}\r\n"), "").await;
            outcome("redirect", 308)
        }
        HttpDecision::NoHost => {
            respond(stream, 400, "", "missing or invalid Host\n").await;
            outcome("bad_request", 400)
        }
        HttpDecision::UnknownHost => {
            respond(stream, 404, "", "unknown host\n").await;
            outcome("unknown_host", 404)
        }
        HttpDecision::Denied { site, denial } => {
            let label = &config.site(site).label;
            metrics::counter!(ACCESS_DENIED, "site" => label.clone(), "reason" => denial.as_str(), "port" => "http")
                .increment(1);
            crate::limits::log_denied("http", ends.client, label, denial);
            respond(stream, 403, "", "access denied\n").await;
            Outcome {
                line: LineBy::DeniedLog,
                ..outcome("denied", 403)
            }
        }
        HttpDecision::Upstream { site } => {
            to_upstream(config, shared, site, stream, ends, preamble.bytes).await
        }
    };
    (head.host.clone(), Some(head.target.clone()), out)
}

async fn head_failed(stream: &mut TcpStream, e: PrefaceError<Invalid>) -> Outcome {
    let status = match &e {
        PrefaceError::Timeout(_) => 408,
        PrefaceError::Invalid(Invalid::TooLarge) => 431,
        PrefaceError::Invalid(Invalid::Malformed) | PrefaceError::BadProxyHeader => 400,
        PrefaceError::Closed(_) | PrefaceError::Io(_) | PrefaceError::Evicted => 0,
    };
    if status != 0 {
        respond(stream, status, "", "").await;
    }
    Outcome {
        result: "bad_request",
        status,
        detail: format!("{}: request head {e}", e.kind(Invalid::kind)),
        line: LineBy::Handler,
    }
}

/// Finds a key authorization: this node's store, the shared-account answer,
/// the webroot, then (unless the request was already forwarded by a node)
/// the holders of the name.
async fn challenge(
    shared: &Shared,
    live: &Live,
    head: &Head,
    token: &str,
    from_node: bool,
) -> (&'static str, Option<String>) {
    let config = &live.config;
    if let Some(found) = shared.challenges.get(token) {
        return ("challenge_local", Some(found));
    }
    let site = head
        .host
        .as_deref()
        .and_then(|h| config.names.get(h).copied());
    if site.is_some()
        && let Some(found) = shared.challenges.stateless(token)
    {
        return ("challenge_stateless", Some(found));
    }
    if let Some(found) = from_webroot(config, token).await {
        return ("challenge_webroot", Some(found));
    }
    // One hop at most: a node's forwarded request is answered from local state.
    if (head.forwarded && from_node) || !config.http.forward {
        return ("challenge_miss", None);
    }
    let (Some(site), Some(host)) = (site, head.host.as_deref()) else {
        return ("challenge_miss", None);
    };
    let holders: Vec<SocketAddr> = config
        .other_holders(site)
        .iter()
        .map(|h| config.node(*h).http)
        .collect();
    if holders.is_empty() {
        return ("challenge_miss", None);
    }
    if let Err(refusal) = live.guard.admit(host, token) {
        tracing::debug!(?refusal, host, "challenge not forwarded");
        return ("challenge_limited", None);
    }
    shared.stats.http_forwarded.fetch_add(1, Ordering::Relaxed);
    let source = Some(config.this().http.ip());
    let asked = Instant::now();
    let found = ask::ask_holders(
        &holders,
        source,
        config.digest,
        host,
        token,
        config.http.forward_timeout,
    )
    .await;
    metrics::histogram!(HTTP_FORWARD_SECONDS).record(asked.elapsed().as_secs_f64());
    match found {
        Some(found) => ("challenge_forwarded", Some(found)),
        None => {
            live.guard.miss(host, token);
            ("challenge_miss", None)
        }
    }
}

/// `webroot/.well-known/acme-challenge/{token}`; the token is base64url, so
/// it cannot climb out of the directory.
async fn from_webroot(config: &Config, token: &str) -> Option<String> {
    let webroot = config.http.webroot.as_ref()?;
    let path = webroot.join(".well-known/acme-challenge").join(token);
    let file = tokio::fs::File::open(&path).await.ok()?;
    let mut body = String::new();
    file.take(MAX_WEBROOT_FILE)
        .read_to_string(&mut body)
        .await
        .ok()?;
    let body = body.trim();
    (!body.is_empty()).then(|| body.to_string())
}

/// Plain HTTP to the site's upstream when held here, else to a holder node.
async fn to_upstream(
    config: &Config,
    shared: &Shared,
    site: SiteId,
    stream: &mut TcpStream,
    Ends {
        client,
        destination,
        via_node,
    }: Ends,
    replay: Vec<u8>,
) -> Outcome {
    let SiteRoute::Held { upstream, .. } = &config.site(site).route else {
        return outcome("bad_request", 404);
    };
    let (targets, source, header) = if config.holds(site) {
        let header = config
            .site(site)
            .proxy_protocol
            .map(|v| proxy_protocol::encode(v, client, destination));
        let label = &config.site(site).label;
        let targets = Target::upstreams(upstream, client.ip(), label);
        (targets, None, header)
    } else if via_node.is_some() {
        respond(stream, 502, "", "config conflict: not a holder\n").await;
        return outcome("loop_guard", 502);
    } else {
        let order = crate::forward::rendezvous(config, config.other_holders(site), client.ip());
        let targets = order
            .iter()
            .map(|h| Target::node(config.node(*h), config.node(*h).http))
            .collect();
        let header = proxy_protocol::encode_from_node(client, destination, config.digest);
        (targets, Some(config.this().http.ip()), Some(header))
    };
    let via = Via {
        config,
        peers: &shared.peers,
        health: &shared.health,
        source,
    };
    match forward::open(via, &targets, header, replay, Answer::Connect).await {
        Ok(opened) => {
            let idle = config.timeouts.idle;
            let transfer =
                crate::splice::join_tcp(stream, &opened.stream, idle, forward::mode(config)).await;
            Outcome {
                result: "upstream",
                status: 0,
                detail: format!("{} ({})", opened.target, transfer.end),
                line: LineBy::Handler,
            }
        }
        Err(e) => {
            respond(stream, 502, "", "upstream unreachable\n").await;
            Outcome {
                result: "upstream_error",
                status: 502,
                detail: e.to_string(),
                line: LineBy::Handler,
            }
        }
    }
}

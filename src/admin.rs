//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive),
//! `/readyz` (listeners bound, config loaded, not draining) and `/status`
//! (JSON: this node, its routes, certificates, peers).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, SiteId, SiteRoute};
use crate::http::request::Head;
use crate::http::response::{self, text};
use crate::metrics::Family;
use crate::preface;
use crate::state::Shared;

/// Admin clients are scrapers and operators on a trusted network.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, metrics: Option<PrometheusHandle>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (shared, metrics) = (shared.clone(), metrics.clone());
        tokio::spawn(async move { answer(stream, &shared, metrics.as_ref()).await });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared, metrics: Option<&PrometheusHandle>) {
    let Ok(preamble) = preface::read::<Head, _>(&mut stream, false, HEAD_DEADLINE).await else {
        return text(&mut stream, 400, "", "bad request\n").await;
    };
    let head = preamble.parsed;
    if head.method != "GET" {
        return text(&mut stream, 405, "allow: GET\r\n", "GET only\n").await;
    }
    match head.target.split('?').next().unwrap_or_default() {
        "/metrics" => {
            let body = metrics
                .map(|handle| crate::metrics::render(handle) + &live_series(shared))
                .unwrap_or_default();
            response::send(
                &mut stream,
                200,
                "text/plain; version=0.0.4",
                "",
                body.as_bytes(),
            )
            .await;
        }
        "/healthz" => text(&mut stream, 200, "", "ok\n").await,
        "/readyz" if shared.ready.load(Ordering::Relaxed) => {
            text(&mut stream, 200, "", "ready\n").await
        }
        "/readyz" => text(&mut stream, 503, "", "not ready\n").await,
        "/status" => {
            let body = status(shared).to_string();
            response::send(&mut stream, 200, "application/json", "", body.as_bytes()).await;
        }
        _ => text(&mut stream, 404, "", "not found\n").await,
    }
}

/// The gauges that describe current sites and nodes, from live state.
fn live_series(shared: &Shared) -> String {
    let live = shared.live();
    let config = &live.config;
    let held = (0..config.sites.len())
        .map(SiteId)
        .filter(|s| config.holds(*s));
    let certs: Vec<_> = held
        .filter_map(|site| {
            let label = config.site(site).label.as_str();
            Some((label, shared.certs.get(label)?))
        })
        .collect();
    let at = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let by_site = |time: fn(&crate::certs::store::Entry) -> SystemTime| -> Vec<_> {
        certs
            .iter()
            .map(|(label, entry)| (vec![("site", *label)], at(time(entry))))
            .collect()
    };
    let challenges: Vec<_> = config
        .acme_sites()
        .into_iter()
        .map(|site| {
            let label = config.site(site).label.as_str();
            let challenge = config.challenge_of(label).as_str();
            (vec![("site", label), ("challenge", challenge)], 1.0)
        })
        .collect();
    let peers: Vec<_> = config
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != config.this_node.0)
        .filter_map(|(_, node)| {
            let up = shared.peers.up(&node.name)?;
            Some((vec![("node", node.name.as_str())], f64::from(u8::from(up))))
        })
        .collect();
    let checked = crate::health::checked_targets(config);
    let targets: Vec<(String, String, bool)> = checked
        .into_iter()
        .filter_map(|(site, addr)| {
            let up = shared.health.last_check(addr)?;
            Some((config.sites.get(site)?.label.clone(), addr.to_string(), up))
        })
        .collect();
    let target_up: Vec<_> = targets
        .iter()
        .map(|(site, addr, up)| {
            let labels = vec![("site", site.as_str()), ("target", addr.as_str())];
            (labels, f64::from(u8::from(*up)))
        })
        .collect();
    let mut out = String::new();
    Family::TargetUp.write(&mut out, &target_up);
    Family::CertExpiry.write(&mut out, &by_site(|e| e.loaded.info.not_after));
    Family::CertNotBefore.write(&mut out, &by_site(|e| e.loaded.info.not_before));
    Family::AcmeChallenge.write(&mut out, &challenges);
    Family::PeerUp.write(&mut out, &peers);
    live.sites.write(&mut out);
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The status document.
pub fn status(shared: &Shared) -> Value {
    let live = shared.live();
    let config = &live.config;
    let now = SystemTime::now();
    let renewals = shared.acme.renewals();
    let routes: Vec<Value> = (0..config.sites.len())
        .map(|i| route(shared, config, SiteId(i)))
        .collect();
    let certificates: Vec<Value> = (0..config.sites.len())
        .map(SiteId)
        .filter(|s| config.holds(*s))
        .map(|site| {
            let label = &config.site(site).label;
            let entry = shared.certs.get(label);
            json!({
                "site": label,
                "source": entry.as_ref().map(|e| e.source.as_str()),
                "not_after": entry.as_ref().map(|e| unix(e.loaded.info.not_after)),
                "valid_now": entry.as_ref().is_some_and(|e| e.loaded.info.valid_at(now)),
                "next_renewal": renewals.get(label).map(|r| unix(r.at)),
                "renewal_window": renewals.get(label).and_then(|r| r.window).map(|(start, end)| [unix(start), unix(end)]),
                "challenge": acme_challenge(config, site),
                "last_error": shared.acme.last_error(label),
            })
        })
        .collect();
    let peers: Vec<Value> = config
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != config.this_node.0)
        .map(|(_, node)| json!({ "node": node.name, "tls": node.tls.to_string(), "health": shared.peers.get(&node.name) }))
        .collect();
    json!({
        "node": config.this().name,
        "config": config.source,
        "config_digest": config.digest.to_string(),
        "ready": shared.ready.load(Ordering::Relaxed),
        "listeners": config.listeners.iter().map(|l| l.bind.to_string()).collect::<Vec<_>>(),
        "routes": routes,
        "certificates": certificates,
        "peers": peers,
        "connections": {
            "accepted": shared.stats.accepted.load(Ordering::Relaxed),
            "finished": shared.stats.finished.load(Ordering::Relaxed),
            "rejected": shared.stats.rejected.load(Ordering::Relaxed),
            "terminate_fallbacks": shared.stats.fallbacks.load(Ordering::Relaxed),
        },
        "http": {
            "requests": shared.stats.http_requests.load(Ordering::Relaxed),
            "challenges_forwarded": shared.stats.http_forwarded.load(Ordering::Relaxed),
        },
        "acme": {
            "issued": shared.acme.issued(),
            "failed": shared.acme.failed(),
        },
    })
}

fn route(shared: &Shared, config: &Config, site: SiteId) -> Value {
    let s = config.site(site);
    let names: Vec<String> = s.names.iter().map(|n| n.to_string()).collect();
    match &s.route {
        SiteRoute::Held {
            holders, upstream, ..
        } => json!({
            "site": s.label,
            "names": names,
            "route": if config.holds(site) { "terminate" } else { "splice" },
            "holders": holders.iter().map(|h| config.node(*h).name.clone()).collect::<Vec<_>>(),
            "upstream": upstream.to_string(),
            "targets": pool_status(shared, upstream),
        }),
        SiteRoute::Passthrough { backend } => json!({
            "site": s.label,
            "names": names,
            "route": "passthrough",
            "backend": backend.to_string(),
            "targets": pool_status(shared, backend),
        }),
    }
}

/// Each target of a pool: its weight and what this node knows of its
/// health (`up`, `cooling` after a failed attempt, `down` after a failed
/// check), and its last check when the pool is checked.
fn pool_status(shared: &Shared, pool: &crate::config::Pool) -> Vec<Value> {
    let now = std::time::Instant::now();
    pool.targets
        .iter()
        .map(|t| {
            json!({
                "addr": t.addr.to_string(),
                "weight": t.weight,
                "health": shared.health.health(t.addr, now).as_str(),
                "checked": pool.checked.then(|| shared.health.last_check(t.addr)).flatten(),
            })
        })
        .collect()
}

/// The ACME challenge type of a site this node orders for, if it does.
fn acme_challenge(config: &Config, site: SiteId) -> Option<&'static str> {
    config
        .acme_sites()
        .contains(&site)
        .then(|| config.challenge_of(&config.site(site).label).as_str())
}

//! ACME Renewal Information (RFC 9773) against a real CA: Pebble 2.6, which
//! `scripts/test` fetches when the system's Pebble is older.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::pebble::{Options, Pebble, wait_acme};
use support::process::{Process, wait_listening};
use support::*;

/// Node "a" on 127.0.0.2, answering HTTP-01 on Pebble's validation port.
fn node_a(pebble: &Pebble) -> [(&'static str, SocketAddr, SocketAddr); 1] {
    let http = SocketAddr::new([127, 0, 0, 2].into(), pebble.http_port);
    [("a", free_addr("127.0.0.2"), http)]
}

#[tokio::test]
async fn the_cas_window_sets_the_renewal_and_shows_in_status() {
    if !have("pebble") {
        return;
    }
    // Pebble's default validity (5 years): its window, two days around the
    // two-thirds point, ends long before expiry.
    let pebble = Pebble::start(Options::default()).await;
    if !pebble.serves_ari().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = node_a(&pebble);
    pebble.add_a("window.test", "127.0.0.2").await;
    let router = Router::start(&fleet_toml_http(
        "a",
        &nodes,
        &pebble.acme_section(dir.path(), ""),
        &held_site(&["window.test"], &["a"], NOWHERE, ""),
    ))
    .await;
    let leaf = wait_acme(&router, "window.test", None).await;
    let info = sni_router::certs::disk::describe(&leaf.into()).unwrap();

    let shared = &router.handle.shared;
    let renewal = || shared.acme.renewals().get("window.test").copied();
    assert!(wait_until(|| async { renewal().is_some_and(|r| r.window.is_some()) }).await);
    let renewal = renewal().unwrap();
    let (start, end) = renewal.window.unwrap();
    let lifetime = info.not_after.duration_since(info.not_before).unwrap() + Duration::from_secs(1);
    let ideal = info.not_after - lifetime / 3;
    let day = Duration::from_secs(86_400);
    let near = |a: SystemTime, b: SystemTime| {
        a.max(b).duration_since(a.min(b)).unwrap() < Duration::from_secs(5)
    };
    assert!(
        near(start, ideal - day) && near(end, ideal + day),
        "Pebble's window: two days around the two-thirds point"
    );
    assert!(
        start <= renewal.at && renewal.at < end,
        "renews inside the window"
    );

    let status = sni_router::admin::status(shared);
    let cert = status["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["site"] == "window.test")
        .unwrap()
        .clone();
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(cert["renewal_window"][0], unix(start));
    assert_eq!(cert["renewal_window"][1], unix(end));
    assert_eq!(cert["next_renewal"], unix(renewal.at));
}

/// Pebble issuing 10-minute certificates: without ARI the renewal would
/// come at about 6 minutes; the CA is asked again every minute (a twentieth
/// of the lifetime, held to at least a minute).
async fn ten_minute_ca() -> Option<Pebble> {
    if !have("pebble") {
        return None;
    }
    let pebble = Pebble::start(Options {
        validity: Some(600),
        ..Options::default()
    })
    .await;
    pebble.serves_ari().await.then_some(pebble)
}

/// The binary as node "a" holding `sites`, once it serves a certificate for
/// each: the process, its state_dir, its TLS address, the first site's leaf.
struct Holder {
    process: Process,
    dir: PathBuf,
    state: PathBuf,
    /// A client trusting the CA's issuing root, fetched while it runs.
    client: Arc<rustls::ClientConfig>,
    admin: SocketAddr,
    tls: SocketAddr,
    first: Vec<u8>,
}

impl Holder {
    async fn start(pebble: &Pebble, dir: &Path, sites: &[&str]) -> Holder {
        let state = dir.join("state");
        let nodes = node_a(pebble);
        let mut held_sites = String::new();
        for site in sites {
            pebble.add_a(site, "127.0.0.2").await;
            held_sites.push_str(&held_site(&[site], &["a"], NOWHERE, ""));
        }
        let admin = free_addr("127.0.0.1");
        let top = pebble.acme_section(&state, &format!("[admin]\nlisten = \"{admin}\"\n"));
        let config = dir.join("router.toml");
        let toml = fleet_toml_http("a", &nodes, &top, &held_sites);
        std::fs::write(&config, toml).unwrap();
        let process = Process::start(&config, dir);
        process
            .wait_log_within(INSTALLED, sites.len(), Duration::from_secs(60))
            .await;
        let mut holder = Holder {
            process,
            dir: dir.to_path_buf(),
            state,
            tls: nodes[0].1,
            client: pebble.client().await,
            admin,
            first: Vec::new(),
        };
        holder.first = holder.serving(sites[0]).await;
        holder
    }

    /// Stops the process and starts it again on the same config and state.
    async fn restart(&mut self) {
        let config = self.dir.join("router.toml");
        self.process.stop();
        self.process = Process::start(&config, &self.dir);
        wait_listening(self.tls).await;
    }

    async fn serving(&self, site: &str) -> Vec<u8> {
        let (tls, _) = tls_connect(self.tls, self.client.clone(), site)
            .await
            .expect("handshake");
        peer_leaf(&tls)
    }

    /// A counter's value on the admin listener's `/metrics`.
    async fn metric(&self, name_and_labels: &str) -> f64 {
        let (status, _, body) = http_get(self.admin, "admin", "/metrics", "").await;
        assert_eq!(status, 200);
        metric_value(&body, name_and_labels)
    }

    /// The log lines of new orders.
    fn orders(&self) -> Vec<String> {
        let log = self.process.log();
        log.lines()
            .filter(|l| l.contains("ACME order site=") && l.contains("step=\"new_order\""))
            .map(str::to_string)
            .collect()
    }
}

const INSTALLED: &str = "ACME certificate installed";

#[tokio::test]
async fn a_revoked_certificate_is_replaced_at_the_next_check() {
    let Some(pebble) = ten_minute_ca().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let holder = Holder::start(&pebble, dir.path(), &["revoked.test"]).await;
    // Pebble's window for a 10-minute certificate ends days after it
    // expires: not followed.
    holder
        .process
        .wait_log("ends after the certificate expires", 1)
        .await;

    let revoked = Instant::now();
    pebble.revoke(&holder.state, &holder.first).await;
    holder
        .process
        .wait_log_within(INSTALLED, 2, Duration::from_secs(120))
        .await;
    assert!(
        revoked.elapsed() < Duration::from_secs(120),
        "replaced at the next check, not at a third of the lifetime left"
    );
    let log = holder.process.log();
    assert!(log.contains("the CA's renewal window moved"), "{log}");
    let orders = holder.orders();
    assert_eq!(orders.len(), 2, "{log}");
    assert!(!orders[0].contains("replaces="), "{}", orders[0]);
    assert!(orders[1].contains("replaces="), "{}", orders[1]);
    assert!(
        !log.contains("ACME order failed"),
        "the CA took replaces: {log}"
    );
    let second = holder.serving("revoked.test").await;
    assert_ne!(holder.first, second, "the replacement is served");
    // Asked after each issue and once in between: three answers, no failure.
    let asks = |outcome: &str| {
        format!("sni_router_acme_renewal_info_total{{site=\"revoked.test\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(holder.metric(&asks("window")).await, 3.0);
    assert_eq!(holder.metric(&asks("failed")).await, 0.0);
}

#[tokio::test]
async fn a_refused_replaces_gives_way_to_a_plain_order() {
    let Some(pebble) = ten_minute_ca().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Holder::start(&pebble, dir.path(), &["restored.test"]).await;
    let site_dir = holder.state.join("sites/restored.test");
    let backup = dir.path().join("backup");
    copy_dir(&site_dir, &backup);
    pebble.revoke(&holder.state, &holder.first).await;
    holder
        .process
        .wait_log_within(INSTALLED, 2, Duration::from_secs(120))
        .await;

    // state_dir restored from a backup: the revoked, already replaced
    // certificate is back. The CA refuses a second order replacing it.
    copy_dir(&backup, &site_dir);
    holder.restart().await;
    holder
        .process
        .wait_log_within(INSTALLED, 1, Duration::from_secs(60))
        .await;
    let log = holder.process.log();
    let refused = log
        .lines()
        .find(|l| l.contains("ACME order failed"))
        .unwrap_or_else(|| panic!("the CA refused replaces: {log}"));
    assert!(
        refused.contains("step=\"new_order\"") && refused.contains("replace"),
        "{refused}"
    );
    let orders = holder.orders();
    assert_eq!(orders.len(), 2, "{log}");
    assert!(orders[0].contains("replaces="), "{}", orders[0]);
    assert!(!orders[1].contains("replaces="), "{}", orders[1]);
    let now = holder.serving("restored.test").await;
    assert_ne!(holder.first, now, "the plain order's certificate is served");
}

#[tokio::test]
async fn a_ca_that_never_answers_stalls_neither_start_nor_schedule() {
    let Some(mut pebble) = ten_minute_ca().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sites = ["silent-a.test", "silent-b.test"];
    let mut holder = Holder::start(&pebble, dir.path(), &sites).await;
    let b_first = holder.serving(sites[1]).await;
    // The CA's address now accepts connections and never answers.
    holder.process.stop();
    pebble.pause();
    let hole = tokio::net::TcpListener::bind(pebble.listen).await.unwrap();
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    holder.restart().await;
    // Both stored certificates are served at once, before the first ask of
    // the CA has timed out.
    holder
        .process
        .wait_log("stored ACME certificate loaded", 2)
        .await;
    assert_eq!(holder.serving(sites[0]).await, holder.first);
    assert_eq!(holder.serving(sites[1]).await, b_first);
    // The ask's own deadline or its request's, whichever ends first.
    let silent = "the CA did not answer";
    assert!(!holder.process.log().contains(silent));
    holder
        .process
        .wait_log_within(silent, 1, Duration::from_secs(60))
        .await;
    // The other site does not wait out a deadline of its own.
    holder
        .process
        .wait_log_within(
            "other renewal-information asks wait",
            1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(holder.process.log().matches(silent).count(), 1);
    hole.abort();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

//! ACME Renewal Information (RFC 9773) against a real CA: Pebble 2.6, which
//! `scripts/test` fetches when the system's Pebble is older.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::pebble::{Options, Pebble, held, wait_acme};
use support::process::Process;
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
        &held("window.test", "\"a\""),
    ))
    .await;
    let leaf = wait_acme(&router, "window.test", None).await;
    let info = sni_router::certs::disk::describe(&leaf.into()).unwrap();

    let shared = &router.handle.shared;
    let renewal = || shared.renewals.lock().unwrap().get("window.test").copied();
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

#[tokio::test]
async fn a_revoked_certificate_is_replaced_at_the_next_check() {
    if !have("pebble") {
        return;
    }
    // 10 minutes: without ARI the renewal would come at about 6 minutes;
    // the CA is asked again every minute (a twentieth of the lifetime,
    // held to at least a minute).
    let pebble = Pebble::start(Options {
        validity: Some(600),
        ..Options::default()
    })
    .await;
    if !pebble.serves_ari().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let nodes = node_a(&pebble);
    pebble.add_a("revoked.test", "127.0.0.2").await;
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        fleet_toml_http(
            "a",
            &nodes,
            &pebble.acme_section(&state, ""),
            &held("revoked.test", "\"a\""),
        ),
    )
    .unwrap();
    let router = Process::start(&config, dir.path());
    let installed = "ACME certificate installed";
    wait_logged(&router, installed, 1, Duration::from_secs(60)).await;
    let client = pebble.client().await;
    let serving = || async {
        let (tls, _) = tls_connect(nodes[0].1, client.clone(), "revoked.test")
            .await
            .expect("handshake");
        peer_leaf(&tls)
    };
    let first = serving().await;
    // Pebble's window for a 10-minute certificate ends days after it
    // expires: not followed.
    assert!(router.log().contains("ends after the certificate expires"));

    let revoked = Instant::now();
    pebble.revoke(&state, &first).await;
    wait_logged(&router, installed, 2, Duration::from_secs(120)).await;
    assert!(
        revoked.elapsed() < Duration::from_secs(120),
        "replaced at the next check, not at a third of the lifetime left"
    );
    let log = router.log();
    assert!(log.contains("the CA's renewal window moved"), "{log}");
    let orders: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("step=\"new_order\""))
        .collect();
    assert_eq!(orders.len(), 2, "{log}");
    assert!(!orders[0].contains("replaces="), "{}", orders[0]);
    assert!(orders[1].contains("replaces="), "{}", orders[1]);
    assert!(
        !log.contains("ACME order failed"),
        "the CA took replaces: {log}"
    );
    let second = serving().await;
    assert_ne!(first, second, "the replacement is served");
}

/// Waits (bounded by `within`) until `text` was logged `times` times.
async fn wait_logged(router: &Process, text: &str, times: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while router.log().matches(text).count() < times {
        assert!(
            Instant::now() < deadline,
            "{text:?} not logged {times}x within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

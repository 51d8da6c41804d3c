//! DNS-01 through RFC 2136 against real servers: Knot DNS holds the zones
//! and takes TSIG-signed updates, Pebble validates by asking it.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::knot::{Knot, SECRET, Zone};
use support::pebble::{Options, Pebble, wait_acme};
use support::process::Process;
use support::*;

const NODES: [(&str, &str); 2] = [("a", "127.0.0.2"), ("b", "127.0.0.3")];

fn nodes() -> Vec<(&'static str, SocketAddr)> {
    NODES.iter().map(|(n, ip)| (*n, free_addr(ip))).collect()
}

async fn knot() -> Knot {
    Knot::start(&[
        Zone {
            name: "wild.test",
            updatable: true,
            ..Zone::default()
        },
        Zone {
            name: "cnamed.test",
            records: "_acme-challenge CNAME _acme-challenge.cnamed.test.acme.delegated.test.",
            ..Zone::default()
        },
        Zone {
            name: "delegated.test",
            updatable: true,
            ..Zone::default()
        },
        Zone {
            name: "hidden.test",
            updatable: true,
            hidden: true,
            ..Zone::default()
        },
    ])
    .await
}

/// Knot, a Pebble that asks it, and a directory for the routers.
async fn knot_and_pebble() -> (Knot, Pebble, tempfile::TempDir) {
    let knot = knot().await;
    let pebble = Pebble::start(Options {
        dns_server: Some(knot.addr),
        ..Options::default()
    })
    .await;
    (knot, pebble, tempfile::tempdir().unwrap())
}

/// A router config for `this` holding `names` with the others in `nodes`.
fn config(
    this: &str,
    nodes: &[(&str, SocketAddr)],
    pebble: &Pebble,
    dir: &std::path::Path,
    dns01: &str,
    site: &str,
) -> String {
    let top = format!(
        "{}{dns01}",
        pebble.acme_section(&dir.join(this).join("state"), "")
    );
    fleet_toml(this, nodes, &top, site)
}

#[tokio::test]
async fn two_holders_order_a_wildcard_at_once_and_leave_the_zone_clean() {
    if !have("pebble") || !have("knotd") {
        return;
    }
    let (knot, pebble, dir) = knot_and_pebble().await;
    let nodes = nodes();
    let site = held_site(&["wild.test", "*.wild.test"], &["a", "b"], NOWHERE, "");
    let mut routers = Vec::new();
    for (name, _) in &nodes {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        let dns01 = knot.section(&dir.path().join(name), SECRET, "");
        let toml = config(name, &nodes, &pebble, dir.path(), &dns01, &site);
        routers.push(Router::start(&toml).await);
    }
    let a = wait_acme(&routers[0], "wild.test", None).await;
    let b = wait_acme(&routers[1], "wild.test", None).await;
    assert_ne!(a, b, "each holder has its own certificate");
    for router in &routers {
        let status = sni_router::admin::status(&router.handle.shared);
        let site = &status["certificates"][0];
        assert_eq!(site["challenge"], "dns-01", "{status}");
        assert_eq!(site["source"], "acme", "{status}");
        assert!(site["last_error"].is_null(), "{status}");
        let entry = router.handle.shared.certs.get("wild.test").unwrap();
        assert!(entry.loaded.info.covers("x.wild.test") && entry.loaded.info.covers("wild.test"));
        assert_eq!(router.handle.shared.acme.failed(), 0, "{}", knot.log());
    }
    assert!(
        knot.txt("_acme-challenge.wild.test").await.is_empty(),
        "every record removed:\n{}",
        knot.log()
    );
}

#[tokio::test]
async fn a_wrong_tsig_secret_is_named_writes_nothing_and_the_site_splices_to_a_holder_that_has_one()
{
    if !have("pebble") || !have("knotd") {
        return;
    }
    let (knot, pebble, dir) = knot_and_pebble().await;
    let nodes = nodes();
    let site = held_site(&["*.wild.test"], &["a", "b"], NOWHERE, "");
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let good = knot.section(&dir.path().join("a"), SECRET, "");
    let wrong = knot.section(
        &dir.path().join("b"),
        "d3Jvbmcgc2VjcmV0IGZvciB0aGlzIGtleSEhISEhIQ==",
        "",
    );
    let b = Router::start(&config("b", &nodes, &pebble, dir.path(), &wrong, &site)).await;
    // Refused, retried after a backoff (retry_min 1 s), never written.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.handle.shared.acme.failed() < 2 {
        assert!(Instant::now() < deadline, "no retry:\n{}", knot.log());
        assert!(knot.txt("_acme-challenge.wild.test").await.is_empty());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(b.handle.shared.certs.get("*.wild.test").is_none());
    let error = b
        .handle
        .shared
        .acme
        .last_error("*.wild.test")
        .unwrap_or_default();
    assert!(
        error.contains(
            "refused the TSIG key acme-update.: BadSig, adding TXT at _acme-challenge.wild.test."
        ),
        "{error}"
    );

    let a = Router::start(&config("a", &nodes, &pebble, dir.path(), &good, &site)).await;
    let leaf = wait_acme(&a, "*.wild.test", None).await;
    // Through b, which has none, a client is spliced to a and sees a's.
    let ca = pebble.client().await;
    let (tls, _) = tls_connect(b.addr(), ca, "x.wild.test").await.unwrap();
    assert_eq!(peer_leaf(&tls), leaf);
    assert!(knot.txt("_acme-challenge.wild.test").await.is_empty());
}

#[tokio::test]
async fn a_cname_delegated_challenge_is_written_in_the_target_zone() {
    if !have("pebble") || !have("knotd") || !have("unbound") {
        return;
    }
    let knot = knot().await;
    let resolver = support::knot::Resolver::start(knot.addr).await;
    let pebble = Pebble::start(Options {
        dns_server: Some(resolver.addr),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = &nodes()[..1];
    let site = held_site(
        &["cnamed.test"],
        &["a"],
        NOWHERE,
        "challenge = \"dns-01\"\n",
    );
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let dns01 = knot.section(&dir.path().join("a"), SECRET, "");
    let a = Router::start(&config("a", nodes, &pebble, dir.path(), &dns01, &site)).await;
    wait_acme(&a, "cnamed.test", None).await;
    let log = knot.log();
    assert!(
        log.contains("[delegated.test.] DDNS"),
        "the target zone was updated:\n{log}"
    );
    assert!(!log.contains("[cnamed.test.] DDNS"), "{log}");
    assert!(
        knot.txt("_acme-challenge.cnamed.test.acme.delegated.test")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_zone_that_refuses_the_key_and_a_name_in_no_zone_are_named() {
    if !have("pebble") || !have("knotd") {
        return;
    }
    let (knot, pebble, dir) = knot_and_pebble().await;
    let nodes = &nodes()[..1];
    // cnamed.test takes no updates; elsewhere.example is in no zone here.
    let sites = held_site(&["*.locked.cnamed.test"], &["a"], NOWHERE, "")
        + &held_site(&["*.elsewhere.example"], &["a"], NOWHERE, "");
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let dns01 = knot.section(&dir.path().join("a"), SECRET, "");
    let a = Router::start(&config("a", nodes, &pebble, dir.path(), &dns01, &sites)).await;
    let report = &a.handle.shared.acme;
    let named = wait_until(|| async {
        report.last_error("*.locked.cnamed.test").is_some()
            && report.last_error("*.elsewhere.example").is_some()
    })
    .await;
    assert!(named, "no errors yet");
    let locked = report.last_error("*.locked.cnamed.test").unwrap();
    // Knot answers BADKEY for a key the zone does not allow; BIND, REFUSED.
    assert!(
        ["answered NOTAUTH", "answered REFUSED", "BadKey"]
            .iter()
            .any(|e| locked.contains(e)),
        "{locked}"
    );
    assert!(
        locked.contains("adding TXT at _acme-challenge.locked.cnamed.test."),
        "{locked}"
    );
    let elsewhere = report.last_error("*.elsewhere.example").unwrap();
    assert!(
        elsewhere.contains("no zone for _acme-challenge.elsewhere.example."),
        "{elsewhere}"
    );
    assert!(
        knot.txt("_acme-challenge.locked.cnamed.test")
            .await
            .is_empty()
    );
}

/// The binary with an admin listener, so the DNS outcomes are read where an
/// operator reads them: `/metrics` and `/status`. `hidden.test` takes the
/// update but never answers the router's query for it.
#[tokio::test]
async fn a_txt_never_seen_is_named_removed_and_counted_beside_a_site_that_succeeds() {
    if !have("pebble") || !have("knotd") {
        return;
    }
    let (knot, pebble, dir) = knot_and_pebble().await;
    let nodes = &nodes()[..1];
    let admin = free_addr("127.0.0.1");
    let sites = held_site(&["*.wild.test"], &["a"], NOWHERE, "")
        + &held_site(&["*.hidden.test"], &["a"], NOWHERE, "");
    let dns01 = knot.section(
        dir.path(),
        SECRET,
        "propagation_timeout = \"2s\"\nzone = \"hidden.test.\"\n",
    );
    let dns01 = format!("{dns01}[admin]\nlisten = \"{admin}\"\n");
    let toml = config("a", nodes, &pebble, dir.path(), &dns01, &sites);
    let path = dir.path().join("a.toml");
    std::fs::write(&path, toml).unwrap();
    let router = Process::start(&path, dir.path());
    wait_listening(admin).await;

    let metric = |body: &str, result: &str| {
        metric_value(
            body,
            &format!("sni_router_dns_updates_total{{result=\"{result}\"}}"),
        )
    };
    // Two failures: the second came after the backoff, and each removed
    // what it added.
    let counted = wait_until_within(Duration::from_secs(60), || async {
        let (_, _, body) = http_get(admin, "admin", "/metrics", "").await;
        metric(&body, "not_seen") >= 2.0
            && metric(&body, "removed") >= 3.0
            && metric_value(
                &body,
                "sni_router_acme_orders_total{site=\"*.wild.test\",outcome=\"issued\"}",
            ) >= 1.0
    })
    .await;
    let (_, _, body) = http_get(admin, "admin", "/metrics", "").await;
    assert!(counted, "{body}\n{}", router.log());
    assert!(metric(&body, "added") >= 3.0, "{body}");
    for site in ["*.wild.test", "*.hidden.test"] {
        let info =
            format!("sni_router_acme_challenge_info{{site=\"{site}\",challenge=\"dns-01\"}}");
        assert_eq!(metric_value(&body, &info), 1.0, "{body}");
    }

    let (_, _, status) = http_get(admin, "admin", "/status", "").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let hidden = status["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["site"] == "*.hidden.test")
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(hidden["challenge"], "dns-01", "{status}");
    let error = hidden["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("did not answer the TXT at _acme-challenge.hidden.test. within 2s"),
        "{status}"
    );
    for name in ["_acme-challenge.hidden.test", "_acme-challenge.wild.test"] {
        assert!(
            knot.txt(name).await.is_empty(),
            "{name} left:\n{}",
            knot.log()
        );
    }
}

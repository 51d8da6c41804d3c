//! Config drift: nodes send their fleet digest on splices and forwarded
//! challenges; the receiver counts mismatches by peer and shows each peer's
//! last digest in /status. (The alert's own test is config/alerts.test.yml,
//! run by tests/observability.rs.)

mod support;

use std::net::SocketAddr;

use sni_router::config::Config;
use support::process::{Process, wait_listening};
use support::*;

const HELD: &str = "held.test";

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, _, body) = http_get(admin, "admin", "/status", "").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

fn peer<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .map(|p| &p["health"])
        .unwrap_or_else(|| panic!("no peer {node} in {status}"))
}

#[tokio::test]
async fn two_nodes_with_different_site_lists_show_drift() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = ca.leaf(&[HELD]).write(dir.path(), "held");
    let upstream = Backend::http("127.0.0.1").await;
    let nodes = three_nodes();
    let held = format!(
        "[[sites]]\nnames = [\"{HELD}\"]\nheld_by = [\"b\"]\nupstream = \"{}\"\n{cert}",
        upstream.addr
    );
    // a has one site more than b and c.
    let extra = "[[sites]]\nnames = [\"xtra.test\"]\npassthrough = \"127.0.0.1:9\"\n";
    let admin = free_addr("127.0.0.1");
    let b_toml = fleet_toml_http(
        "b",
        &nodes,
        &format!("[admin]\nlisten = \"{admin}\""),
        &held,
    );
    let b_config = dir.path().join("b.toml");
    std::fs::write(&b_config, &b_toml).unwrap();
    let _b = Process::start(&b_config, dir.path());
    wait_listening(admin).await;
    let a_toml = fleet_toml_http("a", &nodes, "", &format!("{held}{extra}"));
    let a = Router::start(&a_toml).await;
    let c = Router::start(&fleet_toml_http("c", &nodes, "", &held)).await;

    // A client through a, then one through c: both spliced to b, served.
    let client = ca.client_config(&[], true);
    for entry in [a.addr(), c.addr()] {
        let (reply, _) = tls_request(entry, client.clone(), HELD).await.unwrap();
        assert!(reply.contains("200 OK"), "{reply}");
    }

    let body = http_get(admin, "admin", "/metrics", "").await.2;
    assert_eq!(
        metric_value(&body, "sni_router_config_drift_total{node=\"a\"}"),
        1.0,
        "{body}"
    );
    assert!(!body.contains("sni_router_config_drift_total{node=\"c\"}"));

    let status = status(admin).await;
    let digest = |toml: &str, name| {
        Config::parse(toml, "t", Some(name))
            .unwrap()
            .digest
            .to_string()
    };
    assert_eq!(status["config_digest"], digest(&b_toml, "b"));
    let from_a = peer(&status, "a");
    assert_eq!(from_a["config_digest"], digest(&a_toml, "a"));
    assert_eq!(from_a["config_digest_matches"], false);
    assert!(from_a["config_digest_seen_at"].as_u64().unwrap() > 0);
    let from_c = peer(&status, "c");
    assert_eq!(from_c["config_digest"], status["config_digest"]);
    assert_eq!(from_c["config_digest_matches"], true);
    _b.wait_log("config drift: this peer's nodes and sites differ", 1)
        .await;
}

//! The admin listener of the real binary: metrics after real traffic,
//! promtool's verdict, bounded labels, health and status.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::process::{Process, wait_listening};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn scrape(admin: SocketAddr) -> String {
    let (status, _, body) = http_get(admin, "admin", "/metrics", "").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn metrics_move_with_real_traffic_and_labels_stay_bounded() {
    let backend = Backend::recorder("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let node = free_addr("127.0.0.2");
    let http = free_addr("127.0.0.2");
    let admin = free_addr("127.0.0.1");
    let top = format!("[admin]\nlisten = \"{admin}\"");
    let site = format!(
        "[[sites]]\nnames = [\"pass.test\"]\npassthrough = \"{}\"\n",
        backend.addr
    );
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        fleet_toml_http("a", &[("a", node, http)], &top, &site),
    )
    .unwrap();
    let _router = Process::start(&config, dir.path());
    wait_listening(admin).await;

    for path in ["/healthz", "/readyz"] {
        assert_eq!(http_get(admin, "admin", path, "").await.0, 200, "{path}");
    }
    // Real traffic: a routed connection, an unknown name, a redirect.
    let mut client = TcpStream::connect(node).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    client.shutdown().await.unwrap();
    backend.wait_for(1).await;
    let _ = read_until_eof(&mut client).await;
    let mut stranger = TcpStream::connect(node).await.unwrap();
    stranger.write_all(&hello_for("evil.test")).await.unwrap();
    let _ = read_until_eof(&mut stranger).await;
    assert_eq!(http_get(http, "pass.test", "/x", "").await.0, 308);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let body = scrape(admin).await;
    // The process and build series operators expect beside ours.
    let version = format!(
        "sni_router_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric_value(&body, &version), 1.0, "{body}");
    assert_eq!(metric_value(&body, "sni_router_connections_max"), 20_000.0);
    let loaded = metric_value(
        &body,
        "sni_router_config_last_reload_success_timestamp_seconds",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(loaded > now - 60.0 && loaded <= now, "{loaded}");
    assert!(body.contains("\nprocess_cpu_seconds_total "), "{body}");
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric_value(&body, series) > 0.0, "{series} in:\n{body}");
    }
    let listener = format!("listener=\"{node}\"");
    assert_eq!(
        metric_value(
            &body,
            &format!("sni_router_connections_accepted_total{{{listener}}}")
        ),
        2.0,
        "{body}"
    );
    let passthrough =
        format!("sni_router_connections_finished_total{{{listener},decision=\"passthrough\"}}");
    assert_eq!(metric_value(&body, &passthrough), 1.0, "{body}");
    assert_eq!(
        metric_value(&body, "sni_router_rejected_total{reason=\"unknown_name\"}"),
        1.0,
        "{body}"
    );
    assert!(
        metric_value(
            &body,
            "sni_router_bytes_total{direction=\"up\",decision=\"passthrough\"}"
        ) >= HELLO.len() as f64
    );
    assert_eq!(
        metric_value(&body, "sni_router_http_requests_total{result=\"redirect\"}"),
        1.0
    );
    // By site: the configured site's first name, `unknown` for a name in
    // no site; never the stranger's name.
    let by_site = |site: &str, decision: &str| {
        metric_value(
            &body,
            &format!(
                "sni_router_site_connections_total{{site=\"{site}\",decision=\"{decision}\"}}"
            ),
        )
    };
    assert_eq!(by_site("pass.test", "passthrough"), 1.0, "{body}");
    assert_eq!(by_site("unknown", "reject"), 1.0, "{body}");
    assert_eq!(by_site("none", "reject"), 0.0, "{body}");
    assert!(
        metric_value(
            &body,
            "sni_router_site_bytes_total{site=\"pass.test\",direction=\"up\"}"
        ) >= HELLO.len() as f64,
        "{body}"
    );
    assert!(
        metric_value(&body, "sni_router_client_hello_duration_seconds_count") >= 2.0,
        "{body}"
    );

    if have("promtool") {
        let file = dir.path().join("metrics.txt");
        std::fs::write(&file, &body).unwrap();
        let (ok, out) = sh(format!("promtool check metrics < {}", file.display())).await;
        assert!(ok, "promtool: {out}\n{body}");
    }

    // 200 strangers with random names add no series.
    let before: usize = body.lines().filter(|l| !l.starts_with('#')).count();
    for i in 0..200u32 {
        let name = format!("r{:07x}.x", i.wrapping_mul(2_654_435_761) >> 4);
        let mut c = TcpStream::connect(node).await.unwrap();
        c.write_all(&hello_for(&name[..9])).await.unwrap();
        let _ = read_until_eof(&mut c).await;
    }
    let after_body = scrape(admin).await;
    let after: usize = after_body.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(before, after, "new series appeared");
    assert_eq!(
        metric_value(
            &after_body,
            "sni_router_rejected_total{reason=\"unknown_name\"}"
        ),
        201.0
    );
    assert!(
        samples(&after_body)
            .iter()
            .flat_map(|s| &s.labels)
            .all(|(_, value)| !value.ends_with(".x"))
    );

    // A spliced connection quiet for a second moves to the splice engine,
    // and leaves its gauge when it ends.
    let mut quiet = TcpStream::connect(node).await.unwrap();
    quiet.write_all(HELLO).await.unwrap();
    let quiet_now =
        || async { metric_value(&scrape(admin).await, "sni_router_connections_quiet ") };
    assert!(
        wait_until(|| async { quiet_now().await == 1.0 }).await,
        "never held quiet"
    );
    quiet.shutdown().await.unwrap();
    let _ = read_until_eof(&mut quiet).await;
    assert!(
        wait_until(|| async { quiet_now().await == 0.0 }).await,
        "still held"
    );

    let (status, _, json) = http_get(admin, "admin", "/status", "").await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["node"], "a");
    assert_eq!(status["routes"][0]["route"], "passthrough");
    assert_eq!(status["ready"], true);
    // Counts since start: the unknown name was refused, the redirect served.
    assert!(
        status["connections"]["rejected"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        status["http"]["requests"].as_u64().unwrap() >= 1,
        "{status}"
    );
}

#[tokio::test]
async fn shipped_prometheus_config_and_alerts_pass_promtool() {
    if !have("promtool") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out) = sh(format!(
        "promtool check config {root}/config/prometheus.yml"
    ))
    .await;
    assert!(ok, "{out}");
    let (ok, out) = sh(format!("promtool check rules {root}/config/alerts.yml")).await;
    assert!(ok && out.contains("10 rules found"), "{out}");
    // The alerts' own tests: they fire when they should and only then.
    let (ok, out) = sh(format!("promtool test rules {root}/config/alerts.test.yml")).await;
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

#[tokio::test]
async fn a_site_removed_by_a_reload_leaves_no_series_for_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let node = free_addr("127.0.0.2");
    let admin = free_addr("127.0.0.1");
    let top = format!("[admin]\nlisten = \"{admin}\"");
    let files = TestCa::new().leaf(&["gone.test"]).write(dir.path(), "gone");
    let config = dir.path().join("node.toml");
    let with = |sites: &str| fleet_toml("a", &[("a", node)], &top, sites);
    std::fs::write(
        &config,
        with(&held_site(&["gone.test"], &["a"], NOWHERE, &files)),
    )
    .unwrap();
    let router = Process::start(&config, dir.path());
    wait_listening(admin).await;
    let expiry = "sni_router_certificate_expiry_timestamp_seconds{site=\"gone.test\"}";
    let not_before = "sni_router_certificate_not_before_timestamp_seconds{site=\"gone.test\"}";
    let body = scrape(admin).await;
    assert!(
        metric_value(&body, expiry) > metric_value(&body, not_before),
        "{body}"
    );

    std::fs::write(&config, with(&passthrough_site("other.test", NOWHERE))).unwrap();
    router.signal("HUP");
    router.wait_log("config reloaded", 1).await;
    // The certificate watcher follows the reload a moment later.
    let gone = wait_until(|| async {
        let body = scrape(admin).await;
        !body.contains("site=\"gone.test\"")
    })
    .await;
    assert!(gone, "{}", scrape(admin).await);
}

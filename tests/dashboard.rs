//! `config/dashboard.json` against real data: a router under a little
//! traffic of every kind (passthrough, termination by the internal CA, an
//! ACME order from Pebble, a refused name, a holder that is down), scraped
//! by a real Prometheus; every panel's query must parse and return data.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::pebble::{Options, Pebble};
use support::process::{Process, wait_listening};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A Prometheus server scraping `target` every second; killed on drop.
struct Prometheus {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Child,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr("127.0.0.1");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sni-router\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("start prometheus");
        wait_listening(addr).await;
        Prometheus { dir, addr, child }
    }

    /// The query's result list, or why there is none.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let file = self.dir.path().join("query");
        std::fs::write(&file, expr).unwrap();
        let (ok, out) = sh(format!(
            "curl -sS --max-time 10 -G --data-urlencode query@{} http://{}/api/v1/query",
            file.display(),
            self.addr
        ))
        .await;
        let answer: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        if !ok || answer["status"] != "success" {
            return Err(out);
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the dashboard, with Grafana's variables given values.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "30s")
                .replace("$__range", "5m");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    queries
}

#[tokio::test]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    if !have("prometheus") || !have("pebble") || !have("curl") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    pebble.add_a("acme.test", "127.0.0.2").await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Backend::http("127.0.0.1").await;
    let backend = Backend::recorder("127.0.0.1").await;
    let a = free_addr("127.0.0.2");
    let admin = free_addr("127.0.0.1");
    let nodes = [
        ("a", a, SocketAddr::new(a.ip(), pebble.http_port)),
        ("b", free_addr("127.0.0.3"), free_addr("127.0.0.3")),
    ];
    let state = dir.path().join("state");
    let top = format!(
        "state_dir = \"{}\"\n[admin]\nlisten = \"{admin}\"\n{}",
        state.display(),
        pebble.acme_section(&state, "")
    );
    let sites = held_site(&["acme.test"], &["a"], upstream.addr, "")
        + &held_site(&["app.localhost"], &["a"], upstream.addr, "")
        + &held_site(&["down.test"], &["b"], upstream.addr, "")
        + &passthrough_site("pass.test", backend.addr);
    let config = dir.path().join("node.toml");
    std::fs::write(&config, fleet_toml_http("a", &nodes, &top, &sites)).unwrap();
    let router = Process::start(&config, dir.path());
    wait_listening(admin).await;
    let prometheus = Prometheus::start(admin).await;

    // Traffic of every kind, while Prometheus scrapes.
    let issued = wait_until_within(Duration::from_secs(60), || async {
        let (_, _, body) = http_get(admin, "admin", "/metrics", "").await;
        metric_value(
            &body,
            "sni_router_acme_orders_total{site=\"acme.test\",outcome=\"issued\"}",
        ) >= 1.0
    })
    .await;
    assert!(issued, "no ACME certificate:\n{}", router.log());
    let root = state.join("ca/root.pem");
    for _ in 0..3 {
        let (ok, out) = curl_https(&root, "app.localhost", a).await;
        assert!(ok && out.contains("upstream saw"), "{out}");
        for name in ["pass.test", "nope.test", "down.test"] {
            let mut client = TcpStream::connect(a).await.unwrap();
            client.write_all(&hello_for(name)).await.unwrap();
            let _ = client.shutdown().await;
            let _ = read_until_eof(&mut client).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let queries = dashboard_queries();
    assert!(queries.len() >= 14, "{queries:?}");
    let mut empty = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        empty.clear();
        for (title, expr) in &queries {
            match prometheus.query(expr).await {
                Ok(result) if !result.is_empty() => {}
                Ok(_) => empty.push(format!("{title}: no data for {expr}")),
                Err(e) => panic!("{title}: {expr} did not run: {e}"),
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(empty.is_empty(), "{}", empty.join("\n"));
}

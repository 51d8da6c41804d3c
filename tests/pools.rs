//! Backend pools: one engine with the holders' failover rules, passive
//! health so a dead target costs one attempt, active checks, and draining.
//! Clients bind chosen 127.0.0.x addresses, so rendezvous spreads them.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::process::{Process, wait_listening};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// Clients 127.0.0.30 and up.
fn client(i: u8) -> String {
    format!("127.0.0.{}", 30 + i)
}

/// A ClientHello for `name` from `from`, answered: true when the backend
/// echoed it back (every backend here is an echo).
async fn answered(from: &str, to: SocketAddr, name: &str) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let Ok(mut stream) = socket.connect(to).await else {
        return false;
    };
    let hello = hello_for(name);
    if stream.write_all(&hello).await.is_err() {
        return false;
    }
    let mut echoed = vec![0u8; hello.len()];
    let read = tokio::time::timeout(WAIT, stream.read_exact(&mut echoed)).await;
    let _ = stream.shutdown().await;
    matches!(read, Ok(Ok(_))) && echoed == hello
}

fn pool_site(name: &str, targets: &[String], more: &str) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[[sites]]\nnames = [\"{name}\"]\npassthrough = [{}]\n{more}",
        list.join(", ")
    )
}

#[tokio::test]
async fn a_dead_backend_costs_one_attempt_and_is_used_again_when_back() {
    let dead = Backend::closer("127.0.0.1").await;
    let good = Backend::echo("127.0.0.1").await;
    let targets = [dead.addr.to_string(), good.addr.to_string()];
    let node = free_addr("127.0.0.2");
    let site = pool_site("pool.test", &targets, "");
    let router = Router::start(&fleet_toml("a", &[("a", node)], "", &site)).await;

    // Every client is served, whichever target its order puts first.
    let started = Instant::now();
    for i in 0..16 {
        assert!(
            answered(&client(i), router.addr(), "pool.test").await,
            "client {i}"
        );
    }
    let tried = dead.connections();
    // The first client that ranked it first paid; the rest found it cooling
    // (2 s, then longer), unless this machine took that long for 16.
    let cooled = (started.elapsed().as_secs_f64() / 2.0).floor() as usize;
    assert!(
        (1..=1 + cooled).contains(&tried),
        "{tried} attempts at the dead backend"
    );

    // It comes back: once its cooling ends, its clients return to it.
    dead.stop().await;
    let back = Backend::echo_on(TcpListener::bind(dead.addr).await.unwrap()).await;
    let used = wait_until_within(Duration::from_secs(20), || async {
        for i in 0..16 {
            assert!(answered(&client(i), router.addr(), "pool.test").await);
        }
        back.connections() > 0
    })
    .await;
    assert!(used, "the backend that came back got no client");
}

#[tokio::test]
async fn an_upstream_pool_with_a_target_down_serves_every_terminated_client() {
    if !have("curl") {
        return;
    }
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let cert = ca.leaf(&["up.test"]).write(dir.path(), "up");
    let upstream = Backend::http("127.0.0.1").await;
    let nowhere = free_addr("127.0.0.1");
    let node = free_addr("127.0.0.2");
    let site = format!(
        "[[sites]]\nnames = [\"up.test\"]\nheld_by = [\"a\"]\nupstream = [\"{nowhere}\", \"{}\"]\n{cert}\n",
        upstream.addr
    );
    let _router = Router::start(&fleet_toml("a", &[("a", node)], "", &site)).await;
    for i in 0..6 {
        let (ok, out) = sh(format!(
            "curl -sS --max-time 10 --interface {} --cacert {} \
             --resolve up.test:{port}:{ip} https://up.test:{port}/",
            client(i),
            ca_file.display(),
            port = node.port(),
            ip = node.ip(),
        ))
        .await;
        assert!(ok && out.starts_with("upstream saw:"), "client {i}: {out}");
    }
    assert_eq!(upstream.connections(), 6);
}

/// A pool of two echo backends behind the binary, with an admin port.
struct Binary {
    router: Process,
    node: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn binary(sites: &str) -> Binary {
    let dir = tempfile::tempdir().unwrap();
    let node = free_addr("127.0.0.2");
    let admin = free_addr("127.0.0.1");
    let config = dir.path().join("node.toml");
    let top = format!("[admin]\nlisten = \"{admin}\"\n");
    std::fs::write(&config, fleet_toml("a", &[("a", node)], &top, sites)).unwrap();
    let router = Process::start(&config, dir.path());
    wait_listening(node).await;
    wait_listening(admin).await;
    Binary {
        router,
        node,
        admin,
        config,
        _dir: dir,
    }
}

#[tokio::test]
async fn weight_zero_drains_a_target_on_sighup() {
    let (x, y) = (
        Backend::echo("127.0.0.1").await,
        Backend::echo("127.0.0.1").await,
    );
    let site = |x_weight: u32| {
        format!(
            "[[sites]]\nnames = [\"pool.test\"]\npassthrough = [{{ addr = \"{}\", weight = {x_weight} }}, \"{}\"]\n",
            x.addr, y.addr
        )
    };
    let b = binary(&site(1)).await;
    for i in 0..16 {
        assert!(answered(&client(i), b.node, "pool.test").await);
    }
    // Each echo records a connection when it ends: wait for all 16.
    assert!(wait_until(|| async { x.connections() + y.connections() >= 16 }).await);
    assert!(
        x.connections() > 0 && y.connections() > 0,
        "both took clients"
    );
    let x_before = x.connections();

    std::fs::write(
        &b.config,
        std::fs::read_to_string(&b.config)
            .unwrap()
            .replace(&site(1), &site(0)),
    )
    .unwrap();
    b.router.signal("HUP");
    b.router.wait_log("config reloaded", 1).await;
    let y_before = y.connections();
    for i in 0..16 {
        assert!(
            answered(&client(i), b.node, "pool.test").await,
            "client {i}"
        );
    }
    assert!(y.wait_for(y_before + 16).await.len() >= y_before + 16);
    assert_eq!(
        x.connections(),
        x_before,
        "a drained target got new clients"
    );
    let (_, _, status) = http_get(b.admin, "admin", "/status", "").await;
    assert!(
        status.contains(&format!("\"addr\":\"{}\"", x.addr)),
        "{status}"
    );
    assert!(status.contains("\"weight\":0"), "{status}");
}

#[tokio::test]
async fn tcp_checks_show_a_dead_target_in_status_and_metrics() {
    let good = Backend::echo("127.0.0.1").await;
    let dead = free_addr("127.0.0.1");
    let targets = [dead.to_string(), good.addr.to_string()];
    let b = binary(&pool_site("pool.test", &targets, "health = \"tcp\"\n")).await;
    let metric = |target: SocketAddr| {
        format!("sni_router_target_up{{site=\"pool.test\",target=\"{target}\"}}")
    };
    let scrape = || async {
        let (_, _, body) = http_get(b.admin, "admin", "/metrics", "").await;
        body
    };
    let checked = wait_until_within(Duration::from_secs(15), || async {
        scrape().await.contains(&metric(dead))
    })
    .await;
    let body = scrape().await;
    assert!(checked, "{body}\n{}", b.router.log());
    assert_eq!(metric_value(&body, &metric(dead)), 0.0, "{body}");
    assert_eq!(metric_value(&body, &metric(good.addr)), 1.0, "{body}");
    let (_, _, status) = http_get(b.admin, "admin", "/status", "").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let targets = &status["routes"][0]["targets"];
    assert_eq!(targets[0]["health"], "down", "{status}");
    assert_eq!(targets[0]["checked"], false, "{status}");
    assert_eq!(targets[1]["health"], "up", "{status}");
    // A checked-down target is tried last: every client goes straight to
    // the good one, with no failed attempt.
    for i in 0..8 {
        assert!(answered(&client(i), b.node, "pool.test").await);
    }
    assert!(
        !b.router.log().contains("target failed"),
        "{}",
        b.router.log()
    );
}

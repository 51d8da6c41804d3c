//! Who may reach a site: allow and deny lists, judged on the real client
//! address by every node it passes, on both ports. Clients bind chosen
//! 127.0.0.x addresses (and ::1): each address is a different client.

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// A fatal `access_denied` alert, as the router sends it.
const ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x31];

const ALLOWED: &str = "127.0.0.10";
/// Allowed by the entry node's config, denied by the holder's.
const HOLDER_DENIES: &str = "127.0.0.11";
/// Denied by every node.
const DENIED: &str = "127.0.0.12";

/// A ClientHello for `name` to `to` from `from`; what came back before EOF.
async fn hello_from(from: &str, to: SocketAddr, name: &str) -> Vec<u8> {
    let mut stream = send_hello(from, to, name).await;
    read_until_eof(&mut stream).await.0
}

/// The connection that sent a ClientHello for `name` to `to` from `from`.
async fn send_hello(from: &str, to: SocketAddr, name: &str) -> TcpStream {
    let socket = if to.is_ipv6() {
        TcpSocket::new_v6()
    } else {
        TcpSocket::new_v4()
    }
    .unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let mut stream: TcpStream = socket.connect(to).await.unwrap();
    stream.write_all(&hello_for(name)).await.unwrap();
    stream
}

/// Node a (entry) and c (holder of `gard.test`, with a certificate);
/// a passthrough site every node may pass; their configs differ only in
/// the guarded site's allow list.
struct Fleet {
    a: Router,
    c: Router,
    upstream: Backend,
    backend: Backend,
    nodes: [(&'static str, SocketAddr, SocketAddr); 3],
    ca_file: std::path::PathBuf,
    webroot: tempfile::TempDir,
}

async fn fleet() -> Fleet {
    let ca = TestCa::new();
    let webroot = tempfile::tempdir().unwrap();
    let challenges = webroot.path().join(".well-known/acme-challenge");
    std::fs::create_dir_all(&challenges).unwrap();
    std::fs::write(challenges.join("tok_EN-1"), "tok_EN-1.thumbprint").unwrap();
    let ca_file = webroot.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let cert = ca.leaf(&["gard.test"]).write(webroot.path(), "guarded");
    let upstream = Backend::http("127.0.0.1").await;
    let backend = Backend::recorder("127.0.0.1").await;
    let nodes = three_nodes();
    let top = format!("[http]\nwebroot = \"{}\"\n", webroot.path().display());
    let config = |name, allow: &str| {
        let guarded = held_site(
            &["gard.test"],
            &["c"],
            upstream.addr,
            &format!("{cert}\nallow = [{allow}]\n"),
        );
        let pass =
            passthrough_site("pass.test", backend.addr) + &format!("deny = [\"{DENIED}\"]\n");
        fleet_toml_http(name, &nodes, &top, &(guarded + &pass))
    };
    let entry_allows = format!("\"{ALLOWED}\", \"{HOLDER_DENIES}\"");
    let a = Router::start(&config("a", &entry_allows)).await;
    let c = Router::start(&config("c", &format!("\"{ALLOWED}/32\""))).await;
    Fleet {
        a,
        c,
        upstream,
        backend,
        nodes,
        ca_file,
        webroot,
    }
}

#[tokio::test]
async fn an_allowed_client_is_served_and_a_denied_one_reaches_no_backend_or_holder() {
    if !have("curl") {
        return;
    }
    let fleet = fleet().await;
    let (entry, holder) = (fleet.a.addr(), fleet.c.addr());
    // Allowed: through a to c, terminated there, answered by the upstream.
    let (ok, out) = sh(format!(
        "curl -sS --max-time 10 --interface {ALLOWED} --cacert {} \
         --resolve gard.test:{port}:{ip} https://gard.test:{port}/",
        fleet.ca_file.display(),
        port = entry.port(),
        ip = entry.ip(),
    ))
    .await;
    assert!(ok && out.starts_with("upstream saw:"), "{out}");
    let holder_accepted = fleet.c.accepted();

    // Denied by both: the alert from a, and c never hears of it.
    assert_eq!(hello_from(DENIED, entry, "gard.test").await, ACCESS_DENIED);
    assert_eq!(fleet.c.accepted(), holder_accepted);

    // Allowed by a, denied by c: c refuses the address the PROXY header
    // carries, and its alert reaches the client through a.
    assert_eq!(
        hello_from(HOLDER_DENIES, entry, "gard.test").await,
        ACCESS_DENIED
    );
    assert!(wait_until(|| async { fleet.c.rejected() == 1 }).await);
    assert_eq!(fleet.upstream.connections(), 1);
    // And straight at the holder, the same.
    assert_eq!(hello_from(DENIED, holder, "gard.test").await, ACCESS_DENIED);

    // A passthrough site with a deny list: the backend sees only the allowed.
    assert_eq!(hello_from(DENIED, entry, "pass.test").await, ACCESS_DENIED);
    assert_eq!(fleet.backend.connections(), 0);
    let mut open = send_hello(ALLOWED, entry, "pass.test").await;
    open.shutdown().await.unwrap();
    assert_eq!(fleet.backend.wait_for(1).await.len(), 1);
}

#[tokio::test]
async fn port_80_refuses_a_redirect_but_never_a_challenge() {
    if !have("curl") {
        return;
    }
    let fleet = fleet().await;
    let http = fleet.nodes[0].2;
    let get = |from: &'static str, path: &'static str| {
        sh(format!(
            "curl -sS --max-time 10 --interface {from} -o /dev/null -w '%{{http_code}}' \
             -H 'host: gard.test' http://{http}{path}"
        ))
    };
    assert_eq!(get(ALLOWED, "/").await.1, "308");
    assert_eq!(get(DENIED, "/").await.1, "403");
    // The CA's validators come from anywhere.
    let (ok, body) = sh(format!(
        "curl -sS --max-time 10 --interface {DENIED} -H 'host: gard.test' \
         http://{http}/.well-known/acme-challenge/tok_EN-1"
    ))
    .await;
    assert!(ok && body == "tok_EN-1.thumbprint", "{body}");
    drop(fleet.webroot);
}

/// An `http = "upstream"` site on port 80: an allowed client reaches the
/// upstream, a denied one gets 403 and the upstream never hears of it.
#[tokio::test]
async fn port_80_refuses_a_denied_client_before_its_upstream() {
    if !have("curl") {
        return;
    }
    let upstream = Backend::http("127.0.0.1").await;
    let (node, http) = (free_addr("127.0.0.2"), free_addr("127.0.0.2"));
    let site = format!(
        "[[sites]]\nnames = [\"plain.test\"]\nheld_by = [\"a\"]\nupstream = \"{}\"\n\
         http = \"upstream\"\nallow = [\"{ALLOWED}/32\"]\n",
        upstream.addr
    );
    let _router = Router::start(&fleet_toml_http("a", &[("a", node, http)], "", &site)).await;
    let get = |from: &'static str| {
        sh(format!(
            "curl -sS --max-time 10 --interface {from} -w ' %{{http_code}}' \
             -H 'host: plain.test' http://{http}/"
        ))
    };
    let (ok, out) = get(ALLOWED).await;
    assert!(
        ok && out.starts_with("upstream saw:") && out.ends_with(" 200"),
        "{out}"
    );
    assert_eq!(upstream.connections(), 1);
    let (_, out) = get(DENIED).await;
    assert!(out.ends_with(" 403"), "{out}");
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn ipv6_clients_are_judged_by_their_v6_networks() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        return; // no IPv6 loopback on this host
    };
    drop(probe);
    let backend = Backend::recorder("127.0.0.1").await;
    let node = free_addr("::1");
    let sites = passthrough_site("six6.test", backend.addr)
        + "allow = [\"2001:db8::/32\"]\n"
        + &passthrough_site("open.test", backend.addr)
        + "allow = [\"::1\", \"127.0.0.0/8\"]\n";
    let router = Router::start(&fleet_toml("a", &[("a", node)], "", &sites)).await;
    assert_eq!(
        hello_from("::1", router.addr(), "six6.test").await,
        ACCESS_DENIED
    );
    assert_eq!(backend.connections(), 0);
    let mut open = send_hello("::1", router.addr(), "open.test").await;
    open.shutdown().await.unwrap();
    assert_eq!(backend.wait_for(1).await.len(), 1);
}

/// Replies from `n` connections in a row from `from`, each a hello for a
/// name in no site: the alert when admitted, nothing when refused at
/// accept.
async fn churn(from: &str, to: SocketAddr, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        if !hello_from(from, to, "nope.test").await.is_empty() {
            admitted += 1;
        }
    }
    admitted
}

#[tokio::test]
async fn a_churning_source_is_held_to_its_rate_while_others_and_nodes_are_not() {
    let (a, b) = (free_addr("127.0.0.2"), free_addr("127.0.0.3"));
    let top = "[limits]\nnew_per_source_per_second = 5\n";
    let router = Router::start(&fleet_toml("a", &[("a", a), ("b", b)], top, "")).await;
    let started = std::time::Instant::now();
    let admitted = churn("127.0.0.20", router.addr(), 30).await;
    // A second's worth at once, then 5 a second.
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (5..=5 + refilled).contains(&admitted) && admitted < 30,
        "{admitted} of 30 admitted in {:?}",
        started.elapsed()
    );
    assert_eq!(
        churn("127.0.0.21", router.addr(), 3).await,
        3,
        "another source"
    );
    // Node b's address carries many clients' connections: not metered.
    assert_eq!(churn("127.0.0.3", router.addr(), 30).await, 30);
}

#[tokio::test]
async fn refusals_are_counted_by_site_reason_and_port_and_logged_within_a_budget() {
    use support::process::{Process, wait_listening};
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (tls, http, admin) = (
        free_addr("127.0.0.2"),
        free_addr("127.0.0.2"),
        free_addr("127.0.0.1"),
    );
    let top = format!("[admin]\nlisten = \"{admin}\"\n");
    let sites = passthrough_site("pass.test", NOWHERE) + &format!("deny = [\"{DENIED}\"]\n");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        fleet_toml_http("a", &[("a", tls, http)], &top, &sites),
    )
    .unwrap();
    let router = Process::start(&config, dir.path());
    wait_listening(admin).await;
    for _ in 0..40 {
        assert_eq!(hello_from(DENIED, tls, "pass.test").await, ACCESS_DENIED);
    }
    let (_, code) = sh(format!(
        "curl -sS --max-time 10 --interface {DENIED} -o /dev/null -w '%{{http_code}}' \
         -H 'host: pass.test' http://{http}/"
    ))
    .await;
    assert_eq!(code, "403");
    let (_, _, body) = http_get(admin, "admin", "/metrics", "").await;
    let denied = |port: &str| {
        metric_value(
            &body,
            &format!(
                "sni_router_access_denied_total{{site=\"pass.test\",reason=\"deny_listed\",port=\"{port}\"}}"
            ),
        )
    };
    assert_eq!(denied("tls"), 40.0, "{body}");
    assert_eq!(denied("http"), 1.0, "{body}");
    // 41 refusals in a second or two: at most 10 lines a second.
    let log = router.log();
    let lines = log.matches("access denied").count();
    assert!((1..41).contains(&lines), "{lines} lines:\n{log}");
    assert!(
        !log.contains("connection finished"),
        "no second line per refusal"
    );
}

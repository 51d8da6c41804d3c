//! Clients that run on a node's own host (monitoring probes, applications,
//! an operator's curl) are ordinary clients: only a PROXY header from a node
//! address marks a connection a node spliced.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sni_router::config::ProxyVersion;
use sni_router::proxy_protocol;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Node a (127.0.0.2) holds nothing; b (127.0.0.3) holds `bnod.test` without a
/// certificate; c (127.0.0.4) holds `held.test` with one.
struct Fleet {
    a: Router,
    b: Router,
    c: Router,
    upstream: Backend,
    ca_file: String,
    _dir: tempfile::TempDir,
}

async fn fleet() -> Fleet {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let leaf = ca.leaf(&["held.test"]);
    let cert = leaf.write(dir.path(), "held");
    let upstream = Backend::http("127.0.0.1").await;
    let nodes = three_nodes();
    let sites = format!(
        "[[sites]]\nnames = [\"held.test\"]\nheld_by = [\"c\"]\nupstream = \"{}\"\n{cert}\n\
         [[sites]]\nnames = [\"bnod.test\"]\nheld_by = [\"b\"]\nupstream = \"127.0.0.1:9\"\n",
        upstream.addr
    );
    let toml = |name| fleet_toml_http(name, &nodes, "", &sites);
    let a = Router::start(&toml("a")).await;
    let b = Router::start(&toml("b")).await;
    let c = Router::start(&toml("c")).await;
    Fleet {
        a,
        b,
        c,
        upstream,
        ca_file: ca_file.display().to_string(),
        _dir: dir,
    }
}

#[tokio::test]
async fn curl_on_a_node_host_is_served_by_the_holder_through_another_node() {
    if !have("curl") {
        return;
    }
    let fleet = fleet().await;
    let entry = fleet.a.addr();
    // From node b's own address, through node a, for a name node c holds.
    let (ok, out) = sh(format!(
        "curl -sS --max-time 10 --interface 127.0.0.3 --cacert {} \
         --resolve held.test:{port}:{ip} https://held.test:{port}/",
        fleet.ca_file,
        port = entry.port(),
        ip = entry.ip(),
    ))
    .await;
    assert!(ok, "curl from a node address: {out}");
    // The upstream saw c's PROXY-free plaintext; c terminated it.
    assert!(out.starts_with("upstream saw:"), "{out}");
    assert_eq!(fleet.upstream.connections(), 1);
    assert_eq!(fleet.a.rejected(), 0);
    assert_eq!(fleet.c.rejected(), 0);
}

#[tokio::test]
async fn an_unknown_name_from_a_node_address_gets_the_alert() {
    if !have("openssl") {
        return;
    }
    let fleet = fleet().await;
    let entry = fleet.a.addr();
    let (_, out) = sh(format!(
        "timeout 10 openssl s_client -bind 127.0.0.3 -connect {entry} \
         -servername nope.test </dev/null 2>&1"
    ))
    .await;
    assert!(out.contains("unrecognized name"), "{out}");
    assert_eq!(fleet.a.rejected(), 1);
}

/// A raw connection to node c from node b's address.
async fn from_node_b(to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn only_a_proxy_header_from_a_node_marks_a_splice() {
    let fleet = fleet().await;
    let c = fleet.c.addr();
    // Without a PROXY header: an ordinary client, spliced on to b, which
    // holds the name.
    let mut plain = from_node_b(c).await;
    plain.write_all(&hello_for("bnod.test")).await.unwrap();
    let (_, eof) = read_until_eof(&mut plain).await;
    assert!(eof);
    assert!(wait_until(|| async { fleet.b.accepted() == 1 }).await);
    // With one: spliced here by a node, never spliced onward, and closed
    // without an alert (the splicing node fails over on a silent close).
    let mut spliced = from_node_b(c).await;
    let client: SocketAddr = "192.0.2.7:5000".parse().unwrap();
    let mut bytes = proxy_protocol::encode(ProxyVersion::V2, client, c);
    bytes.extend_from_slice(&hello_for("bnod.test"));
    spliced.write_all(&bytes).await.unwrap();
    let (reply, eof) = read_until_eof(&mut spliced).await;
    assert!(eof);
    assert!(
        reply.is_empty(),
        "a spliced connection closes silently: {reply:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fleet.b.accepted(), 1, "nothing more spliced onward to b");
    assert_eq!(fleet.c.rejected(), 1);
}

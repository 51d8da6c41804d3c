//! The :443 data path over real sockets: peek, route, splice.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sni_router::config::Config;
use sni_router::proxy_protocol::{self, Decode};
use sni_router::tls::route::{self, Decision, Peer};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One router node at 127.0.0.2 passing `pass.test` through to `backend`.
async fn single_node(backend: SocketAddr, top: &str, rest: &str) -> Router {
    let node = free_addr("127.0.0.2");
    let sites = format!("{}{rest}", passthrough_site("pass.test", backend));
    Router::start(&fleet_toml("a", &[("a", node)], top, &sites)).await
}

#[tokio::test]
async fn rustls_client_reaches_tls_backend_through_passthrough() {
    let ca = TestCa::new();
    let backend = Backend::tls("127.0.0.1", &ca, &["pass.test"]).await;
    let router = single_node(backend.addr, "", "").await;
    let (response, alpn) = tls_request(
        router.addr(),
        ca.client_config(&["h2", "http/1.1"], true),
        "pass.test",
    )
    .await
    .expect("request through router");
    assert!(response.contains("hello from backend"), "{response}");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let seen = backend.first();
    assert_eq!(seen.sni.as_deref(), Some("pass.test"));
    assert!(seen.bytes.starts_with(b"GET / HTTP/1.1"));
}

#[tokio::test]
async fn openssl_and_curl_reach_tls_backend_through_passthrough() {
    if !have("openssl") || !have("curl") {
        return;
    }
    let ca = TestCa::new();
    let backend = Backend::tls("127.0.0.1", &ca, &["pass.test"]).await;
    let router = single_node(backend.addr, "", "").await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let addr = router.addr();
    let ca_path = ca_file.display().to_string();
    let outputs = tokio::task::spawn_blocking(move || {
        let curl = std::process::Command::new("curl")
            .args(["-sS", "--http1.1", "--max-time", "10", "--cacert", &ca_path])
            .args([
                "--resolve",
                &format!("pass.test:{}:{}", addr.port(), addr.ip()),
            ])
            .arg(format!("https://pass.test:{}/", addr.port()))
            .output()
            .expect("run curl");
        let openssl = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 openssl s_client -connect {addr} \
                 -servername pass.test -CAfile {ca_path} -verify_return_error -ign_eof 2>&1"
            ))
            .output()
            .expect("run openssl");
        (curl, openssl)
    })
    .await
    .unwrap();
    let (curl, openssl) = outputs;
    let curl_out = String::from_utf8_lossy(&curl.stdout);
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert_eq!(curl_out, "hello from backend\n");
    let openssl_out = String::from_utf8_lossy(&openssl.stdout);
    assert!(
        openssl_out.contains("Verify return code: 0 (ok)"),
        "{openssl_out}"
    );
    assert!(openssl_out.contains("hello from backend"), "{openssl_out}");
}

/// Sends `bytes` in the given segmentation and returns what the backend got.
async fn send_segmented(router: SocketAddr, chunks: Vec<Vec<u8>>) -> TcpStream {
    let mut stream = TcpStream::connect(router).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for chunk in chunks {
        stream.write_all(&chunk).await.unwrap();
    }
    stream
}

#[tokio::test]
async fn one_byte_segments_arrive_untouched() {
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "", "").await;
    let mut stream = send_segmented(router.addr(), HELLO.iter().map(|b| vec![*b]).collect()).await;
    stream.write_all(b"after the hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let seen = backend.wait_for(1).await;
    let want = [HELLO, b"after the hello"].concat();
    assert_eq!(seen[0].bytes, want);
}

#[tokio::test]
async fn hello_split_across_three_records_is_routed_and_replayed() {
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "", "").await;
    let split = split_records(HELLO, 3);
    // Three records, each in its own segment, the middle one cut in two.
    let third = split.len() / 3;
    let chunks = vec![
        split[..third].to_vec(),
        split[third..third + 10].to_vec(),
        split[third + 10..].to_vec(),
    ];
    let mut stream = send_segmented(router.addr(), chunks).await;
    stream.shutdown().await.unwrap();
    let seen = backend.wait_for(1).await;
    assert_eq!(seen[0].bytes, split);
}

#[tokio::test]
async fn every_prefix_then_close_ends_cleanly_without_outbound_connection() {
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "", "").await;
    let cuts: Vec<usize> = (0..HELLO.len()).collect();
    for cut in &cuts {
        let mut stream = send_segmented(router.addr(), vec![HELLO[..*cut].to_vec()]).await;
        stream.shutdown().await.unwrap();
        let (_, eof) = read_until_eof(&mut stream).await;
        assert!(
            eof,
            "router must close after a truncated hello of {cut} bytes"
        );
    }
    assert_eq!(backend.connections(), 0);
    assert_eq!(router.rejected(), cuts.len() as u64);
}

#[tokio::test]
async fn no_sni_uses_listener_default_then_global_default() {
    let ca = TestCa::new();
    let global = Backend::tls("127.0.0.1", &ca, &["pass.test"]).await;
    let per_listener = Backend::tls("127.0.0.1", &ca, &["other.test"]).await;
    let extra = free_addr("127.0.0.2");
    let rest = format!(
        "{}[[listeners]]\nbind = \"{extra}\"\ndefault_site = \"other.test\"\n",
        passthrough_site("other.test", per_listener.addr)
    );
    let router = single_node(global.addr, "default_site = \"pass.test\"", &rest).await;
    let no_sni = ca.client_config(&[], false);
    let (body, _) = tls_request(router.addrs[0], no_sni.clone(), "pass.test")
        .await
        .unwrap();
    assert!(body.contains("hello from backend"));
    let (body, _) = tls_request(router.addrs[1], no_sni, "other.test")
        .await
        .unwrap();
    assert!(body.contains("hello from backend"));
    assert_eq!(global.connections(), 1);
    assert_eq!(per_listener.connections(), 1);
    assert_eq!(global.first().sni, None);
}

#[tokio::test]
async fn no_sni_without_default_is_rejected() {
    let ca = TestCa::new();
    let backend = Backend::tls("127.0.0.1", &ca, &["pass.test"]).await;
    let router = single_node(backend.addr, "", "").await;
    let result = tls_request(router.addr(), ca.client_config(&[], false), "pass.test").await;
    assert!(result.is_err());
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn unknown_name_gets_an_alert_and_causes_no_outbound_connection() {
    let ca = TestCa::new();
    let backend = Backend::recorder("127.0.0.1").await;
    let holder = Backend::recorder("127.0.0.3").await;
    let node = free_addr("127.0.0.2");
    let sites = format!(
        "{}[[sites]]\nnames = [\"held.test\"]\nheld_by = [\"b\"]\nupstream = \"127.0.0.1:9\"\n",
        passthrough_site("pass.test", backend.addr)
    );
    let router = Router::start(&fleet_toml(
        "a",
        &[("a", node), ("b", holder.addr)],
        "",
        &sites,
    ))
    .await;
    let err = tls_request(router.addr(), ca.client_config(&[], true), "unknown.test")
        .await
        .expect_err("unknown names are refused");
    assert!(
        err.to_string().contains("UnrecognisedName") || err.to_string().contains("unrecognized"),
        "{err}"
    );
    let mut raw = TcpStream::connect(router.addr()).await.unwrap();
    let other = hello_for("evil.test");
    raw.write_all(&other).await.unwrap();
    let (reply, eof) = read_until_eof(&mut raw).await;
    assert!(eof);
    assert_eq!(reply, [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.connections() + holder.connections(), 0);
}

/// The holder order the router will use for a client at 127.0.0.1.
fn holder_order(toml: &str, name: &str) -> Vec<String> {
    let config = Config::parse(toml, "t", None).unwrap();
    let peer = Peer {
        client: "127.0.0.1".parse().unwrap(),
        spliced_by_node: false,
    };
    match route::decide(&config, 0, Some(name), peer, |_, _| false) {
        Decision::Splice { holders, .. } => holders
            .iter()
            .map(|h| config.node(*h).name.clone())
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn splice_to_holder_fails_over_and_sends_proxy_v2() {
    let node = free_addr("127.0.0.2");
    let addr_b = free_addr("127.0.0.3");
    let addr_c = free_addr("127.0.0.4");
    let sites = "[[sites]]\nnames = [\"held.test\"]\nheld_by = [\"b\", \"c\"]\nupstream = \"127.0.0.1:9\"\n";
    let nodes = [("a", node), ("b", addr_b), ("c", addr_c)];
    let toml = fleet_toml("a", &nodes, "", sites);
    let order = holder_order(&toml, "held.test");
    // Only the second choice is up, so the first connect must fail over.
    let live_ip = if order[1] == "b" {
        "127.0.0.3"
    } else {
        "127.0.0.4"
    };
    let live = Backend::recorder(live_ip).await;
    let nodes: Vec<(&str, SocketAddr)> = nodes
        .iter()
        .map(|(n, a)| {
            if *n == order[1] {
                (*n, live.addr)
            } else {
                (*n, *a)
            }
        })
        .collect();
    let router = Router::start(&fleet_toml("a", &nodes, "", sites)).await;
    let hello = hello_for("held.test");
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client.write_all(&hello).await.unwrap();
    client.shutdown().await.unwrap();
    let seen = live.wait_for(1).await;
    let bytes = &seen[0].bytes;
    match proxy_protocol::decode(bytes) {
        Decode::Complete { len, addrs } => {
            assert_eq!(addrs.source, Some(client_addr));
            assert_eq!(addrs.destination, Some(router.addr()));
            assert_eq!(&bytes[len..], &hello[..]);
        }
        other => panic!("expected a PROXY v2 header, got {other:?}"),
    }
    // The splice leaves from this node's address so the holder knows a node.
    assert_eq!(seen[0].peer.unwrap().ip(), node.ip());
}

#[tokio::test]
async fn conflicting_configs_fail_fast_instead_of_bouncing() {
    let addr_a = free_addr("127.0.0.2");
    let addr_b = free_addr("127.0.0.3");
    let nodes = [("a", addr_a), ("b", addr_b)];
    // Each node believes the other holds the name.
    let a = Router::start(&fleet_toml(
        "a",
        &nodes,
        "",
        "[[sites]]\nnames = [\"held.test\"]\nheld_by = [\"b\"]\nupstream = \"127.0.0.1:9\"\n",
    ))
    .await;
    let b = Router::start(&fleet_toml(
        "b",
        &nodes,
        "",
        "[[sites]]\nnames = [\"held.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:9\"\n",
    ))
    .await;
    let hello = hello_for("held.test");
    let started = Instant::now();
    let mut client = TcpStream::connect(a.addr()).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let (_, eof) = read_until_eof(&mut client).await;
    assert!(eof);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.accepted(), 1, "a must not see the connection come back");
    assert_eq!(b.accepted(), 1);
    assert_eq!(b.rejected(), 1);
}

#[tokio::test]
async fn half_close_works_in_both_directions() {
    // The backend reads to EOF, then answers: client EOF must reach it
    // while the reverse direction stays open.
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "", "").await;
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let seen = backend.wait_for(1).await;
    assert_eq!(seen[0].bytes, [HELLO, b"request"].concat());

    // Now the other way: the backend closes its write side first and keeps
    // reading; the client sees EOF yet can still send.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = single_node(listener.local_addr().unwrap(), "", "").await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut hello = vec![0u8; HELLO.len()];
        s.read_exact(&mut hello).await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        rest
    });
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    let mut got = [0u8; 3];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"bye");
    assert_eq!(
        client.read(&mut [0u8; 8]).await.unwrap(),
        0,
        "EOF from backend"
    );
    client.write_all(b"still talking").await.unwrap();
    client.shutdown().await.unwrap();
    let rest = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(rest, b"still talking");
}

#[tokio::test]
async fn a_stalled_hello_is_cut_at_the_deadline() {
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "[timeouts]\nhello = \"300ms\"", "").await;
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    let started = Instant::now();
    client.write_all(&HELLO[..100]).await.unwrap();
    let (_, eof) = read_until_eof(&mut client).await;
    let waited = started.elapsed();
    assert!(eof);
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed too late: {waited:?}"
    );
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn proxy_header_from_a_stranger_is_refused() {
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "", "").await;
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    let header = proxy_protocol::encode(
        sni_router::config::ProxyVersion::V2,
        "203.0.113.9:1234".parse().unwrap(),
        router.addr(),
    );
    client
        .write_all(&[header, HELLO.to_vec()].concat())
        .await
        .unwrap();
    let (_, eof) = read_until_eof(&mut client).await;
    assert!(eof);
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn proxy_header_from_a_trusted_proxy_sets_the_client_address() {
    let backend = Backend::recorder("127.0.0.1").await;
    // PROXY v1 towards the backend shows which client address the router used.
    let toml = fleet_toml(
        "a",
        &[("a", free_addr("127.0.0.2"))],
        "trusted_proxies = [\"127.0.0.1\"]",
        &format!(
            "[[sites]]\nnames = [\"pass.test\"]\npassthrough = \"{}\"\nproxy_protocol = \"v1\"\n",
            backend.addr
        ),
    );
    let router = Router::start(&toml).await;
    let node = router.addr();
    let claimed: SocketAddr = "203.0.113.9:1234".parse().unwrap();
    let header = proxy_protocol::encode(sni_router::config::ProxyVersion::V2, claimed, node);
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    client
        .write_all(&[header, HELLO.to_vec()].concat())
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let seen = backend.wait_for(1).await;
    let text = String::from_utf8_lossy(&seen[0].bytes);
    assert!(text.starts_with("PROXY TCP4 203.0.113.9 "), "{text}");
}

#[tokio::test]
async fn ipv6_listener_routes_like_ipv4() {
    let backend = Backend::recorder("127.0.0.1").await;
    let v6 = free_addr("::1");
    let rest = format!("[[listeners]]\nbind = \"{v6}\"\n");
    let router = single_node(backend.addr, "", &rest).await;
    let mut client = TcpStream::connect(router.addrs[1]).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(backend.wait_for(1).await[0].bytes, HELLO);
}

#[tokio::test]
async fn the_portable_copy_path_relays_and_half_closes_like_splice() {
    let echo = Backend::echo("127.0.0.1").await;
    let router = single_node(echo.addr, "[limits]\nzero_copy = false", "").await;
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(HELLO).await.unwrap();
    client.write_all(&payload).await.unwrap();
    client.shutdown().await.unwrap();
    let (back, eof) = read_until_eof(&mut client).await;
    assert!(eof);
    assert_eq!(back, [HELLO, &payload].concat());
}

#[tokio::test]
async fn silent_clients_wait_in_the_kernel_and_are_still_closed() {
    use std::sync::atomic::Ordering;
    let backend = Backend::recorder("127.0.0.1").await;
    let router = single_node(backend.addr, "[timeouts]\nhello = \"1s\"", "").await;
    let accepted = || router.handle.shared.stats.accepted.load(Ordering::Relaxed);
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(router.addr()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        accepted(),
        0,
        "a client that said nothing reached the router"
    );

    // The first bytes hand the connection over at once.
    let mut speaker = silent.pop().unwrap();
    speaker.write_all(HELLO).await.unwrap();
    speaker.shutdown().await.unwrap();
    assert_eq!(backend.wait_for(1).await.len(), 1);
    assert_eq!(accepted(), 1, "silent clients were handed over too early");

    // The rest are closed: the kernel hands them over after the deferral,
    // then the router's own hello deadline applies.
    let started = Instant::now();
    for mut client in silent {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        let mut buf = [0u8; 1];
        let closed = matches!(
            tokio::time::timeout(left, client.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        assert!(closed, "a silent client was never closed");
    }
    assert_eq!(backend.connections(), 1);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_connection_quiet_past_the_hand_over_carries_on() {
    use std::sync::atomic::Ordering;
    let backend = Backend::echo("127.0.0.1").await;
    let router = single_node(backend.addr, "", "").await;
    let shared = &router.handle.shared;
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    let mut echoed = vec![0u8; HELLO.len()];
    client.read_exact(&mut echoed).await.unwrap();
    // Quiet for longer than the hand-over time: the pair leaves its task.
    wait_until(|| async { !shared.engines.is_empty() }).await;
    assert_eq!(
        shared.engines.len(),
        1,
        "the quiet pair was not handed over"
    );
    client.write_all(b"after the hand-over").await.unwrap();
    let mut got = [0u8; 19];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"after the hand-over");
    client.shutdown().await.unwrap();
    assert_eq!(read_until_eof(&mut client).await, (Vec::new(), true));
    wait_until(|| async { shared.stats.finished.load(Ordering::Relaxed) > 0 }).await;
    assert_eq!(shared.stats.finished.load(Ordering::Relaxed), 1);
    assert!(shared.engines.is_empty());
}

/// The router's outbound connect holds back the handshake's last ACK and
/// sends it with the ClientHello: the backend receives two segments, the
/// SYN and the hello.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_replayed_hello_carries_the_handshake_ack() {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = single_node(backend.local_addr().unwrap(), "", "").await;
    let mut client = TcpStream::connect(router.addr()).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    let (mut accepted, _) = tokio::time::timeout(WAIT, backend.accept())
        .await
        .unwrap()
        .unwrap();
    let mut hello = vec![0u8; HELLO.len()];
    tokio::time::timeout(WAIT, accepted.read_exact(&mut hello))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello, HELLO);
    assert_eq!(segments_in(&accepted), 2);
}

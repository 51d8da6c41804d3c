//! Local termination across three nodes on 127.0.0.2/.3/.4, with real
//! clients verifying against a test CA.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
const NAMES: [&str; 3] = ["a", "b", "c"];

struct Fleet {
    routers: Vec<Router>,
    _dir: tempfile::TempDir,
}

/// Starts nodes a, b, c. `site(node)` gives each node's `[[sites]]` text
/// (cert paths differ per node; everything else is the fleet's).
async fn fleet(top: &str, site: impl Fn(&str, &Path) -> String) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = IPS.iter().map(|ip| free_addr(ip)).collect();
    let nodes: Vec<(&str, SocketAddr)> = NAMES.iter().copied().zip(addrs).collect();
    let mut routers = Vec::new();
    for name in NAMES {
        let text = fleet_toml(name, &nodes, top, &site(name, dir.path()));
        routers.push(Router::start(&text).await);
    }
    Fleet { routers, _dir: dir }
}

/// A request through `router`: the leaf certificate served and the body.
async fn fetch(router: SocketAddr, ca: &TestCa, name: &str) -> (Vec<u8>, String, SocketAddr) {
    let (mut tls, local) = tls_connect(router, ca.client_config(&["http/1.1"], true), name)
        .await
        .unwrap_or_else(|e| panic!("TLS to {router} for {name}: {e}"));
    let leaf = peer_leaf(&tls);
    tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(WAIT, tls.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    (leaf, body, local)
}

#[tokio::test]
async fn a_name_held_by_one_node_is_terminated_there_whichever_node_is_reached() {
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let leaf = ca.leaf(&["solo.test"]);
    let leaf_der = leaf.chain[0].to_vec();
    let fleet = fleet("", |node, dir| {
        let files = if node == "b" {
            leaf.write(dir, "b")
        } else {
            String::new()
        };
        held_site(
            &["solo.test"],
            &["b"],
            upstream.addr,
            &format!("proxy_protocol = \"v1\"\n{files}"),
        )
    })
    .await;
    for router in &fleet.routers {
        let (served, body, local) = fetch(router.addr(), &ca, "solo.test").await;
        assert_eq!(served, leaf_der, "b's certificate, via {}", router.addr());
        // The upstream sees the real client, even through a node-to-node splice.
        let expected = format!(
            "upstream saw: PROXY TCP4 127.0.0.1 {} {} ",
            router.addr().ip(),
            local.port()
        );
        assert!(body.contains(&expected), "{body:?} lacks {expected:?}");
    }
    assert_eq!(upstream.wait_for(3).await.len(), 3);
}

#[tokio::test]
async fn a_shared_name_is_terminated_by_the_node_reached() {
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let leaves: Vec<Leaf> = NAMES
        .iter()
        .map(|_| ca.leaf(&["shared.test", "*.shared.test"]))
        .collect();
    let fleet = fleet("", |node, dir| {
        let i = NAMES.iter().position(|n| *n == node).unwrap();
        let files = leaves[i].write(dir, node);
        held_site(
            &["shared.test", "*.shared.test"],
            &["a", "b", "c"],
            upstream.addr,
            &files,
        )
    })
    .await;
    for (i, router) in fleet.routers.iter().enumerate() {
        for name in ["shared.test", "www.shared.test"] {
            let (served, body, _) = fetch(router.addr(), &ca, name).await;
            assert_eq!(
                served,
                leaves[i].chain[0].to_vec(),
                "node {} serves its own",
                NAMES[i]
            );
            assert!(body.contains("upstream saw: -"));
        }
    }
    for router in &fleet.routers {
        assert_eq!(
            router.handle.shared.stats.fallbacks.load(Ordering::Relaxed),
            0
        );
    }
}

#[tokio::test]
async fn a_node_without_a_valid_certificate_splices_to_a_holder_that_has_one() {
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let expired = ca.leaf_with(
        &["both.test"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        Some((
            rcgen::date_time_ymd(2020, 1, 1),
            rcgen::date_time_ymd(2021, 1, 1),
        )),
    );
    let good = ca.leaf(&["both.test"]);
    // a: expired certificate; b: a valid one; c: holds it but has no files yet.
    let fleet = fleet("", |node, dir| {
        let files = match node {
            "a" => expired.write(dir, "a"),
            "b" => good.write(dir, "b"),
            _ => String::new(),
        };
        held_site(&["both.test"], &["a", "b", "c"], upstream.addr, &files)
    })
    .await;
    for router in &fleet.routers {
        let (served, _, _) = fetch(router.addr(), &ca, "both.test").await;
        assert_eq!(served, good.chain[0].to_vec(), "never the expired one");
    }
    let fallbacks: Vec<u64> = fleet
        .routers
        .iter()
        .map(|r| r.handle.shared.stats.fallbacks.load(Ordering::Relaxed))
        .collect();
    assert_eq!(fallbacks, vec![1, 0, 1]);
}

#[tokio::test]
async fn key_types_rsa_ecdsa_and_ed25519_all_serve() {
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    for alg in [
        &rcgen::PKCS_RSA_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca.leaf_with(&["keys.test"], alg, None);
        let files = leaf.write(dir.path(), "k");
        let node = free_addr("127.0.0.2");
        let router = Router::start(&fleet_toml(
            "a",
            &[("a", node)],
            "",
            &held_site(&["keys.test"], &["a"], upstream.addr, &files),
        ))
        .await;
        let (served, body, _) = fetch(router.addr(), &ca, "keys.test").await;
        assert_eq!(served, leaf.chain[0].to_vec(), "{alg:?}");
        assert!(body.contains("upstream saw"));
    }
}

#[tokio::test]
async fn replaced_certificate_files_switch_new_handshakes_and_spare_live_connections() {
    let ca = TestCa::new();
    let echo = Backend::echo("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf(&["rotate.test"]);
    let files = first.write(dir.path(), "rotate");
    let node = free_addr("127.0.0.2");
    let toml = fleet_toml(
        "a",
        &[("a", node)],
        "[certs]\npoll = \"100ms\"",
        &held_site(&["rotate.test"], &["a"], echo.addr, &files),
    );
    let router = Router::start(&toml).await;
    let config = ca.client_config(&[], true);
    let (mut long, _) = tls_connect(router.addr(), config.clone(), "rotate.test")
        .await
        .unwrap();
    assert_eq!(peer_leaf(&long), first.chain[0].to_vec());
    long.write_all(b"ping 1").await.unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf).await.unwrap();

    let second = ca.leaf(&["rotate.test"]);
    second.write(dir.path(), "rotate");
    let deadline = Instant::now() + WAIT;
    loop {
        let (tls, _) = tls_connect(router.addr(), config.clone(), "rotate.test")
            .await
            .unwrap();
        if peer_leaf(&tls) == second.chain[0].to_vec() {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    long.write_all(b"ping 2").await.unwrap();
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"ping 2",
        "the connection on the old certificate still works"
    );
}

#[tokio::test]
async fn alpn_is_negotiated_per_site() {
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let h2 = ca.leaf(&["h2.test"]).write(dir.path(), "h2");
    let plain = ca.leaf(&["h1.test"]).write(dir.path(), "h1");
    let sites = format!(
        "{}{}",
        held_site(
            &["h2.test"],
            &["a"],
            upstream.addr,
            &format!("alpn = [\"h2\", \"http/1.1\"]\n{h2}")
        ),
        held_site(&["h1.test"], &["a"], upstream.addr, &plain)
    );
    let router = Router::start(&fleet_toml(
        "a",
        &[("a", free_addr("127.0.0.2"))],
        "",
        &sites,
    ))
    .await;
    let offer = ca.client_config(&["h2", "http/1.1"], true);
    let (tls, _) = tls_connect(router.addr(), offer.clone(), "h2.test")
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (tls, _) = tls_connect(router.addr(), offer, "h1.test").await.unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "default is http/1.1 only"
    );
}

#[tokio::test]
async fn sessions_resume() {
    let OneNode {
        router,
        ca,
        dir: _dir,
        ..
    } = one_node("resume.test", "").await;
    let config = ca.client_config(&[], true);
    for expected in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
        let (mut tls, _) = tls_connect(router.addr(), config.clone(), "resume.test")
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(expected));
        tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut body = String::new();
        tls.read_to_string(&mut body).await.unwrap();
    }
    // TLS 1.2 works too, and resumes by ticket.
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls::pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).ok(),
    );
    let tls12 = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    for expected in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
        let (tls, _) = tls_connect(router.addr(), tls12.clone(), "resume.test")
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(expected));
    }
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_the_deadline() {
    let top = "[timeouts]\nhandshake = \"300ms\"";
    let OneNode {
        router,
        upstream,
        dir: _dir,
        ..
    } = one_node("pass.test", top).await;
    let mut raw = TcpStream::connect(router.addr()).await.unwrap();
    let started = Instant::now();
    raw.write_all(HELLO).await.unwrap();
    let (reply, eof) = read_until_eof(&mut raw).await;
    let waited = started.elapsed();
    assert!(eof);
    assert!(reply.first() == Some(&0x16), "the server flight was sent");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(upstream.connections(), 0);
}

/// One node terminating `name` with a test-CA certificate (config `top`
/// added), the CA also written to `ca_file` for command-line clients.
struct OneNode {
    router: Router,
    ca: TestCa,
    dir: tempfile::TempDir,
    ca_file: std::path::PathBuf,
    upstream: Backend,
}

async fn one_node(name: &str, top: &str) -> OneNode {
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let files = ca.leaf(&[name]).write(dir.path(), "cert");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let site = held_site(&[name], &["a"], upstream.addr, &files);
    let router = Router::start(&fleet_toml(
        "a",
        &[("a", free_addr("127.0.0.2"))],
        top,
        &site,
    ))
    .await;
    OneNode {
        router,
        ca,
        dir,
        ca_file,
        upstream,
    }
}

#[tokio::test]
async fn curl_and_openssl_verify_terminated_names_and_old_tls_is_refused() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let OneNode {
        router,
        dir: _dir,
        ca_file,
        ..
    } = one_node("term.test", "").await;
    let addr = router.addr();
    let ca_path = ca_file.display();
    let (ok, out) = curl_https(&ca_file, "term.test", addr).await;
    assert!(ok && out.contains("upstream saw"), "{out}");
    let (_, out) = sh(format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 openssl s_client -connect {addr} -servername term.test \
         -CAfile {ca_path} -verify_return_error -ign_eof"
    ))
    .await;
    assert!(
        out.contains("Verify return code: 0 (ok)") && out.contains("upstream saw"),
        "{out}"
    );
    for old in ["-tls1", "-tls1_1"] {
        let (ok, out) = sh(format!(
            "timeout 10 openssl s_client -connect {addr} -servername term.test {old} \
             -cipher DEFAULT@SECLEVEL=0 </dev/null"
        ))
        .await;
        // The router answers with one 7-byte alert record; no cipher is agreed.
        let _ = ok;
        assert!(
            out.contains("Cipher is (NONE)"),
            "{old} must be refused: {out}"
        );
        assert!(
            out.contains("has read 7 bytes"),
            "{old}: expected a lone alert: {out}"
        );
    }
}

/// The router picks the suite: AES-128-GCM for a client that lists
/// AES-256-GCM first (OpenSSL's default order), ChaCha20 for one that
/// lists it before AES-GCM, and still AES-256 for a client offering only that.
#[tokio::test]
async fn the_router_prefers_aes_128_unless_the_client_leads_with_chacha() {
    if !have("openssl") {
        return;
    }
    let OneNode {
        router, dir: _dir, ..
    } = one_node("suite.test", "").await;
    let addr = router.addr();
    let cases = [
        ("", "TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256"),
        (
            "-ciphersuites TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
            "TLSv1.3, Cipher is TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "-ciphersuites TLS_AES_256_GCM_SHA384",
            "TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384",
        ),
        (
            "-tls1_2 -cipher ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
            "TLSv1.2, Cipher is ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        (
            "-tls1_2 -cipher ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            "TLSv1.2, Cipher is ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ];
    for (args, agreed) in cases {
        let (_, out) = sh(format!(
            "timeout 10 openssl s_client -connect {addr} -servername suite.test {args} </dev/null"
        ))
        .await;
        assert!(out.contains(agreed), "{args:?}: expected {agreed:?}: {out}");
    }
}

#[tokio::test]
async fn probe_writes_a_chain_that_openssl_reads() {
    if !have("openssl") {
        return;
    }
    let OneNode {
        router,
        dir,
        ca_file,
        ..
    } = one_node("probe.test", "").await;
    let out_dir = dir.path().join("copied");
    let (ok, out) = sh(format!(
        "{bin} probe {addr} --sni probe.test --ca {ca} --out {out}",
        bin = env!("CARGO_BIN_EXE_sni-router"),
        addr = router.addr(),
        ca = ca_file.display(),
        out = out_dir.display()
    ))
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("chain verifies"), "{out}");
    assert!(out.contains("SANs: probe.test"), "{out}");
    assert!(out.contains("days left"), "{out}");
    let (ok, out) = sh(format!(
        "openssl x509 -in {} -noout -subject -ext subjectAltName",
        out_dir.join("chain.pem").display()
    ))
    .await;
    assert!(ok && out.contains("DNS:probe.test"), "{out}");
    // Without the test CA the same chain is reported as not verifying.
    let (ok, out) = sh(format!(
        "{bin} probe {addr} --sni probe.test",
        bin = env!("CARGO_BIN_EXE_sni-router"),
        addr = router.addr()
    ))
    .await;
    assert!(ok && out.contains("does NOT verify"), "{out}");
}

#[tokio::test]
async fn megabytes_cross_a_terminated_connection_intact_both_ways_and_half_close_passes() {
    let ca = TestCa::new();
    let echo = Backend::echo("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let files = ca.leaf(&["bulk.test"]).write(dir.path(), "bulk");
    let node = free_addr("127.0.0.2");
    let site = held_site(&["bulk.test"], &["a"], echo.addr, &files);
    let router = Router::start(&fleet_toml("a", &[("a", node)], "", &site)).await;
    let (tls, _) = tls_connect(router.addr(), ca.client_config(&[], true), "bulk.test")
        .await
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(3);
    let sent: Vec<u8> = (0..4 * 1024 * 1024).map(|_| rng.u8(..)).collect();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let payload = sent.clone();
    let writing = tokio::spawn(async move {
        // Uneven writes, so records and copy buffers never line up.
        for chunk in payload.chunks(7001) {
            writer.write_all(chunk).await.unwrap();
        }
        // close_notify + FIN: the upstream must see EOF while the echo
        // still flows back.
        writer.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT * 4, reader.read_to_end(&mut echoed))
        .await
        .expect("the echo ends once the client's EOF has passed through")
        .unwrap();
    writing.await.unwrap();
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "bytes changed on the way");
}

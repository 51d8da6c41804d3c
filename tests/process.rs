//! The built binary: `check`, SIGHUP reload and SIGTERM drain.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::process::Command;

use support::process::{BIN, Process, wait_listening};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `fleet.toml` in `dir`: node a on 127.0.0.2 with `top` and the
/// sites `sites(node)` gives; returns its path and the node's address.
fn one_node(
    dir: &Path,
    top: &str,
    sites: impl FnOnce(SocketAddr) -> String,
) -> (PathBuf, SocketAddr) {
    let config = dir.join("fleet.toml");
    let node = free_addr("127.0.0.2");
    std::fs::write(&config, fleet_toml("a", &[("a", node)], top, &sites(node))).unwrap();
    (config, node)
}

/// `sni-router check ARGS --config CONFIG`, run to the end.
fn check(args: &[&str], config: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("check")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// Sends `chunk` and reads its echo: proves the stream is alive and in order.
async fn echo_round(stream: &mut TcpStream, chunk: &[u8]) {
    stream.write_all(chunk).await.unwrap();
    let mut back = vec![0u8; chunk.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, chunk);
}

#[test]
fn check_prints_the_route_table() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = one_node(dir.path(), "", |node| passthrough_site("pass.test", node));
    let out = check(&[], &config);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("pass.test") && table.contains("passthrough ->"),
        "{table}"
    );
}

#[test]
fn check_rejects_bad_configs_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = one_node(dir.path(), "accept = \"each\"", |_| {
        "[[sites]]\nnames = [\"x.test\"]\nheld_by = [\"ghost\"]\nupstream = \"nowhere\"\n".into()
    });
    let out = check(&[], &config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let file = config.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}: sites[0].held_by[0]: unknown node \"ghost\""
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}: sites[0].upstream: \"nowhere\" is not a socket address"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}: accept: \"each\" is not one of \"shared\", \"per_worker\""
        )),
        "{err}"
    );
    let out = check(&["--node", "zz"], &config);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node: \"zz\" is not among [[nodes]]"));
}

#[test]
fn check_opens_certificate_files_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let good = ca.leaf(&["good.test"]);
    let other = ca.leaf(&["other.test"]);
    let now = time::OffsetDateTime::now_utc();
    let old = ca.leaf_with(
        &["old.test"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        Some((now - time::Duration::days(3), now - time::Duration::days(1))),
    );
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let cert = write("good.pem", &good.chain_pem);
    let key = write("good.key", &good.key_pem);
    let other_key = write("other.key", &other.key_pem);
    let junk = write("junk.pem", "not pem at all\n");
    let old_cert = write("old.pem", &old.chain_pem);
    let old_key = write("old.key", &old.key_pem);
    let site = |name: &str, cert: &str, key: &str| {
        held_site(
            &[name],
            &["a"],
            NOWHERE,
            &format!("cert_file = \"{cert}\"\nkey_file = \"{key}\"\n"),
        )
    };
    let (config, _) = one_node(dir.path(), "", |_| {
        site("good.test", &cert, &key)
            + &site("mismatch.test", &cert, &other_key)
            + &site("uncovered.test", &cert, &key)
            + &site("junk.test", &junk, &key)
            + &site("missing.test", "/nonexistent/cert.pem", &key)
            + &site("old.test", &old_cert, &old_key)
            + &site("nokey.test", &cert, "/nonexistent/key.pem")
            + &site("junkkey.test", &cert, &junk)
    });
    let out = check(&[], &config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let file = config.display();
    for expected in [
        format!("{file}: sites[1].cert_file: {cert}: the key does not match the certificate"),
        format!("{file}: sites[2].cert_file: {cert} does not cover uncovered.test"),
        format!("{file}: sites[3].cert_file: {junk}: no PEM certificate found"),
        format!("{file}: sites[4].cert_file: reading /nonexistent/cert.pem: No such file"),
        format!("{file}: sites[5].cert_file: {old_cert} expired at "),
        // A key's own trouble is key_file's, and names the key's file.
        format!("{file}: sites[6].key_file: reading /nonexistent/key.pem: No such file"),
        format!("{file}: sites[7].key_file: {junk}: no usable PEM private key found"),
    ] {
        assert!(err.contains(&expected), "{expected:?} in:\n{err}");
    }
    assert!(!err.contains("sites[0]"), "{err}");
}

#[tokio::test]
async fn sighup_reloads_while_a_connection_streams() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    let node = free_addr("127.0.0.2");
    let echo = Backend::echo("127.0.0.1").await;
    let fresh = Backend::recorder("127.0.0.1").await;
    let nodes = [("a", node)];
    std::fs::write(
        &config,
        fleet_toml("a", &nodes, "", &passthrough_site("pass.test", echo.addr)),
    )
    .unwrap();
    let router = Process::start(&config, dir.path());
    wait_listening(node).await;

    let mut stream = TcpStream::connect(node).await.unwrap();
    echo_round(&mut stream, HELLO).await;
    echo_round(&mut stream, b"before reload").await;

    // A new site appears: new connections see it, the live one is untouched.
    let both = format!(
        "{}{}",
        passthrough_site("pass.test", echo.addr),
        passthrough_site("next.test", fresh.addr)
    );
    std::fs::write(&config, fleet_toml("a", &nodes, "", &both)).unwrap();
    router.signal("HUP");
    router.wait_log("config reloaded", 1).await;
    echo_round(&mut stream, b"during reload").await;
    let mut next = TcpStream::connect(node).await.unwrap();
    next.write_all(&hello_for("next.test")).await.unwrap();
    next.shutdown().await.unwrap();
    assert_eq!(fresh.wait_for(1).await.len(), 1);

    // A broken config is refused and the running one kept.
    std::fs::write(&config, "this_node = 42").unwrap();
    router.signal("HUP");
    router
        .wait_log("reload failed, keeping the running config", 1)
        .await;
    echo_round(&mut stream, b"after a bad reload").await;
    let mut again = TcpStream::connect(node).await.unwrap();
    again.write_all(&hello_for("next.test")).await.unwrap();
    again.shutdown().await.unwrap();
    assert_eq!(fresh.wait_for(2).await.len(), 2);
    stream.shutdown().await.unwrap();
    let (_, eof) = read_until_eof(&mut stream).await;
    assert!(eof);
    let seen = echo.wait_for(1).await;
    let sent = [
        HELLO,
        b"before reload",
        b"during reload",
        b"after a bad reload",
    ]
    .concat();
    assert_eq!(seen[0].bytes, sent, "no byte lost or reordered");
}

/// The binary as one node whose `pass.test` goes to an echo backend, with
/// `drain` as its drain period; returns its directory, process and address.
async fn echo_node(drain: &str) -> (tempfile::TempDir, Process, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let echo = Backend::echo("127.0.0.1").await;
    let top = format!("[timeouts]\ndrain = \"{drain}\"");
    let (config, node) = one_node(dir.path(), &top, |_| {
        passthrough_site("pass.test", echo.addr)
    });
    let router = Process::start(&config, dir.path());
    wait_listening(node).await;
    (dir, router, node)
}

/// The descriptor table holds `limits.max_connections` routed connections
/// from the start. Grown under load instead, each doubling paused the
/// worker for an RCU grace period (10-30 ms here) inside an `accept`.
#[tokio::test]
async fn descriptor_table_is_sized_for_max_connections_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let echo = Backend::echo("127.0.0.1").await;
    let top = "[limits]\nmax_connections = 3000";
    let (config, node) = one_node(dir.path(), top, |_| {
        passthrough_site("pass.test", echo.addr)
    });
    let router = Process::start(&config, dir.path());
    wait_listening(node).await;
    let size = router.fd_table_size();
    assert!(size >= 2 * 3000, "FDSize {size}");
}

/// A listener's backlog, by default, is as deep as the kernel allows
/// (`net.core.somaxconn`, 4096 unless changed), as `ss` shows it (the
/// listening socket's Send-Q): a burst that overflows it costs each
/// dropped client a one-second SYN retry.
#[tokio::test]
async fn listeners_queue_as_many_connections_as_the_kernel_allows() {
    if !have("ss") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let echo = Backend::echo("127.0.0.1").await;
    let (config, node) = one_node(dir.path(), "", |_| passthrough_site("pass.test", echo.addr));
    let _router = Process::start(&config, dir.path());
    wait_listening(node).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (ok, out) = sh(format!(
        "ss -Hltn 'src {} and sport = :{}'",
        node.ip(),
        node.port()
    ))
    .await;
    assert!(ok, "{out}");
    let backlog: Vec<u32> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(backlog, vec![somaxconn.min(4096)], "{out}");
}

/// The connection line, which the router writes itself rather than
/// through `tracing`, is one JSON object in tracing's layout under
/// `--log-format json`, and plain `key=value` text by default.
#[tokio::test]
async fn each_connection_logs_one_line_in_the_chosen_format() {
    for json in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let echo = Backend::echo("127.0.0.1").await;
        let (config, node) = one_node(dir.path(), "", |_| passthrough_site("pass.test", echo.addr));
        let router = if json {
            Process::start_json(&config, dir.path())
        } else {
            Process::start(&config, dir.path())
        };
        wait_listening(node).await;
        let mut stream = TcpStream::connect(node).await.unwrap();
        echo_round(&mut stream, HELLO).await;
        stream.shutdown().await.unwrap();
        let (_, eof) = read_until_eof(&mut stream).await;
        assert!(eof);
        let ours = |l: &&str| l.contains("connection finished") && l.contains("pass.test");
        for _ in 0..100 {
            if router.log().lines().any(|l| ours(&l)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = router.log();
        let line = log.lines().find(ours).expect(&log);
        let backend = echo.addr.to_string();
        if json {
            let v: serde_json::Value = serde_json::from_str(line).expect(line);
            assert_eq!(v["level"], "INFO", "{line}");
            assert_eq!(v["target"], "sni_router::conn", "{line}");
            let f = &v["fields"];
            assert_eq!(f["message"], "connection finished", "{line}");
            assert_eq!(f["sni"], "pass.test", "{line}");
            assert_eq!(f["decision"], "passthrough", "{line}");
            assert_eq!(f["target"], backend.as_str(), "{line}");
            assert_eq!(f["bytes_up"], HELLO.len() as u64, "{line}");
            assert_eq!(f["bytes_down"], HELLO.len() as u64, "{line}");
            assert_eq!(f["end"], "closed", "{line}");
            assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
        } else {
            let expected = format!(
                " INFO sni_router::conn: connection finished client={peer} via={peer} \
                 sni=\"pass.test\" decision=\"passthrough\" target={backend} bytes_up={n} bytes_down={n}",
                peer = stream.local_addr().unwrap(),
                n = HELLO.len(),
            );
            assert!(line.contains(&expected), "{line}\nwanted {expected}");
            assert!(line.ends_with(" end=closed"), "{line}");
        }
    }
}

#[tokio::test]
async fn sigterm_stops_accepting_and_drains_in_flight_connections() {
    let (_dir, mut router, node) = echo_node("5s").await;
    let mut stream = TcpStream::connect(node).await.unwrap();
    echo_round(&mut stream, HELLO).await;

    router.signal("TERM");
    router.wait_log("draining connections", 1).await;
    assert!(
        TcpStream::connect(node).await.is_err(),
        "no new connections while draining"
    );
    echo_round(&mut stream, b"still served while draining").await;
    stream.shutdown().await.unwrap();
    let (_, eof) = read_until_eof(&mut stream).await;
    assert!(eof);
    let status = router.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", router.log());
    let log = router.log();
    assert!(log.contains("connection finished"), "{log}");
    assert!(!log.contains("drain period over"), "{log}");
}

/// Under systemd's `Type=notify` the router says `READY=1` once it accepts
/// and `STOPPING=1` when the drain begins, on `$NOTIFY_SOCKET`.
#[tokio::test]
async fn systemd_hears_ready_once_it_accepts_and_stopping_at_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify");
    let systemd = tokio::net::UnixDatagram::bind(&socket).unwrap();
    let (config, node) = one_node(dir.path(), "", |node| passthrough_site("pass.test", node));
    let mut router = Process::start_with_env(&config, dir.path(), &[("NOTIFY_SOCKET", &socket)]);
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, systemd.recv(&mut buf))
        .await
        .expect("no READY=1")
        .unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        TcpStream::connect(node).await.is_ok(),
        "ready and accepting"
    );
    router.signal("TERM");
    let n = tokio::time::timeout(WAIT, systemd.recv(&mut buf))
        .await
        .expect("no STOPPING=1")
        .unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(router.wait_exit().await.success());
}

/// Connections still open when the drain period runs out are cut, and each
/// still gets its log line (with its bytes and its own end reason): one held
/// by a splice engine (quiet), one in its task (busy).
#[tokio::test]
async fn connections_cut_by_the_drain_deadline_are_logged() {
    let (_dir, mut router, node) = echo_node("1s").await;
    let mut quiet = TcpStream::connect(node).await.unwrap();
    echo_round(&mut quiet, HELLO).await;
    let mut busy = TcpStream::connect(node).await.unwrap();
    echo_round(&mut busy, HELLO).await;
    // Past the hand-over time: the quiet pair now lives in a splice engine.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    router.signal("TERM");
    router.wait_log("draining connections", 1).await;
    for _ in 0..10 {
        echo_round(&mut busy, b"busy while draining").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = router.wait_exit().await;
    assert!(status.success(), "{status:?}");
    let log = router.log();
    let cut: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection finished") && l.contains("end=drain_deadline"))
        .collect();
    assert_eq!(cut.len(), 2, "{log}");
    let hello = HELLO.len();
    let busy_bytes = format!("bytes_up={}", hello + 10 * b"busy while draining".len());
    assert!(cut.iter().any(|l| l.contains(&busy_bytes)), "{log}");
    assert!(
        cut.iter()
            .any(|l| l.contains(&format!("bytes_up={hello} "))),
        "{log}"
    );
}

/// On port 80 too: a plain-HTTP splice to an upstream still open when the
/// drain period runs out gets its log line, with its own result.
#[tokio::test]
async fn a_port_80_splice_cut_by_the_drain_deadline_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    let (node, http) = (free_addr("127.0.0.2"), free_addr("127.0.0.2"));
    let echo = Backend::echo("127.0.0.1").await;
    let site = format!(
        "[[sites]]\nnames = [\"plain.test\"]\nheld_by = [\"a\"]\nupstream = \"{}\"\nhttp = \"upstream\"\n",
        echo.addr
    );
    let text = fleet_toml_http(
        "a",
        &[("a", node, http)],
        "[timeouts]\ndrain = \"1s\"",
        &site,
    );
    std::fs::write(&config, text).unwrap();
    let mut router = Process::start(&config, dir.path());
    wait_listening(http).await;
    let mut stream = TcpStream::connect(http).await.unwrap();
    echo_round(&mut stream, b"GET / HTTP/1.1\r\nhost: plain.test\r\n\r\n").await;
    router.signal("TERM");
    assert!(router.wait_exit().await.success());
    let log = router.log();
    assert!(
        log.lines()
            .any(|l| l.contains("http request finished") && l.contains("result=\"drain_deadline\"")),
        "{log}"
    );
}

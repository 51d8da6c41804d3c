//! Hostile input and faults against the real binary: stalled hellos,
//! garbage, a backend that never reads, failing holders, reloads under load.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::process::{Process, wait_listening};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One node at 127.0.0.2 running the binary with `top` and `sites`.
async fn start(dir: &tempfile::TempDir, top: &str, sites: &str) -> (Process, SocketAddr) {
    let node = free_addr("127.0.0.2");
    let config = dir.path().join("node.toml");
    std::fs::write(&config, fleet_toml("a", &[("a", node)], top, sites)).unwrap();
    let process = Process::start(&config, dir.path());
    wait_listening(node).await;
    (process, node)
}

fn passthrough(name: &str, backend: SocketAddr) -> String {
    format!("[[sites]]\nnames = [\"{name}\"]\npassthrough = \"{backend}\"\n")
}

/// An honest client: a full hello, EOF, and the router's close.
async fn honest(node: SocketAddr) {
    let mut client = TcpStream::connect(node).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    client.shutdown().await.unwrap();
    let (_, eof) = read_until_eof(&mut client).await;
    assert!(eof);
}

/// Connections per second for `n` honest clients, 4 at a time.
async fn honest_rate(node: SocketAddr, n: usize) -> f64 {
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(tokio::spawn(async move {
            for _ in 0..n / 4 {
                honest(node).await;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test]
async fn stalled_hellos_do_not_starve_honest_clients() {
    let backend = Backend::recorder("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let top = "[timeouts]\nhello = \"3s\"\n[limits]\nmax_pending_hellos = 1000";
    let (_router, node) = start(&dir, top, &passthrough("pass.test", backend.addr)).await;
    let mut baseline = Vec::new();
    for _ in 0..3 {
        baseline.push(honest_rate(node, 100).await);
    }

    // ~1500 connections that send part of a hello and stall.
    let flood_started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..1500 {
        let mut s = TcpStream::connect(node).await.unwrap();
        s.write_all(&HELLO[..200]).await.unwrap();
        stalled.push(s);
    }
    let mut loaded = Vec::new();
    for _ in 0..3 {
        loaded.push(honest_rate(node, 100).await);
    }
    baseline.sort_by(f64::total_cmp);
    loaded.sort_by(f64::total_cmp);
    // Starved, an honest client would wait out the 3-s hello deadline
    // behind the stalled ones: about 1% of the baseline rate. Half leaves
    // room for this shared machine's noise (one CI run measured 77%), since
    // speed itself is the benchmarks' business.
    let ratio = loaded[1] / baseline[1];
    assert!(
        ratio >= 0.5,
        "honest rate fell to {:.0}% ({loaded:?} vs {baseline:?})",
        ratio * 100.0
    );

    // Every stalled connection is closed by the deadline (evicted or timed out).
    let deadline = flood_started + Duration::from_secs(3) + Duration::from_secs(3);
    for s in &mut stalled {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
        let mut buf = [0u8; 16];
        let closed = matches!(
            tokio::time::timeout(left, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        assert!(closed, "a stalled hello outlived the deadline");
    }
    assert_eq!(
        backend.wait_for(600).await.len(),
        600,
        "only honest clients reached the backend"
    );
}

/// Bytes no router should route, each to be ended cleanly.
fn garbage() -> Vec<Vec<u8>> {
    let mut inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: pass.test\r\n\r\n".to_vec(),
        // SSLv2-style hello.
        vec![
            0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
        ],
        // Absurd lengths: a 64 KiB record, a 16 MiB handshake.
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
        vec![0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0xff, 0xff, 0xff],
        vec![0x16, 0x03, 0x01, 0x00, 0x00],
        vec![],
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for len in [1, 5, 64, 1000, 20_000] {
        inputs.push((0..len).map(|_| rng.u8(..)).collect());
    }
    for cut in [1, 5, 9, 100, HELLO.len() - 1] {
        inputs.push(HELLO[..cut].to_vec());
    }
    for _ in 0..200 {
        let mut flipped = HELLO.to_vec();
        for _ in 0..rng.usize(1..8) {
            let at = rng.usize(..flipped.len());
            flipped[at] ^= 1 << rng.u8(0..8);
        }
        inputs.push(flipped);
    }
    inputs
}

#[tokio::test]
async fn garbage_ends_cleanly_and_sockets_return_to_baseline() {
    let backend = Backend::recorder("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut router, node) = start(
        &dir,
        "[timeouts]\nhello = \"1s\"",
        &passthrough("pass.test", backend.addr),
    )
    .await;
    honest(node).await;
    let baseline = router.socket_count();
    let inputs = garbage();
    let mut tasks = Vec::new();
    for input in inputs {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(node).await.unwrap();
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
            let (_, eof) = read_until_eof(&mut s).await;
            eof
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap(), "a connection was left hanging");
    }
    assert!(router.alive());
    honest(node).await;
    let deadline = Instant::now() + WAIT;
    while router.socket_count() > baseline {
        assert!(
            Instant::now() < deadline,
            "descriptors leaked: {} > {baseline}",
            router.socket_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!router.log().contains("panicked"), "{}", router.log());
}

#[tokio::test]
async fn a_backend_that_never_reads_does_not_grow_router_memory() {
    // Accepts, then holds the connection without reading a byte.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stream);
    });
    let dir = tempfile::tempdir().unwrap();
    let (router, node) = start(&dir, "", &passthrough("pass.test", backend)).await;
    let mut client = TcpStream::connect(node).await.unwrap();
    client.write_all(HELLO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = router.rss_kib();
    let chunk = vec![0x5a; 64 * 1024];
    let mut pushed = 0usize;
    // Push until the kernel buffers and the router's bounded buffer are full.
    while pushed < 256 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_secs(1), client.write_all(&chunk)).await {
            Ok(Ok(())) => pushed += chunk.len(),
            _ => break,
        }
    }
    let after = router.rss_kib();
    assert!(
        pushed < 64 * 1024 * 1024,
        "the router kept accepting: {pushed} bytes"
    );
    assert!(
        after < before + 2048,
        "router memory grew from {before} KiB to {after} KiB"
    );
    hold.abort();
}

#[tokio::test]
async fn failing_holders_and_backends_end_the_client_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // b resets mid-stream, c accepts and never answers; refused.test has no backend.
    let resetting = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let silent = TcpListener::bind("127.0.0.4:0").await.unwrap();
    let (addr_b, addr_c) = (
        resetting.local_addr().unwrap(),
        silent.local_addr().unwrap(),
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = resetting.accept().await {
            let mut buf = vec![0u8; HELLO.len() + 64];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"\x16\x03\x03\x00\x05hello").await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let silent_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let refused = free_addr("127.0.0.1");
    let node = free_addr("127.0.0.2");
    let admin = free_addr("127.0.0.1");
    let top = format!("[timeouts]\nconnect = \"500ms\"\n[admin]\nlisten = \"{admin}\"");
    let sites = format!(
        "[[sites]]\nnames = [\"rset.test\"]\nheld_by = [\"b\"]\nupstream = \"127.0.0.1:9\"\n\
         [[sites]]\nnames = [\"mute.test\"]\nheld_by = [\"c\"]\nupstream = \"127.0.0.1:9\"\n{}",
        passthrough("deaf.test", refused)
    );
    let config = dir.path().join("node.toml");
    let nodes = [("a", node), ("b", addr_b), ("c", addr_c)];
    std::fs::write(&config, fleet_toml("a", &nodes, &top, &sites)).unwrap();
    let router = Process::start(&config, dir.path());
    wait_listening(node).await;

    for (name, end) in [
        ("rset.test", "target_error"),
        ("mute.test", "no_holder_answered"),
        ("deaf.test", "connect_error"),
    ] {
        let started = Instant::now();
        let mut client = TcpStream::connect(node).await.unwrap();
        client.write_all(&hello_for(name)).await.unwrap();
        let (_, eof) = read_until_eof(&mut client).await;
        assert!(eof && started.elapsed() < Duration::from_secs(5), "{name}");
        router.wait_log(end, 1).await;
    }
    let (_, _, metrics) = http_get(admin, "admin", "/metrics", "").await;
    for line in [
        "sni_router_failovers_total{node=\"c\"} 1",
        "sni_router_connect_failures_total{kind=\"backend\",target=\"deaf.test\"} 1",
        "sni_router_connections_finished_total",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    silent_task.abort();
}

#[tokio::test]
async fn reloads_under_load_drop_and_reorder_nothing() {
    let echo = Backend::echo("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let (router, node) = start(&dir, "", &passthrough("pass.test", echo.addr)).await;
    let config = dir.path().join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut streams = Vec::new();
    for i in 0..100u32 {
        streams.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(node).await.unwrap();
            s.write_all(HELLO).await.unwrap();
            let mut back = vec![0u8; HELLO.len()];
            s.read_exact(&mut back).await.unwrap();
            let mut rng = fastrand::Rng::with_seed(u64::from(i));
            let (mut sent, mut got) = (0u64, 0u64);
            for round in 0..40 {
                let chunk: Vec<u8> = (0..rng.usize(1..4096)).map(|_| rng.u8(..)).collect();
                s.write_all(&chunk).await.unwrap();
                let mut echoed = vec![0u8; chunk.len()];
                tokio::time::timeout(WAIT, s.read_exact(&mut echoed))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(echoed, chunk, "connection {i} round {round}");
                sent = sent.wrapping_mul(31).wrapping_add(checksum(&chunk));
                got = got.wrapping_mul(31).wrapping_add(checksum(&echoed));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(sent, got);
        }));
    }
    for i in 0..20 {
        std::fs::write(&config, format!("{text}\n# reload {i}\n")).unwrap();
        router.signal("HUP");
        // Signals sent faster than they are handled coalesce: wait for each.
        router.wait_log("config reloaded", i + 1).await;
    }
    for s in streams {
        s.await.unwrap();
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

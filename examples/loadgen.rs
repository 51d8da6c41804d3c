//! Load generator and raw-byte backends for `benches/compare.sh`.
//!
//! ```text
//! loadgen backend ADDR reply1k|sink          serve until killed
//! loadgen connrate TARGET SECS CONCURRENCY   new connections/s, p50/p99 ms
//! loadgen bulk TARGET SECS STREAMS           MiB/s client -> backend
//! loadgen idle TARGET COUNT SECS             hold COUNT routed connections
//! ```
//! Clients replay the captured ClientHello over raw TCP, so no TLS work
//! hides the router's own cost, and spread over 127.0.0.10-.59 as source
//! addresses so loopback does not run out of ephemeral ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const HELLO: &[u8] = include_bytes!("../tests/data/hello-rustls-mlkem.bin");
const SOURCES: u32 = 50;

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_else(|| usage())
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen backend ADDR reply1k|sink | connrate TARGET SECS CONC | bulk TARGET SECS STREAMS | idle TARGET COUNT SECS"
    );
    std::process::exit(2)
}

fn parse<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| usage())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match arg(&args, 0) {
        "backend" => backend(parse(arg(&args, 1)), arg(&args, 2) == "sink").await,
        "connrate" => {
            connrate(
                parse(arg(&args, 1)),
                parse(arg(&args, 2)),
                parse(arg(&args, 3)),
            )
            .await
        }
        "bulk" => {
            bulk(
                parse(arg(&args, 1)),
                parse(arg(&args, 2)),
                parse(arg(&args, 3)),
            )
            .await
        }
        "idle" => {
            idle(
                parse(arg(&args, 1)),
                parse(arg(&args, 2)),
                parse(arg(&args, 3)),
            )
            .await
        }
        _ => usage(),
    }
}

async fn backend(addr: SocketAddr, sink: bool) {
    let listener = TcpListener::bind(addr).await.expect("bind backend");
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            if sink {
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                return;
            }
            // Wait for the whole hello, answer 1 KiB, close.
            let mut got = 0;
            while got < HELLO.len() {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            let _ = s.write_all(&[0x17; 1024]).await;
            let _ = s.shutdown().await;
            // Then act as a sink, so one backend serves both kinds of load.
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

/// Connects from one of the 127.0.0.x source addresses, round robin.
async fn connect(target: SocketAddr, n: u64) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let source = Ipv4Addr::new(127, 0, 0, 10 + (n % u64::from(SOURCES)) as u8);
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connrate(target: SocketAddr, secs: u64, concurrency: usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let started = Instant::now();
    for _ in 0..concurrency {
        let (counter, errors) = (counter.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut reply = vec![0u8; 2048];
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let ok = async {
                    let mut s = connect(target, n).await?;
                    s.write_all(HELLO).await?;
                    let mut got = 0;
                    loop {
                        let m = s.read(&mut reply).await?;
                        if m == 0 {
                            break;
                        }
                        got += m;
                    }
                    Ok::<_, std::io::Error>(got == 1024)
                }
                .await;
                match ok {
                    Ok(true) => latencies.push(t.elapsed()),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"conns_per_sec\": {:.0}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"errors\": {}}}",
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        errors.load(Ordering::Relaxed)
    );
}

async fn bulk(target: SocketAddr, secs: u64, streams: usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..streams {
        let sent = sent.clone();
        workers.push(tokio::spawn(async move {
            let Ok(mut s) = connect(target, i as u64).await else {
                return;
            };
            if s.write_all(HELLO).await.is_err() {
                return;
            }
            let chunk = vec![0x17u8; 256 * 1024];
            while Instant::now() < deadline {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mib = sent.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
    println!(
        "{{\"mib_per_sec\": {:.0}}}",
        mib / started.elapsed().as_secs_f64()
    );
}

async fn idle(target: SocketAddr, count: usize, secs: u64) {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        match connect(target, i as u64).await {
            Ok(mut s) => {
                let _ = s.write_all(HELLO).await;
                held.push(s);
            }
            Err(e) => {
                eprintln!("connection {i}: {e}");
                break;
            }
        }
    }
    println!("{{\"idle_connections\": {}}}", held.len());
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

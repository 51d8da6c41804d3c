//! Load generator and raw-byte backends for `benches/compare.sh`.
//!
//! ```text
//! loadgen backend ADDR reply1k|sink          serve until killed
//! loadgen connrate TARGET SECS CONCURRENCY   new connections/s, p50/p99 ms
//! loadgen openloop TARGET SECS RATE          Poisson arrivals at RATE/s, p50/p99/p99.9 ms
//!                                            (LOADGEN_TIMELINE=FILE: one line per connection;
//!                                            LOADGEN_PRECISE=1: the kernel's timer, not tokio's)
//! loadgen bulk TARGET SECS STREAMS           MiB/s client -> sink (SNI bulk.test)
//! loadgen idle TARGET COUNT SECS             hold COUNT routed connections (SNI bulk.test)
//! loadgen tls TARGET SECS CONCURRENCY full|resume [aes128]   TLS 1.3 handshakes/s
//! loadgen tlsidle TARGET COUNT SECS          hold COUNT live TLS connections
//! ```
//! Raw clients replay the captured ClientHello over TCP, so no TLS work
//! hides the router's own cost. TLS clients (SNI `tls.test`, TLS 1.3,
//! X25519 only, the server's certificate not verified: only the server's
//! work is being measured) send the same bytes as application data. They
//! list cipher suites in rustls's order (AES-256-GCM first, as OpenSSL's
//! clients do), or with `aes128` AES-128-GCM first, as browsers do; the
//! suite the server agreed on is reported. All spread over 127.0.0.10-.59
//! as source addresses so loopback does not run out of ephemeral ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

const HELLO: &[u8] = include_bytes!("../tests/data/hello-rustls-mlkem.bin");
const SOURCES: u32 = 50;

/// The cipher suite of the first TLS handshake, for the report.
static AGREED_SUITE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_else(|| usage())
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen backend ADDR reply1k|sink | connrate TARGET SECS CONC | openloop TARGET SECS RATE | bulk TARGET SECS STREAMS | idle TARGET COUNT SECS | tls TARGET SECS CONC full|resume [aes128] | tlsidle TARGET COUNT SECS"
    );
    std::process::exit(2)
}

fn parse<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| usage())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if arg(&args, 0) == "backend" {
        return backend(parse(arg(&args, 1)), arg(&args, 2) == "sink").await;
    }
    // Every load command: TARGET, then two counts (seconds, concurrency...).
    let (target, a, b) = (
        parse(arg(&args, 1)),
        parse(arg(&args, 2)),
        parse(arg(&args, 3)),
    );
    match arg(&args, 0) {
        "connrate" => connrate(target, a, b as usize, None).await,
        "openloop" => open_loop(target, a, b).await,
        "tls" => {
            let resume = match arg(&args, 4) {
                "full" => false,
                "resume" => true,
                _ => usage(),
            };
            let aes128 = match args.get(5).map(String::as_str) {
                None => false,
                Some("aes128") => true,
                Some(_) => usage(),
            };
            let tls = Tls {
                resume,
                aes128_first: aes128,
            };
            connrate(target, a, b as usize, Some(tls)).await
        }
        "tlsidle" => tls_idle(target, a as usize, b).await,
        "bulk" => bulk(target, a, b as usize).await,
        "idle" => idle(target, a as usize, b).await,
        _ => usage(),
    }
}

async fn backend(addr: SocketAddr, sink: bool) {
    // SO_REUSEPORT: several backend processes may share one address when
    // one process cannot hold enough descriptors (benches/idle-50k.sh).
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .expect("backend socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.set_reuseport(true).expect("SO_REUSEPORT");
    socket.bind(addr).expect("bind backend");
    let listener = socket.listen(4096).expect("listen");
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if sink {
                return discard(&s).await;
            }
            let mut buf = vec![0u8; 64 * 1024];
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
            discard(&s).await;
        });
    }
}

/// Reads to EOF and throws the bytes away inside the kernel: `MSG_TRUNC`
/// on a TCP socket consumes data without copying it out. The sink shares
/// the machine's two cores with the router under test; a copy here would
/// be the harness's cost, not the router's.
async fn discard(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    loop {
        if s.readable().await.is_err() {
            return;
        }
        let got = s.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: with MSG_TRUNC the kernel writes nothing to the buffer.
            let n = unsafe { libc::recv(fd, std::ptr::null_mut(), 1 << 20, libc::MSG_TRUNC) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match got {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Connects from one of the 127.0.0.x source addresses, round robin.
async fn connect(target: SocketAddr, n: u64) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let source = Ipv4Addr::new(127, 0, 0, 10 + (n % u64::from(SOURCES)) as u8);
    socket.set_reuseaddr(true)?;
    // Leave the port to connect: a port bound here is reserved for every
    // destination, and at 50k connections the router's own connects to
    // its backends ran out of ports.
    sni_router::sockopt::bind_address_no_port(&socket)?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the hello bytes and reads the backend's 1 KiB answer to EOF.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, reply: &mut [u8]) -> bool {
    if s.write_all(HELLO).await.is_err() {
        return false;
    }
    let mut got = 0;
    loop {
        match s.read(reply).await {
            Ok(0) => break,
            Ok(m) => got += m,
            // A TLS peer may close without close_notify once all is sent.
            Err(_) => break,
        }
    }
    got == 1024
}

/// One connection: (answered in full, TLS session resumed).
async fn one(
    target: SocketAddr,
    n: u64,
    tls: Option<&TlsConnector>,
    reply: &mut [u8],
) -> (bool, bool) {
    let Ok(mut s) = connect(target, n).await else {
        return (false, false);
    };
    let Some(tls) = tls else {
        return (exchange(&mut s, reply).await, false);
    };
    let name = ServerName::try_from("tls.test").expect("static name");
    let Ok(mut s) = tls.connect(name, s).await else {
        return (false, false);
    };
    let session = s.get_ref().1;
    let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if let Some(suite) = session.negotiated_cipher_suite() {
        AGREED_SUITE.get_or_init(|| format!("{:?}", suite.suite()));
    }
    (exchange(&mut s, reply).await, resumed)
}

/// `tls`: `Some` for TLS handshakes. Each client keeps its own
/// session store, as a browser does: a shared store holds 8 tickets per
/// name, fewer than 32 clients in flight take, so 22% of the "resumed"
/// run used to fall back to full handshakes.
async fn connrate(target: SocketAddr, secs: u64, concurrency: usize, tls: Option<Tls>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let started = Instant::now();
    for _ in 0..concurrency {
        let (counter, errors, resumed, tls) = (
            counter.clone(),
            errors.clone(),
            resumed.clone(),
            tls.map(tls_connector),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut reply = vec![0u8; 2048];
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let (ok, was_resumed) = one(target, n, tls.as_ref(), &mut reply).await;
                if ok {
                    latencies.push(t.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if was_resumed {
                    resumed.fetch_add(1, Ordering::Relaxed);
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
        "{{\"conns_per_sec\": {:.0}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"errors\": {}, \"resumed\": {}, \"suite\": \"{}\"}}",
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        errors.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
        AGREED_SUITE.get().map_or("", String::as_str)
    );
}

/// Connections still open past this are a router that cannot keep up:
/// the run stops adding more and counts the arrivals it skipped.
const OPEN_LOOP_MAX_IN_FLIGHT: usize = 4096;

/// An open loop: connections start on a Poisson schedule at `rate` a
/// second, whether or not earlier ones have finished, so a router that
/// falls behind builds a queue and shows it in the latency, as users see
/// it. Each latency runs from the connection's scheduled start (not when
/// the generator got to it), so the generator's own delays count against
/// the router rather than hiding its queue.
async fn open_loop(target: SocketAddr, secs: u64, rate: u64) {
    let rate = rate.max(1) as f64;
    let started = Instant::now();
    let end = Duration::from_secs(secs);
    let in_flight = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Duration, Duration, Option<Duration>)>();
    let mut at = Duration::ZERO;
    let (mut n, mut skipped) = (0u64, 0u64);
    // LOADGEN_PRECISE=1: sleep on the kernel's timer (microseconds, one
    // wake-up per connection) instead of tokio's (whole milliseconds).
    let precise = std::env::var_os("LOADGEN_PRECISE").is_some();
    loop {
        // Exponential gaps: -ln(U) / rate, U in (0, 1].
        at += Duration::from_secs_f64(-(1.0 - fastrand::f64()).ln() / rate);
        if at >= end {
            break;
        }
        let due = started + at;
        if precise {
            // This task runs on the runtime's main thread; the connections on its worker.
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        } else {
            tokio::time::sleep_until(due.into()).await;
        }
        let late = due.elapsed();
        if in_flight.load(Ordering::Relaxed) as usize >= OPEN_LOOP_MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, in_flight) = (tx.clone(), in_flight.clone());
        let k = n;
        n += 1;
        tokio::spawn(async move {
            let mut reply = vec![0u8; 2048];
            let (ok, _) = one(target, k, None, &mut reply).await;
            let _ = tx.send((at, late, ok.then(|| due.elapsed())));
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(tx);
    let (mut all, mut errors) = (Vec::new(), 0u64);
    let mut timeline = Vec::new();
    while let Some((at, late, done)) = rx.recv().await {
        timeline.push((at, late, done));
        match done {
            Some(latency) => all.push(latency),
            None => errors += 1,
        }
    }
    // LOADGEN_TIMELINE=FILE: each connection's scheduled start and latency
    // (ms, "-" if it failed) and how late this generator started it (ms), to
    // tell a stall (slow connections bunched in time) from queueing (spread
    // out), and a stall of the generator itself from one of the router.
    if let Ok(path) = std::env::var("LOADGEN_TIMELINE") {
        timeline.sort_by_key(|(at, _, _)| *at);
        let text: String = timeline
            .iter()
            .map(|(at, late, done)| {
                let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
                let done = done.map_or("-".to_string(), |d| format!("{:.3}", ms(&d)));
                format!("{:.3} {done} {:.3}\n", ms(at), ms(late))
            })
            .collect();
        let _ = std::fs::write(path, text);
    }
    let mut late: Vec<Duration> = timeline.iter().map(|(_, late, _)| *late).collect();
    all.sort();
    late.sort();
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    // late_p99_ms: how late this generator itself started its connections.
    // Near the latency p99, the generator (on the same cores) was the one
    // that fell behind, not the router.
    println!(
        "{{\"offered_per_sec\": {:.0}, \"conns_per_sec\": {:.0}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"p999_ms\": {:.3}, \"late_p99_ms\": {:.3}, \"errors\": {}, \"skipped\": {}}}",
        rate,
        all.len() as f64 / secs.max(1) as f64,
        pct(&all, 0.50),
        pct(&all, 0.99),
        pct(&all, 0.999),
        pct(&late, 0.99),
        errors,
        skipped
    );
}

/// How a TLS client behaves.
#[derive(Clone, Copy)]
struct Tls {
    /// Keep a session cache and resume.
    resume: bool,
    /// List AES-128-GCM first, as browsers do.
    aes128_first: bool,
}

/// TLS 1.3 with X25519 only (what OpenSSL 3.0 peers offer too), sessions
/// cached across this connector's connections when resuming.
fn tls_connector(
    Tls {
        resume,
        aes128_first,
    }: Tls,
) -> TlsConnector {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    if aes128_first {
        let aes128 = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
        provider.cipher_suites.sort_by_key(|s| s.suite() != aes128);
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(1024)
    } else {
        rustls::client::Resumption::disabled()
    };
    TlsConnector::from(Arc::new(config))
}

/// Accepts any server certificate: the benchmark measures servers, and
/// both get the same client.
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ECDSA_NISTP256_SHA256]
    }
}

async fn tls_idle(target: SocketAddr, count: usize, secs: u64) {
    let tls = tls_connector(Tls {
        resume: false,
        aes128_first: false,
    });
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let Ok(s) = connect(target, i as u64).await else {
            eprintln!("connection {i} failed");
            break;
        };
        let name = ServerName::try_from("tls.test").expect("static name");
        match tls.connect(name, s).await {
            Ok(mut s) => {
                // Less than the backend waits for: the upstream stays open, idle.
                let _ = s.write_all(&HELLO[..100]).await;
                held.push(s);
            }
            Err(e) => {
                eprintln!("handshake {i}: {e}");
                break;
            }
        }
    }
    println!("{{\"idle_tls_connections\": {}}}", held.len());
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// The captured hello with its SNI `pass.test` swapped for `bulk.test`
/// (same length): bulk and idle load go to a sink backend that never
/// answers, so no router sees the backend close while the client stays
/// (not every router passes a half-close on).
fn sink_hello() -> Vec<u8> {
    let mut hello = HELLO.to_vec();
    if let Some(at) = hello.windows(9).position(|w| w == b"pass.test") {
        hello[at..at + 9].copy_from_slice(b"bulk.test");
    }
    hello
}

async fn bulk(target: SocketAddr, secs: u64, streams: usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let hello: Arc<[u8]> = sink_hello().into();
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..streams {
        let (sent, errors, hello) = (sent.clone(), errors.clone(), hello.clone());
        workers.push(tokio::spawn(async move {
            let ok = async {
                let mut s = connect(target, i as u64).await?;
                s.write_all(&hello).await?;
                let chunk = vec![0x17u8; 256 * 1024];
                while Instant::now() < deadline {
                    s.write_all(&chunk).await?;
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            if ok.is_err() {
                // A stream cut short: reported, and the rate still spans
                // the whole run, so an early close cannot inflate it.
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().max(Duration::from_secs(secs));
    let mib = sent.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
    println!(
        "{{\"mib_per_sec\": {:.0}, \"errors\": {}}}",
        mib / elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
}

async fn idle(target: SocketAddr, count: usize, secs: u64) {
    let hello = sink_hello();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        // Idle connections pile up over time, not in one burst: opening them
        // at ~5k/s keeps transient routing state out of the steady-state
        // figure (a burst leaves the allocator's pages fragmented).
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match connect(target, i as u64).await {
            Ok(mut s) => {
                let _ = s.write_all(&hello).await;
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

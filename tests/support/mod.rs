//! Test harness: routers started in-process on 127.0.0.x, a test CA, and
//! small real backends. Every wait is bounded.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sni_router::config::Config;
use sni_router::server::{Handle, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod container;
pub mod knot;
pub mod load;
pub mod pebble;
pub mod process;

/// Bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

// Each test binary uses some of them.
#[allow(unused_imports)]
pub use sni_router::test_helpers::{
    HELLO, NOWHERE, Sample, held_site, hello_for, metric_value, passthrough_site, samples,
    split_records, wait_listening,
};

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "sni_router=debug".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A port free on `ip` right now (bound and released), never one handed
/// out before in this test process.
pub fn free_addr(ip: &str) -> SocketAddr {
    fresh(|| {
        let listener = std::net::TcpListener::bind((ip, 0)).expect("bind a free port");
        listener.local_addr().expect("local addr")
    })
}

/// Ports handed out in this test process. The kernel may give a
/// just-released port to the next bind, and tests run in parallel: one
/// test's Pebble once found its port taken by another test's server, and
/// the router reached that one instead.
static HANDED_OUT: Mutex<std::collections::BTreeSet<u16>> =
    Mutex::new(std::collections::BTreeSet::new());

fn claim(port: u16) -> bool {
    HANDED_OUT.lock().unwrap().insert(port)
}

/// Takes addresses from `bind` until one has a port not handed out before.
pub fn fresh(mut bind: impl FnMut() -> SocketAddr) -> SocketAddr {
    for _ in 0..1000 {
        let addr = bind();
        if claim(addr.port()) {
            return addr;
        }
    }
    panic!("no port not handed out before in 1000 binds");
}

/// A listener on `ip` whose port was not handed out before; the ports it
/// skips stay bound until it has one, so they are not offered again.
pub async fn listen_fresh(ip: &str) -> TcpListener {
    let mut skipped = Vec::new();
    for _ in 0..1000 {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        if claim(listener.local_addr().expect("addr").port()) {
            return listener;
        }
        skipped.push(listener);
    }
    panic!("no port not handed out before in 1000 binds");
}

/// A router running in this process.
pub struct Router {
    pub handle: Handle,
    pub addrs: Vec<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Router {
    pub async fn start(toml: &str) -> Router {
        Router::start_node(toml, None).await
    }

    pub async fn start_node(toml: &str, node: Option<&str>) -> Router {
        init_tracing();
        let config = Config::parse(toml, "test.toml", node).unwrap_or_else(|e| panic!("{e}"));
        let server = Server::bind(config).expect("bind router");
        let addrs = server.local_addrs();
        let handle = server.handle();
        let task = tokio::spawn(server.run());
        Router {
            handle,
            addrs,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The HTTP (port 80) listener: always bound last.
    pub fn http_addr(&self) -> SocketAddr {
        *self.addrs.last().expect("an HTTP listener")
    }

    pub fn http_requests(&self) -> u64 {
        self.handle
            .shared
            .stats
            .http_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn http_forwarded(&self) -> u64 {
        self.handle
            .shared
            .stats
            .http_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.handle
            .shared
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.handle
            .shared
            .stats
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Shuts down and waits for the drain to finish.
    pub async fn stop(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// A CA made with rcgen; issues leaf certificates for test names.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub chain_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sni-router test CA");
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA cert"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, &rcgen::PKCS_ECDSA_P256_SHA256, None)
    }

    /// A leaf with a chosen key type and, optionally, (not_before, not_after).
    pub fn leaf_with(
        &self,
        names: &[&str],
        alg: &'static rcgen::SignatureAlgorithm,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        if let Some((not_before, not_after)) = validity {
            params.not_before = not_before;
            params.not_after = not_after;
        }
        let key = KeyPair::generate_for(alg).expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            chain: vec![cert.der().clone(), self.issuer.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            chain_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn client_config(&self, alpn: &[&str], sni: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("add root");
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.enable_sni = sni;
        Arc::new(config)
    }
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`; returns their paths as
    /// config lines `cert_file = ...` / `key_file = ...`.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> String {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        write_atomic(&cert, self.chain_pem.as_bytes());
        write_atomic(&key, self.key_pem.as_bytes());
        format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    }
}

/// Polls `check` every 20 ms until it holds or `WAIT` passes.
pub async fn wait_until<F, Fut>(check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_within(WAIT, check).await
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn wait_until_within<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Replaces a file the way certbot and lego do: write aside, then rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// What a backend saw on one connection.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub peer: Option<SocketAddr>,
    pub bytes: Vec<u8>,
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
}

/// A backend that records connections; what it answers depends on the kind.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    accepting: Option<tokio::task::AbortHandle>,
}

impl Backend {
    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn first(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls until `n` connections have been recorded.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        wait_until(|| async { self.connections() >= n }).await;
        self.seen.lock().unwrap().clone()
    }

    /// Reads each connection to EOF (bounded) and records the bytes.
    pub async fn recorder(ip: &str) -> Backend {
        Backend::spawn(ip, |mut stream, seen: Seen| async move {
            let mut seen = seen;
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut seen.bytes)).await;
            seen
        })
        .await
    }

    /// Stops accepting and closes the listener, as a backend that went
    /// away; its address can then be bound again.
    pub async fn stop(&self) {
        if let Some(accepting) = &self.accepting {
            accepting.abort();
        }
        wait_until(|| async { std::net::TcpListener::bind(self.addr).is_ok() }).await;
    }

    /// Accepts and closes at once, recording each connection: a backend
    /// that refuses every client after the handshake.
    pub async fn closer(ip: &str) -> Backend {
        Backend::spawn(ip, |stream, seen: Seen| async move {
            drop(stream);
            seen
        })
        .await
    }

    /// Echoes every byte back until EOF, recording what it echoed.
    pub async fn echo(ip: &str) -> Backend {
        Backend::echo_on(listen_fresh(ip).await).await
    }

    /// [`Backend::echo`] on a given listener (an address used before).
    pub async fn echo_on(listener: TcpListener) -> Backend {
        Backend::spawn_on(listener, |stream, mut seen: Seen| async move {
            let (mut reader, mut writer) = stream.into_split();
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(Ok(n)) = tokio::time::timeout(WAIT * 3, reader.read(&mut buf)).await {
                if n == 0 || writer.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                seen.bytes.extend_from_slice(&buf[..n]);
            }
            seen
        })
        .await
    }

    /// A plaintext HTTP upstream: answers one request with what it saw
    /// (the PROXY line, if any) in the body.
    pub async fn http(ip: &str) -> Backend {
        Backend::http_on(listen_fresh(ip).await).await
    }

    /// [`Backend::http`] on a given listener.
    pub async fn http_on(listener: TcpListener) -> Backend {
        Backend::spawn_on(listener, |mut stream, mut seen: Seen| async move {
            let mut buf = vec![0u8; 8192];
            while !seen.bytes.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => seen.bytes.extend_from_slice(&buf[..n]),
                    _ => return seen,
                }
            }
            let text = String::from_utf8_lossy(&seen.bytes).into_owned();
            let proxy = text.lines().find(|l| l.starts_with("PROXY")).unwrap_or("-");
            let body = format!("upstream saw: {proxy}\n");
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
            seen
        })
        .await
    }

    /// A TLS server for `names` that answers one HTTP-ish request.
    pub async fn tls(ip: &str, ca: &TestCa, names: &[&str]) -> Backend {
        let leaf = ca.leaf(names);
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(leaf.chain, leaf.key)
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Backend::spawn(ip, move |stream, mut seen: Seen| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(Ok(mut tls)) = tokio::time::timeout(WAIT, acceptor.accept(stream)).await
                else {
                    return seen;
                };
                let (_, conn) = tls.get_ref();
                seen.sni = conn.server_name().map(str::to_string);
                seen.alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                let mut buf = vec![0u8; 4096];
                if let Ok(Ok(n)) = tokio::time::timeout(WAIT, tls.read(&mut buf)).await {
                    seen.bytes = buf[..n].to_vec();
                }
                let body = "hello from backend\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
                seen
            }
        })
        .await
    }

    async fn spawn<F, Fut>(ip: &str, serve: F) -> Backend
    where
        F: Fn(TcpStream, Seen) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Seen> + Send,
    {
        Backend::spawn_on(listen_fresh(ip).await, serve).await
    }

    async fn spawn_on<F, Fut>(listener: TcpListener, serve: F) -> Backend
    where
        F: Fn(TcpStream, Seen) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Seen> + Send,
    {
        let mut backend = Backend {
            addr: listener.local_addr().expect("addr"),
            seen: Arc::default(),
            accepting: None,
        };
        let seen = backend.seen.clone();
        let serve = Arc::new(serve);
        let ip = backend.addr.ip();
        let accepting = tokio::spawn(async move {
            loop {
                // A failed accept (out of descriptors while tests run side by
                // side, say) must not end the loop: dropping the listener
                // would reset every connection still in its queue, and the
                // test would blame the router for them. The loop ends with
                // the test's runtime.
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        eprintln!("test backend {ip}: accept failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let seen = seen.clone();
                let serve = serve.clone();
                tokio::spawn(async move {
                    let start = Seen {
                        peer: Some(peer),
                        ..Seen::default()
                    };
                    let done = serve(stream, start).await;
                    seen.lock().unwrap().push(done);
                });
            }
        });
        backend.accepting = Some(accepting.abort_handle());
        backend
    }
}

/// A TLS session through the router; also returns the client's local address.
pub async fn tls_connect(
    router: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, SocketAddr)> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let work = async {
        let tcp = TcpStream::connect(router).await?;
        let local = tcp.local_addr()?;
        Ok((connector.connect(server_name, tcp).await?, local))
    };
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("tls connect timed out")))
}

/// The leaf certificate a TLS session was given.
pub fn peer_leaf(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

/// A TLS client through the router: returns the response text and ALPN.
pub async fn tls_request(
    router: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<(String, Option<Vec<u8>>)> {
    let (mut tls, _) = tls_connect(router, config, name).await?;
    let work = async {
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut response = String::new();
        tls.read_to_string(&mut response).await?;
        Ok((response, alpn))
    };
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("tls request timed out")))
}

/// Reads until EOF (bounded); returns what arrived and whether EOF was seen.
pub async fn read_until_eof(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await {
        Ok(Ok(_)) => (got, true),
        Ok(Err(_)) => (got, true),
        Err(_) => (got, false),
    }
}

/// Whether a command is on PATH. Outside CI a missing client skips its
/// test; in CI (`CI` set) it fails, since `.ci/run` installs them all.
pub fn have(command: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found && std::env::var_os("CI").is_some() {
        panic!("{command} is not installed; .ci/run should have installed it");
    }
    found
}

/// Nodes a, b and c on 127.0.0.2, .3 and .4, each with a fresh TLS and
/// HTTP port, for [`fleet_toml_http`]: one list, so every node's config
/// names the same fleet.
pub fn three_nodes() -> [(&'static str, SocketAddr, SocketAddr); 3] {
    let node = |name, ip| (name, free_addr(ip), free_addr(ip));
    [
        node("a", "127.0.0.2"),
        node("b", "127.0.0.3"),
        node("c", "127.0.0.4"),
    ]
}

/// Config text for a fleet: `nodes` as (name, tls address); `this` picks
/// the node; `rest` adds sites, listeners, timeouts.
pub fn fleet_toml(this: &str, nodes: &[(&str, SocketAddr)], top: &str, rest: &str) -> String {
    // Each node's HTTP port is a fresh one on the node's address.
    let with_http: Vec<(&str, SocketAddr, SocketAddr)> = nodes
        .iter()
        .map(|(name, tls)| (*name, *tls, free_addr(&tls.ip().to_string())))
        .collect();
    fleet_toml_http(this, &with_http, top, rest)
}

/// Like [`fleet_toml`] with each node's (name, tls, http) addresses given.
pub fn fleet_toml_http(
    this: &str,
    nodes: &[(&str, SocketAddr, SocketAddr)],
    top: &str,
    rest: &str,
) -> String {
    let mut out = format!("this_node = \"{this}\"\n{top}\n");
    for (name, tls, http) in nodes {
        out.push_str(&format!(
            "[[nodes]]\nname = \"{name}\"\ntls = \"{tls}\"\nhttp = \"{http}\"\n"
        ));
    }
    out.push_str(rest);
    out
}

/// A plain HTTP/1.1 request; returns status, the head as text, and the body.
pub async fn http_get(
    addr: SocketAddr,
    host: &str,
    target: &str,
    extra: &str,
) -> (u16, String, String) {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request =
            format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(WAIT, work)
        .await
        .expect("http timed out")
        .expect("http i/o");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// The first value of the `status` line `name` of a process, as /proc
/// shows it (a size without its unit), or "".
pub fn proc_status(pid: &str, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:")));
    line.and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string()
}

/// `curl https://NAME/` at `addr` (the name resolved there), trusting only
/// the roots in `ca`: success and combined output.
pub async fn curl_https(ca: &std::path::Path, name: &str, addr: SocketAddr) -> (bool, String) {
    sh(curl_https_command(ca, name, addr)).await
}

/// The command [`curl_https`] runs, to be run elsewhere (in a container's
/// network, say).
pub fn curl_https_command(ca: &std::path::Path, name: &str, addr: SocketAddr) -> String {
    format!(
        "curl -sS --max-time 10 --cacert {ca} --resolve {name}:{port}:{ip} https://{name}:{port}/",
        ca = ca.display(),
        port = addr.port(),
        ip = addr.ip()
    )
}

/// Runs a shell command off the async runtime (the routers under test share
/// it) and returns success and combined output. Commands bound their own time.
pub async fn sh(script: String) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .expect("command thread")
}

/// Segments `stream` has received (`tcpi_segs_in`, Linux 4.2+).
#[cfg(target_os = "linux")]
pub fn segments_in(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // struct tcp_info: 8 bytes of u8 fields, 24 u32, 4 u64, then
    // tcpi_segs_out and tcpi_segs_in.
    const SEGS_IN: usize = 8 + 24 * 4 + 4 * 8 + 4;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a live descriptor and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    assert!(len as usize >= SEGS_IN + 4, "tcp_info too short: {len}");
    u32::from_ne_bytes(info[SEGS_IN..SEGS_IN + 4].try_into().unwrap())
}

//! A fleet of the project's own: 8 nodes (real processes) on
//! 127.0.0.101-108, sites held by one to three nodes each, every holder
//! with its own certificate from Pebble (the names' DNS pointing at other
//! nodes, so validation goes through port 80 forwarding). Then, for about a
//! minute, nodes are killed and restarted, frozen and thawed, reloaded and
//! upgraded, while clients on a non-node address and on node addresses ask
//! random sites through random nodes.
//!
//! Every request whose entry node was up, with at least one holder up and
//! no fault (kill, freeze, reload or upgrade) beginning during it, must be
//! answered by a holder with a valid certificate. A node counts as down
//! while killed or frozen, and as up through its reloads and upgrades.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use support::pebble::{Options, Pebble};
use support::process::{LOG_FILE, Process, running, signal_pid, try_signal_pid, wait_listening};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const NODES: usize = 8;
/// Holders of each site, by node index: one to three each.
const SITES: [&[usize]; 6] = [&[0], &[1, 2], &[3, 4, 5], &[6, 7], &[2, 5, 7], &[4]];
/// Each site's DNS points at a node that does not hold it.
const DNS: [usize; 6] = [4, 0, 7, 2, 3, 1];
const FAULT_PHASE: Duration = Duration::from_secs(60);
const CLIENTS: usize = 4;
/// Per request; a frozen first holder costs the entry one `connect`
/// timeout (1 s here) before it fails over.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
const NON_NODE_CLIENT: &str = "127.0.0.200";

fn node_ip(i: usize) -> IpAddr {
    format!("127.0.0.{}", 101 + i).parse().unwrap()
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn site_name(s: usize) -> String {
    format!("s{s}.fleet.test")
}

/// Each node's own name, added to its orders: a leaf's SANs say which
/// node's certificate it is.
fn acme_name(i: usize) -> String {
    format!("n{i}.fleet.test")
}

/// One node: its config file and the process serving it now (the one the
/// test started, or the successor of an upgrade).
struct Node {
    config: PathBuf,
    dir: PathBuf,
    tls: SocketAddr,
    process: Option<Process>,
    pid: u32,
    /// Upgrades seen in the current log.
    upgrades: usize,
    /// Processes started so far; each earlier one's log is kept beside the
    /// current one, so a request that failed through a node killed later
    /// can still be read about.
    lives: usize,
}

/// A successor started by an upgrade is not the test's child, so nothing
/// else ends it: the node does, also when an assertion fails first.
impl Drop for Node {
    fn drop(&mut self) {
        if self.pid != 0 {
            // The process may have ended on its own.
            try_signal_pid(self.pid, "KILL");
        }
    }
}

impl Node {
    fn start(&mut self) {
        if self.lives > 0 {
            let _ = std::fs::rename(self.dir.join(LOG_FILE), self.kept_log(self.lives));
        }
        self.lives += 1;
        let process = Process::start(&self.config, &self.dir);
        self.pid = process.pid();
        self.process = Some(process);
        self.upgrades = 0;
    }

    /// Where the log of process `life` (counted from 1) is kept once a
    /// later one has started.
    fn kept_log(&self, life: usize) -> PathBuf {
        self.dir.join(format!("router.{life}.log"))
    }

    /// The current process's log.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(LOG_FILE)).unwrap_or_default()
    }

    /// Every process's log, oldest first.
    fn all_logs(&self) -> String {
        let earlier = (1..self.lives)
            .map(|life| std::fs::read_to_string(self.kept_log(life)).unwrap_or_default());
        earlier.chain([self.log()]).collect()
    }
}

/// When a node was down (killed until listening again, or frozen).
#[derive(Debug, Clone, Copy)]
struct Fault {
    node: usize,
    start: Instant,
    end: Instant,
}

#[derive(Debug)]
struct Request {
    entry: usize,
    site: usize,
    start: Instant,
    end: Instant,
    /// The holder whose certificate answered, or what went wrong.
    result: Result<usize, String>,
    /// The holder whose certificate the handshake showed, if it completed,
    /// whatever came after.
    served_by: Option<usize>,
}

fn fleet_config(
    i: usize,
    pebble: &Pebble,
    tls: &[SocketAddr],
    upstream: SocketAddr,
    state: &Path,
) -> String {
    let mut text = format!(
        "this_node = \"{}\"\n[timeouts]\nconnect = \"1s\"\ndrain = \"3s\"\n",
        node_name(i)
    );
    text.push_str(&pebble.acme_section(state, ""));
    for (n, addr) in tls.iter().enumerate() {
        let http = SocketAddr::new(node_ip(n), pebble.http_port);
        text.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\ntls = \"{addr}\"\nhttp = \"{http}\"\nacme_name = \"{}\"\n",
            node_name(n),
            acme_name(n)
        ));
    }
    for (s, holders) in SITES.iter().enumerate() {
        let held_by: Vec<String> = holders
            .iter()
            .map(|h| format!("\"{}\"", node_name(*h)))
            .collect();
        text.push_str(&format!(
            "[[sites]]\nnames = [\"{}\"]\nheld_by = [{}]\nupstream = \"{upstream}\"\n",
            site_name(s),
            held_by.join(", ")
        ));
    }
    text
}

/// The node whose `acme_name` the leaf carries, if it is a valid chain for
/// `site` (the client verified it).
fn holder_of(leaf: &[u8]) -> Option<usize> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => {
            (0..NODES).find(|i| *dns == acme_name(*i))
        }
        _ => None,
    })
}

/// One request through `entry` for `site`, from `source`: the holder that
/// answered, or what went wrong; and the holder that completed the
/// handshake, if one did.
async fn ask(
    client: Arc<rustls::ClientConfig>,
    source: IpAddr,
    entry: SocketAddr,
    site: usize,
) -> (Result<usize, String>, Option<usize>) {
    let mut served_by = None;
    let work = async {
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind: {e}"))?;
        let tcp = socket
            .connect(entry)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(site_name(site)).map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let holder = holder_of(&peer_leaf(&tls));
        served_by = holder;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        // read_to_end keeps what arrived before an error, so a reply that
        // ends badly is told apart from no reply at all.
        let mut response = Vec::new();
        let end = tls.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response);
        if !response.contains("upstream saw") || end.is_err() {
            return Err(format!(
                "no clean answer from the upstream: {response:?}, end: {end:?}"
            ));
        }
        holder.ok_or_else(|| "a leaf without a node's name".to_string())
    };
    let result = tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    (result, served_by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_under_kills_freezes_reloads_and_upgrades_serves_every_servable_request() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Backend::http("127.0.0.1").await;
    let tls: Vec<SocketAddr> = (0..NODES)
        .map(|i| free_addr(&node_ip(i).to_string()))
        .collect();
    for i in 0..NODES {
        pebble.add_a(&acme_name(i), &node_ip(i).to_string()).await;
    }
    for (s, at) in DNS.iter().enumerate() {
        assert!(!SITES[s].contains(at));
        pebble.add_a(&site_name(s), &node_ip(*at).to_string()).await;
    }
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            let node_dir = dir.path().join(node_name(i));
            std::fs::create_dir(&node_dir).unwrap();
            let config = node_dir.join("router.toml");
            let text = fleet_config(i, &pebble, &tls, upstream.addr, &node_dir.join("state"));
            std::fs::write(&config, text).unwrap();
            Node {
                config,
                dir: node_dir,
                tls: tls[i],
                process: None,
                pid: 0,
                upgrades: 0,
                lives: 0,
            }
        })
        .collect();
    for node in &mut nodes {
        node.start();
    }
    for node in &nodes {
        wait_listening(node.tls).await;
    }

    // Every holder serves its own certificate, asked directly.
    let client = pebble.client().await;
    let issued_by = Instant::now();
    for (s, holders) in SITES.iter().enumerate() {
        for h in *holders {
            loop {
                let source = NON_NODE_CLIENT.parse().unwrap();
                if ask(client.clone(), source, tls[*h], s).await.0 == Ok(*h) {
                    break;
                }
                assert!(
                    issued_by.elapsed() < Duration::from_secs(120),
                    "holder {} has no certificate of its own for {}:\n{}",
                    node_name(*h),
                    site_name(s),
                    nodes[*h].log()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let forwarded = nodes
        .iter()
        .map(|n| n.log().matches("result=\"challenge_forwarded\"").count())
        .sum::<usize>();
    assert!(forwarded > 0, "validation went through forwarding");

    // Clients: random sites through random nodes, from a non-node address
    // and from node addresses.
    let requests = Arc::new(Mutex::new(Vec::<Request>::new()));
    // Times below are printed from here, beside the wall clock the
    // routers' log lines carry.
    let began = Instant::now();
    let began_wall = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    let at = |t: Instant| format!("+{:.3}s", t.saturating_duration_since(began).as_secs_f64());
    let stop_at = began + FAULT_PHASE;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (client, requests, tls) = (client.clone(), requests.clone(), tls.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(c as u64);
            while Instant::now() < stop_at {
                let entry = rng.usize(..NODES);
                let site = rng.usize(..SITES.len());
                let source = if rng.bool() {
                    NON_NODE_CLIENT.parse().unwrap()
                } else {
                    node_ip(rng.usize(..NODES))
                };
                let start = Instant::now();
                let (result, served_by) = ask(client.clone(), source, tls[entry], site).await;
                let end = Instant::now();
                requests.lock().unwrap().push(Request {
                    entry,
                    site,
                    start,
                    end,
                    result,
                    served_by,
                });
            }
        }));
    }

    // Faults, one every second and a half, on random nodes.
    let mut faults = Vec::<Fault>::new();
    let mut events = Vec::<String>::new();
    // When each reload and upgrade began: faults too, though the node
    // stays up through them.
    let mut changes = Vec::<Instant>::new();
    let mut rng = fastrand::Rng::with_seed(7);
    while Instant::now() + Duration::from_secs(4) < stop_at {
        let i = rng.usize(..NODES);
        match rng.usize(..4) {
            0 => {
                let start = Instant::now();
                signal_pid(nodes[i].pid, "KILL");
                tokio::time::sleep(Duration::from_millis(500)).await;
                nodes[i].start();
                wait_listening(nodes[i].tls).await;
                // Down until its accept loops run, which the log says.
                if let Some(process) = &nodes[i].process {
                    process.wait_log("listening addr=", 1).await;
                }
                let end = Instant::now();
                faults.push(Fault {
                    node: i,
                    start,
                    end,
                });
                events.push(format!("kill {} {}..{}", node_name(i), at(start), at(end)));
            }
            1 => {
                let start = Instant::now();
                signal_pid(nodes[i].pid, "STOP");
                tokio::time::sleep(Duration::from_secs(2)).await;
                signal_pid(nodes[i].pid, "CONT");
                let end = Instant::now();
                faults.push(Fault {
                    node: i,
                    start,
                    end,
                });
                events.push(format!(
                    "freeze {} {}..{}",
                    node_name(i),
                    at(start),
                    at(end)
                ));
            }
            2 => {
                let changed = Instant::now();
                changes.push(changed);
                signal_pid(nodes[i].pid, "HUP");
                events.push(format!("reload {} {}", node_name(i), at(changed)));
            }
            _ => {
                let changed = Instant::now();
                changes.push(changed);
                signal_pid(nodes[i].pid, "USR2");
                nodes[i].upgrades += 1;
                let deadline = Instant::now() + WAIT;
                let new_pid = loop {
                    let log = nodes[i].log();
                    let pids: Vec<u32> = log
                        .lines()
                        .filter(|l| l.contains("upgrade: the new process listens"))
                        .filter_map(|l| l.split("pid=").nth(1)?.trim().parse().ok())
                        .collect();
                    if pids.len() >= nodes[i].upgrades {
                        break pids[nodes[i].upgrades - 1];
                    }
                    assert!(
                        Instant::now() < deadline,
                        "upgrade of {} never ready:\n{log}",
                        node_name(i)
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                // The test's own child, if it was this one, exits after its
                // drain; the node ends the successor when dropped.
                nodes[i].pid = new_pid;
                events.push(format!("upgrade {} {}", node_name(i), at(changed)));
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    for client in clients {
        client.await.unwrap();
    }
    let requests = std::mem::take(&mut *requests.lock().unwrap());

    let down = |node: usize, start: Instant, end: Instant| {
        faults
            .iter()
            .any(|f| f.node == node && f.start <= end && start <= f.end)
    };
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let mut excused = 0;
    let mut holder_died_after_answering = 0;
    for r in &requests {
        let holder_up = SITES[r.site].iter().any(|h| !down(*h, r.start, r.end));
        let fault_began = faults
            .iter()
            .map(|f| f.start)
            .chain(changes.iter().copied())
            .any(|at| r.start <= at && at <= r.end);
        // A holder that dies after its handshake takes the connection with
        // it: nothing can fail over once it has answered. (A fault's start
        // is taken just before the signal, so it can precede the request
        // that the dying holder still answered.)
        let holder_died = r.served_by.is_some_and(|h| down(h, r.start, r.end));
        if down(r.entry, r.start, r.end) || !holder_up || fault_began || holder_died {
            excused += 1;
            holder_died_after_answering += usize::from(holder_died && r.result.is_err());
            continue;
        }
        match &r.result {
            Ok(holder) if SITES[r.site].contains(holder) => latencies.push(r.end - r.start),
            other => failures.push(format!(
                "{} via {} {}..{}: {other:?}",
                site_name(r.site),
                node_name(r.entry),
                at(r.start),
                at(r.end)
            )),
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    eprintln!(
        "fleet: {} requests, {} servable, {} excused by a fault ({} failed after their holder's handshake, as it died); \
         p50 {:.1} ms, p99 {:.1} ms; from {began_wall} (+0s), faults: {}",
        requests.len(),
        latencies.len() + failures.len(),
        excused,
        holder_died_after_answering,
        pct(0.5),
        pct(0.99),
        events.join(", ")
    );
    if !failures.is_empty() {
        // What the routers said that was not a clean end: the line to read
        // when a servable request failed.
        for (i, node) in nodes.iter().enumerate() {
            for line in node.all_logs().lines().filter(|l| {
                (l.contains("connection finished") && !l.contains("end=closed"))
                    && !l.contains("close_notify")
                    || l.contains(" WARN ")
                    || l.contains(" ERROR ")
            }) {
                eprintln!("{}: {line}", node_name(i));
            }
        }
        eprintln!(
            "{} servable requests failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    let servable = latencies.len() + failures.len();
    assert!(
        failures.is_empty(),
        "{} of {servable} servable requests failed",
        failures.len()
    );
    assert!(
        latencies.len() >= 100,
        "too few servable requests to judge: {}",
        latencies.len()
    );
    for node in &nodes {
        if !running(node.pid) {
            panic!(
                "{} is not running at the end:\n{}",
                node_name(nodes.iter().position(|n| n.pid == node.pid).unwrap_or(0)),
                node.log()
            );
        }
    }
}

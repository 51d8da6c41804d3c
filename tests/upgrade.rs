//! Upgrades and restarts under load lose nothing: `SIGUSR2` hands every
//! listening socket to the binary on disk, and a second process started by
//! hand beside the first takes every new connection before the first one
//! stops. The systemd paths (MAINPID, socket activation) are in
//! tests/systemd_unit.rs.

mod support;

use std::path::Path;
use std::time::Duration;

use support::load::{self, ConnRate};
use support::process::{Process, Strays, running, signal_pid, wait_gone, wait_listening};
use support::*;

/// One node with the load generator's site, `pass.test`, passed through to
/// `backend`, and `top` (its workers); returns the config path and the
/// node's TLS address.
fn config(
    dir: &Path,
    backend: std::net::SocketAddr,
    top: &str,
) -> (std::path::PathBuf, std::net::SocketAddr) {
    let node = free_addr("127.0.0.2");
    let text = fleet_toml(
        "a",
        &[("a", node)],
        &format!("{top}\n[timeouts]\ndrain = \"5s\""),
        &format!("[[sites]]\nnames = [\"pass.test\"]\npassthrough = \"{backend}\"\n"),
    );
    let path = dir.join("router.toml");
    std::fs::write(&path, text).unwrap();
    (path, node)
}

/// A load-generator backend and a one-node config passing `pass.test` to it.
struct Setup {
    dir: tempfile::TempDir,
    _backend: load::Running,
    config: std::path::PathBuf,
    node: std::net::SocketAddr,
}

/// A listening socket per address, shared by the workers (the default).
const SHARED: &str = "";
/// Two workers, each with its own listening socket per address.
const SOCKET_PER_WORKER: &str = "workers = 2\naccept = \"per_worker\"";

async fn setup(top: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let backend_addr = free_addr("127.0.0.1");
    let _backend = load::backend(backend_addr);
    wait_listening(backend_addr).await;
    let (config, node) = config(dir.path(), backend_addr, top);
    Setup {
        dir,
        _backend,
        config,
        node,
    }
}

/// The pids the log names as started by upgrades, in order.
fn successors(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("upgrade: started the new process"))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Seconds of load: long enough for three restarts a second and a half
/// apart. With 32 clients the load generator opens 8-9k new connections/s
/// through a debug router here (alone on the machine; printed with each
/// run, not asserted: a shared CI machine sets the rate).
const LOAD_SECS: u64 = 8;
const CLIENTS: usize = 32;

/// Listening sockets on exactly `addr`, as `ss` lists them.
fn sockets_listening(addr: std::net::SocketAddr) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("src = {addr}")])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// With a listening socket per worker: the new process takes over every
/// one of them, and opens none more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sigusr2_upgrades_under_load_lose_nothing() {
    let at = setup(SOCKET_PER_WORKER).await;
    let (config, node) = (&at.config, at.node);
    let mut first = Process::start(config, at.dir.path());
    wait_listening(node).await;
    assert_eq!(sockets_listening(node), 2, "a socket per worker");
    let mut strays = Strays::default();
    let load = ConnRate::start(node, LOAD_SECS, CLIENTS);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut current = first.pid();
    for round in 1..=3 {
        signal_pid(current, "USR2");
        first
            .wait_log("upgrade: the new process listens", round)
            .await;
        let next = *successors(&first.log()).last().expect("a successor pid");
        strays.0.push(next);
        assert!(running(next), "the new process {next} runs");
        // The old one drains (nothing is long-lived here) and exits.
        if round == 1 {
            assert!(first.wait_exit().await.success());
        } else {
            wait_gone(current, WAIT).await;
        }
        current = next;
        assert_eq!(sockets_listening(node), 2, "the same two sockets");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let rate = load.finish().await;
    assert_eq!(rate.errors, 0, "connections lost across 3 upgrades");
    assert!(rate.conns_per_sec > 0.0);
    // The last process serves on.
    assert!(running(current));
    let (reply, _) = tls_exchange(node).await;
    assert_eq!(reply, 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_restarts_by_hand_under_load_lose_nothing() {
    let at = setup(SHARED).await;
    let (config, node) = (&at.config, at.node);
    let logs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut old = Process::start(config, logs[0].path());
    wait_listening(node).await;
    let load = ConnRate::start(node, LOAD_SECS, CLIENTS);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for log in &logs[1..] {
        // A second process on the same config, as a container rollout or
        // an operator would start it; then SIGTERM to the first.
        let new = Process::start(config, log.path());
        new.wait_log("new connections now come to this one", 1)
            .await;
        old.signal("TERM");
        assert!(old.wait_exit().await.success());
        old = new;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let rate = load.finish().await;
    assert_eq!(rate.errors, 0, "connections lost across 3 hand restarts");
    let (reply, _) = tls_exchange(node).await;
    assert_eq!(reply, 1024);
}

#[tokio::test]
async fn an_upgrade_to_a_broken_config_leaves_the_old_process_serving() {
    let at = setup(SHARED).await;
    let (config, node) = (&at.config, at.node);
    let router = Process::start(config, at.dir.path());
    wait_listening(node).await;
    std::fs::write(config, "this_node = \"a\"\n[[sites]]\nnames = 7\n").unwrap();
    router.signal("USR2");
    router
        .wait_log("upgrade failed: this process carries on serving", 1)
        .await;
    let log = router.log();
    assert!(log.contains("exited before it was ready"), "{log}");
    for pid in successors(&log) {
        assert!(!running(pid), "the failed successor {pid} was left running");
    }
    let (reply, _) = tls_exchange(node).await;
    assert_eq!(reply, 1024, "the old process still serves");
    assert!(!router.log().contains("draining connections"));
}

/// One loadgen-style exchange: the captured hello out, the 1 KiB answer back.
async fn tls_exchange(node: std::net::SocketAddr) -> (usize, bool) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(node).await.unwrap();
    stream.write_all(HELLO).await.unwrap();
    let (reply, eof) = read_until_eof(&mut stream).await;
    (reply.len(), eof)
}

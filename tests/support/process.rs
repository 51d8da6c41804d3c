//! The built binary as a child process, for tests that need real signals
//! or a clean process to measure (descriptors, memory, metrics).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_sni-router");

/// The binary as a child process; killed on drop so no test leaks one.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    pub fn start(config: &Path, dir: &Path) -> Process {
        Process::start_with_env(config, dir, &[])
    }

    pub fn start_with_env(config: &Path, dir: &Path, env: &[(&str, &Path)]) -> Process {
        let log = dir.join("router.log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start sni-router");
        Process { child, log }
    }

    /// Kills the process and waits for it, so its ports are free.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the log to contain `text`.
    pub async fn wait_log(&self, text: &str, times: usize) {
        self.wait_log_within(text, times, WAIT).await;
    }

    /// Waits up to `within` for `text` to be logged `times` times.
    pub async fn wait_log_within(&self, text: &str, times: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log().matches(text).count() < times {
            assert!(
                Instant::now() < deadline,
                "{text:?} not logged {times}x within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "router did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        // The log lives in the test's temporary directory, gone once the
        // test ends: show it when the test failed, so a rare failure in CI
        // says what the router saw.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines
                .get(lines.len().saturating_sub(80)..)
                .unwrap_or_default();
            eprintln!(
                "--- router log, last {} lines ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "router never listened on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open sockets of the router process. (Pipes are left out: the
    /// zero-copy path keeps a bounded per-thread pool of them.)
    pub fn socket_count(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return 0;
        };
        dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    /// Resident memory of the router process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

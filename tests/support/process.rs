//! The built binary as a child process, for tests that need real signals
//! or a clean process to measure (descriptors, memory, metrics).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_sni-router");

/// The binary as a child process; killed on drop so no test leaks one.
pub struct Process {
    child: Child,
    log: PathBuf,
    /// The child is `strace`, and the router its child.
    traced: bool,
}

impl Process {
    pub fn start(config: &Path, dir: &Path) -> Process {
        Process::start_with_env(config, dir, &[])
    }

    pub fn start_with_env(config: &Path, dir: &Path, env: &[(&str, &Path)]) -> Process {
        Process::spawn(Command::new(BIN), config, dir, env, false)
    }

    /// The binary logging JSON (`--log-format json`).
    pub fn start_json(config: &Path, dir: &Path) -> Process {
        let mut command = Command::new(BIN);
        command.args(["--log-format", "json"]);
        Process::spawn(command, config, dir, &[], false)
    }

    /// The binary under `strace -f -C`: every thread's system calls are
    /// written to `trace`, and counted at its end when the router exits.
    pub fn start_traced(config: &Path, dir: &Path, trace: &Path) -> Process {
        let mut strace = Command::new("strace");
        strace
            .args(["-f", "-qq", "-C", "-o"])
            .arg(trace)
            .arg("--")
            .arg(BIN);
        Process::spawn(strace, config, dir, &[], true)
    }

    /// `command` (the binary, or what runs it) with `run --config CONFIG`,
    /// logging into `dir`.
    fn spawn(
        mut command: Command,
        config: &Path,
        dir: &Path,
        env: &[(&str, &Path)],
        traced: bool,
    ) -> Process {
        let log = dir.join(LOG_FILE);
        let child = command
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start sni-router");
        Process { child, log, traced }
    }

    /// Kills the process and waits for it, so its ports are free.
    pub fn stop(&mut self) {
        // A killed strace leaves its tracee running.
        if let Some(router) = self.router_pid() {
            let _ = Command::new("kill").args(["-KILL", &router]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The traced router's pid, once strace has started it.
    fn router_pid(&self) -> Option<String> {
        if !self.traced {
            return None;
        }
        let strace = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).ok()?;
        children.split_whitespace().next().map(str::to_string)
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

#[allow(unused_imports)]
pub use super::wait_listening;

impl Process {
    /// The router's pid (not strace's: strace blocks fatal signals).
    pub fn pid(&self) -> u32 {
        if !self.traced {
            return self.child.id();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(pid) = self.router_pid().and_then(|p| p.parse().ok()) {
                return pid;
            }
            assert!(Instant::now() < deadline, "strace started no router");
            std::thread::sleep(Duration::from_millis(10));
        }
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
        self.status("VmRSS")
    }

    /// How many descriptors the router's descriptor table holds now
    /// (`FDSize`), whatever is open.
    pub fn fd_table_size(&self) -> u64 {
        self.status("FDSize")
    }

    /// A number from `/proc/PID/status` (its unit dropped), or 0.
    fn status(&self, key: &str) -> u64 {
        super::proc_status(&self.pid().to_string(), key)
            .parse()
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A started router's log, in the directory it was given.
pub const LOG_FILE: &str = "router.log";

/// Sends signal `name` (`TERM`, `USR2`, ...) to `pid`.
pub fn signal_pid(pid: u32, name: &str) {
    assert!(try_signal_pid(pid, name), "kill -{name} {pid}");
}

/// Sends signal `name` to `pid` if it still runs; whether it was sent. For
/// `Drop` impls, which may run while a test is already unwinding.
pub fn try_signal_pid(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_comm) = stat.rsplit_once(')')?;
            after_comm.split_whitespace().next().map(|s| s != "Z")
        })
        .unwrap_or(false)
}

/// Waits (bounded by `within`) until `pid` no longer runs.
pub async fn wait_gone(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while running(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes a test did not start itself (an upgrade's successors): killed
/// when dropped, so no test leaks one.
#[derive(Default)]
pub struct Strays(pub Vec<u32>);

impl Drop for Strays {
    fn drop(&mut self) {
        for pid in &self.0 {
            if running(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

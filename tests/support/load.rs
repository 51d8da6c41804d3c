//! The repository's load generator (`examples/loadgen.rs`, built by `cargo
//! test` beside the tests) as child processes: a backend answering 1 KiB
//! per connection, and a client opening new connections back to back.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `target/<profile>/examples/loadgen`, next to this test's own binary
/// (`target/<profile>/deps/...`).
fn loadgen() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile.join("examples").join("loadgen");
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// A child killed when dropped.
pub struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Answers each connection's captured ClientHello with 1 KiB and a close.
pub fn backend(addr: SocketAddr) -> Running {
    let child = Command::new(loadgen())
        .args(["backend", &addr.to_string(), "reply1k"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start loadgen backend");
    Running(child)
}

/// What a connection-rate run reports.
#[derive(Debug, serde::Deserialize)]
pub struct Rate {
    pub conns_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Connections refused, reset, or answered short.
    pub errors: u64,
}

/// New connections to `target` for `secs` seconds with `concurrency`
/// clients, each sending the captured hello (SNI `pass.test`) and reading
/// the 1 KiB answer to its end.
pub struct ConnRate {
    child: Child,
    secs: u64,
}

impl ConnRate {
    pub fn start(target: SocketAddr, secs: u64, concurrency: usize) -> ConnRate {
        let child = Command::new(loadgen())
            .args([
                "connrate",
                &target.to_string(),
                &secs.to_string(),
                &concurrency.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start loadgen connrate");
        ConnRate { child, secs }
    }

    /// Waits for the run to end (it bounds itself) and reads its report.
    pub async fn finish(self) -> Rate {
        let secs = self.secs;
        let out = tokio::task::spawn_blocking(move || self.child.wait_with_output())
            .await
            .expect("loadgen thread")
            .expect("loadgen output");
        let text = String::from_utf8_lossy(&out.stdout);
        let rate: Rate = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("loadgen report {text:?}: {e}"));
        eprintln!(
            "load over {secs} s: {:.0} new connections/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            rate.conns_per_sec, rate.p50_ms, rate.p99_ms, rate.errors
        );
        rate
    }
}

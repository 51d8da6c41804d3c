//! A Debian root booted by systemd in a container, for tests of the
//! service unit: commands and the journal through `nsenter`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

/// systemd booted in a container on the host's network (`systemd-nspawn`
/// on a read-only Debian root, `/var` in memory), with host files bound
/// in read-only; powered off when dropped.
pub struct Container {
    nspawn: Child,
    /// The container's systemd, as the host sees it.
    init: u32,
}

impl Container {
    /// Boots `root` with each (host path, container path) of `binds`, and
    /// `unit` started.
    pub async fn boot(root: &Path, binds: &[(&Path, &str)], unit: &str, log: &Path) -> Container {
        Container::start(root, binds, unit, log, "state").await
    }

    /// Like [`Container::boot`] with the whole root writable (an overlay
    /// in memory, gone at power-off): for installing packages.
    pub async fn boot_writable(
        root: &Path,
        binds: &[(&Path, &str)],
        unit: &str,
        log: &Path,
    ) -> Container {
        Container::start(root, binds, unit, log, "overlay").await
    }

    async fn start(
        root: &Path,
        binds: &[(&Path, &str)],
        unit: &str,
        log: &Path,
        volatile: &str,
    ) -> Container {
        let mut nspawn = Command::new("systemd-nspawn");
        nspawn
            .args(["-q", "--register=no", "--keep-unit", "--console=passive"])
            .arg(format!("--volatile={volatile}"))
            .arg("-D")
            .arg(root);
        for (from, to) in binds {
            nspawn.arg(format!("--bind-ro={}:{to}", from.display()));
        }
        let nspawn = nspawn
            .args(["-b", &format!("systemd.wants={unit}")])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).expect("log"))
            .stderr(std::fs::File::create(log.with_extension("err")).expect("log"))
            .spawn()
            .expect("systemd-nspawn");
        // nspawn's child is briefly a helper of its own before it is the
        // container's systemd.
        let id = nspawn.id();
        let init = || {
            let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"));
            children.ok()?.split_whitespace().find_map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                (comm.trim() == "systemd").then(|| pid.parse().ok())?
            })
        };
        let found = wait_until(|| async { init().is_some() }).await;
        let container = Container {
            init: init().unwrap_or(0),
            nspawn,
        };
        let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        assert!(found && container.init != 0, "no container started:\n{err}");
        container
    }

    /// A command inside the container: (success, stdout and stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a"])
            .args(args)
            .output()
            .expect("nsenter");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text.into_owned())
    }

    /// The container's systemd, as the host sees it (for `nsenter -t`).
    pub fn init(&self) -> u32 {
        self.init
    }

    /// The journal of `unit`.
    pub fn journal(&self, unit: &str) -> String {
        self.run(&["journalctl", "-u", unit, "--no-pager"]).1
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let journal = self.run(&["journalctl", "--no-pager", "-n", "80"]).1;
            eprintln!("--- container journal, last 80 lines ---\n{journal}");
        }
        // SIGTERM powers the container off; then make sure.
        let _ = Command::new("kill")
            .arg(self.nspawn.id().to_string())
            .status();
        for _ in 0..100 {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Whether this test runs as root (its real uid).
pub fn root() -> bool {
    proc_status("self", "Uid") == "0"
}

/// The `status` line `name` of a process, as /proc shows it.
pub fn proc_status(pid: &str, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:")));
    line.and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string()
}

//! A Debian root booted by systemd in a container, for tests of the
//! service unit: commands and the journal through `nsenter`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{proc_status, wait_until};

/// systemd booted in a container (`systemd-nspawn` on a read-only Debian
/// root, `/var` in memory), with host files bound in read-only; powered
/// off when dropped.
pub struct Container {
    nspawn: Child,
    /// The container's systemd, as the host sees it.
    init: u32,
}

impl Container {
    /// Boots `root` on the host's network with each (host path, container
    /// path) of `binds`, and `unit` started.
    pub async fn boot(root: &Path, binds: &[(&Path, &str)], unit: &str, log: &Path) -> Container {
        Container::start(root, binds, unit, log, "state", Network::Host).await
    }

    /// Like [`Container::boot`] with the whole root writable (an overlay
    /// in memory, gone at power-off), for installing packages, and with a
    /// network of its own (loopback only): a package's fixed ports (443,
    /// 80, 9100) then meet nothing of the host's, not even a client's
    /// ephemeral port, which this kernel may hand out from 1024 up. Reach
    /// it with [`Container::listen`] and [`Container::in_network`].
    pub async fn boot_writable(
        root: &Path,
        binds: &[(&Path, &str)],
        unit: &str,
        log: &Path,
    ) -> Container {
        Container::start(root, binds, unit, log, "overlay", Network::Own).await
    }

    async fn start(
        root: &Path,
        binds: &[(&Path, &str)],
        unit: &str,
        log: &Path,
        volatile: &str,
        network: Network,
    ) -> Container {
        let mut nspawn = Command::new("systemd-nspawn");
        nspawn
            .args(["-q", "--register=no", "--keep-unit", "--console=passive"])
            .arg(format!("--volatile={volatile}"))
            .arg("-D")
            .arg(root);
        if network == Network::Own {
            nspawn.arg("--private-network");
        }
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

    /// A listener on 127.0.0.1 in the container's network, served from
    /// this process: a thread joins that network just to make the socket,
    /// which stays there.
    pub fn listen(&self) -> tokio::net::TcpListener {
        let netns = format!("/proc/{}/ns/net", self.init);
        let listener = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let netns = std::fs::File::open(&netns).expect("the container's network");
            // SAFETY: a valid descriptor; only this short-lived thread moves.
            let joined = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind")
        })
        .join()
        .expect("a listener in the container's network");
        listener.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpListener::from_std(listener).expect("tokio listener")
    }

    /// `command`, a host program, to be run in the container's network
    /// (and the host's everything else).
    pub fn in_network(&self, command: &str) -> String {
        format!("nsenter -t {} -n {command}", self.init)
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

/// Whose network a container is on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Network {
    Host,
    Own,
}

/// Whether this test runs as root (its real uid).
pub fn root() -> bool {
    proc_status("self", "Uid") == "0"
}

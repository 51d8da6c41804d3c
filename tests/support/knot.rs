//! A real authoritative DNS server for DNS-01 tests: Knot DNS on
//! 127.0.0.1, with dynamic zones that take RFC 2136 updates signed with one
//! TSIG key. Killed on drop.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{free_addr, sh, wait_until};

/// A port on 127.0.0.1 free for both TCP and UDP, as a DNS server binds.
fn free_tcp_and_udp() -> SocketAddr {
    for _ in 0..100 {
        let addr = free_addr("127.0.0.1");
        if std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// The TSIG key the zones accept updates from.
pub const KEY_NAME: &str = "acme-update.";
/// Its secret, base64 (32 bytes).
pub const SECRET: &str = "c25pLXJvdXRlciB0ZXN0IGtleSBmb3IgRE5TLTAxIQ==";

pub struct Knot {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
}

/// A zone: its name, whether the key may update it, and records besides
/// the SOA and NS (zone-file lines, relative to the zone).
#[derive(Default)]
pub struct Zone<'a> {
    pub name: &'a str,
    pub updatable: bool,
    pub records: &'a str,
    /// Answers no query from 127.0.0.1 (the routers), only from
    /// `OBSERVER`: an update is taken but never seen, as behind a primary
    /// whose secondaries do not catch up.
    pub hidden: bool,
}

/// The address the tests query from; every zone answers it.
pub const OBSERVER: &str = "127.0.0.9";

impl Knot {
    pub async fn start(zones: &[Zone<'_>]) -> Knot {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_tcp_and_udp();
        let root = dir.path().display();
        let mut config = format!(
            "server:\n  rundir: \"{root}\"\n  listen: {ip}@{port}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: \"{root}\"\n\
             log:\n  - target: {root}/knot.log\n    any: info\n\
             key:\n  - id: {KEY_NAME}\n    algorithm: hmac-sha256\n    secret: {SECRET}\n\
             acl:\n  - id: acme\n    key: {KEY_NAME}\n    action: update\n    update-type: [TXT]\n    update-owner: name\n    update-owner-match: sub-or-equal\n    update-owner-name: [_acme-challenge, acme]\n\
             mod-queryacl:\n  - id: observer\n    address: [{OBSERVER}]\n\
             template:\n  - id: default\n    storage: \"{root}\"\n    file: \"%s.zone\"\n    zonefile-sync: -1\n    semantic-checks: off\n\
             zone:\n",
            ip = addr.ip(),
            port = addr.port(),
        );
        for zone in zones {
            config.push_str(&format!("  - domain: {}\n", zone.name));
            if zone.updatable {
                config.push_str("    acl: acme\n");
            }
            if zone.hidden {
                config.push_str("    module: mod-queryacl/observer\n");
            }
            let file = format!(
                "$ORIGIN {name}.\n$TTL 60\n@ SOA ns.{name}. hostmaster.{name}. 1 3600 600 86400 60\n@ NS ns.{name}.\nns A 127.0.0.1\n{}\n",
                zone.records,
                name = zone.name
            );
            std::fs::write(dir.path().join(format!("{}.zone", zone.name)), file)
                .expect("zone file");
        }
        let conf = dir.path().join("knot.conf");
        std::fs::write(&conf, config).expect("knot.conf");
        let child = Command::new("knotd")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("knotd.stderr")).expect("stderr file"))
            .spawn()
            .expect("start knotd");
        let knot = Knot { dir, addr, child };
        let first = zones.first().map_or("", |z| z.name).to_string();
        let up = wait_until(|| async { knot.answers(&first, "SOA").await.is_some() }).await;
        assert!(up, "knotd did not answer:\n{}", knot.log());
        knot
    }

    /// What the server answers for `name` `kind` (`+short`), over TCP;
    /// `None` when it does not answer at all.
    pub async fn answers(&self, name: &str, kind: &str) -> Option<Vec<String>> {
        let (ok, out) = sh(format!(
            "timeout 5 kdig +tcp +short +time=2 +retry=0 -b {OBSERVER} @{} -p {} {name} {kind}",
            self.addr.ip(),
            self.addr.port()
        ))
        .await;
        (ok && !out.contains(";;")).then(|| out.lines().map(str::to_string).collect())
    }

    /// The TXT values at `name`.
    pub async fn txt(&self, name: &str) -> Vec<String> {
        self.answers(name, "TXT")
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.starts_with('"'))
            .collect()
    }

    /// Writes `secret` (base64) to a file of mode 0600 in `dir`.
    pub fn secret_file(dir: &Path, secret: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("tsig.secret");
        std::fs::write(&path, format!("{secret}\n")).expect("secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// The router's `[dns01]` section for this server, with its secret in
    /// `dir`; `extra` may set its own `propagation_timeout`.
    pub fn section(&self, dir: &Path, secret: &str, extra: &str) -> String {
        let timeout = if extra.contains("propagation_timeout") {
            ""
        } else {
            "propagation_timeout = \"10s\"\n"
        };
        format!(
            "[dns01]\nserver = \"{}\"\ntsig_key = \"{KEY_NAME}\"\ntsig_secret_file = \"{}\"\n{timeout}{extra}",
            self.addr,
            Knot::secret_file(dir, secret).display()
        )
    }

    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("knotd.stderr"), read("knot.log"))
    }
}

/// A recursive resolver in front of Knot (Unbound), as a CA has: it
/// follows a CNAME into another zone with a query of its own, which an
/// authoritative server does not. Nothing is cached.
pub struct Resolver {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
}

impl Resolver {
    pub async fn start(knot: SocketAddr) -> Resolver {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_tcp_and_udp();
        let root = dir.path().display();
        let config = format!(
            "server:\n  interface: {ip}@{port}\n  port: {port}\n  do-not-query-localhost: no\n  access-control: 127.0.0.0/8 allow\n\
             \x20 username: \"\"\n  chroot: \"\"\n  directory: \"{root}\"\n  pidfile: \"{root}/unbound.pid\"\n  use-syslog: no\n\
             \x20 logfile: \"{root}/unbound.log\"\n  verbosity: 1\n  cache-max-ttl: 0\n  cache-max-negative-ttl: 0\n\
             \x20 domain-insecure: \"test\"\n  module-config: \"iterator\"\n  do-ip6: no\n  local-zone: \"test.\" nodefault\n\
             stub-zone:\n  name: \"test\"\n  stub-addr: {kip}@{kport}\n",
            ip = addr.ip(),
            port = addr.port(),
            kip = knot.ip(),
            kport = knot.port(),
        );
        let conf = dir.path().join("unbound.conf");
        std::fs::write(&conf, config).expect("unbound.conf");
        let child = Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr"))
            .spawn()
            .expect("start unbound");
        let resolver = Resolver { dir, addr, child };
        let up = wait_until(|| async {
            sh(format!(
                "timeout 5 kdig +short +time=1 +retry=0 @{} -p {} ns.wild.test A",
                addr.ip(),
                addr.port()
            ))
            .await
            .1
            .contains("127.0.0.1")
        })
        .await;
        let read =
            |f: &str| std::fs::read_to_string(resolver.dir.path().join(f)).unwrap_or_default();
        assert!(
            up,
            "unbound did not answer:\n{}{}",
            read("stderr"),
            read("unbound.log")
        );
        resolver
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

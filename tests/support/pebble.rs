//! A real ACME CA for tests: Pebble, with pebble-challtestsrv as its DNS so
//! test names resolve to the 127.0.0.x we choose. Both are killed on drop.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sni_router::certs::store::Source;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Router, TestCa, WAIT, free_addr, sh};

pub struct Pebble {
    pub dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory: String,
    /// Trust for Pebble's own HTTPS (the `ca_file` of our ACME config).
    pub ca_file: PathBuf,
    /// Where Pebble's validator connects for HTTP-01 on every address.
    pub http_port: u16,
    pub listen: SocketAddr,
    management: SocketAddr,
    dns_management: SocketAddr,
    pebble: Option<Child>,
    challtest: Child,
    config_file: PathBuf,
}

#[derive(Default)]
pub struct Options {
    /// Seconds each certificate is valid (`certificateValidityPeriod`).
    pub validity: Option<u64>,
    /// Require external account binding with these (kid, base64url HMAC key).
    pub eab: Option<(String, String)>,
    /// Pebble's DNS (for DNS-01 lookups) instead of pebble-challtestsrv.
    pub dns_server: Option<SocketAddr>,
}

impl Pebble {
    pub async fn start(options: Options) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
        let cert = dir.path().join("pebble.crt");
        let key = dir.path().join("pebble.key");
        std::fs::write(&cert, &leaf.chain_pem).expect("write cert");
        std::fs::write(&key, &leaf.key_pem).expect("write key");
        let ca_file = dir.path().join("pebble-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write ca");

        let dns = free_udp("127.0.0.1");
        let dns_management = free_addr("127.0.0.1");
        let challtest = Command::new("pebble-challtestsrv")
            .args([
                "-management",
                &dns_management.to_string(),
                "-dns01",
                &dns.to_string(),
            ])
            .args([
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble-challtestsrv");

        let listen = free_addr("127.0.0.1");
        let management = free_addr("127.0.0.1");
        let http_port = free_addr("127.0.0.2").port();
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": free_addr("127.0.0.1").port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": options.eab.is_some(),
            }
        });
        if let Some(validity) = options.validity {
            config["pebble"]["certificateValidityPeriod"] = validity.into();
        }
        if let Some((kid, key)) = &options.eab {
            config["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).expect("write pebble config");
        let mut pebble = Pebble {
            directory: format!("https://{listen}/dir"),
            dir,
            ca_file,
            http_port,
            listen,
            management,
            dns_management,
            pebble: None,
            challtest,
            config_file,
        };
        pebble.dns_ready(options.dns_server.unwrap_or(dns)).await;
        pebble.resume().await;
        pebble
    }

    fn spawn_pebble(&self) -> Child {
        let dns = self.dns_server();
        // Appended: a resumed Pebble keeps the paused one's lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("pebble.log"))
            .expect("log");
        Command::new("pebble")
            .args([
                "-config",
                &self.config_file.display().to_string(),
                "-dnsserver",
                &dns,
            ])
            // Validate at once, every time, and accept every nonce: the tests
            // are about the router, not Pebble's chaos.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            // Pebble logs what it creates (accounts, orders) on stdout.
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pebble")
    }

    fn dns_server(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dns")).unwrap_or_default()
    }

    async fn dns_ready(&mut self, dns: SocketAddr) {
        std::fs::write(self.dir.path().join("dns"), dns.to_string()).expect("write dns");
        super::wait_listening(self.dns_management).await;
    }

    /// Starts (again) the CA process and waits until it listens.
    pub async fn resume(&mut self) {
        if self.pebble.is_none() {
            self.pebble = Some(self.spawn_pebble());
        }
        super::wait_listening(self.listen).await;
    }

    /// Stops the CA process: the "CA down" case.
    pub fn pause(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Points `host` at `ip` in Pebble's DNS.
    pub async fn add_a(&self, host: &str, ip: &str) {
        let body = serde_json::json!({ "host": format!("{host}."), "addresses": [ip] }).to_string();
        let request = format!(
            "POST /add-a HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = TcpStream::connect(self.dns_management)
            .await
            .expect("challtestsrv");
        stream.write_all(request.as_bytes()).await.expect("add-a");
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .expect("add-a timeout")
            .ok();
        assert!(response.starts_with("HTTP/1.1 200"), "add-a: {response}");
    }

    /// A GET over Pebble's own HTTPS, trusting its `ca_file`.
    async fn get(&self, url: &str) -> (bool, String) {
        let ca_file = self.ca_file.display();
        sh(format!("curl -sS --max-time 10 --cacert {ca_file} {url}")).await
    }

    /// The root that signs issued certificates (PEM).
    pub async fn issuing_root(&self) -> String {
        let (ok, out) = self
            .get(&format!("https://{}/roots/0", self.management))
            .await;
        assert!(ok && out.contains("BEGIN CERTIFICATE"), "roots: {out}");
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The `[acme]` section of a router that orders from this CA.
    pub fn acme_section(&self, state_dir: &Path, extra: &str) -> String {
        let ca_file = format!("ca_file = \"{}\"\n", self.ca_file.display());
        self.acme_section_trusting_the_system(state_dir, &format!("{ca_file}{extra}"))
    }

    /// The same without `ca_file`: the router trusts the system's roots.
    pub fn acme_section_trusting_the_system(&self, state_dir: &Path, extra: &str) -> String {
        format!(
            "[acme]\ndirectory = \"{}\"\nstate_dir = \"{}\"\ncontact = [\"mailto:ops@example.test\"]\nretry_min = \"1s\"\n{extra}",
            self.directory,
            state_dir.display(),
        )
    }

    /// A client that trusts only what this CA issues.
    pub async fn client(&self) -> Arc<rustls::ClientConfig> {
        let root = self.issuing_root().await;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Whether this Pebble serves renewal information (ARI: Pebble 2.6 on).
    /// Outside CI an older one skips the test; in CI it fails, since
    /// `scripts/test` fetches a newer one.
    pub async fn serves_ari(&self) -> bool {
        let (ok, out) = self.get(&self.directory).await;
        assert!(ok, "directory: {out}");
        let found = out.contains("renewalInfo");
        if !found && std::env::var_os("CI").is_some() {
            panic!("this Pebble has no renewalInfo; scripts/test fetches Pebble 2.6");
        }
        found
    }

    /// The account a router keeps in `state_dir`, to act as its owner.
    pub async fn account(&self, state_dir: &Path) -> instant_acme::Account {
        use sni_router::acme::{client, storage};
        let file = storage::load_account(state_dir)
            .expect("account file")
            .expect("an account");
        let http = client::build(
            Some(&self.ca_file),
            client::RetryAfter::default(),
            client::Unanswered::default(),
        )
        .expect("client");
        instant_acme::Account::builder_with_http(http)
            .from_credentials(file.credentials)
            .await
            .expect("account")
    }

    /// Revokes `cert` as its owner.
    pub async fn revoke(&self, state_dir: &Path, cert: &[u8]) {
        let certificate = CertificateDer::from(cert.to_vec());
        self.account(state_dir)
            .await
            .revoke(&instant_acme::RevocationRequest {
                certificate: &certificate,
                reason: None,
            })
            .await
            .expect("revoke");
    }

    /// Orders (and leaves pending) a replacement of `cert` for `name`, as
    /// its owner: the CA then refuses a second order that replaces it.
    pub async fn order_replacement(&self, state_dir: &Path, name: &str, cert: &[u8]) {
        use instant_acme::{CertificateIdentifier, Identifier, NewOrder};
        let certificate = CertificateDer::from(cert.to_vec());
        let id = CertificateIdentifier::try_from(&certificate).expect("ARI id");
        let identifiers = [Identifier::Dns(name.to_string())];
        self.account(state_dir)
            .await
            .new_order(&NewOrder::new(&identifiers).replaces(id))
            .await
            .expect("replacement order");
    }
}

/// Config text for a site held by `holders` (quoted node names).
/// Polls until `router` serves an ACME certificate for `site` other than
/// `not` (bounded).
pub async fn wait_acme(router: &Router, site: &str, not: Option<&[u8]>) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(entry) = router.handle.shared.certs.get(site)
            && entry.source == Source::Acme
        {
            let der = entry.loaded.key.cert[0].to_vec();
            if not != Some(der.as_slice()) {
                return der;
            }
        }
        assert!(Instant::now() < deadline, "no ACME certificate for {site}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.pause();
        let _ = self.challtest.kill();
        let _ = self.challtest.wait();
    }
}

fn free_udp(ip: &str) -> SocketAddr {
    super::fresh(|| {
        let socket = std::net::UdpSocket::bind((ip, 0)).expect("bind udp");
        socket.local_addr().expect("udp addr")
    })
}

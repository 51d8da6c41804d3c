//! Certificates by ACME against a real CA (Pebble), three nodes on
//! 127.0.0.2/.3/.4 whose names' DNS points at nodes that do not hold them.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use support::pebble::{Options, Pebble, wait_acme};
use support::*;

const NODES: [(&str, &str); 3] = [("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")];

/// Node addresses: fresh TLS ports, HTTP on Pebble's validation port.
fn addresses(pebble: &Pebble) -> Vec<(&'static str, SocketAddr, SocketAddr)> {
    NODES
        .iter()
        .map(|(name, ip)| {
            (
                *name,
                free_addr(ip),
                SocketAddr::new(ip.parse().unwrap(), pebble.http_port),
            )
        })
        .collect()
}

/// Config for node a alone, holding `site` by ACME with its state in
/// `state`; `site`'s DNS points at a.
async fn holder_a(pebble: &Pebble, state: &Path, site: &str) -> String {
    pebble.add_a(site, "127.0.0.2").await;
    fleet_toml_http(
        "a",
        &addresses(pebble)[..1],
        &pebble.acme_section(state, ""),
        &held_site(&[site], &["a"], NOWHERE, ""),
    )
}

#[tokio::test]
async fn every_holder_gets_its_own_certificate_while_dns_points_elsewhere() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = addresses(&pebble);
    let sites = format!(
        "{}{}",
        held_site(&["one.test"], &["a"], NOWHERE, ""),
        held_site(&["two.test"], &["b", "c"], NOWHERE, "")
    );
    pebble.add_a("one.test", "127.0.0.3").await;
    pebble.add_a("two.test", "127.0.0.2").await;
    let mut routers = Vec::new();
    for (name, _, _) in &nodes {
        let top = pebble.acme_section(&dir.path().join(name), "");
        routers.push(Router::start(&fleet_toml_http(name, &nodes, &top, &sites)).await);
    }
    let one = wait_acme(&routers[0], "one.test", None).await;
    let two_b = wait_acme(&routers[1], "two.test", None).await;
    let two_c = wait_acme(&routers[2], "two.test", None).await;
    assert_ne!(two_b, two_c, "each holder orders its own");
    assert!(
        routers[0].handle.shared.certs.get("two.test").is_none(),
        "a does not hold two.test"
    );

    let client = pebble.client().await;
    for (router, name, expected) in [
        (&routers[0], "one.test", &one),
        (&routers[1], "two.test", &two_b),
        (&routers[2], "two.test", &two_c),
        (&routers[2], "one.test", &one),
    ] {
        let (tls, _) = tls_connect(router.addr(), client.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("{name} via {}: {e}", router.addr()));
        assert_eq!(&peer_leaf(&tls), expected, "{name} via {}", router.addr());
    }
    // A node that does not hold two.test reaches a holder with a valid one.
    let (tls, _) = tls_connect(routers[0].addr(), client, "two.test")
        .await
        .unwrap();
    let leaf = peer_leaf(&tls);
    assert!(leaf == two_b || leaf == two_c);
    let state = dir.path().join("a");
    assert!(state.join("account.json").exists() && state.join("sites/one.test/key.pem").exists());
}

#[tokio::test]
async fn a_restart_reuses_the_stored_certificate() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = holder_a(&pebble, dir.path(), "keep.test").await;
    let router = Router::start(&toml).await;
    let first = wait_acme(&router, "keep.test", None).await;
    router.stop().await;

    let router = Router::start(&toml).await;
    // Live before the router accepts anything: a node that alone holds a
    // site serves it from its first connection after a restart.
    let entry = router.handle.shared.certs.get("keep.test");
    assert!(entry.is_some(), "the stored certificate is live at bind");
    let again = wait_acme(&router, "keep.test", None).await;
    assert_eq!(again, first, "same certificate after restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(router.handle.shared.acme.issued(), 0, "no new order");
}

#[tokio::test]
async fn short_lived_certificates_renew_before_expiry() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options {
        validity: Some(90),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = addresses(&pebble);
    pebble.add_a("short.test", "127.0.0.4").await;
    // c runs too (the name's DNS points at it) but does not hold the name.
    let mut routers = Vec::new();
    for (name, _, _) in &nodes {
        let top = pebble.acme_section(&dir.path().join(name), "");
        routers.push(
            Router::start(&fleet_toml_http(
                name,
                &nodes,
                &top,
                &held_site(&["short.test"], &["a", "b"], NOWHERE, ""),
            ))
            .await,
        );
    }
    let _c = routers.pop();
    let client = pebble.client().await;
    let mut firsts = Vec::new();
    for router in &routers {
        firsts.push(wait_acme(router, "short.test", None).await);
    }
    // Clients keep connecting through the first certificates' lifetime and
    // beyond; every handshake verifies, so none saw an expired certificate.
    let deadline = Instant::now() + Duration::from_secs(100);
    let mut renewed = [false, false];
    while Instant::now() < deadline && renewed != [true, true] {
        for (i, router) in routers.iter().enumerate() {
            let (tls, _) = tls_connect(router.addr(), client.clone(), "short.test")
                .await
                .unwrap_or_else(|e| panic!("handshake with {} failed: {e}", router.addr()));
            let leaf = peer_leaf(&tls);
            let info = sni_router::certs::disk::describe(&leaf.clone().into()).unwrap();
            assert!(
                info.valid_at(SystemTime::now()),
                "served an expired certificate"
            );
            renewed[i] |= leaf != firsts[i];
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        renewed,
        [true, true],
        "both holders renewed within the lifetime"
    );
    for router in &routers {
        let issued = router.handle.shared.acme.issued();
        assert!(
            (2..=3).contains(&issued),
            "renewed on schedule, not in a loop: {issued}"
        );
    }
}

#[tokio::test]
async fn a_down_or_refusing_ca_backs_off_while_peers_serve() {
    if !have("pebble") {
        return;
    }
    let ca = TestCa::new();
    let mut down = Pebble::start(Options::default()).await;
    let refusing = Pebble::start(Options {
        eab: Some((
            "kid-1".into(),
            "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W".into(),
        )),
        ..Options::default()
    })
    .await;
    down.pause();
    let dir = tempfile::tempdir().unwrap();
    let peer_files = ca.leaf(&["down.test"]).write(dir.path(), "peer");
    for (pebble, extra) in [
        (&down, String::new()),
        (
            &refusing,
            "eab = { kid = \"kid-1\", hmac_key = \"d3Jvbmcta2V5LXdyb25nLWtleQ\" }\n".to_string(),
        ),
    ] {
        let nodes = addresses(pebble);
        // a manages down.test by ACME; b holds it too, from files.
        let site_a = held_site(&["down.test"], &["a", "b"], NOWHERE, "");
        let site_b = format!(
            "{}{peer_files}",
            held_site(&["down.test"], &["a", "b"], NOWHERE, "")
        );
        let state = tempfile::tempdir().unwrap();
        let a = Router::start(&fleet_toml_http(
            "a",
            &nodes,
            &pebble.acme_section(state.path(), &extra),
            &site_a,
        ))
        .await;
        let _b = Router::start(&fleet_toml_http("b", &nodes, "", &site_b)).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let failed = a.handle.shared.acme.failed();
        assert!(
            (2..=4).contains(&failed),
            "backoff, not a tight loop: {failed} failures in 4 s"
        );
        assert!(a.handle.shared.certs.get("down.test").is_none());
        let (tls, _) = tls_connect(a.addr(), ca.client_config(&[], true), "down.test")
            .await
            .unwrap();
        assert!(!peer_leaf(&tls).is_empty(), "served through the peer");
        assert!(a.handle.shared.stats.fallbacks.load(Ordering::Relaxed) >= 1);
    }
}

#[tokio::test]
async fn a_shared_account_issues_without_forwarding() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // One account, created once and copied to every node's state_dir.
    let builder = instant_acme::Account::builder_with_root(&pebble.ca_file).unwrap();
    let new = instant_acme::NewAccount {
        contact: &[],
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = builder
        .create(&new, pebble.directory.clone(), None)
        .await
        .unwrap();
    let file = sni_router::acme::storage::AccountFile {
        directory: pebble.directory.clone(),
        thumbprint: account.key_thumbprint().to_string(),
        credentials,
    };
    for (name, _) in NODES {
        sni_router::acme::storage::save_account(&dir.path().join(name), &file).unwrap();
    }
    let nodes = addresses(&pebble);
    let sites = format!(
        "{}{}",
        held_site(&["sa.test"], &["a"], NOWHERE, ""),
        held_site(&["sb.test"], &["b"], NOWHERE, "")
    );
    pebble.add_a("sa.test", "127.0.0.3").await;
    pebble.add_a("sb.test", "127.0.0.4").await;
    let mut routers = Vec::new();
    for (name, _, _) in &nodes {
        let top = format!(
            "[http]\nforward = false\n{}",
            pebble.acme_section(&dir.path().join(name), "shared_account = true\n")
        );
        routers.push(Router::start(&fleet_toml_http(name, &nodes, &top, &sites)).await);
    }
    wait_acme(&routers[0], "sa.test", None).await;
    wait_acme(&routers[1], "sb.test", None).await;
    let forwarded: u64 = routers.iter().map(|r| r.http_forwarded()).sum();
    assert_eq!(
        forwarded, 0,
        "every node answered from the shared thumbprint"
    );
}

/// nginx in front of a CA that is down for maintenance: every request gets
/// 503 and `Retry-After`, as Let's Encrypt's maintenance answers do. Killed
/// on drop.
struct Maintenance {
    child: std::process::Child,
    directory: String,
    access_log: std::path::PathBuf,
    /// Access-log lines of the readiness probes.
    probes: usize,
}

impl Maintenance {
    async fn start(dir: &Path, ca: &TestCa, retry_after_secs: u64) -> Maintenance {
        ca.leaf(&["127.0.0.1"]).write(dir, "ca-site");
        let (cert, key) = (dir.join("ca-site.crt"), dir.join("ca-site.key"));
        let addr = free_addr("127.0.0.1");
        let access_log = dir.join("access.log");
        let d = dir.display();
        let conf = format!(
            "daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{\n\
               access_log {access};\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen {addr} ssl;\n\
                 ssl_certificate {cert}; ssl_certificate_key {key};\n\
                 location / {{ add_header Retry-After {retry_after_secs} always; return 503; }}\n\
               }}\n\
             }}\n",
            access = access_log.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .spawn()
            .expect("start nginx");
        support::process::wait_listening(addr).await;
        let mut maintenance = Maintenance {
            child,
            directory: format!("https://{addr}/directory"),
            access_log,
            probes: 0,
        };
        // Listening is not answering: one CI run's first order met
        // "connection refused" after the port had accepted a connect.
        let probe = format!(
            "curl -sk --max-time 2 -o /dev/null -w '%{{http_code}}' {}",
            maintenance.directory
        );
        let deadline = Instant::now() + WAIT;
        while sh(probe.clone()).await.1 != "503" {
            assert!(Instant::now() < deadline, "nginx never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        maintenance.probes = maintenance.logged();
        maintenance
    }

    fn logged(&self) -> usize {
        std::fs::read_to_string(&self.access_log)
            .map(|log| log.lines().count())
            .unwrap_or(0)
    }

    /// Requests since the server answered its own probe.
    fn requests(&self) -> usize {
        self.logged() - self.probes
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_ca_that_asks_to_retry_later_is_not_asked_sooner() {
    if !have("nginx") || !have("curl") {
        return;
    }
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let maintenance = Maintenance::start(dir.path(), &ca, 3600).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let state = tempfile::tempdir().unwrap();
    // retry_min = 1s: without the CA's wish, 2-4 attempts in 4 s (see above).
    let acme = format!(
        "[acme]\ndirectory = \"{}\"\nstate_dir = \"{}\"\nca_file = \"{}\"\nretry_min = \"1s\"\n",
        maintenance.directory,
        state.path().display(),
        ca_file.display()
    );
    let node = free_addr("127.0.0.2");
    let a = Router::start(&fleet_toml(
        "a",
        &[("a", node)],
        &acme,
        &held_site(&["later.test"], &["a"], NOWHERE, ""),
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failed = a.handle.shared.acme.failed();
    assert_eq!(failed, 1, "one refused attempt, then an hour's wait");
    assert_eq!(maintenance.requests(), 1, "the CA was asked once");
}

/// Without `ca_file` the ACME client trusts the system's roots (the
/// platform verifier); `SSL_CERT_FILE` stands in for a public CA's root.
#[tokio::test]
async fn without_ca_file_the_systems_roots_verify_the_ca() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let nodes = addresses(&pebble);
    pebble.add_a("system.test", "127.0.0.2").await;
    let config = dir.path().join("router.toml");
    let toml = fleet_toml_http(
        "a",
        &nodes[..1],
        &pebble.acme_section_trusting_the_system(&state, ""),
        &held_site(&["system.test"], &["a"], NOWHERE, ""),
    );
    std::fs::write(&config, toml).unwrap();
    // Not trusted yet: the log says why, not just "client error (Connect)".
    let untrusted = support::process::Process::start(&config, dir.path());
    untrusted
        .wait_log("invalid peer certificate: UnknownIssuer", 1)
        .await;
    drop(untrusted);
    let env = [("SSL_CERT_FILE", pebble.ca_file.as_path())];
    let router = support::process::Process::start_with_env(&config, dir.path(), &env);
    let installed = "ACME certificate installed";
    router
        .wait_log_within(installed, 1, Duration::from_secs(60))
        .await;
    let (tls, _) = tls_connect(nodes[0].1, pebble.client().await, "system.test")
        .await
        .unwrap();
    assert!(!peer_leaf(&tls).is_empty());
}

/// A CA that accepts connections and never answers: its first request ends
/// at its 30-s deadline (not the order's 5 minutes), and the other due site
/// waits for the silent site's next try instead of waiting out a deadline
/// of its own.
#[tokio::test]
async fn a_silent_ca_costs_one_deadline_not_one_per_site() {
    let hole = listen_fresh("127.0.0.1").await;
    let directory = format!("https://{}/dir", hole.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            held.push(stream);
        }
    });
    let state = tempfile::tempdir().unwrap();
    let top = format!(
        "[acme]\ndirectory = \"{directory}\"\nstate_dir = \"{}\"\nretry_min = \"1h\"\nretry_max = \"2h\"\n",
        state.path().display()
    );
    let nodes = [("a", free_addr("127.0.0.2"), free_addr("127.0.0.2"))];
    let sites = format!(
        "{}{}",
        held_site(&["one.silent.test"], &["a"], NOWHERE, ""),
        held_site(&["two.silent.test"], &["a"], NOWHERE, "")
    );
    let started = Instant::now();
    let a = Router::start(&fleet_toml_http("a", &nodes, &top, &sites)).await;
    let shared = a.handle.shared.clone();
    let renewals = || shared.acme.renewals();
    let deadline = Instant::now() + Duration::from_secs(45);
    while renewals().len() < 2 {
        assert!(Instant::now() < deadline, "no pass ended in 45 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(29), "{took:?}");
    assert_eq!(shared.acme.failed(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(shared.acme.failed(), 1);
    assert_eq!(accepted.load(Ordering::Relaxed), 1, "one request waited");
    let later = SystemTime::now() + Duration::from_secs(50 * 60);
    for (site, renewal) in renewals() {
        assert!(renewal.at > later, "{site} waits for the next try");
    }
    hole.abort();
}

/// A `state_dir` that takes no file (here a symlink to a volume not
/// mounted, so even root cannot write it, yet nothing is stored there to
/// read): no account is created at the CA, since one that could not be
/// saved would be created again at every retry.
#[tokio::test]
async fn an_unwritable_state_dir_creates_no_account() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::os::unix::fs::symlink(dir.path().join("unmounted/state"), &state).unwrap();
    let toml = holder_a(&pebble, &state, "nostate.test").await;
    let router = Router::start(&toml).await;
    let stats = &router.handle.shared.acme;
    // retry_min is 1 s: a second attempt comes within about 2 s.
    let retried = wait_until(|| async { stats.failed() >= 2 }).await;
    assert!(retried, "no retry");
    assert!(
        !pebble.log().contains("accounts in memory"),
        "an account was created:\n{}",
        pebble.log()
    );
    assert!(router.handle.shared.certs.get("nostate.test").is_none());
}

/// A certificate issued where its site's files cannot be written is served
/// anyway, and not ordered again at every retry: that would spend the CA's
/// limit on duplicate certificates and store nothing either.
#[tokio::test]
async fn a_certificate_that_cannot_be_stored_is_served_and_not_ordered_again() {
    if !have("pebble") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // Where the sites' directories would go.
    std::fs::write(state.join("sites"), "").unwrap();
    let toml = holder_a(&pebble, &state, "unsaved.test").await;
    let router = Router::start(&toml).await;
    wait_acme(&router, "unsaved.test", None).await;
    let (tls, _) = tls_connect(router.addr(), pebble.client().await, "unsaved.test")
        .await
        .expect("served");
    assert!(!peer_leaf(&tls).is_empty());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = &router.handle.shared.acme;
    assert_eq!(stats.issued(), 1);
    assert_eq!(stats.failed(), 0);
    assert!(state.join("account.json").exists(), "the account was saved");
}

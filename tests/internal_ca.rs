//! The internal CA, through the built binary: a root created on first use
//! and kept across restarts, leaves that curl verifies against it
//! (wildcards included), a root shared by copying, renewal, and an
//! operator's own CA.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::{Process, wait_listening};
use support::*;

/// A node's config with the internal CA's sites; returns its path and TLS address.
fn node(dir: &Path, ip: &str, top: &str, upstream: SocketAddr) -> (PathBuf, SocketAddr) {
    let tls = free_addr(ip);
    let sites = held_site(&["app.localhost", "*.app.localhost"], &["a"], upstream, "")
        + &held_site(
            &["lab.internal"],
            &["a"],
            upstream,
            "issuer = \"internal\"\n",
        );
    let config = dir.join("router.toml");
    std::fs::write(&config, fleet_toml("a", &[("a", tls)], top, &sites)).unwrap();
    (config, tls)
}

/// Starts the router and waits until it accepts: its sockets listen before
/// its certificates are loaded, and connections wait in the queue.
async fn start(config: &Path, dir: &Path, tls: SocketAddr) -> Process {
    let router = Process::start(config, dir);
    wait_listening(tls).await;
    router.wait_log("listening addr=", 1).await;
    router
}

/// `curl` for `name` at `addr`, trusting only `root`; the body, or why not.
async fn curl(root: &Path, name: &str, addr: SocketAddr) -> Result<String, String> {
    let (ok, out) = curl_https(root, name, addr).await;
    if ok && out.contains("upstream saw") {
        Ok(out)
    } else {
        Err(out)
    }
}

/// The serial of the leaf `addr` serves for `name`.
async fn served_serial(name: &str, addr: SocketAddr) -> String {
    let (_, out) = sh(format!(
        "timeout 10 openssl s_client -connect {addr} -servername {name} </dev/null 2>/dev/null \
         | openssl x509 -noout -serial"
    ))
    .await;
    out.trim().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn a_fresh_state_dir_gets_a_root_kept_across_restarts_and_leaves_curl_verifies() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = Backend::http("127.0.0.1").await;
    let state = dir.path().join("state");
    let top = format!("state_dir = \"{}\"\n", state.display());
    let (config, tls) = node(dir.path(), "127.0.0.2", &top, upstream.addr);
    let mut router = start(&config, dir.path(), tls).await;

    let root = state.join("ca/root.pem");
    let key = state.join("ca/root.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the CA key is private");
    for name in ["app.localhost", "x.app.localhost", "lab.internal"] {
        curl(&root, name, tls)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The fingerprint logged is the one openssl computes.
    let (_, openssl) = sh(format!(
        "openssl x509 -noout -fingerprint -sha256 -in {}",
        root.display()
    ))
    .await;
    let fingerprint = openssl.trim().rsplit('=').next().unwrap().to_string();
    let log = router.log();
    assert!(log.contains(&format!("sha256={fingerprint}")), "{log}");
    assert!(log.contains(&root.display().to_string()), "{log}");

    // A restart keeps the root, its key and the leaves.
    let before = (
        read(&root),
        read(&key),
        read(&state.join("internal/app.localhost/chain.pem")),
    );
    let serial = served_serial("app.localhost", tls).await;
    router.stop();
    let router = start(&config, dir.path(), tls).await;
    let after = (
        read(&root),
        read(&key),
        read(&state.join("internal/app.localhost/chain.pem")),
    );
    assert!(before == after, "the CA and its leaf survive a restart");
    assert_eq!(served_serial("app.localhost", tls).await, serial);
    assert!(!router.log().contains("leaf issued"), "{}", router.log());
    curl(&root, "y.app.localhost", tls).await.unwrap();
}

#[tokio::test]
async fn nodes_sharing_a_copied_ca_serve_their_own_leaves_of_the_same_root() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let upstream = Backend::http("127.0.0.1").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let top = |d: &Path| format!("state_dir = \"{}\"\n", d.join("state").display());
    let (config_a, tls_a) = node(dir_a.path(), "127.0.0.2", &top(dir_a.path()), upstream.addr);
    let _a = start(&config_a, dir_a.path(), tls_a).await;
    let ca_b = dir_b.path().join("state/ca");
    std::fs::create_dir_all(&ca_b).unwrap();
    for file in ["root.pem", "root.key"] {
        std::fs::copy(dir_a.path().join("state/ca").join(file), ca_b.join(file)).unwrap();
    }
    let (config_b, tls_b) = node(dir_b.path(), "127.0.0.3", &top(dir_b.path()), upstream.addr);
    let _b = start(&config_b, dir_b.path(), tls_b).await;

    let root = dir_a.path().join("state/ca/root.pem");
    for tls in [tls_a, tls_b] {
        curl(&root, "x.app.localhost", tls).await.unwrap();
    }
    let leaf_key = |d: &Path| read(&d.join("state/internal/app.localhost/key.pem"));
    assert_ne!(
        leaf_key(dir_a.path()),
        leaf_key(dir_b.path()),
        "each node its own key"
    );
    assert_ne!(
        served_serial("app.localhost", tls_a).await,
        served_serial("app.localhost", tls_b).await
    );
}

#[tokio::test]
async fn a_leaf_renews_with_a_third_of_its_lifetime_left() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = Backend::http("127.0.0.1").await;
    let state = dir.path().join("state");
    let top = format!(
        "state_dir = \"{}\"\n[internal_ca]\nlifetime = \"6s\"\n",
        state.display()
    );
    let (config, tls) = node(dir.path(), "127.0.0.2", &top, upstream.addr);
    let router = start(&config, dir.path(), tls).await;
    let first = served_serial("app.localhost", tls).await;
    assert!(first.starts_with("serial="), "{first}");
    // Issued at start, due 4 s later; a second leaf within the bound.
    router
        .wait_log_within(
            "leaf issued site=\"app.localhost\"",
            2,
            Duration::from_secs(10),
        )
        .await;
    let second = served_serial("app.localhost", tls).await;
    assert_ne!(first, second, "the renewed leaf is served");
    // Renewed when due, not again at once.
    let issued = router
        .log()
        .matches("leaf issued site=\"app.localhost\"")
        .count();
    assert!(
        issued <= 3,
        "{issued} leaves in some 5 s:\n{}",
        router.log()
    );
    curl(&state.join("ca/root.pem"), "app.localhost", tls)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_operator_ca_issues_and_a_half_present_root_is_never_overwritten() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = Backend::http("127.0.0.1").await;
    let (ca, ca_key) = (dir.path().join("corp.pem"), dir.path().join("corp.key"));
    let (ok, out) = sh(format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
         -subj /CN=corp-ca -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign -keyout {} -out {}",
        ca_key.display(),
        ca.display()
    ))
    .await;
    assert!(ok, "{out}");
    let state = dir.path().join("state");
    let top = format!(
        "state_dir = \"{}\"\n[internal_ca]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        state.display(),
        ca.display(),
        ca_key.display()
    );
    let (config, tls) = node(dir.path(), "127.0.0.2", &top, upstream.addr);
    let router = start(&config, dir.path(), tls).await;
    curl(&ca, "x.app.localhost", tls).await.unwrap();
    assert!(!state.join("ca").exists(), "no root of its own");
    drop(router);

    // A root without its key: reported, left as it is, and no leaf served.
    let other = tempfile::tempdir().unwrap();
    let state = other.path().join("state");
    std::fs::create_dir_all(state.join("ca")).unwrap();
    std::fs::write(state.join("ca/root.pem"), "kept\n").unwrap();
    let top = format!("state_dir = \"{}\"\n", state.display());
    let (config, tls) = node(other.path(), "127.0.0.3", &top, upstream.addr);
    let mut router = start(&config, other.path(), tls).await;
    router.wait_log("exists without", 1).await;
    assert_eq!(read(&state.join("ca/root.pem")), "kept\n");
    assert!(!state.join("ca/root.key").exists());
    assert!(router.alive(), "the router serves on without the CA");
}

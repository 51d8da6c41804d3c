//! The Debian package (built by `scripts/package`, which `scripts/test`
//! runs first): lintian's verdict, then its life in the Debian root the
//! systemd tests boot: installed with `dpkg -i`, started by systemd,
//! serving a route, upgraded in place by a newer build, removed, purged.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::container::{Container, root};
use support::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-tools/sdroot");
const DEBS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/debs");

/// The package of `version` (e.g. `0.1.0-1`), if built.
fn deb(version: &str) -> Option<PathBuf> {
    let path = Path::new(DEBS).join(format!("sni-router_{version}_amd64.deb"));
    path.exists().then_some(path)
}

/// Both builds, or, outside CI, `None` when `scripts/package` has not run.
fn builds() -> Option<(PathBuf, PathBuf)> {
    match (deb("0.1.0-1"), deb("0.1.0-2")) {
        (Some(first), Some(second)) => Some((first, second)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("no packages in {DEBS}: scripts/test builds them with scripts/package")
        }
        _ => None,
    }
}

#[tokio::test]
async fn lintian_passes_the_package() {
    let Some((first, _)) = builds() else { return };
    if !have("lintian") {
        return;
    }
    let symbols = Path::new(DEBS).join("sni-router-dbgsym_0.1.0-1_amd64.ddeb");
    let (ok, out) = sh(format!(
        "lintian --fail-on error,warning {} {} 2>&1",
        first.display(),
        symbols.display()
    ))
    .await;
    assert!(ok, "lintian:\n{out}");
    // Stripped, with its symbols in the -dbgsym package under its build id.
    let (_, file) = sh(format!(
        "dpkg-deb --fsys-tarfile {} | tar -xO ./usr/bin/sni-router | file -",
        first.display()
    ))
    .await;
    assert!(
        file.contains("stripped") && !file.contains("not stripped"),
        "{file}"
    );
    let id = file
        .split("BuildID[sha1]=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no build id: {file}"));
    let (_, listed) = sh(format!("dpkg-deb -c {}", symbols.display())).await;
    let debug_file = format!("./usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    assert!(
        listed.contains(&debug_file),
        "{debug_file} not in:\n{listed}"
    );
}

/// A command in the container that must succeed; its output.
fn must(container: &Container, args: &[&str]) -> String {
    let (ok, out) = container.run(args);
    assert!(ok, "{args:?} failed:\n{out}");
    out
}

fn main_pid(container: &Container) -> String {
    must(
        container,
        &["systemctl", "show", "-P", "MainPID", "sni-router"],
    )
    .trim()
    .to_string()
}

/// Asks the router on the container's port 443 for `app.localhost`,
/// trusting the internal CA the installed router made.
async fn served(container: &Container, dir: &Path) -> Result<String, String> {
    // The reload that asks for the CA returns before the router has made
    // it: until then there is no root to trust, which is "not yet".
    let (made, root) = container.run(&["cat", "/var/lib/sni-router/ca/root.pem"]);
    if !made {
        return Err(root);
    }
    let file = dir.join("root.pem");
    std::fs::write(&file, root).unwrap();
    let port_443 = "127.0.0.1:443".parse().unwrap();
    let curl = curl_https_command(&file, "app.localhost", port_443);
    let (ok, out) = sh(container.in_network(&curl)).await;
    if ok && out.contains("upstream saw") {
        Ok(out)
    } else {
        Err(out)
    }
}

#[tokio::test]
async fn the_package_installs_serves_upgrades_in_place_and_purges() {
    let Some((first, second)) = builds() else {
        return;
    };
    if !root() || !have("systemd-nspawn") || !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The host's own 443, 80 and 9100 taken (by a web server, say, or by a
    // client's ephemeral port): the container on its own network must not
    // care. One already taken is as good.
    let _host_ports: Vec<_> = [443, 80, 9100]
        .iter()
        .filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).ok())
        .collect();
    let log = dir.path().join("container.log");
    let binds = [(Path::new(DEBS), "/srv/debs")];
    let container = Container::boot_writable(Path::new(ROOT), &binds, "basic.target", &log).await;
    let booted =
        wait_until(|| async { container.run(&["systemctl", "is-system-running"]).0 }).await;
    let _ = booted; // "degraded" is fine: the minimal root lacks some units.
    let upstream = Backend::http_on(container.listen()).await;
    // The root was built with the user and with empty unit files as mount
    // points for the other tests (which systemd reads as masked): the
    // package must do without both.
    must(&container, &["userdel", "sni-router"]);
    must(
        &container,
        &[
            "rm",
            "-f",
            "/etc/systemd/system/sni-router.service",
            "/etc/systemd/system/sni-router.socket",
        ],
    );
    must(&container, &["systemctl", "daemon-reload"]);

    let name = |p: &Path| format!("/srv/debs/{}", p.file_name().unwrap().to_string_lossy());
    must(&container, &["dpkg", "-i", &name(&first)]);
    let active =
        wait_until(|| async { container.run(&["systemctl", "is-active", "sni-router"]).0 }).await;
    assert!(active, "not started:\n{}", container.journal("sni-router"));
    assert_eq!(
        must(&container, &["systemctl", "is-enabled", "sni-router"]).trim(),
        "enabled"
    );
    must(&container, &["id", "sni-router"]);
    let state = must(&container, &["stat", "-c", "%U %a", "/var/lib/sni-router"]);
    assert_eq!(state.trim(), "sni-router 700");
    let config_dir = must(&container, &["stat", "-c", "%U:%G %a", "/etc/sni-router"]);
    assert_eq!(config_dir.trim(), "root:sni-router 750");
    let journal = container.journal("sni-router");
    assert!(!journal.contains("mode is different"), "{journal}");
    must(
        &container,
        &["test", "-f", "/usr/share/man/man8/sni-router.8.gz"],
    );
    must(
        &container,
        &["test", "-f", "/usr/share/sni-router/dashboard.json"],
    );
    // As shipped it refuses every name: a TLS alert, not a route.
    let (_, refused) = sh(container.in_network(
        "curl -sS --max-time 10 -k --resolve nope.localhost:443:127.0.0.1 https://nope.localhost/",
    ))
    .await;
    assert!(refused.contains("unrecognized name"), "{refused}");

    // The operator's edit: a site terminated with the internal CA.
    let config = format!(
        "this_node = \"edge-a\"\nstate_dir = \"/var/lib/sni-router\"\n\
         [[nodes]]\nname = \"edge-a\"\ntls = \"127.0.0.1:443\"\nhttp = \"127.0.0.1:80\"\n\
         tls_bind = \"0.0.0.0:443\"\nhttp_bind = \"0.0.0.0:80\"\n{}",
        held_site(&["app.localhost"], &["edge-a"], upstream.addr, "")
    );
    let edited = dir.path().join("edited.toml");
    std::fs::write(&edited, &config).unwrap();
    let (ok, out) = sh(format!(
        "nsenter -t {} -a sh -c 'cat > /etc/sni-router/sni-router.toml' < {}",
        container.init(),
        edited.display()
    ))
    .await;
    assert!(ok, "{out}");
    must(&container, &["systemctl", "reload", "sni-router"]);
    let mut last = Err(String::new());
    for _ in 0..50 {
        last = served(&container, dir.path()).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(e) = last {
        panic!(
            "no route after the reload: {e}\n{}",
            container.journal("sni-router")
        );
    }

    // Upgrade: the running router hands over to the new binary (SIGUSR2),
    // keeps the operator's config, and never stops.
    let before = main_pid(&container);
    must(&container, &["dpkg", "-i", &name(&second)]);
    let moved = wait_until(|| async { main_pid(&container) != before }).await;
    assert!(
        moved,
        "no in-place upgrade:\n{}",
        container.journal("sni-router")
    );
    assert_eq!(
        must(&container, &["systemctl", "is-active", "sni-router"]).trim(),
        "active"
    );
    let kept = must(&container, &["cat", "/etc/sni-router/sni-router.toml"]);
    assert_eq!(kept, config, "the conffile kept the operator's edit");
    served(&container, dir.path()).await.unwrap();
    let version = must(
        &container,
        &["dpkg-query", "-W", "-f", "${Version}", "sni-router"],
    );
    assert_eq!(version, "0.1.0-2");

    // Remove keeps /etc and the state; purge takes both.
    must(&container, &["dpkg", "-r", "sni-router"]);
    let stopped =
        wait_until(|| async { !container.run(&["systemctl", "is-active", "sni-router"]).0 }).await;
    assert!(stopped);
    assert!(!container.run(&["test", "-e", "/usr/bin/sni-router"]).0);
    must(
        &container,
        &["test", "-f", "/etc/sni-router/sni-router.toml"],
    );
    must(&container, &["test", "-d", "/var/lib/sni-router/ca"]);
    must(&container, &["dpkg", "-P", "sni-router"]);
    assert!(!container.run(&["test", "-e", "/etc/sni-router"]).0);
    assert!(!container.run(&["test", "-e", "/var/lib/sni-router"]).0);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

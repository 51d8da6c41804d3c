//! The systemd unit shipped in `config/sni-router.service`: it verifies, it
//! is hardened, and its system-call filter lets through every call the
//! router makes while it terminates, splices, hands a quiet pair to the
//! splice engine, answers port 80 and its admin listener, obtains a
//! certificate by ACME, reloads and drains. No systemd runs here, so the
//! router runs under `strace`, and `systemd-analyze` says what the filter
//! allows.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::container::{Container, root};
use support::pebble::{Options, Pebble};
use support::process::{BIN, Process, wait_listening};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const UNIT: &str = include_str!("../config/sni-router.service");
const BINARY_PATH: &str = "/usr/local/bin/sni-router";
const CONFIG_PATH: &str = "/etc/sni-router/sni-router.toml";

/// The unit with this build's binary and `config` in place of the
/// installed paths, so `systemd-analyze verify` finds both.
fn unit_here(dir: &Path, config: &Path) -> PathBuf {
    let text = UNIT
        .replace(BINARY_PATH, BIN)
        .replace(CONFIG_PATH, &config.display().to_string());
    let path = dir.join("sni-router.service");
    std::fs::write(&path, text).unwrap();
    path
}

fn analyze(args: &[&str], unit: &Path) -> (bool, String, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_unit_verifies_and_is_hardened() {
    if !have("systemd-analyze") {
        return;
    }
    assert!(UNIT.contains(BINARY_PATH) && UNIT.contains(CONFIG_PATH));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sni-router.toml");
    std::fs::copy("config/sni-router.toml", &config).unwrap();
    let unit = unit_here(dir.path(), &config);
    let (ok, _, err) = analyze(&["verify", "--man=no"], &unit);
    assert!(ok && err.trim().is_empty(), "verify: {err}");
    let (_, out, err) = analyze(&["security", "--offline=true", "--no-pager"], &unit);
    let exposure: f64 = out
        .lines()
        .find_map(|l| l.split("sni-router.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}{err}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{out}");
    // What ExecStartPre and ExecReload run.
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

/// Every group `systemd-analyze syscall-filter` lists, with its members
/// (system calls and nested `@groups`).
fn filter_groups() -> BTreeMap<String, Vec<String>> {
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .expect("systemd-analyze syscall-filter");
    let mut groups = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.insert(line.trim().to_string(), Vec::new());
        } else if line.is_empty() || !line.starts_with(char::is_whitespace) {
            current = None;
        } else if let Some(group) = &current {
            let item = line.trim();
            if !item.starts_with('#') {
                groups.get_mut(group).unwrap().push(item.to_string());
            }
        }
    }
    groups
}

fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, into: &mut BTreeSet<String>) {
    match groups.get(item) {
        Some(members) => members.iter().for_each(|m| expand(m, groups, into)),
        None => {
            into.insert(item.to_string());
        }
    }
}

/// What the unit's `SystemCallFilter=` lines allow: the allow list, less
/// every `~` line.
fn allowed_by_unit() -> BTreeSet<String> {
    let groups = filter_groups();
    let (mut allow, mut deny) = (BTreeSet::new(), BTreeSet::new());
    for value in UNIT
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (into, items) = match value.strip_prefix('~') {
            Some(rest) => (&mut deny, rest),
            None => (&mut allow, value),
        };
        items
            .split_whitespace()
            .for_each(|item| expand(item, &groups, into));
    }
    assert!(!allow.is_empty(), "the unit sets no SystemCallFilter");
    allow.difference(&deny).cloned().collect()
}

/// The system calls in the summary table that ends `strace -C`'s output.
fn traced_calls(trace: &str) -> BTreeSet<String> {
    let summary = trace.rsplit_once("% time").map_or("", |(_, table)| table);
    summary
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('%') && !l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|name| *name != "total")
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_units_system_call_filter_allows_every_call_the_router_makes() {
    if !have("strace") || !have("systemd-analyze") || !have("pebble") {
        return;
    }
    let allowed = allowed_by_unit();
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let passthrough = Backend::echo("127.0.0.1").await;
    let ip = "127.0.0.6";
    let tls = free_addr(ip);
    let http = SocketAddr::new(ip.parse().unwrap(), pebble.http_port);
    let admin = free_addr("127.0.0.1");
    pebble.add_a("acme.unit.test", ip).await;
    let files = ca.leaf(&["files.unit.test"]).write(dir.path(), "files");
    let sites = format!(
        "{}[[sites]]\nnames = [\"files.unit.test\"]\nheld_by = [\"a\"]\nupstream = \"{}\"\n{files}\
         [[sites]]\nnames = [\"pass.test\"]\npassthrough = \"{}\"\n",
        held_site(&["acme.unit.test"], &["a"], NOWHERE, ""),
        upstream.addr,
        passthrough.addr,
    );
    // A host name for the CA, as in production: the resolver's calls too.
    let top = pebble
        .acme_section(
            &dir.path().join("state"),
            &format!("[admin]\nlisten = \"{admin}\"\n"),
        )
        .replace("https://127.0.0.1:", "https://localhost:");
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        fleet_toml_http("a", &[("a", tls, http)], &top, &sites),
    )
    .unwrap();
    let trace = dir.path().join("strace.txt");
    let mut router = Process::start_traced(&config, dir.path(), &trace);
    wait_listening(tls).await;
    router
        .wait_log_within("ACME certificate installed", 1, Duration::from_secs(60))
        .await;

    let (response, _) = tls_request(tls, ca.client_config(&[], true), "files.unit.test")
        .await
        .expect("terminated");
    assert!(response.contains("upstream saw"), "{response}");

    // Spliced, then quiet long enough to move into the splice engine.
    let mut spliced = TcpStream::connect(tls).await.unwrap();
    let hello = hello_for("pass.test");
    spliced.write_all(&hello).await.unwrap();
    let mut echoed = vec![0; hello.len()];
    tokio::time::timeout(WAIT, spliced.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    // Under strace every call is slow: wait for the hand-over (bounded)
    // rather than for a fixed time.
    let quiet = || async {
        let (_, _, metrics) = http_get(admin, "admin", "/metrics", "").await;
        metric_value(&metrics, "sni_router_connections_quiet")
    };
    assert!(
        wait_until(|| async { quiet().await == 1.0 }).await,
        "the quiet pair never reached the splice engine"
    );
    spliced.write_all(b"ping").await.unwrap();
    let mut pong = [0; 4];
    tokio::time::timeout(WAIT, spliced.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"ping");
    drop(spliced);

    let (status, _, _) = http_get(http, "files.unit.test", "/", "").await;
    assert_eq!(status, 308);
    let (status, _, _) = http_get(admin, "admin", "/status", "").await;
    assert_eq!(status, 200);

    ca.leaf(&["files.unit.test"]).write(dir.path(), "files");
    router.signal("HUP");
    router.wait_log("config reloaded", 1).await;
    router.wait_log("certificate loaded", 2).await;
    router.signal("TERM");
    assert!(router.wait_exit().await.success());

    let trace = std::fs::read_to_string(&trace).unwrap();
    let traced = traced_calls(&trace);
    assert!(
        traced.contains("splice") && traced.contains("accept4"),
        "{traced:?}"
    );
    let refused: Vec<&String> = traced.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter refuses {refused:?}, which the router made"
    );
    assert_within_the_units_other_limits(&trace);
}

/// The unit's limits other than the filter, against each traced call.
fn assert_within_the_units_other_limits(trace: &str) {
    let families: Vec<&str> = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .expect("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    for line in trace.lines() {
        let call = |name: &str| line.contains(&format!(" {name}("));
        if let Some(rest) = line.split(" socket(").nth(1) {
            let family = rest.split(',').next().unwrap_or_default();
            assert!(
                families.contains(&family),
                "RestrictAddressFamilies: {line}"
            );
        }
        // MemoryDenyWriteExecute: no writable and executable mapping, and
        // no mapping made executable later.
        let wx = line.contains("PROT_WRITE") && line.contains("PROT_EXEC");
        assert!(!(call("mmap") && wx), "MemoryDenyWriteExecute: {line}");
        let made_executable =
            (call("mprotect") || call("pkey_mprotect")) && line.contains("PROT_EXEC");
        assert!(!made_executable, "MemoryDenyWriteExecute: {line}");
        // RestrictNamespaces, RestrictRealtime, LockPersonality.
        assert!(
            !line.contains("CLONE_NEW") && !call("unshare") && !call("setns"),
            "{line}"
        );
        assert!(
            !line.contains("SCHED_FIFO") && !line.contains("SCHED_RR"),
            "{line}"
        );
        assert!(!call("personality"), "{line}");
        // ProcSubset=pid hides the rest of /proc. mimalloc's look at the
        // overcommit policy is the one exception, and it does without.
        if let Some(path) = line.split("\"/proc/").nth(1) {
            let path = path.split('"').next().unwrap_or_default();
            let own = path.starts_with("self/") || path.starts_with("thread-self/");
            let own = own
                || path
                    .split('/')
                    .next()
                    .is_some_and(|p| p.parse::<u32>().is_ok());
            assert!(
                own || path == "sys/vm/overcommit_memory",
                "ProcSubset=pid: {line}"
            );
        }
    }
}

/// Makes `conf` what the README lays out for /etc/sni-router: owned by
/// root, readable by the group `sni-router` of the container's root.
fn readable_by_the_unit(conf: &Path) {
    let group = std::fs::read_to_string(Path::new(ROOT).join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("sni-router:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|gid| gid.parse().ok())
        .expect("the root has the sni-router group");
    let mode = |path: &Path, mode| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    for entry in std::fs::read_dir(conf).unwrap() {
        let path = entry.unwrap().path();
        std::os::unix::fs::chown(&path, Some(0), Some(gid)).unwrap();
        mode(&path, 0o640);
    }
    std::os::unix::fs::chown(conf, Some(0), Some(gid)).unwrap();
    mode(conf, 0o750);
}

/// The Debian root that `scripts/test` builds for booting the unit.
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-tools/sdroot");

#[tokio::test]
async fn the_unit_runs_the_router_under_systemd() {
    // Booting a container needs root; scripts/test builds the root then.
    if !root() || !have("systemd-nspawn") || !have("pebble") {
        return;
    }
    assert!(
        Path::new(ROOT).join("usr/lib/systemd/systemd").exists(),
        "no {ROOT}: scripts/test builds it"
    );
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let upstream = Backend::http("127.0.0.1").await;
    let ip = "127.0.0.8";
    // A privileged port, which the unit's one capability opens.
    let tls: SocketAddr = format!("{ip}:443").parse().unwrap();
    let http = SocketAddr::new(ip.parse().unwrap(), pebble.http_port);
    let admin = free_addr(ip);
    pebble.add_a("acme.unit.test", ip).await;

    // /etc/sni-router as the README lays it out: readable by the group.
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::copy(&pebble.ca_file, conf.join("pebble-ca.pem")).unwrap();
    let leaf = ca.leaf(&["files.unit.test"]);
    std::fs::write(conf.join("files.crt"), &leaf.chain_pem).unwrap();
    std::fs::write(conf.join("files.key"), &leaf.key_pem).unwrap();
    let directory = pebble
        .directory
        .replace("https://127.0.0.1:", "https://localhost:");
    let good = format!(
        "this_node = \"a\"\n[timeouts]\ndrain = \"10s\"\n\
         [[nodes]]\nname = \"a\"\ntls = \"{tls}\"\nhttp = \"{http}\"\n\
         [admin]\nlisten = \"{admin}\"\n\
         [acme]\ndirectory = \"{directory}\"\nstate_dir = \"/var/lib/sni-router\"\n\
         ca_file = \"/etc/sni-router/pebble-ca.pem\"\ncontact = [\"mailto:ops@example.test\"]\n\
         [[sites]]\nnames = [\"files.unit.test\"]\nheld_by = [\"a\"]\nupstream = \"{}\"\n\
         cert_file = \"/etc/sni-router/files.crt\"\nkey_file = \"/etc/sni-router/files.key\"\n\
         {}",
        upstream.addr,
        held_site(&["acme.unit.test"], &["a"], NOWHERE, ""),
    );
    let config = conf.join("sni-router.toml");
    std::fs::write(&config, &good).unwrap();
    readable_by_the_unit(&conf);
    let unit = dir.path().join("sni-router.service");
    std::fs::write(&unit, UNIT).unwrap();

    let binds = [
        (Path::new(BIN), BINARY_PATH),
        (conf.as_path(), "/etc/sni-router"),
        (unit.as_path(), "/etc/systemd/system/sni-router.service"),
    ];
    let log = dir.path().join("boot.log");
    let container = Container::boot(Path::new(ROOT), &binds, "sni-router.service", &log).await;
    wait_listening(tls).await;
    // Type=notify: active only once the router said READY=1.
    let active = wait_until(|| async {
        container
            .run(&["systemctl", "is-active", "sni-router"])
            .1
            .trim()
            == "active"
    })
    .await;
    assert!(active, "never active:\n{}", container.journal("sni-router"));
    let (_, kind) = container.run(&["systemctl", "show", "-p", "Type", "--value", "sni-router"]);
    assert_eq!(kind.trim(), "notify");

    // The router runs unprivileged, with one capability, under the filter.
    let router = Command::new("pgrep")
        .args(["-n", "-f", &format!("^{BINARY_PATH} run")])
        .output()
        .unwrap();
    let router = String::from_utf8_lossy(&router.stdout).trim().to_string();
    assert!(!router.is_empty(), "no router process");
    assert_ne!(proc_status(&router, "Uid"), "0", "runs as root");
    assert_eq!(
        proc_status(&router, "CapEff"),
        "0000000000000400",
        "CAP_NET_BIND_SERVICE only"
    );
    assert_eq!(proc_status(&router, "NoNewPrivs"), "1");
    assert_eq!(proc_status(&router, "Seccomp"), "2", "a system-call filter");

    let (response, _) = tls_request(tls, ca.client_config(&[], true), "files.unit.test")
        .await
        .expect("terminated");
    assert!(response.contains("upstream saw"), "{response}");
    let (status, _, _) = http_get(http, "files.unit.test", "/", "").await;
    assert_eq!(status, 308);
    // An ACME certificate, its state written where the unit allows it.
    let client = pebble.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut issued = false;
    while !issued && std::time::Instant::now() < deadline {
        issued = tls_connect(tls, client.clone(), "acme.unit.test")
            .await
            .is_ok();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        issued,
        "no ACME certificate:\n{}",
        container.journal("sni-router")
    );

    // Reload: checked first, so a broken config fails it and changes nothing.
    let (ok, out) = container.run(&["systemctl", "reload", "sni-router"]);
    assert!(ok, "{out}");
    // `systemctl reload` returns once the signal is sent, not once the
    // router has read the file.
    let reloaded =
        wait_until(|| async { container.journal("sni-router").contains("config reloaded") }).await;
    assert!(reloaded, "{}", container.journal("sni-router"));
    std::fs::write(&config, format!("{good}workers = \"many\"\n")).unwrap();
    let (ok, _) = container.run(&["systemctl", "reload", "sni-router"]);
    assert!(!ok, "a broken config reloaded");
    let (_, state) = container.run(&["systemctl", "is-active", "sni-router"]);
    assert_eq!(state.trim(), "active");
    assert!(
        tls_request(tls, ca.client_config(&[], true), "files.unit.test")
            .await
            .is_ok()
    );
    std::fs::write(&config, &good).unwrap();

    let (ok, out) = container.run(&["systemctl", "stop", "sni-router"]);
    assert!(ok, "{out}");
    let (_, result) =
        container.run(&["systemctl", "show", "-p", "Result", "--value", "sni-router"]);
    assert_eq!(result.trim(), "success");
    // journald may still be reading the router's last lines.
    let logged =
        wait_until(|| async { container.journal("sni-router").contains("draining") }).await;
    let journal = container.journal("sni-router");
    assert!(logged, "{journal}");
    assert!(
        !journal.to_lowercase().contains("not permitted"),
        "{journal}"
    );
}

const SOCKET_UNIT: &str = include_str!("../config/sni-router.socket");

/// `systemctl show -p NAME --value sni-router`.
fn show(container: &Container, name: &str) -> String {
    let (_, value) = container.run(&["systemctl", "show", "-p", name, "--value", "sni-router"]);
    value.trim().to_string()
}

/// Under systemd, with the shipped socket unit: three `systemctl restart`s
/// and three in-place upgrades (`systemctl kill -s USR2`), each under the
/// load generator, lose no connection; after each upgrade the new process
/// is the unit's main process and the unit never left `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_upgrades_under_systemd_lose_nothing() {
    if !root() || !have("systemd-nspawn") {
        return;
    }
    assert!(
        Path::new(ROOT).join("usr/lib/systemd/systemd").exists(),
        "no {ROOT}: scripts/test builds it"
    );
    let dir = tempfile::tempdir().unwrap();
    let backend = free_addr("127.0.0.1");
    let _backend = support::load::backend(backend);
    wait_listening(backend).await;
    let ip = "127.0.0.9";
    let tls: SocketAddr = format!("{ip}:443").parse().unwrap();
    let http = free_addr(ip);
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(
        conf.join("sni-router.toml"),
        format!(
            "this_node = \"a\"\n[timeouts]\ndrain = \"5s\"\n\
             [[nodes]]\nname = \"a\"\ntls = \"{tls}\"\nhttp = \"{http}\"\n\
             [[sites]]\nnames = [\"pass.test\"]\npassthrough = \"{backend}\"\n"
        ),
    )
    .unwrap();
    readable_by_the_unit(&conf);
    let unit = dir.path().join("sni-router.service");
    std::fs::write(&unit, UNIT).unwrap();
    let socket_unit = dir.path().join("sni-router.socket");
    let sockets = SOCKET_UNIT
        .replace("ListenStream=0.0.0.0:443", &format!("ListenStream={tls}"))
        .replace("ListenStream=0.0.0.0:80", &format!("ListenStream={http}"));
    std::fs::write(&socket_unit, sockets).unwrap();
    let binds = [
        (Path::new(BIN), BINARY_PATH),
        (conf.as_path(), "/etc/sni-router"),
        (unit.as_path(), "/etc/systemd/system/sni-router.service"),
        (
            socket_unit.as_path(),
            "/etc/systemd/system/sni-router.socket",
        ),
    ];
    let log = dir.path().join("boot.log");
    let container = Container::boot(Path::new(ROOT), &binds, "sni-router.socket", &log).await;
    wait_listening(tls).await;
    let (ok, out) = container.run(&["systemctl", "start", "sni-router"]);
    assert!(ok, "{out}\n{}", container.journal("sni-router"));
    // Log lines reach the journal in batches, maybe after READY=1.
    let took_over =
        wait_until(|| async { container.journal("sni-router").contains("from=\"systemd\"") }).await;
    assert!(took_over, "{}", container.journal("sni-router"));

    let load = support::load::ConnRate::start(tls, 8, 16);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let (ok, out) = container.run(&["systemctl", "restart", "sni-router"]);
        assert!(ok, "{out}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let rate = load.finish().await;
    assert_eq!(rate.errors, 0, "connections lost across 3 restarts");

    let load = support::load::ConnRate::start(tls, 8, 16);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for round in 1..=3 {
        let before = show(&container, "MainPID");
        let (ok, out) = container.run(&[
            "systemctl",
            "kill",
            "-s",
            "USR2",
            "--kill-whom=main",
            "sni-router",
        ]);
        assert!(ok, "{out}");
        let mut states = BTreeSet::new();
        let moved = wait_until(|| {
            states.insert(show(&container, "ActiveState"));
            let moved = ![before.as_str(), "0"].contains(&show(&container, "MainPID").as_str());
            async move { moved }
        })
        .await;
        assert!(
            moved,
            "round {round}: MainPID stayed {before}\n{}",
            container.journal("sni-router")
        );
        assert_eq!(
            states,
            BTreeSet::from(["active".to_string()]),
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let rate = load.finish().await;
    assert_eq!(rate.errors, 0, "connections lost across 3 upgrades");
    assert_eq!(show(&container, "ActiveState"), "active");
    // (journald drops lines past its rate limit under this load, so the
    // journal is checked for what must never appear, not counted.)
    let journal = container.journal("sni-router");
    assert!(!journal.contains("upgrade failed"), "{journal}");
    assert!(
        !journal.to_lowercase().contains("not permitted"),
        "{journal}"
    );
}

//! Bad configs are refused with the file, the field and what is wrong.

use super::*;

const NODES: &str = r#"
this_node = "a"
[[nodes]]
name = "a"
tls = "127.0.0.2:8443"
http = "127.0.0.2:8080"
[[nodes]]
name = "b"
tls = "127.0.0.3:8443"
http = "127.0.0.3:8080"
"#;

/// `extra` goes after the nodes; a leading `top:` line goes before them.
fn problems(extra: &str) -> Vec<String> {
    let text = match extra.strip_prefix("top:") {
        Some(rest) => {
            let (top, tail) = rest.split_once('\n').unwrap_or((rest, ""));
            format!("{top}\n{NODES}{tail}")
        }
        None => format!("{NODES}{extra}"),
    };
    match Config::parse(&text, "fleet.toml", None) {
        Ok(_) => panic!("config should be refused:\n{extra}"),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

fn assert_problem(extra: &str, expected: &str) {
    let problems = problems(extra);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("fleet.toml: ") && p.contains(expected)),
        "expected {expected:?} in {problems:#?}"
    );
}

#[test]
fn the_shipped_config_is_valid() {
    let config = Config::parse(EMBEDDED, EMBEDDED_PATH, None).unwrap();
    assert_eq!(config.this().name, "local");
    assert!(config.route_table().contains("passthrough.localhost"));
}

#[test]
fn a_good_fleet_config_parses_into_real_types() {
    let text = format!(
        "trusted_proxies = [\"10.0.0.9\"]\n{NODES}{}",
        r#"
[timeouts]
hello = "250ms"
[[sites]]
names = ["Shop.Example.org.", "*.shop.example.org"]
held_by = ["a", "b"]
upstream = "127.0.0.1:9000"
proxy_protocol = "v1"
"#
    );
    let config = Config::parse(&text, "fleet.toml", Some("b")).unwrap();
    assert_eq!(config.this().name, "b");
    assert_eq!(config.timeouts.hello, Duration::from_millis(250));
    assert_eq!(config.names.get("shop.example.org"), Some(&SiteId(0)));
    assert_eq!(config.names.get("x.shop.example.org"), Some(&SiteId(0)));
    assert_eq!(
        config.site(SiteId(0)).proxy_protocol,
        Some(ProxyVersion::V1)
    );
    assert!(config.is_node_address("127.0.0.2".parse().unwrap()));
    assert!(config.is_node_address("::ffff:127.0.0.3".parse().unwrap()));
    assert!(!config.is_node_address("127.0.0.9".parse().unwrap()));
    assert!(config.may_send_proxy("10.0.0.9".parse().unwrap()));
}

#[test]
fn unknown_fields_are_refused_with_their_position() {
    let problems = problems("\n[[sites]]\nnames = [\"x.test\"]\npassthru = \"127.0.0.1:1\"\n");
    assert!(
        problems[0].contains("unknown field `passthru`"),
        "{problems:?}"
    );
    assert!(problems[0].contains("line 14"), "{problems:?}");
}

#[test]
fn unknown_holder_is_named() {
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\nheld_by = [\"c\"]\nupstream = \"127.0.0.1:1\"\n",
        "sites[0].held_by[0]: unknown node \"c\"",
    );
}

#[test]
fn bad_socket_address_is_named() {
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\npassthrough = \"backend:443\"\n",
        "sites[0].passthrough: \"backend:443\" is not a socket address",
    );
}

#[test]
fn a_name_in_two_sites_is_refused() {
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\npassthrough = \"127.0.0.1:1\"\n\
         [[sites]]\nnames = [\"X.test.\"]\npassthrough = \"127.0.0.1:2\"\n",
        "sites[1].names[0]: \"X.test.\" is already a name of sites[0]",
    );
}

#[test]
fn this_node_must_exist() {
    let err = Config::parse(NODES, "fleet.toml", Some("z")).unwrap_err();
    assert!(
        err.to_string()
            .contains("fleet.toml: --node: \"z\" is not among [[nodes]]"),
        "{err}"
    );
    let text = NODES.replace("this_node = \"a\"", "this_node = \"q\"");
    let err = Config::parse(&text, "fleet.toml", None).unwrap_err();
    assert!(
        err.to_string()
            .contains("fleet.toml: this_node: \"q\" is not among [[nodes]]"),
        "{err}"
    );
}

#[test]
fn a_site_needs_holders_or_passthrough_but_not_both() {
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\n",
        "sites[0]: a site needs held_by",
    );
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\npassthrough = \"127.0.0.1:2\"\n",
        "sites[0]: a site has either held_by",
    );
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\nheld_by = [\"a\"]\n",
        "sites[0].upstream: a site with held_by needs an upstream",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let problems = problems(
        "top:default_site = \"nope.test\"\n[timeouts]\nhello = \"soon\"\n\
         [[sites]]\nnames = [\"bad name\"]\npassthrough = \"127.0.0.1:1\"\nproxy_protocol = \"v3\"\n",
    );
    for expected in [
        "timeouts.hello: \"soon\" is not a duration",
        "sites[0].names[0]: \"bad name\" is not a host name",
        "sites[0].proxy_protocol: \"v3\" is not one of",
        "default_site: \"nope.test\" is not a name of any [[sites]] entry",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected:?} in {problems:#?}"
        );
    }
}

#[test]
fn listener_default_site_must_exist() {
    assert_problem(
        "[[listeners]]\nbind = \"127.0.0.2:9443\"\ndefault_site = \"gone.test\"\n",
        "listeners[0].default_site: \"gone.test\" is not a name",
    );
}

const ACME: &str = "[acme]\ndirectory = \"https://ca.test/dir\"\nstate_dir = \"state\"\nprofile = \"shortlived\"\n";

#[test]
fn acme_refuses_wildcards_it_cannot_validate() {
    assert_problem(
        &format!(
            "{ACME}[[sites]]\nnames = [\"*.w.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\n"
        ),
        "sites[0].names: *.w.test: wildcard names cannot be validated over HTTP-01; add a [dns01] section",
    );
    // With a cert_file the wildcard is fine.
    let text = format!(
        "{NODES}{ACME}[[sites]]\nnames = [\"*.w.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n"
    );
    let config = Config::parse(&text, "fleet.toml", None).unwrap();
    assert!(config.acme_sites().is_empty());
    assert_eq!(config.acme.unwrap().state_dir, Path::new("state"));
}

#[test]
fn acme_warns_when_holders_would_order_identical_sets() {
    let text = format!(
        "{NODES}{ACME}[[sites]]\nnames = [\"s.test\"]\nheld_by = [\"a\", \"b\"]\nupstream = \"127.0.0.1:1\"\n"
    );
    let config = Config::parse(&text, "fleet.toml", None).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].message.contains("acme_name"));
    let distinct = text.replace(
        "name = \"b\"\n",
        "name = \"b\"\nacme_name = \"edge-b.test\"\n",
    );
    let config = Config::parse(&distinct, "fleet.toml", None).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn acme_fields_are_checked() {
    assert_problem(
        "[acme]\ndirectory = \"http://ca.test\"\nstate_dir = \"s\"\nkey_type = \"dsa\"\neab = { kid = \"k\", hmac_key = \"not base64!\" }\n",
        "acme.directory: \"http://ca.test\" is not an https:// URL",
    );
    let problems = problems(
        "[acme]\ndirectory = \"https://ca.test\"\nstate_dir = \"s\"\nkey_type = \"dsa\"\neab = { kid = \"k\", hmac_key = \"not base64!\" }\n",
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("acme.key_type: \"dsa\" is not one of")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("acme.eab.hmac_key: not base64url")),
        "{problems:?}"
    );
}

fn issuer_of(config: &Config, label: &str) -> Issuer {
    let site = config.sites.iter().find(|s| s.label == label).unwrap();
    match &site.route {
        SiteRoute::Held { issuer, .. } => issuer.clone(),
        SiteRoute::Passthrough { .. } => panic!("{label} is not held"),
    }
}

#[test]
fn held_sites_take_their_issuer_from_files_the_field_or_their_names() {
    let text = format!(
        "state_dir = \"state\"\n{NODES}{ACME}{}",
        r#"
[[sites]]
names = ["app.localhost", "*.app.localhost"]
held_by = ["a"]
upstream = "127.0.0.1:9000"
[[sites]]
names = ["lab.internal"]
held_by = ["a"]
upstream = "127.0.0.1:9000"
issuer = "internal"
[[sites]]
names = ["shop.example.org"]
held_by = ["a"]
upstream = "127.0.0.1:9000"
[[sites]]
names = ["files.example.org"]
held_by = ["a"]
upstream = "127.0.0.1:9000"
cert_file = "c.pem"
key_file = "k.pem"
"#
    );
    let config = Config::parse(&text, "/etc/r/fleet.toml", None).unwrap();
    assert_eq!(issuer_of(&config, "app.localhost"), Issuer::Internal);
    assert_eq!(issuer_of(&config, "lab.internal"), Issuer::Internal);
    assert_eq!(issuer_of(&config, "shop.example.org"), Issuer::Acme);
    assert!(matches!(
        issuer_of(&config, "files.example.org"),
        Issuer::Files(_)
    ));
    assert_eq!(config.internal_sites().len(), 2);
    assert_eq!(config.acme_sites().len(), 1);
    // acme.state_dir, the older spelling, wins for ACME; the top level is
    // the router's own.
    assert_eq!(config.state_dir.as_deref(), Some(Path::new("/etc/r/state")));
    assert_eq!(config.internal_ca.lifetime, Duration::from_secs(7 * 86_400));
}

#[test]
fn the_internal_ca_needs_a_state_dir_and_issuer_values_are_checked() {
    let site = |more: &str| {
        format!(
            "[[sites]]\nnames = [\"app.localhost\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:9000\"\n{more}"
        )
    };
    assert_problem(
        &site(""),
        "sites[0].issuer: app.localhost: the internal CA needs a state_dir",
    );
    assert_problem(
        &site("issuer = \"vault\"\n"),
        "sites[0].issuer: \"vault\" is not one of",
    );
    assert_problem(
        &site("issuer = \"internal\"\ncert_file = \"c\"\nkey_file = \"k\"\n"),
        "cannot also have issuer",
    );
    assert_problem(
        "[acme]\ndirectory = \"https://ca.test/dir\"\n",
        "state_dir: [acme] needs a state_dir",
    );
    assert_problem(
        "top:state_dir = \"s\"\n[internal_ca]\ncert_file = \"ca.pem\"\nlifetime = \"soon\"\n",
        "internal_ca.key_file: cert_file needs a key_file",
    );
    // A site held elsewhere needs nothing here.
    let text = format!(
        "{NODES}[[sites]]\nnames = [\"app.localhost\"]\nheld_by = [\"b\"]\nupstream = \"127.0.0.1:9000\"\n"
    );
    assert!(Config::parse(&text, "fleet.toml", None).is_ok());
}

#[test]
fn acme_state_dir_may_come_from_the_top_level() {
    let text = format!("state_dir = \"var\"\n{NODES}[acme]\ndirectory = \"https://ca.test/dir\"\n");
    let config = Config::parse(&text, "/etc/r/fleet.toml", None).unwrap();
    assert_eq!(config.acme.unwrap().state_dir, Path::new("/etc/r/var"));
}

/// A `[dns01]` section whose secret file holds `secret_text` with `mode`.
fn dns01_section(dir: &Path, secret_text: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("tsig.secret");
    std::fs::write(&file, secret_text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    format!(
        "[dns01]\nserver = \"127.0.0.1:53\"\ntsig_key = \"acme-update.\"\ntsig_secret_file = \"{}\"\n",
        file.display()
    )
}

const WILD: &str = "[[sites]]\nnames = [\"*.w.test\", \"w.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\n";

fn challenge_of(config: &Config, label: &str) -> Challenge {
    match &config
        .sites
        .iter()
        .find(|s| s.label == label)
        .unwrap()
        .route
    {
        SiteRoute::Held { challenge, .. } => *challenge,
        SiteRoute::Passthrough { .. } => panic!("not held"),
    }
}

#[test]
fn a_wildcard_site_takes_dns01_when_the_section_exists() {
    let dir = tempfile::tempdir().unwrap();
    let dns01 = dns01_section(dir.path(), "c2VjcmV0IGtleSBieXRlcw==\n", 0o600);
    let plain = "[[sites]]\nnames = [\"p.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\n";
    let text = format!("{NODES}{ACME}{dns01}{WILD}{plain}");
    let config = Config::parse(&text, "fleet.toml", None).unwrap();
    assert_eq!(challenge_of(&config, "*.w.test"), Challenge::Dns01);
    assert_eq!(challenge_of(&config, "p.test"), Challenge::Http01);
    let dns01 = config.dns01.unwrap();
    assert_eq!(dns01.secret, b"secret key bytes");
    assert_eq!(dns01.key_name, "acme-update");
    assert_eq!(dns01.propagation_timeout, Duration::from_secs(120));
    // Without the section, the same site is refused, pointing at it.
    assert_problem(&format!("{ACME}{WILD}"), "add a [dns01] section");
}

#[test]
fn dns01_fields_and_the_secret_file_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let exposed = dns01_section(dir.path(), "c2VjcmV0\n", 0o644);
    assert_problem(&exposed, "dns01.tsig_secret_file: ");
    assert_problem(
        &exposed,
        "may be read by group or others (mode 644): chmod 0600 it",
    );
    let junk = dns01_section(dir.path(), "not base64!\n", 0o600);
    assert_problem(&junk, "the secret is not base64");
    let missing = "[dns01]\nserver = \"127.0.0.1:53\"\ntsig_key = \"k.\"\ntsig_secret_file = \"/nonexistent/tsig\"\n";
    assert_problem(
        missing,
        "dns01.tsig_secret_file: /nonexistent/tsig: No such file",
    );
    let good = dns01_section(dir.path(), "c2VjcmV0\n", 0o600);
    assert_problem(
        &good.replace("127.0.0.1:53", "ns1.example.org:53"),
        "dns01.server: \"ns1.example.org:53\" is not a socket address",
    );
    assert_problem(
        &format!("{good}tsig_algorithm = \"hmac-md5\"\n"),
        "dns01.tsig_algorithm: \"hmac-md5\" is not one of",
    );
    assert_problem(
        "[[sites]]\nnames = [\"x.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\nchallenge = \"dns-01\"\n",
        "sites[0].challenge: \"dns-01\" needs a [dns01] section",
    );
    assert_problem(
        &format!(
            "{good}[[sites]]\nnames = [\"x.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:1\"\nchallenge = \"tls-alpn-01\"\n"
        ),
        "sites[0].challenge: \"tls-alpn-01\" is not one of",
    );
}

#[test]
fn bind_and_knot_key_files_are_read_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let bind = "key \"acme-update\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n";
    let knot = "key:\n  - id: acme-update\n    algorithm: hmac-sha256\n    secret: c2VjcmV0\n";
    for file in [bind, knot] {
        let text = format!("{NODES}{}", dns01_section(dir.path(), file, 0o600));
        let config = Config::parse(&text, "fleet.toml", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.dns01.unwrap().secret, b"secret");
    }
}

#[test]
fn sites_are_numbered_as_the_file_numbers_them_after_a_refused_one() {
    // sites[0] is refused (no route); the duplicate is in sites[2], first in sites[1].
    assert_problem(
        "[[sites]]\nnames = [\"bad.test\"]\n\
         [[sites]]\nnames = [\"x.test\"]\npassthrough = \"127.0.0.1:1\"\n\
         [[sites]]\nnames = [\"x.test\"]\npassthrough = \"127.0.0.1:2\"\n",
        "sites[2].names[0]: \"x.test\" is already a name of sites[1]",
    );
}

#[test]
fn a_held_site_with_no_certificate_source_and_no_other_holder_is_warned_about() {
    let site = |held_by: &str| {
        format!(
            "{NODES}[[sites]]\nnames = [\"lone.test\"]\nheld_by = [{held_by}]\nupstream = \"127.0.0.1:1\"\n"
        )
    };
    let config = Config::parse(&site("\"a\""), "fleet.toml", None).unwrap();
    assert!(
        config.warnings.iter().any(|w| w.field == "sites[0]"
            && w.message
                .contains("no other holder to splice to: its connections are refused")),
        "{:?}",
        config.warnings
    );
    let config = Config::parse(&site("\"a\", \"b\""), "fleet.toml", None).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn the_packaged_config_is_valid_and_holds_no_site() {
    let text = include_str!("../../config/edge.toml");
    let config = Config::parse(text, "/etc/sni-router/sni-router.toml", None).unwrap();
    assert!(config.sites.is_empty());
    assert_eq!(
        config.state_dir.as_deref(),
        Some(Path::new("/var/lib/sni-router"))
    );
    assert!(config.admin.is_some());
}

#[test]
fn access_lists_take_defaults_name_bad_networks_and_warn_when_nothing_passes() {
    let site = "[[sites]]\nnames = [\"s.test\"]\npassthrough = \"127.0.0.1:1\"\n";
    let two = format!(
        "{NODES}[defaults]\nallow = [\"10.0.0.0/8\"]\ndeny = [\"10.9.0.0/16\"]\n{site}{}",
        site.replace("s.test", "t.test") + "deny = []\n"
    );
    let config = Config::parse(&two, "fleet.toml", None).unwrap();
    let ip = |raw: &str| raw.parse().unwrap();
    let (s, t) = (&config.sites[0].access, &config.sites[1].access);
    assert_eq!(s.check(ip("10.9.1.1")), Err(Denial::DenyListed));
    assert_eq!(s.check(ip("192.0.2.1")), Err(Denial::NotAllowed));
    assert_eq!(
        t.check(ip("10.9.1.1")),
        Ok(()),
        "a site's own list replaces the default"
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    assert_problem(
        &format!("{site}allow = [\"10.0.0.1/8\"]\n"),
        "sites[0].allow[0]: \"10.0.0.1/8\" has host bits set: the network is 10.0.0.0/8",
    );
    assert_problem(
        "[defaults]\ndeny = [\"::1\", \"nonsense\"]\n",
        "defaults.deny[1]: \"nonsense\" is not an IP network",
    );
    let closed = format!("{NODES}{site}deny = [\"0.0.0.0/0\", \"::/0\"]\n");
    let config = Config::parse(&closed, "fleet.toml", None).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert_eq!(config.warnings[0].field, "sites[0]");
    assert!(config.warnings[0].message.contains("no client"));
}

#[test]
fn pools_take_lists_weights_drains_and_checks_and_name_what_is_wrong() {
    let site = "[[sites]]\nnames = [\"p.test\"]\nheld_by = [\"a\", \"b\"]\n";
    let text = format!(
        "{NODES}{site}upstream = [\"127.0.0.1:1\", {{ addr = \"127.0.0.1:2\", weight = 3 }}, {{ addr = \"127.0.0.1:3\" }}]\n\
         health = \"tcp\"\ndrain = [\"127.0.0.1:1\"]\n"
    );
    let config = Config::parse(&text, "fleet.toml", None).unwrap();
    let SiteRoute::Held { upstream, .. } = &config.sites[0].route else {
        panic!("held");
    };
    let weights: Vec<u32> = upstream.targets.iter().map(|t| t.weight).collect();
    assert_eq!(weights, [0, 3, 1]);
    assert!(upstream.checked);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    assert_problem(
        &format!("{site}upstream = [\"127.0.0.1:1\", \"nowhere\"]\n"),
        "sites[0].upstream[1]: \"nowhere\" is not a socket address",
    );
    assert_problem(
        &format!("{site}upstream = [\"127.0.0.1:1\", {{ addr = \"127.0.0.1:1\" }}]\n"),
        "sites[0].upstream[1].addr: 127.0.0.1:1 is listed twice",
    );
    assert_problem(
        &format!("{site}upstream = []\n"),
        "sites[0].upstream: a pool needs at least one target",
    );
    assert_problem(
        &format!("{site}upstream = \"127.0.0.1:1\"\ndrain = [\"127.0.0.1:2\"]\n"),
        "sites[0].drain[0]: 127.0.0.1:2 is not a target of sites[0].upstream",
    );
    assert_problem(
        &format!("{site}upstream = \"127.0.0.1:1\"\nhealth = \"http\"\n"),
        "sites[0].health: \"http\" is not one of \"tcp\", \"none\"",
    );
    let drained = format!(
        "{NODES}[[sites]]\nnames = [\"q.test\"]\npassthrough = [{{ addr = \"127.0.0.1:1\", weight = 0 }}]\n"
    );
    let config = Config::parse(&drained, "fleet.toml", None).unwrap();
    assert_eq!(config.warnings[0].field, "sites[0].passthrough");
    assert!(
        config.warnings[0]
            .message
            .contains("every target is drained")
    );
}

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
        "sites[0].names: *.w.test: wildcard names cannot be validated over HTTP-01; give this site a cert_file",
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

//! Turns the file shape into a [`Config`], collecting every problem with the
//! field it belongs to, so one `check` run shows all that is wrong.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::access::{Access, parse_net};
use super::file::{FileConfig, FileDefaults, FileSite, FileTarget, FileTargets};
use super::{
    Accept, Acme, CertFiles, Challenge, Config, ConfigError, Dns01, FleetDigest, Http, HttpMode,
    InternalCa, Issuer, KeyType, Limits, Listener, Node, NodeId, Pool, PoolTarget, Problem,
    ProxyVersion, Site, SiteId, SiteRoute, Timeouts, TsigAlgorithm, canonical,
};
use crate::names::{NameTable, Pattern};

struct Builder {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Builder {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn addr(&mut self, field: &str, raw: &str) -> Option<SocketAddr> {
        match raw.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(field, format!("{raw:?} is not a socket address (IP:port)"));
                None
            }
        }
    }

    fn ip(&mut self, field: &str, raw: &str) -> Option<IpAddr> {
        match raw.parse::<IpAddr>() {
            Ok(ip) => Some(canonical(ip)),
            Err(_) => {
                self.problem(field, format!("{raw:?} is not an IP address"));
                None
            }
        }
    }

    fn duration(&mut self, field: &str, raw: Option<&str>, default: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(field, "must be greater than zero");
                default
            }
            Err(e) => {
                self.problem(field, format!("{raw:?} is not a duration like \"5s\": {e}"));
                default
            }
        }
    }
}

pub(super) fn build(text: &str, source: &str, node: Option<&str>) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError {
        source_name: source.to_string(),
        problems: vec![Problem {
            field: toml_position(text, &e),
            message: e.message().trim().to_string(),
        }],
    })?;
    let mut b = Builder {
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let config = convert(&mut b, file, source, node).map(|mut config| {
        check_acme(&mut b, &config);
        check_internal(&mut b, &config);
        check_sources(&mut b, &config);
        config.digest = super::digest::compute(&config);
        config.warnings = std::mem::take(&mut b.warnings);
        config
    });
    match config {
        Some(config) if b.problems.is_empty() => Ok(config),
        _ => Err(ConfigError {
            source_name: source.to_string(),
            problems: b.problems,
        }),
    }
}

/// Locates a syntax or shape error as `line L, column C`: serde's message
/// names the field (`unknown field `x``), the position says where it is.
fn toml_position(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return "(document)".into();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

fn convert(b: &mut Builder, file: FileConfig, source: &str, node: Option<&str>) -> Option<Config> {
    let (nodes, node_addresses) = nodes(b, &file);
    let node_ids: HashMap<&str, NodeId> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), NodeId(i)))
        .collect();
    let this_node = this_node(b, &nodes, &node_ids, node.ok_or(&file.this_node));
    let base = base_dir(source);
    let dns01 = file.dns01.as_ref().and_then(|d| dns01(b, d, &base));
    let context = (&node_ids, base.as_path(), dns01.is_some());
    let defaults = access_defaults(b, &file.defaults);
    let (sites, names, site_ids) = sites(b, &file.sites, context, &defaults);
    let default_site = file
        .default_site
        .as_deref()
        .and_then(|raw| site_ref(b, &site_ids, "default_site", raw));
    let trusted_proxies = file
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, raw)| b.ip(&format!("trusted_proxies[{i}]"), raw))
        .collect();
    let timeouts = timeouts(b, &file.timeouts);
    let http = http(b, &file.http, source);
    let cert_poll = b.duration(
        "certs.poll",
        file.certs.poll.as_deref(),
        Duration::from_secs(5),
    );
    let limits = limits(b, &file.limits);
    if file.workers == Some(0) {
        b.problem("workers", "must be at least 1");
    }
    let accept = match file.accept.as_deref() {
        None | Some("shared") => Accept::Shared,
        Some("per_worker") => Accept::PerWorker,
        Some(other) => {
            b.problem(
                "accept",
                format!("{other:?} is not one of \"shared\", \"per_worker\""),
            );
            Accept::Shared
        }
    };
    let state_dir = file.state_dir.as_ref().map(|d| base.join(d));
    let acme = file
        .acme
        .as_ref()
        .map(|a| acme(b, a, source, state_dir.as_deref()));
    let internal_ca = internal_ca(b, file.internal_ca.as_ref(), &base);
    let state_dir = state_dir.or_else(|| acme.as_ref().map(|a| a.state_dir.clone()));
    let admin = admin(b, &file);
    let this_node = this_node?;
    let tls_bind = nodes.get(this_node.0)?.tls_bind;
    let listeners = listeners(b, &file, (this_node, tls_bind), &node_ids, &site_ids);
    Some(Config {
        digest: FleetDigest::default(),
        source: source.to_string(),
        this_node,
        nodes,
        sites,
        names,
        default_site,
        listeners,
        trusted_proxies,
        node_addresses,
        timeouts,
        limits,
        workers: file.workers,
        accept,
        cert_poll,
        http,
        acme,
        state_dir,
        internal_ca,
        dns01,
        admin,
        warnings: Vec::new(),
    })
}

/// Which node this is: `--node` (`Ok`) or the file's `this_node` (`Err`).
fn this_node(
    b: &mut Builder,
    nodes: &[Node],
    node_ids: &HashMap<&str, NodeId>,
    chosen: Result<&str, &String>,
) -> Option<NodeId> {
    let (name, field) = match chosen {
        Ok(name) => (name, "--node"),
        Err(name) => (name.as_str(), "this_node"),
    };
    let found = node_ids.get(name).copied();
    if found.is_none() {
        let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        b.problem(
            field,
            format!("{name:?} is not among [[nodes]] (known: {known:?})"),
        );
    }
    found
}

/// The site a `default_site` names, or a problem at `field`.
fn site_ref(
    b: &mut Builder,
    site_ids: &HashMap<Pattern, SiteId>,
    field: &str,
    raw: &str,
) -> Option<SiteId> {
    let found = Pattern::parse(raw).and_then(|p| site_ids.get(&p).copied());
    if found.is_none() {
        b.problem(
            field,
            format!("{raw:?} is not a name of any [[sites]] entry"),
        );
    }
    found
}

fn timeouts(b: &mut Builder, t: &super::file::FileTimeouts) -> Timeouts {
    let d = Timeouts::default();
    Timeouts {
        hello: b.duration("timeouts.hello", t.hello.as_deref(), d.hello),
        connect: b.duration("timeouts.connect", t.connect.as_deref(), d.connect),
        idle: b.duration("timeouts.idle", t.idle.as_deref(), d.idle),
        drain: b.duration("timeouts.drain", t.drain.as_deref(), d.drain),
        handshake: b.duration("timeouts.handshake", t.handshake.as_deref(), d.handshake),
        http_head: b.duration("timeouts.http_head", t.http_head.as_deref(), d.http_head),
    }
}

fn http(b: &mut Builder, h: &super::file::FileHttp, source: &str) -> Http {
    Http {
        webroot: h.webroot.as_ref().map(|w| base_dir(source).join(w)),
        forward: h.forward.unwrap_or(true),
        forward_timeout: b.duration(
            "http.forward_timeout",
            h.forward_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        forward_per_second: h.forward_per_second.unwrap_or(20),
    }
}

fn limits(b: &mut Builder, l: &super::file::FileLimits) -> Limits {
    let defaults = Limits::default();
    let limits = Limits {
        backlog: l.backlog.unwrap_or(defaults.backlog),
        max_connections: l.max_connections.unwrap_or(defaults.max_connections),
        max_pending_hellos: l.max_pending_hellos.unwrap_or(defaults.max_pending_hellos),
        max_per_source: l.max_per_source.unwrap_or(defaults.max_per_source),
        new_per_source_per_second: l
            .new_per_source_per_second
            .unwrap_or(defaults.new_per_source_per_second),
        zero_copy: l.zero_copy.unwrap_or(defaults.zero_copy),
    };
    if limits.max_pending_hellos == 0 {
        b.problem("limits.max_pending_hellos", "must be at least 1");
    }
    if limits.max_connections == 0 {
        b.problem("limits.max_connections", "must be at least 1");
    }
    limits
}

/// The admin address, with a warning when it is reachable from the network.
fn admin(b: &mut Builder, file: &FileConfig) -> Option<SocketAddr> {
    let admin = file
        .admin
        .as_ref()
        .and_then(|a| b.addr("admin.listen", &a.listen));
    if let Some(admin) = admin.filter(|a| !a.ip().is_loopback()) {
        b.warnings.push(Problem {
            field: "admin.listen".into(),
            message: format!(
                "{admin} is not loopback: /metrics and /status will be reachable from the network"
            ),
        });
    }
    admin
}

/// This node's TLS listeners: its own address first, then the extras meant
/// for every node or for this one.
fn listeners(
    b: &mut Builder,
    file: &FileConfig,
    (this_node, tls_bind): (NodeId, SocketAddr),
    node_ids: &HashMap<&str, NodeId>,
    site_ids: &HashMap<Pattern, SiteId>,
) -> Vec<Listener> {
    let mut listeners = vec![Listener {
        bind: tls_bind,
        default_site: None,
    }];
    for (i, l) in file.listeners.iter().enumerate() {
        let field = format!("listeners[{i}]");
        if let Some(only) = &l.node {
            match node_ids.get(only.as_str()) {
                Some(id) if *id != this_node => continue,
                Some(_) => {}
                None => b.problem(format!("{field}.node"), format!("unknown node {only:?}")),
            }
        }
        let bind = b.addr(&format!("{field}.bind"), &l.bind);
        let default_site = l
            .default_site
            .as_deref()
            .and_then(|raw| site_ref(b, site_ids, &format!("{field}.default_site"), raw));
        if let Some(bind) = bind {
            if listeners.iter().any(|other| other.bind == bind) {
                b.problem(
                    format!("{field}.bind"),
                    format!("{bind} is bound twice on this node"),
                );
            }
            listeners.push(Listener { bind, default_site });
        }
    }
    listeners
}

/// Relative paths in a config file are relative to the file's directory.
fn base_dir(source: &str) -> std::path::PathBuf {
    Path::new(source)
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn nodes(b: &mut Builder, file: &FileConfig) -> (Vec<Node>, HashMap<IpAddr, NodeId>) {
    let mut nodes = Vec::new();
    let mut addresses = HashMap::new();
    let mut seen = HashSet::new();
    if file.nodes.is_empty() {
        b.problem("nodes", "at least one [[nodes]] entry is needed");
    }
    for (i, n) in file.nodes.iter().enumerate() {
        let field = format!("nodes[{i}]");
        if !seen.insert(n.name.as_str()) {
            b.problem(
                format!("{field}.name"),
                format!("node {:?} is defined twice", n.name),
            );
        }
        let tls = b.addr(&format!("{field}.tls"), &n.tls);
        let http = b.addr(&format!("{field}.http"), &n.http);
        let tls_bind = match &n.tls_bind {
            Some(raw) => b.addr(&format!("{field}.tls_bind"), raw),
            None => tls,
        };
        let http_bind = match &n.http_bind {
            Some(raw) => b.addr(&format!("{field}.http_bind"), raw),
            None => http,
        };
        for (j, raw) in n.addresses.iter().enumerate() {
            if let Some(ip) = b.ip(&format!("{field}.addresses[{j}]"), raw) {
                addresses
                    .entry(canonical(ip))
                    .or_insert(NodeId(nodes.len()));
            }
        }
        if let (Some(tls), Some(http), Some(tls_bind), Some(http_bind)) =
            (tls, http, tls_bind, http_bind)
        {
            for ip in [tls.ip(), http.ip()] {
                if !ip.is_unspecified() {
                    addresses
                        .entry(canonical(ip))
                        .or_insert(NodeId(nodes.len()));
                }
            }
            let acme_name = n.acme_name.as_deref().and_then(|raw| {
                let name = crate::names::normalize_name(raw.as_bytes());
                if name.is_none() {
                    b.problem(
                        format!("{field}.acme_name"),
                        format!("{raw:?} is not a host name"),
                    );
                }
                name
            });
            nodes.push(Node {
                name: n.name.clone(),
                tls,
                http,
                tls_bind,
                http_bind,
                acme_name,
            });
        }
    }
    (nodes, addresses)
}

type SiteTables = (Vec<Site>, NameTable<SiteId>, HashMap<Pattern, SiteId>);

/// `[defaults]` allow and deny lists.
fn access_defaults(b: &mut Builder, defaults: &FileDefaults) -> Access {
    Access {
        allow: nets(
            b,
            "defaults.allow",
            defaults.allow.as_deref().unwrap_or_default(),
        ),
        deny: nets(
            b,
            "defaults.deny",
            defaults.deny.as_deref().unwrap_or_default(),
        ),
    }
}

/// A site's lists: its own where it sets them, else the defaults; a
/// warning when they leave no client able to reach it.
fn access(b: &mut Builder, field: &str, s: &FileSite, defaults: &Access) -> Access {
    let access = Access {
        allow: match &s.allow {
            Some(list) => nets(b, &format!("{field}.allow"), list),
            None => defaults.allow.clone(),
        },
        deny: match &s.deny {
            Some(list) => nets(b, &format!("{field}.deny"), list),
            None => defaults.deny.clone(),
        },
    };
    if access.denies_everything() {
        b.warnings.push(Problem {
            field: field.to_string(),
            message: "its allow and deny lists leave no client able to reach it".into(),
        });
    }
    access
}

fn nets(b: &mut Builder, field: &str, raw: &[String]) -> Vec<ipnet::IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, raw)| match parse_net(raw) {
            Ok(net) => Some(net),
            Err(message) => {
                b.problem(format!("{field}[{i}]"), message);
                None
            }
        })
        .collect()
}

fn sites(b: &mut Builder, file: &[FileSite], context: Context, defaults: &Access) -> SiteTables {
    let mut sites = Vec::new();
    let mut names = NameTable::default();
    let mut by_pattern: HashMap<Pattern, SiteId> = HashMap::new();
    // Where each name first appeared in the file: messages name sites as
    // the file numbers them, whatever was refused before them.
    let mut first_at: HashMap<Pattern, usize> = HashMap::new();
    for (i, s) in file.iter().enumerate() {
        let field = format!("sites[{i}]");
        let id = SiteId(sites.len());
        let mut patterns = Vec::new();
        if s.names.is_empty() {
            b.problem(format!("{field}.names"), "a site needs at least one name");
        }
        for (j, raw) in s.names.iter().enumerate() {
            let Some(pattern) = Pattern::parse(raw) else {
                b.problem(
                    format!("{field}.names[{j}]"),
                    format!("{raw:?} is not a host name or *.wildcard"),
                );
                continue;
            };
            if let Some(other) = first_at.get(&pattern) {
                b.problem(
                    format!("{field}.names[{j}]"),
                    format!("{raw:?} is already a name of sites[{other}]"),
                );
                continue;
            }
            first_at.insert(pattern.clone(), i);
            by_pattern.insert(pattern.clone(), id);
            patterns.push(pattern);
        }
        let route = site_route(b, &field, s, context);
        let proxy_protocol = match s.proxy_protocol.as_deref() {
            None | Some("none") => None,
            Some("v1") => Some(ProxyVersion::V1),
            Some("v2") => Some(ProxyVersion::V2),
            Some(other) => {
                b.problem(
                    format!("{field}.proxy_protocol"),
                    format!("{other:?} is not one of \"v1\", \"v2\", \"none\""),
                );
                None
            }
        };
        let http = match (s.http.as_deref(), &route) {
            (None | Some("redirect"), _) => HttpMode::Redirect,
            (Some("upstream"), Some(SiteRoute::Held { .. })) => HttpMode::Upstream,
            (Some("upstream"), _) => {
                b.problem(
                    format!("{field}.http"),
                    "\"upstream\" needs a site with held_by and upstream",
                );
                HttpMode::Redirect
            }
            (Some(other), _) => {
                b.problem(
                    format!("{field}.http"),
                    format!("{other:?} is not one of \"redirect\", \"upstream\""),
                );
                HttpMode::Redirect
            }
        };
        let access = access(b, &field, s, defaults);
        if let (Some(route), Some(first)) = (route, patterns.first()) {
            for pattern in &patterns {
                names.insert(pattern.clone(), id);
            }
            sites.push(Site {
                index: i,
                label: first.to_string(),
                names: patterns,
                route,
                proxy_protocol,
                http,
                access,
            });
        }
    }
    (sites, names, by_pattern)
}

/// What a site's fields refer to: node names, the config file's directory
/// for relative paths, and whether `[dns01]` exists.
type Context<'a> = (&'a HashMap<&'a str, NodeId>, &'a Path, bool);

/// A site its holders terminate: holders, upstream, certificate files, ALPN.
fn held(
    b: &mut Builder,
    field: &str,
    s: &FileSite,
    (node_ids, base, dns01): Context,
) -> Option<SiteRoute> {
    let mut holders = Vec::new();
    for (j, name) in s.held_by.iter().enumerate() {
        match node_ids.get(name.as_str()) {
            Some(id) if holders.contains(id) => b.problem(
                format!("{field}.held_by[{j}]"),
                format!("node {name:?} is listed twice"),
            ),
            Some(id) => holders.push(*id),
            None => b.problem(
                format!("{field}.held_by[{j}]"),
                format!("unknown node {name:?}: not among [[nodes]]"),
            ),
        }
    }
    let upstream = match &s.upstream {
        Some(targets) => pool(b, &format!("{field}.upstream"), targets, s),
        None => {
            b.problem(
                format!("{field}.upstream"),
                "a site with held_by needs an upstream (IP:port of the plaintext service)",
            );
            None
        }
    };
    let issuer = issuer(b, field, s, base);
    let challenge = challenge(b, field, s, dns01);
    let alpn = alpn(b, field, s.alpn.as_deref());
    Some(SiteRoute::Held {
        holders,
        upstream: upstream?,
        issuer,
        challenge,
        alpn,
    })
}

/// How ACME validates a site: as it says; else DNS-01 for a site with a
/// wildcard when `[dns01]` exists (HTTP-01 cannot validate wildcards);
/// else HTTP-01.
fn challenge(b: &mut Builder, field: &str, s: &FileSite, dns01: bool) -> Challenge {
    let wildcard = s.names.iter().any(|n| n.starts_with("*."));
    match s.challenge.as_deref() {
        Some("http-01") => Challenge::Http01,
        Some("dns-01") if dns01 => Challenge::Dns01,
        Some("dns-01") => {
            b.problem(
                format!("{field}.challenge"),
                "\"dns-01\" needs a [dns01] section (the server and TSIG key to update)",
            );
            Challenge::Dns01
        }
        None if wildcard && dns01 => Challenge::Dns01,
        None => Challenge::Http01,
        Some(other) => {
            b.problem(
                format!("{field}.challenge"),
                format!("{other:?} is not one of \"http-01\", \"dns-01\""),
            );
            Challenge::Http01
        }
    }
}

/// `[dns01]`: the server, the TSIG key and its secret (read now, so
/// `check` finds an unreadable or exposed secret file).
fn dns01(b: &mut Builder, d: &super::file::FileDns01, base: &Path) -> Option<Dns01> {
    let server = b.addr("dns01.server", &d.server);
    let algorithm = match d.tsig_algorithm.as_deref() {
        None | Some("hmac-sha256") => TsigAlgorithm::HmacSha256,
        Some("hmac-sha384") => TsigAlgorithm::HmacSha384,
        Some("hmac-sha512") => TsigAlgorithm::HmacSha512,
        Some(other) => {
            b.problem(
                "dns01.tsig_algorithm",
                format!(
                    "{other:?} is not one of \"hmac-sha256\", \"hmac-sha384\", \"hmac-sha512\""
                ),
            );
            TsigAlgorithm::HmacSha256
        }
    };
    if crate::names::Pattern::parse(d.tsig_key.trim_end_matches('.')).is_none() {
        b.problem(
            "dns01.tsig_key",
            format!("{:?} is not a DNS name", d.tsig_key),
        );
    }
    let zone = d
        .zone
        .as_ref()
        .map(|z| z.trim_end_matches('.').to_ascii_lowercase());
    if let Some(zone) = &zone
        && crate::names::Pattern::parse(zone).is_none()
    {
        b.problem("dns01.zone", format!("{zone:?} is not a DNS name"));
    }
    let propagation_timeout = b.duration(
        "dns01.propagation_timeout",
        d.propagation_timeout.as_deref(),
        Duration::from_secs(120),
    );
    let secret_file = base.join(&d.tsig_secret_file);
    let secret = match read_tsig_secret(&secret_file) {
        Ok(secret) => Some(secret),
        Err(message) => {
            b.problem("dns01.tsig_secret_file", message);
            None
        }
    };
    Some(Dns01 {
        server: server?,
        key_name: d.tsig_key.trim_end_matches('.').to_ascii_lowercase(),
        algorithm,
        secret: secret?,
        zone,
        propagation_timeout,
        ttl: d.ttl.unwrap_or(60),
    })
}

/// The base64 secret of a TSIG key file: the bare secret, or the
/// `secret "..."` of a BIND key file (`tsig-keygen`), or the `secret:` of a
/// Knot one (`keymgr -t`). Refused when group or others may read it.
fn read_tsig_secret(path: &Path) -> Result<Vec<u8>, String> {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if meta.permissions().mode() & 0o044 != 0 {
        return Err(format!(
            "{shown} may be read by group or others (mode {:o}): chmod 0600 it",
            meta.permissions().mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    let secret = text
        .lines()
        .find_map(|line| {
            let line = line.trim().trim_start_matches("- ");
            let rest = line.strip_prefix("secret")?;
            Some(
                rest.trim_start_matches([' ', ':', '"'])
                    .trim_end_matches([';', '"', ' ']),
            )
        })
        .unwrap_or(text.trim());
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(secret)
        .map_err(|e| format!("{shown}: the secret is not base64: {e}"))?;
    if decoded.is_empty() {
        return Err(format!("{shown}: the secret is empty"));
    }
    Ok(decoded)
}

/// Where a held site's certificate comes from: its files when it names
/// them, else `issuer`, else the internal CA for names under `.localhost`
/// (no public CA signs them) and ACME for the rest.
fn issuer(b: &mut Builder, field: &str, s: &FileSite, base: &Path) -> Issuer {
    let files = cert_files(b, field, (&s.cert_file, &s.key_file), base);
    let local = s.names.iter().all(|n| is_local_name(n));
    match (s.issuer.as_deref(), files) {
        (None, Some(files)) => Issuer::Files(files),
        (None, None) if local => Issuer::Internal,
        (None | Some("acme"), None) => Issuer::Acme,
        (Some("internal"), None) => Issuer::Internal,
        (Some(kind @ ("acme" | "internal")), Some(files)) => {
            b.problem(
                format!("{field}.issuer"),
                format!("a site with cert_file cannot also have issuer = {kind:?}"),
            );
            Issuer::Files(files)
        }
        (Some(other), _) => {
            b.problem(
                format!("{field}.issuer"),
                format!("{other:?} is not one of \"acme\", \"internal\""),
            );
            Issuer::Acme
        }
    }
}

/// A `cert_file`/`key_file` pair under `field`: both or neither.
fn cert_files(
    b: &mut Builder,
    field: &str,
    (cert, key): (&Option<String>, &Option<String>),
    base: &Path,
) -> Option<CertFiles> {
    match (cert, key) {
        (Some(cert), Some(key)) => Some(CertFiles {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        (Some(_), None) => {
            b.problem(format!("{field}.key_file"), "cert_file needs a key_file");
            None
        }
        (None, Some(_)) => {
            b.problem(format!("{field}.cert_file"), "key_file needs a cert_file");
            None
        }
    }
}

/// `localhost` and names under it, which no public CA signs (RFC 6761).
fn is_local_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

fn site_route(b: &mut Builder, field: &str, s: &FileSite, context: Context) -> Option<SiteRoute> {
    if s.held_by.is_empty() {
        for (set, key) in [
            (s.cert_file.is_some(), "cert_file"),
            (s.key_file.is_some(), "key_file"),
            (s.alpn.is_some(), "alpn"),
        ] {
            if set {
                b.problem(
                    format!("{field}.{key}"),
                    "applies only to sites with held_by (terminated here)",
                );
            }
        }
    }
    match (s.held_by.is_empty(), &s.passthrough) {
        (false, None) => held(b, field, s, context),
        (true, Some(raw)) => {
            if s.upstream.is_some() {
                b.problem(
                    format!("{field}.upstream"),
                    "upstream applies only to sites with held_by; a passthrough backend gets raw TLS",
                );
            }
            let backend = pool(b, &format!("{field}.passthrough"), raw, s)?;
            Some(SiteRoute::Passthrough { backend })
        }
        (false, Some(_)) => {
            b.problem(
                field.to_string(),
                "a site has either held_by (nodes terminate TLS) or passthrough, not both",
            );
            None
        }
        (true, None) => {
            b.problem(
                field.to_string(),
                "a site needs held_by (nodes that terminate TLS) or passthrough (a TLS backend)",
            );
            None
        }
    }
}

/// A pool of targets (one address, or a list with optional weights), with
/// the site's `drain` list and `health` applied.
fn pool(b: &mut Builder, field: &str, targets: &FileTargets, s: &FileSite) -> Option<Pool> {
    let listed: Vec<(String, &str, u32)> = match targets {
        FileTargets::One(raw) => vec![(field.to_string(), raw.as_str(), 1)],
        FileTargets::Many(list) => list
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                FileTarget::Addr(raw) => (format!("{field}[{i}]"), raw.as_str(), 1),
                FileTarget::Weighted(w) => (
                    format!("{field}[{i}].addr"),
                    w.addr.as_str(),
                    w.weight.unwrap_or(1),
                ),
            })
            .collect(),
    };
    if listed.is_empty() {
        b.problem(field, "a pool needs at least one target");
        return None;
    }
    let mut pool = Pool {
        targets: Vec::new(),
        checked: false,
    };
    for (at, raw, weight) in listed {
        let addr = b.addr(&at, raw)?;
        if pool.addrs().any(|a| a == addr) {
            b.problem(at, format!("{addr} is listed twice"));
            continue;
        }
        pool.targets.push(PoolTarget { addr, weight });
    }
    let site = field.rsplit_once('.').map_or(field, |(site, _)| site);
    for (i, raw) in s.drain.iter().flatten().enumerate() {
        let at = format!("{site}.drain[{i}]");
        let Some(addr) = b.addr(&at, raw) else {
            continue;
        };
        match pool.targets.iter_mut().find(|t| t.addr == addr) {
            Some(target) => target.weight = 0,
            None => b.problem(at, format!("{addr} is not a target of {field}")),
        }
    }
    pool.checked = match s.health.as_deref() {
        None | Some("none") => false,
        Some("tcp") => true,
        Some(other) => {
            b.problem(
                format!("{site}.health"),
                format!("{other:?} is not one of \"tcp\", \"none\""),
            );
            false
        }
    };
    if pool.targets.iter().all(|t| t.weight == 0) {
        b.warnings.push(Problem {
            field: field.to_string(),
            message: "every target is drained (weight 0): the site's connections fail".into(),
        });
    }
    Some(pool)
}

/// ALPN protocols offered after termination; `acme-tls/1` is reserved for
/// ACME's TLS-ALPN-01 challenge.
fn alpn(b: &mut Builder, field: &str, raw: Option<&[String]>) -> Vec<Vec<u8>> {
    let Some(raw) = raw else {
        return vec![b"http/1.1".to_vec()];
    };
    let mut out = Vec::new();
    for (i, protocol) in raw.iter().enumerate() {
        let field = format!("{field}.alpn[{i}]");
        if protocol.is_empty() || protocol.len() > 255 {
            b.problem(field, "an ALPN protocol is 1 to 255 bytes");
        } else if protocol == "acme-tls/1" {
            b.problem(field, "\"acme-tls/1\" is reserved for ACME challenges");
        } else {
            out.push(protocol.as_bytes().to_vec());
        }
    }
    out
}

/// `[internal_ca]`: an existing CA's files, and the leaves' lifetime.
fn internal_ca(
    b: &mut Builder,
    ca: Option<&super::file::FileInternalCa>,
    base: &Path,
) -> InternalCa {
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    let Some(ca) = ca else {
        return InternalCa {
            files: None,
            lifetime: WEEK,
        };
    };
    let files = cert_files(b, "internal_ca", (&ca.cert_file, &ca.key_file), base);
    let lifetime = b.duration("internal_ca.lifetime", ca.lifetime.as_deref(), WEEK);
    InternalCa { files, lifetime }
}

fn acme(
    b: &mut Builder,
    a: &super::file::FileAcme,
    source: &str,
    state_dir: Option<&Path>,
) -> Acme {
    use base64::Engine;
    let key_type = match a.key_type.as_deref() {
        None | Some("ecdsa-p256") => KeyType::EcdsaP256,
        Some("ecdsa-p384") => KeyType::EcdsaP384,
        Some("rsa-2048") => KeyType::Rsa2048,
        Some(other) => {
            b.problem(
                "acme.key_type",
                format!("{other:?} is not one of \"ecdsa-p256\", \"ecdsa-p384\", \"rsa-2048\""),
            );
            KeyType::EcdsaP256
        }
    };
    let eab = a.eab.as_ref().and_then(|eab| {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        match engine.decode(eab.hmac_key.trim_end_matches('=')) {
            Ok(key) => Some((eab.kid.clone(), key)),
            Err(e) => {
                b.problem("acme.eab.hmac_key", format!("not base64url: {e}"));
                None
            }
        }
    });
    if !a.directory.starts_with("https://") {
        b.problem(
            "acme.directory",
            format!("{:?} is not an https:// URL", a.directory),
        );
    }
    let retry_min = b.duration(
        "acme.retry_min",
        a.retry_min.as_deref(),
        Duration::from_secs(30),
    );
    let retry_max = b.duration(
        "acme.retry_max",
        a.retry_max.as_deref(),
        Duration::from_secs(6 * 3600),
    );
    Acme {
        directory: a.directory.clone(),
        contact: a.contact.clone(),
        state_dir: match (&a.state_dir, state_dir) {
            (Some(dir), _) => base_dir(source).join(dir),
            (None, Some(dir)) => dir.to_path_buf(),
            (None, None) => {
                b.problem(
                    "state_dir",
                    "[acme] needs a state_dir (top level, or acme.state_dir)",
                );
                std::path::PathBuf::new()
            }
        },
        ca_file: a.ca_file.as_ref().map(|f| base_dir(source).join(f)),
        profile: a.profile.clone(),
        eab,
        shared_account: a.shared_account,
        key_type,
        retry_min,
        retry_max: retry_max.max(retry_min),
    }
}

/// A site this node holds with no way to get a certificate here and no
/// other holder to splice to: every connection for it is refused.
fn check_sources(b: &mut Builder, config: &Config) {
    for (id, site) in config.sites.iter().enumerate() {
        let SiteRoute::Held { issuer, .. } = &site.route else {
            continue;
        };
        let sourceless = *issuer == Issuer::Acme && config.acme.is_none();
        let id = SiteId(id);
        if sourceless && config.holds(id) && config.other_holders(id).is_empty() {
            b.warnings.push(Problem {
                field: format!("sites[{}]", site.index),
                message: format!(
                    "{}: no certificate source here (no cert_file, no [acme], not internal) and no other holder \
                     to splice to: its connections are refused",
                    site.label
                ),
            });
        }
    }
}

/// The internal CA keeps its root and leaves in `state_dir`.
fn check_internal(b: &mut Builder, config: &Config) {
    if config.state_dir.is_some() {
        return;
    }
    if let Some(site) = config.internal_sites().first() {
        b.problem(
            format!("sites[{}].issuer", config.site(*site).index),
            format!(
                "{}: the internal CA needs a state_dir (top level) for its root and leaves",
                config.site(*site).label
            ),
        );
    }
}

/// ACME rules that need the whole config: wildcards cannot be validated
/// over HTTP-01, and identical identifier sets from several holders count
/// against the CA's duplicate-certificate limit.
fn check_acme(b: &mut Builder, config: &Config) {
    let Some(acme) = &config.acme else { return };
    for site in config.acme_sites() {
        let s = config.site(site);
        let SiteRoute::Held {
            holders, challenge, ..
        } = &s.route
        else {
            continue;
        };
        for name in s.names.iter().filter(|n| n.is_wildcard()) {
            if *challenge == Challenge::Http01 {
                b.problem(
                    format!("sites[{}].names", s.index),
                    format!(
                        "{name}: wildcard names cannot be validated over HTTP-01; add a [dns01] section \
                         (RFC 2136 updates), or give this site a cert_file"
                    ),
                );
            }
        }
        let same_sets = holders
            .iter()
            .filter(|h| config.node(**h).acme_name.is_none())
            .count();
        let short = acme.profile.as_deref().is_some_and(|p| p.contains("short"));
        if short && same_sets > 1 {
            b.warnings.push(Problem {
                field: format!("sites[{}].held_by", s.index),
                message: format!(
                    "{same_sets} holders would order the identical identifier set for {} with a short-lived profile; \
                     set [[nodes]] acme_name to keep their orders distinct",
                    s.label
                ),
            });
        }
    }
}

//! A digest of the fleet-wide part of a config: the nodes and the sites,
//! which every node of a fleet should share. Node-local settings
//! (`this_node`, binds, certificate paths, timeouts, limits, ACME) are left
//! out, so only a real disagreement about routing shows as drift.
//!
//! The digest is SipHash-1-3 with an all-zero key over a canonical text of
//! those parts, with nodes, sites, names and holders sorted: the order of
//! entries in the file and the spelling of names (case, trailing dot) do
//! not change it, and neither does the toolchain that built the node.

use std::fmt::Write as _;
use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use super::{Config, HttpMode, ProxyVersion, SiteRoute};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FleetDigest(pub u64);

impl std::fmt::Display for FleetDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FleetDigest {
    /// Parses the 16 hex digits that `Display` writes.
    pub fn parse(text: &str) -> Option<FleetDigest> {
        if text.len() != 16 {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(FleetDigest)
    }
}

pub(super) fn compute(config: &Config) -> FleetDigest {
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(canonical(config).as_bytes());
    FleetDigest(h.finish())
}

/// One line per node and per site, sorted.
fn canonical(config: &Config) -> String {
    let mut lines: Vec<String> = Vec::new();
    for (ip, node) in &config.node_addresses {
        lines.push(format!("address {ip} {}", config.node(*node).name));
    }
    for node in &config.nodes {
        lines.push(format!(
            "node {} tls={} http={} acme_name={}",
            node.name,
            node.tls,
            node.http,
            node.acme_name.as_deref().unwrap_or("-")
        ));
    }
    for site in &config.sites {
        let mut names: Vec<String> = site.names.iter().map(ToString::to_string).collect();
        names.sort();
        let mut line = format!("site {}", names.join(","));
        match &site.route {
            SiteRoute::Held {
                holders,
                upstream,
                alpn,
                ..
            } => {
                let mut holders: Vec<&str> = holders
                    .iter()
                    .map(|h| config.node(*h).name.as_str())
                    .collect();
                holders.sort_unstable();
                let alpn: Vec<String> = alpn
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                let _ = write!(
                    line,
                    " held_by={} upstream={upstream} alpn={}",
                    holders.join(","),
                    alpn.join(",")
                );
            }
            SiteRoute::Passthrough { backend } => {
                let _ = write!(line, " passthrough={backend}");
            }
        }
        let proxy = match site.proxy_protocol {
            None => "none",
            Some(ProxyVersion::V1) => "v1",
            Some(ProxyVersion::V2) => "v2",
        };
        let http = match site.http {
            HttpMode::Redirect => "redirect",
            HttpMode::Upstream => "upstream",
        };
        let _ = write!(line, " proxy_protocol={proxy} http={http}");
        // Only when set, so configs without lists keep their digest.
        for (field, nets) in [("allow", &site.access.allow), ("deny", &site.access.deny)] {
            if !nets.is_empty() {
                let mut nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
                nets.sort();
                let _ = write!(line, " {field}={}", nets.join(","));
            }
        }
        lines.push(line);
    }
    lines.sort();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    use crate::test_helpers::FLEET;

    fn digest(text: &str, node: Option<&str>) -> String {
        Config::parse(text, "t", node).unwrap().digest.to_string()
    }

    #[test]
    fn every_node_of_one_file_agrees() {
        assert_eq!(digest(FLEET, None), digest(FLEET, Some("b")));
    }

    #[test]
    fn order_spelling_and_local_settings_do_not_count() {
        let reordered = FLEET
            .replace(
                r#"["one.test", "*.one.test"]"#,
                r#"["*.one.test", "ONE.test."]"#,
            )
            .replace(r#"["a", "b"]"#, r#"["b", "a"]"#);
        let local = format!("{FLEET}\n[timeouts]\nidle = \"1m\"\n");
        assert_eq!(digest(FLEET, None), digest(&reordered, None));
        assert_eq!(digest(FLEET, None), digest(&local, None));
    }

    #[test]
    fn a_routing_change_does() {
        let fewer_holders = FLEET.replace(r#"["b", "c"]"#, r#"["b"]"#);
        let other_backend = FLEET.replace("127.0.0.1:9443", "127.0.0.1:9444");
        assert_ne!(digest(FLEET, None), digest(&fewer_holders, None));
        assert_ne!(digest(FLEET, None), digest(&other_backend, None));
        assert_ne!(digest(&fewer_holders, None), digest(&other_backend, None));
    }

    #[test]
    fn it_reads_back() {
        let config = Config::parse(FLEET, "t", None).unwrap();
        let text = config.digest.to_string();
        assert_eq!(super::FleetDigest::parse(&text), Some(config.digest));
        assert_eq!(super::FleetDigest::parse("xyz"), None);
    }
}

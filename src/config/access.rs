//! Who may reach a site: allow and deny lists of client networks, checked
//! on the real client address (a trusted PROXY header's, else the socket
//! peer's) once the name is known.

use std::net::IpAddr;

use ipnet::IpNet;

/// A site's lists, after `[defaults]` (a site's own list replaces the
/// default one of the same kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Empty: every client not denied.
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

/// Why a client was refused: the `reason` label of the denial counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// In a `deny` network (deny beats allow).
    DenyListed,
    /// The site has an `allow` list and the client is in none of it.
    NotAllowed,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::DenyListed => "deny_listed",
            Denial::NotAllowed => "not_allowed",
        }
    }
}

impl Access {
    /// Whether `client` may reach the site.
    pub fn check(&self, client: IpAddr) -> Result<(), Denial> {
        let client = super::canonical(client);
        if self.deny.iter().any(|net| net.contains(&client)) {
            return Err(Denial::DenyListed);
        }
        if self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&client)) {
            return Ok(());
        }
        Err(Denial::NotAllowed)
    }

    /// No client at all can pass: every allowed network (or, without an
    /// allow list, each whole address family) lies inside a denied one.
    pub fn denies_everything(&self) -> bool {
        let everything: [IpNet; 2] = [IpNet::V4(Default::default()), IpNet::V6(Default::default())];
        let allowed = if self.allow.is_empty() {
            &everything[..]
        } else {
            &self.allow[..]
        };
        allowed
            .iter()
            .all(|a| self.deny.iter().any(|d| d.contains(a)))
    }
}

/// A network as written: `203.0.113.0/24`, `2001:db8::/32`, or one address
/// (`/32` or `/128`). Host bits must be zero, so a typo is not a wider net.
pub fn parse_net(raw: &str) -> Result<IpNet, String> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(IpNet::from(super::canonical(ip)));
    }
    let net: IpNet = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not an IP network (ADDRESS/PREFIX) or address"))?;
    if net.trunc() != net {
        return Err(format!(
            "{raw:?} has host bits set: the network is {}",
            net.trunc()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allow: &[&str], deny: &[&str]) -> Access {
        let nets = |list: &[&str]| list.iter().map(|n| parse_net(n).unwrap()).collect();
        Access {
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    fn ip(raw: &str) -> IpAddr {
        raw.parse().unwrap()
    }

    #[test]
    fn deny_beats_allow_and_an_empty_allow_list_admits_everyone() {
        let a = access(&["203.0.113.0/24", "2001:db8::/32"], &["203.0.113.66"]);
        assert_eq!(a.check(ip("203.0.113.5")), Ok(()));
        assert_eq!(a.check(ip("::ffff:203.0.113.5")), Ok(()));
        assert_eq!(a.check(ip("2001:db8::1")), Ok(()));
        assert_eq!(a.check(ip("203.0.113.66")), Err(Denial::DenyListed));
        assert_eq!(a.check(ip("198.51.100.1")), Err(Denial::NotAllowed));
        let open = access(&[], &["192.0.2.0/24"]);
        assert_eq!(open.check(ip("198.51.100.1")), Ok(()));
        assert_eq!(open.check(ip("192.0.2.9")), Err(Denial::DenyListed));
    }

    #[test]
    fn a_list_that_denies_everything_is_recognised() {
        assert!(access(&[], &["0.0.0.0/0", "::/0"]).denies_everything());
        assert!(access(&["10.0.0.0/8"], &["10.0.0.0/7"]).denies_everything());
        assert!(!access(&[], &["0.0.0.0/0"]).denies_everything());
        assert!(!access(&["10.0.0.0/8"], &["10.1.0.0/16"]).denies_everything());
        assert!(!Access::default().denies_everything());
    }

    #[test]
    fn networks_are_parsed_strictly() {
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert!(
            parse_net("192.0.2.7/24")
                .unwrap_err()
                .contains("192.0.2.0/24")
        );
        assert!(parse_net("192.0.2.0/33").is_err());
        assert!(parse_net("example.org").is_err());
    }
}

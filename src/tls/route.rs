//! The routing decision for a TLS connection: pure, no I/O.

use std::net::IpAddr;

use crate::forward::rendezvous;

use crate::config::{Config, Denial, NodeId, Ordered, SiteId, SiteRoute};

/// What to do with a connection whose ClientHello has been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This node holds the site and a valid certificate for the name.
    Terminate {
        site: SiteId,
    },
    /// Another node holds the site: try these in order.
    Splice {
        site: SiteId,
        holders: Vec<NodeId>,
    },
    /// Raw TLS to the site's backends (they have their own
    /// certificates), in the client's order.
    Passthrough {
        site: SiteId,
        backends: Ordered,
    },
    Reject(Reject),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No SNI and no default site for the listener.
    NoSni,
    /// A name in no site: we are never an open proxy.
    UnknownName,
    /// Held here, no valid certificate, and no other holder to splice to.
    NoHolder,
    /// Spliced here by a node, and we cannot terminate it: splicing on could loop.
    LoopGuard,
    /// The site's allow/deny lists refuse the client.
    Denied { site: SiteId, denial: Denial },
}

/// What kind of route a connection took: the `decision` label of logs and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    Terminate,
    Splice,
    Passthrough,
    Reject,
}

impl DecisionKind {
    /// Every kind, so metrics can hold a series for each; in this order,
    /// `self as usize` indexes it.
    pub const ALL: [DecisionKind; 4] = [
        DecisionKind::Terminate,
        DecisionKind::Splice,
        DecisionKind::Passthrough,
        DecisionKind::Reject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Terminate => "terminate",
            DecisionKind::Splice => "splice",
            DecisionKind::Passthrough => "passthrough",
            DecisionKind::Reject => "reject",
        }
    }
}

impl Decision {
    pub fn kind(&self) -> DecisionKind {
        match self {
            Decision::Terminate { .. } => DecisionKind::Terminate,
            Decision::Splice { .. } => DecisionKind::Splice,
            Decision::Passthrough { .. } => DecisionKind::Passthrough,
            Decision::Reject(_) => DecisionKind::Reject,
        }
    }

    pub fn site(&self) -> Option<SiteId> {
        match self {
            Decision::Terminate { site }
            | Decision::Splice { site, .. }
            | Decision::Passthrough { site, .. } => Some(*site),
            Decision::Reject(_) => None,
        }
    }
}

impl Reject {
    pub fn kind(self) -> &'static str {
        match self {
            Reject::NoSni => "no_sni",
            Reject::UnknownName => "unknown_name",
            Reject::NoHolder => "no_holder",
            Reject::LoopGuard => "loop_guard",
            Reject::Denied { .. } => "denied",
        }
    }
}

/// Who is asking, as far as routing cares.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The original client (from a trusted PROXY header, else the socket peer).
    pub client: IpAddr,
    /// Spliced here by a node; see [`crate::preface::Ends::via_node`].
    pub spliced_by_node: bool,
}

/// Decides a connection's route.
///
/// `listener` indexes `config.listeners`; `can_terminate(site, name)` says
/// whether this node has a certificate valid now for `name`.
///
/// Ties: exact name beats wildcard (see [`crate::names`]); without SNI the
/// listener's default site beats the global one. The site's access lists
/// come before anything else about it, so a refused client causes no
/// outbound connection, and a holder judges a spliced client again by the
/// address its PROXY header carries.
pub fn decide(
    config: &Config,
    listener: usize,
    sni: Option<&str>,
    peer: Peer,
    can_terminate: impl Fn(SiteId, &str) -> bool,
) -> Decision {
    let site = match sni {
        Some(name) => match config.names.get(name) {
            Some(site) => *site,
            None => return Decision::Reject(Reject::UnknownName),
        },
        None => {
            let listener_default = config.listeners.get(listener).and_then(|l| l.default_site);
            match listener_default.or(config.default_site) {
                Some(site) => site,
                None => return Decision::Reject(Reject::NoSni),
            }
        }
    };
    if let Err(denial) = config.site(site).access.check(peer.client) {
        return Decision::Reject(Reject::Denied { site, denial });
    }
    let name = sni.unwrap_or(&config.site(site).label);
    match &config.site(site).route {
        SiteRoute::Passthrough { backend } => Decision::Passthrough {
            site,
            backends: backend.order(peer.client),
        },
        SiteRoute::Held { holders, .. } => {
            if holders.contains(&config.this_node) && can_terminate(site, name) {
                return Decision::Terminate { site };
            }
            if peer.spliced_by_node {
                return Decision::Reject(Reject::LoopGuard);
            }
            let others: Vec<NodeId> = holders
                .iter()
                .copied()
                .filter(|h| *h != config.this_node)
                .collect();
            if others.is_empty() {
                return Decision::Reject(Reject::NoHolder);
            }
            Decision::Splice {
                site,
                holders: rendezvous(config, others, peer.client),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_helpers::FLEET;

    fn config() -> Config {
        Config::parse(FLEET, "test", None).unwrap()
    }

    fn client() -> Peer {
        Peer {
            client: "192.0.2.7".parse().unwrap(),
            spliced_by_node: false,
        }
    }

    fn node_peer() -> Peer {
        Peer {
            client: "192.0.2.7".parse().unwrap(),
            spliced_by_node: true,
        }
    }

    #[test]
    fn held_with_certificate_terminates() {
        let c = config();
        let d = decide(&c, 0, Some("x.shared.test"), client(), |_, _| true);
        assert_eq!(d, Decision::Terminate { site: SiteId(0) });
    }

    #[test]
    fn held_without_certificate_splices_to_other_holders() {
        let c = config();
        match decide(&c, 0, Some("shared.test"), client(), |_, _| false) {
            Decision::Splice { site, mut holders } => {
                assert_eq!(site, SiteId(0));
                holders.sort();
                assert_eq!(holders, vec![NodeId(1), NodeId(2)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exact_name_beats_wildcard() {
        let c = config();
        let d = decide(&c, 0, Some("www.shared.test"), client(), |_, _| true);
        assert_eq!(d.site(), Some(SiteId(1)));
        assert_eq!(d.kind(), DecisionKind::Splice);
    }

    #[test]
    fn passthrough_and_unknown() {
        let c = config();
        let d = decide(&c, 0, Some("pass.test"), client(), |_, _| true);
        assert_eq!(
            d,
            Decision::Passthrough {
                site: SiteId(2),
                backends: Ordered::One("127.0.0.1:9443".parse().unwrap())
            }
        );
        let d = decide(&c, 0, Some("nope.test"), client(), |_, _| true);
        assert_eq!(d, Decision::Reject(Reject::UnknownName));
    }

    #[test]
    fn no_sni_uses_listener_then_global_default() {
        let c = config();
        assert_eq!(
            decide(&c, 1, None, client(), |_, _| false).site(),
            Some(SiteId(1))
        );
        assert_eq!(
            decide(&c, 0, None, client(), |_, _| false).site(),
            Some(SiteId(2))
        );
        let mut c = c;
        c.default_site = None;
        assert_eq!(
            decide(&c, 0, None, client(), |_, _| false),
            Decision::Reject(Reject::NoSni)
        );
    }

    #[test]
    fn loop_guard_never_splices_a_node_connection_onward() {
        let c = config();
        let d = decide(&c, 0, Some("www.shared.test"), node_peer(), |_, _| true);
        assert_eq!(d, Decision::Reject(Reject::LoopGuard));
        let d = decide(&c, 0, Some("shared.test"), node_peer(), |_, _| true);
        assert_eq!(d, Decision::Terminate { site: SiteId(0) });
        let d = decide(&c, 0, Some("shared.test"), node_peer(), |_, _| false);
        assert_eq!(d, Decision::Reject(Reject::LoopGuard));
    }

    #[test]
    fn a_refused_client_is_denied_before_any_route_even_through_a_node() {
        let mut c = config();
        let net = |raw: &str| raw.parse().unwrap();
        c.sites[0].access.allow = vec![net("198.51.100.0/24")];
        c.sites[0].access.deny = vec![net("198.51.100.66/32")];
        let denied = |client: &str, spliced_by_node| {
            let peer = Peer {
                client: client.parse().unwrap(),
                spliced_by_node,
            };
            decide(&c, 0, Some("shared.test"), peer, |_, _| true)
        };
        let site = SiteId(0);
        assert_eq!(
            denied("192.0.2.7", false),
            Decision::Reject(Reject::Denied {
                site,
                denial: Denial::NotAllowed
            })
        );
        assert_eq!(
            denied("198.51.100.66", true),
            Decision::Reject(Reject::Denied {
                site,
                denial: Denial::DenyListed
            })
        );
        assert_eq!(denied("198.51.100.7", true), Decision::Terminate { site });
    }

    #[test]
    fn sole_holder_without_certificate_rejects() {
        let c = config();
        let d = decide(&c, 0, Some("solo.test"), client(), |_, _| false);
        assert_eq!(d, Decision::Reject(Reject::NoHolder));
    }

    #[test]
    fn rendezvous_is_stable_and_spreads() {
        let c = config();
        let mut first = std::collections::HashMap::new();
        for i in 0..200u8 {
            let peer = Peer {
                client: IpAddr::from([198, 51, 100, i]),
                spliced_by_node: false,
            };
            let a = decide(&c, 0, Some("www.shared.test"), peer, |_, _| false);
            let b = decide(&c, 0, Some("www.shared.test"), peer, |_, _| false);
            assert_eq!(a, b);
            if let Decision::Splice { holders, .. } = a {
                *first.entry(holders[0]).or_insert(0) += 1;
            }
        }
        assert_eq!(first.len(), 2);
        assert!(first.values().all(|n| *n > 50), "{first:?}");
    }
}

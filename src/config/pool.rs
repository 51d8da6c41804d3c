//! A site's backends as a pool: passthrough backends or a held site's
//! upstreams, each with a weight. Ordering a pool for a client is pure;
//! which targets are healthy is the forwarding engine's business.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolTarget {
    pub addr: SocketAddr,
    /// Relative share of clients; 0 = drained (no new connections).
    pub weight: u32,
}

/// One or more targets, in the order the file lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub targets: Vec<PoolTarget>,
    /// Connect to each target every few seconds (`health = "tcp"`).
    pub checked: bool,
}

/// A pool's targets in a client's order: no allocation for the common
/// pool of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ordered {
    One(SocketAddr),
    Many(Vec<SocketAddr>),
}

impl Ordered {
    pub fn as_slice(&self) -> &[SocketAddr] {
        match self {
            Ordered::One(addr) => std::slice::from_ref(addr),
            Ordered::Many(addrs) => addrs,
        }
    }
}

impl Pool {
    pub fn one(addr: SocketAddr) -> Pool {
        Pool {
            targets: vec![PoolTarget { addr, weight: 1 }],
            checked: false,
        }
    }

    /// The targets not drained, by weighted rendezvous hashing on the
    /// client address: a client sticks to one target, clients spread by
    /// weight, and losing a target moves only its own clients.
    pub fn order(&self, client: IpAddr) -> Ordered {
        if let [only] = self.targets.as_slice() {
            return if only.weight > 0 {
                Ordered::One(only.addr)
            } else {
                Ordered::Many(Vec::new())
            };
        }
        let mut scored: Vec<(f64, SocketAddr)> = self
            .targets
            .iter()
            .filter(|t| t.weight > 0)
            .map(|t| (score(client, t.addr, t.weight), t.addr))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        Ordered::Many(scored.into_iter().map(|(_, addr)| addr).collect())
    }

    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.targets.iter().map(|t| t.addr)
    }
}

/// Weighted rendezvous: `weight / -ln(u)` with `u` in (0, 1) from
/// SipHash-1-3 (all-zero key) over the client as 16 bytes (IPv4 mapped)
/// and the target's text form. Every node computes the same order.
fn score(client: IpAddr, target: SocketAddr, weight: u32) -> f64 {
    let client = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(&client.octets());
    h.write(target.to_string().as_bytes());
    // 53 bits, shifted off zero: u in (0, 1).
    let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

/// As written in the file: one address alone, else a list with weights
/// other than 1 shown; the fleet digest and the route table use it.
impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", t.addr)?;
            if t.weight != 1 {
                write!(f, " (weight {})", t.weight)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32]) -> Pool {
        Pool {
            targets: weights
                .iter()
                .enumerate()
                .map(|(i, w)| PoolTarget {
                    addr: SocketAddr::from(([10, 0, 1, i as u8 + 1], 9000)),
                    weight: *w,
                })
                .collect(),
            checked: false,
        }
    }

    fn firsts(pool: &Pool) -> Vec<usize> {
        let mut counts = vec![0; pool.targets.len()];
        for i in 0..3000u32 {
            let client = IpAddr::from((0xC633_0000u32 + i).to_be_bytes());
            let order = pool.order(client);
            let first = order.as_slice()[0];
            counts[pool.targets.iter().position(|t| t.addr == first).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn clients_spread_by_weight_and_stick() {
        let even = firsts(&pool(&[1, 1, 1]));
        assert!(even.iter().all(|n| (800..1200).contains(n)), "{even:?}");
        let weighted = firsts(&pool(&[3, 1]));
        assert!((2000..2500).contains(&weighted[0]), "{weighted:?}");
        let p = pool(&[1, 1]);
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(p.order(client), p.order(client));
        assert_eq!(p.order(client).as_slice().len(), 2);
    }

    #[test]
    fn a_drained_target_gets_no_client() {
        let p = pool(&[1, 0, 1]);
        assert_eq!(firsts(&p)[1], 0);
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!p.order(client).as_slice().contains(&p.targets[1].addr));
        assert!(pool(&[0]).order(client).as_slice().is_empty());
    }

    #[test]
    fn one_address_displays_as_itself() {
        assert_eq!(pool(&[1]).to_string(), "10.0.1.1:9000");
        assert_eq!(
            pool(&[1, 0]).to_string(),
            "10.0.1.1:9000, 10.0.1.2:9000 (weight 0)"
        );
    }
}

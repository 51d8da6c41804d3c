//! PROXY protocol v1/v2: the header we send ahead of spliced or upstream
//! bytes, and the one we accept from nodes and trusted proxies. The wire
//! format is the `ppp` crate's; this module adds detection and bounds.

use std::net::SocketAddr;

use ppp::PartialResult;

use crate::config::{FleetDigest, ProxyVersion};

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// v1 headers are at most 107 bytes (spec 2.1); v2 with TLVs is bounded by
/// this cap so a peer cannot make us buffer an arbitrary "header".
pub const MAX_HEADER_LEN: usize = 536;

/// The PROXY v2 TLV type a node's splice carries its fleet digest in: the
/// first of the application range 0xE0-0xEF (spec section 2.2.7), which
/// other proxies ignore. The value is the digest's 8 bytes, big-endian.
pub const TLV_FLEET_DIGEST: u8 = 0xE0;

/// Where a proxied connection really came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedAddrs {
    /// `None` for v2 LOCAL or v1 UNKNOWN: a health check from the proxy itself.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// The sender's fleet digest, when a node sent the header.
    pub digest: Option<FleetDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decode {
    /// The input does not start with a PROXY header.
    Absent,
    Incomplete,
    Complete {
        len: usize,
        addrs: ProxiedAddrs,
    },
    Invalid,
}

/// Encodes a header announcing a TCP connection from `source` to `destination`.
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => {
            let (source, destination) = same_family(source, destination);
            ppp::v1::Addresses::from((source, destination))
                .to_string()
                .into_bytes()
        }
        ProxyVersion::V2 => encode_v2(source, destination, None),
    }
}

/// The v2 header a node sends ahead of a splice to another node: the
/// addresses and this node's fleet digest.
pub fn encode_from_node(
    source: SocketAddr,
    destination: SocketAddr,
    digest: FleetDigest,
) -> Vec<u8> {
    encode_v2(source, destination, Some(digest))
}

fn encode_v2(source: SocketAddr, destination: SocketAddr, digest: Option<FleetDigest>) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    let builder = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    );
    let built = match digest {
        Some(digest) => builder
            .write_tlv(TLV_FLEET_DIGEST, &digest.0.to_be_bytes())
            .and_then(ppp::v2::Builder::build),
        None => builder.build(),
    };
    // Writing into a Vec with a fixed-size address block cannot fail;
    // fall back to LOCAL (no address) rather than panic if it ever did.
    built.unwrap_or_else(|_| {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        local
    })
}

/// Both addresses must share a family; map IPv4 into IPv6 when they differ.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (to_v6(a), b),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (a, to_v6(b)),
        _ => (a, b),
    }
}

fn to_v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// Decodes a PROXY header at the start of `buf`, if there is one.
pub fn decode(buf: &[u8]) -> Decode {
    let looks_v2 = starts_like(buf, V2_SIGNATURE);
    let looks_v1 = starts_like(buf, V1_PREFIX);
    if !looks_v2 && !looks_v1 {
        return Decode::Absent;
    }
    let window = buf.get(..MAX_HEADER_LEN).unwrap_or(buf);
    if looks_v2 {
        let result = ppp::v2::Header::try_from(window);
        if result.is_incomplete() {
            return incomplete_or_invalid(buf);
        }
        return match result {
            Ok(header) => Decode::Complete {
                len: header.len(),
                addrs: from_v2(&header),
            },
            Err(_) => Decode::Invalid,
        };
    }
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return incomplete_or_invalid(buf);
    };
    let Some(line) = window.get(..end + 2) else {
        return Decode::Invalid;
    };
    match ppp::v1::Header::try_from(line) {
        Ok(header) => Decode::Complete {
            len: line.len(),
            addrs: from_v1(&header),
        },
        Err(_) => Decode::Invalid,
    }
}

fn incomplete_or_invalid(buf: &[u8]) -> Decode {
    if buf.len() >= MAX_HEADER_LEN {
        Decode::Invalid
    } else {
        Decode::Incomplete
    }
}

fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    n > 0 && buf.get(..n) == prefix.get(..n)
}

fn from_v2(header: &ppp::v2::Header<'_>) -> ProxiedAddrs {
    use ppp::v2::{Addresses, Command};
    let pair = match (header.command, header.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (Command::Proxy, Addresses::IPv6(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        _ => None,
    };
    let digest = header
        .tlvs()
        .filter_map(Result::ok)
        .find(|tlv| tlv.kind == TLV_FLEET_DIGEST)
        .and_then(|tlv| <[u8; 8]>::try_from(tlv.value.as_ref()).ok())
        .map(|bytes| FleetDigest(u64::from_be_bytes(bytes)));
    ProxiedAddrs {
        source: pair.map(|p| p.0),
        destination: pair.map(|p| p.1),
        digest,
    }
}

fn from_v1(header: &ppp::v1::Header<'_>) -> ProxiedAddrs {
    use ppp::v1::Addresses;
    let pair = match header.addresses {
        Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        Addresses::Unknown => None,
    };
    ProxiedAddrs {
        source: pair.map(|p| p.0),
        destination: pair.map(|p| p.1),
        digest: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips_both_versions_and_families() {
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            for (src, dst) in [
                (addr("192.0.2.1:4000"), addr("198.51.100.2:443")),
                (addr("[2001:db8::1]:4000"), addr("[2001:db8::2]:443")),
            ] {
                let mut bytes = encode(version, src, dst);
                let len = bytes.len();
                bytes.extend_from_slice(b"\x16\x03\x01");
                let want = Decode::Complete {
                    len,
                    addrs: ProxiedAddrs {
                        source: Some(src),
                        destination: Some(dst),
                        digest: None,
                    },
                };
                assert_eq!(decode(&bytes), want, "{version:?}");
                for end in 0..len {
                    assert_eq!(
                        decode(&bytes[..end]),
                        if end == 0 {
                            Decode::Absent
                        } else {
                            Decode::Incomplete
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn tls_and_garbage_are_not_headers() {
        assert_eq!(decode(b"\x16\x03\x01\x02\x00"), Decode::Absent);
        assert_eq!(decode(b"GET / HTTP/1.1"), Decode::Absent);
        assert_eq!(decode(b"PROXY TCP4 nonsense\r\n"), Decode::Invalid);
        assert_eq!(
            decode(&[b"PROXY ".as_slice(), &[b'1'; 600]].concat()),
            Decode::Invalid
        );
    }

    #[test]
    fn a_node_header_carries_the_fleet_digest() {
        let digest = FleetDigest(0x0123_4567_89ab_cdef);
        let bytes = encode_from_node(addr("192.0.2.1:4000"), addr("[::1]:443"), digest);
        let Decode::Complete { len, addrs } = decode(&bytes) else {
            panic!("{:?}", decode(&bytes));
        };
        assert_eq!(len, bytes.len());
        assert_eq!(addrs.digest, Some(digest));
        assert_eq!(addrs.source, Some(addr("[::ffff:192.0.2.1]:4000")));
    }

    #[test]
    fn mixed_families_are_mapped() {
        let bytes = encode(ProxyVersion::V2, addr("192.0.2.1:1"), addr("[::1]:2"));
        assert!(matches!(decode(&bytes), Decode::Complete { .. }));
    }
}

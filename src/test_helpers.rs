//! Helpers shared by unit tests, integration tests (`tests/support`
//! re-exports them) and benches: one home, so no copy drifts. Compiled for
//! this crate's tests and with the `test-helpers` feature, which the
//! crate's own dev-dependency on itself turns on; never in a release build.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The rustls ClientHello captured by `examples/capture_hello.rs`: SNI
/// `pass.test`, an ML-KEM key share, ALPN h2 and http/1.1, one record.
pub const HELLO: &[u8] = include_bytes!("../tests/data/hello-rustls-mlkem.bin");

/// [`HELLO`] with its 9-byte name `pass.test` swapped for another name of
/// the same length.
pub fn hello_for(name: &str) -> Vec<u8> {
    assert_eq!(name.len(), 9, "the name must keep the hello's length");
    let mut hello = HELLO.to_vec();
    let at = hello
        .windows(9)
        .position(|w| w == b"pass.test")
        .expect("name in capture");
    hello[at..at + 9].copy_from_slice(name.as_bytes());
    hello
}

/// Re-frames a single-record hello into `n` TLS records of similar size.
pub fn split_records(hello: &[u8], n: usize) -> Vec<u8> {
    let body = &hello[5..];
    let mut out = Vec::new();
    for part in body.chunks(body.len().div_ceil(n)) {
        out.extend_from_slice(&hello[..3]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// An upstream nobody listens on (the discard port), for sites whose
/// plaintext side a test does not reach.
pub const NOWHERE: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

/// A fleet of three nodes (a, b, c on 127.0.0.2-4) seen from a: a site
/// with a wildcard held by all three, one held by b and c, a passthrough
/// site (also the default), one held by a alone, and an extra listener.
pub const FLEET: &str = r#"
this_node = "a"
default_site = "pass.test"
[[nodes]]
name = "a"
tls = "127.0.0.2:443"
http = "127.0.0.2:80"
[[nodes]]
name = "b"
tls = "127.0.0.3:443"
http = "127.0.0.3:80"
[[nodes]]
name = "c"
tls = "127.0.0.4:443"
http = "127.0.0.4:80"
[[sites]]
names = ["shared.test", "*.shared.test"]
held_by = ["a", "b", "c"]
upstream = "127.0.0.1:9000"
[[sites]]
names = ["www.shared.test"]
held_by = ["b", "c"]
upstream = "127.0.0.1:9001"
[[sites]]
names = ["pass.test"]
passthrough = "127.0.0.1:9443"
[[sites]]
names = ["solo.test"]
held_by = ["a"]
upstream = "127.0.0.1:9002"
[[listeners]]
bind = "127.0.0.2:8443"
default_site = "www.shared.test"
"#;

/// A `[[sites]]` block passing `name` through to `backend`.
pub fn passthrough_site(name: &str, backend: SocketAddr) -> String {
    format!("[[sites]]\nnames = [\"{name}\"]\npassthrough = \"{backend}\"\n")
}

/// A `[[sites]]` block held by `holders` (node names), terminated to
/// `upstream`, with `more` lines (certificate files, `http = ...`).
pub fn held_site(names: &[&str], holders: &[&str], upstream: SocketAddr, more: &str) -> String {
    let quoted = |list: &[&str]| {
        list.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[sites]]\nnames = [{}]\nheld_by = [{}]\nupstream = \"{upstream}\"\n{more}",
        quoted(names),
        quoted(holders)
    )
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample in a text exposition (help, type and blank lines skipped).
/// Label values here never hold `,` or `"`: they come from closed sets.
pub fn samples(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)),
                None => (series, Vec::new()),
            };
            Some(Sample {
                name: name.to_string(),
                labels,
                value,
            })
        })
        .collect()
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let value = value.trim_matches('"');
            Some((key.trim().to_string(), value.to_string()))
        })
        .collect()
}

/// The value of `query` in a text exposition: `name` or `name{k="v",...}`,
/// matching every sample of that name whose labels include the query's, in
/// any order, and summing them; 0 when none matches.
pub fn metric_value(body: &str, query: &str) -> f64 {
    let query = query.trim();
    let (name, wanted) = match query.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
        None => (query, Vec::new()),
    };
    samples(body)
        .iter()
        .filter(|s| s.name == name && wanted.iter().all(|w| s.labels.contains(w)))
        .map(|s| s.value)
        .sum()
}

/// Waits (bounded) until something listens on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !accepts(addr).await {
        assert!(Instant::now() < deadline, "nothing ever listened on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether something listens on `addr`. A connect to a loopback port
/// nobody listens on can pick that same port as its source and connect to
/// itself (TCP simultaneous open): that is not a listener.
async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr)
        .await
        .is_ok_and(|s| s.local_addr().ok() != Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_matched_by_labels_in_any_order() {
        let body = "# HELP x_total help\n# TYPE x_total counter\n\
            x_total{a=\"1\",b=\"2\"} 3\nx_total{b=\"9\",a=\"1\"} 4\ny 7\n";
        assert_eq!(metric_value(body, "x_total{b=\"2\",a=\"1\"}"), 3.0);
        assert_eq!(metric_value(body, "x_total{a=\"1\"}"), 7.0);
        assert_eq!(metric_value(body, "y"), 7.0);
        assert_eq!(metric_value(body, "y "), 7.0);
        assert_eq!(metric_value(body, "x"), 0.0);
    }

    #[test]
    fn split_records_keeps_every_byte() {
        let split = split_records(HELLO, 3);
        assert_eq!(split.len(), HELLO.len() + 2 * 5);
    }
}

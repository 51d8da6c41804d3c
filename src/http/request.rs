//! Pure, bounded HTTP/1 request-head parsing (httparse does the syntax).

/// Largest request head we read. ACME validation requests and browsers'
/// plain-HTTP requests are far smaller; larger heads get 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers a head may carry; more is 431 too.
const MAX_HEADERS: usize = 64;
/// The header a node adds when it forwards a challenge request to a peer;
/// its value is the sender's fleet digest.
pub const FORWARDED_MARK: &str = "sni-router-forwarded";

use crate::config::FleetDigest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// Host, lowercased, port and trailing dot stripped; `None` if absent or invalid.
    pub host: Option<String>,
    /// Carries the forwarded mark (trusted only from node addresses).
    pub forwarded: bool,
    /// The fleet digest the mark carried, if it was one.
    pub forwarded_digest: Option<FleetDigest>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    Complete(Head),
    Incomplete,
    Invalid(Invalid),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("malformed request head")]
    Malformed,
    #[error("request head too large")]
    TooLarge,
}

impl Invalid {
    pub fn kind(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed",
            Invalid::TooLarge => "too_large",
        }
    }
}

pub fn parse(buf: &[u8]) -> Parse {
    let window = buf.get(..MAX_HEAD_BYTES).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| host_name(h.value));
            let mark = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(FORWARDED_MARK));
            let forwarded_digest = mark
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| FleetDigest::parse(v.trim()));
            Parse::Complete(Head {
                method: request.method.unwrap_or_default().to_string(),
                target: request.path.unwrap_or_default().to_string(),
                host,
                forwarded: mark.is_some(),
                forwarded_digest,
                len,
            })
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            Parse::Invalid(Invalid::TooLarge)
        }
        Ok(httparse::Status::Partial) => Parse::Incomplete,
        Err(httparse::Error::TooManyHeaders) => Parse::Invalid(Invalid::TooLarge),
        Err(_) => Parse::Invalid(Invalid::Malformed),
    }
}

/// `Host` without port, normalized like an SNI name.
fn host_name(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let name = match value.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => value,
    };
    crate::names::normalize_name(name.as_bytes())
}

crate::impl_preface!(Head, MAX_HEAD_BYTES);

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] =
        b"GET /.well-known/acme-challenge/abc?x=1 HTTP/1.1\r\nHost: WWW.Example.org.:80\r\nUser-Agent: t\r\n\r\nbody";

    #[test]
    fn parses_a_head_and_every_prefix_is_incomplete() {
        let head = match parse(REQUEST) {
            Parse::Complete(head) => head,
            other => panic!("{other:?}"),
        };
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/.well-known/acme-challenge/abc?x=1");
        assert_eq!(head.host.as_deref(), Some("www.example.org"));
        assert!(!head.forwarded);
        assert_eq!(head.len, REQUEST.len() - 4);
        for end in 0..head.len {
            assert_eq!(parse(&REQUEST[..end]), Parse::Incomplete, "prefix {end}");
        }
    }

    #[test]
    fn forwarded_mark_and_bad_hosts() {
        let head = b"GET / HTTP/1.1\r\nhost: bad host\r\nSNI-Router-Forwarded: 1\r\n\r\n";
        match parse(head) {
            Parse::Complete(h) => {
                assert_eq!(h.host, None);
                assert!(h.forwarded);
                assert_eq!(h.forwarded_digest, None);
            }
            other => panic!("{other:?}"),
        }
        let head =
            b"GET / HTTP/1.1\r\nhost: a.test\r\nsni-router-forwarded: 00000000000000ff\r\n\r\n";
        match parse(head) {
            Parse::Complete(h) => assert_eq!(h.forwarded_digest, Some(FleetDigest(255))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_oversize() {
        assert_eq!(
            parse(b"\x16\x03\x01\x00\x05hello"),
            Parse::Invalid(Invalid::Malformed)
        );
        let big = [b"GET / HTTP/1.1\r\nx: ".as_slice(), &[b'a'; MAX_HEAD_BYTES]].concat();
        assert_eq!(parse(&big), Parse::Invalid(Invalid::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Parse::Invalid(Invalid::TooLarge));
    }
}

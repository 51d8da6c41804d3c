//! Pure, bounded ClientHello reassembly and parsing.
//!
//! A ClientHello may arrive in any number of TCP segments and may be split
//! across several TLS records (legal, and real once post-quantum key shares
//! make hellos ~2 KB). [`parse`] is called on everything read so far and says
//! Complete, Incomplete or Invalid; it never reads past [`MAX_HELLO_BYTES`].

use std::borrow::Cow;

use tls_parser::{
    SNIType, TlsCipherEnc, TlsCipherEncMode, TlsCipherSuite, TlsCipherSuiteID, TlsExtension,
    TlsExtensionType, TlsMessage, TlsMessageHandshake, parse_tls_extension_sni_content,
    parse_tls_extension_unknown, parse_tls_message_handshake,
};

/// Largest handshake message we reassemble. Real hellos, even with ML-KEM
/// key shares and many extensions, stay well under this; anything larger is
/// a resource attack.
pub const MAX_HANDSHAKE_LEN: usize = 16 * 1024;

/// A ClientHello spread over more records than this is hostile: each record
/// costs a header and a parse step, and no client fragments that finely.
pub const MAX_RECORDS: usize = 32;

/// The byte cap for the whole hello phase: handshake plus record headers.
pub const MAX_HELLO_BYTES: usize = MAX_HANDSHAKE_LEN + MAX_RECORDS * RECORD_HEADER_LEN;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// TLS records carry at most 2^14 bytes of plaintext (RFC 8446 5.1).
const MAX_RECORD_LEN: usize = 16 * 1024;

/// What the router needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name, lowercased, trailing dot stripped; `None` without SNI.
    pub sni: Option<String>,
    /// Bytes of the input that carry the hello (all its records).
    pub len: usize,
    /// Of the AEAD suites the client offers, it lists ChaCha20-Poly1305
    /// before AES-GCM: the sign of a client without AES hardware.
    pub chacha_first: bool,
}

/// The outcome of looking at the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    Complete(ClientHello),
    Incomplete,
    Invalid(Invalid),
}

/// Why bytes are not a ClientHello we accept. `kind()` gives a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not a TLS handshake record")]
    NotTls,
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("ClientHello exceeds the size cap")]
    TooLarge,
    #[error("malformed ClientHello")]
    Malformed,
    #[error("server name is not a valid DNS name")]
    BadServerName,
}

impl Invalid {
    pub fn kind(self) -> &'static str {
        match self {
            Invalid::NotTls => "not_tls",
            Invalid::NotClientHello => "not_client_hello",
            Invalid::TooLarge => "too_large",
            Invalid::Malformed => "malformed",
            Invalid::BadServerName => "bad_server_name",
        }
    }
}

/// Parses the ClientHello at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parse {
    match reassemble(buf) {
        Ok(Some((handshake, len))) => match extract(&handshake) {
            Ok((sni, chacha_first)) => Parse::Complete(ClientHello {
                sni,
                len,
                chacha_first,
            }),
            Err(e) => Parse::Invalid(e),
        },
        Ok(None) => Parse::Incomplete,
        Err(e) => Parse::Invalid(e),
    }
}

/// A whole handshake message and how many input bytes its records span.
type Reassembled<'a> = (Cow<'a, [u8]>, usize);

/// Collects the fragments of the first handshake message from consecutive
/// records. Returns the message and how many input bytes its records span,
/// or `None` while more bytes are needed.
fn reassemble(buf: &[u8]) -> Result<Option<Reassembled<'_>>, Invalid> {
    let mut fragments: Vec<&[u8]> = Vec::new();
    let mut have = 0usize;
    let mut pos = 0usize;
    loop {
        let Some(&[content_type, major, _, len_hi, len_lo]) = buf.get(pos..pos + RECORD_HEADER_LEN)
        else {
            check_partial_header(buf.get(pos..).unwrap_or_default())?;
            return Ok(None);
        };
        let record_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if content_type != CONTENT_TYPE_HANDSHAKE || major != 3 {
            return Err(if fragments.is_empty() {
                Invalid::NotTls
            } else {
                Invalid::Malformed
            });
        }
        if record_len == 0 || record_len > MAX_RECORD_LEN {
            return Err(Invalid::Malformed);
        }
        if fragments.len() == MAX_RECORDS {
            return Err(Invalid::TooLarge);
        }
        let body_start = pos + RECORD_HEADER_LEN;
        let Some(body) = buf.get(body_start..body_start + record_len) else {
            // Judge the handshake header early so a huge announced length
            // fails now instead of after the client sends it all.
            let partial = buf.get(body_start..).unwrap_or_default();
            check_handshake_header(&fragments, partial)?;
            return Ok(None);
        };
        fragments.push(body);
        have += record_len;
        pos = body_start + record_len;
        if let Some(total) = check_handshake_header(&fragments, &[])?
            && have >= total
        {
            let message = join_prefix(&fragments, total);
            return Ok(Some((message, pos)));
        }
    }
}

/// Rejects early what can never become a TLS record header.
fn check_partial_header(partial: &[u8]) -> Result<(), Invalid> {
    match partial {
        [] => Ok(()),
        [t, ..] if *t != CONTENT_TYPE_HANDSHAKE => Err(Invalid::NotTls),
        [_, major, ..] if *major != 3 => Err(Invalid::NotTls),
        _ => Ok(()),
    }
}

/// Once the 4-byte handshake header is available, returns the message's full
/// length (header included), after checking type and size.
fn check_handshake_header(fragments: &[&[u8]], extra: &[u8]) -> Result<Option<usize>, Invalid> {
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let bytes = fragments.iter().copied().flatten().chain(extra);
    let mut n = 0;
    for (slot, byte) in header.iter_mut().zip(bytes) {
        *slot = *byte;
        n += 1;
    }
    if n >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(Invalid::NotClientHello);
    }
    if n < HANDSHAKE_HEADER_LEN {
        return Ok(None);
    }
    let body_len =
        usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    if body_len > MAX_HANDSHAKE_LEN {
        return Err(Invalid::TooLarge);
    }
    Ok(Some(HANDSHAKE_HEADER_LEN + body_len))
}

/// The first `len` bytes of the fragments, borrowed when one record holds them.
fn join_prefix<'a>(fragments: &[&'a [u8]], len: usize) -> Cow<'a, [u8]> {
    if let [only] = fragments {
        return Cow::Borrowed(only.get(..len).unwrap_or(only));
    }
    let mut joined: Vec<u8> = fragments.concat();
    joined.truncate(len);
    Cow::Owned(joined)
}

/// The SNI, and whether ChaCha20 comes before AES-GCM.
type Extracted = (Option<String>, bool);

/// Reads SNI, ALPN and the AEAD preference out of one complete ClientHello
/// handshake message.
fn extract(message: &[u8]) -> Result<Extracted, Invalid> {
    let hello = match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        _ => return Err(Invalid::Malformed),
    };
    let chacha_first = chacha_first(&hello.ciphers);
    let Some(ext) = hello.ext else {
        return Ok((None, chacha_first));
    };
    // Only SNI is ours to read. Every other extension (ALPN, key shares,
    // groups, signature schemes) is the terminator's or the backend's
    // business: its framing is checked, its content is not parsed. That
    // halves the work per hello and lets through extensions newer than
    // tls-parser.
    let mut sni = None;
    let mut rest = ext;
    while !rest.is_empty() {
        let Ok((after, TlsExtension::Unknown(kind, data))) = parse_tls_extension_unknown(rest)
        else {
            return Err(Invalid::Malformed);
        };
        rest = after;
        if kind != TlsExtensionType::ServerName {
            continue;
        }
        let content = parse_tls_extension_sni_content(data);
        match content {
            Ok((_, TlsExtension::SNI(entries))) => {
                let host = entries
                    .iter()
                    .find(|(kind, _)| *kind == SNIType::HostName)
                    .map(|(_, name)| *name);
                if let Some(host) = host {
                    sni = Some(crate::names::normalize_name(host).ok_or(Invalid::BadServerName)?);
                }
            }
            _ => return Err(Invalid::Malformed),
        }
    }
    Ok((sni, chacha_first))
}

/// Whether the first AEAD suite in the client's list is ChaCha20-Poly1305
/// rather than AES-GCM. GREASE values and suites unknown to tls-parser are
/// skipped.
fn chacha_first(suites: &[TlsCipherSuiteID]) -> bool {
    suites
        .iter()
        .filter_map(|id| TlsCipherSuite::from_id(id.0))
        .find_map(|suite| match (suite.enc, suite.enc_mode) {
            (TlsCipherEnc::Chacha20_Poly1305, _) => Some(true),
            (TlsCipherEnc::Aes, TlsCipherEncMode::Gcm) => Some(false),
            _ => None,
        })
        .unwrap_or(false)
}

crate::impl_preface!(ClientHello, MAX_HELLO_BYTES);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_helpers::{HELLO as RUSTLS_HELLO, split_records};

    fn complete(buf: &[u8]) -> ClientHello {
        match parse(buf) {
            Parse::Complete(hello) => hello,
            other => panic!("expected a complete hello, got {other:?}"),
        }
    }

    #[test]
    fn the_first_aead_suite_decides_chacha_first() {
        let ids = |list: &[u16]| -> Vec<TlsCipherSuiteID> {
            list.iter().map(|&id| TlsCipherSuiteID(id)).collect()
        };
        // GREASE, then TLS 1.3 ChaCha20 before AES-128-GCM: a phone without AES.
        assert!(chacha_first(&ids(&[0x0a0a, 0x1303, 0x1301])));
        // AES-CBC and the renegotiation SCSV are not AEAD choices: skipped.
        assert!(chacha_first(&ids(&[0x00ff, 0xc009, 0xcca9, 0xc02b])));
        assert!(!chacha_first(&ids(&[0x1302, 0x1303])));
        assert!(!chacha_first(&ids(&[0xc02f, 0xcca8])));
        assert!(!chacha_first(&ids(&[])));
    }

    #[test]
    fn real_capture_yields_sni() {
        let hello = complete(RUSTLS_HELLO);
        assert_eq!(hello.sni.as_deref(), Some("pass.test"));
        assert_eq!(hello.len, RUSTLS_HELLO.len());
        // rustls lists AES-256-GCM, AES-128-GCM, then ChaCha20.
        assert!(!hello.chacha_first);
        assert!(
            RUSTLS_HELLO.len() > 1200,
            "capture should carry an ML-KEM share"
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for end in 0..RUSTLS_HELLO.len() {
            assert_eq!(
                parse(&RUSTLS_HELLO[..end]),
                Parse::Incomplete,
                "prefix {end}"
            );
        }
    }

    #[test]
    fn multi_record_hello_matches_single_record() {
        let single = complete(RUSTLS_HELLO);
        for n in [2, 3, 7, MAX_RECORDS] {
            let split = split_records(RUSTLS_HELLO, n);
            let hello = complete(&split);
            assert_eq!(hello.sni, single.sni);
            assert_eq!(hello.len, split.len());
            for end in 0..split.len() {
                assert_eq!(
                    parse(&split[..end]),
                    Parse::Incomplete,
                    "{n} records, prefix {end}"
                );
            }
        }
    }

    #[test]
    fn too_many_records_is_too_large() {
        let split = split_records(RUSTLS_HELLO, MAX_RECORDS * 2);
        assert_eq!(parse(&split), Parse::Invalid(Invalid::TooLarge));
    }

    #[test]
    fn trailing_bytes_are_not_part_of_the_hello() {
        let mut buf = RUSTLS_HELLO.to_vec();
        buf.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
        assert_eq!(complete(&buf).len, RUSTLS_HELLO.len());
    }

    #[test]
    fn rejects_what_is_not_a_hello() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Parse::Invalid(Invalid::NotTls)
        );
        assert_eq!(parse(&[0x80, 0x2e, 0x01]), Parse::Invalid(Invalid::NotTls));
        assert_eq!(parse(&[0x16, 0x02]), Parse::Invalid(Invalid::NotTls));
        assert_eq!(
            parse(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Parse::Invalid(Invalid::NotClientHello)
        );
        assert_eq!(
            parse(&[0x16, 3, 1, 0, 0]),
            Parse::Invalid(Invalid::Malformed)
        );
        assert_eq!(
            parse(&[0x16, 3, 1, 0x40, 0x01]),
            Parse::Invalid(Invalid::Malformed)
        );
        // A huge announced handshake fails before its bytes arrive.
        assert_eq!(
            parse(&[0x16, 3, 1, 0x40, 0, 1, 0x01, 0, 0]),
            Parse::Invalid(Invalid::TooLarge)
        );
    }

    /// The content of extensions other than SNI and ALPN is not ours to
    /// judge: garbage inside the key share still routes, by its SNI.
    #[test]
    fn other_extensions_are_framed_not_parsed() {
        let mut buf = RUSTLS_HELLO.to_vec();
        let message = &RUSTLS_HELLO[RECORD_HEADER_LEN..];
        let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
            parse_tls_message_handshake(message)
        else {
            panic!("the capture is a ClientHello");
        };
        let mut rest = hello.ext.expect("extensions");
        let mut key_share = None;
        while let Ok((after, TlsExtension::Unknown(kind, data))) = parse_tls_extension_unknown(rest)
        {
            if kind == TlsExtensionType::KeyShare {
                let start = data.as_ptr() as usize - RUSTLS_HELLO.as_ptr() as usize;
                key_share = Some(start..start + data.len());
            }
            rest = after;
        }
        let key_share = key_share.expect("the capture has a key share");
        assert!(key_share.len() > 1000, "the ML-KEM share");
        buf[key_share].fill(0xff);
        assert_eq!(complete(&buf).sni.as_deref(), Some("pass.test"));
    }

    #[test]
    fn garbage_inside_a_record_is_malformed() {
        let mut buf = RUSTLS_HELLO.to_vec();
        // Corrupt the extensions length so the extension block cannot parse.
        for byte in buf.iter_mut().skip(120).take(40) {
            *byte = 0xff;
        }
        assert!(matches!(parse(&buf), Parse::Invalid(_)));
    }
}

//! Which cipher suite a terminated connection gets.
//!
//! rustls follows the client's order by default, and OpenSSL's and rustls's
//! own clients (curl, most API clients and bots) list AES-256-GCM first.
//! Its SHA-384 key schedule gets no help from the SHA extensions, which
//! cover SHA-256 only, and was the largest single cost of a full handshake
//! on our benchmark machine. So the server chooses, as Go's crypto/tls
//! (Caddy, Traefik) does: AES-128-GCM, then ChaCha20-Poly1305, then
//! AES-256-GCM. AES-128 is as strong as the X25519 or P-256 key exchange
//! that protects its key. A client that lists ChaCha20 before AES-GCM
//! probably lacks AES hardware (older phones) and gets ChaCha20 first.

use rustls::SupportedCipherSuite;
use rustls::crypto::CryptoProvider;
use tls_parser::{TlsCipherEnc, TlsCipherSuite};

use crate::certs::disk::provider;

/// The provider with its suites in the order the server prefers for a
/// client whose hello said `chacha_first` (see
/// [`crate::tls::client_hello::ClientHello::chacha_first`]).
pub fn preferring(chacha_first: bool) -> CryptoProvider {
    let mut provider = provider();
    // Stable: TLS 1.3 before 1.2 and ECDSA before RSA stay as rustls has them.
    provider
        .cipher_suites
        .sort_by_key(|suite| rank(suite, chacha_first));
    provider
}

/// 0 and 1 for the two preferred AEADs, 2 for the rest.
fn rank(suite: &SupportedCipherSuite, chacha_first: bool) -> u8 {
    let Some(known) = TlsCipherSuite::from_id(u16::from(suite.suite())) else {
        return 2;
    };
    match (known.enc, known.enc_size, chacha_first) {
        (TlsCipherEnc::Chacha20_Poly1305, _, true) => 0,
        (TlsCipherEnc::Aes, 128, false) => 0,
        (TlsCipherEnc::Chacha20_Poly1305, _, false) => 1,
        (TlsCipherEnc::Aes, 128, true) => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite as S;

    fn order(chacha_first: bool) -> Vec<S> {
        preferring(chacha_first)
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect()
    }

    fn is_tls13(suite: &S) -> bool {
        u16::from(*suite) >> 8 == 0x13
    }

    fn tls13(chacha_first: bool) -> Vec<S> {
        order(chacha_first).into_iter().filter(is_tls13).collect()
    }

    fn first_tls12(chacha_first: bool) -> Option<S> {
        order(chacha_first).into_iter().find(|s| !is_tls13(s))
    }

    #[test]
    fn aes_128_leads_then_chacha_then_aes_256() {
        assert_eq!(
            tls13(false),
            [
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_CHACHA20_POLY1305_SHA256,
                S::TLS13_AES_256_GCM_SHA384
            ]
        );
        assert_eq!(
            first_tls12(false),
            Some(S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        );
    }

    #[test]
    fn a_chacha_client_gets_chacha_first() {
        assert_eq!(
            tls13(true),
            [
                S::TLS13_CHACHA20_POLY1305_SHA256,
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_AES_256_GCM_SHA384
            ]
        );
        assert_eq!(
            first_tls12(true),
            Some(S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
        );
    }

    #[test]
    fn no_suite_is_dropped() {
        let all = provider().cipher_suites.len();
        assert_eq!(order(false).len(), all);
        assert_eq!(order(true).len(), all);
    }
}

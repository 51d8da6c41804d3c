//! PROXY v1/v2 decode on arbitrary bytes; encode/decode round trip on the
//! addresses found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_router::config::ProxyVersion;
use sni_router::proxy_protocol::{Decode, MAX_HEADER_LEN, decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Decode::Complete { len, addrs } = decode(data) {
        assert!(len <= data.len() && len <= MAX_HEADER_LEN);
        if let (Some(source), Some(destination)) = (addrs.source, addrs.destination) {
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let again = encode(version, source, destination);
                assert!(matches!(decode(&again), Decode::Complete { .. }));
            }
        }
    }
});

//! PROXY v1/v2 decode on arbitrary bytes (TLVs included); encode/decode
//! round trip on the addresses found, and of a node's fleet digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_router::config::{FleetDigest, ProxyVersion};
use sni_router::proxy_protocol::{Decode, MAX_HEADER_LEN, decode, encode, encode_from_node};

fuzz_target!(|data: &[u8]| {
    if let Decode::Complete { len, addrs } = decode(data) {
        assert!(len <= data.len() && len <= MAX_HEADER_LEN);
        if let (Some(source), Some(destination)) = (addrs.source, addrs.destination) {
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let again = encode(version, source, destination);
                assert!(matches!(decode(&again), Decode::Complete { .. }));
            }
            // A node's header carries whatever digest it was given.
            let digest = FleetDigest(data.len() as u64);
            let again = encode_from_node(source, destination, digest);
            match decode(&again) {
                Decode::Complete { addrs, .. } => assert_eq!(addrs.digest, Some(digest)),
                other => panic!("{other:?}"),
            }
        }
    }
});

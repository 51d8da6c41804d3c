//! HTTP request-head parse, then the port-80 decision, on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_router::http::request::{MAX_HEAD_BYTES, Parse, parse};

fuzz_target!(|data: &[u8]| {
    if let Parse::Complete(head) = parse(data) {
        assert!(head.len <= data.len().min(MAX_HEAD_BYTES));
        if let Some(host) = &head.host {
            assert!(!host.is_empty() && host.len() <= 253);
        }
    }
});

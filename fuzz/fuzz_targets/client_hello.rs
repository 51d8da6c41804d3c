//! ClientHello reassembly + parse, fed as an arbitrary segmentation of
//! arbitrary bytes: the first byte seeds where segments end; the parser is
//! asked after every segment, as the router does after every read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_router::tls::client_hello::{MAX_HELLO_BYTES, Parse, parse};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, bytes)) = data.split_first() else { return };
    let step = usize::from(seed % 64) + 1;
    let mut end = 0;
    let mut complete: Option<sni_router::tls::client_hello::ClientHello> = None;
    while end < bytes.len() {
        end = (end + step).min(bytes.len());
        match parse(&bytes[..end]) {
            Parse::Complete(hello) => {
                assert!(hello.len <= end && hello.len <= MAX_HELLO_BYTES);
                if let Some(sni) = &hello.sni {
                    // Never a name that is not in the bytes.
                    let lower = bytes[..hello.len].to_ascii_lowercase();
                    assert!(lower.windows(sni.len()).any(|w| w == sni.as_bytes()));
                }
                // More bytes never change a complete hello.
                if let Some(before) = &complete {
                    assert_eq!(before, &hello);
                }
                complete = Some(hello);
            }
            Parse::Incomplete => assert!(complete.is_none()),
            Parse::Invalid(_) => {
                assert!(complete.is_none());
                return;
            }
        }
    }
});

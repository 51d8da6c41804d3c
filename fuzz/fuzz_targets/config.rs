//! Config parsing on arbitrary text: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sni_router::config::Config::parse(text, "fuzz.toml", None);
        let _ = sni_router::config::Config::parse(text, "fuzz.toml", Some("a"));
    }
});

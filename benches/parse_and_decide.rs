//! The hot, pure steps of the data path, over the real functions: parsing
//! a ~1.5 KB post-quantum ClientHello (one record and several), and
//! `decide()` over 10k sites with wildcards.

use std::fmt::Write;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use sni_router::config::Config;
use sni_router::tls::client_hello::parse;
use sni_router::tls::route::{Peer, decide};

use sni_router::test_helpers::{HELLO, split_records};

/// A fleet of three nodes and `sites` sites, every other one with a wildcard.
pub fn fleet(sites: usize) -> String {
    let mut toml = String::from("this_node = \"a\"\n");
    for (name, ip) in [("a", 2), ("b", 3), ("c", 4)] {
        let _ = writeln!(
            toml,
            "[[nodes]]\nname = \"{name}\"\ntls = \"127.0.0.{ip}:443\"\nhttp = \"127.0.0.{ip}:80\""
        );
    }
    for i in 0..sites {
        let names = if i % 2 == 0 {
            format!("\"site{i}.example.org\", \"*.site{i}.example.org\"")
        } else {
            format!("\"site{i}.example.org\"")
        };
        let holders = ["\"a\", \"b\"", "\"b\", \"c\"", "\"c\""][i % 3];
        let _ = writeln!(
            toml,
            "[[sites]]\nnames = [{names}]\nheld_by = [{holders}]\nupstream = \"127.0.0.1:9000\""
        );
    }
    toml
}

fn bench(c: &mut Criterion) {
    c.bench_function("parse/one_record", |b| b.iter(|| parse(black_box(HELLO))));
    let split = split_records(HELLO, 4);
    c.bench_function("parse/four_records", |b| {
        b.iter(|| parse(black_box(&split)))
    });

    let config = Config::parse(&fleet(10_000), "bench", None).expect("bench config");
    let peer = Peer {
        client: IpAddr::from([198, 51, 100, 7]),
        spliced_by_node: false,
    };
    let names = [
        "site7777.example.org",
        "www.site5000.example.org",
        "nope.example.org",
    ];
    for name in names {
        c.bench_function(&format!("decide/10k_sites/{name}"), |b| {
            b.iter(|| {
                decide(
                    black_box(&config),
                    0,
                    Some(black_box(name)),
                    peer,
                    |_, _| false,
                )
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

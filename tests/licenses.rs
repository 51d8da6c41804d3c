//! Every crate the build can pull in is under a licence that lets us ship
//! sni-router as MIT OR Apache-2.0, read from `cargo metadata` with the
//! lock file as it is (what `cargo deny check licenses` checks, without
//! building cargo-deny in CI).

use std::process::Command;

/// Licences whose terms permit distribution under MIT OR Apache-2.0 with
/// their notices kept.
const ALLOWED: &[&str] = &[
    "MIT",
    "MIT-0",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Unicode-3.0",
    "Zlib",
    "CC0-1.0",
    "Unlicense",
    "CDLA-Permissive-2.0",
];

/// Whether an SPDX expression (AND, OR, WITH, parentheses; the older `/`
/// for OR) can be met with `ALLOWED` licences.
fn acceptable(expression: &str) -> bool {
    let spaced = expression
        .replace('/', " OR ")
        .replace('(', " ( ")
        .replace(')', " ) ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut at = 0;
    let met = or(&tokens, &mut at);
    met && at == tokens.len()
}

fn or(tokens: &[&str], at: &mut usize) -> bool {
    let mut met = and(tokens, at);
    while tokens.get(*at) == Some(&"OR") {
        *at += 1;
        met |= and(tokens, at);
    }
    met
}

fn and(tokens: &[&str], at: &mut usize) -> bool {
    let mut met = term(tokens, at);
    while tokens.get(*at) == Some(&"AND") {
        *at += 1;
        met &= term(tokens, at);
    }
    met
}

fn term(tokens: &[&str], at: &mut usize) -> bool {
    match tokens.get(*at) {
        Some(&"(") => {
            *at += 1;
            let met = or(tokens, at);
            *at += 1; // ")"
            met
        }
        Some(id) => {
            *at += 1;
            let mut id = (*id).to_string();
            if tokens.get(*at) == Some(&"WITH") {
                id = format!("{id} WITH {}", tokens.get(*at + 1).unwrap_or(&""));
                *at += 2;
            }
            ALLOWED.contains(&id.as_str())
        }
        None => false,
    }
}

#[test]
fn the_expression_reader_handles_what_crates_write() {
    assert!(acceptable("MIT OR Apache-2.0"));
    assert!(acceptable("MIT/Apache-2.0"));
    assert!(acceptable("(MIT OR Apache-2.0) AND Unicode-3.0"));
    assert!(acceptable(
        "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"
    ));
    assert!(acceptable("MIT OR Apache-2.0 OR LGPL-2.1-or-later"));
    assert!(!acceptable("GPL-3.0-only"));
    assert!(!acceptable("MIT AND GPL-3.0-only"));
    assert!(!acceptable(""));
}

#[test]
fn every_dependency_is_under_an_allowed_licence() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let resolved: Vec<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let mut refused = Vec::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let id = package["id"].as_str().unwrap_or_default();
        if !resolved.contains(&id) {
            continue;
        }
        let license = package["license"].as_str().unwrap_or_default();
        if !acceptable(license) {
            refused.push(format!(
                "{} {}: {license:?}",
                package["name"], package["version"]
            ));
        }
    }
    assert!(
        refused.is_empty(),
        "licences outside the allow-list:\n{}",
        refused.join("\n")
    );
}

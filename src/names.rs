//! Server-name lookup: exact names and `*.` wildcards, as TLS clients match.
//!
//! Ties: an exact name beats any wildcard; among wildcards the longest suffix
//! wins. A wildcard covers exactly one label, like a certificate's does
//! (`*.example.org` matches `a.example.org`, not `a.b.example.org`), so the
//! lookup is two hash probes, whatever the number of names.

use std::collections::HashMap;

/// Maps normalized names (see [`normalize_name`]) to values.
#[derive(Debug, Clone)]
pub struct NameTable<T> {
    exact: HashMap<String, T>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, T>,
}

impl<T> Default for NameTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

/// A name as written in config: exact, or `*.` plus a suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    Exact(String),
    Wildcard(String),
}

impl Pattern {
    /// Parses a config name; `None` if it is not a valid host name or wildcard.
    pub fn parse(raw: &str) -> Option<Pattern> {
        match raw.strip_prefix("*.") {
            Some(suffix) => normalize_name(suffix.as_bytes()).map(Pattern::Wildcard),
            None => normalize_name(raw.as_bytes()).map(Pattern::Exact),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self, Pattern::Wildcard(_))
    }

    /// Whether a normalized name falls under this pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Wildcard(suffix) => wildcard_covers(suffix, name),
        }
    }
}

/// DNS names are at most 253 characters without the trailing dot.
const MAX_NAME_LEN: usize = 253;

/// Lowercases a server name and strips one trailing dot, accepting only what
/// a DNS host name can hold. The SNI parser, the Host header and the config
/// all use it, so every side compares alike.
pub fn normalize_name(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > MAX_NAME_LEN {
        return None;
    }
    let valid_label = |label: &[u8]| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    if !raw.split(|b| *b == b'.').all(valid_label) {
        return None;
    }
    Some(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

/// Whether `*.{suffix}` covers `name`: exactly one more label, as TLS
/// clients match certificates.
pub fn wildcard_covers(suffix: &str, name: &str) -> bool {
    name.split_once('.').is_some_and(|(_, rest)| rest == suffix)
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

impl<T> NameTable<T> {
    /// Inserts a pattern; returns the previous value if it was already present.
    pub fn insert(&mut self, pattern: Pattern, value: T) -> Option<T> {
        match pattern {
            Pattern::Exact(name) => self.exact.insert(name, value),
            Pattern::Wildcard(suffix) => self.wildcard.insert(suffix, value),
        }
    }

    /// Looks up a normalized name.
    pub fn get(&self, name: &str) -> Option<&T> {
        if let Some(value) = self.exact.get(name) {
            return Some(value);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_normalize() {
        assert_eq!(
            normalize_name(b"WWW.Example.ORG.").as_deref(),
            Some("www.example.org")
        );
        assert_eq!(normalize_name(b"a..b"), None);
        assert_eq!(normalize_name(b"."), None);
        assert_eq!(normalize_name(b"bad name"), None);
        assert_eq!(normalize_name(&[b'a'; 64]), None);
    }

    use super::*;

    fn table(patterns: &[(&str, u32)]) -> NameTable<u32> {
        let mut table = NameTable::default();
        for (raw, value) in patterns {
            table.insert(Pattern::parse(raw).unwrap(), *value);
        }
        table
    }

    #[test]
    fn exact_beats_wildcard_and_longest_wildcard_wins() {
        let t = table(&[
            ("*.example.org", 1),
            ("a.example.org", 2),
            ("*.b.example.org", 3),
        ]);
        assert_eq!(t.get("a.example.org"), Some(&2));
        assert_eq!(t.get("z.example.org"), Some(&1));
        assert_eq!(t.get("x.b.example.org"), Some(&3));
        assert_eq!(t.get("b.example.org"), Some(&1));
        assert_eq!(t.get("example.org"), None);
    }

    #[test]
    fn wildcard_covers_one_label() {
        let t = table(&[("*.example.org", 1)]);
        assert_eq!(t.get("x.y.example.org"), None);
        let p = Pattern::parse("*.Example.org.").unwrap();
        assert!(p.matches("w.example.org"));
        assert!(!p.matches("a.w.example.org"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(Pattern::parse("*"), None);
        assert_eq!(Pattern::parse("a.*.org"), None);
        assert_eq!(Pattern::parse("exa mple.org"), None);
        assert_eq!(Pattern::parse(""), None);
    }
}

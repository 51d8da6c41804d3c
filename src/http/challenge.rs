//! HTTP-01 challenge tokens this node can answer: an in-process map
//! token -> key authorization, with a time-to-live and a size bound. The
//! ACME manager writes into it; the port-80 handler reads it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

/// More pending challenges than any node has orders in flight; past this,
/// inserts fail rather than grow the map.
pub const MAX_TOKENS: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("challenge store full ({MAX_TOKENS} live tokens)")]
pub struct Full;

#[derive(Debug, Default)]
pub struct ChallengeStore {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Stateless mode: with one ACME account shared by the fleet, every key
    /// authorization is `token.thumbprint`.
    thumbprint: ArcSwapOption<String>,
}

impl ChallengeStore {
    pub fn insert(&self, token: &str, key_authorization: &str, ttl: Duration) -> Result<(), Full> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|_, (_, expiry)| *expiry > now);
        if tokens.len() >= MAX_TOKENS && !tokens.contains_key(token) {
            return Err(Full);
        }
        tokens.insert(
            token.to_string(),
            (key_authorization.to_string(), now + ttl),
        );
        Ok(())
    }

    pub fn remove(&self, token: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
    }

    /// The key authorization for a token held here, if not expired.
    pub fn get(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let (value, expiry) = tokens.get(token)?;
        (*expiry > Instant::now()).then(|| value.clone())
    }

    /// The stateless answer for any token, when a shared account is set.
    pub fn stateless(&self, token: &str) -> Option<String> {
        self.thumbprint
            .load()
            .as_ref()
            .map(|t| format!("{token}.{t}"))
    }

    pub fn set_thumbprint(&self, thumbprint: Option<String>) {
        self.thumbprint.store(thumbprint.map(std::sync::Arc::new));
    }
}

/// ACME tokens are base64url (RFC 8555 8.3); anything else never reaches a
/// map or the disk. 128 characters is ample (real tokens are 43).
pub fn valid_token(token: &str) -> bool {
    (1..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_are_bounded() {
        let store = ChallengeStore::default();
        store.insert("a", "a.k", Duration::from_secs(60)).unwrap();
        store.insert("gone", "x", Duration::from_millis(0)).unwrap();
        assert_eq!(store.get("a").as_deref(), Some("a.k"));
        assert_eq!(store.get("gone"), None);
        for i in 0..MAX_TOKENS - 1 {
            store
                .insert(&format!("t{i}"), "k", Duration::from_secs(60))
                .unwrap();
        }
        assert_eq!(
            store.insert("one-too-many", "k", Duration::from_secs(60)),
            Err(Full)
        );
        store.remove("a");
        assert!(
            store
                .insert("one-too-many", "k", Duration::from_secs(60))
                .is_ok()
        );
    }

    #[test]
    fn stateless_answers_any_token() {
        let store = ChallengeStore::default();
        assert_eq!(store.stateless("tok"), None);
        store.set_thumbprint(Some("THUMB".into()));
        assert_eq!(store.stateless("tok").as_deref(), Some("tok.THUMB"));
    }

    #[test]
    fn only_base64url_tokens() {
        assert!(valid_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        for bad in ["", "../etc/passwd", "a/b", "a.b", "a%2F", &"x".repeat(129)] {
            assert!(!valid_token(bad), "{bad:?}");
        }
    }
}

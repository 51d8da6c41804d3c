//! Amplification guard for challenge forwarding: a strange request must not
//! turn into many requests to peers. Forwarding is rate-limited (a token
//! bucket) and a recent miss is remembered briefly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Long enough to absorb a scanner's burst, short enough that a CA's retry
/// after the token appears is answered.
pub const MISS_TTL: Duration = Duration::from_secs(5);
/// Misses remembered at most; a flood of distinct tokens cannot grow it.
const MAX_MISSES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimited,
    RecentMiss,
}

#[derive(Debug)]
pub struct ForwardGuard {
    per_second: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
    misses: HashMap<(String, String), Instant>,
}

impl ForwardGuard {
    /// Allows `per_second` forwards on average and bursts of twice that.
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        ForwardGuard {
            per_second,
            state: Mutex::new(State {
                tokens: per_second * 2.0,
                last: Instant::now(),
                misses: HashMap::new(),
            }),
        }
    }

    /// Whether a forward for `host`/`token` may go out now; takes a token.
    pub fn admit(&self, host: &str, token: &str) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let key = (host.to_string(), token.to_string());
        if state
            .misses
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < MISS_TTL)
        {
            return Err(Refusal::RecentMiss);
        }
        let elapsed = now.duration_since(state.last).as_secs_f64();
        state.last = now;
        state.tokens = (state.tokens + elapsed * self.per_second).min(self.per_second * 2.0);
        if state.tokens < 1.0 {
            return Err(Refusal::RateLimited);
        }
        state.tokens -= 1.0;
        Ok(())
    }

    /// Remembers that no holder had `token` for `host`.
    pub fn miss(&self, host: &str, token: &str) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.misses.len() >= MAX_MISSES {
            state
                .misses
                .retain(|_, at| now.duration_since(*at) < MISS_TTL);
            if state.misses.len() >= MAX_MISSES {
                state.misses.clear();
            }
        }
        state
            .misses
            .insert((host.to_string(), token.to_string()), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_bounded_and_misses_remembered() {
        let guard = ForwardGuard::new(5);
        let admitted = (0..100)
            .filter(|i| guard.admit("h", &i.to_string()).is_ok())
            .count();
        assert!((10..=11).contains(&admitted), "{admitted}");
        let guard = ForwardGuard::new(5);
        guard.miss("h", "t");
        assert_eq!(guard.admit("h", "t"), Err(Refusal::RecentMiss));
        assert_eq!(guard.admit("h", "other"), Ok(()));
    }
}

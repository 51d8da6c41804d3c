//! What the forwarding engine knows about its targets' health: passive
//! (a failed attempt cools a target for a growing interval) and, for pools
//! with `health = "tcp"`, active (a connect every few seconds). A cooling
//! or down target is tried after the others, never left out: the order
//! changes, so a dead target costs one attempt instead of one per
//! connection, and no connection that one target could serve is lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The first cooling interval; each failure in a row doubles it.
const COOL_FIRST: Duration = Duration::from_secs(2);
const COOL_MAX: Duration = Duration::from_secs(60);
/// How often `health = "tcp"` connects to each target.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// Tried last until then.
    cooling_until: Option<Instant>,
    /// The next cooling interval.
    backoff: Duration,
    /// The last active check: up or down.
    checked: Option<bool>,
}

/// A target's health as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nothing known against it.
    Up,
    /// Failed lately: tried after the others for a while.
    Cooling,
    /// The last active check failed.
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Cooling => "cooling",
            Health::Down => "down",
        }
    }
}

#[derive(Debug, Default)]
pub struct TargetHealth {
    states: Mutex<HashMap<SocketAddr, State>>,
    /// Any state at all: while false, the given order stands.
    any: AtomicBool,
    /// How many targets have failed since they last answered: while none
    /// has, a success (every routed connection) needs no lock.
    failing: AtomicUsize,
}

impl TargetHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, State>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `addr` should wait behind the others now.
    fn held_back(state: &State, now: Instant) -> bool {
        state.checked == Some(false) || state.cooling_until.is_some_and(|t| t > now)
    }

    /// Indices into `addrs` in the order to try them: the usable ones in
    /// their given order, then the held-back ones in theirs. `None` when
    /// the given order stands (always for one target: no allocation).
    pub fn order<'a>(
        &self,
        addrs: impl ExactSizeIterator<Item = &'a SocketAddr>,
        now: Instant,
    ) -> Option<Vec<usize>> {
        if addrs.len() < 2 || !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let states = self.lock();
        let back: Vec<bool> = addrs
            .map(|a| states.get(a).is_some_and(|s| Self::held_back(s, now)))
            .collect();
        if !back.iter().any(|b| *b) {
            return None;
        }
        let (mut order, held): (Vec<usize>, Vec<usize>) =
            (0..back.len()).partition(|i| !back.get(*i).copied().unwrap_or(false));
        order.extend(held);
        Some(order)
    }

    /// A failed attempt: cool the target, twice as long as last time.
    pub fn failed(&self, addr: SocketAddr, now: Instant) {
        let mut states = self.lock();
        let state = states.entry(addr).or_default();
        if state.backoff.is_zero() {
            self.failing.fetch_add(1, Ordering::Relaxed);
        }
        let interval = state.backoff.max(COOL_FIRST);
        state.cooling_until = Some(now + interval);
        state.backoff = (interval * 2).min(COOL_MAX);
        self.any.store(true, Ordering::Relaxed);
    }

    /// A target that answered: nothing held against it any more, bar a
    /// failed active check, which the next check settles.
    pub fn succeeded(&self, addr: SocketAddr) {
        if self.failing.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(state) = self.lock().get_mut(&addr) {
            self.recovered(state);
        }
    }

    fn recovered(&self, state: &mut State) {
        if !state.backoff.is_zero() {
            self.failing.fetch_sub(1, Ordering::Relaxed);
        }
        state.cooling_until = None;
        state.backoff = Duration::ZERO;
    }

    /// An active check's result; an answer also ends a cooling.
    pub fn checked(&self, addr: SocketAddr, up: bool, now: Instant) {
        let mut states = self.lock();
        let state = states.entry(addr).or_default();
        state.checked = Some(up);
        if up {
            self.recovered(state);
        } else if state.cooling_until.is_none_or(|t| t <= now) {
            state.cooling_until = Some(now + COOL_FIRST);
        }
        self.any.store(true, Ordering::Relaxed);
    }

    pub fn health(&self, addr: SocketAddr, now: Instant) -> Health {
        match self.lock().get(&addr) {
            Some(s) if s.checked == Some(false) => Health::Down,
            Some(s) if Self::held_back(s, now) => Health::Cooling,
            _ => Health::Up,
        }
    }

    /// The last active check of `addr`, if any.
    pub fn last_check(&self, addr: SocketAddr) -> Option<bool> {
        self.lock().get(&addr).and_then(|s| s.checked)
    }
}

/// The pools with `health = "tcp"` this node sends connections to: every
/// passthrough pool, and the upstreams of the sites it holds.
pub fn checked_targets(config: &crate::config::Config) -> Vec<(usize, SocketAddr)> {
    use crate::config::{SiteId, SiteRoute};
    let mut out = Vec::new();
    for (i, site) in config.sites.iter().enumerate() {
        let pool = match &site.route {
            SiteRoute::Passthrough { backend } => backend,
            SiteRoute::Held { upstream, .. } if config.holds(SiteId(i)) => upstream,
            SiteRoute::Held { .. } => continue,
        };
        if pool.checked {
            out.extend(pool.addrs().map(|addr| (i, addr)));
        }
    }
    out
}

/// Connects to every checked target each [`CHECK_EVERY`], all at once,
/// each within the connect timeout; `current` reads the live config.
pub async fn check(health: &TargetHealth, current: impl Fn() -> (Vec<SocketAddr>, Duration)) {
    loop {
        let (targets, timeout) = current();
        let mut round = tokio::task::JoinSet::new();
        for addr in targets {
            round.spawn(async move {
                let up = crate::connect::connect(addr, None, timeout).await.is_ok();
                (addr, up)
            });
        }
        while let Some(done) = round.join_next().await {
            if let Ok((addr, up)) = done {
                health.checked(addr, up, Instant::now());
            }
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> [SocketAddr; 3] {
        [1, 2, 3].map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
    }

    #[test]
    fn a_failed_target_goes_last_for_a_growing_while_and_returns_on_success() {
        let h = TargetHealth::default();
        let [a, b, c] = addrs();
        let t = Instant::now();
        assert_eq!(h.order([a, b, c].iter(), t), None);
        h.failed(a, t);
        assert_eq!(h.order([a, b, c].iter(), t), Some(vec![1, 2, 0]));
        assert_eq!(h.health(a, t), Health::Cooling);
        // After the first interval it is tried in its place again...
        assert_eq!(h.order([a, b, c].iter(), t + COOL_FIRST), None);
        // ...and a second failure cools it twice as long.
        h.failed(a, t + COOL_FIRST);
        let later = t + COOL_FIRST + COOL_FIRST + Duration::from_millis(10);
        assert_eq!(h.order([a, b, c].iter(), later), Some(vec![1, 2, 0]));
        h.succeeded(a);
        assert_eq!(h.order([a, b, c].iter(), later), None);
        assert_eq!(h.health(a, later), Health::Up);
    }

    #[test]
    fn once_every_failed_target_answered_again_a_success_takes_no_lock() {
        let h = TargetHealth::default();
        let [a, b, _] = addrs();
        let t = Instant::now();
        h.failed(a, t);
        h.failed(a, t);
        h.failed(b, t);
        assert_eq!(h.failing.load(Ordering::Relaxed), 2);
        h.succeeded(a);
        h.succeeded(a);
        h.checked(b, true, t);
        assert_eq!(h.failing.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_check_holds_a_target_back_until_one_passes() {
        let h = TargetHealth::default();
        let [a, b, _] = addrs();
        let t = Instant::now();
        h.checked(b, false, t);
        assert_eq!(h.order([b, a].iter(), t + COOL_MAX), Some(vec![1, 0]));
        assert_eq!(h.health(b, t), Health::Down);
        h.succeeded(b);
        assert_eq!(h.health(b, t), Health::Down, "only a check clears a check");
        h.checked(b, true, t);
        assert_eq!(h.order([b, a].iter(), t), None);
        assert_eq!(h.last_check(b), Some(true));
    }
}

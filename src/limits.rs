//! Fairness under load. Connections still sending their ClientHello or
//! request head hold a slot; past the cap the *oldest* pending one is
//! evicted, so a flood of stalled hellos ages out instead of locking honest
//! clients (whose hellos complete in milliseconds) out. An optional cap per
//! source address bounds what one address can hold.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct HelloSlots {
    cap: usize,
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, CancellationToken>>,
}

/// Held while a connection is in its hello phase; cancelled on eviction.
pub struct HelloSlot {
    id: u64,
    pub evicted: CancellationToken,
    slots: Arc<HelloSlots>,
}

impl HelloSlots {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(HelloSlots {
            cap: cap.max(1),
            next: AtomicU64::new(0),
            pending: Mutex::default(),
        })
    }

    pub fn enter(self: &Arc<Self>) -> HelloSlot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(id, token.clone());
        while pending.len() > self.cap {
            if let Some((_, oldest)) = pending.pop_first() {
                oldest.cancel();
            }
        }
        HelloSlot {
            id,
            evicted: token,
            slots: self.clone(),
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }
}

impl Drop for HelloSlot {
    fn drop(&mut self) {
        let mut pending = self.slots.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.remove(&self.id);
    }
}

/// Connections per source address; `max == 0` means no cap.
#[derive(Debug)]
pub struct SourceLimits {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

pub struct SourceGuard {
    ip: IpAddr,
    limits: Arc<SourceLimits>,
}

/// The address already holds `max_per_source` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtCap;

impl SourceLimits {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(SourceLimits {
            max,
            counts: Mutex::default(),
        })
    }

    /// A place for one more connection from `ip`: a guard that gives it
    /// back when dropped, or `None` when there is no cap to count against.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Option<SourceGuard>, AtCap> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return Err(AtCap);
        }
        *count += 1;
        Ok(Some(SourceGuard {
            ip,
            limits: self.clone(),
        }))
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_hello_is_evicted() {
        let slots = HelloSlots::new(2);
        let a = slots.enter();
        let b = slots.enter();
        assert!(!a.evicted.is_cancelled());
        let c = slots.enter();
        assert!(a.evicted.is_cancelled() && !b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        drop(b);
        let _d = slots.enter();
        assert!(!c.evicted.is_cancelled());
        assert_eq!(slots.pending(), 2);
    }

    #[test]
    fn per_source_caps_count_and_release() {
        let limits = SourceLimits::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let one = limits.acquire(ip).unwrap();
        let _two = limits.acquire(ip).unwrap();
        assert_eq!(limits.acquire(ip).err(), Some(AtCap));
        assert!(limits.acquire("192.0.2.2".parse().unwrap()).is_ok());
        drop(one);
        assert!(limits.acquire(ip).is_ok());
        assert!(SourceLimits::new(0).acquire(ip).unwrap().is_none());
    }
}

/// At most `per_second` log lines a second for one kind of event, so a
/// scan cannot flood the log; what it held back is reported with the next
/// line it lets through. The counters are exact either way.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    second: AtomicU64,
    used: std::sync::atomic::AtomicU32,
    held_back: AtomicU64,
}

impl LogBudget {
    pub const fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            second: AtomicU64::new(0),
            used: std::sync::atomic::AtomicU32::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be
    /// written now (`now` in whole seconds of any clock).
    pub fn take(&self, now: u64) -> Option<u64> {
        // Two threads crossing into a new second may both reset: a line
        // or two more that second, never fewer.
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Denied clients' log lines, both ports together.
pub static DENIED_LOG: LogBudget = LogBudget::new(10);

/// Logs a refused client within [`DENIED_LOG`]'s budget.
pub fn log_denied(
    port: &str,
    client: std::net::SocketAddr,
    site: &str,
    denial: crate::config::Denial,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(held_back) = DENIED_LOG.take(now) {
        tracing::info!(
            port, %client, site, reason = denial.as_str(), held_back,
            "access denied (held_back: denials not logged since the last line)"
        );
    }
}

#[cfg(test)]
mod budget_tests {
    use super::LogBudget;

    #[test]
    fn a_budget_lets_a_few_lines_a_second_through_and_reports_the_rest() {
        let budget = LogBudget::new(2);
        assert_eq!(budget.take(7), Some(0));
        assert_eq!(budget.take(7), Some(0));
        assert_eq!(budget.take(7), None);
        assert_eq!(budget.take(7), None);
        assert_eq!(budget.take(8), Some(2));
        assert_eq!(budget.take(8), Some(0));
    }
}

//! Fairness under load. Connections still sending their ClientHello or
//! request head hold a slot; past the cap the *oldest* pending one is
//! evicted, so a flood of stalled hellos ages out instead of locking honest
//! clients (whose hellos complete in milliseconds) out. An optional cap per
//! source address bounds what one address can hold.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Each pending connection's eviction notice is the sending half of a
/// oneshot channel, dropped to evict: one small allocation and a few atomic
/// operations per connection. A `CancellationToken` (a tree node behind a
/// mutex) cost 300 instructions more per routed connection (1.3%).
#[derive(Debug)]
pub struct HelloSlots {
    cap: usize,
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

/// Held while a connection is in its hello phase.
pub struct HelloSlot {
    id: u64,
    evicted: oneshot::Receiver<()>,
    slots: Arc<HelloSlots>,
}

impl HelloSlot {
    /// Completes once the slot is evicted (at once if it already was: a
    /// finished receiver must not be polled again).
    pub async fn evicted(&mut self) {
        if !self.evicted.is_terminated() {
            let _ = (&mut self.evicted).await;
        }
    }

    /// Whether the slot has been evicted.
    #[cfg(test)]
    fn is_evicted(&mut self) -> bool {
        matches!(
            self.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed) | Ok(())
        )
    }
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
        let (notice, evicted) = oneshot::channel();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(id, notice);
        while pending.len() > self.cap {
            // Dropping the oldest notice evicts its connection.
            drop(pending.pop_first());
        }
        HelloSlot {
            id,
            evicted,
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

/// Connections per source address; `max == 0` means no cap. New
/// connections per source and second; `rate == 0` means no limit.
#[derive(Debug)]
pub struct SourceLimits {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
    rate: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// Sources tracked for the rate at once. A source whose bucket has filled
/// up again needs no entry, so the table holds only those that connected
/// within the last second or so; when it is full of those, a new source
/// goes unmetered until entries refill (the connection cap still holds).
const MAX_BUCKETS: usize = 65_536;

/// A token bucket: `rate` tokens a second, holding at most `rate` (one
/// second's worth, so a browser's burst of parallel connections passes).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn refilled(self, rate: u32, now: std::time::Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate))
    }
}

pub struct SourceGuard {
    ip: IpAddr,
    limits: Arc<SourceLimits>,
}

/// The address already holds `max_per_source` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtCap;

impl SourceLimits {
    pub fn new(max: usize, rate: u32) -> Arc<Self> {
        Arc::new(SourceLimits {
            max,
            counts: Mutex::default(),
            rate,
            buckets: Mutex::default(),
        })
    }

    /// Takes a token for a new connection from `ip`; false when it has
    /// used its rate.
    pub fn admit_new(&self, ip: IpAddr, now: std::time::Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let rate = self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| b.refilled(rate, now) < f64::from(rate));
            if buckets.len() >= MAX_BUCKETS {
                return true;
            }
        }
        let full = Bucket {
            tokens: f64::from(rate),
            at: now,
        };
        let bucket = buckets.entry(ip).or_insert(full);
        let tokens = bucket.refilled(rate, now);
        if tokens < 1.0 {
            return false;
        }
        *bucket = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        true
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
        let mut a = slots.enter();
        let mut b = slots.enter();
        assert!(!a.is_evicted());
        let mut c = slots.enter();
        assert!(a.is_evicted() && !b.is_evicted() && !c.is_evicted());
        drop(b);
        let _d = slots.enter();
        assert!(!c.is_evicted());
        assert_eq!(slots.pending(), 2);
    }

    /// An evicted slot's notice completes, and completes again when asked
    /// twice (select! in a loop), instead of polling a finished receiver.
    #[tokio::test]
    async fn an_eviction_notice_completes_and_stays_complete() {
        let slots = HelloSlots::new(1);
        let mut a = slots.enter();
        let _b = slots.enter();
        a.evicted().await;
        a.evicted().await;
        assert!(a.is_evicted());
    }

    #[test]
    fn per_source_caps_count_and_release() {
        let limits = SourceLimits::new(2, 0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let one = limits.acquire(ip).unwrap();
        let _two = limits.acquire(ip).unwrap();
        assert_eq!(limits.acquire(ip).err(), Some(AtCap));
        assert!(limits.acquire("192.0.2.2".parse().unwrap()).is_ok());
        drop(one);
        assert!(limits.acquire(ip).is_ok());
        assert!(SourceLimits::new(0, 0).acquire(ip).unwrap().is_none());
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

/// Who writes a finished connection's or request's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineBy {
    /// Its handler, when it ends.
    Handler,
    /// [`log_denied`], within its budget; the handler writes none, so a
    /// flood of refused clients cannot flood the log.
    DeniedLog,
}

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
mod rate_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_churning_source_is_held_to_its_rate_and_others_are_not() {
        let limits = SourceLimits::new(0, 3);
        let (churn, other): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t = Instant::now();
        let admitted = (0..10).filter(|_| limits.admit_new(churn, t)).count();
        assert_eq!(admitted, 3, "a burst of one second's worth");
        assert!(limits.admit_new(other, t));
        // A third of a second later: one more token.
        let later = t + Duration::from_millis(340);
        assert!(limits.admit_new(churn, later));
        assert!(!limits.admit_new(churn, later));
        assert!(SourceLimits::new(0, 0).admit_new(churn, t), "0 is off");
    }

    #[test]
    fn the_table_stays_bounded_by_dropping_refilled_sources() {
        let limits = SourceLimits::new(0, 1);
        let t = Instant::now();
        for i in 0..MAX_BUCKETS as u32 {
            assert!(limits.admit_new(IpAddr::from(i.to_be_bytes()), t));
        }
        let newcomer: IpAddr = "198.51.100.1".parse().unwrap();
        // All full of fresh entries: unmetered, not stored.
        assert!(limits.admit_new(newcomer, t));
        assert!(limits.admit_new(newcomer, t));
        // A second later every old bucket has refilled and is dropped.
        let later = t + Duration::from_secs(1);
        assert!(limits.admit_new(newcomer, later));
        assert!(!limits.admit_new(newcomer, later));
        assert_eq!(limits.buckets.lock().unwrap().len(), 1);
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

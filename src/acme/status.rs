//! What the ACME manager reports for `/status`: a leaf the shared state
//! holds and the manager writes, so neither imports the other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// The CA's suggested renewal window (ARI): start and end.
pub type Window = (SystemTime, SystemTime);

/// A site's next renewal and the CA's window behind it.
#[derive(Debug, Clone, Copy)]
pub struct Renewal {
    pub at: SystemTime,
    pub window: Option<Window>,
}

/// What the manager has done, for `/status`: written by the manager,
/// read by the admin page.
#[derive(Debug, Default)]
pub struct Report {
    /// Next renewal per site label.
    renewals: Mutex<HashMap<String, Renewal>>,
    /// Orders that ended in an installed certificate, and failures.
    issued: AtomicU64,
    failed: AtomicU64,
    /// Each site's last order's error, until an order succeeds.
    errors: Mutex<HashMap<String, String>>,
}

impl Report {
    pub fn renewals(&self) -> HashMap<String, Renewal> {
        self.renewals.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn set_renewals(&self, renewals: HashMap<String, Renewal>) {
        if let Ok(mut current) = self.renewals.lock() {
            *current = renewals;
        }
    }

    /// An order for `site` ended: in an installed certificate (`None`) or
    /// in this error.
    pub fn order_ended(&self, site: &str, error: Option<String>) {
        let count = if error.is_none() {
            &self.issued
        } else {
            &self.failed
        };
        count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut errors) = self.errors.lock() {
            match error {
                Some(error) => errors.insert(site.to_string(), error),
                None => errors.remove(site),
            };
        }
    }

    /// The last order's error for `site`, while it has no newer success.
    pub fn last_error(&self, site: &str) -> Option<String> {
        self.errors.lock().ok()?.get(site).cloned()
    }

    /// Orders that ended in an installed certificate since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Orders that failed since start.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

//! A managed site's schedule: when it is due, what the CA said, and how a
//! CA's silence towards one site moves the others.

use std::time::SystemTime;

use super::ari::{Plan, Window};
use crate::certs::disk::Loaded;

/// Per-site schedule.
#[derive(Debug)]
pub(super) struct SiteState {
    pub(super) next: SystemTime,
    pub(super) failures: u32,
    /// The certificate being served, for ARI and `replaces`.
    pub(super) current: Option<Loaded>,
    /// The CA's suggested window for `current`, when it answered ARI: the
    /// next order then says `replaces`.
    pub(super) window: Option<Window>,
    /// When to ask the CA's renewal information again; `None` when it
    /// offers none.
    pub(super) recheck: Option<SystemTime>,
    pub(super) identifiers: Vec<String>,
}

impl SiteState {
    pub(super) fn follow(&mut self, plan: Plan) {
        (self.next, self.window, self.recheck) = (plan.renew, plan.window, plan.recheck);
    }

    /// Moves what is due by `now` (the order only if `orders`) to `until`,
    /// without counting a failure; whether anything was due.
    pub(super) fn defer(&mut self, now: SystemTime, until: SystemTime, orders: bool) -> bool {
        let mut due = false;
        if orders && self.next <= now {
            self.next = until;
            due = true;
        }
        if let Some(at) = self.recheck.as_mut().filter(|at| **at <= now) {
            *at = until;
            due = true;
        }
        due
    }
}

/// After a site's request to the CA went unanswered, the rest of the pass
/// waits for that site's next try instead of each waiting out a deadline.
pub(super) struct Hush {
    pub(super) site: String,
    pub(super) until: SystemTime,
    /// A silent order holds back orders too; a silent renewal-information
    /// ask only other asks, since a due order must not wait hours for it.
    pub(super) orders: bool,
}

impl Hush {
    /// The hush a site's unanswered request calls for: none after an order
    /// that succeeded (only the renewal-information ask after it went
    /// unanswered).
    pub(super) fn after(
        site: &str,
        state: &SiteState,
        ordered: bool,
        now: SystemTime,
    ) -> Option<Hush> {
        let until = match ordered {
            true if state.failures == 0 => return None,
            true => state.next,
            false => state.recheck?,
        };
        Some(Hush {
            site: site.to_string(),
            until: until.max(now),
            orders: ordered,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{Hush, SiteState};

    fn due(now: SystemTime, failures: u32) -> SiteState {
        SiteState {
            next: now,
            failures,
            current: None,
            window: None,
            recheck: Some(now),
            identifiers: Vec::new(),
        }
    }

    #[test]
    fn a_silent_order_holds_back_orders_and_a_silent_ask_only_asks() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = now + Duration::from_secs(3600);
        let mut state = due(now, 0);
        assert!(state.defer(now, later, false));
        assert_eq!((state.next, state.recheck), (now, Some(later)));
        let mut state = due(now, 0);
        assert!(state.defer(now, later, true));
        assert_eq!((state.next, state.recheck), (later, Some(later)));
        assert!(!state.defer(now, later + later.duration_since(now).unwrap(), true));
        assert_eq!(state.next, later, "what is not due stays");

        // An order that succeeded says nothing about the CA's silence.
        assert!(Hush::after("a", &due(later, 0), true, now).is_none());
        let failed = Hush::after("a", &due(later, 1), true, now).unwrap();
        assert_eq!((failed.until, failed.orders), (later, true));
        let asked = Hush::after("a", &due(later, 0), false, now).unwrap();
        assert_eq!((asked.until, asked.orders), (later, false));
    }
}

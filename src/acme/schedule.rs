//! When to renew and how long to back off: pure arithmetic, unit-tested.

use std::time::{Duration, SystemTime};

/// Without ARI, renew when a third of the lifetime is left, spread over the
/// tenth of the lifetime before that by `jitter` in [0, 1) so holders of a
/// name do not all renew at once. A 6-day certificate renews ~2 days before
/// expiry, a 90-day one at day ~60: never daily.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let spread = lifetime.mul_f64(jitter.clamp(0.0, 1.0) / 10.0);
    not_after - lifetime / 3 - spread
}

/// A uniformly random point in an ARI suggested window.
pub fn in_window(start: SystemTime, end: SystemTime, r: f64) -> SystemTime {
    let width = end.duration_since(start).unwrap_or_default();
    start + width.mul_f64(r.clamp(0.0, 1.0))
}

/// When to renew by the CA's suggested window (RFC 9773 4.2): now if the
/// window has closed, else a random point in what is left of it, so holders
/// told at different times still spread out. `None` when the window cannot
/// be followed: it ends after the certificate expires (Pebble's fixed two
/// days around a short-lived certificate's two-thirds point), or it ends
/// before it starts. The caller then renews as if there were no ARI.
pub fn ari_renew_at(
    now: SystemTime,
    (start, end): (SystemTime, SystemTime),
    not_after: SystemTime,
    r: f64,
) -> Option<SystemTime> {
    if end < start || end > not_after {
        return None;
    }
    if end <= now {
        return Some(now);
    }
    Some(in_window(start.max(now), end, r))
}

/// Bounds on how often a CA's renewal information is asked again.
pub const ARI_MIN_RECHECK: Duration = Duration::from_secs(60);
pub const ARI_MAX_RECHECK: Duration = Duration::from_secs(86_400);
/// After a failed request, as if the CA had asked for Let's Encrypt's usual
/// six hours (less for short lifetimes, by `ari_recheck`).
pub const ARI_RECHECK_AFTER_FAILURE: Duration = Duration::from_secs(6 * 3600);

/// When to ask the CA again: after its `Retry-After`, but at least 20 times
/// per lifetime, so a revoked short-lived certificate is replaced within a
/// twentieth of its life; never more often than a minute, never less often
/// than a day (RFC 9773 4.3.3's example limits).
pub fn ari_recheck(lifetime: Duration, retry_after: Duration) -> Duration {
    retry_after
        .min(lifetime / 20)
        .clamp(ARI_MIN_RECHECK, ARI_MAX_RECHECK)
}

/// Exponential backoff after `failures` consecutive failures (at least 1),
/// from `min` doubling up to `max`, then +-10% jitter by `r` in [0, 1).
pub fn backoff(failures: u32, min: Duration, max: Duration, r: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let base = min.saturating_mul(1u32 << exponent).min(max);
    base.mul_f64(0.9 + 0.2 * r.clamp(0.0, 1.0))
}

/// A CA's `Retry-After` is honoured up to a week, the longest window of
/// Let's Encrypt's rate limits; a later wish is more likely a broken header.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// When to order again after a failure: after our backoff, or later if the
/// CA's refusal asked for that.
pub fn after_failure(now: SystemTime, backoff: Duration, asked: Option<SystemTime>) -> SystemTime {
    let ours = now + backoff;
    asked.map_or(ours, |at| ours.max(at.min(now + MAX_RETRY_AFTER)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_waits_for_the_later_of_backoff_and_the_cas_wish() {
        let now = SystemTime::UNIX_EPOCH + DAY * 1000;
        let backoff = Duration::from_secs(60);
        assert_eq!(after_failure(now, backoff, None), now + backoff);
        let hour = now + Duration::from_secs(3600);
        assert_eq!(after_failure(now, backoff, Some(hour)), hour);
        let past = now - Duration::from_secs(5);
        assert_eq!(after_failure(now, backoff, Some(past)), now + backoff);
        let year = now + DAY * 365;
        assert_eq!(
            after_failure(now, backoff, Some(year)),
            now + MAX_RETRY_AFTER
        );
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn short_and_long_lifetimes_renew_at_a_third_left() {
        let start = SystemTime::UNIX_EPOCH + DAY * 1000;
        let six = renew_at(start, start + DAY * 6, 0.0);
        assert_eq!(six, start + DAY * 4);
        let ninety = renew_at(start, start + DAY * 90, 0.999);
        let day = ninety.duration_since(start).unwrap().as_secs_f64() / 86_400.0;
        assert!((51.0..=60.0).contains(&day), "{day}");
        let short = renew_at(start, start + Duration::from_secs(90), 0.5);
        let at = short.duration_since(start).unwrap();
        assert!(
            at >= Duration::from_secs(55) && at <= Duration::from_secs(60),
            "{at:?}"
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let min = Duration::from_secs(10);
        let max = Duration::from_secs(300);
        assert_eq!(backoff(1, min, max, 0.5), min);
        assert_eq!(backoff(3, min, max, 0.5), Duration::from_secs(40));
        assert_eq!(backoff(50, min, max, 0.5), max);
        assert!(backoff(2, min, max, 0.0) >= Duration::from_secs(18));
    }

    #[test]
    fn an_ari_window_is_followed_only_while_it_ends_before_expiry() {
        let issued = SystemTime::UNIX_EPOCH + DAY * 1000;
        let expires = issued + DAY * 90;
        let (start, end) = (issued + DAY * 59, issued + DAY * 61);
        let before = issued + DAY;
        assert_eq!(
            ari_renew_at(before, (start, end), expires, 0.0),
            Some(start)
        );
        // Opened already: a random point in what is left, never in the past.
        let inside = issued + DAY * 60;
        assert_eq!(
            ari_renew_at(inside, (start, end), expires, 0.0),
            Some(inside)
        );
        assert!(ari_renew_at(inside, (start, end), expires, 0.99).unwrap() < end);
        // Closed (a revoked certificate): now.
        let late = issued + DAY * 62;
        assert_eq!(ari_renew_at(late, (start, end), expires, 0.7), Some(late));
        // Pebble's two days around a 90-second certificate, or nonsense.
        let short = issued + Duration::from_secs(90);
        assert_eq!(ari_renew_at(issued, (start, end), short, 0.5), None);
        assert_eq!(ari_renew_at(issued, (end, start), expires, 0.5), None);
    }

    #[test]
    fn ari_is_asked_again_between_a_minute_and_a_day() {
        let six_hours = Duration::from_secs(6 * 3600);
        assert_eq!(ari_recheck(DAY * 90, six_hours), six_hours);
        assert_eq!(ari_recheck(DAY * 90, DAY * 30), ARI_MAX_RECHECK);
        assert_eq!(ari_recheck(DAY * 90, Duration::ZERO), ARI_MIN_RECHECK);
        // A 6-day certificate: the CA's 6 hours; a 1-hour one: every 3 min.
        assert_eq!(ari_recheck(DAY * 6, six_hours), six_hours);
        let hour = Duration::from_secs(3600);
        assert_eq!(ari_recheck(hour, six_hours), Duration::from_secs(180));
        assert_eq!(
            ari_recheck(Duration::from_secs(90), six_hours),
            ARI_MIN_RECHECK
        );
    }

    #[test]
    fn window_points_stay_inside() {
        let start = SystemTime::UNIX_EPOCH + DAY;
        let end = start + DAY;
        assert_eq!(in_window(start, end, 0.0), start);
        assert!(in_window(start, end, 0.99) < end);
    }
}

//! Pacing of replay, pure and clock-injected: a rate limiter for the whole pod, and per-route
//! health (backoff after failures, AIMD concurrency after `421`s).

use std::time::{Duration, Instant};

/// Spaces messages evenly at `rate` per second (GCRA with a burst of one): the primary sees a
/// steady flow, never a burst after an idle spell. A rate of 0 means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u32,
    next_free: Option<Instant>,
}

impl RateLimiter {
    pub fn new(rate: u32) -> Self {
        RateLimiter {
            rate,
            next_free: None,
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    pub fn set_rate(&mut self, rate: u32) {
        if rate != self.rate {
            self.rate = rate;
            self.next_free = None;
        }
    }

    /// Reserves the next slot; returns when the caller may send.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        if self.rate == 0 {
            return now;
        }
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.rate));
        let at = match self.next_free {
            Some(t) if t > now => t,
            _ => now,
        };
        self.next_free = Some(at + interval);
        at
    }
}

/// What the replay learned about a route (a domain's primary).
#[derive(Debug, Clone)]
pub struct RouteHealth {
    failures: u32,
    /// Route failures and `421`s ever seen (never reset): a delivery that saw this change while
    /// it waited for its commit turn withdraws its message (see `replay::worker::CommitOrder`).
    setbacks: u64,
    backoff_until: Option<Instant>,
    /// How many concurrent deliveries the primary is given; halved on `421`, grows by one per
    /// `limit` successes (additive increase).
    limit: f64,
    last_error: Option<String>,
}

impl Default for RouteHealth {
    fn default() -> Self {
        RouteHealth {
            failures: 0,
            setbacks: 0,
            backoff_until: None,
            limit: f64::INFINITY,
            last_error: None,
        }
    }
}

impl RouteHealth {
    /// Whether another delivery may start now.
    pub fn can_take(&self, in_flight: usize, now: Instant) -> bool {
        self.backoff_until.is_none_or(|t| t <= now) && (in_flight as f64) < self.limit.max(1.0)
    }

    /// A message went through.
    pub fn success(&mut self, workers: usize) {
        self.failures = 0;
        self.backoff_until = None;
        self.last_error = None;
        if self.limit.is_finite() {
            self.limit += 1.0 / self.limit.max(1.0);
            if self.limit >= workers as f64 {
                self.limit = f64::INFINITY;
            }
        }
    }

    /// The route failed as a whole (connect refused, timeout, bad greeting): wait before the next
    /// try, doubling the wait each time up to `max`.
    pub fn failure(
        &mut self,
        now: Instant,
        min: Duration,
        max: Duration,
        error: String,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.setbacks += 1;
        let wait = backoff(self.failures, min, max);
        self.backoff_until = Some(now + wait);
        self.last_error = Some(error);
        wait
    }

    /// The primary said `421` (too busy): halve the concurrency it gets, and back off.
    pub fn throttled(
        &mut self,
        now: Instant,
        in_flight: usize,
        min: Duration,
        max: Duration,
        error: String,
    ) -> Duration {
        let current = if self.limit.is_finite() {
            self.limit
        } else {
            in_flight.max(1) as f64
        };
        self.limit = (current / 2.0).max(1.0);
        self.failure(now, min, max, error)
    }

    /// The primary is known to be up again (probe): try at once.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.backoff_until = None;
    }

    pub fn limit(&self) -> Option<usize> {
        self.limit.is_finite().then_some(self.limit as usize)
    }

    /// How many times the route has failed or been throttled, ever.
    pub fn setbacks(&self) -> u64 {
        self.setbacks
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn backing_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| t > now)
    }
}

/// Exponential backoff: `min`, `2·min`, `4·min`, … capped at `max`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    min.saturating_mul(1u32 << exp).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_spaces_evenly() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(50);
        let slots: Vec<Instant> = (0..101).map(|_| r.reserve(t0)).collect();
        assert_eq!(slots[0], t0);
        let span = slots[100] - slots[0];
        assert!((span.as_secs_f64() - 2.0).abs() < 1e-6, "{span:?}");
    }

    #[test]
    fn rate_limiter_does_not_bank_idle_time() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10);
        r.reserve(t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(r.reserve(later), later);
        assert_eq!(r.reserve(later), later + Duration::from_millis(100));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0);
        assert!((0..1000).all(|_| r.reserve(t0) == t0));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff(1, s(30), s(3600)), s(30));
        assert_eq!(backoff(2, s(30), s(3600)), s(60));
        assert_eq!(backoff(5, s(30), s(3600)), s(480));
        assert_eq!(backoff(50, s(30), s(3600)), s(3600));
    }

    #[test]
    fn failure_blocks_until_backoff_passes() {
        let t0 = Instant::now();
        let mut h = RouteHealth::default();
        assert!(h.can_take(100, t0));
        h.failure(
            t0,
            Duration::from_secs(1),
            Duration::from_secs(8),
            "refused".into(),
        );
        assert!(!h.can_take(0, t0));
        assert!(h.can_take(0, t0 + Duration::from_secs(1)));
        h.failure(
            t0,
            Duration::from_secs(1),
            Duration::from_secs(8),
            "refused".into(),
        );
        assert!(!h.can_take(0, t0 + Duration::from_secs(1)));
        h.reset();
        assert!(h.can_take(0, t0));
        h.success(1);
        assert_eq!(
            h.setbacks(),
            2,
            "setbacks count every failure, success resets none"
        );
    }

    #[test]
    fn throttle_halves_concurrency_then_recovers() {
        let t0 = Instant::now();
        let mut h = RouteHealth::default();
        h.throttled(t0, 8, Duration::ZERO, Duration::ZERO, "421".into());
        assert_eq!(h.limit(), Some(4));
        assert!(!h.can_take(4, t0));
        assert!(h.can_take(3, t0));
        h.throttled(t0, 4, Duration::ZERO, Duration::ZERO, "421".into());
        assert_eq!(h.limit(), Some(2));
        for _ in 0..100 {
            h.success(8);
        }
        assert_eq!(
            h.limit(),
            None,
            "back to unlimited after a run of successes"
        );
    }
}

//! Per-user request budgets (GCRA, in memory) for one node.
//!
//! The budget is a sustained rate per minute with a burst allowance. A limited request learns
//! how long to wait; an allowed one learns how much budget is left, for the `RateLimit` headers.
//! Budgets shared across nodes (Redis) come with multi-node presence.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Budget left after an allowed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// The burst size (the most requests that can be made at once).
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the budget is full again.
    pub reset_secs: u64,
}

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub limit: u32,
    pub retry_after: Duration,
}

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// A keyed budget: one token bucket per key (tenant and user).
pub struct RequestBudget {
    limiter: Keyed,
    clock: DefaultClock,
    per_minute: u32,
    burst: u32,
}

impl RequestBudget {
    /// `per_minute` sustained requests with bursts of `burst`. Zero values are raised to one.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute).allow_burst(burst_nz);
        let clock = DefaultClock::default();
        RequestBudget {
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            clock,
            per_minute: per_minute.get(),
            burst: burst_nz.get(),
        }
    }

    /// Spends one request of `key`'s budget.
    pub fn check(&self, key: &str) -> Result<Allowed, Limited> {
        match self.limiter.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = self.burst.saturating_sub(remaining);
                let per_request_ms = 60_000u64 / u64::from(self.per_minute.max(1));
                Ok(Allowed {
                    limit: self.burst,
                    remaining,
                    reset_secs: (u64::from(used) * per_request_ms).div_ceil(1000),
                })
            }
            Err(not_until) => Err(Limited {
                limit: self.burst,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }

    /// Sustained requests per minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// The `RateLimit-Policy` header value: the burst, and the window (seconds) in which a spent
    /// burst refills at the sustained rate.
    pub fn policy(&self) -> String {
        let window = (u64::from(self.burst) * 60).div_ceil(u64::from(self.per_minute.max(1)));
        format!("{};w={}", self.burst, window.max(1))
    }

    /// Forgets keys whose budget is full again, bounding memory to active users.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_allowed_then_refused_with_a_delay() {
        let b = RequestBudget::new(60, 3);
        assert_eq!(b.check("u").map(|a| a.remaining), Ok(2));
        assert_eq!(b.check("u").map(|a| a.remaining), Ok(1));
        assert_eq!(b.check("u").map(|a| a.remaining), Ok(0));
        let limited = b.check("u").expect_err("budget spent");
        assert!(limited.retry_after > Duration::from_millis(500));
        assert!(limited.retry_after <= Duration::from_secs(1));
        // Another key has its own budget.
        assert!(b.check("v").is_ok());
    }
}

//! Per-user request budgets (GCRA, in memory) for one node.
//!
//! The budget is a sustained rate per minute with a burst allowance. A limited request learns
//! how long to wait; an allowed one learns how much budget is left, for the `RateLimit` headers.
//! Budgets shared across nodes (Redis) come with multi-node presence.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// A budget per client IP address (GCRA), for what a caller does before it is known: requests
/// and WebSocket upgrades that fail to authenticate, and development tokens. Spending it past the
/// burst blocks the address until the next request is due; [`AddressBudget::blocked`] tells
/// without spending, so an upgrade can be refused before it takes a connection.
pub struct AddressBudget {
    limiter: Option<RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>>,
    clock: DefaultClock,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl AddressBudget {
    /// `per_minute` sustained with bursts of `burst`; `per_minute` 0 turns the budget off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|per_minute| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst))
        });
        AddressBudget {
            limiter,
            clock: DefaultClock::default(),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// The key of an address: IPv4 as is, IPv6 by its /64 network (what one subscriber gets, so
    /// one client cannot walk through addresses to reset its budget).
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
            },
        }
    }

    /// Spends one unit of `ip`'s budget; over budget, the delay after which it may try again.
    pub fn spend(&self, ip: IpAddr) -> Result<(), Duration> {
        let ip = Self::key(ip);
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        match limiter.check_key(&ip) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let until = Instant::now() + wait;
                let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
                blocked.insert(ip, until);
                Err(wait.max(Duration::from_millis(1)))
            }
        }
    }

    /// Whether `ip` spent its budget and must still wait (how long), without spending.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let ip = Self::key(ip);
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let until = *blocked.get(&ip)?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Forgets addresses whose budget is full again and blocks that ended.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
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

    #[test]
    fn an_address_over_its_budget_is_blocked_until_the_next_unit() {
        let b = AddressBudget::new(60, 2);
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(b.blocked(ip), None);
        assert!(b.spend(ip).is_ok());
        assert!(b.spend(ip).is_ok());
        let wait = b.spend(ip).expect_err("budget spent");
        assert!(wait <= Duration::from_secs(1));
        assert!(b.blocked(ip).is_some());
        assert_eq!(b.blocked([127, 0, 0, 2].into()), None);
        // IPv6 addresses of one /64 share a budget.
        let a: IpAddr = "2001:db8::1".parse().expect("v6");
        let b2: IpAddr = "2001:db8::ffff:2".parse().expect("v6");
        assert!(b.spend(a).is_ok());
        assert!(b.spend(b2).is_ok());
        assert!(b.spend(a).is_err());
        assert!(b.blocked(b2).is_some());
        assert!(b.blocked("2001:db8:0:1::1".parse().expect("v6")).is_none());
        let off = AddressBudget::new(0, 0);
        for _ in 0..100 {
            assert!(off.spend(ip).is_ok());
        }
    }
}

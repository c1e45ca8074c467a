//! Rules of one client connection that do not depend on its transport: the flood rule, token
//! expiry, liveness, and how much client input a reply may echo.
//!
//! Each rule is a plain value or function of `now` that the edge's session driver applies; none
//! of them does IO or reads a clock. They are the first pieces of the sans-IO session machine.

use std::time::{Duration, Instant};

/// Longest request `id` the server accepts (characters). A longer one is refused without being
/// echoed: every reply carries the id, so an unbounded id would be an unbounded echo.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// Most bytes of client input (a frame `type`, a value quoted by a parse error) that an error
/// message repeats.
pub const MAX_ECHO_BYTES: usize = 64;

/// Longest error message built from client input, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when it was cut.
pub fn truncate_echo(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// The flood rule: frames over the budget are refused one by one (`rate_limited`), and each
/// refusal adds one to the connection's flood count, which drains by the sustained rate
/// (`frames_per_second` per second). When the count reaches `close_at` the connection is
/// closed (4008).
///
/// So a burst of `close_at` refused frames closes, and so does any sustained rate above twice
/// the budget (at 10× the budget the count grows by 8× the budget per second); a client that
/// averages under twice its budget is refused but never closed.
#[derive(Debug, Clone, Default)]
pub struct FloodMeter {
    count: f32,
    at: Option<Instant>,
}

impl FloodMeter {
    /// A frame was refused at `now`. True when the connection must be closed.
    #[must_use]
    pub fn refused(&mut self, now: Instant, drain_per_second: u32, close_at: u32) -> bool {
        let drained = self.at.map_or(0.0, |at| {
            now.saturating_duration_since(at).as_secs_f32() * drain_per_second as f32
        });
        self.count = (self.count - drained).max(0.0) + 1.0;
        self.at = Some(now);
        self.count >= close_at.max(1) as f32
    }
}

/// The frame budget: `per_second` frames per second sustained, bursts of up to `burst` (the
/// generic cell rate algorithm: one cell every `1/per_second`, at most `burst` ahead of time).
#[derive(Debug, Clone, Default)]
pub struct FrameBudget {
    /// When the budget is back to full (theoretical arrival time of the next frame, pushed by
    /// every frame admitted).
    tat: Option<Instant>,
}

impl FrameBudget {
    /// A frame at `now`: true when admitted (and charged), false when over the budget.
    #[must_use]
    pub fn check(&mut self, now: Instant, per_second: u32, burst: u32) -> bool {
        let interval = Duration::from_secs(1) / per_second.max(1);
        let tolerance = interval * burst.max(1);
        let next = self.tat.map_or(now, |tat| tat.max(now)) + interval;
        if next.saturating_duration_since(now) > tolerance {
            return false;
        }
        self.tat = Some(next);
        true
    }
}

/// What a connection does about its token's expiry, decided at `now_unix` (seconds since the
/// epoch; `exp` is the token's claim, in the same unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDeadline {
    /// `exp` has passed: close the connection (4011).
    Expired,
    /// `exp` comes within the horizon: arm a timer for this long.
    In(Duration),
    /// Further away than the horizon: look again later (at the next heartbeat).
    Later,
}

/// Decides what to do about a token expiring at `exp`, looking `horizon` ahead (the driver's
/// next look: a heartbeat interval).
pub fn token_deadline(now_unix: Duration, exp: u64, horizon: Duration) -> TokenDeadline {
    let exp = Duration::from_secs(exp);
    match exp.checked_sub(now_unix) {
        None => TokenDeadline::Expired,
        Some(left) if left.is_zero() => TokenDeadline::Expired,
        Some(left) if left <= horizon => TokenDeadline::In(left),
        Some(_) => TokenDeadline::Later,
    }
}

/// Milliseconds from `now_unix` to `exp` (0 when passed), as stated to clients.
pub fn millis_until(now_unix: Duration, exp: u64) -> u64 {
    let left = Duration::from_secs(exp).saturating_sub(now_unix);
    u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
}

/// Liveness at a heartbeat: a connection from which nothing has been read for `timeout` is
/// dead. While a write to it is stuck, the driver reads nothing, so a peer that stopped reading
/// is dead after `timeout` too, however much it sends.
pub fn is_dead(now: Instant, last_heard: Instant, timeout: Duration) -> bool {
    now.saturating_duration_since(last_heard) > timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_refusals_closes_at_the_limit() {
        let mut m = FloodMeter::default();
        let t = Instant::now();
        for i in 1..200 {
            assert!(!m.refused(t, 5, 200), "closed after {i}");
        }
        assert!(m.refused(t, 5, 200));
    }

    #[test]
    fn ten_times_the_budget_closes_and_under_twice_never_does() {
        // Budget 5/s: at 50 frames/s, 45 are refused per second.
        let (mut m, t0) = (FloodMeter::default(), Instant::now());
        let mut closed_at = None;
        for i in 0..45 * 20 {
            let now = t0 + Duration::from_millis(i * 1000 / 45);
            if m.refused(now, 5, 200) {
                closed_at = Some(now - t0);
                break;
            }
        }
        let after = closed_at.expect("closed at 10x the budget");
        assert!(after < Duration::from_secs(6), "{after:?}");
        // At just under twice the budget: 4.5 refused per second, drained 5 per second.
        let mut m = FloodMeter::default();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i * 1000 * 2 / 9);
            assert!(!m.refused(now, 5, 200), "closed at refusal {i}");
        }
    }

    #[test]
    fn budget_admits_a_burst_then_the_sustained_rate() {
        let (mut b, t0) = (FrameBudget::default(), Instant::now());
        for i in 0..100 {
            assert!(b.check(t0, 50, 100), "frame {i} of the burst");
        }
        assert!(!b.check(t0, 50, 100), "the burst is spent");
        // One frame per 20 ms comes back.
        assert!(!b.check(t0 + Duration::from_millis(19), 50, 100));
        assert!(b.check(t0 + Duration::from_millis(20), 50, 100));
        assert!(!b.check(t0 + Duration::from_millis(20), 50, 100));
        // After a quiet second, 50 more fit.
        let t1 = t0 + Duration::from_millis(1020);
        for i in 0..50 {
            assert!(b.check(t1, 50, 100), "frame {i} after a second");
        }
        assert!(!b.check(t1, 50, 100));
    }

    #[test]
    fn token_deadline_by_horizon() {
        let now = Duration::from_secs(1_000);
        let h = Duration::from_secs(25);
        assert_eq!(token_deadline(now, 999, h), TokenDeadline::Expired);
        assert_eq!(token_deadline(now, 1_000, h), TokenDeadline::Expired);
        assert_eq!(
            token_deadline(now, 1_010, h),
            TokenDeadline::In(Duration::from_secs(10))
        );
        assert_eq!(token_deadline(now, 2_000, h), TokenDeadline::Later);
        assert_eq!(millis_until(now + Duration::from_millis(500), 1_001), 500);
        assert_eq!(millis_until(now, 10), 0);
    }

    #[test]
    fn echoes_are_cut_on_character_boundaries() {
        assert_eq!(truncate_echo("short", 64), "short");
        let long = "é".repeat(100);
        let cut = truncate_echo(&long, 63);
        assert!(cut.len() <= 63 + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }
}

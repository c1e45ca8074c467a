//! Active speaker detection from the audio-level header extension (RFC 6464), as a pure state
//! machine: the caller feeds levels with their arrival time and calls [`SpeakerDetector::tick`]
//! periodically; no clock of its own, no I/O.
//!
//! The RFC 6464 level is `-dBov` (0 loudest, -127 silence; str0m reports it as a negative
//! number). Each participant's *loudness* is `127 + level` averaged over a sliding window.
//! Hysteresis keeps the announcement calm:
//! - a participant becomes a candidate only when its loudness is at least `min_loudness`
//!   (speech, not room noise);
//! - it must beat the current speaker by `margin` for `hold` without interruption before the
//!   announcement changes (a cough does not steal the floor);
//! - when nobody is the speaker yet, the first candidate is announced at once;
//! - when the current speaker falls silent, it stays the speaker until someone else qualifies
//!   (the UI keeps the last speaker highlighted), or it leaves.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Tuning of [`SpeakerDetector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeakerConfig {
    /// Averaging window of the levels.
    pub window: Duration,
    /// Loudness (`127 + dBov`) a participant needs to count as speaking; 77 is -50 dBov.
    pub min_loudness: u8,
    /// How much louder (dB) a challenger must be than the current speaker.
    pub margin: u8,
    /// How long a challenger must stay ahead before the announcement changes.
    pub hold: Duration,
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        SpeakerConfig {
            window: Duration::from_millis(500),
            min_loudness: 77,
            margin: 6,
            hold: Duration::from_millis(800),
        }
    }
}

/// See the module docs. `K` identifies a participant.
#[derive(Debug)]
pub struct SpeakerDetector<K> {
    config: SpeakerConfig,
    samples: HashMap<K, VecDeque<(Instant, u8)>>,
    current: Option<K>,
    challenger: Option<(K, Instant)>,
}

/// Most samples kept per participant (50 packets/s × window; bounds memory on bad input).
const MAX_SAMPLES: usize = 256;

impl<K: Clone + Eq + Hash> SpeakerDetector<K> {
    pub fn new(config: SpeakerConfig) -> Self {
        SpeakerDetector {
            config,
            samples: HashMap::new(),
            current: None,
            challenger: None,
        }
    }

    /// The participant announced last, if any.
    pub fn current(&self) -> Option<&K> {
        self.current.as_ref()
    }

    /// Records one audio level (`-127..=0` dBov; positive values are clamped to 0).
    pub fn record(&mut self, who: K, now: Instant, level_dbov: i8) {
        let loudness = (127 + i16::from(level_dbov.clamp(-127, 0))) as u8;
        let samples = self.samples.entry(who).or_default();
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back((now, loudness));
    }

    /// Forgets a participant (it left). If it was the speaker, the announcement becomes `None`
    /// on the next [`tick`](Self::tick).
    pub fn remove(&mut self, who: &K) {
        self.samples.remove(who);
        if self.challenger.as_ref().is_some_and(|(c, _)| c == who) {
            self.challenger = None;
        }
    }

    /// Mean loudness of `who` over the window ending at `now` (0 with no samples).
    pub fn loudness(&self, who: &K, now: Instant) -> u8 {
        let Some(samples) = self.samples.get(who) else {
            return 0;
        };
        let from = now.checked_sub(self.config.window);
        let (sum, n) = samples
            .iter()
            .filter(|(t, _)| from.is_none_or(|f| *t >= f))
            .fold((0u32, 0u32), |(s, n), (_, l)| (s + u32::from(*l), n + 1));
        sum.checked_div(n).unwrap_or(0) as u8
    }

    /// Re-evaluates at `now`; returns `Some(new speaker)` when the announcement changes
    /// (`Some(None)`: the speaker left and nobody qualifies).
    pub fn tick(&mut self, now: Instant) -> Option<Option<K>> {
        // Drop samples older than the window.
        if let Some(from) = now.checked_sub(self.config.window) {
            for samples in self.samples.values_mut() {
                while samples.front().is_some_and(|(t, _)| *t < from) {
                    samples.pop_front();
                }
            }
        }
        if let Some(current) = &self.current
            && !self.samples.contains_key(current)
        {
            // The speaker left.
            self.current = None;
            self.challenger = None;
            let next = self.best(now).map(|(k, _)| k);
            self.current = next.clone();
            return Some(next);
        }

        let Some((best, best_loudness)) = self.best(now) else {
            self.challenger = None;
            return None;
        };
        let Some(current) = self.current.clone() else {
            self.current = Some(best.clone());
            return Some(Some(best));
        };
        if best == current
            || best_loudness
                < self
                    .loudness(&current, now)
                    .saturating_add(self.config.margin)
        {
            self.challenger = None;
            return None;
        }
        match &self.challenger {
            Some((c, since)) if *c == best => {
                if now.duration_since(*since) >= self.config.hold {
                    self.challenger = None;
                    self.current = Some(best.clone());
                    return Some(Some(best));
                }
            }
            _ => self.challenger = Some((best, now)),
        }
        None
    }

    /// The loudest participant at or above `min_loudness`.
    fn best(&self, now: Instant) -> Option<(K, u8)> {
        self.samples
            .keys()
            .map(|k| (k, self.loudness(k, now)))
            .filter(|(_, l)| *l >= self.config.min_loudness)
            .max_by_key(|(_, l)| *l)
            .map(|(k, l)| (k.clone(), l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds 20 ms packets of the given levels for `ms` and ticks every 100 ms; returns every
    /// change with its time offset.
    fn run(
        d: &mut SpeakerDetector<&'static str>,
        t0: Instant,
        from_ms: u64,
        ms: u64,
        levels: &[(&'static str, i8)],
    ) -> Vec<(u64, Option<&'static str>)> {
        let mut changes = vec![];
        let mut t = from_ms;
        while t < from_ms + ms {
            let now = t0 + MS * t as u32;
            for (who, level) in levels {
                d.record(who, now, *level);
            }
            if t.is_multiple_of(100)
                && let Some(change) = d.tick(now)
            {
                changes.push((t, change));
            }
            t += 20;
        }
        changes
    }

    #[test]
    fn first_speaker_is_announced_at_once_and_noise_never() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        // Room noise at -70 dBov: nobody speaks.
        assert!(run(&mut d, t0, 0, 1000, &[("a", -70), ("b", -90)]).is_empty());
        // a speaks at -30: announced as soon as the window's mean crosses the threshold,
        // without waiting for `hold` (nobody was speaking).
        let changes = run(&mut d, t0, 1000, 1000, &[("a", -30), ("b", -90)]);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].1, Some("a"));
        assert!((1000..1500).contains(&changes[0].0), "{changes:?}");
    }

    #[test]
    fn challenger_needs_margin_and_hold() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        assert_eq!(
            run(&mut d, t0, 0, 500, &[("a", -30), ("b", -90)]),
            vec![(0, Some("a"))]
        );
        // b slightly louder (3 dB < margin): no change, however long.
        assert!(run(&mut d, t0, 500, 3000, &[("a", -30), ("b", -27)]).is_empty());
        // A short burst of b (400 ms < hold) while a goes on: no change.
        assert!(run(&mut d, t0, 3500, 400, &[("a", -40), ("b", -20)]).is_empty());
        assert!(run(&mut d, t0, 3900, 1000, &[("a", -30), ("b", -90)]).is_empty());
        // b clearly louder for long enough: announced after hold (+ window catch-up).
        let changes = run(&mut d, t0, 4900, 3000, &[("a", -60), ("b", -20)]);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (at, who) = changes[0];
        assert_eq!(who, Some("b"));
        assert!(
            (4900 + 800..=4900 + 800 + 600).contains(&at),
            "switched at {at}"
        );
    }

    #[test]
    fn silent_speaker_stays_until_someone_qualifies_and_leaving_clears() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        run(&mut d, t0, 0, 500, &[("a", -30)]);
        assert_eq!(d.current(), Some(&"a"));
        // Everyone silent (or DTX: no packets at all): a stays.
        assert!(run(&mut d, t0, 500, 2000, &[("a", -127), ("b", -127)]).is_empty());
        assert!(run(&mut d, t0, 2500, 2000, &[]).is_empty());
        assert_eq!(d.current(), Some(&"a"));
        // a leaves while b is silent: nobody.
        d.remove(&"a");
        assert_eq!(d.tick(t0 + MS * 4600), Some(None));
        assert_eq!(d.tick(t0 + MS * 4700), None);
    }

    #[test]
    fn speaker_leaving_hands_over_to_the_loudest() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        run(&mut d, t0, 0, 500, &[("a", -20), ("b", -40), ("c", -45)]);
        assert_eq!(d.current(), Some(&"a"));
        d.remove(&"a");
        assert_eq!(d.tick(t0 + MS * 500), Some(Some("b")));
    }

    #[test]
    fn out_of_range_levels_are_clamped() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        d.record("a", t0, 100);
        assert_eq!(d.loudness(&"a", t0), 127);
        d.record("b", t0, i8::MIN);
        assert_eq!(d.loudness(&"b", t0), 0);
    }
}

//! How long to wait before the next reconnection attempt: exponential, with jitter.
//!
//! When a gateway goes away (restart, crash, a network cut) every client it held sees the drop
//! at the same moment. Were they all to retry after the same fixed (or doubling) delay, they would
//! come back at the same moments too, each wave a spike of connects, token checks and syncs on
//! the gateways that are left: a reconnect storm. So each delay is drawn at random between a
//! floor and a ceiling that doubles with every failed attempt up to a cap ("full jitter" above a
//! floor): the clients spread out over the whole window, the floor keeps one client from
//! hammering a server that accepts and drops it at once, and the cap bounds how long a client
//! waits once the server is back.

use std::time::Duration;

use rand::Rng;

/// A reconnection schedule: attempt `n` (from 0) waits a uniformly random time in
/// `[floor, min(cap, first · 2ⁿ)]`. Start a new one (or [`Backoff::reset`]) once a connection
/// has proved stable.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// The shortest wait, whatever the draw: a client never retries in a tight loop.
    floor: Duration,
    /// The ceiling of the first attempt's window; it doubles with each attempt.
    first: Duration,
    /// The largest ceiling: how long a client may wait once the server is back.
    cap: Duration,
    /// Attempts drawn since the last reset.
    attempt: u32,
}

impl Backoff {
    /// A schedule from `floor`, `first` (the first window's ceiling) and `cap`. A `first` or
    /// `cap` below `floor` is raised to it, so every window is `[floor, something ≥ floor]`.
    pub fn new(floor: Duration, first: Duration, cap: Duration) -> Self {
        let first = first.max(floor);
        Self {
            floor,
            first,
            cap: cap.max(first),
            attempt: 0,
        }
    }

    /// The shortest delay any attempt may get.
    pub fn floor(&self) -> Duration {
        self.floor
    }

    /// The longest delay any attempt may get.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Attempts drawn since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper end of the next attempt's window: `first · 2^attempt`, at most `cap`.
    pub fn ceiling(&self) -> Duration {
        // 2^20 times any sensible `first` is past any sensible cap; stop doubling there.
        let factor = 1u32 << self.attempt.min(20);
        self.first.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt (drawn from the thread's random generator), and one
    /// attempt more.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// [`Backoff::next_delay`] with a given random source (seeded in tests).
    pub(crate) fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let delay = rng.random_range(self.floor..=self.ceiling());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the first window (the connection held).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_ceiling_doubles_from_the_first_window_up_to_the_cap() {
        let mut b = Backoff::new(50 * MS, 200 * MS, 2000 * MS);
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay_with(&mut rng);
        }
        assert_eq!(ceilings, [200, 400, 800, 1600, 2000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), 200 * MS);
        assert_eq!(b.attempt(), 0);
    }

    #[test]
    fn every_delay_lies_between_the_floor_and_the_attempts_ceiling() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(50 * MS, 200 * MS, 2000 * MS);
        for _ in 0..10_000 {
            if b.attempt() > 12 {
                b.reset();
            }
            let ceiling = b.ceiling();
            let d = b.next_delay_with(&mut rng);
            assert!(
                d >= 50 * MS && d <= ceiling,
                "{d:?} outside [50ms, {ceiling:?}]"
            );
            assert!(d <= b.cap());
        }
    }

    #[test]
    fn delays_spread_over_the_whole_window() {
        // Clients dropped together must not come back together: the draws of one window cover
        // it, low end and high end alike.
        let mut rng = StdRng::seed_from_u64(42);
        let draws: Vec<Duration> = (0..2000)
            .map(|_| Backoff::new(50 * MS, 1000 * MS, 1000 * MS).next_delay_with(&mut rng))
            .collect();
        let (min, max) = (draws.iter().min(), draws.iter().max());
        assert!(min.is_some_and(|d| *d < 100 * MS), "lowest {min:?}");
        assert!(max.is_some_and(|d| *d > 950 * MS), "highest {max:?}");
        let below_half = draws.iter().filter(|d| **d < 525 * MS).count();
        assert!(
            (800..1200).contains(&below_half),
            "{below_half} of 2000 below the middle"
        );
    }

    #[test]
    fn odd_settings_still_give_a_window_above_the_floor() {
        let mut b = Backoff::new(300 * MS, 100 * MS, 200 * MS);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            assert_eq!(b.next_delay_with(&mut rng), 300 * MS);
        }
        let mut huge = Backoff::new(MS, Duration::from_secs(3600), Duration::MAX);
        for _ in 0..100 {
            huge.next_delay_with(&mut rng);
        }
        assert_eq!(huge.ceiling(), Duration::from_secs(3600) * (1 << 20));
    }

    #[test]
    fn the_thread_generator_gives_delays_in_bounds_too() {
        let mut b = Backoff::new(10 * MS, 20 * MS, 80 * MS);
        for _ in 0..100 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d >= 10 * MS && d <= ceiling);
        }
    }
}

//! A switch thrown by a rate, with a gap between the rates that turn it on and off.

use std::time::{Duration, Instant};

/// On while events come at `above` a second or more, and off again only once they fall below
/// half of that, so a rate near the threshold does not flip it at every window. The rate is
/// counted over windows of [`RateSwitch::WINDOW`]: a window closes at the first event counted
/// after its end, and its rate holds until the next one closes. `above` 0: always on.
///
/// Two paths that trade latency for fewer, fuller requests under load follow one: the gateways'
/// producer lanes (`crate::kafka::Lanes`: linger only above `KAFKA_LINGER_ABOVE`) and the
/// multiplexer's batch pace (wait for a batch to fill only above `MULTIPLEXER_BATCH_WAIT_ABOVE`).
#[derive(Debug, Clone)]
pub struct RateSwitch {
    above: u64,
    on: bool,
    window_start: Instant,
    in_window: u64,
    /// Events a second over the last window closed.
    rate: u64,
}

impl RateSwitch {
    /// How long events are counted before the rate is taken again.
    pub const WINDOW: Duration = Duration::from_millis(100);

    /// A switch that turns on at `above` events a second (0: always on), off before any event.
    pub fn new(above: u64, now: Instant) -> Self {
        Self {
            above,
            on: above == 0,
            window_start: now,
            in_window: 0,
            rate: 0,
        }
    }

    /// Counts `n` events at `now`. A window that has ended closes: its rate is taken, and the
    /// next window starts at `now`.
    pub fn count(&mut self, n: u64, now: Instant) {
        self.in_window += n;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Self::WINDOW {
            self.rate = self.in_window * 1000 / (elapsed.as_millis().max(1) as u64);
            self.in_window = 0;
            self.window_start = now;
        }
    }

    /// Events a second over the last window closed (0 before the first closes).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Whether the switch is on.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Where the last window's rate puts the switch: on at `above` or more, and once on, until
    /// below half of it. Asking again without a new window gives the same answer.
    pub fn wanted(&self) -> bool {
        if self.above == 0 {
            true
        } else if self.on {
            self.rate * 2 >= self.above
        } else {
            self.rate >= self.above
        }
    }

    /// Throws the switch where the rate puts it ([`RateSwitch::wanted`]); true if it moved.
    pub fn follow(&mut self) -> bool {
        let wanted = self.wanted();
        let moved = wanted != self.on;
        self.on = wanted;
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The switch turns on at the rate given, stays on down to half of it, turns off below that,
    /// takes a rate only once a window has passed, and with 0 is always on.
    #[test]
    fn on_at_the_rate_and_off_below_half_of_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = RateSwitch::new(10_000, t0);
        assert!(!s.is_on() && !s.wanted(), "idle: off");
        // The window's rate, as a switch that follows it after every count sees it.
        let window = |s: &mut RateSwitch, start: u64, each: u64| {
            for i in 1..=50 {
                s.count(each, at(start + 2 * i));
                s.follow();
            }
        };
        // 500 events in 100 ms: 5,000 a second, below the rate.
        window(&mut s, 0, 10);
        assert_eq!(s.rate(), 5_000);
        assert!(!s.is_on());
        // 1,200 in the next 100 ms: 12,000 a second.
        window(&mut s, 100, 24);
        assert_eq!(s.rate(), 12_000);
        assert!(s.is_on(), "on at 12,000 a second");
        // 6,000 a second: below the rate, above half of it, so it stays on.
        window(&mut s, 200, 12);
        assert!(s.is_on());
        // 4,000 a second: below half.
        window(&mut s, 300, 8);
        assert_eq!(s.rate(), 4_000);
        assert!(!s.is_on());
        // One event after a quiet second counts as the rate it is.
        s.count(1, at(1_400));
        assert!(!s.follow(), "1 a second: stays off");
        assert_eq!(s.rate(), 1);

        // Within a window nothing changes, however many events: the rate needs 100 ms.
        let mut burst = RateSwitch::new(10_000, t0);
        burst.count(2_000, at(50));
        assert!(!burst.follow());
        burst.count(0, at(100));
        assert!(burst.follow(), "2,000 in 100 ms is 20,000 a second");
        assert!(burst.is_on());

        // Asked again without a new window, the answer is the same (no flapping on one rate).
        let mut held = RateSwitch::new(10_000, t0);
        held.count(600, at(100));
        assert!(!held.follow(), "6,000 a second does not turn it on");
        assert!(!held.wanted());

        let mut always = RateSwitch::new(0, t0);
        assert!(always.is_on(), "0: always on");
        always.count(1, at(1_000));
        assert!(!always.follow() && always.is_on());
    }
}

//! Clocks that order last-writer-wins values.
//!
//! These clocks never decide causality (dots and version vectors do); they only
//! give concurrent writes to a last-writer-wins register a total order that
//! respects causality and roughly follows real time. Wall time is an *input* (the
//! caller passes milliseconds), so the clocks stay pure and tests stay exact.

use serde::{Deserialize, Serialize};

/// A Lamport clock: a counter that moves past every timestamp it observes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LamportClock {
    counter: u64,
}

impl LamportClock {
    /// A clock that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last timestamp issued or observed.
    pub fn current(&self) -> u64 {
        self.counter
    }

    /// Issues a timestamp greater than every one issued or observed before;
    /// `None` (and no change) once the clock has reached `u64::MAX`, which only
    /// an observed timestamp from a forged message can make it do.
    pub fn tick(&mut self) -> Option<u64> {
        self.counter = self.counter.checked_add(1)?;
        Some(self.counter)
    }

    /// Records a timestamp seen in a message, so later ticks order after it.
    pub fn observe(&mut self, timestamp: u64) {
        self.counter = self.counter.max(timestamp);
    }
}

/// A hybrid logical clock timestamp: wall milliseconds plus a logical counter that
/// breaks ties and carries causality when wall clocks disagree (Kulkarni et al.,
/// *Logical Physical Clocks*, 2014). Ordered by `(wall_ms, logical)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the issuing node saw them (or later).
    pub wall_ms: u64,
    /// Counts events within one `wall_ms`.
    pub logical: u32,
}

impl Hlc {
    /// The smallest timestamp strictly greater than `self`.
    pub fn successor(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc { wall_ms: self.wall_ms, logical },
            None => Hlc { wall_ms: self.wall_ms.saturating_add(1), logical: 0 },
        }
    }
}

/// A hybrid logical clock: issues [`Hlc`] timestamps that never go backwards, follow
/// the wall clock when it moves forward, and move past every timestamp observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HybridClock {
    last: Hlc,
}

impl HybridClock {
    /// A clock that has issued and seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Issues a timestamp greater than all earlier ones, given the wall clock now.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        self.last = if wall_ms > self.last.wall_ms {
            Hlc { wall_ms, logical: 0 }
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Records a timestamp seen in a message, so later timestamps order after it.
    pub fn observe(&mut self, seen: Hlc) {
        self.last = self.last.max(seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lamport_ticks_move_past_observed_timestamps() {
        let mut clock = LamportClock::new();
        assert_eq!(clock.tick(), Some(1));
        clock.observe(10);
        assert_eq!(clock.tick(), Some(11));
        clock.observe(3);
        assert_eq!(clock.tick(), Some(12));
    }

    #[test]
    fn hlc_follows_the_wall_clock_when_it_moves_forward() {
        let mut clock = HybridClock::new();
        assert_eq!(clock.now(100), Hlc { wall_ms: 100, logical: 0 });
        assert_eq!(clock.now(200), Hlc { wall_ms: 200, logical: 0 });
    }

    #[test]
    fn hlc_never_goes_backwards_when_the_wall_clock_does() {
        let mut clock = HybridClock::new();
        let a = clock.now(1_000);
        let b = clock.now(900);
        let c = clock.now(1_000);
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(c, Hlc { wall_ms: 1_000, logical: 2 });
    }

    #[test]
    fn hlc_orders_after_observed_remote_timestamps() {
        let mut clock = HybridClock::new();
        clock.observe(Hlc { wall_ms: 5_000, logical: 7 });
        assert_eq!(clock.now(10), Hlc { wall_ms: 5_000, logical: 8 });
    }

    #[test]
    fn hlc_logical_overflow_carries_into_the_wall_time() {
        let top = Hlc { wall_ms: 7, logical: u32::MAX };
        assert_eq!(top.successor(), Hlc { wall_ms: 8, logical: 0 });
        assert!(top.successor() > top);
    }
}

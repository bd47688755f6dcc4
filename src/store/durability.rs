//! When a write counts as done: the [`Durability`] modes, and exactly what each
//! can lose on a crash.

use super::StoreError;
use std::time::Duration;

/// The shortest [`Durability::Interval`]: a zero period would flush in a busy
/// loop, and below a millisecond `Sync` costs no more.
pub const FLUSH_INTERVAL_MIN: Duration = Duration::from_millis(1);

/// The longest [`Durability::Interval`]. Longer is taken for a mistake in units
/// (seconds given as milliseconds).
pub const FLUSH_INTERVAL_MAX: Duration = Duration::from_secs(3600);

/// Under [`Durability::Interval`], the most batches that are acknowledged and not
/// yet durable: a writer past it waits for a flush. It bounds what a crash can
/// lose however fast writers write, and it keeps sled's IO queue short, which
/// sled 0.34.7 needs to survive periodic flushes (see the sled engine's doc). At
/// full speed it costs one flush per 64 batches.
pub const UNFLUSHED_BATCHES_MAX: u64 = 64;

/// The bound of [`Durability::None`]: acknowledged batches not yet durable
/// past which a writer waits for the background flush. The same as
/// `Interval`'s: with a bound of 4,096 the stress test
/// `sustained_writes_never_stall_in_any_durability_mode` stalled for good
/// (sled 0.34.7's deadlock, module doc of the sled engine), so `None` is
/// `Interval(500 ms)` in all but name.
pub const NONE_UNFLUSHED_BATCHES_MAX: u64 = UNFLUSHED_BATCHES_MAX;

/// When `apply` returns, and what a crash can take back.
///
/// "Crash" means two different things. A process crash (`kill -9`, a panic that
/// aborts) loses what is still in the process: sled's IO buffers and its queue of
/// log writes. A machine crash (power loss, kernel panic, a VM killed) also loses
/// what the kernel had not yet put on the device.
///
/// | mode | `apply` returns | a crash can lose |
/// |---|---|---|
/// | `Sync` (default) | after the batch is on the device (sled's flush, then `fdatasync`); concurrent writers share one flush (group commit) | nothing acknowledged |
/// | `Interval(d)` | at once, unless [`UNFLUSHED_BATCHES_MAX`] acknowledged batches are not yet durable: then after a flush. A thread flushes every `d` | the writes of the last `d` plus one flush's time, and never more than [`UNFLUSHED_BATCHES_MAX`] acknowledged batches |
/// | `None` | at once, unless [`NONE_UNFLUSHED_BATCHES_MAX`] acknowledged batches are not yet durable. A thread flushes every 500 ms | the writes of the last 500 ms plus one flush's time, and never more than [`NONE_UNFLUSHED_BATCHES_MAX`] acknowledged batches |
///
/// sled's own background flusher is never used: under sustained writes it
/// flushed an unbounded backlog while holding sled's process-wide lock, which
/// stalled every writer for seconds (and, in sled 0.34.7, could deadlock). The
/// bounds keep each flush's work, and so each stall, small.
///
/// A clean shutdown (dropping the store, after the node's final flush) makes
/// everything durable in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after the batch is durable; concurrent writers share flushes.
    #[default]
    Sync,
    /// Acknowledge at once within [`UNFLUSHED_BATCHES_MAX`]; flush every period
    /// (between [`FLUSH_INTERVAL_MIN`] and [`FLUSH_INTERVAL_MAX`]).
    Interval(Duration),
    /// Acknowledge at once within [`NONE_UNFLUSHED_BATCHES_MAX`]; flush every
    /// 500 ms.
    None,
}

impl Durability {
    /// `self`, or the reason it cannot be used.
    pub fn validate(self) -> Result<Durability, StoreError> {
        let reason = match self {
            Durability::Interval(period) if period < FLUSH_INTERVAL_MIN => {
                "the flush interval is shorter than 1 ms"
            }
            Durability::Interval(period) if period > FLUSH_INTERVAL_MAX => {
                "the flush interval is longer than an hour"
            }
            _ => return Ok(self),
        };
        Err(StoreError::InvalidDurability { durability: self, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_intervals_outside_the_bounds_are_refused() {
        for period in [Duration::ZERO, Duration::from_micros(999), Duration::from_secs(3601)] {
            let result = Durability::Interval(period).validate();
            assert!(matches!(result, Err(StoreError::InvalidDurability { .. })), "{period:?}");
        }
        for durability in [
            Durability::Sync,
            Durability::None,
            Durability::Interval(FLUSH_INTERVAL_MIN),
            Durability::Interval(FLUSH_INTERVAL_MAX),
        ] {
            assert_eq!(durability.validate().unwrap(), durability);
        }
    }
}

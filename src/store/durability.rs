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
/// | `None` | at once, always | the writes of the last 500 ms at a light load; **without bound under sustained load** (below) |
///
/// Under `None`, a write waits for nothing, so writers can outrun the disk, and
/// only sled's own flusher runs (every 500 ms; it seals the current buffer and
/// fsyncs what has been written, without waiting for the rest). sled 0.34
/// queues its log writes on an unbounded queue: writers at full speed built a
/// backlog of 7–11 s (measured as the time closing the store then took), and
/// that backlog is what a crash loses. `Sync` and `Interval` hold writers back
/// instead.
///
/// Values large enough to go to a file of their own (sled "blobs", a page over
/// about 128 KiB) are fsynced by every flush of this engine, but not by sled's
/// own flusher: under `None` they are as durable as the kernel's write-back
/// makes them (about 30 s on Linux).
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
    /// Acknowledge at once; leave flushing to the engine's own defaults.
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

//! When an engine acknowledges a batch: the [`Durability`] modes on top of
//! [`GroupCommit`], for an engine whose flush is one call that makes everything
//! written before it durable (fjall's journal sync, redb's durable commit).
//!
//! An engine applies a batch (visible to reads, not yet durable), then calls
//! [`CommitPolicy::acknowledge`]:
//!
//! - `Sync`: waits in the group commit, so concurrent writers share one flush;
//! - `Interval(d)` and `None`: returns at once unless more than
//!   [`UNFLUSHED_BATCHES_MAX`] (resp. [`NONE_UNFLUSHED_BATCHES_MAX`]) batches
//!   would be acknowledged and not durable; a thread (`calmkv-flusher`) flushes
//!   every `d` (resp. 500 ms) through the same group commit.
//!
//! Dropping the policy stops and joins the flusher, then flushes once more, so a
//! clean close loses nothing in any mode. The sled engine keeps its own copy of
//! this logic, entangled with its file syncing.

use super::group_commit::{CommitError, GroupCommit};
use super::{Durability, StoreError, NONE_UNFLUSHED_BATCHES_MAX, UNFLUSHED_BATCHES_MAX};
use crate::metrics::Histogram;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The background flush period of [`Durability::None`].
pub(crate) const NONE_FLUSH_PERIOD: Duration = Duration::from_millis(500);

/// An engine's flush: returns once everything the engine applied before the
/// call is on the device.
pub(crate) trait DeviceFlush: Send + Sync + 'static {
    /// Flushes to the device.
    fn flush_to_device(&self) -> Result<(), StoreError>;
}

/// What the flusher thread shares with the store.
pub(crate) struct Shared<F> {
    /// The engine.
    pub(crate) engine: F,
    pub(crate) commit: GroupCommit,
    flush_latency: Arc<Histogram>,
}

impl<F: DeviceFlush> Shared<F> {
    /// Returns once every batch up to `generation` is durable.
    fn wait_durable(&self, generation: u64) -> Result<(), StoreError> {
        let flush = || {
            let started = Instant::now();
            self.engine.flush_to_device()?;
            self.flush_latency.observe(started.elapsed());
            Ok::<(), StoreError>(())
        };
        self.commit.wait_durable(generation, flush).map_err(|e| match e {
            CommitError::Flush(error) => error,
            CommitError::Failed { reason } => StoreError::FlushFailed { reason },
        })
    }
}

/// The durability rule of one store; see the module doc.
pub(crate) struct CommitPolicy<F: DeviceFlush> {
    shared: Arc<Shared<F>>,
    durability: Durability,
    flusher: Option<Flusher>,
}

impl<F: DeviceFlush> CommitPolicy<F> {
    /// Starts the policy over `engine` (and its flusher thread, if the mode has
    /// one). `durability` must be valid.
    pub(crate) fn start(engine: F, durability: Durability) -> std::io::Result<CommitPolicy<F>> {
        let shared = Arc::new(Shared {
            engine,
            commit: GroupCommit::default(),
            flush_latency: Arc::new(Histogram::default()),
        });
        let period = match durability {
            Durability::Interval(period) => Some(period),
            Durability::None => Some(NONE_FLUSH_PERIOD),
            Durability::Sync => None,
        };
        let flusher = match period {
            Some(period) => Some(Flusher::start(shared.clone(), period)?),
            None => None,
        };
        Ok(CommitPolicy { shared, durability, flusher })
    }

    /// The engine.
    pub(crate) fn engine(&self) -> &F {
        &self.shared.engine
    }

    /// The group commit (tests look at its counters).
    #[cfg(test)]
    pub(crate) fn commit(&self) -> &GroupCommit {
        &self.shared.commit
    }

    /// Refuses early once a flush has failed, before the caller applies its
    /// batch: nothing changes.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        self.shared.commit.check().map_err(|reason| StoreError::FlushFailed { reason })
    }

    /// Called once the engine applied a batch: returns when the batch may be
    /// acknowledged under this store's durability.
    pub(crate) fn acknowledge(&self) -> Result<(), StoreError> {
        let generation = self.shared.commit.register();
        match self.durability {
            Durability::Sync => self.shared.wait_durable(generation),
            Durability::Interval(_) if generation > UNFLUSHED_BATCHES_MAX => {
                self.shared.wait_durable(generation - UNFLUSHED_BATCHES_MAX)
            }
            Durability::None if generation > NONE_UNFLUSHED_BATCHES_MAX => {
                self.shared.wait_durable(generation - NONE_UNFLUSHED_BATCHES_MAX)
            }
            Durability::Interval(_) | Durability::None => Ok(()),
        }
    }

    /// Returns once everything acknowledged so far is durable.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        self.shared.wait_durable(self.shared.commit.registered())
    }

    /// The latency of every flush this policy ran.
    pub(crate) fn flush_latency(&self) -> Arc<Histogram> {
        self.shared.flush_latency.clone()
    }
}

impl<F: DeviceFlush> Drop for CommitPolicy<F> {
    /// Stops and joins the flusher, then makes everything durable.
    fn drop(&mut self) {
        drop(self.flusher.take());
        if let Err(error) = self.flush() {
            tracing::error!(%error, "the final flush of the store failed");
        }
    }
}

/// The flusher thread: flushes every period until the policy is dropped, which
/// closes the channel and joins the thread.
struct Flusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    fn start<F: DeviceFlush>(shared: Arc<Shared<F>>, period: Duration) -> std::io::Result<Flusher> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("calmkv-flusher".into()).spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                if let Err(error) = shared.wait_durable(shared.commit.registered()) {
                    tracing::error!(%error, "the periodic flush failed; the store refuses writes");
                    return;
                }
            }
        })?;
        Ok(Flusher { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the flusher thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fake engine: counts flushes.
    #[derive(Default)]
    struct Counting(AtomicU64);

    impl DeviceFlush for Counting {
        fn flush_to_device(&self) -> Result<(), StoreError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn sync_flushes_before_each_acknowledgement() {
        let policy = CommitPolicy::start(Counting::default(), Durability::Sync).unwrap();
        for i in 1..=3 {
            policy.acknowledge().unwrap();
            assert_eq!(policy.engine().0.load(Ordering::SeqCst), i);
        }
    }

    #[test]
    fn interval_waits_only_past_the_unflushed_bound_and_drop_flushes() {
        let policy = CommitPolicy::start(
            Counting::default(),
            Durability::Interval(Duration::from_secs(3600)),
        )
        .unwrap();
        for _ in 0..UNFLUSHED_BATCHES_MAX {
            policy.acknowledge().unwrap();
        }
        assert_eq!(policy.engine().0.load(Ordering::SeqCst), 0, "acknowledged at once");
        policy.acknowledge().unwrap();
        assert_eq!(policy.engine().0.load(Ordering::SeqCst), 1);
        assert_eq!(policy.commit().durable(), UNFLUSHED_BATCHES_MAX + 1);
        policy.acknowledge().unwrap();
        let shared = policy.shared.clone();
        drop(policy);
        assert_eq!(shared.commit.durable(), UNFLUSHED_BATCHES_MAX + 2, "drop flushed the rest");
        assert_eq!(Arc::strong_count(&shared), 1, "the flusher thread ended");
    }

    #[test]
    fn the_flusher_flushes_in_the_background() {
        let policy = CommitPolicy::start(
            Counting::default(),
            Durability::Interval(Duration::from_millis(2)),
        )
        .unwrap();
        policy.acknowledge().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(policy.commit().wait_until_durable(1, deadline), "no background flush");
    }

    struct Failing;

    impl DeviceFlush for Failing {
        fn flush_to_device(&self) -> Result<(), StoreError> {
            Err(StoreError::Io {
                path: "journal".into(),
                source: std::io::Error::other("the device is gone"),
            })
        }
    }

    #[test]
    fn a_failed_flush_is_sticky() {
        let policy = CommitPolicy::start(Failing, Durability::Sync).unwrap();
        assert!(matches!(policy.acknowledge(), Err(StoreError::Io { .. })));
        assert!(matches!(policy.check(), Err(StoreError::FlushFailed { .. })));
        assert!(matches!(policy.flush(), Err(StoreError::FlushFailed { .. })));
    }
}

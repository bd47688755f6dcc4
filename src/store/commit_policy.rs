//! When an engine acknowledges a batch: the [`Durability`] modes on top of
//! [`GroupCommit`], for an engine whose flush is one call that makes everything
//! written before it durable (fjall's journal sync, redb's durable commit).
//!
//! An engine applies a batch (visible to reads, not yet durable), then either
//! calls [`CommitPolicy::acknowledge`], which blocks until the batch may be
//! acknowledged, or [`CommitPolicy::acknowledge_deferred`], which returns at
//! once with a [`CommitTicket`] that the writer waits on later, blocking or
//! async:
//!
//! - `Sync`: the writer waits in the group commit, so concurrent writers share
//!   one flush;
//! - `Interval(d)` and `None`: the ticket is ready at once unless more than
//!   [`UNFLUSHED_BATCHES_MAX`] (resp. [`NONE_UNFLUSHED_BATCHES_MAX`]) batches
//!   would be acknowledged and not durable.
//!
//! Every store has one thread, `calmkv-committer`, that flushes through the
//! same group commit: when an async waiter asks for a flush (an HTTP request
//! never blocks its thread on the disk), and in `Interval(d)` and `None` also
//! every `d` (resp. 500 ms). A blocking waiter leads a flush itself when none
//! is running, which saves it the committer's wake-up.
//!
//! Dropping the policy stops and joins the committer, then flushes once more,
//! so a clean close loses nothing in any mode. The sled engine keeps its own
//! copy of this logic, entangled with its file syncing.

use super::group_commit::{CommitError, GroupCommit};
use super::{Durability, StoreError, NONE_UNFLUSHED_BATCHES_MAX, UNFLUSHED_BATCHES_MAX};
use crate::metrics::Histogram;
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

/// What the committer thread shares with the store.
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

/// A [`Shared`] with its engine type erased, as a [`CommitTicket`] holds it.
trait Commit: Send + Sync {
    fn wait_durable(&self, generation: u64) -> Result<(), StoreError>;
    fn group(&self) -> &GroupCommit;
}

impl<F: DeviceFlush> Commit for Shared<F> {
    fn wait_durable(&self, generation: u64) -> Result<(), StoreError> {
        Shared::wait_durable(self, generation)
    }

    fn group(&self) -> &GroupCommit {
        &self.commit
    }
}

/// A batch that is applied and may not be acknowledged yet: wait on it
/// ([`CommitTicket::wait`] from a thread that may block,
/// [`CommitTicket::wait_async`] from a task) before telling anyone the batch
/// is written. Dropping it unwaited loses nothing; only the acknowledgement
/// would come too early.
#[must_use = "a batch may be acknowledged only once its ticket is waited on"]
pub struct CommitTicket {
    pending: Option<(Arc<dyn Commit>, u64)>,
}

impl std::fmt::Debug for CommitTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let generation = self.pending.as_ref().map(|(_, generation)| *generation);
        f.debug_struct("CommitTicket").field("generation", &generation).finish()
    }
}

impl CommitTicket {
    /// A ticket with nothing to wait for.
    pub fn ready() -> CommitTicket {
        CommitTicket { pending: None }
    }

    /// Whether waiting would return at once.
    pub fn is_ready(&self) -> bool {
        self.pending.is_none()
    }

    /// Blocks until the batch may be acknowledged, leading a flush when none
    /// is running.
    pub fn wait(self) -> Result<(), StoreError> {
        match self.pending {
            None => Ok(()),
            Some((commit, generation)) => commit.wait_durable(generation),
        }
    }

    /// Returns once the batch may be acknowledged, without blocking the
    /// thread: the store's committer thread runs the flush.
    pub async fn wait_async(self) -> Result<(), StoreError> {
        let Some((commit, generation)) = self.pending else { return Ok(()) };
        commit
            .group()
            .wait_durable_async(generation)
            .await
            .map_err(|reason| StoreError::FlushFailed { reason })
    }
}

/// The durability rule of one store; see the module doc.
pub(crate) struct CommitPolicy<F: DeviceFlush> {
    shared: Arc<Shared<F>>,
    durability: Durability,
    committer: Option<Committer>,
}

impl<F: DeviceFlush> CommitPolicy<F> {
    /// Starts the policy over `engine` and its committer thread. `durability` must be valid.
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
        let committer = Some(Committer::start(shared.clone(), period)?);
        Ok(CommitPolicy { shared, durability, committer })
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
    #[cfg(test)]
    pub(crate) fn acknowledge(&self) -> Result<(), StoreError> {
        self.acknowledge_deferred().wait()
    }

    /// Called once the engine applied a batch: the ticket to wait on before
    /// the batch is acknowledged under this store's durability.
    pub(crate) fn acknowledge_deferred(&self) -> CommitTicket {
        let generation = self.shared.commit.register();
        self.ticket_for(generation)
    }

    /// A ticket for a writer that applied nothing but saw the engine's state:
    /// it covers every batch registered so far (ready when all are durable).
    pub(crate) fn barrier(&self) -> CommitTicket {
        match self.shared.commit.pending() {
            Some(generation) => self.ticket_for(generation),
            None => CommitTicket::ready(),
        }
    }

    fn ticket_for(&self, generation: u64) -> CommitTicket {
        let wait_for = match self.durability {
            Durability::Sync => generation,
            Durability::Interval(_) if generation > UNFLUSHED_BATCHES_MAX => {
                generation - UNFLUSHED_BATCHES_MAX
            }
            Durability::None if generation > NONE_UNFLUSHED_BATCHES_MAX => {
                generation - NONE_UNFLUSHED_BATCHES_MAX
            }
            Durability::Interval(_) | Durability::None => return CommitTicket::ready(),
        };
        let commit: Arc<dyn Commit> = self.shared.clone();
        CommitTicket { pending: Some((commit, wait_for)) }
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
    /// Stops and joins the committer, then makes everything durable.
    fn drop(&mut self) {
        drop(self.committer.take());
        if let Err(error) = self.flush() {
            tracing::error!(%error, "the final flush of the store failed");
        }
    }
}

/// The committer thread: runs the flushes async writers ask for, and with a
/// period the periodic ones, until the policy is dropped, which stops and
/// joins it.
struct Committer {
    stop: Arc<dyn Commit>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    fn start<F: DeviceFlush>(
        shared: Arc<Shared<F>>,
        period: Option<Duration>,
    ) -> std::io::Result<Committer> {
        let stop: Arc<dyn Commit> = shared.clone();
        let thread =
            std::thread::Builder::new().name("calmkv-committer".into()).spawn(move || {
                while let Some(generation) = shared.commit.next_flush(period) {
                    if let Err(error) = shared.wait_durable(generation) {
                        tracing::error!(%error, "a flush failed; the store refuses writes");
                        return;
                    }
                }
            })?;
        Ok(Committer { stop, thread: Some(thread) })
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop.group().stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the committer thread panicked");
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
        assert_eq!(Arc::strong_count(&shared), 1, "the committer thread ended");
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

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    /// Under `Sync` a deferred ticket is pending until a flush; waited on
    /// async, the committer thread runs that flush.
    #[test]
    fn a_deferred_sync_ticket_resolves_through_the_committer() {
        let policy = CommitPolicy::start(Counting::default(), Durability::Sync).unwrap();
        let ticket = policy.acknowledge_deferred();
        assert!(!ticket.is_ready());
        assert_eq!(policy.engine().0.load(Ordering::SeqCst), 0, "nothing flushed yet");
        block_on(ticket.wait_async()).unwrap();
        assert_eq!(policy.engine().0.load(Ordering::SeqCst), 1);
        assert_eq!(policy.commit().durable(), 1);
    }

    /// The barrier of a writer that wrote nothing covers the batches before it,
    /// and is ready when they are all durable.
    #[test]
    fn the_barrier_waits_for_pending_batches_only() {
        let policy = CommitPolicy::start(Counting::default(), Durability::Sync).unwrap();
        assert!(policy.barrier().is_ready(), "nothing pending");
        let first = policy.acknowledge_deferred();
        let barrier = policy.barrier();
        assert!(!barrier.is_ready(), "a batch is pending");
        barrier.wait().unwrap();
        assert_eq!(policy.commit().durable(), 1, "the barrier covered the pending batch");
        first.wait().unwrap();
        assert_eq!(policy.engine().0.load(Ordering::SeqCst), 1, "one flush for both");
        assert!(policy.barrier().is_ready());
    }

    /// Under `None` a ticket is ready within the bound, as `acknowledge` is.
    #[test]
    fn a_none_ticket_is_ready_within_the_bound() {
        let policy = CommitPolicy::start(Counting::default(), Durability::None).unwrap();
        for _ in 0..NONE_UNFLUSHED_BATCHES_MAX {
            assert!(policy.acknowledge_deferred().is_ready());
        }
        let past = policy.acknowledge_deferred();
        assert!(!past.is_ready(), "past the bound a writer waits for a flush");
        block_on(past.wait_async()).unwrap();
        assert!(policy.commit().durable() >= 1);
    }
}

//! Group commit: many writers wait for durability, one flush serves them all.
//!
//! The coordinator knows nothing of the engine. A writer first applies its batch
//! to the engine, then [`GroupCommit::register`]s it and gets its *generation*
//! (1, 2, 3, … in registration order), then calls [`GroupCommit::wait_durable`]
//! with that generation and the engine's flush.
//!
//! In `wait_durable`, if no flush is running the writer becomes the *leader*: it
//! notes the newest generation registered (`target`), releases the lock, runs the
//! flush, then publishes `durable = target` and wakes every waiter. A writer that
//! finds a flush running waits for it to end and looks again: that flush's target
//! was fixed when it began, so it covers the writer only if the writer registered
//! before it began; otherwise the writer waits for (or leads) the next one, which
//! then covers every writer that arrived meanwhile.
//!
//! Why it is correct: a generation is handed out only after the engine's write
//! returned, and a leader reads `target` before it starts flushing. So every batch
//! up to `target` was in the engine when the flush began, and a flush makes durable
//! everything written before it began. A writer returns `Ok` only once
//! `durable >= its generation`.
//!
//! Async writers (HTTP requests) do not lead: [`GroupCommit::wait_durable_async`]
//! asks for a flush ([`GroupCommit::request`]) and awaits the published
//! durable generation; the store's committer thread, which waits for such
//! requests in [`GroupCommit::next_flush`], leads the flush on their behalf.
//! Blocking writers and the committer share the same `flushing` flag, so there
//! is never more than one flush at a time, and a flush covers whoever
//! registered before it began, whichever kind of writer they are.
//!
//! A failed flush is sticky: the kernel may have dropped the pages it could not
//! write, so a later flush that succeeds proves nothing about them (PostgreSQL's
//! "fsyncgate", 2018). From the first failure on, every wait and every
//! [`GroupCommit::check`] fails.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why a writer was not acknowledged.
#[derive(Debug)]
pub(crate) enum CommitError<E> {
    /// This writer led a flush, and it failed with this error.
    Flush(E),
    /// A flush failed earlier (this is what it said); nothing is acknowledged any
    /// more.
    Failed {
        /// The first failed flush's error, as text.
        reason: String,
    },
}

#[derive(Debug, Default)]
struct State {
    /// The newest generation handed out.
    registered: u64,
    /// Every generation up to this one is durable.
    durable: u64,
    /// A leader is flushing now.
    flushing: bool,
    /// Flushes that succeeded.
    flushes: u64,
    /// The first failed flush's error; set once, never cleared.
    failed: Option<String>,
    /// The newest generation an async writer asked the committer to make durable.
    wanted: u64,
    /// The committer thread is asked to end.
    stopping: bool,
}

/// What async writers watch: the durable generation, and whether a flush failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Published {
    durable: u64,
    failed: bool,
}

/// The coordinator; see the module doc.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    flush_ended: Condvar,
    /// Wakes the committer thread: a request, a flush that ended, a stop.
    work: Condvar,
    published: watch::Sender<Published>,
}

impl Default for GroupCommit {
    fn default() -> GroupCommit {
        GroupCommit {
            state: Mutex::default(),
            flush_ended: Condvar::new(),
            work: Condvar::new(),
            published: watch::Sender::new(Published::default()),
        }
    }
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of `State` is made whole under the lock, and no code runs
        // user callbacks while holding it: a poisoned lock still guards a
        // consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses early once a flush has failed, so that a caller can refuse a batch
    /// before applying it.
    pub(crate) fn check(&self) -> Result<(), String> {
        match &self.lock().failed {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    /// Registers a batch the engine has applied (its write returned) and returns
    /// its generation.
    pub(crate) fn register(&self) -> u64 {
        let mut state = self.lock();
        state.registered += 1;
        state.registered
    }

    /// The newest generation handed out.
    pub(crate) fn registered(&self) -> u64 {
        self.lock().registered
    }

    /// The newest generation handed out, when it is not yet durable: a writer
    /// that saw the engine's state and wrote nothing waits for it before it is
    /// acknowledged (what it saw may be another writer's batch still in flight).
    pub(crate) fn pending(&self) -> Option<u64> {
        let state = self.lock();
        (state.registered > state.durable).then_some(state.registered)
    }

    /// Asks the committer thread to make `generation` durable. Never blocks
    /// beyond the coordinator's lock.
    pub(crate) fn request(&self, generation: u64) {
        let mut state = self.lock();
        if generation > state.wanted {
            state.wanted = generation;
            if !state.flushing && generation > state.durable {
                self.work.notify_one();
            }
        }
    }

    /// Returns once `generation` is durable, without blocking a thread: asks
    /// the committer for a flush and awaits its publication. `Err` carries the
    /// first failed flush's error.
    pub(crate) async fn wait_durable_async(&self, generation: u64) -> Result<(), String> {
        let mut published = self.published.subscribe();
        self.request(generation);
        // The sender lives in `self`, which outlives this borrow: `Err` cannot
        // happen, and would count as a failure.
        let failed = published
            .wait_for(|p| p.failed || p.durable >= generation)
            .await
            .map_or(true, |seen| seen.failed);
        if failed {
            let reason = self.lock().failed.clone();
            return Err(reason.unwrap_or_else(|| "a flush failed".to_string()));
        }
        Ok(())
    }

    /// The committer thread's wait: blocks until a flush should run, and returns
    /// the generation to flush up to; `None` once [`GroupCommit::stop`] was
    /// called or a flush failed. A flush is due when an async writer asked for
    /// one ([`GroupCommit::request`]), or with `period`, every period while
    /// something registered is not yet durable.
    pub(crate) fn next_flush(&self, period: Option<Duration>) -> Option<u64> {
        let mut state = self.lock();
        let mut due = period.map(|p| Instant::now() + p);
        loop {
            if state.stopping || state.failed.is_some() {
                return None;
            }
            if state.wanted > state.durable && !state.flushing {
                return Some(state.wanted);
            }
            match (due, period) {
                (Some(at), Some(period)) => {
                    let now = Instant::now();
                    if now >= at {
                        if state.registered > state.durable && !state.flushing {
                            return Some(state.registered);
                        }
                        due = Some(now + period);
                        continue;
                    }
                    state = self
                        .work
                        .wait_timeout(state, at - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                _ => state = self.work.wait(state).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    /// Makes [`GroupCommit::next_flush`] return `None` from now on.
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
    }

    /// Every generation up to this one is durable.
    #[cfg(test)]
    pub(crate) fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// Waits until `generation` is durable or `deadline` passes; whether it is.
    #[cfg(test)]
    pub(crate) fn wait_until_durable(&self, generation: u64, deadline: std::time::Instant) -> bool {
        let mut state = self.lock();
        while state.durable < generation {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                return false;
            };
            state = self
                .flush_ended
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Flushes that succeeded so far.
    #[cfg(test)]
    pub(crate) fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Returns once every batch up to `generation` is durable, running `flush` as
    /// the leader when no flush is running (see the module doc). Blocks.
    pub(crate) fn wait_durable<E: std::fmt::Display>(
        &self,
        generation: u64,
        flush: impl Fn() -> Result<(), E>,
    ) -> Result<(), CommitError<E>> {
        let mut state = self.lock();
        assert!(generation <= state.registered, "waiting for a generation never handed out");
        loop {
            if let Some(reason) = &state.failed {
                return Err(CommitError::Failed { reason: reason.clone() });
            }
            if state.durable >= generation {
                return Ok(());
            }
            if state.flushing {
                state = self.flush_ended.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.flushing = true;
            let leading = Leading { commit: self, target: state.registered, outcome: None };
            drop(state);
            let result = flush();
            leading.end(result.as_ref().err().map(|e| e.to_string()));
            result.map_err(CommitError::Flush)?;
            state = self.lock();
        }
    }
}

/// A running flush. Ending it — normally, or by unwinding when the flush panics —
/// clears `flushing` and wakes the waiters, so no one waits for a flush that
/// will never end.
struct Leading<'a> {
    commit: &'a GroupCommit,
    target: u64,
    /// `Some(None)`: succeeded; `Some(Some(e))`: failed with `e`; `None`: the
    /// flush did not return (a panic), which counts as a failure.
    outcome: Option<Option<String>>,
}

impl Leading<'_> {
    fn end(mut self, error: Option<String>) {
        self.outcome = Some(error);
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut state = self.commit.lock();
        state.flushing = false;
        match self.outcome.take() {
            Some(None) => {
                state.durable = state.durable.max(self.target);
                state.flushes += 1;
            }
            Some(Some(error)) => {
                state.failed.get_or_insert(error);
            }
            None => {
                state.failed.get_or_insert_with(|| "the flush panicked".to_string());
            }
        }
        let published = Published { durable: state.durable, failed: state.failed.is_some() };
        self.commit.published.send_replace(published);
        self.commit.flush_ended.notify_all();
        self.commit.work.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::thread;

    fn ok() -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn a_lone_writer_leads_its_own_flush() {
        let commit = GroupCommit::default();
        let generation = commit.register();
        let flushes = AtomicU64::new(0);
        commit
            .wait_durable(generation, || {
                flushes.fetch_add(1, Ordering::SeqCst);
                ok()
            })
            .unwrap();
        assert_eq!((flushes.into_inner(), commit.durable(), commit.flushes()), (1, 1, 1));
        // Already durable: no second flush.
        commit.wait_durable(generation, || -> Result<(), String> { panic!("no flush") }).unwrap();
    }

    /// A flush that began before a writer registered does not acknowledge it: the
    /// writer waits for the next flush.
    #[test]
    fn a_writer_arriving_during_a_flush_waits_for_the_next_one() {
        let commit = Arc::new(GroupCommit::default());
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let first = commit.register();
        let leader = {
            let commit = commit.clone();
            thread::spawn(move || {
                commit.wait_durable(first, || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    ok()
                })
            })
        };
        started_rx.recv().unwrap(); // the first flush is running, target = 1
        let second = commit.register();
        let second_flushes = Arc::new(AtomicU64::new(0));
        let writer = {
            let (commit, second_flushes) = (commit.clone(), second_flushes.clone());
            thread::spawn(move || {
                commit.wait_durable(second, || {
                    second_flushes.fetch_add(1, Ordering::SeqCst);
                    ok()
                })
            })
        };
        release_tx.send(()).unwrap();
        leader.join().unwrap().unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(second_flushes.load(Ordering::SeqCst), 1, "the second writer led a flush");
        assert_eq!((commit.flushes(), commit.durable()), (2, 2));
    }

    /// Writers that register during one flush are all covered by the next: two
    /// flushes for any number of writers.
    #[test]
    fn one_flush_acknowledges_every_writer_that_waited_for_it() {
        let writers = 16;
        let commit = Arc::new(GroupCommit::default());
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        // Only the first flush blocks: once `release_tx` is dropped, `recv` fails
        // at once.
        let flush = Arc::new(move || {
            let _ = started_tx.send(());
            let _ = release_rx.lock().unwrap().recv();
            ok()
        });
        let first = commit.register();
        let leader = {
            let (commit, flush) = (commit.clone(), flush.clone());
            thread::spawn(move || commit.wait_durable(first, &*flush))
        };
        started_rx.recv().unwrap(); // the first flush runs, with target 1
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                let generation = commit.register();
                let (commit, flush) = (commit.clone(), flush.clone());
                thread::spawn(move || commit.wait_durable(generation, &*flush))
            })
            .collect();
        drop(release_tx);
        leader.join().unwrap().unwrap();
        for handle in handles {
            handle.join().unwrap().unwrap();
        }
        // Whichever writer led the second flush, its target was every generation
        // handed out, so no third flush was needed.
        assert_eq!((commit.durable(), commit.flushes()), (writers + 1, 2));
    }

    /// The property itself, against a fake engine: when a writer is
    /// acknowledged, a flush that began after its write has ended.
    #[test]
    fn no_writer_is_acknowledged_before_a_flush_that_began_after_its_write() {
        let (threads, per_thread) = (8, 200);
        let commit = Arc::new(GroupCommit::default());
        // The fake engine: `written` counts writes; a flush makes durable what was
        // written when it began.
        let written = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (commit, written, durable) = (commit.clone(), written.clone(), durable.clone());
                thread::spawn(move || {
                    for _ in 0..per_thread {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        let generation = commit.register();
                        commit
                            .wait_durable(generation, || {
                                let covered = written.load(Ordering::SeqCst);
                                thread::yield_now(); // a flush takes time
                                durable.fetch_max(covered, Ordering::SeqCst);
                                ok()
                            })
                            .unwrap();
                        assert!(durable.load(Ordering::SeqCst) >= mine, "acknowledged too early");
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let writes = (threads * per_thread) as u64;
        assert_eq!(commit.durable(), writes);
        assert!((1..=writes).contains(&commit.flushes()), "{} flushes", commit.flushes());
    }

    #[test]
    fn a_failed_flush_acknowledges_no_one_from_then_on() {
        let commit = GroupCommit::default();
        let first = commit.register();
        let result = commit.wait_durable(first, || Err("disk on fire".to_string()));
        assert!(matches!(result, Err(CommitError::Flush(ref e)) if e == "disk on fire"));
        assert_eq!(commit.durable(), 0);
        // A later flush would succeed, but it proves nothing about the lost pages.
        let second = commit.register();
        let result = commit.wait_durable(second, ok);
        assert!(
            matches!(result, Err(CommitError::Failed { ref reason }) if reason == "disk on fire")
        );
        assert_eq!(commit.check(), Err("disk on fire".to_string()));
        assert_eq!((commit.durable(), commit.flushes()), (0, 0));
    }

    #[test]
    fn a_panicking_flush_does_not_strand_the_writers_waiting_for_it() {
        let commit = Arc::new(GroupCommit::default());
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let first = commit.register();
        let leader = {
            let commit = commit.clone();
            thread::spawn(move || {
                commit.wait_durable(first, || -> Result<(), String> {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    panic!("the flush panicked on purpose")
                })
            })
        };
        started_rx.recv().unwrap();
        let second = commit.register();
        let writer = {
            let commit = commit.clone();
            thread::spawn(move || commit.wait_durable(second, ok))
        };
        release_tx.send(()).unwrap();
        assert!(leader.join().is_err(), "the leader's panic propagates to it");
        let result = writer.join().unwrap();
        assert!(matches!(result, Err(CommitError::Failed { .. })), "{result:?}");
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    /// The committer's loop, as a store runs it, over a counting flush.
    fn committer(commit: Arc<GroupCommit>, flushes: Arc<AtomicU64>) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            while let Some(generation) = commit.next_flush(None) {
                let flushes = flushes.clone();
                let flush = move || {
                    flushes.fetch_add(1, Ordering::SeqCst);
                    ok()
                };
                if commit.wait_durable(generation, flush).is_err() {
                    return;
                }
            }
        })
    }

    /// An async writer never flushes itself: it asks, and the committer's flush
    /// acknowledges it.
    #[test]
    fn an_async_writer_is_acknowledged_by_the_committers_flush() {
        let commit = Arc::new(GroupCommit::default());
        let flushes = Arc::new(AtomicU64::new(0));
        let thread = committer(commit.clone(), flushes.clone());
        for expected in 1..=3 {
            let generation = commit.register();
            assert_eq!(commit.durable(), generation - 1, "not durable before the wait");
            block_on(commit.wait_durable_async(generation)).unwrap();
            assert!(commit.durable() >= generation);
            assert_eq!(flushes.load(Ordering::SeqCst), expected);
        }
        commit.stop();
        thread.join().unwrap();
    }

    /// A flush that began before an async writer registered does not acknowledge
    /// it: it waits for the next flush, which the committer starts by itself.
    #[test]
    fn an_async_writer_arriving_during_a_flush_waits_for_the_next_one() {
        let commit = Arc::new(GroupCommit::default());
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let first = commit.register();
        let leader = {
            let commit = commit.clone();
            thread::spawn(move || {
                commit.wait_durable(first, || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    ok()
                })
            })
        };
        started_rx.recv().unwrap(); // a blocking writer's flush runs, target 1
        let flushes = Arc::new(AtomicU64::new(0));
        let thread = committer(commit.clone(), flushes.clone());
        let second = commit.register();
        let waiting = {
            let commit = commit.clone();
            thread::spawn(move || block_on(commit.wait_durable_async(second)))
        };
        release_tx.send(()).unwrap();
        leader.join().unwrap().unwrap();
        waiting.join().unwrap().unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1, "the committer ran the second flush");
        assert_eq!((commit.flushes(), commit.durable()), (2, 2));
        commit.stop();
        thread.join().unwrap();
    }

    /// Async and blocking writers mixed: no one is acknowledged before a flush
    /// that began after its write, and flushes are shared.
    #[test]
    fn async_and_blocking_writers_share_flushes_and_none_is_acknowledged_early() {
        let commit = Arc::new(GroupCommit::default());
        let written = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let flush = {
            let (written, durable) = (written.clone(), durable.clone());
            move || {
                let covered = written.load(Ordering::SeqCst);
                thread::yield_now();
                durable.fetch_max(covered, Ordering::SeqCst);
                ok()
            }
        };
        let committer = {
            let (commit, flush) = (commit.clone(), flush.clone());
            thread::spawn(move || {
                while let Some(generation) = commit.next_flush(None) {
                    commit.wait_durable(generation, &flush).unwrap();
                }
            })
        };
        let per_writer = 100;
        let blocking: Vec<_> = (0..4)
            .map(|_| {
                let (commit, written, durable, flush) =
                    (commit.clone(), written.clone(), durable.clone(), flush.clone());
                thread::spawn(move || {
                    for _ in 0..per_writer {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        let generation = commit.register();
                        commit.wait_durable(generation, &flush).unwrap();
                        assert!(durable.load(Ordering::SeqCst) >= mine, "acknowledged too early");
                    }
                })
            })
            .collect();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        runtime.block_on(async {
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (commit, written, durable) =
                        (commit.clone(), written.clone(), durable.clone());
                    tokio::spawn(async move {
                        for _ in 0..per_writer {
                            let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                            let generation = commit.register();
                            commit.wait_durable_async(generation).await.unwrap();
                            assert!(durable.load(Ordering::SeqCst) >= mine, "acknowledged early");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        for handle in blocking {
            handle.join().unwrap();
        }
        let writes = 20 * per_writer;
        assert_eq!(commit.durable(), writes);
        assert!(commit.flushes() <= writes, "{} flushes", commit.flushes());
        commit.stop();
        committer.join().unwrap();
    }

    #[test]
    fn a_failed_flush_fails_every_async_writer() {
        let commit = Arc::new(GroupCommit::default());
        let thread = {
            let commit = commit.clone();
            thread::spawn(move || {
                while let Some(generation) = commit.next_flush(None) {
                    let _ = commit.wait_durable(generation, || Err("disk on fire".to_string()));
                }
            })
        };
        let first = commit.register();
        assert_eq!(block_on(commit.wait_durable_async(first)), Err("disk on fire".to_string()));
        thread.join().unwrap(); // a failure ends the committer's loop
        let second = commit.register();
        assert_eq!(block_on(commit.wait_durable_async(second)), Err("disk on fire".to_string()));
    }

    #[test]
    fn the_committer_flushes_periodically_what_no_one_waits_for() {
        let commit = Arc::new(GroupCommit::default());
        let thread = {
            let commit = commit.clone();
            thread::spawn(move || {
                while let Some(generation) = commit.next_flush(Some(Duration::from_millis(1))) {
                    commit.wait_durable(generation, ok).unwrap();
                }
            })
        };
        let generation = commit.register();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(commit.wait_until_durable(generation, deadline), "no periodic flush");
        assert_eq!(commit.pending(), None);
        commit.stop();
        thread.join().unwrap();
    }
}

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
//! A failed flush is sticky: the kernel may have dropped the pages it could not
//! write, so a later flush that succeeds proves nothing about them (PostgreSQL's
//! "fsyncgate", 2018). From the first failure on, every wait and every
//! [`GroupCommit::check`] fails.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

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
}

/// The coordinator; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    flush_ended: Condvar,
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
        self.commit.flush_ended.notify_all();
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
}

//! A store that fails on purpose: [`FaultyStore`] wraps any [`Store`] (usually
//! a [`MemoryStore`](super::MemoryStore)) and injects the faults a disk can
//! show — a failed write, a write refused for lack of space, a failed flush
//! (fsync), a flush that does not return — plus a crash that drops every batch
//! not yet flushed. Tests and the simulation drive the corner cases of a full or
//! failing disk with it, deterministically.
//!
//! # What each fault does
//!
//! | fault | when | the caller gets | the store |
//! |---|---|---|---|
//! | [`Fault::WriteError`] | an `apply`, before the inner store sees it | `StoreError::Io` (EIO) | unchanged |
//! | [`Fault::NoSpace`] | an `apply`, before the inner store sees it | `StoreError::InsufficientStorage` | unchanged |
//! | [`Fault::FlushError`] | a flush: `flush`, or the one a `Sync` `apply` runs after applying | `StoreError::Io` (EIO), then `StoreError::FlushFailed` for every later write and flush | the batch is applied (visible) but not durable; a [`FaultyStore::crash`] drops it |
//!
//! A failed flush sticks, as on the disk engines: the kernel may have dropped
//! the pages it could not write, so a later successful flush would prove
//! nothing. Writes are refused until [`FaultyStore::crash`], which stands for
//! a restart (the node recovers from what was durable).
//!
//! # Durability
//!
//! The wrapper keeps its own idea of what is durable: under
//! [`Durability::Sync`] an `apply` flushes before it returns; under `Interval`
//! and `None` nothing is durable until `flush` is called (there is no
//! background flusher: the simulation decides when time passes). Before it
//! applies a batch, the wrapper reads the old value of each key the batch
//! changes; [`FaultyStore::crash`] puts those back, newest batch first.
//!
//! Writes are serialized by the wrapper (one lock around apply and flush); reads
//! go straight to the inner store.
//!
//! # Choosing faults
//!
//! Scripted: [`FaultyStore::arm`] makes the next operation of that kind fail
//! once (several arms queue up). Seeded: [`FaultyStore::with_rates`] makes every
//! write and flush fail with a probability drawn from a seeded generator, so a
//! seed replays the same faults for the same sequence of calls. A stuck device:
//! [`FaultyStore::stall_flushes`] blocks every flush until it is released, and
//! [`FaultyStore::stall_reads`] every read.

use super::space::batch_bytes;
use super::{Batch, Change, Durability, Entry, Store, StoreError, StoreStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// A fault to inject; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `apply` fails with an I/O error; nothing changes.
    WriteError,
    /// The next `apply` fails for lack of space; nothing changes.
    NoSpace,
    /// The next flush fails; the store refuses writes until a crash.
    FlushError,
}

/// Probabilities, between 0 and 1, that each write or flush fails.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultRates {
    /// That an `apply` fails with [`Fault::WriteError`].
    pub write_error: f64,
    /// That an `apply` fails with [`Fault::NoSpace`].
    pub no_space: f64,
    /// That a flush fails with [`Fault::FlushError`].
    pub flush_error: f64,
}

/// What a [`FaultyStore::crash`] took back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Batches applied but not yet flushed, now undone.
    pub batches_lost: usize,
}

/// The old values of the keys one batch changed (`None`: the key was absent).
type Undo = Vec<(Vec<u8>, Option<Vec<u8>>)>;

#[derive(Debug, Default)]
struct State {
    /// Faults armed by [`FaultyStore::arm`], in order.
    armed: VecDeque<Fault>,
    /// Seeded faults, if any.
    seeded: Option<(StdRng, FaultRates)>,
    /// The undo record of each batch applied since the last successful flush.
    unflushed: Vec<Undo>,
    /// What the first failed flush said; writes are refused while set.
    failed: Option<String>,
    /// Faults injected so far.
    injected: u64,
}

impl State {
    /// Takes the first armed fault that applies to a write (or, with `flush`,
    /// to a flush), else draws a seeded one.
    fn next_fault(&mut self, flush: bool) -> Option<Fault> {
        let applies = |fault: &Fault| (*fault == Fault::FlushError) == flush;
        let fault = match self.armed.iter().position(applies) {
            Some(i) => self.armed.remove(i),
            None => self.seeded.as_mut().and_then(|(rng, rates)| {
                if flush {
                    rng.random_bool(rates.flush_error.clamp(0.0, 1.0)).then_some(Fault::FlushError)
                } else if rng.random_bool(rates.write_error.clamp(0.0, 1.0)) {
                    Some(Fault::WriteError)
                } else {
                    rng.random_bool(rates.no_space.clamp(0.0, 1.0)).then_some(Fault::NoSpace)
                }
            }),
        };
        self.injected += u64::from(fault.is_some());
        fault
    }
}

/// A [`Store`] wrapper that injects faults; see the module doc.
pub struct FaultyStore {
    inner: Box<dyn Store>,
    durability: Durability,
    state: Mutex<State>,
    /// Whether flushes, and reads, are stalled, and the condition they wait on.
    stalled: Mutex<Stalled>,
    released: Condvar,
}

/// What is stalled now.
#[derive(Debug, Default)]
struct Stalled {
    flushes: bool,
    reads: bool,
}

/// The path the injected errors name.
const FAULTY_PATH: &str = "<faulty store>";

fn injected_io(what: &str) -> StoreError {
    let source = std::io::Error::other(format!("injected {what} failure (EIO)"));
    StoreError::Io { path: PathBuf::from(FAULTY_PATH), source }
}

impl FaultyStore {
    /// Wraps `inner`, which should not be durable by itself (a
    /// [`MemoryStore`](super::MemoryStore)): the wrapper decides what a crash
    /// keeps. `durability` is the wrapper's own (see the module doc).
    pub fn new(inner: Box<dyn Store>, durability: Durability) -> FaultyStore {
        FaultyStore {
            inner,
            durability,
            state: Mutex::new(State::default()),
            stalled: Mutex::new(Stalled::default()),
            released: Condvar::new(),
        }
    }

    /// Fails, from now on, each write and flush with the given probabilities,
    /// drawn from a generator seeded with `seed`.
    pub fn with_rates(self, seed: u64, rates: FaultRates) -> FaultyStore {
        self.lock().seeded = Some((StdRng::seed_from_u64(seed), rates));
        self
    }

    /// Stops the seeded faults (armed ones stay armed): a simulation's quiet
    /// period after healing.
    pub fn stop_seeded_faults(&self) {
        self.lock().seeded = None;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of `State` is whole under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the next operation `fault` applies to fail, once.
    pub fn arm(&self, fault: Fault) {
        self.lock().armed.push_back(fault);
    }

    /// While `stalled`, every flush blocks (a device that does not answer);
    /// `false` releases them.
    pub fn stall_flushes(&self, stalled: bool) {
        self.stalled.lock().unwrap_or_else(PoisonError::into_inner).flushes = stalled;
        self.released.notify_all();
    }

    /// While `stalled`, every `get` and `scan_prefix` blocks; `false` releases
    /// them.
    pub fn stall_reads(&self, stalled: bool) {
        self.stalled.lock().unwrap_or_else(PoisonError::into_inner).reads = stalled;
        self.released.notify_all();
    }

    /// Blocks while `which` says the operation is stalled.
    fn wait_unless_stalled(&self, which: impl Fn(&Stalled) -> bool) {
        let mut stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        while which(&stalled) {
            stalled = self.released.wait(stalled).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Faults injected so far (armed and seeded).
    pub fn faults_injected(&self) -> u64 {
        self.lock().injected
    }

    /// Batches applied and not yet flushed: what a crash now would drop.
    pub fn unflushed_batches(&self) -> usize {
        self.lock().unflushed.len()
    }

    /// A crash and a restart: every batch not yet flushed is undone, newest
    /// first, and a failed flush is forgotten (the restarted store recovers
    /// from what was durable). Armed faults stay armed.
    pub fn crash(&self) -> Result<CrashReport, StoreError> {
        let mut state = self.lock();
        let batches_lost = state.unflushed.len();
        while let Some(undo) = state.unflushed.pop() {
            let mut batch = Batch::new();
            for (key, old) in undo {
                batch = match old {
                    Some(value) => batch.put(key, value),
                    None => batch.delete(key),
                };
            }
            self.inner.apply(batch)?;
        }
        state.failed = None;
        Ok(CrashReport { batches_lost })
    }

    /// Flushes under the lock: the stall, an injected fault, then the inner
    /// store's flush. A failure sticks.
    fn flush_locked(&self, state: &mut State) -> Result<(), StoreError> {
        if let Some(reason) = &state.failed {
            return Err(StoreError::FlushFailed { reason: reason.clone() });
        }
        self.wait_unless_stalled(|stalled| stalled.flushes);
        let result = match state.next_fault(true) {
            Some(_) => Err(injected_io("flush")),
            None => self.inner.flush(),
        };
        match result {
            Ok(()) => {
                state.unflushed.clear();
                Ok(())
            }
            Err(error) => {
                state.failed = Some(error.to_string());
                Err(error)
            }
        }
    }
}

impl Store for FaultyStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.wait_unless_stalled(|stalled| stalled.reads);
        self.inner.get(key)
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.wait_unless_stalled(|stalled| stalled.reads);
        self.inner.scan_prefix(prefix, start_after, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(reason) = &state.failed {
            return Err(StoreError::FlushFailed { reason: reason.clone() });
        }
        match state.next_fault(false) {
            Some(Fault::WriteError) => return Err(injected_io("write")),
            Some(Fault::NoSpace) => {
                return Err(StoreError::InsufficientStorage {
                    path: PathBuf::from(FAULTY_PATH),
                    available_bytes: 0,
                    needed_bytes: batch_bytes(&batch),
                })
            }
            Some(Fault::FlushError) | None => {}
        }
        // The old value of each key, read before the batch changes it.
        let mut undo: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for change in batch.changes() {
            let (Change::Put(key, _) | Change::Delete(key)) = change;
            if !undo.contains_key(key) {
                undo.insert(key.clone(), self.inner.get(key)?);
            }
        }
        self.inner.apply(batch)?;
        state.unflushed.push(undo.into_iter().collect());
        match self.durability {
            Durability::Sync => self.flush_locked(&mut state),
            Durability::Interval(_) | Durability::None => Ok(()),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.flush_locked(&mut self.lock())
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }

    /// Refused once a flush failed. It does not wait for the lock a stalled
    /// write holds: a write waiting on it is not refused, only slow.
    fn writable(&self) -> Result<(), StoreError> {
        match self.state.try_lock() {
            Ok(state) => match &state.failed {
                Some(reason) => Err(StoreError::FlushFailed { reason: reason.clone() }),
                None => self.inner.writable(),
            },
            Err(_) => self.inner.writable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn faulty(durability: Durability) -> FaultyStore {
        FaultyStore::new(Box::new(MemoryStore::new()), durability)
    }

    fn all(store: &dyn Store) -> Vec<Entry> {
        store.scan_prefix(b"", None, usize::MAX).unwrap()
    }

    #[test]
    fn an_armed_write_fault_fails_once_and_changes_nothing() {
        let store = faulty(Durability::Sync);
        store.apply(Batch::new().put("a", "1")).unwrap();
        store.arm(Fault::WriteError);
        let result = store.apply(Batch::new().put("a", "2").put("b", "2"));
        assert!(matches!(result, Err(StoreError::Io { .. })), "{result:?}");
        assert_eq!(all(&store), [(b"a".to_vec(), b"1".to_vec())]);
        store.apply(Batch::new().put("b", "3")).unwrap();
        assert_eq!(store.get(b"b").unwrap(), Some(b"3".to_vec()));
        assert_eq!(store.faults_injected(), 1);
    }

    #[test]
    fn no_space_is_insufficient_storage_and_changes_nothing() {
        let store = faulty(Durability::Sync);
        store.arm(Fault::NoSpace);
        let result = store.apply(Batch::new().put("k", "value"));
        assert!(
            matches!(result, Err(StoreError::InsufficientStorage { needed_bytes: 6, .. })),
            "{result:?}"
        );
        assert_eq!(all(&store), []);
        store.apply(Batch::new().put("k", "v")).unwrap();
    }

    #[test]
    fn a_failed_flush_under_sync_is_not_acknowledged_and_sticks_until_a_crash() {
        let store = faulty(Durability::Sync);
        store.apply(Batch::new().put("kept", "1")).unwrap();
        store.arm(Fault::FlushError);
        let result = store.apply(Batch::new().put("lost", "1"));
        assert!(matches!(result, Err(StoreError::Io { .. })), "{result:?}");
        // Applied but not durable: visible until the crash.
        assert_eq!(store.get(b"lost").unwrap(), Some(b"1".to_vec()));
        let refused = store.apply(Batch::new().put("later", "1"));
        assert!(matches!(refused, Err(StoreError::FlushFailed { .. })), "{refused:?}");
        assert!(matches!(store.flush(), Err(StoreError::FlushFailed { .. })));
        assert_eq!(store.get(b"later").unwrap(), None);
        assert_eq!(store.crash().unwrap(), CrashReport { batches_lost: 1 });
        assert_eq!(all(&store), [(b"kept".to_vec(), b"1".to_vec())]);
        store.apply(Batch::new().put("after", "1")).unwrap();
    }

    #[test]
    fn a_crash_undoes_every_unflushed_batch_newest_first() {
        let store = faulty(Durability::None);
        store.apply(Batch::new().put("a", "1").put("b", "1")).unwrap();
        store.flush().unwrap();
        store.apply(Batch::new().put("a", "2").delete("b").put("c", "2")).unwrap();
        store.apply(Batch::new().put("a", "3").put("b", "3").put("a", "4")).unwrap();
        assert_eq!(store.unflushed_batches(), 2);
        assert_eq!(store.crash().unwrap(), CrashReport { batches_lost: 2 });
        assert_eq!(all(&store), [(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"1".to_vec())]);
        assert_eq!(store.crash().unwrap(), CrashReport { batches_lost: 0 });
    }

    #[test]
    fn the_same_seed_injects_the_same_faults() {
        let run = |seed| {
            let rates = FaultRates { write_error: 0.2, no_space: 0.2, flush_error: 0.0 };
            let store = faulty(Durability::Sync).with_rates(seed, rates);
            (0..100)
                .map(|i| store.apply(Batch::new().put(format!("{i}"), "v")).is_ok())
                .collect::<Vec<bool>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().any(|ok| !ok) && run(7).iter().any(|ok| *ok));
    }

    #[test]
    fn a_stalled_flush_returns_once_released() {
        let store = faulty(Durability::Sync);
        store.stall_flushes(true);
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| store.apply(Batch::new().put("k", "v")));
            // Reads go on while the write is stuck.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while store.get(b"k").unwrap().is_none() {
                assert!(std::time::Instant::now() < deadline, "the write never applied");
                std::thread::yield_now();
            }
            assert!(!writer.is_finished());
            store.stall_flushes(false);
            writer.join().unwrap().unwrap();
        });
        assert_eq!(store.unflushed_batches(), 0);
    }
}

//! The sled engine: the only file that knows sled.
//!
//! # Group commit
//!
//! Under [`Durability::Sync`] every `apply` must wait for an fsync, but one
//! fsync covers every write before it. So writers number their batches (the
//! number is taken after the batch is in sled, under the flush lock); a writer
//! needing generation `g` waits until `flushed >= g`. If no flush is running, it
//! becomes the leader: it notes the newest generation applied, flushes without
//! the lock, then publishes that generation as flushed and wakes everyone. Writers
//! that arrive during a flush wait for the next one, which then covers all of
//! them: N concurrent writers cost about two fsyncs, not N.

use super::{scan_start, Batch, Change, Durability, Entry, Store, StoreError, StoreStats};
use crate::metrics::Histogram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct FlushState {
    /// Generation of the newest applied batch.
    applied: u64,
    /// Every batch up to this generation is durable.
    flushed: u64,
    /// A leader is flushing now.
    flushing: bool,
    /// The last error of the background flusher (interval mode), if any.
    background_error: Option<String>,
}

struct Shared {
    db: sled::Db,
    state: Mutex<FlushState>,
    flushed_cond: Condvar,
    flush_latency: Arc<Histogram>,
    batches: AtomicU64,
    stop: AtomicBool,
    stop_cond: Condvar,
    stop_lock: Mutex<()>,
}

/// How long an open waits for a previous handle of the same directory, in this
/// process, to release its file lock.
const LOCK_RELEASE_WAIT_MAX: Duration = Duration::from_secs(10);

/// Opens the database, waiting (bounded) while the directory's lock is still held
/// by a handle of this process that is shutting down: sled finishes writing on
/// its own threads after the last handle is dropped, so an immediate reopen (an
/// embedded application closing and reopening, a restart in a test) can find the
/// lock still taken. Another process holding the lock fails after the bound.
fn open_when_released(config: sled::Config) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_RELEASE_WAIT_MAX =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return Ok(result?),
        }
    }
}

/// How often [`Durability::None`] flushes in the background (sled's own default).
const NONE_FLUSH_PERIOD: Duration = Duration::from_millis(500);

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        StoreError::Engine { source: Box::new(error) }
    }
}

/// The durable engine, on sled 0.34.
pub struct SledStore {
    shared: Arc<Shared>,
    durability: Durability,
    flusher: Option<JoinHandle<()>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, durability: Durability) -> Result<SledStore, StoreError> {
        // sled's own flusher thread would keep the database (and its file lock)
        // alive after a drop; this engine runs its own, and joins it on drop.
        let db = open_when_released(sled::Config::new().path(dir).flush_every_ms(None))?;
        let shared = Arc::new(Shared {
            db,
            state: Mutex::new(FlushState::default()),
            flushed_cond: Condvar::new(),
            flush_latency: Arc::new(Histogram::default()),
            batches: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stop_cond: Condvar::new(),
            stop_lock: Mutex::new(()),
        });
        let background_period = match durability {
            Durability::Interval(period) => Some(period),
            Durability::None => Some(NONE_FLUSH_PERIOD),
            Durability::Sync => None,
        };
        let flusher = match background_period {
            Some(period) => {
                let shared = shared.clone();
                let thread = std::thread::Builder::new()
                    .name("calmkv-flusher".into())
                    .spawn(move || shared.flush_periodically(period))
                    .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
                Some(thread)
            }
            None => None,
        };
        Ok(SledStore { shared, durability, flusher })
    }

    /// The durability this store was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once every batch up to `generation` is durable (group commit).
    fn wait_flushed(&self, generation: u64) -> Result<(), StoreError> {
        let mut state = self.lock_state();
        loop {
            if state.flushed >= generation {
                return Ok(());
            }
            if state.flushing {
                state = self.flushed_cond.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.flushing = true;
            let target = state.applied;
            drop(state);
            let result = self.timed_flush();
            state = self.lock_state();
            state.flushing = false;
            if result.is_ok() {
                state.flushed = state.flushed.max(target);
            }
            self.flushed_cond.notify_all();
            result?;
        }
    }

    fn timed_flush(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        self.db.flush()?;
        self.flush_latency.observe(started.elapsed());
        Ok(())
    }

    fn flush_periodically(&self, period: Duration) {
        let mut guard = self.stop_lock.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stop.load(Ordering::Acquire) {
            let (next, _) =
                self.stop_cond.wait_timeout(guard, period).unwrap_or_else(|p| p.into_inner());
            guard = next;
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let generation = self.lock_state().applied;
            if let Err(error) = self.wait_flushed(generation) {
                tracing::error!(%error, "background flush failed");
                self.lock_state().background_error = Some(error.to_string());
            }
        }
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.shared.db.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for entry in self.shared.db.range(scan_start(prefix, start_after)..) {
            let (key, value) = entry?;
            if !key.starts_with(prefix) || out.len() == limit {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for change in batch.changes {
            match change {
                Change::Put(k, v) => sled_batch.insert(k, v),
                Change::Delete(k) => sled_batch.remove(k),
            }
        }
        self.shared.db.apply_batch(sled_batch)?;
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        let generation = {
            let mut state = self.shared.lock_state();
            if let Some(reason) = state.background_error.take() {
                return Err(StoreError::FlushFailed { reason });
            }
            state.applied += 1;
            state.applied
        };
        match self.durability {
            Durability::Sync => self.shared.wait_flushed(generation),
            Durability::Interval(_) | Durability::None => Ok(()),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        let generation = self.shared.lock_state().applied;
        self.shared.wait_flushed(generation)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            size_bytes: self.shared.db.size_on_disk()?,
            batches: self.shared.batches.load(Ordering::Relaxed),
            flush_latency: Some(self.shared.flush_latency.clone()),
        })
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            {
                let _guard = self.shared.stop_lock.lock().unwrap_or_else(|p| p.into_inner());
                self.shared.stop.store(true, Ordering::Release);
                self.shared.stop_cond.notify_all();
            }
            let _ = flusher.join();
        }
        if let Err(error) = self.shared.db.flush() {
            tracing::error!(%error, "final flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn open(dir: &Path, durability: Durability) -> SledStore {
        SledStore::open(dir, durability).unwrap()
    }

    #[test]
    fn a_batch_applies_every_change_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Sync);
        store.apply(Batch::new().put("a", "1").put("b", "2")).unwrap();
        store.apply(Batch::new().delete("a").put("b", "3").put("c", "4").delete("c")).unwrap();
        assert_eq!(store.get(b"a").unwrap(), None);
        assert_eq!(store.get(b"b").unwrap(), Some(b"3".to_vec()));
        assert_eq!(store.get(b"c").unwrap(), None);
    }

    #[test]
    fn scan_respects_prefix_limit_and_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::None);
        let mut batch = Batch::new().put("a", "").put("c", "");
        for key in ["b/1", "b/2", "b/3", "b0"] {
            batch = batch.put(key, key);
        }
        store.apply(batch).unwrap();
        let keys = |rows: Vec<Entry>| rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(store.scan_prefix(b"b/", None, 2).unwrap()),
            [b"b/1".to_vec(), b"b/2".to_vec()]
        );
        assert_eq!(keys(store.scan_prefix(b"b/", Some(b"b/2"), 2).unwrap()), [b"b/3".to_vec()]);
        assert!(store.scan_prefix(b"b/", Some(b"b/3"), 2).unwrap().is_empty());
        assert_eq!(store.scan_prefix(b"", None, 100).unwrap().len(), 6);
    }

    #[test]
    fn sync_writes_from_many_threads_share_flushes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (threads, per_thread) = (8, 25);
        {
            let store = Arc::new(open(dir.path(), Durability::Sync));
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let store = store.clone();
                    thread::spawn(move || {
                        for i in 0..per_thread {
                            let applied_before = store.shared.lock_state().applied;
                            let batch = Batch::new().put(format!("{t}/{i}"), vec![t as u8; 16]);
                            store.apply(batch).unwrap();
                            // Acknowledged means flushed: this batch's generation is
                            // above `applied_before`, and it is covered.
                            assert!(store.shared.lock_state().flushed > applied_before);
                        }
                    })
                })
                .collect();
            workers.into_iter().for_each(|w| w.join().unwrap());
            let stats = store.stats().unwrap();
            let state = store.shared.lock_state();
            assert_eq!(state.flushed, state.applied, "every acknowledged batch is flushed");
            assert_eq!(stats.batches, (threads * per_thread) as u64);
            let flushes = stats.flush_latency.unwrap().count();
            assert!(flushes >= 1 && flushes <= stats.batches, "{flushes} flushes");
        }
        let store = open(dir.path(), Durability::Sync);
        for t in 0..threads {
            for i in 0..per_thread {
                assert_eq!(
                    store.get(format!("{t}/{i}").as_bytes()).unwrap(),
                    Some(vec![t as u8; 16])
                );
            }
        }
    }

    #[test]
    fn the_interval_flusher_flushes_in_the_background_and_stops_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Interval(Duration::from_millis(10)));
        store.apply(Batch::new().put("k", "v")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.shared.lock_state().flushed < 1 {
            assert!(Instant::now() < deadline, "the background flusher never flushed");
            thread::yield_now();
        }
        drop(store); // joins the flusher thread; a hang here fails the test by timeout
        assert_eq!(open(dir.path(), Durability::None).get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn an_explicit_flush_covers_writes_made_without_durability() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::None);
        store.apply(Batch::new().put("k", "v")).unwrap();
        store.flush().unwrap();
        let state = store.shared.lock_state();
        assert_eq!((state.applied, state.flushed), (1, 1));
    }
}

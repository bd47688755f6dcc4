//! The sled engine: the only file that knows sled (0.34.7).
//!
//! # Durability
//!
//! - `Sync`: each `apply` waits in the group commit ([`super::group_commit`]),
//!   whose flush is `Engine::flush_to_device`: sled's `flush()`, then an
//!   `fdatasync` of sled's data file and of any new blob file. The `fdatasync`
//!   is needed: on Linux, sled 0.34's `flush()` ends with `sync_file_range`,
//!   which writes the pages out but flushes neither the device's cache nor the
//!   file's new length, and sled writes blob files without any sync at all.
//! - `Interval(d)`: a thread of this engine (`calmkv-flusher`) runs the same
//!   flush every `d`, through the same group commit; it is stopped and joined
//!   when the store is dropped. `apply` returns at once, unless more than
//!   [`UNFLUSHED_BATCHES_MAX`] batches would be acknowledged and not durable:
//!   then it waits for (or leads) a flush. That bound is also what keeps sled
//!   alive: calling sled's `flush()` periodically while writers run ahead of the
//!   disk deadlocks sled 0.34.7 within seconds (a writer holding the segment
//!   accountant waits for a file truncation queued behind IO threads that wait
//!   for the segment accountant; fixed upstream after 0.34.7, see
//!   docs/benchmarks.md §5.1). With writers held within the bound, sled's IO
//!   queue stays short, as under `Sync`, and the stress test
//!   `sustained_writes_never_stall_in_any_durability_mode` runs clean.
//! - `None`: the same flusher every 500 ms, with the same bound
//!   ([`NONE_UNFLUSHED_BATCHES_MAX`]; a looser one deadlocked the stress test). sled's own flusher thread is never used:
//!   under sustained writes it flushed an unbounded backlog under sled's
//!   process-wide lock and stalled every writer for seconds (an HTTP load run
//!   saw every connection time out).
//!
//! sled's flusher is also what runs sled's segment cleaning, so under `Sync` and
//! `Interval` segments are freed only as their pages are rewritten. On an
//! overwrite-heavy test (2,000 hot keys rewritten for 8 s beside 100,000 cold
//! ones) disk use was the same with and without sled's flusher; a long-running
//! node should watch `calmkv_store_size_bytes`.
//!
//! # Isolation
//!
//! A sled batch is atomic for `get`, but a sled iterator takes sled's lock per
//! step, so a scan can see part of a concurrent batch. `scan_gate` closes that
//! gap: `apply` holds its write side while sled applies the batch (sled
//! serializes batches process-wide anyway), a scan page holds its read side.

use super::group_commit::{CommitError, GroupCommit};
use super::{
    collect_page, scan_start, Batch, Change, Durability, Entry, Store, StoreError, StoreStats,
};
use super::{NONE_UNFLUSHED_BATCHES_MAX, UNFLUSHED_BATCHES_MAX};
use crate::metrics::Histogram;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an open waits for a previous handle of the same directory, in this
/// process, to release its file lock: sled's IO threads finish writing after
/// the last handle is dropped, so an immediate reopen (an embedded application
/// closing and reopening, a restart in a test) can find the lock still taken.
/// A directory this process never opened is another process's: its lock is
/// reported at once, without waiting.
const LOCK_RELEASE_WAIT_MAX: Duration = Duration::from_secs(10);

/// How often an open looks again at a taken lock.
const LOCK_RETRY_PERIOD: Duration = Duration::from_millis(10);

/// The background flush period of [`Durability::None`].
const NONE_FLUSH_PERIOD: Duration = Duration::from_millis(500);

/// sled's data file (the log), inside the store's directory.
const DATA_FILE: &str = "db";

/// sled's directory of blob files: pages too large for a log segment.
const BLOB_DIR: &str = "blobs";

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        match error {
            // sled's error names no source: the OS's error is kept as the
            // source itself, so that a full disk is seen as one (`SpaceGuard`).
            sled::Error::Io(io) => StoreError::Engine { source: Box::new(io) },
            error => StoreError::Engine { source: Box::new(error) },
        }
    }
}

/// The durable engine, on sled 0.34.
///
/// Every call blocks; under [`Durability::Sync`], `apply` blocks until its batch
/// is on the device.
pub struct SledStore {
    engine: Arc<Engine>,
    durability: Durability,
    /// See "Isolation" in the module doc.
    scan_gate: RwLock<()>,
    batches: AtomicU64,
    /// The `Interval` flusher; `None` in the other modes.
    flusher: Option<Flusher>,
}

/// What the flusher thread shares with the store.
struct Engine {
    db: sled::Db,
    commit: GroupCommit,
    files: DataFiles,
    flush_latency: Arc<Histogram>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, durability: Durability) -> Result<SledStore, StoreError> {
        SledStore::open_waiting(dir, durability, LOCK_RELEASE_WAIT_MAX)
    }

    fn open_waiting(
        dir: &Path,
        durability: Durability,
        lock_wait_max: Duration,
    ) -> Result<SledStore, StoreError> {
        let durability = durability.validate()?;
        // sled's own flusher stays off in every mode: under sustained writes
        // it flushed an unbounded backlog while holding sled's global lock,
        // stalling every writer for seconds (docs/benchmarks.md).
        let config = sled::Config::new().path(dir).flush_every_ms(None);
        let db = open_when_released(dir, &config, lock_wait_max)?;
        let engine = Arc::new(Engine {
            db,
            commit: GroupCommit::default(),
            files: DataFiles::open(dir)?,
            flush_latency: Arc::new(Histogram::default()),
        });
        let period = match durability {
            Durability::Interval(period) => Some(period),
            Durability::None => Some(NONE_FLUSH_PERIOD),
            Durability::Sync => None,
        };
        let flusher = match period {
            Some(period) => Some(
                Flusher::start(engine.clone(), period)
                    .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?,
            ),
            None => None,
        };
        Ok(SledStore {
            engine,
            durability,
            scan_gate: RwLock::new(()),
            batches: AtomicU64::new(0),
            flusher,
        })
    }

    /// The durability this store was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }
}

impl Engine {
    /// Returns once every batch up to `generation` is on the device, leading or
    /// joining a group commit.
    fn wait_durable(&self, generation: u64) -> Result<(), StoreError> {
        self.commit.wait_durable(generation, || self.flush_to_device()).map_err(|e| match e {
            CommitError::Flush(error) => error,
            CommitError::Failed { reason } => StoreError::FlushFailed { reason },
        })
    }

    /// One flush: sled writes out everything written so far, then the files are
    /// synced to the device.
    fn flush_to_device(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        self.db.flush()?;
        self.files.sync()?;
        self.flush_latency.observe(started.elapsed());
        Ok(())
    }
}

/// The `Interval` flusher thread: flushes every period until the store is
/// dropped, which closes the channel and joins the thread.
struct Flusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    fn start(engine: Arc<Engine>, period: Duration) -> std::io::Result<Flusher> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("calmkv-flusher".into()).spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                if let Err(error) = engine.wait_durable(engine.commit.registered()) {
                    // The store now refuses writes (FlushFailed): nothing more
                    // to flush, and no point in logging it every period.
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
        drop(self.stop.take()); // `recv_timeout` now returns `Disconnected`
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the flusher thread panicked");
            }
        }
    }
}

/// Opens the database, waiting (bounded) while the directory's lock is taken.
fn open_when_released(
    dir: &Path,
    config: &sled::Config,
    wait_max: Duration,
) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    let opened_here = super::opened_in_this_process(dir, false);
    loop {
        match config.open() {
            // sled reports the lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if !opened_here || started.elapsed() >= wait_max {
                    let source = Box::new(sled::Error::Io(e));
                    return Err(StoreError::Locked { path: dir.to_path_buf(), source });
                }
                std::thread::sleep(LOCK_RETRY_PERIOD);
            }
            result => {
                let db = result?;
                super::opened_in_this_process(dir, true);
                return Ok(db);
            }
        }
    }
}

/// sled's files, synced by a flush.
struct DataFiles {
    data_path: PathBuf,
    /// Kept open for `fdatasync`; never written through.
    data_file: File,
    blob_dir: PathBuf,
    /// Blob files synced, with the length each had then. A blob still being
    /// written when listed (it belongs to a later batch) is synced again by a
    /// later flush, which finds it longer. Only the flush leader touches it.
    synced_blobs: Mutex<HashMap<OsString, u64>>,
}

impl DataFiles {
    /// Opens the data file, and makes the directory entries sled created durable.
    /// Blob files found here are synced by the first flush.
    fn open(dir: &Path) -> Result<DataFiles, StoreError> {
        let data_path = dir.join(DATA_FILE);
        let data_file = std::fs::OpenOptions::new()
            .write(true)
            .open(&data_path)
            .map_err(|source| StoreError::Io { path: data_path.clone(), source })?;
        let blob_dir = dir.join(BLOB_DIR);
        sync_dir(&blob_dir)?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(DataFiles { data_path, data_file, blob_dir, synced_blobs: Mutex::default() })
    }

    fn sync(&self) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        self.data_file.sync_data().map_err(io(&self.data_path))?;
        let mut synced = self.synced_blobs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut listed = HashMap::with_capacity(synced.len());
        let mut new_names = false;
        for entry in std::fs::read_dir(&self.blob_dir).map_err(io(&self.blob_dir))? {
            let entry = entry.map_err(io(&self.blob_dir))?;
            let path = entry.path();
            // sled removes blobs it no longer needs at any time: a blob gone
            // between the listing and its sync needs no sync.
            let len = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            };
            let name = entry.file_name();
            if synced.get(&name) != Some(&len) {
                match File::open(&path).and_then(|file| file.sync_all()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(&path)(e)),
                }
                new_names |= !synced.contains_key(&name);
            }
            listed.insert(name, len);
        }
        if new_names {
            sync_dir(&self.blob_dir)?;
        }
        *synced = listed;
        Ok(())
    }
}

/// Makes the entries of directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.engine.db.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let _gate = self.scan_gate.read().unwrap_or_else(PoisonError::into_inner);
        let rows = self.engine.db.range(scan_start(prefix, start_after)..).map(|entry| {
            let (key, value) = entry?;
            Ok((key.to_vec(), value.to_vec()))
        });
        collect_page(rows, prefix, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let engine = &*self.engine;
        engine.commit.check().map_err(|reason| StoreError::FlushFailed { reason })?;
        let mut sled_batch = sled::Batch::default();
        for change in batch.changes {
            match change {
                Change::Put(k, v) => sled_batch.insert(k, v),
                Change::Delete(k) => sled_batch.remove(k),
            }
        }
        {
            let _gate = self.scan_gate.write().unwrap_or_else(PoisonError::into_inner);
            engine.db.apply_batch(sled_batch)?;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        let generation = engine.commit.register();
        match self.durability {
            Durability::Sync => engine.wait_durable(generation),
            // At most UNFLUSHED_BATCHES_MAX acknowledged batches not durable.
            Durability::Interval(_) if generation > UNFLUSHED_BATCHES_MAX => {
                engine.wait_durable(generation - UNFLUSHED_BATCHES_MAX)
            }
            Durability::None if generation > NONE_UNFLUSHED_BATCHES_MAX => {
                engine.wait_durable(generation - NONE_UNFLUSHED_BATCHES_MAX)
            }
            Durability::Interval(_) | Durability::None => Ok(()),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.engine.wait_durable(self.engine.commit.registered())
    }

    /// Costs a `stat` of the data file and a listing of the blob directory.
    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            size_bytes: self.engine.db.size_on_disk()?,
            batches: self.batches.load(Ordering::Relaxed),
            flush_latency: Some(self.engine.flush_latency.clone()),
        })
    }

    fn writable(&self) -> Result<(), StoreError> {
        self.engine.commit.check().map_err(|reason| StoreError::FlushFailed { reason })
    }
}

impl Drop for SledStore {
    /// Stops and joins the flusher thread, then makes everything durable, in
    /// every mode. sled's own flusher, if any, is stopped and joined when `db` is
    /// dropped right after.
    fn drop(&mut self) {
        drop(self.flusher.take());
        if let Err(error) = self.flush() {
            tracing::error!(%error, "the final flush of the store failed");
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
    fn sync_writes_from_many_threads_share_flushes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (threads, per_thread) = (8, 25);
        {
            let store = open(dir.path(), Durability::Sync);
            let commit = &store.engine.commit;
            thread::scope(|scope| {
                for t in 0..threads {
                    let store = &store;
                    scope.spawn(move || {
                        for i in 0..per_thread {
                            // This batch's generation will be above `before`.
                            let before = commit.registered();
                            let batch = Batch::new().put(format!("{t}/{i}"), vec![t as u8; 16]);
                            store.apply(batch).unwrap();
                            assert!(commit.durable() > before, "acknowledged before a flush");
                        }
                    });
                }
            });
            let stats = store.stats().unwrap();
            let writes = (threads * per_thread) as u64;
            assert_eq!(stats.batches, writes);
            assert_eq!(commit.durable(), writes, "every acknowledged batch is durable");
            let flushes = stats.flush_latency.unwrap().count();
            assert_eq!(flushes, commit.flushes(), "every flush is timed");
            assert!((1..=writes).contains(&flushes), "{flushes} flushes for {writes} writes");
        }
        let store = open(dir.path(), Durability::Sync);
        for t in 0..threads {
            for i in 0..per_thread {
                let value = store.get(format!("{t}/{i}").as_bytes()).unwrap();
                assert_eq!(value, Some(vec![t as u8; 16]));
            }
        }
    }

    #[test]
    fn a_sync_write_of_a_large_value_syncs_its_blob_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Sync);
        store.apply(Batch::new().put("big", vec![1; 1 << 20])).unwrap();
        let blobs: HashMap<OsString, u64> = std::fs::read_dir(dir.path().join(BLOB_DIR))
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (entry.file_name(), entry.metadata().unwrap().len())
            })
            .collect();
        assert!(!blobs.is_empty(), "a 1 MiB value is a blob in sled 0.34");
        let synced = store.engine.files.synced_blobs.lock().unwrap();
        for (name, len) in &blobs {
            assert_eq!(synced.get(name), Some(len), "{name:?} is not synced");
        }
    }

    /// The flusher never fires in this test (an hour's period): only the bound
    /// makes writers flush.
    #[test]
    fn interval_writers_wait_for_a_flush_only_past_the_unflushed_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Interval(Duration::from_secs(3600)));
        let commit = &store.engine.commit;
        let put = |i: u64| store.apply(Batch::new().put(i.to_be_bytes(), "v")).unwrap();
        for i in 1..=UNFLUSHED_BATCHES_MAX {
            put(i);
        }
        assert_eq!((commit.durable(), commit.flushes()), (0, 0), "acknowledged at once");
        put(UNFLUSHED_BATCHES_MAX + 1);
        assert_eq!((commit.durable(), commit.flushes()), (UNFLUSHED_BATCHES_MAX + 1, 1));
        for i in UNFLUSHED_BATCHES_MAX + 2..=2 * UNFLUSHED_BATCHES_MAX + 1 {
            put(i);
        }
        assert_eq!(commit.flushes(), 1, "the first flush covered the next bound's worth");
        put(2 * UNFLUSHED_BATCHES_MAX + 2);
        assert_eq!(commit.flushes(), 2);
    }

    #[test]
    fn the_interval_flusher_flushes_in_the_background_and_stops_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Interval(Duration::from_millis(5)));
        store.apply(Batch::new().put("k", "v")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(store.engine.commit.wait_until_durable(1, deadline), "no background flush");
        let engine = Arc::downgrade(&store.engine);
        drop(store);
        // The thread held the engine: it is gone, so the thread has ended.
        assert!(engine.upgrade().is_none(), "the flusher thread outlived the store");
        let store = open(dir.path(), Durability::None);
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    /// Under `None` writes are acknowledged without waiting for a flush up to
    /// `NONE_UNFLUSHED_BATCHES_MAX` unflushed batches (the background flush is
    /// 500 ms away); an explicit flush and a drop make everything durable.
    #[test]
    fn none_acknowledges_without_flushing_below_its_bound_and_drop_makes_writes_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::None);
        let commit = &store.engine.commit;
        let writes = 2 * UNFLUSHED_BATCHES_MAX;
        for i in 0..writes {
            store.apply(Batch::new().put(i.to_be_bytes(), "v")).unwrap();
        }
        assert_eq!(commit.registered(), writes);
        assert!(commit.durable() <= writes);
        store.flush().unwrap();
        assert_eq!(commit.durable(), writes);
        store.apply(Batch::new().put("last", "v")).unwrap();
        drop(store);
        let store = open(dir.path(), Durability::None);
        assert_eq!(store.get(b"last").unwrap(), Some(b"v".to_vec()));
        assert_eq!(store.scan_prefix(b"", None, usize::MAX).unwrap().len() as u64, writes + 1);
    }

    #[test]
    fn a_zero_flush_interval_is_refused_before_anything_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let result = SledStore::open(dir.path(), Durability::Interval(Duration::ZERO));
        assert!(matches!(result, Err(StoreError::InvalidDurability { .. })));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_in_use_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path(), Durability::Sync);
        let second = SledStore::open_waiting(dir.path(), Durability::Sync, Duration::ZERO);
        assert!(matches!(second, Err(StoreError::Locked { .. })));
    }

    #[test]
    fn after_a_failed_flush_writes_are_refused_unapplied() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Sync);
        store.apply(Batch::new().put("before", "1")).unwrap();
        // Fail a flush as a full disk would.
        let commit = &store.engine.commit;
        let failed = commit.wait_durable(commit.register(), || Err("no space left on device"));
        assert!(matches!(failed, Err(CommitError::Flush(_))));
        let result = store.apply(Batch::new().put("after", "1"));
        assert!(matches!(result, Err(StoreError::FlushFailed { .. })), "{result:?}");
        assert_eq!(store.get(b"after").unwrap(), None);
        assert!(matches!(store.flush(), Err(StoreError::FlushFailed { .. })));
        assert_eq!(store.get(b"before").unwrap(), Some(b"1".to_vec()), "reads still work");
    }
}

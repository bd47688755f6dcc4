//! The fjall engine (fjall 3, an LSM tree with a journal): the only file that
//! knows fjall.
//!
//! # Layout
//!
//! One fjall database in the store's directory, one keyspace (`data`) holding
//! every key. fjall locks the directory itself (its `lock` file): a second
//! process gets [`StoreError::Locked`].
//!
//! # Durability
//!
//! A batch is one fjall write batch: written to the journal (and handed to the
//! OS, so a process crash loses nothing applied), then to the memtable, then
//! published under one sequence number. [`CommitPolicy`] acknowledges it under
//! the store's mode; its flush is `persist(SyncData)`, an `fdatasync` of the
//! journal that covers every batch written before it (fjall fsyncs the journal
//! directory itself when it starts a new journal file). Concurrent `Sync`
//! writers share that flush (group commit).
//!
//! A failed journal write or sync poisons the fjall database: every later
//! write fails until the store is opened again, which recovers from the
//! journal.
//!
//! # Isolation
//!
//! `get` and every scan page read from one fjall snapshot, which sees a batch
//! only once all of it is published. fjall gives every item of a batch the same
//! sequence number, so a batch must not hold two changes of one key: `apply`
//! keeps only the last change of each key (the trait's "a later change wins").

use super::commit_policy::{CommitPolicy, DeviceFlush};
use super::{
    collect_page, scan_start, Batch, Change, CommitTicket, Durability, Entry, Store, StoreError,
    StoreStats,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The keyspace that holds every key.
const KEYSPACE: &str = "data";

/// fjall's memtable size: past it the memtable is written out as a table and
/// the journal behind it can be dropped. fjall's default is 64 MiB; a smaller
/// one bounds the journal and the space a flush needs at once (the free-space
/// reserve must cover it), for a little more compaction work.
const MEMTABLE_BYTES_MAX: u64 = 8 << 20;

/// How long an open waits for an earlier handle of the same directory, in this
/// process, to release fjall's lock (its worker threads stop after the handle is
/// dropped). Another process's lock is reported at once.
const LOCK_RELEASE_WAIT_MAX: Duration = Duration::from_secs(10);

/// How often an open looks again at a taken lock.
const LOCK_RETRY_PERIOD: Duration = Duration::from_millis(10);

fn engine_error(error: fjall::Error) -> StoreError {
    StoreError::Engine { source: Box::new(error) }
}

/// fjall's database and keyspace; its flush syncs the journal.
pub(crate) struct FjallEngine {
    db: Database,
    data: Keyspace,
}

impl DeviceFlush for FjallEngine {
    fn flush_to_device(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncData).map_err(engine_error)
    }
}

/// The durable engine on fjall 3.
///
/// Every call blocks; under [`Durability::Sync`], `apply` blocks until its batch
/// is on the device.
pub struct FjallStore {
    policy: CommitPolicy<FjallEngine>,
    batches: AtomicU64,
    dir: PathBuf,
}

impl FjallStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, durability: Durability) -> Result<FjallStore, StoreError> {
        FjallStore::open_waiting(dir, durability, LOCK_RELEASE_WAIT_MAX)
    }

    fn open_waiting(
        dir: &Path,
        durability: Durability,
        lock_wait_max: Duration,
    ) -> Result<FjallStore, StoreError> {
        let durability = durability.validate()?;
        let db = open_when_released(dir, lock_wait_max)?;
        let data = db
            .keyspace(KEYSPACE, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES_MAX)
            })
            .map_err(engine_error)?;
        let policy = CommitPolicy::start(FjallEngine { db, data }, durability)
            .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        Ok(FjallStore { policy, batches: AtomicU64::new(0), dir: dir.to_path_buf() })
    }

    fn engine(&self) -> &FjallEngine {
        self.policy.engine()
    }
}

/// Opens the database, waiting (bounded) while this process's earlier handle
/// still holds the lock.
fn open_when_released(dir: &Path, wait_max: Duration) -> Result<Database, StoreError> {
    let started = Instant::now();
    let opened_here = super::opened_in_this_process(dir, false);
    loop {
        match Database::builder(dir).open() {
            Err(fjall::Error::Locked) => {
                if !opened_here || started.elapsed() >= wait_max {
                    let source = Box::new(fjall::Error::Locked);
                    return Err(StoreError::Locked { path: dir.to_path_buf(), source });
                }
                std::thread::sleep(LOCK_RETRY_PERIOD);
            }
            result => {
                let db = result.map_err(engine_error)?;
                super::opened_in_this_process(dir, true);
                return Ok(db);
            }
        }
    }
}

impl Store for FjallStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.engine();
        let value = engine.db.snapshot().get(&engine.data, key).map_err(engine_error)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let engine = self.engine();
        let snapshot = engine.db.snapshot();
        let rows = snapshot.range(&engine.data, scan_start(prefix, start_after)..).map(|guard| {
            let (key, value) = guard.into_inner().map_err(engine_error)?;
            Ok((key.to_vec(), value.to_vec()))
        });
        collect_page(rows, prefix, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply_deferred(batch)?.wait()
    }

    /// Writes the batch to the journal (handed to the OS) and the memtable:
    /// microseconds; the ticket waits for the journal's sync.
    fn apply_deferred(&self, batch: Batch) -> Result<CommitTicket, StoreError> {
        self.policy.check()?;
        let engine = self.engine();
        // The last change of each key, in the order of the batch.
        let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(batch.changes.len());
        for (i, change) in batch.changes.iter().enumerate() {
            let key = match change {
                Change::Put(k, _) | Change::Delete(k) => k.as_slice(),
            };
            last.insert(key, i);
        }
        let mut fjall_batch = engine.db.batch();
        for (i, change) in batch.changes.iter().enumerate() {
            match change {
                Change::Put(k, v) if last[k.as_slice()] == i => {
                    fjall_batch.insert(&engine.data, k.as_slice(), v.as_slice())
                }
                Change::Delete(k) if last[k.as_slice()] == i => {
                    fjall_batch.remove(&engine.data, k.as_slice())
                }
                Change::Put(..) | Change::Delete(_) => {}
            }
        }
        fjall_batch.commit().map_err(engine_error)?;
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(self.policy.acknowledge_deferred())
    }

    fn barrier(&self) -> CommitTicket {
        self.policy.barrier()
    }

    /// Reads come from the memtable or the block cache, or read one table
    /// block through the OS; a batch is a journal write and a memtable insert.
    ///
    /// Two waits remain inside a batch's commit, both fjall's: it takes the
    /// journal's lock, which `persist` holds through the `fdatasync`, so a
    /// batch committed while the committer syncs waits for the rest of that
    /// sync (26–80 µs on a quiet disk, milliseconds on a busy one); and under
    /// write backpressure (4+ sealed memtables, or 20+ level-0 runs) fjall
    /// sleeps in the writer's thread. Both stall the async thread that
    /// commits (docs/benchmarks.md §3a).
    fn serves_inline(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.policy.flush()
    }

    fn writable(&self) -> Result<(), StoreError> {
        self.policy.check()
    }

    /// `size_bytes` is what the directory occupies on the device (fjall's own
    /// count takes its preallocated, sparse journal at its full 64 MiB); it costs
    /// a walk of the directory.
    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            size_bytes: super::allocated_bytes(&self.dir)?,
            batches: self.batches.load(Ordering::Relaxed),
            flush_latency: Some(self.policy.flush_latency()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_in_use_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FjallStore::open(dir.path(), Durability::Sync).unwrap();
        let second = FjallStore::open_waiting(dir.path(), Durability::Sync, Duration::ZERO);
        assert!(matches!(second, Err(StoreError::Locked { .. })), "{:?}", second.err());
    }

    #[test]
    fn a_dropped_store_can_be_reopened_at_once_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path(), Durability::None).unwrap();
        store.apply(Batch::new().put("k", "v")).unwrap();
        drop(store);
        let store = FjallStore::open(dir.path(), Durability::Sync).unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn sync_writers_share_journal_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path(), Durability::Sync).unwrap();
        let (threads, per_thread) = (8u64, 25u64);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..per_thread {
                        let commit = store.policy.commit();
                        let before = commit.registered();
                        store.apply(Batch::new().put(format!("{t}/{i}"), "v")).unwrap();
                        assert!(commit.durable() > before, "acknowledged before a sync");
                    }
                });
            }
        });
        let flushes = store.policy.commit().flushes();
        assert!((1..=threads * per_thread).contains(&flushes), "{flushes}");
        assert_eq!(store.policy.commit().durable(), threads * per_thread);
    }

    /// Writers on one async thread: each applies and gets a pending ticket
    /// without blocking, and one journal sync, run by the committer thread,
    /// acknowledges them all.
    #[test]
    fn async_writers_hold_no_thread_and_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FjallStore::open(dir.path(), Durability::Sync).unwrap());
        let writers = 32;
        let tickets: Vec<CommitTicket> = (0..writers)
            .map(|i| store.apply_deferred(Batch::new().put(format!("k{i}"), "v")).unwrap())
            .collect();
        let commit = store.policy.commit();
        assert!(tickets.iter().all(|t| !t.is_ready()));
        assert_eq!((commit.durable(), commit.flushes()), (0, 0), "nothing synced unasked");
        assert_eq!(store.get(b"k7").unwrap(), Some(b"v".to_vec()), "applied: visible to reads");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            for ticket in tickets {
                ticket.wait_async().await.unwrap();
            }
        });
        assert_eq!((commit.durable(), commit.flushes()), (writers, 1));
    }
}

//! The redb engine (redb 5, a copy-on-write B-tree in one file): the only file
//! that knows redb.
//!
//! # Layout
//!
//! One redb file, `data.redb`, in the store's directory, with one table
//! (`data`). redb locks the file: a second process (or a second open in this
//! one) gets [`StoreError::Locked`].
//!
//! # Durability
//!
//! A batch is one write transaction, committed with redb's
//! `Durability::None`: visible to readers at once, durable only once a later
//! durable commit lands. [`CommitPolicy`]'s flush is that durable commit: an
//! empty write transaction committed with `Durability::Immediate`, which makes
//! every earlier commit durable (redb's default one-phase commit: it writes the
//! new commit slot, flips to it, then fsyncs the file; a crash mid-way falls
//! back to the last slot with a valid checksum). Concurrent `Sync` writers share it (group commit). A
//! non-durable commit lives in this process until then, so a process crash
//! (`kill -9`) loses what `Interval` and `None` acknowledged since the last
//! flush, within their bounds; `Sync` loses nothing.
//!
//! Space freed by overwrites and deletes is reused only after a durable commit;
//! the file never shrinks on its own.
//!
//! # Isolation
//!
//! `get` and every scan page read from one read transaction: a snapshot of the
//! last commit, so a batch is seen whole or not at all.

use super::commit_policy::{CommitPolicy, DeviceFlush};
use super::{
    collect_page, scan_start, Batch, Change, CommitTicket, Durability, Entry, Store, StoreError,
    StoreStats,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The file, inside the store's directory.
pub(crate) const DATA_FILE: &str = "data.redb";

/// The table that holds every key.
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");

fn engine_error(error: impl Into<redb::Error>) -> StoreError {
    match error.into() {
        // redb's errors name no source: the OS's error is kept as the source
        // itself, so that a full disk is seen as one (`SpaceGuard`).
        redb::Error::Io(io) => StoreError::Engine { source: Box::new(io) },
        error => StoreError::Engine { source: Box::new(error) },
    }
}

/// redb's database; its flush is a durable commit.
pub(crate) struct RedbEngine {
    db: Database,
    path: PathBuf,
}

impl DeviceFlush for RedbEngine {
    fn flush_to_device(&self) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(engine_error)?;
        tx.set_durability(redb::Durability::Immediate).map_err(engine_error)?;
        tx.commit().map_err(engine_error)
    }
}

/// The durable engine on redb 5.
///
/// Every call blocks; under [`Durability::Sync`], `apply` blocks until its batch
/// is on the device.
pub struct RedbStore {
    policy: CommitPolicy<RedbEngine>,
    batches: AtomicU64,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        let durability = durability.validate()?;
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        let path = dir.join(DATA_FILE);
        let db = match Database::create(&path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                let source = Box::new(redb::Error::DatabaseAlreadyOpen);
                return Err(StoreError::Locked { path: dir.to_path_buf(), source });
            }
            result => result.map_err(engine_error)?,
        };
        // The table exists from the start, so that reads need not tell "no
        // table yet" from "no key".
        let tx = db.begin_write().map_err(engine_error)?;
        tx.open_table(TABLE).map_err(engine_error)?;
        tx.commit().map_err(engine_error)?;
        sync_dir(dir)?;
        let policy = CommitPolicy::start(RedbEngine { db, path }, durability)
            .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        Ok(RedbStore { policy, batches: AtomicU64::new(0) })
    }

    fn db(&self) -> &Database {
        &self.policy.engine().db
    }
}

/// Makes the entries of directory `dir` durable (the new file's name).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })
}

impl Store for RedbStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db().begin_read().map_err(engine_error)?;
        let table = tx.open_table(TABLE).map_err(engine_error)?;
        let value = table.get(key).map_err(engine_error)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let tx = self.db().begin_read().map_err(engine_error)?;
        let table = tx.open_table(TABLE).map_err(engine_error)?;
        let start = scan_start(prefix, start_after);
        let rows = table.range(start.as_slice()..).map_err(engine_error)?.map(|entry| {
            let (key, value) = entry.map_err(engine_error)?;
            Ok((key.value().to_vec(), value.value().to_vec()))
        });
        collect_page(rows, prefix, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply_deferred(batch)?.wait()
    }

    /// A non-durable redb commit (pages handed to the OS); the ticket waits for
    /// the durable commit that follows.
    fn apply_deferred(&self, batch: Batch) -> Result<CommitTicket, StoreError> {
        self.policy.check()?;
        let mut tx = self.db().begin_write().map_err(engine_error)?;
        tx.set_durability(redb::Durability::None).map_err(engine_error)?;
        {
            let mut table = tx.open_table(TABLE).map_err(engine_error)?;
            for change in &batch.changes {
                match change {
                    Change::Put(k, v) => {
                        table.insert(k.as_slice(), v.as_slice()).map_err(engine_error)?;
                    }
                    Change::Delete(k) => {
                        table.remove(k.as_slice()).map_err(engine_error)?;
                    }
                }
            }
        }
        // A transaction dropped without a commit (an error above) is aborted:
        // nothing of the batch is applied.
        tx.commit().map_err(engine_error)?;
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(self.policy.acknowledge_deferred())
    }

    fn barrier(&self) -> CommitTicket {
        self.policy.barrier()
    }

    /// A batch is a non-durable commit; reads come from redb's cache or the OS.
    fn serves_inline(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.policy.flush()
    }

    fn writable(&self) -> Result<(), StoreError> {
        self.policy.check()
    }

    /// `size_bytes` is what redb's file occupies on the device (free pages
    /// included).
    fn stats(&self) -> Result<StoreStats, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let path = &self.policy.engine().path;
        let size_bytes = std::fs::metadata(path)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?
            .blocks()
            * 512;
        Ok(StoreStats {
            size_bytes,
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
        let _first = RedbStore::open(dir.path(), Durability::Sync).unwrap();
        let second = RedbStore::open(dir.path(), Durability::Sync);
        assert!(matches!(second, Err(StoreError::Locked { .. })), "{:?}", second.err());
    }

    #[test]
    fn interval_writes_are_durable_after_flush_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), Durability::None).unwrap();
        store.apply(Batch::new().put("a", "1")).unwrap();
        store.flush().unwrap();
        assert_eq!(store.policy.commit().durable(), 1);
        store.apply(Batch::new().put("b", "2")).unwrap();
        drop(store);
        let store = RedbStore::open(dir.path(), Durability::Sync).unwrap();
        assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get(b"b").unwrap(), Some(b"2".to_vec()));
    }
}

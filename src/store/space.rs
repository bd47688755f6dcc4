//! A full disk as an ordinary error: [`SpaceGuard`] refuses a batch, before the
//! engine sees it, when the file system holding the store would keep less than
//! a reserve free after it ([`StoreError::InsufficientStorage`]; nothing
//! changed). Reads never look at it, and once space is freed the next batch is
//! accepted again: no restart.
//!
//! Why before the engine: an engine that runs out of space in the middle of a
//! write does not come back by itself. fjall poisons its database on a failed
//! journal write, redb refuses every later transaction after an I/O error, and
//! sled 0.34 has lost data that way. The reserve also leaves the engines room
//! for what they write on their own — fjall's memtable flushes and compactions,
//! redb's file growth, sled's segments — so it is a heuristic, not a proof: a
//! compaction larger than the reserve can still hit the end of the disk.
//!
//! The check is one `fstatvfs` of the store directory per batch.

use super::{Batch, Change, CommitTicket, Entry, Store, StoreError, StoreStats};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The free bytes a store keeps on its file system by default: room for
/// fjall's memtable flushes (8 MiB each) and compactions of a small store,
/// redb's and sled's file growth, and the rest of the system.
pub const FREE_BYTES_MIN_DEFAULT: u64 = 128 << 20;

/// The bytes a batch adds at most before the engine's own overhead: its keys
/// and values.
pub(crate) fn batch_bytes(batch: &Batch) -> u64 {
    batch
        .changes()
        .iter()
        .map(|change| match change {
            Change::Put(k, v) => (k.len() + v.len()) as u64,
            Change::Delete(k) => k.len() as u64,
        })
        .sum()
}

/// A store whose writes are refused while its file system is (nearly) full.
pub struct SpaceGuard {
    inner: Box<dyn Store>,
    dir: PathBuf,
    /// The store directory, open for `fstatvfs`.
    dir_file: File,
    free_bytes_min: u64,
}

impl SpaceGuard {
    /// Guards `inner`, whose files live in `dir`, keeping `free_bytes_min`
    /// bytes free.
    pub fn new(
        inner: Box<dyn Store>,
        dir: &Path,
        free_bytes_min: u64,
    ) -> Result<SpaceGuard, StoreError> {
        let dir_file =
            File::open(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        Ok(SpaceGuard { inner, dir: dir.to_path_buf(), dir_file, free_bytes_min })
    }

    /// Bytes an unprivileged writer may still use on the store's file system.
    pub fn available_bytes(&self) -> Result<u64, StoreError> {
        let stat = rustix::fs::fstatvfs(&self.dir_file)
            .map_err(|errno| StoreError::Io { path: self.dir.clone(), source: errno.into() })?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
}

impl Store for SpaceGuard {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan_prefix(prefix, start_after, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.check_space(&batch)?;
        self.inner.apply(batch)
    }

    fn apply_deferred(&self, batch: Batch) -> Result<CommitTicket, StoreError> {
        self.check_space(&batch)?;
        self.inner.apply_deferred(batch)
    }

    fn barrier(&self) -> CommitTicket {
        self.inner.barrier()
    }

    fn serves_inline(&self) -> bool {
        self.inner.serves_inline()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }
}

impl SpaceGuard {
    /// Refuses a batch that would eat into the reserve.
    fn check_space(&self, batch: &Batch) -> Result<(), StoreError> {
        let needed_bytes = self.free_bytes_min.saturating_add(batch_bytes(batch));
        let available_bytes = self.available_bytes()?;
        if available_bytes < needed_bytes {
            return Err(StoreError::InsufficientStorage {
                path: self.dir.clone(),
                available_bytes,
                needed_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_batch_that_would_eat_into_the_reserve_is_refused_unapplied() {
        let dir = tempfile::tempdir().unwrap();
        let probe = SpaceGuard::new(Box::new(MemoryStore::new()), dir.path(), 0).unwrap();
        let available = probe.available_bytes().unwrap();
        assert!(available > 1 << 20, "the test needs a little free space");
        // A reserve just below what is free: a one-byte value fits, a large one
        // does not (other processes may take some space meanwhile, so the
        // margins are wide).
        let guard =
            SpaceGuard::new(Box::new(MemoryStore::new()), dir.path(), available - (512 << 10))
                .unwrap();
        guard.apply(Batch::new().put("small", "v")).unwrap();
        let result = guard.apply(Batch::new().put("large", vec![0; 4 << 20]));
        assert!(
            matches!(result, Err(StoreError::InsufficientStorage { needed_bytes, .. })
                if needed_bytes > available),
            "{result:?}"
        );
        assert_eq!(guard.get(b"large").unwrap(), None, "the refused batch changed nothing");
        assert_eq!(guard.get(b"small").unwrap(), Some(b"v".to_vec()), "reads still work");
        assert_eq!(guard.stats().unwrap().batches, 1);
    }

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let guard = SpaceGuard::new(Box::new(MemoryStore::new()), dir.path(), u64::MAX).unwrap();
        let result = guard.apply(Batch::new().put("k", "v"));
        assert!(matches!(result, Err(StoreError::InsufficientStorage { .. })), "{result:?}");
        assert_eq!(guard.scan_prefix(b"", None, 10).unwrap(), []);
    }
}

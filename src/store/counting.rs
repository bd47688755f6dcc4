//! [`CountingStore`]: a store that counts the bytes handed to the engine under
//! it, for the measurements and tests of what a write costs.

use super::{Batch, Change, Entry, Store, StoreError, StoreStats};
use std::sync::atomic::{AtomicU64, Ordering};

/// Wraps a store and counts what its batches hand to it: the key and value
/// bytes of every put, and the key bytes of every delete (a delete writes a
/// tombstone of its key in a log-structured engine).
pub struct CountingStore<S> {
    inner: S,
    put_bytes: AtomicU64,
    delete_bytes: AtomicU64,
    batches: AtomicU64,
}

/// What a [`CountingStore`] has counted so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Keys and values of the puts.
    pub put_bytes: u64,
    /// Keys of the deletes.
    pub delete_bytes: u64,
    /// Batches applied.
    pub batches: u64,
}

impl WriteCounts {
    /// Every byte handed to the engine: puts and deletes.
    pub fn bytes(&self) -> u64 {
        self.put_bytes + self.delete_bytes
    }

    /// What was counted since `earlier`.
    pub fn since(&self, earlier: WriteCounts) -> WriteCounts {
        WriteCounts {
            put_bytes: self.put_bytes - earlier.put_bytes,
            delete_bytes: self.delete_bytes - earlier.delete_bytes,
            batches: self.batches - earlier.batches,
        }
    }
}

impl<S: Store> CountingStore<S> {
    /// Counts what is written to `inner`.
    pub fn new(inner: S) -> CountingStore<S> {
        CountingStore {
            inner,
            put_bytes: AtomicU64::new(0),
            delete_bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    /// The counts so far (of batches the engine accepted).
    pub fn counts(&self) -> WriteCounts {
        WriteCounts {
            put_bytes: self.put_bytes.load(Ordering::Relaxed),
            delete_bytes: self.delete_bytes.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }
}

impl<S: Store> Store for CountingStore<S> {
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
        let (mut puts, mut deletes) = (0u64, 0u64);
        for change in batch.changes() {
            match change {
                Change::Put(key, value) => puts += (key.len() + value.len()) as u64,
                Change::Delete(key) => deletes += key.len() as u64,
            }
        }
        self.inner.apply(batch)?;
        self.put_bytes.fetch_add(puts, Ordering::Relaxed);
        self.delete_bytes.fetch_add(deletes, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn counts_puts_and_deletes_of_accepted_batches() {
        let store = CountingStore::new(MemoryStore::new());
        store.apply(Batch::new().put("ab", "cde").delete("f")).unwrap();
        assert_eq!(store.counts(), WriteCounts { put_bytes: 5, delete_bytes: 1, batches: 1 });
        assert_eq!(store.get(b"ab").unwrap(), Some(b"cde".to_vec()));
    }
}

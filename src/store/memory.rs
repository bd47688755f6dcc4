//! The in-memory engine: a `BTreeMap` behind a lock, with the same semantics as
//! the sled engine and no durability at all.

use super::{scan_start, Batch, Change, Entry, Store, StoreError, StoreStats};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Keys and values in memory; for tests and simulations.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
    batches: AtomicU64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned())
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let start = scan_start(prefix, start_after);
        Ok(map
            .range(start..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for change in batch.changes {
            match change {
                Change::Put(k, v) => {
                    map.insert(k, v);
                }
                Change::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let size_bytes = map.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        Ok(StoreStats {
            size_bytes,
            batches: self.batches.load(Ordering::Relaxed),
            ..StoreStats::default()
        })
    }
}

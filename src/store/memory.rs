//! The in-memory engine: a `BTreeMap` behind a lock, with the same semantics as
//! the sled engine and no durability at all.

use super::{scan_start, Batch, Change, Entry, Store, StoreError, StoreStats};
use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

#[derive(Debug, Default)]
struct Contents {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of every key and value in `map`, kept up to date by `apply` so that
    /// the metrics need not walk the map.
    bytes: u64,
    batches: u64,
}

/// Keys and values in memory; for tests and simulations.
///
/// A batch is applied under the write lock and a scan page is read under the
/// read lock, so both are atomic, as in [`SledStore`](super::SledStore).
#[derive(Debug, Default)]
pub struct MemoryStore {
    contents: RwLock<Contents>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let contents = self.contents.read().unwrap_or_else(PoisonError::into_inner);
        Ok(contents.map.get(key).cloned())
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let contents = self.contents.read().unwrap_or_else(PoisonError::into_inner);
        Ok(contents
            .map
            .range(scan_start(prefix, start_after)..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        // A panic cannot happen between two changes (inserts and arithmetic on
        // sizes that are in memory already), so a poisoned lock guards whole
        // batches only.
        let mut contents = self.contents.write().unwrap_or_else(PoisonError::into_inner);
        let Contents { map, bytes, batches } = &mut *contents;
        for change in batch.changes {
            match change {
                Change::Put(k, v) => {
                    let key_bytes = k.len() as u64;
                    *bytes += key_bytes + v.len() as u64;
                    if let Some(old) = map.insert(k, v) {
                        *bytes -= key_bytes + old.len() as u64;
                    }
                }
                Change::Delete(k) => {
                    if let Some(old) = map.remove(&k) {
                        *bytes -= (k.len() + old.len()) as u64;
                    }
                }
            }
        }
        *batches += 1;
        Ok(())
    }

    /// Every call is a short critical section in memory.
    fn serves_inline(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let contents = self.contents.read().unwrap_or_else(PoisonError::into_inner);
        Ok(StoreStats {
            size_bytes: contents.bytes,
            batches: contents.batches,
            flush_latency: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_follows_overwrites_and_deletes() {
        let store = MemoryStore::new();
        let size = || store.stats().unwrap().size_bytes;
        store.apply(Batch::new().put("ab", "1234").put("c", "")).unwrap();
        assert_eq!(size(), 7);
        store.apply(Batch::new().put("ab", "1")).unwrap();
        assert_eq!(size(), 4);
        store.apply(Batch::new().delete("ab").delete("missing")).unwrap();
        assert_eq!(size(), 1);
        store.apply(Batch::new().delete("c")).unwrap();
        assert_eq!(size(), 0);
    }
}

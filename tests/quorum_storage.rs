//! The quorum's Raft storage passes openraft's own storage test suite, over
//! the in-memory engine and over the sled engine in `sync` mode.

use calmkv::quorum::store::QuorumStore;
use calmkv::store::{Durability, MemoryStore, SledStore};
use calmkv::Limits;
use openraft::testing::Suite;
use std::sync::Arc;

#[test]
fn the_quorum_store_passes_openrafts_storage_suite_in_memory() {
    Suite::test_all(|| async {
        QuorumStore::open(Arc::new(MemoryStore::new()), Limits::default(), None).expect("opens")
    })
    .expect("the storage suite passes");
}

#[test]
fn the_quorum_store_passes_openrafts_storage_suite_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let next = std::sync::atomic::AtomicU64::new(0);
    Suite::test_all(|| {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("store-{n}"));
        async move {
            let store = SledStore::open(&path, Durability::Sync).expect("sled opens");
            QuorumStore::open(Arc::new(store), Limits::default(), None).expect("opens")
        }
    })
    .expect("the storage suite passes");
}

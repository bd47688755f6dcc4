//! Disk faults seen through the node (`Db` over a `FaultyStore`): a failed
//! write is a typed error that changes nothing; a write refused for lack of
//! space is `insufficient_storage` and changes nothing; a failed fsync under
//! `sync` is never acknowledged, and the node then refuses every write until it
//! restarts (it does not retry the fsync: a later success would not prove the
//! lost pages were written), after which everything acknowledged is there and
//! nothing else is. A seeded run mixes all of it; set `CALMKV_TEST_SEED` to
//! replay one.

use calmkv::store::{Durability, Entry, Fault, FaultRates, FaultyStore, MemoryStore, StoreError};
use calmkv::{Db, Limits, Node, NodeError};
use calmkv_crdts::NodeId;
use std::collections::BTreeSet;
use std::sync::Arc;

const NODE_ID: NodeId = NodeId(7);

fn faulty(durability: Durability) -> Arc<FaultyStore> {
    Arc::new(FaultyStore::new(Box::new(MemoryStore::new()), durability))
}

/// A node over `store`, as a restart opens it (the digest rebuilt from the store).
fn open(store: &Arc<FaultyStore>) -> Db {
    Db::from_node(Node::open(NODE_ID, store.clone(), Limits::default()).unwrap())
}

/// Every row of the store, and the node's digest: the whole state.
fn snapshot(db: &Db) -> (Vec<Entry>, Vec<u64>) {
    let rows = db.node().store().scan_prefix(b"", None, usize::MAX).unwrap();
    (rows, db.node().digest().top())
}

fn seed() -> u64 {
    match std::env::var("CALMKV_TEST_SEED") {
        Ok(text) => text.parse().expect("CALMKV_TEST_SEED is a u64"),
        Err(_) => rand::random(),
    }
}

#[test]
fn a_failed_write_and_a_full_disk_are_typed_errors_that_change_nothing() {
    let store = faulty(Durability::Sync);
    let db = open(&store);
    db.register("r").put("1", None).unwrap();
    db.counter("c").incr(3).unwrap();
    db.set("s").add("x").unwrap();
    let before = snapshot(&db);

    store.arm(Fault::WriteError);
    let error = db.register("r").put("2", None).unwrap_err();
    assert!(matches!(error, NodeError::Store { source: StoreError::Io { .. } }), "{error}");
    assert_eq!(error.code(), "internal");
    assert_eq!(snapshot(&db), before, "a failed write changed the store");

    store.arm(Fault::NoSpace);
    let error = db.counter("c").incr(1).unwrap_err();
    assert!(
        matches!(error, NodeError::Store { source: StoreError::InsufficientStorage { .. } }),
        "{error}"
    );
    assert_eq!(error.code(), "insufficient_storage");
    assert_eq!(snapshot(&db), before, "a write refused for space changed the store");
    assert_eq!(db.counter("c").get().unwrap(), 3, "reads keep working");

    // Neither fault sticks: the next write goes through.
    db.set("s").add("y").unwrap();
    assert_eq!(db.set("s").members().unwrap(), ["x", "y"]);
    assert_eq!(store.faults_injected(), 2);
}

#[test]
fn a_failed_fsync_is_never_acknowledged_and_writes_stop_until_a_restart() {
    let store = faulty(Durability::Sync);
    let db = open(&store);
    db.register("acked/1").put("1", None).unwrap();
    db.counter("c").incr(5).unwrap();

    store.arm(Fault::FlushError);
    let error = db.register("unacked").put("x", None).unwrap_err();
    assert!(matches!(error, NodeError::Store { source: StoreError::Io { .. } }), "{error}");
    let after_failure = snapshot(&db);

    // No retry: every later write is refused before it changes anything, and
    // an explicit flush does not clear it either.
    for _ in 0..3 {
        let error = db.counter("c").incr(1).unwrap_err();
        assert!(
            matches!(error, NodeError::Store { source: StoreError::FlushFailed { .. } }),
            "{error}"
        );
    }
    assert!(matches!(db.flush(), Err(NodeError::Store { source: StoreError::FlushFailed { .. } })));
    assert_eq!(snapshot(&db), after_failure, "a refused write changed the store");
    assert_eq!(db.counter("c").get().unwrap(), 5, "reads keep working");
    assert!(db.register("acked/1").get().unwrap().is_some());

    // A restart recovers what was durable: the acknowledged writes, not the
    // one whose fsync failed.
    drop(db);
    assert_eq!(store.crash().unwrap().batches_lost, 1);
    let db = open(&store);
    assert!(db.register("acked/1").get().unwrap().is_some());
    assert_eq!(db.register("unacked").get().unwrap(), None);
    assert_eq!(db.counter("c").get().unwrap(), 5);
    db.counter("c").incr(1).unwrap();
    assert_eq!(db.counter("c").get().unwrap(), 6);
}

#[test]
fn a_crash_without_sync_loses_exactly_the_writes_since_the_last_flush() {
    let store = faulty(Durability::None);
    let db = open(&store);
    for i in 0..10 {
        db.register(&format!("k/{i:02}")).put("v", None).unwrap();
    }
    db.flush().unwrap();
    for i in 10..15 {
        db.register(&format!("k/{i:02}")).put("v", None).unwrap();
    }
    drop(db);
    assert_eq!(store.crash().unwrap().batches_lost, 5);
    let db = open(&store);
    for i in 0..15 {
        let present = db.register(&format!("k/{i:02}")).get().unwrap().is_some();
        assert_eq!(present, i < 10, "k/{i:02}");
    }
}

/// Random register puts and counter increments under seeded write, space and
/// fsync faults, with a crash and a restart after every failed fsync and at the
/// end: after each restart the store holds exactly the acknowledged writes.
#[test]
fn seeded_faults_never_lose_an_acknowledged_write_nor_keep_a_refused_one() {
    let seed = seed();
    println!("seed {seed} (CALMKV_TEST_SEED={seed})");
    let rates = FaultRates { write_error: 0.05, no_space: 0.05, flush_error: 0.03 };
    let store = Arc::new(
        FaultyStore::new(Box::new(MemoryStore::new()), Durability::Sync).with_rates(seed, rates),
    );
    let mut db = open(&store);
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut attempted: Vec<String> = Vec::new();
    let (mut counter_acked, mut restarts) = (0i128, 0);
    let check = |db: &Db, acked: &BTreeSet<String>, attempted: &[String], counter: i128| {
        for key in attempted {
            let present = db.register(key).get().unwrap().is_some();
            assert_eq!(present, acked.contains(key), "seed {seed}: {key}");
        }
        assert_eq!(db.counter("count").get().unwrap(), counter, "seed {seed}");
    };
    for i in 0..600u64 {
        let result = if i % 3 == 0 {
            db.counter("count").incr(i % 7 + 1).map(|_| counter_acked += (i % 7 + 1) as i128)
        } else {
            let key = format!("r/{i:04}");
            attempted.push(key.clone());
            db.register(&key).put(i.to_le_bytes().to_vec(), None).map(|_| {
                acked.insert(key);
            })
        };
        match result {
            Ok(()) => {}
            Err(NodeError::Store {
                source: StoreError::Io { .. } | StoreError::InsufficientStorage { .. },
            }) => {}
            Err(NodeError::Store { source: StoreError::FlushFailed { .. } }) => {
                drop(db);
                store.crash().unwrap();
                restarts += 1;
                db = open(&store);
                check(&db, &acked, &attempted, counter_acked);
            }
            Err(other) => panic!("seed {seed}: write {i}: {other}"),
        }
    }
    drop(db);
    store.crash().unwrap();
    let db = open(&store);
    check(&db, &acked, &attempted, counter_acked);
    println!(
        "{} faults, {restarts} restarts, {} of {} puts acknowledged",
        store.faults_injected(),
        acked.len(),
        attempted.len()
    );
    assert!(store.faults_injected() > 0 && !acked.is_empty(), "seed {seed}: a run without faults");
}

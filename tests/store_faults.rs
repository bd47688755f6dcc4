//! Disk faults seen through the node (`Db` over a `FaultyStore`): a failed
//! write is a typed error that changes nothing; a write refused for lack of
//! space is `insufficient_storage` and changes nothing; a failed fsync under
//! `sync` is never acknowledged, and the node then refuses every write until it
//! restarts (it does not retry the fsync: a later success would not prove the
//! lost pages were written), after which everything acknowledged is there and
//! nothing else is. A seeded run mixes all of it; set `CALMKV_TEST_SEED` to
//! replay one. Over HTTP, `/readyz` answers within a second while writes are
//! stuck, after a failed fsync and while reads hang, with the reason.

use calmkv::http::{AppState, HttpConfig, READY_PROBES_MAX};
use calmkv::metrics::Metrics;
use calmkv::store::{
    Durability, Entry, Fault, FaultRates, FaultyStore, MemoryStore, SpaceGuard, Store, StoreError,
    WRITE_STALL_MAX,
};
use calmkv::{Db, Limits, Node, NodeError};
use calmkv_crdts::NodeId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A store that shares a `FaultyStore` with the test, so that the test can
/// arm faults in a store the node owns.
struct Shared(Arc<FaultyStore>);

impl Store for Shared {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.0.scan_prefix(prefix, start_after, limit)
    }
    fn apply(&self, batch: calmkv::store::Batch) -> Result<(), StoreError> {
        self.0.apply(batch)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.0.flush()
    }
    fn stats(&self) -> Result<calmkv::store::StoreStats, StoreError> {
        self.0.stats()
    }
    fn writable(&self) -> Result<(), StoreError> {
        self.0.writable()
    }
}

/// How long `/readyz` may take to answer, whatever the store does.
const READY_ANSWER_MAX: Duration = Duration::from_secs(1);

/// `/readyz`'s status and body, checking that it answered in time.
async fn readyz(client: &reqwest::Client, url: &str) -> (u16, String) {
    let started = Instant::now();
    let response = client.get(format!("{url}/readyz")).send().await.expect("an answer");
    let answer = (response.status().as_u16(), response.text().await.unwrap());
    assert!(started.elapsed() < READY_ANSWER_MAX, "/readyz took {:?}", started.elapsed());
    answer
}

/// Polls `/readyz` until its answer satisfies `wanted`, or panics at the deadline.
async fn readyz_until(
    client: &reqwest::Client,
    url: &str,
    wanted: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + WRITE_STALL_MAX + Duration::from_secs(20);
    loop {
        let (status, body) = readyz(client, url).await;
        if wanted(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz still answers {status} {body:?}");
        tokio::time::sleep(Duration::from_millis(100)).await; // polling a condition
    }
}

/// One `/readyz` test at a time: the bound on probes in flight is the
/// process's, and one test holds it full on purpose.
static READYZ_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A node over `faulty` (behind the free-space guard, reserve 0) served over
/// HTTP on loopback: its URL, and what stops it.
async fn serve(
    faulty: &Arc<FaultyStore>,
    dir: &std::path::Path,
) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let guard = SpaceGuard::new(Box::new(Shared(faulty.clone())), dir, 0).unwrap();
    let node = Arc::new(Node::open(NODE_ID, Arc::new(guard), Limits::default()).unwrap());
    let state = AppState::new(node, Metrics::new(), HttpConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(calmkv::http::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    (url, stop, serving)
}

/// `/readyz` over HTTP while the store misbehaves: it answers within a second
/// every time; not ready with the reason while writes do not finish (reads
/// keep answering meanwhile) and after a failed flush; ready again once a
/// stuck write finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_within_a_second_while_writes_are_stuck_and_after_a_failed_fsync() {
    let _one = READYZ_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let faulty = faulty(Durability::Sync);
    let (url, stop, serving) = serve(&faulty, dir.path()).await;
    let client = reqwest::Client::new();
    let put = |key: &str| client.put(format!("{url}/v1/kv/{key}")).body("v").send();
    assert_eq!(put("before").await.unwrap().status(), 204);
    assert_eq!(readyz(&client, &url).await, (200, "ready\n".to_string()));

    // A write that does not finish: the flush is stuck.
    faulty.stall_flushes(true);
    let stuck = tokio::spawn(put("stuck"));
    let body = readyz_until(&client, &url, |status, _| status == 503).await;
    assert!(body.starts_with("not ready: writes have not finished"), "{body:?}");
    let started = Instant::now();
    let read = client.get(format!("{url}/v1/kv/before")).send().await.unwrap();
    assert_eq!(read.status(), 200, "reads keep answering");
    assert!(started.elapsed() < READY_ANSWER_MAX, "a read took {:?}", started.elapsed());
    assert!(!stuck.is_finished());

    faulty.stall_flushes(false);
    assert_eq!(stuck.await.unwrap().unwrap().status(), 204);
    readyz_until(&client, &url, |status, _| status == 200).await;

    // A failed fsync: not acknowledged, and not ready until a restart.
    faulty.arm(Fault::FlushError);
    assert_eq!(put("failed").await.unwrap().status(), 500);
    let (status, body) = readyz(&client, &url).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("an earlier flush failed"), "{body:?}");
    assert_eq!(client.get(format!("{url}/v1/kv/before")).send().await.unwrap().status(), 200);
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

/// A store whose reads do not return: `/readyz` answers not ready within a
/// second each time, and once [`READY_PROBES_MAX`] probes hang it starts no
/// more (no thread per request); when the store answers again, so does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_within_a_second_when_reads_hang_and_keeps_its_probes_bounded() {
    let _one = READYZ_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let faulty = faulty(Durability::Sync);
    let (url, stop, serving) = serve(&faulty, dir.path()).await;
    let client = reqwest::Client::new();
    assert_eq!(readyz(&client, &url).await.0, 200);

    faulty.stall_reads(true);
    for probe in 0..READY_PROBES_MAX + 3 {
        let (status, body) = readyz(&client, &url).await;
        assert_eq!(status, 503, "{body}");
        if probe < READY_PROBES_MAX {
            assert!(body.contains("did not answer within"), "probe {probe}: {body:?}");
        } else {
            assert!(body.contains("earlier probes of the store have not returned"), "{body:?}");
        }
    }
    faulty.stall_reads(false);
    readyz_until(&client, &url, |status, _| status == 200).await;
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

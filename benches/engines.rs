//! The disk engines side by side, under `Sync` (acknowledged after fsync), for
//! docs/storage.md. Per engine, each for [`RUN`] on a fresh directory, a new
//! key per put and a [`VALUE_BYTES`]-byte value:
//!
//! - `native 1 thread`: the engine's own API, one insert then one sync per put
//!   (sled: `insert` + `flush`; fjall: `insert` + `persist(SyncData)`; redb: a
//!   write transaction committed with `Durability::Immediate`);
//! - `store 1 thread`: calmkv's store (`store::open`, the free-space guard
//!   included), one `apply` of a one-put batch at a time;
//! - `store 8 threads`: [`THREADS`] threads applying at once, sharing syncs
//!   through the group commit;
//! - fjall only, `native, 8 threads, shared sync`: [`THREADS`] threads each
//!   inserting, then waiting for a sync that covers their insert, one sync at a
//!   time shared by whoever waits (the least any store on fjall can do per put
//!   under `Sync`); and `Db register put, 8 threads`: the embedded [`calmkv::Db`]
//!   under `Sync`, a new register per put, to compare with it.
//!
//! Each line: puts/s, latency p50/p99/max, and batches per sync (store rows).
//! Run: `cargo bench --bench engines` (about 40 s of measuring; nothing else
//! should run on the machine). An argument runs the engines whose name holds
//! it: `cargo bench --bench engines -- fjall`.

use calmkv::store::{self, Batch, Durability, Engine, Store};
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long each measurement runs.
const RUN: Duration = Duration::from_secs(3);
/// Value size, as in the HTTP load runs of docs/benchmarks.md.
const VALUE_BYTES: usize = 100;
/// Writer threads of the group-commit row.
const THREADS: u64 = 8;

fn value(n: u64) -> Vec<u8> {
    let mut value = vec![b'v'; VALUE_BYTES];
    value[..8].copy_from_slice(&n.to_le_bytes());
    value
}

fn key(thread: u64, n: u64) -> Vec<u8> {
    format!("bench/{thread}/{n:010}").into_bytes()
}

/// A histogram of microseconds, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `put` (given a put number) for [`RUN`]; the latency histogram and the
/// time taken.
fn timed(mut put: impl FnMut(u64)) -> (Histogram<u64>, Duration) {
    let mut latencies = histogram();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < RUN {
        let before = Instant::now();
        put(n);
        latencies.record(before.elapsed().as_micros().max(1) as u64).expect("in bounds");
        n += 1;
    }
    (latencies, started.elapsed())
}

fn report(engine: Engine, row: &str, latencies: &Histogram<u64>, elapsed: Duration, extra: &str) {
    println!(
        "| {engine} | {row} | {:.0} | {} | {} | {} | {extra} |",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies.value_at_quantile(0.5),
        latencies.value_at_quantile(0.99),
        latencies.max(),
    );
}

fn native_one_thread(engine: Engine, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (latencies, elapsed) = match engine {
        Engine::Sled => {
            let db = sled::Config::new().path(dir).flush_every_ms(None).open().unwrap();
            timed(|n| {
                db.insert(key(0, n), value(n)).unwrap();
                db.flush().unwrap();
            })
        }
        Engine::Fjall => {
            let db = fjall::Database::builder(dir).open().unwrap();
            let data = db.keyspace("data", fjall::KeyspaceCreateOptions::default).unwrap();
            timed(|n| {
                data.insert(key(0, n), value(n)).unwrap();
                db.persist(fjall::PersistMode::SyncData).unwrap();
            })
        }
        Engine::Redb => {
            const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("data");
            let db = redb::Database::create(dir.join("data.redb")).unwrap();
            timed(|n| {
                let tx = db.begin_write().unwrap();
                tx.open_table(TABLE)
                    .unwrap()
                    .insert(key(0, n).as_slice(), value(n).as_slice())
                    .unwrap();
                tx.commit().unwrap();
            })
        }
    };
    report(engine, "native, 1 thread", &latencies, elapsed, "1");
}

fn store_threads(engine: Engine, dir: &Path, threads: u64) {
    if engine == Engine::Sled {
        // sled makes no new stores: one as calmkv made them before markers.
        drop(calmkv::store::SledStore::open(dir, Durability::Sync).unwrap());
    }
    let store = store::open(Some(engine), dir, Durability::Sync).unwrap();
    let store: &dyn Store = &*store;
    let next = AtomicU64::new(0);
    let runs: Vec<(Histogram<u64>, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let next = &next;
                scope.spawn(move || {
                    timed(|_| {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        store.apply(Batch::new().put(key(t, n), value(n))).unwrap();
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = runs.iter().map(|(_, e)| *e).max().unwrap_or(RUN);
    let mut latencies = histogram();
    for (h, _) in &runs {
        latencies.add(h).unwrap();
    }
    let stats = store.stats().unwrap();
    let syncs = stats.flush_latency.map(|h| h.count()).unwrap_or(0).max(1);
    let per_sync = format!("{:.1}", latencies.len() as f64 / syncs as f64);
    let row = if threads == 1 {
        "store, 1 thread".to_string()
    } else {
        format!("store, {threads} threads")
    };
    report(engine, &row, &latencies, elapsed, &per_sync);
}

/// Runs `put(thread, n)` from [`THREADS`] threads for [`RUN`]; the merged
/// latencies and the longest thread's time.
fn threaded(put: impl Fn(u64, u64) + Sync) -> (Histogram<u64>, Duration) {
    let next = AtomicU64::new(0);
    let runs: Vec<(Histogram<u64>, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (next, put) = (&next, &put);
                scope.spawn(move || timed(|_| put(t, next.fetch_add(1, Ordering::Relaxed))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = runs.iter().map(|(_, e)| *e).max().unwrap_or(RUN);
    let mut latencies = histogram();
    for (h, _) in &runs {
        latencies.add(h).unwrap();
    }
    (latencies, elapsed)
}

/// Raw fjall, [`THREADS`] writers: insert, then a sync that began after the
/// insert (whoever holds the sync lock syncs for everyone inserted so far).
fn fjall_native_shared_sync(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let db = fjall::Database::builder(dir).open().unwrap();
    let data = db.keyspace("data", fjall::KeyspaceCreateOptions::default).unwrap();
    let inserted = AtomicU64::new(0);
    // The highest insert number covered by a finished sync.
    let synced = Mutex::new(0u64);
    let syncs = AtomicU64::new(0);
    let (latencies, elapsed) = threaded(|t, n| {
        data.insert(key(t, n), value(n)).unwrap();
        let mine = inserted.fetch_add(1, Ordering::SeqCst) + 1;
        let mut covered = synced.lock().unwrap();
        if *covered < mine {
            let target = inserted.load(Ordering::SeqCst);
            db.persist(fjall::PersistMode::SyncData).unwrap();
            syncs.fetch_add(1, Ordering::Relaxed);
            *covered = target;
        }
    });
    let per_sync = latencies.len() as f64 / syncs.load(Ordering::Relaxed).max(1) as f64;
    let row = format!("native, {THREADS} threads, shared sync");
    report(Engine::Fjall, &row, &latencies, elapsed, &format!("{per_sync:.1}"));
}

/// The embedded `Db` on fjall under `Sync`: register puts from [`THREADS`] threads.
fn db_register_puts(dir: &Path) {
    let mut config = calmkv::Config::new(dir);
    config.engine = Some(Engine::Fjall);
    config.durability = Durability::Sync;
    let db = calmkv::Db::open_with(config).unwrap();
    let (latencies, elapsed) = threaded(|t, n| {
        let name = format!("bench/{t}/{n:010}");
        db.register(&name).put(value(n), None).unwrap();
    });
    let syncs = db.node().store().stats().unwrap().flush_latency.map_or(0, |h| h.count()).max(1);
    let per_sync = format!("{:.1}", latencies.len() as f64 / syncs as f64);
    let row = format!("Db register put, {THREADS} threads");
    report(Engine::Fjall, &row, &latencies, elapsed, &per_sync);
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    println!("| engine | run | puts/s | p50 µs | p99 µs | max µs | puts per sync |");
    println!("|---|---|--:|--:|--:|--:|--:|");
    for engine in Engine::ALL {
        if filter.as_ref().is_some_and(|f| !engine.name().contains(f.as_str())) {
            continue;
        }
        let runs = if engine == Engine::Fjall { 5 } else { 3 };
        for run in 0..runs {
            let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
            let path = dir.path().join("store");
            match run {
                0 => native_one_thread(engine, &path),
                1 => store_threads(engine, &path, 1),
                2 => store_threads(engine, &path, THREADS),
                3 => fjall_native_shared_sync(&path),
                _ => db_register_puts(&path),
            }
        }
    }
}

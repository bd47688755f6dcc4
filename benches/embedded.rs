//! Embedded write throughput: calmkv's [`Db`] against raw sled writing the same
//! bytes, for each durability mode.
//!
//! Groups (criterion reports time per operation and `thrpt` in operations/s):
//!
//! - `register_put/<peer>/<mode>`: a register write of a [`VALUE_BYTES`]-byte value
//!   over [`KEYS`] keys in turn. `db` writes with the context of its previous
//!   write of that key (an overwrite, no siblings). `raw` inserts the same store
//!   key (`d/<key>`) and value bytes into sled. `raw_batch` writes what calmkv's
//!   store writes, minus the envelope: the key and an 8-byte digest-index entry in
//!   one `sled::Batch` (calmkv's write path, without calmkv).
//! - `counter_incr/<peer>/<mode>`: `db.counter(k).incr(1)` against sled's own
//!   read-modify-write of a `u64` (`update_and_fetch`).
//! - `sync_8_threads/<peer>/<op>`: [`THREADS`] threads writing at once under
//!   `Sync`, each on its own keys. `db` acknowledges after a group commit; `raw`
//!   and `raw_batch` write then call `flush` on every write.
//!
//! Values differ from one write to the next (the write's number is in the first
//! 8 bytes): sled skips an insert of the value a key already holds, which would
//! leave the raw peer measuring nothing.
//!
//! Peers per mode: `Sync` ↔ write + `flush()` each write; `Interval(100ms)` ↔
//! sled's own flusher every 100 ms; `None` ↔ sled's own flusher every 500 ms
//! (calmkv's `None` flushes every 500 ms in the background). Keys are written
//! once before measuring, so every peer overwrites existing keys.
//!
//! sled 0.34.7 can deadlock when a periodic `flush()` runs while writers are far
//! ahead of the disk; calmkv's `Interval` and `None` flush periodically and hold
//! writers within `UNFLUSHED_BATCHES_MAX` unflushed batches, which avoids it
//! (docs/benchmarks.md §5.1). A watchdog stays as a guard: it ends the process
//! with exit code 3, naming the benchmark, when no write starts for
//! [`STALL_MAX`], instead of letting a deadlock hang the run. A filter runs one benchmark and skips the
//! setup of the others: `cargo bench --bench embedded -- register_put/db/none`.
//!
//! Run: `cargo bench --bench embedded` (about 2 minutes; see docs/benchmarks.md).

use calmkv::store::Durability;
use calmkv::{Config, Db};
use calmkv_crdts::CausalContext;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, Bencher, BenchmarkGroup, Criterion, Throughput};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Keys written in turn (by one thread, or shared out among the threads).
const KEYS: usize = 1_000;
/// Size of a register value.
const VALUE_BYTES: usize = 100;
/// Writers in the concurrent group.
const THREADS: usize = 8;
/// The flush period of `Durability::Interval` and of its raw peer.
const INTERVAL: Duration = Duration::from_millis(100);
/// calmkv's background flush period under `Durability::None` (sled's default).
const NONE_FLUSH_PERIOD_MS: u64 = 500;
const SAMPLES: usize = 10;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(3);
/// The watchdog ends the process when no write started for this long.
const STALL_MAX: Duration = Duration::from_secs(20);

const MODES: [(&str, Durability); 3] = [
    ("sync", Durability::Sync),
    ("interval_100ms", Durability::Interval(INTERVAL)),
    ("none", Durability::None),
];

/// Writes started so far, watched by the watchdog.
static PROGRESS: AtomicU64 = AtomicU64::new(0);
/// The benchmark running now, for the watchdog's message.
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Counts a write and returns its number; starts the watchdog on first use.
fn tick() -> u64 {
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        std::thread::spawn(watchdog);
    });
    PROGRESS.fetch_add(1, Ordering::Relaxed)
}

fn watchdog() {
    let mut last = (PROGRESS.load(Ordering::Relaxed), Instant::now());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = PROGRESS.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL_MAX {
            let current = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).clone();
            eprintln!(
                "embedded bench: no write for {STALL_MAX:?} in {current}: a storage deadlock \
                 (sled 0.34.7, see docs/benchmarks.md). Exiting."
            );
            std::process::exit(3);
        }
    }
}

/// Whether the benchmark `id` (`group/function`) passes the command line's filter
/// (criterion's positional argument, matched as a substring), so that a filtered
/// run skips the setup (prefill) of the benchmarks it does not run.
fn selected(id: &str) -> bool {
    static FILTER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let filter = FILTER.get_or_init(|| {
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if CRITERION_VALUE_FLAGS.contains(&arg.as_str()) {
                args.next(); // the flag's value, not a filter
            } else if !arg.starts_with('-') {
                return Some(arg);
            }
        }
        None
    });
    filter.as_deref().is_none_or(|f| id.contains(f))
}

/// criterion's options that take a value as the next argument.
const CRITERION_VALUE_FLAGS: [&str; 19] = [
    "-b",
    "-c",
    "-s",
    "--baseline",
    "--baseline-lenient",
    "--color",
    "--confidence-level",
    "--format",
    "--load-baseline",
    "--measurement-time",
    "--noise-threshold",
    "--nresamples",
    "--output-format",
    "--plotting-backend",
    "--profile-time",
    "--sample-size",
    "--save-baseline",
    "--significance-level",
    "--warm-up-time",
];

/// Runs one benchmark of `group`, telling the watchdog its name first.
fn bench(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, f: impl FnMut(&mut Bencher<'_>)) {
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
    group.bench_function(name, f);
}

/// The value of write number `n`: [`VALUE_BYTES`] bytes starting with `n`.
fn value(n: u64) -> Vec<u8> {
    let mut value = vec![b'v'; VALUE_BYTES];
    value[..8].copy_from_slice(&n.to_le_bytes());
    value
}

fn key(i: usize) -> String {
    format!("bench/{i:06}")
}

/// The store key calmkv uses for a user key (see `node.rs`), so that the peers
/// write the same key bytes.
fn store_key(i: usize) -> Vec<u8> {
    format!("d/{}", key(i)).into_bytes()
}

/// A stand-in for calmkv's digest-index key of a user key (`h/` + bucket + key).
fn index_key(i: usize) -> Vec<u8> {
    format!("h/\0\0{}", key(i)).into_bytes()
}

fn open_db(durability: Durability) -> (TempDir, Db) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = Db::open_with(Config { durability, ..Config::new(dir.path()) }).expect("open Db");
    (dir, db)
}

/// Raw sled configured as the peer of `durability`, and whether a write must be
/// followed by `flush()`.
fn open_raw(durability: Durability) -> (TempDir, sled::Db, bool) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (flush_every_ms, flush_each) = match durability {
        Durability::Sync => (None, true),
        Durability::Interval(period) => (Some(period.as_millis() as u64), false),
        Durability::None => (Some(NONE_FLUSH_PERIOD_MS), false),
    };
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(flush_every_ms)
        .open()
        .expect("open sled");
    (dir, db, flush_each)
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.sample_size(SAMPLES).warm_up_time(WARM_UP).measurement_time(MEASUREMENT);
    group.throughput(Throughput::Elements(1));
}

/// Writes every key once through the register, returning the contexts to
/// overwrite with.
fn prefill_registers(db: &Db) -> Vec<CausalContext> {
    (0..KEYS).map(|i| db.register(&key(i)).put(value(tick()), None).expect("put")).collect()
}

/// calmkv's store write without calmkv: the key and its index entry in one batch.
fn raw_batch_write(raw: &sled::Db, i: usize) {
    let n = tick();
    let mut batch = sled::Batch::default();
    batch.insert(store_key(i), value(n));
    batch.insert(index_key(i), &n.to_le_bytes());
    raw.apply_batch(batch).unwrap();
}

fn register_put(c: &mut Criterion) {
    let mut group = c.benchmark_group("register_put");
    configure(&mut group);
    for (mode, durability) in MODES {
        if selected(&format!("register_put/db/{mode}")) {
            let (_dir, db) = open_db(durability);
            let names: Vec<String> = (0..KEYS).map(key).collect();
            let mut contexts = prefill_registers(&db);
            let mut i = 0;
            bench(&mut group, &format!("db/{mode}"), |b| {
                b.iter(|| {
                    let slot = i % KEYS;
                    i += 1;
                    let register = db.register(&names[slot]);
                    contexts[slot] = register.put(value(tick()), Some(&contexts[slot])).unwrap();
                })
            });
        }
        if selected(&format!("register_put/raw/{mode}")) {
            let (_dir, raw, flush_each) = open_raw(durability);
            let keys: Vec<Vec<u8>> = (0..KEYS).map(store_key).collect();
            for k in &keys {
                raw.insert(k, value(tick())).unwrap();
            }
            let mut i = 0;
            bench(&mut group, &format!("raw/{mode}"), |b| {
                b.iter(|| {
                    raw.insert(&keys[i % KEYS], value(tick())).unwrap();
                    i += 1;
                    if flush_each {
                        raw.flush().unwrap();
                    }
                })
            });
        }
        if selected(&format!("register_put/raw_batch/{mode}")) {
            let (_dir, raw, flush_each) = open_raw(durability);
            (0..KEYS).for_each(|i| raw_batch_write(&raw, i));
            let mut i = 0;
            bench(&mut group, &format!("raw_batch/{mode}"), |b| {
                b.iter(|| {
                    raw_batch_write(&raw, i % KEYS);
                    i += 1;
                    if flush_each {
                        raw.flush().unwrap();
                    }
                })
            });
        }
    }
    group.finish();
}

fn raw_incr(raw: &sled::Db, key: &[u8]) {
    tick();
    raw.update_and_fetch(key, |old| {
        let n = old.map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        Some((n + 1).to_le_bytes().to_vec())
    })
    .unwrap();
}

fn counter_incr(c: &mut Criterion) {
    let mut group = c.benchmark_group("counter_incr");
    configure(&mut group);
    for (mode, durability) in MODES {
        if selected(&format!("counter_incr/db/{mode}")) {
            let (_dir, db) = open_db(durability);
            let names: Vec<String> = (0..KEYS).map(key).collect();
            for name in &names {
                tick();
                db.counter(name).incr(1).unwrap();
            }
            let mut i = 0;
            bench(&mut group, &format!("db/{mode}"), |b| {
                b.iter(|| {
                    tick();
                    db.counter(&names[i % KEYS]).incr(1).unwrap();
                    i += 1;
                })
            });
        }
        if selected(&format!("counter_incr/raw/{mode}")) {
            let (_dir, raw, flush_each) = open_raw(durability);
            let keys: Vec<Vec<u8>> = (0..KEYS).map(store_key).collect();
            keys.iter().for_each(|k| raw_incr(&raw, k));
            let mut i = 0;
            bench(&mut group, &format!("raw/{mode}"), |b| {
                b.iter(|| {
                    raw_incr(&raw, &keys[i % KEYS]);
                    i += 1;
                    if flush_each {
                        raw.flush().unwrap();
                    }
                })
            });
        }
    }
    group.finish();
}

/// Runs `ops` operations shared out among [`THREADS`] threads, thread `t` calling
/// `op(t, n)` for its `n`-th operation; returns the wall time.
fn run_threads(ops: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let threads = THREADS as u64;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let op = &op;
            let mine = ops / threads + u64::from((t as u64) < ops % threads);
            scope.spawn(move || (0..mine).for_each(|n| op(t, n)));
        }
    });
    started.elapsed()
}

/// The `n`-th key of thread `t`: threads own every [`THREADS`]-th key from `t`.
fn thread_key(t: usize, n: u64) -> usize {
    let per_thread = KEYS / THREADS;
    t + THREADS * (n as usize % per_thread)
}

/// Store batches and store flushes of a Db so far (a flush is sled's `flush()`:
/// see docs/benchmarks.md for what it does on disk).
fn batches_and_flushes(db: &Db) -> (u64, u64) {
    let stats = db.node().store().stats().expect("stats");
    (stats.batches, stats.flush_latency.map_or(0, |h| h.count()))
}

/// Prints how many store batches shared one flush while `run` ran.
fn report_group_commit(name: &str, db: &Db, run: impl FnOnce()) {
    let (batches_before, flushes_before) = batches_and_flushes(db);
    run();
    let (batches, flushes) = batches_and_flushes(db);
    let (batches, flushes) = (batches - batches_before, flushes - flushes_before);
    println!(
        "group commit {name}: {batches} batches, {flushes} flushes, {:.2} batches per flush",
        batches as f64 / flushes.max(1) as f64
    );
}

fn sync_8_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("sync_8_threads");
    configure(&mut group);
    if selected("sync_8_threads/db/register_put") {
        let (_dir, db) = open_db(Durability::Sync);
        let names: Vec<String> = (0..KEYS).map(key).collect();
        // One lock per key, taken only by the thread owning the key: where the
        // context waits between samples.
        let contexts: Vec<Mutex<CausalContext>> =
            prefill_registers(&db).into_iter().map(Mutex::new).collect();
        report_group_commit("sync_8_threads/db/register_put", &db, || {
            bench(&mut group, "db/register_put", |b| {
                b.iter_custom(|iters| {
                    run_threads(iters, |t, n| {
                        let slot = thread_key(t, n);
                        let mut context = contexts[slot].lock().unwrap();
                        let register = db.register(&names[slot]);
                        *context = register.put(value(tick()), Some(&context)).unwrap();
                    })
                })
            });
        });
    }
    if selected("sync_8_threads/db/counter_incr") {
        let (_dir, db) = open_db(Durability::Sync);
        let names: Vec<String> = (0..KEYS).map(key).collect();
        for name in &names {
            tick();
            db.counter(name).incr(1).unwrap();
        }
        report_group_commit("sync_8_threads/db/counter_incr", &db, || {
            bench(&mut group, "db/counter_incr", |b| {
                b.iter_custom(|iters| {
                    run_threads(iters, |t, n| {
                        tick();
                        db.counter(&names[thread_key(t, n)]).incr(1).unwrap();
                    })
                })
            });
        });
    }
    if selected("sync_8_threads/raw/insert_flush") {
        let (_dir, raw, _) = open_raw(Durability::Sync);
        let keys: Vec<Vec<u8>> = (0..KEYS).map(store_key).collect();
        for k in &keys {
            raw.insert(k, value(tick())).unwrap();
        }
        bench(&mut group, "raw/insert_flush", |b| {
            b.iter_custom(|iters| {
                run_threads(iters, |t, n| {
                    raw.insert(&keys[thread_key(t, n)], value(tick())).unwrap();
                    raw.flush().unwrap();
                })
            })
        });
    }
    if selected("sync_8_threads/raw_batch/batch_flush") {
        let (_dir, raw, _) = open_raw(Durability::Sync);
        (0..KEYS).for_each(|i| raw_batch_write(&raw, i));
        bench(&mut group, "raw_batch/batch_flush", |b| {
            b.iter_custom(|iters| {
                run_threads(iters, |t, n| {
                    raw_batch_write(&raw, thread_key(t, n));
                    raw.flush().unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, register_put, counter_incr, sync_8_threads);
criterion_main!(benches);

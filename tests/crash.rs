//! Crash durability of the real binary (docs/design.md §4).
//!
//! Several concurrent clients write to `calmkv serve` — register PUTs of distinct
//! random values, increments of one shared counter, adds to one shared set — and
//! record exactly what was attempted and what was acknowledged (2xx). Once enough
//! writes are acknowledged the server is stopped while writes are still in flight:
//! with SIGKILL (a crash) or SIGTERM (a graceful stop). It is restarted on the same
//! data directory and everything is read back:
//!
//! - always: no register holds a value that was never written to it, the counter
//!   is at most the sum of attempted increments, the set holds only attempted
//!   members (a crash may lose writes, never invent or garble them);
//! - `--durability sync` after SIGKILL, and every mode after SIGTERM: nothing
//!   acknowledged is lost — every acknowledged register value reads back byte-equal,
//!   the counter is at least the sum of acknowledged increments, the set holds
//!   every acknowledged add;
//! - `--durability interval` and `none` after SIGKILL: at most their documented
//!   window is lost — [`UNFLUSHED_BATCHES_MAX`] (resp.
//!   [`NONE_UNFLUSHED_BATCHES_MAX`]) acknowledged writes, each write being one
//!   batch — and the losses are printed (`cargo test --test crash --
//!   --nocapture`).
//!
//! The workload is random from a seed, printed by every test; set
//! `CALMKV_TEST_SEED` to replay one. Each engine's `kill -9` runs happen once
//! per mode by default; `CALMKV_CRASH_RUNS=N` repeats them N times and prints
//! the most lost in any run.
#![cfg(unix)]

mod process;

use calmkv::store::{Durability, NONE_UNFLUSHED_BATCHES_MAX, UNFLUSHED_BATCHES_MAX};
use process::{Finished, ServerProcess};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Concurrent clients.
const WRITERS: usize = 8;
/// Acknowledged writes (all clients together) before the server is stopped.
const ACKED_BEFORE_STOP: usize = 200;
/// Writes one client attempts at most (bounds a test whose server never stops).
const WRITES_PER_WRITER_MAX: usize = 2_000;
/// How long the acknowledged writes may take to arrive.
const WORKLOAD_DEADLINE: Duration = Duration::from_secs(60);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The counter every client increments.
const COUNTER_KEY: &str = "crash/counter";
/// The set every client adds to.
const SET_KEY: &str = "crash/set";
/// Largest increment.
const INCREMENT_MAX: u64 = 5;

/// The seed of this run: `CALMKV_TEST_SEED`, or a random one.
fn seed() -> u64 {
    match std::env::var("CALMKV_TEST_SEED") {
        Ok(text) => text.parse().expect("CALMKV_TEST_SEED is a u64"),
        Err(_) => rand::random(),
    }
}

/// How the server is stopped in the middle of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGKILL: a crash.
    Kill9,
    /// SIGTERM: a graceful stop.
    Terminate,
}

/// One write a client attempted, and whether it was acknowledged.
#[derive(Clone, Debug)]
enum Write {
    Register { key: String, value: Vec<u8> },
    Incr(u64),
    SetAdd(String),
}

/// What every client attempted, in order, with the acknowledgement of each.
#[derive(Debug, Default)]
struct History {
    writes: Vec<(Write, bool)>,
    /// Answers other than 2xx from a live server (each one is a bug).
    refused: Vec<String>,
}

impl History {
    fn acked(&self) -> usize {
        self.writes.iter().filter(|(_, acked)| *acked).count()
    }

    fn counter_sum(&self, acked_only: bool) -> u64 {
        self.writes
            .iter()
            .filter(|(_, acked)| *acked || !acked_only)
            .map(|(w, _)| if let Write::Incr(n) = w { *n } else { 0 })
            .sum()
    }
}

/// Shared between the clients and the test.
struct Progress {
    acked: AtomicUsize,
    in_flight: AtomicUsize,
    enough: Notify,
    stopped: AtomicBool,
}

fn random_write(rng: &mut StdRng, writer: usize, i: usize) -> Write {
    match rng.random_range(0..3) {
        0 => {
            // Distinct per write (the prefix), and mostly not UTF-8 (the tail), so
            // a read-back checks raw bytes, not text.
            let mut value = format!("w{writer}-{i}-").into_bytes();
            let tail_bytes = rng.random_range(1..=48);
            value.extend((0..tail_bytes).map(|_| rng.random::<u8>()));
            Write::Register { key: format!("crash/reg/{writer}/{i}"), value }
        }
        1 => Write::Incr(rng.random_range(1..=INCREMENT_MAX)),
        _ => Write::SetAdd(format!("m/{writer}/{i}")),
    }
}

/// Sends one write; `Ok(acked)` when the server answered, `Err` when it could not
/// be reached (it is gone).
async fn send(
    client: &reqwest::Client,
    url: &str,
    write: &Write,
) -> Result<StatusCode, reqwest::Error> {
    let request = match write {
        Write::Register { key, value } => {
            client.put(format!("{url}/v1/kv/{key}")).body(value.clone())
        }
        Write::Incr(n) => client
            .post(format!("{url}/v1/kv/{COUNTER_KEY}"))
            .json(&serde_json::json!({"counter": {"incr": n}})),
        Write::SetAdd(member) => client
            .post(format!("{url}/v1/kv/{SET_KEY}"))
            .json(&serde_json::json!({"set": {"add": [member]}})),
    };
    Ok(request.send().await?.status())
}

/// One client: writes until the server stops answering.
async fn writer(
    client: reqwest::Client,
    url: String,
    writer: usize,
    seed: u64,
    progress: Arc<Progress>,
) -> History {
    let mut rng = StdRng::seed_from_u64(seed ^ (writer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut history = History::default();
    for i in 0..WRITES_PER_WRITER_MAX {
        let write = random_write(&mut rng, writer, i);
        progress.in_flight.fetch_add(1, Ordering::SeqCst);
        let answer = send(&client, &url, &write).await;
        progress.in_flight.fetch_sub(1, Ordering::SeqCst);
        match answer {
            Ok(status) if status.is_success() => {
                history.writes.push((write, true));
                if progress.acked.fetch_add(1, Ordering::SeqCst) + 1 == ACKED_BEFORE_STOP {
                    progress.enough.notify_one();
                }
            }
            Ok(status) => {
                history.refused.push(format!("{write:?}: {status}"));
                history.writes.push((write, false));
            }
            Err(error) => {
                assert!(
                    progress.stopped.load(Ordering::SeqCst),
                    "writer {writer}: the server became unreachable before it was stopped: {error}"
                );
                history.writes.push((write, false));
                break;
            }
        }
    }
    history
}

/// What a read-back after the restart found missing (acknowledged, not there).
#[derive(Debug, Default)]
struct Losses {
    registers_acked: usize,
    registers_lost: usize,
    incr_acked: u64,
    incr_attempted: u64,
    counter_read: u64,
    set_adds_acked: usize,
    set_adds_lost: usize,
}

impl Losses {
    fn counter_deficit(&self) -> u64 {
        self.incr_acked.saturating_sub(self.counter_read)
    }

    /// One line for the log: what was lost of what was acknowledged.
    fn summary(&self) -> String {
        format!(
            "lost {}/{} acknowledged register writes, {}/{} acknowledged set adds, \
             counter {} (acknowledged increments {}, attempted {}, deficit {})",
            self.registers_lost,
            self.registers_acked,
            self.set_adds_lost,
            self.set_adds_acked,
            self.counter_read,
            self.incr_acked,
            self.incr_attempted,
            self.counter_deficit()
        )
    }

    fn is_none(&self) -> bool {
        self.registers_lost == 0 && self.set_adds_lost == 0 && self.counter_deficit() == 0
    }

    /// Acknowledged writes lost, at least: every lost register write and set
    /// add, and the fewest increments (of at most [`INCREMENT_MAX`]) that make
    /// the counter's deficit.
    fn writes_lost_min(&self) -> u64 {
        (self.registers_lost + self.set_adds_lost) as u64
            + self.counter_deficit().div_ceil(INCREMENT_MAX)
    }

    /// Panics unless the losses fit the window of `mode`'s documented bound.
    fn assert_within(&self, mode: &str) {
        let bound = match mode {
            "interval" => UNFLUSHED_BATCHES_MAX,
            "none" => NONE_UNFLUSHED_BATCHES_MAX,
            other => panic!("no loss bound for {other}"),
        };
        assert!(
            self.writes_lost_min() <= bound,
            "{mode}: lost at least {} acknowledged writes, the bound is {bound}: {}",
            self.writes_lost_min(),
            self.summary()
        );
        assert!(
            self.counter_deficit() <= bound * INCREMENT_MAX,
            "{mode}: counter deficit {} above {bound} increments",
            self.counter_deficit()
        );
    }
}

async fn get(client: &reqwest::Client, url: &str, key: &str) -> (StatusCode, Vec<u8>) {
    let response = client.get(format!("{url}/v1/kv/{key}")).send().await.expect("a read");
    let status = response.status();
    (status, response.bytes().await.expect("a body").to_vec())
}

/// Reads everything back and checks what must hold in every mode; returns what
/// was acknowledged and is missing.
async fn read_back(url: &str, history: &History) -> Losses {
    let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().unwrap();
    let mut losses = Losses {
        incr_acked: history.counter_sum(true),
        incr_attempted: history.counter_sum(false),
        ..Losses::default()
    };
    for (write, acked) in &history.writes {
        let Write::Register { key, value } = write else { continue };
        let (status, body) = get(&client, url, key).await;
        match status {
            StatusCode::OK => assert_eq!(&body, value, "{key} holds a value never written to it"),
            StatusCode::NOT_FOUND => {}
            other => panic!("{key}: {other}: {}", String::from_utf8_lossy(&body)),
        }
        if *acked {
            losses.registers_acked += 1;
            losses.registers_lost += usize::from(status == StatusCode::NOT_FOUND);
        }
    }

    let (status, body) = get(&client, url, COUNTER_KEY).await;
    losses.counter_read = match status {
        StatusCode::OK => {
            let json: serde_json::Value = serde_json::from_slice(&body).expect("counter JSON");
            assert_eq!(json["type"], "counter", "{json}");
            json["value"].as_u64().expect("a non-negative counter")
        }
        StatusCode::NOT_FOUND => 0,
        other => panic!("{COUNTER_KEY}: {other}"),
    };
    assert!(
        losses.counter_read <= losses.incr_attempted,
        "counter {} is above the sum of attempted increments {}",
        losses.counter_read,
        losses.incr_attempted
    );

    let (status, body) = get(&client, url, SET_KEY).await;
    let members: BTreeSet<String> = match status {
        StatusCode::OK => {
            let json: serde_json::Value = serde_json::from_slice(&body).expect("set JSON");
            assert_eq!(json["type"], "set", "{json}");
            serde_json::from_value(json["value"].clone()).expect("members are strings")
        }
        StatusCode::NOT_FOUND => BTreeSet::new(),
        other => panic!("{SET_KEY}: {other}"),
    };
    let attempted: BTreeSet<&String> = history
        .writes
        .iter()
        .filter_map(|(w, _)| if let Write::SetAdd(m) = w { Some(m) } else { None })
        .collect();
    for member in &members {
        assert!(attempted.contains(member), "the set holds {member:?}, never added");
    }
    for (write, acked) in &history.writes {
        if let (Write::SetAdd(member), true) = (write, acked) {
            losses.set_adds_acked += 1;
            losses.set_adds_lost += usize::from(!members.contains(member));
        }
    }
    losses
}

/// One run: start with `flags`, write from [`WRITERS`] clients until
/// [`ACKED_BEFORE_STOP`] writes are acknowledged, stop as `stop` says while the
/// clients keep writing, restart, read back. Returns the losses and how the first
/// process ended.
async fn crash_run(flags: &[&str], stop: Stop) -> (Losses, Finished) {
    crash_run_on(flags, stop, false).await
}

/// [`crash_run`]; with `legacy_sled`, on a data directory whose store sled made
/// the way calmkv did before store markers (sled makes no new stores).
async fn crash_run_on(flags: &[&str], stop: Stop, legacy_sled: bool) -> (Losses, Finished) {
    let seed = seed();
    println!("crash run: flags {flags:?}, legacy sled {legacy_sled}, stop {stop:?}, seed {seed} (CALMKV_TEST_SEED={seed}), {WRITERS} writers, stop after {ACKED_BEFORE_STOP} acknowledged writes");
    let temp = tempfile::tempdir().expect("a temporary directory");
    let server = if legacy_sled {
        let data_dir = temp.path().join("data");
        let sled = calmkv::store::SledStore::open(&data_dir.join("store"), Durability::Sync);
        drop(sled.expect("a sled store"));
        ServerProcess::start_in(&data_dir, flags)
    } else {
        ServerProcess::start(flags)
    };
    let url = server.url();
    let progress = Arc::new(Progress {
        acked: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        enough: Notify::new(),
        stopped: AtomicBool::new(false),
    });
    let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().unwrap();
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(client.clone(), url.clone(), w, seed, progress.clone())))
        .collect();
    tokio::time::timeout(WORKLOAD_DEADLINE, progress.enough.notified())
        .await
        .expect("enough writes acknowledged in time");
    progress.stopped.store(true, Ordering::SeqCst);
    let in_flight = progress.in_flight.load(Ordering::SeqCst);
    let (mut server, finished) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let finished = match stop {
            Stop::Kill9 => server.kill9(),
            Stop::Terminate => server.terminate(),
        };
        (server, finished)
    })
    .await
    .unwrap();
    let mut history = History::default();
    for handle in writers {
        let part = handle.await.expect("a writer finished");
        history.writes.extend(part.writes);
        history.refused.extend(part.refused);
    }
    assert!(history.refused.is_empty(), "a live server refused writes: {:#?}", history.refused);
    println!(
        "  stopped after {:?}: {} writes attempted, {} acknowledged, {in_flight} in flight at the stop",
        started.elapsed(),
        history.writes.len(),
        history.acked()
    );
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    let losses = read_back(&server.url(), &history).await;
    println!("  after restart: {}", losses.summary());
    drop(server);
    (losses, finished)
}

fn assert_killed(finished: &Finished) {
    assert_eq!(finished.status.signal(), Some(9), "{finished:#?}");
}

fn assert_stopped_gracefully(finished: &Finished) {
    finished.assert_success();
    assert!(finished.stderr.contains("SIGTERM"), "no SIGTERM log line: {}", finished.stderr);
    assert!(finished.stderr.contains("stopped"), "no `stopped` log line: {}", finished.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_durability_loses_no_acknowledged_write_on_kill_9() {
    let (losses, finished) = crash_run(&["--durability", "sync"], Stop::Kill9).await;
    assert_killed(&finished);
    assert!(losses.registers_acked > 0 && losses.set_adds_acked > 0 && losses.incr_acked > 0);
    assert!(losses.is_none(), "acknowledged writes lost under --durability sync: {losses:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_on_kill_9_loses_at_most_recent_writes_and_reports_how_many() {
    let flags = ["--durability", "interval", "--flush-interval-ms", "200"];
    let (losses, finished) = crash_run(&flags, Stop::Kill9).await;
    assert_killed(&finished);
    println!("  DOCUMENTED (interval 200 ms, kill -9): {}", losses.summary());
    losses.assert_within("interval");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_durability_on_kill_9_may_lose_recent_writes_and_reports_how_many() {
    let (losses, finished) = crash_run(&["--durability", "none"], Stop::Kill9).await;
    assert_killed(&finished);
    println!("  DOCUMENTED (none, kill -9): {}", losses.summary());
    losses.assert_within("none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_writes_loses_nothing_acknowledged_in_any_durability_mode() {
    let modes: [&[&str]; 3] = [
        &["--durability", "sync"],
        &["--durability", "interval", "--flush-interval-ms", "200"],
        &["--durability", "none"],
    ];
    for flags in modes {
        let (losses, finished) = crash_run(flags, Stop::Terminate).await;
        assert_stopped_gracefully(&finished);
        assert!(losses.is_none(), "{flags:?}: acknowledged writes lost on SIGTERM: {losses:#?}");
    }
}

/// `kill -9` runs per engine and mode: `CALMKV_CRASH_RUNS`, or 1.
fn crash_runs() -> usize {
    match std::env::var("CALMKV_CRASH_RUNS") {
        Ok(text) => text.parse().expect("CALMKV_CRASH_RUNS is a count"),
        Err(_) => 1,
    }
}

/// Each disk engine under the same workload (the tests above run the
/// default one): `sync` loses nothing on `kill -9`, `interval` and `none` lose
/// at most their bound (the most lost in [`crash_runs`] runs is printed as
/// `MEASURED`), SIGTERM loses nothing in any mode. sled runs on a store it
/// made before store markers, since it makes no new ones.
async fn engine_crash_runs(engine: &str) {
    let legacy = engine == "sled";
    let runs = crash_runs();
    let flags = ["--engine", engine, "--durability", "sync"];
    for _ in 0..runs {
        let (losses, finished) = crash_run_on(&flags, Stop::Kill9, legacy).await;
        assert_killed(&finished);
        assert!(losses.registers_acked > 0 && losses.set_adds_acked > 0 && losses.incr_acked > 0);
        assert!(losses.is_none(), "{engine}: acknowledged writes lost under sync: {losses:#?}");
    }
    println!("  MEASURED ({engine}, sync, kill -9, {runs} runs): lost 0 acknowledged writes");
    for mode in ["interval", "none"] {
        let flags = ["--engine", engine, "--durability", mode, "--flush-interval-ms", "200"];
        let (mut most, mut acked) = (0, 0);
        for _ in 0..runs {
            let (losses, finished) = crash_run_on(&flags, Stop::Kill9, legacy).await;
            assert_killed(&finished);
            println!("  DOCUMENTED ({engine}, {mode}, kill -9): {}", losses.summary());
            losses.assert_within(mode);
            most = most.max(losses.writes_lost_min());
            acked += losses.registers_acked + losses.set_adds_acked;
        }
        println!(
            "  MEASURED ({engine}, {mode}, kill -9, {runs} runs): at most {most} acknowledged \
             writes lost in a run ({acked} register writes and set adds acknowledged in all)"
        );
        let (losses, finished) = crash_run_on(&flags, Stop::Terminate, legacy).await;
        assert_stopped_gracefully(&finished);
        assert!(losses.is_none(), "{engine} {mode}: lost on SIGTERM: {losses:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_loses_no_acknowledged_write_on_kill_9_under_sync_nor_on_sigterm() {
    engine_crash_runs("fjall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_loses_no_acknowledged_write_on_kill_9_under_sync_nor_on_sigterm() {
    engine_crash_runs("redb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_on_an_old_store_loses_no_acknowledged_write_on_kill_9_under_sync_nor_on_sigterm() {
    engine_crash_runs("sled").await;
}

#[test]
fn the_node_id_survives_kill_9_and_graceful_restarts() {
    let mut server = ServerProcess::start(&[]);
    let id = server.node_id();
    let file = std::fs::read_to_string(server.data_dir().join("node-id")).expect("a node-id file");
    assert_eq!(file.trim(), id, "the id served is the id stored");
    server.kill9();
    server.restart();
    assert_eq!(server.node_id(), id, "after kill -9");
    assert_stopped_gracefully(&server.terminate());
    server.restart();
    assert_eq!(server.node_id(), id, "after SIGTERM");
}

#[test]
fn a_wiped_data_dir_starts_a_new_node_with_a_new_id_and_no_data() {
    let mut server = ServerProcess::start(&[]);
    let id = server.node_id();
    let put = process::run(&["put", "k", "v", "--url", &server.url()]);
    put.assert_success();
    assert_stopped_gracefully(&server.terminate());
    std::fs::remove_dir_all(server.data_dir()).expect("the data directory is removed");
    server.restart();
    assert_ne!(server.node_id(), id, "a wiped directory must not reuse the old identity");
    let get = process::run(&["get", "k", "--url", &server.url()]);
    get.assert_failure();
    assert!(get.stderr.contains("not_found"), "{get:#?}");
}

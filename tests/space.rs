//! Disk space, per disk engine:
//!
//! - overwrites and deletes free their space: 300 overwrites of one 1 MiB
//!   value leave the store directory under [`overwrite_bound_bytes`] (three
//!   times the live value plus the engine's constant), and after a delete and
//!   the engine's own background work (waited for under a deadline) under the
//!   engine's constant ([`engine_constant_bytes`]);
//! - a node's soak of register overwrites and set adds (through the delta
//!   log) keeps the store directory under three times its live bytes plus the
//!   engine's constant, once the engine's own compaction has run (waited for
//!   under a deadline), and again after a reopen; live bytes are
//!   `Node::live_bytes`, the rows the node keeps for its keys (bases, log rows,
//!   digest entries; keys and values), checked against the values written;
//! - a full disk is an ordinary error, on a real small file system (a tmpfs,
//!   mounted by the test; it needs root, and says so and skips without it):
//!   writes are refused with `StoreError::InsufficientStorage` and change
//!   nothing, reads keep working, writes are accepted again once space is
//!   freed, and every acknowledged write is there after a reopen;
//! - past the reserve (another process filled the disk), the engine's own
//!   ENOSPC is the same `InsufficientStorage`: the batch is not there, and the
//!   store reopens its engine and takes writes again once space is freed.
//!
//! `cargo test --test space -- --nocapture` prints the sizes measured.
#![cfg(unix)]

use calmkv::store::{self, Batch, Durability, Engine, StoreError};
use calmkv::{Action, CrdtOp, Key, Limits, Node, Op, SetOp};
use calmkv_crdts::NodeId;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tmpfs::{available_bytes, write_ballast, Tmpfs, MIB};

mod tmpfs;

/// One value of the overwrite test.
const VALUE_BYTES: usize = 1 << 20;

/// Overwrites of the one key.
const OVERWRITES: usize = 300;

/// What an engine may occupy beyond its live data, whatever was written before.
///
/// - fjall: its journal file, preallocated to 64 MiB and filled before it is
///   replaced (the old one is deleted once the memtables it covers are
///   written out), plus a memtable's worth (8 MiB) of level-0 tables not yet
///   compacted: 64 + 3 × 8 MiB.
/// - redb: its file grows by regions and reuses freed pages: 8 MiB.
/// - sled: its segments and blob files: 32 MiB (sled 0.34.7 does not keep it).
fn engine_constant_bytes(engine: Engine) -> u64 {
    match engine {
        Engine::Fjall => 88 * MIB,
        Engine::Redb => 8 * MIB,
        Engine::Sled => 32 * MIB,
    }
}

/// How long the engine's background work (fjall's flushes and compactions) may
/// take to bring the size under the bound.
const SETTLE_DEADLINE: Duration = Duration::from_secs(10);

/// The bound after the overwrites: three times the live value, plus the engine's
/// constant.
fn overwrite_bound_bytes(engine: Engine) -> u64 {
    3 * VALUE_BYTES as u64 + engine_constant_bytes(engine)
}

/// Blocks allocated under `dir`, in bytes (files that vanish meanwhile count 0).
fn allocated_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(next) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else { continue };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else { continue };
            total += metadata.blocks() * 512;
            if metadata.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    total
}

/// Every file under `dir` with its allocated size, for a failure message.
fn listing(dir: &Path) -> String {
    let mut lines = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(next) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else { continue };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else { continue };
            if metadata.is_dir() {
                todo.push(entry.path());
            } else {
                let path = entry.path();
                let name = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
                lines.push(format!("  {name}: {} KiB", metadata.blocks() / 2));
            }
        }
    }
    lines.sort();
    lines.join("\n")
}

/// Random (incompressible) bytes, the first eight being `stamp`.
fn random_value(bytes: usize, stamp: u64) -> Vec<u8> {
    use rand::RngCore;
    let mut value = vec![0; bytes];
    rand::rng().fill_bytes(&mut value);
    value[..8].copy_from_slice(&stamp.to_le_bytes());
    value
}

/// Waits until `dir` occupies at most `bound` bytes, or the deadline passes;
/// the last size seen.
fn settle(dir: &Path, bound: u64) -> u64 {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let size = allocated_bytes(dir);
        if size <= bound || Instant::now() >= deadline {
            return size;
        }
        std::thread::sleep(Duration::from_millis(100)); // polling a condition
    }
}

fn overwrites_and_a_delete_free_their_space(engine: Engine) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("store");
    if engine == Engine::Sled {
        drop(calmkv::store::SledStore::open(&dir, Durability::Sync).unwrap());
    }
    let store = store::open(Some(engine), &dir, Durability::Sync).unwrap();
    let mut value = Vec::new();
    for i in 0..OVERWRITES {
        value = random_value(VALUE_BYTES, i as u64);
        store.apply(Batch::new().put("big", value.clone())).unwrap();
    }
    let at_once = allocated_bytes(&dir);
    let overwritten = settle(&dir, overwrite_bound_bytes(engine));
    let files_overwritten = listing(&dir);
    assert_eq!(store.get(b"big").unwrap(), Some(value), "{engine}");
    store.apply(Batch::new().delete("big")).unwrap();
    let deleted = settle(&dir, engine_constant_bytes(engine));
    drop(store);
    let store = store::open(Some(engine), &dir, Durability::Sync).unwrap();
    let reopened = settle(&dir, engine_constant_bytes(engine));
    assert_eq!(store.get(b"big").unwrap(), None, "{engine}");
    println!(
        "{engine}: {OVERWRITES} overwrites of {} MiB: {:.1} MiB at once, {:.1} MiB settled; \
         after the delete {:.1} MiB, after a reopen {:.1} MiB (bounds {} MiB, then {} MiB)",
        VALUE_BYTES as u64 / MIB,
        at_once as f64 / MIB as f64,
        overwritten as f64 / MIB as f64,
        deleted as f64 / MIB as f64,
        reopened as f64 / MIB as f64,
        overwrite_bound_bytes(engine) / MIB,
        engine_constant_bytes(engine) / MIB,
    );
    assert!(
        overwritten <= overwrite_bound_bytes(engine),
        "{engine}: {overwritten} bytes:\n{files_overwritten}"
    );
    assert!(deleted <= engine_constant_bytes(engine), "{engine}: {deleted} bytes after the delete");
    assert!(
        reopened <= engine_constant_bytes(engine),
        "{engine}: {reopened} bytes after a reopen:\n{}",
        listing(&dir)
    );
}

#[test]
fn fjall_overwrites_and_a_delete_free_their_space() {
    overwrites_and_a_delete_free_their_space(Engine::Fjall);
}

#[test]
fn redb_overwrites_and_a_delete_free_their_space() {
    overwrites_and_a_delete_free_their_space(Engine::Redb);
}

/// sled 0.34.7 fails: 300 overwrites of 1 MiB leave about 301 MiB that
/// neither the delete nor a reopen frees (its segment cleaning rides on its own
/// flusher, which calmkv must keep off; docs/storage.md).
#[test]
#[ignore = "sled 0.34.7 keeps every overwritten value (about 301 MiB here); see docs/storage.md"]
fn sled_overwrites_and_a_delete_free_their_space() {
    overwrites_and_a_delete_free_their_space(Engine::Sled);
}

/// Registers of the soak, each overwritten [`SOAK_OVERWRITES`] times with a
/// value of [`SOAK_VALUE_BYTES`].
const SOAK_REGISTERS: usize = 4;
const SOAK_OVERWRITES: usize = 60;
const SOAK_VALUE_BYTES: usize = 512 << 10;
/// Sets of the soak, each given [`SOAK_SET_ADDS`] members one add at a time.
const SOAK_SETS: usize = 10;
const SOAK_SET_ADDS: usize = 300;

fn key(name: &str) -> Key {
    Key::new(name, &Limits::default()).unwrap()
}

fn soak_keeps_the_directory_within_three_times_the_live_bytes(engine: Engine) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("store");
    let open = || {
        let store = store::open(Some(engine), &dir, Durability::Sync).unwrap();
        Node::open(NodeId(1), Arc::from(store), Limits::default()).unwrap()
    };
    let node = open();
    // Random bytes made once per register; each overwrite changes its stamp.
    let mut last: Vec<Vec<u8>> =
        (0..SOAK_REGISTERS).map(|r| random_value(SOAK_VALUE_BYTES, r as u64)).collect();
    for round in 0..SOAK_OVERWRITES {
        for (r, value) in last.iter_mut().enumerate() {
            let k = key(&format!("reg/{r}"));
            value[..8].copy_from_slice(&((round * SOAK_REGISTERS + r) as u64).to_le_bytes());
            let context = node.read(&k).unwrap().map(|read| read.context);
            let put = Action::Put { value: value.clone().into(), context, if_absent: false };
            node.apply(&Op { key: k, action: put }).unwrap();
        }
        for s in 0..SOAK_SETS {
            for i in 0..SOAK_SET_ADDS / SOAK_OVERWRITES {
                let member = format!("member-{round:03}-{i}");
                let op = SetOp { add: vec![member], remove: vec![] };
                let k = key(&format!("set/{s}"));
                node.apply(&Op { key: k, action: Action::Crdt(CrdtOp::Set(op)) }).unwrap();
            }
        }
    }
    node.flush().unwrap();
    let live = node.live_bytes();
    let values = (SOAK_REGISTERS * SOAK_VALUE_BYTES) as u64;
    assert!(live >= values, "{engine}: {live} live bytes for {values} bytes of values");
    assert!(live < values + values / 8, "{engine}: {live} live bytes for {values} of values");
    let written = (SOAK_REGISTERS * SOAK_OVERWRITES * SOAK_VALUE_BYTES) as u64;
    let bound = 3 * live + engine_constant_bytes(engine);
    assert!(written > bound, "the soak writes past its bound");
    let at_once = allocated_bytes(&dir);
    let settled = settle(&dir, bound);
    let files = listing(&dir);
    for (r, value) in last.iter().enumerate() {
        let read = node.read(&key(&format!("reg/{r}"))).unwrap().unwrap();
        assert_eq!(read.values, [calmkv::TypedValue::Register(vec![value.clone().into()])]);
    }
    drop(node);
    let node = open();
    assert_eq!(node.live_bytes(), live, "{engine}: live bytes are exact after a reopen");
    let set = node.envelope(&key("set/0")).unwrap().value.set();
    assert_eq!(set.len(), SOAK_SET_ADDS);
    let reopened = settle(&dir, bound);
    println!(
        "{engine}: soak wrote {} MiB; live {:.1} MiB; directory {:.1} MiB at once, {:.1} MiB \
         settled, {:.1} MiB after a reopen (bound {:.1} MiB)",
        written / MIB,
        live as f64 / MIB as f64,
        at_once as f64 / MIB as f64,
        settled as f64 / MIB as f64,
        reopened as f64 / MIB as f64,
        bound as f64 / MIB as f64,
    );
    assert!(settled <= bound, "{engine}: {settled} bytes, bound {bound}:\n{files}");
    assert!(reopened <= bound, "{engine}: {reopened} bytes after a reopen:\n{}", listing(&dir));
}

#[test]
fn fjall_soak_stays_within_three_times_the_live_bytes() {
    soak_keeps_the_directory_within_three_times_the_live_bytes(Engine::Fjall);
}

#[test]
fn redb_soak_stays_within_three_times_the_live_bytes() {
    soak_keeps_the_directory_within_three_times_the_live_bytes(Engine::Redb);
}

/// The tmpfs's size.
const TMPFS_BYTES: u64 = 64 * MIB;

/// The reserve the store keeps in the full-disk test: above fjall's memtable
/// (8 MiB), which its background flush writes out while the journal still holds
/// it.
const RESERVE_BYTES: u64 = 16 * MIB;

/// Free space left for the store by the ballast, beyond the reserve.
const ROOM_BYTES: u64 = 12 * MIB;

/// One value of the full-disk test.
const FULL_VALUE_BYTES: usize = 64 << 10;

fn a_full_disk_refuses_writes_and_recovers(engine: Engine) {
    let tmpfs = match Tmpfs::mount(TMPFS_BYTES) {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("SKIPPED {engine} full-disk test: {reason} (it needs root)");
            return;
        }
    };
    let dir = tmpfs.path().join("store");
    let ballast: PathBuf = tmpfs.path().join("ballast");
    let open = || store::open_reserving(Some(engine), &dir, Durability::Sync, RESERVE_BYTES);
    if engine == Engine::Sled {
        // sled makes no new stores: one as calmkv made them before markers.
        drop(calmkv::store::SledStore::open(&dir, Durability::Sync).unwrap());
    }
    let store = open().unwrap();
    let free = available_bytes(tmpfs.path());
    write_ballast(&ballast, free - RESERVE_BYTES - ROOM_BYTES);

    // Write until refused.
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let writes_max = (ROOM_BYTES as usize / FULL_VALUE_BYTES) * 4;
    let refusal = loop {
        assert!(acked.len() < writes_max, "{engine}: {writes_max} writes and no refusal");
        let key = format!("k/{:05}", acked.len());
        let value = random_value(FULL_VALUE_BYTES, acked.len() as u64);
        match store.apply(Batch::new().put(key.clone(), value.clone())) {
            Ok(()) => acked.push((key, value)),
            Err(error) => break (key, error),
        }
    };
    let (refused_key, error) = refusal;
    assert!(
        matches!(error, StoreError::InsufficientStorage { .. }),
        "{engine}: after {} writes: {error}",
        acked.len()
    );
    println!("{engine}: refused after {} writes of 64 KiB: {error}", acked.len());
    assert_eq!(store.get(refused_key.as_bytes()).unwrap(), None, "{engine}: refused, yet stored");
    // As large again: refused the same way, unless the engine freed space
    // meanwhile (fjall drops a journal once its memtables are written out);
    // then it is acknowledged like any write.
    let mut refused_again = 0;
    for attempt in 0..3 {
        let (key, value) = (format!("again/{attempt}"), random_value(FULL_VALUE_BYTES, attempt));
        match store.apply(Batch::new().put(key.clone(), value.clone())) {
            Ok(()) => acked.push((key, value)),
            Err(StoreError::InsufficientStorage { .. }) => {
                refused_again += 1;
                assert_eq!(store.get(key.as_bytes()).unwrap(), None, "{engine}: {key} stored");
            }
            Err(other) => panic!("{engine}: {key}: {other}"),
        }
    }
    println!("{engine}: {refused_again} of 3 more writes of 64 KiB refused");
    // Reads keep working.
    for (key, value) in &acked {
        assert_eq!(store.get(key.as_bytes()).unwrap().as_ref(), Some(value), "{engine}: {key}");
    }
    let rows = store.scan_prefix(b"", None, usize::MAX).unwrap();
    assert_eq!(rows.len(), acked.len(), "{engine}: the refused writes left something behind");

    // Space freed: writes are accepted again, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    for i in 0..10 {
        let key = format!("after/{i}");
        let value = random_value(FULL_VALUE_BYTES, i);
        store.apply(Batch::new().put(key.clone(), value.clone())).unwrap();
        acked.push((key, value));
    }
    drop(store);

    let store = open().unwrap();
    for (key, value) in &acked {
        assert_eq!(store.get(key.as_bytes()).unwrap().as_ref(), Some(value), "{engine}: {key}");
    }
    assert_eq!(store.scan_prefix(b"", None, usize::MAX).unwrap().len(), acked.len());
    drop(store);
}

#[test]
fn fjall_refuses_writes_on_a_full_disk_and_recovers() {
    a_full_disk_refuses_writes_and_recovers(Engine::Fjall);
}

#[test]
fn redb_refuses_writes_on_a_full_disk_and_recovers() {
    a_full_disk_refuses_writes_and_recovers(Engine::Redb);
}

#[test]
fn sled_refuses_writes_on_a_full_disk_and_recovers() {
    a_full_disk_refuses_writes_and_recovers(Engine::Sled);
}

/// Keys of the batch the engine cannot write: many small keys, so that the
/// engine's own bytes (fjall's journal record per key, redb's pages) are well
/// above the keys' bytes that the reserve check counts.
const CROWD_KEYS: usize = 20_000;

fn crowd() -> (Batch, u64) {
    let mut batch = Batch::new();
    let mut bytes = 0;
    for i in 0..CROWD_KEYS {
        let key = format!("crowd/{i:06}");
        bytes += key.len() as u64;
        batch = batch.put(key, Vec::new());
    }
    (batch, bytes)
}

/// Another process fills the disk past the reserve (the reserve is 0 here):
/// the batch passes the free-space check, but the engine itself runs out of
/// space writing it. That is the same `InsufficientStorage`, the batch is not
/// there, reads go on, later writes are refused the same way (not an engine
/// error), and once the file is deleted the store reopens its engine and
/// takes writes again, without a restart; every acknowledged write survives a
/// reopen.
fn the_engine_out_of_space_is_insufficient_storage_and_recovers(engine: Engine) {
    let tmpfs = match Tmpfs::mount(TMPFS_BYTES) {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("SKIPPED {engine} engine-out-of-space test: {reason} (it needs root)");
            return;
        }
    };
    let dir = tmpfs.path().join("store");
    let open = || store::open_reserving(Some(engine), &dir, Durability::Sync, 0);
    if engine == Engine::Sled {
        // sled makes no new stores: one as calmkv made them before markers.
        drop(calmkv::store::SledStore::open(&dir, Durability::Sync).unwrap());
    }
    let store = open().unwrap();
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..5 {
        let (key, value) = (format!("k/{i}"), random_value(1024, i));
        store.apply(Batch::new().put(key.clone(), value.clone())).unwrap();
        acked.push((key, value));
    }
    let (batch, batch_bytes) = crowd();
    // Leave free just what the check counts, rounded up to a page.
    let ballast = tmpfs.path().join("ballast");
    let leave = batch_bytes.div_ceil(4096) * 4096;
    write_ballast(&ballast, available_bytes(tmpfs.path()) - leave);
    let free = available_bytes(tmpfs.path());
    assert!(free >= batch_bytes, "{engine}: the check would refuse the batch ({free} free)");

    let result = store.apply(batch.clone());
    assert!(
        matches!(result, Err(StoreError::InsufficientStorage { .. })),
        "{engine}: {free} bytes free, a batch of {batch_bytes}: {result:?}"
    );
    println!("{engine}: the engine ran out of space with {free} bytes free: {:?}", result.err());
    assert_eq!(store.scan_prefix(b"crowd/", None, 10).unwrap(), [], "{engine}: half a batch");
    for (key, value) in &acked {
        assert_eq!(store.get(key.as_bytes()).unwrap().as_ref(), Some(value), "{engine}: {key}");
    }
    for i in 0..3 {
        let result = store.apply(Batch::new().put(format!("full/{i}"), "v"));
        assert!(matches!(result, Err(StoreError::InsufficientStorage { .. })), "{result:?}");
    }

    // The other process's file goes: writes are accepted again, no restart.
    std::fs::remove_file(&ballast).unwrap();
    let (key, value) = ("after/0".to_string(), random_value(1024, 99));
    store.apply(Batch::new().put(key.clone(), value.clone())).unwrap();
    acked.push((key, value));
    assert_eq!(store.scan_prefix(b"crowd/", None, 10).unwrap(), [], "{engine}: recovered half");
    assert_eq!(store.get(b"full/0").unwrap(), None, "{engine}");
    store.apply(batch).unwrap();
    for (key, value) in &acked {
        assert_eq!(store.get(key.as_bytes()).unwrap().as_ref(), Some(value), "{engine}: {key}");
    }
    drop(store);

    let store = open().unwrap();
    for (key, value) in &acked {
        assert_eq!(store.get(key.as_bytes()).unwrap().as_ref(), Some(value), "{engine}: {key}");
    }
    let crowd_rows = store.scan_prefix(b"crowd/", None, usize::MAX).unwrap();
    assert_eq!(crowd_rows.len(), CROWD_KEYS, "{engine}: the batch written after the recovery");
}

#[test]
fn fjall_out_of_space_past_the_reserve_is_insufficient_storage_and_recovers() {
    the_engine_out_of_space_is_insufficient_storage_and_recovers(Engine::Fjall);
}

#[test]
fn redb_out_of_space_past_the_reserve_is_insufficient_storage_and_recovers() {
    the_engine_out_of_space_is_insufficient_storage_and_recovers(Engine::Redb);
}

/// sled 0.34.7 fails: after its own ENOSPC part of the failed batch is
/// visible (10 of 20,000 keys seen), and opened again at once it reports
/// `Corruption`. The store does not reopen it: its writes stay refused until a
/// restart, its reads go on.
#[test]
#[ignore = "sled 0.34.7 shows part of a batch that hit ENOSPC, and reports Corruption when reopened; see docs/storage.md"]
fn sled_out_of_space_past_the_reserve_is_insufficient_storage_and_recovers() {
    the_engine_out_of_space_is_insufficient_storage_and_recovers(Engine::Sled);
}

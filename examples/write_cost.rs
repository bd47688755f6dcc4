//! What one set add (and one map field add) costs in bytes written, at n = 10,
//! 1,000 and 100,000 members, for the delta-log layout and for the
//! whole-envelope layout it replaced.
//!
//! - `logical`: bytes handed to the engine per add (keys and values of puts,
//!   keys of deletes), counted by a `CountingStore` around the store.
//! - `disk`: bytes the process wrote to the device per add (`write_bytes` of
//!   `/proc/self/io`, the engine's background work included), on the default
//!   engine (fjall) under `none`, with a flush at the end of each run.
//!
//! The whole-envelope rows are what that layout wrote for the same adds: the
//! key's whole envelope and an 8-byte digest entry, put on the same engine.
//!
//! Bounded: about 30 s in a release build (`cargo run --release --example
//! write_cost`). It measures only on a quiet machine: with a 1-minute load
//! average of [`LOAD_MAX`] or more it says so and stops (`--force` runs it
//! anyway). A run covers whole fold cycles where they are short (n = 10,
//! 1,000); at n = 100,000 a fold comes once every several thousand adds, so the
//! run measures a window of adds and adds the fold's amortised share, computed
//! from the fold rule (the base once per `base / 4` bytes of deltas), and says so.

use calmkv::node::LOG_SHARE_OF_BASE_INV;
use calmkv::replication::digest::{bucket_of, entry_hash};
use calmkv::store::{self, Batch, CountingStore, Durability, Engine, Store, WriteCounts};
use calmkv::{Action, CounterOp, CrdtOp, Envelope, Key, Limits, MapOp, Node, Op, SetOp};
use calmkv_crdts::{encode, NodeId};
use std::sync::Arc;
use std::time::Instant;

/// The 1-minute load average above which the numbers would be other
/// processes' as much as calmkv's.
const LOAD_MAX: f64 = 1.5;

/// Members added at once while building the key.
const BUILD_CHUNK: usize = 1000;

fn key(name: &str) -> Key {
    Key::new(name, &Limits::default()).expect("a valid key")
}

fn set_add(name: &str, members: impl IntoIterator<Item = String>) -> Op {
    let op = SetOp { add: members.into_iter().collect(), remove: vec![] };
    Op { key: key(name), action: Action::Crdt(CrdtOp::Set(op)) }
}

fn field_add(name: &str, fields: impl IntoIterator<Item = String>) -> Op {
    let update = fields.into_iter().map(|f| (f, CrdtOp::Counter(CounterOp::Incr(1)))).collect();
    Op { key: key(name), action: Action::Crdt(CrdtOp::Map(MapOp { update, remove: vec![] })) }
}

/// Bytes this process has written to the storage layer so far.
fn disk_write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
enum Kind {
    Set,
    Map,
}

impl Kind {
    fn op(self, items: impl IntoIterator<Item = String>) -> Op {
        match self {
            Kind::Set => set_add("k", items),
            Kind::Map => field_add("k", items),
        }
    }
}

/// One measured run: the per-add numbers.
struct Run {
    logical: f64,
    disk: f64,
    adds: u64,
    note: &'static str,
}

fn open_store(dir: &std::path::Path) -> Arc<CountingStore<Box<dyn Store>>> {
    let store = store::open(Some(Engine::Fjall), dir, Durability::None).expect("a store");
    Arc::new(CountingStore::new(store))
}

/// Builds a key of `n` items, then measures `adds` single-item adds (more, up
/// to `adds_max`, until two folds happened when `whole_cycles`).
fn delta_log_run(kind: Kind, n: usize, adds: usize, whole_cycles: bool) -> Run {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = open_store(dir.path());
    let node = Node::open(NodeId(1), store.clone(), limits()).expect("a node");
    build(&node, kind, n);
    store.flush().expect("flush");
    let mut next = n;
    let mut add = |node: &Node| {
        node.apply(&kind.op([format!("item-{next:07}")])).expect("an add");
        next += 1;
    };
    if whole_cycles {
        // Start right after a fold, end right after the second one.
        until_fold(&node, &store, &mut add);
    }
    let (counts, disk) = (store.counts(), disk_write_bytes());
    let mut done = 0u64;
    if whole_cycles {
        for _ in 0..2 {
            done += until_fold(&node, &store, &mut add);
        }
    } else {
        for _ in 0..adds {
            add(&node);
            done += 1;
        }
    }
    store.flush().expect("flush");
    let logical = store.counts().since(counts);
    let disk = disk_write_bytes() - disk;
    let mut run = Run {
        logical: logical.bytes() as f64 / done as f64,
        disk: disk as f64 / done as f64,
        adds: done,
        note: "two whole fold cycles",
    };
    if !whole_cycles {
        // The fold's share: the base once per (base / 4) bytes of deltas.
        let base = encode(&node.envelope(&key("k")).expect("a read")).expect("encodes").len();
        let delta_bytes = (logical.put_bytes as f64 / done as f64).max(1.0);
        let adds_per_fold = base as f64 / LOG_SHARE_OF_BASE_INV as f64 / delta_bytes;
        run.logical += base as f64 / adds_per_fold;
        run.note = "window without a fold + the fold's computed share";
    }
    run
}

/// Adds until a write folds (a batch with deletes); the number of adds.
fn until_fold(
    node: &Node,
    store: &CountingStore<Box<dyn Store>>,
    add: &mut impl FnMut(&Node),
) -> u64 {
    for done in 1..=1_000_000u64 {
        let before: WriteCounts = store.counts();
        add(node);
        if store.counts().since(before).delete_bytes > 0 {
            return done;
        }
    }
    panic!("no fold in a million adds");
}

fn build(node: &Node, kind: Kind, n: usize) {
    for start in (0..n).step_by(BUILD_CHUNK) {
        let end = (start + BUILD_CHUNK).min(n);
        node.apply(&kind.op((start..end).map(|i| format!("item-{i:07}")))).expect("a build");
    }
}

/// The whole-envelope layout: every add rewrote the key's envelope and its
/// 8-byte digest entry. The states come from a node over memory; the rows go
/// to a fresh fjall store.
/// The default limits, with room for a set (or map) of 100,000 members to
/// take its adds: the default caps a set at exactly 100,000 members.
fn limits() -> Limits {
    Limits { members_max: 200_000, ..Limits::default() }
}

fn whole_envelope_run(kind: Kind, n: usize, adds: usize) -> Run {
    let states = Node::open(NodeId(1), Arc::new(calmkv::store::MemoryStore::new()), limits())
        .expect("a node");
    build(&states, kind, n);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = open_store(dir.path());
    let write = |state: &Envelope| {
        let bytes = encode(state).expect("encodes");
        let hash = entry_hash("k", &bytes);
        let index = [&b"h/"[..], &bucket_of("k").to_be_bytes(), b"k"].concat();
        store.apply(Batch::new().put("d/k", bytes).put(index, hash.to_le_bytes().to_vec()))
    };
    write(&states.envelope(&key("k")).expect("a read")).expect("a write");
    store.flush().expect("flush");
    let (counts, disk) = (store.counts(), disk_write_bytes());
    for i in 0..adds {
        let applied = states.apply(&kind.op([format!("item-{:07}", n + i)])).expect("an add");
        write(&applied.state).expect("a write");
    }
    store.flush().expect("flush");
    let logical = store.counts().since(counts);
    Run {
        logical: logical.bytes() as f64 / adds as f64,
        disk: (disk_write_bytes() - disk) as f64 / adds as f64,
        adds: adds as u64,
        note: "",
    }
}

fn main() {
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0);
    if load >= LOAD_MAX && !std::env::args().any(|a| a == "--force") {
        println!("load average {load} >= {LOAD_MAX}: not measuring (--force to run anyway)");
        return;
    }
    let started = Instant::now();
    println!("| add | n | layout | logical B/add | disk B/add | adds | how |");
    println!("|---|--:|---|--:|--:|--:|---|");
    for (kind, name) in [(Kind::Set, "set member"), (Kind::Map, "map field")] {
        for (n, whole_cycles, before_adds, after_adds) in
            [(10, true, 200, 0), (1_000, true, 200, 0), (100_000, false, 20, 300)]
        {
            let before = whole_envelope_run(kind, n, before_adds);
            let after = delta_log_run(kind, n, after_adds, whole_cycles);
            for (layout, run) in [("whole envelope", before), ("delta log", after)] {
                println!(
                    "| {name} | {n} | {layout} | {:.0} | {:.0} | {} | {} |",
                    run.logical, run.disk, run.adds, run.note
                );
            }
        }
    }
    println!("({:.1} s)", started.elapsed().as_secs_f64());
}

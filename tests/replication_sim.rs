//! Simulated clusters at the node level: several nodes (in-memory stores) take
//! client writes while a seeded nemesis drops, duplicates, reorders and
//! partitions the messages between them (deltas and anti-entropy alike) and
//! restarts nodes. After healing and a quiet period of anti-entropy rounds, every
//! node must hold identical state (equal digests and equal envelopes), and no
//! acknowledged write may be lost.
//!
//! Seeds are printed; replay one with `CALMKV_SIM_SEED=<seed>`, run more with
//! `CALMKV_SIM_SEEDS=<count>` (default 24).

use calmkv::replication::anti_entropy::{self, AntiEntropy};
use calmkv::store::{MemoryStore, Store};
use calmkv::{
    Action, Config, CounterOp, CrdtOp, Envelope, Key, Limits, Node, Op, SetOp, TypedValue,
};
use calmkv_crdts::{decode, encode, NodeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const KEYS: usize = 12;
const STEPS: usize = 600;
const QUIET_ROUNDS_MAX: usize = 400;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Message {
    Deltas(Vec<(String, Envelope)>),
    AntiEntropy(AntiEntropy),
}

struct SimNode {
    id: NodeId,
    store: Arc<MemoryStore>,
    node: Node,
}

impl SimNode {
    fn new(id: u64) -> SimNode {
        let store = Arc::new(MemoryStore::new());
        let node = Node::open(NodeId(id), store.clone(), Limits::default()).unwrap();
        SimNode { id: NodeId(id), store, node }
    }

    /// A restart: the store survives (as a durable store would), the node and its
    /// in-memory digest are rebuilt.
    fn restart(&mut self) {
        let store: Arc<dyn Store> = self.store.clone();
        self.node = Node::open(self.id, store, Limits::default()).unwrap();
    }
}

/// What clients were told succeeded.
#[derive(Default)]
struct Acknowledged {
    counter: BTreeMap<usize, i128>,
    added: BTreeMap<usize, BTreeSet<String>>,
    removed: BTreeMap<usize, BTreeSet<String>>,
    written: BTreeMap<usize, BTreeSet<Vec<u8>>>,
}

struct Sim {
    rng: StdRng,
    nodes: Vec<SimNode>,
    in_flight: Vec<(usize, usize, Vec<u8>)>,
    /// `side[i]`: which side of the partition node `i` is on.
    side: Vec<bool>,
    acked: Acknowledged,
    faults: bool,
}

fn key_name(k: usize) -> String {
    format!("{}/{k}", ["counter", "set", "register"][k % 3])
}

fn key(k: usize) -> Key {
    Key::new(key_name(k), &Limits::default()).unwrap()
}

impl Sim {
    fn send(&mut self, from: usize, to: usize, message: &Message) {
        self.in_flight.push((from, to, encode(message).unwrap()));
    }

    fn client_write(&mut self, at: usize) {
        let k = self.rng.random_range(0..KEYS);
        let action = match k % 3 {
            0 if self.rng.random_bool(0.7) => {
                Action::Crdt(CrdtOp::Counter(CounterOp::Incr(self.rng.random_range(1..10))))
            }
            0 => Action::Crdt(CrdtOp::Counter(CounterOp::Decr(self.rng.random_range(1..5)))),
            1 => {
                let member = format!("m{}", self.rng.random_range(0..6));
                if self.rng.random_bool(0.7) {
                    Action::Crdt(CrdtOp::Set(SetOp { add: vec![member], remove: vec![] }))
                } else {
                    Action::Crdt(CrdtOp::Set(SetOp { add: vec![], remove: vec![member] }))
                }
            }
            _ => {
                let context = self.nodes[at].node.read(&key(k)).unwrap().map(|r| r.context);
                let value = format!("v{}", self.rng.random::<u32>()).into_bytes();
                Action::Put { value: value.into(), context, if_absent: false }
            }
        };
        let applied =
            self.nodes[at].node.apply(&Op { key: key(k), action: action.clone() }).unwrap();
        match action {
            Action::Crdt(CrdtOp::Counter(CounterOp::Incr(n))) => {
                *self.acked.counter.entry(k).or_default() += i128::from(n)
            }
            Action::Crdt(CrdtOp::Counter(CounterOp::Decr(n))) => {
                *self.acked.counter.entry(k).or_default() -= i128::from(n)
            }
            Action::Crdt(CrdtOp::Set(op)) => {
                self.acked.added.entry(k).or_default().extend(op.add);
                self.acked.removed.entry(k).or_default().extend(op.remove);
            }
            Action::Put { value, .. } => {
                self.acked.written.entry(k).or_default().insert(value.to_vec());
            }
            _ => unreachable!(),
        }
        let message = Message::Deltas(vec![(key_name(k), applied.delta)]);
        for to in (0..self.nodes.len()).filter(|&to| to != at) {
            self.send(at, to, &message);
        }
    }

    fn deliver(&mut self, index: usize) {
        let duplicate = self.faults && self.rng.random_bool(0.1);
        let (from, to, bytes) = if duplicate {
            self.in_flight[index].clone()
        } else {
            self.in_flight.swap_remove(index)
        };
        if self.faults && (self.side[from] != self.side[to] || self.rng.random_bool(0.1)) {
            return; // partitioned or lost
        }
        let node = &self.nodes[to].node;
        match decode::<Message>(&bytes).unwrap() {
            Message::Deltas(deltas) => {
                for (k, delta) in deltas {
                    node.merge(&Key::new(k, &Limits::default()).unwrap(), &delta).unwrap();
                }
            }
            Message::AntiEntropy(message) => {
                let (reply, _) = anti_entropy::handle(node, &message).unwrap();
                if let Some(reply) = reply {
                    self.send(to, from, &Message::AntiEntropy(reply));
                }
            }
        }
    }

    fn start_anti_entropy(&mut self, from: usize, to: usize) {
        let message = Message::AntiEntropy(anti_entropy::start(&self.nodes[from].node));
        self.send(from, to, &message);
    }

    fn converged(&self) -> bool {
        let first = self.nodes[0].node.digest().top();
        self.nodes.iter().all(|n| n.node.digest().top() == first)
    }

    fn run(&mut self) {
        let n = self.nodes.len();
        for _ in 0..STEPS {
            match self.rng.random_range(0..100) {
                0..35 => {
                    let at = self.rng.random_range(0..n);
                    self.client_write(at);
                }
                35..85 if !self.in_flight.is_empty() => {
                    // Any message in flight, not the oldest: reordering.
                    let index = self.rng.random_range(0..self.in_flight.len());
                    self.deliver(index);
                }
                85..93 => {
                    let (a, b) = (self.rng.random_range(0..n), self.rng.random_range(0..n));
                    if a != b {
                        self.start_anti_entropy(a, b);
                    }
                }
                93..97 => {
                    for side in self.side.iter_mut() {
                        *side = self.rng.random_bool(0.5);
                    }
                }
                97..99 => self.side.iter_mut().for_each(|s| *s = false),
                _ => {
                    let at = self.rng.random_range(0..n);
                    self.nodes[at].restart();
                    self.in_flight.retain(|(_, to, _)| *to != at); // its inbox is lost
                }
            }
        }
        // Heal, let everything in flight arrive, then anti-entropy until quiet.
        self.faults = false;
        while !self.in_flight.is_empty() {
            let index = self.rng.random_range(0..self.in_flight.len());
            self.deliver(index);
        }
        for round in 0..QUIET_ROUNDS_MAX {
            if self.converged() {
                return;
            }
            let (a, b) = (round % n, (round / n + round + 1) % n);
            if a != b {
                self.start_anti_entropy(a, b);
                while let Some(index) = (!self.in_flight.is_empty()).then_some(0) {
                    self.deliver(index);
                }
            }
        }
    }

    fn check(&self) {
        assert!(
            self.converged(),
            "digests differ after {QUIET_ROUNDS_MAX} quiet anti-entropy rounds"
        );
        let reference = &self.nodes[0].node;
        for k in 0..KEYS {
            let expected = reference.envelope(&key(k)).unwrap();
            for other in &self.nodes[1..] {
                assert_eq!(other.node.envelope(&key(k)).unwrap(), expected, "key {}", key_name(k));
            }
            let values = reference.read(&key(k)).unwrap().map(|r| r.values).unwrap_or_default();
            match k % 3 {
                0 => {
                    let expected = self.acked.counter.get(&k).copied();
                    let actual = values.iter().find_map(|v| match v {
                        TypedValue::Counter(c) => Some(*c),
                        _ => None,
                    });
                    assert_eq!(
                        actual, expected,
                        "counter {k}: every acknowledged update, nothing else"
                    );
                }
                1 => {
                    let members: BTreeSet<String> = values
                        .iter()
                        .find_map(|v| match v {
                            TypedValue::Set(m) => Some(m.iter().cloned().collect()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    let added = self.acked.added.get(&k).cloned().unwrap_or_default();
                    let removed = self.acked.removed.get(&k).cloned().unwrap_or_default();
                    assert!(
                        members.is_subset(&added),
                        "set {k}: {members:?} has members never added"
                    );
                    for never_removed in added.difference(&removed) {
                        assert!(members.contains(never_removed), "set {k} lost {never_removed}");
                    }
                }
                _ => {
                    let written = self.acked.written.get(&k).cloned().unwrap_or_default();
                    for value in values.iter().flat_map(|v| match v {
                        TypedValue::Register(vs) => vs.clone(),
                        _ => vec![],
                    }) {
                        assert!(
                            written.contains(value.as_ref()),
                            "register {k} holds a value never written"
                        );
                    }
                    assert_eq!(
                        values.is_empty(),
                        written.is_empty(),
                        "register {k}: written values vanished"
                    );
                }
            }
        }
    }
}

fn simulate(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(3..=5);
    let nodes = (0..n).map(|i| SimNode::new(i as u64 + 1)).collect();
    let mut sim = Sim {
        rng,
        nodes,
        in_flight: Vec::new(),
        side: vec![false; n],
        acked: Acknowledged::default(),
        faults: true,
    };
    sim.run();
    sim.check();
}

#[test]
fn clusters_converge_without_losing_acknowledged_writes_under_faults() {
    let seeds: Vec<u64> = match std::env::var("CALMKV_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("CALMKV_SIM_SEED is a number")],
        Err(_) => {
            let count =
                std::env::var("CALMKV_SIM_SEEDS").ok().and_then(|c| c.parse().ok()).unwrap_or(24);
            let base: u64 = rand::random();
            (0..count).map(|i| base.wrapping_add(i)).collect()
        }
    };
    for seed in seeds {
        eprintln!("simulating seed {seed} (replay: CALMKV_SIM_SEED={seed})");
        let outcome = std::panic::catch_unwind(|| simulate(seed));
        if let Err(panic) = outcome {
            eprintln!("FAILED seed {seed}: replay with CALMKV_SIM_SEED={seed}");
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn a_config_opened_node_rebuilds_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { durability: calmkv::store::Durability::None, ..Config::new(dir.path()) };
    let top = {
        let node = config.open_node().unwrap();
        for k in 0..50 {
            let op = CrdtOp::Set(SetOp { add: vec![format!("x{k}")], remove: vec![] });
            node.apply(&Op { key: key(k), action: Action::Crdt(op) }).unwrap();
        }
        node.digest().top()
    };
    assert_eq!(config.open_node().unwrap().digest().top(), top);
}

//! Nodes over a hostile network and failing disks: several nodes take client
//! writes and reads of every key type while a seeded nemesis partitions the
//! network (symmetric, one-way, bridge), loses, duplicates and reorders
//! messages (deltas and anti-entropy alike), skews and jumps the nodes'
//! clocks (a simulated clock, so a seed replays exactly), fails disk writes and fsyncs
//! (`store::FaultyStore` over an in-memory store, `sync` durability), and
//! crashes and restarts nodes, dropping whatever was not flushed. A write the
//! disk refused is a failed operation; a write whose fsync failed is
//! indeterminate (applied, visible, not durable: a crash may take it back,
//! anti-entropy may have spread it first). Every client
//! operation goes into a per-key [`History`]; after healing, anti-entropy (the
//! real message handlers, over the same simulated network) runs until every
//! digest agrees, and the checkers judge the histories against the settled
//! states.

use crate::checkers::counter::{self, CounterOp, CounterRet};
use crate::checkers::register::{self, LwwOp, LwwRet, MvOp, MvRet};
use crate::checkers::set::{self, SetOp, SetRet};
use crate::checkers::{convergence, History, Outcome};
use calmkv::node::WallClock;
use calmkv::replication::anti_entropy::{self, AntiEntropy};
use calmkv::store::{Durability, FaultRates, FaultyStore, MemoryStore, Store};
use calmkv::{
    Action, CounterOp as Counter, CrdtOp, Envelope, Key, Limits, Node, NodeError, Op, SetOp as Set,
};
use calmkv::{ReadResult, TypedValue};
use calmkv_crdts::{decode, encode, NodeId, Stamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// Keys, four of each type (counter, set, multi-value and LWW register).
pub const KEYS: usize = 16;
/// Steps of one run before healing.
pub const STEPS: usize = 800;
/// Anti-entropy rounds allowed after healing before the run fails.
pub const QUIET_ROUNDS_MAX: usize = 600;
const MEMBERS: usize = 8;

/// What one run did, for the soak's summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Client operations recorded and checked.
    pub operations: u64,
    /// Messages sent.
    pub messages: u64,
    /// Messages lost, or dropped by a partition.
    pub dropped: u64,
    /// Messages delivered twice.
    pub duplicated: u64,
    /// Partitions started (symmetric, one-way or bridge).
    pub partitions: u64,
    /// Node crashes and restarts.
    pub restarts: u64,
    /// Clock skews and jumps.
    pub clock_faults: u64,
    /// Disk faults injected (failed writes, full disks, failed fsyncs).
    pub disk_faults: u64,
    /// Client writes that ended indeterminate (a failed fsync).
    pub indeterminate: u64,
    /// Anti-entropy rounds it took to converge after healing.
    pub quiet_rounds: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Message {
    Deltas(Vec<(String, Envelope)>),
    AntiEntropy(AntiEntropy),
}

/// How often the disks fail: writes refused (an I/O error, a full disk),
/// changing nothing.
pub const DISK_FAULTS: FaultRates =
    FaultRates { write_error: 0.01, no_space: 0.01, flush_error: 0.0 };

/// [`DISK_FAULTS`] with failing fsyncs too (0.4% of them): a write whose
/// fsync failed stays visible, anti-entropy may spread it, and the crash
/// takes it back; the restarted node must not mint its dot again.
pub const DISK_FAULTS_WITH_FSYNC: FaultRates =
    FaultRates { write_error: 0.01, no_space: 0.01, flush_error: 0.004 };

/// The simulation's time, in milliseconds since the epoch; every step moves
/// it on. Each node reads it through its own skew.
const START_MS: u64 = 1_800_000_000_000;

struct SimNode {
    id: NodeId,
    store: Arc<FaultyStore>,
    /// This node's clock error, in milliseconds (skew, and jumps either way).
    skew_ms: Arc<AtomicI64>,
    time_ms: Arc<AtomicU64>,
    node: Node,
}

impl SimNode {
    fn new(id: u64, seed: u64, faults: FaultRates, time_ms: &Arc<AtomicU64>) -> SimNode {
        let memory = Box::new(MemoryStore::new());
        let store =
            Arc::new(FaultyStore::new(memory, Durability::Sync).with_rates(seed ^ id, faults));
        let mut sim_node = SimNode {
            id: NodeId(id),
            store,
            skew_ms: Arc::new(AtomicI64::new(0)),
            time_ms: time_ms.clone(),
            node: Node::open(NodeId(id), Arc::new(MemoryStore::new()), Limits::default()).unwrap(),
        };
        sim_node.node = sim_node.open().unwrap();
        sim_node
    }

    /// The node over this store, reading the simulated clock through its skew.
    fn open(&self) -> Result<Node, String> {
        let store: Arc<dyn Store> = self.store.clone();
        let (skew, time) = (self.skew_ms.clone(), self.time_ms.clone());
        let clock: WallClock = Arc::new(move || {
            time.load(Ordering::Relaxed).saturating_add_signed(skew.load(Ordering::Relaxed))
        });
        // Opening writes the node's actor row, which a failing disk may
        // refuse: a node that cannot start tries again, as an operator would.
        let mut attempts = 0;
        let node = loop {
            match Node::open(self.id, store.clone(), Limits::default()) {
                Ok(node) => break node,
                Err(NodeError::Store { .. }) if attempts < 100 => {
                    attempts += 1;
                    self.store.crash().map_err(|e| failed("crash", e))?;
                }
                Err(e) => return Err(failed("open", e)),
            }
        };
        Ok(node.with_wall_clock(clock))
    }

    /// A crash and restart: what was not flushed is gone (under `sync` only a
    /// write whose fsync failed), the node and its in-memory digest are
    /// rebuilt from the store.
    /// Whether the crash took anything back.
    fn restart(&mut self) -> Result<bool, String> {
        let report = self.store.crash().map_err(|e| failed("crash", e))?;
        // Dropping the old node is a crash: it does not mark its actor clean.
        self.node = self.open()?;
        Ok(report.batches_lost > 0)
    }
}

/// One key's history, by its type.
enum KeyHistory {
    Counter(History<CounterOp, CounterRet>),
    Set(History<SetOp, SetRet>),
    Mv(History<MvOp, MvRet>),
    Lww(History<LwwOp, LwwRet<Stamp>>),
}

impl KeyHistory {
    fn for_key(k: usize) -> KeyHistory {
        match k % 4 {
            0 => KeyHistory::Counter(History::new()),
            1 => KeyHistory::Set(History::new()),
            2 => KeyHistory::Mv(History::new()),
            _ => KeyHistory::Lww(History::new()),
        }
    }

    fn crash(&mut self, process: usize) {
        match self {
            KeyHistory::Counter(h) => h.crash(process),
            KeyHistory::Set(h) => h.crash(process),
            KeyHistory::Mv(h) => h.crash(process),
            KeyHistory::Lww(h) => h.crash(process),
        }
    }

    fn len(&self) -> usize {
        match self {
            KeyHistory::Counter(h) => h.len(),
            KeyHistory::Set(h) => h.len(),
            KeyHistory::Mv(h) => h.len(),
            KeyHistory::Lww(h) => h.len(),
        }
    }
}

/// Which direction of which link the nemesis has cut.
struct Network {
    /// `blocked[from][to]`.
    blocked: Vec<Vec<bool>>,
}

impl Network {
    fn heal(&mut self) {
        self.blocked.iter_mut().for_each(|row| row.iter_mut().for_each(|b| *b = false));
    }

    /// Two random sides, cut both ways.
    fn symmetric(&mut self, rng: &mut StdRng) {
        let side: Vec<bool> = (0..self.blocked.len()).map(|_| rng.random_bool(0.5)).collect();
        for (a, row) in self.blocked.iter_mut().enumerate() {
            for (b, blocked) in row.iter_mut().enumerate() {
                *blocked = side[a] != side[b];
            }
        }
    }

    /// One direction of one link cut: `a` hears `b`, `b` does not hear `a`.
    fn one_way(&mut self, rng: &mut StdRng) {
        let n = self.blocked.len();
        let a = rng.random_range(0..n);
        let b = (a + rng.random_range(1..n)) % n;
        self.blocked[a][b] = true;
    }

    /// Two sides, with one node that hears and reaches both.
    fn bridge(&mut self, rng: &mut StdRng) {
        self.symmetric(rng);
        let bridge = rng.random_range(0..self.blocked.len());
        for other in 0..self.blocked.len() {
            self.blocked[bridge][other] = false;
            self.blocked[other][bridge] = false;
        }
    }
}

struct Sim {
    time_ms: Arc<AtomicU64>,
    rng: StdRng,
    nodes: Vec<SimNode>,
    in_flight: Vec<(usize, usize, Vec<u8>)>,
    network: Network,
    histories: Vec<KeyHistory>,
    faults: bool,
    next_value: u64,
    stats: Stats,
}

fn key_name(k: usize) -> String {
    format!("{}/{k}", ["counter", "set", "register", "lww"][k % 4])
}

fn key(k: usize) -> Key {
    Key::new(key_name(k), &Limits::default()).unwrap()
}

fn counter_of(read: &Option<ReadResult>) -> i64 {
    let value = read.iter().flat_map(|r| &r.values).find_map(|v| match v {
        TypedValue::Counter(c) => Some(*c),
        _ => None,
    });
    value.unwrap_or(0).try_into().expect("the simulation's counters stay small")
}

fn set_of(read: &Option<ReadResult>) -> BTreeSet<String> {
    read.iter()
        .flat_map(|r| &r.values)
        .flat_map(|v| match v {
            TypedValue::Set(members) => members.clone(),
            _ => vec![],
        })
        .collect()
}

fn register_of(read: &Option<ReadResult>) -> BTreeSet<Vec<u8>> {
    read.iter()
        .flat_map(|r| &r.values)
        .flat_map(|v| match v {
            TypedValue::Register(values) => values.iter().map(|b| b.to_vec()).collect(),
            _ => vec![],
        })
        .collect()
}

fn lww_of(read: &Option<ReadResult>) -> Option<Vec<u8>> {
    read.iter().flat_map(|r| &r.values).find_map(|v| match v {
        TypedValue::Lww(b) => Some(b.to_vec()),
        _ => None,
    })
}

fn failed(what: &str, error: impl std::fmt::Debug) -> String {
    format!("{what}: {error:?}")
}

impl Sim {
    fn send(&mut self, from: usize, to: usize, message: &Message) {
        self.stats.messages += 1;
        self.in_flight.push((from, to, encode(message).unwrap()));
    }

    fn broadcast(&mut self, from: usize, k: usize, delta: Envelope) {
        let message = Message::Deltas(vec![(key_name(k), delta)]);
        for to in (0..self.nodes.len()).filter(|&to| to != from) {
            self.send(from, to, &message);
        }
    }

    fn fresh_value(&mut self) -> Vec<u8> {
        self.next_value += 1;
        format!("v{}", self.next_value).into_bytes()
    }

    /// One client operation on `k` at node `at`: a read (40%) or a write.
    fn client(&mut self, at: usize) -> Result<(), String> {
        let k = self.rng.random_range(0..KEYS);
        let node = &self.nodes[at].node;
        let read = node.read(&key(k)).map_err(|e| failed("read", e))?;
        if self.rng.random_bool(0.4) {
            match &mut self.histories[k] {
                KeyHistory::Counter(h) => {
                    h.record(at, CounterOp::Read, Outcome::Ok(Some(counter_of(&read))));
                }
                KeyHistory::Set(h) => {
                    h.record(at, SetOp::Read, Outcome::Ok(Some(set_of(&read))));
                }
                KeyHistory::Mv(h) => {
                    h.record(at, MvOp::Read, Outcome::Ok(Some(register_of(&read))));
                }
                KeyHistory::Lww(h) => {
                    h.record(at, LwwOp::Read, Outcome::Ok(LwwRet::Value(lww_of(&read))));
                }
            }
            return Ok(());
        }
        let value = self.fresh_value();
        let delta = match k % 4 {
            0 => {
                let n: i64 = self.rng.random_range(1..10);
                let (op, amount) = if self.rng.random_bool(0.7) {
                    (Counter::Incr(n as u64), n)
                } else {
                    (Counter::Decr(n as u64), -n)
                };
                let action = Action::Crdt(CrdtOp::Counter(op));
                let (ended, delta) = self.write(at, k, action)?;
                let KeyHistory::Counter(h) = &mut self.histories[k] else { unreachable!() };
                h.record(at, CounterOp::Add(amount), ended.map(|_| None));
                delta
            }
            1 => {
                let member = format!("m{}", self.rng.random_range(0..MEMBERS));
                let adding = self.rng.random_bool(0.6);
                let op = if adding {
                    Set { add: vec![member.clone()], remove: vec![] }
                } else {
                    Set { add: vec![], remove: vec![member.clone()] }
                };
                let action = Action::Crdt(CrdtOp::Set(op));
                let (ended, delta) = self.write(at, k, action)?;
                let KeyHistory::Set(h) = &mut self.histories[k] else { unreachable!() };
                let op = if adding { SetOp::Add(member) } else { SetOp::Remove(member) };
                h.record(at, op, ended.map(|_| None));
                delta
            }
            2 => {
                // Most writes supersede what the client read; some are blind
                // and become siblings.
                let with_context = self.rng.random_bool(0.7);
                let (context, covers) = match (&read, with_context) {
                    (Some(r), true) => (Some(r.context.clone()), register_of(&read)),
                    _ => (None, BTreeSet::new()),
                };
                let action = Action::Put { value: value.clone().into(), context, if_absent: false };
                let (ended, delta) = self.write(at, k, action)?;
                let KeyHistory::Mv(h) = &mut self.histories[k] else { unreachable!() };
                h.record(at, MvOp::Write { value, covers }, ended.map(|_| None));
                delta
            }
            _ => {
                let action = Action::PutLww { value: value.clone().into() };
                let (ended, delta) = self.write(at, k, action)?;
                let stamped = match &delta {
                    Some(d) => Some(d.lww.stamp().ok_or("an LWW write carries no stamp")?),
                    None => None,
                };
                let KeyHistory::Lww(h) = &mut self.histories[k] else { unreachable!() };
                h.record(at, LwwOp::Write(value), ended.map(|_| LwwRet::Stamped(stamped.unwrap())));
                delta
            }
        };
        if let Some(delta) = delta {
            self.broadcast(at, k, delta);
        }
        Ok(())
    }

    /// Applies a client write at node `at`: acknowledged (with its delta to
    /// send), failed (the disk refused it before it changed anything) or
    /// indeterminate (its fsync failed: applied, not durable).
    fn write(
        &mut self,
        at: usize,
        k: usize,
        action: Action,
    ) -> Result<(Outcome<()>, Option<Envelope>), String> {
        let sim_node = &self.nodes[at];
        let unflushed = sim_node.store.unflushed_batches();
        match sim_node.node.apply(&Op { key: key(k), action }) {
            Ok(applied) => Ok((Outcome::Ok(()), Some(applied.delta))),
            Err(NodeError::Store { .. }) if sim_node.store.unflushed_batches() > unflushed => {
                self.stats.indeterminate += 1;
                Ok((Outcome::Indeterminate, None))
            }
            Err(NodeError::Store { .. }) => Ok((Outcome::Failed, None)),
            Err(other) => Err(failed("write", other)),
        }
    }

    fn deliver(&mut self, index: usize) -> Result<(), String> {
        let duplicate = self.faults && self.rng.random_bool(0.1);
        let (from, to, bytes) = if duplicate {
            self.stats.duplicated += 1;
            self.in_flight[index].clone()
        } else {
            self.in_flight.swap_remove(index)
        };
        if self.network.blocked[from][to] || (self.faults && self.rng.random_bool(0.1)) {
            self.stats.dropped += 1;
            return Ok(()); // cut off, or lost
        }
        // A failing disk loses what it refuses: anti-entropy repairs it.
        let node = &self.nodes[to].node;
        let tolerated = |e: NodeError| match e {
            NodeError::Store { .. } => Ok(()),
            other => Err(failed("merge", other)),
        };
        match decode::<Message>(&bytes).map_err(|e| failed("decode", e))? {
            Message::Deltas(deltas) => {
                for (k, delta) in deltas {
                    let k = Key::new(k, &Limits::default()).map_err(|e| failed("key", e))?;
                    node.merge(&k, &delta).map(|_| ()).or_else(tolerated)?;
                }
            }
            Message::AntiEntropy(message) => match anti_entropy::handle(node, &message) {
                Ok((Some(reply), _)) => self.send(to, from, &Message::AntiEntropy(reply)),
                Ok((None, _)) => {}
                Err(e) => tolerated(e)?,
            },
        }
        Ok(())
    }

    fn start_anti_entropy(&mut self, from: usize, to: usize) {
        let message = Message::AntiEntropy(anti_entropy::start(&self.nodes[from].node));
        self.send(from, to, &message);
    }

    fn converged(&self) -> bool {
        let first = self.nodes[0].node.digest().top();
        self.nodes.iter().all(|n| n.node.digest().top() == first)
    }

    fn run(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        for _ in 0..STEPS {
            self.time_ms.fetch_add(self.rng.random_range(0..5), Ordering::Relaxed);
            match self.rng.random_range(0..100) {
                0..2 => {
                    // A clock fault on one node: a skew of up to ±10 s, or a
                    // jump a minute ahead or 30 s back.
                    self.stats.clock_faults += 1;
                    let skew = &self.nodes[self.rng.random_range(0..n)].skew_ms;
                    match self.rng.random_range(0..3) {
                        0 => skew.store(self.rng.random_range(-10_000..=10_000), Ordering::Relaxed),
                        1 => drop(skew.fetch_add(60_000, Ordering::Relaxed)),
                        _ => drop(skew.fetch_sub(30_000, Ordering::Relaxed)),
                    }
                }
                2..35 => {
                    let at = self.rng.random_range(0..n);
                    self.client(at)?;
                }
                35..83 if !self.in_flight.is_empty() => {
                    // Any message in flight, not the oldest: reordering.
                    let index = self.rng.random_range(0..self.in_flight.len());
                    self.deliver(index)?;
                }
                83..91 => {
                    let (a, b) = (self.rng.random_range(0..n), self.rng.random_range(0..n));
                    if a != b {
                        self.start_anti_entropy(a, b);
                    }
                }
                91..96 => {
                    self.stats.partitions += 1;
                    match self.rng.random_range(0..3) {
                        0 => self.network.symmetric(&mut self.rng),
                        1 => self.network.one_way(&mut self.rng),
                        _ => self.network.bridge(&mut self.rng),
                    }
                }
                96..98 => self.network.heal(),
                _ => {
                    let at = self.rng.random_range(0..n);
                    self.stats.restarts += 1;
                    if self.nodes[at].restart()? {
                        // What it showed since its failed fsync may be gone.
                        self.histories.iter_mut().for_each(|h| h.crash(at));
                    }
                    self.in_flight.retain(|(_, to, _)| *to != at); // its inbox is lost
                }
            }
        }
        // Heal: the disks stop failing and every node restarts (which clears
        // a failed fsync), everything in flight arrives, then anti-entropy
        // until quiet.
        self.faults = false;
        self.network.heal();
        for at in 0..n {
            self.stats.disk_faults += self.nodes[at].store.faults_injected();
            self.nodes[at].store.stop_seeded_faults();
            if self.nodes[at].restart()? {
                self.histories.iter_mut().for_each(|h| h.crash(at));
            }
        }
        while !self.in_flight.is_empty() {
            let index = self.rng.random_range(0..self.in_flight.len());
            self.deliver(index)?;
        }
        for round in 0..QUIET_ROUNDS_MAX {
            if self.converged() {
                self.stats.quiet_rounds = round as u64;
                return Ok(());
            }
            let (a, b) = (round % n, (round / n + round + 1) % n);
            if a != b {
                self.start_anti_entropy(a, b);
                while !self.in_flight.is_empty() {
                    self.deliver(0)?;
                }
            }
        }
        Err(format!("digests still differ after {QUIET_ROUNDS_MAX} quiet anti-entropy rounds"))
    }

    /// Every replica holds the same envelopes; each key's history agrees with
    /// the settled state.
    fn check(&mut self) -> Result<(), String> {
        let mut replicas = Vec::new();
        for sim_node in &self.nodes {
            let mut states = BTreeMap::new();
            for k in 0..KEYS {
                states.insert(
                    key_name(k),
                    sim_node.node.envelope(&key(k)).map_err(|e| failed("envelope", e))?,
                );
            }
            replicas.push(states);
        }
        convergence::check(&replicas).map_err(|v| v.0)?;
        for k in 0..KEYS {
            let settled = self.nodes[0].node.read(&key(k)).map_err(|e| failed("read", e))?;
            let verdict = match &self.histories[k] {
                KeyHistory::Counter(h) => counter::check(h, counter_of(&settled), false),
                KeyHistory::Set(h) => set::check(h, &set_of(&settled), false),
                KeyHistory::Mv(h) => register::check_mv(h, &register_of(&settled)),
                KeyHistory::Lww(h) => register::check_lww(h, lww_of(&settled).as_deref()),
            };
            verdict.map_err(|v| format!("{}: {v}", key_name(k)))?;
            self.stats.operations += self.histories[k].len() as u64;
        }
        Ok(())
    }
}

/// Runs one seed with [`DISK_FAULTS`]; the error says what the checkers found.
pub fn simulate(seed: u64) -> Result<Stats, String> {
    simulate_with(seed, DISK_FAULTS)
}

/// Runs one seed with the given disk faults.
pub fn simulate_with(seed: u64, faults: FaultRates) -> Result<Stats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(3..=5);
    let time_ms = Arc::new(AtomicU64::new(START_MS));
    let nodes = (0..n).map(|i| SimNode::new(i as u64 + 1, seed, faults, &time_ms)).collect();
    let mut sim = Sim {
        time_ms,
        rng,
        nodes,
        in_flight: Vec::new(),
        network: Network { blocked: vec![vec![false; n]; n] },
        histories: (0..KEYS).map(KeyHistory::for_key).collect(),
        faults: true,
        next_value: 0,
        stats: Stats::default(),
    };
    sim.run()?;
    sim.check()?;
    Ok(sim.stats)
}

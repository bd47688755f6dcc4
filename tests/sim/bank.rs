//! A bank under a seeded nemesis, at the level of the safety argument:
//! replicas are real nodes (in-memory stores, the declared `min = 0`), the
//! coordinator is the real state machine (`StateMachine::decide`, fed in log
//! order; Raft itself is tested in `tests/quorum.rs` and `tests/quorum_faults.rs`,
//! and a simulation of whole nodes with the Raft group is not built yet).
//! Clients on every node deposit (local), withdraw and transfer (through the
//! coordinator) while the nemesis partitions, heals, crashes and restarts
//! nodes and loses, duplicates and reorders deltas. Deltas carry their sender
//! and a partition holds them until it heals; healing runs the real
//! anti-entropy handlers until every digest agrees.
//!
//! Judged by the history checkers: every observation of every replica at every
//! step against the declarations (`checkers::invariants`), every refusal
//! against the coordinator's own view (a refused withdrawal must not have been
//! covered), the settled balances against the acknowledged operations
//! (`checkers::counter`), and the replicas against each other
//! (`checkers::convergence`).

use crate::checkers::counter::{self, CounterOp as CounterEvent};
use crate::checkers::invariants::{self, Observation, Observed, Rule};
use crate::checkers::{convergence, History, Outcome as Ended};
use calmkv::invariants::{Invariants, Route};
use calmkv::quorum::store::StateMachine;
use calmkv::quorum::{Outcome, Proposal, WireAction};
use calmkv::store::{MemoryStore, Store};
use calmkv::{Action, CounterOp, CrdtOp, Envelope, Key, Limits, Node, NodeError, Op};
use calmkv_crdts::{Crdt, NodeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Nodes; 0, 1 and 2 are the voters.
pub const NODES: usize = 5;
/// Voters.
pub const VOTERS: usize = 3;
/// Accounts.
pub const ACCOUNTS: usize = 3;
/// Steps of one run before healing.
pub const STEPS: usize = 800;
/// Anti-entropy exchanges allowed while healing.
pub const HEAL_ROUNDS_MAX: usize = 200;

/// The declarations of the bank, the usernames and the carts.
pub const DECLARATIONS: &str = r#"
[[invariant]]
keys = "account/*"
type = "counter"
min = 0

[[invariant]]
keys = "username/*"
unique = true

[[invariant]]
keys = "cart/*"
type = "set"
max_size = 3
"#;

/// The checkers' copy of [`DECLARATIONS`], written apart from calmkv's parser.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule::CounterMin { prefix: "account/".into(), min: 0 },
        Rule::Unique { prefix: "username/".into() },
        Rule::SetMaxSize { prefix: "cart/".into(), max: 3 },
    ]
}

/// What one run did, for the summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Withdrawals the coordinator committed.
    pub withdrawals: u64,
    /// Withdrawals it refused as not covered (each checked against its view).
    pub refused: u64,
    /// Withdrawals refused as unavailable (no majority reachable).
    pub unavailable: u64,
    /// Deposits (local).
    pub deposits: u64,
    /// Observations checked against the declarations.
    pub observations: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Crashes and restarts.
    pub crashes: u64,
    /// Deltas lost.
    pub lost: u64,
}

/// One node.
pub struct Replica {
    /// Its id.
    pub id: NodeId,
    store: Arc<MemoryStore>,
    /// The node.
    pub node: Node,
    /// Whether it is running.
    pub up: bool,
}

impl Replica {
    fn open(id: u64, store: Arc<MemoryStore>, invariants: &Arc<Invariants>) -> Replica {
        let shared: Arc<dyn Store> = store.clone();
        let node = Node::open(NodeId(id), shared, Limits::default())
            .unwrap()
            .with_invariants(invariants.clone());
        Replica { id: NodeId(id), store, node, up: true }
    }

    fn restart(&mut self, invariants: &Arc<Invariants>) {
        *self = Replica::open(self.id.0, self.store.clone(), invariants);
    }
}

/// The simulated bank.
pub struct Sim {
    /// The seeded randomness.
    pub rng: StdRng,
    invariants: Arc<Invariants>,
    /// The nodes.
    pub replicas: Vec<Replica>,
    coordinator: StateMachine,
    /// (from, to, key, state).
    in_flight: Vec<(usize, usize, String, Envelope)>,
    /// Which side of the partition each node is on.
    pub side: [bool; NODES],
    /// Whether a partition is on.
    pub partitioned: bool,
    /// Each account's history of deposits and withdrawals.
    pub accounts: Vec<History<CounterEvent, Option<i64>>>,
    /// What the run did.
    pub stats: Stats,
    step: u64,
}

/// A key.
pub fn key(name: &str) -> Key {
    Key::new(name, &Limits::default()).unwrap()
}

/// Account `i`'s key.
pub fn account(i: usize) -> String {
    format!("account/{i}")
}

fn counter_op(name: &str, op: CounterOp) -> Op {
    Op { key: key(name), action: Action::Crdt(CrdtOp::Counter(op)) }
}

impl Sim {
    /// A bank of [`NODES`] empty nodes.
    pub fn new(seed: u64) -> Sim {
        let invariants = Arc::new(Invariants::parse(DECLARATIONS).unwrap());
        let replicas = (0..NODES)
            .map(|i| Replica::open(i as u64 + 1, Arc::new(MemoryStore::new()), &invariants))
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            invariants,
            replicas,
            coordinator: StateMachine::default(),
            in_flight: Vec::new(),
            side: [false; NODES],
            partitioned: false,
            accounts: (0..ACCOUNTS).map(|_| History::new()).collect(),
            stats: Stats::default(),
            step: 0,
        }
    }

    /// Whether `a` and `b` can talk.
    pub fn connected(&self, a: usize, b: usize) -> bool {
        !self.partitioned || self.side[a] == self.side[b]
    }

    /// A majority of voters is up and on `from`'s side: the simulation's
    /// model of whether the Raft group can commit for `from`.
    fn majority_reachable(&self, from: usize) -> bool {
        let reachable =
            (0..VOTERS).filter(|&v| self.replicas[v].up && self.connected(from, v)).count();
        reachable * 2 > VOTERS
    }

    fn broadcast(&mut self, from: usize, key: &str, state: &Envelope) {
        for to in (0..NODES).filter(|&to| to != from) {
            self.in_flight.push((from, to, key.to_string(), state.clone()));
        }
    }

    /// Proposes `op` from node `from` to the coordinator: refused as
    /// unavailable without a reachable majority; otherwise decided by the
    /// state machine, and the committed state merged locally and sent on. A
    /// refusal for an invariant is checked against the coordinator's view.
    pub fn propose(&mut self, from: usize, op: Op) -> Result<(), NodeError> {
        let route = self.invariants.route(&op)?;
        let Route::Quorum { declaration, .. } = route else { panic!("{op:?} is local") };
        if !self.majority_reachable(from) {
            return Err(NodeError::CoordinationUnavailable {
                key: op.key.to_string(),
                reason: "no majority".into(),
            });
        }
        let proposal = Proposal {
            key: op.key.to_string(),
            action: WireAction::from(&op.action),
            observed: self.replicas[from].node.envelope(&op.key)?,
            declaration: declaration.clone(),
            invariants_hash: self.invariants.hash(),
            now: Default::default(),
        };
        let mut view = self.coordinator.key(&proposal.key).cloned().unwrap_or_default();
        view.merge(&proposal.observed);
        match self.coordinator.decide(&proposal, &Limits::default()) {
            Outcome::Committed { key, state } => {
                self.replicas[from].node.merge(&op.key, &state)?;
                self.broadcast(from, &key, &state);
                Ok(())
            }
            Outcome::Refused { code, message } => {
                let error = Outcome::error(&code, &message, &proposal.key);
                if let (
                    NodeError::InvariantViolation { .. },
                    Action::Crdt(CrdtOp::Counter(CounterOp::Decr(n))),
                ) = (&error, &op.action)
                {
                    let balance = view.value.counter().value();
                    assert!(
                        balance < i128::from(*n),
                        "the coordinator refused to take {n} from {} though its view held {balance}",
                        op.key
                    );
                }
                Err(error)
            }
            Outcome::Nothing => unreachable!("a proposal decides"),
        }
    }

    /// A deposit at node `at`: local, on either side of any partition.
    pub fn deposit(&mut self, at: usize, acct: usize, n: u64) {
        let name = account(acct);
        let applied = self.replicas[at]
            .node
            .apply_alone(&counter_op(&name, CounterOp::Incr(n)))
            .expect("a deposit is local and always succeeds, on either side");
        assert!(!applied.coordinated);
        self.stats.deposits += 1;
        self.accounts[acct].record(at, CounterEvent::Add(n as i64), Ended::Ok(None));
        self.broadcast(at, &name, &applied.delta);
    }

    /// A withdrawal at node `at` through the coordinator; whether it was
    /// committed.
    pub fn withdraw(&mut self, at: usize, acct: usize, n: u64) -> bool {
        let id = self.accounts[acct].invoke(at, CounterEvent::Add(-(n as i64)));
        let result = self.propose(at, counter_op(&account(acct), CounterOp::Decr(n)));
        let (ended, committed) = match result {
            Ok(()) => {
                self.stats.withdrawals += 1;
                (Ended::Ok(None), true)
            }
            Err(NodeError::InvariantViolation { .. }) => {
                self.stats.refused += 1;
                (Ended::Failed, false)
            }
            Err(NodeError::CoordinationUnavailable { .. }) => {
                self.stats.unavailable += 1;
                (Ended::Failed, false)
            }
            Err(other) => panic!("unexpected {other:?}"),
        };
        self.accounts[acct].complete(id, ended);
        committed
    }

    /// One step of clients or nemesis.
    pub fn step(&mut self) {
        self.step += 1;
        let up: Vec<usize> = (0..NODES).filter(|&i| self.replicas[i].up).collect();
        let at = up[self.rng.random_range(0..up.len())];
        let acct = self.rng.random_range(0..ACCOUNTS);
        let n = self.rng.random_range(1..=5);
        match self.rng.random_range(0..100) {
            0..25 => self.deposit(at, acct, n),
            25..45 => {
                self.withdraw(at, acct, n);
            }
            45..55 => {
                let to = (acct + 1) % ACCOUNTS;
                if self.withdraw(at, acct, n) {
                    self.deposit(at, to, n);
                }
            }
            55..85 => self.deliver(),
            85..90 => {
                self.partitioned = !self.partitioned;
                self.stats.partitions += u64::from(self.partitioned);
                for side in &mut self.side {
                    *side = self.rng.random_bool(0.5);
                }
            }
            90..95 => {
                let victim = self.rng.random_range(0..NODES);
                if self.replicas[victim].up && up.len() > 1 {
                    self.replicas[victim].up = false;
                    self.stats.crashes += 1;
                    self.in_flight.retain(|(_, to, _, _)| *to != victim); // its inbox is lost
                } else if !self.replicas[victim].up {
                    // A restart: the durable store survives, the node is rebuilt.
                    self.replicas[victim].restart(&self.invariants);
                }
            }
            _ => {
                if !self.in_flight.is_empty() {
                    let i = self.rng.random_range(0..self.in_flight.len());
                    self.in_flight.swap_remove(i);
                    self.stats.lost += 1;
                }
            }
        }
    }

    /// Delivers one message in random order, sometimes twice; a message across
    /// the partition, or to a node that is down, waits.
    pub fn deliver(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.in_flight.len());
        let (from, to, name, state) = self.in_flight[i].clone();
        if !self.replicas[to].up || !self.connected(from, to) {
            return;
        }
        self.replicas[to].node.merge(&key(&name), &state).unwrap();
        if !self.rng.random_bool(0.2) {
            self.in_flight.swap_remove(i);
        }
    }

    /// What every replica, up or down, holds now, for the invariant checker.
    pub fn observe(&mut self, keys: &[String]) -> Vec<Observation> {
        let mut seen = Vec::new();
        for (r, replica) in self.replicas.iter().enumerate() {
            for name in keys {
                let envelope = replica.node.envelope(&key(name)).unwrap();
                let value = if name.starts_with("account/") {
                    Observed::Counter(envelope.value.counter().value().try_into().unwrap())
                } else if name.starts_with("cart/") {
                    Observed::Set(envelope.value.set().members().cloned().collect())
                } else {
                    Observed::Register(
                        envelope.value.register().values().map(|v| v.to_vec()).collect(),
                    )
                };
                seen.push(Observation { replica: r, at: self.step, key: name.clone(), value });
            }
        }
        self.stats.observations += seen.len() as u64;
        seen
    }

    /// Heals everything: restarts the nodes that are down, delivers what is in
    /// flight, then runs anti-entropy between every pair until every digest
    /// agrees.
    pub fn heal(&mut self) -> Result<(), String> {
        self.partitioned = false;
        for replica in &mut self.replicas {
            if !replica.up {
                replica.restart(&self.invariants);
            }
        }
        for (_, to, name, state) in std::mem::take(&mut self.in_flight) {
            self.replicas[to].node.merge(&key(&name), &state).unwrap();
        }
        let nodes: Vec<&Node> = self.replicas.iter().map(|r| &r.node).collect();
        super::anti_entropy_until_quiet(&nodes, HEAL_ROUNDS_MAX).map(|_| ())
    }

    /// Every replica holds the same state for `keys`.
    pub fn check_converged(&self, keys: &[String]) -> Result<(), String> {
        let states: Vec<BTreeMap<String, Envelope>> = self
            .replicas
            .iter()
            .map(|r| keys.iter().map(|k| (k.clone(), r.node.envelope(&key(k)).unwrap())).collect())
            .collect();
        convergence::check(&states).map_err(|v| v.0)
    }
}

/// Runs one seed of the bank: every step observed and checked, then healed,
/// converged and balanced.
pub fn simulate(seed: u64) -> Result<Stats, String> {
    let mut sim = Sim::new(seed);
    let rules = rules();
    let accounts: Vec<String> = (0..ACCOUNTS).map(account).collect();
    for _ in 0..STEPS {
        sim.step();
        let seen = sim.observe(&accounts);
        invariants::check(&rules, &seen).map_err(|v| v.0)?;
    }
    sim.heal()?;
    let seen = sim.observe(&accounts);
    invariants::check(&rules, &seen).map_err(|v| v.0)?;
    sim.check_converged(&accounts)?;
    for (acct, history) in sim.accounts.iter().enumerate() {
        let settled = sim.replicas[0].node.envelope(&key(&account(acct))).unwrap();
        let settled = settled.value.counter().value().try_into().unwrap();
        counter::check(history, settled, true).map_err(|v| format!("account {acct}: {v}"))?;
    }
    Ok(sim.stats)
}

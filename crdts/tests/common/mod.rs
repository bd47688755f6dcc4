//! The one property-test harness every CRDT type goes through.
//!
//! A [`Model`] says how to generate operations for a type and what its final state
//! must be (its sequential specification). From it the harness builds *histories*:
//! random operations on 2–5 replicas interleaved with full-state merges between
//! them, so every state it checks was reached by real mutators and merges. It
//! records, for every operation, which earlier operations its replica had seen
//! (its causal past), which is what the specifications are written against.

#![allow(dead_code)]

use calmkv_crdts::{Crdt, Limits, NodeId};
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeSet;
use std::fmt::Debug;

/// Limits small enough that histories cross them.
pub const TEST_LIMITS: Limits = Limits {
    members_max: 6,
    siblings_max: 3,
    context_entries_max: Limits::CONTEXT_ENTRIES_MAX,
    depth_max: Limits::DEPTH_MAX,
    value_bytes_max: Limits::VALUE_BYTES_MAX,
    member_bytes_max: Limits::MEMBER_BYTES_MAX,
};

/// One operation of a history, as it happened.
#[derive(Clone, Debug)]
pub struct Record<S, O> {
    /// Index of the replica that ran it.
    pub replica: usize,
    pub op: O,
    /// The operations the replica had seen just before this one.
    pub observed: BTreeSet<usize>,
    /// The delta it returned; `None` when the mutator refused.
    pub delta: Option<S>,
}

/// A CRDT type under test.
pub trait Model {
    type State: Crdt;
    type Op: Clone + Debug;

    fn op() -> BoxedStrategy<Self::Op>;

    /// Runs `op` on `state` at `node` and returns the delta, or `None` if refused.
    fn apply(state: &mut Self::State, node: NodeId, op: &Self::Op) -> Option<Self::State>;

    /// Checks a replica's state against the specification, given every operation
    /// of the history and the ones this replica has seen (accepted ones only).
    fn check(
        state: &Self::State,
        history: &[Record<Self::State, Self::Op>],
        seen: &BTreeSet<usize>,
    ) -> Result<(), String>;

    /// Checks what a replica reads after receiving part of what `origin` has
    /// seen against what `origin` reads (`origin_seen`: the operations
    /// `origin` has seen). For counters: neither direction's total may exceed
    /// the origin's. Types whose reads are not quantities accept anything here;
    /// the lattice order is checked for every type by the harness.
    fn check_below(
        _receiver: &Self::State,
        _origin: &Self::State,
        _history: &[Record<Self::State, Self::Op>],
        _origin_seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        Ok(())
    }
}

pub fn node(replica: usize) -> NodeId {
    // Spread ids out so that node order and replica order differ.
    NodeId((replica as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A step of a history.
#[derive(Clone, Debug)]
pub enum Step<O> {
    /// Run an operation on a replica.
    Op { replica: Index, op: O },
    /// Merge one replica's full state into another's.
    Sync { from: Index, to: Index },
}

pub fn steps<M: Model>() -> impl Strategy<Value = (usize, Vec<Step<M::Op>>)> {
    let step = prop_oneof![
        3 => (any::<Index>(), M::op()).prop_map(|(replica, op)| Step::Op { replica, op }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(from, to)| Step::Sync { from, to }),
    ];
    (2usize..=5, prop::collection::vec(step, 0..40))
}

/// The outcome of running a history.
pub struct Run<M: Model> {
    pub replicas: Vec<M::State>,
    pub seen: Vec<BTreeSet<usize>>,
    pub history: Vec<Record<M::State, M::Op>>,
}

impl<M: Model> Run<M> {
    /// Every state of the run: the replicas and every delta.
    pub fn pool(&self) -> Vec<M::State> {
        let deltas = self.history.iter().filter_map(|record| record.delta.clone());
        self.replicas.iter().cloned().chain(deltas).collect()
    }
}

/// Applies an operation at a replica, checking that a refusal changes nothing.
pub fn run_op<M: Model>(
    replica: usize,
    state: &mut M::State,
    op: &M::Op,
) -> Result<Option<M::State>, TestCaseError> {
    let before = state.clone();
    let delta = M::apply(state, node(replica), op);
    if delta.is_none() {
        prop_assert_eq!(&before, state, "a refused {:?} changed the state", op);
    }
    Ok(delta)
}

pub fn run_history<M: Model>(
    replica_count: usize,
    steps: &[Step<M::Op>],
) -> Result<Run<M>, TestCaseError> {
    let mut replicas = vec![M::State::default(); replica_count];
    let mut seen = vec![BTreeSet::new(); replica_count];
    let mut history = Vec::new();
    for step in steps {
        match step {
            Step::Op { replica, op } => {
                let r = replica.index(replica_count);
                let delta = run_op::<M>(r, &mut replicas[r], op)?;
                let observed = seen[r].clone();
                if delta.is_some() {
                    seen[r].insert(history.len());
                }
                history.push(Record { replica: r, op: op.clone(), observed, delta });
            }
            Step::Sync { from, to } => {
                let (from, to) = (from.index(replica_count), to.index(replica_count));
                let source = replicas[from].clone();
                replicas[to].merge(&source);
                let known = seen[from].clone();
                seen[to].extend(known);
            }
        }
    }
    Ok(Run { replicas, seen, history })
}

/// Merge is commutative, associative and idempotent, and the default is its bottom,
/// over states drawn from a run (replicas and deltas alike).
pub fn check_laws<M: Model>(run: &Run<M>, picks: [Index; 3]) -> Result<(), TestCaseError> {
    let pool = run.pool();
    let [a, b, c] = picks.map(|pick| pool[pick.index(pool.len())].clone());
    prop_assert_eq!(a.merged(&b), b.merged(&a), "merge is not commutative");
    prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)), "merge is not associative");
    prop_assert_eq!(a.merged(&a), a.clone(), "merge is not idempotent");
    prop_assert_eq!(M::State::default().merged(&a), a.clone(), "default is not the bottom");
    Ok(())
}

/// The join of every delta equals the join of every replica's full state, and each
/// replica equals the join of the deltas of the operations it has seen.
pub fn check_deltas<M: Model>(run: &Run<M>) -> Result<(), TestCaseError> {
    let join = |states: &mut dyn Iterator<Item = &M::State>| {
        states.fold(M::State::default(), |mut acc, state| {
            acc.merge(state);
            acc
        })
    };
    let all_deltas = join(&mut run.history.iter().filter_map(|r| r.delta.as_ref()));
    let all_replicas = join(&mut run.replicas.iter());
    prop_assert_eq!(&all_deltas, &all_replicas, "deltas and full states disagree");
    let reversed = join(&mut run.history.iter().rev().filter_map(|r| r.delta.as_ref()));
    prop_assert_eq!(&reversed, &all_deltas, "delta order mattered");
    for (replica, seen) in run.replicas.iter().zip(&run.seen) {
        let mine = join(&mut seen.iter().filter_map(|&i| run.history[i].delta.as_ref()));
        prop_assert_eq!(&mine, replica, "a replica is not the join of the deltas it saw");
    }
    Ok(())
}

/// The delta law: any deltas a replica has seen, delivered to another replica
/// as an arbitrary sub-multiset in arbitrary order (`picks` index them, with
/// repetition), leave the receiver below that replica in the lattice order
/// (`receiver ⊔ origin = origin`) after every delivery, and
/// [`Model::check_below`] holds of what it reads. Merge laws alone cannot
/// catch a delta that is unsafe under loss: a counter delta that failed to
/// supersede an older share made a receiver read more than the origin had
/// ever counted.
pub fn check_delta_subsets<M: Model>(
    run: &Run<M>,
    origin: Index,
    picks: &[Index],
) -> Result<(), TestCaseError> {
    let r = origin.index(run.replicas.len());
    let (origin, seen) = (&run.replicas[r], &run.seen[r]);
    let deltas: Vec<&M::State> =
        seen.iter().filter_map(|&i| run.history[i].delta.as_ref()).collect();
    if deltas.is_empty() {
        return Ok(());
    }
    let mut receiver = M::State::default();
    for (step, pick) in picks.iter().enumerate() {
        receiver.merge(deltas[pick.index(deltas.len())]);
        prop_assert_eq!(
            &receiver.merged(origin),
            origin,
            "after {} deliveries the receiver is not below the origin",
            step + 1
        );
        if let Err(why) = M::check_below(&receiver, origin, &run.history, seen) {
            return Err(TestCaseError::fail(format!(
                "after {} deliveries: {why}\nreceiver: {receiver:?}\norigin: {origin:?}",
                step + 1
            )));
        }
    }
    Ok(())
}

/// Every replica's state matches the specification for what it has seen.
pub fn check_spec<M: Model>(run: &Run<M>) -> Result<(), TestCaseError> {
    for (r, (state, seen)) in run.replicas.iter().zip(&run.seen).enumerate() {
        if let Err(why) = M::check(state, &run.history, seen) {
            return Err(TestCaseError::fail(format!("replica {r}: {why}\nstate: {state:?}")));
        }
    }
    Ok(())
}

/// What the network does to the next message.
#[derive(Clone, Debug)]
pub enum NetStep<O> {
    Op {
        replica: Index,
        op: O,
    },
    /// Deliver a pending message (chosen by `pick`), possibly keeping a duplicate.
    Deliver {
        pick: Index,
        duplicate: bool,
    },
    /// Lose a pending message.
    Drop {
        pick: Index,
    },
}

pub fn net_steps<M: Model>() -> impl Strategy<Value = (usize, Vec<NetStep<M::Op>>)> {
    let step = prop_oneof![
        3 => (any::<Index>(), M::op()).prop_map(|(replica, op)| NetStep::Op { replica, op }),
        4 => (any::<Index>(), any::<bool>())
            .prop_map(|(pick, duplicate)| NetStep::Deliver { pick, duplicate }),
        1 => any::<Index>().prop_map(|pick| NetStep::Drop { pick }),
    ];
    (2usize..=5, prop::collection::vec(step, 0..60))
}

/// Deltas are broadcast through a network that reorders, duplicates and drops
/// them; what is left in flight is delivered, then a round of full-state
/// anti-entropy repairs the drops. All replicas must end equal to the join of
/// every delta ever made.
pub fn check_network<M: Model>(
    replica_count: usize,
    steps: &[NetStep<M::Op>],
) -> Result<(), TestCaseError> {
    let mut replicas = vec![M::State::default(); replica_count];
    let mut in_flight: Vec<(usize, M::State)> = Vec::new();
    let mut all = M::State::default();
    for step in steps {
        match step {
            NetStep::Op { replica, op } => {
                let r = replica.index(replica_count);
                if let Some(delta) = run_op::<M>(r, &mut replicas[r], op)? {
                    all.merge(&delta);
                    let others = (0..replica_count).filter(|&to| to != r);
                    in_flight.extend(others.map(|to| (to, delta.clone())));
                }
            }
            NetStep::Deliver { pick, duplicate } if !in_flight.is_empty() => {
                let i = pick.index(in_flight.len());
                let (to, delta) =
                    if *duplicate { in_flight[i].clone() } else { in_flight.swap_remove(i) };
                replicas[to].merge(&delta);
            }
            NetStep::Drop { pick } if !in_flight.is_empty() => {
                in_flight.swap_remove(pick.index(in_flight.len()));
            }
            NetStep::Deliver { .. } | NetStep::Drop { .. } => {}
        }
    }
    while let Some((to, delta)) = in_flight.pop() {
        replicas[to].merge(&delta);
    }
    // Anti-entropy: push every state around the ring twice.
    for _ in 0..2 {
        for r in 0..replica_count {
            let state = replicas[r].clone();
            replicas[(r + 1) % replica_count].merge(&state);
        }
    }
    for (r, replica) in replicas.iter().enumerate() {
        prop_assert_eq!(replica, &all, "replica {} did not converge", r);
    }
    Ok(())
}

/// Instantiates the five property tests for one model.
#[macro_export]
macro_rules! crdt_properties {
    ($name:ident, $model:ty) => {
        mod $name {
            use super::*;
            use proptest::sample::Index;

            proptest! {
                #[test]
                fn prop_merge_is_a_join(
                    (n, steps) in common::steps::<$model>(),
                    picks in any::<[Index; 3]>(),
                ) {
                    let run = common::run_history::<$model>(n, &steps)?;
                    common::check_laws::<$model>(&run, picks)?;
                }

                #[test]
                fn prop_deltas_equal_full_states((n, steps) in common::steps::<$model>()) {
                    let run = common::run_history::<$model>(n, &steps)?;
                    common::check_deltas::<$model>(&run)?;
                }

                #[test]
                fn prop_matches_sequential_spec((n, steps) in common::steps::<$model>()) {
                    let run = common::run_history::<$model>(n, &steps)?;
                    common::check_spec::<$model>(&run)?;
                }

                #[test]
                fn prop_delta_subsets_stay_below_the_origin(
                    (n, steps) in common::steps::<$model>(),
                    origin in any::<Index>(),
                    picks in proptest::collection::vec(any::<Index>(), 0..40),
                ) {
                    let run = common::run_history::<$model>(n, &steps)?;
                    common::check_delta_subsets::<$model>(&run, origin, &picks)?;
                }

                #[test]
                fn prop_converges_under_network_faults(
                    (n, steps) in common::net_steps::<$model>(),
                ) {
                    common::check_network::<$model>(n, &steps)?;
                }
            }
        }
    };
}

//! Every CRDT type against the shared harness: join laws, deltas equal full
//! states, convergence under a lossy, duplicating, reordering network, and the
//! type's sequential specification.

mod common;

use calmkv_crdts::{
    CausalCounter, EwFlag, GCounter, Hlc, Limits, LwwRegister, MvRegister, NodeId, OrMap, OrSet,
    PnCounter,
};
use common::{Model, Record, TEST_LIMITS};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

type History<S, O> = [Record<S, O>];

/// Amounts that are mostly small, sometimes near `u64::MAX` so overflow is reached.
fn amount() -> BoxedStrategy<u64> {
    prop_oneof![9 => 0u64..100, 1 => (u64::MAX - 50)..=u64::MAX].boxed()
}

fn elements() -> BoxedStrategy<BTreeSet<u8>> {
    prop::collection::btree_set(0u8..10, 1..3).boxed()
}

/// The accepted operations a replica has seen, in history order.
fn seen_ops<'a, S, O>(
    history: &'a History<S, O>,
    seen: &'a BTreeSet<usize>,
) -> impl Iterator<Item = (usize, &'a Record<S, O>)> + 'a {
    seen.iter().map(move |&i| (i, &history[i]))
}

/// Whether the operation `i` was observed by a seen operation that `cancels` it.
fn cancelled<S, O>(
    history: &History<S, O>,
    seen: &BTreeSet<usize>,
    i: usize,
    cancels: impl Fn(&O) -> bool,
) -> bool {
    seen_ops(history, seen).any(|(_, r)| cancels(&r.op) && r.observed.contains(&i))
}

// ---------------------------------------------------------------- counters

struct GCounterModel;

impl Model for GCounterModel {
    type State = GCounter;
    type Op = u64;

    fn op() -> BoxedStrategy<u64> {
        amount()
    }

    fn apply(state: &mut GCounter, node: NodeId, op: &u64) -> Option<GCounter> {
        state.incr(node, *op).ok()
    }

    fn check(
        state: &GCounter,
        history: &History<GCounter, u64>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let expected: u128 = seen_ops(history, seen).map(|(_, r)| u128::from(r.op)).sum();
        (state.value() == expected)
            .then_some(())
            .ok_or(format!("value {} != {expected}", state.value()))
    }

    fn check_below(
        receiver: &GCounter,
        origin: &GCounter,
        _: &History<GCounter, u64>,
        _: &BTreeSet<usize>,
    ) -> Result<(), String> {
        totals_below((receiver.value(), 0), (origin.value(), 0))
    }
}

#[derive(Clone, Debug)]
enum CounterOp {
    Incr(u64),
    Decr(u64),
}

fn counter_op() -> BoxedStrategy<CounterOp> {
    prop_oneof![amount().prop_map(CounterOp::Incr), amount().prop_map(CounterOp::Decr)].boxed()
}

fn counter_sum<S>(history: &History<S, CounterOp>, seen: &BTreeSet<usize>) -> i128 {
    seen_ops(history, seen)
        .map(|(_, r)| match r.op {
            CounterOp::Incr(n) => i128::from(n),
            CounterOp::Decr(n) => -i128::from(n),
        })
        .sum()
}

/// Neither direction's total on the receiver passes the origin's.
fn totals_below(receiver: (u128, u128), origin: (u128, u128)) -> Result<(), String> {
    if receiver.0 > origin.0 || receiver.1 > origin.1 {
        return Err(format!(
            "receiver counts +{} -{}, more than the origin's +{} -{}",
            receiver.0, receiver.1, origin.0, origin.1
        ));
    }
    Ok(())
}

struct PnCounterModel;

impl Model for PnCounterModel {
    type State = PnCounter;
    type Op = CounterOp;

    fn op() -> BoxedStrategy<CounterOp> {
        counter_op()
    }

    fn apply(state: &mut PnCounter, node: NodeId, op: &CounterOp) -> Option<PnCounter> {
        match *op {
            CounterOp::Incr(n) => state.incr(node, n).ok(),
            CounterOp::Decr(n) => state.decr(node, n).ok(),
        }
    }

    fn check(
        state: &PnCounter,
        history: &History<PnCounter, CounterOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let expected = counter_sum(history, seen);
        (state.value() == expected)
            .then_some(())
            .ok_or(format!("value {} != {expected}", state.value()))
    }
    fn check_below(
        receiver: &PnCounter,
        origin: &PnCounter,
        _: &History<PnCounter, CounterOp>,
        _: &BTreeSet<usize>,
    ) -> Result<(), String> {
        totals_below(
            (receiver.increments(), receiver.decrements()),
            (origin.increments(), origin.decrements()),
        )
    }
}

struct CausalCounterModel;

impl Model for CausalCounterModel {
    type State = CausalCounter;
    type Op = CounterOp;

    fn op() -> BoxedStrategy<CounterOp> {
        counter_op()
    }

    fn apply(state: &mut CausalCounter, node: NodeId, op: &CounterOp) -> Option<CausalCounter> {
        match *op {
            CounterOp::Incr(n) => state.incr(node, n).ok(),
            CounterOp::Decr(n) => state.decr(node, n).ok(),
        }
    }

    fn check(
        state: &CausalCounter,
        history: &History<CausalCounter, CounterOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let expected = counter_sum(history, seen);
        (state.value() == expected)
            .then_some(())
            .ok_or(format!("value {} != {expected}", state.value()))
    }
    fn check_below(
        receiver: &CausalCounter,
        origin: &CausalCounter,
        _: &History<CausalCounter, CounterOp>,
        _: &BTreeSet<usize>,
    ) -> Result<(), String> {
        totals_below(
            (receiver.increments(), receiver.decrements()),
            (origin.increments(), origin.decrements()),
        )
    }
}

// ---------------------------------------------------------------- registers

#[derive(Clone, Debug)]
enum LwwOp {
    Set { value: u8, wall_ms: u64 },
    Delete { wall_ms: u64 },
}

struct LwwModel;

impl Model for LwwModel {
    type State = LwwRegister<u8>;
    type Op = LwwOp;

    fn op() -> BoxedStrategy<LwwOp> {
        // Few distinct wall times, so equal times and backwards clocks are common.
        prop_oneof![
            3 => (any::<u8>(), 0u64..6).prop_map(|(value, wall_ms)| LwwOp::Set { value, wall_ms }),
            1 => (0u64..6).prop_map(|wall_ms| LwwOp::Delete { wall_ms }),
        ]
        .boxed()
    }

    fn apply(state: &mut LwwRegister<u8>, node: NodeId, op: &LwwOp) -> Option<LwwRegister<u8>> {
        let at = |wall_ms| Hlc { wall_ms, logical: 0 };
        Some(match *op {
            LwwOp::Set { value, wall_ms } => state.set(node, at(wall_ms), value),
            LwwOp::Delete { wall_ms } => state.delete(node, at(wall_ms)),
        })
    }

    fn check(
        state: &LwwRegister<u8>,
        history: &History<LwwRegister<u8>, LwwOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let stamp = |i: usize| history[i].delta.as_ref().and_then(|d| d.stamp()).expect("stamped");
        for (i, record) in seen_ops(history, seen) {
            if let Some(&before) = record.observed.iter().find(|&&j| stamp(j) >= stamp(i)) {
                return Err(format!("op {i} is stamped before op {before} it had seen"));
            }
        }
        let winner = seen.iter().copied().max_by_key(|&i| stamp(i));
        let expected = winner.and_then(|i| match history[i].op {
            LwwOp::Set { value, .. } => Some(value),
            LwwOp::Delete { .. } => None,
        });
        if state.get().copied() != expected || state.stamp() != winner.map(stamp) {
            return Err(format!("expected {expected:?} from op {winner:?}"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum MvOp {
    /// Write after reading (with the register's context), or blind (no context).
    Write {
        value: u8,
        blind: bool,
    },
    Delete,
}

struct MvModel;

impl Model for MvModel {
    type State = MvRegister<u8>;
    type Op = MvOp;

    fn op() -> BoxedStrategy<MvOp> {
        prop_oneof![
            4 => (any::<u8>(), any::<bool>()).prop_map(|(value, blind)| MvOp::Write { value, blind }),
            1 => Just(MvOp::Delete),
        ]
        .boxed()
    }

    fn apply(state: &mut MvRegister<u8>, node: NodeId, op: &MvOp) -> Option<MvRegister<u8>> {
        match *op {
            MvOp::Write { value, blind: false } => {
                let seen = state.context().clone();
                state.write(node, value, &seen, &TEST_LIMITS).ok()
            }
            MvOp::Write { value, blind: true } => {
                state.write(node, value, &Default::default(), &TEST_LIMITS).ok()
            }
            MvOp::Delete => {
                let seen = state.context().clone();
                Some(state.delete(&seen))
            }
        }
    }

    /// The values are exactly those of the writes no later write or delete saw.
    fn check(
        state: &MvRegister<u8>,
        history: &History<MvRegister<u8>, MvOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let supersedes = |op: &MvOp| !matches!(op, MvOp::Write { blind: true, .. });
        let mut expected: Vec<u8> = seen_ops(history, seen)
            .filter(|&(i, _)| !cancelled(history, seen, i, supersedes))
            .filter_map(|(_, r)| match r.op {
                MvOp::Write { value, .. } => Some(value),
                MvOp::Delete => None,
            })
            .collect();
        let mut actual: Vec<u8> = state.values().copied().collect();
        expected.sort_unstable();
        actual.sort_unstable();
        (actual == expected).then_some(()).ok_or(format!("values {actual:?} != {expected:?}"))
    }
}

// ---------------------------------------------------------------- sets and flags

#[derive(Clone, Debug)]
enum SetOp {
    Add(BTreeSet<u8>),
    Remove(BTreeSet<u8>),
}

fn set_op() -> BoxedStrategy<SetOp> {
    prop_oneof![3 => elements().prop_map(SetOp::Add), 2 => elements().prop_map(SetOp::Remove)]
        .boxed()
}

fn apply_set(
    state: &mut OrSet<u8>,
    node: NodeId,
    op: &SetOp,
    limits: &Limits,
) -> Option<OrSet<u8>> {
    match op {
        SetOp::Add(elements) => state.add_all(node, elements.iter().copied(), limits).ok(),
        SetOp::Remove(elements) => Some(state.remove_all(elements)),
    }
}

/// Add-wins: `x` is a member iff some add of it was seen by no remove of it
/// (`removes(op, x)` says whether an operation removes `x`).
fn expected_members<S, O>(
    history: &History<S, O>,
    seen: &BTreeSet<usize>,
    adds: impl Fn(&O) -> Option<&BTreeSet<u8>>,
    removes: impl Fn(&O, u8) -> bool,
) -> BTreeSet<u8> {
    let mut members = BTreeSet::new();
    for (i, record) in seen_ops(history, seen) {
        for &x in adds(&record.op).into_iter().flatten() {
            if !cancelled(history, seen, i, |op| removes(op, x)) {
                members.insert(x);
            }
        }
    }
    members
}

struct OrSetModel;

impl Model for OrSetModel {
    type State = OrSet<u8>;
    type Op = SetOp;

    fn op() -> BoxedStrategy<SetOp> {
        set_op()
    }

    fn apply(state: &mut OrSet<u8>, node: NodeId, op: &SetOp) -> Option<OrSet<u8>> {
        apply_set(state, node, op, &TEST_LIMITS)
    }

    fn check(
        state: &OrSet<u8>,
        history: &History<OrSet<u8>, SetOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let expected = expected_members(
            history,
            seen,
            |op| match op {
                SetOp::Add(xs) => Some(xs),
                SetOp::Remove(_) => None,
            },
            |op, x| matches!(op, SetOp::Remove(xs) if xs.contains(&x)),
        );
        let actual: BTreeSet<u8> = state.members().copied().collect();
        (actual == expected).then_some(()).ok_or(format!("members {actual:?} != {expected:?}"))
    }
}

#[derive(Clone, Debug)]
enum FlagOp {
    Enable,
    Disable,
}

struct EwFlagModel;

impl Model for EwFlagModel {
    type State = EwFlag;
    type Op = FlagOp;

    fn op() -> BoxedStrategy<FlagOp> {
        prop_oneof![Just(FlagOp::Enable), Just(FlagOp::Disable)].boxed()
    }

    fn apply(state: &mut EwFlag, node: NodeId, op: &FlagOp) -> Option<EwFlag> {
        Some(match op {
            FlagOp::Enable => state.enable(node).expect("a fresh node has dots left"),
            FlagOp::Disable => state.disable(),
        })
    }

    fn check(
        state: &EwFlag,
        history: &History<EwFlag, FlagOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let expected = seen_ops(history, seen).any(|(i, r)| {
            matches!(r.op, FlagOp::Enable)
                && !cancelled(history, seen, i, |op| matches!(op, FlagOp::Disable))
        });
        (state.is_enabled() == expected).then_some(()).ok_or(format!("expected {expected}"))
    }
}

// ---------------------------------------------------------------- maps

#[derive(Clone, Debug)]
enum MapOp<N> {
    Update { key: u8, nested: N },
    Remove { key: u8 },
}

fn map_op<N: Clone + std::fmt::Debug + 'static>(
    nested: BoxedStrategy<N>,
) -> BoxedStrategy<MapOp<N>> {
    prop_oneof![
        4 => (0u8..8, nested).prop_map(|(key, nested)| MapOp::Update { key, nested }),
        1 => (0u8..8).prop_map(|key| MapOp::Remove { key }),
    ]
    .boxed()
}

/// A map of sets: element `x` of field `k` is present iff some add of `x` to `k`
/// was seen by no remove of `x` from `k` and no removal of the field `k`.
struct MapOfSetsModel;

impl Model for MapOfSetsModel {
    type State = OrMap<u8, OrSet<u8>>;
    type Op = MapOp<SetOp>;

    fn op() -> BoxedStrategy<Self::Op> {
        map_op(set_op())
    }

    fn apply(state: &mut Self::State, node: NodeId, op: &Self::Op) -> Option<Self::State> {
        match op {
            MapOp::Update { key, nested } => state
                .update(*key, &TEST_LIMITS, |set| {
                    apply_set(set, node, nested, &TEST_LIMITS).ok_or(
                        calmkv_crdts::CrdtError::LimitExceeded { kind: "set", members: 0, max: 0 },
                    )
                })
                .ok(),
            MapOp::Remove { key } => Some(state.remove(key)),
        }
    }

    fn check(
        state: &Self::State,
        history: &History<Self::State, Self::Op>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let mut expected = BTreeMap::new();
        for key in 0u8..8 {
            let members = expected_members(
                history,
                seen,
                |op| match op {
                    MapOp::Update { key: k, nested: SetOp::Add(xs) } if *k == key => Some(xs),
                    _ => None,
                },
                |op, x| match op {
                    MapOp::Update { key: k, nested: SetOp::Remove(xs) } => {
                        *k == key && xs.contains(&x)
                    }
                    MapOp::Remove { key: k } => *k == key,
                    MapOp::Update { .. } => false,
                },
            );
            if !members.is_empty() {
                expected.insert(key, members);
            }
        }
        let actual: BTreeMap<u8, BTreeSet<u8>> =
            state.fields().map(|(k, set)| (*k, set.members().copied().collect())).collect();
        (actual == expected).then_some(()).ok_or(format!("fields {actual:?} != {expected:?}"))
    }
}

/// A map of counters. A node's update carries its share since the last removal of
/// the field that it had seen; a field shows the shares of the nodes whose latest
/// update no seen removal of the field saw.
struct MapOfCountersModel;

impl Model for MapOfCountersModel {
    type State = OrMap<u8, CausalCounter>;
    type Op = MapOp<CounterOp>;

    fn op() -> BoxedStrategy<Self::Op> {
        map_op(counter_op())
    }

    fn apply(state: &mut Self::State, node: NodeId, op: &Self::Op) -> Option<Self::State> {
        match op {
            MapOp::Update { key, nested } => state
                .update(*key, &TEST_LIMITS, |counter| match *nested {
                    CounterOp::Incr(n) => counter.incr(node, n),
                    CounterOp::Decr(n) => counter.decr(node, n),
                })
                .ok(),
            MapOp::Remove { key } => Some(state.remove(key)),
        }
    }

    fn check(
        state: &Self::State,
        history: &History<Self::State, Self::Op>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let removes =
            |key: u8| move |op: &Self::Op| matches!(op, MapOp::Remove { key: k } if *k == key);
        // The share each update carries, computed in history order.
        let mut share: BTreeMap<usize, i128> = BTreeMap::new();
        let mut latest: BTreeMap<(usize, u8), usize> = BTreeMap::new();
        for (i, record) in history.iter().enumerate() {
            let MapOp::Update { key, nested } = &record.op else {
                continue;
            };
            if record.delta.is_none() {
                continue;
            }
            let amount = match *nested {
                CounterOp::Incr(n) => i128::from(n),
                CounterOp::Decr(n) => -i128::from(n),
            };
            // The replica's previous update of the field carries over unless a
            // removal it had seen covered it.
            let carried = match latest.get(&(record.replica, *key)) {
                Some(&prev) if !cancelled(history, &record.observed, prev, removes(*key)) => {
                    share[&prev]
                }
                _ => 0,
            };
            share.insert(i, carried + amount);
            latest.insert((record.replica, *key), i);
        }
        let mut expected = BTreeMap::new();
        for key in 0u8..8 {
            let mut live = None;
            let mut last_by_replica: BTreeMap<usize, usize> = BTreeMap::new();
            for (i, r) in seen_ops(history, seen) {
                if matches!(r.op, MapOp::Update { key: k, .. } if k == key) {
                    last_by_replica.insert(r.replica, i);
                }
            }
            for &i in last_by_replica.values() {
                if !cancelled(history, seen, i, removes(key)) {
                    *live.get_or_insert(0) += share[&i];
                }
            }
            if let Some(value) = live {
                expected.insert(key, value);
            }
        }
        let actual: BTreeMap<u8, i128> = state.fields().map(|(k, c)| (*k, c.value())).collect();
        (actual == expected).then_some(()).ok_or(format!("fields {actual:?} != {expected:?}"))
    }

    /// Field by field, as for a counter, for the fields the origin never saw
    /// removed: a removal resets a field at the origin, and a receiver that
    /// missed it legitimately still reads the older, larger share.
    fn check_below(
        receiver: &Self::State,
        origin: &Self::State,
        history: &History<Self::State, Self::Op>,
        origin_seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        for (key, counter) in receiver.fields() {
            let removed = seen_ops(history, origin_seen)
                .any(|(_, r)| matches!(r.op, MapOp::Remove { key: k } if k == *key));
            if removed {
                continue;
            }
            let theirs = origin.get(key).unwrap_or_default();
            totals_below(
                (counter.increments(), counter.decrements()),
                (theirs.increments(), theirs.decrements()),
            )
            .map_err(|why| format!("field {key}: {why}"))?;
        }
        Ok(())
    }
}

crdt_properties!(g_counter, GCounterModel);
crdt_properties!(pn_counter, PnCounterModel);
crdt_properties!(causal_counter, CausalCounterModel);
crdt_properties!(lww_register, LwwModel);
crdt_properties!(mv_register, MvModel);
crdt_properties!(or_set, OrSetModel);
crdt_properties!(ew_flag, EwFlagModel);
crdt_properties!(or_map_of_sets, MapOfSetsModel);
crdt_properties!(or_map_of_counters, MapOfCountersModel);

// ---------------------------------------------------------------- a key's value

#[derive(Clone, Debug)]
enum ValueOp {
    Write(u8),
    Set(SetOp),
    Enable,
    /// Delete everything seen, whatever its type.
    Clear,
}

/// A key's value, written with several types at once (as concurrent creations do)
/// and deleted whole: each component behaves like its own type, and a delete or a
/// register write with the key's context cancels every operation it saw, of any
/// type (that is how a client resolves a key created with two types).
struct ValueModel;

impl Model for ValueModel {
    type State = calmkv_crdts::Value;
    type Op = ValueOp;

    fn op() -> BoxedStrategy<ValueOp> {
        prop_oneof![
            2 => any::<u8>().prop_map(ValueOp::Write),
            3 => set_op().prop_map(ValueOp::Set),
            1 => Just(ValueOp::Enable),
            1 => Just(ValueOp::Clear),
        ]
        .boxed()
    }

    fn apply(state: &mut Self::State, node: NodeId, op: &ValueOp) -> Option<Self::State> {
        match op {
            ValueOp::Write(value) => state
                .with_register(|r| {
                    let seen = r.context().clone();
                    r.write(node, serde_bytes::ByteBuf::from(vec![*value]), &seen, &TEST_LIMITS)
                })
                .ok(),
            ValueOp::Set(op) => state
                .with_set(|s| {
                    let set: &mut OrSet<String> = s;
                    match op {
                        SetOp::Add(xs) => {
                            set.add_all(node, xs.iter().map(u8::to_string), &TEST_LIMITS)
                        }
                        SetOp::Remove(xs) => {
                            let xs: Vec<String> = xs.iter().map(u8::to_string).collect();
                            Ok(set.remove_all(&xs))
                        }
                    }
                })
                .ok(),
            ValueOp::Enable => state.with_flag(|f| f.enable(node)).ok(),
            ValueOp::Clear => Some(state.clear()),
        }
    }

    fn check(
        state: &Self::State,
        history: &History<Self::State, ValueOp>,
        seen: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let clear = |op: &ValueOp| matches!(op, ValueOp::Clear | ValueOp::Write(_));
        let mut writes: Vec<u8> = seen_ops(history, seen)
            .filter(|&(i, _)| {
                !cancelled(history, seen, i, |op| matches!(op, ValueOp::Write(_) | ValueOp::Clear))
            })
            .filter_map(|(_, r)| match r.op {
                ValueOp::Write(v) => Some(v),
                _ => None,
            })
            .collect();
        writes.sort_unstable();
        let mut values: Vec<u8> = state.register().values().map(|v| v[0]).collect();
        values.sort_unstable();
        let members = expected_members(
            history,
            seen,
            |op| match op {
                ValueOp::Set(SetOp::Add(xs)) => Some(xs),
                _ => None,
            },
            |op, x| clear(op) || matches!(op, ValueOp::Set(SetOp::Remove(xs)) if xs.contains(&x)),
        );
        let actual: BTreeSet<u8> = state.set().members().map(|m| m.parse().unwrap()).collect();
        let enabled = seen_ops(history, seen)
            .any(|(i, r)| matches!(r.op, ValueOp::Enable) && !cancelled(history, seen, i, clear));
        if values != writes || actual != members || state.flag().is_enabled() != enabled {
            return Err(format!(
                "register {values:?} (expected {writes:?}), set {actual:?} (expected {members:?}), flag expected {enabled}"
            ));
        }
        let kinds = state.kinds();
        let expected_kinds = [!writes.is_empty(), !members.is_empty(), enabled];
        let present =
            [calmkv_crdts::Kind::Register, calmkv_crdts::Kind::Set, calmkv_crdts::Kind::Flag]
                .map(|k| kinds.contains(&k));
        (present == expected_kinds).then_some(()).ok_or(format!("kinds {kinds:?}"))
    }
}

crdt_properties!(value, ValueModel);

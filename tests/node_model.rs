//! The node against a sequential model: random operations on a few keys, run on a
//! node over the memory engine and one over sled (reopened at random points), with
//! every read compared to a plain-Rust model of what one node must show. Refused
//! operations must leave the stored envelope byte-for-byte unchanged.
//! `PROPTEST_CASES` raises the number of sequences (default 48).

use bytes::Bytes;
use calmkv::store::Durability;
use calmkv::{
    Action, Config, CounterOp, CrdtOp, FlagOp, Key, Limits, MapOp, Node, NodeError, Op, SetOp,
    TypedValue,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const KEYS: [&str; 3] = ["a", "b/1", "b/2"];

#[derive(Clone, Debug)]
enum Step {
    Put(usize, u8),
    PutLww(usize, u8),
    Delete(usize),
    Counter(usize, i8),
    Set(usize, u8, bool),
    Flag(usize, bool),
    MapField(usize, u8, i8),
    MapRemove(usize, u8),
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let k = 0..KEYS.len();
    prop_oneof![
        (k.clone(), any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        (k.clone(), any::<u8>()).prop_map(|(k, v)| Step::PutLww(k, v)),
        k.clone().prop_map(Step::Delete),
        (k.clone(), any::<i8>()).prop_map(|(k, n)| Step::Counter(k, n)),
        (k.clone(), 0u8..4, any::<bool>()).prop_map(|(k, m, add)| Step::Set(k, m, add)),
        (k.clone(), any::<bool>()).prop_map(|(k, on)| Step::Flag(k, on)),
        (k.clone(), 0u8..3, any::<i8>()).prop_map(|(k, f, n)| Step::MapField(k, f, n)),
        (k, 0u8..3).prop_map(|(k, f)| Step::MapRemove(k, f)),
        Just(Step::Reopen),
    ]
}

/// What one node must show for a key.
#[derive(Clone, Debug, PartialEq)]
enum Model {
    Register(u8),
    Lww(u8),
    Counter(i128),
    Set(BTreeSet<u8>),
    Flag,
    Map(BTreeMap<u8, i128>),
}

impl Model {
    fn type_name(&self) -> &'static str {
        match self {
            Model::Register(_) => "register",
            Model::Lww(_) => "lww",
            Model::Counter(_) => "counter",
            Model::Set(_) => "set",
            Model::Flag => "flag",
            Model::Map(_) => "map",
        }
    }

    fn as_read(&self) -> TypedValue {
        match self {
            Model::Register(v) => TypedValue::Register(vec![Bytes::from(vec![*v])]),
            Model::Lww(v) => TypedValue::Lww(Bytes::from(vec![*v])),
            Model::Counter(n) => TypedValue::Counter(*n),
            Model::Set(members) => TypedValue::Set(members.iter().map(|m| m.to_string()).collect()),
            Model::Flag => TypedValue::Flag(true),
            Model::Map(fields) => TypedValue::Map(
                fields
                    .iter()
                    .map(|(f, n)| (f.to_string(), vec![TypedValue::Counter(*n)]))
                    .collect(),
            ),
        }
    }
}

fn counter(n: i8) -> CrdtOp {
    let amount = u64::from(n.unsigned_abs());
    CrdtOp::Counter(if n >= 0 { CounterOp::Incr(amount) } else { CounterOp::Decr(amount) })
}

/// The operation, and the model after it (`None` when the key ends absent), or the
/// type the key holds when the model says the operation must be refused.
fn step_op(
    node: &Node,
    model: Option<&Model>,
    step: &Step,
) -> (Op, Result<Option<Model>, &'static str>) {
    let key_index = match step {
        Step::Put(k, _) | Step::PutLww(k, _) | Step::Delete(k) | Step::Counter(k, _) => *k,
        Step::Set(k, ..) | Step::Flag(k, _) | Step::MapField(k, ..) | Step::MapRemove(k, _) => *k,
        Step::Reopen => unreachable!(),
    };
    let key = Key::new(KEYS[key_index], &Limits::default()).unwrap();
    let (action, wanted, next) = match (step, model) {
        (Step::Delete(_), _) => (Action::Delete { context: None }, None, None),
        (Step::Put(_, v), _) => {
            // Read-modify-write: the write carries the context of a read.
            let context = node.read(&key).unwrap().map(|r| r.context);
            let action = Action::Put { value: Bytes::from(vec![*v]), context, if_absent: false };
            (action, Some("register"), Some(Model::Register(*v)))
        }
        (Step::PutLww(_, v), _) => {
            (Action::PutLww { value: Bytes::from(vec![*v]) }, Some("lww"), Some(Model::Lww(*v)))
        }
        (Step::Counter(_, n), m) => {
            let before = match m {
                Some(Model::Counter(c)) => *c,
                _ => 0,
            };
            (
                Action::Crdt(counter(*n)),
                Some("counter"),
                Some(Model::Counter(before + i128::from(*n))),
            )
        }
        (Step::Set(_, member, add), m) => {
            let mut members = match m {
                Some(Model::Set(s)) => s.clone(),
                _ => BTreeSet::new(),
            };
            let op = if *add {
                members.insert(*member);
                SetOp { add: vec![member.to_string()], remove: vec![] }
            } else {
                members.remove(member);
                SetOp { add: vec![], remove: vec![member.to_string()] }
            };
            let next = (!members.is_empty()).then_some(Model::Set(members));
            (Action::Crdt(CrdtOp::Set(op)), Some("set"), next)
        }
        (Step::Flag(_, on), _) => {
            let op = if *on { FlagOp::Enable } else { FlagOp::Disable };
            (Action::Crdt(CrdtOp::Flag(op)), Some("flag"), on.then_some(Model::Flag))
        }
        (Step::MapField(_, field, n), m) => {
            let mut fields = match m {
                Some(Model::Map(f)) => f.clone(),
                _ => BTreeMap::new(),
            };
            *fields.entry(*field).or_insert(0) += i128::from(*n);
            let op = MapOp { update: [(field.to_string(), counter(*n))].into(), remove: vec![] };
            (Action::Crdt(CrdtOp::Map(op)), Some("map"), Some(Model::Map(fields)))
        }
        (Step::MapRemove(_, field), m) => {
            let mut fields = match m {
                Some(Model::Map(f)) => f.clone(),
                _ => BTreeMap::new(),
            };
            fields.remove(field);
            let op = MapOp { update: BTreeMap::new(), remove: vec![field.to_string()] };
            (
                Action::Crdt(CrdtOp::Map(op)),
                Some("map"),
                (!fields.is_empty()).then_some(Model::Map(fields)),
            )
        }
        (Step::Reopen, _) => unreachable!(),
    };
    let outcome = match (model, wanted) {
        (Some(current), Some(wanted)) if current.type_name() != wanted => Err(current.type_name()),
        (current, _) if matches!(step, Step::MapRemove(..)) && current.is_none() => Ok(None),
        _ => Ok(next),
    };
    (Op { key, action }, outcome)
}

fn open(dir: &std::path::Path) -> Node {
    Config { durability: Durability::None, ..Config::new(dir) }.open_node().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(48)
    ))]

    #[test]
    fn prop_a_node_behaves_like_the_sequential_model(steps in prop::collection::vec(step(), 1..50)) {
        let dir = tempfile::tempdir().unwrap();
        let memory = Config::in_memory().open_node().unwrap();
        let mut disk = Some(open(dir.path()));
        let mut model: BTreeMap<usize, Model> = BTreeMap::new();
        for step in &steps {
            if matches!(step, Step::Reopen) {
                drop(disk.take());
                disk = Some(open(dir.path()));
                continue;
            }
            let index = op_key(step);
            let current = model.get(&index).cloned();
            let mut outcome = None;
            for node in [&memory, disk.as_ref().unwrap()] {
                let (op, expected) = step_op(node, current.as_ref(), step);
                let before = node.envelope(&op.key).unwrap();
                match (node.apply(&op), &expected) {
                    (Err(NodeError::TypeMismatch { found, .. }), Err(holds)) => {
                        prop_assert_eq!(found.as_str(), *holds);
                        prop_assert_eq!(&node.envelope(&op.key).unwrap(), &before, "a refused op changed the key");
                    }
                    (Ok(_), Ok(_)) => {}
                    (result, expected) => prop_assert!(false, "{:?}: got {:?}, expected {:?}", step, result.map(|_| ()), expected),
                }
                outcome = Some(expected);
            }
            match outcome.expect("two nodes ran the step") {
                Ok(Some(next)) => { model.insert(index, next); }
                Ok(None) => { model.remove(&index); }
                Err(_) => {}
            }
            for node in [&memory, disk.as_ref().unwrap()] {
                for (i, key) in KEYS.iter().enumerate() {
                    let read = node.read(&Key::new(*key, &Limits::default()).unwrap()).unwrap();
                    let actual = read.map(|r| r.values);
                    prop_assert_eq!(actual, model.get(&i).map(|m| vec![m.as_read()]), "key {} after {:?}", key, step);
                }
            }
        }
    }
}

fn op_key(step: &Step) -> usize {
    match step {
        Step::Put(k, _) | Step::PutLww(k, _) | Step::Delete(k) | Step::Counter(k, _) => *k,
        Step::Set(k, ..) | Step::Flag(k, _) | Step::MapField(k, ..) | Step::MapRemove(k, _) => *k,
        Step::Reopen => unreachable!(),
    }
}

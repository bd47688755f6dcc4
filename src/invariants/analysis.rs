//! The I-confluence analysis: for each rule and each kind of operation, may
//! replicas run it without coordination and still never break the rule when
//! their states merge?
//!
//! The verdicts are the table of docs/design.md §6, specialised to calmkv's types.
//! Each verdict that needs the quorum comes with a counterexample that is
//! *computed*, not written down: a bounded search runs real operations
//! ([`crate::node::execute`]) on two replicas diverging from a common ancestor
//! and merges them ([`Crdt::merge`]), until both sides satisfy the rule and
//! their merge does not.

use super::Rule;
use crate::envelope::{Envelope, KeyType};
use crate::op::{Action, CounterOp, CrdtOp, Key, Op, SetOp};
use crate::Limits;
use calmkv_crdts::{Crdt, Hlc, NodeId};
use serde::Serialize;
use std::fmt;

/// The kinds of operation the analysis distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// Counter increment.
    Incr,
    /// Counter decrement.
    Decr,
    /// Set add.
    Add,
    /// Set remove.
    Remove,
    /// Register write where the key has no value yet (`If-None-Match: *`, or a
    /// write without a context).
    Create,
    /// Register write with the context of a read of an existing value.
    Update,
    /// Delete of the key.
    Delete,
}

impl OpKind {
    /// Every kind, in table order.
    pub const ALL: [OpKind; 7] = [
        OpKind::Incr,
        OpKind::Decr,
        OpKind::Add,
        OpKind::Remove,
        OpKind::Create,
        OpKind::Update,
        OpKind::Delete,
    ];

    /// The name used by `GET /v1/explain?op=` and `calmkv explain`.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Incr => "incr",
            OpKind::Decr => "decr",
            OpKind::Add => "add",
            OpKind::Remove => "remove",
            OpKind::Create => "create",
            OpKind::Update => "update",
            OpKind::Delete => "delete",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kinds that apply to keys of type `key_type`.
    pub fn for_type(key_type: KeyType) -> &'static [OpKind] {
        match key_type {
            KeyType::Counter => &[OpKind::Incr, OpKind::Decr, OpKind::Delete],
            KeyType::Set => &[OpKind::Add, OpKind::Remove, OpKind::Delete],
            KeyType::Register => &[OpKind::Create, OpKind::Update, OpKind::Delete],
            _ => &[],
        }
    }

    /// The kinds `op` performs on a key declared of type `declared`; `None`
    /// when the operation is for another type.
    pub fn of(op: &Op, declared: KeyType) -> Option<Vec<OpKind>> {
        let kinds = match (&op.action, declared) {
            (Action::Delete { .. }, _) => vec![OpKind::Delete],
            (Action::Crdt(CrdtOp::Counter(CounterOp::Incr(_))), KeyType::Counter) => {
                vec![OpKind::Incr]
            }
            (Action::Crdt(CrdtOp::Counter(CounterOp::Decr(_))), KeyType::Counter) => {
                vec![OpKind::Decr]
            }
            (Action::Crdt(CrdtOp::Set(SetOp { add, remove })), KeyType::Set) => {
                let mut kinds = Vec::new();
                if !add.is_empty() {
                    kinds.push(OpKind::Add);
                }
                if !remove.is_empty() {
                    kinds.push(OpKind::Remove);
                }
                kinds
            }
            (Action::Put { context, if_absent, .. }, KeyType::Register) => {
                let based_on_a_value = context.as_ref().is_some_and(|c| !c.is_empty());
                if *if_absent || !based_on_a_value {
                    vec![OpKind::Create]
                } else {
                    vec![OpKind::Update]
                }
            }
            _ => return None,
        };
        Some(kinds)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether an operation kind may run locally under a rule, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `true`: local, no coordination; `false`: through the quorum.
    pub confluent: bool,
    /// Why, in one or two sentences.
    pub reason: &'static str,
}

/// The verdict for `kind` under `rule`. Kinds of another type than the rule's
/// are confluent here (they are refused as a type mismatch before routing).
pub fn verdict(rule: &Rule, kind: OpKind) -> Verdict {
    let local = |reason| Verdict { confluent: true, reason };
    let quorum = |reason| Verdict { confluent: false, reason };
    match (rule, kind) {
        (Rule::Counter { min: Some(_), .. }, OpKind::Decr) => quorum(
            "Two replicas can each decrement a value just above `min` and stay valid; \
             the merge subtracts both decrements and goes below `min`.",
        ),
        (Rule::Counter { max: Some(_), .. }, OpKind::Incr) => quorum(
            "Two replicas can each increment a value just below `max` and stay valid; \
             the merge adds both increments and goes above `max`.",
        ),
        (Rule::Counter { .. }, OpKind::Incr) => local(
            "Increments only raise the value, and the merge of two raised replicas is \
             higher than either: no merge can cross `min`.",
        ),
        (Rule::Counter { .. }, OpKind::Decr) => local(
            "Decrements only lower the value, and the merge of two lowered replicas is \
             lower than either: no merge can cross `max`.",
        ),
        (Rule::Counter { .. }, OpKind::Delete) => quorum(
            "A delete resets the increments and decrements it observed; an operation it \
             did not observe survives on its own, so the merged value can land outside \
             the bounds (and 0 itself may be outside them).",
        ),
        (Rule::Set { max_size: Some(_), .. }, OpKind::Add) => quorum(
            "Two replicas can each add a different member to a set one below `max_size` \
             and stay valid; the merge holds both members and is too large.",
        ),
        (Rule::Set { min_size: Some(_), .. }, OpKind::Remove) => quorum(
            "Two replicas can each remove a different member of a set one above \
             `min_size` and stay valid; the merge lacks both members and is too small.",
        ),
        (Rule::Set { min_size: Some(_), .. }, OpKind::Delete) => quorum(
            "A delete empties the members it observed; the merge keeps only concurrent \
             adds, which may be fewer than `min_size`.",
        ),
        (Rule::Set { .. }, OpKind::Add) => local(
            "Adds only grow the set, and the merge holds every member of both replicas: \
             no merge can fall below `min_size`.",
        ),
        (Rule::Set { .. }, OpKind::Remove | OpKind::Delete) => local(
            "Removes only shrink what they observed; the merge holds no member that is \
             not on one of the replicas, so it is no larger than the larger: no merge \
             can exceed `max_size`.",
        ),
        (Rule::Unique, OpKind::Create) => quorum(
            "Two replicas that both see the key absent can each create it; the merge \
             holds both creations, so the key was claimed twice.",
        ),
        (Rule::Unique, OpKind::Update) => local(
            "An update is based on a read of the existing value: concurrent updates \
             become siblings of the one claim, never a second creation.",
        ),
        (Rule::Unique, OpKind::Delete) => local(
            "A delete ends the claim; a concurrent update survives it (add-wins), still \
             one claim. Creating the key again goes through the quorum.",
        ),
        _ => local("The rule says nothing about this kind of operation."),
    }
}

/// Two replicas diverging from a common ancestor, each satisfying the rule,
/// whose merge does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counterexample {
    /// The common ancestor.
    pub ancestor: String,
    /// The operation the left replica ran, and its state after it.
    pub left: Side,
    /// The operation the right replica ran, and its state after it.
    pub right: Side,
    /// The merge of both, which breaks the rule.
    pub merged: String,
    /// The left replica's state (for checking the counterexample by merging).
    #[serde(skip)]
    pub left_state: Envelope,
    /// The right replica's state.
    #[serde(skip)]
    pub right_state: Envelope,
}

/// One replica of a [`Counterexample`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    /// The operation.
    pub op: String,
    /// The state after it.
    pub state: String,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "from {}: one replica runs `{}` ({}), another runs `{}` ({}); both are valid, their merge is {}",
            self.ancestor, self.left.op, self.left.state, self.right.op, self.right.state, self.merged
        )
    }
}

/// Largest set an ancestor of the search may have: bounds above it are
/// explained without a computed counterexample.
const SEARCH_SET_SIZE_MAX: u64 = 10_000;

const ANCESTOR: NodeId = NodeId(1);
const LEFT: NodeId = NodeId(2);
const RIGHT: NodeId = NodeId(3);

/// A replica of the search: its state and the creations it made.
#[derive(Clone)]
struct Replica {
    state: Envelope,
    created: Vec<Vec<u8>>,
}

fn key() -> Key {
    Key::new("k", &Limits::default()).expect("a valid key")
}

fn now() -> Hlc {
    Hlc::default()
}

fn run(state: &Envelope, action: Action, actor: NodeId) -> Option<Envelope> {
    let mut state = state.clone();
    crate::node::execute(&mut state, &Op { key: key(), action }, actor, now(), &Limits::default())
        .ok()
        .map(|_| state)
}

/// A concrete operation of the search: its description and action.
struct Candidate {
    text: String,
    action: Action,
}

fn counter(op: CounterOp) -> Action {
    Action::Crdt(CrdtOp::Counter(op))
}

fn set(add: Vec<String>, remove: Vec<String>) -> Action {
    Action::Crdt(CrdtOp::Set(SetOp { add, remove }))
}

/// Ancestors near the rule's bounds, each valid under it.
fn ancestors(rule: &Rule) -> Vec<Envelope> {
    let mut states = Vec::new();
    match *rule {
        Rule::Counter { min, max } => {
            let mut values: Vec<i64> = vec![-2, -1, 0, 1, 2];
            for bound in [min, max].into_iter().flatten() {
                values.extend([bound.saturating_sub(2), bound.saturating_sub(1), bound]);
                values.extend([bound.saturating_add(1), bound.saturating_add(2)]);
            }
            values.sort();
            values.dedup();
            for value in values {
                let action = if value >= 0 {
                    counter(CounterOp::Incr(value.unsigned_abs()))
                } else {
                    counter(CounterOp::Decr(value.unsigned_abs()))
                };
                if let Some(state) = run(&Envelope::default(), action, ANCESTOR) {
                    states.push(state);
                }
            }
        }
        Rule::Set { min_size, max_size } => {
            let mut sizes: Vec<u64> = vec![0, 1, 2];
            for bound in [min_size, max_size].into_iter().flatten() {
                sizes.extend([bound.saturating_sub(1), bound, bound + 1]);
            }
            sizes.retain(|&s| s <= SEARCH_SET_SIZE_MAX);
            sizes.sort();
            sizes.dedup();
            for size in sizes {
                let members = (0..size).map(|i| format!("m{i}")).collect();
                if let Some(state) = run(&Envelope::default(), set(members, vec![]), ANCESTOR) {
                    states.push(state);
                }
            }
        }
        Rule::Unique => {
            states.push(Envelope::default());
            let write = Action::Put { value: "first".into(), context: None, if_absent: true };
            states.extend(run(&Envelope::default(), write, ANCESTOR));
        }
    }
    states.retain(|s| rule.holds(s));
    states
}

/// Operations of `kind` a replica (`side` names its fresh values) can run
/// on `ancestor`, near the rule's bounds.
fn candidates(rule: &Rule, kind: OpKind, ancestor: &Envelope, side: &str) -> Vec<Candidate> {
    let value = ancestor.value.counter().value();
    let mut amounts: Vec<u64> = vec![1, 2];
    if let Rule::Counter { min, max } = *rule {
        for bound in [min, max].into_iter().flatten() {
            let distance = (i128::from(bound) - value).unsigned_abs();
            amounts.extend(u64::try_from(distance).ok().filter(|&d| d > 0));
        }
    }
    amounts.sort();
    amounts.dedup();
    let members: Vec<String> = ancestor.value.set().members().cloned().collect();
    match kind {
        OpKind::Incr => amounts
            .iter()
            .map(|&n| Candidate { text: format!("incr {n}"), action: counter(CounterOp::Incr(n)) })
            .collect(),
        OpKind::Decr => amounts
            .iter()
            .map(|&n| Candidate { text: format!("decr {n}"), action: counter(CounterOp::Decr(n)) })
            .collect(),
        OpKind::Add => {
            let fresh = format!("{side}-member");
            let mut out = vec![Candidate {
                text: format!("add {fresh:?}"),
                action: set(vec![fresh.clone()], vec![]),
            }];
            out.extend(members.first().map(|m| Candidate {
                text: format!("add {m:?}"),
                action: set(vec![m.clone()], vec![]),
            }));
            out
        }
        OpKind::Remove => members
            .iter()
            .take(3)
            .map(|m| Candidate {
                text: format!("remove {m:?}"),
                action: set(vec![], vec![m.clone()]),
            })
            .collect(),
        OpKind::Create => vec![Candidate {
            text: format!("create {side:?}"),
            action: Action::Put {
                value: side.as_bytes().to_vec().into(),
                context: None,
                if_absent: true,
            },
        }],
        OpKind::Update => {
            let context = ancestor.value.context().clone();
            vec![Candidate {
                text: format!("update to {side:?}"),
                action: Action::Put {
                    value: side.as_bytes().to_vec().into(),
                    context: Some(context),
                    if_absent: false,
                },
            }]
        }
        OpKind::Delete => vec![Candidate {
            text: "delete".to_string(),
            action: Action::Delete { context: Some(ancestor.value.context().clone()) },
        }],
    }
}

/// Whether the merge of two valid replicas breaks the rule. For `unique` the
/// rule is about history: broken when the merge holds two creations.
fn broken(rule: &Rule, merged: &Envelope, left: &Replica, right: &Replica) -> bool {
    match rule {
        Rule::Unique => {
            let values: Vec<Vec<u8>> =
                merged.value.register().values().map(|v| v.to_vec()).collect();
            let live =
                |created: &Vec<Vec<u8>>| created.iter().filter(|c| values.contains(c)).count();
            live(&left.created) + live(&right.created) > 1
        }
        _ => !rule.holds(merged),
    }
}

fn describe(rule: &Rule, state: &Envelope) -> String {
    match rule {
        Rule::Counter { .. } => format!("value {}", state.value.counter().value()),
        Rule::Set { .. } => {
            let set = state.value.set();
            let members: Vec<&String> = set.members().collect();
            let shown: Vec<String> = members.iter().take(6).map(|m| format!("{m:?}")).collect();
            let more = if members.len() > 6 { ", …" } else { "" };
            format!("{} members {{{}{more}}}", members.len(), shown.join(", "))
        }
        Rule::Unique => {
            let values: Vec<String> = state
                .value
                .register()
                .values()
                .map(|v| format!("{:?}", String::from_utf8_lossy(v)))
                .collect();
            if values.is_empty() {
                "absent".to_string()
            } else {
                format!("values [{}]", values.join(", "))
            }
        }
    }
}

/// Searches for two replicas that run an operation of a kind in `left_kinds`
/// and one of a kind in `right_kinds` from a common valid ancestor, each
/// staying valid, whose merge breaks `rule`.
pub fn search(
    rule: &Rule,
    left_kinds: &[OpKind],
    right_kinds: &[OpKind],
) -> Option<Counterexample> {
    for ancestor in ancestors(rule) {
        let start = Replica { state: ancestor.clone(), created: vec![] };
        for &lk in left_kinds {
            for left_op in candidates(rule, lk, &ancestor, "left") {
                let Some(left) = step(rule, &start, &left_op, lk, LEFT) else { continue };
                for &rk in right_kinds {
                    for right_op in candidates(rule, rk, &ancestor, "right") {
                        let Some(right) = step(rule, &start, &right_op, rk, RIGHT) else {
                            continue;
                        };
                        let merged = left.state.merged(&right.state);
                        if broken(rule, &merged, &left, &right) {
                            return Some(Counterexample {
                                ancestor: describe(rule, &ancestor),
                                left: Side { op: left_op.text, state: describe(rule, &left.state) },
                                right: Side {
                                    op: right_op.text,
                                    state: describe(rule, &right.state),
                                },
                                merged: describe(rule, &merged),
                                left_state: left.state,
                                right_state: right.state,
                            });
                        }
                    }
                }
            }
        }
    }
    None
}

/// One replica's step: `None` when the operation fails or leaves the replica
/// invalid (a valid replica would not have run it).
fn step(
    rule: &Rule,
    from: &Replica,
    op: &Candidate,
    kind: OpKind,
    actor: NodeId,
) -> Option<Replica> {
    let state = run(&from.state, op.action.clone(), actor)?;
    if !rule.holds(&state) {
        return None;
    }
    let mut created = from.created.clone();
    if kind == OpKind::Create {
        if let Action::Put { value, .. } = &op.action {
            created.push(value.to_vec());
        }
    }
    Some(Replica { state, created })
}

/// The counterexample of a verdict that needs the quorum: both replicas run
/// the kind. `None` for confluent verdicts, and where the search is bounded
/// out (a set bound above 10,000 members).
pub fn counterexample(rule: &Rule, kind: OpKind) -> Option<Counterexample> {
    if verdict(rule, kind).confluent {
        return None;
    }
    search(rule, &[kind], &[kind])
        .or_else(|| search(rule, &[kind], OpKind::for_type(rule.key_type())))
}

//! Admission of remote states: a delta, an anti-entropy state or a read reply
//! from a peer is checked against the limits a local write obeys before it is
//! merged. A state that crosses one is refused whole (not merged, counted as
//! `calmkv_replication_states_refused_total`); the rest of its frame is kept.
//!
//! What is checked, and why each bound holds for any state correct nodes make:
//!
//! - map nesting depth ≤ `map_depth_max`, value and LWW sizes ≤
//!   `value_bytes_max`, set member and field name sizes ≤ `member_bytes_max`:
//!   every write is checked against them and a merge never deepens or
//!   lengthens anything;
//! - siblings per register ≤ `siblings_max × replicas` and members per set or
//!   fields per map ≤ `members_max × replicas`: each replica refuses a local
//!   write past the bound in its own view, so concurrent writers on `replicas`
//!   nodes can together reach at most that many. Refusing less would split
//!   replicas forever (merges must not refuse what correct nodes produced);
//! - dot counters ≤ [`DOT_COUNTER_MAX`]: no node makes 2^62 writes to one key,
//!   and a counter near `u64::MAX` would leave no room for the next write.
//!
//! Each check stops at the first violation, and depth is checked on the way
//! down, so the cost is bounded by the state's size times `map_depth_max`.

use crate::envelope::Envelope;
use crate::Limits;
use calmkv_crdts::{NodeId, Value};

/// Highest dot counter a remote state may carry.
pub const DOT_COUNTER_MAX: u64 = 1 << 62;

/// Why a remote state was refused. Nothing was merged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateRefused {
    /// Maps nested deeper than local writes may nest them.
    #[error("maps nested deeper than {max}")]
    TooDeep {
        /// The bound.
        max: usize,
    },
    /// A register value or LWW value larger than a local write may store.
    #[error("a value of {bytes} bytes exceeds the limit of {max}")]
    ValueTooLarge {
        /// Its size.
        bytes: usize,
        /// The bound.
        max: usize,
    },
    /// A set member or map field name longer than a local write may store.
    #[error("a member or field name of {bytes} bytes exceeds the limit of {max}")]
    NameTooLong {
        /// Its size.
        bytes: usize,
        /// The bound.
        max: usize,
    },
    /// More siblings than the replicas could have written concurrently.
    #[error("{count} siblings exceed the limit of {max}")]
    TooManySiblings {
        /// How many.
        count: usize,
        /// The bound (per-replica limit times replicas).
        max: usize,
    },
    /// More set members or map fields than the replicas could have added.
    #[error("{count} members exceed the limit of {max}")]
    TooManyMembers {
        /// How many.
        count: usize,
        /// The bound (per-replica limit times replicas).
        max: usize,
    },
    /// A dot counter no node reaches, near exhaustion.
    #[error("a dot counter {counter} of node {node} exceeds {DOT_COUNTER_MAX}")]
    CounterTooHigh {
        /// The node named.
        node: NodeId,
        /// Its counter.
        counter: u64,
    },
}

/// Checks a remote state against `limits`, for a key with `replicas` replicas
/// (at least 1).
pub fn check(state: &Envelope, limits: &Limits, replicas: usize) -> Result<(), StateRefused> {
    let replicas = replicas.max(1);
    check_context(state.value.context())?;
    if let Some(value) = state.lww.get() {
        check_value_size(value.len(), limits)?;
    }
    check_value(&state.value, limits, replicas, 0)
}

fn check_context(context: &calmkv_crdts::CausalContext) -> Result<(), StateRefused> {
    let vv = context.vv().iter();
    let cloud = context.cloud().iter().map(|dot| (dot.node, dot.counter));
    match vv.chain(cloud).find(|(_, counter)| *counter > DOT_COUNTER_MAX) {
        Some((node, counter)) => Err(StateRefused::CounterTooHigh { node, counter }),
        None => Ok(()),
    }
}

fn check_value_size(bytes: usize, limits: &Limits) -> Result<(), StateRefused> {
    if bytes > limits.value_bytes_max {
        return Err(StateRefused::ValueTooLarge { bytes, max: limits.value_bytes_max });
    }
    Ok(())
}

fn check_name(bytes: usize, limits: &Limits) -> Result<(), StateRefused> {
    if bytes > limits.member_bytes_max {
        return Err(StateRefused::NameTooLong { bytes, max: limits.member_bytes_max });
    }
    Ok(())
}

fn check_count(count: usize, per_replica: usize, replicas: usize) -> Result<(), StateRefused> {
    let max = per_replica.saturating_mul(replicas);
    if count > max {
        return Err(StateRefused::TooManyMembers { count, max });
    }
    Ok(())
}

/// `depth` counts the maps above `value` (0 at the key).
fn check_value(
    value: &Value,
    limits: &Limits,
    replicas: usize,
    depth: usize,
) -> Result<(), StateRefused> {
    let register = value.register();
    let max = limits.siblings_max.saturating_mul(replicas);
    if register.len() > max {
        return Err(StateRefused::TooManySiblings { count: register.len(), max });
    }
    register.values().try_for_each(|v| check_value_size(v.len(), limits))?;
    let set = value.set();
    check_count(set.len(), limits.members_max, replicas)?;
    set.members().try_for_each(|m| check_name(m.len(), limits))?;
    let map = value.map();
    if map.is_empty() {
        return Ok(());
    }
    if depth + 1 > limits.map_depth_max {
        return Err(StateRefused::TooDeep { max: limits.map_depth_max });
    }
    check_count(map.len(), limits.members_max, replicas)?;
    for (name, field) in map.fields() {
        check_name(name.len(), limits)?;
        check_value(&field, limits, replicas, depth + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Action, CrdtOp, Key, MapOp, Op};
    use crate::Config;
    use calmkv_crdts::Crdt;
    use std::collections::BTreeMap;

    fn nested(depth: usize) -> CrdtOp {
        let mut op = CrdtOp::Register("leaf".into());
        for _ in 0..depth {
            op = CrdtOp::Map(MapOp { update: BTreeMap::from([("f".into(), op)]), remove: vec![] });
        }
        op
    }

    fn state_of(op: CrdtOp, limits: Limits) -> Envelope {
        let node = Config { limits, ..Config::in_memory() }.open_node().unwrap();
        let key = Key::new("k", node.limits()).unwrap();
        node.apply(&Op { key, action: Action::Crdt(op) }).unwrap().state
    }

    #[test]
    fn maps_nested_as_deep_as_a_local_write_may_are_admitted_and_deeper_refused() {
        let limits = Limits::default();
        let ok = state_of(nested(limits.map_depth_max), limits.clone());
        assert_eq!(check(&ok, &limits, 1), Ok(()));
        let deep_limits = Limits { map_depth_max: 20, ..Limits::default() };
        let deep = state_of(nested(limits.map_depth_max + 1), deep_limits);
        assert_eq!(check(&deep, &limits, 3), Err(StateRefused::TooDeep { max: 8 }));
    }

    #[test]
    fn a_value_larger_than_a_local_write_may_store_is_refused() {
        let big = Limits {
            value_bytes_max: 100,
            member_bytes_max: 10,
            body_bytes_max: 200,
            ..Limits::default()
        };
        let small = Limits {
            value_bytes_max: 10,
            member_bytes_max: 10,
            body_bytes_max: 200,
            ..Limits::default()
        };
        let state = state_of(CrdtOp::Register("x".repeat(50)), big);
        assert_eq!(
            check(&state, &small, 1),
            Err(StateRefused::ValueTooLarge { bytes: 50, max: 10 })
        );
    }

    #[test]
    fn siblings_are_bounded_by_what_the_replicas_could_write_together() {
        let mut state = Envelope::default();
        for _ in 0..3 {
            // Three nodes each write a sibling concurrently.
            state.merge(&state_of(nested(0), Limits::default()));
        }
        let one = Limits { siblings_max: 1, ..Limits::default() };
        assert_eq!(check(&state, &one, 3), Ok(()));
        assert_eq!(check(&state, &one, 2), Err(StateRefused::TooManySiblings { count: 3, max: 2 }));
    }
}

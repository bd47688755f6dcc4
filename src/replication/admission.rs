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
//! - dot counters ≤ [`calmkv_crdts::Limits::DOT_COUNTER_MAX`]: no node makes
//!   2^62 writes to one key, and a counter near `u64::MAX` would leave no room
//!   for the next write;
//! - context entries ≤ `context_entries_max`, every held dot seen by the
//!   context, no empty member or field: what merges and mutators always keep.
//!
//! The rules live in [`calmkv_crdts::Value::validate`]; this module scales
//! the bounds for the replicas. Each check stops at the first violation.

use crate::envelope::Envelope;
use crate::Limits;
use calmkv_crdts::CrdtError;

/// Why a remote state was refused. Nothing was merged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateRefused {
    /// An LWW value larger than a local write may store.
    #[error("a value of {bytes} bytes exceeds the limit of {max}")]
    ValueTooLarge {
        /// Its size.
        bytes: usize,
        /// The bound.
        max: usize,
    },
    /// The causal part breaks a bound or a rule
    /// ([`calmkv_crdts::Value::validate`]).
    #[error(transparent)]
    Invalid(#[from] CrdtError),
}

/// Checks a remote state against `limits`, for a key with `replicas` replicas
/// (at least 1): [`calmkv_crdts::Value::validate`] with the member and
/// sibling bounds scaled by the replicas, plus the LWW value's size.
pub fn check(state: &Envelope, limits: &Limits, replicas: usize) -> Result<(), StateRefused> {
    let replicas = replicas.max(1);
    if let Some(value) = state.lww.get() {
        if value.len() > limits.value_bytes_max {
            let max = limits.value_bytes_max;
            return Err(StateRefused::ValueTooLarge { bytes: value.len(), max });
        }
    }
    let mut bounds = limits.crdt();
    bounds.siblings_max = bounds.siblings_max.saturating_mul(replicas);
    bounds.members_max = bounds.members_max.saturating_mul(replicas);
    state.value.validate(&bounds)?;
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
        let too_deep = CrdtError::TooDeep { depth: 9, max: 8 };
        assert_eq!(check(&deep, &limits, 3), Err(StateRefused::Invalid(too_deep)));
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
        let too_long = CrdtError::TooLong { what: "value", bytes: 50, max: 10 };
        assert_eq!(check(&state, &small, 1), Err(StateRefused::Invalid(too_long)));
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
        let siblings = CrdtError::TooManySiblings { siblings: 3, max: 2 };
        assert_eq!(check(&state, &one, 2), Err(StateRefused::Invalid(siblings)));
    }
}

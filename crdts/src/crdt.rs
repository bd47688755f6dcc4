//! The `Crdt` trait, the limits on growth, and the errors of mutators.

use crate::NodeId;
use std::fmt::Debug;

/// A state-based CRDT: a join-semilattice whose join is [`Crdt::merge`].
///
/// # Laws
///
/// For all states `a`, `b`, `c` reachable by the type's mutators and merges:
///
/// - **commutative**: `a ⊔ b = b ⊔ a`
/// - **associative**: `(a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)`
/// - **idempotent**: `a ⊔ a = a`
/// - `Default::default()` is the bottom: `⊥ ⊔ a = a`.
///
/// Because of these laws, replicas that have merged the same set of states hold
/// equal states, whatever the order, grouping or repetition of the merges. That is
/// why replication may drop, duplicate and reorder messages freely.
///
/// # Deltas
///
/// Every mutator is a *delta mutator*: it returns a small state, the delta, that
/// holds exactly the effect of the mutation. Deltas are states of the same type, so
/// `replica.merge(&delta)` is the only way any state ever moves: mutators apply
/// their own delta to `self` by merging it, and shipping a delta to another replica
/// has the same effect there. Merging a delta twice, late, or after the full state
/// it belongs to is harmless.
///
/// The laws are checked for every type by the shared property tests in
/// `crdts/tests/laws.rs`.
pub trait Crdt: Clone + PartialEq + Debug + Default {
    /// Joins `other` into `self`.
    fn merge(&mut self, other: &Self);

    /// The join of two states, leaving both untouched.
    fn merged(&self, other: &Self) -> Self {
        let mut joined = self.clone();
        joined.merge(other);
        joined
    }
}

/// Bounds on how far one object may grow through local mutations.
///
/// A mutator that would cross a bound fails with a [`CrdtError`] and changes
/// nothing. Merges never refuse (a join that could fail would break convergence),
/// so concurrent mutations on different replicas can together exceed a bound by the
/// number of replicas; the next local mutation that grows the object is then refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Members of one set, or fields of one map.
    pub members_max: usize,
    /// Concurrent values (siblings) of one multi-value register.
    pub siblings_max: usize,
}

impl Limits {
    /// Default members per set or map (DESIGN.md §8).
    pub const MEMBERS_MAX: usize = 100_000;
    /// Default siblings per register (DESIGN.md §8).
    pub const SIBLINGS_MAX: usize = 64;
}

impl Default for Limits {
    fn default() -> Self {
        Limits { members_max: Self::MEMBERS_MAX, siblings_max: Self::SIBLINGS_MAX }
    }
}

/// Why a mutator refused. A refused mutation returns no delta and leaves the state
/// exactly as it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The set or map would hold more than `max` members.
    #[error("{kind} would have {members} members, more than the limit of {max}")]
    LimitExceeded {
        /// `"set"` or `"map"`.
        kind: &'static str,
        /// Members the object would have after the mutation.
        members: usize,
        /// The bound.
        max: usize,
    },
    /// The register would keep more than `max` concurrent values; a write carrying
    /// the context of a read resolves them.
    #[error("the register would have {siblings} concurrent values, more than the limit of {max}")]
    TooManySiblings {
        /// Siblings the register would have after the write.
        siblings: usize,
        /// The bound.
        max: usize,
    },
    /// The node's dots are used up: the context already claims its dot
    /// `u64::MAX`. Only a forged context could; nothing was changed.
    #[error("node {node} has no dot left in this context")]
    DotsExhausted {
        /// The node whose next dot would pass `u64::MAX`.
        node: NodeId,
    },
    /// The node's own share of the counter would pass `u64::MAX`.
    #[error("counter overflow: node {node}'s total would pass {max}", max = u64::MAX)]
    CounterOverflow {
        /// The node whose share would overflow.
        node: NodeId,
    },
}

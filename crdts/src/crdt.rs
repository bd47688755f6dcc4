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
    /// Entries (vector nodes plus outstanding dots) of one key's causal context.
    pub context_entries_max: usize,
    /// Depth of maps nested in maps (a top-level map is depth 1).
    pub depth_max: usize,
    /// Bytes of one register value.
    pub value_bytes_max: usize,
    /// Bytes of one set member or map field name.
    pub member_bytes_max: usize,
}

impl Limits {
    /// Default members per set or map (DESIGN.md §8).
    pub const MEMBERS_MAX: usize = 100_000;
    /// Default siblings per register (docs/design.md, limits).
    pub const SIBLINGS_MAX: usize = 64;
    /// Default context entries per key. A key's context holds one vector entry
    /// per node that ever wrote it, plus dots received out of order; 4,096
    /// leaves room for every node of any cluster calmkv is built for.
    pub const CONTEXT_ENTRIES_MAX: usize = 4_096;
    /// Default depth of nested maps.
    pub const DEPTH_MAX: usize = 8;
    /// Default bytes per register value (1 MiB).
    pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
    /// Default bytes per set member or field name (1 KiB).
    pub const MEMBER_BYTES_MAX: usize = 1024;
    /// Highest dot counter a state from outside may carry: no node makes 2^62
    /// writes to one key, and a counter near `u64::MAX` would leave no room
    /// for the next write.
    pub const DOT_COUNTER_MAX: u64 = 1 << 62;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            members_max: Self::MEMBERS_MAX,
            siblings_max: Self::SIBLINGS_MAX,
            context_entries_max: Self::CONTEXT_ENTRIES_MAX,
            depth_max: Self::DEPTH_MAX,
            value_bytes_max: Self::VALUE_BYTES_MAX,
            member_bytes_max: Self::MEMBER_BYTES_MAX,
        }
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
    /// A state from outside breaks a rule every state made here keeps.
    #[error("malformed state: {reason}")]
    Malformed {
        /// Which rule.
        reason: MalformedReason,
    },
    /// A key's causal context would hold more than `max` entries.
    #[error("the context would have {entries} entries, more than the limit of {max}")]
    ContextTooLarge {
        /// Entries the context would have.
        entries: usize,
        /// The bound.
        max: usize,
    },
    /// Maps are nested deeper than `max`.
    #[error("maps are nested {depth} deep, more than the limit of {max}")]
    TooDeep {
        /// The depth found.
        depth: usize,
        /// The bound.
        max: usize,
    },
    /// A register value, set member or field name is longer than `max` bytes.
    #[error("a {what} of {bytes} bytes is longer than the limit of {max}")]
    TooLong {
        /// `"value"`, `"member"` or `"field name"`.
        what: &'static str,
        /// Its length.
        bytes: usize,
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

/// Which structural rule a state from outside breaks ([`CrdtError::Malformed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedReason {
    /// The state holds a dot its context has not seen.
    #[error("it holds dot {dot} that its context has not seen")]
    UnseenDot {
        /// The dot.
        dot: crate::Dot,
    },
    /// A dot counter past [`Limits::DOT_COUNTER_MAX`], which no node reaches.
    #[error("dot {dot} is past the highest counter a node reaches")]
    DotTooHigh {
        /// The dot.
        dot: crate::Dot,
    },
    /// A set member or map field holds nothing (it would not exist).
    #[error("a set member or map field holds nothing")]
    EmptyEntry,
}

//! Version vectors: for each node, how many of its updates have been seen.

use crate::{CrdtError, Dot, NodeId};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// For every node, the number `n` such that its dots `1..=n` have all been seen.
///
/// Entries equal to 0 are never stored, so two vectors that mean the same thing are
/// equal. The partial order is the pointwise one: `a <= b` when every entry of `a` is
/// at most the matching entry of `b`; vectors neither above nor below each other are
/// *concurrent*.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "BTreeMap<NodeId, u64>", into = "BTreeMap<NodeId, u64>")]
pub struct VersionVector {
    entries: BTreeMap<NodeId, u64>,
}

impl VersionVector {
    /// The empty vector: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many of `node`'s updates are covered (0 when none).
    pub fn get(&self, node: NodeId) -> u64 {
        self.entries.get(&node).copied().unwrap_or(0)
    }

    /// Whether the dot is covered by this vector.
    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.get(dot.node)
    }

    /// Raises `node`'s entry to at least `counter`.
    pub fn observe(&mut self, node: NodeId, counter: u64) {
        if counter == 0 {
            return;
        }
        let entry = self.entries.entry(node).or_insert(0);
        *entry = (*entry).max(counter);
    }

    /// Moves `node` one update forward and returns the dot of that update;
    /// [`CrdtError::DotsExhausted`] (and no change) when the entry is at `u64::MAX`.
    pub fn increment(&mut self, node: NodeId) -> Result<Dot, CrdtError> {
        let counter = self.get(node).checked_add(1).ok_or(CrdtError::DotsExhausted { node })?;
        self.entries.insert(node, counter);
        Ok(Dot { node, counter })
    }

    /// Pointwise maximum: afterwards `self` covers everything either vector covered.
    pub fn join(&mut self, other: &VersionVector) {
        for (&node, &counter) in &other.entries {
            self.observe(node, counter);
        }
    }

    /// Whether `self` has seen everything `other` has (`self >= other`).
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|(&node, &counter)| self.get(node) >= counter)
    }

    /// Whether neither vector has seen everything the other has.
    pub fn concurrent_with(&self, other: &VersionVector) -> bool {
        !self.dominates(other) && !other.dominates(self)
    }

    /// Drops every entry at or below `stable`, the vector that all replicas are known
    /// to have reached; such history can no longer be concurrent with anything.
    /// Entries above it are kept whole.
    pub fn compact(&mut self, stable: &VersionVector) {
        self.entries.retain(|&node, &mut counter| counter > stable.get(node));
    }

    /// The nodes with a non-zero entry and their counters, in node order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.entries.iter().map(|(&node, &counter)| (node, counter))
    }

    /// The number of nodes with a non-zero entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl PartialOrd for VersionVector {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }
}

impl From<BTreeMap<NodeId, u64>> for VersionVector {
    fn from(mut entries: BTreeMap<NodeId, u64>) -> Self {
        entries.retain(|_, counter| *counter > 0);
        VersionVector { entries }
    }
}

impl From<VersionVector> for BTreeMap<NodeId, u64> {
    fn from(vv: VersionVector) -> Self {
        vv.entries
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (node, counter) in iter {
            vv.observe(node, counter);
        }
        vv
    }
}

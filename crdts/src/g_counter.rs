//! Grow-only counter: one monotone share per node.

use crate::{Crdt, CrdtError, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A counter that only grows. Each node increments its own share; the merge takes
/// the larger share of every node, and the value is the sum of all shares.
///
/// A share is a `u64`; an increment that would overflow the node's own share is
/// refused with [`CrdtError::CounterOverflow`]. The value is a `u128`, so it cannot
/// overflow for fewer than 2^64 nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BTreeMap<NodeId, u64>", into = "BTreeMap<NodeId, u64>")]
pub struct GCounter {
    shares: BTreeMap<NodeId, u64>,
}

impl GCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sum of all shares.
    pub fn value(&self) -> u128 {
        self.shares.values().map(|&share| u128::from(share)).sum()
    }

    /// `node`'s own share.
    pub fn share(&self, node: NodeId) -> u64 {
        self.shares.get(&node).copied().unwrap_or(0)
    }

    /// Adds `amount` to `node`'s share and returns the delta (that share alone).
    pub fn incr(&mut self, node: NodeId, amount: u64) -> Result<GCounter, CrdtError> {
        let delta = self.incr_delta(node, amount)?;
        self.merge(&delta);
        Ok(delta)
    }

    /// The delta of [`GCounter::incr`], without applying it.
    pub(crate) fn incr_delta(&self, node: NodeId, amount: u64) -> Result<GCounter, CrdtError> {
        let share =
            self.share(node).checked_add(amount).ok_or(CrdtError::CounterOverflow { node })?;
        Ok(GCounter { shares: BTreeMap::from([(node, share)]) })
    }
}

impl Crdt for GCounter {
    fn merge(&mut self, other: &Self) {
        for (&node, &share) in &other.shares {
            let mine = self.shares.entry(node).or_insert(0);
            *mine = (*mine).max(share);
        }
    }
}

impl From<BTreeMap<NodeId, u64>> for GCounter {
    fn from(mut shares: BTreeMap<NodeId, u64>) -> Self {
        shares.retain(|_, share| *share > 0);
        GCounter { shares }
    }
}

impl From<GCounter> for BTreeMap<NodeId, u64> {
    fn from(counter: GCounter) -> Self {
        counter.shares
    }
}

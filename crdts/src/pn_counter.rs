//! Positive-negative counter: two grow-only counters, one for each direction.

use crate::{Crdt, CrdtError, GCounter, NodeId};
use serde::{Deserialize, Serialize};

/// A counter that can go up and down: the value is increments minus decrements.
///
/// The value is an `i128`: each node's increments and decrements are each bounded
/// by `u64::MAX` (the [`GCounter`] share limit), so the difference always fits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PnCounter {
    incr: GCounter,
    decr: GCounter,
}

impl PnCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Increments minus decrements.
    pub fn value(&self) -> i128 {
        // Both sums are below 2^127 for fewer than 2^63 nodes.
        self.incr.value() as i128 - self.decr.value() as i128
    }

    /// The sum of all increments ever made.
    pub fn increments(&self) -> u128 {
        self.incr.value()
    }

    /// The sum of all decrements ever made.
    pub fn decrements(&self) -> u128 {
        self.decr.value()
    }

    /// Adds `amount`; returns the delta.
    pub fn incr(&mut self, node: NodeId, amount: u64) -> Result<PnCounter, CrdtError> {
        let delta = PnCounter { incr: self.incr.incr_delta(node, amount)?, decr: GCounter::new() };
        self.merge(&delta);
        Ok(delta)
    }

    /// Subtracts `amount`; returns the delta.
    pub fn decr(&mut self, node: NodeId, amount: u64) -> Result<PnCounter, CrdtError> {
        let delta = PnCounter { incr: GCounter::new(), decr: self.decr.incr_delta(node, amount)? };
        self.merge(&delta);
        Ok(delta)
    }
}

impl Crdt for PnCounter {
    fn merge(&mut self, other: &Self) {
        self.incr.merge(&other.incr);
        self.decr.merge(&other.decr);
    }
}

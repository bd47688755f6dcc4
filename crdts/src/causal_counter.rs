//! A PN-counter whose shares carry dots, so it can live in a map.

use crate::dot_store::impl_causal;
use crate::{Causal, CausalContext, Crdt, CrdtError, Dot, DotFun, NodeId};
use serde::{Deserialize, Serialize};

/// One node's running totals, tagged by the dot of its latest update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterShare {
    /// Everything the node added since the share was last reset.
    pub incr: u64,
    /// Everything the node subtracted since the share was last reset.
    pub decr: u64,
}

/// An increment/decrement counter for use inside an [`OrMap`](crate::OrMap).
///
/// Like [`PnCounter`](crate::PnCounter), each node owns a share, but the share is
/// kept under the dot of the node's latest update, and each update supersedes the
/// node's previous dot. Removing the map field that holds the counter therefore
/// removes the shares it saw, and the field restarts from zero. A node's update
/// concurrent with such a removal carries that node's whole share, as the field's
/// new value (observed-remove keeps concurrent updates).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CausalCounter {
    inner: Causal<DotFun<CounterShare>>,
}

impl_causal!(impl[] CausalCounter => DotFun<CounterShare>);

impl CausalCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Increments minus decrements, counting each node's latest live share.
    ///
    /// A node's share is cumulative: the share under its dot `(n, k)` already
    /// includes everything its earlier live dots carried. A replica that missed
    /// the delta which superseded an older dot can hold `(n, j)` beside
    /// `(n, k)`, `j < k`; summing both would count the older share twice and
    /// read *above* the origin. Only the highest live dot of each node counts,
    /// so the value never exceeds what the node itself has counted, and it is
    /// monotone in the lattice order as long as no reset (a removal of the map
    /// field, a delete of the key) intervenes.
    pub fn value(&self) -> i128 {
        self.latest_shares().map(|(_, share)| i128::from(share.incr) - i128::from(share.decr)).sum()
    }

    /// Everything added, over each node's latest live share.
    pub fn increments(&self) -> u128 {
        self.latest_shares().map(|(_, share)| u128::from(share.incr)).sum()
    }

    /// Everything subtracted, over each node's latest live share.
    pub fn decrements(&self) -> u128 {
        self.latest_shares().map(|(_, share)| u128::from(share.decr)).sum()
    }

    /// Each node's share under its highest live dot, node by node.
    pub fn latest_shares(&self) -> impl Iterator<Item = (&Dot, &CounterShare)> + '_ {
        let mut shares = self.inner.store.0.iter().peekable();
        std::iter::from_fn(move || {
            let mut latest = shares.next()?;
            // Dots are ordered by node, then counter: the last of a run is the highest.
            while let Some(next) = shares.next_if(|(dot, _)| dot.node == latest.0.node) {
                latest = next;
            }
            Some(latest)
        })
    }

    /// Adds `amount`; returns the delta.
    pub fn incr(&mut self, node: NodeId, amount: u64) -> Result<CausalCounter, CrdtError> {
        self.update(node, amount, 0)
    }

    /// Subtracts `amount`; returns the delta.
    pub fn decr(&mut self, node: NodeId, amount: u64) -> Result<CausalCounter, CrdtError> {
        self.update(node, 0, amount)
    }

    fn update(&mut self, node: NodeId, incr: u64, decr: u64) -> Result<CausalCounter, CrdtError> {
        // The node's running totals are those of its latest live share; every
        // live dot of the node is superseded by the new one.
        let own = self
            .latest_shares()
            .find(|(dot, _)| dot.node == node)
            .map(|(_, share)| *share)
            .unwrap_or_default();
        let overflow = || CrdtError::CounterOverflow { node };
        let own = CounterShare {
            incr: own.incr.checked_add(incr).ok_or_else(overflow)?,
            decr: own.decr.checked_add(decr).ok_or_else(overflow)?,
        };
        let dot = self.inner.ctx.next_dot(node)?;
        let mut ctx = CausalContext::from_dots(
            self.inner.store.0.keys().filter(|live| live.node == node).copied(),
        );
        ctx.insert(dot);
        let delta = CausalCounter { inner: Causal { store: DotFun([(dot, own)].into()), ctx } };
        self.merge(&delta);
        Ok(delta)
    }
}

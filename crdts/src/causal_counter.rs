//! A PN-counter whose shares carry dots, so it can live in a map.

use crate::dot_store::impl_causal;
use crate::{Causal, CausalContext, Crdt, CrdtError, DotFun, NodeId};
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

    /// Increments minus decrements over all live shares.
    pub fn value(&self) -> i128 {
        let shares = self.inner.store.0.values();
        shares.map(|share| i128::from(share.incr) - i128::from(share.decr)).sum()
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
        let mut own = CounterShare::default();
        let mut ctx = CausalContext::new();
        for (dot, share) in self.inner.store.0.iter().filter(|(dot, _)| dot.node == node) {
            let overflow = CrdtError::CounterOverflow { node };
            own.incr = own.incr.checked_add(share.incr).ok_or(overflow.clone())?;
            own.decr = own.decr.checked_add(share.decr).ok_or(overflow)?;
            ctx.insert(*dot);
        }
        let overflow = CrdtError::CounterOverflow { node };
        own.incr = own.incr.checked_add(incr).ok_or(overflow.clone())?;
        own.decr = own.decr.checked_add(decr).ok_or(overflow)?;
        let dot = self.inner.ctx.next_dot(node);
        ctx.insert(dot);
        let delta = CausalCounter { inner: Causal { store: DotFun([(dot, own)].into()), ctx } };
        self.merge(&delta);
        Ok(delta)
    }
}

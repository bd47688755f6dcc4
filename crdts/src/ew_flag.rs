//! Enable-wins flag.

use crate::dot_store::impl_causal;
use crate::{Causal, CausalContext, Crdt, CrdtError, DotSet, DotStore, NodeId};
use serde::{Deserialize, Serialize};

/// A boolean that concurrent enable and disable leave enabled.
///
/// Each enable adds a dot; a disable removes the dots it has seen. The flag is on
/// while any dot is live, so an enable that a disable did not see survives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EwFlag {
    inner: Causal<DotSet>,
}

impl_causal!(impl[] EwFlag => DotSet);

impl EwFlag {
    /// A disabled flag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an enable is live.
    pub fn is_enabled(&self) -> bool {
        !self.inner.store.is_bottom()
    }

    /// Every dot this flag has seen.
    pub fn context(&self) -> &CausalContext {
        &self.inner.ctx
    }

    /// Turns the flag on; returns the delta.
    pub fn enable(&mut self, node: NodeId) -> Result<EwFlag, CrdtError> {
        let dot = self.inner.ctx.next_dot(node)?;
        let mut ctx = CausalContext::from_dots(self.inner.store.0.iter().copied());
        ctx.insert(dot);
        let delta = EwFlag { inner: Causal { store: DotSet([dot].into()), ctx } };
        self.merge(&delta);
        Ok(delta)
    }

    /// Turns the flag off, overriding the enables seen so far; returns the delta.
    pub fn disable(&mut self) -> EwFlag {
        let ctx = CausalContext::from_dots(self.inner.store.0.iter().copied());
        let delta = EwFlag { inner: Causal { store: DotSet::default(), ctx } };
        self.merge(&delta);
        delta
    }
}

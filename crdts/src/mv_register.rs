//! Multi-value register on dotted version vectors.

use crate::dot_store::impl_causal;
use crate::{Causal, CausalContext, Crdt, CrdtError, Dot, DotFun, Limits, NodeId};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;

/// A register that keeps every concurrent write (siblings) until a write that has
/// seen them replaces them.
///
/// Each write is tagged with a fresh dot. A write carries the context of the read it
/// was based on and supersedes exactly the values whose dots that context holds;
/// values it did not see stay beside it as siblings. Nothing is ever resolved by a
/// clock, so no write is lost without the application seeing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MvRegister<T> {
    inner: Causal<DotFun<T>>,
}

impl<T> Default for MvRegister<T> {
    fn default() -> Self {
        MvRegister { inner: Causal { store: DotFun::default(), ctx: CausalContext::default() } }
    }
}

impl_causal!(impl[T: Clone + PartialEq + Debug] MvRegister<T> => DotFun<T>);

impl<T: Clone + PartialEq + Debug> MvRegister<T> {
    /// An empty register.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live values (one, or several siblings), in dot order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.inner.store.0.values()
    }

    /// The live values with the dots of the writes that made them.
    pub fn entries(&self) -> impl Iterator<Item = (&Dot, &T)> {
        self.inner.store.0.iter()
    }

    /// The number of live values.
    pub fn len(&self) -> usize {
        self.inner.store.0.len()
    }

    /// Whether the register holds no value (never written, or deleted).
    pub fn is_empty(&self) -> bool {
        self.inner.store.0.is_empty()
    }

    /// The context to pass to the next write so that it supersedes what is here.
    pub fn context(&self) -> &CausalContext {
        &self.inner.ctx
    }

    /// Writes `value`, superseding the values whose dots `seen` holds; returns the
    /// delta. Refused when the values not superseded plus the new one would exceed
    /// `limits.siblings_max`.
    pub fn write(
        &mut self,
        node: NodeId,
        value: T,
        seen: &CausalContext,
        limits: &Limits,
    ) -> Result<MvRegister<T>, CrdtError> {
        let siblings = self.inner.store.0.keys().filter(|dot| !seen.contains(dot)).count() + 1;
        if siblings > limits.siblings_max {
            return Err(CrdtError::TooManySiblings { siblings, max: limits.siblings_max });
        }
        // The new dot must be fresh for this replica and for whatever `seen` saw.
        let dot = self.inner.ctx.next_dot(node)?.max(seen.next_dot(node)?);
        let mut ctx = seen.clone();
        ctx.insert(dot);
        let delta = MvRegister { inner: Causal { store: DotFun([(dot, value)].into()), ctx } };
        self.merge(&delta);
        Ok(delta)
    }

    /// Removes the values whose dots `seen` holds; returns the delta.
    pub fn delete(&mut self, seen: &CausalContext) -> MvRegister<T> {
        let delta = MvRegister { inner: Causal { store: DotFun::default(), ctx: seen.clone() } };
        self.merge(&delta);
        delta
    }

    /// Removes every value this replica holds; returns the delta.
    pub fn clear(&mut self) -> MvRegister<T> {
        let seen = CausalContext::from_dots(self.inner.store.0.keys().copied());
        self.delete(&seen)
    }
}

//! Add-wins observed-remove set.

use crate::dot_store::impl_causal;
use crate::{Causal, CausalContext, CrdtError, DotMap, DotSet, Limits, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

/// A set where an add concurrent with a remove of the same element wins.
///
/// Every add tags the element with a fresh dot; a remove removes the dots it has
/// seen. An element is a member while it has a live dot. Removed elements leave no
/// tombstone: the causal context alone remembers that their dots were seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrSet<T: Ord> {
    inner: Causal<DotMap<T, DotSet>>,
}

impl<T: Ord> Default for OrSet<T> {
    fn default() -> Self {
        OrSet { inner: Causal { store: DotMap::default(), ctx: CausalContext::default() } }
    }
}

impl_causal!(impl[T: Ord + Clone + Debug] OrSet<T> => DotMap<T, DotSet>);

impl<T: Ord + Clone + Debug> OrSet<T> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `element` is a member.
    pub fn contains(&self, element: &T) -> bool {
        self.inner.store.0.contains_key(element)
    }

    /// The members, in order.
    pub fn members(&self) -> impl Iterator<Item = &T> {
        self.inner.store.0.keys()
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.inner.store.0.len()
    }

    /// Whether the set has no member.
    pub fn is_empty(&self) -> bool {
        self.inner.store.0.is_empty()
    }

    /// Every dot this set has seen.
    pub fn context(&self) -> &CausalContext {
        &self.inner.ctx
    }

    /// Adds one element; returns the delta.
    pub fn add(
        &mut self,
        node: NodeId,
        element: T,
        limits: &Limits,
    ) -> Result<OrSet<T>, CrdtError> {
        self.add_all(node, [element], limits)
    }

    /// Adds every element, all or none; returns the delta. Refused when the set
    /// would have more than `limits.members_max` members.
    pub fn add_all(
        &mut self,
        node: NodeId,
        elements: impl IntoIterator<Item = T>,
        limits: &Limits,
    ) -> Result<OrSet<T>, CrdtError> {
        let elements: BTreeSet<T> = elements.into_iter().collect();
        let new = elements.iter().filter(|element| !self.contains(element)).count();
        let members = self.len() + new;
        if new > 0 && members > limits.members_max {
            return Err(CrdtError::LimitExceeded { kind: "set", members, max: limits.members_max });
        }
        let mut next = self.inner.ctx.next_dot(node)?;
        let mut store = BTreeMap::new();
        let mut ctx = CausalContext::new();
        for element in elements {
            // The new dot replaces the element's old ones, which keeps it at one dot.
            if let Some(old) = self.inner.store.0.get(&element) {
                old.0.iter().for_each(|dot| ctx.insert(*dot));
            }
            ctx.insert(next);
            store.insert(element, DotSet([next].into()));
            next.counter = next.counter.checked_add(1).ok_or(CrdtError::DotsExhausted { node })?;
        }
        let delta = OrSet { inner: Causal { store: DotMap(store), ctx } };
        self.inner.merge_scoped(&delta.inner, delta.inner.store.0.keys());
        Ok(delta)
    }

    /// Removes one element (the adds of it seen so far); returns the delta.
    pub fn remove(&mut self, element: &T) -> OrSet<T> {
        self.remove_all([element])
    }

    /// Removes every element given; returns the delta.
    pub fn remove_all<'a>(&mut self, elements: impl IntoIterator<Item = &'a T>) -> OrSet<T>
    where
        T: 'a,
    {
        let elements: Vec<&T> = elements.into_iter().collect();
        let mut ctx = CausalContext::new();
        for element in &elements {
            if let Some(dots) = self.inner.store.0.get(*element) {
                dots.0.iter().for_each(|dot| ctx.insert(*dot));
            }
        }
        let delta = OrSet { inner: Causal { store: DotMap::default(), ctx } };
        self.inner.merge_scoped(&delta.inner, elements);
        delta
    }
}

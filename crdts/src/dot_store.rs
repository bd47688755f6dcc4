//! Dot stores: the payload of causal CRDTs, and the one join they all share.
//!
//! A causal CRDT is a pair `(store, context)`: the store holds the dots (and data
//! tagged by them) that are still live, the context every dot ever seen. A dot
//! seen by one side but missing from its store was *removed* there, so the join
//! keeps a dot only if both stores hold it or the side lacking it never saw it
//! (Almeida, Shoker, Baquero: *Delta State Replicated Data Types*, 2018, §5).
//! This is how removals work without per-element tombstones.
//!
//! Three stores compose into every causal type of the crate:
//! [`DotSet`] (a flag), [`DotFun`] (a multi-value register, a counter's shares) and
//! [`DotMap`] (sets and maps, whose values are stores again).

use crate::{CausalContext, Crdt, Dot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

/// The payload of a causal CRDT.
///
/// `join` must be the causal join described in the module doc; given that, the
/// pair [`Causal`] of a store and its context satisfies the [`Crdt`] laws.
pub trait DotStore: Clone + PartialEq + Debug + Default {
    /// Whether the store holds no dot (is the bottom).
    fn is_bottom(&self) -> bool;

    /// Adds every dot held by the store to `out`.
    fn collect_dots(&self, out: &mut BTreeSet<Dot>);

    /// Joins `(other, other_ctx)` into `(self, self_ctx)`; the caller joins the
    /// contexts afterwards.
    fn join(&mut self, self_ctx: &CausalContext, other: &Self, other_ctx: &CausalContext);

    /// Every dot held by the store.
    fn dots(&self) -> BTreeSet<Dot> {
        let mut out = BTreeSet::new();
        self.collect_dots(&mut out);
        out
    }
}

/// A set of live dots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotSet(pub BTreeSet<Dot>);

impl DotStore for DotSet {
    fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        out.extend(self.0.iter().copied());
    }

    fn join(&mut self, self_ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        self.0.retain(|dot| other.0.contains(dot) || !other_ctx.contains(dot));
        self.0.extend(other.0.iter().filter(|dot| !self_ctx.contains(dot)));
    }
}

/// A map from live dots to the values written with them.
///
/// A dot names one write, so both sides of a join hold the same value for a dot
/// they share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotFun<V>(pub BTreeMap<Dot, V>);

impl<V> Default for DotFun<V> {
    fn default() -> Self {
        DotFun(BTreeMap::new())
    }
}

impl<V: Clone + PartialEq + Debug> DotStore for DotFun<V> {
    fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        out.extend(self.0.keys().copied());
    }

    fn join(&mut self, self_ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        self.0.retain(|dot, _| other.0.contains_key(dot) || !other_ctx.contains(dot));
        for (dot, value) in &other.0 {
            if !self_ctx.contains(dot) {
                self.0.entry(*dot).or_insert_with(|| value.clone());
            }
        }
    }
}

/// A map from keys to nested stores; a key whose store becomes the bottom is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotMap<K: Ord, S>(pub BTreeMap<K, S>);

impl<K: Ord, S> Default for DotMap<K, S> {
    fn default() -> Self {
        DotMap(BTreeMap::new())
    }
}

impl<K: Ord + Clone + Debug, S: DotStore> DotStore for DotMap<K, S> {
    fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        for store in self.0.values() {
            store.collect_dots(out);
        }
    }

    fn join(&mut self, self_ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        let skip_others = !self.may_lose_dots_outside(other, other_ctx);
        self.join_keys(self_ctx, other, other_ctx, other.0.keys());
        if skip_others {
            return;
        }
        // Keys only here lose the dots that the other side saw and removed.
        let bottom = S::default();
        self.0.retain(|key, store| {
            if !other.0.contains_key(key) {
                store.join(self_ctx, &bottom, other_ctx);
            }
            !store.is_bottom()
        });
    }
}

impl<K: Ord + Clone + Debug, S: DotStore> DotMap<K, S> {
    /// Largest context whose dots a join enumerates to avoid visiting every key.
    const ENUMERATED_DOTS_MAX: u128 = 4_096;

    /// Joins only the given keys: exact when `other_ctx` holds no dot of any other
    /// key of `self`, which is true of every delta a mutator builds for those keys.
    fn join_keys<'a>(
        &mut self,
        self_ctx: &CausalContext,
        other: &Self,
        other_ctx: &CausalContext,
        keys: impl IntoIterator<Item = &'a K>,
    ) where
        K: 'a,
    {
        let bottom = S::default();
        for key in keys {
            let theirs = other.0.get(key).unwrap_or(&bottom);
            let mut store = self.0.remove(key).unwrap_or_default();
            store.join(self_ctx, theirs, other_ctx);
            if !store.is_bottom() {
                self.0.insert(key.clone(), store);
            }
        }
    }

    /// Whether joining `(other, other_ctx)` may remove dots from keys of `self` that
    /// `other` does not have. Answers `true` when unsure; cheap when `other_ctx` is
    /// small, as a delta's is. A dot belongs to one key only, so only dots that
    /// `other_ctx` saw, that `other` no longer holds, and that are not held by
    /// `self` under one of `other`'s keys can be removed elsewhere.
    fn may_lose_dots_outside(&self, other: &Self, other_ctx: &CausalContext) -> bool {
        if self.0.len() <= other.0.len() {
            return true; // visiting every key costs no more than the check
        }
        if other_ctx.dot_count() > Self::ENUMERATED_DOTS_MAX {
            return true;
        }
        let mut accounted = other.dots();
        for key in other.0.keys() {
            if let Some(mine) = self.0.get(key) {
                mine.collect_dots(&mut accounted);
            }
        }
        other_ctx.iter_dots().any(|dot| !accounted.contains(&dot))
    }
}

impl<K: Ord + Clone + Debug, S: DotStore> Causal<DotMap<K, S>> {
    /// Merges a delta that only touches `keys`: every dot in the delta's context is
    /// new, or held by `self` under one of `keys`, as for every delta the mutators
    /// build. Costs O(|keys| log n) instead of the O(n) of a full merge when the
    /// delta removes dots. Debug builds check the result against the full merge.
    pub(crate) fn merge_scoped<'a>(&mut self, delta: &Self, keys: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        #[cfg(debug_assertions)]
        let expected = self.merged(delta);
        self.store.join_keys(&self.ctx, &delta.store, &delta.ctx, keys);
        self.ctx.join(&delta.ctx);
        #[cfg(debug_assertions)]
        assert_eq!(self, &expected, "a scoped merge touched more than its keys");
    }
}

/// A causal CRDT: a dot store with the context of every dot it has seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Causal<S> {
    /// The live dots and their data.
    pub store: S,
    /// Every dot seen, live or removed.
    pub ctx: CausalContext,
}

impl<S: Default> Default for Causal<S> {
    fn default() -> Self {
        Causal { store: S::default(), ctx: CausalContext::default() }
    }
}

impl<S: DotStore> Crdt for Causal<S> {
    fn merge(&mut self, other: &Self) {
        self.store.join(&self.ctx, &other.store, &other.ctx);
        self.ctx.join(&other.ctx);
    }
}

/// A causal type that can live inside an [`OrMap`](crate::OrMap), sharing the map's
/// context: it is a [`Causal`] store under a name of its own.
pub trait Embed: Crdt {
    /// The type's dot store.
    type Store: DotStore;

    /// Builds the value from a store and the context it lives in.
    fn from_parts(store: Self::Store, ctx: CausalContext) -> Self;

    /// Splits the value into its store and context.
    fn into_parts(self) -> (Self::Store, CausalContext);
}

/// Implements [`Crdt`] and [`Embed`] for a newtype `{ inner: Causal<Store> }`.
macro_rules! impl_causal {
    (impl[$($generics:tt)*] $ty:ty => $store:ty) => {
        impl<$($generics)*> $crate::Crdt for $ty {
            fn merge(&mut self, other: &Self) {
                self.inner.merge(&other.inner);
            }
        }

        impl<$($generics)*> $crate::Embed for $ty {
            type Store = $store;

            fn from_parts(store: $store, ctx: $crate::CausalContext) -> Self {
                Self { inner: $crate::Causal { store, ctx } }
            }

            fn into_parts(self) -> ($store, $crate::CausalContext) {
                (self.inner.store, self.inner.ctx)
            }
        }
    };
}
pub(crate) use impl_causal;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;

    fn dot(node: u64, counter: u64) -> Dot {
        Dot::new(NodeId(node), counter)
    }

    #[test]
    fn a_dot_removed_on_one_side_stays_removed_after_the_join() {
        let ctx = CausalContext::from_dots([dot(1, 1), dot(1, 2)]);
        let mut a = DotSet(BTreeSet::from([dot(1, 1), dot(1, 2)]));
        let b = DotSet(BTreeSet::from([dot(1, 2)]));
        a.join(&ctx, &b, &ctx);
        assert_eq!(a, DotSet(BTreeSet::from([dot(1, 2)])));
    }

    #[test]
    fn a_dot_unseen_by_the_other_side_survives_the_join() {
        let mut a = DotSet(BTreeSet::from([dot(1, 1)]));
        let a_ctx = CausalContext::from_dots([dot(1, 1)]);
        let b = DotSet::default();
        let b_ctx = CausalContext::from_dots([dot(2, 1)]);
        a.join(&a_ctx, &b, &b_ctx);
        assert_eq!(a, DotSet(BTreeSet::from([dot(1, 1)])));
    }

    #[test]
    fn a_dot_map_drops_keys_whose_store_becomes_empty() {
        let ctx = CausalContext::from_dots([dot(1, 1)]);
        let mut a: DotMap<&str, DotSet> =
            DotMap(BTreeMap::from([("x", DotSet(BTreeSet::from([dot(1, 1)])))]));
        a.join(&ctx, &DotMap::default(), &ctx);
        assert!(a.is_bottom());
    }
}

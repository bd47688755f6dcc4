//! Observed-remove map of nested causal CRDTs.

use crate::{Causal, CausalContext, Crdt, CrdtError, DotMap, DotStore, Embed, Limits};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;

/// A map from keys to nested CRDTs that share the map's causal context.
///
/// Updating a field runs a mutator of the nested type `V`; removing a field removes
/// the dots of the field that were seen. A field exists while it holds a live dot,
/// so an update concurrent with a remove of the same field keeps the field, with
/// the update's effect (observed-remove, update-wins). Because nested values share
/// the map's dots, a removal resets what it saw: a field removed and then updated
/// again starts from the bottom of `V`, on every replica.
///
/// `V` is any causal type of this crate: [`OrSet`](crate::OrSet),
/// [`MvRegister`](crate::MvRegister), [`EwFlag`](crate::EwFlag),
/// [`CausalCounter`](crate::CausalCounter), or another `OrMap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "K: Serialize, V::Store: Serialize",
    deserialize = "K: Deserialize<'de>, V::Store: Deserialize<'de>"
))]
pub struct OrMap<K: Ord, V: Embed> {
    inner: Causal<DotMap<K, V::Store>>,
}

impl<K: Ord, V: Embed> Default for OrMap<K, V> {
    fn default() -> Self {
        OrMap { inner: Causal { store: DotMap::default(), ctx: CausalContext::default() } }
    }
}

impl<K: Ord + Clone + Debug, V: Embed> Crdt for OrMap<K, V> {
    fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }
}

impl<K: Ord + Clone + Debug, V: Embed> Embed for OrMap<K, V> {
    type Store = DotMap<K, V::Store>;

    fn from_parts(store: Self::Store, ctx: CausalContext) -> Self {
        OrMap { inner: Causal { store, ctx } }
    }

    fn into_parts(self) -> (Self::Store, CausalContext) {
        (self.inner.store, self.inner.ctx)
    }
}

impl<K: Ord + Clone + Debug, V: Embed> OrMap<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The field's value, if the field exists.
    pub fn get(&self, key: &K) -> Option<V> {
        let store = self.inner.store.0.get(key)?;
        Some(V::from_parts(store.clone(), self.inner.ctx.clone()))
    }

    /// Whether the field exists.
    pub fn contains_key(&self, key: &K) -> bool {
        self.inner.store.0.contains_key(key)
    }

    /// The field names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.inner.store.0.keys()
    }

    /// Every field with its value.
    pub fn fields(&self) -> impl Iterator<Item = (&K, V)> {
        let ctx = &self.inner.ctx;
        self.inner.store.0.iter().map(move |(k, s)| (k, V::from_parts(s.clone(), ctx.clone())))
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.inner.store.0.len()
    }

    /// Whether the map has no field.
    pub fn is_empty(&self) -> bool {
        self.inner.store.0.is_empty()
    }

    /// Every dot this map (and everything in it) has seen.
    pub fn context(&self) -> &CausalContext {
        &self.inner.ctx
    }

    /// Runs `mutate` on the field `key` (the bottom of `V` if it does not exist) and
    /// returns the map's delta. `mutate` gets the field's current value and returns
    /// the nested delta, as every mutator of this crate does.
    ///
    /// Refused, with nothing changed, when `mutate` refuses or when a new field would
    /// take the map past `limits.members_max` fields.
    pub fn update<F>(&mut self, key: K, limits: &Limits, mutate: F) -> Result<Self, CrdtError>
    where
        F: FnOnce(&mut V) -> Result<V, CrdtError>,
    {
        if !self.contains_key(&key) && self.len() >= limits.members_max {
            let members = self.len() + 1;
            return Err(CrdtError::LimitExceeded { kind: "map", members, max: limits.members_max });
        }
        // The field is moved out and back rather than cloned: `mutate` merges its delta
        // into the value, which is then exactly the field joined with that delta.
        let store = self.inner.store.0.remove(&key).unwrap_or_default();
        let mut value = V::from_parts(store, self.inner.ctx.clone());
        let nested = mutate(&mut value);
        let (store, _) = value.into_parts();
        if !store.is_bottom() {
            self.inner.store.0.insert(key.clone(), store);
        }
        let (delta_store, ctx) = nested?.into_parts();
        let mut fields = BTreeMap::new();
        if !delta_store.is_bottom() {
            fields.insert(key.clone(), delta_store);
        }
        let delta = OrMap { inner: Causal { store: DotMap(fields), ctx } };
        self.inner.merge_scoped(&delta.inner, [&key]);
        Ok(delta)
    }

    /// Removes the field (the updates of it seen so far); returns the delta.
    pub fn remove(&mut self, key: &K) -> Self {
        let seen = match self.inner.store.0.get(key) {
            Some(store) => CausalContext::from_dots(store.dots()),
            None => CausalContext::new(),
        };
        let delta = OrMap { inner: Causal { store: DotMap::default(), ctx: seen } };
        self.inner.merge_scoped(&delta.inner, [key]);
        delta
    }
}

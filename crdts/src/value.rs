//! The state of one calmkv key (or map field): one causal CRDT per type.
//!
//! A key's type is fixed by its first write, but two replicas can still create the
//! same key concurrently with different types. Neither write may be lost, so a key
//! holds a *product*: one dot store per type, all sharing one causal context, and
//! normally only one of them non-empty. Because every component is a dot store,
//! the product is one too: it merges component by component, a delete is "remove
//! every dot seen" whatever the types, and a map field is again a [`Value`], so
//! fields can hold any type, nested to any depth.

use crate::dot_store::impl_causal;
use crate::{
    Causal, CausalContext, CausalCounter, CounterShare, Crdt, CrdtError, Dot, DotFun, DotMap,
    DotSet, DotStore, Embed, EwFlag, Limits, MalformedReason, MvRegister, OrMap, OrSet,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::BTreeSet;

/// The types a [`Value`] can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Multi-value register of bytes.
    Register,
    /// Increment/decrement counter.
    Counter,
    /// Add-wins set of strings.
    Set,
    /// Enable-wins flag.
    Flag,
    /// Map of named fields, each a [`Value`].
    Map,
}

impl Kind {
    /// Every kind, in order.
    pub const ALL: [Kind; 5] = [Kind::Register, Kind::Counter, Kind::Set, Kind::Flag, Kind::Map];

    /// The lowercase name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::Counter => "counter",
            Kind::Set => "set",
            Kind::Flag => "flag",
            Kind::Map => "map",
        }
    }
}

/// The dot store of a [`Value`]: one component per [`Kind`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueStore {
    #[serde(default, skip_serializing_if = "DotStore::is_bottom")]
    register: DotFun<ByteBuf>,
    #[serde(default, skip_serializing_if = "DotStore::is_bottom")]
    counter: DotFun<CounterShare>,
    #[serde(default, skip_serializing_if = "DotStore::is_bottom")]
    set: DotMap<String, DotSet>,
    #[serde(default, skip_serializing_if = "DotStore::is_bottom")]
    flag: DotSet,
    #[serde(default, skip_serializing_if = "DotStore::is_bottom")]
    map: DotMap<String, ValueStore>,
}

impl DotStore for ValueStore {
    fn is_bottom(&self) -> bool {
        self.register.is_bottom()
            && self.counter.is_bottom()
            && self.set.is_bottom()
            && self.flag.is_bottom()
            && self.map.is_bottom()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        self.register.collect_dots(out);
        self.counter.collect_dots(out);
        self.set.collect_dots(out);
        self.flag.collect_dots(out);
        self.map.collect_dots(out);
    }

    fn join(&mut self, self_ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        self.register.join(self_ctx, &other.register, other_ctx);
        self.counter.join(self_ctx, &other.counter, other_ctx);
        self.set.join(self_ctx, &other.set, other_ctx);
        self.flag.join(self_ctx, &other.flag, other_ctx);
        self.map.join(self_ctx, &other.map, other_ctx);
    }
}

impl ValueStore {
    /// The bounds of [`Value::validate`] on this store, `depth` maps deep.
    fn validate(&self, limits: &Limits, depth: usize) -> Result<(), CrdtError> {
        let too_long = |what, bytes: usize, max| {
            (bytes > max).then_some(CrdtError::TooLong { what, bytes, max })
        };
        let members = |kind, members: usize| {
            (members > limits.members_max).then_some(CrdtError::LimitExceeded {
                kind,
                members,
                max: limits.members_max,
            })
        };
        if self.register.0.len() > limits.siblings_max {
            return Err(CrdtError::TooManySiblings {
                siblings: self.register.0.len(),
                max: limits.siblings_max,
            });
        }
        let values =
            self.register.0.values().map(|v| too_long("value", v.len(), limits.value_bytes_max));
        let names = self.set.0.keys().map(|m| too_long("member", m.len(), limits.member_bytes_max));
        let fields =
            self.map.0.keys().map(|f| too_long("field name", f.len(), limits.member_bytes_max));
        let counts = [members("set", self.set.0.len()), members("map", self.map.0.len())];
        if let Some(error) = values.chain(names).chain(fields).chain(counts).flatten().next() {
            return Err(error);
        }
        let empty_member = self.set.0.values().any(DotStore::is_bottom);
        let empty_field = self.map.0.values().any(DotStore::is_bottom);
        if empty_member || empty_field {
            return Err(CrdtError::Malformed { reason: MalformedReason::EmptyEntry });
        }
        if !self.map.is_bottom() && depth + 1 > limits.depth_max {
            return Err(CrdtError::TooDeep { depth: depth + 1, max: limits.depth_max });
        }
        self.map.0.values().try_for_each(|field| field.validate(limits, depth + 1))
    }
}

/// The replicated state of one key: a [`ValueStore`] and its causal context.
///
/// Read a component with [`Value::register`], [`Value::counter`] and so on, and
/// change one with the matching `with_*` method, which runs a mutator of that
/// component's type and returns the delta as a `Value`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Value {
    inner: Causal<ValueStore>,
}

impl_causal!(impl[] Value => ValueStore);

impl Value {
    /// A value of no type: never written, or deleted.
    pub fn new() -> Self {
        Self::default()
    }

    /// The kinds with live content, in [`Kind`] order: none for an absent key, one
    /// normally, several after concurrent creations with different types.
    pub fn kinds(&self) -> Vec<Kind> {
        let store = &self.inner.store;
        let live = [
            !store.register.is_bottom(),
            !store.counter.is_bottom(),
            !store.set.is_bottom(),
            !store.flag.is_bottom(),
            !store.map.is_bottom(),
        ];
        Kind::ALL.into_iter().zip(live).filter_map(|(kind, live)| live.then_some(kind)).collect()
    }

    /// Whether no component has live content (the key is absent or deleted).
    pub fn is_empty(&self) -> bool {
        self.inner.store.is_bottom()
    }

    /// Every dot this value has seen: what a write or delete passes to supersede it.
    pub fn context(&self) -> &CausalContext {
        &self.inner.ctx
    }

    /// The register component.
    pub fn register(&self) -> MvRegister<ByteBuf> {
        self.view(|s| &s.register)
    }

    /// The counter component.
    pub fn counter(&self) -> CausalCounter {
        self.view(|s| &s.counter)
    }

    /// The set component.
    pub fn set(&self) -> OrSet<String> {
        self.view(|s| &s.set)
    }

    /// The flag component.
    pub fn flag(&self) -> EwFlag {
        self.view(|s| &s.flag)
    }

    /// The map component.
    pub fn map(&self) -> OrMap<String, Value> {
        self.view(|s| &s.map)
    }

    /// Runs a register mutator; returns the delta.
    pub fn with_register<F>(&mut self, mutate: F) -> Result<Value, CrdtError>
    where
        F: FnOnce(&mut MvRegister<ByteBuf>) -> Result<MvRegister<ByteBuf>, CrdtError>,
    {
        self.mutate(
            |s| &mut s.register,
            |c| ValueStore { register: c, ..Default::default() },
            mutate,
        )
    }

    /// Runs a counter mutator; returns the delta.
    pub fn with_counter<F>(&mut self, mutate: F) -> Result<Value, CrdtError>
    where
        F: FnOnce(&mut CausalCounter) -> Result<CausalCounter, CrdtError>,
    {
        self.mutate(|s| &mut s.counter, |c| ValueStore { counter: c, ..Default::default() }, mutate)
    }

    /// Runs a set mutator; returns the delta.
    pub fn with_set<F>(&mut self, mutate: F) -> Result<Value, CrdtError>
    where
        F: FnOnce(&mut OrSet<String>) -> Result<OrSet<String>, CrdtError>,
    {
        self.mutate(|s| &mut s.set, |c| ValueStore { set: c, ..Default::default() }, mutate)
    }

    /// Runs a flag mutator; returns the delta.
    pub fn with_flag<F>(&mut self, mutate: F) -> Result<Value, CrdtError>
    where
        F: FnOnce(&mut EwFlag) -> Result<EwFlag, CrdtError>,
    {
        self.mutate(|s| &mut s.flag, |c| ValueStore { flag: c, ..Default::default() }, mutate)
    }

    /// Runs a map mutator; returns the delta.
    pub fn with_map<F>(&mut self, mutate: F) -> Result<Value, CrdtError>
    where
        F: FnOnce(&mut OrMap<String, Value>) -> Result<OrMap<String, Value>, CrdtError>,
    {
        self.mutate(|s| &mut s.map, |c| ValueStore { map: c, ..Default::default() }, mutate)
    }

    /// Removes everything `seen` holds, of every type; returns the delta. With the
    /// context of a read this deletes exactly what the read returned.
    pub fn delete(&mut self, seen: &CausalContext) -> Value {
        let delta = Value { inner: Causal { store: ValueStore::default(), ctx: seen.clone() } };
        self.merge(&delta);
        delta
    }

    /// Removes everything this replica holds, of every type; returns the delta.
    pub fn clear(&mut self) -> Value {
        let seen = CausalContext::from_dots(self.inner.store.dots());
        self.delete(&seen)
    }

    /// Checks a state from outside (a peer, a file) against the bounds a local
    /// write keeps: members, siblings, nesting depth, value and name lengths,
    /// context entries, and no dot counter past [`Limits::DOT_COUNTER_MAX`]. Merges
    /// never refuse, so a state is checked before it is merged; a state that
    /// fails is refused whole.
    pub fn validate(&self, limits: &Limits) -> Result<(), CrdtError> {
        let ctx = &self.inner.ctx;
        if ctx.entries() > limits.context_entries_max {
            return Err(CrdtError::ContextTooLarge {
                entries: ctx.entries(),
                max: limits.context_entries_max,
            });
        }
        let highest = ctx.vv().iter().map(|(node, counter)| Dot { node, counter });
        let mut dots = highest.chain(ctx.cloud().iter().copied());
        if let Some(dot) = dots.find(|d| d.counter > Limits::DOT_COUNTER_MAX) {
            return Err(CrdtError::Malformed { reason: MalformedReason::DotTooHigh { dot } });
        }
        self.inner.store.validate(limits, 0)?;
        // A well-formed state has seen every dot it holds, and holds no empty
        // member or field: states the mutators and merges make always are.
        if let Some(dot) = self.inner.store.dots().into_iter().find(|dot| !ctx.contains(dot)) {
            return Err(CrdtError::Malformed { reason: MalformedReason::UnseenDot { dot } });
        }
        Ok(())
    }

    fn view<E: Embed>(&self, component: impl FnOnce(&ValueStore) -> &E::Store) -> E {
        E::from_parts(component(&self.inner.store).clone(), self.inner.ctx.clone())
    }

    /// Moves one component out, runs `mutate` on it as its own type, moves it back
    /// (it now holds the delta too) and merges the delta, wrapped as a `Value`.
    fn mutate<E: Embed>(
        &mut self,
        component: impl Fn(&mut ValueStore) -> &mut E::Store,
        wrap: impl FnOnce(E::Store) -> ValueStore,
        mutate: impl FnOnce(&mut E) -> Result<E, CrdtError>,
    ) -> Result<Value, CrdtError> {
        let taken = std::mem::take(component(&mut self.inner.store));
        let mut typed = E::from_parts(taken, self.inner.ctx.clone());
        let result = mutate(&mut typed);
        *component(&mut self.inner.store) = typed.into_parts().0;
        let (store, ctx) = result?.into_parts();
        let delta = Value { inner: Causal { store: wrap(store), ctx } };
        self.merge(&delta);
        Ok(delta)
    }
}

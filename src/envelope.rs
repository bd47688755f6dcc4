//! What one key stores: the versioned envelope around its CRDT state.
//!
//! On disk a key's value is `calmkv_crdts::encode(Envelope)`: a format version
//! byte, then MessagePack with named fields holding the causal product of every
//! CRDT type ([`Value`], whose causal context comes with it) and the
//! last-writer-wins register, which is not causal and sits beside it. The types
//! present are derived from which components are non-empty, so no separate type
//! tag can disagree with the data. A deleted key keeps its envelope with empty
//! components: the context is the tombstone that stops late deltas from
//! resurrecting what was deleted.

use calmkv_crdts::{Crdt, Kind, LwwRegister, Value};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::fmt;

/// The type of a key, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// Multi-value register (plain `PUT`).
    Register,
    /// Last-writer-wins register (`PUT ?type=lww`).
    Lww,
    /// Counter.
    Counter,
    /// Set of strings.
    Set,
    /// Map of fields.
    Map,
    /// Flag.
    Flag,
}

impl From<Kind> for KeyType {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Register => KeyType::Register,
            Kind::Counter => KeyType::Counter,
            Kind::Set => KeyType::Set,
            Kind::Flag => KeyType::Flag,
            Kind::Map => KeyType::Map,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Register => "register",
            KeyType::Lww => "lww",
            KeyType::Counter => "counter",
            KeyType::Set => "set",
            KeyType::Map => "map",
            KeyType::Flag => "flag",
        })
    }
}

/// The replicated state of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Every causal type, under one context.
    pub value: Value,
    /// The last-writer-wins register.
    #[serde(default, skip_serializing_if = "LwwRegister::is_unset")]
    pub lww: LwwRegister<ByteBuf>,
}

impl Envelope {
    /// The types with live content: none when absent or deleted, several after
    /// concurrent creations with different types.
    pub fn types(&self) -> Vec<KeyType> {
        let mut types: Vec<KeyType> = self.value.kinds().into_iter().map(KeyType::from).collect();
        if self.lww.get().is_some() {
            types.push(KeyType::Lww);
        }
        types.sort();
        types
    }

    /// Whether the key has no live content.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty() && self.lww.get().is_none()
    }
}

impl Crdt for Envelope {
    fn merge(&mut self, other: &Self) {
        self.value.merge(&other.value);
        self.lww.merge(&other.lww);
    }
}

//! The one operation type both faces build: an HTTP handler parses a request into
//! an [`Op`], an embedded handle constructs one, and both hand it to
//! [`Node::apply`](crate::Node::apply). Nothing else decides what a write does.
//!
//! CRDT operations ([`CrdtOp`]) deserialize from the JSON bodies of docs/openapi.yaml,
//! e.g. `{"counter":{"incr":5}}`, `{"set":{"add":["a"],"remove":["b"]}}`,
//! `{"map":{"update":{"qty":{"counter":{"incr":1}}}}}`, `{"flag":"enable"}`.

use crate::error::NodeError;
use crate::Limits;
use bytes::Bytes;
use calmkv_crdts::CausalContext;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A validated key: UTF-8, 1..=`key_bytes_max` bytes, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Checks `key` against the limits.
    pub fn new(key: impl Into<String>, limits: &Limits) -> Result<Key, NodeError> {
        let key = key.into();
        let reason = if key.is_empty() {
            Some("the key is empty")
        } else if key.len() > limits.key_bytes_max {
            Some("the key is too long")
        } else if key.chars().any(char::is_control) {
            Some("the key contains a control character")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(NodeError::BadKey { reason, max: limits.key_bytes_max }),
            None => Ok(Key(key)),
        }
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A write to one key.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// The key written.
    pub key: Key,
    /// What is done to it.
    pub action: Action,
}

/// What a write does to its key.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Set a multi-value register. With `context`, supersede the values that
    /// context saw; without, the value becomes a sibling of what is there. With
    /// `if_absent`, refuse (`precondition_failed`) when the key holds a value.
    Put {
        /// The bytes to store.
        value: Bytes,
        /// The context of the read this write is based on.
        context: Option<CausalContext>,
        /// Create only: refuse if the key has a value.
        if_absent: bool,
    },
    /// Set a last-writer-wins register.
    PutLww {
        /// The bytes to store.
        value: Bytes,
    },
    /// Delete what `context` saw, or everything this node holds when `None`.
    Delete {
        /// The context of the read this delete is based on.
        context: Option<CausalContext>,
    },
    /// A CRDT operation.
    Crdt(CrdtOp),
}

/// A CRDT operation, as the JSON body of `POST /v1/kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum CrdtOp {
    /// `{"counter":{"incr":n}}` or `{"counter":{"decr":n}}`.
    Counter(CounterOp),
    /// `{"set":{"add":[..],"remove":[..]}}`.
    Set(SetOp),
    /// `{"map":{"update":{field: op},"remove":[field]}}`.
    Map(MapOp),
    /// `{"flag":"enable"}` or `{"flag":"disable"}`.
    Flag(FlagOp),
    /// `{"register":"text"}`: inside a map, set a field's register to a string,
    /// superseding the field's values this node has seen.
    Register(String),
}

impl CrdtOp {
    /// The type of key the operation applies to.
    pub fn kind(&self) -> calmkv_crdts::Kind {
        use calmkv_crdts::Kind;
        match self {
            CrdtOp::Counter(_) => Kind::Counter,
            CrdtOp::Set(_) => Kind::Set,
            CrdtOp::Map(_) => Kind::Map,
            CrdtOp::Flag(_) => Kind::Flag,
            CrdtOp::Register(_) => Kind::Register,
        }
    }
}

/// Counter operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum CounterOp {
    /// Add.
    Incr(u64),
    /// Subtract.
    Decr(u64),
}

/// Set operations: adds and removes applied together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetOp {
    /// Members to add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
    /// Members to remove (the adds of them this node has seen).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Map operations: field updates and field removals applied together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapOp {
    /// Operations on fields, each field a value of any type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub update: BTreeMap<String, CrdtOp>,
    /// Fields to remove (the updates of them this node has seen).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Flag operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagOp {
    /// Turn on.
    Enable,
    /// Turn off.
    Disable,
}

impl Op {
    /// Checks sizes and shapes that the limits bound, before anything is read.
    pub fn validate(&self, limits: &Limits) -> Result<(), NodeError> {
        match &self.action {
            Action::Put { value, .. } | Action::PutLww { value } => {
                if value.len() > limits.value_bytes_max {
                    return Err(NodeError::ValueTooLarge {
                        bytes: value.len(),
                        max: limits.value_bytes_max,
                    });
                }
                Ok(())
            }
            Action::Delete { .. } => Ok(()),
            Action::Crdt(op) => validate_crdt(op, limits, 1),
        }
    }
}

fn validate_crdt(op: &CrdtOp, limits: &Limits, depth: usize) -> Result<(), NodeError> {
    let name_ok = |name: &String, what: &'static str| {
        if name.len() > limits.member_bytes_max {
            Err(NodeError::BadRequest {
                reason: format!("a {what} is longer than {} bytes", limits.member_bytes_max),
            })
        } else {
            Ok(())
        }
    };
    match op {
        CrdtOp::Counter(_) | CrdtOp::Flag(_) => Ok(()),
        CrdtOp::Register(value) if value.len() > limits.value_bytes_max => {
            Err(NodeError::ValueTooLarge { bytes: value.len(), max: limits.value_bytes_max })
        }
        CrdtOp::Register(_) => Ok(()),
        CrdtOp::Set(set) => {
            if set.add.is_empty() && set.remove.is_empty() {
                return Err(NodeError::BadRequest {
                    reason: "a set operation adds or removes nothing".into(),
                });
            }
            if let Some(both) = set.add.iter().find(|m| set.remove.contains(m)) {
                return Err(NodeError::BadRequest {
                    reason: format!("member {both:?} is both added and removed"),
                });
            }
            set.add.iter().chain(&set.remove).try_for_each(|m| name_ok(m, "set member"))
        }
        CrdtOp::Map(map) => {
            if depth > limits.map_depth_max {
                return Err(NodeError::BadRequest {
                    reason: format!("maps are nested deeper than {}", limits.map_depth_max),
                });
            }
            if map.update.is_empty() && map.remove.is_empty() {
                return Err(NodeError::BadRequest {
                    reason: "a map operation updates or removes nothing".into(),
                });
            }
            if let Some(both) = map.remove.iter().find(|f| map.update.contains_key(*f)) {
                return Err(NodeError::BadRequest {
                    reason: format!("field {both:?} is both updated and removed"),
                });
            }
            map.remove.iter().try_for_each(|f| name_ok(f, "map field name"))?;
            for (field, nested) in &map.update {
                name_ok(field, "map field name")?;
                validate_crdt(nested, limits, depth + 1)?;
            }
            Ok(())
        }
    }
}

//! What a read returns: the typed value(s) of a key and its causal context.

use crate::envelope::{Envelope, KeyType};
use bytes::Bytes;
use calmkv_crdts::{CausalContext, Value};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::collections::BTreeMap;

/// The value of one type held by a key or map field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypedValue {
    /// A multi-value register: one value, or several concurrent siblings.
    Register(Vec<Bytes>),
    /// A last-writer-wins register.
    Lww(Bytes),
    /// A counter.
    Counter(i128),
    /// A set's members, in order.
    Set(Vec<String>),
    /// A flag.
    Flag(bool),
    /// A map's fields; a field holds several values only after concurrent
    /// creations with different types.
    Map(BTreeMap<String, Vec<TypedValue>>),
}

impl TypedValue {
    /// The type of the value.
    pub fn key_type(&self) -> KeyType {
        match self {
            TypedValue::Register(_) => KeyType::Register,
            TypedValue::Lww(_) => KeyType::Lww,
            TypedValue::Counter(_) => KeyType::Counter,
            TypedValue::Set(_) => KeyType::Set,
            TypedValue::Flag(_) => KeyType::Flag,
            TypedValue::Map(_) => KeyType::Map,
        }
    }

    /// Every live value of a [`Value`] (map fields, nested).
    pub fn all_of(value: &Value) -> Vec<TypedValue> {
        use calmkv_crdts::Kind;
        value
            .kinds()
            .into_iter()
            .map(|kind| match kind {
                Kind::Register => TypedValue::Register(
                    value.register().values().map(|v| Bytes::copy_from_slice(v)).collect(),
                ),
                Kind::Counter => TypedValue::Counter(value.counter().value()),
                Kind::Set => TypedValue::Set(value.set().members().cloned().collect()),
                Kind::Flag => TypedValue::Flag(value.flag().is_enabled()),
                Kind::Map => TypedValue::Map(
                    value
                        .map()
                        .fields()
                        .map(|(k, v)| (k.clone(), TypedValue::all_of(&v)))
                        .collect(),
                ),
            })
            .collect()
    }
}

/// A register value in JSON: the string when it is UTF-8, else `{"base64": ..}`.
fn serialize_bytes<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => s.serialize_str(text),
        Err(_) => {
            use base64::Engine;
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry(
                "base64",
                &base64::engine::general_purpose::STANDARD.encode(bytes),
            )?;
            map.end()
        }
    }
}

struct JsonBytes<'a>(&'a Bytes);

impl Serialize for JsonBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_bytes(self.0, s)
    }
}

/// A field's values: the value itself, or `{"conflict": [..]}` for several types.
struct FieldJson<'a>(&'a [TypedValue]);

impl Serialize for FieldJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            [one] => one.serialize(s),
            many => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("conflict", many)?;
                map.end()
            }
        }
    }
}

/// JSON: `{"type": "<type>", "value": <value>}`; a register with siblings is
/// `{"type": "register", "siblings": [..]}`.
impl Serialize for TypedValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("type", &self.key_type())?;
        match self {
            TypedValue::Register(values) if values.len() == 1 => {
                map.serialize_entry("value", &JsonBytes(&values[0]))?
            }
            TypedValue::Register(values) => {
                let siblings: Vec<JsonBytes> = values.iter().map(JsonBytes).collect();
                map.serialize_entry("siblings", &siblings)?
            }
            TypedValue::Lww(value) => map.serialize_entry("value", &JsonBytes(value))?,
            TypedValue::Counter(n) => map.serialize_entry("value", n)?,
            TypedValue::Set(members) => map.serialize_entry("value", members)?,
            TypedValue::Flag(on) => map.serialize_entry("value", on)?,
            TypedValue::Map(fields) => {
                let fields: BTreeMap<&String, FieldJson> =
                    fields.iter().map(|(k, v)| (k, FieldJson(v))).collect();
                map.serialize_entry("value", &fields)?
            }
        }
        map.end()
    }
}

/// The result of reading a key that has a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// One value per type the key holds: one normally, several after concurrent
    /// creations with different types.
    pub values: Vec<TypedValue>,
    /// Pass it to a write or delete to supersede what this read saw.
    pub context: CausalContext,
}

impl ReadResult {
    /// The read of an envelope; `None` when it has no live content.
    pub fn of(envelope: &Envelope) -> Option<ReadResult> {
        if envelope.is_empty() {
            return None;
        }
        let mut values = TypedValue::all_of(&envelope.value);
        if let Some(value) = envelope.lww.get() {
            values.push(TypedValue::Lww(Bytes::copy_from_slice(value)));
        }
        Some(ReadResult { values, context: envelope.value.context().clone() })
    }
}

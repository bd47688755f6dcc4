//! The embedded face: [`Db`] and its typed handles.
//!
//! Every handle method builds an [`Op`] and calls [`Node::apply`], or reads with
//! [`Node::envelope`]: the same path the HTTP API takes, so an application that
//! embeds calmkv and one that talks HTTP see the same behaviour.

use crate::envelope::{Envelope, KeyType};
use crate::error::NodeError;
use crate::node::{Applied, Node, ScanPage};
use crate::op::{Action, CounterOp, CrdtOp, FlagOp, Key, MapOp, Op, SetOp};
use crate::read::{ReadResult, TypedValue};
use crate::Config;
use bytes::Bytes;
use calmkv_crdts::{CausalContext, NodeId};
use std::collections::BTreeMap;
use std::path::Path;

/// An embedded calmkv node with a local data directory.
pub struct Db {
    node: Node,
}

impl Db {
    /// Opens (or creates) a node in `dir` with the default configuration.
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, NodeError> {
        Db::open_with(Config::new(dir.as_ref()))
    }

    /// Opens a node as `config` says.
    pub fn open_with(config: Config) -> Result<Db, NodeError> {
        Ok(Db { node: config.open_node()? })
    }

    /// The node under the handles.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// This node's identity.
    pub fn id(&self) -> NodeId {
        self.node.id()
    }

    /// Applies an operation built by hand.
    pub fn apply(&self, op: Op) -> Result<Applied, NodeError> {
        self.node.apply_alone(&op)
    }

    /// Reads a key of any type: `None` when it has no value.
    pub fn get(&self, key: &str) -> Result<Option<ReadResult>, NodeError> {
        self.node.read(&self.key(key)?)
    }

    /// Deletes everything this node holds under `key`.
    pub fn delete(&self, key: &str) -> Result<(), NodeError> {
        self.write(key, Action::Delete { context: None }).map(drop)
    }

    /// Lists live keys with a prefix, a page at a time (see [`Node::scan`]).
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, NodeError> {
        self.node.scan(prefix, after, limit)
    }

    /// Waits until every write so far is durable.
    pub fn flush(&self) -> Result<(), NodeError> {
        self.node.flush()
    }

    /// The multi-value register at `key`.
    pub fn register(&self, key: &str) -> Register<'_> {
        Register(Handle { db: self, key: key.to_string() })
    }

    /// The last-writer-wins register at `key`.
    pub fn lww(&self, key: &str) -> Lww<'_> {
        Lww(Handle { db: self, key: key.to_string() })
    }

    /// The counter at `key`.
    pub fn counter(&self, key: &str) -> Counter<'_> {
        Counter(Handle { db: self, key: key.to_string() })
    }

    /// The set at `key`.
    pub fn set(&self, key: &str) -> Set<'_> {
        Set(Handle { db: self, key: key.to_string() })
    }

    /// The map at `key`.
    pub fn map(&self, key: &str) -> Map<'_> {
        Map(Handle { db: self, key: key.to_string() })
    }

    /// The flag at `key`.
    pub fn flag(&self, key: &str) -> Flag<'_> {
        Flag(Handle { db: self, key: key.to_string() })
    }

    fn key(&self, key: &str) -> Result<Key, NodeError> {
        Key::new(key, self.node.limits())
    }

    fn write(&self, key: &str, action: Action) -> Result<Applied, NodeError> {
        self.node.apply_alone(&Op { key: self.key(key)?, action })
    }
}

struct Handle<'a> {
    db: &'a Db,
    key: String,
}

impl Handle<'_> {
    fn write(&self, action: Action) -> Result<Applied, NodeError> {
        self.db.write(&self.key, action)
    }

    fn crdt(&self, op: CrdtOp) -> Result<Applied, NodeError> {
        self.write(Action::Crdt(op))
    }

    /// The key's envelope, refused when it holds anything but `wanted`.
    fn read(&self, wanted: KeyType) -> Result<Envelope, NodeError> {
        let envelope = self.db.node.envelope(&self.db.key(&self.key)?)?;
        crate::node::check_type(&self.key, &envelope.types(), wanted)?;
        Ok(envelope)
    }
}

/// The values of a multi-value register and the context to write back with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterValue {
    /// One value, or several concurrent siblings.
    pub values: Vec<Bytes>,
    /// Pass to [`Register::put`] to supersede these values.
    pub context: CausalContext,
}

/// A multi-value register handle.
pub struct Register<'a>(Handle<'a>);

impl Register<'_> {
    /// The values (siblings when writes were concurrent), `None` when absent.
    pub fn get(&self) -> Result<Option<RegisterValue>, NodeError> {
        let envelope = self.0.read(KeyType::Register)?;
        let register = envelope.value.register();
        if register.is_empty() {
            return Ok(None);
        }
        let values = register.values().map(|v| Bytes::copy_from_slice(v)).collect();
        Ok(Some(RegisterValue { values, context: envelope.value.context().clone() }))
    }

    /// Writes `value`, superseding what `context` saw (nothing when `None`, so the
    /// value becomes a sibling of any there). Returns the new context.
    pub fn put(
        &self,
        value: impl Into<Bytes>,
        context: Option<&CausalContext>,
    ) -> Result<CausalContext, NodeError> {
        let action =
            Action::Put { value: value.into(), context: context.cloned(), if_absent: false };
        Ok(self.0.write(action)?.context().clone())
    }

    /// Writes `value` only if the key has no value (`PreconditionFailed` if it has).
    pub fn create(&self, value: impl Into<Bytes>) -> Result<CausalContext, NodeError> {
        let action = Action::Put { value: value.into(), context: None, if_absent: true };
        Ok(self.0.write(action)?.context().clone())
    }

    /// Deletes what `context` saw, or all this node holds when `None`.
    pub fn delete(&self, context: Option<&CausalContext>) -> Result<(), NodeError> {
        self.0.write(Action::Delete { context: context.cloned() }).map(drop)
    }
}

/// A last-writer-wins register handle.
pub struct Lww<'a>(Handle<'a>);

impl Lww<'_> {
    /// The value, `None` when absent.
    pub fn get(&self) -> Result<Option<Bytes>, NodeError> {
        Ok(self.0.read(KeyType::Lww)?.lww.get().map(|v| Bytes::copy_from_slice(v)))
    }

    /// Writes `value`; the latest write by hybrid clock wins.
    pub fn set(&self, value: impl Into<Bytes>) -> Result<(), NodeError> {
        self.0.write(Action::PutLww { value: value.into() }).map(drop)
    }
}

/// A counter handle.
pub struct Counter<'a>(Handle<'a>);

impl Counter<'_> {
    /// The value (0 when absent).
    pub fn get(&self) -> Result<i128, NodeError> {
        Ok(self.0.read(KeyType::Counter)?.value.counter().value())
    }

    /// Adds `n`; returns the new value.
    pub fn incr(&self, n: u64) -> Result<i128, NodeError> {
        Ok(self.0.crdt(CrdtOp::Counter(CounterOp::Incr(n)))?.state.value.counter().value())
    }

    /// Subtracts `n`; returns the new value.
    pub fn decr(&self, n: u64) -> Result<i128, NodeError> {
        Ok(self.0.crdt(CrdtOp::Counter(CounterOp::Decr(n)))?.state.value.counter().value())
    }
}

/// A set handle.
pub struct Set<'a>(Handle<'a>);

impl Set<'_> {
    /// The members, in order (empty when absent).
    pub fn members(&self) -> Result<Vec<String>, NodeError> {
        Ok(self.0.read(KeyType::Set)?.value.set().members().cloned().collect())
    }

    /// Whether `member` is in the set.
    pub fn contains(&self, member: &str) -> Result<bool, NodeError> {
        Ok(self.0.read(KeyType::Set)?.value.set().contains(&member.to_string()))
    }

    /// Adds one member.
    pub fn add(&self, member: impl Into<String>) -> Result<(), NodeError> {
        self.apply(SetOp { add: vec![member.into()], remove: vec![] })
    }

    /// Removes one member (the adds of it this node has seen).
    pub fn remove(&self, member: impl Into<String>) -> Result<(), NodeError> {
        self.apply(SetOp { add: vec![], remove: vec![member.into()] })
    }

    /// Adds and removes members in one atomic write.
    pub fn apply(&self, op: SetOp) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Set(op)).map(drop)
    }
}

/// A map handle.
pub struct Map<'a>(Handle<'a>);

impl Map<'_> {
    /// The fields, `None` when absent. A field holds several values only after
    /// concurrent creations with different types.
    pub fn get(&self) -> Result<Option<BTreeMap<String, Vec<TypedValue>>>, NodeError> {
        let envelope = self.0.read(KeyType::Map)?;
        Ok(TypedValue::all_of(&envelope.value).into_iter().find_map(|v| match v {
            TypedValue::Map(fields) => Some(fields),
            _ => None,
        }))
    }

    /// Runs `op` on the field `field` (creating it).
    pub fn update(&self, field: impl Into<String>, op: CrdtOp) -> Result<(), NodeError> {
        self.apply(MapOp { update: [(field.into(), op)].into(), remove: vec![] })
    }

    /// Removes a field (the updates of it this node has seen).
    pub fn remove(&self, field: impl Into<String>) -> Result<(), NodeError> {
        self.apply(MapOp { update: BTreeMap::new(), remove: vec![field.into()] })
    }

    /// Updates and removes fields in one atomic write.
    pub fn apply(&self, op: MapOp) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Map(op)).map(drop)
    }
}

/// A flag handle.
pub struct Flag<'a>(Handle<'a>);

impl Flag<'_> {
    /// Whether the flag is on (off when absent).
    pub fn get(&self) -> Result<bool, NodeError> {
        Ok(self.0.read(KeyType::Flag)?.value.flag().is_enabled())
    }

    /// Turns the flag on.
    pub fn enable(&self) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Flag(FlagOp::Enable)).map(drop)
    }

    /// Turns the flag off (the enables this node has seen).
    pub fn disable(&self) -> Result<(), NodeError> {
        self.0.crdt(CrdtOp::Flag(FlagOp::Disable)).map(drop)
    }
}
